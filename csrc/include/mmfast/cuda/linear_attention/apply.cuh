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
// one multiplies: its wait leaves kAsyncApplyStages - 2 tiles pending (at least 32 KB of bf16
// per block; the pass's other half of the traffic, the output, is stores, which need no such
// cover). z = phi(q) . m + eps is summed from the staged phi(q) tiles (no second read of q).
constexpr int kAsyncApplyStages = 10;

template <class C> struct AsyncApplyShared {
  using T = typename C::T;
  using A = acc_t<T>;
  RawTile<T, kTile, kBK> q[kAsyncApplyStages];
  __align__(32) A As[kBK * kLd];
  __align__(32) A Cs[C::tc ? TcScratch<A>::floats : 8];  // the tensor-core epilogue only
  A ms[kMaxD];
  A zs[kTile];
};
// Followed by Sv[round_up(Dk, kBK)][kLd], the state columns, sized at launch.
template <class C> constexpr size_t kStateColumnsOffset = round_up(sizeof(AsyncApplyShared<C>), 128);

template <class C> inline size_t async_apply_smem_bytes(int dk) {
  return kStateColumnsOffset<C> + sizeof(acc_t<typename C::T>) * static_cast<size_t>(round_up(dk, kBK)) * kLd;
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

// Converts a landed q tile (64 tokens x kBK dims) into As[l][i] = phi(q)[i][l0 + l], one
// 16-byte chunk (8 dims of one token) per thread, and adds this thread's part of z:
// z += sum over its 8 dims of phi(q) * m. The 4 threads of a token are adjacent lanes
// (combine_z). Chunks past the tokens or dims are zeros and add nothing.
template <class C, class T>
__device__ __forceinline__ void convert_raw_q(float* __restrict__ As, const RawTile<T, kTile, kBK>& raw, int64_t rows,
                                              int l0, int dk, const float* ms, float& z) {
  using R = RawTile<T, kTile, kBK>;
  static_assert(R::kChunks == kThreads && R::kChunksPerRow == 4, "one chunk per thread, 4 per token");
  const int i = threadIdx.x / R::kChunksPerRow, x0 = (threadIdx.x % R::kChunksPerRow) * R::kChunkElems;
  const bool valid = i < rows && l0 + x0 < dk;  // dk is a multiple of 8 on this path
  const uint4 bits = *reinterpret_cast<const uint4*>(&raw.v[i][x0]);
  const T* e = reinterpret_cast<const T*>(&bits);
#pragma unroll
  for (int j = 0; j < R::kChunkElems; ++j) {
    const float p = valid ? phi_select<C::fm>(to_acc(e[j])) : 0.0f;
    As[(x0 + j) * kLd + i] = p;
    if (valid) z += p * ms[l0 + x0 + j];
  }
}

// The sum of the 4 adjacent lanes' parts of z (every lane of the token holds it).
__device__ __forceinline__ float combine_z(float z) {
  z += __shfl_xor_sync(0xffffffffu, z, 1);
  z += __shfl_xor_sync(0xffffffffu, z, 2);
  return z;
}

template <class C>
__global__ void __launch_bounds__(kThreads, 1) la_apply_async_kernel(ApplyArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  constexpr int S = kAsyncApplyStages;
  MMFAST_DYNAMIC_SHARED(smem);
  auto& sh = *reinterpret_cast<AsyncApplyShared<C>*>(smem);
  A* const Sv = reinterpret_cast<A*>(smem + kStateColumnsOffset<C>);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const int64_t items = static_cast<int64_t>(a.tiles_v) * a.ntiles * a.bh;
  const int64_t per_block = ceil_div(items, gridDim.x);
  const int64_t first = blockIdx.x * per_block, last = min_i64(items, first + per_block);
  // The block's q slices are copied and consumed in the same order (the g-th uses stage g % S),
  // one commit group per slice, empty past the last item. The issuing side keeps its item
  // decoded (64-bit divisions once per item, not per slice).
  const int slices = static_cast<int>(ceil_div(a.dk, kBK));
  int64_t next_item = first;
  int next_slice = 0, issued_stage = 0;
  ApplyItem next_it = apply_item_tokens_fastest(a, first < last ? first : 0);
  const auto issue_next = [&]() {
    if (next_item < last) {
      const TokenView<const T> q = token_view<const T>(a.q, next_it.bh, a.heads);
      const int l0 = next_slice * kBK;
      raw_tile_issue(sh.q[issued_stage], [&](int i) { return q.row(next_it.n0 + i) + l0; }, a.N - next_it.n0,
                     a.dk - l0, q.base);
      if (++next_slice == slices) {
        next_slice = 0;
        if (++next_item < last) next_it = apply_item_tokens_fastest(a, next_item);
      }
    }
    cp_async_commit();
    issued_stage = issued_stage + 1 == S ? 0 : issued_stage + 1;
  };
  for (int prologue = 0; prologue < S - 1; ++prologue) issue_next();
  const A eps = static_cast<A>(a.eps);
  int64_t loaded_bh = -1;
  int loaded_v0 = -1, stage = 0;
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
    for (int sl = 0; sl < slices; ++sl) {
      cp_async_wait<S - 2>();  // this thread's copies of this slice landed
      __syncthreads();         // everyone's landed; the previous slice's products are done
      issue_next();            // into the previous slice's stage: its readers passed the barrier above
      const RawTile<T, kTile, kBK>& raw = sh.q[stage];
      stage = stage + 1 == S ? 0 : stage + 1;
      const int l0 = sl * kBK;
      convert_raw_q<C>(sh.As, raw, a.N - it.n0, l0, a.dk, sh.ms, z);
      __syncthreads();
      tile_accumulate(tile, C::tc, sh.As, Sv + l0 * kLd, ty, tx);
    }
    z = combine_z(z);
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
      const size_t smem = async_apply_smem_bytes<C>(a.dk);  // > 48 KB: opt in
      if (async_copy_enabled() && rows_16b_aligned(a.q, a.dk, sizeof(T)) && smem <= max_shared_per_block()) {
        unsigned grid = 0;
        const cudaError_t grid_err = persistent_grid(&la_apply_async_kernel<C>, kThreads, smem, items, grid);
        if (grid_err != cudaSuccess) return grid_err;
        MMFAST_LAUNCH(la_apply_async_kernel<C>, grid, kThreads, smem, stream, a);
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
