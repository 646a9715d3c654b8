// The linear-attention passes that map each token through a finished (B, H) matrix (see
// linear_attention_passes.h).
#include "linear_attention_passes.h"

#include "mmfast/cuda/linear_attention/apply.cuh"
#include "mmfast/cuda/linear_attention/state_backward.cuh"

namespace mmfast {
namespace cuda_passes {

size_t linear_attention_apply_workspace_bytes(const LinearAttentionParams& p) {
  return cuda::linear_attention_apply_workspace_bytes(p);
}
cudaError_t linear_attention_apply(const LinearAttentionParams& p, cudaStream_t stream) {
  return cuda::linear_attention_apply(p, stream);
}
size_t linear_attention_state_backward_workspace_bytes(const LinearAttentionParams& p) {
  return cuda::linear_attention_state_backward_workspace_bytes(p);
}
cudaError_t linear_attention_state_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  return cuda::linear_attention_state_backward(p, stream);
}

}  // namespace cuda_passes
}  // namespace mmfast
