// Torch-free CUDA kernels of the decode ops: the public entry points. See mmfast/decode.h for
// the rules; decode/append.cuh, decode/attention.cuh and decode/sample.cuh for the kernels.
//
// Guards (no host synchronisation, documented in mmfast.ops.decode): kv_cache_append skips a
// row whose slots [len, len + S) leave [0, T_max); decode_attention writes NaN rows for
// lengths outside [Sq, T_max] and never reads past a row's length; sample returns status 1
// and token 0 for invalid rows, and always a token in [0, V).
// Head dims: any D in [1, 256] (64, 128 and 256 are the tuned ones); D > 256 is
// cudaErrorInvalidValue.
#pragma once

#include "mmfast/cuda/decode/append.cuh"
#include "mmfast/cuda/decode/attention.cuh"
#include "mmfast/cuda/decode/sample.cuh"

namespace mmfast {
namespace cuda {

inline cudaError_t kv_cache_append(const KVCacheAppendParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.new_tokens < 0 || p.max_tokens < 0 || p.kv_heads < 0 || p.head_dim < 0)
    return cudaErrorInvalidValue;
  if (p.batch == 0 || p.new_tokens == 0 || p.kv_heads == 0 || p.head_dim == 0) return cudaSuccess;
  if (p.k_cache.data == nullptr || p.v_cache.data == nullptr || p.k.data == nullptr || p.v.data == nullptr ||
      p.cache_seqlens == nullptr)
    return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return decodek::launch_append<decltype(t)>(p, stream); });
}

inline bool decode_attention_valid(const DecodeAttentionParams& p) {
  return p.batch >= 0 && p.queries >= 1 && p.heads >= 1 && p.kv_heads >= 1 && p.heads % p.kv_heads == 0 &&
         p.head_dim >= 1 && p.head_dim <= decodek::kMaxHeadDim && p.max_tokens >= 0 && p.window >= 0 &&
         !(p.softcap < 0.0f) &&
         (p.batch == 0 || (p.q.data != nullptr && p.out.data != nullptr && p.k_cache.data != nullptr &&
                           p.v_cache.data != nullptr && p.cache_seqlens != nullptr));
}

// Workspace bytes of decode_attention on the current device (0 when one split suffices).
inline size_t decode_attention_workspace_bytes(const DecodeAttentionParams& p) {
  size_t bytes = 0;
  if (decode_attention_valid(p))
    (void)dispatch_dtype(p.dtype, [&](auto t) {
      bytes = decodek::attention_plan(p, decodek::attention_launch<decltype(t)>(p)).bytes;
      return cudaSuccess;
    });
  return bytes;
}

// out = softmax(scale q k^T (soft-capped, causal, windowed)) v per row (mmfast/decode.h).
inline cudaError_t decode_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  if (!decode_attention_valid(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  // launch_attention fits the plan it launches to the workspace given (fewer splits if it must)
  return dispatch_dtype(p.dtype, [&](auto t) { return decodek::launch_attention<decltype(t)>(p, stream); });
}

// Workspace bytes of sample: none (a row lives in the block's shared memory, or is re-read).
inline size_t sample_workspace_bytes(const SampleParams&) { return 0; }

// tokens and status of every output row (mmfast/decode.h). Sums are exact 64-bit fixed point
// in a fixed order: run-to-run deterministic (see decode/sample.cuh).
inline cudaError_t sample(const SampleParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.vocab < 1 || !(p.temperature >= 0.0f) || p.top_k < 0 || !(p.top_p >= 0.0f)) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  if (p.logits == nullptr || p.uniform == nullptr || p.tokens == nullptr || p.status == nullptr || p.row_stride < 0)
    return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return decodek::launch_sample<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace mmfast
