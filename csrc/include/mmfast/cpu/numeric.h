// 16-bit float storage types and exact conversions for the CPU kernels (torch-free).
// Bit layouts match at::Half / at::BFloat16, so the glue passes their pointers as is.
#pragma once

#include <cstdint>
#include <cstring>

namespace mmfast {
namespace cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float to_float(BFloat16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

inline BFloat16 to_bfloat16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

// Branch-free, so that loops of it vectorise (simd.h's load_floats(const Half*) takes the same
// steps lane-wise where F16C is not used): the 5-bit exponent is rebiased in place (255 for inf / NaN, the mantissa kept), and
// zero / subnormal halves m * 2^-24 come out exact as (2^-14 + m * 2^-24) - 2^-14, a
// subtraction of normal floats (so flush-to-zero / denormals-are-zero modes do not touch it).
inline float to_float(Half h) {
  const uint32_t exponent = h.bits & 0x7c00u;
  uint32_t bits = (static_cast<uint32_t>(h.bits & 0x7fffu) << 13) + ((127u - 15u) << 23);
  bits += exponent == 0x7c00u ? (128u - 16u) << 23 : 0u;
  const uint32_t subnormal = float_bits(bits_float(bits + (1u << 23)) - bits_float(113u << 23));
  bits = exponent == 0 ? subnormal : bits;
  return bits_float(bits | (static_cast<uint32_t>(h.bits & 0x8000u) << 16));
}

// Round to nearest even, with overflow to inf and gradual underflow, by letting the FPU
// do the rounding at the right exponent (the classic "magic bias" method).
inline Half to_half(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const float magnitude = f < 0 ? -f : f;
  float base = (magnitude * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign))};
}

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(Half x) { return to_float(x); }
inline float to_acc(BFloat16 x) { return to_float(x); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  static float convert(float x) { return x; }
};
template <>
struct FromAcc<double> {
  static double convert(double x) { return x; }
};
template <>
struct FromAcc<Half> {
  static Half convert(float x) { return to_half(x); }
};
template <>
struct FromAcc<BFloat16> {
  static BFloat16 convert(float x) { return to_bfloat16(x); }
};

}  // namespace cpu
}  // namespace mmfast
