// What the linear-attention CUDA passes share: the feature map, the kernel-argument base,
// the row denominators z, and the validation of parameters. Namespace mmfast::cuda::la.
#pragma once

#include <type_traits>

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/tile_gemm.cuh"
#include "mmfast/linear_attention.h"

namespace mmfast {
namespace cuda {
namespace la {

constexpr int kMaxD = 256;  // == kMaxHeadDim: shared arrays of per-dim values
static_assert(kMaxD == kMaxHeadDim, "kMaxD must match kMaxHeadDim");
static_assert(kTile * 4 == kThreads, "z / row reductions use 4 threads per token row");

// phi(x) of the feature map Fm (none, elu(x) + 1, relu): a compile-time choice, so the
// staging loops carry no branch on it. NaN propagates (a compare that is false for NaN picks x).
template <FeatureMap Fm, class A> __device__ __forceinline__ A phi(A x) {
  if constexpr (Fm == FeatureMap::kElu1) return x > A(0) ? x + A(1) : exp_acc(x);
  if constexpr (Fm == FeatureMap::kRelu) return x < A(0) ? A(0) : x;
  return x;
}

// phi(x) for the cp.async kernels' in-place conversions, whose operands go to the tensor cores
// as 16-bit values or hi + lo pairs: elu1 as a select (exp of min(x, 0) on every lane, never
// overflowing, instead of a branch that diverges per element; NaN still propagates) and
// exp_fast, whose error is below what the pair keeps. (The register-staged loops keep phi:
// there the compiler would interleave the exps with the loads, fewer loads in flight.)
template <FeatureMap Fm> __device__ __forceinline__ float phi_fast(float x) {
  if constexpr (Fm == FeatureMap::kElu1) {
    const float e = exp_fast(x > 0.0f ? 0.0f : x);
    return x > 0.0f ? x + 1.0f : e;
  }
  return phi<Fm>(x);
}

// Elements after each row of the cp.async tiles that ldmatrix reads: with rows of 128 bytes
// (64 16-bit elements) an ldmatrix phase's 8 rows would share banks; 144-byte rows spread them
// over all 32.
constexpr int kRawPad = 8;

// A 16-byte chunk (8 elements) of a landed raw tile made into a tensor-core operand in place:
// phi(x) * scale rounded to T, or with a lo_chunk split as hi + lo (split_pair; lo written
// there); zeros when !valid (past the tokens or dims: cp.async zero-filled them, but phi(0)
// need not be 0).
template <class C>
__device__ __forceinline__ void phi_chunk(uint4* chunk, uint4* lo_chunk, bool valid, float scale = 1.0f) {
  using T = typename C::T;
  if (!valid) {  // one branch per chunk, not one per element
    *chunk = make_uint4(0u, 0u, 0u, 0u);
    if (lo_chunk != nullptr) *lo_chunk = make_uint4(0u, 0u, 0u, 0u);
    return;
  }
  const uint4 bits = *chunk;
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
  uint32_t hi[4], lo[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = unpack_pair<T>(words[i]);
    const float p0 = phi_fast<C::fm>(x.x) * scale, p1 = phi_fast<C::fm>(x.y) * scale;
    if (lo_chunk != nullptr)
      split_pair<T>(p0, p1, hi[i], lo[i]);
    else
      hi[i] = pack_pair<T>(p0, p1);
  }
  *chunk = make_uint4(hi[0], hi[1], hi[2], hi[3]);
  if (lo_chunk != nullptr) *lo_chunk = make_uint4(lo[0], lo[1], lo[2], lo[3]);
}

// A power of two that brings the largest finite magnitude to [2^Top, 2^(Top + 1)) (1 for 0, inf
// or NaN): fp16 tensor-core operands are scaled by it into fp16's range, and the scale undone in
// fp32. Top = 14 puts the largest just under fp16's 65504 and keeps 29 binades below it normal
// (15 with Top = 0): entries 2^-20 of the largest keep hi + lo's precision.
template <int Top = 0> __device__ __forceinline__ float range_scale(float largest) {
  static_assert(Top >= 0 && Top <= 14, "the scaled largest stays below fp16's 65504");
  if (!(largest > 0.0f && largest <= FLT_MAX)) return 1.0f;
  int e;
  frexpf(largest, &e);  // largest = f 2^e, f in [0.5, 1)
  const int shift = 1 - e + Top;
  return ldexpf(1.0f, shift < 127 ? shift : 127);  // a subnormal largest (e <= -126) stops at 2^127, not inf
}

// apply_backward's dS / dm sums multiply A = phi(q) / z (16-bit hi + lo) by B = do and w z: a
// z of eps alone (relu: phi(q) . m = 0) takes an fp16 A past 65504 (inf, and the state
// backward's phi(k) dS NaN). For fp16 half of 1 / z's binary exponent moves to B: A takes
// (1 / z) * balance and B 1 / balance = 2^floor(e/2) for |1 / z| ~ 2^e, a power of two (exact
// in fp16 and fp32 unless B overflows: |do| or |w z| past 65504 / 2^floor(e/2), e.g. 512 at
// eps = 1e-4, where without it phi(q) past 6.5 overflowed A: an overflow of B scales with a
// GradScaler's loss scale, which backs off from it; one of A does not). 1 for |1 / z| < 2 (the
// usual z, the results bit for bit as before) and for bf16, whose range is fp32's.
template <class T> __device__ __forceinline__ float operand_balance(float inv_z) {
  if constexpr (!std::is_same_v<T, __half>) {
    return 1.0f;
  } else {
    if (!(fabsf(inv_z) >= 2.0f && fabsf(inv_z) <= FLT_MAX)) return 1.0f;  // (z < 0: the identity map)
    int e;
    frexpf(inv_z, &e);  // inv_z = f 2^e, f in [0.5, 1), e >= 2
    return ldexpf(1.0f, -(e / 2));
  }
}

// A landed 16-byte chunk of a 16-bit tile times a power of two, in place (exact unless it
// overflows): B of the balanced sums above.
template <class T> __device__ __forceinline__ void scale_chunk(uint4* chunk, float factor) {
  const uint4 bits = *chunk;
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = unpack_pair<T>(words[i]);
    out[i] = pack_pair<T>(x.x * factor, x.y * factor);
  }
  *chunk = make_uint4(out[0], out[1], out[2], out[3]);
}

// grad * phi'(x) as torch's autograd computes it: elu1 -> grad * exp(x) if x <= 0 else grad;
// relu -> 0 if x <= 0 (selected: 0 even for a NaN grad) else grad; none -> grad. For NaN x
// the gradient flows, as in torch.
template <FeatureMap Fm, class A> __device__ __forceinline__ A times_dphi(A grad, A x) {
  if constexpr (Fm == FeatureMap::kElu1) return x <= A(0) ? grad * exp_acc(x) : grad;
  if constexpr (Fm == FeatureMap::kRelu) return x <= A(0) ? A(0) : grad;
  return grad;
}

// The compile-time configuration of a kernel: input type, feature map, and whether products
// run on TF32 tensor cores (each instantiation carries one product path, not both).
template <class Input, FeatureMap Fm, bool TensorCores> struct Config {
  using T = Input;
  static constexpr FeatureMap fm = Fm;
  static constexpr bool tc = TensorCores;
};

// fp16 / bf16: the inputs the cp.async kernels take (16-byte chunks of 8 elements).
template <class T> constexpr bool kSixteenBit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// The register-staged kernels split the fp32 operand of the products in the sums the backward
// cancels as tf32 hi + lo (tile_gemm.cuh's mma_tile; the token operand, 16-bit, is exact): the
// state pass (phi(k), phi(q) / z: S and dS as accurate as the fp32 m and dm), apply_backward's
// w (phi(q) S, both split) and do S^T, state_backward's v dS^T. Identical tokens make dq_i =
// (u_i + dz_i m) phi'(q_i) about eps / z_i of its terms; plain tf32 products left up to 48% of
// such a dq wrong (emulated, bf16; test_linear_attention_emulated's identical-token cases).
// The cp.async kernels split their operands as 16-bit hi + lo for the same reason.
constexpr bool kSplitCancellingSums = true;

// Sizes every kernel needs; each kernel's argument struct extends it.
struct Dims {
  int64_t bh, heads, N, ntiles;  // ntiles = kTile-token tiles of the sequence
  int dk, dv, tiles_k, tiles_v, fm;
  int use_tc;                    // 1: tensor-core products (fp16/bf16 inputs on sm_80+)
  double eps;
};

// Tensor cores for fp16/bf16 on sm_80+, unless MMFAST_CUDA_TENSOR_CORES=0 (exact SIMT path).
inline bool use_tensor_cores(const LinearAttentionParams& p) {
  const bool half = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  return half && tensor_cores_enabled() && compute_capability_major() >= 8;
}

inline Dims make_dims(const LinearAttentionParams& p) {
  Dims d;
  d.bh = p.bh();
  d.heads = p.heads;
  d.N = p.seqlen;
  d.ntiles = ceil_div(p.seqlen, kTile);
  d.dk = static_cast<int>(p.dim_k);
  d.dv = static_cast<int>(p.dim_v);
  d.tiles_k = static_cast<int>(ceil_div(p.dim_k, kTile));
  d.tiles_v = static_cast<int>(ceil_div(p.dim_v, kTile));
  d.fm = static_cast<int>(p.feature_map);
  d.use_tc = use_tensor_cores(p) ? 1 : 0;
  d.eps = p.eps;
  return d;
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

// zs[r] = phi(q[n0 + r]) . m + eps for the 64 rows of a token tile (0 + eps past N).
// m is in shared memory (length Dk). 4 threads per row, combined with warp shuffles.
template <FeatureMap Fm, class T, class A>
__device__ __forceinline__ void tile_z(A* zs, const TokenView<const T>& q, int64_t n0, int64_t N, int Dk,
                                       const A* ms, A eps) {
  const int r = threadIdx.x >> 2, part = threadIdx.x & 3;
  const int64_t n = n0 + r;
  A s = A(0);
  if (n < N) {
    const T* row = q.row(n);
    for (int k = part; k < Dk; k += 4) s += phi<Fm>(to_acc(row[k])) * ms[k];
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  if (part == 0) zs[r] = s + eps;
}

// ms[k] = M[k] for k < Dk, into shared memory; starts with a barrier (the previous item's
// readers are done) and ends with one.
template <class A>
__device__ __forceinline__ void load_mean(A* ms, const A* M, int dk) {
  __syncthreads();
  for (int k = threadIdx.x; k < dk; k += kThreads) ms[k] = M[k];
  __syncthreads();
}

// Resident blocks per SM a tile kernel is compiled for (__launch_bounds__): two (at most 128
// registers per thread) where that costs no spills, one for the tensor-core and fp64 variants,
// whose fragments / fp64 sums spill at 128 (scripts/sass_report.py shows registers, spills
// and occupancy per kernel). apply_backward always takes one (it spills at two). The cp.async
// apply kernel sets its own (two: 123-125 registers, no spills).
template <class C>
constexpr int kMinBlocksPerSm = (C::tc || std::is_same_v<typename C::T, double>) ? 1 : 2;

// The tile width W of the cp.async kernels (their template parameter: the state pass's W x W
// tiles, apply's W-wide Dv tiles and Dk slices): of 48, 64 and 80 the one with the least
// padded products, ceil(Dk / W) ceil(Dv / W) W^2 (64 on a tie), among those whose shared
// memory fits(W) a block (48 and 80 do not fit sm_86 / sm_89's 99 KB; 64 always does).
template <class Fits> int tile_width(int64_t dk, int64_t dv, Fits fits) {
  const auto padded = [&](int64_t w) { return ceil_div(dk, w) * ceil_div(dv, w) * w * w; };
  int best = 64;
  for (const int w : {48, 80})
    if (padded(w) < padded(best) && fits(w)) best = w;
  return best;
}

// f(std::integral_constant<int, W>{}) for a tile width of tile_width.
template <class F> cudaError_t dispatch_tile_width(int width, F f) {
  switch (width) {
    case 48: return f(std::integral_constant<int, 48>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
  }
  return cudaErrorInvalidValue;
}

// f(Config<T, fm, tc>{}) for the run-time feature map and tensor-core choice of d: the
// tensor-core variants exist for fp16 / bf16 inputs only (use_tc is never set for the others).
template <class T, class F> cudaError_t dispatch_config(const Dims& d, F f) {
  constexpr bool kHalf = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
  const auto with_fm = [&](auto fm) -> cudaError_t {
    constexpr FeatureMap Fm = decltype(fm)::value;
    if constexpr (kHalf) {
      if (d.use_tc) return f(Config<T, Fm, true>{});
    }
    return f(Config<T, Fm, false>{});
  };
  switch (static_cast<FeatureMap>(d.fm)) {
    case FeatureMap::kNone: return with_fm(std::integral_constant<FeatureMap, FeatureMap::kNone>{});
    case FeatureMap::kElu1: return with_fm(std::integral_constant<FeatureMap, FeatureMap::kElu1>{});
    case FeatureMap::kRelu: return with_fm(std::integral_constant<FeatureMap, FeatureMap::kRelu>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace la
}  // namespace cuda
}  // namespace mmfast
