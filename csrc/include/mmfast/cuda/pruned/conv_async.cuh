// masked_conv2d (and masked_linear) for fp16 / bf16 on sm_80+: packed operands streamed by
// cp.async through the NT tile GEMM of tile_gemm.cuh (namespace mmfast::cuda::prunedk).
// The plan behind it: docs/masked-conv-performance.md ("What a kernel that can meet it needs").
//
//   masked_pack_weight_kernel  per (code some sample uses, output position < kept_out): that
//                       output channel's weights over the code's kept inputs, one row per tap:
//                         wp[code][tap][pos][j] = weight[code][out_perm[pos]][in_list[j]][tap]
//                       for j < kept_in, 0 up to round_up(kept_in, 8).
//   masked_pack_input_kernel   per sample of a valid code: its kept input channels, channels
//                       innermost (a 32 x 32 transpose through shared memory):
//                         xp[b][h][w][j] = x[b][in_list[j]][h][w], j < kept_in, 0 up to the 8.
//   masked_conv_async_kernel   item = (sample b, 128 positions of its code's output permutation,
//                       128 output pixels): C[pos][pixel] = sum over taps t and 32-wide slices of
//                       the kept inputs of wp[code][t][pos][.] . xp[b][pixel shifted by t][.].
//                       Every row of both operands is 16-byte chunks (rows of round_up(Cin, 8)
//                       elements), copied by cp.async into a 4-stage ring (a pixel whose tap
//                       falls in the padding, a row past the kept outputs: zero-filled chunks)
//                       and multiplied with fp32 sums (products exact, as on the TF32 path) by
//                       the NT tile GEMM's multiplier Nt (tile_gemm.cuh): ldmatrix +
//                       mma.sync.m16n8k16 (NtMmaSync), or on sm_90a wgmma (NtWgmma: each
//                       warpgroup 64 rows x 128 pixels per instruction; MMFAST_CUDA_WGMMA=0 keeps
//                       mma.sync); in a tile with at most 64 kept rows the warps (warpgroup) of
//                       the other 64 skip their multiplies. Staging costs a few instructions per
//                       16-byte chunk instead of ~25 per element.
//                       Positions >= kept_out are written 0, a sample of a code outside [0, K) NaN,
//                       as by masked_conv_kernel (conv.cuh), which runs every other case.
//                       When the tiles fill less than the resident blocks (a 12 x 12 level, one
//                       image), each tile's steps are split into `splits` ranges, one item each,
//                       whose fp32 sums go to the workspace instead of y:
//   masked_conv_split_reduce_kernel  per element of y: the splits' sums in order + bias (the
//                       same result on every run), masked positions 0, invalid codes NaN.
// The packed operands live in the workspace (sizes known on the host: K x taps x Cout x Cin8 and
// B x H x W x Cin8 elements, Cin8 = round_up(Cin, 8)); the packing kernels write only the kept
// part of the codes in use, so their traffic scales with the kept work like the conv's.
// The mma.sync multiplier passed its tests on an H200 (2026-12-04); the wgmma one is compiled and
// checked under the host emulator, not yet run on a GPU.
#pragma once

#include <cstdlib>
#include <cstring>

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/pruned/conv.cuh"
#include "mmfast/cuda/tile_gemm.cuh"
#include "mmfast/pruned.h"

namespace mmfast {
namespace cuda {
namespace prunedk {

// ---- workspace: the packed operands after the routing plan -------------------------------------
struct PackedLayout {
  int64_t cin8;                  // row length of both packed operands: round_up(Cin, 8)
  int64_t splits;                // of each tile's reduction (1: no split, no partial sums)
  size_t weight_offset, input_offset, partial_offset, bytes;
};

// Elements of every code's packed weights: K x kh*kw x Cout x round_up(Cin, 8).
inline int64_t packed_weight_elements(const MaskedConvParams& p) {
  return p.routing.num_codes * p.kernel_h * p.kernel_w * p.out_channels * round_up(p.in_channels, 8);
}

constexpr int64_t kMaxSplits = 8;
constexpr int64_t kMinSplitSteps = 8;  // a split's fewest steps at full width (the ring's prologue is 3)

// MMFAST_CUDA_CONV_SPLITS=n caps the splits below at n (1: never split; for A/B timing).
inline int64_t split_cap() {
  static const int64_t cap = [] {
    const char* env = std::getenv("MMFAST_CUDA_CONV_SPLITS");
    char* end = nullptr;
    const long n = env != nullptr ? std::strtol(env, &end, 10) : kMaxSplits;
    if (env != nullptr && end == env) return kMaxSplits;  // not a number: the default
    return n < 1 ? int64_t(1) : n > kMaxSplits ? kMaxSplits : static_cast<int64_t>(n);
  }();
  return cap;
}

// Splits of each tile's reduction (kh*kw taps x 32-wide slices of round_up(Cin, 8) inputs) when
// the B x channel x pixel tiles number fewer than the blocks resident at once. s splits make
// s x tiles items of 1/s of a tile's work, which the persistent grid (the resident blocks)
// runs in ceil(s x tiles / blocks) rounds: s minimises that time, rounds / s in whole-tile
// times, plus the fp32 sums each split adds (a 64 KB write and read per tile, taken as 4 of the
// tile's steps at full width; ties: fewer splits), with at most kMaxSplits (split_cap) and at
// least kMinSplitSteps steps per split. Tiles past a code's kept outputs count as whole tiles
// (the kept counts are on the device; those cost nothing).
inline int64_t split_count(const MaskedConvParams& p, int64_t resident_blocks) {
  const int64_t tiles = p.batch * ceil_div(p.out_channels, kNtRows) * ceil_div(p.out_height * p.out_width, kNtCols);
  if (tiles < 1 || resident_blocks <= tiles) return 1;
  const int64_t max_steps = p.kernel_h * p.kernel_w * ceil_div(round_up(p.in_channels, 8), kNtDepth);
  const int64_t most = min_i64(split_cap(), max_i64(1, max_steps / kMinSplitSteps));
  int64_t best = 1;
  double best_time = 1.0;  // one round of whole tiles
  for (int64_t s = 2; s <= most; ++s) {
    const double time = static_cast<double>(ceil_div(s * tiles, resident_blocks)) / s + 4.0 * (s - 1) / max_steps;
    if (time < best_time) best = s, best_time = time;
  }
  return best;
}

// The workspace of the packed path: the routing plan, the packed weights (none when the caller
// gives p.packed_weight), the packed inputs and, with splits > 1, the splits' fp32 sums
// ([split][b][output position][pixel]).
inline PackedLayout packed_layout(const MaskedConvParams& p, int64_t elem_bytes, int64_t splits) {
  PackedLayout s;
  s.cin8 = round_up(p.in_channels, 8);
  s.splits = splits;
  const size_t plan_bytes = routing_plan(p.routing.num_codes, p.in_channels, p.out_channels).bytes;
  s.weight_offset = static_cast<size_t>(round_up(static_cast<int64_t>(plan_bytes), 256));
  const int64_t weight_bytes = p.packed_weight != nullptr ? 0 : packed_weight_elements(p) * elem_bytes;
  s.input_offset = s.weight_offset + static_cast<size_t>(round_up(weight_bytes, 256));
  const int64_t input_bytes = p.batch * p.height * p.width * s.cin8 * elem_bytes;
  s.partial_offset = s.input_offset + static_cast<size_t>(round_up(input_bytes, 256));
  const int64_t partial_bytes = splits > 1 ? splits * p.batch * p.out_channels * p.out_height * p.out_width * 4 : 0;
  s.bytes = s.partial_offset + static_cast<size_t>(partial_bytes);
  return s;
}

struct AsyncConvArgs {
  MaskedConvParams p;
  const int32_t* counts;
  const int32_t* in_list;
  const int32_t* out_perm;
  const int32_t* used;
  int pack_all;          // the weight packing: every code (kept across calls), not only those used
  void* wp;              // packed weights (see above)
  void* xp;              // packed inputs
  float* partial;        // splits > 1: [split][b][output position][pixel] sums of the kept rows
  int64_t splits;
  int64_t cin8;
  int64_t pixels;        // Ho * Wo
  int64_t pixel_tiles;   // ceil(pixels / 128)
  int64_t channel_tiles; // ceil(Cout / 128)
};

// 16-bit elements moved as raw bits (no constructors in shared arrays).
template <class T> __device__ __forceinline__ uint16_t bits_of(T v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return u;
}

// ---- packing -----------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads) masked_pack_weight_kernel(AsyncConvArgs a) {
  const MaskedConvParams& p = a.p;
  const T* weight = static_cast<const T*>(p.weight);
  uint16_t* wp = static_cast<uint16_t*>(a.wp);
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t items = p.routing.num_codes * p.out_channels;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t code = item / p.out_channels, pos = item - code * p.out_channels;
    if ((!a.pack_all && !a.used[code]) || pos >= a.counts[2 * code + 1]) continue;  // uniform over the block
    const int64_t kept_in = a.counts[2 * code], kept8 = round_up(kept_in, 8);
    const int32_t* in_list = a.in_list + code * p.in_channels;
    const T* src = weight + code * p.weight_code_stride + a.out_perm[code * p.out_channels + pos] * p.in_channels * taps;
    uint16_t* dst = wp + (code * taps * p.out_channels + pos) * a.cin8;
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t j = threadIdx.x; j < kept8; j += blockDim.x)
        dst[t * p.out_channels * a.cin8 + j] = j < kept_in ? bits_of(src[in_list[j] * taps + t]) : uint16_t(0);
  }
}

constexpr int kPackTile = 32;  // the input transpose: 32 channels x 32 pixels per item

template <class T>
__global__ void __launch_bounds__(kThreads) masked_pack_input_kernel(AsyncConvArgs a) {
  __shared__ uint16_t tile[kPackTile][kPackTile + 1];  // [channel][pixel]; +1: no bank conflicts
  const MaskedConvParams& p = a.p;
  const T* x = static_cast<const T*>(p.x);
  uint16_t* xp = static_cast<uint16_t*>(a.xp);
  const int64_t plane = p.height * p.width;
  const int64_t pixel_tiles = ceil_div(plane, kPackTile), channel_tiles = ceil_div(a.cin8, kPackTile);
  const int64_t items = p.batch * pixel_tiles * channel_tiles;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t jt = item % channel_tiles, rest = item / channel_tiles;
    const int64_t pt = rest % pixel_tiles, b = rest / pixel_tiles;
    const int64_t code = code_of(p.routing, b);
    if (code < 0 || code >= p.routing.num_codes) continue;  // the conv writes NaN, reads nothing
    const int64_t kept_in = a.counts[2 * code], kept8 = round_up(kept_in, 8);
    const int64_t j0 = jt * kPackTile, pix0 = pt * kPackTile;
    if (j0 >= kept8) continue;
    const int32_t* in_list = a.in_list + code * p.in_channels;
    __syncthreads();  // the previous item's stores read the tile
    for (int e = threadIdx.x; e < kPackTile * kPackTile; e += blockDim.x) {
      const int jj = e / kPackTile, pp = e % kPackTile;  // pixels fastest: reads along a row of x
      const int64_t j = j0 + jj, pix = pix0 + pp;
      uint16_t v = 0;
      if (j < kept_in && pix < plane) {
        const int64_t h = pix / p.width, w = pix - h * p.width;
        v = bits_of(x[b * p.x_strides[0] + in_list[j] * p.x_strides[1] + h * p.x_strides[2] + w * p.x_strides[3]]);
      }
      tile[jj][pp] = v;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kPackTile * kPackTile; e += blockDim.x) {
      const int pp = e / kPackTile, jj = e % kPackTile;  // channels fastest: writes along a row of xp
      const int64_t j = j0 + jj, pix = pix0 + pp;
      if (j < kept8 && pix < plane) xp[(b * plane + pix) * a.cin8 + j] = tile[jj][pp];
    }
  }
}

// ---- the conv ----------------------------------------------------------------------------------
// Nt: the NT tile GEMM's multiplier (NtMmaSync, or NtWgmma on sm_90a).
template <class T, class Nt>
__global__ void __launch_bounds__(kThreads, 2) masked_conv_async_kernel(AsyncConvArgs a) {
  using Stage = typename Nt::template Stage<T>;
  MMFAST_DYNAMIC_SHARED(smem);
  Stage* ring = reinterpret_cast<Stage*>(Nt::ring_start(smem));
  __shared__ int32_t row_c[kNtRows];  // the position's output channel, -1 past Cout
  __shared__ int64_t row_y[kNtRows];  // its y offset
  __shared__ int64_t col_y[kNtCols];  // y offset of the pixel, -1 past the pixels
  using AChunk = RawChunk<decltype(Stage::a)>;
  using BChunk = RawChunk<decltype(Stage::b)>;
  const MaskedConvParams& p = a.p;
  const T* wp = static_cast<const T*>(a.wp);
  const T* xp = static_cast<const T*>(a.xp);
  const T* fallback = static_cast<const T*>(p.workspace);  // a zero-filled chunk's source: mapped, aligned
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t tap_stride = p.out_channels * a.cin8;  // between the taps of a packed weight row
  const uint32_t height = static_cast<uint32_t>(p.height), width = static_cast<uint32_t>(p.width);
  const int64_t items = p.batch * a.channel_tiles * a.pixel_tiles * a.splits;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t split = item % a.splits, tile = item / a.splits;  // a tile's splits side by side: shared reads in L2
    const int64_t pt = tile % a.pixel_tiles, rest = tile / a.pixel_tiles;
    const int64_t ct = rest % a.channel_tiles, b = rest / a.channel_tiles;
    const int64_t p0 = pt * kNtCols, o0 = ct * kNtRows;
    const int64_t code = code_of(p.routing, b);
    const bool valid = code >= 0 && code < p.routing.num_codes;
    const int64_t kept_in = valid ? a.counts[2 * code] : 0;
    const int64_t kept_out = valid ? a.counts[2 * code + 1] : 0;
    const int64_t rows = min_i64(kNtRows, p.out_channels - o0), cols = min_i64(kNtCols, a.pixels - p0);
    const int64_t kept_rows = max_i64(0, min_i64(rows, kept_out - o0));
    if (kept_rows == 0 && a.splits > 1) continue;  // no sums: the reduce kernel writes these rows
    T* y_b = y + b * p.y_strides[0];

    __syncthreads();  // the previous item's epilogue still reads the tables, its last stage the ring
    if (threadIdx.x < kNtRows) {
      const int i = static_cast<int>(threadIdx.x);
      const int64_t pos = o0 + i;
      const int64_t ch = pos < p.out_channels ? (valid ? a.out_perm[code * p.out_channels + pos] : pos) : -1;
      row_c[i] = static_cast<int32_t>(ch);
      row_y[i] = ch >= 0 ? ch * p.y_strides[1] : 0;
    } else {
      const int j = static_cast<int>(threadIdx.x) - kNtRows;
      const int64_t pix = p0 + j;
      const int64_t ho = pix / p.out_width, wo = pix - ho * p.out_width;
      col_y[j] = j < cols ? ho * p.y_strides[2] + wo * p.y_strides[3] : -1;
    }
    __syncthreads();

    if (kept_rows == 0) {  // masked channels (0) or an invalid code (NaN): no reduction
      const T fill = valid ? from_acc<T>(0.0f) : quiet_nan<T>();
      for (int e = threadIdx.x; e < kNtRows * kNtCols; e += kThreads) {
        const int i = e / kNtCols, j = e % kNtCols;
        if (row_c[i] >= 0 && col_y[j] >= 0) y_b[row_y[i] + col_y[j]] = fill;
      }
      continue;
    }

    // steps: taps x slices of kNtDepth kept inputs (the last zero-filled past kept8); this
    // split's share [step0, step1)
    const int64_t kept8 = round_up(kept_in, 8);
    const int64_t slices = ceil_div(kept8, kNtDepth), all_steps = taps * slices;
    const int64_t step0 = all_steps * split / a.splits, step1 = all_steps * (split + 1) / a.splits;
    const T* w_tile = wp + (code * taps * p.out_channels + o0) * a.cin8;  // tap 0, the tile's first row
    const T* x_b = xp + b * p.height * p.width * a.cin8;
    // This thread's pixel chunks are fixed per item: their tap-(0, 0) input coordinates (int32:
    // masked_conv2d_coordinates_fit; kOffGrid past the tile's pixels) and offsets in xp (any
    // sign: the padding), channel column included (the weight chunks: w_source below).
    int32_t h0[BChunk::kPerThread], w0[BChunk::kPerThread];
    int64_t b_off[BChunk::kPerThread];
#pragma unroll
    for (int k = 0; k < BChunk::kPerThread; ++k) {
      const BChunk chunk(k);
      const int64_t pix = p0 + chunk.row;
      const int64_t ho = pix / p.out_width, wo = pix - ho * p.out_width;
      const bool in = chunk.in_tile && chunk.row < cols;
      const int64_t h = ho * p.stride_h - p.pad_h, w = wo * p.stride_w - p.pad_w;
      h0[k] = in ? static_cast<int32_t>(h) : kOffGrid;
      w0[k] = in ? static_cast<int32_t>(w) : kOffGrid;
      b_off[k] = in ? (h * p.width + w) * a.cin8 + chunk.col : 0;
    }
    // The copy cursor runs kNtStages - 1 steps ahead of the multiply: input slice copy_l0 of the
    // tap shifted (copy_dh, copy_dw), whose weight rows w_source holds and whose pixels start at x_tap;
    // stepped without divisions or per-chunk multiplies from step0's tap (tap_r, copy_s); no
    // kept inputs: no slices, no steps.
    const int64_t tap0 = slices > 0 ? step0 / slices : 0, tap_r = tap0 / p.kernel_w;
    // The weight rows by SliceSource (32-bit offsets: a.cin8 < 2^24, use_async_conv); l0 and the
    // kept inputs fit an int (kept8 <= a.cin8).
    int copy_l0 = static_cast<int>((step0 - tap0 * slices) * kNtDepth);
    int32_t copy_s = static_cast<int32_t>(tap0 - tap_r * p.kernel_w);
    int32_t copy_dh = static_cast<int32_t>(tap_r * p.dilation_h), copy_dw = static_cast<int32_t>(copy_s * p.dilation_w);
    SliceSource<decltype(Stage::a), T> w_source;
    w_source.at_rows(ring[0].a, w_tile + tap0 * tap_stride, a.cin8, kept_rows);
    static_assert(decltype(Stage::a)::kChunksPerRow == decltype(Stage::b)::kChunksPerRow,
                  "weight and pixel chunks share their columns");
    const int cols_left = static_cast<int>(kept8) - AChunk::kept_col();  // this thread's chunk column's
    const T* x_tap = x_b + (static_cast<int64_t>(copy_dh) * p.width + copy_dw) * a.cin8;
    const auto issue_next = [&](Stage& st) {
      const bool cols_ok = copy_l0 < cols_left;
      w_source.issue(st.a, copy_l0, cols_ok);
#pragma unroll
      for (int k = 0; k < BChunk::kPerThread; ++k) {
        const bool in = static_cast<uint32_t>(h0[k] + copy_dh) < height && static_cast<uint32_t>(w0[k] + copy_dw) < width;
        BChunk(k).issue(st.b, x_tap + copy_l0 + b_off[k], in && cols_ok ? kNtCols : 0, kNtDepth, fallback);
      }
      copy_l0 += kNtDepth;
      if (copy_l0 >= kept8) {  // the next tap
        copy_l0 = 0;
        w_source.next_rows(tap_stride, kept_rows);
        if (++copy_s == p.kernel_w) {
          copy_s = 0, copy_dw = 0;
          copy_dh += static_cast<int32_t>(p.dilation_h);
        } else {
          copy_dw += static_cast<int32_t>(p.dilation_w);
        }
        x_tap = x_b + (static_cast<int64_t>(copy_dh) * p.width + copy_dw) * a.cin8;
      }
    };
    typename Nt::Acc acc;
    Nt::zero(acc);
    Nt::template run<T>(ring, step1 - step0, acc, kept_rows, issue_next, [](int64_t) {});

    if (a.splits > 1) {  // the kept rows' sums (an empty share: zeros); bias and y: the reduce kernel
      float* part = a.partial + ((split * p.batch + b) * p.out_channels + o0) * a.pixels + p0;
#pragma unroll
      for (int r = 0; r < Nt::kRows; ++r) {
        const int i = Nt::row(r);
        if (i >= kept_rows) continue;
#pragma unroll
        for (int c = 0; c < Nt::kCols; ++c) {
          const int j = Nt::col(c);
          if (j < cols) part[i * a.pixels + j] = Nt::at(acc, r, c);
        }
      }
      continue;
    }

    // Epilogue: kept rows get the sum + bias, the tile's masked rows exactly 0 (not their sums:
    // zero-filled weights times an infinite input are NaN). This thread's rows are read from the
    // tables once, each of its columns once.
    const T* bias_c = bias != nullptr ? bias + code * p.bias_code_stride : nullptr;
    int64_t row_off[Nt::kRows];
    float row_bias[Nt::kRows];
    bool row_kept[Nt::kRows];
#pragma unroll
    for (int r = 0; r < Nt::kRows; ++r) {
      const int i = Nt::row(r);
      const int32_t ch = row_c[i];
      row_off[r] = ch >= 0 ? row_y[i] : -1;
      row_kept[r] = i < kept_rows;
      row_bias[r] = i < kept_rows && bias_c != nullptr ? to_acc(bias_c[ch]) : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < Nt::kCols; ++c) {
      const int64_t col_off = col_y[Nt::col(c)];
      if (col_off < 0) continue;
#pragma unroll
      for (int r = 0; r < Nt::kRows; ++r) {
        if (row_off[r] < 0) continue;
        const float v = row_kept[r] ? Nt::at(acc, r, c) + row_bias[r] : 0.0f;
        y_b[row_off[r] + col_off] = from_acc<T>(v);
      }
    }
  }
}

// y from the splits' sums: per element (sample, output position, pixel), the splits in order
// (deterministic) + bias at the position's channel; masked positions 0, invalid codes NaN.
template <class T>
__global__ void __launch_bounds__(kThreads) masked_conv_split_reduce_kernel(AsyncConvArgs a) {
  const MaskedConvParams& p = a.p;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t elements = p.batch * p.out_channels * a.pixels, split_stride = p.batch * p.out_channels * a.pixels;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t pix = e % a.pixels, row = e / a.pixels;  // row = b * Cout + pos
    const int64_t pos = row % p.out_channels, b = row / p.out_channels;
    const int64_t ho = pix / p.out_width, wo = pix - ho * p.out_width;
    const int64_t code = code_of(p.routing, b);
    const bool valid = code >= 0 && code < p.routing.num_codes;
    const int64_t ch = valid ? a.out_perm[code * p.out_channels + pos] : pos;
    T v;
    if (!valid) {
      v = quiet_nan<T>();
    } else if (pos >= a.counts[2 * code + 1]) {
      v = from_acc<T>(0.0f);
    } else {
      float sum = 0.0f;
      for (int64_t s = 0; s < a.splits; ++s) sum += a.partial[s * split_stride + e];
      if (bias != nullptr) sum += to_acc(bias[code * p.bias_code_stride + ch]);
      v = from_acc<T>(sum);
    }
    y[b * p.y_strides[0] + ch * p.y_strides[1] + ho * p.y_strides[2] + wo * p.y_strides[3]] = v;
  }
}

// ---- host side ---------------------------------------------------------------------------------
// The async path runs for fp16 / bf16 on sm_80+ (code compiled for it) with tensor cores and
// cp.async enabled (MMFAST_CUDA_TENSOR_CORES / MMFAST_CUDA_ASYNC_COPY = 0 turn it off), when
// the ring fits the block's shared memory. The workspace query and the launch both ask.
// Its multiplier (with_nt_multiplier): wgmma on an sm_90a build's sm_90 device, else mma.sync.
template <class T, class F> auto with_conv_multiplier(F&& f) {
  return with_nt_multiplier<T>(&masked_conv_async_kernel<T, NtWgmma>, f);
}

template <class T> bool use_async_conv(const MaskedConvParams& p) {
  if constexpr (!std::is_same_v<T, __half> && !std::is_same_v<T, __nv_bfloat16>) {
    return false;
  } else {
    return tensor_cores_enabled() && async_copy_enabled() && compute_capability_major() >= 8 &&
           SliceSource<decltype(NtStage<T>::a), T>::fits_offsets(round_up(p.in_channels, 8)) &&
           NtMmaSync::kSmemBytes<T> <= max_shared_per_block() &&
           compiled_for(&masked_conv_async_kernel<T, NtMmaSync>, NtMmaSync::kMinArch);
  }
}

// The packed path's workspace on this device: the split count from the conv kernel's resident
// blocks (1 when the occupancy query fails: the launch then takes the other kernel anyway).
template <class T> PackedLayout async_conv_layout(const MaskedConvParams& p) {
  int64_t splits = 1;
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    const int per_sm = with_conv_multiplier<T>([](auto nt) {
      using Nt = decltype(nt);
      return resident_blocks_per_sm_once(&masked_conv_async_kernel<T, Nt>, kThreads, Nt::template kSmemBytes<T>);
    });
    if (per_sm > 0) splits = split_count(p, static_cast<int64_t>(sm_count()) * per_sm);
    else (void)cudaGetLastError();
  }
  return packed_layout(p, sizeof(T), splits);
}

// The packed path's arguments: the plan and the packed operands in p's workspace (the weights
// at wp: p.packed_weight when given).
template <class T> AsyncConvArgs async_conv_args(const MaskedConvParams& p, const RoutingPlan& plan, void* wp) {
  char* ws = static_cast<char*>(p.workspace);
  const PackedLayout layout = async_conv_layout<T>(p);
  AsyncConvArgs a;
  a.p = p;
  a.counts = reinterpret_cast<const int32_t*>(ws + plan.counts_offset);
  a.in_list = reinterpret_cast<const int32_t*>(ws + plan.in_offset);
  a.out_perm = reinterpret_cast<const int32_t*>(ws + plan.perm_offset);
  a.used = reinterpret_cast<const int32_t*>(ws + plan.used_offset);
  a.pack_all = 0;
  a.wp = wp != nullptr ? wp : ws + layout.weight_offset;
  a.xp = ws + layout.input_offset;
  a.partial = reinterpret_cast<float*>(ws + layout.partial_offset);
  a.splits = layout.splits;
  a.cin8 = layout.cin8;
  a.pixels = p.out_height * p.out_width;
  a.pixel_tiles = ceil_div(a.pixels, kNtCols);
  a.channel_tiles = ceil_div(p.out_channels, kNtRows);
  return a;
}

template <class T> void launch_pack_weight(const AsyncConvArgs& a, cudaStream_t stream) {
  MMFAST_LAUNCH(masked_pack_weight_kernel<T>, grid_for(a.p.routing.num_codes * a.p.out_channels), kThreads, 0, stream,
                a);
}

// Every code's packed weights into wp (packed_weight_elements of T) for later calls with the
// same weights and masks (p.packed_weight); the plan is in the workspace already.
template <class T> cudaError_t launch_pack_all_weights(const MaskedConvParams& p, const RoutingPlan& plan, void* wp,
                                                        cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, __half> && !std::is_same_v<T, __nv_bfloat16>) {
    (void)p, (void)plan, (void)wp, (void)stream;
    return cudaErrorInvalidValue;  // the packed path is fp16 / bf16 only
  } else {
    AsyncConvArgs a = async_conv_args<T>(p, plan, wp);
    a.pack_all = 1;
    if (p.in_channels > 0) launch_pack_weight<T>(a, stream);
    return cudaGetLastError();
  }
}

// Packs the inputs (and the weights of the codes in use, unless p.packed_weight holds them) and
// launches the conv (the plan is in the workspace already). false when the occupancy query finds
// no room: the caller runs masked_conv_kernel instead.
template <class T> bool launch_conv_async(const MaskedConvParams& p, const RoutingPlan& plan, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, __half> && !std::is_same_v<T, __nv_bfloat16>) {
    (void)p, (void)plan, (void)stream;
    return false;
  } else {
    const AsyncConvArgs a = async_conv_args<T>(p, plan, const_cast<void*>(p.packed_weight));
    const int64_t items = p.batch * a.channel_tiles * a.pixel_tiles * a.splits;
    unsigned grid = 0;
    const bool fits = with_conv_multiplier<T>([&](auto nt) {
      using Nt = decltype(nt);
      return fits_persistent_grid(&masked_conv_async_kernel<T, Nt>, kThreads, Nt::template kSmemBytes<T>, items, grid);
    });
    if (!fits) return false;  // the caller takes the other kernel
    if (p.in_channels > 0) {
      if (p.packed_weight == nullptr) launch_pack_weight<T>(a, stream);
      if (p.height > 0 && p.width > 0)
        MMFAST_LAUNCH(masked_pack_input_kernel<T>,
                      grid_for(p.batch * ceil_div(p.height * p.width, kPackTile) * ceil_div(a.cin8, kPackTile)),
                      kThreads, 0, stream, a);
    }
    with_conv_multiplier<T>([&](auto nt) {
      using Nt = decltype(nt);
      MMFAST_LAUNCH((masked_conv_async_kernel<T, Nt>), grid, kThreads, Nt::template kSmemBytes<T>, stream, a);
      return 0;
    });
    if (a.splits > 1)
      MMFAST_LAUNCH(masked_conv_split_reduce_kernel<T>,
                    grid_for(ceil_div(p.batch * p.out_channels * a.pixels, static_cast<int64_t>(kThreads))), kThreads, 0,
                    stream, a);
    return true;
  }
}

}  // namespace prunedk
}  // namespace cuda
}  // namespace mmfast
