// Torch glue shared by the CPU and CUDA registrations of the masked-channel ops: input checks
// (the same rules and messages as python/mmfast/ops/pruned.py), output shapes and the
// parameter structs of mmfast/pruned.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "glue/common.h"
#include "mmfast/pruned.h"

namespace mmfast {
namespace glue {

// The CPU ops' kept packed per-code weights (csrc/cpu/pruned.cpp): (entries, bytes, budget in
// MiB) before setting the budget (budget_mb >= 0) and an optional clear. Registered as
// torch.ops.mmfast.pruned_weight_cache.
std::vector<int64_t> pruned_weight_cache(int64_t budget_mb, bool clear);

// sample_codes (B,) int64 / int32 and a (K, C) bool mask; returns K (checked against `codes`
// when that is > 0).
inline int64_t check_routing_mask(const at::Tensor& sample_codes, int64_t batch, const at::Tensor& mask,
                                  const char* name, int64_t channels, int64_t codes, const char* op) {
  TORCH_CHECK_TYPE(sample_codes.scalar_type() == at::kLong || sample_codes.scalar_type() == at::kInt, op,
                   ": sample_codes must be int64 or int32, got ", dtype_name(sample_codes.scalar_type()));
  TORCH_CHECK_VALUE(sample_codes.dim() == 1 && sample_codes.size(0) == batch, op, ": sample_codes must be (", batch,
                    ",), one architecture code per sample, got shape ", sample_codes.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": ", name, " must be a bool (K, ", channels,
                   ") tensor, got ", dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(1) == channels && mask.size(0) > 0, op, ": ", name, " must be (K, ",
                    channels, ") with K >= 1 codes, got shape ", mask.sizes());
  TORCH_CHECK_VALUE(codes <= 0 || mask.size(0) == codes, op, ": the masks must agree on the number of codes K, got ",
                    codes, " and ", mask.size(0));
  TORCH_CHECK_TYPE(sample_codes.device() == mask.device(), op, ": all inputs must have the same device, got ",
                   "sample_codes: ", sample_codes.device(), ", ", name, ": ", mask.device());
  return mask.size(0);
}

// weight / bias stacked per code: (K or 1, *shape).
inline void check_stacked(const at::Tensor& t, const char* name, int64_t codes, at::IntArrayRef shape,
                          const at::Tensor& x, const char* op) {
  if (!(t.dim() == static_cast<int64_t>(shape.size()) + 1 && t.sizes().slice(1) == shape &&
        (t.size(0) == 1 || t.size(0) == codes))) {
    std::string dims = codes == 1 ? "1" : std::to_string(codes) + " or 1";  // "(K or 1, 6, 4, 3, 3)", as in Python
    for (int64_t d : shape) dims += ", " + std::to_string(d);
    TORCH_CHECK_VALUE(false, op, ": ", name, " must be (", dims, "): one set per code (the masks give K = ", codes,
                      " codes) or one shared, got shape ", t.sizes());
  }
  check_same_dtype_device(x, "x", t, name, op);
}

struct ConvGeometry {
  int64_t out_h = 0, out_w = 0;
};

inline int64_t conv_out(int64_t size, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (size + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// The checks of masked_conv2d (x 4-D) and masked_linear (x 3-D, weight 3-D: run as a 1x1 conv).
inline ConvGeometry check_masked(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 bool linear) {
  const char* op = linear ? "masked_linear" : "masked_conv2d";
  TORCH_CHECK_VALUE(x.dim() == (linear ? 3 : 4), op, linear ? ": x must be a 3-D (B, N, Cin) tensor, got shape "
                                                            : ": x must be a 4-D (B, Cin, H, W) tensor, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == (linear ? 3 : 5), op,
                    linear ? ": weight must be a 3-D (K, Cout, Cin) tensor (K = 1: shared), got shape "
                           : ": weight must be a 5-D (K, Cout, Cin, kh, kw) tensor (K = 1: shared), got shape ",
                    weight.sizes());
  to_dtype(x, op, "x");
  const int64_t in_channels = linear ? x.size(2) : x.size(1), out_channels = weight.size(1);
  TORCH_CHECK_VALUE(weight.size(2) == in_channels, op, ": weight's Cin = ", weight.size(2), " must equal x's ",
                    in_channels, " channels");
  int64_t codes = check_routing_mask(sample_codes, x.size(0), in_mask, "in_mask", in_channels, 0, op);
  codes = check_routing_mask(sample_codes, x.size(0), out_mask, "out_mask", out_channels, codes, op);
  check_stacked(weight, "weight", codes, weight.sizes().slice(1), x, op);
  if (bias.has_value()) check_stacked(*bias, "bias", codes, {out_channels}, x, op);
  TORCH_CHECK_TYPE(x.device() == sample_codes.device(), op, ": all inputs must have the same device, got x: ",
                   x.device(), ", sample_codes: ", sample_codes.device());
  if (linear) return {x.size(1), 1};
  TORCH_CHECK_VALUE((x.size(2) >= 1 && x.size(3) >= 1) || x.size(0) == 0 || x.size(1) == 0, op,
                    ": x's height and width must be >= 1 unless B or Cin is 0 (as in F.conv2d), got ", x.size(2),
                    "x", x.size(3));
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 &&
                        stride[1] >= 1 && padding[0] >= 0 && padding[1] >= 0 && dilation[0] >= 1 && dilation[1] >= 1,
                    op, ": stride and dilation must be pairs of ints >= 1 and padding a pair >= 0, got ", stride, ", ",
                    padding, ", ", dilation);
  const ConvGeometry g{conv_out(x.size(2), weight.size(3), stride[0], padding[0], dilation[0]),
                       conv_out(x.size(3), weight.size(4), stride[1], padding[1], dilation[1])};
  TORCH_CHECK_VALUE(g.out_h >= 1 && g.out_w >= 1, op, ": a ", weight.size(3), "x", weight.size(4),
                    " kernel with dilation ", dilation, " does not fit the padded ", x.size(2), "x", x.size(3),
                    " input (padding ", padding, ")");
  return g;
}

inline void check_masked_group_norm(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                    const c10::optional<at::Tensor>& bias, int64_t num_groups,
                                    const at::Tensor& sample_codes, const at::Tensor& channel_mask, double eps) {
  const char* op = "masked_group_norm";
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be (B, C, *), got shape ", x.sizes());
  to_dtype(x, op, "x");
  const int64_t channels = x.size(1);
  TORCH_CHECK_VALUE(num_groups >= 1 && channels % num_groups == 0, op, ": num_groups must divide the ", channels,
                    " channels, got ", num_groups);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  const int64_t codes = check_routing_mask(sample_codes, x.size(0), channel_mask, "channel_mask", channels, 0, op);
  for (const auto* t : {&weight, &bias}) {
    if (!t->has_value()) continue;
    const at::Tensor& a = **t;
    TORCH_CHECK_VALUE((a.dim() == 1 && a.size(0) == channels) || (a.dim() == 2 && a.size(0) == codes &&
                                                                  a.size(1) == channels),
                      op, ": ", t == &weight ? "weight" : "bias", " must be (", channels, ",) shared or (", codes, ", ",
                      channels, ") per code, got shape ", a.sizes());
    check_same_dtype_device(x, "x", a, t == &weight ? "weight" : "bias", op);
  }
  TORCH_CHECK_VALUE(!weight.has_value() || !bias.has_value() || weight->dim() == bias->dim(), op,
                    ": weight and bias must both be shared (C,) or both per code (K, C), got shapes ", weight->sizes(),
                    " and ", bias->sizes());
  TORCH_CHECK_TYPE(x.device() == sample_codes.device(), op, ": all inputs must have the same device, got x: ",
                   x.device(), ", sample_codes: ", sample_codes.device());
}

inline CodeRouting routing_of(const at::Tensor& codes, const at::Tensor& in_mask, const at::Tensor& out_mask) {
  CodeRouting r;
  r.num_codes = out_mask.size(0);
  r.sample_codes = codes.data_ptr();
  r.code_bytes = codes.scalar_type() == at::kLong ? 8 : 4;
  r.in_mask = in_mask.defined() ? in_mask.data_ptr<bool>() : nullptr;
  r.out_mask = out_mask.data_ptr<bool>();
  return r;
}

// Params of masked_group_norm over contiguous x, codes, mask, weight and bias (the caller
// keeps those tensors alive) writing y (contiguous like x).
inline MaskedGroupNormParams group_norm_params(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight,
                                               const at::Tensor& bias, int64_t num_groups, const at::Tensor& codes,
                                               const at::Tensor& mask, double eps, bool silu) {
  MaskedGroupNormParams p;
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.groups = num_groups;
  p.plane = (p.batch > 0 && p.channels > 0) ? x.numel() / (p.batch * p.channels) : 0;
  p.dtype = to_dtype(x, "masked_group_norm", "x");
  p.routing = routing_of(codes, at::Tensor(), mask);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.weight = weight.defined() ? weight.data_ptr() : nullptr;
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  const at::Tensor& affine = weight.defined() ? weight : bias;
  p.affine_code_stride = affine.defined() && affine.dim() == 2 ? p.channels : 0;
  p.eps = eps;
  p.silu = silu;
  return p;
}

}  // namespace glue
}  // namespace mmfast
