// Torch-free description of the masked-channel (pruned-expert) ops of APTP: one batch, samples
// routed to K architecture codes, each code a physically pruned expert with its own weights.
//
// Sample b runs code c = sample_codes[b] (0 <= c < K). in_mask (K, Cin) and out_mask (K, Cout)
// say which channels code c keeps; weight / bias hold one set per code (code stride 0: shared).
//
// masked_conv2d: y[b, o] for a kept output o of code c is
//     bias[c, o] + sum over kept inputs i, taps (r, s) of weight[c, o, i, r, s] * x[b, i, ...]
//   (torch.nn.functional.conv2d's stride / padding / dilation, zero padding); masked output
//   channels are exactly 0; masked input channels are never read. This equals the conv of
//   the physically sliced expert, embedded back into the dense channel layout.
// masked_linear: the same for tokens, x (B, N, Cin) -> y (B, N, Cout) (F.linear's semantics):
//   the kernels run it as a 1x1 conv over a (B, Cin, N, 1) view of x.
// masked_group_norm: x (B, C, P) split into G groups of C / G contiguous channels; the mean
//   and (biased) variance of group g of sample b run over its channels that code c keeps (the
//   GroupNorm of the pruned expert, whose groups are the kept ones); kept channels get
//   (x - mean) / sqrt(var + eps) * weight[c, ch] + bias[c, ch], then SiLU when asked; masked
//   channels are exactly 0. Statistics accumulate in fp32 (fp64 for fp64 inputs).
// A sample whose code is outside [0, K) is invalid: the CPU raises; the CUDA kernels write NaN
// over its whole output (no host synchronisation).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmfast/common.h"

namespace mmfast {

// How the kernels read the per-sample codes and the masks.
struct CodeRouting {
  int64_t num_codes = 0;              // K
  const void* sample_codes = nullptr;  // (B,), contiguous
  int code_bytes = 8;                  // 8 (int64) or 4 (int32)
  const bool* in_mask = nullptr;       // (K, Cin), contiguous (conv / linear only)
  const bool* out_mask = nullptr;      // (K, Cout) for conv / linear, (K, C) for group norm
};

struct MaskedConvParams {
  int64_t batch = 0;                           // B
  int64_t in_channels = 0, out_channels = 0;   // Cin, Cout
  int64_t height = 0, width = 0;               // input H, W
  int64_t out_height = 0, out_width = 0;       // output Ho, Wo
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  DType dtype = DType::kFloat32;  // of x, weight, bias and y
  CodeRouting routing;

  const void* x = nullptr;  // element (b, i, h, w) at x[b*s0 + i*s1 + h*s2 + w*s3]
  int64_t x_strides[4] = {0, 0, 0, 0};
  const void* weight = nullptr;  // per code a contiguous (Cout, Cin, kh, kw) block
  int64_t weight_code_stride = 0;  // elements between codes' blocks; 0: one shared set
  const void* bias = nullptr;      // per code (Cout,), contiguous, or nullptr
  int64_t bias_code_stride = 0;
  void* y = nullptr;  // element (b, o, h, w) at y[b*s0 + o*s1 + h*s2 + w*s3]; no two elements alias
  int64_t y_strides[4] = {0, 0, 0, 0};

  void* workspace = nullptr;  // caller-owned, size from the kernels' workspace query (CUDA: 16-byte aligned for the packed path)
  size_t workspace_bytes = 0;
  // CUDA, optional: every code's weights already packed by masked_conv2d_pack_weights for these
  // weights and masks (kept across calls by the caller); nullptr: packed per call as needed.
  const void* packed_weight = nullptr;
};

struct MaskedGroupNormParams {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // C
  int64_t groups = 0;    // G (C % G == 0)
  int64_t plane = 0;     // P: the product of the spatial sizes (1 for (B, C) inputs)
  DType dtype = DType::kFloat32;  // of x, y, weight and bias
  CodeRouting routing;            // out_mask is the (K, C) channel mask
  const void* x = nullptr;  // (B, C, P), contiguous
  void* y = nullptr;        // (B, C, P), contiguous
  const void* weight = nullptr;  // per code (C,), contiguous, or nullptr (1)
  const void* bias = nullptr;    // per code (C,), contiguous, or nullptr (0)
  int64_t affine_code_stride = 0;  // elements between codes' weight / bias; 0: shared
  double eps = 1e-5;
  bool silu = false;
};

// The CPU path's data movement (the GEMMs run in oneDNN): pack one code's kept channels into a
// compact tensor, and put a code's compact output back into the dense layout.
// gather: dst[r, j, t] = src[row_index[r] * src_row_stride + channel_index[j] * src_channel_stride + t]
//   for r < rows, j < channels, t < inner; dst is contiguous (rows, channels, inner). Packs a
//   code's weights (rows = kept outputs, channels = kept inputs, inner = kh * kw) and its
//   samples' kept input channels (rows = samples, inner = H * W).
struct ChannelGatherParams {
  int64_t element_bytes = 4;
  const void* src = nullptr;
  int64_t src_row_stride = 0, src_channel_stride = 0;  // elements; inner elements are contiguous
  const int64_t* row_index = nullptr;                   // (rows,)
  const int64_t* channel_index = nullptr;               // (channels,)
  int64_t rows = 0, channels = 0, inner = 0;
  void* dst = nullptr;
};

// scatter: for r < rows and every channel c < dst_channels of dense row row_index[r],
//   dst[row, c, t] = kept_position[c] >= 0 ? src[r, kept_position[c], t] : 0, with src contiguous
//   (rows, kept, inner): each output row is written whole, masked channels as exact zeros.
struct ChannelScatterParams {
  int64_t element_bytes = 4;
  const void* src = nullptr;             // (rows, kept, inner), contiguous
  int64_t kept = 0;
  const int64_t* kept_position = nullptr;  // (dst_channels,): index into src's channels, or -1
  int64_t dst_channels = 0;
  const int64_t* row_index = nullptr;      // (rows,)
  int64_t rows = 0, inner = 0;
  void* dst = nullptr;
  int64_t dst_row_stride = 0, dst_channel_stride = 0;  // elements; inner elements are contiguous
};

}  // namespace mmfast
