// Torch glue shared by the CPU and CUDA registrations of the decode ops: input checks, output
// and workspace allocation, filling the params structs of mmfast/decode.h.
//
// A backend is a struct with static functions
//   void   append(const KVCacheAppendParams&);                  // throws on failure
//   size_t attention_workspace_bytes(const DecodeAttentionParams&);
//   void   attention(DecodeAttentionParams&);                   // throws on failure
//   size_t sample_workspace_bytes(const SampleParams&);
//   void   sample(SampleParams&);                               // throws on failure
//   at::Tensor linear(x (M, K), weight (N, K), bias or undefined);   // after the checks here
// and the op functions below are instantiated once per backend. Length checks that need the
// values of cache_seqlens are the backend's (the CPU raises; CUDA guards in the kernel).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "glue/common.h"
#include "mmfast/decode.h"

namespace mmfast {
namespace glue {

constexpr int64_t kMaxDecodeQueries = 16;
// Temperatures in (0, kMinTemperature) are raised to it (Liquid's max(temperature, 1e-5)), so
// that x / temperature stays finite for any sane logits.
constexpr double kMinTemperature = 1e-5;

inline void check_cache(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be a 4-D (B, T_max, H_kv, D) tensor, got shape ", t.sizes());
  to_dtype(t, op, name);
  TORCH_CHECK_VALUE(t.size(3) == 1 || t.stride(3) == 1, op, ": ", name,
                    " must have a unit stride along D (a static cache is preallocated contiguous), got strides ",
                    t.strides());
}

inline void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  check_cache(k_cache, "k_cache", op);
  check_cache(v_cache, "v_cache", op);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), op, ": k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  check_same_dtype_device(k_cache, "k_cache", v_cache, "v_cache", op);
}

inline void check_seqlens(const at::Tensor& seqlens, const at::Tensor& cache, const char* op) {
  TORCH_CHECK_TYPE(seqlens.scalar_type() == at::kInt, op,
                   ": cache_seqlens must be int32 (B,), as flash_attn_with_kvcache's (pass lengths.int()), got ",
                   dtype_name(seqlens.scalar_type()));
  TORCH_CHECK_VALUE(seqlens.dim() == 1 && seqlens.size(0) == cache.size(0), op, ": cache_seqlens must be (",
                    cache.size(0), ",), one length per row, got ", seqlens.sizes());
  TORCH_CHECK_TYPE(seqlens.device() == cache.device(), op,
                   ": all inputs must have the same device, got the caches on ", cache.device(),
                   ", cache_seqlens on ", seqlens.device());
}

// Said with a shape mismatch: the likeliest cause is a tensor in SDPA's head-major layout
// (mmfast/ops/decode.py says the same).
constexpr const char* kCacheLayout =
    "; the caches are (B, T_max, H_kv, D) and the tokens (B, S, H, D), token-major as in flash_attn_with_kvcache, "
    "not SDPA's (B, H, S, D): transpose(1, 2) a head-major tensor";

// Whether a and b share storage and their byte spans (first to last element) intersect: conservative
// (two interleaved views of one buffer that share no element are refused too).
inline bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      a.storage().data() != b.storage().data())
    return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(start, start + static_cast<uintptr_t>((last + 1) * t.element_size()));
  };
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

// ValueError for row `row` (>= 0) whose slots [len, len + S) leave the cache: the CPU kernel's
// check, and the glue's when there is nothing to write (S = 0 or an empty head).
inline void raise_append_out_of_range(int64_t row, int64_t length, int64_t new_tokens, int64_t max_tokens) {
  TORCH_CHECK_VALUE(false, "kv_cache_append: cache_seqlens[", row, "] = ", length, " is out of range: ", new_tokens,
                    " new tokens need slots [len, len + ", new_tokens, ") inside a cache of T_max = ", max_tokens);
}

inline void check_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& seqlens) {
  const char* op = "kv_cache_append";
  check_caches(k_cache, v_cache, op);
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == k_cache.size(0) && t->size(2) == k_cache.size(2) &&
                          t->size(3) == k_cache.size(3),
                      op, ": k and v must be (B=", k_cache.size(0), ", S, H_kv=", k_cache.size(2), ", D=",
                      k_cache.size(3), ") like the caches, got shape ", t->sizes(), kCacheLayout);
  }
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(1) <= k_cache.size(1), op, ": ", k.size(1), " new tokens do not fit a cache of T_max = ",
                    k_cache.size(1));
  check_same_dtype_device(k_cache, "k_cache", k, "k", op);
  check_same_dtype_device(k_cache, "k_cache", v, "v", op);
  check_seqlens(seqlens, k_cache, op);
  // Every slot is written: slots sharing memory would lose tokens (torch's in-place ops refuse
  // the same). Interleaved views of one buffer (TooHard) are not judged.
  for (const auto* t : {&k_cache, &v_cache})
    TORCH_CHECK_VALUE(at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": ", t == &k_cache ? "k" : "v",
                      "_cache has elements that share memory (an expand()ed or broadcast tensor, strides ",
                      t->strides(), "); every slot is written: pass a cache of its own, e.g. .contiguous()");
  const at::MemOverlapStatus overlap = at::get_overlap_status(k_cache, v_cache);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, op,
                    ": k_cache and v_cache share memory; each needs its own (two slices of one buffer are fine "
                    "when they do not overlap)");
  // The new tokens are read while the slots are written, in parallel: a k or v inside a cache's
  // span (a view of the cache, dense or not) would be read half overwritten.
  for (const auto* cache : {&k_cache, &v_cache})
    for (const auto* t : {&k, &v})
      TORCH_CHECK_VALUE(!spans_overlap(*cache, *t), op, ": ", t == &k ? "k" : "v", " overlaps ",
                        cache == &k_cache ? "k" : "v",
                        "_cache's memory (a view of the cache?): its tokens could be read after their slots are "
                        "written; pass a copy (.clone())");
}

// A scalar the kernels compute with in float32: past float's range it became inf there (every
// score or weight NaN, a token drawn from nothing), so it is refused. The Python checks say the same.
inline void check_fits_float(double value, const char* op, const char* name, const char* why) {
  TORCH_CHECK_VALUE(std::abs(value) <= std::numeric_limits<float>::max(), op, ": ", name,
                    " must be a finite number within float32's range (|x| <= 3.4028235e+38: ", why, "), got ", value);
}

inline void check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seqlens, double softcap, int64_t window) {
  const char* op = "decode_attention";
  check_caches(k_cache, v_cache, op);
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(0) == k_cache.size(0) && q.size(3) == k_cache.size(3), op,
                    ": q must be (B=", k_cache.size(0), ", Sq, H, D=", k_cache.size(3),
                    ") like the caches, got shape ", q.sizes());
  TORCH_CHECK_VALUE(q.size(1) >= 1 && q.size(1) <= kMaxDecodeQueries, op, ": q must hold 1 to ", kMaxDecodeQueries,
                    " new tokens per row (Sq), got ", q.size(1),
                    "; prefill longer prompts with F.scaled_dot_product_attention", kCacheLayout);
  TORCH_CHECK_VALUE(q.size(1) <= k_cache.size(1), op, ": ", q.size(1), " new tokens do not fit a cache of T_max = ",
                    k_cache.size(1), " (cache_seqlens counts them: append them first)");
  TORCH_CHECK_VALUE(k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0, op, ": the query heads H = ", q.size(2),
                    " must be a multiple of the KV heads H_kv = ", k_cache.size(2), " (GQA)", kCacheLayout);
  to_dtype(q, op, "q");
  check_same_dtype_device(q, "q", k_cache, "k_cache", op);
  check_seqlens(seqlens, k_cache, op);
  TORCH_CHECK_VALUE(softcap >= 0, op, ": softcap must be >= 0 (0: none), got ", softcap);
  if (q.scalar_type() != at::kDouble)
    check_fits_float(softcap, op, "softcap", "the scores are float32 for all but float64 inputs");
  TORCH_CHECK_VALUE(window >= 0, op, ": window must be >= 0 (0: none), got ", window);
}

inline int64_t check_sample(const at::Tensor& logits, const at::Tensor& uniform, double temperature, int64_t top_k,
                            double top_p, const c10::optional<double>& cfg_scale) {
  const char* op = "sample";
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) > 0, op,
                    ": logits must be a 2-D (rows, V) tensor with V >= 1, got shape ", logits.sizes());
  to_dtype(logits, op, "logits");
  int64_t rows = logits.size(0);
  if (cfg_scale.has_value()) {
    TORCH_CHECK_VALUE(rows % 2 == 0, op, ": with cfg_scale the logits hold pairs (conditional rows first), so an "
                      "even number of rows; got ", rows);
    rows /= 2;
  }
  TORCH_CHECK_TYPE(uniform.scalar_type() == at::kFloat, op, ": uniform must be float32 (", rows,
                   ",), one number in [0, 1) per sampled row, got ", dtype_name(uniform.scalar_type()));
  TORCH_CHECK_VALUE(uniform.dim() == 1 && uniform.size(0) == rows, op, ": uniform must be float32 (", rows,
                    ",), one number in [0, 1) per sampled row, got shape ", uniform.sizes());
  TORCH_CHECK_TYPE(uniform.device() == logits.device(), op, ": all inputs must have the same device, got logits: ",
                   logits.device(), ", uniform: ", uniform.device());
  TORCH_CHECK_VALUE(temperature >= 0, op, ": temperature must be >= 0 (0: greedy), got ", temperature);
  check_fits_float(temperature, op, "temperature", "the logits are scaled in float32");
  if (cfg_scale.has_value()) check_fits_float(*cfg_scale, op, "cfg_scale", "the logits are mixed in float32");
  TORCH_CHECK_VALUE(top_k >= 0, op, ": top_k must be >= 0 (0: off), got ", top_k);
  TORCH_CHECK_VALUE(top_p >= 0 && top_p <= 1, op, ": top_p must be in [0, 1] (1: off), got ", top_p);
  return rows;
}

inline void check_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "decode_linear";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be a 2-D (M, K) tensor, got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be (N, K=", x.size(1),
                    "), got shape ", weight.sizes());
  to_dtype(x, op, "x");
  check_same_dtype_device(x, "x", weight, "weight", op);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (", weight.size(0),
                      ",), got ", bias->sizes());
    check_same_dtype_device(x, "x", *bias, "bias", op);
  }
}

// Fills DecodeLinearParams for the CPU kernels (x rows with a unit stride, weight contiguous).
inline DecodeLinearParams linear_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                        const at::Tensor& y) {
  DecodeLinearParams p;
  p.rows = x.size(0);
  p.in_features = x.size(1);
  p.out_features = weight.size(0);
  p.dtype = to_dtype(x, "decode_linear", "x");
  p.x = x.data_ptr();
  p.x_row_stride = x.size(0) > 1 ? x.stride(0) : x.size(1);
  p.weight = weight.data_ptr();
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.y = y.data_ptr();
  return p;
}

template <class Backend>
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const c10::DeviceGuard guard(x.device());
  return Backend::linear(x, weight, bias.has_value() ? *bias : at::Tensor());
}

template <class Backend>
void kv_cache_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_in, const at::Tensor& v_in,
                     const at::Tensor& seqlens_in) {
  check_append(k_cache, v_cache, k_in, v_in, seqlens_in);
  if (k_in.numel() == 0) {  // nothing to write; on the CPU the lengths are checked all the same, as the kernel does
    if (seqlens_in.is_cpu()) {
      const at::Tensor lengths = seqlens_in.contiguous();
      const int32_t* len = lengths.data_ptr<int32_t>();
      for (int64_t b = 0; b < lengths.numel(); ++b)
        if (len[b] < 0 || len[b] + k_in.size(1) > k_cache.size(1))
          raise_append_out_of_range(b, len[b], k_in.size(1), k_cache.size(1));
    }
    return;
  }
  const c10::DeviceGuard guard(k_cache.device());
  const at::Tensor k = unit_stride_last(k_in), v = unit_stride_last(v_in), seqlens = seqlens_in.contiguous();
  KVCacheAppendParams p;
  p.batch = k.size(0);
  p.new_tokens = k.size(1);
  p.max_tokens = k_cache.size(1);
  p.kv_heads = k.size(2);
  p.head_dim = k.size(3);
  p.dtype = to_dtype(k, "kv_cache_append", "k");
  p.k_cache = token_view(k_cache);
  p.v_cache = token_view(v_cache);
  p.k = token_view(k);
  p.v = token_view(v);
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  Backend::append(p);
}

template <class Backend>
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& seqlens_in, double scale, double softcap, int64_t window) {
  check_attention(q_in, k_cache, v_cache, seqlens_in, softcap, window);
  if (q_in.scalar_type() != at::kDouble)
    check_fits_float(scale, "decode_attention", "scale", "the scores are float32 for all but float64 inputs");
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = unit_stride_last(q_in), seqlens = seqlens_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  DecodeAttentionParams p;
  p.batch = q.size(0);
  p.queries = q.size(1);
  p.heads = q.size(2);
  p.kv_heads = k_cache.size(2);
  p.head_dim = q.size(3);
  p.max_tokens = k_cache.size(1);
  p.dtype = to_dtype(q, "decode_attention", "q");
  p.q = token_view(q);
  p.out = token_view(out);
  p.k_cache = token_view(k_cache);
  p.v_cache = token_view(v_cache);
  p.cache_seqlens = seqlens.data_ptr<int32_t>();
  p.scale = scale;
  p.softcap = softcap;
  p.window = window;
  const size_t bytes = Backend::attention_workspace_bytes(p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = bytes;
  Backend::attention(p);
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> sample(const at::Tensor& logits_in, const at::Tensor& uniform_in,
                                          double temperature, int64_t top_k, double top_p,
                                          c10::optional<double> cfg_scale) {
  const int64_t rows = check_sample(logits_in, uniform_in, temperature, top_k, top_p, cfg_scale);
  const c10::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = (logits_in.size(1) == 1 || logits_in.stride(1) == 1) ? logits_in : logits_in.contiguous();
  const at::Tensor uniform = uniform_in.contiguous();
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor status = at::empty({rows}, logits.options().dtype(at::kInt));
  if (rows == 0) return {tokens, status};
  SampleParams p;
  p.rows = rows;
  p.vocab = logits.size(1);
  p.dtype = to_dtype(logits, "sample", "logits");
  p.logits = logits.data_ptr();
  p.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  p.cfg = cfg_scale.has_value();
  p.cfg_scale = cfg_scale.has_value() ? static_cast<float>(*cfg_scale) : 1.0f;
  p.temperature = static_cast<float>(temperature > 0 ? std::max(temperature, kMinTemperature) : 0.0);
  p.top_k = top_k;
  p.top_p = top_p;
  p.uniform = uniform.data_ptr<float>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.status = status.data_ptr<int32_t>();
  const size_t bytes = Backend::sample_workspace_bytes(p);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte));
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = bytes;
  Backend::sample(p);
  return {tokens, status};
}

}  // namespace glue
}  // namespace mmfast

// Registers the decode ops of one backend under a dispatch key.
#define MMFAST_REGISTER_DECODE(m, Backend)                                     \
  do {                                                                         \
    m.impl("kv_cache_append", &::mmfast::glue::kv_cache_append<Backend>);      \
    m.impl("decode_attention", &::mmfast::glue::decode_attention<Backend>);    \
    m.impl("sample", &::mmfast::glue::sample<Backend>);                        \
    m.impl("decode_linear", &::mmfast::glue::decode_linear<Backend>);          \
  } while (0)
