// Torch glue every op family shares: dtype mapping and the checks that name the op and what
// was expected (ValueError for shapes and values, TypeError for dtypes and devices).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define MMFAST_HAS_PTHREAD_ATFORK 1
#endif

#include "glue/cpu_output_pool.h"
#include "mmfast/common.h"
#include "mmfast/cpu/memory.h"

namespace mmfast {
namespace glue {

// A dtype as Python names it ("torch.int64"), so errors read like the Python-side checks'.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// The kernels' DType of a float tensor; TypeError naming `op` and `name` otherwise.
inline DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                       dtype_name(t.scalar_type()));
  }
}

// MMFAST_CPU_HUGE_PAGES: 1 (default) advises huge pages for large CPU outputs, 0 does not;
// read once (anything else: ValueError from each CPU op that reads it).
inline bool huge_page_outputs() {
  static const bool enabled = [] {
    const char* text = std::getenv("MMFAST_CPU_HUGE_PAGES");
    const std::string mode = text != nullptr && *text != '\0' ? text : "1";  // unset or empty: on
    TORCH_CHECK_VALUE(mode == "0" || mode == "1", "MMFAST_CPU_HUGE_PAGES must be 0 or 1, got '", mode, "'");
    return mode == "1";
  }();
  return enabled;
}

// The largest budget an environment variable or a control op sets: keeps the MiB -> byte
// shift in range.
constexpr int64_t kMaxBudgetMb = int64_t(1) << 30;

// The budget in MiB that environment variable `name` sets: a whole number >= 0 (unset or empty:
// `unset`), capped at kMaxBudgetMb; anything else is a ValueError naming the variable and what
// 0 means (raised by the first op that reads it).
// Holds the mutex that Mutex() returns across fork(): a fork while another thread holds it (a
// kept-weight pack, a pool update) would leave it held in the child forever, and the child's
// first call would deadlock. The forking thread takes it first; parent and child release it.
// Register once, from the owner's constructor.
template <std::mutex& (*Mutex)()>
inline void hold_across_fork() {
#if defined(MMFAST_HAS_PTHREAD_ATFORK)
  pthread_atfork([] { Mutex().lock(); }, [] { Mutex().unlock(); }, [] { Mutex().unlock(); });
#endif
}

inline int64_t budget_mb_from_env(const char* name, int64_t unset, const char* zero_means) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return unset;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(text, &end, 10);
  // digits only: strtoll would also take a sign or leading spaces ("+5", " 7")
  TORCH_CHECK_VALUE(errno == 0 && *end == '\0' && mb >= 0 && *text >= '0' && *text <= '9', name, " must be a whole number of MiB >= 0 (0: ",
                    zero_means, "), got '", text, "'");
  return std::min<int64_t>(mb, kMaxBudgetMb);
}

// at::empty for an output the op writes whole. On the CPU a large one comes from the pool of
// reused blocks (glue/cpu_output_pool.h), or, with the pool off, is advised huge pages before
// its first write (mmfast/cpu/memory.h: a fresh 47 MB output otherwise costs ~19 ms of page
// faults on the 2-core VMs).
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (options.device().is_cpu()) {
    at::Tensor pooled = pooled_cpu_empty(shape, c10::typeMetaToScalarType(options.dtype()));
    if (pooled.defined()) return pooled;
  }
  at::Tensor out = at::empty(shape, options);
  if (out.is_cpu() && huge_page_outputs()) mmfast::cpu::advise_huge_pages(out.data_ptr(), out.nbytes());
  return out;
}

// fp64 accumulation for fp64 inputs, fp32 otherwise.
inline at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_dtype_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn,
                                    const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": all inputs must have the same dtype, got ", an, ": ",
                   dtype_name(a.scalar_type()), ", ", bn, ": ", dtype_name(b.scalar_type()));
  TORCH_CHECK_TYPE(a.device() == b.device(), op, ": all inputs must have the same device, got ", an, ": ", a.device(),
                   ", ", bn, ": ", b.device());
}

// Kernels read (B, N, H, D) with any strides except along D, which must be 1.
// Only a tensor whose last dim is strided is copied.
inline at::Tensor unit_stride_last(const at::Tensor& t) {
  return (t.size(3) == 1 || t.stride(3) == 1) ? t : t.contiguous();
}

inline TokenTensor token_view(const at::Tensor& t) {
  TokenTensor view;
  view.data = const_cast<void*>(t.data_ptr());
  view.stride_b = t.stride(0);
  view.stride_n = t.stride(1);
  view.stride_h = t.stride(2);
  return view;
}

}  // namespace glue
}  // namespace mmfast
