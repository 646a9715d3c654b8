// The linear-attention CPU kernels for every ISA (torch-free).
#include "mmfast/cpu/linear_attention.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/linear_attention_impl.h"
#include "mmfast/cpu/instantiate_isas.h"

namespace mmfast {
namespace cpu {

const LinearAttentionKernels& linear_attention_kernels() {
  static const LinearAttentionKernels table = MMFAST_ACTIVE_ISA_KERNELS(linear_attention_kernels);
  return table;
}

}  // namespace cpu
}  // namespace mmfast
