// decode_attention_stream_kernel: decode_attention for 16-bit caches with head dim 64, 128 or 256
// and at most 4 query rows per KV head (MHA decoding as in Liquid, Llama-3's GQA groups of 4,
// a few queries of MHA), with 16-byte aligned K and V rows (namespace mmfast::cuda::decodek; attention.cuh dispatches).
//
// Keys stream through registers, never through shared memory: a group of LPK = D / 8 lanes
// holds one key, each lane 8 elements of its K and V rows (one 16-byte load each), so a warp
// reads 32 / LPK keys at once and a block's 8 warps 8 x 32 / LPK. Each group loads the K and V
// rows of kStreamKeys keys before it uses any (2 x kStreamKeys 16-byte loads in flight per
// thread: the cache is read once per step, the loads in flight are the bandwidth), scores them
// (8 products per lane, a butterfly over the group's lanes), and keeps its own online softmax
// (running max m, sum l, and its 8 output elements per query row) in registers: no barrier
// inside the key loop. At the end of an item the block's groups merge their (m, l, out) through
// shared memory in group order (deterministic), and the item writes out (one split) or its
// partial and log-sum-exp as the tiled kernel does (decode_combine_kernel merges the splits).
// The tiled kernel (attention.cuh) staged K and V tiles through shared memory with barriers
// between its phases and, for MHA, one real query row of the tile's 16; it reached 11-14% of an
// H200's bandwidth (docs/decode-attention-performance.md).
#pragma once

#include "mmfast/cuda/decode/attention_common.cuh"

namespace mmfast {
namespace cuda {
namespace decodek {

constexpr int kStreamKeys = 4;      // keys per lane group whose loads are in flight together
// Query rows of an item: with 2, q and the outputs of each row take 64 registers and the kernel
// 126-128 (2 blocks per SM, no spills on sm_90a); with 4 it spilled 60-72 B per thread. Up to
// kStreamMaxGroupRows rows per KV head (Llama-3's GQA group of 4) run as items of 2 rows, each
// reading the head's K and V: twice the bytes of one read, still far fewer stalls than the tiled
// kernel's 16-row tiles.
constexpr int kStreamMaxRows = 2;
constexpr int kStreamMaxGroupRows = 4;

// LPK lanes per key (D = 8 LPK), RM query rows per item at most (1 or kStreamMaxRows): item =
// (row b, KV head, tile of RM of its rows, key split), as in the tiled kernel.
template <class T, int LPK, int RM>
__global__ void __launch_bounds__(kThreads, 2) decode_attention_stream_kernel(AttnArgs a) {
  static_assert(sizeof(T) == 2, "16-bit caches: 8 elements per 16-byte load");
  constexpr int E = 8, D = LPK * E, KPW = 32 / LPK, kGroups = (kThreads / 32) * KPW;
  constexpr int U = kStreamKeys;
  constexpr int kStep = kGroups * U;  // keys a block reads per step
  __shared__ float m_s[kGroups * RM], l_s[kGroups * RM];
  __shared__ float out_s[kGroups * RM * D];

  const DecodeAttentionParams& p = a.p;
  const int64_t Sq = p.queries, H = p.heads, Hkv = p.kv_heads, G = H / Hkv, R = G * Sq, W = p.window;
  const int tid = threadIdx.x, lane = tid & 31, li = lane % LPK;
  const int group = (tid >> 5) * KPW + lane / LPK;  // this lane's group in the block
  const T* qp = static_cast<const T*>(p.q.data);
  const T* kp = static_cast<const T*>(p.k_cache.data);
  const T* vp = static_cast<const T*>(p.v_cache.data);
  T* op = static_cast<T*>(p.out.data);
  const float scale = static_cast<float>(p.scale), cap = static_cast<float>(p.softcap);
  const float neg_inf = -INFINITY;
  const int64_t qrows = p.batch * Sq * H;

  const int64_t items = p.batch * Hkv * a.row_tiles * a.splits;  // row tiles of RM rows
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const AttnItem it = attn_item(a, item, RM);
    if (!it.valid) {  // block-uniform
      attn_write_nan_rows<T>(a, it);
      continue;
    }
    const int64_t split = it.split, kvh = it.kvh, b = it.b, rho0 = it.rho0, len = it.len;
    const int nr = it.nr;
    const KeyRange keys = attn_key_range(p, len, a.splits, split, rho0, nr);
    float q[RM][E], out[RM][E], m[RM], l[RM];
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      const int64_t rho = rho0 + r, i = rho / G, h = kvh * G + rho % G;
      m[r] = neg_inf, l[r] = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        out[r][e] = 0.0f;
        q[r][e] = r < nr ? to_acc(qp[b * p.q.stride_b + i * p.q.stride_n + h * p.q.stride_h + li * E + e]) : 0.0f;
      }
    }
    const T* k_head = kp + b * p.k_cache.stride_b + kvh * p.k_cache.stride_h + li * E;
    const T* v_head = vp + b * p.v_cache.stride_b + kvh * p.v_cache.stride_h + li * E;
    for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kStep) {  // block-uniform trip count
      uint4 kraw[U], vraw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // every load issued before any is used
        const int64_t j = j0 + u * kGroups + group;
        const bool in = j < keys.end;
        kraw[u] = in ? *reinterpret_cast<const uint4*>(k_head + j * p.k_cache.stride_n) : make_uint4(0u, 0u, 0u, 0u);
        vraw[u] = in ? *reinterpret_cast<const uint4*>(v_head + j * p.v_cache.stride_n) : make_uint4(0u, 0u, 0u, 0u);
      }
      float s[U][RM];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        T kt[E];
        memcpy(kt, &kraw[u], 16);
        const int64_t j = j0 + u * kGroups + group;
#pragma unroll
        for (int r = 0; r < RM; ++r) {
          float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
          for (int e = 0; e < E; e += 2) {
            d0 += q[r][e] * to_acc(kt[e]);
            d1 += q[r][e + 1] * to_acc(kt[e + 1]);
          }
          float dot = d0 + d1;
#pragma unroll
          for (int off = LPK / 2; off >= 1; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          float sc = dot * scale;
          if (cap > 0.0f) sc = cap * tanh_acc(sc / cap);
          // row r's query sits at position len - Sq + (rho0 + r) / G
          s[u][r] = r < nr && j < keys.end && attn_key_visible(j, len - Sq + (rho0 + r) / G, W) ? sc : neg_inf;
        }
      }
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        float mx = m[r];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = s[u][r] > mx ? s[u][r] : mx;
        const float alpha = m[r] == neg_inf ? 0.0f : exp_acc(m[r] - mx);  // mx == -inf keeps m -inf
        l[r] *= alpha;
#pragma unroll
        for (int e = 0; e < E; ++e) out[r][e] *= alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float pr = s[u][r] == neg_inf ? 0.0f : exp_acc(s[u][r] - mx);
          T vt[E];
          memcpy(vt, &vraw[u], 16);
          l[r] += pr;
#pragma unroll
          for (int e = 0; e < E; ++e) out[r][e] += pr * to_acc(vt[e]);
        }
        m[r] = mx;
      }
    }
    // Merge the groups: slot (group, r); lanes li of a group hold elements li * 8 .. li * 8 + 7.
    __syncthreads();  // the previous item's readers of m_s, l_s, out_s are done
#pragma unroll
    for (int r = 0; r < RM; ++r) {
      if (li == 0) m_s[group * RM + r] = m[r], l_s[group * RM + r] = l[r];
#pragma unroll
      for (int e = 0; e < E; ++e) out_s[(group * RM + r) * D + li * E + e] = out[r][e];
    }
    __syncthreads();
    for (int e = tid; e < nr * D; e += kThreads) {
      const int r = e / D, d = e - r * D;
      float mx = neg_inf;
      bool nan_seen = false;  // a NaN score makes its group's l NaN (its m may stay -inf): the row is NaN
      for (int g = 0; g < kGroups; ++g) {
        mx = m_s[g * RM + r] > mx ? m_s[g * RM + r] : mx;
        nan_seen |= l_s[g * RM + r] != l_s[g * RM + r];
      }
      float num = 0.0f, den = 0.0f;
      if (mx != neg_inf) {
        for (int g = 0; g < kGroups; ++g) {
          const float mg = m_s[g * RM + r];
          if (mg == neg_inf) continue;  // the group saw no visible key
          const float w = exp_acc(mg - mx);
          num += w * out_s[(g * RM + r) * D + d];
          den += w * l_s[g * RM + r];
        }
      }
      if (nan_seen) num = den = NAN;
      const int64_t rho = rho0 + r, i = rho / G, h = kvh * G + rho % G;
      if (a.direct) {
        op[b * p.out.stride_b + i * p.out.stride_n + h * p.out.stride_h + d] = from_acc<T>(num / den);  // den > 0
      } else {
        const int64_t qrow = (b * Sq + i) * H + h;
        if (!(den <= 0.0f)) static_cast<float*>(a.part_out)[(split * qrows + qrow) * D + d] = num / den;  // NaN too
        if (d == 0) static_cast<float*>(a.part_lse)[split * qrows + qrow] = !(den <= 0.0f) ? mx + log_acc(den) : neg_inf;
      }
    }
  }
}

}  // namespace decodek
}  // namespace cuda
}  // namespace mmfast
