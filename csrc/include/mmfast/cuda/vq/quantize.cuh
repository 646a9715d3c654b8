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
//   vq_search_async_kernel<T, Nt>  fp16 / bf16 with 16-byte aligned rows on sm_80+, instead of
//                       vq_search_kernel: item = (128-row tile, code split); the split's
//                       128-code tiles stream through the NT tile GEMM (tile_gemm.cuh: cp.async
//                       ring, ldmatrix + mma.sync.m16n8k16, fp32 sums; products exact, as on
//                       the TF32 path) as one stream of 32-dim slices, so the ring never drains
//                       between tiles; the argmin runs on the accumulators after each tile.
//                       Nt = NtWgmma on sm_90a: multiplied by wgmma instead (each warpgroup 64
//                       rows x 128 codes per instruction, operands read by descriptor from
//                       64-byte-swizzled stages), Hopper's full tensor-core rate;
//                       MMFAST_CUDA_WGMMA=0 keeps mma.sync (Nt = NtMmaSync).
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
template <class A, class Code>
__device__ __forceinline__ void take_better(A& score, Code& code, A other_score, Code other_code) {
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

// ---- fp16 / bf16, 16-byte aligned rows, sm_80+: the NT tile GEMM ----------------------------
constexpr int32_t kNoCode32 = INT32_MAX;  // the async kernel's codes are int32 (K < INT32_MAX)

// Per row of this thread (Nt::kRows of them): the best score of the tile's codes in its columns.
// Each thread meets its codes in increasing order (columns, then tiles), so a strictly smaller
// score keeps the lowest code of a tie; +inf and NaN never win. Full tiles (kFull: all 128
// codes exist) skip the per-column bounds check.
template <class Nt, bool kFull>
__device__ __forceinline__ void merge_tile_best_nt(const typename Nt::Acc& acc, const float* sqnorm, int64_t code0,
                                                   int64_t codes, float (&best)[Nt::kRows],
                                                   int32_t (&code)[Nt::kRows]) {
  const int base = Nt::col_base();
  const float* norms = sqnorm + code0 + base;                   // loads at compile-time offsets
  const int left = static_cast<int>(min_i64(codes - code0, kNtCols)) - base;  // codes < INT32_MAX
  const int32_t first = static_cast<int32_t>(code0) + base;
#pragma unroll
  for (int c = 0; c < Nt::kCols; ++c) {
    if (!kFull && Nt::col_offset(c) >= left) continue;
    const float norm = norms[Nt::col_offset(c)];
#pragma unroll
    for (int r = 0; r < Nt::kRows; ++r) {
      const float score = fmaf(-2.0f, Nt::at(acc, r, c), norm);  // 2 acc is exact: one rounding either way
      if (score < best[r]) best[r] = score, code[r] = first + Nt::col_offset(c);
    }
  }
}

// The split's best per row of the 128-row tile: over the 4 lanes of a quad (shuffles), then, when
// a row's columns span several warps (mma.sync's 4), over them through shared memory (`scratch`,
// the idle ring), in column order.
template <class Nt>
__device__ __forceinline__ void write_best_nt(float (&best)[Nt::kRows], int32_t (&code)[Nt::kRows],
                                              unsigned char* scratch, const SearchArgs& a, int64_t split,
                                              int64_t row0) {
  constexpr int kWarps = Nt::kColumnWarps;
  float* warp_score = reinterpret_cast<float*>(scratch);                            // [kWarps][128 rows]
  int32_t* warp_code = reinterpret_cast<int32_t*>(warp_score + kWarps * kNtRows);  // [kWarps][128]
  const int lane = static_cast<int>(threadIdx.x) % 32, column_warp = static_cast<int>(threadIdx.x) / 32 % kWarps;
#pragma unroll
  for (int r = 0; r < Nt::kRows; ++r) {
#pragma unroll
    for (int lanes = 1; lanes <= 2; lanes <<= 1)
      take_better(best[r], code[r], __shfl_xor_sync(0xffffffffu, best[r], lanes),
                  __shfl_xor_sync(0xffffffffu, code[r], lanes));
    if (lane % 4 != 0) continue;
    const int row = Nt::row(r);
    if constexpr (kWarps == 1) {
      const int64_t n = row0 + row;
      if (n < a.rows) {
        static_cast<float*>(a.best_score)[split * a.rows + n] = best[r];
        a.best_code[split * a.rows + n] = code[r] == kNoCode32 ? kNoCode : code[r];
      }
    } else {
      warp_score[column_warp * kNtRows + row] = best[r];
      warp_code[column_warp * kNtRows + row] = code[r];
    }
  }
  if constexpr (kWarps > 1) {
    __syncthreads();
    const int row = static_cast<int>(threadIdx.x);
    if (row < kNtRows && row0 + row < a.rows) {
      float score = warp_score[row];
      int32_t c = warp_code[row];
      for (int w = 1; w < kWarps; ++w) take_better(score, c, warp_score[w * kNtRows + row], warp_code[w * kNtRows + row]);
      const int64_t n = row0 + row;
      static_cast<float*>(a.best_score)[split * a.rows + n] = score;
      a.best_code[split * a.rows + n] = c == kNoCode32 ? kNoCode : c;
    }
  }
}

// Nt: the NT tile GEMM's multiplier (NtMmaSync, or NtWgmma on sm_90a).
template <class T, class Nt>
__global__ void __launch_bounds__(kThreads, 2) vq_search_async_kernel(SearchArgs a) {
  using Stage = typename Nt::template Stage<T>;
  MMFAST_DYNAMIC_SHARED(smem);
  Stage* ring = reinterpret_cast<Stage*>(Nt::ring_start(smem));
  const T* z = static_cast<const T*>(a.z);
  const T* codebook = static_cast<const T*>(a.codebook);
  const float* sqnorm = static_cast<const float*>(a.sqnorm);
  const int64_t slices_per_tile = ceil_div(a.dim, kNtDepth);
  const int64_t items = a.row_tiles * a.splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t split = item % a.splits, row0 = (item / a.splits) * kNtRows;
    const int64_t t0 = a.code_tiles * split / a.splits, t1 = a.code_tiles * (split + 1) / a.splits;
    const T* z_tile = z + row0 * a.z_row_stride;
    // The copy cursor runs kNtStages - 1 slices ahead of the multiply cursor; both step a slice
    // at a time, then to the next code tile (no divisions in the loop). The z rows stay; the
    // codebook's move 128 codes on at each tile.
    int64_t copy_code0 = t0 * kNtCols, step_code0 = t0 * kNtCols, step_l0 = 0;
    int copy_l0 = 0;  // dim < 2^24 (SliceSource::fits_offsets, use_async_search)
    SliceSource<decltype(Stage::a), T> z_source;
    SliceSource<decltype(Stage::b), T> code_source;
    z_source.at_rows(ring[0].a, z_tile, a.z_row_stride, a.rows - row0);
    code_source.at_rows(ring[0].b, codebook + copy_code0 * a.dim, a.dim, a.codes - copy_code0);
    static_assert(decltype(Stage::a)::kChunksPerRow == decltype(Stage::b)::kChunksPerRow,
                  "z and codebook chunks share their columns (one cols_ok)");
    const int cols_left = a.dim - RawChunk<decltype(Stage::a)>::kept_col();
    float best[Nt::kRows];
    int32_t code[Nt::kRows];
#pragma unroll
    for (int r = 0; r < Nt::kRows; ++r) best[r] = INFINITY, code[r] = kNoCode32;
    typename Nt::Acc acc;
    Nt::zero(acc);
    Nt::template run<T>(
        ring, (t1 - t0) * slices_per_tile, acc, a.rows - row0,
        [&](Stage& stage) {
          const bool cols_ok = copy_l0 < cols_left;
          z_source.issue(stage.a, copy_l0, cols_ok);
          code_source.issue(stage.b, copy_l0, cols_ok);
          copy_l0 += kNtDepth;
          if (copy_l0 >= a.dim) {
            copy_l0 = 0, copy_code0 += kNtCols;
            code_source.next_rows(int64_t{kNtCols} * a.dim, a.codes - copy_code0);
          }
        },
        [&](int64_t) {
          step_l0 += kNtDepth;
          if (step_l0 >= a.dim) {  // the code tile is complete
            if (step_code0 + kNtCols <= a.codes)
              merge_tile_best_nt<Nt, true>(acc, sqnorm, step_code0, a.codes, best, code);
            else
              merge_tile_best_nt<Nt, false>(acc, sqnorm, step_code0, a.codes, best, code);
            Nt::restart(acc);  // every code tile has slices: multiplied before the next merge
            step_l0 = 0, step_code0 += kNtCols;
          }
        });
    __syncthreads();  // the ring is idle: its first bytes may take the column warps' bests
    write_best_nt<Nt>(best, code, reinterpret_cast<unsigned char*>(ring), a, split, row0);
    __syncthreads();  // read before the next item's copies land
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

// The search's items and workspace for tiles of tile_rows x tile_codes (64 x 64: vq_search_kernel,
// 128 x 128: vq_search_async_kernel).
inline Plan plan(const VQParams& p, int sms, int64_t tile_rows = kTile, int64_t tile_codes = kTile) {
  Plan s;
  s.row_tiles = ceil_div(p.rows, tile_rows);
  s.code_tiles = ceil_div(p.codes, tile_codes);
  const int64_t target = static_cast<int64_t>(kOversubscribe) * (sms > 0 ? sms : 1);
  s.splits = max_i64(1, min_i64(s.code_tiles, ceil_div(target, max_i64(1, s.row_tiles))));
  const size_t acc = accumulator_bytes(p.dtype);
  s.sqnorm_offset = 0;
  s.score_offset = static_cast<size_t>(round_up(static_cast<int64_t>(acc * p.codes), 256));
  s.code_offset = s.score_offset + static_cast<size_t>(round_up(static_cast<int64_t>(acc * s.splits * p.rows), 256));
  s.bytes = s.code_offset + sizeof(int64_t) * static_cast<size_t>(s.splits * p.rows);
  return s;
}

// Workspace for whichever search kernel runs.
inline size_t workspace_bytes(const VQParams& p) {
  const int sms = sm_count();
  const size_t tiles64 = plan(p, sms).bytes, tiles128 = plan(p, sms, kNtRows, kNtCols).bytes;
  return tiles64 > tiles128 ? tiles64 : tiles128;
}

// vq_search_async_kernel runs for fp16 / bf16 whose z rows and codebook are 16-byte aligned, on
// sm_80+ (code compiled for it), with tensor cores and cp.async enabled, K < INT32_MAX and row
// strides (z's, and D) below 2^24 elements (a 128-row tile within 32-bit offsets: SliceSource);
// on the multiplier with_nt_multiplier picks.
template <class T> bool use_async_search(const VQParams& p) {
  if constexpr (!std::is_same_v<T, __half> && !std::is_same_v<T, __nv_bfloat16>) {
    return false;
  } else {
    const auto aligned = [](const void* ptr, int64_t elems) {
      return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (elems * static_cast<int64_t>(sizeof(T))) % 16 == 0;
    };
    return tensor_cores_enabled() && async_copy_enabled() && compute_capability_major() >= 8 &&
           p.codes < INT32_MAX && aligned(p.z, p.dim) && aligned(p.z, p.z_row_stride) && aligned(p.codebook, p.dim) &&
           SliceSource<decltype(NtStage<T>::a), T>::fits_offsets(p.z_row_stride) &&
           SliceSource<decltype(NtStage<T>::b), T>::fits_offsets(p.dim) &&
           NtMmaSync::kSmemBytes<T> <= max_shared_per_block() &&
           compiled_for(&vq_search_async_kernel<T, NtMmaSync>, NtMmaSync::kMinArch);
  }
}

// The persistent grid of vq_search_async_kernel for `items` (fp16 / bf16 only): false when the
// occupancy query finds no room (the caller then runs vq_search_kernel; the query's error is
// cleared, it is not sticky).
template <class T> bool async_search_grid(int64_t items, unsigned& grid) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    return with_nt_multiplier<T>(&vq_search_async_kernel<T, NtWgmma>, [&](auto nt) {
      using Nt = decltype(nt);
      return fits_persistent_grid(&vq_search_async_kernel<T, Nt>, kThreads, Nt::template kSmemBytes<T>, items, grid);
    });
  } else {
    (void)items, (void)grid;
    return false;
  }
}

template <class T> void launch_async_search(const SearchArgs& a, unsigned grid, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    with_nt_multiplier<T>(&vq_search_async_kernel<T, NtWgmma>, [&](auto nt) {
      using Nt = decltype(nt);
      MMFAST_LAUNCH((vq_search_async_kernel<T, Nt>), grid, kThreads, Nt::template kSmemBytes<T>, stream, a);
      return 0;
    });
  } else {
    (void)a, (void)grid, (void)stream;  // async_search_grid is false for these types
  }
}

template <class T>
cudaError_t launch_quantize(const VQParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const Plan async_plan = plan(p, sm_count(), kNtRows, kNtCols);
  unsigned async_grid = 0;
  const bool async = use_async_search<T>(p) && async_search_grid<T>(async_plan.row_tiles * async_plan.splits,
                                                                      async_grid);
  const Plan plan_ = async ? async_plan : plan(p, sm_count());
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
  if (async) {
    launch_async_search<T>(a, async_grid, stream);
  } else {
    MMFAST_LAUNCH(vq_search_kernel<T>, grid_for(plan_.row_tiles * plan_.splits), kThreads, 0, stream, a);
  }
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
