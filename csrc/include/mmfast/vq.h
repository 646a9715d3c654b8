// Torch-free description of the VQ ops: nearest-codebook search (vq_quantize) and codebook
// lookup (vq_dequantize).
//
// vq_quantize, per row z_n of N rows and K codes e_c of D dims:
//   score_c = sqnorm_c - 2 z_n . e_c                 (sqnorm_c = ||e_c||^2 unless given)
//   index_n = argmin_c score_c                       (ties: lowest c; NaN never wins)
//   distance_n = ||z_n||^2 + score_{index_n}, >= 0   (the squared Euclidean distance)
// A row of z that is not finite gets index 0 and distance ||z_n||^2 (NaN or inf); a finite row
// with no finite score gets index 0 and distance +inf. Products accumulate in fp32 (fp64 for
// fp64 inputs); the N x K scores are never stored.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmfast/common.h"

namespace mmfast {

struct VQParams {
  int64_t rows = 0;   // N
  int64_t codes = 0;  // K
  int64_t dim = 0;    // D
  DType dtype = DType::kFloat32;  // of z and the codebook

  const void* z = nullptr;  // element (n, d) at z[n * z_row_stride + d]
  int64_t z_row_stride = 0;
  const void* codebook = nullptr;         // (K, D), contiguous
  const void* codebook_sqnorm = nullptr;  // (K,), accumulation dtype; nullptr: computed from the codebook

  int64_t* indices = nullptr;  // (N,)
  void* distance = nullptr;    // (N,), accumulation dtype

  void* workspace = nullptr;  // caller-owned, size from the kernels' workspace query
  size_t workspace_bytes = 0;
};

struct VQLookupParams {
  int64_t count = 0;  // number of indices
  int64_t codes = 0;  // K
  int64_t dim = 0;    // D
  DType dtype = DType::kFloat32;  // of the codebook and the output
  const void* indices = nullptr;  // count indices, contiguous
  int index_bytes = 8;            // 8 (int64) or 4 (int32)
  const void* codebook = nullptr;  // (K, D), contiguous
  void* out = nullptr;
  // false: out is (count, D). true: indices are (B, P) and out is (B, D, P) (P = h * w).
  bool channels_first = false;
  int64_t plane = 0;  // P, when channels_first
};

}  // namespace mmfast
