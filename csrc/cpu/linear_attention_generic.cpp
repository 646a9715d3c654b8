// Linear-attention CPU kernels for any CPU (128-bit vectors: SSE2 on x86-64, NEON on arm64).
#include "mmfast/cpu/linear_attention.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/parallel.h"

#define MMFAST_CPU_ISA_NS isa_generic
#define MMFAST_VECTOR_BYTES 16
#include "mmfast/cpu/linear_attention_impl.h"
