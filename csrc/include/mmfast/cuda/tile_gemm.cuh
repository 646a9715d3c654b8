// The block-level tile GEMM every family's CUDA kernels share (torch-free).
//
// A 256-thread block computes a 64 x 64 tile C = sum_l A(x, l) B(l, y), staging kBK-deep
// slices of both operands through shared memory (tile[l][x], row length kLd) with any
// element function applied on load (a feature map, a scale, bounds). Each thread owns a
// 4 x 4 register block: rows ty*4.., columns tx*4.. (ty = thread / 16, tx = thread % 16).
// The product runs on the FMA units (exact fp32 / fp64), or, for float accumulators when the
// caller asks (use_tc, uniform per block) and the arch has them (sm_80+), on TF32 tensor
// cores (WMMA m16n16k8: operands rounded to 10 mantissa bits, fp32 accumulation), where asked
// with an operand split as hi + lo (one more MMA per split operand: about fp32's accuracy, for
// sums that cancel); the result lands in the same register block either way.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "mmfast/cuda/common.cuh"
#ifndef MMFAST_CUDA_EMULATED
#include <mma.h>
#endif

// TF32 WMMA exists from sm_80 on. The host pass and the host emulator see the declarations.
#if defined(MMFAST_CUDA_EMULATED) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define MMFAST_CUDA_TF32_MMA 1
#else
#define MMFAST_CUDA_TF32_MMA 0
#endif

namespace mmfast {
namespace cuda {

constexpr int kThreads = 256;   // 16 x 16 threads, each owning a 4 x 4 block of the tile
constexpr int kTile = 64;       // tile edge
constexpr int kBK = 32;         // contraction depth staged per step
constexpr int kLd = kTile + 4;  // shared row length: +4 keeps 16 B alignment, breaks bank conflicts

static_assert(kThreads == (kTile / 4) * (kTile / 4), "one 4x4 register block per thread");

// ---- staging operand slices into shared memory -----------------------------------------
// An element source gives the value of element (x, l) of a slice (0 outside the valid range):
// either one function f(x, l), or a SplitElement whose load(x, l) only reads memory (a
// bounds-checked load, no other branches) and whose finish(raw, x, l) turns the raw value into
// the operand (a feature map, a division, zero outside the range). stage_tile_pair (and so
// gemm_tile) issues all of a thread's loads of both operands (kStagePerThread each; a plain f
// counts as one load) before it finishes or stores any: a fused load + branchy transform per
// element leaves one load in flight per thread, latency-bound (scripts/sass_report.py).
constexpr int kStagePerThread = kBK * kTile / kThreads;
static_assert(kBK * kTile % kThreads == 0, "every thread stages the same number of elements");

template <class Load, class Finish> struct SplitElement {
  Load load;
  Finish finish;
};
template <class Load, class Finish>
__device__ __forceinline__ SplitElement<Load, Finish> split_element(Load load, Finish finish) {
  return {load, finish};
}

// A plain f(x, l) as a SplitElement: its whole value is the "load", kept as is.
struct KeepValue {
  template <class R> __device__ __forceinline__ R operator()(R raw, int, int) const { return raw; }
};
template <class F> struct IsSplitElement : std::false_type {};
template <class L, class Fi> struct IsSplitElement<SplitElement<L, Fi>> : std::true_type {};

template <class F> __device__ __forceinline__ auto as_split(const F& f) {
  if constexpr (IsSplitElement<F>::value) {
    return f;
  } else {
    return SplitElement<F, KeepValue>{f, KeepValue{}};
  }
}

// The k-th element this thread stages. XFast: consecutive threads take consecutive x (source
// contiguous along x); else consecutive l.
template <bool XFast> __device__ __forceinline__ void stage_coords(int k, int& x, int& l) {
  // unsigned: the divisions by powers of two are shifts and masks, with no sign fix-up
  const unsigned idx = threadIdx.x + static_cast<unsigned>(k) * kThreads;
  if (XFast) {
    x = static_cast<int>(idx % kTile);
    l = static_cast<int>(idx / kTile);
  } else {
    l = static_cast<int>(idx % kBK);
    x = static_cast<int>(idx / kBK);
  }
}

template <class E> using StageRaw = std::decay_t<decltype(std::declval<const E&>().load(0, 0))>;

// The loads of this thread's elements k0 .. k0 + Count - 1, then their finishes and stores.
template <bool XFast, class E, int Count>
__device__ __forceinline__ void stage_loads(const E& e, StageRaw<E> (&raw)[Count], int k0 = 0) {
#pragma unroll
  for (int k = 0; k < Count; ++k) {
    int x, l;
    stage_coords<XFast>(k0 + k, x, l);
    raw[k] = e.load(x, l);
  }
}

template <bool XFast, class E, int Count, class A>
__device__ __forceinline__ void stage_stores(const E& e, const StageRaw<E> (&raw)[Count], A* __restrict__ dst,
                                             int k0 = 0) {
#pragma unroll
  for (int k = 0; k < Count; ++k) {
    int x, l;
    stage_coords<XFast>(k0 + k, x, l);
    dst[l * kLd + x] = e.finish(raw[k], x, l);
  }
}

// dst[l * kLd + x] = element (x, l) for x < kTile, l < kBK. A SplitElement's loads are all
// issued first; a plain f (e.g. a gather whose address is itself loaded: buffering buys no
// parallelism there and costs registers) is evaluated and stored element by element.
template <bool XFast, class A, class F>
__device__ __forceinline__ void stage_tile(A* __restrict__ dst, const F& f) {
  if constexpr (IsSplitElement<F>::value) {
    StageRaw<F> raw[kStagePerThread];
    stage_loads<XFast>(f, raw);
    stage_stores<XFast>(f, raw, dst);
  } else {
#pragma unroll 1  // f may be large: unrolled copies of it spill (masked_conv_kernel)
    for (int k = 0; k < kStagePerThread; ++k) {
      int x, l;
      stage_coords<XFast>(k, x, l);
      dst[l * kLd + x] = f(x, l);
    }
  }
}

// stage_tile for a SplitElement whose kStagePerThread raw values would not fit in registers
// beside the caller's: Batch loads issued before any is finished or stored, batch after batch.
template <bool XFast, int Batch, class A, class E>
__device__ __forceinline__ void stage_tile_batched(A* __restrict__ dst, const E& e) {
  static_assert(IsSplitElement<E>::value && kStagePerThread % Batch == 0, "a SplitElement, whole batches");
#pragma unroll 1
  for (int k0 = 0; k0 < kStagePerThread; k0 += Batch) {
    StageRaw<E> raw[Batch];
    stage_loads<XFast>(e, raw, k0);
    stage_stores<XFast>(e, raw, dst, k0);
  }
}

// Both operands of a slice: every load of both issued first.
template <bool AXFast, bool BXFast, class A, class FA, class FB>
__device__ __forceinline__ void stage_tile_pair(A* __restrict__ As, const FA& fa, A* __restrict__ Bs, const FB& fb) {
  const auto ea = as_split(fa);
  const auto eb = as_split(fb);
  StageRaw<decltype(ea)> raw_a[kStagePerThread];
  StageRaw<decltype(eb)> raw_b[kStagePerThread];
  stage_loads<AXFast>(ea, raw_a);
  stage_loads<BXFast>(eb, raw_b);
  stage_stores<AXFast>(ea, raw_a, As);
  stage_stores<BXFast>(eb, raw_b, Bs);
}

// ---- raw token tiles copied asynchronously -----------------------------------------------
// A RawTile holds Rows token rows of Cols raw input elements in shared memory, filled by
// cp.async 16-byte copies: the bytes are in flight without occupying registers, so a kernel
// keeps several tiles in flight (a multi-stage pipeline) while it computes on an earlier one.
// A step then turns the landed raw elements into operands in place: tokens x W dims of a token
// contraction (the linear-attention state pass), 64 tokens x W dims of a dim contraction (its
// apply pass), W the tile width.
// Pad elements after each row (a multiple of 16 bytes) keep a row stride of 128 bytes from
// sending the 8 rows of an ldmatrix phase to the same banks.
template <class T, int Rows, int Cols, int Pad = 0> struct RawTile {
  static constexpr int kRows = Rows, kCols = Cols;
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunksPerRow = Cols / kChunkElems;
  static constexpr int kChunks = Rows * kChunksPerRow;
  static_assert(16 % sizeof(T) == 0 && Cols % kChunkElems == 0, "whole 16-byte chunks per row");
  static_assert(kChunks % 32 == 0, "whole warps per pass of the block's threads (a ragged last pass stays warp-uniform)");
  static_assert(Pad % kChunkElems == 0, "rows stay 16-byte aligned");
  __align__(16) T v[Rows][Cols + Pad];
  // Where element (row, col) lies (RawChunk copies whole chunks to it).
  __device__ __forceinline__ T* at(int row, int col) { return &v[row][col]; }
};

// Rows x Cols 16-bit elements whose rows are 64 bytes (Cols * sizeof(T) == 64), unpadded, in
// the layout wgmma's 64-byte swizzle reads (PTX ISA, "Shared memory matrix layout", K-major;
// CuTe's GMMA::Layout_K_SW64_Atom): row r at byte 64 r, its 16-byte chunk c at chunk
// c ^ ((r / 2) % 4). The hardware XORs shared-memory address bits 4-5 with bits 7-8, so the tile
// must start on a 512-byte shared-memory address (align_shared). Eight rows (512 bytes) form a
// core-matrix group, the descriptor's stride. Checked against CuTe by tests/test_gmma_layout.py.
template <class T, int Rows, int Cols> struct SwizzledTile {
  static constexpr int kRows = Rows, kCols = Cols;
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunksPerRow = Cols / kChunkElems;
  static constexpr int kChunks = Rows * kChunksPerRow;
  static_assert(sizeof(T) == 2 && Cols * sizeof(T) == 64, "64-byte rows of 16-bit elements");
  static_assert(Rows % 8 == 0 && kChunks % 32 == 0, "whole core-matrix groups, whole warps per copy pass");
  __align__(512) T v[Rows * Cols];
  __device__ __forceinline__ T* at(int row, int col) {
    const int chunk = (col / kChunkElems) ^ ((row >> 1) & 3);
    return &v[row * Cols + chunk * kChunkElems + col % kChunkElems];
  }
};

// The k-th of the chunks a thread copies of every slice of a stream of RawTiles: chunk
// threadIdx.x + k * kThreads in row-major order, fixed per thread and k. A tile whose chunks
// are not a multiple of the block's threads (64 x 80) has a ragged last pass: the threads past
// its end hold no chunk there (in_tile false; whole warps, see RawTile). When the chunks per
// row divide the threads (not at 48 or 80 columns), the k-th chunk lies kRowsPerPass rows below
// the first, so a caller may keep the first chunk's source pointer only and step it by a slice
// per issue; otherwise each chunk adds its source_offset.
// issue() copies 16 bytes from src (this chunk's source in the slice, 16-byte aligned) when the
// chunk lies within rows x cols (left in the slice from its first row / column; cols a multiple
// of kChunkElems), else zero-fills it; fallback is any mapped, 16-byte aligned address (a
// zero-filled chunk still names a source; none is read). A chunk outside the tile copies nothing.
template <class Tile> struct RawChunk {
  static constexpr int kPerThread = (Tile::kChunks + kThreads - 1) / kThreads;
  static constexpr bool kRagged = Tile::kChunks % kThreads != 0;
  static constexpr bool kWholeRowsPerPass = kThreads % Tile::kChunksPerRow == 0;
  static constexpr int kRowsPerPass = kThreads / Tile::kChunksPerRow;  // meaningful when kWholeRowsPerPass
  int row, col;
  bool in_tile;
  __device__ __forceinline__ explicit RawChunk(int k = 0) {
    if constexpr (kWholeRowsPerPass && !kRagged) {  // the k-th: kRowsPerPass rows below the first
      in_tile = true;
      row = static_cast<int>(threadIdx.x) / Tile::kChunksPerRow + k * kRowsPerPass;
      col = static_cast<int>(threadIdx.x) % Tile::kChunksPerRow * Tile::kChunkElems;
    } else {
      const int index = static_cast<int>(threadIdx.x) + k * kThreads;
      in_tile = !kRagged || index < Tile::kChunks;
      row = index / Tile::kChunksPerRow;
      col = index % Tile::kChunksPerRow * Tile::kChunkElems;
    }
  }
  // This chunk's offset from its tile's first element in a source of row stride `stride`.
  __device__ __forceinline__ int64_t source_offset(int64_t stride) const { return row * stride + col; }
  // A caller keeps one source pointer per slice, stepped a slice per issue, at row kept_row()
  // and column kept_col() of the slice: this thread's first chunk when the chunks per row divide
  // the threads, else the slice's first element. chunk_source: the k-th chunk's source from it.
  __device__ __forceinline__ static int kept_row() {
    if constexpr (kWholeRowsPerPass) return RawChunk().row;
    return 0;
  }
  __device__ __forceinline__ static int kept_col() {
    if constexpr (kWholeRowsPerPass) return RawChunk().col;
    return 0;
  }
  template <class T> __device__ __forceinline__ static const T* chunk_source(const T* kept, int k, int64_t stride) {
    if constexpr (kWholeRowsPerPass) return kept + k * kRowsPerPass * stride;
    return kept + RawChunk(k).source_offset(stride);
  }
  template <class T>
  __device__ __forceinline__ void issue(Tile& dst, const T* src, int64_t rows, int64_t cols, const T* fallback) const {
    if (!in_tile) return;
    const bool valid = row < rows && col < cols;
    cp_async16(dst.at(row, col), valid ? src : fallback, valid);
  }
};

// ---- 16-bit tensor-core fragments: ldmatrix + mma.sync.m16n8k16 (sm_80+) -----------------
// A warp multiplies a 16 x 16 fp16 / bf16 tile A by a 16 x 8 tile B into a 16 x 8 fp32 tile D
// (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"). With g = lane / 4,
// t = lane % 4, each lane holds (a register = two 16-bit elements, the lower index low):
//   A  a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   D  d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// ldmatrix_x4 loads four 8 x 8 16-bit matrices from shared memory, lane 8j + r naming row r
// (16 bytes, 16-byte aligned) of matrix j: register j of the lane is M_j[g][2t, 2t+1], or with
// _trans M_j[2t, 2t+1][g]. A fragment is then one instruction: A stored row-major (m rows,
// contraction contiguous) without _trans, an operand stored contraction-major (token rows, as
// both operands of a token contraction) with it; A's matrices ordered (m, k) = (0, 0), (8, 0),
// (0, 8), (8, 8), B's two n-tiles (k, n) = (0, 0), (8, 0), (0, 8), (8, 8).
// Products are exact, sums fp32. The host emulator defines both, with these layouts.
#ifndef MMFAST_CUDA_EMULATED
template <bool Trans> __device__ __forceinline__ void ldmatrix_x4_impl(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#else
  (void)row;
  r[0] = r[1] = r[2] = r[3] = 0u;
  __trap();  // callers launch only on sm_80+
#endif
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ldmatrix_x4_impl<false>(r, row); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  ldmatrix_x4_impl<true>(r, row);
}
// Two transposed 8 x 8 matrices (lanes 0-15 name the rows; the others' addresses are unused):
// the B fragment of one n-tile.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#else
  (void)row;
  r[0] = r[1] = 0u;
  __trap();  // callers launch only on sm_80+
#endif
}

// d += A B for fp16 or bf16 A, B (T), fp32 d.
template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_m16n8k16 takes fp16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)d, (void)a, (void)b;
  __trap();  // callers launch only on sm_80+
#endif
}
#endif  // !MMFAST_CUDA_EMULATED

// Two 16-bit elements of one register as floats, and back (round to nearest even).
template <class T> __device__ __forceinline__ float2 unpack_pair(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 h;
    memcpy(&h, &bits, 4);
    return __bfloat1622float2(h);
  } else {
    __half2 h;
    memcpy(&h, &bits, 4);
    return __half22float2(h);
  }
}
template <class T> __device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(low, high);
    memcpy(&bits, &h, 4);
  } else {
    const __half2 h = __floats2half2_rn(low, high);
    memcpy(&bits, &h, 4);
  }
  return bits;
}

// x = hi + lo with hi = T(x) and lo = T(x - hi): two tensor-core products (hi and lo) keep
// about twice T's mantissa bits of an fp32 operand (16 for bf16; for fp16 22 where lo stays
// normal, |x| >= 2^-3, fewer below: fp16 callers scale their operands into range). NaN x: a
// NaN pair; infinite x: hi = x, lo = 0; for fp16 also finite x beyond 65504: hi = +-inf,
// lo = 0 (bf16 overflows only past 3.39e38, left unguarded: one instruction per element less).
template <class T> __device__ __forceinline__ float low_part(float x, float hi) {
  if constexpr (std::is_same_v<T, __half>) return hi == x || fabsf(hi) > FLT_MAX ? 0.0f : x - hi;
  return hi == x ? 0.0f : x - hi;
}
template <class T>
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = pack_pair<T>(x0, x1);
  const float2 h = unpack_pair<T>(hi);
  lo = pack_pair<T>(low_part<T>(x0, h.x), low_part<T>(x1, h.y));
}

// ---- SIMT building blocks ----------------------------------------------------------------
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

// ---- TF32 tensor cores (sm_80+) ------------------------------------------------------------
// Each of the 8 warps owns a 16 x 32 strip of the tile: rows (warp / 2) * 16, columns
// (warp % 2) * 32 + {0, 16}.
#if MMFAST_CUDA_TF32_MMA
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

// x with its low 13 significand bits cleared: exact as a tf32 operand, and x - tf32_high(x) is
// exact in fp32 (an explicit mask: cvt.rna's low bits are not to be relied on).
__device__ __forceinline__ float tf32_high(float x) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(__float_as_uint(x) & 0xffffe000u);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  u &= 0xffffe000u;
  memcpy(&x, &u, sizeof u);
  return x;
#endif
}

// x as hi + lo: hi = tf32_high(x), lo = the rest rounded to tf32 (|lo| < 2^-10 |x|, so hi + lo
// holds x to about 2^-21). An infinite x is its own hi: its lo is 0, not inf - inf = NaN.
template <class Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i];
    hi.x[i] = tf32_high(x);
    lo.x[i] = wmma::__float_to_tf32(hi.x[i] == x ? 0.0f : x - hi.x[i]);
  }
}

// c += sum_l As[l][x] * Bs[l][y] over one staged kBK slice (As, Bs 32-byte aligned). SplitA /
// SplitB: that operand as hi + lo (split_tf32), one more MMA each (a_lo b_hi, a_hi b_lo), products
// good to about 2^-20 of the split operand instead of tf32's 2^-11, for sums that cancel
// (linear attention's backward on identical tokens: dq is eps / z of its terms). An operand
// whose values are exact in tf32 (16-bit tokens) needs no split.
template <bool SplitA = false, bool SplitB = false>
__device__ __forceinline__ void mma_tile(TcFragC (&c)[2], const float* As, const float* Bs) {
  const int warp = threadIdx.x / 32;
  const int m0 = (warp / 2) * 16, n0 = (warp % 2) * 32;
#pragma unroll
  for (int k0 = 0; k0 < kBK; k0 += 8) {
    TcFragA a, a_lo;
    wmma::load_matrix_sync(a, As + k0 * kLd + m0, kLd);
    if constexpr (SplitA) {
      split_tf32(a, a_lo);
    } else {
      round_to_tf32(a);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      TcFragB b, b_lo;
      wmma::load_matrix_sync(b, Bs + k0 * kLd + n0 + 16 * j, kLd);
      if constexpr (SplitB) {
        split_tf32(b, b_lo);
      } else {
        round_to_tf32(b);
      }
      if constexpr (SplitA) wmma::mma_sync(c[j], a_lo, b, c[j]);
      if constexpr (SplitB) wmma::mma_sync(c[j], a, b_lo, c[j]);
      wmma::mma_sync(c[j], a, b, c[j]);
    }
  }
}

// acc[i][j] = tile[ty*4 + i][tx*4 + j]: the fragments, through shared memory Cs, into the
// per-thread layout of the SIMT path. Starts and ends with __syncthreads().
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
#endif  // MMFAST_CUDA_TF32_MMA

// Floats of shared memory the tensor-core epilogue needs (Cs): only float accumulators on
// tensor-core archs use it; the others declare a token array.
template <class A> struct TcScratch { static constexpr int floats = 8; };
#if MMFAST_CUDA_TF32_MMA
template <> struct TcScratch<float> { static constexpr int floats = kTcSmemFloats; };
#endif
template <class A> constexpr bool kTensorCoreCapable = TcScratch<A>::floats > 8;

// ---- the accumulating tile -----------------------------------------------------------------
// The 4 x 4 register block and, for the tensor-core path, the warp's fragments.
template <class A> struct TileAccumulator {
  A acc[4][4];
#if MMFAST_CUDA_TF32_MMA
  TcFragC frag[2];
#endif
};

template <class A>
__device__ __forceinline__ void tile_zero(TileAccumulator<A>& t, bool use_tc) {
  zero_acc(t.acc);
#if MMFAST_CUDA_TF32_MMA
  if constexpr (kTensorCoreCapable<A>) {
    if (use_tc) tc_zero(t.frag);
  }
#endif
}

// t += the staged slice As^T Bs (SplitA / SplitB: hi + lo operands on the tensor-core path, see
// mma_tile).
template <bool SplitA = false, bool SplitB = false, class A>
__device__ __forceinline__ void tile_accumulate(TileAccumulator<A>& t, bool use_tc, const A* As, const A* Bs, int ty,
                                                int tx) {
#if MMFAST_CUDA_TF32_MMA
  if constexpr (kTensorCoreCapable<A>) {
    if (use_tc) {
      mma_tile<SplitA, SplitB>(t.frag, As, Bs);
      return;
    }
  }
#endif
  fma_tile(t.acc, As, Bs, ty, tx);
}

// After the last slice: moves the fragments into t.acc (through Cs, with barriers); a
// no-op on the SIMT path.
template <class A>
__device__ __forceinline__ void tile_finish(TileAccumulator<A>& t, bool use_tc, A* Cs, int ty, int tx) {
#if MMFAST_CUDA_TF32_MMA
  if constexpr (kTensorCoreCapable<A>) {
    if (use_tc) tc_to_acc(t.frag, Cs, t.acc, ty, tx);
  }
#endif
}

// t.acc = sum_{l < L} FA(i, l) * FB(l, j) for the 64 x 64 tile (i = ty*4 + ., j = tx*4 + .).
// FA(i, l) / FB(l, j) are element sources (a function or a SplitElement; 0 outside the valid
// range). Starts and ends with __syncthreads(), so the caller may reuse As / Bs / Cs and any
// other shared memory around it. SplitA / SplitB: hi + lo operands on the tensor-core path (mma_tile).
template <bool AXFast, bool BXFast, bool SplitA = false, bool SplitB = false, class A, class FA, class FB>
__device__ __forceinline__ void gemm_tile(TileAccumulator<A>& t, bool use_tc, int L, FA fa, FB fb, A* As, A* Bs,
                                          A* Cs, int ty, int tx) {
  tile_zero(t, use_tc);
  const auto ea = as_split(fa);
  const auto eb = as_split(fb);
  for (int l0 = 0; l0 < L; l0 += kBK) {
    __syncthreads();
    stage_tile_pair<AXFast, BXFast>(
        As, split_element([&](int x, int l) { return ea.load(x, l0 + l); },
                          [&](const auto& raw, int x, int l) { return ea.finish(raw, x, l0 + l); }),
        Bs, split_element([&](int x, int l) { return eb.load(l0 + l, x); },
                          [&](const auto& raw, int x, int l) { return eb.finish(raw, l0 + l, x); }));
    __syncthreads();
    tile_accumulate<SplitA, SplitB>(t, use_tc, As, Bs, ty, tx);
  }
  __syncthreads();
  tile_finish(t, use_tc, Cs, ty, tx);
}

// ---- long reductions: fp32 sums flushed into fp64 registers ------------------------------
// A tile that sums over many slices (a reduction over thousands of tokens) flushes its fp32
// sums into fp64 registers every few slices and restarts from zero, so no fp32 accumulator
// sums more than a bounded number of terms and the error does not grow with the sequence.
// fp64 accumulators need no flushing (WideTile<double> is empty).
template <class A> struct WideTile {
  static constexpr bool kEnabled = false;
};
template <> struct WideTile<float> {
  static constexpr bool kEnabled = true;
  double hi[4][4];
#if MMFAST_CUDA_TF32_MMA
  double hi_frag[2][TcFragC::num_elements];
#endif
};

template <class A>
__device__ __forceinline__ void wide_zero(WideTile<A>& w) {
  if constexpr (WideTile<A>::kEnabled) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) w.hi[i][j] = 0.0;
#if MMFAST_CUDA_TF32_MMA
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
      for (int e = 0; e < TcFragC::num_elements; ++e) w.hi_frag[f][e] = 0.0;
#endif
  }
}

// w += t; t = 0 (thread-local: fragments are mapped elementwise, no barrier needed).
template <class A>
__device__ __forceinline__ void tile_flush(TileAccumulator<A>& t, WideTile<A>& w, bool use_tc) {
  if constexpr (WideTile<A>::kEnabled) {
#if MMFAST_CUDA_TF32_MMA
    if (use_tc) {
#pragma unroll
      for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int e = 0; e < TcFragC::num_elements; ++e) {
          w.hi_frag[f][e] += t.frag[f].x[e];
          t.frag[f].x[e] = 0.0f;
        }
      return;
    }
#endif
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w.hi[i][j] += t.acc[i][j];
        t.acc[i][j] = A(0);
      }
  }
}

// After the last slice: the last flush, the fp64 sums rounded once into t (as tile_finish,
// which it replaces: t.acc holds the result).
template <class A>
__device__ __forceinline__ void tile_finish_wide(TileAccumulator<A>& t, WideTile<A>& w, bool use_tc, A* Cs, int ty,
                                                 int tx) {
  if constexpr (WideTile<A>::kEnabled) {
    tile_flush(t, w, use_tc);
#if MMFAST_CUDA_TF32_MMA
    if (use_tc) {
#pragma unroll
      for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int e = 0; e < TcFragC::num_elements; ++e) t.frag[f].x[e] = static_cast<float>(w.hi_frag[f][e]);
    }
#endif
    if (!use_tc) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) t.acc[i][j] = static_cast<A>(w.hi[i][j]);
    }
  }
  tile_finish(t, use_tc, Cs, ty, tx);
}

// The one store-tile helper: f(i, j, value) for every element (i, j) of this thread's 4 x 4
// block, tile-local (i = ty*4 + r, j = tx*4 + c), with i < rows and j < cols only.
template <class A, class F>
__device__ __forceinline__ void store_tile(const A (&acc)[4][4], int ty, int tx, int64_t rows, int64_t cols, F f) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = ty * 4 + r;
    if (i >= rows) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = tx * 4 + c;
      if (j < cols) f(i, j, acc[r][c]);
    }
  }
}

// ---- warpgroup MMA (wgmma, sm_90a) primitives -------------------------------------------------
// wgmma.mma_async.m64n128k16 (fp32 sums) with both operands read from shared memory by matrix
// descriptor, its fences and groups; used by the NT tile GEMM below. The instructions exist only
// in code compiled for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL): other code traps, and launchers check
// wgmma_built_for_device() first. The host emulator defines its own (tests/cuda_emulator),
// reading the operands through the same descriptors.
#if defined(MMFAST_CUDA_EMULATED) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define MMFAST_CUDA_WGMMA 1
#else
#define MMFAST_CUDA_WGMMA 0
#endif

using WgAcc = float[64];  // a thread's accumulators of one m64n128 wgmma

#ifndef MMFAST_CUDA_EMULATED
// The shared-memory (state space) address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Orders this thread's earlier shared-memory writes (stores, landed cp.async copies) before later
// reads by the async proxy (wgmma operands); a barrier then publishes them to the block.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if MMFAST_CUDA_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// wgmma.fence: the accumulators' writes by ordinary instructions are ordered before the next
// wgmma; commit / wait: wgmma groups, as cp.async's. Warpgroup-uniform (.sync.aligned).
__device__ __forceinline__ void wgmma_fence() {
#if MMFAST_CUDA_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if MMFAST_CUDA_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int Pending> __device__ __forceinline__ void wgmma_wait() {
#if MMFAST_CUDA_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}
// Keeps the compiler from moving reads or writes of the accumulators across a wgmma or a wait
// (the asm operands name registers, not memory; CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void wgmma_fence_operands(WgAcc& acc) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}

#define MMFAST_WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                        "+f"(d[i + 6]), "+f"(d[i + 7])
// d += A B^T for a 64 x 16 A and a 128 x 16 B (both K-major, by descriptor), fp32 d (WgAcc); with
// accumulate false (scale-d 0, warpgroup-uniform) d = A B^T, d's old values unread.
template <class T>
__device__ __forceinline__ void wgmma_m64n128k16(WgAcc& d, uint64_t desc_a, uint64_t desc_b, bool accumulate = true) {
#if MMFAST_CUDA_WGMMA
#define MMFAST_WG_ASM(type)                                                                                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                         \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " "                                    \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                          \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "               \
               "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                                    \
               : MMFAST_WG_D8(0), MMFAST_WG_D8(8), MMFAST_WG_D8(16), MMFAST_WG_D8(24), MMFAST_WG_D8(32),           \
                 MMFAST_WG_D8(40), MMFAST_WG_D8(48), MMFAST_WG_D8(56)                                              \
               : "l"(desc_a), "l"(desc_b), "r"(static_cast<uint32_t>(accumulate)))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MMFAST_WG_ASM("bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma_m64n128k16 takes fp16 or bf16");
    MMFAST_WG_ASM("f16");
  }
#undef MMFAST_WG_ASM
#else
  (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
  __trap();  // launchers check wgmma_built_for_device()
#endif
}
#undef MMFAST_WG_D8
#endif  // !MMFAST_CUDA_EMULATED

// ---- NT tile GEMM on 16-bit tensor cores (sm_80+) ----------------------------------------
// C (128 x 128, fp32) = A (128 x L) B (128 x L)^T with both operands fp16 / bf16, row-major,
// the contraction contiguous and every row 16-byte aligned (a VQ codebook against token rows,
// an nn.Linear weight against activations). kNtDepth-wide slices of both are copied by cp.async
// into a ring of kNtStages stages (the bytes are in flight without registers); each slice is
// multiplied by ldmatrix + mma.sync.m16n8k16 with fp32 sums. The 8 warps form 2 (rows) x 4
// (columns); a warp owns 64 x 32 of C, kept in registers as NtAcc.
// Element acc[mi][ni][e] of a warp's NtAcc is C at
//   row (warp / 4) * 64 + mi * 16 + lane / 4 + 8 * (e / 2),  column (warp % 4) * 32 + ni * 8 + 2 * (lane % 4) + e % 2.
// Rows past a slice's valid rows and columns past L are zero-filled, so they add 0.
constexpr int kNtRows = 128, kNtCols = 128, kNtDepth = 32, kNtStages = 4;
constexpr int kNtWarpRows = 64, kNtWarpCols = 32;
constexpr int kNtMTiles = kNtWarpRows / 16, kNtNTiles = kNtWarpCols / 8;
using NtAcc = float[kNtMTiles][kNtNTiles][4];
static_assert(kThreads == 8 * 32 && 2 * kNtWarpRows == kNtRows && 4 * kNtWarpCols == kNtCols, "2 x 4 warps");

template <class T> struct NtStage {
  static constexpr bool kAsyncProxyReads = false;  // read by ldmatrix (the generic proxy)
  // 8 elements (16 bytes) of padding per row: a row stride of 80 bytes puts the 8 rows of an
  // ldmatrix phase on distinct banks.
  RawTile<T, kNtRows, kNtDepth, 8> a;
  RawTile<T, kNtCols, kNtDepth, 8> b;
};
template <class T> constexpr size_t kNtSmemBytes = sizeof(NtStage<T>) * kNtStages;

__device__ __forceinline__ void nt_zero(NtAcc& acc) {
#pragma unroll
  for (int mi = 0; mi < kNtMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNtNTiles; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
}

// One operand's copy cursor over a stream of Tile slices (kNtDepth columns of Tile::kRows rows of
// a row-major matrix, 16-byte aligned rows): the tile's first element as one pointer, this
// thread's chunks at 32-bit byte offsets from it (RawChunk::kept_row / kept_col; the k-th chunk k
// passes below) and how many of them have rows, all kept in registers (kept_in_register), so a
// slice's copies cost a compare, a select, a 64-bit add and the copy per chunk. Recomputing the
// 64-bit addresses and row bounds per chunk cost the VQ search ~115 instructions per slice (now
// ~40 for its 4 chunks). Needs kRows * stride * sizeof(T) < 2^32 bytes (fits_offsets). The
// columns' bound is the caller's (cols_ok: this thread's chunk column, RawChunk::kept_col() + l0,
// below the row length), shared by operands of the same chunk geometry.
template <class Tile, class T> struct SliceSource {
  using Chunk = RawChunk<Tile>;
  static_assert(Chunk::kWholeRowsPerPass && !Chunk::kRagged, "every thread holds whole passes of rows");
  static_assert(Chunk::kRowsPerPass % 8 == 0, "a pass keeps the rows' swizzle phase (SwizzledTile: 8 rows)");
  const T* rows;           // the tile's row 0, column 0
  uint32_t first_bytes;    // this thread's first chunk, from `rows`
  uint32_t pass_bytes;     // Chunk::kRowsPerPass rows
  uint32_t dst_bytes;      // this thread's first chunk in a Tile, from its start
  int passes;              // this thread's chunks whose rows exist (the first `passes`)
  // Whether a tile of Tile::kRows rows of row stride `stride` spans < 2^32 bytes.
  __host__ __device__ static constexpr bool fits_offsets(int64_t stride) {
    return stride >= 0 && stride < (int64_t{1} << 32) / (Tile::kRows * static_cast<int64_t>(sizeof(T)));
  }
  // Rows from `first_row` (row stride `stride`, fits_offsets), the first valid_rows of them
  // existing; `any` is a Tile of the ring (where the chunks land).
  __device__ __forceinline__ void at_rows(Tile& any, const T* first_row, int64_t stride, int64_t valid_rows) {
    first_bytes = kept_in_register(static_cast<uint32_t>((Chunk::kept_row() * stride + Chunk::kept_col()) * sizeof(T)));
    pass_bytes = static_cast<uint32_t>(Chunk::kRowsPerPass * stride * sizeof(T));
    const Chunk first;
    dst_bytes = kept_in_register(static_cast<uint32_t>(reinterpret_cast<unsigned char*>(any.at(first.row, first.col)) -
                                                       reinterpret_cast<unsigned char*>(&any)));
    set_rows(first_row, valid_rows);
  }
  // Moves to the rows `advance` elements on, the first valid_rows of them existing.
  __device__ __forceinline__ void next_rows(int64_t advance, int64_t valid_rows) {
    set_rows(rows + advance, valid_rows);
  }
  __device__ __forceinline__ void set_rows(const T* first_row, int64_t valid_rows) {
    rows = kept_in_register(first_row);
    const int64_t below = valid_rows - Chunk::kept_row();  // rows from this thread's first chunk's on
    passes = static_cast<int>(kept_in_register(static_cast<uint32_t>(
        below <= 0 ? 0 : min_i64(Chunk::kPerThread, (below + Chunk::kRowsPerPass - 1) / Chunk::kRowsPerPass))));
  }
  // Copies the slice at column l0 into dst; chunks of missing rows or columns (!cols_ok) are
  // zero-filled, naming the slice's first element (mapped: l0 < the row length) as their source.
  // The k-th chunk lands k passes below the first in dst (Tile::at: whole passes keep a row's swizzle).
  __device__ __forceinline__ void issue(Tile& dst, int l0, bool cols_ok) const {
    const char* slice = reinterpret_cast<const char*>(rows + l0);
    unsigned char* first_dst = reinterpret_cast<unsigned char*>(&dst) + dst_bytes;
#pragma unroll
    for (int k = 0; k < Chunk::kPerThread; ++k) {
      const bool valid = cols_ok && k < passes;
      cp_async16(first_dst + k * kPassDstBytes, slice + (valid ? first_bytes + k * pass_bytes : 0u), valid);
    }
  }
  static constexpr int kPassDstBytes = Chunk::kRowsPerPass * static_cast<int>(sizeof(Tile)) / Tile::kRows;
};

// Whether the warp's 64 rows of A hold any of its first valid_rows rows: the rows past them are
// zero-filled, so a warp wholly past them may skip its multiplies (warp-uniform). Warps w and
// w + 4 share a scheduler's tensor core, so when a tile's valid rows end in its first half (a
// code's last 128-channel tile, a token tile past N) the second half costs nothing. (Skipping
// per 16-row m-tile as well took ~60 more instructions per slice on full tiles: not done.)
__device__ __forceinline__ bool nt_warp_active(int warp, int64_t valid_rows) {
  return valid_rows > (warp / 4) * kNtWarpRows;
}

// acc += the warp's part of A_s B_s^T over the stage's kNtDepth columns.
template <class T> __device__ __forceinline__ void nt_multiply(const NtStage<T>& s, NtAcc& acc, int warp, int lane) {
  const int a_row = (warp / 4) * kNtWarpRows + lane % 8 + 8 * ((lane / 8) % 2);  // A: (m, k) = (0,0) (8,0) (0,8) (8,8)
  const int a_col = 8 * (lane / 16);
  const int b_row = (warp % 4) * kNtWarpCols + lane % 8 + 8 * (lane / 16);  // B: (n, k) = (0,0) (0,8) (8,0) (8,8)
  const int b_col = 8 * ((lane / 8) % 2);
#pragma unroll
  for (int k0 = 0; k0 < kNtDepth; k0 += 16) {
    uint32_t af[kNtMTiles][4], bf[kNtNTiles][2];
#pragma unroll
    for (int mi = 0; mi < kNtMTiles; ++mi) ldmatrix_x4(af[mi], &s.a.v[a_row + mi * 16][k0 + a_col]);
#pragma unroll
    for (int np = 0; np < kNtNTiles / 2; ++np) {
      uint32_t r[4];
      ldmatrix_x4(r, &s.b.v[b_row + np * 16][k0 + b_col]);
      bf[2 * np][0] = r[0], bf[2 * np][1] = r[1], bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < kNtMTiles; ++mi)
#pragma unroll
      for (int ni = 0; ni < kNtNTiles; ++ni) mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni]);
  }
}

// The ring's pipeline over `steps` slices: issue(stage) starts the copies of the next slice into
// ring stage `stage` (the caller's copy cursor then moves on); the copies run kNtStages - 1
// slices ahead of the multiply. multiply(stage, index) multiplies a landed slice (ring[index]); after it,
// after_step(step) runs (the VQ search's argmin at each code tile's end). Every thread calls it
// with the same steps; the ring is idle on return (all copies landed; the last stage may still
// be read by other warps until the caller's next barrier). A stage that wgmma reads (the async
// proxy) is fenced by each thread after its copies land, before the barrier that publishes them.
template <class Stage, class Issue, class Multiply, class AfterStep>
__device__ __forceinline__ void nt_stream(Stage* ring, int64_t steps, Issue&& issue, Multiply&& multiply,
                                          AfterStep&& after_step) {
  int issue_stage = 0;
#pragma unroll 1
  for (int s = 0; s < kNtStages - 1; ++s) {
    if (s < steps) {
      issue(ring[issue_stage]);
      issue_stage = issue_stage + 1 == kNtStages ? 0 : issue_stage + 1;
    }
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  int stage = 0;
#pragma unroll 1
  for (int64_t step = 0; step < steps; ++step) {
    cp_async_wait<kNtStages - 2>();  // this thread's copies of `step` landed
    if constexpr (Stage::kAsyncProxyReads) fence_proxy_async_shared();
    __syncthreads();                 // everyone's did; everyone finished step - 1's stage
    if (step + kNtStages - 1 < steps) {  // into step - 1's stage
      issue(ring[issue_stage]);
      issue_stage = issue_stage + 1 == kNtStages ? 0 : issue_stage + 1;
    }
    cp_async_commit();
    multiply(ring[stage], stage);
    stage = stage + 1 == kNtStages ? 0 : stage + 1;
    after_step(step);
  }
  cp_async_wait<0>();
}

// nt_stream over NtStage slices by ldmatrix + mma.sync; a warp that is not active
// (nt_warp_active) skips its multiplies.
template <class T, class Issue, class AfterStep>
__device__ __forceinline__ void nt_pipeline(NtStage<T>* ring, int64_t steps, NtAcc& acc, int warp, int lane,
                                            bool active, Issue&& issue, AfterStep&& after_step) {
  nt_stream(
      ring, steps, issue,
      [&](const NtStage<T>& s, int) {
        if (active) nt_multiply(s, acc, warp, lane);
      },
      after_step);
}

// ---- NT tile GEMM on warpgroup MMA (wgmma, sm_90a) -----------------------------------------
// The same C (128 x 128, fp32) = A B^T over the same cp.async ring of kNtDepth-wide slices, but
// each of the block's two warpgroups (warps 0-3, 4-7) multiplies its 64 rows of A by all 128
// rows of B with wgmma.mma_async.m64n128k16, both operands read from shared memory through
// matrix descriptors (64-byte swizzle, SwizzledTile), instead of 8 warps of ldmatrix + mma.sync:
// two instructions per warpgroup and slice, and Hopper's full tensor-core rate, which mma.sync
// does not reach. Accumulators: element v of a thread's WgAcc is C at
//   row 64 (warp / 4) + 16 (warp % 4) + lane / 4 + 8 ((v / 2) % 2),  column 8 (v / 4) + 2 (lane % 4) + v % 2
// (PTX ISA, "Matrix fragments for wgmma.mma_async.m64nNk16", D; CuTe's CLayout_64xN).
constexpr int kWgRows = 64;  // rows of A per warpgroup
static_assert(2 * kWgRows == kNtRows && kNtCols / 2 == sizeof(WgAcc) / sizeof(float), "two warpgroups of 64 x 128");
template <class T> struct NtWgStage {
  static constexpr bool kAsyncProxyReads = true;  // read by wgmma
  SwizzledTile<T, kNtRows, kNtDepth> a;
  SwizzledTile<T, kNtCols, kNtDepth> b;
};
// The ring starts on a 512-byte shared-memory address (align_shared): the kernel asks for the
// slack too.
template <class T> constexpr size_t kNtWgSmemBytes = sizeof(NtWgStage<T>) * kNtStages + 512;

// A wgmma matrix descriptor (PTX ISA, "Matrix Descriptor Format"; CuTe's GmmaDescriptor) of a
// K-major operand in a SwizzledTile, starting at shared-memory byte address `address` (its row 0,
// 16-element step k: the tile's address + 64 row0 + 32 k): start address >> 4 in bits 0-13,
// leading byte offset 1 (unused by swizzled K-major layouts) in bits 16-29, stride byte offset
// (a core-matrix group, 512 bytes) >> 4 in bits 32-45, base offset 0 (the tile is 512-byte
// aligned), layout type 2 (64-byte swizzle) in bits 62-63.
__host__ __device__ constexpr uint64_t gmma_desc_sw64(uint32_t address) {
  return static_cast<uint64_t>((address & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(512 >> 4) << 32) | (uint64_t{2} << 62);
}

// The first 512-byte aligned shared-memory address at or after p (a wgmma ring's start).
__device__ __forceinline__ unsigned char* align_shared(unsigned char* p) {
  return p + ((512u - smem_address(p) % 512u) % 512u);
}

// A warpgroup's sums of the NT GEMM (NtWgmma::Acc): the wgmma accumulators and whether the next
// multiply starts new sums (restart: its first wgmma drops the old ones, scale-d 0, instead of
// 64 zeroing instructions per thread, which cost the VQ search ~64-90 per code tile).
struct WgSums {
  WgAcc v;
  bool restart;
};

__device__ __forceinline__ void wg_zero(WgSums& acc) {
#pragma unroll
  for (int i = 0; i < kNtCols / 2; ++i) acc.v[i] = 0.0f;
  acc.restart = false;
}

// The descriptors of a warpgroup's operands in ring stage 0, the ring starting at shared-memory
// address `ring`, as their low words (the high words are the same constant for every stage):
// stage i's start address fields are these + i * sizeof(NtWgStage<T>) / 16 (bits 0-13 hold any
// shared-memory address / 16, so the sum never carries into the next field). Kept in registers:
// recomputed from the ring per slice they cost ~30 instructions.
template <class T> struct NtWgDescriptors {
  static constexpr uint32_t kHigh = static_cast<uint32_t>(gmma_desc_sw64(0) >> 32);
  static constexpr uint32_t kStageStep = sizeof(NtWgStage<T>) / 16, kKStep = 32 / 16;  // k16: 32 bytes
  static_assert(sizeof(NtWgStage<T>) % 16 == 0, "stages start on 16-byte addresses");
  uint32_t a, b;
  __device__ __forceinline__ NtWgDescriptors(uint32_t ring, int warpgroup)
      : a(kept_in_register(static_cast<uint32_t>(
            gmma_desc_sw64(ring + static_cast<uint32_t>(offsetof(NtWgStage<T>, a) + warpgroup * kWgRows * 64))))),
        b(kept_in_register(
            static_cast<uint32_t>(gmma_desc_sw64(ring + static_cast<uint32_t>(offsetof(NtWgStage<T>, b)))))) {}
  __device__ __forceinline__ static uint64_t at(uint32_t low) { return (static_cast<uint64_t>(kHigh) << 32) | low; }
};

// acc += the warpgroup's 64 rows of A times B^T over ring stage `stage`'s kNtDepth columns (acc =
// when acc.restart), waited for (the stage may be refilled after the caller's next barrier; acc
// may be read right after).
template <class T>
__device__ __forceinline__ void nt_wg_multiply(const NtWgDescriptors<T>& d, int stage, WgSums& acc) {
  using D = NtWgDescriptors<T>;
  const uint32_t at = static_cast<uint32_t>(stage) * D::kStageStep;
  wgmma_fence_operands(acc.v);
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < kNtDepth / 16; ++k)
    wgmma_m64n128k16<T>(acc.v, D::at(d.a + at + k * D::kKStep), D::at(d.b + at + k * D::kKStep), k > 0 || !acc.restart);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(acc.v);
  acc.restart = false;
}

// ---- the NT tile GEMM's two multipliers, for kernels written once over both -------------------
// A kernel takes one as a template parameter (masked_conv_async_kernel<T, Nt>): the ring's stage
// and its shared memory, the accumulators, the pipeline, and each accumulator's place in C.
// zero(acc) clears the sums; restart(acc) makes the next multiply start new ones (NtWgmma:
// without zeroing instructions, so acc keeps its old values until that multiply: read it only
// after one).
struct NtMmaSync {  // ldmatrix + mma.sync (sm_80+): 8 warps of 64 x 32
  template <class T> using Stage = NtStage<T>;
  using Acc = NtAcc;
  template <class T> static constexpr size_t kSmemBytes = kNtSmemBytes<T>;
  static constexpr int kMinArch = 80;  // compiled_for
  static constexpr int kRows = 2 * kNtMTiles, kCols = 2 * kNtNTiles;  // a thread's rows and columns of C
  static constexpr int kColumnWarps = 4;  // warps sharing a row of C (each its 32 columns)
  __device__ __forceinline__ static unsigned char* ring_start(unsigned char* smem) { return smem; }
  __device__ __forceinline__ static void zero(Acc& acc) { nt_zero(acc); }
  __device__ __forceinline__ static void restart(Acc& acc) { nt_zero(acc); }
  // C's row of this thread's row r, column of its column c, and their element.
  __device__ __forceinline__ static int row(int r) {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    return (warp / 4) * kNtWarpRows + (r / 2) * 16 + lane / 4 + 8 * (r % 2);
  }
  // col(c) = col_base() + col_offset(c): a per-thread base and a compile-time offset.
  __device__ __forceinline__ static int col_base() {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    return (warp % 4) * kNtWarpCols + 2 * (lane % 4);
  }
  __device__ __forceinline__ static constexpr int col_offset(int c) { return (c / 2) * 8 + c % 2; }
  __device__ __forceinline__ static int col(int c) { return col_base() + col_offset(c); }
  __device__ __forceinline__ static float at(const Acc& acc, int r, int c) { return acc[r / 2][c / 2][2 * (r % 2) + c % 2]; }
  // nt_pipeline; warps holding none of the first valid_rows rows skip their multiplies.
  template <class T, class Issue, class AfterStep>
  __device__ __forceinline__ static void run(Stage<T>* ring, int64_t steps, Acc& acc, int64_t valid_rows,
                                             Issue&& issue, AfterStep&& after_step) {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    nt_pipeline(ring, steps, acc, warp, lane, nt_warp_active(warp, valid_rows), issue, after_step);
  }
};

struct NtWgmma {  // wgmma (sm_90a): 2 warpgroups of 64 x 128
  template <class T> using Stage = NtWgStage<T>;
  using Acc = WgSums;
  template <class T> static constexpr size_t kSmemBytes = kNtWgSmemBytes<T>;
  static constexpr int kMinArch = 90;
  static constexpr int kRows = 2, kCols = kNtCols / 4;
  static constexpr int kColumnWarps = 1;
  __device__ __forceinline__ static unsigned char* ring_start(unsigned char* smem) { return align_shared(smem); }
  __device__ __forceinline__ static void zero(Acc& acc) { wg_zero(acc); }
  __device__ __forceinline__ static void restart(Acc& acc) { acc.restart = true; }
  __device__ __forceinline__ static int row(int r) {
    return 16 * (static_cast<int>(threadIdx.x) / 32) + static_cast<int>(threadIdx.x) % 32 / 4 + 8 * r;
  }
  __device__ __forceinline__ static int col_base() { return 2 * (static_cast<int>(threadIdx.x) % 4); }
  __device__ __forceinline__ static constexpr int col_offset(int c) { return 8 * (c / 2) + c % 2; }
  __device__ __forceinline__ static int col(int c) { return col_base() + col_offset(c); }
  __device__ __forceinline__ static float at(const Acc& acc, int r, int c) { return acc.v[4 * (c / 2) + 2 * r + c % 2]; }
  // nt_stream by nt_wg_multiply; a warpgroup holding none of the first valid_rows rows skips its
  // wgmmas (warpgroup-uniform, as wgmma requires).
  template <class T, class Issue, class AfterStep>
  __device__ __forceinline__ static void run(Stage<T>* ring, int64_t steps, Acc& acc, int64_t valid_rows,
                                             Issue&& issue, AfterStep&& after_step) {
    const int warpgroup = static_cast<int>(threadIdx.x) / 128;
    // Kept in registers: recomputed per slice, they cost ~40 instructions.
    const bool active = kept_in_register(static_cast<uint32_t>(valid_rows > warpgroup * kWgRows)) != 0u;
    const NtWgDescriptors<T> descriptors(smem_address(ring), warpgroup);
    nt_stream(
        ring, steps, issue,
        [&](const Stage<T>&, int stage) {
          if (active) nt_wg_multiply(descriptors, stage, acc);
        },
        after_step);
  }
};

// Whether this build holds wgmma code for the current device: sm_90a compiled in
// (MMFAST_SM90A_BUILD, set by setup.py when the arch list names 9.0a and not plain 9.0) and a
// compute capability 9.0 device, whose binary is then the sm_90a one.
inline bool wgmma_built_for_device() {
#if defined(MMFAST_SM90A_BUILD) || defined(MMFAST_CUDA_EMULATED)
  return compute_capability_major() == 9;
#else
  return false;
#endif
}

// f(NtWgmma{}) when a kernel's wgmma variant (wgmma_kernel) can run here: an sm_90 device this
// build holds sm_90a code for, its ring fitting a block, unless MMFAST_CUDA_WGMMA=0; else
// f(NtMmaSync{}).
template <class T, class Kernel, class F> auto with_nt_multiplier(Kernel* wgmma_kernel, F&& f) {
  if (wgmma_enabled() && wgmma_built_for_device() && NtWgmma::kSmemBytes<T> <= max_shared_per_block() &&
      compiled_for(wgmma_kernel, NtWgmma::kMinArch))
    return f(NtWgmma{});
  return f(NtMmaSync{});
}

}  // namespace cuda
}  // namespace mmfast
