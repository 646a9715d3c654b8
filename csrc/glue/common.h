// Torch glue every op family shares: dtype mapping and the checks that name the op and what
// was expected (ValueError for shapes and values, TypeError for dtypes and devices).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "mmfast/common.h"

namespace mmfast {
namespace glue {

// The kernels' DType of a float tensor; TypeError naming `op` and `name` otherwise.
inline DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  }
}

// fp64 accumulation for fp64 inputs, fp32 otherwise.
inline at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_dtype_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                                    const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": all inputs must have the same dtype, got ", an, ": ",
                   a.scalar_type(), ", ", bn, ": ", b.scalar_type());
  TORCH_CHECK_TYPE(a.device() == b.device(), op, ": all inputs must have the same device, got ", an, ": ", a.device(),
                   ", ", bn, ": ", b.device());
}

// Kernels read (B, N, H, D) with any strides except along D, which must be 1.
// Only a tensor whose last dim is strided is copied.
inline at::Tensor unit_stride_last(const at::Tensor& t) {
  return (t.size(3) == 1 || t.stride(3) == 1) ? t : t.contiguous();
}

inline TokenTensor token_view(const at::Tensor& t) {
  TokenTensor view;
  view.data = const_cast<void*>(t.data_ptr());
  view.stride_b = t.stride(0);
  view.stride_n = t.stride(1);
  view.stride_h = t.stride(2);
  return view;
}

}  // namespace glue
}  // namespace mmfast
