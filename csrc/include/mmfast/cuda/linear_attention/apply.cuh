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

// One work item: a 64-token tile of one Dv tile of one head.
struct ApplyItem {
  int64_t bh, n0;
  int v0;
};
__device__ __forceinline__ ApplyItem apply_item(const ApplyArgs& a, int64_t item) {
  ApplyItem it;
  it.v0 = static_cast<int>(item % a.tiles_v) * kTile;
  const int64_t rest = item / a.tiles_v;
  it.n0 = (rest % a.ntiles) * kTile;
  it.bh = rest / a.ntiles;
  return it;
}

// The state operand S[l][v0 + j] (0 outside Dk x Dv) and phi(q) from a raw q element, as
// element sources of gemm_tile (l: the contraction over Dk).
template <class A> __device__ __forceinline__ auto state_operand(const ApplyArgs& a, const ApplyItem& it) {
  const A* S = static_cast<const A*>(a.state) + it.bh * static_cast<int64_t>(a.dk) * a.dv;
  const int dk = a.dk, dv = a.dv, v0 = it.v0;
  return [=](int l, int j) -> A {
    const int c = v0 + j;
    return (l < dk && c < dv) ? S[static_cast<int64_t>(l) * dv + c] : A(0);
  };
}
template <class C, class A> __device__ __forceinline__ auto phi_q_finish(const ApplyArgs& a, const ApplyItem& it) {
  const int64_t rows = a.N - it.n0;
  const int dk = a.dk;
  return [=](typename C::T raw, int i, int l) { return i < rows && l < dk ? phi<C::fm>(to_acc(raw)) : A(0); };
}

// out rows of the tile = acc / z.
template <class T, class A>
__device__ __forceinline__ void store_apply_tile(const ApplyArgs& a, const ApplyItem& it, const A (&acc)[4][4],
                                                 const A* zs, int ty, int tx) {
  const TokenView<T> out = token_view<T>(a.out, it.bh, a.heads);
  store_tile(acc, ty, tx, a.N - it.n0, a.dv - it.v0,
             [&](int i, int j, A value) { out.row(it.n0 + i)[it.v0 + j] = from_acc<T>(value / zs[i]); });
}

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
    const ApplyItem it = apply_item(a, item);
    const TokenView<const T> q = token_view<const T>(a.q, it.bh, a.heads);
    load_mean(ms, static_cast<const A*>(a.mean) + it.bh * a.dk, a.dk);
    tile_z<C::fm, T, A>(zs, q, it.n0, a.N, a.dk, ms, eps);

    TileAccumulator<A> tile;
    const int64_t rows = a.N - it.n0;
    const auto phi_q = split_element(
        [&](int i, int l) { return i < rows && l < a.dk ? q.row(it.n0 + i)[l] : from_acc<T>(A(0)); },
        phi_q_finish<C, A>(a, it));
    gemm_tile<false, true>(tile, C::tc, a.dk, phi_q, state_operand<A>(a, it), As, Bs, Cs, ty, tx);  // ends with a barrier
    store_apply_tile<T>(a, it, tile.acc, zs, ty, tx);
  }
}

// ---- the asynchronous variant (16-bit inputs with 16-byte aligned rows) -------------------
// A persistent grid (the resident blocks only); each block takes a contiguous range of items
// ordered token tile fastest, so it keeps one head's state columns S[:, v0:v0+64] (fp32, the
// B operand of every slice) and m in shared memory across items and reloads them only when
// the head or the Dv tile changes. The raw q of all its items streams through one ring of
// kAsyncApplyStages RawTiles (64 tokens x kBK dims): the next item's q is in flight while this
// one multiplies: its wait leaves kAsyncApplyStages - 2 tiles in flight (32 KB of bf16 per
// block; the pass's other half of the traffic, the output, is stores, which need no such
// cover). z = phi(q) . m + eps is summed from the staged phi(q) tiles (no second read of q).
constexpr int kAsyncApplyStages = 10;

template <class T, class A> struct AsyncApplyShared {
  RawTile<T, kTile, kBK> q[kAsyncApplyStages];
  __align__(32) A As[kBK * kLd];
  __align__(32) A Cs[TcScratch<A>::floats];
  A ms[kMaxD];
  A zs[kTile];
};
// Followed by Sv[round_up(Dk, kBK)][kLd], the state columns, sized at launch.
template <class T, class A> constexpr size_t kStateColumnsOffset = round_up(sizeof(AsyncApplyShared<T, A>), 128);

template <class T> inline size_t async_apply_smem_bytes(int dk) {
  using A = acc_t<T>;
  return kStateColumnsOffset<T, A> + sizeof(A) * static_cast<size_t>(round_up(dk, kBK)) * kLd;
}

// Item order of the asynchronous kernel: token tile fastest, then Dv tile, then head.
__device__ __forceinline__ ApplyItem apply_item_tokens_fastest(const ApplyArgs& a, int64_t item) {
  ApplyItem it;
  it.n0 = (item % a.ntiles) * kTile;
  const int64_t rest = item / a.ntiles;
  it.v0 = static_cast<int>(rest % a.tiles_v) * kTile;
  it.bh = rest / a.tiles_v;
  return it;
}

// ms = m of head it.bh; Sv[l][j] = S[l][v0 + j] (0 outside Dk x Dv) for l < round_up(Dk, kBK).
// Between barriers.
template <class A>
__device__ __forceinline__ void load_state_columns(const ApplyArgs& a, const ApplyItem& it, A* ms, A* Sv) {
  __syncthreads();  // the previous item's readers are done
  const auto state = state_operand<A>(a, it);
  const int rows = static_cast<int>(round_up(a.dk, kBK));
  for (int k = threadIdx.x; k < a.dk; k += kThreads) ms[k] = static_cast<const A*>(a.mean)[it.bh * a.dk + k];
  for (int e = threadIdx.x; e < rows * kTile; e += kThreads) Sv[(e / kTile) * kLd + e % kTile] = state(e / kTile, e % kTile);
  __syncthreads();
}

// z += sum over the staged slice of phi(q)[i][l] * m[l0 + l] for row i = threadIdx / 4 (4
// threads per row, combined with shuffles; every thread of the row holds the sum).
template <class A>
__device__ __forceinline__ void accumulate_z(A& z, const A* As, const A* ms, int l0, int dk) {
  const int i = threadIdx.x >> 2, part = threadIdx.x & 3;
  A s = A(0);
#pragma unroll
  for (int l = part; l < kBK; l += 4) s += l0 + l < dk ? As[l * kLd + i] * ms[l0 + l] : A(0);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  z += s;
}

template <class C>
__global__ void __launch_bounds__(kThreads, 1) la_apply_async_kernel(ApplyArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  constexpr int S = kAsyncApplyStages;
  MMFAST_DYNAMIC_SHARED(smem);
  auto& sh = *reinterpret_cast<AsyncApplyShared<T, A>*>(smem);
  A* const Sv = reinterpret_cast<A*>(smem + kStateColumnsOffset<T, A>);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t items = static_cast<int64_t>(a.tiles_v) * a.ntiles * a.bh;
  const int64_t per_block = ceil_div(items, gridDim.x);
  const int64_t first = blockIdx.x * per_block, last = min_i64(items, first + per_block);
  // The block's q slices, numbered across its items: g = (item - first) * slices + slice.
  const int64_t slices = ceil_div(a.dk, kBK);
  const auto issue = [&](int64_t g) {  // one commit group per slice, empty past the last item
    const int64_t item = first + g / slices;
    if (item < last) {
      const ApplyItem it = apply_item_tokens_fastest(a, item);
      const TokenView<const T> q = token_view<const T>(a.q, it.bh, a.heads);
      const int l0 = static_cast<int>(g % slices) * kBK;
      raw_tile_issue(sh.q[g % S], [&](int i) { return q.row(it.n0 + i) + l0; }, a.N - it.n0, a.dk - l0, q.base);
    }
    cp_async_commit();
  };
  for (int prologue = 0; prologue < S - 1; ++prologue) issue(prologue);
  const A eps = static_cast<A>(a.eps);
  int64_t g = 0, loaded_bh = -1;
  int loaded_v0 = -1;
  for (int64_t item = first; item < last; ++item) {
    const ApplyItem it = apply_item_tokens_fastest(a, item);
    if (it.bh != loaded_bh || it.v0 != loaded_v0) {  // uniform across the block
      load_state_columns(a, it, sh.ms, Sv);
      loaded_bh = it.bh;
      loaded_v0 = it.v0;
    }
    TileAccumulator<A> tile;
    tile_zero(tile, C::tc);
    A z = A(0);
    const auto finish = phi_q_finish<C, A>(a, it);
    for (int64_t sl = 0; sl < slices; ++sl, ++g) {
      cp_async_wait<S - 2>();  // this thread's copies of slice g landed
      __syncthreads();         // everyone's landed; the previous slice's products are done
      issue(g + S - 1);        // into slice g - 1's stage: its readers passed the barrier above
      const RawTile<T, kTile, kBK>& raw = sh.q[g % S];
      const int l0 = static_cast<int>(sl) * kBK;
      stage_tile<false>(sh.As, split_element([&](int i, int l) { return raw.v[i][l]; },
                                             [&](T value, int i, int l) { return finish(value, i, l0 + l); }));
      __syncthreads();
      accumulate_z(z, sh.As, sh.ms, l0, a.dk);
      tile_accumulate(tile, C::tc, sh.As, Sv + l0 * kLd, ty, tx);
    }
    if ((threadIdx.x & 3) == 0) sh.zs[threadIdx.x >> 2] = z + eps;
    __syncthreads();  // zs complete; the last products are done before Cs is written
    tile_finish(tile, C::tc, sh.Cs, ty, tx);
    store_apply_tile<T>(a, it, tile.acc, sh.zs, ty, tx);
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
    using C = decltype(config);
    if constexpr (kSixteenBit<T>) {
      const size_t smem = async_apply_smem_bytes<T>(a.dk);  // > 48 KB: opt in
      if (async_copy_enabled() && rows_16b_aligned(a.q, a.dk, sizeof(T)) && smem <= max_shared_per_block()) {
        const int per_sm = resident_blocks_per_sm(&la_apply_async_kernel<C>, kThreads, smem);
        if (per_sm < 1) {
          const cudaError_t err = cudaGetLastError();
          return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
        }
        const int64_t resident = static_cast<int64_t>(sm_count()) * per_sm;
        MMFAST_LAUNCH(la_apply_async_kernel<C>, grid_for(min_i64(items, resident)), kThreads, smem, stream, a);
        return cudaGetLastError();
      }
    }
    MMFAST_LAUNCH(la_apply_kernel<C>, grid_for(items), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
}

}  // namespace la
}  // namespace cuda
}  // namespace mmfast
