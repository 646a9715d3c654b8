// mmfast::cpu::parallel_for on plain std::thread, for torch-free builds of the kernels.
#include <algorithm>
#include <exception>
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
  std::vector<std::exception_ptr> errors(workers);
  for (int64_t w = 0; w < workers; ++w) {
    const int64_t begin = n * w / workers, end = n * (w + 1) / workers;
    threads.emplace_back([=, &errors] {
      try {
        fn(ctx, begin, end);
      } catch (...) {
        errors[w] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& error : errors)  // the first worker's, as at::parallel_for rethrows
    if (error) std::rethrow_exception(error);
}

}  // namespace cpu
}  // namespace mmfast
