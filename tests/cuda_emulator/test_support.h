// Helpers every emulated CUDA kernel test shares: conversions between the kernels' element
// types and double, the DType of each, and the failure count main() returns on. Include
// after emulator.h.
#pragma once

#include <cstdio>
#include <string>

#include "../cpp/worst_error.h"  // worse_error: NaN counts as the worst error
#include "emulator.h"
#include "mmfast/common.h"

template <class T> double tod(T x) { return static_cast<double>(x); }
template <> inline double tod<__half>(__half x) { return __half2float(x); }
template <> inline double tod<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> T fromd(double x) { return static_cast<T>(x); }
template <> inline __half fromd<__half>(double x) { return __float2half_rn(static_cast<float>(x)); }
template <> inline __nv_bfloat16 fromd<__nv_bfloat16>(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
template <class T> mmfast::DType dtype_of();
template <> inline mmfast::DType dtype_of<float>() { return mmfast::DType::kFloat32; }
template <> inline mmfast::DType dtype_of<double>() { return mmfast::DType::kFloat64; }
template <> inline mmfast::DType dtype_of<__half>() { return mmfast::DType::kFloat16; }
template <> inline mmfast::DType dtype_of<__nv_bfloat16>() { return mmfast::DType::kBFloat16; }

// Failed checks so far; fail() counts one and prints what failed.
inline int nfail = 0;
inline void fail(const std::string& what) {
  ++nfail;
  std::printf("FAIL %s\n", what.c_str());
}
