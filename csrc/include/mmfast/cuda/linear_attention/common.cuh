// What the linear-attention CUDA passes share: the feature map, the kernel-argument base,
// the row denominators z, and the validation of parameters. Namespace mmfast::cuda::la.
#pragma once

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/tile_gemm.cuh"
#include "mmfast/linear_attention.h"

namespace mmfast {
namespace cuda {
namespace la {

constexpr int kMaxD = 256;  // == kMaxHeadDim: shared arrays of per-dim values
static_assert(kMaxD == kMaxHeadDim, "kMaxD must match kMaxHeadDim");
static_assert(kTile * 4 == kThreads, "z / row reductions use 4 threads per token row");

// phi(x): 0 = none, 1 = elu(x) + 1, 2 = relu (FeatureMap values). NaN propagates (a compare
// that is false for NaN picks x).
template <class A> __device__ __forceinline__ A phi(A x, int fm) {
  if (fm == static_cast<int>(FeatureMap::kElu1)) return x > A(0) ? x + A(1) : exp_acc(x);
  if (fm == static_cast<int>(FeatureMap::kRelu)) return x < A(0) ? A(0) : x;
  return x;
}

// grad * phi'(x) as torch's autograd computes it: elu1 -> grad * exp(x) if x <= 0 else grad;
// relu -> 0 if x <= 0 (selected: 0 even for a NaN grad) else grad; none -> grad. For NaN x
// the gradient flows, as in torch.
template <class A> __device__ __forceinline__ A times_dphi(A grad, A x, int fm) {
  if (fm == static_cast<int>(FeatureMap::kElu1)) return x <= A(0) ? grad * exp_acc(x) : grad;
  if (fm == static_cast<int>(FeatureMap::kRelu)) return x <= A(0) ? A(0) : grad;
  return grad;
}

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

// ms[k] = M[k] for k < Dk, into shared memory; starts with a barrier (the previous item's
// readers are done) and ends with one.
template <class A>
__device__ __forceinline__ void load_mean(A* ms, const A* M, int dk) {
  __syncthreads();
  for (int k = threadIdx.x; k < dk; k += kThreads) ms[k] = M[k];
  __syncthreads();
}

}  // namespace la
}  // namespace cuda
}  // namespace mmfast
