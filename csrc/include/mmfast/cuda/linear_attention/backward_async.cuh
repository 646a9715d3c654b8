// The backward passes on the tensor cores (16-bit inputs with 16-byte aligned rows, sm_80+).
// Both have one shape: a 64-token tile of one head's (X, Y) against the head's whole Dk x Dv
// matrix M, held in shared memory as fp16 / bf16 hi + lo (split_pair) while a block walks the
// head's token tiles:
//   phase 1  P = phi(X) M     tokens x Dv   (A: phi(X), B: M through ldmatrix .trans)
//   phase 2  U = Y M^T        tokens x Dk   (A: Y,      B: M through ldmatrix)
// apply_backward  (X = q, Y = grad_out, M = S,  m = mean):
//   z = phi(q) . m + eps, w = rowsum(P * do), dz = -(w / z) / z      (phase 1's epilogue)
//   grad_q = phi'(q) * (U / z + dz m); (z, dz) per token into the workspace for the state pass
// state_backward  (X = k, Y = v, M = dS, m = dm):
//   grad_v = P / N                                                     (phase 1's epilogue)
//   grad_k = phi'(k) * (U + dm) / N                                    (phase 2's epilogue)
// So each token row is read once (into shared memory by cp.async, the next tile's copies in
// flight while this one multiplies) and each gradient written once, where the register-staged
// kernels read every operand element through a bounds-checked scalar load per 64-wide tile.
//
// The tiles are DP = 64, 80, 128 or 160 wide (both dims padded to it, zeros past them: the
// padded products cost tensor-core time, not memory traffic); past 160 the matrix does not fit
// a block's shared memory and the register-staged kernels run. Warp w owns tokens
// (w % 4) * 16 .. + 15 and the 16-column chunks w / 4, w / 4 + 2, ... of each phase's output.
// fp16 scales M by a power of two that brings its largest magnitude to [2^14, 2^15) (fp16 tops
// out at 65504 and goes subnormal below 6.1e-5: 29 binades of normals below the largest),
// undone in fp32 in the epilogues.
//
// kApplyWithStateSums (DP = 64, the default there; MMFAST_CUDA_LA_BACKWARD_FUSED=0 turns it off)
// is apply_backward with dS and dm summed in the same kernel, from the tile already in shared
// memory, instead of by the state pass run on (q, grad_out) again afterwards (the backward's
// token traffic: 7 tensor passes instead of 9):
//   phase 3  dS += (phi(q) / z)^T do, dm += (phi(q) / z)^T (dz z)   (tokens contracted)
// with the state pass's operands (phi(q) / z split as hi + lo, do exact but for a power of two
// in fp16 where 1 / z >= 2: operand_balance; multiply_weighted_sums).
// Each item's sums start at 0 in the mma accumulators and are added in fp32 into the unit's; a
// unit is at most kMaxSumUnitTiles tiles of one head (plan_state_sums), whose fp32 partial
// [dS | dm] is summed in fp64 in unit order by la_state_reduce_kernel (written directly when a
// head is one unit): deterministic, and independent of the grid.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

#include "mmfast/cuda/linear_attention/common.cuh"
#include "mmfast/cuda/linear_attention/state.cuh"

namespace mmfast {
namespace cuda {
namespace la {

enum class BackwardPass { kApply, kState, kApplyWithStateSums };

constexpr int kPairTokens = 64;  // tokens per item
static_assert(kPairTokens == kTile, "items are Dims::ntiles' token tiles");
static_assert(kThreads == 256 && kPairTokens == 4 * 16, "8 warps: 4 row groups of 16 tokens x 2 column groups");

template <int DP> struct PairTile {
  static_assert(DP % 16 == 0, "whole 16-column chunks and mma k-steps");
  static constexpr int kLd = DP + kRawPad;         // rows of 16 * odd bytes: ldmatrix phases hit all banks
  static constexpr int kChunks = DP / 16;          // 16-column chunks of an output row
  static constexpr int kOwned = (kChunks + 1) / 2;  // ... per warp (two column groups)
  static constexpr int kCopyChunks = kPairTokens * DP / 8;  // 16-byte chunks of a token tile
};

// Items in the ring (Stages) and resident blocks per SM the kernel is compiled for (its
// __launch_bounds__; the numbers are sm_90's, 227 KB per block, 228 KB per SM less 1 KB per
// block): the item being multiplied and the next one in flight (DP = 80: 20 KB of bf16 tokens
// per block, two blocks of 85 KB; 128 / 160: one block of 157 / 215 KB, 32 / 40 KB in flight); at
// DP = 64 either the next two (3 stages, two blocks of 83 KB, 94 registers: 64 KB in flight per
// SM) or the next one in three blocks of 65 KB (80 registers, no spills: 48 KB in flight, 24
// warps to cover the barriers), MMFAST_CUDA_LA_BACKWARD_3BLOCKS=1 (an A/B switch: on the H200
// it measured within 5% of the default either way). sm_80 (164 KB per SM) holds one block fewer
// of each 64 / 80-wide variant, sm_86 / sm_89 (99 KB) one block of them; 160 does not fit sm_80
// (the register-staged kernels run): the grid comes from the occupancy calculator, so only the
// register caps are sm_90's.
template <int DP, int Stages> constexpr int kPairBlocks = DP <= 64 && Stages == 2 ? 3 : DP <= 80 ? 2 : 1;
inline int pair_stages(int dp) {
  static const bool three_blocks = std::getenv("MMFAST_CUDA_LA_BACKWARD_3BLOCKS") != nullptr &&
                                   env_switch_on("MMFAST_CUDA_LA_BACKWARD_3BLOCKS");
  return dp == 64 && !three_blocks ? 3 : 2;
}

// Phase 3's operands (kApplyWithStateSums): phi(q) / z as hi (in phi_x) + lo, and per token
// 1 / z and dz z / operand_balance (0 past the tile's rows); balanced: whether some row's
// operand_balance is not 1 (its do row is then scaled in place after phase 2).
template <class T, int DP, bool Sums> struct SumTiles {
  __align__(16) T a_lo[kPairTokens][PairTile<DP>::kLd];
  float inv_z[kPairTokens], wz[kPairTokens];
  int balanced;
};
template <class T, int DP> struct SumTiles<T, DP, false> {};

template <class T, int DP, int Stages, bool Sums = false> struct PairShared {
  static constexpr int kLd = PairTile<DP>::kLd;
  __align__(16) T x[Stages][kPairTokens][kLd];  // raw X
  __align__(16) T y[Stages][kPairTokens][kLd];  // Y
  __align__(16) T phi_x[kPairTokens][kLd];
  __align__(16) T m_hi[DP][kLd];  // M (Dk rows, Dv columns), times the fp16 scale
  __align__(16) T m_lo[DP][kLd];
  float vec[DP];  // m or dm, 0 past Dk
  float z[kPairTokens], dz[kPairTokens];
  float w_part[2][kPairTokens];  // w of each column group
  float warp_max[kThreads / 32];
  float inv_scale;  // 1 / M's scale (1 for bf16)
  SumTiles<T, DP, Sums> sums;
};

// The tile widths and whether one fits a block's shared memory.
template <class T, int DP, int Stages, bool Sums = false>
constexpr size_t kPairSmem = sizeof(PairShared<T, DP, Stages, Sums>);
inline int pair_dim(int64_t dk, int64_t dv) {
  const int64_t d = max_i64(dk, dv);
  return d <= 64 ? 64 : d <= 80 ? 80 : d <= 128 ? 128 : d <= 160 ? 160 : 0;
}

struct PairArgs : Dims {
  TokenTensor x, y;            // q, grad_out | k, v
  TokenTensor grad_x, grad_y;  // grad_q, - | grad_k, grad_v
  const void* matrix;          // S | dS: fp32 [bh][Dk][Dv]
  const void* vec;             // m | dm: fp32 [bh][Dk]
  void* scalars;               // apply: out (z, dz) per token, [bh][N][2]
  // kApplyWithStateSums: units of unit_tiles token tiles (units_per_head per head); their fp32
  // partials [bh][units_per_head][Dk * Dv + Dk] into sums_out, or with one unit per head dS and
  // dm straight into sums_out and mean_out.
  void* sums_out;
  void* mean_out;
  int64_t unit_tiles, units_per_head;
};

// One item: token tile n0 of head bh (32-bit decoding: the launch keeps items below 2^32).
struct PairItem {
  int64_t bh, n0, rows;  // rows: tokens of the tile below N
};
__device__ __forceinline__ PairItem pair_item(const PairArgs& a, int64_t item) {
  const uint32_t index = static_cast<uint32_t>(item), ntiles = static_cast<uint32_t>(a.ntiles);
  PairItem it;
  it.bh = index / ntiles;
  it.n0 = static_cast<int64_t>(index - static_cast<uint32_t>(it.bh) * ntiles) * kPairTokens;
  it.rows = min_i64(kPairTokens, a.N - it.n0);
  return it;
}

// Starts the copies of one token tile (cols: the row's elements, a multiple of 8), zero-filling
// the chunks past its rows or columns (DP wide).
template <class T, int DP>
__device__ __forceinline__ void copy_token_tile(T (&dst)[kPairTokens][PairTile<DP>::kLd], const TokenTensor& t,
                                                const PairItem& it, int64_t heads, int cols) {
  const TokenView<const T> view = token_view<const T, uint32_t>(t, it.bh, heads);
  constexpr int kRowChunks = DP / 8;
  for (int c = threadIdx.x; c < PairTile<DP>::kCopyChunks; c += kThreads) {
    const int row = c / kRowChunks, col = c % kRowChunks * 8;
    const bool valid = row < it.rows && col < cols;
    cp_async16(&dst[row][col], valid ? view.row(it.n0 + row) + col : static_cast<const T*>(t.data), valid);
  }
}

// M of head bh into m_hi / m_lo (times the fp16 scale; zeros past Dk x Dv up to DP) and m
// into vec. Starts after a barrier (the previous head's readers are done); ends with one.
template <class T, int DP, int S, bool U>
__device__ __forceinline__ void load_pair_matrix(const PairArgs& a, int64_t bh, PairShared<T, DP, S, U>& sh) {
  const int64_t elems = static_cast<int64_t>(a.dk) * a.dv;
  const float* M = static_cast<const float*>(a.matrix) + bh * elems;
  float scale = 1.0f;
  if constexpr (std::is_same_v<T, __half>) {
    float largest = 0.0f;
    for (int64_t e = threadIdx.x; e < elems; e += kThreads) largest = fmaxf(largest, fabsf(M[e]));
#pragma unroll
    for (int lane_mask = 1; lane_mask < 32; lane_mask *= 2)
      largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, lane_mask));
    if (threadIdx.x % 32 == 0) sh.warp_max[threadIdx.x / 32] = largest;
    __syncthreads();
    for (int w = 0; w < kThreads / 32; ++w) largest = fmaxf(largest, sh.warp_max[w]);
    // S (dS) near fp16's top: a dS whose rows span 2^20 (tokens whose z is eps alone) keeps its
    // small rows, which the state backward's dk and dv read (Top = 0 left them 2-4% off)
    scale = range_scale<14>(largest);
  }
  constexpr int kPairs = DP / 2;  // column pairs per row (Dv is even: a multiple of 8)
  for (int e = threadIdx.x; e < DP * kPairs; e += kThreads) {
    const int l = e / kPairs, c = e % kPairs * 2;
    float2 value = make_float2(0.0f, 0.0f);
    if (l < a.dk && c < a.dv) {  // two 4-byte loads: M need only be float-aligned (a view may start anywhere)
      const float* pair = M + static_cast<int64_t>(l) * a.dv + c;
      value = make_float2(pair[0], pair[1]);
    }
    uint32_t hi, lo;
    split_pair<T>(value.x * scale, value.y * scale, hi, lo);
    *reinterpret_cast<uint32_t*>(&sh.m_hi[l][c]) = hi;
    *reinterpret_cast<uint32_t*>(&sh.m_lo[l][c]) = lo;
  }
  const float* vec = static_cast<const float*>(a.vec) + bh * a.dk;
  for (int l = threadIdx.x; l < DP; l += kThreads) sh.vec[l] = l < a.dk ? vec[l] : 0.0f;
  if (threadIdx.x == 0) sh.inv_scale = 1.0f / scale;
  __syncthreads();
}

// acc[o] += (this warp's 16 rows of A) B over ksteps k-steps of 16, for the warp's 16-column
// chunks col_group + 2o below nchunks. A: a token tile (contraction contiguous). B: M, read
// transposed (TransB: B = M, contraction over M's rows) or not (B = M^T, over its columns).
// Unrolled to DP / 16 steps (guarded): every shared address is a lane's base plus an immediate.
template <class T, int DP, bool TransB>
__device__ __forceinline__ void multiply_pair(float (&acc)[PairTile<DP>::kOwned][2][4],
                                              const T (&a)[kPairTokens][PairTile<DP>::kLd], const T* b_hi,
                                              const T* b_lo, int ksteps, int nchunks, int warp_row, int col_group) {
  constexpr int kLd = PairTile<DP>::kLd;
  const int lane = threadIdx.x % 32, j = lane / 8, r = lane % 8;
  // A's matrix j: tokens + 8 (j % 2), contraction + 8 (j / 2). B's matrix j of n-tiles 2o, 2o + 1:
  // contraction + 8 (j % 2), columns + 8 (j / 2).
  const T* a_lane = &a[warp_row + 8 * (j % 2) + r][8 * (j / 2)];
  const int b_lane = TransB ? (8 * (j % 2) + r) * kLd + col_group * 16 + 8 * (j / 2)   // M's row: contraction
                            : (col_group * 16 + 8 * (j / 2) + r) * kLd + 8 * (j % 2);  // M's row: column
  constexpr int kStepStride = TransB ? 16 * kLd : 16, kChunkStride = TransB ? 32 : 32 * kLd;
#pragma unroll
  for (int s = 0; s < DP / 16; ++s) {
    if (s >= ksteps) break;  // block-uniform
    uint32_t a_frag[4];
    ldmatrix_x4(a_frag, a_lane + 16 * s);
#pragma unroll
    for (int o = 0; o < PairTile<DP>::kOwned; ++o) {
      if (col_group + 2 * o >= nchunks) break;  // warp-uniform
      const int offset = b_lane + s * kStepStride + o * kChunkStride;
      uint32_t hi[4], lo[4];
      if constexpr (TransB) {
        ldmatrix_x4_trans(hi, b_hi + offset);
        ldmatrix_x4_trans(lo, b_lo + offset);
      } else {
        ldmatrix_x4(hi, b_hi + offset);
        ldmatrix_x4(lo, b_lo + offset);
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const uint32_t b_hi_frag[2] = {hi[2 * n], hi[2 * n + 1]}, b_lo_frag[2] = {lo[2 * n], lo[2 * n + 1]};
        mma_m16n8k16<T>(acc[o][n], a_frag, b_hi_frag);
        mma_m16n8k16<T>(acc[o][n], a_frag, b_lo_frag);
      }
    }
  }
}

// f(h, col, value0, value1) for each pair of columns (col, col + 1) below cols (a multiple of 8,
// so a whole n-tile is in or out: warp-uniform) of the warp's fragments, in the lane's rows
// warp_row + lane / 4 + 8h (h = 0, 1) of the tile.
template <int DP, class F>
__device__ __forceinline__ void for_each_pair(const float (&acc)[PairTile<DP>::kOwned][2][4], int cols,
                                              int col_group, F f) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int o = 0; o < PairTile<DP>::kOwned; ++o)
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int col0 = (col_group + 2 * o) * 16 + 8 * n;
      if (col0 >= cols) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) f(h, col0 + 2 * t, acc[o][n][2 * h], acc[o][n][2 * h + 1]);
    }
}

template <class T> __device__ __forceinline__ float2 shared_pair(const T* p) {
  return unpack_pair<T>(*reinterpret_cast<const uint32_t*>(p));
}

// z of the tile's rows: phi(q) . m + eps from the prepared phi_x (the rounded phi(q) the
// products use), 4 threads per row.
template <class T, int DP, int S, bool U>
__device__ __forceinline__ void pair_tile_z(PairShared<T, DP, S, U>& sh, int dk, float eps) {
  const int row = threadIdx.x / 4, part = threadIdx.x % 4;
  float s = 0.0f;
  for (int l = 2 * part; l < dk; l += 8) {
    const float2 p = shared_pair(&sh.phi_x[row][l]);
    s += p.x * sh.vec[l] + p.y * sh.vec[l + 1];
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  if (part == 0) sh.z[row] = s + eps;
}

// apply_backward's phase 1 epilogue: w = rowsum(P * do) per row, then dz = -(w / z) / z into
// shared memory and (z, dz) into the workspace for the state pass, or (with U, the fused sums)
// phase 3's 1 / z and dz z into shared memory. Between barriers.
template <class T, int DP, int S, bool U>
__device__ __forceinline__ void apply_backward_dz(const PairArgs& a, const PairItem& it, PairShared<T, DP, S, U>& sh,
                                                  int stage, const float (&acc)[PairTile<DP>::kOwned][2][4],
                                                  int warp_row, int col_group) {
  const int lane = threadIdx.x % 32, g = lane / 4;
  if constexpr (U) {
    if (threadIdx.x == 0) sh.sums.balanced = 0;  // the last item's readers are past the loop's barrier
  }
  float part[2] = {0.0f, 0.0f};  // rows warp_row + g and + 8
  for_each_pair<DP>(acc, a.dv, col_group, [&](int h, int col, float p0, float p1) {
    const float2 d = shared_pair(&sh.y[stage][warp_row + g + 8 * h][col]);
    part[h] += p0 * d.x + p1 * d.y;
  });
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    part[h] += __shfl_xor_sync(0xffffffffu, part[h], 1);
    part[h] += __shfl_xor_sync(0xffffffffu, part[h], 2);
    if (lane % 4 == 0) sh.w_part[col_group][warp_row + g + 8 * h] = part[h];
  }
  __syncthreads();
  if (threadIdx.x < kPairTokens) {
    const int row = threadIdx.x;
    const float z = sh.z[row];
    const float w = (sh.w_part[0][row] + sh.w_part[1][row]) * sh.inv_scale;
    const float dz = -(w / z) / z;
    sh.dz[row] = dz;
    if constexpr (U) {  // as the state pass's load_slice_scalars
      const bool in = row < it.rows;
      const float inv_z = in ? 1.0f / z : 1.0f, balance = operand_balance<T>(inv_z);
      sh.sums.inv_z[row] = inv_z;
      sh.sums.wz[row] = in ? dz * z / balance : 0.0f;
      if (balance != 1.0f) sh.sums.balanced = 1;  // (every writer writes 1)
    } else if (row < it.rows) {
      float* s = static_cast<float*>(a.scalars) + (it.bh * a.N + it.n0 + row) * 2;
      s[0] = z;
      s[1] = dz;
    }
  }
  __syncthreads();
}

// Phase 3's A operand from the raw q tile: phi(q) / z as hi (into phi_x, whose phase 1 readers
// are past a barrier) + lo, zero past the tile's rows or Dk (phi_chunk, as the state pass), 1 / z
// balanced with the do row (operand_balance; balance_do_tile scales that after phase 2).
template <class C, int DP, int S>
__device__ __forceinline__ void prepare_sum_operand(PairShared<typename C::T, DP, S, true>& sh, int stage,
                                                    const PairItem& it, int dk) {
  for (int c = threadIdx.x; c < PairTile<DP>::kCopyChunks; c += kThreads) {
    const int row = c / (DP / 8), col = c % (DP / 8) * 8;
    uint4* hi = reinterpret_cast<uint4*>(&sh.phi_x[row][col]);
    *hi = *reinterpret_cast<const uint4*>(&sh.x[stage][row][col]);
    const float inv_z = sh.sums.inv_z[row];
    phi_chunk<C>(hi, reinterpret_cast<uint4*>(&sh.sums.a_lo[row][col]), row < it.rows && col < dk,
                 inv_z * operand_balance<typename C::T>(inv_z));
  }
}

// Phase 3's B operand: each do row times 1 / operand_balance of its 1 / z, in place (phase 2,
// which reads do as it came, is past a barrier). Only when some row's balance is not 1.
template <class T, int DP, int S>
__device__ __forceinline__ void balance_do_tile(PairShared<T, DP, S, true>& sh, int stage) {
  for (int c = threadIdx.x; c < PairTile<DP>::kCopyChunks; c += kThreads) {
    const int row = c / (DP / 8), col = c % (DP / 8) * 8;
    const float balance = operand_balance<T>(sh.sums.inv_z[row]);
    if (balance != 1.0f) scale_chunk<T>(reinterpret_cast<uint4*>(&sh.y[stage][row][col]), 1.0f / balance);
  }
}

// The unit of dS sums a block is in: chunk `chunk` of head bh, whose items end before `end`.
struct SumUnit {
  int64_t bh, chunk, end;
  __device__ __forceinline__ void start(const PairArgs& a, int64_t unit) {
    bh = unit / a.units_per_head;
    chunk = unit - bh * a.units_per_head;
    set_end(a);
  }
  __device__ __forceinline__ void next(const PairArgs& a) {
    if (++chunk == a.units_per_head) {
      chunk = 0;
      ++bh;
    }
    set_end(a);
  }
  __device__ __forceinline__ void set_end(const PairArgs& a) {
    end = bh * a.ntiles + min_i64((chunk + 1) * a.unit_tiles, a.ntiles);
  }
};
__device__ __forceinline__ int64_t unit_first_item(const PairArgs& a, int64_t unit) {
  const int64_t bh = unit / a.units_per_head;
  return bh * a.ntiles + (unit - bh * a.units_per_head) * a.unit_tiles;
}

// The warp's part of unit u's dS and dm (kApplyWithStateSums, DP = 64: warp w sums Dk rows
// (w % 4) * 16 and Dv columns (w / 4) * 32, as the state pass's 64-wide tiles).
constexpr int kSumPairs = 2;  // 16-column pairs of n-tiles per warp
__device__ __forceinline__ void store_unit_sums(const PairArgs& a, const SumUnit& u,
                                                const WarpStateSums<float, 2 * kSumPairs>& sums, int warp_row,
                                                int warp_col) {
  StateArgs s;
  static_cast<Dims&>(s) = a;
  s.out_state = a.sums_out;
  s.out_mean = a.mean_out;
  s.nchunks = a.units_per_head;
  s.div = 1.0;
  StateItem it;
  it.bh = u.bh;
  it.chunk = u.chunk;
  it.k0 = it.v0 = 0;
  store_warp_sums<float, 2 * kSumPairs>(
      s, it, [&](int n, int i) { return static_cast<double>(sums.s[n][i]); },
      [&](int i) { return static_cast<double>(sums.m[i]); }, warp_row, warp_col);
}

// Stores f(h, col, value0, value1) of the warp's fragments as one 4-byte word per column pair
// into the token rows of the tile (below it.rows; columns below cols). The lane's two row
// pointers are formed once.
template <class T, int DP, class F>
__device__ __forceinline__ void store_pairs(const TokenTensor& t, const PairItem& it, int64_t heads, int cols,
                                            const float (&acc)[PairTile<DP>::kOwned][2][4], int warp_row,
                                            int col_group, F f) {
  const TokenView<T> view = token_view<T, uint32_t>(t, it.bh, heads);
  const int row = warp_row + static_cast<int>(threadIdx.x % 32) / 4;
  T* const rows[2] = {view.row(it.n0 + row), view.row(it.n0 + row + 8)};
  const bool in[2] = {row < it.rows, row + 8 < it.rows};
  for_each_pair<DP>(acc, cols, col_group, [&](int h, int col, float p0, float p1) {
    if (in[h]) {
      const float2 out = f(h, col, p0, p1);
      *reinterpret_cast<uint32_t*>(rows[h] + col) = pack_pair<T>(out.x, out.y);
    }
  });
}

// grad * phi'(x) of the 16-bit kernels: times_dphi with exp_fast (about 2^-22 relative, far
// below the gradient's 16-bit rounding).
template <FeatureMap Fm> __device__ __forceinline__ float times_dphi_fast(float grad, float x) {
  if constexpr (Fm == FeatureMap::kElu1) {
    const float e = exp_fast(x > 0.0f ? 0.0f : x);
    return x <= 0.0f ? grad * e : grad;
  }
  return times_dphi<Fm>(grad, x);
}

// A persistent grid: each block takes a contiguous range of items (token tiles fastest), so it
// loads a head's matrix once per run of that head's tiles; with the fused sums, a range of whole
// units.
template <class C, BackwardPass Pass, int DP, int S>
__global__ void __launch_bounds__(kThreads, kPairBlocks<DP, S>) la_backward_async_kernel(PairArgs a) {
  using T = typename C::T;
  using Tile = PairTile<DP>;
  constexpr bool kApplySide = Pass != BackwardPass::kState;
  constexpr bool kSums = Pass == BackwardPass::kApplyWithStateSums;
  static_assert(C::tc && kSixteenBit<T>, "the tensor-core variant of 16-bit inputs");
  static_assert(!kSums || DP == 64, "the fused sums' warp layout is the 64-wide one (store_unit_sums)");
  MMFAST_DYNAMIC_SHARED(smem);
  auto& sh = *reinterpret_cast<PairShared<T, DP, S, kSums>*>(smem);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int warp_row = (warp % 4) * 16, col_group = warp / 4;
  const int64_t items = a.ntiles * a.bh;
  int64_t first, last;
  SumUnit unit;  // kSums: the unit the current item belongs to
  WarpStateSums<float, 2 * kSumPairs> unit_sums;
  if constexpr (kSums) {
    const int64_t units = a.units_per_head * a.bh, per_block = ceil_div(units, gridDim.x);
    const int64_t u0 = blockIdx.x * per_block, u1 = min_i64(units, u0 + per_block);
    first = u0 < units ? unit_first_item(a, u0) : items;
    last = u1 < units ? unit_first_item(a, u1) : items;
    if (u0 < units) unit.start(a, u0);
    zero_sums(unit_sums);
  } else {
    const int64_t per_block = ceil_div(items, gridDim.x);
    first = blockIdx.x * per_block;
    last = min_i64(items, first + per_block);
  }
  const int steps_k = static_cast<int>(ceil_div(a.dk, 16)), steps_v = static_cast<int>(ceil_div(a.dv, 16));
  const float inv_n = 1.0f / static_cast<float>(a.N);
  const auto issue = [&](int64_t item, int stage) {
    if (item < last) {
      const PairItem it = pair_item(a, item);
      copy_token_tile<T, DP>(sh.x[stage], a.x, it, a.heads, a.dk);
      copy_token_tile<T, DP>(sh.y[stage], a.y, it, a.heads, a.dv);
    }
    cp_async_commit();
  };
  // The g-th item of the block lands in stage g % S, one commit group per item (empty past last).
  for (int g = 0; g < S - 1; ++g) issue(first + g, g);
  int64_t loaded_bh = -1;
  int stage = 0;
  for (int64_t item = first; item < last; ++item, stage = stage + 1 == S ? 0 : stage + 1) {
    cp_async_wait<S - 2>();  // this thread's copies of the item landed
    __syncthreads();         // everyone's; the previous item's readers of its stage are done
    issue(item + S - 1, stage == 0 ? S - 1 : stage - 1);  // into the previous item's stage
    const PairItem it = pair_item(a, item);
    if (it.bh != loaded_bh) {  // block-uniform
      load_pair_matrix(a, it.bh, sh);
      loaded_bh = it.bh;
    }
    for (int c = threadIdx.x; c < Tile::kCopyChunks; c += kThreads) {
      const int row = c / (DP / 8), col = c % (DP / 8) * 8;
      uint4* dst = reinterpret_cast<uint4*>(&sh.phi_x[row][col]);
      *dst = *reinterpret_cast<const uint4*>(&sh.x[stage][row][col]);
      phi_chunk<C>(dst, nullptr, row < it.rows && col < a.dk);
    }
    __syncthreads();
    if constexpr (kApplySide) pair_tile_z(sh, a.dk, static_cast<float>(a.eps));

    float acc[Tile::kOwned][2][4] = {};
    multiply_pair<T, DP, true>(acc, sh.phi_x, &sh.m_hi[0][0], &sh.m_lo[0][0], steps_k, steps_v, warp_row, col_group);
    if constexpr (kApplySide) {
      apply_backward_dz(a, it, sh, stage, acc, warp_row, col_group);
      if constexpr (kSums) prepare_sum_operand<C>(sh, stage, it, a.dk);  // read after phase 2's barrier
    } else {
      const float factor = sh.inv_scale * inv_n;
      store_pairs<T, DP>(a.grad_y, it, a.heads, a.dv, acc, warp_row, col_group,
                         [&](int, int, float p0, float p1) { return make_float2(p0 * factor, p1 * factor); });
    }

    float acc_u[Tile::kOwned][2][4] = {};
    multiply_pair<T, DP, false>(acc_u, sh.y[stage], &sh.m_hi[0][0], &sh.m_lo[0][0], steps_v, steps_k, warp_row,
                                col_group);
    // grad_x = phi'(x) * (U u_scale[h] + m shift[h]): apply (U / z + dz m), state (U + dm) / N.
    const int row = warp_row + static_cast<int>(threadIdx.x % 32) / 4;
    float u_scale[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (kApplySide) {
        u_scale[h] = sh.inv_scale / sh.z[row + 8 * h];
        shift[h] = sh.dz[row + 8 * h];
      } else {
        u_scale[h] = sh.inv_scale * inv_n;
        shift[h] = inv_n;
      }
    }
    const T (&x_raw)[kPairTokens][Tile::kLd] = sh.x[stage];
    store_pairs<T, DP>(a.grad_x, it, a.heads, a.dk, acc_u, warp_row, col_group,
                       [&](int h, int col, float u0, float u1) {
                         const float2 x = shared_pair(&x_raw[row + 8 * h][col]);
                         const float g0 = u0 * u_scale[h] + sh.vec[col] * shift[h];
                         const float g1 = u1 * u_scale[h] + sh.vec[col + 1] * shift[h];
                         return make_float2(times_dphi_fast<C::fm>(g0, x.x), times_dphi_fast<C::fm>(g1, x.y));
                       });
    if constexpr (kSums) {
      if (sh.sums.balanced) {  // block-uniform: set before apply_backward_dz's last barrier
        __syncthreads();       // phase 2's readers of do are done
        balance_do_tile(sh, stage);
      }
      __syncthreads();  // phase 3's operands prepared
      WarpStateSums<float, 2 * kSumPairs> item_sums;
      zero_sums(item_sums);
      multiply_weighted_sums<T, true, kPairTokens, kSumPairs>(item_sums, sh.phi_x, sh.sums.a_lo, sh.y[stage],
                                                                sh.sums.wz, warp_row, col_group * 32);
      add_sums(unit_sums, item_sums);
      if (item + 1 == unit.end) {  // block-uniform
        store_unit_sums(a, unit, unit_sums, warp_row, col_group * 32);
        zero_sums(unit_sums);
        unit.next(a);
      }
    }
  }
  cp_async_wait<0>();
}

// Whether the tensor-core kernel takes the pass: 16-bit inputs on the tensor-core path, rows
// cp.async copies whole (X, Y) and gradients stored as 4-byte pairs, fewer than 2^32 items (its
// 32-bit decoding), a matrix that fits a block's shared memory, code compiled for sm_80+.
template <class C, BackwardPass Pass, int DP, int S> bool use_backward_async(const PairArgs& a) {
  using T = typename C::T;
  if constexpr (!C::tc) {
    return false;
  } else {
    constexpr bool sums = Pass == BackwardPass::kApplyWithStateSums;
    const size_t b = sizeof(T);
    return async_copy_enabled() && a.ntiles * a.bh <= static_cast<int64_t>(UINT32_MAX) &&
           rows_16b_aligned(a.x, a.dk, b) && rows_16b_aligned(a.y, a.dv, b) && rows_aligned(a.grad_x, a.dk, b, 4) &&
           (Pass != BackwardPass::kState || rows_aligned(a.grad_y, a.dv, b, 4)) &&
           kPairSmem<T, DP, S, sums> <= max_shared_per_block() &&
           compiled_for(&la_backward_async_kernel<C, Pass, DP, S>, 80);
  }
}

// MMFAST_CUDA_LA_BACKWARD_FUSED=0 leaves apply_backward's dS and dm to the state pass afterwards
// (an A/B switch; so does MMFAST_CUDA_LA_BACKWARD_3BLOCKS=1, whose registers leave no room).
inline bool fused_state_sums_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_LA_BACKWARD_FUSED");
  return enabled;
}

// The fused sums' units (kApplyWithStateSums): unit_tiles token tiles of a head each. The fp32
// adds of a unit's items round at most kMaxSumUnitTiles times (2^-24 each; with the items' 8
// mma accumulations, even truncating ones, about 5e-6 relative: the state pass's bound is
// 1e-5); within that, unit_tiles minimises the busiest block's work at the resident grid
// (kPairBlocks per SM): its rounds of units, each a partial written, plus its share of the
// reduction's reads, a partial counted as its bytes in 16-bit token tiles.
constexpr int64_t kMaxSumUnitTiles = 64;
struct SumPlan {
  int64_t unit_tiles = 1, units_per_head = 1;
  size_t partial_bytes = 0;  // 0 with one unit per head (the kernel writes dS and dm)
};
inline SumPlan plan_state_sums(int64_t bh, int64_t ntiles, int64_t dk, int64_t dv, int sms) {
  SumPlan plan;
  const double grid = static_cast<double>(sms > 0 ? sms : 1) * kPairBlocks<64, 3>;
  const double partial = static_cast<double>(dk * dv + dk) * 4.0 / (kPairTokens * (dk + dv) * 2.0);
  double best = std::numeric_limits<double>::infinity();
  for (int64_t tiles = 1; tiles <= min_i64(kMaxSumUnitTiles, ntiles); ++tiles) {
    const double units = static_cast<double>(bh * ceil_div(ntiles, tiles));
    const double cost = std::ceil(units / grid) * (static_cast<double>(tiles) + partial) + units * partial / grid;
    if (cost <= best) {  // ties: the longer units
      best = cost;
      plan.unit_tiles = tiles;
    }
  }
  plan.units_per_head = ceil_div(ntiles, plan.unit_tiles);
  if (plan.units_per_head > 1)
    plan.partial_bytes = static_cast<size_t>(bh * plan.units_per_head * (dk * dv + dk)) * sizeof(float);
  return plan;
}
inline SumPlan plan_state_sums(const LinearAttentionParams& p, int sms) {
  return plan_state_sums(p.bh(), ceil_div(p.seqlen, kPairTokens), p.dim_k, p.dim_v, sms);
}
// Whether apply_backward may take the fused sums (16-bit inputs, the 64-wide tiles): the
// workspace counts their partials only then.
inline bool may_fuse_state_sums(const LinearAttentionParams& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && pair_dim(p.dim_k, p.dim_v) == 64;
}

// The pass's operands from the op's parameters (dims: make_dims(p)).
template <BackwardPass Pass> PairArgs pair_args(const LinearAttentionParams& p, const Dims& dims) {
  PairArgs a;
  static_cast<Dims&>(a) = dims;
  if constexpr (Pass != BackwardPass::kState) {
    a.x = p.q;
    a.y = p.grad_out;
    a.grad_x = p.grad_q;
    a.matrix = p.state;
    a.vec = p.mean;
    a.scalars = p.workspace;  // (z, dz) per token: the start of the apply_backward workspace
  } else {
    a.x = p.k;
    a.y = p.v;
    a.grad_x = p.grad_k;
    a.grad_y = p.grad_v;
    a.matrix = p.grad_state;
    a.vec = p.grad_mean;
  }
  return a;
}

template <class C, BackwardPass Pass, int DP, int S>
cudaError_t launch_pair_kernel(const PairArgs& a, int64_t work, cudaStream_t stream, bool& launched) {
  constexpr size_t smem = kPairSmem<typename C::T, DP, S, Pass == BackwardPass::kApplyWithStateSums>;  // > 48 KB: opt in
  unsigned grid = 0;  // no block resident: the caller's other kernel instead (launched stays false)
  if (!fits_persistent_grid(&la_backward_async_kernel<C, Pass, DP, S>, kThreads, smem, work, grid)) return cudaSuccess;
  launched = true;
  MMFAST_LAUNCH((la_backward_async_kernel<C, Pass, DP, S>), grid, kThreads, smem, stream, a);
  return cudaGetLastError();
}

// apply_backward with dS and dm summed in the kernel (partials: the workspace after the (z, dz)
// scalars, which it does not write), then the fixed-order reduction when a head has several
// units. Runs where the 64-wide 3-stage kernel does and the switch is on (summed says so).
template <class C>
cudaError_t launch_apply_backward_with_sums(const LinearAttentionParams& p, PairArgs a, void* partials, int sms,
                                           cudaStream_t stream, bool& summed) {
  summed = false;
  constexpr BackwardPass kPass = BackwardPass::kApplyWithStateSums;
  if (!fused_state_sums_enabled() || pair_stages(64) != 3 || !use_backward_async<C, kPass, 64, 3>(a))
    return cudaSuccess;
  const SumPlan plan = plan_state_sums(p, sms > 0 ? sms : sm_count());  // the sms that sized the workspace
  a.unit_tiles = plan.unit_tiles;
  a.units_per_head = plan.units_per_head;
  a.sums_out = plan.units_per_head > 1 ? partials : p.grad_state;
  a.mean_out = p.grad_mean;
  cudaError_t err = launch_pair_kernel<C, kPass, 64, 3>(a, a.units_per_head * a.bh, stream, summed);
  if (err != cudaSuccess || !summed || plan.units_per_head == 1) return err;
  const int64_t total = a.bh * (a.dk * a.dv + a.dk);
  MMFAST_LAUNCH(la_state_reduce_kernel<float>, grid_for(ceil_div(total, kThreads)), kThreads, 0, stream,
                static_cast<const float*>(partials), static_cast<float*>(p.grad_state),
                static_cast<float*>(p.grad_mean), a.bh, plan.units_per_head, a.dk, a.dv, 1.0);
  return cudaGetLastError();
}

// Launches the tensor-core kernel when it takes the pass (launched says so). apply_backward
// (Pass kApply) also sums dS and dm where it can (summed says so; partials: its workspace for
// them, sized for sms SMs); else the state pass sums them afterwards.
template <class C, BackwardPass Pass>
cudaError_t launch_backward_async(const LinearAttentionParams& p, const Dims& dims, cudaStream_t stream,
                                  bool& launched, void* partials = nullptr, bool* summed = nullptr, int sms = 0) {
  static_assert(Pass != BackwardPass::kApplyWithStateSums, "chosen here (kApply)");
  const PairArgs a = pair_args<Pass>(p, dims);
  launched = false;
  if (summed != nullptr) *summed = false;
  const auto with_dim = [&](auto dim) -> cudaError_t {
    constexpr int DP = decltype(dim)::value;
    const auto with_stages = [&](auto stages) -> cudaError_t {
      constexpr int S = decltype(stages)::value;
      if (!use_backward_async<C, Pass, DP, S>(a)) return cudaSuccess;
      return launch_pair_kernel<C, Pass, DP, S>(a, a.ntiles * a.bh, stream, launched);
    };
    if constexpr (DP == 64) {
      if constexpr (Pass == BackwardPass::kApply) {
        if (summed != nullptr) {
          const cudaError_t err = launch_apply_backward_with_sums<C>(p, a, partials, sms, stream, *summed);
          launched = *summed;
          if (err != cudaSuccess || *summed) return err;
        }
      }
      if (pair_stages(DP) == 3) return with_stages(std::integral_constant<int, 3>{});
    }
    return with_stages(std::integral_constant<int, 2>{});
  };
  switch (pair_dim(a.dk, a.dv)) {
    case 64: return with_dim(std::integral_constant<int, 64>{});
    case 80: return with_dim(std::integral_constant<int, 80>{});
    case 128: return with_dim(std::integral_constant<int, 128>{});
    case 160: return with_dim(std::integral_constant<int, 160>{});
  }
  return cudaSuccess;  // past 160: the register-staged kernels
}

}  // namespace la
}  // namespace cuda
}  // namespace mmfast
