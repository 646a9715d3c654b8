// Picks the CPU kernel set once per process (torch-free).
#include "mmfast/cpu/isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace mmfast {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kGeneric: return "generic";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (isa) {
    case Isa::kGeneric: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::kGeneric;
#endif
}

static Isa detect_isa() {
  const char* forced = std::getenv("MMFAST_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
      if (std::strcmp(forced, isa_name(isa)) != 0) continue;
      if (!isa_supported(isa))
        throw std::runtime_error(std::string("MMFAST_CPU_ISA=") + forced + " but this CPU does not support it");
      return isa;
    }
    throw std::runtime_error(std::string("MMFAST_CPU_ISA must be generic, avx2 or avx512, got '") + forced + "'");
  }
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kGeneric;
}

Isa active_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* active_isa_name() { return isa_name(active_isa()); }

}  // namespace cpu
}  // namespace mmfast
