// The AVX-512 copy of a family's CPU kernels, compiled for AVX2 + FMA, so that its code runs on
// CPUs without AVX-512 (CI's and most development VMs).
//
// instantiate_isas.h compiles each family's *_impl.h per ISA from one source that uses only GCC
// vector extensions; what differs between the copies is MMFAST_VECTOR_BYTES (the vector width
// and every constant derived from it: register blocks, rows per loaded vector, prefetch
// distances) and the target pragma (instruction selection). Here the impl is compiled with the
// AVX-512 copy's 64-byte vectors under the AVX2 target: GCC splits each 64-byte operation into
// two 32-byte ones, the results are the same, and the AVX-512 copy's logic (its tiling, tails,
// masks and constants) is tested on any x86-64 CPU with AVX2. The instruction selection of the
// real copy is the compiler's; on a CPU with AVX-512 the tests run that copy itself.
//
// Use in a test, after every ordinary header:
//   #define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/<family>_impl.h"
//   #include "avx512_on_avx2.h"   // defines mmfast::cpu::isa_avx512_on_avx2::<family>_kernels()
// and loop over runnable_isa_variants(...) below: the three copies the library holds, then this
// one where the CPU has AVX2 but not AVX-512.
#pragma once

#ifndef MMFAST_CPU_FAMILY_IMPL
#error "define MMFAST_CPU_FAMILY_IMPL (the family's *_impl.h) before including avx512_on_avx2.h"
#endif

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "mmfast/common.h"
#include "mmfast/cpu/isa.h"
#include "mmfast/cpu/memory.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define MMFAST_TEST_AVX512_ON_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MMFAST_CPU_F16C 256  // the AVX2 copy's F16C conversions, a 64-byte vector as two halves
// 64-byte vectors passed by value without AVX-512 change the ABI (a note GCC gives at the end of
// the test's translation unit, so it stays off there): these functions never cross a library.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define MMFAST_TEST_AVX512_ON_AVX2 0
#endif
#define MMFAST_CPU_ISA_NS isa_avx512_on_avx2
#define MMFAST_VECTOR_BYTES 64
#include "mmfast/cpu/simd.h"
#include MMFAST_CPU_FAMILY_IMPL
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#if MMFAST_TEST_AVX512_ON_AVX2
#undef MMFAST_CPU_F16C
#pragma GCC pop_options
#endif

namespace mmfast {
namespace test {

// A kernel table to test: its name and its table.
template <class Table>
struct IsaVariant {
  const char* name;
  Table (*kernels)();
};

// The tables that run on this CPU: the library's generic / AVX2 / AVX-512 copies where the CPU
// supports them, and the AVX-512 copy compiled for AVX2 where the real one cannot run but AVX2
// can. Prints a "skip" line for each of the others.
template <class Table>
std::vector<IsaVariant<Table>> runnable_isa_variants(Table (*generic)(), Table (*avx2)(), Table (*avx512)(),
                                                     Table (*avx512_on_avx2)()) {
  using cpu::Isa;
  const bool has_avx512 = cpu::isa_supported(Isa::kAvx512), has_avx2 = cpu::isa_supported(Isa::kAvx2);
  const struct {
    IsaVariant<Table> variant;
    bool runs;
    const char* skip_reason;
  } all[] = {{{cpu::isa_name(Isa::kGeneric), generic}, cpu::isa_supported(Isa::kGeneric), "not supported by this CPU"},
             {{cpu::isa_name(Isa::kAvx2), avx2}, has_avx2, "not supported by this CPU"},
             {{cpu::isa_name(Isa::kAvx512), avx512}, has_avx512, "not supported by this CPU"},
             {{"avx512-on-avx2", avx512_on_avx2}, MMFAST_TEST_AVX512_ON_AVX2 && has_avx2 && !has_avx512,
              has_avx512 ? "the AVX-512 copy itself runs" : "needs AVX2 on x86-64"}};
  std::vector<IsaVariant<Table>> runnable;
  for (const auto& v : all) {
    if (v.runs) {
      runnable.push_back(v.variant);
    } else {
      std::printf("skip %s (%s)\n", v.variant.name, v.skip_reason);
    }
  }
  return runnable;
}

}  // namespace test
}  // namespace mmfast
