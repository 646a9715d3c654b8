// CPU registration of the linear-attention ops: ISA dispatch and torch glue.
#include "mmfast/cpu/linear_attention.h"

#include <torch/library.h>

#include "glue/linear_attention_glue.h"

namespace mmfast {
namespace cpu {

struct CpuBackend {
  static size_t workspace_bytes(const LinearAttentionParams& p, LinearAttentionOp op) {
    const bool needs_partials = op == LinearAttentionOp::kState || op == LinearAttentionOp::kForward ||
                                op == LinearAttentionOp::kApplyBackward;
    return needs_partials ? linear_attention_kernels().workspace_bytes(p) : 0;
  }

  static void run(LinearAttentionParams& p, LinearAttentionOp op) {
    const LinearAttentionKernels& kernels = linear_attention_kernels();
    const char* error = nullptr;
    switch (op) {
      case LinearAttentionOp::kState: error = kernels.state(p); break;
      case LinearAttentionOp::kApply: error = kernels.apply(p); break;
      case LinearAttentionOp::kForward:
        error = kernels.state(p);
        if (error == nullptr) error = kernels.apply(p);
        break;
      case LinearAttentionOp::kApplyBackward: error = kernels.apply_backward(p); break;
      case LinearAttentionOp::kStateBackward: error = kernels.state_backward(p); break;
    }
    TORCH_CHECK(error == nullptr, "mmfast CPU kernel failed: ", error);
  }
};

}  // namespace cpu
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { MMFAST_REGISTER_LINEAR_ATTENTION(m, ::mmfast::cpu::CpuBackend); }
