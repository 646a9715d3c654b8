// The CPU kernels' only threading primitive, implemented by the host library (the torch
// glue maps it onto at::parallel_for, so torch.set_num_threads applies). Plain function
// pointers, no std templates: kernel TUs are compiled for several ISAs.
#pragma once

#include <cstdint>

namespace mmfast {
namespace cpu {

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Calls fn(ctx, begin, end) on disjoint ranges covering [0, n), possibly in parallel. fn may
// throw (a scratch allocation that failed: memory.h); the exception reaches the caller once
// every range has returned (ATen's parallel_for rethrows the first).
void parallel_for(int64_t n, void* ctx, RangeFn fn);
int max_threads();

}  // namespace cpu
}  // namespace mmfast
