// The VQ CPU kernels for every ISA (torch-free).
#include "mmfast/cpu/vq.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/vq_impl.h"
#include "mmfast/cpu/instantiate_isas.h"

namespace mmfast {
namespace cpu {

const VQKernels& vq_kernels() {
  static const VQKernels table = amx_bf16_active()      ? isa_amx::vq_amx_kernels()
                                 : avx512_bf16_active() ? isa_avx512bf16::vq_avx512bf16_kernels()
                                                        : MMFAST_ACTIVE_ISA_KERNELS(vq_kernels);
  return table;
}

}  // namespace cpu
}  // namespace mmfast
