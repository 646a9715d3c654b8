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

}  // namespace glue
}  // namespace mmfast
