// CPU kernels of the decode ops (torch-free). See mmfast/decode.h for the rules.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mmfast/cpu/isa.h"
#include "mmfast/decode.h"

namespace mmfast {
namespace cpu {

// One ISA's implementation. append and attention check every row's length first and return
// the first row whose slots fall outside the cache (nothing is written then), else -1;
// sample reports invalid rows in p.status and never fails.
struct DecodeKernels {
  int64_t (*append)(const KVCacheAppendParams&);
  int64_t (*attention)(const DecodeAttentionParams&);
  void (*sample)(const SampleParams&);
  void (*linear)(const DecodeLinearParams&);
};

MMFAST_DECLARE_ISA_KERNELS(DecodeKernels, decode_kernels)

// The kernels of the ISA this process runs (chosen once).
const DecodeKernels& decode_kernels();

}  // namespace cpu
}  // namespace mmfast
