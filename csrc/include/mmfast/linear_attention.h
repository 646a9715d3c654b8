// Torch-free description of the non-causal normalized linear attention (LinFusion).
//
// Per (b, h), with N tokens and phi the feature map:
//   S = (1/N) sum_j phi(k_j)^T v_j          (Dk x Dv, fp32; fp64 for fp64 inputs)
//   m = (1/N) sum_j phi(k_j)                (Dk)
//   out_i = phi(q_i) S / (phi(q_i) . m + eps)
//
// Every kernel (CPU and CUDA) takes one LinearAttentionParams. Token tensors are
// TokenTensor views (any B, N, H strides, unit stride along D); state tensors are
// contiguous (B, H, Dk, Dv) and (B, H, Dk).
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmfast/common.h"

namespace mmfast {

// phi(x): kNone -> x, kElu1 -> elu(x) + 1, kRelu -> max(x, 0). The values are the feature-map
// ids of the Triton kernels and the indices into mmfast.reference.FEATURE_MAPS.
enum class FeatureMap : int { kNone = 0, kElu1 = 1, kRelu = 2 };

// Head dims the kernels are written (and tested) for.
constexpr int64_t kMinHeadDim = 1;
constexpr int64_t kMaxHeadDim = 256;

struct LinearAttentionParams {
  int64_t batch = 0;
  int64_t seqlen = 0;
  int64_t heads = 0;
  int64_t dim_k = 0;
  int64_t dim_v = 0;
  DType dtype = DType::kFloat32;  // dtype of the token tensors
  FeatureMap feature_map = FeatureMap::kElu1;
  double eps = 1e-4;

  // Forward inputs / outputs (token tensors).
  TokenTensor q, k, v, out;
  // State: (B, H, Dk, Dv) and (B, H, Dk), contiguous, accumulation dtype
  // (fp32, or fp64 when dtype == kFloat64).
  void* state = nullptr;
  void* mean = nullptr;

  // Backward.
  TokenTensor grad_out, grad_q, grad_k, grad_v;
  void* grad_state = nullptr;  // same layout as state
  void* grad_mean = nullptr;   // same layout as mean

  // Scratch memory owned by the caller (size from the *_workspace_bytes functions).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;

  int64_t bh() const { return batch * heads; }
};

inline const char* feature_map_name(FeatureMap f) {
  switch (f) {
    case FeatureMap::kNone: return "none";
    case FeatureMap::kElu1: return "elu1";
    case FeatureMap::kRelu: return "relu";
  }
  return "?";
}

}  // namespace mmfast
