// CUDA registration of the VQ ops: the torch glue around the torch-free kernels in
// mmfast/cuda/vq.cuh (checks, allocation and the device guard in glue/vq_glue.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "glue/cuda_launch.h"
#include "glue/vq_glue.h"
#include "mmfast/cuda/vq.cuh"

namespace {

using mmfast::glue::check_launch;

struct VQCudaBackend {
  static size_t quantize_workspace_bytes(const mmfast::VQParams& p) {
    return mmfast::cuda::vq_quantize_workspace_bytes(p);
  }
  static void quantize(mmfast::VQParams& p) {
    check_launch(mmfast::cuda::vq_quantize(p, at::cuda::getCurrentCUDAStream()), "vq_quantize", "kernel launch");
  }
  static void dequantize(mmfast::VQLookupParams& p) {
    check_launch(mmfast::cuda::vq_dequantize(p, at::cuda::getCurrentCUDAStream()), "vq_dequantize", "kernel launch");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) { MMFAST_REGISTER_VQ(m, VQCudaBackend); }
