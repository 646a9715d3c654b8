// Torch-free CUDA kernels of the non-causal normalized linear attention (LinFusion): the
// public entry points. See mmfast/linear_attention.h for the math and the parameter struct.
//
// Every pass stages 64 x 64 output tiles through shared memory with the shared tile GEMM
// (mmfast/cuda/tile_gemm.cuh): SIMT FMA for fp32 / fp64 inputs, TF32 tensor cores for
// fp16 / bf16 on sm_80+. Token tensors are read in place through their (B, N, H) strides;
// phi is applied on load; every load and store is bounds-checked, so no head dim or sequence
// length has to be a multiple of anything; all grids are 1-D with a grid-stride loop.
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

// Workspace sizes (bytes) for the current device. apply and state_backward need none.
inline size_t linear_attention_state_workspace_bytes(const LinearAttentionParams& p) {
  if (!la::valid_dims(p)) return 0;
  return la::plan_state(p, sm_count()).partial_bytes;
}
inline size_t linear_attention_forward_workspace_bytes(const LinearAttentionParams& p) {
  return linear_attention_state_workspace_bytes(p);
}
inline size_t linear_attention_apply_workspace_bytes(const LinearAttentionParams&) { return 0; }
inline size_t linear_attention_apply_backward_workspace_bytes(const LinearAttentionParams& p) {
  if (!la::valid_dims(p)) return 0;
  return la::apply_backward_scalar_bytes(p) + la::plan_state(p, sm_count()).partial_bytes;
}
inline size_t linear_attention_state_backward_workspace_bytes(const LinearAttentionParams&) { return 0; }

// state = (1/N) sum phi(k)^T v, mean = (1/N) sum phi(k). Needs k, v, state, mean, workspace.
inline cudaError_t linear_attention_state(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.k.data || !p.v.data || !p.state || !p.mean) return cudaErrorInvalidValue;
  const la::StatePlan plan = la::plan_state(p, sm_count());
  if (plan.partial_bytes > 0 && (p.workspace == nullptr || p.workspace_bytes < plan.partial_bytes))
    return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return la::launch_state_pass<T>(p.k, p.v, nullptr, p.state, p.mean, p, plan, p.workspace,
                                    static_cast<double>(p.seqlen), stream);
  });
}

// out = phi(q) state / (phi(q) . mean + eps). Needs q, state, mean, out.
inline cudaError_t linear_attention_apply(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.q.data || !p.out.data || !p.state || !p.mean) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return la::launch_apply<decltype(t)>(p, stream); });
}

// state pass into p.state / p.mean, then apply. Needs q, k, v, out, state, mean, workspace.
inline cudaError_t linear_attention_forward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.q.data) return cudaErrorInvalidValue;
  cudaError_t err = linear_attention_state(p, stream);
  if (err != cudaSuccess) return err;
  return linear_attention_apply(p, stream);
}

// grad_q, grad_state, grad_mean from grad_out, q, state, mean.
inline cudaError_t linear_attention_apply_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.q.data || !p.grad_out.data || !p.grad_q.data || !p.state || !p.mean ||
      !p.grad_state || !p.grad_mean)
    return cudaErrorInvalidValue;
  const int sms = sm_count();
  const size_t need = la::apply_backward_scalar_bytes(p) + la::plan_state(p, sms).partial_bytes;
  if (p.workspace == nullptr || p.workspace_bytes < need) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return la::launch_apply_backward<decltype(t)>(p, stream, sms); });
}

// grad_k, grad_v from grad_state, grad_mean, k, v.
inline cudaError_t linear_attention_state_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.k.data || !p.v.data || !p.grad_k.data || !p.grad_v.data || !p.grad_state ||
      !p.grad_mean)
    return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return la::launch_state_backward<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace mmfast
