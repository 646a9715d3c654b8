// mmfast::cpu::parallel_for on OpenMP's persistent thread pool (libgomp, as torch's), for probes
// whose timings would otherwise carry the per-call thread spawns of tests/cpp/parallel_threads.cpp.
// Splits like the op's glue: contiguous ranges, one per thread.
#include <omp.h>

#include <algorithm>

#include "mmfast/cpu/parallel.h"

namespace mmfast {
namespace cpu {

int max_threads() { return omp_get_max_threads(); }

void parallel_for(int64_t n, void* ctx, RangeFn fn) {
  const int64_t workers = std::min<int64_t>(n, max_threads());
  if (workers <= 1) {
    if (n > 0) fn(ctx, 0, n);
    return;
  }
#pragma omp parallel num_threads(workers)
  {
    // Split over the team OpenMP delivers (nested, OMP_DYNAMIC or a thread limit may give fewer).
    const int64_t team = omp_get_num_threads(), w = omp_get_thread_num();
    fn(ctx, n * w / team, n * (w + 1) / team);
  }
}

}  // namespace cpu
}  // namespace mmfast
