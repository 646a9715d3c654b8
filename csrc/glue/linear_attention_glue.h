// Torch glue shared by the CPU and CUDA registrations of the linear-attention ops:
// input checks, output and workspace allocation, filling LinearAttentionParams.
//
// A backend is a struct with two static functions:
//   size_t workspace_bytes(const LinearAttentionParams&, LinearAttentionOp);
//   void   run(LinearAttentionParams&, LinearAttentionOp);   // throws on failure
// and the op functions below are instantiated once per backend.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "glue/common.h"
#include "mmfast/linear_attention.h"

namespace mmfast {

enum class LinearAttentionOp { kState, kApply, kForward, kApplyBackward, kStateBackward };

namespace glue {

inline FeatureMap parse_feature_map(c10::string_view name, const char* op = "linear_attention") {
  if (name == "elu1") return FeatureMap::kElu1;
  if (name == "relu") return FeatureMap::kRelu;
  if (name == "none") return FeatureMap::kNone;
  TORCH_CHECK_VALUE(false, op, ": feature_map must be one of ('none', 'elu1', 'relu'), got '",
                    std::string(name), "'");
}

inline void check_token_tensor(const at::Tensor& t, const char* name, const char* layout,
                               const char* op = "linear_attention") {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be a 4-D ", layout,
                    " tensor, got shape ", t.sizes());
  to_dtype(t, op, name);
}

inline void check_head_dim(int64_t d, const char* name, const char* op = "linear_attention") {
  TORCH_CHECK_VALUE(d >= kMinHeadDim && d <= kMaxHeadDim, op, ": ", name, " must be in [",
                    kMinHeadDim, ", ", kMaxHeadDim, "], got ", d);
}

inline void check_same_dtype_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  check_same_dtype_device(a, an, b, bn, "linear_attention");
}

// op names the public op in errors: linear_attention_state reports as itself, not as linear_attention.
inline void check_kv(const at::Tensor& k, const at::Tensor& v, const char* op = "linear_attention") {
  check_token_tensor(k, "k", "(B, N, H, Dk)", op);
  check_token_tensor(v, "v", "(B, N, H, Dv)", op);
  check_same_dtype_device(k, "k", v, "v", op);
  TORCH_CHECK_VALUE(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2),
                    op, ": k and v must agree in (B, N, H), got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1, op, ": the sequence length N must be at least 1, got 0");
  check_head_dim(k.size(3), "Dk (k.shape[-1])", op);
  check_head_dim(v.size(3), "Dv (v.shape[-1])", op);
}

inline void check_apply(const at::Tensor& q, const at::Tensor& state, const at::Tensor& mean,
                        const char* op = "linear_attention") {
  check_token_tensor(q, "q", "(B, N, H, Dk)", op);
  TORCH_CHECK_VALUE(q.size(1) >= 1, op, ": the sequence length N must be at least 1, got 0");
  check_head_dim(q.size(3), "Dk (q.shape[-1])", op);
  TORCH_CHECK_VALUE(state.dim() == 4 && state.size(0) == q.size(0) && state.size(1) == q.size(2) &&
                        state.size(2) == q.size(3),
                    op, ": state must be (B, H, Dk, Dv) = (", q.size(0), ", ", q.size(2), ", ", q.size(3),
                    ", Dv), got ", state.sizes());
  TORCH_CHECK_VALUE(mean.dim() == 3 && mean.size(0) == q.size(0) && mean.size(1) == q.size(2) &&
                        mean.size(2) == q.size(3),
                    op, ": mean must be (B, H, Dk) = (", q.size(0), ", ", q.size(2), ", ", q.size(3),
                    "), got ", mean.sizes());
  check_head_dim(state.size(3), "Dv (state.shape[-1])", op);
  const auto acc = accumulation_type(q.scalar_type());
  TORCH_CHECK_TYPE(state.scalar_type() == acc && mean.scalar_type() == acc, op, ": state and mean must be ",
                   dtype_name(acc), " for ", dtype_name(q.scalar_type()), " inputs, got ",
                   dtype_name(state.scalar_type()), " and ", dtype_name(mean.scalar_type()));
  TORCH_CHECK_TYPE(state.device() == q.device() && mean.device() == q.device(),
                   op, ": all inputs must have the same device, got q: ", q.device(),
                   ", state: ", state.device(), ", mean: ", mean.device());
}

inline LinearAttentionParams make_params(const at::Tensor& tokens, int64_t dim_k, int64_t dim_v, double eps,
                                         c10::string_view feature_map, const char* op = "linear_attention") {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  LinearAttentionParams p;
  p.batch = tokens.size(0);
  p.seqlen = tokens.size(1);
  p.heads = tokens.size(2);
  p.dim_k = dim_k;
  p.dim_v = dim_v;
  p.dtype = to_dtype(tokens, op, "input");
  p.feature_map = parse_feature_map(feature_map, op);
  p.eps = eps;
  return p;
}

template <class Backend>
void run_with_workspace(LinearAttentionParams& p, LinearAttentionOp op, const at::TensorOptions& options) {
  if (p.batch == 0 || p.heads == 0) return;  // nothing to compute: outputs are empty
  const size_t bytes = Backend::workspace_bytes(p, op);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    p.workspace_bytes = bytes;
  }
  Backend::run(p, op);
}

inline at::Tensor new_state(const at::Tensor& like, int64_t b, int64_t h, int64_t dk, int64_t dv) {
  return at::empty({b, h, dk, dv}, like.options().dtype(accumulation_type(like.scalar_type())));
}

inline at::Tensor new_mean(const at::Tensor& like, int64_t b, int64_t h, int64_t dk) {
  return at::empty({b, h, dk}, like.options().dtype(accumulation_type(like.scalar_type())));
}

// ---- the five ops, generic over the backend ----------------------------------------

template <class Backend>
std::tuple<at::Tensor, at::Tensor> linear_attention_state(const at::Tensor& k_in, const at::Tensor& v_in,
                                                          c10::string_view feature_map) {
  check_kv(k_in, v_in, "linear_attention_state");
  const c10::DeviceGuard guard(k_in.device());
  const at::Tensor k = unit_stride_last(k_in), v = unit_stride_last(v_in);
  auto p = make_params(k, k.size(3), v.size(3), 0.0, feature_map, "linear_attention_state");
  at::Tensor state = new_state(k, p.batch, p.heads, p.dim_k, p.dim_v);
  at::Tensor mean = new_mean(k, p.batch, p.heads, p.dim_k);
  p.k = token_view(k);
  p.v = token_view(v);
  p.state = state.data_ptr();
  p.mean = mean.data_ptr();
  run_with_workspace<Backend>(p, LinearAttentionOp::kState, k.options());
  return {state, mean};
}

template <class Backend>
at::Tensor linear_attention_apply(const at::Tensor& q_in, const at::Tensor& state_in, const at::Tensor& mean_in,
                                  double eps, c10::string_view feature_map) {
  check_apply(q_in, state_in, mean_in, "linear_attention_apply");
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = unit_stride_last(q_in);
  const at::Tensor state = state_in.contiguous(), mean = mean_in.contiguous();
  auto p = make_params(q, q.size(3), state.size(3), eps, feature_map, "linear_attention_apply");
  at::Tensor out = empty_output({p.batch, p.seqlen, p.heads, p.dim_v}, q.options());
  p.q = token_view(q);
  p.out = token_view(out);
  p.state = const_cast<void*>(state.data_ptr());
  p.mean = const_cast<void*>(mean.data_ptr());
  run_with_workspace<Backend>(p, LinearAttentionOp::kApply, q.options());
  return out;
}

template <class Backend>
at::Tensor linear_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double eps,
                            c10::string_view feature_map) {
  check_token_tensor(q_in, "q", "(B, N, H, Dk)");
  check_kv(k_in, v_in);
  check_same_dtype_device(q_in, "q", k_in, "k");
  TORCH_CHECK_VALUE(q_in.sizes() == k_in.sizes(), "linear_attention: q and k must have the same (B, N, H, Dk) shape, got q ",
                    q_in.sizes(), " and k ", k_in.sizes());
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = unit_stride_last(q_in), k = unit_stride_last(k_in), v = unit_stride_last(v_in);
  auto p = make_params(q, q.size(3), v.size(3), eps, feature_map);
  at::Tensor out = empty_output({p.batch, p.seqlen, p.heads, p.dim_v}, q.options());
  at::Tensor state = new_state(q, p.batch, p.heads, p.dim_k, p.dim_v);
  at::Tensor mean = new_mean(q, p.batch, p.heads, p.dim_k);
  p.q = token_view(q);
  p.k = token_view(k);
  p.v = token_view(v);
  p.out = token_view(out);
  p.state = state.data_ptr();
  p.mean = mean.data_ptr();
  run_with_workspace<Backend>(p, LinearAttentionOp::kForward, q.options());
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_apply_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& state_in, const at::Tensor& mean_in,
    double eps, c10::string_view feature_map) {
  check_apply(q_in, state_in, mean_in);
  check_token_tensor(grad_out_in, "grad_out", "(B, N, H, Dv)");
  check_same_dtype_device(grad_out_in, "grad_out", q_in, "q");
  TORCH_CHECK_VALUE(grad_out_in.size(0) == q_in.size(0) && grad_out_in.size(1) == q_in.size(1) &&
                        grad_out_in.size(2) == q_in.size(2) && grad_out_in.size(3) == state_in.size(3),
                    "linear_attention: grad_out must be (B, N, H, Dv) = (", q_in.size(0), ", ", q_in.size(1), ", ",
                    q_in.size(2), ", ", state_in.size(3), "), got ", grad_out_in.sizes());
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = unit_stride_last(q_in), grad_out = unit_stride_last(grad_out_in);
  const at::Tensor state = state_in.contiguous(), mean = mean_in.contiguous();
  auto p = make_params(q, q.size(3), state.size(3), eps, feature_map);
  at::Tensor grad_q = empty_output(q.sizes(), q.options());
  at::Tensor grad_state = at::empty(state.sizes(), state.options());
  at::Tensor grad_mean = at::empty(mean.sizes(), mean.options());
  p.q = token_view(q);
  p.grad_out = token_view(grad_out);
  p.grad_q = token_view(grad_q);
  p.state = const_cast<void*>(state.data_ptr());
  p.mean = const_cast<void*>(mean.data_ptr());
  p.grad_state = grad_state.data_ptr();
  p.grad_mean = grad_mean.data_ptr();
  run_with_workspace<Backend>(p, LinearAttentionOp::kApplyBackward, q.options());
  return {grad_q, grad_state, grad_mean};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> linear_attention_state_backward(const at::Tensor& grad_state_in,
                                                                   const at::Tensor& grad_mean_in,
                                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                                   c10::string_view feature_map) {
  check_kv(k_in, v_in);
  const auto acc = accumulation_type(k_in.scalar_type());
  const std::vector<int64_t> state_shape{k_in.size(0), k_in.size(2), k_in.size(3), v_in.size(3)};
  const std::vector<int64_t> mean_shape{k_in.size(0), k_in.size(2), k_in.size(3)};
  TORCH_CHECK_VALUE(grad_state_in.sizes() == at::IntArrayRef(state_shape) &&
                        grad_mean_in.sizes() == at::IntArrayRef(mean_shape),
                    "linear_attention: grad_state must be (B, H, Dk, Dv) = ", at::IntArrayRef(state_shape),
                    " and grad_mean (B, H, Dk) = ", at::IntArrayRef(mean_shape), ", got ", grad_state_in.sizes(),
                    " and ", grad_mean_in.sizes());
  TORCH_CHECK_TYPE(grad_state_in.scalar_type() == acc && grad_mean_in.scalar_type() == acc,
                   "linear_attention: grad_state and grad_mean must be ", dtype_name(acc), ", got ",
                   dtype_name(grad_state_in.scalar_type()), " and ", dtype_name(grad_mean_in.scalar_type()));
  check_same_dtype_device(grad_state_in, "grad_state", grad_mean_in, "grad_mean", "linear_attention");
  TORCH_CHECK_TYPE(grad_state_in.device() == k_in.device(), "linear_attention: all inputs must have the same device, "
                   "got grad_state: ", grad_state_in.device(), ", k: ", k_in.device());
  const c10::DeviceGuard guard(k_in.device());
  const at::Tensor k = unit_stride_last(k_in), v = unit_stride_last(v_in);
  const at::Tensor grad_state = grad_state_in.contiguous(), grad_mean = grad_mean_in.contiguous();
  auto p = make_params(k, k.size(3), v.size(3), 0.0, feature_map);
  at::Tensor grad_k = empty_output(k.sizes(), k.options());
  at::Tensor grad_v = empty_output(v.sizes(), v.options());
  p.k = token_view(k);
  p.v = token_view(v);
  p.grad_state = const_cast<void*>(grad_state.data_ptr());
  p.grad_mean = const_cast<void*>(grad_mean.data_ptr());
  p.grad_k = token_view(grad_k);
  p.grad_v = token_view(grad_v);
  run_with_workspace<Backend>(p, LinearAttentionOp::kStateBackward, k.options());
  return {grad_k, grad_v};
}

}  // namespace glue
}  // namespace mmfast

// Registers the five ops of one backend under a dispatch key, e.g.
//   TORCH_LIBRARY_IMPL(mmfast, CPU, m) { MMFAST_REGISTER_LINEAR_ATTENTION(m, CpuBackend); }
#define MMFAST_REGISTER_LINEAR_ATTENTION(m, Backend)                                                 \
  do {                                                                                               \
    m.impl("linear_attention", &::mmfast::glue::linear_attention<Backend>);                          \
    m.impl("linear_attention_state", &::mmfast::glue::linear_attention_state<Backend>);              \
    m.impl("linear_attention_apply", &::mmfast::glue::linear_attention_apply<Backend>);              \
    m.impl("linear_attention_apply_backward", &::mmfast::glue::linear_attention_apply_backward<Backend>); \
    m.impl("linear_attention_state_backward", &::mmfast::glue::linear_attention_state_backward<Backend>); \
  } while (0)
