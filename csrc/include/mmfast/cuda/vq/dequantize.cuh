// vq_dequantize on the GPU: a gather of codebook rows (namespace mmfast::cuda::vqk).
//   vq_lookup_kernel  one thread per output element, in output order (coalesced writes, also
//                     for the channels-first (B, D, h, w) layout). An index outside [0, K) is
//                     never read through: its elements are NaN (no host synchronisation).
#pragma once

#include <cmath>

#include "mmfast/cuda/common.cuh"
#include "mmfast/vq.h"

namespace mmfast {
namespace cuda {
namespace vqk {

template <class T>
__global__ void __launch_bounds__(256) vq_lookup_kernel(VQLookupParams p) {
  const T* codebook = static_cast<const T*>(p.codebook);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.count * p.dim;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t i, d;
    if (p.channels_first) {  // out[b][d][q], index i = b * P + q
      const int64_t b = e / (p.dim * p.plane), rest = e - b * p.dim * p.plane;
      d = rest / p.plane;
      i = b * p.plane + (rest - d * p.plane);
    } else {
      i = e / p.dim;
      d = e - i * p.dim;
    }
    const int64_t c = p.index_bytes == 8 ? static_cast<const int64_t*>(p.indices)[i]
                                         : static_cast<const int32_t*>(p.indices)[i];
    out[e] = (c >= 0 && c < p.codes) ? codebook[c * p.dim + d] : quiet_nan<T>();
  }
}

template <class T>
cudaError_t launch_lookup(const VQLookupParams& p, cudaStream_t stream) {
  MMFAST_LAUNCH(vq_lookup_kernel<T>, grid_for(ceil_div(p.count * p.dim, 256)), 256, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace vqk
}  // namespace cuda
}  // namespace mmfast
