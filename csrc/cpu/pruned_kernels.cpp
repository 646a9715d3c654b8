// The masked-channel CPU kernels for every ISA (torch-free).
#include "mmfast/cpu/pruned.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/pruned_impl.h"
#include "mmfast/cpu/instantiate_isas.h"

namespace mmfast {
namespace cpu {

const PrunedKernels& pruned_kernels() {
  static const PrunedKernels table = MMFAST_ACTIVE_ISA_KERNELS(pruned_kernels);
  return table;
}

}  // namespace cpu
}  // namespace mmfast
