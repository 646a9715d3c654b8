// CPU kernels of the linear attention (torch-free). See mmfast/linear_attention.h.
#pragma once

#include <cstddef>

#include "mmfast/cpu/isa.h"
#include "mmfast/linear_attention.h"

namespace mmfast {
namespace cpu {

// One ISA's implementation. workspace_bytes: caller-owned workspace that state and
// apply_backward need (per-chunk fp32/fp64 partials); apply and state_backward need none.
// The others return nullptr on success or a static error message.
struct LinearAttentionKernels {
  size_t (*workspace_bytes)(const LinearAttentionParams&);
  const char* (*state)(const LinearAttentionParams&);
  const char* (*apply)(const LinearAttentionParams&);
  const char* (*apply_backward)(const LinearAttentionParams&);
  const char* (*state_backward)(const LinearAttentionParams&);
};

MMFAST_DECLARE_ISA_KERNELS(LinearAttentionKernels, linear_attention_kernels)

// The kernels of the ISA this process runs (chosen once).
const LinearAttentionKernels& linear_attention_kernels();

}  // namespace cpu
}  // namespace mmfast
