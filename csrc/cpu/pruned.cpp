// CPU registration of the masked-channel ops.
//
// masked_conv2d / masked_linear group the batch by code and run, per code present, one dense
// oneDNN convolution (or GEMM) on the gathered kept input channels and the code's kept weight
// rows and columns, scattered into the kept output channels of a zeroed output: the work is
// that of the physically pruned experts, plus one gather of x's kept channels and of each
// code's weights (oneDNN is at the CPU's compute limit for the dense part; a hand-written conv
// would only add a second GEMM to maintain). A batch sorted by code is sliced, not gathered.
// masked_group_norm is the hand-written kernel of mmfast/cpu/pruned_impl.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "glue/pruned_glue.h"
#include "mmfast/cpu/pruned.h"

namespace {

using mmfast::glue::check_masked;

// Rows of the batch per code, in batch order; IndexError for a code outside [0, K).
std::vector<std::vector<int64_t>> rows_per_code(const at::Tensor& sample_codes, int64_t codes, const char* op) {
  const at::Tensor c = sample_codes.to(at::kLong).contiguous();
  const int64_t* data = c.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows(codes);
  for (int64_t b = 0; b < c.numel(); ++b) {
    TORCH_CHECK_INDEX(data[b] >= 0 && data[b] < codes, op, ": sample code ", data[b], " (sample ", b,
                      ") is out of range for ", codes, " architecture codes");
    rows[data[b]].push_back(b);
  }
  return rows;
}

// x's rows `rows` (a slice when they are consecutive) and channels `kept` of dim `channel_dim`
// (no copy when every channel is kept).
at::Tensor gather(const at::Tensor& x, const std::vector<int64_t>& rows, const at::Tensor& kept, int64_t channel_dim) {
  const int64_t n = static_cast<int64_t>(rows.size());
  at::Tensor out = rows.back() - rows.front() + 1 == n
                       ? x.narrow(0, rows.front(), n)
                       : x.index_select(0, at::tensor(rows, x.options().dtype(at::kLong)));
  return kept.numel() == x.size(channel_dim) ? out : out.index_select(channel_dim, kept);
}

// The shared body: `dense(xs, w, b)` runs one code's pruned expert on its rows; channels are
// dim 1 of x, y and the weight's (Cout, Cin, ...) block.
template <class Dense>
at::Tensor masked_by_code(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask,
                          std::vector<int64_t> out_shape, int64_t channel_dim, const char* op, Dense dense) {
  at::Tensor y = at::zeros(out_shape, x_in.options());
  const auto rows = rows_per_code(sample_codes, out_mask.size(0), op);
  for (int64_t code = 0; code < static_cast<int64_t>(rows.size()); ++code) {
    if (rows[code].empty()) continue;
    const at::Tensor kept_out = out_mask[code].nonzero().squeeze(1);
    if (kept_out.numel() == 0) continue;
    const at::Tensor kept_in = in_mask[code].nonzero().squeeze(1);
    const at::Tensor w = weight[weight.size(0) > 1 ? code : 0].index_select(0, kept_out).index_select(1, kept_in);
    at::Tensor b;
    if (bias.has_value()) b = (*bias)[bias->size(0) > 1 ? code : 0].index_select(0, kept_out);
    const at::Tensor xs = gather(x_in, rows[code], kept_in, channel_dim);
    at::Tensor out = dense(xs, w, b, static_cast<int64_t>(rows[code].size()));
    const at::Tensor row_index = at::tensor(rows[code], x_in.options().dtype(at::kLong));
    // y[rows, kept_out] = out, through a view with channels at dim 1
    at::Tensor y_view = channel_dim == 1 ? y : y.transpose(1, channel_dim);
    if (channel_dim != 1) out = out.transpose(1, channel_dim);
    y_view.index_put_({row_index.unsqueeze(1), kept_out.unsqueeze(0)}, out);
  }
  return y;
}

at::Tensor masked_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto g = check_masked(x, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation, false);
  const std::vector<int64_t> out_shape{x.size(0), weight.size(1), g.out_h, g.out_w};
  return masked_by_code(x, weight, bias, sample_codes, in_mask, out_mask, out_shape, 1, "masked_conv2d",
                        [&](const at::Tensor& xs, const at::Tensor& w, const at::Tensor& b, int64_t n) {
                          if (xs.size(1) == 0) {  // no input kept: the bias alone
                            at::Tensor out = at::zeros({n, w.size(0), g.out_h, g.out_w}, xs.options());
                            return b.defined() ? out + b.view({1, -1, 1, 1}) : out;
                          }
                          return at::conv2d(xs, w, b, stride, padding, dilation);
                        });
}

at::Tensor masked_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask) {
  check_masked(x, weight, bias, sample_codes, in_mask, out_mask, {}, {}, {}, true);
  const std::vector<int64_t> out_shape{x.size(0), x.size(1), weight.size(1)};
  return masked_by_code(x, weight, bias, sample_codes, in_mask, out_mask, out_shape, 2, "masked_linear",
                        [&](const at::Tensor& xs, const at::Tensor& w, const at::Tensor& b, int64_t) {
                          return at::linear(xs, w, b);
                        });
}

at::Tensor masked_group_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight_in,
                             const c10::optional<at::Tensor>& bias_in, int64_t num_groups,
                             const at::Tensor& codes_in, const at::Tensor& mask_in, double eps, bool silu) {
  mmfast::glue::check_masked_group_norm(x_in, weight_in, bias_in, num_groups, codes_in, mask_in, eps);
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const auto p = mmfast::glue::group_norm_params(x, y, weight, bias, num_groups, codes, mask, eps, silu);
  const int64_t bad = mmfast::cpu::pruned_kernels().group_norm(p);
  if (bad >= 0) {
    const int64_t code = codes.to(at::kLong)[bad].item<int64_t>();
    TORCH_CHECK_INDEX(false, "masked_group_norm: sample code ", code, " (sample ", bad, ") is out of range for ",
                      p.routing.codes, " architecture codes");
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_group_norm", &masked_group_norm);
}
