// decode_attention on the GPU: flash-decoding over a static KV cache (namespace
// mmfast::cuda::decodek).
//
//   decode_attention_kernel  item = (row b, KV head, query-row tile, key split), 1-D grid with a
//       grid stride. The query rows of an item are the R = (H / H_kv) * Sq (head, query) pairs
//       that read its KV head, in tiles of 16 (8 for fp64): for decoding (Sq = 1) with up to 16
//       heads per group the whole GQA group shares one read of K and V. The split's keys are
//       staged through shared memory in tiles of up to 64 keys (converted to the accumulation
//       type, row stride D | 1 so threads reading different keys hit different banks; each
//       thread issues 4 loads before it stores any, 16-byte loads when the rows are aligned):
//         1. scores s = scale * q.k (optionally c * tanh(s / c)), masked by the causal rule
//            j <= p and the window p - j < W, one (row, key) per thread;
//         2. online softmax, one warp per row: running max m, sum l, the rescale factor;
//         3. out += p V with each thread holding a 4 x 4 register tile (rows rg + 4 i, columns
//            c + 64 j: D <= 256). With 16-byte aligned V rows the V tile is copied as stored
//            with cp.async into dynamic shared memory (KT x D elements, 11.5 KB for D = 256 in
//            bf16: static shared memory is capped at 48 KB), issued before the K tile is
//            staged, so it lands while the K tile is scored (a block's K and V loads in flight
//            together); otherwise (MMFAST_CUDA_ASYNC_COPY=0, or that memory not granted) it is
//            staged over the K tile after the scores (attention_launch decides).
//       __launch_bounds__(256, 3) keeps the 16/32-bit kernels at 80 registers with the raw V
//       tile (3 blocks per SM on sm_90a, no spills; fp64: 2 blocks).
//       Accumulation in acc_t (fp32; fp64 for fp64). With one split the item writes the output
//       in q's dtype; with several it writes its partial (O / l, in acc_t) and its log-sum-exp
//       m + log l (-inf when no key of the split is visible to the row).
//   decode_combine_kernel  one thread per output element: the splits' partials merged in split
//       order (deterministic) with weights exp(lse_s - max lse).
// Rows with cache_seqlens outside [Sq, T_max] are never read: their output rows are NaN (the
// documented guard; no host synchronisation). Splits (attention_splits): a block's tiles run one
// after another (load K, score, load V, accumulate), so the bytes in flight scale with the blocks
// at work; the split count is the one that keeps the GPU's resident block slots (blocks one SM
// holds, from the occupancy calculator, x SMs) busiest over the waves its items take, at most one
// split per 64 keys of the longest visible range (T_max, or the window), so each split has at
// least 64 keys when rows are full.
#pragma once

#include "mmfast/cuda/decode/attention_common.cuh"
#include "mmfast/cuda/decode/attention_stream.cuh"

namespace mmfast {
namespace cuda {
namespace decodek {

// Per accumulation type: query rows per tile, rows per thread in the PV tile, K/V staging.
template <class A> struct AttnShape {
  static constexpr int kRows = sizeof(A) == 8 ? 8 : 16;
  static constexpr int kRowsPerThread = kRows / 4;
  static constexpr int kKVElems = 24576 / static_cast<int>(sizeof(A));  // 24 KB
};

// Keys per shared-memory tile: as many rows of stride D | 1 as the K/V staging buffer holds, at
// most kKeyTile (23 for D = 256 in fp32).
template <class A> __host__ __device__ inline int attn_key_tile(int64_t D) {
  const int fit = AttnShape<A>::kKVElems / static_cast<int>(D | 1);
  return fit < kKeyTile ? fit : kKeyTile;
}

// kv[j * ld + d] = element d of cache row j (rows j < nk from `rows`, row stride `row_stride`),
// in the accumulation type. Each thread issues a batch of kStageBatch loads before it converts
// and stores any of them (the cache is read once per step: loads in flight are the bandwidth),
// 16 bytes per load when the rows are 16-byte aligned (vec), else one element.
constexpr int kStageBatch = 4;
template <class T, class A>
__device__ __forceinline__ void stage_kv_tile(A* kv, int ld, const T* rows, int64_t row_stride, int nk, int D,
                                              bool vec) {
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
    const int per_row = D / V, chunks = nk * per_row;
    for (int e0 = tid; e0 < chunks; e0 += kThreads * kStageBatch) {
      uint4 raw[kStageBatch];
#pragma unroll
      for (int k = 0; k < kStageBatch; ++k) {
        const int e = e0 + k * kThreads, j = e / per_row, c = e - j * per_row;
        raw[k] = e < chunks ? *reinterpret_cast<const uint4*>(rows + j * row_stride + c * V) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int k = 0; k < kStageBatch; ++k) {
        const int e = e0 + k * kThreads, j = e / per_row, c = e - j * per_row;
        if (e >= chunks) continue;
        T values[V];
        memcpy(values, &raw[k], 16);
#pragma unroll
        for (int v = 0; v < V; ++v) kv[j * ld + c * V + v] = to_acc(values[v]);
      }
    }
  } else {
    const int elems = nk * D;
    for (int e0 = tid; e0 < elems; e0 += kThreads * kStageBatch) {
      T raw[kStageBatch];
#pragma unroll
      for (int k = 0; k < kStageBatch; ++k) {
        const int e = e0 + k * kThreads, j = e / D, d = e - j * D;
        raw[k] = e < elems ? rows[j * row_stride + d] : rows[0];
      }
#pragma unroll
      for (int k = 0; k < kStageBatch; ++k) {
        const int e = e0 + k * kThreads, j = e / D, d = e - j * D;
        if (e < elems) kv[j * ld + d] = to_acc(raw[k]);
      }
    }
  }
}

// raw[j * D + d] = element d of cache row j (rows j < nk from `rows`, row stride `row_stride`), as
// stored (T): 16-byte cp.async copies, committed as one group, that land while the block scores the
// K tile; visible to the block after cp_async_wait<0>() and a __syncthreads(). Rows 16-byte aligned.
template <class T>
__device__ __forceinline__ void issue_raw_tile(T* raw, const T* rows, int64_t row_stride, int nk, int D) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const int per_row = D / V, chunks = nk * per_row;
  for (int e = static_cast<int>(threadIdx.x); e < chunks; e += kThreads) {
    const int j = e / per_row, c = e - j * per_row;
    cp_async16(raw + j * D + c * V, rows + j * row_stride + c * V, true);
  }
  cp_async_commit();
}

template <class T>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 8 ? 2 : 3) decode_attention_kernel(AttnArgs a) {
  using A = acc_t<T>;
  using Shape = AttnShape<A>;
  constexpr int RT = Shape::kRows, RR = Shape::kRowsPerThread;
  __shared__ A qs[RT * kMaxHeadDim];
  __shared__ A kv[Shape::kKVElems];
  __shared__ A ps[RT * kKeyTile];
  // The V tile as stored (v_async): KT x D elements of T in dynamic shared memory (attention_launch).
  MMFAST_DYNAMIC_SHARED(dynamic_smem);
  T* vraw = reinterpret_cast<T*>(dynamic_smem);
  __shared__ A m_s[RT], l_s[RT], alpha_s[RT];

  const DecodeAttentionParams& p = a.p;
  const int D = static_cast<int>(p.head_dim);
  const int ld = D | 1;
  const int KT = attn_key_tile<A>(D);
  const int64_t Sq = p.queries, H = p.heads, Hkv = p.kv_heads, G = H / Hkv, R = G * Sq, W = p.window;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, cg = tid & 63, rg = tid >> 6;
  const T* qp = static_cast<const T*>(p.q.data);
  const T* kp = static_cast<const T*>(p.k_cache.data);
  const T* vp = static_cast<const T*>(p.v_cache.data);
  T* op = static_cast<T*>(p.out.data);
  const A scale = static_cast<A>(p.scale), cap = static_cast<A>(p.softcap);
  const A neg_inf = -A(INFINITY);
  const int64_t qrows = p.batch * Sq * H;

  const int64_t items = p.batch * Hkv * a.row_tiles * a.splits;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const AttnItem it = attn_item(a, item, RT);
    if (!it.valid) {  // block-uniform
      attn_write_nan_rows<T>(a, it);
      continue;
    }
    const int64_t split = it.split, kvh = it.kvh, b = it.b, rho0 = it.rho0, len = it.len;
    const int nr = it.nr;
    const KeyRange keys = attn_key_range(p, len, a.splits, split, rho0, nr);
    const int64_t k_begin = keys.begin, k_end = keys.end;

    __syncthreads();  // the previous item's readers of qs, m_s, l_s are done
    for (int e = tid; e < nr * D; e += kThreads) {
      const int r = e / D, d = e - r * D;
      const int64_t rho = rho0 + r, i = rho / G, h = kvh * G + rho % G;
      qs[r * D + d] = to_acc(qp[b * p.q.stride_b + i * p.q.stride_n + h * p.q.stride_h + d]);
    }
    if (tid < RT) {
      m_s[tid] = neg_inf;
      l_s[tid] = A(0);
    }
    A acc[RR][4];
#pragma unroll
    for (int i = 0; i < RR; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = A(0);

    for (int64_t j0 = k_begin; j0 < k_end; j0 += KT) {
      const int nk = static_cast<int>(min_i64(KT, k_end - j0));
      const T* v_rows = vp + b * p.v_cache.stride_b + j0 * p.v_cache.stride_n + kvh * p.v_cache.stride_h;
      __syncthreads();  // q tile loaded; the previous tile's PV reads of kv, vraw and ps are done
      if (a.v_async) issue_raw_tile(vraw, v_rows, p.v_cache.stride_n, nk, D);  // in flight during the scores
      stage_kv_tile(kv, ld, kp + b * p.k_cache.stride_b + j0 * p.k_cache.stride_n + kvh * p.k_cache.stride_h,
                    p.k_cache.stride_n, nk, D, a.k_vec != 0);
      __syncthreads();
      // 1. scores, one (row, key) per thread: a warp shares its row (q broadcast) and reads 32 keys.
      for (int pi = tid; pi < nr * kKeyTile; pi += kThreads) {
        const int r = pi / kKeyTile, j = pi % kKeyTile;
        if (j >= nk) continue;
        const int64_t pos = len - Sq + (rho0 + r) / G, key = j0 + j;
        A s = neg_inf;
        if (attn_key_visible(key, pos, W)) {
          const A* qr = qs + r * D;
          const A* kr = kv + j * ld;
          A d0 = A(0), d1 = A(0), d2 = A(0), d3 = A(0);
          int d = 0;
          for (; d + 4 <= D; d += 4) {
            d0 += qr[d] * kr[d];
            d1 += qr[d + 1] * kr[d + 1];
            d2 += qr[d + 2] * kr[d + 2];
            d3 += qr[d + 3] * kr[d + 3];
          }
          for (; d < D; ++d) d0 += qr[d] * kr[d];
          s = ((d0 + d1) + (d2 + d3)) * scale;
          if (cap > A(0)) s = cap * tanh_acc(s / cap);
        }
        ps[r * kKeyTile + j] = s;
      }
      __syncthreads();
      // 2. online softmax, warp w: rows w, w + 8 (uniform shuffles over the block).
#pragma unroll
      for (int rr = 0; rr < RT / 8; ++rr) {
        const int r = warp + 8 * rr;
        const bool active = r < nr;
        const A s0 = (active && lane < nk) ? ps[r * kKeyTile + lane] : neg_inf;
        const A s1 = (active && lane + 32 < nk) ? ps[r * kKeyTile + lane + 32] : neg_inf;
        const A m_old = active ? m_s[r] : neg_inf, l_old = active ? l_s[r] : A(0);
        A mx = s0 > s1 ? s0 : s1;
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) {
          const A o = __shfl_xor_sync(0xffffffffu, mx, off);
          mx = o > mx ? o : mx;
        }
        const A m_new = m_old > mx ? m_old : mx;
        const A p0 = s0 == neg_inf ? A(0) : exp_acc(s0 - m_new);
        const A p1 = s1 == neg_inf ? A(0) : exp_acc(s1 - m_new);
        const A alpha = m_old == neg_inf ? A(0) : exp_acc(m_old - m_new);
        A sum = p0 + p1;
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (active) {
          if (lane < nk) ps[r * kKeyTile + lane] = p0;
          if (lane + 32 < nk) ps[r * kKeyTile + lane + 32] = p1;
          if (lane == 0) {
            m_s[r] = m_new;
            l_s[r] = l_old * alpha + sum;
            alpha_s[r] = alpha;
          }
        }
      }
      // 3. the V tile (landed by cp.async, or staged over the K tile now that the scores are done),
      // then out = alpha out + p V.
      if (a.v_async) {
        cp_async_wait<0>();
      } else {
        stage_kv_tile(kv, ld, v_rows, p.v_cache.stride_n, nk, D, a.v_vec != 0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < RR; ++i) {
        const int r = rg + 4 * i;
        if (r >= nr) continue;
        const A alpha = alpha_s[r];
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[i][c] *= alpha;
      }
      for (int j = 0; j < nk; ++j) {
        A value[4];  // this thread's columns of value row j
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int d = cg + 64 * c;
          value[c] = d >= D ? A(0) : a.v_async ? to_acc(vraw[j * D + d]) : kv[j * ld + d];
        }
#pragma unroll
        for (int i = 0; i < RR; ++i) {
          const int r = rg + 4 * i;
          if (r >= nr) continue;
          const A pr = ps[r * kKeyTile + j];
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[i][c] += pr * value[c];
        }
      }
    }
    __syncthreads();  // m_s and l_s final (also when the split saw no tile)
#pragma unroll
    for (int i = 0; i < RR; ++i) {
      const int r = rg + 4 * i;
      if (r >= nr) continue;
      const int64_t rho = rho0 + r, iq = rho / G, h = kvh * G + rho % G;
      const A l = l_s[r], m = m_s[r];
      if (a.direct) {
        T* orow = op + b * p.out.stride_b + iq * p.out.stride_n + h * p.out.stride_h;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int d = cg + 64 * c;
          if (d < D) orow[d] = from_acc<T>(acc[i][c] / l);  // l > 0: key p is always visible
        }
      } else {
        const int64_t qrow = (b * Sq + iq) * H + h;
        // A NaN score makes l NaN: its partial and log-sum-exp are written NaN for the combine to
        // pass on (softmax's NaN; "no key seen" (-inf, nothing written) once dropped it).
        if (!(l <= A(0))) {
          A* prow = static_cast<A*>(a.part_out) + (split * qrows + qrow) * D;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int d = cg + 64 * c;
            if (d < D) prow[d] = acc[i][c] / l;
          }
        }
        if (cg == 0) static_cast<A*>(a.part_lse)[split * qrows + qrow] = !(l <= A(0)) ? m + log_acc(l) : neg_inf;
      }
    }
  }
}

// out[b, i, h, d] from the splits' partials, merged in split order.
template <class T>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(AttnArgs a) {
  using A = acc_t<T>;
  const DecodeAttentionParams& p = a.p;
  const int64_t D = p.head_dim, Sq = p.queries, H = p.heads;
  const int64_t qrows = p.batch * Sq * H, total = qrows * D;
  const A* lse = static_cast<const A*>(a.part_lse);
  const A* part = static_cast<const A*>(a.part_out);
  T* op = static_cast<T*>(p.out.data);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t qrow = e / D, d = e - qrow * D;
    const int64_t h = qrow % H, bi = qrow / H, i = bi % Sq, b = bi / Sq;
    T* dst = op + b * p.out.stride_b + i * p.out.stride_n + h * p.out.stride_h + d;
    if (!attn_row_valid(p.cache_seqlens[b], Sq, p.max_tokens)) {
      *dst = nan_of<T>();
      continue;
    }
    A mx = -A(INFINITY);
    for (int64_t s = 0; s < a.splits; ++s) {
      const A l = lse[s * qrows + qrow];
      mx = l > mx ? l : mx;
    }
    A num = A(0), den = A(0);
    if (mx != -A(INFINITY)) {
      for (int64_t s = 0; s < a.splits; ++s) {
        const A l = lse[s * qrows + qrow];
        if (l == -A(INFINITY)) continue;  // the split saw no key of this row: no partial written
        const A w = exp_acc(l - mx);
        num += w * part[(s * qrows + qrow) * D + d];
        den += w;
      }
    }
    *dst = from_acc<T>(num / den);  // 0 / 0 = NaN if no split saw a key (not for valid rows)
  }
}

// ---- host side ------------------------------------------------------------------------------
struct AttnPlan {
  int64_t splits, row_tiles;
  size_t lse_offset, bytes;
};

// Splits of each of `tiles` (row, KV head, row tile) items, 1 <= splits <= max_splits. With at
// least as many tiles as resident block slots (blocks one SM holds x SMs), 1: every slot is busy
// from the start. Otherwise the count, among those whose items take at most two waves, that
// fills the slots best over its waves (items / (waves x slots)); a larger count only for a gain
// of more than 2% of the slots (each split adds a partial to write and combine, and a q load).
// E.g. 128 tiles on 396 slots: 3 splits (384 items, one wave, 97% busy), where 4 would take
// 1.3 waves; 200 tiles: 3 (600 items, 2 waves, 76%), where 2 would fill 51%.
inline int64_t attention_splits(int64_t tiles, int64_t slots, int64_t max_splits) {
  tiles = max_i64(1, tiles), slots = max_i64(1, slots);
  if (tiles >= slots) return 1;
  int64_t best = 1;
  double best_fill = 0.0;
  for (int64_t splits = 1; splits <= max_splits && tiles * splits <= 2 * slots; ++splits) {
    const int64_t items = tiles * splits;
    const double fill = static_cast<double>(items) / static_cast<double>(ceil_div(items, slots) * slots);
    if (fill > best_fill + 0.02) best = splits, best_fill = fill;
  }
  return best;
}

inline int64_t attention_row_tiles(const DecodeAttentionParams& p, int rows_per_tile) {
  const int64_t group = p.kv_heads > 0 ? p.heads / p.kv_heads : 0;
  return max_i64(1, ceil_div(group * p.queries, rows_per_tile));
}

// The plan of `splits` splits: the partials' workspace (none for one split). Its bytes grow with
// the splits.
inline AttnPlan attention_plan_with_splits(const DecodeAttentionParams& p, int64_t splits, int rows_per_tile) {
  AttnPlan s;
  s.row_tiles = attention_row_tiles(p, rows_per_tile);
  s.splits = max_i64(1, splits);
  if (s.splits == 1) {
    s.lse_offset = s.bytes = 0;
    return s;
  }
  const size_t acc = accumulator_bytes(p.dtype);
  const int64_t qrows = p.batch * p.queries * p.heads;
  s.lse_offset = static_cast<size_t>(round_up(static_cast<int64_t>(acc) * s.splits * qrows * p.head_dim, 256));
  s.bytes = s.lse_offset + acc * static_cast<size_t>(s.splits * qrows);
  return s;
}

// slots: blocks of decode_attention_kernel resident at once on the device (attention_slots<T>()).
// rows_per_tile: query rows of an item (the launched kernel's, AttnLaunch).
inline AttnPlan attention_plan(const DecodeAttentionParams& p, int64_t slots, int rows_per_tile) {
  const int64_t tiles = max_i64(1, p.batch * p.kv_heads * attention_row_tiles(p, rows_per_tile));
  const int64_t keys = p.window > 0 ? min_i64(p.max_tokens, p.window + p.queries - 1) : p.max_tokens;
  return attention_plan_with_splits(p, attention_splits(tiles, slots, min_i64(max_i64(1, keys / kMinKeysPerSplit), kMaxSplits)),
                                    rows_per_tile);
}

// How decode_attention is launched for p:
// - stream: the stream kernel for p's shape (attention_stream.cuh: 16-bit caches, D of 64, 128
//   or 256, at most 4 query rows per KV head (items of up to 2), 16-byte aligned K and V rows, and
//   MMFAST_CUDA_DECODE_STREAM not 0), else nullptr and the tiled decode_attention_kernel<T>;
// - for the tiled kernel, whether the V tile is copied with cp.async (16-byte aligned V rows,
//   MMFAST_CUDA_ASYNC_COPY not 0, its dynamic shared memory granted, and as many blocks per SM as
//   the staged path: on an SM with less shared memory than sm_90's, e.g. sm_80 with fp32 rows of
//   256, the extra tile would cost a block) and that memory (KT x D elements of T, 0 otherwise);
// - the blocks the device holds at once (the occupancy calculator's blocks per SM x SMs; one per
//   SM when the query fails), which sets the splits.
using AttnKernel = void (*)(AttnArgs);
struct AttnLaunch {
  AttnKernel stream;
  bool v_async;
  size_t smem;
  int64_t slots;
  int rows_per_tile;  // query rows of an item
};

// MMFAST_CUDA_DECODE_STREAM=0 keeps decode_attention on the tiled kernel (for A/B timing).
inline bool decode_stream_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_DECODE_STREAM");
  return enabled;
}

template <class T>
AttnKernel stream_kernel_for(const DecodeAttentionParams& p) {
  if constexpr (sizeof(T) != 2) {
    return nullptr;
  } else {
    const int64_t rows = p.heads / p.kv_heads * p.queries;
    if (!decode_stream_enabled() || rows > kStreamMaxGroupRows || !rows_16b_aligned(p.k_cache, p.head_dim, sizeof(T)) ||
        !rows_16b_aligned(p.v_cache, p.head_dim, sizeof(T)))
      return nullptr;
    const bool one = rows == 1;
    switch (p.head_dim) {
      case 64: return one ? decode_attention_stream_kernel<T, 8, 1> : decode_attention_stream_kernel<T, 8, kStreamMaxRows>;
      case 128: return one ? decode_attention_stream_kernel<T, 16, 1> : decode_attention_stream_kernel<T, 16, kStreamMaxRows>;
      case 256: return one ? decode_attention_stream_kernel<T, 32, 1> : decode_attention_stream_kernel<T, 32, kStreamMaxRows>;
      default: return nullptr;
    }
  }
}

template <class T>
AttnLaunch attention_launch(const DecodeAttentionParams& p) {
  AttnLaunch l{stream_kernel_for<T>(p), false, 0, 0, AttnShape<acc_t<T>>::kRows};
  int per_sm = 0;
  if (l.stream != nullptr) {
    l.rows_per_tile = p.heads / p.kv_heads * p.queries == 1 ? 1 : kStreamMaxRows;
    per_sm = resident_blocks_per_sm_once(l.stream, kThreads, 0);
  } else {
    l.v_async = rows_16b_aligned(p.v_cache, p.head_dim, sizeof(T)) && async_copy_enabled();
    per_sm = resident_blocks_per_sm_once(decode_attention_kernel<T>, kThreads, 0);
    if (per_sm < 1) (void)cudaGetLastError();
    if (l.v_async) {
      const size_t smem = static_cast<size_t>(attn_key_tile<acc_t<T>>(p.head_dim) * p.head_dim) * sizeof(T);
      const int async_per_sm = resident_blocks_per_sm_once(decode_attention_kernel<T>, kThreads, smem);
      if (async_per_sm < 1) (void)cudaGetLastError();
      l.v_async = async_per_sm >= 1 && async_per_sm >= per_sm;  // else V staged after the scores
      if (l.v_async) l.smem = smem, per_sm = async_per_sm;
    }
  }
  if (per_sm < 1) (void)cudaGetLastError();
  l.slots = static_cast<int64_t>(per_sm < 1 ? 1 : per_sm) * sm_count();
  return l;
}

inline AttnPlan attention_plan(const DecodeAttentionParams& p, const AttnLaunch& launch) {
  return attention_plan(p, launch.slots, launch.rows_per_tile);
}

template <class T>
cudaError_t launch_attention(const DecodeAttentionParams& p, cudaStream_t stream) {
  const AttnLaunch launch = attention_launch<T>(p);
  AttnPlan plan = attention_plan(p, launch);
  // The caller sized the workspace by its own plan (decode_attention_workspace_bytes): an occupancy
  // query that failed then (a failure is not remembered) and succeeds now plans more splits, whose
  // partials would not fit. Fewer splits fit (one needs none) and give the same result.
  const size_t room = p.workspace == nullptr ? 0 : p.workspace_bytes;
  while (plan.splits > 1 && plan.bytes > room) plan = attention_plan_with_splits(p, plan.splits - 1, launch.rows_per_tile);
  AttnArgs a;
  a.p = p;
  a.splits = plan.splits;
  a.row_tiles = plan.row_tiles;
  a.direct = plan.splits == 1 ? 1 : 0;
  a.k_vec = rows_16b_aligned(p.k_cache, p.head_dim, sizeof(T)) ? 1 : 0;
  a.v_vec = rows_16b_aligned(p.v_cache, p.head_dim, sizeof(T)) ? 1 : 0;
  a.v_async = launch.v_async ? 1 : 0;
  a.part_out = p.workspace;
  a.part_lse = plan.splits == 1 ? nullptr : static_cast<char*>(p.workspace) + plan.lse_offset;
  const int64_t items = p.batch * p.kv_heads * plan.row_tiles * plan.splits;
  if (launch.stream != nullptr) {
    const AttnKernel decode_attention_stream_kernel_for_shape = launch.stream;
    MMFAST_LAUNCH(decode_attention_stream_kernel_for_shape, grid_for(items), kThreads, 0, stream, a);
  } else {
    MMFAST_LAUNCH(decode_attention_kernel<T>, grid_for(items), kThreads, launch.smem, stream, a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t total = p.batch * p.queries * p.heads * p.head_dim;
  MMFAST_LAUNCH(decode_combine_kernel<T>, grid_for(min_i64(ceil_div(total, kThreads), int64_t(sm_count()) * 16)),
                kThreads, 0, stream, a);
  return cudaGetLastError();
}

}  // namespace decodek
}  // namespace cuda
}  // namespace mmfast
