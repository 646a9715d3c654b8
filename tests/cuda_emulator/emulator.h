// Host emulation of the CUDA execution model, one 256-thread block at a time (or the blocks of
// one thread-block cluster together, up to kMaxClusterBlocks = 16): fibers
// switched at __syncthreads (the block) and ldmatrix / mma.sync / votes / matches / shuffles /
// __syncwarp (the warp), random thread order per phase (MMFAST_EMULATOR_SEED), and in half
// of the intervals between barriers one warp held back to run after the others. Include it
// before any mmfast/cuda header: it defines the CUDA built-ins and MMFAST_LAUNCH, which runs
// `emu_blocks` blocks of every launch one after another (kernels use grid-stride loops, so
// any grid covers the problem; inter-block concurrency is what it cannot check).
// Clusters (MMFAST_LAUNCH_CLUSTERS): each block waits at its own __syncthreads; cluster_barrier
// waits for every thread of the cluster; ready blocks are released in random subsets, so blocks
// drift whole barrier intervals apart; cluster_peer maps an address of the block's dynamic
// shared memory to the same offset in another block's (static __shared__ variables are one copy
// for all blocks here, so cluster kernels keep everything in dynamic shared memory); a block's
// dynamic shared memory is poisoned as soon as it exits, so a peer that still reads it sees garbage.
// WMMA (tf32 m16n16k8) is emulated with every thread holding the whole fragment, which is
// enough for code that only loads, multiplies, stores and maps fragments elementwise; the
// documented pointer-alignment and ldm rules are checked on every load and store.
// ldmatrix (.x4, .x4.trans, .x2.trans) and mma.sync.m16n8k16 (fp16 / bf16) are emulated lane by lane with the
// PTX ISA's fragment layouts, exchanging operands within the warp; the mma's fp32 result is rounded
// to nearest, or toward zero with emu::mma_round_toward_zero (truncating tensor cores).
#pragma once
#define MMFAST_CUDA_EMULATED 1
#include <ucontext.h>
#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#include <xmmintrin.h>
#endif
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <vector>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Fibers switch through emu_switch_stacks on x86-64 Linux: it saves the callee-saved registers
// and the FP control words, then swaps stack pointers. glibc's swapcontext also makes a
// sigprocmask system call on every switch, which took over half of the emulated tests' time.
// swapcontext remains where a shadow stack is active (its returns would not match it), on other
// targets, and under MMFAST_EMULATOR_UCONTEXT=1 (ctest runs one test so).
#if defined(__x86_64__) && defined(__LP64__) && defined(__linux__) && defined(__GNUC__)
#define MMFAST_EMU_STACK_SWITCH 1
// Naked: the body is the whole function (no prologue), and each translation unit has its own.
__attribute__((naked, noinline)) static void emu_switch_stacks(void** /*save_sp*/, void* /*next_sp*/) {
  asm volatile(
      "pushq %rbp\n"
      "pushq %rbx\n"
      "pushq %r12\n"
      "pushq %r13\n"
      "pushq %r14\n"
      "pushq %r15\n"
      "subq $16, %rsp\n"
      "stmxcsr 8(%rsp)\n"
      "fnstcw 12(%rsp)\n"
      "movq %rsp, (%rdi)\n"
      "movq %rsi, %rsp\n"
      "ldmxcsr 8(%rsp)\n"
      "fldcw 12(%rsp)\n"
      "addq $16, %rsp\n"
      "popq %r15\n"
      "popq %r14\n"
      "popq %r13\n"
      "popq %r12\n"
      "popq %rbx\n"
      "popq %rbp\n"
      "ret\n");
}
#endif

namespace emu {
struct Dim { unsigned x, y, z; };
inline Dim tid{0, 0, 0}, bid{0, 0, 0}, gdim{1, 1, 1}, bdim{256, 1, 1};
constexpr int kN = 256;                // threads of a block
constexpr int kMaxClusterBlocks = 16;   // blocks of a cluster run together (sm_90: up to 16)
constexpr int kMaxThreads = kN * kMaxClusterBlocks;
inline int nblocks = 1;                 // blocks running together (a cluster's, else 1)
inline int nthreads = kN;               // kN * nblocks
inline unsigned first_block = 0;        // blockIdx.x of the running cluster's rank 0
inline ucontext_t sched;
inline ucontext_t ctx[kMaxThreads];
inline void* sched_sp = nullptr;  // stack pointers saved by emu_switch_stacks
inline void* fiber_sp[kMaxThreads];
inline std::vector<char> stacks[kMaxThreads];
inline bool done[kMaxThreads];
inline long nbar[kMaxThreads];      // block barriers passed
inline long nwarp[kMaxThreads];     // warp collectives (ldmatrix, mma.sync) passed
inline long ncluster[kMaxThreads];  // cluster barriers passed
inline bool at_warp[kMaxThreads];   // waiting at a warp collective
inline bool at_cluster[kMaxThreads];  // waiting at a cluster barrier (neither: at a block barrier)
inline int cur = 0;  // the running thread: its block's rank * kN + threadIdx.x
inline std::function<void()> body;
// The schedule's seed (the order of threads in each phase, the held-back warp, when copies land):
// MMFAST_EMULATOR_SEED explores other interleavings (CI runs the default and one other).
inline std::mt19937 rng(std::getenv("MMFAST_EMULATOR_SEED") ? std::strtoul(std::getenv("MMFAST_EMULATOR_SEED"),
                                                                               nullptr, 10)
                                                             : 1234u);
inline int failures = 0;
#if defined(MMFAST_EMU_STACK_SWITCH)
inline bool shadow_stack_active() {
  unsigned long features = 0;  // ARCH_SHSTK_STATUS; older kernels refuse it and have none
  return syscall(SYS_arch_prctl, 0x5005, &features) == 0 && (features & 1) != 0;
}
inline bool use_stack_switch() {
  static const bool yes = [] {
    const char* forced = std::getenv("MMFAST_EMULATOR_UCONTEXT");
    return !shadow_stack_active() && !(forced && *forced && std::strcmp(forced, "0") != 0);
  }();
  return yes;
}
inline void raw_switch_to_scheduler() {
  if (use_stack_switch()) emu_switch_stacks(&fiber_sp[cur], sched_sp);
  else swapcontext(&ctx[cur], &sched);
}
inline void raw_switch_to_fiber(int t) {
  if (use_stack_switch()) emu_switch_stacks(&sched_sp, fiber_sp[t]);
  else swapcontext(&sched, &ctx[t]);
}
#else
inline bool use_stack_switch() { return false; }
inline void raw_switch_to_scheduler() { swapcontext(&ctx[cur], &sched); }
inline void raw_switch_to_fiber(int t) { swapcontext(&sched, &ctx[t]); }
#endif
// AddressSanitizer is told about every switch between the scheduler's stack and a fiber's
// (`make sanitize` builds the emulator with it), so it tracks the right stack. A fiber learns
// the scheduler's stack when it starts (the scheduler's own resumptions come from fibers' stacks).
#if defined(__SANITIZE_ADDRESS__)
inline const void* sched_stack = nullptr;
inline size_t sched_stack_size = 0;
inline void switch_to_scheduler(bool finished) {
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, sched_stack, sched_stack_size);
  raw_switch_to_scheduler();
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
}
inline void switch_to_fiber(int t) {
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, stacks[t].data(), stacks[t].size());
  raw_switch_to_fiber(t);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
}
inline void fiber_started() { __sanitizer_finish_switch_fiber(nullptr, &sched_stack, &sched_stack_size); }
#else
inline void switch_to_scheduler(bool) { raw_switch_to_scheduler(); }
inline void switch_to_fiber(int t) { raw_switch_to_fiber(t); }
inline void fiber_started() {}
#endif
inline void yield() { ++nbar[cur]; switch_to_scheduler(false); }
// A warp collective's phase switch: only the thread's warp must reach it (code may skip
// collectives in a warp-uniform branch, as the hardware allows); the block's other warps go on
// to their next barrier or collective.
inline void warp_yield() {
  ++nwarp[cur];
  at_warp[cur] = true;
  switch_to_scheduler(false);
  at_warp[cur] = false;
}
// cp.async: a copy lands at random either as it is issued or only at the cp_async_wait that
// retires its group (the two ends of what the hardware may do), so both a read before the
// wait (or before the barrier that follows every thread's wait) and an overwrite of a stage
// other threads still read show up as wrong results.
// Per thread: its barrier count (nbar) when it first retired cp.async copies (cp_async_wait) that
// no fence.proxy.async has followed since, else -1. A wgmma issued after a barrier that such a
// thread reached later need not see those copies (the writer fences, then the barrier publishes).
inline long unfenced_at[kMaxThreads];
// wgmmas each thread issued: equal within a warpgroup (wgmma is warpgroup-uniform).
inline long wgmma_issued[kMaxThreads];
inline uint64_t wgmma_scale_d[kMaxThreads];  // a signature of the scale-d flags issued in order
struct AsyncCopy { void* dst; const void* src; bool valid; };
inline std::vector<AsyncCopy> async_open[kMaxThreads];                 // issued, not yet committed
inline std::vector<std::vector<AsyncCopy>> async_groups[kMaxThreads];  // committed, oldest first
inline void async_check_drained() {
  bool pending = !async_open[cur].empty();
  for (const auto& g : async_groups[cur]) pending = pending || !g.empty();
  if (pending) { std::printf("EMU ERROR: thread %d exited with cp.async copies never waited for\n", cur); std::exit(2); }
  async_groups[cur].clear();
}
// The warp's mma.sync result, computed once per phase by the first lane that gets there.
inline long mma_phase[kMaxThreads / 32];
inline float mma_out[kMaxThreads / 32][32][4];
// Blocks run so far: with a thread's barrier count, names the phase it is in (WMMA mma_sync).
inline long blocks_run = 0;
inline void wgmma_check_drained();
inline void tramp() {
  fiber_started();
  body();
  async_check_drained();
  wgmma_check_drained();
  done[cur] = true;
  switch_to_scheduler(true);
}
#if defined(MMFAST_EMU_STACK_SWITCH)
// The frame emu_switch_stacks pops for a fiber's first entry: FP control words, six zeroed
// registers, tramp as the return address and a null one above it (tramp never returns), so
// tramp starts with the stack aligned as after a call.
inline void* first_entry_frame(std::vector<char>& stack) {
#if defined(__SANITIZE_ADDRESS__)
  // The previous fiber on this stack never returned: its frames' redzones are still poisoned.
  ASAN_UNPOISON_MEMORY_REGION(stack.data(), stack.size());
#endif
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top) - 10;
  std::memset(frame, 0, 10 * sizeof(uint64_t));
  uint32_t mxcsr = _mm_getcsr();
  uint16_t fpu_control = 0;
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  std::memcpy(reinterpret_cast<char*>(frame) + 8, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(frame) + 12, &fpu_control, 2);
  frame[8] = reinterpret_cast<uint64_t>(&tramp);
  return frame;
}
#endif
inline void prepare_fiber(int t) {
  stacks[t].resize(1 << 16);
#if defined(MMFAST_EMU_STACK_SWITCH)
  if (use_stack_switch()) {
    fiber_sp[t] = first_entry_frame(stacks[t]);
    return;
  }
#endif
  getcontext(&ctx[t]);
  ctx[t].uc_stack.ss_sp = stacks[t].data();
  ctx[t].uc_stack.ss_size = stacks[t].size();
  ctx[t].uc_link = nullptr;
  makecontext(&ctx[t], tramp, 0);
}
// A thread waiting at a warp collective resumes when all 32 lanes of its warp wait at their
// same collective; one waiting at a block barrier when every thread of its block waits at that
// barrier; one waiting at a cluster barrier when every thread of the cluster waits there. Each
// round snapshots who may resume, then runs them in random order to their next wait.
inline bool warp_released(int w) {
  const int w0 = 32 * w;
  for (int l = w0; l < w0 + 32; ++l) {
    if (done[l] || !at_warp[l]) return false;
    if (nwarp[l] != nwarp[w0]) { std::printf("EMU ERROR: warp collective count mismatch in warp %d\n", w); std::exit(2); }
  }
  return true;
}
inline bool block_finished(int b) {
  for (int t = b * kN; t < (b + 1) * kN; ++t)
    if (!done[t]) return false;
  return true;
}
inline bool block_released(int b) {
  if (block_finished(b)) return false;
  long b0 = -1;
  for (int t = b * kN; t < (b + 1) * kN; ++t) {
    if ((at_warp[t] || at_cluster[t]) && !done[t]) return false;
    if (b0 < 0 && !done[t]) b0 = nbar[t];
  }
  for (int t = b * kN; t < (b + 1) * kN; ++t) {
    if (done[t]) { std::printf("EMU ERROR: thread %d exited while others wait at a barrier\n", t); std::exit(2); }
    if (nbar[t] != b0) { std::printf("EMU ERROR: barrier count mismatch\n"); std::exit(2); }
  }
  return true;
}
inline bool cluster_released() {
  if (nblocks == 1) return false;
  for (int t = 0; t < nthreads; ++t)
    if (!done[t] && !at_cluster[t]) return false;
  for (int t = 0; t < nthreads; ++t) {
    if (done[t]) {
      std::printf("EMU ERROR: thread %d of block %d exited while others wait at a cluster barrier\n", t % kN, t / kN);
      std::exit(2);
    }
    if (ncluster[t] != ncluster[0]) { std::printf("EMU ERROR: cluster barrier count mismatch\n"); std::exit(2); }
  }
  return true;
}
// Each round resumes the threads released (past a barrier, or all 32 lanes of a warp at their
// collective) in random order, except a held-back warp per block: in half of the intervals
// between barriers one random warp of the block resumes only when no other of its block can, so
// it runs all of that interval after the others, as a warp the hardware schedules late would.
// Resuming every released thread every round kept the warps in step: a missing barrier whose two
// sides lie collectives apart (a warp reading what another writes before its first collective)
// went unseen. Of the blocks of a cluster ready at their barriers, a random nonempty subset
// resumes, so a block may run barrier intervals ahead of its peers; and in half of the intervals
// between cluster barriers one random warp of the cluster resumes only when no other thread of
// the cluster can, so the other blocks run up to the next cluster barrier while it lags (a block
// that rewrites what a late peer has still to read shows).
inline bool released[kMaxThreads];  // may resume (past its wait, or not started) and not yet resumed
inline int held_back[kMaxClusterBlocks];  // per block: the interval's held-back warp, or -1
inline int late_warp = -1;  // in a cluster: the cluster interval's late warp, or -1
inline void choose_late_warp() {
  late_warp = nblocks > 1 && (rng() & 1) != 0 ? static_cast<int>(rng() % (nthreads / 32)) : -1;
}
inline void hold_back_a_warp(int b) {
  held_back[b] = (rng() & 1) != 0 ? b * (kN / 32) + static_cast<int>(rng() % (kN / 32)) : -1;
}
inline bool block_pending(int b) {
  for (int t = b * kN; t < (b + 1) * kN; ++t)
    if (released[t] && !done[t]) return true;
  return false;
}
inline void release_block(int b) {
  for (int t = b * kN; t < (b + 1) * kN; ++t) released[t] = !done[t];
  hold_back_a_warp(b);
}
inline void release_waiting() {
  bool pending = false;
  for (int b = 0; b < nblocks; ++b) pending = pending || block_pending(b);
  if (!pending && cluster_released()) {  // a barrier counts only once every thread waits at it
    for (int b = 0; b < nblocks; ++b) release_block(b);
    choose_late_warp();
    return;
  }
  int ready[kMaxClusterBlocks], nready = 0;
  for (int b = 0; b < nblocks; ++b)
    if (!block_pending(b) && block_released(b)) ready[nready++] = b;
  if (nready > 0) {
    const int always = static_cast<int>(rng() % nready);
    for (int i = 0; i < nready; ++i)
      if (i == always || (rng() & 1) != 0) release_block(ready[i]);
    return;
  }
  for (int w = 0; w < nthreads / 32; ++w) {
    bool lanes_pending = false;
    for (int l = 32 * w; l < 32 * w + 32; ++l) lanes_pending = lanes_pending || released[l];
    if (!lanes_pending && warp_released(w))
      for (int l = 32 * w; l < 32 * w + 32; ++l) released[l] = true;
  }
}
inline void poison_dynamic_smem(int b);
// Runs f as `blocks` blocks of kN threads together (a cluster; 1: one block).
inline void run(std::function<void()> f, int blocks = 1) {
  if (blocks < 1 || blocks > kMaxClusterBlocks) {
    std::printf("EMU ERROR: %d blocks run together (the emulator runs 1 to %d)\n", blocks, kMaxClusterBlocks);
    std::exit(2);
  }
  body = std::move(f);
  nblocks = blocks;
  nthreads = kN * blocks;
  for (int t = 0; t < nthreads; ++t) {
    prepare_fiber(t);
    done[t] = false;
    at_warp[t] = false;
    at_cluster[t] = false;
    unfenced_at[t] = -1;
    wgmma_issued[t] = 0;
    wgmma_scale_d[t] = 0;
    released[t] = true;
    nbar[t] = 0;
    nwarp[t] = 0;
    ncluster[t] = 0;
  }
  for (long& phase : mma_phase) phase = -1;
  for (int b = 0; b < nblocks; ++b) hold_back_a_warp(b);
  choose_late_warp();
  ++blocks_run;
  bool finished[kMaxClusterBlocks] = {};
  std::vector<int> order;
  order.reserve(nthreads);
  for (bool first = true;; first = false) {
    int ndone = 0;
    for (int t = 0; t < nthreads; ++t) ndone += done[t];
    if (ndone == nthreads) break;
    for (int b = 0; b < nblocks && nblocks > 1; ++b)
      if (!finished[b] && block_finished(b)) finished[b] = true, poison_dynamic_smem(b);
    if (!first) release_waiting();
    bool chosen[kMaxThreads / 32] = {};
    int nwarps = 0, block_warps[kMaxClusterBlocks] = {};
    for (int w = 0; w < nthreads / 32; ++w) {
      for (int l = 32 * w; l < 32 * w + 32; ++l) chosen[w] = chosen[w] || (released[l] && !done[l]);
      nwarps += chosen[w];
      block_warps[w / (kN / 32)] += chosen[w];
    }
    if (nwarps == 0) {
      for (int t = 0; t < nthreads; ++t)
        if (at_warp[t] && !done[t]) {
          std::printf("EMU ERROR: warp %d waits at a warp collective that some of its lanes never reach\n", t / 32);
          std::exit(2);
        }
      std::printf("EMU ERROR: barrier count mismatch\n");
      std::exit(2);
    }
    for (int b = 0; b < nblocks; ++b)
      if (held_back[b] >= 0 && chosen[held_back[b]] && block_warps[b] > 1) chosen[held_back[b]] = false, --nwarps;
    if (late_warp >= 0 && chosen[late_warp] && nwarps > 1) chosen[late_warp] = false;
    order.clear();
    for (int t = 0; t < nthreads; ++t)
      if (chosen[t / 32] && released[t] && !done[t]) order.push_back(t);
    std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      released[t] = false;
      cur = t;
      tid.x = t % kN;
      bid.x = first_block + t / kN;
      switch_to_fiber(t);
    }
  }
  for (int g = 0; g < nthreads / 128; ++g)
    for (int t = 128 * g + 1; t < 128 * g + 128; ++t)
      if (wgmma_issued[t] != wgmma_issued[128 * g]) {
        std::printf("EMU ERROR: threads %d and %d of a warpgroup issued %ld and %ld wgmmas (warpgroup-uniform)\n",
                    128 * g, t, wgmma_issued[128 * g], wgmma_issued[t]);
        std::exit(2);
      } else if (wgmma_scale_d[t] != wgmma_scale_d[128 * g]) {
        std::printf("EMU ERROR: threads %d and %d of a warpgroup issued wgmmas with different scale-d flags "
                    "(warpgroup-uniform)\n", 128 * g, t);
        std::exit(2);
      }
  nblocks = 1;
  nthreads = kN;
}
// A cluster barrier (barrier.cluster.arrive.release + wait.acquire): every thread of the cluster.
inline void cluster_wait() {
  ++ncluster[cur];
  at_cluster[cur] = true;
  switch_to_scheduler(false);
  at_cluster[cur] = false;
}
// Warp-collective operations (ldmatrix, mma.sync): every lane publishes its operands, the warp
// passes a phase switch (warp_yield), each lane reads its warp's, and a second switch keeps the
// next publication from overwriting them early (like shfl_xor). All 32 lanes of a warp must reach
// them; other warps need not (a warp-uniform branch may skip them).
inline unsigned char lane_raw[kMaxThreads][48];
template <class V> void publish(const V& v) {
  static_assert(sizeof(V) <= sizeof(lane_raw[0]), "published operands are at most 48 bytes");
  std::memcpy(lane_raw[cur], &v, sizeof(V));
  warp_yield();
}
template <class V> V lane_value(int lane) {
  V v;
  std::memcpy(&v, lane_raw[(cur & ~31) + lane], sizeof(V));
  return v;
}
// Warp votes, matches and indexed shuffles (the __*_sync intrinsics): warp collectives as above,
// with the full mask (every lane of the warp takes part, the only use mmfast makes of them).
inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) {
    std::printf("EMU ERROR: %s with mask %#x (the emulator takes the full warp only)\n", what, mask);
    std::exit(2);
  }
}
inline unsigned ballot(unsigned mask, bool p) {
  check_full_mask(mask, "__ballot_sync");
  publish(static_cast<int>(p));
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= lane_value<int>(l) ? 1u << l : 0u;
  warp_yield();
  return r;
}
inline unsigned match_any(unsigned mask, unsigned key) {
  check_full_mask(mask, "__match_any_sync");
  publish(key);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= lane_value<unsigned>(l) == key ? 1u << l : 0u;
  warp_yield();
  return r;
}
// __shfl_xor_sync: a warp collective like the others (it was a block barrier, which made other
// warps' shared-memory writes visible and so hid a missing __syncthreads), exact for any type of
// up to 16 bytes, with the full mask and a lane mask inside the warp.
inline unsigned char shfl_raw[kMaxThreads][16];
template <class V> V shfl_xor(unsigned member_mask, V v, int lane_mask) {
  static_assert(sizeof(V) <= 16, "shuffled values are at most 16 bytes");
  check_full_mask(member_mask, "__shfl_xor_sync");
  if (lane_mask < 0 || lane_mask > 31) {
    std::printf("EMU ERROR: __shfl_xor_sync with lane mask %d (a lane of the same warp: 0..31)\n", lane_mask);
    std::exit(2);
  }
  std::memcpy(shfl_raw[cur], &v, sizeof(V));
  warp_yield();
  V r;
  std::memcpy(&r, shfl_raw[cur ^ lane_mask], sizeof(V));
  warp_yield();
  return r;
}
template <class V> V shfl_idx(unsigned mask, V v, int src) {
  check_full_mask(mask, "__shfl_sync");
  publish(v);
  const V r = lane_value<V>(src & 31);
  warp_yield();
  return r;
}
inline void async_land(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
}
// Dynamic shared memory of the running launch, one buffer per block of a cluster, poisoned
// (0xff: NaN in every float type) so a read of bytes nothing wrote shows up in the results.
// A guard band past the launch's bytes must stay untouched: a write beyond them is an error.
constexpr size_t kSmemGuard = 256;
inline std::vector<unsigned char> dynamic_smem[kMaxClusterBlocks];
inline size_t dynamic_smem_bytes = 0;
inline uint32_t smem_window_base = 1024;  // the dynamic shared memory's first address (see smem_address)
// The host address of block b's dynamic shared memory: congruent to the window address modulo
// 4 KB, as a generic pointer into shared memory is on the GPU, so alignment is the same in both.
constexpr size_t kSmemAlignSlack = 4096;
inline unsigned char* dynamic_smem_base(int b) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(dynamic_smem[b].data());
  return dynamic_smem[b].data() + ((smem_window_base - p) & (kSmemAlignSlack - 1));
}
inline unsigned char* dynamic_smem_base() { return dynamic_smem_base(cur / kN); }
inline void prepare_dynamic_smem(size_t bytes, int blocks = 1) {
  smem_window_base = 1024 + 128 * static_cast<uint32_t>(rng() % 8);
  for (int b = 0; b < blocks; ++b) dynamic_smem[b].assign(bytes + kSmemAlignSlack + kSmemGuard, 0xff);
  dynamic_smem_bytes = bytes;
}
inline void poison_dynamic_smem(int b) { std::memset(dynamic_smem_base(b), 0xff, dynamic_smem_bytes); }
inline void check_dynamic_smem_guard(int blocks = 1) {
  for (int b = 0; b < blocks; ++b) {
    const unsigned char* guard = dynamic_smem_base(b) + dynamic_smem_bytes;
    for (size_t i = 0; i < kSmemGuard; ++i)
      if (guard[i] != 0xff) {
        std::printf("EMU ERROR: a write %zu bytes past the launch's %zu bytes of dynamic shared memory\n", i,
                    dynamic_smem_bytes);
        std::exit(2);
      }
  }
}
// The same offset of block `rank`'s dynamic shared memory (mapa): p must lie in this block's.
template <class V> V* cluster_peer(V* p, unsigned rank) {
  const unsigned char* mine = dynamic_smem_base();
  const auto* q = reinterpret_cast<const unsigned char*>(p);
  if (q < mine || q + sizeof(V) > mine + dynamic_smem_bytes) {
    std::printf("EMU ERROR: cluster_peer of %p, outside the block's dynamic shared memory (the emulator's "
                "clusters share only dynamic shared memory)\n", static_cast<const void*>(p));
    std::exit(2);
  }
  if (rank >= static_cast<unsigned>(nblocks)) {
    std::printf("EMU ERROR: cluster_peer rank %u of a %d-block cluster\n", rank, nblocks);
    std::exit(2);
  }
  return reinterpret_cast<V*>(dynamic_smem_base(static_cast<int>(rank)) + (q - mine));
}
inline int sms = 132;
inline int compute_major = 9;
inline int max_shared_optin = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin: sm_90's 227 KB
inline unsigned emu_blocks = 3;
inline unsigned emu_clusters = 2;     // clusters of every cluster launch, one after another
inline int max_cluster_blocks = 4;    // the largest cluster cudaOccupancyMaxActiveClusters allows
// Each kernel's dynamic shared-memory opt-in (cudaFuncSetAttribute MaxDynamicSharedMemorySize):
// a launch past 48 KB without it fails on a GPU, and so here (check_launch).
inline std::map<const void*, int> smem_opt_in;
inline int occupancy_blocks = 1;      // blocks per SM cudaOccupancyMaxActiveBlocksPerMultiprocessor reports
                                      // (0: none fits; such a result is never remembered, see common.cuh)
// Every launch, in order: the kernel as written at MMFAST_LAUNCH and its dynamic shared memory
// (tests check which variant a dispatch took).
struct Launch {
  const char* kernel;
  size_t smem;
  unsigned cluster_blocks = 1;  // blocks per cluster (1: an ordinary launch)
};
inline std::vector<Launch> launches;
// MMFAST_LAUNCH_CLUSTERS: emu_clusters clusters of cluster_blocks blocks, each cluster's blocks
// together (the kernel's grid-stride loop over clusters covers the rest).
inline cudaError_t launch_clusters(const char* kernel, unsigned cluster_blocks, size_t smem, const std::function<void()>& f) {
  if (cluster_blocks < 1 || cluster_blocks > static_cast<unsigned>(kMaxClusterBlocks)) {
    std::printf("EMU ERROR: %s launched in clusters of %u blocks\n", kernel, cluster_blocks);
    std::exit(2);
  }
  launches.push_back({kernel, smem, cluster_blocks});
  gdim.x = emu_clusters * cluster_blocks;
  for (unsigned c = 0; c < emu_clusters; ++c) {
    first_block = c * cluster_blocks;
    prepare_dynamic_smem(smem, static_cast<int>(cluster_blocks));
    run(f, static_cast<int>(cluster_blocks));
    check_dynamic_smem_guard(static_cast<int>(cluster_blocks));
  }
  first_block = 0;
  return cudaSuccess;
}
// What the hardware refuses at a launch: a block of other than the kN threads the emulator runs
// (every mmfast kernel takes 256), more dynamic shared memory than the device's opt-in limit, or
// past 48 KB without the kernel's cudaFuncSetAttribute opt-in to at least that much.
inline void check_launch(const char* kernel, const void* fn, dim3 block, size_t smem) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads != static_cast<unsigned>(kN)) {
    std::printf("EMU ERROR: %s launched with %u threads per block (the emulator runs %d)\n", kernel, threads, kN);
    std::exit(2);
  }
  if (smem > static_cast<size_t>(max_shared_optin)) {
    std::printf("EMU ERROR: %s launched with %zu B of dynamic shared memory, past the device's %d B\n", kernel, smem,
                max_shared_optin);
    std::exit(2);
  }
  const auto opted = smem_opt_in.find(fn);
  if (smem > 48 * 1024 && (opted == smem_opt_in.end() || static_cast<size_t>(opted->second) < smem)) {
    std::printf("EMU ERROR: %s launched with %zu B of dynamic shared memory without cudaFuncSetAttribute("
                "MaxDynamicSharedMemorySize) to that much (a GPU refuses it past 48 KB)\n", kernel, smem);
    std::exit(2);
  }
}
}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define gridDim (::emu::gdim)
#define blockDim (::emu::bdim)
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static
#define __syncthreads() ::emu::yield()
#define __shfl_xor_sync(m, v, l) ::emu::shfl_xor(m, v, l)
#define __shfl_sync(m, v, l) ::emu::shfl_idx(m, v, l)
#define __ballot_sync(m, p) ::emu::ballot(m, p)
#define __any_sync(m, p) (::emu::ballot(m, p) != 0u)
#define __match_any_sync(m, v) ::emu::match_any(m, v)
#define __syncwarp(...) ::emu::warp_yield()
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
#define MMFAST_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_smem_base()
#define MMFAST_LAUNCH(kernel, grid, block, smem, stream, ...)                                       \
  do {                                                                                            \
    (void)(grid), (void)(stream);                                                                 \
    ::emu::check_launch(#kernel, reinterpret_cast<const void*>(+kernel), dim3(block),                \
                        static_cast<size_t>(smem));                                               \
    ::emu::launches.push_back({#kernel, static_cast<size_t>(smem)});                              \
    ::emu::gdim.x = ::emu::emu_blocks;                                                            \
    for (unsigned b_ = 0; b_ < ::emu::emu_blocks; ++b_) {                                         \
      ::emu::first_block = b_;                                                                    \
      ::emu::prepare_dynamic_smem(smem);                                                          \
      ::emu::run([&] { kernel(__VA_ARGS__); });                                                   \
      ::emu::check_dynamic_smem_guard();                                                          \
    }                                                                                             \
    ::emu::first_block = 0;                                                                       \
  } while (0)
#define MMFAST_LAUNCH_CLUSTERS(kernel, clusters, cluster_blocks, block, smem, stream, ...)           \
  ((void)(clusters), (void)(stream),                                                              \
   ::emu::check_launch(#kernel, reinterpret_cast<const void*>(+kernel), dim3(block),                 \
                       static_cast<size_t>(smem)),                                                \
   ::emu::launch_clusters(#kernel, (cluster_blocks), static_cast<size_t>(smem), [&] { kernel(__VA_ARGS__); }))
// Thread-block clusters (sm_90): the block's rank in its cluster, the cluster's block count, a
// barrier of the whole cluster, another block's shared memory (see mmfast/cuda/common.cuh).
inline unsigned cluster_block_rank() { return static_cast<unsigned>(::emu::cur / ::emu::kN); }
inline unsigned cluster_block_count() { return static_cast<unsigned>(::emu::nblocks); }
inline void cluster_barrier() { ::emu::cluster_wait(); }
template <class V> V* cluster_peer(V* p, unsigned rank) { return ::emu::cluster_peer(p, rank); }

// Atomics: fibers switch only at barriers and warp collectives, so a plain read-modify-write is atomic.
template <class V> V atomicAdd(V* p, V v) { const V old = *p; *p = old + v; return old; }

inline void check_async_operand(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::printf("EMU ERROR: cp.async %s %p is not 16-byte aligned\n", what, p);
    std::exit(2);
  }
}
inline void cp_async16(void* dst, const void* src, bool valid) {
  check_async_operand(dst, "destination");
  check_async_operand(src, "source");
  const ::emu::AsyncCopy copy{dst, src, valid};
  if (::emu::rng() & 1u) ::emu::async_land({copy});
  else ::emu::async_open[::emu::cur].push_back(copy);
}
inline void cp_async_commit() {
  auto& open = ::emu::async_open[::emu::cur];
  ::emu::async_groups[::emu::cur].push_back(std::move(open));
  open.clear();
}
template <int Pending> void cp_async_wait() {
  auto& groups = ::emu::async_groups[::emu::cur];
  if (groups.size() > static_cast<size_t>(Pending) && ::emu::unfenced_at[::emu::cur] < 0)
    ::emu::unfenced_at[::emu::cur] = ::emu::nbar[::emu::cur];
  while (groups.size() > static_cast<size_t>(Pending)) {
    ::emu::async_land(groups.front());
    groups.erase(groups.begin());
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 and mma.sync.aligned.m16n8k16.row.col.f32
// with fp16 / bf16 operands: the fragment layouts of the PTX ISA (see tile_gemm.cuh). The sum
// is exact products added in fp64, rounded once to fp32 (hardware adds in fp32).
namespace emu {
// Each lane reads its own row when it reaches the ldmatrix (threads run in random order within
// a phase), so a row another thread writes without a barrier in between can be read stale.
struct MatrixRow { uint16_t e[8]; };
template <bool Trans, int N> void ldmatrix(uint32_t (&r)[N], const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 && cur % 32 < 8 * N) {  // .x2: lanes 16-31's addresses are unused
    std::printf("EMU ERROR: ldmatrix row address %p is not 16-byte aligned\n", row);
    std::exit(2);
  }
  MatrixRow mine{};
  if (cur % 32 < 8 * N) std::memcpy(&mine, row, sizeof mine);
  publish(mine);
  const int lane = cur % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < N; ++j) {
    uint16_t e[2];  // M_j[g][2t + h], or transposed M_j[2t + h][g]
    for (int h = 0; h < 2; ++h) {
      const MatrixRow m = lane_value<MatrixRow>(8 * j + (Trans ? 2 * t + h : g));
      e[h] = m.e[Trans ? g : 2 * t + h];
    }
    r[j] = e[0] | (static_cast<uint32_t>(e[1]) << 16);
  }
  warp_yield();
}
}  // namespace emu
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix<false, 4>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix<true, 4>(r, row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { ::emu::ldmatrix<true, 2>(r, row); }
namespace emu {
struct MmaOperands { uint32_t a[4], b[2]; float c[4]; };
template <class T> double element16(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  T x;
  std::memcpy(&x, &bits, 2);
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(x);
  else return __half2float(x);
}
// How mma.sync rounds C + A B to fp32: to nearest (default), or toward zero, the pessimistic
// model of tensor cores whose fp32 accumulation truncates (Fasi, Higham, Mikaitis, Pranesh,
// "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021: products exact, the sum aligned and
// truncated): an error biased toward zero in every mma, which a long fp32 sum would accumulate.
inline bool mma_round_toward_zero = false;
inline float mma_round(double s) {
  const float r = static_cast<float>(s);
  return mma_round_toward_zero && std::fabs(static_cast<double>(r)) > std::fabs(s) ? std::nextafter(r, 0.0f) : r;
}
// D = C + A B of the whole warp from its lanes' published fragments, into mma_out.
template <class T> void warp_mma(int warp) {
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto f = lane_value<MmaOperands>(l);
    const int g = l / 4, t = l % 4;
    for (int reg = 0; reg < 4; ++reg)
      for (int h = 0; h < 2; ++h) A[g + 8 * (reg % 2)][2 * t + h + 8 * (reg / 2)] = element16<T>(f.a[reg], h);
    for (int reg = 0; reg < 2; ++reg)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * reg][g] = element16<T>(f.b[reg], h);
  }
  for (int l = 0; l < 32; ++l) {
    const auto f = lane_value<MmaOperands>(l);
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      double s = f.c[i];
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      mma_out[warp][l][i] = mma_round(s);
    }
  }
}
}  // namespace emu
template <class T> void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
  ::emu::MmaOperands mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, d, sizeof mine.c);
  ::emu::publish(mine);
  const int warp = ::emu::cur / 32;
  if (::emu::mma_phase[warp] != ::emu::nwarp[::emu::cur]) {
    ::emu::mma_phase[warp] = ::emu::nwarp[::emu::cur];
    ::emu::warp_mma<T>(warp);
  }
  std::memcpy(d, ::emu::mma_out[warp][::emu::cur % 32], sizeof(float) * 4);
  ::emu::warp_yield();
}

// ---- wgmma (sm_90a) -----------------------------------------------------------------------
// Shared-memory addresses: the running block's dynamic shared memory starts at a window address
// chosen at random per launch (a multiple of 128 from 1024 on: the hardware reserves the first
// KB), so code that aligns to the window (align_shared) rather than to host pointers shows.
namespace emu {
inline void check_in_dynamic_smem(const unsigned char* q, size_t bytes, const char* what) {
  const unsigned char* mine = dynamic_smem_base();
  if (q < mine || q + bytes > mine + dynamic_smem_bytes) {
    std::printf("EMU ERROR: %s %p lies outside the block's dynamic shared memory\n", what, static_cast<const void*>(q));
    std::exit(2);
  }
}
inline uint32_t smem_address(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  check_in_dynamic_smem(q, 0, "a shared-memory address of");
  return smem_window_base + static_cast<uint32_t>(q - dynamic_smem_base());
}
inline const unsigned char* smem_at(uint32_t address, size_t bytes) {
  const unsigned char* q = dynamic_smem_base() + (static_cast<int64_t>(address) - smem_window_base);
  check_in_dynamic_smem(q, bytes, "wgmma operand byte");
  return q;
}
// One issued wgmma of a thread: its accumulators, descriptors and operand types. It runs (reads
// its operands, adds into its accumulators) at random at its issue or only at the wait that
// retires its group, in issue order, so a refill of a stage wgmma still reads, or an accumulator
// read before the wait, gives wrong results.
struct Wgmma { float* d; uint64_t desc_a, desc_b; bool bf16, accumulate; int thread; };
inline std::vector<Wgmma> wgmma_open[kMaxThreads];
inline std::vector<std::vector<Wgmma>> wgmma_groups[kMaxThreads];
// Element (row, k) of a K-major 16-bit operand read through a 64-byte-swizzle descriptor: byte
// start + 512 (row / 8) + 64 (row % 8) + 2 k (k < 16: chunks 0-1 of the row from the start's),
// then address bits 4-5 XOR bits 7-8 (the PTX ISA's canonical K-major layout; CuTe's
// Swizzle<2,4,3> o ((8,n),2):((4,SBO),1) in 16-byte units).
inline uint32_t gmma_operand_address(uint64_t desc, int row, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  const unsigned type = static_cast<unsigned>(desc >> 62), base_offset = static_cast<unsigned>((desc >> 49) & 7u);
  if (type != 2 || base_offset != 0 || ((desc >> 16) & 0x3FFFu) != 1) {
    std::printf("EMU ERROR: wgmma descriptor %#llx: the emulator reads 64-byte-swizzle K-major operands only "
                "(layout type 2, base offset 0, leading byte offset 1)\n", static_cast<unsigned long long>(desc));
    std::exit(2);
  }
  const uint32_t linear = start + sbo * static_cast<uint32_t>(row / 8) + 64u * static_cast<uint32_t>(row % 8) +
                          2u * static_cast<uint32_t>(k);
  return linear ^ (((linear >> 7) & 3u) << 4);
}
template <class T> double gmma_operand(uint64_t desc, int row, int k) {
  uint16_t bits;
  std::memcpy(&bits, smem_at(gmma_operand_address(desc, row, k), 2), 2);
  return element16<T>(bits, 0);
}
// The element of D (row, column) that value v of thread t (of the warpgroup's 128) holds.
inline std::pair<int, int> wgmma_d_coord(int t, int v) {
  const int lane = t % 32;
  return {16 * (t / 32) + lane / 4 + 8 * ((v / 2) % 2), 8 * (v / 4) + 2 * (lane % 4) + v % 2};
}
// D (64 x 128, this thread's 64 elements) += A (64 x 16) B (128 x 16)^T; thread t of the
// warpgroup holds D[16 (t / 32) + (t % 32) / 4 + 8 ((v / 2) % 2)][8 (v / 4) + 2 (t % 4) + v % 2].
inline void wgmma_run(const Wgmma& w) {
  for (int v = 0; v < 64; ++v) {
    const auto [row, col] = wgmma_d_coord(w.thread % 128, v);
    double s = w.accumulate ? w.d[v] : 0.0;  // scale-d 0: d's old value unread
    for (int k = 0; k < 16; ++k)
      s += w.bf16 ? gmma_operand<__nv_bfloat16>(w.desc_a, row, k) * gmma_operand<__nv_bfloat16>(w.desc_b, col, k)
                  : gmma_operand<__half>(w.desc_a, row, k) * gmma_operand<__half>(w.desc_b, col, k);
    w.d[v] = mma_round(s);
  }
}
inline void wgmma_check_drained() {
  bool pending = !wgmma_open[cur].empty();
  for (const auto& g : wgmma_groups[cur]) pending = pending || !g.empty();
  if (pending) { std::printf("EMU ERROR: thread %d exited with wgmma never waited for\n", cur); std::exit(2); }
  wgmma_groups[cur].clear();
}
}  // namespace emu
inline uint32_t smem_address(const void* p) { return ::emu::smem_address(p); }
inline void fence_proxy_async_shared() { ::emu::unfenced_at[::emu::cur] = -1; }
inline void wgmma_fence() {}
inline void wgmma_commit() {
  ::emu::wgmma_groups[::emu::cur].push_back(std::move(::emu::wgmma_open[::emu::cur]));
  ::emu::wgmma_open[::emu::cur].clear();
}
template <int Pending> void wgmma_wait() {
  auto& groups = ::emu::wgmma_groups[::emu::cur];
  while (groups.size() > static_cast<size_t>(Pending)) {
    for (const auto& w : groups.front()) ::emu::wgmma_run(w);
    groups.erase(groups.begin());
  }
}
template <class Acc> void wgmma_fence_operands(Acc&) {}
template <class T, class Acc> void wgmma_m64n128k16(Acc& d, uint64_t desc_a, uint64_t desc_b, bool accumulate = true) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
  static_assert(sizeof(Acc) == 64 * sizeof(float), "64 fp32 accumulators per thread");
  const int block0 = ::emu::cur / ::emu::kN * ::emu::kN;
  for (int t = block0; t < block0 + ::emu::kN; ++t)
    if (::emu::unfenced_at[t] >= 0 && ::emu::unfenced_at[t] < ::emu::nbar[::emu::cur]) {
      std::printf("EMU ERROR: thread %d issues wgmma after a barrier that thread %d reached with cp.async copies "
                  "retired and no fence.proxy.async\n", ::emu::cur, t);
      std::exit(2);
    }
  ++::emu::wgmma_issued[::emu::cur];
  ::emu::wgmma_scale_d[::emu::cur] = ::emu::wgmma_scale_d[::emu::cur] * 3 + (accumulate ? 1 : 2);
  const ::emu::Wgmma w{&d[0], desc_a, desc_b, std::is_same<T, __nv_bfloat16>::value, accumulate, ::emu::cur};
  // A warpgroup's wgmmas run in issue order (their sums round in that order): one may run at its
  // issue only when none before it is still pending.
  bool pending = !::emu::wgmma_open[::emu::cur].empty();
  for (const auto& g : ::emu::wgmma_groups[::emu::cur]) pending = pending || !g.empty();
  if (!pending && (::emu::rng() & 1u)) ::emu::wgmma_run(w);
  else ::emu::wgmma_open[::emu::cur].push_back(w);
}

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" cudaError_t cudaFuncSetAttribute(const void* fn, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) ::emu::smem_opt_in[fn] = value;
  return cudaSuccess;
}
extern "C" cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  *attributes = cudaFuncAttributes{};  // sharedSizeBytes 0: the emulator has no per-block limit to share
  attributes->ptxVersion = attributes->binaryVersion = ::emu::compute_major * 10;  // built for the device
  return cudaSuccess;
}
extern "C" cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
extern "C" cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrComputeCapabilityMajor       ? ::emu::compute_major
       : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? ::emu::max_shared_optin
                                                         : ::emu::sms;
  return cudaSuccess;
}
extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = ::emu::occupancy_blocks;
  return cudaSuccess;
}
// One block per SM: sms / cluster size clusters, none above emu::max_cluster_blocks.
extern "C" cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void*, const cudaLaunchConfig_t* config) {
  unsigned size = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i)
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) size = config->attrs[i].val.clusterDim.x;
  *clusters = size <= static_cast<unsigned>(::emu::max_cluster_blocks) ? ::emu::sms / static_cast<int>(size) : 0;
  return cudaSuccess;
}

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];  // the whole matrix, row-major
};

inline void check_operand(const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm % 4 != 0) {
    std::printf("EMU ERROR: WMMA operand %p / ldm %u breaks the 256-bit alignment or ldm %% 4 rule\n", p, ldm);
    std::exit(2);
  }
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  check_operand(p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same<Layout, col_major>::value ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_operand(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

// The whole product, c + a b: the j loop runs innermost over contiguous rows so that it
// vectorizes (the tests build at -O1). Each sum still adds its K products in order k = 0, 1, ...
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("O3")
#endif
template <int M, int N, int K>
void multiply_add(float* out, const float* a, const float* b, const float* c) {
  for (int e = 0; e < M * N; ++e) out[e] = c[e];
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) {
      const float a_ik = a[i * K + k];
      for (int j = 0; j < N; ++j) out[i * N + j] += a_ik * b[k * N + j];
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Every lane holds whole matrices, so the lanes of a warp compute the same products: the first
// lane to reach its n-th mma_sync of a phase computes it, and a later lane of that warp whose n-th
// operands are bitwise equal takes the result (any other computes its own). Without this the
// product was most of the emulated linear-attention test's time.
template <int M, int N, int K, class TA, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  struct Product { float a[M * K], b[K * N], c[M * N], d[M * N]; };
  struct Key {
    long block = 0, phase = 0;
    bool operator!=(const Key& o) const { return block != o.block || phase != o.phase; }
  };
  static std::vector<Product> warp_products[::emu::kMaxThreads / 32];
  static Key warp_key[::emu::kMaxThreads / 32], lane_key[::emu::kMaxThreads];
  static size_t lane_calls[::emu::kMaxThreads];
  const int lane = ::emu::cur, warp = lane / 32;
  const Key key{::emu::blocks_run, ::emu::nbar[lane]};
  if (lane_key[lane] != key) lane_key[lane] = key, lane_calls[lane] = 0;
  if (warp_key[warp] != key) warp_key[warp] = key, warp_products[warp].clear();
  const size_t n = lane_calls[lane]++;
  std::vector<Product>& products = warp_products[warp];
  if (n < products.size() && std::memcmp(products[n].a, a.x, sizeof(a.x)) == 0 &&
      std::memcmp(products[n].b, b.x, sizeof(b.x)) == 0 && std::memcmp(products[n].c, c.x, sizeof(c.x)) == 0) {
    std::memcpy(d.x, products[n].d, sizeof(d.x));
    return;
  }
  float out[M * N];
  multiply_add<M, N, K>(out, a.x, b.x, c.x);
  if (n == products.size()) {
    products.emplace_back();
    std::memcpy(products[n].a, a.x, sizeof(a.x));
    std::memcpy(products[n].b, b.x, sizeof(b.x));
    std::memcpy(products[n].c, c.x, sizeof(c.x));
    std::memcpy(products[n].d, out, sizeof(out));
  }
  std::memcpy(d.x, out, sizeof(out));
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, round half away from zero.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace wmma
}  // namespace nvcuda
