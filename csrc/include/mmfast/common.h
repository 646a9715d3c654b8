// Torch-free conventions every op family shares: dtypes, the token-tensor view, integer
// helpers. Included by the CPU kernels, the CUDA kernels (host and device) and the glue.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define MMFAST_HOST_DEVICE __host__ __device__
#else
#define MMFAST_HOST_DEVICE
#endif

namespace mmfast {

// Element type of a kernel's tensors (values match nothing outside mmfast).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Accumulators are fp32, or fp64 for fp64 inputs.
inline size_t accumulator_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "?";
}

// A (B, N, H, D) tensor with a unit stride along D: element (b, n, h, d) lives at
// data[b*stride_b + n*stride_n + h*stride_h + d]. A projection output viewed as
// (B, N, H, D) or a transposed (B, H, N, D) tensor is read in place.
struct TokenTensor {
  void* data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_n = 0;
  int64_t stride_h = 0;
};

MMFAST_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MMFAST_HOST_DEVICE constexpr int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }
MMFAST_HOST_DEVICE constexpr int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
MMFAST_HOST_DEVICE constexpr int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace mmfast
