// kv_cache_append on the GPU (namespace mmfast::cuda::decodek).
//
//   kv_append_kernel  one thread per element of the B*S*H_kv*D new keys and values (grid
//                     stride, int64 indices, consecutive threads along D: coalesced reads and
//                     writes). Row b's token s goes to slot len_b + s. A row whose slots
//                     [len_b, len_b + S) do not lie in [0, T_max) is skipped entirely (no
//                     write; no host synchronisation to check the lengths).
#pragma once

#include "mmfast/cuda/common.cuh"
#include "mmfast/decode.h"

namespace mmfast {
namespace cuda {
namespace decodek {

constexpr int kThreads = 256;  // every decode kernel runs 256-thread blocks

template <class T>
__global__ void __launch_bounds__(kThreads) kv_append_kernel(KVCacheAppendParams p) {
  const int64_t D = p.head_dim, H = p.kv_heads, S = p.new_tokens;
  const int64_t total = p.batch * S * H * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = e;
    const int64_t d = rest % D;
    rest /= D;
    const int64_t h = rest % H;
    rest /= H;
    const int64_t s = rest % S;
    const int64_t b = rest / S;
    const int64_t len = p.cache_seqlens[b];
    if (len < 0 || len + S > p.max_tokens) continue;  // the documented guard: the row is skipped
    const int64_t src_k = b * p.k.stride_b + s * p.k.stride_n + h * p.k.stride_h + d;
    const int64_t src_v = b * p.v.stride_b + s * p.v.stride_n + h * p.v.stride_h + d;
    const int64_t dst_k = b * p.k_cache.stride_b + (len + s) * p.k_cache.stride_n + h * p.k_cache.stride_h + d;
    const int64_t dst_v = b * p.v_cache.stride_b + (len + s) * p.v_cache.stride_n + h * p.v_cache.stride_h + d;
    static_cast<T*>(p.k_cache.data)[dst_k] = static_cast<const T*>(p.k.data)[src_k];
    static_cast<T*>(p.v_cache.data)[dst_v] = static_cast<const T*>(p.v.data)[src_v];
  }
}

template <class T>
cudaError_t launch_append(const KVCacheAppendParams& p, cudaStream_t stream) {
  const int64_t total = p.batch * p.new_tokens * p.kv_heads * p.head_dim;
  // Enough blocks to fill the GPU several times over; the grid stride covers the rest.
  const int64_t blocks = min_i64(ceil_div(total, kThreads), static_cast<int64_t>(sm_count()) * 16);
  MMFAST_LAUNCH(kv_append_kernel<T>, grid_for(blocks), kThreads, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace decodek
}  // namespace cuda
}  // namespace mmfast
