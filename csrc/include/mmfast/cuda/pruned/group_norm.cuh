// masked_group_norm on the GPU (namespace mmfast::cuda::prunedk).
//
//   masked_group_norm_kernel  one block per (sample, group), grid-stride over B * G. Two passes
//                             over the group's kept channels give the mean and then the
//                             (biased) variance around it (fp32, fp64 for fp64: no E[x^2] -
//                             mean^2 cancellation); a third pass writes every channel of the
//                             group: kept ones (x - mean) * rstd * weight + bias (+ SiLU),
//                             masked ones 0 (never read). A sample whose code is outside [0, K)
//                             gets NaN over all its channels. Threads walk the group's
//                             (channel, pixel) elements in memory order (coalesced), stepping
//                             without a division per element.
#pragma once

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/pruned/conv.cuh"
#include "mmfast/pruned.h"

namespace mmfast {
namespace cuda {
namespace prunedk {

constexpr int kNormThreads = 256;

// Element e = c * plane + i of a group, for e = threadIdx.x, threadIdx.x + blockDim.x, ...:
// f(c, i) for every such element with c < channels.
template <class F>
__device__ __forceinline__ void for_group_elements(int64_t channels, int64_t plane, F f) {
  const int64_t step = blockDim.x, step_c = step / plane, step_i = step - step_c * plane;
  int64_t c = threadIdx.x / plane, i = threadIdx.x - (threadIdx.x / plane) * plane;
  while (c < channels) {
    f(c, i);
    c += step_c;
    i += step_i;
    if (i >= plane) {
      i -= plane;
      ++c;
    }
  }
}

template <class A> __device__ __forceinline__ A silu_acc(A v) { return v / (A(1) + exp_acc(-v)); }
template <class A> __device__ __forceinline__ A sqrt_acc(A v);
template <> __device__ __forceinline__ float sqrt_acc<float>(float v) { return sqrtf(v); }
template <> __device__ __forceinline__ double sqrt_acc<double>(double v) { return sqrt(v); }

template <class T>
__global__ void __launch_bounds__(kNormThreads) masked_group_norm_kernel(MaskedGroupNormParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  __shared__ long long count_scratch[32];
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t per_group = p.channels / p.groups, items = p.batch * p.groups;
  const auto add = [](A u, A v) { return u + v; };
  const auto add_count = [](long long u, long long v) { return u + v; };
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / p.groups, g = item - b * p.groups;
    const int64_t first = (b * p.channels + g * per_group) * p.plane;
    const T* xg = x + first;
    T* yg = y + first;
    const int64_t code = code_of(p.routing, b);
    if (code < 0 || code >= p.routing.num_codes) {  // uniform over the block: NaN over the group
      for_group_elements(per_group, p.plane, [&](int64_t c, int64_t i) { yg[c * p.plane + i] = quiet_nan<T>(); });
      continue;
    }
    const bool* keep = p.routing.out_mask + code * p.channels + g * per_group;
    long long kept_local = 0;
    for (int64_t c = threadIdx.x; c < per_group; c += blockDim.x) kept_local += keep[c] ? 1 : 0;
    const long long kept = block_allreduce(kept_local, add_count, count_scratch);
    A mean = A(0), rstd = A(0);
    if (kept > 0) {
      const A count = static_cast<A>(kept) * static_cast<A>(p.plane);
      A sum = A(0);
      for_group_elements(per_group, p.plane, [&](int64_t c, int64_t i) {
        if (keep[c]) sum += to_acc(xg[c * p.plane + i]);
      });
      mean = block_allreduce(sum, add, scratch) / count;
      A squares = A(0);
      for_group_elements(per_group, p.plane, [&](int64_t c, int64_t i) {
        if (keep[c]) {
          const A d = to_acc(xg[c * p.plane + i]) - mean;
          squares += d * d;
        }
      });
      rstd = A(1) / sqrt_acc(block_allreduce(squares, add, scratch) / count + static_cast<A>(p.eps));
    }
    const int64_t affine = code * p.affine_code_stride + g * per_group;
    for_group_elements(per_group, p.plane, [&](int64_t c, int64_t i) {
      A v = A(0);
      if (keep[c]) {
        const A scale = rstd * (weight != nullptr ? to_acc(weight[affine + c]) : A(1));
        const A shift = bias != nullptr ? to_acc(bias[affine + c]) : A(0);
        v = (to_acc(xg[c * p.plane + i]) - mean) * scale + shift;
        if (p.silu) v = silu_acc(v);
      }
      yg[c * p.plane + i] = from_acc<T>(v);
    });
  }
}

template <class T>
cudaError_t launch_group_norm(const MaskedGroupNormParams& p, cudaStream_t stream) {
  MMFAST_LAUNCH(masked_group_norm_kernel<T>, grid_for(p.batch * p.groups), kNormThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace prunedk
}  // namespace cuda
}  // namespace mmfast
