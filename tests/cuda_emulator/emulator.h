// Host emulation of the CUDA execution model for a single 256-thread block (gridDim.x == 1):
// fibers (ucontext) switched at __syncthreads / shuffles, random thread order per phase.
#pragma once
#include <ucontext.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace emu {
struct Dim { unsigned x, y, z; };
inline Dim tid{0, 0, 0}, bid{0, 0, 0}, gdim{1, 1, 1}, bdim{256, 1, 1};
constexpr int kN = 256;
inline ucontext_t sched;
inline ucontext_t ctx[kN];
inline std::vector<char> stacks[kN];
inline bool done[kN];
inline long nbar[kN];
inline int cur = 0;
inline double shfl_buf[kN];
inline std::function<void()> body;
inline std::mt19937 rng(1234);
inline int failures = 0;
inline void yield() { ++nbar[cur]; swapcontext(&ctx[cur], &sched); }
inline void tramp() { body(); done[cur] = true; swapcontext(&ctx[cur], &sched); }
inline void run(std::function<void()> f) {
  body = std::move(f);
  for (int t = 0; t < kN; ++t) {
    stacks[t].resize(1 << 16);
    getcontext(&ctx[t]);
    ctx[t].uc_stack.ss_sp = stacks[t].data();
    ctx[t].uc_stack.ss_size = stacks[t].size();
    ctx[t].uc_link = nullptr;
    makecontext(&ctx[t], tramp, 0);
    done[t] = false;
    nbar[t] = 0;
  }
  std::vector<int> order(kN);
  for (int t = 0; t < kN; ++t) order[t] = t;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      if (done[t]) continue;
      cur = t;
      tid.x = t;
      swapcontext(&sched, &ctx[t]);
    }
    int ndone = 0;
    for (int t = 0; t < kN; ++t) ndone += done[t];
    if (ndone == kN) break;
    long b0 = -1;
    for (int t = 0; t < kN; ++t) {
      if (done[t]) { std::printf("EMU ERROR: thread %d exited while others wait at a barrier\n", t); std::exit(2); }
      if (b0 < 0) b0 = nbar[t];
      else if (nbar[t] != b0) { std::printf("EMU ERROR: barrier count mismatch\n"); std::exit(2); }
    }
  }
}
template <class V> V shfl_xor(V v, int mask) {
  shfl_buf[cur] = static_cast<double>(v);
  yield();
  V r = static_cast<V>(shfl_buf[cur ^ mask]);
  yield();
  return r;
}
inline int sms = 132;
inline unsigned emu_blocks = 3;
}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define gridDim (::emu::gdim)
#define blockDim (::emu::bdim)
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define __syncthreads() ::emu::yield()
#define __shfl_xor_sync(m, v, l) ::emu::shfl_xor(v, l)
#define EMU_LAUNCH(kernel, ...) \
  do { ::emu::gdim.x = ::emu::emu_blocks; \
       for (unsigned b_ = 0; b_ < ::emu::emu_blocks; ++b_) { ::emu::bid.x = b_; ::emu::run([&] { kernel(__VA_ARGS__); }); } } while (0)

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
extern "C" cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = ::emu::sms; return cudaSuccess; }
