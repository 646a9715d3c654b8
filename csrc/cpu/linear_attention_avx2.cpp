// Linear-attention CPU kernels for AVX2 + FMA (256-bit vectors). Selected at run time.
#include "mmfast/cpu/linear_attention.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/parallel.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma")
#define MMFAST_CPU_ISA_NS isa_avx2
#define MMFAST_VECTOR_BYTES 32
#include "mmfast/cpu/linear_attention_impl.h"
#else
namespace mmfast::cpu::isa_avx2 {
LinearAttentionKernels linear_attention_kernels() { return {}; }  // not built for this CPU family
}  // namespace mmfast::cpu::isa_avx2
#endif
