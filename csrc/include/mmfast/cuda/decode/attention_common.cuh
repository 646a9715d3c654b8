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
