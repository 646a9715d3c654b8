// masked_group_norm on the GPU (namespace mmfast::cuda::prunedk).
//
//   masked_group_norm_kernel<T, V>  one block per (sample, group), grid-stride over B * G. Two
//                             passes over x: the first reads the group's kept channels once for
//                             both statistics (Welford / Chan: each thread folds in V elements at
//                             a time as their own mean and squared deviations, threads merge
//                             pairwise; fp32, fp64 for fp64: no E[x^2] - mean^2 cancellation);
//                             the second writes every channel of the group: kept ones
//                             (x - mean) * rstd * weight + bias (+ SiLU), masked ones 0 (their
//                             values never used: a load of a masked pack reads the group's
//                             first pack instead, and drops it). A sample whose code is outside
//                             [0, K) gets NaN over all its
//                             channels. Threads walk the group in V-element packs in memory order
//                             (coalesced), stepping without a division, and each issues kLoads
//                             pack loads before it uses any (4 x 16 B in flight per thread).
// V = 16 / sizeof(T) (16-byte packs) when the plane is a multiple of V and x, y are 16-byte
// aligned (a pack then never straddles two channels); V = 1 otherwise.
#pragma once

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/pruned/conv.cuh"
#include "mmfast/pruned.h"

namespace mmfast {
namespace cuda {
namespace prunedk {

constexpr int kNormThreads = 256;
constexpr int kNormLoads = 4;  // pack loads each thread issues before it uses any

// V consecutive elements, loaded and stored as one access (16 bytes when sizeof(T) * V == 16).
template <class T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// The packs of a group one thread visits: pack threadIdx.x, then every blockDim.x-th after it,
// in memory order (element offset pack * V, since a channel holds whole packs), with the
// channel c each lies in (i: its pack within the channel), stepped without a division.
struct GroupWalk {
  int64_t pack, c, i, step_c, step_i, packs;
  __device__ __forceinline__ explicit GroupWalk(int64_t packs_per_channel)
      : pack(threadIdx.x), c(threadIdx.x / packs_per_channel), i(threadIdx.x - c * packs_per_channel),
        step_c(blockDim.x / packs_per_channel), step_i(blockDim.x - step_c * packs_per_channel),
        packs(packs_per_channel) {}
  __device__ __forceinline__ void advance() {
    pack += blockDim.x;
    c += step_c;
    i += step_i;
    if (i >= packs) {
      i -= packs;
      ++c;
    }
  }
};

// Running statistics of n values: their mean and the sum of squared deviations from it.
template <class A> struct Welford {
  A n, mean, m2;
};

// The statistics of a and b together (Chan et al.'s pairwise update); exact order, so the
// block's result does not depend on thread timing.
template <class A> __device__ __forceinline__ Welford<A> welford_merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;  // exactly: an approximate share of 1 would scale the whole mean
  const A n = a.n + b.n;
  const A delta = b.mean - a.mean, share = divide_fast(b.n, n);  // weights a difference: 2 ulp is plenty
  return {n, a.mean + delta * share, a.m2 + b.m2 + delta * delta * a.n * share};
}

// Folds V values into w: their own mean and squared deviations first (exact two-pass over a
// pack in registers), then one pairwise update.
template <class T, int V, class A>
__device__ __forceinline__ void welford_add(Welford<A>& w, const Pack<T, V>& pack) {
  A sum = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k) sum += to_acc(pack.v[k]);
  const A mean = sum * (A(1) / A(V));
  A m2 = A(0);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const A d = to_acc(pack.v[k]) - mean;
    m2 += d * d;
  }
  w = welford_merge(w, Welford<A>{A(V), mean, m2});
}

// Welford statistics of the whole block, returned to every thread (lane butterfly, then the
// warps in order: deterministic). scratch: 32 entries of shared memory.
template <class A> __device__ __forceinline__ Welford<A> block_welford(Welford<A> w, Welford<A>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    const Welford<A> other{__shfl_xor_sync(0xffffffffu, w.n, off), __shfl_xor_sync(0xffffffffu, w.mean, off),
                           __shfl_xor_sync(0xffffffffu, w.m2, off)};
    // Both lanes of a pair combine in the same order (lower lane first): the same bits.
    w = (lane & off) ? welford_merge(other, w) : welford_merge(w, other);
  }
  __syncthreads();  // a previous call may still read scratch
  if (lane == 0) scratch[warp] = w;
  __syncthreads();
  Welford<A> r = scratch[0];
  for (int k = 1; k < warps; ++k) r = welford_merge(r, scratch[k]);
  return r;
}

template <class A> __device__ __forceinline__ A silu_acc(A v) { return v / (A(1) + exp_acc(-v)); }
template <class A> __device__ __forceinline__ A sqrt_acc(A v);
template <> __device__ __forceinline__ float sqrt_acc<float>(float v) { return sqrtf(v); }
template <> __device__ __forceinline__ double sqrt_acc<double>(double v) { return sqrt(v); }

// Loads the next kNormLoads packs of the walk (advancing it past them); kept[u]: whether pack u
// lies in a kept channel of the group. Every load is issued, unconditionally, before any value
// is used (a pack outside the kept channels reads the group's first pack instead, an L1 hit,
// and is ignored), so all of them are in flight at once.
template <class T, int V>
__device__ __forceinline__ void load_packs(const T* xg, const bool* keep, int64_t per_group, GroupWalk& at,
                                           Pack<T, V> (&pack)[kNormLoads], bool (&kept)[kNormLoads]) {
#pragma unroll
  for (int u = 0; u < kNormLoads; ++u, at.advance()) {
    kept[u] = at.c < per_group && keep[at.c];
    pack[u] = *reinterpret_cast<const Pack<T, V>*>(xg + (kept[u] ? at.pack * V : 0));
  }
}

// Mean and 1 / sqrt(var + eps) of the kept channels of one group (xg: its first element);
// (0, 0) when it keeps none. Every thread of the block calls it.
template <class T, int V>
__device__ __forceinline__ void group_statistics(const T* xg, const bool* keep, int64_t per_group, int64_t plane,
                                                 double eps, Welford<acc_t<T>>* scratch, acc_t<T>& mean,
                                                 acc_t<T>& rstd) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  const int64_t packs = plane / V;
  Welford<A> w{A(0), A(0), A(0)};
  for (GroupWalk at(packs); at.c < per_group;) {
    P pack[kNormLoads];
    bool kept[kNormLoads];
    load_packs(xg, keep, per_group, at, pack, kept);
#pragma unroll
    for (int u = 0; u < kNormLoads; ++u)
      if (kept[u]) welford_add<T, V>(w, pack[u]);
  }
  const Welford<A> all = block_welford(w, scratch);
  mean = all.mean;
  rstd = all.n > A(0) ? A(1) / sqrt_acc(all.m2 / all.n + static_cast<A>(eps)) : A(0);
}

template <class T, int V>
__global__ void __launch_bounds__(kNormThreads) masked_group_norm_kernel(MaskedGroupNormParams p) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  __shared__ Welford<A> scratch[32];
  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t per_group = p.channels / p.groups, items = p.batch * p.groups, packs = p.plane / V;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / p.groups, g = item - b * p.groups;
    const int64_t first = (b * p.channels + g * per_group) * p.plane;
    const T* xg = x + first;
    T* yg = y + first;
    const int64_t code = code_of(p.routing, b);
    if (code < 0 || code >= p.routing.num_codes) {  // uniform over the block: NaN over the group
      P nan_pack;
#pragma unroll
      for (int k = 0; k < V; ++k) nan_pack.v[k] = quiet_nan<T>();
      for (GroupWalk at(packs); at.c < per_group; at.advance())
        *reinterpret_cast<P*>(yg + at.pack * V) = nan_pack;
      continue;
    }
    const bool* keep = p.routing.out_mask + code * p.channels + g * per_group;
    A mean, rstd;
    group_statistics<T, V>(xg, keep, per_group, p.plane, p.eps, scratch, mean, rstd);
    const int64_t affine = code * p.affine_code_stride + g * per_group;
    for (GroupWalk at(packs); at.c < per_group;) {
      P pack[kNormLoads];
      bool kept[kNormLoads];
      GroupWalk from = at;  // replayed below: cheaper in registers than kNormLoads offsets
      load_packs(xg, keep, per_group, at, pack, kept);
#pragma unroll
      for (int u = 0; u < kNormLoads; ++u, from.advance()) {
        const int64_t c = from.c;
        if (c >= per_group) continue;  // past the group
        P out;
        if (kept[u]) {
          const A scale = rstd * (weight != nullptr ? to_acc(weight[affine + c]) : A(1));
          const A shift = bias != nullptr ? to_acc(bias[affine + c]) : A(0);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            A v = (to_acc(pack[u].v[k]) - mean) * scale + shift;
            if (p.silu) v = silu_acc(v);
            out.v[k] = from_acc<T>(v);
          }
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) out.v[k] = from_acc<T>(A(0));
        }
        *reinterpret_cast<P*>(yg + from.pack * V) = out;
      }
    }
  }
}

// 16-byte packs when every pack lies inside one channel and x, y are 16-byte aligned.
template <class T> bool group_norm_packs_16b(const MaskedGroupNormParams& p) {
  constexpr int kPack = 16 / sizeof(T);
  return p.plane % kPack == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.y) % 16 == 0;
}

template <class T>
cudaError_t launch_group_norm(const MaskedGroupNormParams& p, cudaStream_t stream) {
  if (group_norm_packs_16b<T>(p))
    MMFAST_LAUNCH((masked_group_norm_kernel<T, 16 / sizeof(T)>), grid_for(p.batch * p.groups), kNormThreads, 0,
                  stream, p);
  else
    MMFAST_LAUNCH((masked_group_norm_kernel<T, 1>), grid_for(p.batch * p.groups), kNormThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace prunedk
}  // namespace cuda
}  // namespace mmfast
