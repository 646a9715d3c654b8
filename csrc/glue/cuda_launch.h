// The CUDA registrations' launch check: a kernel entry point's cudaError_t and the last launch
// error become a torch error naming the op (CUDA translation units only).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace mmfast {
namespace glue {

inline void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mmfast::", op, " (CUDA): ", what, " failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace glue
}  // namespace mmfast
