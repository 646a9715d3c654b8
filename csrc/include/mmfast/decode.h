// Torch-free description of the decode ops: KV-cache append, decode attention over a static
// KV cache with per-row lengths, and the fused CFG + temperature + top-k + top-p sampler.
//
// Caches are (B, T_max, H_kv, D) (FlashAttention's kvcache layout, token-major), preallocated;
// row b holds cache_seqlens[b] valid tokens, slots [0, cache_seqlens[b]).
//
// kv_cache_append: the S new tokens of row b go to slots [len_b, len_b + S), len_b being the
//   length BEFORE the append. Nothing else is written.
// decode_attention: cache_seqlens counts the tokens already in the cache INCLUDING the Sq new
//   ones; query i of row b sits at position p = len_b - Sq + i and attends keys j with
//   j <= p (causal inside the new tokens) and, with a window W > 0, p - j < W (Gemma-2 /
//   transformers sliding window). Query head h reads KV head h / (H / H_kv) (GQA).
//   s_j = scale * q . k_j; with softcap c > 0, s_j = c * tanh(s_j / c); out = softmax(s) V.
//   Scores, softmax and the PV sum accumulate in fp32 (fp64 for fp64 inputs).
// sample: per output row r, x = logits[r] (or with CFG, x = u + scale * (c - u) of the cond row
//   c = logits[r] and uncond row u = logits[P + r]), in fp32; temperature 0 -> argmax (lowest
//   index on ties); else x / temperature, then top-k (keep x_i >= the k-th largest: ties with
//   it kept), then top-p over the top-k softmax (keep x_i when the mass of the kept tokens with
//   a strictly larger value is < top_p: the threshold-crossing token kept, its ties too; the
//   largest value is always kept), then
//   the token is drawn by inverse CDF in index order with the caller's uniform u_r in [0, 1):
//   the smallest i whose running sum of kept exp(x - max) exceeds u_r * total.
//   A row holding NaN or +inf, or all -inf, is invalid: status[r] = 1 and token 0.
// decode_linear: y = x W^T (+ bias) for the few rows of a decode step (M = B * S), F.linear's
//   semantics, accumulated in fp32 (fp64): the weights are streamed once, whatever M.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmfast/common.h"

namespace mmfast {

struct KVCacheAppendParams {
  int64_t batch = 0;       // B
  int64_t new_tokens = 0;  // S
  int64_t max_tokens = 0;  // T_max
  int64_t kv_heads = 0;    // H_kv
  int64_t head_dim = 0;    // D
  DType dtype = DType::kFloat32;
  TokenTensor k_cache, v_cache;  // (B, T_max, H_kv, D), unit stride along D
  TokenTensor k, v;              // (B, S, H_kv, D), unit stride along D
  const int32_t* cache_seqlens = nullptr;  // (B,), lengths before the append
};

struct DecodeAttentionParams {
  int64_t batch = 0;       // B
  int64_t queries = 0;     // Sq (1 for decoding)
  int64_t heads = 0;       // H (query heads)
  int64_t kv_heads = 0;    // H_kv (H % H_kv == 0)
  int64_t head_dim = 0;    // D
  int64_t max_tokens = 0;  // T_max
  DType dtype = DType::kFloat32;
  TokenTensor q, out;            // (B, Sq, H, D), unit stride along D
  TokenTensor k_cache, v_cache;  // (B, T_max, H_kv, D), unit stride along D
  const int32_t* cache_seqlens = nullptr;  // (B,), including the Sq new tokens
  double scale = 1.0;    // double so fp64 inputs keep fp64 accuracy; kernels convert to acc_t
  double softcap = 0.0;  // 0: none
  int64_t window = 0;    // 0: none

  void* workspace = nullptr;  // caller-owned, size from the kernels' workspace query
  size_t workspace_bytes = 0;
};

struct SampleParams {
  int64_t rows = 0;   // P: output rows (with CFG the logits have 2P rows)
  int64_t vocab = 0;  // V
  DType dtype = DType::kFloat32;  // of the logits
  const void* logits = nullptr;   // row r at logits + r * row_stride, unit stride along V
  int64_t row_stride = 0;
  bool cfg = false;
  float cfg_scale = 1.0f;
  float temperature = 1.0f;  // 0: greedy; the glue raises (0, 1e-5) to 1e-5
  int64_t top_k = 0;         // 0 or >= V: off
  double top_p = 1.0;       // >= 1: off
  const float* uniform = nullptr;  // (P,), in [0, 1)
  int64_t* tokens = nullptr;       // (P,)
  int32_t* status = nullptr;       // (P,): 0 valid, 1 invalid row (NaN / +inf / all -inf)

  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

struct DecodeLinearParams {
  int64_t rows = 0;          // M
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
  DType dtype = DType::kFloat32;  // of x, weight, bias and y
  const void* x = nullptr;       // (M, K), row m at x + m * x_row_stride, unit stride along K
  int64_t x_row_stride = 0;
  const void* weight = nullptr;  // (N, K), contiguous
  const void* bias = nullptr;    // (N,) or nullptr
  void* y = nullptr;             // (M, N), contiguous
};

}  // namespace mmfast
