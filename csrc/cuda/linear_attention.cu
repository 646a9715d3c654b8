// CUDA registration of the linear-attention ops: the torch glue around the torch-free
// kernels in mmfast/cuda/linear_attention.cuh, which linear_attention_reductions.cu and
// linear_attention_token_maps.cu compile (see linear_attention_passes.h). Input checks,
// allocation and the device guard live in glue/linear_attention_glue.h (shared with the CPU
// backend).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "glue/linear_attention_glue.h"
#include "linear_attention_passes.h"

namespace {

using mmfast::LinearAttentionOp;
using mmfast::LinearAttentionParams;

const char* op_name(LinearAttentionOp op) {
  switch (op) {
    case LinearAttentionOp::kState: return "linear_attention_state";
    case LinearAttentionOp::kApply: return "linear_attention_apply";
    case LinearAttentionOp::kForward: return "linear_attention";
    case LinearAttentionOp::kApplyBackward: return "linear_attention_apply_backward";
    case LinearAttentionOp::kStateBackward: return "linear_attention_state_backward";
  }
  return "linear_attention(?)";
}

struct CudaBackend {
  static size_t workspace_bytes(const LinearAttentionParams& p, LinearAttentionOp op) {
    namespace k = ::mmfast::cuda_passes;
    switch (op) {
      case LinearAttentionOp::kState: return k::linear_attention_state_workspace_bytes(p);
      case LinearAttentionOp::kApply: return k::linear_attention_apply_workspace_bytes(p);
      case LinearAttentionOp::kForward: return k::linear_attention_state_workspace_bytes(p);  // apply needs none
      case LinearAttentionOp::kApplyBackward: return k::linear_attention_apply_backward_workspace_bytes(p);
      case LinearAttentionOp::kStateBackward: return k::linear_attention_state_backward_workspace_bytes(p);
    }
    return 0;
  }

  static void run(LinearAttentionParams& p, LinearAttentionOp op) {
    namespace k = ::mmfast::cuda_passes;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    cudaError_t err = cudaErrorInvalidValue;
    switch (op) {
      case LinearAttentionOp::kState: err = k::linear_attention_state(p, stream); break;
      case LinearAttentionOp::kApply: err = k::linear_attention_apply(p, stream); break;
      case LinearAttentionOp::kForward:  // as mmfast::cuda::linear_attention_forward
        err = k::linear_attention_state(p, stream);
        if (err == cudaSuccess) err = k::linear_attention_apply(p, stream);
        break;
      case LinearAttentionOp::kApplyBackward: err = k::linear_attention_apply_backward(p, stream); break;
      case LinearAttentionOp::kStateBackward: err = k::linear_attention_state_backward(p, stream); break;
    }
    TORCH_CHECK(err == cudaSuccess, "mmfast::", op_name(op), " (CUDA): kernel launch failed: ",
                cudaGetErrorName(err), ": ", cudaGetErrorString(err), " (B=", p.batch, ", N=", p.seqlen,
                ", H=", p.heads, ", Dk=", p.dim_k, ", Dv=", p.dim_v, ", dtype=", static_cast<int>(p.dtype),
                ", feature_map=", mmfast::feature_map_name(p.feature_map), ")");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) { MMFAST_REGISTER_LINEAR_ATTENTION(m, CudaBackend); }
