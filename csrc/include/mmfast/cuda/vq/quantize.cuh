// vq_quantize on the GPU: the shared tile GEMM fused with an argmin (namespace mmfast::cuda::vqk).
//
//   vq_sqnorm_kernel    ||e_c||^2 per code, when the caller gives none (K x D read once).
//   vq_search_kernel    item = (64-row tile, code split): for every 64-code tile of the split,
//                       the 64 x 64 dots z . e (gemm_tile: TF32 tensor cores for fp16 / bf16,
//                       exact for them; exact SIMT FMA for fp32 / fp64), scores
//                       sqnorm_c - 2 z . e_c, and per row the best score and code (ties: lowest
//                       code; NaN never wins), kept in registers across the split's tiles, then
//                       written as the split's partial.
//   vq_finish_kernel    per row: the splits' partials in order (strictly smaller wins, so ties
//                       keep the lower codes), ||z||^2, and the rules of mmfast/vq.h.
// Splitting the codes keeps the GPU busy when the rows are few (one image: N = 1024, 16 tiles).
#pragma once

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/tile_gemm.cuh"
#include "mmfast/vq.h"

namespace mmfast {
namespace cuda {
namespace vqk {

constexpr int kOversubscribe = 4;             // grid target: 4 x SM count blocks
constexpr int64_t kNoCode = INT64_MAX;        // no finite score seen yet

struct SearchArgs {
  const void* z;
  int64_t z_row_stride, rows, codes;
  int dim, use_tc;
  const void* codebook;
  const void* sqnorm;    // (K,) accumulation type
  void* best_score;      // [split][N] accumulation type
  int64_t* best_code;    // [split][N]
  int64_t row_tiles, code_tiles, splits;
};

// The better of two (score, code) candidates: strictly smaller score, or equal with a lower code.
template <class A>
__device__ __forceinline__ void take_better(A& score, int64_t& code, A other_score, int64_t other_code) {
  if (other_score < score || (other_score == score && other_code < code)) {
    score = other_score;
    code = other_code;
  }
}

// Per row of this thread (rows ty*4 + i): the best of the tile's 64 codes, reduced over the 16
// tx lanes of the row group with shuffles, merged into best[i] / code[i].
template <class A>
__device__ __forceinline__ void merge_tile_best(const A (&acc)[4][4], const A* sqnorm, int64_t code0, int64_t codes,
                                                int tx, A (&best)[4], int64_t (&code)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    A s = A(INFINITY);
    int64_t c = kNoCode;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t cj = code0 + tx * 4 + j;
      if (cj < codes) {
        const A score = sqnorm[cj] - A(2) * acc[i][j];
        if (score < s) s = score, c = cj;  // codes increase with j: the first minimum stays
      }
    }
#pragma unroll
    for (int lane = 8; lane >= 1; lane >>= 1) {
      const A os = __shfl_xor_sync(0xffffffffu, s, lane);
      const int64_t oc = __shfl_xor_sync(0xffffffffu, c, lane);
      take_better(s, c, os, oc);
    }
    take_better(best[i], code[i], s, c);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) vq_search_kernel(SearchArgs a) {
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const T* z = static_cast<const T*>(a.z);
  const T* codebook = static_cast<const T*>(a.codebook);
  const A* sqnorm = static_cast<const A*>(a.sqnorm);
  const int64_t items = a.row_tiles * a.splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t split = item % a.splits, row0 = (item / a.splits) * kTile;
    const int64_t t0 = a.code_tiles * split / a.splits, t1 = a.code_tiles * (split + 1) / a.splits;
    A best[4] = {A(INFINITY), A(INFINITY), A(INFINITY), A(INFINITY)};
    int64_t code[4] = {kNoCode, kNoCode, kNoCode, kNoCode};
    TileAccumulator<A> tile;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t code0 = t * kTile;
      const auto z_at = [&](int i, int l) -> A {
        const int64_t n = row0 + i;
        return (n < a.rows && l < a.dim) ? to_acc(z[n * a.z_row_stride + l]) : A(0);
      };
      const auto code_at = [&](int l, int j) -> A {
        const int64_t c = code0 + j;
        return (c < a.codes && l < a.dim) ? to_acc(codebook[c * a.dim + l]) : A(0);
      };
      gemm_tile<false, false>(tile, a.use_tc != 0, a.dim, z_at, code_at, As, Bs, Cs, ty, tx);
      merge_tile_best(tile.acc, sqnorm, code0, a.codes, tx, best, code);
    }
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t n = row0 + ty * 4 + i;
        if (n >= a.rows) continue;
        static_cast<A*>(a.best_score)[split * a.rows + n] = best[i];
        a.best_code[split * a.rows + n] = code[i];
      }
    }
  }
}

// One warp per row: the splits in order, ||z||^2, the rules of mmfast/vq.h. The loop is uniform
// over the block (rows past N do the same shuffles), so no warp leaves while others shuffle.
template <class T>
__global__ void __launch_bounds__(kThreads)
    vq_finish_kernel(const T* z, int64_t z_row_stride, int64_t rows, int64_t dim, int64_t splits,
                     const acc_t<T>* best_score, const int64_t* best_code, int64_t* indices, acc_t<T>* distance) {
  using A = acc_t<T>;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kWarps; base < rows;
       base += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t n = base + threadIdx.x / 32;
    A sq = A(0);
    for (int64_t d = lane; n < rows && d < dim; d += 32) {
      const A x = to_acc(z[n * z_row_stride + d]);
      sq += x * x;
    }
    for (int off = 16; off >= 1; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane != 0 || n >= rows) continue;
    A score = best_score[n];
    int64_t code = best_code[n];
    for (int64_t s = 1; s < splits; ++s) take_better(score, code, best_score[s * rows + n], best_code[s * rows + n]);
    if (!is_finite(sq) || code == kNoCode) {  // not finite: ||z||^2; no finite score: +inf
      indices[n] = 0;
      distance[n] = is_finite(sq) ? A(INFINITY) : sq;
    } else {
      const A d = score + sq;
      indices[n] = code;
      distance[n] = d < A(0) ? A(0) : d;
    }
  }
}

// ||e_c||^2 in the accumulation type, one warp per code (the loop uniform over the block).
template <class T>
__global__ void __launch_bounds__(kThreads) vq_sqnorm_kernel(const T* codebook, int64_t codes, int64_t dim,
                                                             acc_t<T>* sqnorm) {
  using A = acc_t<T>;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kWarps; base < codes;
       base += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t c = base + threadIdx.x / 32;
    A s = A(0);
    for (int64_t d = lane; c < codes && d < dim; d += 32) {
      const A x = to_acc(codebook[c * dim + d]);
      s += x * x;
    }
    for (int off = 16; off >= 1; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0 && c < codes) sqnorm[c] = s;
  }
}

// ---- host side ------------------------------------------------------------------------------
struct Plan {
  int64_t row_tiles, code_tiles, splits;
  size_t sqnorm_offset, score_offset, code_offset, bytes;
};

inline Plan plan(const VQParams& p, int sms) {
  Plan s;
  s.row_tiles = ceil_div(p.rows, kTile);
  s.code_tiles = ceil_div(p.codes, kTile);
  const int64_t target = static_cast<int64_t>(kOversubscribe) * (sms > 0 ? sms : 1);
  s.splits = max_i64(1, min_i64(s.code_tiles, ceil_div(target, max_i64(1, s.row_tiles))));
  const size_t acc = accumulator_bytes(p.dtype);
  s.sqnorm_offset = 0;
  s.score_offset = static_cast<size_t>(round_up(static_cast<int64_t>(acc * p.codes), 256));
  s.code_offset = s.score_offset + static_cast<size_t>(round_up(static_cast<int64_t>(acc * s.splits * p.rows), 256));
  s.bytes = s.code_offset + sizeof(int64_t) * static_cast<size_t>(s.splits * p.rows);
  return s;
}

template <class T>
cudaError_t launch_quantize(const VQParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const Plan plan_ = plan(p, sm_count());
  char* ws = static_cast<char*>(p.workspace);
  const void* sqnorm = p.codebook_sqnorm;
  if (sqnorm == nullptr) {
    A* computed = reinterpret_cast<A*>(ws + plan_.sqnorm_offset);
    MMFAST_LAUNCH(vq_sqnorm_kernel<T>, grid_for(ceil_div(p.codes, kThreads / 32)), kThreads, 0, stream,
                  static_cast<const T*>(p.codebook), p.codes, p.dim, computed);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    sqnorm = computed;
  }
  SearchArgs a;
  a.z = p.z;
  a.z_row_stride = p.z_row_stride;
  a.rows = p.rows;
  a.codes = p.codes;
  a.dim = static_cast<int>(p.dim);
  const bool half = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  a.use_tc = half && tensor_cores_enabled() && compute_capability_major() >= 8 ? 1 : 0;
  a.codebook = p.codebook;
  a.sqnorm = sqnorm;
  a.best_score = ws + plan_.score_offset;
  a.best_code = reinterpret_cast<int64_t*>(ws + plan_.code_offset);
  a.row_tiles = plan_.row_tiles;
  a.code_tiles = plan_.code_tiles;
  a.splits = plan_.splits;
  MMFAST_LAUNCH(vq_search_kernel<T>, grid_for(plan_.row_tiles * plan_.splits), kThreads, 0, stream, a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  MMFAST_LAUNCH(vq_finish_kernel<T>, grid_for(ceil_div(p.rows, kThreads / 32)), kThreads, 0, stream,
                static_cast<const T*>(p.z), p.z_row_stride, p.rows, p.dim, plan_.splits,
                static_cast<const A*>(a.best_score), a.best_code, p.indices, static_cast<A*>(p.distance));
  return cudaGetLastError();
}

}  // namespace vqk
}  // namespace cuda
}  // namespace mmfast
