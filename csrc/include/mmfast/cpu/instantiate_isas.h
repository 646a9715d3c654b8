// Compiles one op family's CPU kernels for every ISA in a single translation unit, so a new
// family adds one small .cpp and no per-ISA files or build lines:
//
//   // csrc/cpu/<family>_kernels.cpp
//   #include "mmfast/cpu/<family>.h"                     // the family's table and entry points
//   #define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/<family>_impl.h"
//   #include "mmfast/cpu/instantiate_isas.h"
//
// The family's *_impl.h is included three times, after mmfast/cpu/simd.h, inside
// `namespace mmfast::cpu::{isa_generic, isa_avx2, isa_avx512}` with MMFAST_VECTOR_BYTES 16,
// 32 and 64 and, on x86-64, `#pragma GCC target` of AVX2+FMA+F16C and AVX-512(+F16C) around
// the last two (MMFAST_CPU_F16C 256 / 512: simd.h's fp16 conversions by F16C there). Every
// ordinary header is included before the first pragma, so inline functions
// shared with other TUs (std, numeric.h) are compiled for the baseline ISA only; the
// per-ISA code uses GCC vector extensions and builtins, never shared templates. The AVX
// copies are never called on a CPU without the ISA (mmfast/cpu/isa.h picks at run time).
// Elsewhere (arm64) all three copies are baseline code and only the generic one is used.
#ifndef MMFAST_CPU_FAMILY_IMPL
#error "define MMFAST_CPU_FAMILY_IMPL (the family's *_impl.h) before including instantiate_isas.h"
#endif

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mmfast/common.h"
#include "mmfast/cpu/isa.h"
#include "mmfast/cpu/memory.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define MMFAST_X86_TARGETS 1
#endif

#define MMFAST_CPU_ISA_NS isa_generic
#define MMFAST_VECTOR_BYTES 16
#include "mmfast/cpu/simd.h"
#include MMFAST_CPU_FAMILY_IMPL
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES

#ifdef MMFAST_X86_TARGETS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MMFAST_CPU_F16C 256
#endif
#define MMFAST_CPU_ISA_NS isa_avx2
#define MMFAST_VECTOR_BYTES 32
#include "mmfast/cpu/simd.h"
#include MMFAST_CPU_FAMILY_IMPL
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#ifdef MMFAST_X86_TARGETS
#undef MMFAST_CPU_F16C
#pragma GCC pop_options
#endif

#ifdef MMFAST_X86_TARGETS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define MMFAST_CPU_F16C 512
#endif
#define MMFAST_CPU_ISA_NS isa_avx512
#define MMFAST_VECTOR_BYTES 64
#include "mmfast/cpu/simd.h"
#include MMFAST_CPU_FAMILY_IMPL
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#ifdef MMFAST_X86_TARGETS
#undef MMFAST_CPU_F16C
#pragma GCC pop_options
#endif

#undef MMFAST_X86_TARGETS
