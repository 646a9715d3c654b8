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
    const int v0 = static_cast<int>(item % a.tiles_v) * kTile;
    const int64_t rest = item / a.tiles_v;
    const int64_t n0 = (rest % a.ntiles) * kTile;
    const int64_t bh = rest / a.ntiles;
    const TokenView<const T> q = token_view<const T>(a.q, bh, a.heads);
    const TokenView<T> out = token_view<T>(a.out, bh, a.heads);
    const A* S = static_cast<const A*>(a.state) + bh * static_cast<int64_t>(a.dk) * a.dv;
    load_mean(ms, static_cast<const A*>(a.mean) + bh * a.dk, a.dk);
    tile_z<C::fm, T, A>(zs, q, n0, a.N, a.dk, ms, eps);

    TileAccumulator<A> tile;
    const auto phi_q_in = [&](int i, int l) { return n0 + i < a.N && l < a.dk; };
    const auto phi_q = split_element(
        [&](int i, int l) { return phi_q_in(i, l) ? q.row(n0 + i)[l] : from_acc<T>(A(0)); },
        [&](T raw, int i, int l) { return phi_q_in(i, l) ? phi<C::fm>(to_acc(raw)) : A(0); });
    const auto state = [&](int l, int j) -> A {
      const int c = v0 + j;
      return (l < a.dk && c < a.dv) ? S[static_cast<int64_t>(l) * a.dv + c] : A(0);
    };
    gemm_tile<false, true>(tile, C::tc, a.dk, phi_q, state, As, Bs, Cs, ty, tx);  // ends with a barrier
    store_tile(tile.acc, ty, tx, a.N - n0, a.dv - v0,
               [&](int i, int j, A value) { out.row(n0 + i)[v0 + j] = from_acc<T>(value / zs[i]); });
  }
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
  return dispatch_config<T>(a, [&](auto config) {
    MMFAST_LAUNCH(la_apply_kernel<decltype(config)>, grid_for(items), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
}

}  // namespace la
}  // namespace cuda
}  // namespace mmfast
