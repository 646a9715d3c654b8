// bf16 vq_quantize with AVX512-BF16's VDPBF16PS (torch-free): the fused GEMM + lazy argmax of
// mmfast/cpu/vq_impl.h with two bf16 dims per packed 32-bit element, so one VDPBF16PS forms the
// products of two dims for 16 codes (exact bf16 products, fp32 sums) where the AVX-512 kernel
// converts bf16 to fp32 on load and needs two FMAs. The search, argmax, code-range split and
// combine are vq_impl.h's (compiled here once more, namespace isa_avx512bf16), so ties keep the
// lowest index and the result does not depend on the thread count. Like every VDPBF16PS, inputs
// and sums below FLT_MIN are flushed to zero (bf16 subnormals count as 0).
//
// Where it pays: AMD Zen 4 retires VDPBF16PS at about the FMA instruction rate (the probe
// benchmarks/probes/bf16_vq_ceiling.c: 1.85x the products per ns of fp32 FMAs on one core),
// Sapphire Rapids at a quarter of it (0.5x), so avx512_bf16_active() (mmfast/cpu/isa.h)
// turns it on by default on AMD CPUs only; Intel's bf16 goes to the AMX tiles instead.
//
// Layout: panels of 32 codes as [panel][dim pair][32 codes] of (dim 2e | dim 2e + 1 << 16); a
// row of z as its dim pairs; an odd D pads with a zero dim.
#include "mmfast/cpu/vq.h"

#if MMFAST_CPU_AVX512BF16_COMPILED

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "mmfast/common.h"
#include "mmfast/cpu/memory.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/parallel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,avx512bf16")
#define MMFAST_CPU_ISA_NS isa_avx512bf16
#define MMFAST_VECTOR_BYTES 64
#include "mmfast/cpu/simd.h"
#include "mmfast/cpu/vq_impl.h"

namespace mmfast {
namespace cpu {
namespace isa_avx512bf16 {
namespace vq_bf16 {

// z . e by VDPBF16PS over dim pairs: a lane's dot of (z[2e], z[2e + 1]) with its code's pair.
struct Bf16PairDot {
  using acc_t = float;
  using elem_t = uint32_t;  // bf16 bits of dim 2e (low half) and dim 2e + 1 (high half)
  static constexpr int64_t kDimsPerElem = 2;

  static elem_t element(const BFloat16* row, int64_t e, int64_t dim) {
    const uint32_t low = 2 * e < dim ? row[2 * e].bits : 0, high = 2 * e + 1 < dim ? row[2 * e + 1].bits : 0;
    return low | high << 16;
  }

  // acc[r][v] += pair e of row r of z . pair e of each code v 16 .. of the panel at `codes`.
  template <int64_t MR>
  __attribute__((always_inline)) static void step(const elem_t* zrows, const elem_t* codes, int64_t steps, int64_t e,
                                                  Vec<float>::type (&acc)[MR][2]) {
    constexpr int64_t W = Vec<float>::width;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(codes + e * 2 * W);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(codes + e * 2 * W + W);
    for (int64_t r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(zrows[r * steps + e]));
      acc[r][0] = (Vec<float>::type)_mm512_dpbf16_ps((__m512)acc[r][0], a, b0);
      acc[r][1] = (Vec<float>::type)_mm512_dpbf16_ps((__m512)acc[r][1], a, b1);
    }
  }
};

size_t quantize_workspace_bytes(const VQParams& p) {
  return p.dtype == DType::kBFloat16 ? vq::plan_for<Bf16PairDot>(p).bytes : vq::quantize_workspace_bytes(p);
}

const char* quantize(const VQParams& p) {
  if (p.dtype != DType::kBFloat16) return vq::quantize(p);
  if (p.rows == 0) return nullptr;
  return vq::quantize_typed<BFloat16, Bf16PairDot>(p);
}

}  // namespace vq_bf16

VQKernels vq_avx512bf16_kernels() {
  return {&vq_bf16::quantize_workspace_bytes, &vq_bf16::quantize, &vq::dequantize};
}

}  // namespace isa_avx512bf16
}  // namespace cpu
}  // namespace mmfast

#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#pragma GCC pop_options

#else  // no AVX512-BF16 kernels in this build: avx512_bf16_active() is false, this table unused

namespace mmfast {
namespace cpu {
namespace isa_avx512bf16 {
VQKernels vq_avx512bf16_kernels() { return isa_generic::vq_kernels(); }
}  // namespace isa_avx512bf16
}  // namespace cpu
}  // namespace mmfast

#endif
