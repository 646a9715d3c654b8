// CPU registration of the linear-attention ops: ISA dispatch and torch glue.
#include "mmfast/cpu/linear_attention.h"

#include <torch/library.h>

#include "glue/linear_attention_glue.h"
#include "mmfast/cpu/isa.h"

namespace mmfast {
namespace cpu {

static const LinearAttentionKernels& kernels() {
  static const LinearAttentionKernels table = [] {
    switch (active_isa()) {
      case Isa::kAvx512: return isa_avx512::linear_attention_kernels();
      case Isa::kAvx2: return isa_avx2::linear_attention_kernels();
      case Isa::kGeneric: break;
    }
    return isa_generic::linear_attention_kernels();
  }();
  return table;
}

size_t linear_attention_workspace_bytes(const LinearAttentionParams& p) { return kernels().workspace_bytes(p); }
const char* linear_attention_state(const LinearAttentionParams& p) { return kernels().state(p); }
const char* linear_attention_apply(const LinearAttentionParams& p) { return kernels().apply(p); }
const char* linear_attention_apply_backward(const LinearAttentionParams& p) { return kernels().apply_backward(p); }
const char* linear_attention_state_backward(const LinearAttentionParams& p) { return kernels().state_backward(p); }

struct CpuBackend {
  static size_t workspace_bytes(const LinearAttentionParams& p, LinearAttentionOp op) {
    const bool needs_partials = op == LinearAttentionOp::kState || op == LinearAttentionOp::kForward ||
                                op == LinearAttentionOp::kApplyBackward;
    return needs_partials ? linear_attention_workspace_bytes(p) : 0;
  }

  static void run(LinearAttentionParams& p, LinearAttentionOp op) {
    const char* error = nullptr;
    switch (op) {
      case LinearAttentionOp::kState: error = linear_attention_state(p); break;
      case LinearAttentionOp::kApply: error = linear_attention_apply(p); break;
      case LinearAttentionOp::kForward:
        error = linear_attention_state(p);
        if (error == nullptr) error = linear_attention_apply(p);
        break;
      case LinearAttentionOp::kApplyBackward: error = linear_attention_apply_backward(p); break;
      case LinearAttentionOp::kStateBackward: error = linear_attention_state_backward(p); break;
    }
    TORCH_CHECK(error == nullptr, "mmfast CPU kernel failed: ", error);
  }
};

}  // namespace cpu
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { MMFAST_REGISTER_LINEAR_ATTENTION(m, ::mmfast::cpu::CpuBackend); }
