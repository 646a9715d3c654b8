// mmfast::cpu::parallel_for on top of ATen's intra-op thread pool, so the CPU kernels
// follow torch.set_num_threads and never oversubscribe next to torch's own ops.
#include <ATen/Parallel.h>

#include "mmfast/cpu/parallel.h"

namespace mmfast {
namespace cpu {

void parallel_for(int64_t n, void* ctx, RangeFn fn) {
  if (n <= 0) return;
  at::parallel_for(0, n, /*grain_size=*/1, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
}

int max_threads() { return at::get_num_threads(); }

}  // namespace cpu
}  // namespace mmfast
