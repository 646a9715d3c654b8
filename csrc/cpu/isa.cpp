// Picks the CPU kernel set once per process (torch-free).
#include "mmfast/cpu/isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if MMFAST_CPU_AMX_COMPILED
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#endif

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

#if defined(__x86_64__) && defined(__GNUC__)
// F16C (CPUID leaf 1, ECX bit 29): every AVX2 CPU has it, and the AVX2 / AVX-512 copies convert
// fp16 with it. Read from CPUID: __builtin_cpu_supports knows "f16c" only from GCC 11 / clang 18.
static bool cpu_has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && ((ecx >> 29) & 1);
}
#endif

bool isa_supported(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (isa) {
    case Isa::kGeneric: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && cpu_has_f16c();
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

// Why the tiles are unavailable ("" when they are), for the MMFAST_CPU_AMX=1 error.
static std::string amx_unavailable_reason() {
#if MMFAST_CPU_AMX_COMPILED
  unsigned eax, ebx, ecx, edx;
  if (!isa_supported(Isa::kAvx512)) return "this CPU has no AVX-512";
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 22) & 1) || !((edx >> 24) & 1))
    return "this CPU has no AMX-TILE/AMX-BF16 (CPUID leaf 7)";
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, Linux 5.16
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return std::string("Linux refused the tile state: arch_prctl(ARCH_REQ_XCOMP_PERM) failed: ") +
           std::strerror(errno);
  return "";
#else
  return "this build has no AMX kernels (they need GCC >= 11 on x86-64 Linux)";
#endif
}

static const std::string& amx_reason() {
  static const std::string reason = amx_unavailable_reason();  // asks the OS once
  return reason;
}

bool amx_bf16_supported() { return amx_reason().empty(); }

// An on/off switch from the environment: "" (unset: the default), "0" or "1"; anything else throws.
static std::string switch_setting(const char* name) {
  const char* value = std::getenv(name);
  const std::string mode = value != nullptr ? value : "";
  if (mode != "" && mode != "0" && mode != "1")
    throw std::runtime_error(std::string(name) + " must be 0 or 1, got '" + mode + "'");
  return mode;
}

static bool detect_amx() {
  const std::string mode = switch_setting("MMFAST_CPU_AMX");
  if (mode == "0") return false;
  const bool usable = amx_bf16_supported() && active_isa() == Isa::kAvx512;
  if (mode == "1" && !usable)
    throw std::runtime_error("MMFAST_CPU_AMX=1 but " + (amx_bf16_supported() ? "the active CPU ISA is " +
                                                                                 std::string(active_isa_name()) +
                                                                                 ", not avx512"
                                                                           : amx_reason()));
  return usable;
}

bool amx_bf16_active() {
  static const bool active = detect_amx();
  return active;
}

// Why VDPBF16PS is unavailable ("" when it is), for the MMFAST_CPU_AVX512_BF16=1 error.
static std::string avx512_bf16_unavailable_reason() {
#if MMFAST_CPU_AVX512BF16_COMPILED
  unsigned eax, ebx, ecx, edx;
  if (!isa_supported(Isa::kAvx512)) return "this CPU has no AVX-512";
  // subleaf 1 exists only where subleaf 0 says so (EAX: the highest subleaf of leaf 7)
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || eax < 1 ||
      !__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !((eax >> 5) & 1))
    return "this CPU has no AVX512-BF16 (CPUID leaf 7, subleaf 1)";
  return "";
#else
  return "this build has no AVX512-BF16 kernels (they need GCC >= 10 on x86-64)";
#endif
}

bool avx512_bf16_supported() { return avx512_bf16_unavailable_reason().empty(); }

static bool cpu_is_amd() {
#if MMFAST_CPU_AVX512BF16_COMPILED
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(0, &eax, &ebx, &ecx, &edx) && ebx == 0x68747541 && edx == 0x69746e65 &&
         ecx == 0x444d4163;  // "AuthenticAMD"
#else
  return false;
#endif
}

static bool detect_avx512_bf16() {
  const std::string mode = switch_setting("MMFAST_CPU_AVX512_BF16");
  if (mode == "0") return false;
  const bool usable = avx512_bf16_supported() && active_isa() == Isa::kAvx512 && !amx_bf16_active();
  if (mode == "1" && !usable) {
    const std::string why = !avx512_bf16_supported() ? avx512_bf16_unavailable_reason()
                            : active_isa() != Isa::kAvx512
                                ? "the active CPU ISA is " + std::string(active_isa_name()) + ", not avx512"
                                : std::string("AMX is active (MMFAST_CPU_AMX=0 turns it off)");
    throw std::runtime_error("MMFAST_CPU_AVX512_BF16=1 but " + why);
  }
  return usable && (mode == "1" || cpu_is_amd());
}

bool avx512_bf16_active() {
  static const bool active = detect_avx512_bf16();
  return active;
}

}  // namespace cpu
}  // namespace mmfast
