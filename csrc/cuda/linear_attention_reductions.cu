// The linear-attention passes that reduce over tokens (see linear_attention_passes.h).
#include "linear_attention_passes.h"

#include "mmfast/cuda/linear_attention/apply_backward.cuh"
#include "mmfast/cuda/linear_attention/state.cuh"

namespace mmfast {
namespace cuda_passes {

size_t linear_attention_state_workspace_bytes(const LinearAttentionParams& p) {
  return cuda::linear_attention_state_workspace_bytes(p);
}
cudaError_t linear_attention_state(const LinearAttentionParams& p, cudaStream_t stream) {
  return cuda::linear_attention_state(p, stream);
}
size_t linear_attention_apply_backward_workspace_bytes(const LinearAttentionParams& p) {
  return cuda::linear_attention_apply_backward_workspace_bytes(p);
}
cudaError_t linear_attention_apply_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  return cuda::linear_attention_apply_backward(p, stream);
}

}  // namespace cuda_passes
}  // namespace mmfast
