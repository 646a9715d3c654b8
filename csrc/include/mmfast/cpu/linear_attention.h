// CPU kernels of the linear attention (torch-free). See mmfast/linear_attention.h.
#pragma once

#include <cstddef>

#include "mmfast/linear_attention.h"

namespace mmfast {
namespace cpu {

// Bytes of caller-owned workspace that state and apply_backward need (per-chunk
// fp32/fp64 partials); apply and state_backward need none.
size_t linear_attention_workspace_bytes(const LinearAttentionParams& p);

// Each returns nullptr on success or a static error message.
const char* linear_attention_state(const LinearAttentionParams& p);
const char* linear_attention_apply(const LinearAttentionParams& p);
const char* linear_attention_apply_backward(const LinearAttentionParams& p);
const char* linear_attention_state_backward(const LinearAttentionParams& p);

// One ISA's implementation of the four entry points.
struct LinearAttentionKernels {
  size_t (*workspace_bytes)(const LinearAttentionParams&);
  const char* (*state)(const LinearAttentionParams&);
  const char* (*apply)(const LinearAttentionParams&);
  const char* (*apply_backward)(const LinearAttentionParams&);
  const char* (*state_backward)(const LinearAttentionParams&);
};

namespace isa_generic { LinearAttentionKernels linear_attention_kernels(); }
namespace isa_avx2 { LinearAttentionKernels linear_attention_kernels(); }
namespace isa_avx512 { LinearAttentionKernels linear_attention_kernels(); }

}  // namespace cpu
}  // namespace mmfast
