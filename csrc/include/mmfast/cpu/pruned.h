// CPU kernels of the masked-channel ops (torch-free). See mmfast/pruned.h. The CPU
// masked_conv2d / masked_linear group the batch by code, pack each code's kept channels and
// weights with `gather`, run oneDNN per code in the glue (csrc/cpu/pruned.cpp) and put the
// result back with `scatter`; masked_group_norm is a kernel of its own.
#pragma once

#include <cstdint>

#include "mmfast/cpu/isa.h"
#include "mmfast/pruned.h"

namespace mmfast {
namespace cpu {

// One ISA's implementation. group_norm returns -1, or the first sample whose code is outside
// [0, K) (nothing is written then).
struct PrunedKernels {
  int64_t (*group_norm)(const MaskedGroupNormParams&);
  void (*gather)(const ChannelGatherParams&);
  void (*scatter)(const ChannelScatterParams&);
};

MMFAST_DECLARE_ISA_KERNELS(PrunedKernels, pruned_kernels)

// The kernels of the ISA this process runs (chosen once).
const PrunedKernels& pruned_kernels();

}  // namespace cpu
}  // namespace mmfast
