// Torch-free CUDA kernels of the non-causal normalized linear attention (LinFusion): the
// public entry points. See mmfast/linear_attention.h for the math and the parameter struct.
//
// Two kernel families per pass. fp16 / bf16 with 16-byte aligned rows on sm_80+: cp.async rings
// of tiles sized to the head dims (48 / 64 / 80 wide; larger dims as several tiles) into
// ldmatrix + mma.sync with 16-bit operands (hi + lo where fp32 accuracy is kept), persistent
// grids sized by the occupancy query (the register-staged kernels when no block fits). Every
// other case: 64 x 64 output tiles staged through registers and shared memory with the shared
// tile GEMM (mmfast/cuda/tile_gemm.cuh): SIMT FMA for fp32 / fp64, TF32 tensor cores for
// fp16 / bf16 on sm_80+, every load and store bounds-checked. Token tensors are read in place
// through their (B, N, H) strides; phi is applied on load; no head dim or sequence length has
// to be a multiple of anything (tails are masked or zero-filled); all grids are 1-D.
// Each pass header holds its own entry point (linear_attention_<pass> and its workspace size),
// so a translation unit can compile a subset of the passes (csrc/cuda compiles them in two).
//   linear_attention/state.cuh           split-N state pass + deterministic reduction
//   linear_attention/apply.cuh           out = phi(q) S / (phi(q) . m + eps)
//   linear_attention/apply_backward.cuh  grad_q, then grad_state / grad_mean (state pass)
//   linear_attention/state_backward.cuh  grad_k, grad_v
#pragma once

#include "mmfast/cuda/linear_attention/apply.cuh"
#include "mmfast/cuda/linear_attention/apply_backward.cuh"
#include "mmfast/cuda/linear_attention/state.cuh"
#include "mmfast/cuda/linear_attention/state_backward.cuh"

namespace mmfast {
namespace cuda {

// Workspace for the forward: the state pass's (apply needs none).
inline size_t linear_attention_forward_workspace_bytes(const LinearAttentionParams& p) {
  return linear_attention_state_workspace_bytes(p);
}

// state pass into p.state / p.mean, then apply. Needs q, k, v, out, state, mean, workspace.
inline cudaError_t linear_attention_forward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.q.data) return cudaErrorInvalidValue;
  cudaError_t err = linear_attention_state(p, stream);
  if (err != cudaSuccess) return err;
  return linear_attention_apply(p, stream);
}

}  // namespace cuda
}  // namespace mmfast
