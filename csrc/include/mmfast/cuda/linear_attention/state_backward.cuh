// The backward of the state pass: dv = phi(k) dS / N and dk = phi'(k) * (v dS^T + dm) / N.
//   la_state_backward_kernel  item = (output tile, 64-token tile, b*h); output tiles
//                             [0, tiles_v) are the Dv tiles of dv, [tiles_v, tiles_v + tiles_k)
//                             the Dk tiles of dk.
// It runs where the tensor-core kernel of backward_async.cuh does not (fp32 / fp64, unaligned
// rows, head dims past 160, pre-sm_80, MMFAST_CUDA_ASYNC_COPY=0).
#pragma once

#include "mmfast/cuda/linear_attention/backward_async.cuh"
#include "mmfast/cuda/linear_attention/common.cuh"

namespace mmfast {
namespace cuda {
namespace la {

struct StateBackwardArgs : Dims {
  TokenTensor k, v, grad_k, grad_v;
  const void* grad_state;
  const void* grad_mean;
};

template <class C>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<C>) la_state_backward_kernel(StateBackwardArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int otiles = a.tiles_v + a.tiles_k;
  const int64_t items = static_cast<int64_t>(otiles) * a.ntiles * a.bh;
  const A nf = static_cast<A>(a.N);
  constexpr bool use_tc = C::tc;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int ot = static_cast<int>(item % otiles);
    const int64_t rest = item / otiles;
    const int64_t n0 = (rest % a.ntiles) * kTile;
    const int64_t bh = rest / a.ntiles;
    const TokenView<const T> kk = token_view<const T>(a.k, bh, a.heads);
    const TokenView<const T> vv = token_view<const T>(a.v, bh, a.heads);
    const A* dS = static_cast<const A*>(a.grad_state) + bh * static_cast<int64_t>(a.dk) * a.dv;
    const A* dm = static_cast<const A*>(a.grad_mean) + bh * a.dk;
    TileAccumulator<A> tile;
    if (ot < a.tiles_v) {  // dv = phi(k) dS / N
      const int v0 = ot * kTile;
      const TokenView<T> gv = token_view<T>(a.grad_v, bh, a.heads);
      const auto phi_k_in = [&](int i, int l) { return n0 + i < a.N && l < a.dk; };
      const auto phi_k = split_element(
          [&](int i, int l) { return phi_k_in(i, l) ? kk.row(n0 + i)[l] : from_acc<T>(A(0)); },
          [&](T raw, int i, int l) { return phi_k_in(i, l) ? phi<C::fm>(to_acc(raw)) : A(0); });
      const auto grad_state = [&](int l, int j) -> A {
        const int c = v0 + j;
        return (l < a.dk && c < a.dv) ? dS[static_cast<int64_t>(l) * a.dv + c] : A(0);
      };
      gemm_tile<false, true>(tile, use_tc, a.dk, phi_k, grad_state, As, Bs, Cs, ty, tx);
      store_tile(tile.acc, ty, tx, a.N - n0, a.dv - v0,
                 [&](int i, int j, A value) { gv.row(n0 + i)[v0 + j] = from_acc<T>(value / nf); });
    } else {  // dk = phi'(k) * (v dS^T + dm) / N
      const int k0 = (ot - a.tiles_v) * kTile;
      const TokenView<T> gk = token_view<T>(a.grad_k, bh, a.heads);
      const auto v_at = [&](int i, int l) -> A {
        const int64_t n = n0 + i;
        return (n < a.N && l < a.dv) ? to_acc(vv.row(n)[l]) : A(0);
      };
      const auto grad_state_t = [&](int l, int j) -> A {  // B(l = v, j = k) = dS[k][v]
        const int r = k0 + j;
        return (l < a.dv && r < a.dk) ? dS[static_cast<int64_t>(r) * a.dv + l] : A(0);
      };
      // v dS^T + dm cancels for identical tokens (dv has no such sum: plain TF32 above)
      gemm_tile<false, false, false, kSplitCancellingSums>(tile, use_tc, a.dv, v_at, grad_state_t, As, Bs, Cs, ty, tx);
      store_tile(tile.acc, ty, tx, a.N - n0, a.dk - k0, [&](int i, int j, A value) {
        const int c = k0 + j;
        const A dphi_k = (value + dm[c]) / nf;
        gk.row(n0 + i)[c] = from_acc<T>(times_dphi<C::fm>(dphi_k, to_acc(kk.row(n0 + i)[c])));
      });
    }
  }
}

template <class T>
cudaError_t launch_state_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  StateBackwardArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.k = p.k;
  a.v = p.v;
  a.grad_k = p.grad_k;
  a.grad_v = p.grad_v;
  a.grad_state = p.grad_state;
  a.grad_mean = p.grad_mean;
  const int64_t items = static_cast<int64_t>(a.tiles_k + a.tiles_v) * a.ntiles * a.bh;
  return dispatch_config<T>(a, [&](auto config) {
    using C = decltype(config);
    if constexpr (C::tc) {  // the tensor-core kernel where it takes the shapes (backward_async.cuh)
      bool launched = false;
      const cudaError_t async_err = launch_backward_async<C, BackwardPass::kState>(p, a, stream, launched);
      if (async_err != cudaSuccess || launched) return async_err;
    }
    MMFAST_LAUNCH(la_state_backward_kernel<C>, grid_for(items), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
}

}  // namespace la

// Entry point: grad_k, grad_v from grad_state, grad_mean, k, v; no workspace.
inline size_t linear_attention_state_backward_workspace_bytes(const LinearAttentionParams&) { return 0; }
inline cudaError_t linear_attention_state_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.k.data || !p.v.data || !p.grad_k.data || !p.grad_v.data || !p.grad_state ||
      !p.grad_mean)
    return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return la::launch_state_backward<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace mmfast
