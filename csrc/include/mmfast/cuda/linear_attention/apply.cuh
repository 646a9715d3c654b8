// The apply pass of the linear attention: out = phi(q) S / (phi(q) . m + eps).
//   la_apply_kernel  item = (Dv tile, 64-token tile, b*h).
#pragma once

#include "mmfast/cuda/linear_attention/common.cuh"

namespace mmfast {
namespace cuda {
namespace la {

struct ApplyArgs : Dims {
  TokenTensor q, out;
  const void* state;
  const void* mean;
};

// One work item: a 64-token tile of one Dv tile of one head.
struct ApplyItem {
  int64_t bh, n0;
  int v0;
};
__device__ __forceinline__ ApplyItem apply_item(const ApplyArgs& a, int64_t item) {
  ApplyItem it;
  it.v0 = static_cast<int>(item % a.tiles_v) * kTile;
  const int64_t rest = item / a.tiles_v;
  it.n0 = (rest % a.ntiles) * kTile;
  it.bh = rest / a.ntiles;
  return it;
}

// The state operand S[l][v0 + j] (0 outside Dk x Dv) and phi(q) from a raw q element, as
// element sources of gemm_tile (l: the contraction over Dk).
template <class A> __device__ __forceinline__ auto state_operand(const ApplyArgs& a, const ApplyItem& it) {
  const A* S = static_cast<const A*>(a.state) + it.bh * static_cast<int64_t>(a.dk) * a.dv;
  const int dk = a.dk, dv = a.dv, v0 = it.v0;
  return [=](int l, int j) -> A {
    const int c = v0 + j;
    return (l < dk && c < dv) ? S[static_cast<int64_t>(l) * dv + c] : A(0);
  };
}
template <class C, class A> __device__ __forceinline__ auto phi_q_finish(const ApplyArgs& a, const ApplyItem& it) {
  const int64_t rows = a.N - it.n0;
  const int dk = a.dk;
  return [=](typename C::T raw, int i, int l) { return i < rows && l < dk ? phi<C::fm>(to_acc(raw)) : A(0); };
}

// out rows of the tile = acc / z.
template <class T, class A>
__device__ __forceinline__ void store_apply_tile(const ApplyArgs& a, const ApplyItem& it, const A (&acc)[4][4],
                                                 const A* zs, int ty, int tx) {
  const TokenView<T> out = token_view<T>(a.out, it.bh, a.heads);
  store_tile(acc, ty, tx, a.N - it.n0, a.dv - it.v0,
             [&](int i, int j, A value) { out.row(it.n0 + i)[it.v0 + j] = from_acc<T>(value / zs[i]); });
}

template <class C>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<C>) la_apply_kernel(ApplyArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  __shared__ A ms[kMaxD];
  __shared__ A zs[kTile];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t items = static_cast<int64_t>(a.tiles_v) * a.ntiles * a.bh;
  const A eps = static_cast<A>(a.eps);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const ApplyItem it = apply_item(a, item);
    const TokenView<const T> q = token_view<const T>(a.q, it.bh, a.heads);
    load_mean(ms, static_cast<const A*>(a.mean) + it.bh * a.dk, a.dk);
    tile_z<C::fm, T, A>(zs, q, it.n0, a.N, a.dk, ms, eps);

    TileAccumulator<A> tile;
    const int64_t rows = a.N - it.n0;
    const auto phi_q = split_element(
        [&](int i, int l) { return i < rows && l < a.dk ? q.row(it.n0 + i)[l] : from_acc<T>(A(0)); },
        phi_q_finish<C, A>(a, it));
    gemm_tile<false, true>(tile, C::tc, a.dk, phi_q, state_operand<A>(a, it), As, Bs, Cs, ty, tx);  // ends with a barrier
    store_apply_tile<T>(a, it, tile.acc, zs, ty, tx);
  }
}

// ---- the asynchronous tensor-core variant (16-bit inputs, 16-byte aligned rows, sm_80+) ------
// A persistent grid (the resident blocks only); each block takes a contiguous range of items
// ordered token tile fastest, so it keeps one head's state columns S[:, v0:v0+W] and m in
// shared memory across a run of items and reloads them only when the head or the Dv tile
// changes. The raw q of all its items streams through one ring of kAsyncApplyStages tiles (64
// tokens x W dims, 8 KB of bf16 at W = 64: one slice per item at D = 64, so the fixed costs of
// a slice are paid per 8 KB): the next item's q is in flight while this one
// multiplies; the wait leaves kAsyncApplyStages - 2 tiles pending (at least 32 KB of bf16 per
// block; the pass's other half of the traffic, the output, is stores, which need no such
// cover).
//
// The products run on the tensor cores (ldmatrix + mma.sync.m16n8k16, fp32 sums): phi(q) is
// made in place in the landed tile, rounded to T once (its error averages over Dk and is
// shared by z, well below one output ulp); the fp32 state keeps about 16 mantissa bits as a
// hi + lo pair (split_pair, once per item load): out = phi(q) S_hi + phi(q) S_lo, and z the
// same with m's hi and lo in columns 0 and 1 of one more n-tile (z = phi(q) . m + eps from the
// same phi(q): no second read of q). For fp16 the state columns and m are first scaled by
// powers of two that bring their largest magnitude to [1, 2) (fp16 tops out at 65504 and
// goes subnormal below 6.1e-5; the scales are undone exactly in the epilogue).
//
// Tiles sized to D: the item's Dv tile and the ring's slices of Dk are W wide (AsyncApplyTile:
// 48, 64 or 80, apply_tile_width), so D = 80 runs one slice and one item per 64 tokens where
// 64-wide tiles ran 2 x 2, and D = 40 one 48-dim slice per 128-token item (a 64-token item of
// 48 dims would cost a thread as many passes over its chunks and epilogues as one of 64 dims).
// Warp w owns tokens (w % kRowGroups) * 16 and Dv columns from (w / kRowGroups) * kWarpCols:
// 16 x 32 at W = 64, 16 x 40 at 80, 16 x 48 at 48 (128 tokens: 8 row groups).
constexpr int kAsyncApplyStages = 6;
constexpr int kApplySliceDims = 64;  // Dk elements of q per slice of the ring at W = 64
template <int W> struct AsyncApplyTile {
  static_assert(W % 16 == 0, "whole n-tiles per warp and mma k-steps per slice");
  static constexpr int kSliceDims = W;  // Dk elements of q per slice of the ring
  // Tokens per item: 128 at W = 48 (12 KB slices, 3 whole passes of the threads over their
  // chunks, and one epilogue per 128 tokens), else 64.
  static constexpr int kItemTokens = W <= 48 ? 128 : kTile;
  static constexpr int kRowGroups = kItemTokens / 16;                 // 16-token groups of warps
  static constexpr int kColGroups = kThreads / 32 / kRowGroups;       // 2 at 64 tokens, 1 at 128
  static constexpr int kWarpCols = W / kColGroups;                     // Dv columns per warp
  static constexpr int kNTiles = kWarpCols / 8;
  static_assert(kRowGroups * kColGroups * 32 == kThreads && W % kColGroups == 0, "the warps cover the item");
  static constexpr int kStateLd = W + kRawPad;  // 16-bit state column rows: 112 / 144 / 176 bytes
  // m_cols rows: the z product loads 32 rows at every other k-step, so at W = 48 / 80 the last
  // one reads 16 rows past round_up(Dk, W) into registers it does not use (in bounds, never written)
  static constexpr int kMeanRows = round_up(kMaxD, W) + 32;
};
template <class T, int W> using ApplyQTile = RawTile<T, AsyncApplyTile<W>::kItemTokens, W, kRawPad>;

template <class C, int W> struct AsyncApplyShared {
  using T = typename C::T;
  ApplyQTile<T, W> q[kAsyncApplyStages];
  __align__(16) T m_cols[AsyncApplyTile<W>::kMeanRows][8];  // B of the z product: m's hi and lo in columns 0 and 1
  float warp_max[2][kThreads / 32];  // the fp16 scales' reduction
  float inv_s_scale, inv_m_scale;    // 1 / the power-of-two scales of the state columns and m
};
// Followed by S_hi and S_lo[round_up(Dk, W)][kStateLd], the state columns, sized at launch.
template <class C, int W> constexpr size_t kStateColumnsOffset = round_up(sizeof(AsyncApplyShared<C, W>), 128);

template <class C, int W> inline size_t async_apply_smem_bytes(int dk) {
  return kStateColumnsOffset<C, W> +
         2 * sizeof(typename C::T) * static_cast<size_t>(round_up(dk, W)) * AsyncApplyTile<W>::kStateLd;
}

// Item order of the asynchronous kernel: token tile fastest, then Dv tile, then head. A block
// decodes its first item (32-bit divisions: the launch guarantees fewer than 2^32 items) and
// counts from there, heads as (b, h) for the token views.
__device__ __forceinline__ ApplyItem apply_item_tokens_fastest(const ApplyArgs& a, int64_t item, int width,
                                                              int tokens) {
  const uint32_t index = static_cast<uint32_t>(item), ntiles = static_cast<uint32_t>(a.ntiles);
  ApplyItem it;
  it.n0 = static_cast<int64_t>(index % ntiles) * tokens;
  const uint32_t rest = index / ntiles;
  it.v0 = static_cast<int>(rest % static_cast<uint32_t>(a.tiles_v)) * width;
  it.bh = rest / static_cast<uint32_t>(a.tiles_v);
  return it;
}
// The walk also keeps the row n0 of one token tensor of the item's head (q for the issuing
// side, out for the consuming one), stepped by adds: an item costs no multiply either. W: the
// Dv tile width.
template <class T, int W> struct ApplyWalk {
  static constexpr int kTokens = AsyncApplyTile<W>::kItemTokens;
  ApplyItem it;
  HeadIndex head;  // it.bh
  T* rows;         // row it.n0 of the head
  T* head_rows;    // row 0 of the head
  int64_t stride_n, stride_h, stride_b;
  __device__ __forceinline__ void start(const ApplyArgs& a, int64_t item, const TokenTensor& t) {
    it = apply_item_tokens_fastest(a, item, W, kTokens);
    head.start(it.bh, a.heads);
    stride_n = t.stride_n;
    stride_h = t.stride_h;
    stride_b = t.stride_b;
    head_rows = head.view<T>(t).base;
    rows = head_rows + it.n0 * stride_n;
  }
  __device__ __forceinline__ void step(const ApplyArgs& a) {
    it.n0 += kTokens;
    rows += kTokens * stride_n;
    if (it.n0 < a.N) return;
    it.n0 = 0;
    rows = head_rows;
    it.v0 += W;
    if (it.v0 < a.dv) return;
    it.v0 = 0;
    head.next(a.heads);
    it.bh = head.bh;
    head_rows += head.h == 0 ? stride_b - (a.heads - 1) * stride_h : stride_h;
    rows = head_rows;
  }
};

// The block's largest |S| and |m| of an item (fp16 only): 1 / their range scales into sh.
template <class C, int W>
__device__ __forceinline__ void state_range(const ApplyArgs& a, const ApplyItem& it, AsyncApplyShared<C, W>& sh) {
  const auto state = state_operand<float>(a, it);
  const float* mean = static_cast<const float*>(a.mean) + it.bh * a.dk;
  float largest[2] = {0.0f, 0.0f};  // |S| columns, |m|
  for (int e = threadIdx.x; e < a.dk * W; e += kThreads) largest[0] = fmaxf(largest[0], fabsf(state(e / W, e % W)));
  for (int l = threadIdx.x; l < a.dk; l += kThreads) largest[1] = fmaxf(largest[1], fabsf(mean[l]));
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int lane_mask = 1; lane_mask < 32; lane_mask *= 2)
      largest[i] = fmaxf(largest[i], __shfl_xor_sync(0xffffffffu, largest[i], lane_mask));
    if (threadIdx.x % 32 == 0) sh.warp_max[i][threadIdx.x / 32] = largest[i];
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    float block = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) block = fmaxf(block, sh.warp_max[threadIdx.x][w]);
    (threadIdx.x == 0 ? sh.inv_s_scale : sh.inv_m_scale) = 1.0f / range_scale<>(block);
  }
  __syncthreads();
}

// S[l][v0 + j] (0 outside Dk x Dv) split into s_hi / s_lo for l < round_up(Dk, W), j < W, and m
// into m_cols (0 past Dk), both scaled into fp16's range for
// fp16 (sh's inverse scales: 1 for bf16). Between barriers.
template <class C, int W>
__device__ __forceinline__ void load_state_columns(const ApplyArgs& a, const ApplyItem& it, AsyncApplyShared<C, W>& sh,
                                                   typename C::T* s_hi, typename C::T* s_lo) {
  using T = typename C::T;
  __syncthreads();  // the previous item's readers are done
  if constexpr (std::is_same_v<T, __half>) {
    state_range(a, it, sh);
  } else {
    if (threadIdx.x == 0) sh.inv_s_scale = sh.inv_m_scale = 1.0f;
  }
  const float s_scale = std::is_same_v<T, __half> ? 1.0f / sh.inv_s_scale : 1.0f;
  const float m_scale = std::is_same_v<T, __half> ? 1.0f / sh.inv_m_scale : 1.0f;
  const auto state = state_operand<float>(a, it);
  constexpr int ld = AsyncApplyTile<W>::kStateLd;
  const int rows = static_cast<int>(round_up(a.dk, W));
  for (int e = threadIdx.x; e < rows * (W / 2); e += kThreads) {
    const int l = e / (W / 2), j = (e % (W / 2)) * 2;
    uint32_t hi, lo;
    split_pair<T>(state(l, j) * s_scale, state(l, j + 1) * s_scale, hi, lo);
    *reinterpret_cast<uint32_t*>(&s_hi[l * ld + j]) = hi;
    *reinterpret_cast<uint32_t*>(&s_lo[l * ld + j]) = lo;
  }
  const float* mean = static_cast<const float*>(a.mean) + it.bh * a.dk;
  for (int l = threadIdx.x; l < rows; l += kThreads) {
    const float m = l < a.dk ? mean[l] * m_scale : 0.0f;
    uint32_t hi, lo;
    split_pair<T>(m, 0.0f, hi, lo);  // low halves: m's hi and lo parts
    const uint32_t cols[4] = {(hi & 0xffffu) | (lo << 16), 0u, 0u, 0u};
    *reinterpret_cast<uint4*>(&sh.m_cols[l][0]) = make_uint4(cols[0], cols[1], cols[2], cols[3]);
  }
  __syncthreads();
}

// out += this warp's products over one prepared q slice (W dims of Dk from l0), z likewise.
template <class C, int W>
__device__ __forceinline__ void multiply_apply_slice(float (&acc)[AsyncApplyTile<W>::kNTiles][4], float (&z)[4],
                                                     const AsyncApplyShared<C, W>& sh, int stage, int l0,
                                                     const typename C::T* s_hi, const typename C::T* s_lo,
                                                     int warp_row, int warp_col) {
  using T = typename C::T;
  using Tile = AsyncApplyTile<W>;
  const int lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
  uint32_t bm[4];  // m columns for two steps: matrix j is Dk rows l0 + kk + 8j
#pragma unroll
  for (int kk = 0; kk < Tile::kSliceDims; kk += 16) {
    // A = phi(q) (tokens x Dk, row-major): matrix j is tokens + 8 (j % 2), dims + 8 (j / 2).
    const int a_token = warp_row + 8 * (j % 2) + r, a_dim = kk + 8 * (j / 2);
    uint32_t a_q[4];
    ldmatrix_x4(a_q, &sh.q[stage].v[a_token][a_dim]);  // first: the emulator then sees a missing barrier
    if (kk % 32 == 0) ldmatrix_x4_trans(bm, &sh.m_cols[l0 + kk + 8 * j + r][0]);
    const uint32_t b_m[2] = {bm[kk % 32 / 8], bm[kk % 32 / 8 + 1]};
    mma_m16n8k16<T>(z, a_q, b_m);
#pragma unroll
    for (int p = 0; p < Tile::kNTiles / 2; ++p) {
      // B = S (Dk x Dv): matrix j is Dk rows + 8 (j % 2), Dv columns + 8 (j / 2) of n-tiles 2p, 2p+1.
      const int offset = (l0 + kk + 8 * (j % 2) + r) * Tile::kStateLd + warp_col + 16 * p + 8 * (j / 2);
      uint32_t b_hi[4], b_lo[4];
      ldmatrix_x4_trans(b_hi, s_hi + offset);
      ldmatrix_x4_trans(b_lo, s_lo + offset);
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const uint32_t hi[2] = {b_hi[2 * n], b_hi[2 * n + 1]}, lo[2] = {b_lo[2 * n], b_lo[2 * n + 1]};
        mma_m16n8k16<T>(acc[2 * p + n], a_q, hi);
        mma_m16n8k16<T>(acc[2 * p + n], a_q, lo);
      }
    }
    if constexpr (Tile::kNTiles % 2 == 1) {  // W = 80: the last n-tile alone (lanes 0-15 name its rows)
      constexpr int n = Tile::kNTiles - 1;
      const int offset = (l0 + kk + 8 * (j % 2) + r) * Tile::kStateLd + warp_col + 8 * n;
      uint32_t hi[2], lo[2];
      ldmatrix_x2_trans(hi, s_hi + offset);
      ldmatrix_x2_trans(lo, s_lo + offset);
      mma_m16n8k16<T>(acc[n], a_q, hi);
      mma_m16n8k16<T>(acc[n], a_q, lo);
    }
  }
}

// out rows of the warp = acc / z with the range scales undone, z = D[:, 0] + D[:, 1] of the
// z product (held by the lane with t = 0 of each row group, summed across the group's 4 lanes)
// + eps.
// Each row's factor inv_s_scale / z is one division; the outputs are products with it (a
// power-of-two scale and a correctly rounded 1 / z: within an fp32 ulp of acc / z, far below
// the output's rounding). A lane's two adjacent columns go out as one 4-byte word (the launch
// requires out rows 4-byte aligned, so an even Dv keeps each pair in or out together).
template <class T, int NT>
__device__ __forceinline__ void store_apply_fragments(const ApplyArgs& a, const ApplyItem& it, T* rows, int64_t stride_n,
                                                      const float (&acc)[NT][4], const float (&z)[4],
                                                      float inv_s_scale, float inv_m_scale, int warp_row,
                                                      int warp_col) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int col = it.v0 + warp_col + 2 * t;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float part = t == 0 ? z[2 * h] + z[2 * h + 1] : 0.0f;
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    const float row_factor = inv_s_scale / (part * inv_m_scale + static_cast<float>(a.eps));
    const int token = warp_row + g + 8 * h;  // in the tile: rows[0] is token it.n0
    if (it.n0 + token >= a.N) continue;
    T* const row = rows + token * stride_n + col;
#pragma unroll
    for (int n = 0; n < NT; ++n)
      if (col + 8 * n < a.dv)
        *reinterpret_cast<uint32_t*>(row + 8 * n) =
            pack_pair<T>(acc[n][2 * h] * row_factor, acc[n][2 * h + 1] * row_factor);
  }
}

// Two blocks per SM where the shared memory allows (at most 128 registers: 123-126 on sm_90a, no
// spills; fp16 took 136 and one block without the bound; at W = 80 and Dk = 160 the state
// columns make it 127 KB, one block). a.tiles_v counts W-wide Dv tiles, a.ntiles items of
// kItemTokens tokens.
template <class C, int W>
__global__ void __launch_bounds__(kThreads, 2) la_apply_async_kernel(ApplyArgs a) {
  using T = typename C::T;
  using Tile = AsyncApplyTile<W>;
  static_assert(C::tc && kSixteenBit<T>, "the tensor-core variant of 16-bit inputs");
  constexpr int S = kAsyncApplyStages;
  MMFAST_DYNAMIC_SHARED(smem);
  auto& sh = *reinterpret_cast<AsyncApplyShared<C, W>*>(smem);
  T* const s_hi = reinterpret_cast<T*>(smem + kStateColumnsOffset<C, W>);
  T* const s_lo = s_hi + round_up(a.dk, W) * Tile::kStateLd;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int warp_row = (warp % Tile::kRowGroups) * 16;
  const int warp_col = (warp / Tile::kRowGroups) * Tile::kWarpCols;
  const int64_t items = static_cast<int64_t>(a.tiles_v) * a.ntiles * a.bh;
  const int64_t per_block = ceil_div(items, gridDim.x);
  const int64_t first = blockIdx.x * per_block, last = min_i64(items, first + per_block);
  // The block's q slices are copied and consumed in the same order (the g-th uses stage g % S),
  // one commit group per slice, empty past the last item. The issuing side keeps its item and
  // this thread's source (RawChunk::kept_row / kept_col / chunk_source), stepped a slice per issue.
  const int slices = static_cast<int>(ceil_div(a.dk, W));
  using Chunk = RawChunk<ApplyQTile<T, W>>;
  int64_t next_item = first, next_rows = 0;  // next_rows: tokens from the next item's tile on
  int next_slice = 0, issued_stage = 0;
  ApplyWalk<const T, W> next;
  const T* q_src = nullptr;  // the next slice's source
  const int64_t first_offset = Chunk::kept_row() * a.q.stride_n + Chunk::kept_col();
  const auto begin_next_item = [&]() {
    next_rows = a.N - next.it.n0;
    q_src = next.rows + first_offset;
  };
  next.start(a, first < last ? first : 0, a.q);
  begin_next_item();
  const auto issue_next = [&]() {
    if (next_item < last) {
#pragma unroll
      for (int k = 0; k < Chunk::kPerThread; ++k) {
        Chunk(k).issue(sh.q[issued_stage], Chunk::chunk_source(q_src, k, a.q.stride_n), next_rows,
                       a.dk - next_slice * W, static_cast<const T*>(a.q.data));
      }
      q_src += W;
      if (++next_slice == slices) {
        next_slice = 0;
        ++next_item;
        next.step(a);
        begin_next_item();
      }
    }
    cp_async_commit();
    issued_stage = issued_stage + 1 == S ? 0 : issued_stage + 1;
  };
  for (int prologue = 0; prologue < S - 1; ++prologue) issue_next();
  int stage = 0;
  ApplyWalk<T, W> walk;
  walk.start(a, first < last ? first : 0, a.out);
  for (int64_t item = first; item < last;) {
    // A run of items of one head and Dv tile (token tiles fastest: it ends where n0 wraps to 0)
    // shares the state columns, loaded once.
    load_state_columns(a, walk.it, sh, s_hi, s_lo);
    do {
      const ApplyItem& it = walk.it;
      float acc[Tile::kNTiles][4] = {}, z[4] = {};
      for (int sl = 0; sl < slices; ++sl) {
        cp_async_wait<S - 2>();  // this thread's copies of this slice landed
        __syncthreads();         // everyone's landed; the previous slice's products are done
        issue_next();            // into the previous slice's stage: its readers passed the barrier above
        const int l0 = sl * W;
#pragma unroll
        for (int k = 0; k < Chunk::kPerThread; ++k) {
          const Chunk c(k);
          if (!c.in_tile) continue;  // warp-uniform: the ragged last pass of W = 80
          phi_chunk<C>(reinterpret_cast<uint4*>(&sh.q[stage].v[c.row][c.col]), nullptr,
                       c.row < a.N - it.n0 && l0 + c.col < a.dk);  // Dk: a multiple of 8 here
        }
        __syncthreads();
        multiply_apply_slice<C, W>(acc, z, sh, stage, l0, s_hi, s_lo, warp_row, warp_col);
        stage = stage + 1 == S ? 0 : stage + 1;
      }
      store_apply_fragments<T>(a, it, walk.rows, walk.stride_n, acc, z, sh.inv_s_scale, sh.inv_m_scale, warp_row,
                               warp_col);
      ++item;
      walk.step(a);
    } while (item < last && walk.it.n0 != 0);
  }
}

// The asynchronous kernel runs for 16-bit inputs on the tensor-core path whose q rows cp.async
// can copy whole and whose out rows take 4-byte words, with fewer than 2^32 items (its 32-bit
// item decoding), when its code was compiled for sm_80+ (not JIT-compiled from older PTX).
template <class C, int W> bool use_async_apply(const ApplyArgs& a, int64_t items) {
  if constexpr (!C::tc) {
    return false;
  } else {
    return async_copy_enabled() && items <= static_cast<int64_t>(UINT32_MAX) &&
           rows_16b_aligned(a.q, a.dk, sizeof(typename C::T)) && rows_aligned(a.out, a.dv, sizeof(typename C::T), 4) &&
           async_apply_smem_bytes<C, W>(a.dk) <= max_shared_per_block() && compiled_for(&la_apply_async_kernel<C, W>, 80);
  }
}

// The apply tile width for Dk x Dv (tile_width): 48 and 80 only where their shared memory for
// this Dk fits a block.
template <class C> int apply_tile_width(const ApplyArgs& a) {
  const size_t limit = max_shared_per_block();
  return tile_width(a.dk, a.dv, [&](int w) {
    return (w == 48 ? async_apply_smem_bytes<C, 48>(a.dk) : async_apply_smem_bytes<C, 80>(a.dk)) <= limit;
  });
}

template <class T>
cudaError_t launch_apply(const LinearAttentionParams& p, cudaStream_t stream) {
  ApplyArgs a;
  static_cast<Dims&>(a) = make_dims(p);  // kTile-wide Dv tiles: the register-staged kernel's
  a.q = p.q;
  a.out = p.out;
  a.state = p.state;
  a.mean = p.mean;
  return dispatch_config<T>(a, [&](auto config) {
    using C = decltype(config);
    if constexpr (C::tc) {
      bool launched = false;
      const cudaError_t async_err = dispatch_tile_width(apply_tile_width<C>(a), [&](auto width) -> cudaError_t {
        constexpr int W = decltype(width)::value;
        ApplyArgs wa = a;
        wa.tiles_v = static_cast<int>(ceil_div(a.dv, W));
        wa.ntiles = ceil_div(a.N, AsyncApplyTile<W>::kItemTokens);
        const int64_t items = static_cast<int64_t>(wa.tiles_v) * wa.ntiles * wa.bh;
        if (!use_async_apply<C, W>(wa, items)) return cudaSuccess;
        const size_t smem = async_apply_smem_bytes<C, W>(a.dk);  // > 48 KB: opt in
        unsigned grid = 0;  // no block resident: the register-staged kernel instead
        if (!fits_persistent_grid(&la_apply_async_kernel<C, W>, kThreads, smem, items, grid)) return cudaSuccess;
        launched = true;
        MMFAST_LAUNCH((la_apply_async_kernel<C, W>), grid, kThreads, smem, stream, wa);
        return cudaGetLastError();
      });
      if (async_err != cudaSuccess || launched) return async_err;
    }
    const int64_t items = static_cast<int64_t>(a.tiles_v) * a.ntiles * a.bh;
    MMFAST_LAUNCH(la_apply_kernel<C>, grid_for(items), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
}

}  // namespace la

// Entry point: out = phi(q) state / (phi(q) . mean + eps). Needs q, state, mean, out; no workspace.
inline size_t linear_attention_apply_workspace_bytes(const LinearAttentionParams&) { return 0; }
inline cudaError_t linear_attention_apply(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.q.data || !p.out.data || !p.state || !p.mean) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return la::launch_apply<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace mmfast
