// The decode CPU kernels for every ISA (torch-free).
#include "mmfast/cpu/decode.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/decode_impl.h"
#include "mmfast/cpu/instantiate_isas.h"

namespace mmfast {
namespace cpu {

const DecodeKernels& decode_kernels() {
  static const DecodeKernels table = MMFAST_ACTIVE_ISA_KERNELS(decode_kernels);
  return table;
}

}  // namespace cpu
}  // namespace mmfast
