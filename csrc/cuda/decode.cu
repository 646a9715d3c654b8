// CUDA registration of the decode ops: the torch glue around the torch-free kernels in
// mmfast/cuda/decode.cuh (checks, allocation and the device guard in glue/decode_glue.h);
// decode_linear is cuBLAS through at::linear.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "glue/cuda_launch.h"
#include "glue/decode_glue.h"
#include "mmfast/cuda/decode.cuh"

namespace {

using mmfast::glue::check_launch;

struct DecodeCudaBackend {
  static void append(const mmfast::KVCacheAppendParams& p) {
    check_launch(mmfast::cuda::kv_cache_append(p, at::cuda::getCurrentCUDAStream()), "kv_cache_append",
                 "kernel launch");
  }
  static size_t attention_workspace_bytes(const mmfast::DecodeAttentionParams& p) {
    return mmfast::cuda::decode_attention_workspace_bytes(p);
  }
  static void attention(mmfast::DecodeAttentionParams& p) {
    TORCH_CHECK_VALUE(p.head_dim <= mmfast::cuda::decodek::kMaxHeadDim,
                      "decode_attention (CUDA): head dims up to ", mmfast::cuda::decodek::kMaxHeadDim,
                      " are supported, got D = ", p.head_dim);
    check_launch(mmfast::cuda::decode_attention(p, at::cuda::getCurrentCUDAStream()), "decode_attention",
                 "kernel launch");
  }
  static size_t sample_workspace_bytes(const mmfast::SampleParams& p) {
    return mmfast::cuda::sample_workspace_bytes(p);
  }
  static void sample(mmfast::SampleParams& p) {
    check_launch(mmfast::cuda::sample(p, at::cuda::getCurrentCUDAStream()), "sample",
                 "kernel launch (a thread-block cluster per row on sm_90+ where it fits; "
                 "MMFAST_CUDA_SAMPLE_CLUSTERS=0 launches one block per row)");
  }
  // cuBLAS already streams the weights near the bandwidth limit for a few rows (its GEMV /
  // small-M GEMM kernels), so the CUDA decode_linear is at::linear by design, not a fallback.
  static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
    return at::linear(x, weight, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) { MMFAST_REGISTER_DECODE(m, DecodeCudaBackend); }
