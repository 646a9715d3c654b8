// mmfast::cpu::parallel_for on plain std::thread, for torch-free builds of the kernels.
#include <algorithm>
#include <thread>
#include <vector>

#include "mmfast/cpu/parallel.h"

namespace mmfast {
namespace cpu {

int max_threads() { return static_cast<int>(std::max(1u, std::min(4u, std::thread::hardware_concurrency()))); }

void parallel_for(int64_t n, void* ctx, RangeFn fn) {
  const int64_t workers = std::min<int64_t>(n, max_threads());
  if (workers <= 1) {
    if (n > 0) fn(ctx, 0, n);
    return;
  }
  std::vector<std::thread> threads;
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t begin = n * w / workers, end = n * (w + 1) / workers;
    threads.emplace_back([=] { fn(ctx, begin, end); });
  }
  for (auto& t : threads) t.join();
}

}  // namespace cpu
}  // namespace mmfast
