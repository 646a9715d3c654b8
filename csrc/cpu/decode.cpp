// CPU registration of the decode ops: ISA dispatch and torch glue. Lengths outside the cache
// raise ValueError here (the kernels check every row before writing anything).
#include "mmfast/cpu/decode.h"

#include <torch/library.h>

#include "glue/decode_glue.h"

namespace mmfast {
namespace cpu {

struct DecodeCpuBackend {
  static void append(const KVCacheAppendParams& p) {
    const int64_t bad = decode_kernels().append(p);
    if (bad >= 0) glue::raise_append_out_of_range(bad, p.cache_seqlens[bad], p.new_tokens, p.max_tokens);
  }

  static size_t attention_workspace_bytes(const DecodeAttentionParams&) { return 0; }

  static void attention(DecodeAttentionParams& p) {
    const int64_t bad = decode_kernels().attention(p);
    TORCH_CHECK_VALUE(bad < 0, "decode_attention: cache_seqlens[", bad, "] = ", bad < 0 ? 0 : p.cache_seqlens[bad],
                      " is out of range: it counts the cached tokens including the ", p.queries,
                      " new ones, so it must lie in [", p.queries, ", T_max = ", p.max_tokens, "]");
  }

  static size_t sample_workspace_bytes(const SampleParams&) { return 0; }

  static void sample(SampleParams& p) { decode_kernels().sample(p); }

  static at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in) {
    const at::Tensor x = (x_in.size(1) <= 1 || x_in.stride(1) == 1) ? x_in : x_in.contiguous();
    const at::Tensor weight = weight_in.contiguous();
    const at::Tensor bias = bias_in.defined() ? bias_in.contiguous() : bias_in;
    at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options());
    decode_kernels().linear(glue::linear_params(x, weight, bias, y));
    return y;
  }
};

}  // namespace cpu
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CPU, m) { MMFAST_REGISTER_DECODE(m, ::mmfast::cpu::DecodeCpuBackend); }
