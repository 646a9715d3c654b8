// The backward of the apply pass: grad_q, then grad_state and grad_mean through the state pass
// (the tensor-core kernel of backward_async.cuh sums those itself at head dims up to 64).
//
// Per 64-token tile of one (b, h), la_apply_backward_kernel computes
//   z_i = phi(q_i) . m + eps
//   w_i = do_i . (phi(q_i) S)                          (phase 1: loop over Dv tiles)
//   dz_i = -(w_i / z_i) / z_i   (= -(g_i . o_i) with g_i = do_i / z_i, o_i = phi(q_i) S / z_i)
//   dq_i = phi'(q_i) * ((do_i S^T) / z_i + dz_i m)     (phase 2: loop over Dk tiles)
// and stores (z_i, dz_i) per token into the workspace; dS = sum_i phi(q_i)^T g_i and
// dm = sum_i dz_i phi(q_i) are then the state pass run on (q, grad_out) with those scalars.
// This register-staged kernel runs where the tensor-core kernel of backward_async.cuh does not
// (fp32 / fp64, unaligned rows, head dims past 160, pre-sm_80, MMFAST_CUDA_ASYNC_COPY=0).
#pragma once

#include "mmfast/cuda/linear_attention/backward_async.cuh"
#include "mmfast/cuda/linear_attention/common.cuh"
#include "mmfast/cuda/linear_attention/state.cuh"

namespace mmfast {
namespace cuda {
namespace la {

struct ApplyBackwardArgs : Dims {
  TokenTensor q, grad_out, grad_q;
  const void* state;
  const void* mean;
  void* scalars;  // out: (z, dz) per token, [bh][N][2]
};

// Shared memory of la_apply_backward_kernel.
template <class A> struct ApplyBackwardShared {
  __align__(32) A As[kBK * kLd];
  __align__(32) A Bs[kBK * kLd];
  __align__(32) A Cs[TcScratch<A>::floats];
  A ms[kMaxD];
  A zs[kTile];
  A ws[kTile];
  A dzs[kTile];
};

// One token tile of one (b, h) and its views.
template <class T> struct ApplyBackwardItem {
  int64_t bh, n0;
  TokenView<const T> q, dout;
  TokenView<T> dq;
  const acc_t<T>* S;
};

// Phase 1: ws[r] = do_r . (phi(q_r) S), summed over the Dv tiles.
template <class C, class T, class A, class PhiQ, class Dout>
__device__ __forceinline__ void apply_backward_w(const ApplyBackwardArgs& a, const ApplyBackwardItem<T>& it,
                                                 ApplyBackwardShared<A>& sh, PhiQ phi_q, Dout dout_at, int ty, int tx) {
  A w[4] = {A(0), A(0), A(0), A(0)};
  TileAccumulator<A> tile;
  for (int v0 = 0; v0 < a.dv; v0 += kTile) {
    const auto state = [&](int l, int j) -> A {
      const int c = v0 + j;
      return (l < a.dk && c < a.dv) ? it.S[static_cast<int64_t>(l) * a.dv + c] : A(0);
    };
    // phi(q) and S split: w feeds dz, whose dz m cancels against (do S^T) / z
    gemm_tile<false, true, kSplitCancellingSums, kSplitCancellingSums>(tile, C::tc, a.dk, phi_q, state, sh.As, sh.Bs,
                                                                       sh.Cs, ty, tx);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      A part = A(0);
#pragma unroll
      for (int j = 0; j < 4; ++j) part += tile.acc[i][j] * dout_at(ty * 4 + i, v0 + tx * 4 + j);
      // Sum over the 16 tx lanes of this row group (lanes (ty & 1) * 16 + tx of the warp).
      part += __shfl_xor_sync(0xffffffffu, part, 8);
      part += __shfl_xor_sync(0xffffffffu, part, 4);
      part += __shfl_xor_sync(0xffffffffu, part, 2);
      part += __shfl_xor_sync(0xffffffffu, part, 1);
      w[i] += part;
    }
  }
  if (tx == 0) {  // rows ty*4 .. ty*4+3 belong to this thread alone
#pragma unroll
    for (int i = 0; i < 4; ++i) sh.ws[ty * 4 + i] = w[i];
  }
  __syncthreads();
}

// dzs[r] = -(w_r / z_r) / z_r, and (z_r, dz_r) into the scalars buffer for the state pass.
template <class T, class A>
__device__ __forceinline__ void apply_backward_dz(const ApplyBackwardArgs& a, const ApplyBackwardItem<T>& it,
                                                  ApplyBackwardShared<A>& sh) {
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const A z = sh.zs[r];
    const A dz = -(sh.ws[r] / z) / z;
    sh.dzs[r] = dz;
    const int64_t n = it.n0 + r;
    if (n < a.N) {
      A* s = static_cast<A*>(a.scalars) + (it.bh * a.N + n) * 2;
      s[0] = z;
      s[1] = dz;
    }
  }
  __syncthreads();
}

// Phase 2: dq = phi'(q) * ((do S^T) / z + dz m), one Dk tile at a time.
template <class C, class T, class A, class Dout>
__device__ __forceinline__ void apply_backward_dq(const ApplyBackwardArgs& a, const ApplyBackwardItem<T>& it,
                                                  ApplyBackwardShared<A>& sh, Dout dout_at, int ty, int tx) {
  TileAccumulator<A> tile;
  for (int k0 = 0; k0 < a.dk; k0 += kTile) {
    const auto state_t = [&](int l, int j) -> A {  // B(l = v, j = k) = S[k][v]
      const int r = k0 + j;
      return (l < a.dv && r < a.dk) ? it.S[static_cast<int64_t>(r) * a.dv + l] : A(0);
    };
    gemm_tile<false, false, false, kSplitCancellingSums>(tile, C::tc, a.dv, dout_at, state_t, sh.As, sh.Bs, sh.Cs, ty,
                                                         tx);
    store_tile(tile.acc, ty, tx, a.N - it.n0, a.dk - k0, [&](int i, int j, A value) {
      const int c = k0 + j;
      const A dphi_q = value / sh.zs[i] + sh.dzs[i] * sh.ms[c];
      it.dq.row(it.n0 + i)[c] = from_acc<T>(times_dphi<C::fm>(dphi_q, to_acc(it.q.row(it.n0 + i)[c])));
    });
  }
}

// Item = (64-token tile, b*h).
template <class C>
__global__ void __launch_bounds__(kThreads, 1) la_apply_backward_kernel(ApplyBackwardArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  __shared__ ApplyBackwardShared<A> sh;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t items = a.ntiles * a.bh;
  const A eps = static_cast<A>(a.eps);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    ApplyBackwardItem<T> it;
    it.n0 = (item % a.ntiles) * kTile;
    it.bh = item / a.ntiles;
    it.q = token_view<const T>(a.q, it.bh, a.heads);
    it.dout = token_view<const T>(a.grad_out, it.bh, a.heads);
    it.dq = token_view<T>(a.grad_q, it.bh, a.heads);
    it.S = static_cast<const A*>(a.state) + it.bh * static_cast<int64_t>(a.dk) * a.dv;
    load_mean(sh.ms, static_cast<const A*>(a.mean) + it.bh * a.dk, a.dk);
    tile_z<C::fm, T, A>(sh.zs, it.q, it.n0, a.N, a.dk, sh.ms, eps);

    const auto phi_q_in = [&](int i, int l) { return it.n0 + i < a.N && l < a.dk; };
    const auto phi_q = split_element(
        [&](int i, int l) { return phi_q_in(i, l) ? it.q.row(it.n0 + i)[l] : from_acc<T>(A(0)); },
        [&](T raw, int i, int l) { return phi_q_in(i, l) ? phi<C::fm>(to_acc(raw)) : A(0); });
    const auto dout_at = [&](int i, int l) -> A {
      const int64_t n = it.n0 + i;
      return (n < a.N && l < a.dv) ? to_acc(it.dout.row(n)[l]) : A(0);
    };
    apply_backward_w<C, T>(a, it, sh, phi_q, dout_at, ty, tx);
    apply_backward_dz<T>(a, it, sh);
    apply_backward_dq<C, T>(a, it, sh, dout_at, ty, tx);
  }
}

// ---- host side ------------------------------------------------------------------------------
inline size_t apply_backward_scalar_bytes(const LinearAttentionParams& p) {
  const size_t bytes = static_cast<size_t>(p.bh() * p.seqlen * 2) * accumulator_bytes(p.dtype);
  return static_cast<size_t>(round_up(static_cast<int64_t>(bytes), 256));
}

// The workspace: (z, dz) per token, then the partials of dS and dm, of the state pass or of the
// tensor-core kernel's own sums (plan_state_sums), whichever path runs.
inline size_t apply_backward_workspace_bytes(const LinearAttentionParams& p, int sms) {
  const size_t state = plan_state(p, sms).partial_bytes;
  const size_t fused = may_fuse_state_sums(p) ? plan_state_sums(p, sms).partial_bytes : 0;
  return apply_backward_scalar_bytes(p) + (state > fused ? state : fused);
}

template <class T>
cudaError_t launch_apply_backward(const LinearAttentionParams& p, cudaStream_t stream, int sms) {
  const StatePlan plan = plan_state(p, sms);
  ApplyBackwardArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.q = p.q;
  a.grad_out = p.grad_out;
  a.grad_q = p.grad_q;
  a.state = p.state;
  a.mean = p.mean;
  a.scalars = p.workspace;
  void* partials = static_cast<char*>(p.workspace) + apply_backward_scalar_bytes(p);
  bool summed = false;  // dS and dm too (the tensor-core kernel's fused sums)
  cudaError_t err = dispatch_config<T>(a, [&](auto config) {
    using C = decltype(config);
    if constexpr (C::tc) {  // the tensor-core kernel where it takes the shapes (backward_async.cuh)
      bool launched = false;
      const cudaError_t async_err =
          launch_backward_async<C, BackwardPass::kApply>(p, a, stream, launched, partials, &summed, sms);
      if (async_err != cudaSuccess || launched) return async_err;
    }
    MMFAST_LAUNCH(la_apply_backward_kernel<C>, grid_for(a.ntiles * a.bh), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || summed) return err;
  // dS = sum_i phi(q_i)^T (do_i / z_i), dm = sum_i dz_i phi(q_i): the state pass with
  // k := q, v := grad_out and per-token (z, dz).
  return launch_state_pass<T>(p.q, p.grad_out, p.workspace, p.grad_state, p.grad_mean, p, plan, partials, 1.0,
                              stream);
}

}  // namespace la

// Entry point: grad_q, grad_state, grad_mean from grad_out, q, state, mean. Needs
// linear_attention_apply_backward_workspace_bytes(p) of workspace.
inline size_t linear_attention_apply_backward_workspace_bytes(const LinearAttentionParams& p) {
  if (!la::valid_dims(p)) return 0;
  return la::apply_backward_workspace_bytes(p, sm_count());
}
inline cudaError_t linear_attention_apply_backward(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!la::valid_dims(p) || !p.q.data || !p.grad_out.data || !p.grad_q.data || !p.state || !p.mean ||
      !p.grad_state || !p.grad_mean)
    return cudaErrorInvalidValue;
  const int sms = sm_count();
  const size_t need = la::apply_backward_workspace_bytes(p, sms);
  if (p.workspace == nullptr || p.workspace_bytes < need) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return la::launch_apply_backward<decltype(t)>(p, stream, sms); });
}

}  // namespace cuda
}  // namespace mmfast
