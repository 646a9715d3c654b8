// Fresh output buffers the CPU kernels write whole (torch-free).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define MMFAST_HAS_MMAP 1
#endif

namespace mmfast {
namespace cpu {

// Raised for a kernel's per-call scratch (mmfast/cpu/simd.h's Scratch) that malloc could not
// give: a clear error in place of writes through a null pointer (torch shows it as a
// RuntimeError). Defined here, outside the per-ISA code, which uses no std templates.
[[noreturn]] inline void throw_scratch_allocation_failed(size_t elements, size_t element_bytes) {
  throw std::runtime_error("mmfast CPU kernel: out of memory: could not allocate scratch memory for " +
                           std::to_string(elements) + " elements of " + std::to_string(element_bytes) + " bytes" +
                           (elements > ~size_t(0) / element_bytes ? " (more bytes than size_t holds)" : ""));
}

constexpr size_t kHugePageBytes = size_t(2) << 20;
// Below this an output holds at most a few 2 MiB pages, and glibc usually serves it from
// memory the process already touched.
constexpr size_t kHugePageAdviceMinBytes = 4 * kHugePageBytes;

// Asks Linux to back the 2 MiB-aligned stretch inside [data, data + bytes) with transparent
// huge pages, before anything writes it (for outputs from torch's allocator: with the output
// pool on, glue/cpu_output_pool.cpp maps and advises its blocks through map_block). Why: glibc
// maps every block over 32 MiB anew, so an output of tens of MB takes a page fault per 4 KiB
// page on its first write (19 ms for the
// 47 MB of an SD-2.1 48x48 conv's batch on a 2-core VM, against 2.7 ms advised: measured with
// benchmarks/probes/fresh_output_pages.py). Does nothing (returns false) below
// kHugePageAdviceMinBytes, off Linux, or where the kernel refuses; with THP "never" the advice
// is accepted and has no effect. Data are unchanged either way.
// Limits: an output of 8-32 MiB often comes from glibc's heap (its mmap threshold rises after
// large frees), where the range may already be faulted in: the advice then speeds nothing now,
// and the flag stays on that heap range, so khugepaged may later collapse it (a little more
// resident memory). With THP defrag "madvise" (a common default) a fault in an advised range
// may compact memory synchronously: on a fragmented machine that can stall a call for longer
// than the faults it saves; MMFAST_CPU_HUGE_PAGES=0 (glue/common.h) turns the advice off.
inline bool advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kHugePageAdviceMinBytes) return false;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~(uintptr_t(kHugePageBytes) - 1);
  const uintptr_t last = (begin + bytes) & ~(uintptr_t(kHugePageBytes) - 1);
  if (last <= first) return false;
  return madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)data, (void)bytes;
  return false;
#endif
}

// A fresh, zero-filled block of `bytes` (a multiple of the page size); when `huge` (bytes then a
// multiple of kHugePageBytes) at a 2 MiB-aligned address and advised huge pages, the whole
// block (no unaligned ends). nullptr where the system refuses or has no mmap. Give it back with
// unmap_block. Used for the output blocks that glue/cpu_output_pool.cpp keeps for reuse.
inline void* map_block(size_t bytes, bool huge) {
#if defined(MMFAST_HAS_MMAP)
  if (!huge) {
    void* block = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return block == MAP_FAILED ? nullptr : block;
  }
  const size_t mapped = bytes + kHugePageBytes;  // room to slide to a 2 MiB boundary
  void* raw = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHugePageBytes - 1) & ~(uintptr_t(kHugePageBytes) - 1);
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t tail = begin + mapped - (aligned + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
#if defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(aligned);
#else
  (void)bytes, (void)huge;
  return nullptr;
#endif
}

inline void unmap_block(void* data, size_t bytes) {
#if defined(MMFAST_HAS_MMAP)
  munmap(data, bytes);
#else
  (void)data, (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace mmfast
