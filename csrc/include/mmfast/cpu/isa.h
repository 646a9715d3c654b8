// Runtime selection of the vectorised CPU kernels (torch-free).
//
// Every family's kernels are compiled three times (generic, AVX2+FMA+F16C, AVX-512+F16C; see
// instantiate_isas.h) and the best set the running CPU supports is picked once.
// MMFAST_CPU_ISA=generic|avx2|avx512 forces a set (tests use it to cover every path on one
// machine); asking for one the CPU lacks is an error rather than a silent downgrade.
#pragma once

// The AMX kernels need GCC >= 11 (target("amx-tile")) on x86-64 Linux (the tile-state
// permission is a Linux arch_prctl); elsewhere amx_bf16_supported() is false.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define MMFAST_CPU_AMX_COMPILED 1
#else
#define MMFAST_CPU_AMX_COMPILED 0
#endif

// The AVX512-BF16 kernels need `#pragma GCC target("avx512bf16")` around the intrinsics: GCC >= 10
// on x86-64 (clang ignores the pragma, and its intrinsics then refuse to compile).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define MMFAST_CPU_AVX512BF16_COMPILED 1
#else
#define MMFAST_CPU_AVX512BF16_COMPILED 0
#endif

namespace mmfast {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);  // compiled in and supported by this CPU
Isa active_isa();             // throws std::runtime_error for a bad MMFAST_CPU_ISA
const char* active_isa_name();

// AMX-BF16 tiles (Sapphire Rapids and later), for the bf16 kernels that have an AMX version
// (vq_quantize). Active with the AVX-512 set when the CPU has AMX-TILE and AMX-BF16 and Linux
// grants this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, kernel >= 5.16).
// MMFAST_CPU_AMX=0 turns it off (A/B runs, the AVX-512 bf16 path); MMFAST_CPU_AMX=1 makes its
// absence an error instead of a silent downgrade.
bool amx_bf16_supported();  // by this CPU and OS (asks the OS for the tile state once)
bool amx_bf16_active();     // throws std::runtime_error for a bad or unsatisfiable MMFAST_CPU_AMX

// AVX512-BF16's VDPBF16PS for the bf16 kernels that have such a version (vq_quantize), with the
// AVX-512 set and never where AMX is active. It pays only where VDPBF16PS retires at the FMA
// rate (AMD Zen 4: 1.85x the products of fp32 FMAs; Sapphire Rapids: 0.5x), so by default it is
// on for AMD CPUs only. MMFAST_CPU_AVX512_BF16=0 turns it off, =1 turns it on on any CPU that has
// it and makes its absence an error instead of a silent downgrade.
bool avx512_bf16_supported();  // compiled in, and this CPU has AVX512-BF16 and the AVX-512 set
bool avx512_bf16_active();     // throws std::runtime_error for a bad or unsatisfiable setting

// The one ISA table: of a family's three kernel tables, the one for `isa`.
template <class Table>
Table kernels_for(Isa isa, Table (*generic)(), Table (*avx2)(), Table (*avx512)()) {
  switch (isa) {
    case Isa::kAvx512: return avx512();
    case Isa::kAvx2: return avx2();
    case Isa::kGeneric: break;
  }
  return generic();
}

}  // namespace cpu
}  // namespace mmfast

// Declares a family's per-ISA table functions `Table fn()` in isa_generic, isa_avx2 and
// isa_avx512 (defined by its *_impl.h through instantiate_isas.h); use inside mmfast::cpu.
#define MMFAST_DECLARE_ISA_KERNELS(Table, fn) \
  namespace isa_generic {                     \
  Table fn();                                 \
  }                                           \
  namespace isa_avx2 {                        \
  Table fn();                                 \
  }                                           \
  namespace isa_avx512 {                      \
  Table fn();                                 \
  }

// The table of the ISA this process runs (active_isa()), for a family declared as above.
#define MMFAST_ACTIVE_ISA_KERNELS(fn)                                                         \
  ::mmfast::cpu::kernels_for(::mmfast::cpu::active_isa(), &::mmfast::cpu::isa_generic::fn, \
                             &::mmfast::cpu::isa_avx2::fn, &::mmfast::cpu::isa_avx512::fn)
