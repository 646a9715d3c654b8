// CPU kernels of the VQ ops (torch-free). See mmfast/vq.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmfast/cpu/isa.h"
#include "mmfast/vq.h"

namespace mmfast {
namespace cpu {

// One ISA's implementation. quantize returns nullptr or a static error message; dequantize
// returns -1, or the position of the first index outside [0, K) (nothing is read for it).
struct VQKernels {
  size_t (*quantize_workspace_bytes)(const VQParams&);
  const char* (*quantize)(const VQParams&);
  int64_t (*dequantize)(const VQLookupParams&);
};

MMFAST_DECLARE_ISA_KERNELS(VQKernels, vq_kernels)

// The AVX-512 kernels with bf16 vq_quantize on AMX tiles at D > 8 (csrc/cpu/vq_amx_kernels.cpp);
// only when amx_bf16_active().
namespace isa_amx {
VQKernels vq_amx_kernels();
}

// The AVX-512 kernels with bf16 vq_quantize on VDPBF16PS (csrc/cpu/vq_avx512bf16_kernels.cpp);
// only when avx512_bf16_active().
namespace isa_avx512bf16 {
VQKernels vq_avx512bf16_kernels();
}

// The kernels of the ISA this process runs (chosen once), with AMX or else AVX512-BF16 for bf16
// where active.
const VQKernels& vq_kernels();

}  // namespace cpu
}  // namespace mmfast
