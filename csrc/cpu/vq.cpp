// CPU registration of the VQ ops: ISA dispatch and torch glue.
#include "mmfast/cpu/vq.h"

#include <torch/library.h>

#include "glue/vq_glue.h"

namespace mmfast {
namespace cpu {

struct VQCpuBackend {
  static size_t quantize_workspace_bytes(const VQParams& p) { return vq_kernels().quantize_workspace_bytes(p); }

  static void quantize(VQParams& p) {
    const char* error = vq_kernels().quantize(p);
    TORCH_CHECK(error == nullptr, "mmfast CPU kernel failed: ", error);
  }

  static void dequantize(VQLookupParams& p) {
    const int64_t bad = vq_kernels().dequantize(p);
    if (bad >= 0) {
      const int64_t index = p.index_bytes == 8 ? static_cast<const int64_t*>(p.indices)[bad]
                                               : static_cast<const int32_t*>(p.indices)[bad];
      TORCH_CHECK_INDEX(false, "vq_dequantize: index ", index, " is out of range for a codebook of ", p.codes,
                        " codes (at position ", bad, " of the indices)");
    }
  }
};

}  // namespace cpu
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { MMFAST_REGISTER_VQ(m, ::mmfast::cpu::VQCpuBackend); }
