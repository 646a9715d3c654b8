// Torch-free CUDA kernels and host launchers of the non-causal normalized linear attention
// (LinFusion). See mmfast/linear_attention.h for the math and the parameter struct.
//
// Everything here is plain CUDA: raw pointers, int64 strides, a cudaStream_t, and cudaError_t
// results. No torch / ATen / c10 header may be included from this file.
//
// Implementation: SIMT fp32-FMA (fp64 for fp64 inputs) with 64x64 output tiles per 256-thread
// block (a 4x4 register tile per thread) and a 32-deep contraction step staged through shared
// memory. Token tensors are read in place through their (B, N, H) strides; phi is applied on
// load; every load and store is bounds-checked, so no head dim or sequence length has to be a
// multiple of anything.
//
// Kernels (all grids are 1-D with a grid-stride loop over "work items", so no grid limit is hit):
//   la_state_kernel          split-N state pass: item = (Dk tile, Dv tile, N chunk, b*h).
//                            Writes fp32 partial [S | m] per chunk into the workspace, or the final
//                            state directly when there is a single chunk.
//   la_state_reduce_kernel   sums the per-chunk partials in a fixed order (deterministic) and
//                            divides by N (forward) or 1 (apply_backward).
//   la_apply_kernel          item = (Dv tile, 64-token tile, b*h): out = phi(q) S / (phi(q).m + eps).
//   la_apply_bwd_kernel      item = (64-token tile, b*h): z, dz and dq for the tile (loops over all
//                            Dv then all Dk tiles inside the block); stores (z, dz) per token into
//                            the workspace for the dS / dm pass, which is la_state_kernel run on
//                            (phi(q), grad_out / z) with mean weights dz.
//   la_state_bwd_kernel      item = (output tile, 64-token tile, b*h): output tiles are the Dv
//                            tiles of dv = phi(k) dS / N, then the Dk tiles of
//                            dk = phi'(k) (v dS^T + dm) / N.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#ifndef MMFAST_CUDA_EMULATED
#include <mma.h>
#endif

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "mmfast/linear_attention.h"

namespace mmfast {
namespace cuda {
namespace detail {

// ---- tiling constants ------------------------------------------------------------------
constexpr int kThreads = 256;        // 16 x 16 threads, each owning a 4 x 4 output tile
constexpr int kTile = 64;            // output tile edge (rows: tokens or Dk; cols: Dv or Dk)
constexpr int kBK = 32;              // contraction depth staged per step (head dim or tokens)
constexpr int kLd = kTile + 4;       // smem row length; +4 keeps 16 B alignment, breaks conflicts
constexpr int kMaxD = 256;           // == kMaxHeadDim
constexpr int64_t kMinChunk = 256;   // minimum tokens per split-N chunk of the state pass
constexpr int kChunkOversub = 4;     // state-pass grid target: kChunkOversub x SM count blocks
constexpr int64_t kMaxGrid = INT_MAX;

static_assert(kThreads == (kTile / 4) * (kTile / 4), "one 4x4 register tile per thread");
static_assert(kTile * 4 == kThreads, "z / row reductions use 4 threads per token row");
static_assert(kMaxD == kMaxHeadDim, "kMaxD must match kMaxHeadDim");

// ---- scalar types ----------------------------------------------------------------------
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// phi(x): 0 = none, 1 = elu(x) + 1, 2 = relu (FeatureMap values). NaN propagates.
template <class A> __device__ __forceinline__ A phi(A x, int fm) {
  if (fm == static_cast<int>(FeatureMap::kElu1)) return x > A(0) ? x + A(1) : exp_acc(x);
  if (fm == static_cast<int>(FeatureMap::kRelu)) return (x > A(0) || x != x) ? x : A(0);
  return x;
}

// phi'(x): elu1 -> 1 if x > 0 else exp(x); relu -> 1 if x > 0 else 0; none -> 1.
template <class A> __device__ __forceinline__ A dphi(A x, int fm) {
  if (fm == static_cast<int>(FeatureMap::kElu1)) return x > A(0) ? A(1) : exp_acc(x);
  if (fm == static_cast<int>(FeatureMap::kRelu)) return x > A(0) ? A(1) : A(0);
  return A(1);
}

__device__ __forceinline__ void load4(const float* p, float (&r)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&r)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  r[0] = a.x; r[1] = a.y; r[2] = b.x; r[3] = b.y;
}

// A (b, h) view of one token tensor: element (n, d) at base[n * sn + d].
template <class T> struct TokenView {
  T* base;
  int64_t sn;
  __device__ __forceinline__ T* row(int64_t n) const { return base + n * sn; }
};

template <class T>
__device__ __forceinline__ TokenView<T> token_view(const TokenTensor& t, int64_t bh, int64_t heads) {
  const int64_t b = bh / heads, h = bh - b * heads;
  TokenView<T> v;
  v.base = static_cast<T*>(t.data) + b * t.stride_b + h * t.stride_h;
  v.sn = t.stride_n;
  return v;
}

// ---- block-level building blocks -----------------------------------------------------
// Shared tile layout: dst[l * kLd + x], x in [0, kTile) (output row or column), l in [0, kBK)
// (contraction index). f(x, l) must return 0 outside the valid range.
// XFast: consecutive threads take consecutive x (source contiguous along x); else consecutive l.
template <bool XFast, class A, class F>
__device__ __forceinline__ void stage_tile(A* __restrict__ dst, F f) {
  for (int idx = threadIdx.x; idx < kBK * kTile; idx += kThreads) {
    int x, l;
    if (XFast) {
      x = idx % kTile;
      l = idx / kTile;
    } else {
      l = idx % kBK;
      x = idx / kBK;
    }
    dst[l * kLd + x] = f(x, l);
  }
}

// acc[i][j] += sum_l As[l][ty*4+i] * Bs[l][tx*4+j]
template <class A>
__device__ __forceinline__ void fma_tile(A (&acc)[4][4], const A* __restrict__ As, const A* __restrict__ Bs, int ty,
                                         int tx) {
#pragma unroll 4
  for (int l = 0; l < kBK; ++l) {
    A a[4], b[4];
    load4(As + l * kLd + ty * 4, a);
    load4(Bs + l * kLd + tx * 4, b);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
  }
}

template <class A> __device__ __forceinline__ void zero_acc(A (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
}

// acc = sum_{l < L} FA(i, l) * FB(l, j) for the 64 x 64 tile (i = ty*4 + ., j = tx*4 + .).
// FA(i, l) / FB(l, j) return 0 outside the valid range. Starts and ends with __syncthreads(),
// so the caller may reuse As / Bs and any other shared memory around it.
template <bool AXFast, bool BXFast, class A, class FA, class FB>
__device__ __forceinline__ void gemm_tile(A (&acc)[4][4], int L, FA fa, FB fb, A* As, A* Bs, int ty, int tx) {
  zero_acc(acc);
  for (int l0 = 0; l0 < L; l0 += kBK) {
    __syncthreads();
    stage_tile<AXFast>(As, [&](int x, int l) { return fa(x, l0 + l); });
    stage_tile<BXFast>(Bs, [&](int x, int l) { return fb(l0 + l, x); });
    __syncthreads();
    fma_tile(acc, As, Bs, ty, tx);
  }
  __syncthreads();
}

// ---- tensor-core (TF32 WMMA, sm_80+) twins of fma_tile / gemm_tile ------------------------
// Used for fp16/bf16 inputs: operands are the same fp32 shared tiles, rounded to TF32 (10
// mantissa bits, as many as fp16 has) inside the fragments, with fp32 accumulation. Each of
// the 8 warps owns a 16 x 32 strip of the 64 x 64 tile: rows (warp / 2) * 16, columns
// (warp % 2) * 32 + {0, 16}. fp32 and fp64 inputs keep the exact SIMT path.
namespace wmma = nvcuda::wmma;
using TcFragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using TcFragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TcFragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
constexpr int kTcSmemFloats = kTile * kLd;  // the 64 x 64 tile moved out of the fragments

static_assert(kThreads == 8 * 32 && kTile == 64 && kBK % 8 == 0, "warp layout of the tensor-core tile");
static_assert(kLd % 4 == 0 && (8 * kLd * 4) % 32 == 0, "WMMA tf32 loads need ldm % 4 == 0 and 32-byte aligned rows");

template <class Frag>
__device__ __forceinline__ void round_to_tf32(Frag& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

__device__ __forceinline__ void tc_zero(TcFragC (&c)[2]) {
  wmma::fill_fragment(c[0], 0.0f);
  wmma::fill_fragment(c[1], 0.0f);
}

// c += sum_l As[l][x] * Bs[l][y] over one staged kBK slice (As, Bs 32-byte aligned).
__device__ __forceinline__ void mma_tile(TcFragC (&c)[2], const float* As, const float* Bs) {
  const int warp = threadIdx.x / 32;
  const int m0 = (warp / 2) * 16, n0 = (warp % 2) * 32;
#pragma unroll
  for (int k0 = 0; k0 < kBK; k0 += 8) {
    TcFragA a;
    wmma::load_matrix_sync(a, As + k0 * kLd + m0, kLd);
    round_to_tf32(a);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      TcFragB b;
      wmma::load_matrix_sync(b, Bs + k0 * kLd + n0 + 16 * j, kLd);
      round_to_tf32(b);
      wmma::mma_sync(c[j], a, b, c[j]);
    }
  }
}

// acc[i][j] = tile[ty*4 + i][tx*4 + j]: the fragments, through shared memory Cs, into the
// per-thread layout the SIMT epilogues use. Starts and ends with __syncthreads().
__device__ __forceinline__ void tc_to_acc(TcFragC (&c)[2], float* Cs, float (&acc)[4][4], int ty, int tx) {
  const int warp = threadIdx.x / 32;
  const int m0 = (warp / 2) * 16, n0 = (warp % 2) * 32;
  __syncthreads();
  wmma::store_matrix_sync(Cs + m0 * kLd + n0, c[0], kLd, wmma::mem_row_major);
  wmma::store_matrix_sync(Cs + m0 * kLd + n0 + 16, c[1], kLd, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) load4(Cs + (ty * 4 + i) * kLd + tx * 4, acc[i]);
  __syncthreads();
}

// gemm_tile on tensor cores (same staging, same contract).
template <bool AXFast, bool BXFast, class FA, class FB>
__device__ __forceinline__ void gemm_tile_tc(float (&acc)[4][4], int L, FA fa, FB fb, float* As, float* Bs, float* Cs,
                                             int ty, int tx) {
  TcFragC c[2];
  tc_zero(c);
  for (int l0 = 0; l0 < L; l0 += kBK) {
    __syncthreads();
    stage_tile<AXFast>(As, [&](int x, int l) { return fa(x, l0 + l); });
    stage_tile<BXFast>(Bs, [&](int x, int l) { return fb(l0 + l, x); });
    __syncthreads();
    mma_tile(c, As, Bs);
  }
  tc_to_acc(c, Cs, acc, ty, tx);
}

// Shared memory for the tensor-core epilogue: only float accumulators use it.
template <class A> struct TcScratch { static constexpr int floats = 8; };
template <> struct TcScratch<float> { static constexpr int floats = kTcSmemFloats; };

// gemm_tile on tensor cores when use_tc (float accumulators only), else on the FMA units.
template <bool AXFast, bool BXFast, class A, class FA, class FB>
__device__ __forceinline__ void gemm_tile_auto(bool use_tc, A (&acc)[4][4], int L, FA fa, FB fb, A* As, A* Bs, A* Cs,
                                               int ty, int tx) {
  if constexpr (TcScratch<A>::floats == kTcSmemFloats) {
    if (use_tc) {
      gemm_tile_tc<AXFast, BXFast>(acc, L, fa, fb, As, Bs, Cs, ty, tx);
      return;
    }
  }
  gemm_tile<AXFast, BXFast>(acc, L, fa, fb, As, Bs, ty, tx);
}

// zs[r] = phi(q[n0 + r]) . m + eps for the 64 rows of a token tile (0 + eps past N).
// m is in shared memory (length Dk). 4 threads per row, combined with warp shuffles.
template <class T, class A>
__device__ __forceinline__ void tile_z(A* zs, const TokenView<const T>& q, int64_t n0, int64_t N, int Dk,
                                       const A* ms, A eps, int fm) {
  const int r = threadIdx.x >> 2, part = threadIdx.x & 3;
  const int64_t n = n0 + r;
  A s = A(0);
  if (n < N) {
    const T* row = q.row(n);
    for (int k = part; k < Dk; k += 4) s += phi(to_acc(row[k]), fm) * ms[k];
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  if (part == 0) zs[r] = s + eps;
}

__device__ __forceinline__ int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- kernel arguments --------------------------------------------------------------------
// Sizes every kernel needs; each kernel's argument struct extends it.
struct Dims {
  int64_t bh, heads, N, ntiles;  // ntiles = kTile-token tiles of the sequence
  int dk, dv, tiles_k, tiles_v, fm;
  int use_tc;                    // 1: tensor-core products (fp16/bf16 inputs on sm_80+)
  double eps;
};

struct StateArgs : Dims {
  TokenTensor k;          // phi(k) side (q for apply_backward)
  TokenTensor v;          // v side (grad_out for apply_backward)
  const void* scalars;    // nullptr (forward) or (z, dz) per token: [bh][N][2] accumulator type
  void* out_state;        // partials [bh][nchunks][Dk*Dv + Dk], or final state when nchunks == 1
  void* out_mean;         // final mean when nchunks == 1 (unused otherwise)
  int64_t chunk, nchunks;
  double div;             // divisor of the final result when nchunks == 1 (N or 1)
};

// Split-N state pass. Work item = (tile_k, tile_v, chunk, bh) with the tile index fastest, so
// blocks sharing a chunk's tokens run together and hit L2.
// Accumulates S_tile[i][j] = sum_t phi(k_t)[k0+i] * v_t[v0+j] / z_t and (tile_v == 0 only)
// m[k0+i] = sum_t phi(k_t)[k0+i] * w_t, with z_t = 1, w_t = 1 (forward) or z_t, w_t = dz_t
// read from the scalars buffer (apply_backward).
template <class T>
__global__ void __launch_bounds__(kThreads) la_state_kernel(StateArgs a) {
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  __shared__ A zsh[kBK];
  __shared__ A wsh[kBK];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  constexpr bool kTcCapable = TcScratch<A>::floats == kTcSmemFloats;
  const bool use_tc = kTcCapable && a.use_tc;
  const int64_t tiles = static_cast<int64_t>(a.tiles_k) * a.tiles_v;
  const int64_t items = tiles * a.nchunks * a.bh;
  const A* scal = static_cast<const A*>(a.scalars);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = item % tiles;
    const int64_t rest = item / tiles;
    const int64_t chunk = rest % a.nchunks;
    const int64_t bh = rest / a.nchunks;
    const int tk = static_cast<int>(tile / a.tiles_v), tv = static_cast<int>(tile % a.tiles_v);
    const int k0 = tk * kTile, v0 = tv * kTile;
    const TokenView<const T> kk = token_view<const T>(a.k, bh, a.heads);
    const TokenView<const T> vv = token_view<const T>(a.v, bh, a.heads);
    const int64_t t_begin = chunk * a.chunk;
    int64_t t_end = t_begin + a.chunk;
    if (t_end > a.N) t_end = a.N;
    const bool do_mean = (tv == 0) && (tx == 0);

    A acc[4][4];
    zero_acc(acc);
    A msum[4] = {A(0), A(0), A(0), A(0)};
    TcFragC tc_acc[2];
    if constexpr (kTcCapable) tc_zero(tc_acc);

    for (int64_t t0 = t_begin; t0 < t_end; t0 += kBK) {
      __syncthreads();  // previous step's readers are done with As / Bs / zsh / wsh
      if (threadIdx.x < kBK) {
        const int64_t t = t0 + threadIdx.x;
        A z = A(1), w = A(1);
        if (t < t_end && scal != nullptr) {
          const A* s = scal + (bh * a.N + t) * 2;
          z = s[0];
          w = s[1];
        }
        zsh[threadIdx.x] = z;
        wsh[threadIdx.x] = (t < t_end) ? w : A(0);
      }
      __syncthreads();
      // A: rows = Dk (x), contraction = tokens (l); source contiguous along Dk.
      stage_tile<true>(As, [&](int x, int l) {
        const int64_t t = t0 + l;
        const int d = k0 + x;
        return (t < t_end && d < a.dk) ? phi(to_acc(kk.row(t)[d]), a.fm) : A(0);
      });
      stage_tile<true>(Bs, [&](int x, int l) {
        const int64_t t = t0 + l;
        const int d = v0 + x;
        return (t < t_end && d < a.dv) ? to_acc(vv.row(t)[d]) / zsh[l] : A(0);
      });
      __syncthreads();
      if constexpr (kTcCapable) {
        if (use_tc) mma_tile(tc_acc, As, Bs);
        else fma_tile(acc, As, Bs, ty, tx);
      } else {
        fma_tile(acc, As, Bs, ty, tx);
      }
      if (do_mean) {
#pragma unroll 4
        for (int l = 0; l < kBK; ++l) {
          A x[4];
          load4(As + l * kLd + ty * 4, x);
          const A w = wsh[l];
#pragma unroll
          for (int i = 0; i < 4; ++i) msum[i] += x[i] * w;
        }
      }
    }

    if constexpr (kTcCapable) {
      if (use_tc) tc_to_acc(tc_acc, Cs, acc, ty, tx);
    }

    const int64_t dkdv = static_cast<int64_t>(a.dk) * a.dv;
    if (a.nchunks == 1) {
      const A div = static_cast<A>(a.div);
      A* S = static_cast<A*>(a.out_state) + bh * dkdv;
      A* M = static_cast<A*>(a.out_mean) + bh * a.dk;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = k0 + ty * 4 + i;
        if (r >= a.dk) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = v0 + tx * 4 + j;
          if (c < a.dv) S[static_cast<int64_t>(r) * a.dv + c] = acc[i][j] / div;
        }
        if (do_mean) M[r] = msum[i] / div;
      }
    } else {
      A* P = static_cast<A*>(a.out_state) + (bh * a.nchunks + chunk) * (dkdv + a.dk);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = k0 + ty * 4 + i;
        if (r >= a.dk) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = v0 + tx * 4 + j;
          if (c < a.dv) P[static_cast<int64_t>(r) * a.dv + c] = acc[i][j];
        }
        if (do_mean) P[dkdv + r] = msum[i];
      }
    }
  }
}

// Sums the nchunks partials of every (bh, element) in chunk order and divides by div.
template <class A>
__global__ void __launch_bounds__(kThreads)
    la_state_reduce_kernel(const A* __restrict__ partials, A* __restrict__ state, A* __restrict__ mean, int64_t bh,
                           int64_t nchunks, int dk, int dv, double div) {
  const int64_t dkdv = static_cast<int64_t>(dk) * dv;
  const int64_t E = dkdv + dk;
  const int64_t total = bh * E;
  const A d = static_cast<A>(div);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / E, r = e - b * E;
    const A* p = partials + b * nchunks * E + r;
    A s = A(0);
    for (int64_t c = 0; c < nchunks; ++c) s += p[c * E];
    s = s / d;
    if (r < dkdv)
      state[b * dkdv + r] = s;
    else
      mean[b * dk + (r - dkdv)] = s;
  }
}

struct ApplyArgs : Dims {
  TokenTensor q, out;
  const void* state;
  const void* mean;
};

// out[n0+i][v0+j] = (phi(q) S)[.] / (phi(q) . m + eps). Item = (tile_v, token tile, bh).
template <class T>
__global__ void __launch_bounds__(kThreads) la_apply_kernel(ApplyArgs a) {
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
    const int tv = static_cast<int>(item % a.tiles_v);
    const int64_t rest = item / a.tiles_v;
    const int64_t nt = rest % a.ntiles;
    const int64_t bh = rest / a.ntiles;
    const int v0 = tv * kTile;
    const int64_t n0 = nt * kTile;
    const TokenView<const T> q = token_view<const T>(a.q, bh, a.heads);
    const TokenView<T> out = token_view<T>(a.out, bh, a.heads);
    const A* S = static_cast<const A*>(a.state) + bh * static_cast<int64_t>(a.dk) * a.dv;
    const A* M = static_cast<const A*>(a.mean) + bh * a.dk;

    __syncthreads();  // previous item's readers of ms / zs are done
    for (int k = threadIdx.x; k < a.dk; k += kThreads) ms[k] = M[k];
    __syncthreads();
    tile_z<T, A>(zs, q, n0, a.N, a.dk, ms, eps, a.fm);

    A acc[4][4];
    const auto phi_q = [&](int i, int l) -> A {
      const int64_t n = n0 + i;
      return (n < a.N && l < a.dk) ? phi(to_acc(q.row(n)[l]), a.fm) : A(0);
    };
    const auto state = [&](int l, int j) -> A {
      const int c = v0 + j;
      return (l < a.dk && c < a.dv) ? S[static_cast<int64_t>(l) * a.dv + c] : A(0);
    };
    gemm_tile_auto<false, true>(a.use_tc, acc, a.dk, phi_q, state, As, Bs, Cs, ty, tx);  // ends with a barrier

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty * 4 + i;
      const int64_t n = n0 + r;
      if (n >= a.N) continue;
      const A z = zs[r];
      T* orow = out.row(n);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = v0 + tx * 4 + j;
        if (c < a.dv) orow[c] = from_acc<T>(acc[i][j] / z);
      }
    }
  }
}

struct ApplyBwdArgs : Dims {
  TokenTensor q, grad_out, grad_q;
  const void* state;
  const void* mean;
  void* scalars;  // out: (z, dz) per token, [bh][N][2]
};

// Per 64-token tile of one (b, h):
//   z_i = phi(q_i) . m + eps
//   w_i = do_i . (phi(q_i) S)                (loop over Dv tiles)
//   dz_i = -(w_i / z_i) / z_i                ( = -(g_i . o_i) )
//   dq_i = phi'(q_i) * ((do_i S^T) / z_i + dz_i m)   (loop over Dk tiles)
// and stores (z_i, dz_i) for the dS / dm pass.
template <class T>
__global__ void __launch_bounds__(kThreads) la_apply_bwd_kernel(ApplyBwdArgs a) {
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  __shared__ A ms[kMaxD];
  __shared__ A zs[kTile];
  __shared__ A ws[kTile];
  __shared__ A dzs[kTile];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t items = a.ntiles * a.bh;
  const A eps = static_cast<A>(a.eps);
  A* scal = static_cast<A*>(a.scalars);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t nt = item % a.ntiles;
    const int64_t bh = item / a.ntiles;
    const int64_t n0 = nt * kTile;
    const TokenView<const T> q = token_view<const T>(a.q, bh, a.heads);
    const TokenView<const T> dout = token_view<const T>(a.grad_out, bh, a.heads);
    const TokenView<T> dq = token_view<T>(a.grad_q, bh, a.heads);
    const A* S = static_cast<const A*>(a.state) + bh * static_cast<int64_t>(a.dk) * a.dv;
    const A* M = static_cast<const A*>(a.mean) + bh * a.dk;

    __syncthreads();
    for (int k = threadIdx.x; k < a.dk; k += kThreads) ms[k] = M[k];
    if (threadIdx.x < kTile) ws[threadIdx.x] = A(0);
    __syncthreads();
    tile_z<T, A>(zs, q, n0, a.N, a.dk, ms, eps, a.fm);

    auto phi_q = [&](int i, int l) -> A {
      const int64_t n = n0 + i;
      return (n < a.N && l < a.dk) ? phi(to_acc(q.row(n)[l]), a.fm) : A(0);
    };
    auto dout_at = [&](int i, int l) -> A {
      const int64_t n = n0 + i;
      return (n < a.N && l < a.dv) ? to_acc(dout.row(n)[l]) : A(0);
    };

    A acc[4][4];
    // Phase 1: w_i = sum_v do_iv * (phi(q_i) S)_v.
    for (int tv = 0; tv < a.tiles_v; ++tv) {
      const int v0 = tv * kTile;
      gemm_tile_auto<false, true>(
          a.use_tc, acc, a.dk, phi_q,
          [&](int l, int j) -> A {
            const int c = v0 + j;
            return (l < a.dk && c < a.dv) ? S[static_cast<int64_t>(l) * a.dv + c] : A(0);
          },
          As, Bs, Cs, ty, tx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        A part = A(0);
#pragma unroll
        for (int j = 0; j < 4; ++j) part += acc[i][j] * dout_at(ty * 4 + i, v0 + tx * 4 + j);
        // reduce over the 16 tx lanes of this row group (lanes (ty&1)*16 + tx of the warp)
        part += __shfl_xor_sync(0xffffffffu, part, 8);
        part += __shfl_xor_sync(0xffffffffu, part, 4);
        part += __shfl_xor_sync(0xffffffffu, part, 2);
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        if (tx == 0) ws[ty * 4 + i] += part;  // row owned by this thread only
      }
    }
    __syncthreads();
    if (threadIdx.x < kTile) {
      const int r = threadIdx.x;
      const A z = zs[r];
      const A dz = -(ws[r] / z) / z;
      dzs[r] = dz;
      const int64_t n = n0 + r;
      if (n < a.N) {
        A* s = scal + (bh * a.N + n) * 2;
        s[0] = z;
        s[1] = dz;
      }
    }
    __syncthreads();

    // Phase 2: u = do S^T per Dk tile, then dq.
    for (int tk = 0; tk < a.tiles_k; ++tk) {
      const int k0 = tk * kTile;
      gemm_tile_auto<false, false>(
          a.use_tc, acc, a.dv, dout_at,
          [&](int l, int j) -> A {  // B(l = v, j = k) = S[k][v]
            const int r = k0 + j;
            return (l < a.dv && r < a.dk) ? S[static_cast<int64_t>(r) * a.dv + l] : A(0);
          },
          As, Bs, Cs, ty, tx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ty * 4 + i;
        const int64_t n = n0 + r;
        if (n >= a.N) continue;
        const A z = zs[r], dz = dzs[r];
        const T* qrow = q.row(n);
        T* grow = dq.row(n);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = k0 + tx * 4 + j;
          if (c >= a.dk) continue;
          const A dphiq = acc[i][j] / z + dz * ms[c];
          grow[c] = from_acc<T>(dphiq * dphi(to_acc(qrow[c]), a.fm));
        }
      }
    }
  }
}

struct StateBwdArgs : Dims {
  TokenTensor k, v, grad_k, grad_v;
  const void* grad_state;
  const void* grad_mean;
};

// Item = (output tile, token tile, bh). Output tiles [0, tiles_v) are Dv tiles of
// dv = phi(k) dS / N; tiles [tiles_v, tiles_v + tiles_k) are Dk tiles of
// dk = phi'(k) * (v dS^T + dm) / N.
template <class T>
__global__ void __launch_bounds__(kThreads) la_state_bwd_kernel(StateBwdArgs a) {
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int otiles = a.tiles_v + a.tiles_k;
  const int64_t items = static_cast<int64_t>(otiles) * a.ntiles * a.bh;
  const A nf = static_cast<A>(a.N);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int ot = static_cast<int>(item % otiles);
    const int64_t rest = item / otiles;
    const int64_t nt = rest % a.ntiles;
    const int64_t bh = rest / a.ntiles;
    const int64_t n0 = nt * kTile;
    const TokenView<const T> kk = token_view<const T>(a.k, bh, a.heads);
    const TokenView<const T> vv = token_view<const T>(a.v, bh, a.heads);
    const A* dS = static_cast<const A*>(a.grad_state) + bh * static_cast<int64_t>(a.dk) * a.dv;
    const A* dm = static_cast<const A*>(a.grad_mean) + bh * a.dk;
    A acc[4][4];
    if (ot < a.tiles_v) {
      const int v0 = ot * kTile;
      const TokenView<T> gv = token_view<T>(a.grad_v, bh, a.heads);
      gemm_tile_auto<false, true>(
          a.use_tc, acc, a.dk,
          [&](int i, int l) -> A {
            const int64_t n = n0 + i;
            return (n < a.N && l < a.dk) ? phi(to_acc(kk.row(n)[l]), a.fm) : A(0);
          },
          [&](int l, int j) -> A {
            const int c = v0 + j;
            return (l < a.dk && c < a.dv) ? dS[static_cast<int64_t>(l) * a.dv + c] : A(0);
          },
          As, Bs, Cs, ty, tx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + ty * 4 + i;
        if (n >= a.N) continue;
        T* grow = gv.row(n);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = v0 + tx * 4 + j;
          if (c < a.dv) grow[c] = from_acc<T>(acc[i][j] / nf);
        }
      }
    } else {
      const int k0 = (ot - a.tiles_v) * kTile;
      const TokenView<T> gk = token_view<T>(a.grad_k, bh, a.heads);
      gemm_tile_auto<false, false>(
          a.use_tc, acc, a.dv,
          [&](int i, int l) -> A {
            const int64_t n = n0 + i;
            return (n < a.N && l < a.dv) ? to_acc(vv.row(n)[l]) : A(0);
          },
          [&](int l, int j) -> A {  // B(l = v, j = k) = dS[k][v]
            const int r = k0 + j;
            return (l < a.dv && r < a.dk) ? dS[static_cast<int64_t>(r) * a.dv + l] : A(0);
          },
          As, Bs, Cs, ty, tx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t n = n0 + ty * 4 + i;
        if (n >= a.N) continue;
        const T* krow = kk.row(n);
        T* grow = gk.row(n);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = k0 + tx * 4 + j;
          if (c >= a.dk) continue;
          const A dphik = (acc[i][j] + dm[c]) / nf;
          grow[c] = from_acc<T>(dphik * dphi(to_acc(krow[c]), a.fm));
        }
      }
    }
  }
}

// ---- host-side planning --------------------------------------------------------------------
inline int64_t hcdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 132;
  }
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    return 132;
  }
  return sms;
}

inline bool valid_dims(const LinearAttentionParams& p) {
  return p.batch >= 1 && p.heads >= 1 && p.seqlen >= 1 && p.dim_k >= kMinHeadDim && p.dim_k <= kMaxHeadDim &&
         p.dim_v >= kMinHeadDim && p.dim_v <= kMaxHeadDim &&
         (p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16 ||
          p.dtype == DType::kFloat64) &&
         (p.feature_map == FeatureMap::kNone || p.feature_map == FeatureMap::kElu1 ||
          p.feature_map == FeatureMap::kRelu) &&
         p.bh() <= (INT64_MAX / (kMaxHeadDim * kMaxHeadDim + kMaxHeadDim)) / (p.seqlen + 1);
}

struct StatePlan {
  int64_t tiles_k = 1, tiles_v = 1, nchunks = 1, chunk = 1;
  size_t partial_bytes = 0;  // 0 when nchunks == 1 (the kernel writes the final state)
};

inline StatePlan plan_state(const LinearAttentionParams& p, int sms) {
  StatePlan s;
  const int64_t bh = p.bh(), N = p.seqlen;
  s.tiles_k = hcdiv(p.dim_k, kTile);
  s.tiles_v = hcdiv(p.dim_v, kTile);
  const int64_t base = bh * s.tiles_k * s.tiles_v;
  const int64_t target = static_cast<int64_t>(kChunkOversub) * (sms > 0 ? sms : 1);
  int64_t want = hcdiv(target, base);
  int64_t min_chunk = kMinChunk;
  const int64_t dmax = p.dim_k > p.dim_v ? p.dim_k : p.dim_v;
  if (2 * dmax > min_chunk) min_chunk = 2 * dmax;  // keep partial traffic below token traffic
  const int64_t max_chunks = hcdiv(N, min_chunk);
  if (want > max_chunks) want = max_chunks;
  if (want < 1) want = 1;
  s.chunk = hcdiv(hcdiv(N, want), kBK) * kBK;
  s.nchunks = hcdiv(N, s.chunk);
  if (s.nchunks > 1)
    s.partial_bytes = static_cast<size_t>(bh * s.nchunks * (p.dim_k * p.dim_v + p.dim_k)) * accumulator_bytes(p.dtype);
  return s;
}

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

inline size_t apply_bwd_scalar_bytes(const LinearAttentionParams& p) {
  return align_up(static_cast<size_t>(p.bh() * p.seqlen * 2) * accumulator_bytes(p.dtype), 256);
}

inline unsigned grid_for(int64_t items) {
  if (items < 1) items = 1;
  return static_cast<unsigned>(items > kMaxGrid ? kMaxGrid : items);
}

// Tensor cores for fp16/bf16 on sm_80+, unless MMFAST_CUDA_TENSOR_CORES=0 (exact SIMT path).
inline bool tensor_cores_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("MMFAST_CUDA_TENSOR_CORES");
    return env == nullptr || env[0] != '0';
  }();
  return enabled;
}

inline bool use_tensor_cores(const LinearAttentionParams& p) {
  if (!(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) || !tensor_cores_enabled()) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major >= 8;
}

inline Dims make_dims(const LinearAttentionParams& p) {
  Dims d;
  d.bh = p.bh();
  d.heads = p.heads;
  d.N = p.seqlen;
  d.ntiles = hcdiv(p.seqlen, kTile);
  d.dk = static_cast<int>(p.dim_k);
  d.dv = static_cast<int>(p.dim_v);
  d.tiles_k = static_cast<int>(hcdiv(p.dim_k, kTile));
  d.tiles_v = static_cast<int>(hcdiv(p.dim_v, kTile));
  d.fm = static_cast<int>(p.feature_map);
  d.use_tc = use_tensor_cores(p) ? 1 : 0;
  d.eps = p.eps;
  return d;
}

template <class T>
cudaError_t launch_state_pass(const TokenTensor& k, const TokenTensor& v, const void* scalars, void* state, void* mean,
                              const LinearAttentionParams& p, const StatePlan& plan, void* workspace, double div,
                              cudaStream_t stream) {
  using A = acc_t<T>;
  StateArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.k = k;
  a.v = v;
  a.scalars = scalars;
  a.out_state = plan.nchunks == 1 ? state : workspace;
  a.out_mean = mean;
  a.chunk = plan.chunk;
  a.nchunks = plan.nchunks;
  a.div = div;
  const int64_t items = plan.tiles_k * plan.tiles_v * plan.nchunks * a.bh;
  la_state_kernel<T><<<grid_for(items), kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.nchunks == 1) return err;
  const int64_t total = a.bh * (p.dim_k * p.dim_v + p.dim_k);
  la_state_reduce_kernel<A><<<grid_for(hcdiv(total, kThreads)), kThreads, 0, stream>>>(
      static_cast<const A*>(workspace), static_cast<A*>(state), static_cast<A*>(mean), a.bh, plan.nchunks, a.dk, a.dv,
      div);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_apply(const LinearAttentionParams& p, cudaStream_t stream) {
  ApplyArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.q = p.q;
  a.out = p.out;
  a.state = p.state;
  a.mean = p.mean;
  const int64_t items = a.tiles_v * a.ntiles * a.bh;
  la_apply_kernel<T><<<grid_for(items), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_apply_backward(const LinearAttentionParams& p, cudaStream_t stream, int sms) {
  const StatePlan plan = plan_state(p, sms);
  const size_t scalar_bytes = apply_bwd_scalar_bytes(p);
  ApplyBwdArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.q = p.q;
  a.grad_out = p.grad_out;
  a.grad_q = p.grad_q;
  a.state = p.state;
  a.mean = p.mean;
  a.scalars = p.workspace;
  la_apply_bwd_kernel<T><<<grid_for(a.ntiles * a.bh), kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // dS = sum_i phi(q_i)^T (do_i / z_i), dm = sum_i dz_i phi(q_i): the state pass with
  // k := q, v := grad_out and per-token (z, dz).
  void* partials = static_cast<char*>(p.workspace) + scalar_bytes;
  return launch_state_pass<T>(p.q, p.grad_out, p.workspace, p.grad_state, p.grad_mean, p, plan, partials, 1.0,
                              stream);
}

template <class T>
cudaError_t launch_state_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  StateBwdArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.k = p.k;
  a.v = p.v;
  a.grad_k = p.grad_k;
  a.grad_v = p.grad_v;
  a.grad_state = p.grad_state;
  a.grad_mean = p.grad_mean;
  const int64_t items = static_cast<int64_t>(a.tiles_k + a.tiles_v) * a.ntiles * a.bh;
  la_state_bwd_kernel<T><<<grid_for(items), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// Calls f(T{}) with T the token scalar type of p.dtype.
template <class F> cudaError_t dispatch_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail

// ---- public torch-free API -------------------------------------------------------------
// Workspace sizes (bytes) for the current device. apply and state_backward need none.
inline size_t linear_attention_state_workspace_bytes(const LinearAttentionParams& p) {
  if (!detail::valid_dims(p)) return 0;
  return detail::plan_state(p, detail::sm_count()).partial_bytes;
}
inline size_t linear_attention_forward_workspace_bytes(const LinearAttentionParams& p) {
  return linear_attention_state_workspace_bytes(p);
}
inline size_t linear_attention_apply_workspace_bytes(const LinearAttentionParams&) { return 0; }
inline size_t linear_attention_apply_backward_workspace_bytes(const LinearAttentionParams& p) {
  if (!detail::valid_dims(p)) return 0;
  return detail::apply_bwd_scalar_bytes(p) + detail::plan_state(p, detail::sm_count()).partial_bytes;
}
inline size_t linear_attention_state_backward_workspace_bytes(const LinearAttentionParams&) { return 0; }

// state = (1/N) sum phi(k)^T v, mean = (1/N) sum phi(k). Needs k, v, state, mean, workspace.
inline cudaError_t linear_attention_state(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!detail::valid_dims(p) || !p.k.data || !p.v.data || !p.state || !p.mean) return cudaErrorInvalidValue;
  const detail::StatePlan plan = detail::plan_state(p, detail::sm_count());
  if (plan.partial_bytes > 0 && (p.workspace == nullptr || p.workspace_bytes < plan.partial_bytes))
    return cudaErrorInvalidValue;
  return detail::dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return detail::launch_state_pass<T>(p.k, p.v, nullptr, p.state, p.mean, p, plan, p.workspace,
                                        static_cast<double>(p.seqlen), stream);
  });
}

// out = phi(q) state / (phi(q) . mean + eps). Needs q, state, mean, out.
inline cudaError_t linear_attention_apply(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!detail::valid_dims(p) || !p.q.data || !p.out.data || !p.state || !p.mean) return cudaErrorInvalidValue;
  return detail::dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return detail::launch_apply<T>(p, stream);
  });
}

// state pass into p.state / p.mean, then apply. Needs q, k, v, out, state, mean, workspace.
inline cudaError_t linear_attention_forward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!detail::valid_dims(p) || !p.q.data) return cudaErrorInvalidValue;
  cudaError_t err = linear_attention_state(p, stream);
  if (err != cudaSuccess) return err;
  return linear_attention_apply(p, stream);
}

// grad_q, grad_state, grad_mean from grad_out, q, state, mean.
inline cudaError_t linear_attention_apply_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!detail::valid_dims(p) || !p.q.data || !p.grad_out.data || !p.grad_q.data || !p.state || !p.mean ||
      !p.grad_state || !p.grad_mean)
    return cudaErrorInvalidValue;
  const int sms = detail::sm_count();
  const size_t need = detail::apply_bwd_scalar_bytes(p) + detail::plan_state(p, sms).partial_bytes;
  if (p.workspace == nullptr || p.workspace_bytes < need) return cudaErrorInvalidValue;
  return detail::dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return detail::launch_apply_backward<T>(p, stream, sms);
  });
}

// grad_k, grad_v from grad_state, grad_mean, k, v.
inline cudaError_t linear_attention_state_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!detail::valid_dims(p) || !p.k.data || !p.v.data || !p.grad_k.data || !p.grad_v.data || !p.grad_state ||
      !p.grad_mean)
    return cudaErrorInvalidValue;
  return detail::dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    return detail::launch_state_backward<T>(p, stream);
  });
}

}  // namespace cuda
}  // namespace mmfast
