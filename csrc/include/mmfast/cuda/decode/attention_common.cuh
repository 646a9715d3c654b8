// What decode_attention's kernels share (namespace mmfast::cuda::decodek): the launch arguments,
// the row guard and each item's visible keys. See attention.cuh for the kernels' contract.
#pragma once

#include <cmath>

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/decode/append.cuh"
#include "mmfast/decode.h"

namespace mmfast {
namespace cuda {
namespace decodek {

constexpr int kMaxHeadDim = 256;
constexpr int kKeyTile = 64;              // keys per shared-memory tile at most (tiled kernel)
constexpr int64_t kMinKeysPerSplit = 64;  // a split covers at least this many keys of a row
constexpr int64_t kMaxSplits = 128;

template <class T> __device__ __forceinline__ T nan_of() { return from_acc<T>(acc_t<T>(NAN)); }

struct AttnArgs {
  DecodeAttentionParams p;
  int64_t splits, row_tiles;
  int direct;        // 1: one split, the item writes out
  int k_vec, v_vec;  // 1: the cache's rows are 16-byte aligned (stage_kv_tile loads 16 bytes at a time)
  int v_async;       // 1: each V tile is copied with cp.async while the K tile is scored (v_vec rows)
  void* part_out;    // [split][B*Sq*H][D] acc_t
  void* part_lse;    // [split][B*Sq*H] acc_t
};

__device__ __forceinline__ bool attn_row_valid(int64_t len, int64_t queries, int64_t max_tokens) {
  return len >= queries && len <= max_tokens;
}

// An item: (row b, KV head kvh, tile of rows_per_tile of the R = G Sq query rows that read the
// head, key split), split fastest. Row rho0 + r of the head is query (rho0 + r) / G of head
// kvh G + (rho0 + r) % G; the tile holds nr rows. len: row b's cache length; valid: within
// [Sq, T_max] (else its outputs are NaN and nothing is read).
struct AttnItem {
  int64_t b, kvh, split, rho0, len;
  int nr;
  bool valid;
};
__device__ __forceinline__ AttnItem attn_item(const AttnArgs& a, int64_t item, int rows_per_tile) {
  const DecodeAttentionParams& p = a.p;
  AttnItem it;
  it.split = item % a.splits;
  item /= a.splits;
  const int64_t rt = item % a.row_tiles;
  item /= a.row_tiles;
  it.kvh = item % p.kv_heads, it.b = item / p.kv_heads;
  it.rho0 = rt * rows_per_tile;
  it.nr = static_cast<int>(min_i64(rows_per_tile, p.heads / p.kv_heads * p.queries - it.rho0));
  it.len = p.cache_seqlens[it.b];
  it.valid = attn_row_valid(it.len, p.queries, p.max_tokens);
  return it;
}

// An item of a row whose length is outside [Sq, T_max]: with one split it writes its output rows
// as NaN (nothing is read); with several the combine kernel does. Every thread of the block calls it.
template <class T>
__device__ __forceinline__ void attn_write_nan_rows(const AttnArgs& a, const AttnItem& it) {
  const DecodeAttentionParams& p = a.p;
  if (!a.direct) return;
  const int64_t D = p.head_dim, G = p.heads / p.kv_heads;
  T* op = static_cast<T*>(p.out.data);
  for (int64_t e = threadIdx.x; e < it.nr * D; e += blockDim.x) {
    const int64_t rho = it.rho0 + e / D, d = e % D, i = rho / G, h = it.kvh * G + rho % G;
    op[it.b * p.out.stride_b + i * p.out.stride_n + h * p.out.stride_h + d] = nan_of<T>();
  }
}

// The keys [begin, end) that split `split` of a row of length len reads for its query rows
// rho0 .. rho0 + nr - 1 (row rho: query rho / G at position len - Sq + rho / G): the row's
// visible keys [lo, len) cut into `splits` chunks of at least kMinKeysPerSplit, then clipped to
// what the causal rule and the window leave visible to those rows.
struct KeyRange {
  int64_t begin, end;
};
__device__ __forceinline__ KeyRange attn_key_range(const DecodeAttentionParams& p, int64_t len, int64_t splits,
                                                   int64_t split, int64_t rho0, int64_t nr) {
  const int64_t Sq = p.queries, G = p.heads / p.kv_heads, W = p.window;
  const int64_t lo = W > 0 ? max_i64(0, len - Sq - W + 1) : 0;
  const int64_t chunk = max_i64(ceil_div(len - lo, splits), kMinKeysPerSplit);
  const int64_t c0 = lo + split * chunk, c1 = min_i64(len, c0 + chunk);
  const int64_t pos_first = len - Sq + rho0 / G, pos_last = len - Sq + (rho0 + nr - 1) / G;
  return {max_i64(c0, W > 0 ? max_i64(0, pos_first - W + 1) : 0), min_i64(c1, pos_last + 1)};
}

// Whether key j is visible to a query at position pos: causal, and inside the window W (0: none).
__device__ __forceinline__ bool attn_key_visible(int64_t j, int64_t pos, int64_t W) {
  return j <= pos && (W == 0 || pos - j < W);
}

}  // namespace decodek
}  // namespace cuda
}  // namespace mmfast
