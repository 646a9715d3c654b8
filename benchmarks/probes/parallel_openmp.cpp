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
    const int64_t w = omp_get_thread_num(), begin = n * w / workers, end = n * (w + 1) / workers;
    fn(ctx, begin, end);
  }
}

}  // namespace cpu
}  // namespace mmfast
