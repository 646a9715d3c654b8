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

inline float to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exponent = (h.bits >> 10) & 0x1fu;
  uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    exponent = 127 - 15 + 1;  // subnormal: normalise
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    return bits_float(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
  }
  return bits_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
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
