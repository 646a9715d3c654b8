// The CUDA linear-attention passes as out-of-line functions, compiled in two translation units
// that the build runs in parallel (together about 100 kernel instantiations per architecture;
// one unit took about a minute per architecture, the longest step of the build):
//   linear_attention_reductions.cu  the passes that reduce over tokens: state, and
//                                   apply_backward (grad_q, then the state pass over (q, grad_out))
//   linear_attention_token_maps.cu  the passes that map each token through a finished (B, H)
//                                   matrix: apply, state_backward
// Each function has the contract of the inline entry point of the same name in
// mmfast/cuda/linear_attention/<pass>.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "mmfast/linear_attention.h"

namespace mmfast {
namespace cuda_passes {

size_t linear_attention_state_workspace_bytes(const LinearAttentionParams& p);
cudaError_t linear_attention_state(const LinearAttentionParams& p, cudaStream_t stream);
size_t linear_attention_apply_backward_workspace_bytes(const LinearAttentionParams& p);
cudaError_t linear_attention_apply_backward(const LinearAttentionParams& p, cudaStream_t stream);

size_t linear_attention_apply_workspace_bytes(const LinearAttentionParams& p);
cudaError_t linear_attention_apply(const LinearAttentionParams& p, cudaStream_t stream);
size_t linear_attention_state_backward_workspace_bytes(const LinearAttentionParams& p);
cudaError_t linear_attention_state_backward(const LinearAttentionParams& p, cudaStream_t stream);

}  // namespace cuda_passes
}  // namespace mmfast
