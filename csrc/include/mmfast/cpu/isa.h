// Runtime selection of the vectorised CPU kernels (torch-free).
//
// The kernels are compiled three times (generic, AVX2+FMA, AVX-512) and the best set the
// running CPU supports is picked once. MMFAST_CPU_ISA=generic|avx2|avx512 forces a set
// (tests use it to cover every path on one machine); asking for one the CPU lacks is an
// error rather than a silent downgrade.
#pragma once

namespace mmfast {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);  // compiled in and supported by this CPU
Isa active_isa();             // throws std::runtime_error for a bad MMFAST_CPU_ISA
const char* active_isa_name();

}  // namespace cpu
}  // namespace mmfast
