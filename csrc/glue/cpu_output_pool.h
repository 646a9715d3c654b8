// Large CPU outputs in reused blocks: a process-wide pool that keeps the blocks of freed outputs
// (up to a budget of idle bytes) for the next output of about the same size.
//
// Why: glibc maps every block over 32 MiB anew and unmaps it on free, so an op called in a loop
// (a UNet's layers, each step) pays the kernel's page faults and page zeroing for its whole
// output on every call, even advised huge pages (~14 ms per 42 MB on the 2-core VMs), while an
// op whose outputs stay under the threshold gets warm memory from the heap. The CUDA caching
// allocator keeps freed blocks the same way.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mmfast {
namespace glue {

// Outputs from this size on come from the pool (below it glibc's heap serves warm memory).
// Blocks of kHugePageAdviceMinBytes (8 MiB) and more are advised huge pages.
constexpr size_t kPooledOutputMinBytes = size_t(1) << 20;

// A contiguous, uninitialised CPU tensor in a pooled block (resizable; its storage's allocator
// is the pool), or an undefined tensor when the pool is off (budget 0) or nbytes is below
// kPooledOutputMinBytes: the caller then uses at::empty.
at::Tensor pooled_cpu_empty(at::IntArrayRef shape, at::ScalarType dtype);

// torch.ops.mmfast.cpu_output_pool: (idle blocks, idle bytes, bytes in live outputs, budget MiB)
// before the budget is set (budget_mb >= 0; 0 = off) and the idle blocks released (clear).
std::vector<int64_t> cpu_output_pool(int64_t budget_mb, bool clear);

}  // namespace glue
}  // namespace mmfast
