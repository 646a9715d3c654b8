// Torch-free CUDA kernels of the VQ ops: the public entry points. See mmfast/vq.h for the math
// and the rules; vq/quantize.cuh and vq/dequantize.cuh for the kernels.
#pragma once

#include "mmfast/cuda/vq/dequantize.cuh"
#include "mmfast/cuda/vq/quantize.cuh"

namespace mmfast {
namespace cuda {

inline bool vq_valid(const VQParams& p) {
  return p.rows >= 0 && p.codes >= 1 && p.dim >= 1 && p.dim <= INT_MAX &&
         (p.rows == 0 || (p.z != nullptr && p.indices != nullptr && p.distance != nullptr)) && p.codebook != nullptr;
}

// Workspace bytes of vq_quantize on the current device.
inline size_t vq_quantize_workspace_bytes(const VQParams& p) {
  return vq_valid(p) ? vqk::workspace_bytes(p) : 0;
}

// indices and distance of every row of z (mmfast/vq.h). Needs the workspace.
inline cudaError_t vq_quantize(const VQParams& p, cudaStream_t stream) {
  if (!vq_valid(p)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (p.workspace == nullptr || p.workspace_bytes < vq_quantize_workspace_bytes(p)) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto t) { return vqk::launch_quantize<decltype(t)>(p, stream); });
}

// The codebook rows of the indices; NaN rows for indices outside [0, K).
inline cudaError_t vq_dequantize(const VQLookupParams& p, cudaStream_t stream) {
  if (p.count < 0 || p.codes < 1 || p.dim < 1 || (p.index_bytes != 4 && p.index_bytes != 8) ||
      (p.channels_first && p.plane < 1))
    return cudaErrorInvalidValue;
  if (p.count == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto t) { return vqk::launch_lookup<decltype(t)>(p, stream); });
}

}  // namespace cuda
}  // namespace mmfast
