// CPU registration of the masked-channel ops.
//
// masked_conv2d / masked_linear group the batch by code and run, per code present, one dense
// oneDNN convolution (or GEMM) on the code's kept input channels and its weights packed to the
// kept rows and columns (the gather kernel of mmfast/cpu/pruned_impl.h), then the scatter
// kernel writes every channel of the code's rows (kept: the result; masked: 0); masked_linear's
// GEMM writes y's rows in place when the code keeps every output and its rows are consecutive
// (a batch sorted by code). The work is
// that of the physically pruned experts plus one pass over the kept inputs, the kept weights
// and the output (oneDNN is at the CPU's compute limit for the dense part; a hand-written conv
// would only add a second GEMM to maintain). Consecutive rows keeping every input channel (a
// batch sorted by code) are sliced, not gathered. A code's packed weight is kept across calls
// (glue/packed_weight_cache.h). masked_group_norm is a kernel of its own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <vector>

#include "glue/packed_weight_cache.h"
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

std::vector<int64_t> kept_channels(const bool* mask, int64_t channels) {
  std::vector<int64_t> kept;
  for (int64_t c = 0; c < channels; ++c)
    if (mask[c]) kept.push_back(c);
  return kept;
}

// The dtype the dense convolutions and GEMMs run in: x's, except fp16 where torch's CPU fp16
// kernels are not oneDNN's (a CPU without AVX512-FP16 or AMX-FP16, torch's own test): there its
// fp16 conv took ~100x and its GEMM ~20x their fp32 time (AMD EPYC, 2026-12-05), so fp16 inputs
// and weights are converted to fp32 once packed and the fp32 result is rounded once to fp16.
at::ScalarType compute_dtype(at::ScalarType dtype) {
  static const bool native_fp16 = [] {
    try {  // a torch without the op (no mkldnn), or with another signature: fp32, the safe choice
      const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_fp16_supported", ""});
      return op.has_value() && op->typed<bool()>().call();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return dtype == at::kHalf && !native_fp16 ? at::kFloat : dtype;
}

// Per-thread scratch (slots: packed weights, packed inputs, compact linear outputs), grown on
// demand and kept between calls up to kScratchKeptBytes per slot: a fresh allocation of a few
// MB per call costs more in page faults than the packing itself; larger buffers are released
// when the op returns (ScratchLimit), so no thread holds hundreds of MB after a big call.
constexpr int kScratchSlots = 3;
constexpr size_t kScratchKeptBytes = size_t(64) << 20;

struct Scratch {
  struct Aligned {
    void operator()(char* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<char[], Aligned> buffers[kScratchSlots];
  size_t sizes[kScratchSlots] = {0, 0, 0};
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

void* scratch(int slot, size_t bytes) {
  Scratch& s = thread_scratch();
  if (s.sizes[slot] < bytes) {
    s.buffers[slot].reset(static_cast<char*>(::operator new[](bytes, std::align_val_t(64))));
    s.sizes[slot] = bytes;
  }
  return s.buffers[slot].get();
}

// Releases the slots above kScratchKeptBytes when an op returns (or throws).
struct ScratchLimit {
  ~ScratchLimit() {
    Scratch& s = thread_scratch();
    for (int slot = 0; slot < kScratchSlots; ++slot) {
      if (s.sizes[slot] > kScratchKeptBytes) {
        s.buffers[slot].reset();
        s.sizes[slot] = 0;
      }
    }
  }
};

// A (rows, channels, *inner_shape) tensor of src's chosen rows and channels (inner elements
// contiguous), written into scratch slot `slot` (valid until the next gather into that slot),
// or into a tensor of its own when slot < 0.
at::Tensor gather(const at::Tensor& src, int64_t row_stride, int64_t channel_stride, const std::vector<int64_t>& rows,
                  const std::vector<int64_t>& channels, at::IntArrayRef inner_shape, int slot) {
  std::vector<int64_t> shape{static_cast<int64_t>(rows.size()), static_cast<int64_t>(channels.size())};
  shape.insert(shape.end(), inner_shape.begin(), inner_shape.end());
  int64_t numel = 1, inner = 1;
  for (int64_t d : shape) numel *= d;
  for (int64_t d : inner_shape) inner *= d;
  if (numel == 0) return at::empty(shape, src.options());
  at::Tensor dst = slot < 0 ? at::empty(shape, src.options())
                            : at::from_blob(scratch(slot, static_cast<size_t>(numel * src.element_size())), shape,
                                            src.options());
  mmfast::ChannelGatherParams p;
  p.element_bytes = src.element_size();
  p.src = src.data_ptr();
  p.src_row_stride = row_stride, p.src_channel_stride = channel_stride;
  p.row_index = rows.data(), p.channel_index = channels.data();
  p.rows = shape[0], p.channels = shape[1], p.inner = inner;
  p.dst = dst.data_ptr();
  mmfast::cpu::pruned_kernels().gather(p);
  return dst;
}

// ---- a static plan: packed per-code weights kept across calls (glue/packed_weight_cache.h) ----
// The code's packed weight (kept_out, kept_in, *taps): kept, or gathered now (kept when there is
// room, else into per-thread scratch). weight: the caller's stacked weight (the key),
// code_weight: the code's (Cout, Cin, ...) slice, contiguous.
at::Tensor packed_code_weight(const at::Tensor& weight, const at::Tensor& code_weight, int64_t code,
                              const std::vector<int64_t>& kept_out, const std::vector<int64_t>& kept_in,
                              int64_t taps) {
  const at::ScalarType compute = compute_dtype(weight.scalar_type());
  const size_t needed = kept_out.size() * kept_in.size() * size_t(taps) * c10::elementSize(compute);
  std::vector<int64_t> signature(kept_out);  // the kept outputs, -1, the kept inputs
  signature.push_back(-1);
  signature.insert(signature.end(), kept_in.begin(), kept_in.end());
  const int64_t in_channels = code_weight.size(1);
  return mmfast::glue::PackedWeightCache::instance().get({weight}, code, signature, needed, [&](bool keep) {
    const at::Tensor packed = gather(code_weight, in_channels * taps, taps, kept_out, kept_in,
                                     code_weight.sizes().slice(2), keep && compute == weight.scalar_type() ? -1 : 0);
    return packed.to(compute);  // no copy when the dtypes agree
  });
}

// One code's share of the batch: its rows, kept channels, packed weight and bias.
struct CodeWork {
  std::vector<int64_t> rows, kept_in, kept_out;
  at::Tensor weight, bias;  // (kept_out, kept_in, *taps), (kept_out,), in compute_dtype

  int64_t count() const { return static_cast<int64_t>(rows.size()); }
  bool consecutive_rows() const { return rows.back() - rows.front() + 1 == count(); }
};

// Calls run(work) for each code present, in code order, its weights packed to the kept
// channels (no copy when the code keeps every channel).
template <class Run>
void for_each_code(const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias, const at::Tensor& sample_codes,
                   const at::Tensor& in_mask_in, const at::Tensor& out_mask_in, const char* op, Run run) {
  const at::Tensor weight = weight_in.contiguous(), in_mask = in_mask_in.contiguous(),
                   out_mask = out_mask_in.contiguous();
  const int64_t codes = out_mask.size(0), out_channels = weight.size(1), in_channels = weight.size(2);
  int64_t taps = 1;  // kh * kw (1 for linear)
  for (int64_t d : weight.sizes().slice(3)) taps *= d;
  const auto rows = rows_per_code(sample_codes, codes, op);
  for (int64_t code = 0; code < codes; ++code) {
    if (rows[code].empty()) continue;
    CodeWork w;
    w.rows = rows[code];
    w.kept_in = kept_channels(in_mask.data_ptr<bool>() + code * in_channels, in_channels);
    w.kept_out = kept_channels(out_mask.data_ptr<bool>() + code * out_channels, out_channels);
    const at::Tensor code_weight = weight[weight.size(0) > 1 ? code : 0];
    const bool dense = w.kept_in.size() == static_cast<size_t>(in_channels) &&
                       w.kept_out.size() == static_cast<size_t>(out_channels);
    // a dense code's weight is used as it is, unless converted (then packed: kept by a static plan)
    w.weight = dense && compute_dtype(weight.scalar_type()) == weight.scalar_type()
                   ? code_weight
                   : packed_code_weight(weight_in, code_weight, code, w.kept_out, w.kept_in, taps);
    if (bias.has_value()) {
      const at::Tensor code_bias = (*bias)[bias->size(0) > 1 ? code : 0];
      w.bias = (w.kept_out.size() == static_cast<size_t>(out_channels)
                    ? code_bias
                    : code_bias.index_select(0, at::tensor(w.kept_out, bias->options().dtype(at::kLong))))
                   .to(compute_dtype(bias->scalar_type()));
    }
    run(w);
  }
}

// y[rows, :] = the code's compact output at its kept channels, exact zeros elsewhere.
void scatter(const at::Tensor& out, const std::vector<int64_t>& rows, const std::vector<int64_t>& kept_out,
             at::Tensor& y, int64_t inner) {
  std::vector<int64_t> position(y.size(1), -1);
  for (size_t j = 0; j < kept_out.size(); ++j) position[kept_out[j]] = static_cast<int64_t>(j);
  mmfast::ChannelScatterParams p;
  p.element_bytes = y.element_size();
  p.src = out.defined() ? out.data_ptr() : nullptr;
  p.kept = static_cast<int64_t>(kept_out.size());
  p.kept_position = position.data();
  p.dst_channels = y.size(1);
  p.row_index = rows.data();
  p.rows = static_cast<int64_t>(rows.size()), p.inner = inner;
  p.dst = y.data_ptr();
  p.dst_row_stride = y.stride(0), p.dst_channel_stride = y.stride(1);
  mmfast::cpu::pruned_kernels().scatter(p);
}

at::Tensor masked_conv2d(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto g = check_masked(x_in, weight, bias, sample_codes, in_mask, out_mask, stride, padding, dilation, false);
  const at::Tensor x = x_in.contiguous();  // planes contiguous for the gather
  at::Tensor y = mmfast::glue::empty_output({x.size(0), weight.size(1), g.out_h, g.out_w}, x.options());
  if (y.numel() == 0) {
    rows_per_code(sample_codes, out_mask.size(0), "masked_conv2d");  // the codes are checked all the same
    return y;
  }
  const ScratchLimit release_large_scratch;
  for_each_code(weight, bias, sample_codes, in_mask, out_mask, "masked_conv2d", [&](const CodeWork& w) {
    at::Tensor out;
    if (!w.kept_out.empty() && w.kept_in.empty()) {  // no input kept: the bias alone
      out = at::zeros({w.count(), static_cast<int64_t>(w.kept_out.size()), g.out_h, g.out_w}, x.options());
      if (w.bias.defined()) out = (out + w.bias.view({1, -1, 1, 1})).to(x.scalar_type());
    } else if (!w.kept_out.empty()) {
      const bool slice = w.kept_in.size() == static_cast<size_t>(x.size(1)) && w.consecutive_rows();
      const at::Tensor xs = slice ? x.narrow(0, w.rows.front(), w.count())
                                  : gather(x, x.stride(0), x.stride(1), w.rows, w.kept_in, {x.size(2), x.size(3)}, 1);
      out = at::conv2d(xs.to(w.weight.scalar_type()), w.weight, w.bias, stride, padding, dilation)
                .to(x.scalar_type())
                .contiguous();
    }
    scatter(out, w.rows, w.kept_out, y, g.out_h * g.out_w);
  });
  return y;
}

at::Tensor masked_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& sample_codes, const at::Tensor& in_mask, const at::Tensor& out_mask) {
  check_masked(x_in, weight, bias, sample_codes, in_mask, out_mask, {}, {}, {}, true);
  // Token rows at one stride with unit channel stride (a contiguous x, or one half of a GEGLU
  // projection's output, which AptpUNet passes in place) are read where they are: (B * N, C)
  // with row stride x.stride(1). Anything else is copied first.
  const bool uniform_rows = x_in.size(1) > 1 && x_in.size(2) > 1 && x_in.stride(2) == 1 &&
                            x_in.stride(1) >= x_in.size(2) && x_in.stride(0) == x_in.size(1) * x_in.stride(1);
  const at::Tensor x = uniform_rows ? x_in : x_in.contiguous();
  const int64_t tokens = x.size(1), in_channels = x.size(2), out_channels = weight.size(1);
  const int64_t row_stride = uniform_rows ? x.stride(1) : in_channels;
  at::Tensor y = mmfast::glue::empty_output({x.size(0), tokens, out_channels}, x.options());
  if (y.numel() == 0) {
    rows_per_code(sample_codes, out_mask.size(0), "masked_linear");
    return y;
  }
  const ScratchLimit release_large_scratch;
  at::Tensor y_tokens = y.view({x.size(0) * tokens, out_channels});  // scattered token by token
  for_each_code(weight, bias, sample_codes, in_mask, out_mask, "masked_linear", [&](const CodeWork& w) {
    const bool all_in = w.kept_in.size() == static_cast<size_t>(in_channels);
    const bool all_out = w.kept_out.size() == static_cast<size_t>(out_channels);
    std::vector<int64_t> token_rows;  // the code's samples' tokens, as rows of (B * N, C): made when needed
    const auto make_token_rows = [&] {
      token_rows.reserve(static_cast<size_t>(w.count() * tokens));
      for (int64_t b : w.rows)
        for (int64_t t = 0; t < tokens; ++t) token_rows.push_back(b * tokens + t);
    };
    const auto kept_inputs = [&] {  // (tokens of the code's rows, kept inputs): a slice when all are kept
      if (w.consecutive_rows() && all_in)
        return x.narrow(0, w.rows.front(), w.count()).view({w.count() * tokens, in_channels});
      if (token_rows.empty()) make_token_rows();
      return gather(x.view({x.size(0) * tokens, in_channels}), row_stride, 1, token_rows, w.kept_in, {}, 1);
    };
    const bool converted = w.weight.scalar_type() != x.scalar_type();  // fp16 computed in fp32
    // out = bias + xs @ weight^T, rounded once (in place, or through an fp32 result when converted)
    const auto product_into = [&](at::Tensor& out, const at::Tensor& xs) {
      at::Tensor target = converted ? at::empty(out.sizes(), out.options().dtype(w.weight.scalar_type())) : out;
      if (w.bias.defined()) {
        at::addmm_out(target, w.bias, xs.to(w.weight.scalar_type()), w.weight.t());
      } else {
        at::mm_out(target, xs.to(w.weight.scalar_type()), w.weight.t());
      }
      if (converted) out.copy_(target);
    };
    if (w.consecutive_rows() && all_out && !w.kept_in.empty()) {  // every output kept: the GEMM writes y's rows
      at::Tensor ys = y_tokens.narrow(0, w.rows.front() * tokens, w.count() * tokens);
      product_into(ys, kept_inputs());
      return;
    }
    if (token_rows.empty()) make_token_rows();
    at::Tensor out;
    if (!w.kept_out.empty()) {
      const at::Tensor xs = kept_inputs();
      // The compact result lives in scratch too: it is consumed by the scatter right away.
      const int64_t kept = static_cast<int64_t>(w.kept_out.size());
      out = at::from_blob(scratch(2, static_cast<size_t>(xs.size(0) * kept * x.element_size())),
                          {xs.size(0), kept}, x.options());
      if (w.kept_in.empty()) {
        out.zero_();
        if (w.bias.defined()) out.add_(w.bias);
      } else {  // bias + product rounded once, as on the in-place path
        product_into(out, xs);
      }
    }
    scatter(out, token_rows, w.kept_out, y_tokens, 1);
  });
  return y;
}

at::Tensor masked_group_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight_in,
                             const c10::optional<at::Tensor>& bias_in, int64_t num_groups,
                             const at::Tensor& codes_in, const at::Tensor& mask_in, double eps, bool silu) {
  mmfast::glue::check_masked_group_norm(x_in, weight_in, bias_in, num_groups, codes_in, mask_in, eps);
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = mmfast::glue::empty_output(x.sizes(), x.options());
  if (x.numel() == 0) {
    rows_per_code(codes, mask.size(0), "masked_group_norm");
    return y;
  }
  const auto p = mmfast::glue::group_norm_params(x, y, weight, bias, num_groups, codes, mask, eps, silu);
  const int64_t bad = mmfast::cpu::pruned_kernels().group_norm(p);
  if (bad >= 0) {
    const int64_t code = codes.to(at::kLong)[bad].item<int64_t>();
    TORCH_CHECK_INDEX(false, "masked_group_norm: sample code ", code, " (sample ", bad, ") is out of range for ",
                      p.routing.num_codes, " architecture codes");
  }
  return y;
}

}  // namespace

namespace mmfast {
namespace glue {
std::vector<int64_t> pruned_weight_cache(int64_t budget_mb, bool clear) {
  return PackedWeightCache::instance().control(budget_mb, clear);
}
}  // namespace glue
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d);
  m.impl("masked_linear", &masked_linear);
  m.impl("masked_group_norm", &masked_group_norm);
}
