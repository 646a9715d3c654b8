// The one schema block of the mmfast op library, and the Python module stub.
//
// Kernels are registered per backend in csrc/cpu/<family>.cpp and csrc/cuda/<family>.cu
// (TORCH_LIBRARY_IMPL); fake kernels and autograd formulas live in Python, one file per
// family (python/mmfast/ops/<family>.py). A new family adds its schemas here, one block.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "glue/cpu_output_pool.h"
#include "glue/pruned_glue.h"
#include "mmfast/cpu/isa.h"

extern "C" {
// Importing mmfast._C runs the static registrations below. The module itself is
// empty: ops are reached through torch.ops.mmfast.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
std::string cpu_isa() { return mmfast::cpu::active_isa_name(); }
bool cpu_amx_bf16() { return mmfast::cpu::amx_bf16_active(); }
bool cpu_avx512_bf16() { return mmfast::cpu::avx512_bf16_active(); }
}  // namespace

TORCH_LIBRARY(mmfast, m) {
  // Non-causal normalized linear attention (LinFusion). Token tensors are (B, N, H, D);
  // state is (B, H, Dk, Dv) and mean (B, H, Dk), fp32 (fp64 for fp64 inputs).
  m.def("linear_attention(Tensor q, Tensor k, Tensor v, float eps, str feature_map) -> Tensor");
  m.def("linear_attention_state(Tensor k, Tensor v, str feature_map) -> (Tensor, Tensor)");
  m.def("linear_attention_apply(Tensor q, Tensor state, Tensor mean, float eps, str feature_map) -> Tensor");
  m.def(
      "linear_attention_apply_backward(Tensor grad_out, Tensor q, Tensor state, Tensor mean, float eps, "
      "str feature_map) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_attention_state_backward(Tensor grad_state, Tensor grad_mean, Tensor k, Tensor v, "
      "str feature_map) -> (Tensor, Tensor)");

  // VQ codebook search and lookup. z (N, D), codebook (K, D), codebook_sqnorm (K,) in the
  // accumulation dtype or None -> distance (N,) in the accumulation dtype, indices int64 (N,)
  // (the float output first: torch.library's autograd tests sum the outputs in order).
  m.def("vq_quantize(Tensor z, Tensor codebook, Tensor? codebook_sqnorm) -> (Tensor, Tensor)");
  m.def("vq_dequantize(Tensor indices, Tensor codebook, bool channels_first) -> Tensor");

  // KV-cached decoding (rules in mmfast/decode.h). Caches (B, T_max, H_kv, D), cache_seqlens
  // (B,) int32; sample returns (tokens int64, status int32) of the P sampled rows.
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor cache_seqlens) -> ()");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, float scale, float softcap, "
      "int window) -> Tensor");
  m.def(
      "sample(Tensor logits, Tensor uniform, float temperature, int top_k, float top_p, float? cfg_scale) -> "
      "(Tensor, Tensor)");
  // F.linear for the few rows of a decode step: x (M, K), weight (N, K), bias (N,)? -> (M, N).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");

  // Masked-channel (pruned-expert) ops of APTP's mixed-code batches (rules in mmfast/pruned.h).
  // Per-code stacked weight (K|1, Cout, Cin[, kh, kw]) and bias (K|1, Cout); sample_codes (B,)
  // int64 / int32; masks (K, C) bool. Outputs are contiguous.
  m.def(
      "masked_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor sample_codes, Tensor in_mask, Tensor out_mask, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "masked_linear(Tensor x, Tensor weight, Tensor? bias, Tensor sample_codes, Tensor in_mask, Tensor out_mask) "
      "-> Tensor");
  m.def(
      "masked_group_norm(Tensor x, Tensor? weight, Tensor? bias, int num_groups, Tensor sample_codes, "
      "Tensor channel_mask, float eps, bool silu) -> Tensor");
  // The CPU masked ops' kept packed per-code weights: (entries, bytes, budget MiB) before the
  // budget is set (budget_mb >= 0; 0 = off) and the cache emptied (clear).
  m.def("pruned_weight_cache(int budget_mb, bool clear) -> int[]", &mmfast::glue::pruned_weight_cache);

  // The pool of reused blocks for large CPU outputs (glue/cpu_output_pool.h): (idle blocks, idle
  // bytes, bytes in live outputs, budget MiB) before the budget is set (budget_mb >= 0; 0 = off)
  // and the idle blocks released (clear).
  m.def("cpu_output_pool(int budget_mb, bool clear) -> int[]", &mmfast::glue::cpu_output_pool);

  // Which vectorised CPU kernel set runs on this machine (runtime dispatch).
  m.def("cpu_isa() -> str", &cpu_isa);
  // Whether the bf16 kernels that have an AMX version use it (MMFAST_CPU_AMX; mmfast/cpu/isa.h).
  m.def("cpu_amx_bf16() -> bool", &cpu_amx_bf16);
  // Whether the bf16 kernels that have an AVX512-BF16 version use it (MMFAST_CPU_AVX512_BF16).
  m.def("cpu_avx512_bf16() -> bool", &cpu_avx512_bf16);
}
