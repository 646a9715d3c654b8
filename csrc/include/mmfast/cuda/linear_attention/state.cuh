// The split-N state pass of the linear attention, shared by the forward
// (S = sum phi(k)^T v / N, m = sum phi(k) / N) and by apply_backward
// (dS = sum phi(q)^T (do / z), dm = sum dz phi(q)).
//
//   la_state_kernel         item = (Dk tile, Dv tile, N chunk, b*h), tile index fastest so the
//                           blocks sharing a chunk's tokens run together and hit L2. Writes
//                           the chunk's fp32 partial [S | m] into the workspace, or the final
//                           result directly when there is a single chunk.
//   la_state_reduce_kernel  sums the per-chunk partials in a fixed order (deterministic).
#pragma once

#include "mmfast/cuda/linear_attention/common.cuh"

namespace mmfast {
namespace cuda {
namespace la {

constexpr int64_t kMinChunk = 256;  // minimum tokens per split-N chunk
constexpr int kChunkOversub = 4;    // grid target: kChunkOversub x SM count blocks
// fp32 sums flush into fp64 every kFlushSlices staged slices (64 tokens): the error of S and m
// does not grow with N (see WideTile in tile_gemm.cuh).
constexpr int kFlushSlices = 2;

struct StateArgs : Dims {
  TokenTensor k;        // phi(k) side (q for apply_backward)
  TokenTensor v;        // v side (grad_out for apply_backward)
  const void* scalars;  // nullptr (forward) or (z, dz) per token: [bh][N][2] accumulator type
  void* out_state;      // partials [bh][nchunks][Dk*Dv + Dk], or final state when nchunks == 1
  void* out_mean;       // final mean when nchunks == 1 (unused otherwise)
  int64_t chunk, nchunks;
  double div;           // divisor of the final result when nchunks == 1 (N or 1)
};

// One work item of the state pass.
struct StateItem {
  int64_t bh, chunk, t_begin, t_end;
  int k0, v0;    // first Dk row and Dv column of the tile
  bool do_mean;  // this thread accumulates m (tile_v == 0, first column of threads)
};

__device__ __forceinline__ StateItem state_item(const StateArgs& a, int64_t item, int tx) {
  const int64_t tiles = static_cast<int64_t>(a.tiles_k) * a.tiles_v;
  const int64_t tile = item % tiles, rest = item / tiles;
  StateItem it;
  it.chunk = rest % a.nchunks;
  it.bh = rest / a.nchunks;
  it.k0 = static_cast<int>(tile / a.tiles_v) * kTile;
  it.v0 = static_cast<int>(tile % a.tiles_v) * kTile;
  it.t_begin = it.chunk * a.chunk;
  it.t_end = min_i64(it.t_begin + a.chunk, a.N);
  it.do_mean = it.v0 == 0 && tx == 0;
  return it;
}

// zsh[l], wsh[l] for the kBK tokens from t0: 1 and 1 (forward) or z_t and dz_t (apply_backward);
// w = 0 past the chunk. Surrounded by barriers.
template <class A>
__device__ __forceinline__ void stage_token_scalars(const StateArgs& a, const StateItem& it, int64_t t0, A* zsh,
                                                    A* wsh) {
  __syncthreads();  // the previous step's readers are done with the shared tiles
  if (threadIdx.x < kBK) {
    const int64_t t = t0 + threadIdx.x;
    A z = A(1), w = A(1);
    if (t < it.t_end && a.scalars != nullptr) {
      const A* s = static_cast<const A*>(a.scalars) + (it.bh * a.N + t) * 2;
      z = s[0];
      w = s[1];
    }
    zsh[threadIdx.x] = z;
    wsh[threadIdx.x] = (t < it.t_end) ? w : A(0);
  }
  __syncthreads();
}

// As[l][x] = phi(k_{t0+l})[k0+x], Bs[l][x] = v_{t0+l}[v0+x] / z_l, zero past the chunk and dims.
// raw_k(x, l) / raw_v(x, l) read the raw elements (global memory, or a RawSlice already landed
// in shared memory); they are only called inside the bounds.
template <class C, class A, class RawK, class RawV>
__device__ __forceinline__ void stage_state_slice(const StateArgs& a, const StateItem& it, int64_t t0, RawK raw_k,
                                                  RawV raw_v, const A* zsh, A* As, A* Bs) {
  using T = typename C::T;
  const auto k_in = [&](int x, int l) { return t0 + l < it.t_end && it.k0 + x < a.dk; };
  const auto v_in = [&](int x, int l) { return t0 + l < it.t_end && it.v0 + x < a.dv; };
  stage_tile_pair<true, true>(
      As, split_element([&](int x, int l) { return k_in(x, l) ? raw_k(x, l) : from_acc<T>(A(0)); },
                        [&](T raw, int x, int l) { return k_in(x, l) ? phi<C::fm>(to_acc(raw)) : A(0); }),
      Bs, split_element([&](int x, int l) { return v_in(x, l) ? raw_v(x, l) : from_acc<T>(A(0)); },
                        [&](T raw, int x, int l) {
                          if (!v_in(x, l)) return A(0);
                          return a.scalars == nullptr ? to_acc(raw) : to_acc(raw) / zsh[l];  // forward: z = 1
                        }));
  __syncthreads();
}

// msum[i] += sum_l phi(k)[ty*4 + i][l] * w_l over the staged slice.
template <class A>
__device__ __forceinline__ void accumulate_mean(A (&msum)[4], const A* As, const A* wsh, int ty) {
#pragma unroll 4
  for (int l = 0; l < kBK; ++l) {
    A x[4];
    load4(As + l * kLd + ty * 4, x);
    const A w = wsh[l];
#pragma unroll
    for (int i = 0; i < 4; ++i) msum[i] += x[i] * w;
  }
}

// mwide += msum, msum = 0 for fp32 sums (fp64 sums need no flushing).
template <class A>
__device__ __forceinline__ void flush_mean(A (&msum)[4], double (&mwide)[4]) {
  if constexpr (WideTile<A>::kEnabled) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      mwide[i] += msum[i];
      msum[i] = A(0);
    }
  }
}

// The tile (and, for do_mean threads, m) divided by div into the final state, or unscaled
// into the chunk's partial.
// Where an item's S and m go: the final state and mean (divided by div), or the chunk's
// partial (div 1).
template <class A> struct StateOut {
  A* S;
  A* M;
  A div;
};
template <class A> __device__ __forceinline__ StateOut<A> state_out(const StateArgs& a, const StateItem& it) {
  const int64_t dkdv = static_cast<int64_t>(a.dk) * a.dv;
  const bool final = a.nchunks == 1;
  StateOut<A> o;
  o.S = static_cast<A*>(a.out_state) + (final ? it.bh * dkdv : (it.bh * a.nchunks + it.chunk) * (dkdv + a.dk));
  o.M = final ? static_cast<A*>(a.out_mean) + it.bh * a.dk : o.S + dkdv;
  o.div = final ? static_cast<A>(a.div) : A(1);
  return o;
}

template <class A>
__device__ __forceinline__ void store_state_tile(const StateArgs& a, const StateItem& it, const A (&acc)[4][4],
                                                 const A (&msum)[4], int ty, int tx) {
  const StateOut<A> o = state_out<A>(a, it);
  A* const S = o.S;
  A* const M = o.M;
  const A div = o.div;
  store_tile(acc, ty, tx, a.dk - it.k0, a.dv - it.v0,
             [&](int i, int j, A value) { S[static_cast<int64_t>(it.k0 + i) * a.dv + it.v0 + j] = value / div; });
  if (!it.do_mean) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = it.k0 + ty * 4 + i;
    if (r < a.dk) M[r] = msum[i] / div;
  }
}

// After an item's last slice: the wide sums rounded once, the tile out of the fragments
// (through Cs, with barriers, on the tensor-core path), then stored.
template <class A>
__device__ __forceinline__ void finish_state_item(const StateArgs& a, const StateItem& it, TileAccumulator<A>& tile,
                                                  WideTile<A>& wide, A (&msum)[4], double (&mwide)[4], bool use_tc,
                                                  A* Cs, int ty, int tx) {
  tile_finish_wide(tile, wide, use_tc, Cs, ty, tx);
  flush_mean(msum, mwide);
#pragma unroll
  for (int i = 0; i < 4; ++i) msum[i] = WideTile<A>::kEnabled ? static_cast<A>(mwide[i]) : msum[i];
  store_state_tile(a, it, tile.acc, msum, ty, tx);
}

// Accumulates S_tile[i][j] = sum_t phi(k_t)[k0+i] * v_t[v0+j] / z_t and (tile_v == 0 only)
// m[k0+i] = sum_t phi(k_t)[k0+i] * w_t, with z_t = w_t = 1 (forward) or z_t, w_t = dz_t
// (apply_backward).
template <class C>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<C>) la_state_kernel(StateArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  __shared__ __align__(32) A As[kBK * kLd];
  __shared__ __align__(32) A Bs[kBK * kLd];
  __shared__ __align__(32) A Cs[TcScratch<A>::floats];
  __shared__ A zsh[kBK];
  __shared__ A wsh[kBK];
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  constexpr bool use_tc = C::tc;
  const int64_t items = static_cast<int64_t>(a.tiles_k) * a.tiles_v * a.nchunks * a.bh;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const StateItem it = state_item(a, item, tx);
    const TokenView<const T> kk = token_view<const T>(a.k, it.bh, a.heads);
    const TokenView<const T> vv = token_view<const T>(a.v, it.bh, a.heads);
    TileAccumulator<A> tile;
    WideTile<A> wide;
    tile_zero(tile, use_tc);
    wide_zero(wide);
    A msum[4] = {A(0), A(0), A(0), A(0)};
    double mwide[4] = {0.0, 0.0, 0.0, 0.0};
    int slice = 0;
    for (int64_t t0 = it.t_begin; t0 < it.t_end; t0 += kBK) {
      stage_token_scalars(a, it, t0, zsh, wsh);
      stage_state_slice<C>(
          a, it, t0, [&](int x, int l) { return kk.row(t0 + l)[it.k0 + x]; },
          [&](int x, int l) { return vv.row(t0 + l)[it.v0 + x]; }, zsh, As, Bs);
      tile_accumulate(tile, use_tc, As, Bs, ty, tx);
      if (it.do_mean) accumulate_mean(msum, As, wsh, ty);
      if (++slice % kFlushSlices == 0) {
        tile_flush(tile, wide, use_tc);
        flush_mean(msum, mwide);
      }
    }
    finish_state_item(a, it, tile, wide, msum, mwide, use_tc, Cs, ty, tx);
  }
}

// ---- the asynchronous variant (16-bit inputs with 16-byte aligned rows) -------------------
// The same sums as la_state_kernel on a persistent grid (the resident blocks only): each block
// takes a contiguous range of items, whose raw k / v slices travel by cp.async through one ring
// of kAsyncStages RawSlices, across item boundaries (no pipeline refill per item). Each wait
// leaves kAsyncStages - 2 slices pending and the next is issued right after, so S - 1 are in
// flight while the landed one is converted (phi, the division by z) into the fp32 operand tiles
// and multiplied. 6 stages of 16-bit inputs keep at least 4 x 8 KB = 32 KB per block in flight;
// Little's law at 700-900 ns of loaded DRAM latency asks about 23-30 KB per SM for an H200's
// 4.3 TB/s, all reads here (docs/linear-attention-performance.md).
constexpr int kAsyncStages = 6;
// m of a tile's 64 rows is summed by all 256 threads: thread t takes row t % 64 of the staged
// slice's tokens l = t / 64 + 4j (warp-uniform, conflict-free), kMeanParts parts combined once
// per item in a fixed order.
constexpr int kMeanParts = kThreads / kTile;

template <class C> struct AsyncStateShared {
  using T = typename C::T;
  using A = acc_t<T>;
  RawSlice<T> k[kAsyncStages], v[kAsyncStages];
  __align__(32) A As[kBK * kLd];
  __align__(32) A Bs[kBK * kLd];
  __align__(32) A Cs[C::tc ? TcScratch<A>::floats : 8];  // the tensor-core epilogue only
  A zsh[kBK], wsh[kBK];
  double mean_parts[kMeanParts][kTile];
};

// Converts a landed RawSlice into an operand tile: each thread takes whole 16-byte chunks (one
// shared-memory load, 8 elements of 16-bit input) and writes dst[l][x0 .. x0 + 7] = f(value, l)
// as float4 stores, or zeros for a chunk past rows or cols (cols: a multiple of 8).
template <class T, class F>
__device__ __forceinline__ void convert_raw_slice(float* __restrict__ dst, const RawSlice<T>& src, int64_t rows,
                                                  int64_t cols, F f) {
  using R = RawSlice<T>;
  static_assert(R::kChunkElems % 4 == 0, "whole float4 stores");
#pragma unroll
  for (int k = 0; k < R::kChunks / kThreads; ++k) {
    const int c = static_cast<int>(threadIdx.x) + k * kThreads;
    const int l = c / R::kChunksPerRow, x0 = (c % R::kChunksPerRow) * R::kChunkElems;
    const bool valid = l < rows && x0 < cols;
    const uint4 bits = *reinterpret_cast<const uint4*>(&src.v[l][x0]);
    const T* e = reinterpret_cast<const T*>(&bits);
    float out[R::kChunkElems];
#pragma unroll
    for (int i = 0; i < R::kChunkElems; ++i) out[i] = valid ? f(to_acc(e[i]), l) : 0.0f;
#pragma unroll
    for (int i = 0; i < R::kChunkElems; i += 4)
      *reinterpret_cast<float4*>(dst + l * kLd + x0 + i) = make_float4(out[i], out[i + 1], out[i + 2], out[i + 3]);
  }
}

__device__ __forceinline__ int64_t item_slices(const StateItem& it) { return ceil_div(it.t_end - it.t_begin, kBK); }

// The next slice to copy, walking a block's items in order. The item's decoded form is kept:
// 64-bit divisions are a long instruction sequence, paid once per item, not per slice.
struct StateCursor {
  int64_t item, last, slice, slices;
  StateItem it;
  __device__ __forceinline__ void start(const StateArgs& a, int64_t first, int64_t end, int tx) {
    item = first;
    last = end;
    slice = 0;
    if (item < last) {
      it = state_item(a, item, tx);
      slices = item_slices(it);
    }
  }
  __device__ __forceinline__ void advance(const StateArgs& a, int tx) {
    if (++slice == slices) start(a, item + 1, last, tx);
  }
};

// m[k0 + row] = the kMeanParts partial sums of the item, combined in part order (fixed, so
// deterministic) and stored as the final mean or the chunk's partial. Between barriers.
template <class A>
__device__ __forceinline__ void store_state_mean(const StateArgs& a, const StateItem& it, double partial, int part,
                                                 int row, double (&parts)[kMeanParts][kTile]) {
  __syncthreads();  // the previous item's readers of parts are done
  parts[part][row] = partial;
  __syncthreads();
  if (threadIdx.x < kTile && it.k0 + static_cast<int>(threadIdx.x) < a.dk) {
    double m = 0.0;
#pragma unroll
    for (int p = 0; p < kMeanParts; ++p) m += parts[p][threadIdx.x];
    const StateOut<A> o = state_out<A>(a, it);
    o.M[it.k0 + threadIdx.x] = static_cast<A>(m) / o.div;
  }
}

template <class C>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<C>) la_state_async_kernel(StateArgs a) {
  using T = typename C::T;
  using A = acc_t<T>;
  MMFAST_DYNAMIC_SHARED(smem);
  auto& sh = *reinterpret_cast<AsyncStateShared<C>*>(smem);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  constexpr bool use_tc = C::tc;
  constexpr int S = kAsyncStages;
  const int64_t items = static_cast<int64_t>(a.tiles_k) * a.tiles_v * a.nchunks * a.bh;
  const int64_t per_block = ceil_div(items, gridDim.x);
  const int64_t first = blockIdx.x * per_block, last = min_i64(items, first + per_block);
  // Slices are copied and consumed in the same order; the block's g-th uses stage g % S.
  // One commit group per slice, empty past the last item, so every wait count stays uniform.
  StateCursor next;
  next.start(a, first, last, tx);
  int issued_stage = 0;  // issued slices mod S
  const auto issue_next = [&]() {
    if (next.item < last) {
      const StateItem& it = next.it;
      const TokenView<const T> kk = token_view<const T>(a.k, it.bh, a.heads);
      const TokenView<const T> vv = token_view<const T>(a.v, it.bh, a.heads);
      const int64_t t0 = it.t_begin + next.slice * kBK;
      raw_tile_issue(sh.k[issued_stage], [&](int l) { return kk.row(t0 + l) + it.k0; }, it.t_end - t0, a.dk - it.k0,
                     kk.base);
      raw_tile_issue(sh.v[issued_stage], [&](int l) { return vv.row(t0 + l) + it.v0; }, it.t_end - t0, a.dv - it.v0,
                     vv.base);
      next.advance(a, tx);
    }
    cp_async_commit();
    issued_stage = issued_stage + 1 == S ? 0 : issued_stage + 1;
  };
  for (int s = 0; s < S - 1; ++s) issue_next();
  int stage = 0;  // consumed slices mod S
  for (int64_t item = first; item < last; ++item) {
    const StateItem it = state_item(a, item, tx);
    TileAccumulator<A> tile;
    WideTile<A> wide;
    tile_zero(tile, use_tc);
    wide_zero(wide);
    const bool with_mean = it.v0 == 0;  // uniform across the block
    const int mean_row = threadIdx.x % kTile, mean_part = threadIdx.x / kTile;
    A mean_sum = A(0);
    double mean_wide = 0.0;
    const int64_t slices = item_slices(it);
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t t0 = it.t_begin + s * kBK;
      cp_async_wait<S - 2>();                          // this thread's copies of this slice landed
      stage_token_scalars(a, it, t0, sh.zsh, sh.wsh);  // its first barrier: everyone's landed
      issue_next();  // into the previous slice's stage: its readers passed the barrier ending its conversion
      const RawSlice<T>& rk = sh.k[stage];
      const RawSlice<T>& rv = sh.v[stage];
      stage = stage + 1 == S ? 0 : stage + 1;
      const int64_t rows = it.t_end - t0;
      convert_raw_slice(sh.As, rk, rows, a.dk - it.k0, [](float x, int) { return phi_select<C::fm>(x); });
      if (a.scalars == nullptr)  // forward: z = 1
        convert_raw_slice(sh.Bs, rv, rows, a.dv - it.v0, [](float x, int) { return x; });
      else
        convert_raw_slice(sh.Bs, rv, rows, a.dv - it.v0, [&](float x, int l) { return x / sh.zsh[l]; });
      __syncthreads();
      tile_accumulate(tile, use_tc, sh.As, sh.Bs, ty, tx);
      if (with_mean) {
#pragma unroll
        for (int j = 0; j < kBK / kMeanParts; ++j) {
          const int l = mean_part + j * kMeanParts;
          mean_sum += sh.As[l * kLd + mean_row] * sh.wsh[l];
        }
      }
      if ((s + 1) % kFlushSlices == 0) {
        tile_flush(tile, wide, use_tc);
        mean_wide += mean_sum;
        mean_sum = A(0);
      }
    }
    StateItem tile_only = it;  // m is stored below, from all threads' partial sums
    tile_only.do_mean = false;
    A unused_sum[4] = {A(0), A(0), A(0), A(0)};
    double unused_wide[4] = {0.0, 0.0, 0.0, 0.0};
    finish_state_item(a, tile_only, tile, wide, unused_sum, unused_wide, use_tc, sh.Cs, ty, tx);
    if (with_mean) store_state_mean<A>(a, it, mean_wide + mean_sum, mean_part, mean_row, sh.mean_parts);
  }
}

// The asynchronous kernel runs for 16-bit inputs whose rows cp.async can copy whole.
template <class C> bool use_async_state(const TokenTensor& k, const TokenTensor& v, const Dims& d) {
  using T = typename C::T;
  return kSixteenBit<T> && async_copy_enabled() && rows_16b_aligned(k, d.dk, sizeof(T)) &&
         rows_16b_aligned(v, d.dv, sizeof(T)) && sizeof(AsyncStateShared<C>) <= max_shared_per_block();
}

// Sums the nchunks partials of every (bh, element) in chunk order, in fp64, and divides by div.
template <class A>
__global__ void __launch_bounds__(kThreads)
    la_state_reduce_kernel(const A* __restrict__ partials, A* __restrict__ state, A* __restrict__ mean, int64_t bh,
                           int64_t nchunks, int dk, int dv, double div) {
  const int64_t dkdv = static_cast<int64_t>(dk) * dv;
  const int64_t E = dkdv + dk;
  const int64_t total = bh * E;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / E, r = e - b * E;
    const A* p = partials + b * nchunks * E + r;
    double sum = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) sum += p[c * E];
    const A s = static_cast<A>(sum / div);
    if (r < dkdv)
      state[b * dkdv + r] = s;
    else
      mean[b * dk + (r - dkdv)] = s;
  }
}

// ---- host side ------------------------------------------------------------------------------
struct StatePlan {
  int64_t tiles_k = 1, tiles_v = 1, nchunks = 1, chunk = 1;
  size_t partial_bytes = 0;  // 0 when nchunks == 1 (the kernel writes the final state)
};

inline StatePlan plan_state(const LinearAttentionParams& p, int sms) {
  StatePlan s;
  const int64_t bh = p.bh(), N = p.seqlen;
  s.tiles_k = ceil_div(p.dim_k, kTile);
  s.tiles_v = ceil_div(p.dim_v, kTile);
  const int64_t base = bh * s.tiles_k * s.tiles_v;
  const int64_t target = static_cast<int64_t>(kChunkOversub) * (sms > 0 ? sms : 1);
  const int64_t dmax = max_i64(p.dim_k, p.dim_v);
  const int64_t min_chunk = max_i64(kMinChunk, 2 * dmax);  // keep partial traffic below token traffic
  const int64_t want = max_i64(1, min_i64(ceil_div(target, base), ceil_div(N, min_chunk)));
  s.chunk = round_up(ceil_div(N, want), kBK);
  s.nchunks = ceil_div(N, s.chunk);
  if (s.nchunks > 1)
    s.partial_bytes = static_cast<size_t>(bh * s.nchunks * (p.dim_k * p.dim_v + p.dim_k)) * accumulator_bytes(p.dtype);
  return s;
}

template <class T>
cudaError_t launch_state_pass(const TokenTensor& k, const TokenTensor& v, const void* scalars, void* state, void* mean,
                              const LinearAttentionParams& p, const StatePlan& plan, void* workspace, double div,
                              cudaStream_t stream) {
  using A = acc_t<T>;
  StateArgs a;
  static_cast<Dims&>(a) = make_dims(p);
  a.k = k;
  a.v = v;
  a.scalars = scalars;
  a.out_state = plan.nchunks == 1 ? state : workspace;
  a.out_mean = mean;
  a.chunk = plan.chunk;
  a.nchunks = plan.nchunks;
  a.div = div;
  const int64_t items = plan.tiles_k * plan.tiles_v * plan.nchunks * a.bh;
  cudaError_t err = dispatch_config<T>(a, [&](auto config) {
    using C = decltype(config);
    if constexpr (kSixteenBit<T>) {
      if (use_async_state<C>(k, v, a)) {
        constexpr size_t smem = sizeof(AsyncStateShared<C>);  // > 48 KB: opt in
        unsigned grid = 0;
        const cudaError_t grid_err = persistent_grid(&la_state_async_kernel<C>, kThreads, smem, items, grid);
        if (grid_err != cudaSuccess) return grid_err;
        MMFAST_LAUNCH(la_state_async_kernel<C>, grid, kThreads, smem, stream, a);
        return cudaGetLastError();
      }
    }
    MMFAST_LAUNCH(la_state_kernel<C>, grid_for(items), kThreads, 0, stream, a);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || plan.nchunks == 1) return err;
  const int64_t total = a.bh * (p.dim_k * p.dim_v + p.dim_k);
  MMFAST_LAUNCH(la_state_reduce_kernel<A>, grid_for(ceil_div(total, kThreads)), kThreads, 0, stream,
                static_cast<const A*>(workspace), static_cast<A*>(state), static_cast<A*>(mean), a.bh, plan.nchunks,
                a.dk, a.dv, div);
  return cudaGetLastError();
}

}  // namespace la
}  // namespace cuda
}  // namespace mmfast
