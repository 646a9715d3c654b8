// masked_conv2d (and masked_linear, run as a 1x1 conv) on the GPU: a grouped implicit-GEMM conv
// over a mixed-code batch in one main launch (namespace mmfast::cuda::prunedk).
//
//   masked_routing_kernel  one block per code: its in_mask compacted into the kept-input list
//                          and its out_mask into an output permutation (kept channels first, in
//                          order, then the masked ones), plus both kept counts, in the workspace.
//                          No host synchronisation: the plan lives on the device (graph safe).
//   masked_conv_kernel     item = (sample b, tile of 64 positions of code c's output permutation,
//                          tile of 64 output pixels); per sample its own code, so a tile never
//                          straddles two codes. Positions < kept_out are the code's kept output
//                          channels: a 64 x 64 implicit GEMM (rows: kept outputs, columns:
//                          pixels) whose reduction runs over kept inputs x kh x kw only, then
//                          + bias. Positions >= kept_out are masked channels: written 0 with no
//                          reduction (a tile wholly past the kept count does nothing else).
//                          A sample whose code is outside [0, K) gets NaN in all its tiles.
// Every element of y is written exactly once (the items partition y). Operands are staged
// through shared memory by the shared tile GEMM's building blocks (mmfast/cuda/tile_gemm.cuh):
// exact SIMT FMA for fp32 / fp64; fp16 / bf16 through TF32 tensor cores on sm_80+ (their
// values are exact in TF32, products exact in fp32, fp32 accumulation), SIMT elsewhere.
// Per item, shared tables hold each row's weight offset and channel, each column's input
// origin (int32 coordinates) and x / y offsets, and per staged slice each reduction index's
// x offset (input channel + tap shift), tap shifts and weight column, so the staging loops do
// no division. A thread's staged elements share one pixel column and one reduction index
// (stage_coords), read from the tables once per item / slice. Each thread stages its elements
// of a slice 4 loads at a time (stage_tile_batched: loads from a valid address whatever the
// bounds, the bounds applied after), so 4 loads are in flight where one was; all 8 at once
// would spill at the 128 registers of 2 blocks per SM. Issue-bound far below the H200 target
// (docs/masked-conv-performance.md): the fix is a different kernel, not more tuning of this one.
// Launch: 256 threads, one block per item (1-D grid, grid-stride beyond INT_MAX items),
// __launch_bounds__(256, 2): 126-128 registers, no spills, 38.7 KB static shared memory (sm_90a
// ptxas), two blocks per SM. No split-K: one block runs a tile's whole reduction.
#pragma once

#include <cmath>

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/tile_gemm.cuh"
#include "mmfast/pruned.h"

namespace mmfast {
namespace cuda {
namespace prunedk {

// The code of sample b (any value; the caller checks the range).
__device__ __forceinline__ int64_t code_of(const CodeRouting& r, int64_t b) {
  return r.code_bytes == 8 ? static_cast<const int64_t*>(r.sample_codes)[b]
                           : static_cast<const int32_t*>(r.sample_codes)[b];
}

// Input coordinates are int32 (masked_conv2d_valid keeps every term below kCoordLimit, so a
// tap's row ho * stride - pad + r * dilation stays within int32). kOffGrid marks a column past
// the pixels or a reduction index past L: added to any coordinate (or to itself) the result
// stays negative, so the one unsigned compare against the height or width rejects it.
constexpr int64_t kCoordLimit = int64_t(1) << 29;
constexpr int32_t kOffGrid = -(int32_t(1) << 30);

// ---- workspace: the routing plan ---------------------------------------------------------------
// counts[2k] = kept inputs of code k, counts[2k + 1] = kept outputs; in_list[k * Cin + i] the
// i-th kept input channel; out_perm[k * Cout + pos] the output channel at position pos (kept
// ones first, in channel order, then the masked ones, in channel order). int32: channels fit.
// used[k] = 1 when some sample has code k, else 0 (the packing kernels of conv_async.cuh skip
// the codes no sample uses).
struct RoutingPlan {
  size_t counts_offset, in_offset, perm_offset, used_offset, bytes;
};

inline RoutingPlan routing_plan(int64_t codes, int64_t in_channels, int64_t out_channels) {
  const auto ints = [](int64_t n) { return static_cast<size_t>(round_up(static_cast<int64_t>(sizeof(int32_t)) * n, 256)); };
  RoutingPlan s;
  s.counts_offset = 0;
  s.in_offset = ints(2 * codes);
  s.perm_offset = s.in_offset + ints(codes * in_channels);
  s.used_offset = s.perm_offset + ints(codes * out_channels);
  s.bytes = s.used_offset + ints(codes);
  return s;
}

// Writes the positions of the channels c < n with mask[c] == want, in order, to out[base + .];
// returns how many there were. Every thread of the block calls it.
__device__ __forceinline__ int32_t compact(const bool* mask, int64_t n, bool want, int32_t* out, int32_t base,
                                           int32_t* scratch) {
  int32_t running = 0;
  for (int64_t c0 = 0; c0 < n; c0 += blockDim.x) {
    const int64_t c = c0 + threadIdx.x;
    const int32_t flag = (c < n && mask[c] == want) ? 1 : 0;
    int32_t total = 0;
    const int32_t before = block_exclusive_sum(flag, scratch, total);
    if (flag) out[base + running + before] = static_cast<int32_t>(c);
    running += total;
  }
  return running;
}

template <int kUnused = 0>  // a template, like every kernel in a header (no ODR clash across TUs)
__global__ void __launch_bounds__(kThreads)
    masked_routing_kernel(CodeRouting routing, int64_t batch, int64_t in_channels, int64_t out_channels,
                          int32_t* counts, int32_t* in_list, int32_t* out_perm, int32_t* used) {
  __shared__ int32_t scratch[32];
  __shared__ int32_t any_sample;
  const bool* in_mask = routing.in_mask;
  const bool* out_mask = routing.out_mask;
  for (int64_t k = blockIdx.x; k < routing.num_codes; k += gridDim.x) {
    __syncthreads();  // the previous code's flag was read
    if (threadIdx.x == 0) any_sample = 0;
    __syncthreads();
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x)
      if (code_of(routing, b) == k) any_sample = 1;  // every writer stores the same value
    __syncthreads();
    if (threadIdx.x == 0) used[k] = any_sample;
    const int32_t kept_in =
        compact(in_mask + k * in_channels, in_channels, true, in_list + k * in_channels, 0, scratch);
    int32_t* perm = out_perm + k * out_channels;
    const int32_t kept_out = compact(out_mask + k * out_channels, out_channels, true, perm, 0, scratch);
    compact(out_mask + k * out_channels, out_channels, false, perm, kept_out, scratch);
    if (threadIdx.x == 0) {
      counts[2 * k] = kept_in;
      counts[2 * k + 1] = kept_out;
    }
  }
}

// ---- the grouped implicit-GEMM conv ----------------------------------------------------------
// q = a / b, r = a % b for 0 <= a, 0 < b: a 32-bit division when both fit (a few instructions
// instead of the 64-bit division's call).
__device__ __forceinline__ void divide(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (a <= INT32_MAX && b <= INT32_MAX) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = a - static_cast<int64_t>(q32) * b;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// A staged element as loaded (any value when out of bounds: the load reads a valid address)
// and whether it is inside the operand; the select happens when it is stored.
template <class T> struct Staged {
  T raw;
  bool in;
};

struct ConvArgs {
  MaskedConvParams p;
  const int32_t* counts;
  const int32_t* in_list;
  const int32_t* out_perm;
  int64_t pixels;        // Ho * Wo
  int64_t pixel_tiles;   // ceil(pixels / 64)
  int64_t channel_tiles; // ceil(Cout / 64)
  int use_tc;
};

template <class T>
__global__ void __launch_bounds__(kThreads, 2) masked_conv_kernel(ConvArgs a) {
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  // per item: rows (positions of the output permutation) and columns (pixels)
  __shared__ int64_t row_c[kTile];    // the row's output channel, -1 past Cout
  __shared__ int64_t row_w[kTile];    // weight offset of the row's output channel (kept rows)
  __shared__ int64_t row_y[kTile];    // y offset of the row's output channel
  __shared__ int64_t col_x[kTile];    // x offset of the pixel's tap (0, 0) (any sign: padding)
  __shared__ int32_t col_h[kTile];    // input row of tap (0, 0), kOffGrid past the pixels
  __shared__ int32_t col_w[kTile];    // input column of tap (0, 0)
  __shared__ int64_t col_y[kTile];    // y offset of the pixel
  // per staged slice: reduction index l = kept input * kh * kw + tap
  __shared__ int64_t red_x[kBK];      // x offset of (input channel, tap shift)
  __shared__ int32_t red_h[kBK];      // row shift of the tap, kOffGrid past L
  __shared__ int32_t red_w[kBK];      // column shift of the tap
  __shared__ int64_t red_wt[kBK];     // weight column (input channel * kh * kw + tap), -1 past L

  const MaskedConvParams& p = a.p;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t taps = p.kernel_h * p.kernel_w;
  const int64_t items = p.batch * a.channel_tiles * a.pixel_tiles;

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t pt = item % a.pixel_tiles;
    const int64_t rest = item / a.pixel_tiles;
    const int64_t ct = rest % a.channel_tiles, b = rest / a.channel_tiles;
    const int64_t p0 = pt * kTile, o0 = ct * kTile;
    const int64_t code = code_of(p.routing, b);
    const bool valid = code >= 0 && code < p.routing.num_codes;
    const int64_t kept_in = valid ? a.counts[2 * code] : 0;
    const int64_t kept_out = valid ? a.counts[2 * code + 1] : 0;
    const int32_t* perm = valid ? a.out_perm + code * p.out_channels : nullptr;
    const int32_t* in_list = valid ? a.in_list + code * p.in_channels : nullptr;
    const int64_t rows = min_i64(kTile, p.out_channels - o0);   // positions of this tile
    const int64_t cols = min_i64(kTile, a.pixels - p0);         // pixels of this tile
    const int64_t kept_rows = valid ? max_i64(0, min_i64(rows, kept_out - o0)) : 0;
    T* y_b = y + b * p.y_strides[0];

    __syncthreads();  // the previous item's store still reads the tables
    if (threadIdx.x < kTile) {
      const int i = threadIdx.x;
      const int64_t pos = o0 + i;
      int64_t ch = -1;
      if (pos < p.out_channels) ch = valid ? perm[pos] : pos;
      row_c[i] = ch;
      row_y[i] = ch >= 0 ? ch * p.y_strides[1] : 0;
      row_w[i] = (i < kept_rows && ch >= 0) ? ch * p.in_channels * taps : 0;
    } else if (threadIdx.x < 2 * kTile) {
      const int j = threadIdx.x - kTile;
      const int64_t pix = p0 + j;
      if (j < cols) {
        const int64_t ho = pix / p.out_width, wo = pix - ho * p.out_width;
        const int64_t h0 = ho * p.stride_h - p.pad_h, w0 = wo * p.stride_w - p.pad_w;
        col_h[j] = static_cast<int32_t>(h0);
        col_w[j] = static_cast<int32_t>(w0);
        col_x[j] = h0 * p.x_strides[2] + w0 * p.x_strides[3];
        col_y[j] = ho * p.y_strides[2] + wo * p.y_strides[3];
      } else {
        col_h[j] = kOffGrid;
        col_w[j] = kOffGrid;
        col_x[j] = 0;
        col_y[j] = 0;
      }
    }
    __syncthreads();

    if (kept_rows == 0) {  // masked channels (0) or an invalid code (NaN): no reduction
      const T fill = valid ? from_acc<T>(A(0)) : quiet_nan<T>();
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int i = e / kTile, j = e % kTile;
        if (i < rows && j < cols && row_c[i] >= 0) y_b[row_y[i] + col_y[j]] = fill;
      }
      continue;
    }

    // the GEMM: rows = kept outputs of the tile, columns = pixels, l over kept inputs x taps. An
    // empty input plane (the output all padding) reduces nothing: its x may be null, and the
    // staging below reads x_b[0] out of bounds.
    const int64_t L = (p.height == 0 || p.width == 0) ? 0 : kept_in * taps;
    const T* x_b = x + b * p.x_strides[0];
    const T* w_c = weight + code * p.weight_code_stride;
    const bool use_tc = a.use_tc != 0;
    // Every element this thread stages lies in one pixel column j of Bs (kThreads is a multiple
    // of kTile: stage_coords<true>) and one reduction index l of As (a multiple of kBK:
    // stage_coords<false>), so their table entries are read once, here and per slice, not per
    // element.
    static_assert(kThreads % kTile == 0 && kThreads % kBK == 0, "a fixed column / index per thread");
    const int my_j = threadIdx.x % kTile, my_l = threadIdx.x % kBK;
    const int kept_rows32 = static_cast<int>(kept_rows);  // <= kTile
    const int32_t my_h = col_h[my_j], my_w = col_w[my_j];
    const int64_t my_x = col_x[my_j];
    const uint32_t height = static_cast<uint32_t>(p.height), width = static_cast<uint32_t>(p.width);
    TileAccumulator<A> tile;
    tile_zero(tile, use_tc);
    for (int64_t l0 = 0; l0 < L; l0 += kBK) {
      __syncthreads();  // the previous slice's products still read As / Bs / the slice table
      if (threadIdx.x < kBK) {
        const int l = threadIdx.x;
        const int64_t idx = l0 + l;
        if (idx < L) {
          int64_t ii, tap, r, s;
          divide(idx, taps, ii, tap);
          divide(tap, p.kernel_w, r, s);
          const int64_t ic = in_list[ii];
          red_x[l] = ic * p.x_strides[1] + r * p.dilation_h * p.x_strides[2] + s * p.dilation_w * p.x_strides[3];
          red_h[l] = static_cast<int32_t>(r * p.dilation_h);
          red_w[l] = static_cast<int32_t>(s * p.dilation_w);
          red_wt[l] = ic * taps + tap;
        } else {
          red_x[l] = 0;
          red_h[l] = kOffGrid;
          red_w[l] = kOffGrid;
          red_wt[l] = -1;
        }
      }
      __syncthreads();
      // The weights (0 past the kept rows or L): this thread's l is my_l, its column of the
      // weights read once per slice.
      const int64_t my_wt = red_wt[my_l];
      stage_tile_batched<false, 4>(As, split_element(
          [&](int i, int) {
            const bool in = i < kept_rows32 && my_wt >= 0;
            return Staged<T>{w_c[in ? row_w[i] + my_wt : 0], in};
          },
          [&](Staged<T> e, int, int) -> A { return e.in ? to_acc(e.raw) : A(0); }));
      // The input pixels of the taps (0 in the padding): this thread's column is my_j. Each load
      // reads a valid address whatever the bounds (offset 0 outside them) and the bounds select
      // after it lands, so no branch separates the 4 loads in flight.
      stage_tile_batched<true, 4>(Bs, split_element(
          [&](int, int l) {
            const int32_t h = my_h + red_h[l], w = my_w + red_w[l];
            const bool in = static_cast<uint32_t>(h) < height && static_cast<uint32_t>(w) < width;
            return Staged<T>{x_b[in ? my_x + red_x[l] : 0], in};
          },
          [&](Staged<T> e, int, int) -> A { return e.in ? to_acc(e.raw) : A(0); }));
      __syncthreads();
      tile_accumulate(tile, use_tc, As, Bs, ty, tx);
    }
    __syncthreads();
    tile_finish(tile, use_tc, Cs, ty, tx);

    const T* bias_c = bias != nullptr ? bias + code * p.bias_code_stride : nullptr;
    store_tile(tile.acc, ty, tx, rows, cols, [&](int i, int j, A v) {
      if (row_c[i] < 0) return;
      if (i < kept_rows) {
        if (bias_c != nullptr) v += to_acc(bias_c[row_c[i]]);
        y_b[row_y[i] + col_y[j]] = from_acc<T>(v);
      } else {
        y_b[row_y[i] + col_y[j]] = from_acc<T>(A(0));
      }
    });
  }
}

// ---- host side ---------------------------------------------------------------------------------
// The routing plan of p into p's workspace (every conv path starts with it).
inline cudaError_t launch_routing(const MaskedConvParams& p, const RoutingPlan& plan, cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  MMFAST_LAUNCH(masked_routing_kernel<0>, grid_for(p.routing.num_codes), kThreads, 0, stream, p.routing, p.batch,
                p.in_channels, p.out_channels, reinterpret_cast<int32_t*>(ws + plan.counts_offset),
                reinterpret_cast<int32_t*>(ws + plan.in_offset), reinterpret_cast<int32_t*>(ws + plan.perm_offset),
                reinterpret_cast<int32_t*>(ws + plan.used_offset));
  return cudaGetLastError();
}

// masked_conv_kernel over the whole batch (the plan is in the workspace already).
template <class T>
cudaError_t launch_conv_tiled(const MaskedConvParams& p, const RoutingPlan& plan, cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  ConvArgs a;
  a.p = p;
  a.counts = reinterpret_cast<const int32_t*>(ws + plan.counts_offset);
  a.in_list = reinterpret_cast<const int32_t*>(ws + plan.in_offset);
  a.out_perm = reinterpret_cast<const int32_t*>(ws + plan.perm_offset);
  a.pixels = p.out_height * p.out_width;
  a.pixel_tiles = ceil_div(a.pixels, kTile);
  a.channel_tiles = ceil_div(p.out_channels, kTile);
  const bool half = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  a.use_tc = half && tensor_cores_enabled() && compute_capability_major() >= 8 ? 1 : 0;
  MMFAST_LAUNCH(masked_conv_kernel<T>, grid_for(p.batch * a.channel_tiles * a.pixel_tiles), kThreads, 0, stream, a);
  return cudaGetLastError();
}

}  // namespace prunedk
}  // namespace cuda
}  // namespace mmfast
