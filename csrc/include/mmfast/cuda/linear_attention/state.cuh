// The split-N state pass of the linear attention, shared by the forward
// (S = sum phi(k)^T v / N, m = sum phi(k) / N) and by apply_backward
// (dS = sum phi(q)^T (do / z), dm = sum dz phi(q)).
//
//   la_state_kernel         item = (Dk tile, Dv tile, N chunk, b*h), tile index fastest so the
//                           blocks sharing a chunk's tokens run together and hit L2. Writes
//                           the chunk's fp32 partial [S | m] into the workspace, or the final
//                           result directly when there is a single chunk.
//   la_state_reduce_kernel  sums the per-chunk partials in a fixed order (deterministic).
#pragma once

#include "mmfast/cuda/linear_attention/common.cuh"

namespace mmfast {
namespace cuda {
namespace la {

constexpr int64_t kMinChunk = 256;  // minimum tokens per split-N chunk
constexpr int kChunkOversub = 2;    // items: at most kChunkOversub x SM count (see plan_state)
// fp32 sums flush into fp64 every kFlushSlices staged slices (64 tokens; the cp.async kernel:
// kAsyncFlushTokens, 128 tokens): the error of S and m does not grow with N (see WideTile in
// tile_gemm.cuh).
constexpr int kFlushSlices = 2;

struct StateArgs : Dims {
  TokenTensor k;        // phi(k) side (q for apply_backward)
  TokenTensor v;        // v side (grad_out for apply_backward)
  const void* scalars;  // nullptr (forward) or (z, dz) per token: [bh][N][2] accumulator type
  void* out_state;      // partials [bh][nchunks][Dk*Dv + Dk], or final state when nchunks == 1
  void* out_mean;       // final mean when nchunks == 1 (unused otherwise)
  int64_t chunk, nchunks;
  double div;           // divisor of the final result when nchunks == 1 (N or 1)
};

// One work item of the state pass.
struct StateItem {
  int64_t bh, chunk, t_begin, t_end;
  int k0, v0;    // first Dk row and Dv column of the tile
  bool do_mean;  // this thread accumulates m (tile_v == 0, first column of threads)
};

// Index: the type of the decoding divisions; uint32_t where the launch guarantees fewer than
// 2^32 items (a 64-bit division is a call of about 70 instructions).
template <class Index = int64_t>
__device__ __forceinline__ StateItem state_item(const StateArgs& a, int64_t item, int tx, int width = kTile) {
  const Index tiles = static_cast<Index>(a.tiles_k) * static_cast<Index>(a.tiles_v);
  const Index index = static_cast<Index>(item), nchunks = static_cast<Index>(a.nchunks);
  const int64_t tile = index % tiles;
  const Index rest = index / tiles;
  StateItem it;
  it.chunk = rest % nchunks;
  it.bh = rest / nchunks;
  it.k0 = static_cast<int>(tile / a.tiles_v) * width;
  it.v0 = static_cast<int>(tile % a.tiles_v) * width;
  it.t_begin = it.chunk * a.chunk;
  it.t_end = min_i64(it.t_begin + a.chunk, a.N);
  it.do_mean = it.v0 == 0 && tx == 0;
  return it;
}

// zsh[l], wsh[l] for the kBK tokens from t0: 1 and 1 (forward) or z_t and dz_t z_t (apply_backward:
// the staged phi(q) carries 1 / z_t, so m's weight carries z_t back); w = 0 past the chunk.
// Surrounded by barriers.
template <class A>
__device__ __forceinline__ void stage_token_scalars(const StateArgs& a, const StateItem& it, int64_t t0, A* zsh,
                                                    A* wsh) {
  __syncthreads();  // the previous step's readers are done with the shared tiles
  if (threadIdx.x < kBK) {
    const int64_t t = t0 + threadIdx.x;
    A z = A(1), w = A(1);
    if (t < it.t_end && a.scalars != nullptr) {
      const A* s = static_cast<const A*>(a.scalars) + (it.bh * a.N + t) * 2;
      z = s[0];
      w = s[1] * z;
    }
    zsh[threadIdx.x] = z;
    wsh[threadIdx.x] = (t < it.t_end) ? w : A(0);
  }
  __syncthreads();
}

// As[l][x] = phi(k_{t0+l})[k0+x] / z_l, Bs[l][x] = v_{t0+l}[v0+x], zero past the chunk and dims:
// the 1 / z goes into the fp32 operand the tensor cores split as hi + lo, so Bs keeps the
// tokens' values, exact in tf32 (as the cp.async pass puts it into phi(q) / z). raw_k(x, l) /
// raw_v(x, l) read the raw elements from global memory; they are only called inside the bounds.
template <class C, class A, class RawK, class RawV>
__device__ __forceinline__ void stage_state_slice(const StateArgs& a, const StateItem& it, int64_t t0, RawK raw_k,
                                                  RawV raw_v, const A* zsh, A* As, A* Bs) {
  using T = typename C::T;
  const auto k_in = [&](int x, int l) { return t0 + l < it.t_end && it.k0 + x < a.dk; };
  const auto v_in = [&](int x, int l) { return t0 + l < it.t_end && it.v0 + x < a.dv; };
  stage_tile_pair<true, true>(
      As, split_element([&](int x, int l) { return k_in(x, l) ? raw_k(x, l) : from_acc<T>(A(0)); },
                        [&](T raw, int x, int l) {
                          if (!k_in(x, l)) return A(0);
                          const A p = phi<C::fm>(to_acc(raw));
                          return a.scalars == nullptr ? p : p / zsh[l];  // forward: z = 1
                        }),
      Bs, split_element([&](int x, int l) { return v_in(x, l) ? raw_v(x, l) : from_acc<T>(A(0)); },
                        [&](T raw, int x, int l) { return v_in(x, l) ? to_acc(raw) : A(0); }));
  __syncthreads();
}

// msum[i] += sum_l phi(k)[ty*4 + i][l] * w_l over the staged slice.
template <class A>
__device__ __forceinline__ void accumulate_mean(A (&msum)[4], const A* As, const A* wsh, int ty) {
#pragma unroll 4
  for (int l = 0; l < kBK; ++l) {
    A x[4];
    load4(As + l * kLd + ty * 4, x);
    const A w = wsh[l];
#pragma unroll
    for (int i = 0; i < 4; ++i) msum[i] += x[i] * w;
  }
}

// mwide += msum, msum = 0 for fp32 sums (fp64 sums need no flushing).
template <class A>
__device__ __forceinline__ void flush_mean(A (&msum)[4], double (&mwide)[4]) {
  if constexpr (WideTile<A>::kEnabled) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      mwide[i] += msum[i];
      msum[i] = A(0);
    }
  }
}

// The tile (and, for do_mean threads, m) divided by div into the final state, or unscaled
// into the chunk's partial.
// Where an item's S and m go: the final state and mean (divided by div), or the chunk's
// partial (div 1).
template <class A> struct StateOut {
  A* S;
  A* M;
  A div;
};
template <class A> __device__ __forceinline__ StateOut<A> state_out(const StateArgs& a, const StateItem& it) {
  const int64_t dkdv = static_cast<int64_t>(a.dk) * a.dv;
  const bool final = a.nchunks == 1;
  StateOut<A> o;
  o.S = static_cast<A*>(a.out_state) + (final ? it.bh * dkdv : (it.bh * a.nchunks + it.chunk) * (dkdv + a.dk));
  o.M = final ? static_cast<A*>(a.out_mean) + it.bh * a.dk : o.S + dkdv;
  o.div = final ? static_cast<A>(a.div) : A(1);
  return o;
}

template <class A>
__device__ __forceinline__ void store_state_tile(const StateArgs& a, const StateItem& it, const A (&acc)[4][4],
                                                 const A (&msum)[4], int ty, int tx) {
  const StateOut<A> o = state_out<A>(a, it);
  A* const S = o.S;
  A* const M = o.M;
  const A div = o.div;
  store_tile(acc, ty, tx, a.dk - it.k0, a.dv - it.v0,
             [&](int i, int j, A value) { S[static_cast<int64_t>(it.k0 + i) * a.dv + it.v0 + j] = value / div; });
  if (!it.do_mean) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = it.k0 + ty * 4 + i;
    if (r < a.dk) M[r] = msum[i] / div;
  }
}

// After an item's last slice: the wide sums rounded once, the tile out of the fragments
// (through Cs, with barriers, on the tensor-core path), then stored.
template <class A>
__device__ __forceinline__ void finish_state_item(const StateArgs& a, const StateItem& it, TileAccumulator<A>& tile,
                                                  WideTile<A>& wide, A (&msum)[4], double (&mwide)[4], bool use_tc,
                                                  A* Cs, int ty, int tx) {
  tile_finish_wide(tile, wide, use_tc, Cs, ty, tx);
  flush_mean(msum, mwide);
#pragma unroll
  for (int i = 0; i < 4; ++i) msum[i] = WideTile<A>::kEnabled ? static_cast<A>(mwide[i]) : msum[i];
  store_state_tile(a, it, tile.acc, msum, ty, tx);
}

// Accumulates S_tile[i][j] = sum_t phi(k_t)[k0+i] / z_t * v_t[v0+j] and (tile_v == 0 only)
// m[k0+i] = sum_t phi(k_t)[k0+i] / z_t * w_t, with z_t = w_t = 1 (forward) or z_t, w_t =
// dz_t z_t (apply_backward).
template <class C>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<C>) la_state_kernel(StateArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  __shared__ A zsh[kBK];
  __shared__ A wsh[kBK];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  constexpr bool use_tc = C::tc;
  const int64_t items = static_cast<int64_t>(a.tiles_k) * a.tiles_v * a.nchunks * a.bh;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const StateItem it = state_item(a, item, tx);
    const TokenView<const T> kk = token_view<const T>(a.k, it.bh, a.heads);
    const TokenView<const T> vv = token_view<const T>(a.v, it.bh, a.heads);
    TileAccumulator<A> tile;
    WideTile<A> wide;
    tile_zero(tile, use_tc);
    wide_zero(wide);
    A msum[4] = {A(0), A(0), A(0), A(0)};
    double mwide[4] = {0.0, 0.0, 0.0, 0.0};
    int slice = 0;
    for (int64_t t0 = it.t_begin; t0 < it.t_end; t0 += kBK) {
      stage_token_scalars(a, it, t0, zsh, wsh);
      stage_state_slice<C>(
          a, it, t0, [&](int x, int l) { return kk.row(t0 + l)[it.k0 + x]; },
          [&](int x, int l) { return vv.row(t0 + l)[it.v0 + x]; }, zsh, As, Bs);
      // phi(k) (phi(q) / z) split: S (dS) as accurate as m (dm), which sums the same staged
      // operand in fp32 (the backward's u + dz m and v dS^T + dm cancel for identical tokens);
      // v (do) is exact
      tile_accumulate<kSplitCancellingSums, false>(tile, use_tc, As, Bs, ty, tx);
      if (it.do_mean) accumulate_mean(msum, As, wsh, ty);
      if (++slice % kFlushSlices == 0) {
        tile_flush(tile, wide, use_tc);
        flush_mean(msum, mwide);
      }
    }
    finish_state_item(a, it, tile, wide, msum, mwide, use_tc, Cs, ty, tx);
  }
}

// ---- the asynchronous tensor-core variant (16-bit inputs, 16-byte aligned rows, sm_80+) ------
// The same sums as la_state_kernel on a persistent grid (the resident blocks only): each block
// takes a contiguous range of items, whose raw k / v slices (AsyncStateTile::kSliceTokens tokens:
// fixed costs per slice, the barriers, the wait and the copies' bookkeeping, are paid per 16-24 KB) travel
// by cp.async through one ring of S slices (AsyncStateTile::kStages), across item boundaries
// (no pipeline refill per item). Each wait leaves S - 2 slices pending and the next is issued
// right after, so S - 1 are in flight while the landed one is prepared and multiplied: at least
// 32 KB per block of 16-bit inputs (W = 48: 2 x 24 KB, 64: 2 x 16 KB, 80: 2 x 20 KB); Little's
// law at 700-900 ns of loaded DRAM latency asks about 23-30 KB per SM for an H200's 4.3 TB/s,
// all reads here (docs/linear-attention-performance.md).
//
// The operands stay 16-bit in shared memory and reach the tensor cores through ldmatrix +
// mma.sync.m16n8k16 (tile_gemm.cuh), fp32 sums flushed into fp64 every kAsyncFlushTokens tokens:
//  - a landed k slice becomes phi(k) in place (phi_fast: exp by MUFU.EX2), split as hi + lo
//    (split_pair; lo into k_lo) and multiplied twice, so S and m keep about 16 mantissa bits of
//    phi(k) for bf16 (the TF32 products of la_state_kernel keep 11);
//  - v is multiplied as copied. apply_backward's sums dS = sum phi(q)^T (do / z) and
//    dm = sum w phi(q) run as sum (phi(q) / z)^T do and sum (phi(q) / z) (w z): the fp32
//    factor 1 / z goes into the split A operand, do stays exact;
//  - m is one more product per step: B's columns 0 and 1 are w z split as hi + lo (1 and 0 in
//    the forward), so m = D[:, 0] + D[:, 1].
// The item's tile is W x W (Dk rows x Dv columns), W sized to the head dims (state_tile_width):
// the dims past Dk and Dv cost copies and products, so D = 40 takes 48-wide tiles, D = 80 and
// 160 80-wide ones, where 64-wide ones did 1.78x, 2.56x and 1.44x their products (and at D = 80
// and 160 re-read k and v per Dk / Dv tile, 2 x 2 and 3 x 3 times where 80 reads 1 and 2 x 2).
constexpr int kAsyncStages = 4;        // ring stages
constexpr int kSliceTokens = 64;       // tokens of k and v per slice of the ring, W >= 64 (16 KB of bf16 at W = 64)
constexpr int kNarrowSliceTokens = 128;  // W = 48: 24 KB, and whole rows of chunks in 3 passes of the threads
constexpr int kAsyncFlushTokens = 128;   // fp32 sums flushed into fp64 every 128 tokens

// Warp w < kWarps owns the 16 Dk rows (w % kRowGroups) * 16 and kPairsPerWarp pairs of 8-column
// n-tiles of Dv from column (w / kRowGroups) * 16 kPairsPerWarp: W = 64 takes all 8 warps (16 x
// 32 each), 48 three (16 x 48), 80 five (16 x 80). A warp's A fragments (phi(k) hi and lo, the
// costly loads) serve all its n-tiles, so fewer, wider warps issue fewer instructions per slice;
// the other warps copy and prepare only. The per-slice costs (the barriers and waits, a thread's
// pass over its chunks) are paid per 16-24 KB: a narrow tile takes longer slices.
template <int W> struct AsyncStateTile {
  static_assert(W % 16 == 0, "whole 16-row m-tiles and 16-column pairs of n-tiles");
  static constexpr int kSliceTokens = W <= 48 ? kNarrowSliceTokens : ::mmfast::cuda::la::kSliceTokens;
  static constexpr int kFlushSlices = kAsyncFlushTokens / kSliceTokens;  // slices per fp64 flush
  static_assert(kSliceTokens % 16 == 0 && kAsyncFlushTokens % kSliceTokens == 0, "whole mma steps and flush groups");
  static constexpr int kRowGroups = W / 16;
  static constexpr int kPairs = W / 16;
  static constexpr int kColGroups = 2 * kRowGroups <= kThreads / 32 && kPairs % 2 == 0 ? 2 : 1;
  static constexpr int kPairsPerWarp = kPairs / kColGroups;
  static constexpr int kNTiles = 2 * kPairsPerWarp;
  static constexpr int kWarps = kRowGroups * kColGroups;
  static constexpr int kStages = kAsyncStages;
  static_assert(kWarps <= kThreads / 32, "the multiplying warps exist");
};

template <class T, int W> using MmaSlice = RawTile<T, AsyncStateTile<W>::kSliceTokens, W, kRawPad>;

template <class T, int W> struct AsyncStateShared {
  static constexpr int kTokens = AsyncStateTile<W>::kSliceTokens;
  MmaSlice<T, W> k[AsyncStateTile<W>::kStages], v[AsyncStateTile<W>::kStages];
  MmaSlice<T, W> k_lo;                           // phi(k) - hi of the slice being multiplied
  float z[2][kTokens], w[2][kTokens];  // apply_backward's per-token 1 / z and w z, by slice parity
};
// Its bytes for 16-bit inputs: W = 64 82 KB (fits sm_86 / sm_89's 99 KB per block), 48 128 KB
// and 80 100 KB (sm_80 and sm_90 only: state_tile_width checks).
template <int W> constexpr size_t kAsyncStateSmem = sizeof(AsyncStateShared<__half, W>);

// One warp's sums of an item: S (16 rows x NT 8-column n-tiles) and the m product (16 x 8).
template <class V, int NT> struct WarpStateSums {
  V s[NT][4];
  V m[4];
};
template <class V, int NT> __device__ __forceinline__ void zero_sums(WarpStateSums<V, NT>& x) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x.m[i] = V(0);
#pragma unroll
    for (int n = 0; n < NT; ++n) x.s[n][i] = V(0);
  }
}
// into += x (fp32 adds rounded to nearest, or into fp64).
template <class V, int NT>
__device__ __forceinline__ void add_sums(WarpStateSums<V, NT>& into, const WarpStateSums<float, NT>& x) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    into.m[i] += x.m[i];
#pragma unroll
    for (int n = 0; n < NT; ++n) into.s[n][i] += x.s[n][i];
  }
}
template <int NT>
__device__ __forceinline__ void flush_sums(WarpStateSums<float, NT>& sums, WarpStateSums<double, NT>& wide) {
  add_sums(wide, sums);
  zero_sums(sums);
}

// 1 / z_t and w_t z_t / operand_balance (B's share) of the slice's Tokens tokens (apply_backward
// only): 1 and 0 past the chunk.
template <class T, int Tokens>
__device__ __forceinline__ void load_slice_scalars(const StateArgs& a, const StateItem& it, int64_t t0,
                                                   float* inv_z, float* wz) {
  static_assert(Tokens <= kThreads, "a thread per token");
  if (threadIdx.x >= Tokens) return;
  const int64_t t = t0 + threadIdx.x;
  float inv = 1.0f, product = 0.0f;
  if (t < it.t_end) {
    const float* s = static_cast<const float*>(a.scalars) + (it.bh * a.N + t) * 2;
    inv = 1.0f / s[0];
    product = s[1] * s[0] / operand_balance<T>(inv);
  }
  inv_z[threadIdx.x] = inv;
  wz[threadIdx.x] = product;
}

// The landed k slice in `stage` made into the A operand, 16-byte chunks (the ones this thread
// copied): phi(k) (times 1 / z when Scaled) split in place (hi) and into k_lo, zero past the
// chunk's rows or Dk (kcols, a multiple of 8). Scaled fp16: 1 / z balanced with the v slice's
// row (do), scaled in place (operand_balance).
template <class C, bool Scaled, int W>
__device__ __forceinline__ void prepare_state_slice(AsyncStateShared<typename C::T, W>& sh, int stage, int64_t rows,
                                                    int kcols, const float* inv_z) {
  using Chunk = RawChunk<MmaSlice<typename C::T, W>>;
#pragma unroll
  for (int k = 0; k < Chunk::kPerThread; ++k) {
    const Chunk c(k);
    if (!c.in_tile) continue;  // warp-uniform: the ragged last pass of W = 80
    float scale = 1.0f;
    if constexpr (Scaled) {
      const float balance = operand_balance<typename C::T>(inv_z[c.row]);
      scale = inv_z[c.row] * balance;
      if (balance != 1.0f) scale_chunk<typename C::T>(reinterpret_cast<uint4*>(&sh.v[stage].v[c.row][c.col]),
                                                      1.0f / balance);
    }
    phi_chunk<C>(reinterpret_cast<uint4*>(&sh.k[stage].v[c.row][c.col]),
                 reinterpret_cast<uint4*>(&sh.k_lo.v[c.row][c.col]), c.row < rows && c.col < kcols, scale);
  }
}

// B of the m product at the 16 tokens from kk: columns 0 and 1 are the hi and lo parts of w
// (w z for apply_backward, whose A carries 1 / z; 1 and 0 for the forward), the others 0.
template <class T, bool Scaled>
__device__ __forceinline__ void mean_operand(uint32_t (&b)[2], const float* w, int kk, int lane) {
  const int g = lane / 4, t = lane % 4;
  if constexpr (!Scaled) {
    b[0] = b[1] = g == 0 ? pack_pair<T>(1.0f, 1.0f) : 0u;
    return;
  }
  uint32_t hi[2], lo[2];
  split_pair<T>(w[kk + 2 * t], w[kk + 2 * t + 1], hi[0], lo[0]);
  split_pair<T>(w[kk + 2 * t + 8], w[kk + 2 * t + 9], hi[1], lo[1]);
#pragma unroll
  for (int i = 0; i < 2; ++i) b[i] = g == 0 ? hi[i] : g == 1 ? lo[i] : 0u;
}

// sums += this warp's products over Tokens tokens of A^T = a_hi + a_lo (tokens x Dk rows, the
// warp's 16 from warp_row) and B (tokens x Dv columns, the warp's 16 NPairs from warp_col), and
// the m product with w (mean_operand). Shared by the state pass and the apply_backward tile
// kernel that sums dS and dm itself (backward_async.cuh).
template <class T, bool Scaled, int Tokens, int NPairs, int Ld>
__device__ __forceinline__ void multiply_weighted_sums(WarpStateSums<float, 2 * NPairs>& sums, const T (*a_hi)[Ld],
                                                       const T (*a_lo)[Ld], const T (*b)[Ld], const float* w,
                                                       int warp_row, int warp_col) {
  const int lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
#pragma unroll
  for (int kk = 0; kk < Tokens; kk += 16) {
    // A = phi(k)^T (Dk x tokens): matrix j is Dk rows + 8 (j % 2), tokens + 8 (j / 2).
    const int a_token = kk + 8 * (j / 2) + r, a_dk = warp_row + 8 * (j % 2);
    uint32_t a_hi_frag[4], a_lo_frag[4], bw[2];
    ldmatrix_x4_trans(a_hi_frag, &a_hi[a_token][a_dk]);
    ldmatrix_x4_trans(a_lo_frag, &a_lo[a_token][a_dk]);
    mean_operand<T, Scaled>(bw, w, kk, lane);
    mma_m16n8k16<T>(sums.m, a_hi_frag, bw);
    mma_m16n8k16<T>(sums.m, a_lo_frag, bw);
#pragma unroll
    for (int p = 0; p < NPairs; ++p) {
      // B = v (tokens x Dv): matrix j is tokens + 8 (j % 2), Dv columns + 8 (j / 2) of n-tiles 2p, 2p+1.
      uint32_t b_frag[4];
      ldmatrix_x4_trans(b_frag, &b[kk + 8 * (j % 2) + r][warp_col + 16 * p + 8 * (j / 2)]);
      const uint32_t b0[2] = {b_frag[0], b_frag[1]}, b1[2] = {b_frag[2], b_frag[3]};
      mma_m16n8k16<T>(sums.s[2 * p], a_hi_frag, b0);
      mma_m16n8k16<T>(sums.s[2 * p], a_lo_frag, b0);
      mma_m16n8k16<T>(sums.s[2 * p + 1], a_hi_frag, b1);
      mma_m16n8k16<T>(sums.s[2 * p + 1], a_lo_frag, b1);
    }
  }
}

// sums += this warp's products over the prepared slice (its tokens / 16 steps of 16 tokens).
template <class C, bool Scaled, int W>
__device__ __forceinline__ void multiply_state_slice(WarpStateSums<float, AsyncStateTile<W>::kNTiles>& sums,
                                                     const AsyncStateShared<typename C::T, W>& sh, int stage,
                                                     const float* w, int warp_row, int warp_col) {
  multiply_weighted_sums<typename C::T, Scaled, AsyncStateTile<W>::kSliceTokens, AsyncStateTile<W>::kPairsPerWarp>(
      sums, sh.k[stage].v, sh.k_lo.v, sh.v[stage].v, w, warp_row, warp_col);
}

// The warp's part of the item's S, and of m (the warps of column group 0, when the item holds
// Dv tile 0; column 0 + column 1 of the m product), as the final state or the chunk's partial:
// s(n, i) and m(i) give its fragments' totals (fp64).
template <class A, int NT, class TotalS, class TotalM>
__device__ __forceinline__ void store_warp_sums(const StateArgs& a, const StateItem& it, TotalS s, TotalM m,
                                                int warp_row, int warp_col) {
  const StateOut<A> o = state_out<A>(a, it);
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = it.k0 + warp_row + g + 8 * (i / 2), col = it.v0 + warp_col + 8 * n + 2 * t + i % 2;
      if (row < a.dk && col < a.dv) o.S[static_cast<int64_t>(row) * a.dv + col] = static_cast<A>(s(n, i)) / o.div;
    }
  if (it.v0 != 0 || warp_col != 0 || t != 0) return;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = it.k0 + warp_row + g + 8 * h;
    if (row < a.dk) o.M[row] = static_cast<A>(m(2 * h) + m(2 * h + 1)) / o.div;
  }
}
template <class A, int NT>
__device__ __forceinline__ void store_warp_state(const StateArgs& a, const StateItem& it,
                                                 const WarpStateSums<float, NT>& sums,
                                                 const WarpStateSums<double, NT>& wide, int warp_row, int warp_col) {
  store_warp_sums<A, NT>(
      a, it, [&](int n, int i) { return wide.s[n][i] + sums.s[n][i]; }, [&](int i) { return wide.m[i] + sums.m[i]; },
      warp_row, warp_col);
}

template <int W> __device__ __forceinline__ int64_t item_slices(const StateItem& it) {
  return ceil_div(it.t_end - it.t_begin, AsyncStateTile<W>::kSliceTokens);
}

// The item after `it` in launch order (Dv tile fastest, then Dk tile, N chunk, b*h), counted
// instead of decoded: the cp.async kernel walks a contiguous range, so only its first item pays
// state_item's divisions. do_mean (the register-staged kernel's) is not kept.
template <int W> __device__ __forceinline__ void step_state_item(const StateArgs& a, StateItem& it) {
  it.v0 += W;
  if (it.v0 < a.dv) return;
  it.v0 = 0;
  it.k0 += W;
  if (it.k0 < a.dk) return;
  it.k0 = 0;
  if (++it.chunk == a.nchunks) {
    it.chunk = 0;
    ++it.bh;
  }
  it.t_begin = it.chunk * a.chunk;
  it.t_end = min_i64(it.t_begin + a.chunk, a.N);
}

// The next slice to copy, walking a block's items in order. It keeps this thread's source in k
// and v (of its first chunk when the chunks per row divide the threads, W = 64: the k-th lies
// k * kRowsPerPass rows below; else of the slice's first element, each chunk adding its own
// offset), steps it a slice per issue, and counts items and heads, so neither a slice nor an
// item pays a division.
template <class T, int W> struct StateCursor {
  using Chunk = RawChunk<MmaSlice<T, W>>;
  int64_t item, last;
  int64_t rows;  // the item's tokens from the next slice on
  StateItem it;
  HeadIndex head;  // it.bh
  const T *k_src, *v_src;
  __device__ __forceinline__ void start(const StateArgs& a, int64_t first, int64_t end) {
    item = first;
    last = end;
    it = state_item<uint32_t>(a, first < end ? first : 0, 0, W);
    head.start(it.bh, a.heads);
    begin_item(a);
  }
  __device__ __forceinline__ void begin_item(const StateArgs& a) {
    rows = it.t_end - it.t_begin;
    k_src = head.view<const T>(a.k).row(it.t_begin + Chunk::kept_row()) + it.k0 + Chunk::kept_col();
    v_src = head.view<const T>(a.v).row(it.t_begin + Chunk::kept_row()) + it.v0 + Chunk::kept_col();
  }
  // Starts this thread's copies of the next slice into k, v and moves on.
  __device__ __forceinline__ void issue(const StateArgs& a, MmaSlice<T, W>& k, MmaSlice<T, W>& v) {
#pragma unroll
    for (int j = 0; j < Chunk::kPerThread; ++j) {
      const Chunk c(j);
      c.issue(k, Chunk::chunk_source(k_src, j, a.k.stride_n), rows, a.dk - it.k0, static_cast<const T*>(a.k.data));
      c.issue(v, Chunk::chunk_source(v_src, j, a.v.stride_n), rows, a.dv - it.v0, static_cast<const T*>(a.v.data));
    }
    constexpr int kTokens = AsyncStateTile<W>::kSliceTokens;
    rows -= kTokens;
    k_src += kTokens * a.k.stride_n;
    v_src += kTokens * a.v.stride_n;
    if (rows > 0) return;
    ++item;
    const int64_t bh = it.bh;
    step_state_item<W>(a, it);
    if (it.bh != bh) head.next(a.heads);
    begin_item(a);
  }
};

// Scaled: the apply_backward sums (a.scalars holds z and w per token); else the forward's.
// W: the tile width (AsyncStateTile); a.tiles_k / a.tiles_v count W-wide tiles.
template <class C, bool Scaled, int W>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<C>) la_state_async_kernel(StateArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  using Tile = AsyncStateTile<W>;
  static_assert(C::tc && kSixteenBit<T>, "the tensor-core variant of 16-bit inputs");
  MMFAST_DYNAMIC_SHARED(smem);
  auto& sh = *reinterpret_cast<AsyncStateShared<T, W>*>(smem);
  constexpr int S = Tile::kStages;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const bool multiplies = Tile::kWarps == kThreads / 32 || warp < Tile::kWarps;  // warp-uniform
  const int warp_row = (warp % Tile::kRowGroups) * 16;
  const int warp_col = (warp / Tile::kRowGroups) * Tile::kPairsPerWarp * 16;
  const int64_t items = static_cast<int64_t>(a.tiles_k) * a.tiles_v * a.nchunks * a.bh;
  const int64_t per_block = ceil_div(items, gridDim.x);
  const int64_t first = blockIdx.x * per_block, last = min_i64(items, first + per_block);
  // Slices are copied and consumed in the same order; the block's g-th uses stage g % S.
  // One commit group per slice, empty past the last item, so every wait count stays uniform.
  StateCursor<T, W> next;
  next.start(a, first, last);
  int issued_stage = 0;  // issued slices mod S
  const auto issue_next = [&]() {
    if (next.item < last) next.issue(a, sh.k[issued_stage], sh.v[issued_stage]);
    cp_async_commit();
    issued_stage = issued_stage + 1 == S ? 0 : issued_stage + 1;
  };
  for (int s = 0; s < S - 1; ++s) issue_next();
  int stage = 0;   // consumed slices mod S
  int parity = 0;  // consumed slices mod 2: the scalars' buffer
  StateItem it = state_item<uint32_t>(a, first < last ? first : 0, 0, W);
  for (int64_t item = first; item < last; ++item, step_state_item<W>(a, it)) {
    WarpStateSums<float, Tile::kNTiles> sums;
    WarpStateSums<double, Tile::kNTiles> wide;
    zero_sums(sums);
    zero_sums(wide);
    const int64_t slices = item_slices<W>(it);
    // Groups of kFlushSlices slices, flushed after each: the slice loop holds the per-slice work only.
    for (int64_t s0 = 0; s0 < slices; s0 += Tile::kFlushSlices) {
      const int group = static_cast<int>(min_i64(Tile::kFlushSlices, slices - s0));
#pragma unroll 1
      for (int g = 0; g < group; ++g) {
        const int64_t t0 = it.t_begin + (s0 + g) * Tile::kSliceTokens;
        cp_async_wait<S - 2>();  // this thread's copies of this slice landed
        if constexpr (Scaled) load_slice_scalars<T, Tile::kSliceTokens>(a, it, t0, sh.z[parity], sh.w[parity]);
        __syncthreads();  // everyone's landed; the previous slice's readers are done
        issue_next();     // into the previous slice's stage
        prepare_state_slice<C, Scaled, W>(sh, stage, it.t_end - t0, a.dk - it.k0, sh.z[parity]);
        __syncthreads();
        if (multiplies) multiply_state_slice<C, Scaled, W>(sums, sh, stage, sh.w[parity], warp_row, warp_col);
        stage = stage + 1 == S ? 0 : stage + 1;
        parity ^= 1;
      }
      flush_sums(sums, wide);
    }
    if (multiplies) store_warp_state<A>(a, it, sums, wide, warp_row, warp_col);
  }
}

// The width of the cp.async state kernel's tiles for Dk x Dv (tile_width): 48 and 80 only where
// their rings fit a block's shared memory (not on sm_86 / sm_89).
inline int state_tile_width(int64_t dk, int64_t dv, size_t shared_per_block) {
  return tile_width(dk, dv, [&](int w) { return (w == 48 ? kAsyncStateSmem<48> : kAsyncStateSmem<80>) <= shared_per_block; });
}

// Tokens per slice of the state kernel of tile width W (chunks of the split hold whole slices).
inline int slice_tokens(int width) {
  return width == 48 ? AsyncStateTile<48>::kSliceTokens : width == 80 ? AsyncStateTile<80>::kSliceTokens
                                                                       : AsyncStateTile<64>::kSliceTokens;
}

// The asynchronous kernel runs for 16-bit inputs on the tensor-core path whose rows cp.async
// can copy whole, with fewer than 2^32 items (its 32-bit item decoding), when its code was
// compiled for sm_80+ (not JIT-compiled from older PTX).
template <class C, int W>
bool use_async_state(const TokenTensor& k, const TokenTensor& v, const Dims& d, int64_t items) {
  using T = typename C::T;
  if constexpr (!C::tc) {
    return false;
  } else {
    return async_copy_enabled() && items <= static_cast<int64_t>(UINT32_MAX) &&
           rows_16b_aligned(k, d.dk, sizeof(T)) && rows_16b_aligned(v, d.dv, sizeof(T)) &&
           kAsyncStateSmem<W> <= max_shared_per_block() && compiled_for(&la_state_async_kernel<C, false, W>, 80);
  }
}

// Sums the nchunks partials of every (bh, element) in chunk order, in fp64, and divides by div.
template <class A>
__global__ void __launch_bounds__(kThreads)
    la_state_reduce_kernel(const A* __restrict__ partials, A* __restrict__ state, A* __restrict__ mean, int64_t bh,
                           int64_t nchunks, int dk, int dv, double div) {
  const int64_t dkdv = static_cast<int64_t>(dk) * dv;
  const int64_t E = dkdv + dk;
  const int64_t total = bh * E;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / E, r = e - b * E;
    const A* p = partials + b * nchunks * E + r;
    double sum = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) sum += p[c * E];
    const A s = static_cast<A>(sum / div);
    if (r < dkdv)
      state[b * dkdv + r] = s;
    else
      mean[b * dk + (r - dkdv)] = s;
  }
}

// ---- host side ------------------------------------------------------------------------------
struct StatePlan {
  int width = kTile;                         // the cp.async kernel's tile width (state_tile_width)
  int64_t tiles_k = 1, tiles_v = 1, nchunks = 1, chunk = 1;  // tiles: width-wide
  size_t partial_bytes = 0;  // 0 when nchunks == 1 (the kernel writes the final state)
};

inline StatePlan plan_state(const LinearAttentionParams& p, int sms) {
  StatePlan s;
  const int64_t bh = p.bh(), N = p.seqlen;
  s.width = state_tile_width(p.dim_k, p.dim_v, max_shared_per_block());
  s.tiles_k = ceil_div(p.dim_k, s.width);
  s.tiles_v = ceil_div(p.dim_v, s.width);
  const int64_t base = bh * s.tiles_k * s.tiles_v;
  const int64_t target = static_cast<int64_t>(kChunkOversub) * (sms > 0 ? sms : 1);
  const int64_t dmax = max_i64(p.dim_k, p.dim_v);
  const int64_t min_chunk = max_i64(kMinChunk, 2 * dmax);  // keep partial traffic below token traffic
  // Split N into as many chunks as keep the items within the target, not past it: the cp.async
  // kernel's persistent grid (one block per SM) gives each block ceil(items / grid) items, so
  // one item past a multiple of the grid costs a whole round. Each chunk's partial [S | m] is
  // written and read back (at D = 64 and 320-token chunks, 20% more bytes than its tokens).
  const int64_t want = max_i64(1, min_i64(target / base, ceil_div(N, min_chunk)));
  s.chunk = round_up(ceil_div(N, want), slice_tokens(s.width));  // whole slices of both state kernels
  s.nchunks = ceil_div(N, s.chunk);
  if (s.nchunks > 1)
    s.partial_bytes = static_cast<size_t>(bh * s.nchunks * (p.dim_k * p.dim_v + p.dim_k)) * accumulator_bytes(p.dtype);
  return s;
}

template <class C, bool Scaled, int W>
cudaError_t launch_state_async(StateArgs a, const StatePlan& plan, cudaStream_t stream, bool& launched) {
  constexpr size_t smem = kAsyncStateSmem<W>;  // > 48 KB: opt in
  static_assert(W != 64 || smem <= 99 * 1024, "the W = 64 ring fits sm_86 / sm_89 (99 KB of shared memory per block)");
  static_assert(smem <= 163 * 1024, "every ring fits sm_80 (163 KB per block) and sm_90 (227 KB)");
  a.tiles_k = static_cast<int>(plan.tiles_k);
  a.tiles_v = static_cast<int>(plan.tiles_v);
  const int64_t items = plan.tiles_k * plan.tiles_v * plan.nchunks * a.bh;
  unsigned grid = 0;  // no block resident: the register-staged kernel instead (launched stays false)
  if (!fits_persistent_grid(&la_state_async_kernel<C, Scaled, W>, kThreads, smem, items, grid)) return cudaSuccess;
  launched = true;
  MMFAST_LAUNCH((la_state_async_kernel<C, Scaled, W>), grid, kThreads, smem, stream, a);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_state_pass(const TokenTensor& k, const TokenTensor& v, const void* scalars, void* state, void* mean,
                              const LinearAttentionParams& p, const StatePlan& plan, void* workspace, double div,
                              cudaStream_t stream) {
  using A = acc_t<T>;
  StateArgs a;
  static_cast<Dims&>(a) = make_dims(p);  // kTile-wide tiles: the register-staged kernel's
  a.k = k;
  a.v = v;
  a.scalars = scalars;
  a.out_state = plan.nchunks == 1 ? state : workspace;
  a.out_mean = mean;
  a.chunk = plan.chunk;
  a.nchunks = plan.nchunks;
  a.div = div;
  cudaError_t err = dispatch_config<T>(a, [&](auto config) {
    using C = decltype(config);
    if constexpr (C::tc) {
      bool launched = false;
      const cudaError_t async_err = dispatch_tile_width(plan.width, [&](auto width) -> cudaError_t {
        constexpr int W = decltype(width)::value;
        const int64_t items = plan.tiles_k * plan.tiles_v * plan.nchunks * a.bh;
        if (!use_async_state<C, W>(k, v, a, items)) return cudaSuccess;
        return scalars == nullptr ? launch_state_async<C, false, W>(a, plan, stream, launched)
                                  : launch_state_async<C, true, W>(a, plan, stream, launched);
      });
      if (async_err != cudaSuccess || launched) return async_err;
    }
    const int64_t items = static_cast<int64_t>(a.tiles_k) * a.tiles_v * plan.nchunks * a.bh;
    MMFAST_LAUNCH(la_state_kernel<C>, grid_for(items), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || plan.nchunks == 1) return err;
  const int64_t total = a.bh * (p.dim_k * p.dim_v + p.dim_k);
  MMFAST_LAUNCH(la_state_reduce_kernel<A>, grid_for(ceil_div(total, kThreads)), kThreads, 0, stream,
                static_cast<const A*>(workspace), static_cast<A*>(state), static_cast<A*>(mean), a.bh, plan.nchunks,
                a.dk, a.dv, div);
  return cudaGetLastError();
}

}  // namespace la

// Entry point: state = (1/N) sum phi(k)^T v, mean = (1/N) sum phi(k). Needs k, v, state, mean and
// linear_attention_state_workspace_bytes(p) of workspace.
inline size_t linear_attention_state_workspace_bytes(const LinearAttentionParams& p) {
  if (!la::valid_dims(p)) return 0;
  return la::plan_state(p, sm_count()).partial_bytes;
}
inline cudaError_t linear_attention_state(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.k.data || !p.v.data || !p.state || !p.mean) return cudaErrorInvalidValue;
  const la::StatePlan plan = la::plan_state(p, sm_count());
  if (plan.partial_bytes > 0 && (p.workspace == nullptr || p.workspace_bytes < plan.partial_bytes))
    return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return la::launch_state_pass<T>(p.k, p.v, nullptr, p.state, p.mean, p, plan, p.workspace,
                                    static_cast<double>(p.seqlen), stream);
  });
}

}  // namespace cuda
}  // namespace mmfast
