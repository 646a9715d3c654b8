// Building blocks every family's CUDA kernels share (torch-free): accumulator types and
// conversions, token-tensor views, the launch macro, grid sizing, device queries and the
// dtype dispatch. Plain CUDA: raw pointers, int64 strides, a cudaStream_t, cudaError_t.
// No torch / ATen / c10 header may be included from mmfast/cuda/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "mmfast/common.h"

// Every kernel launch goes through this macro, so the host emulator of the CUDA tests
// (tests/cuda_emulator/emulator.h, which defines it first) can run the same source.
#ifndef MMFAST_LAUNCH
#define MMFAST_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace mmfast {
namespace cuda {

// ---- scalar types ----------------------------------------------------------------------
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
// Accumulator type of the storage type T: fp32, or fp64 for fp64.
template <class T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_acc(acc_t<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The NaN a kernel writes for an invalid index or code, in every storage type.
template <class T> __device__ __forceinline__ T quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return NAN; }
template <> __device__ __forceinline__ double quiet_nan<double>() { return NAN; }
template <> __device__ __forceinline__ __half quiet_nan<__half>() { return __float2half_rn(NAN); }
template <> __device__ __forceinline__ __nv_bfloat16 quiet_nan<__nv_bfloat16>() { return __float2bfloat16_rn(NAN); }

// False for NaN and +-inf (x - x is NaN for them), without <cmath>'s host/device overloads.
template <class A> __device__ __forceinline__ bool is_finite(A x) { return x - x == A(0); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
// exp(x) as 2^(x log2 e) by one MUFU.EX2 (ex2.approx.ftz.f32: about 2^-22 relative error,
// results below 2^-126 flushed to 0): 2 instructions instead of about 12. Rounding x log2 e
// adds up to |x| 2^-23.5 relative (as __expf: 2 + 1.2 |x| ulp), so for x <= 0, where callers
// use it, the absolute error stays below about 2^-22: under the 16 mantissa bits of a bf16
// hi + lo pair; for fp16 pairs (22 bits) the relative error of exp(x) grows past them for
// |x| > 1, where exp(x) < 0.37. Host code (the emulator) uses expf.
__device__ __forceinline__ float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  return expf(x);
#endif
}
// a / b to about 2 ulp by MUFU.RCP and a multiply (__fdividef; 0 when 2^126 < |b| < 2^128),
// without IEEE division's slow-path call, whose calling convention costs registers at every
// call site. fp64 divides exactly. Host code (the emulator) divides exactly.
__device__ __forceinline__ float divide_fast(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
__device__ __forceinline__ double divide_fast(double a, double b) { return a / b; }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// Any storage type as fp32 (fp64 rounded, like torch's .float()).
template <class T> __device__ __forceinline__ float to_f32(T x) { return static_cast<float>(to_acc(x)); }

// fp32 products and sums rounded on their own (never contracted into an FMA), for results
// that must match a framework's separately rounded ops bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---- radix keys ----------------------------------------------------------------------------
// An order-preserving uint32 key of a non-NaN float: a < b <=> key(a) < key(b), and a == b
// <=> key(a) == key(b) (-0 and +0 share the key of +0); -inf is the smallest, +inf the largest.
__device__ __forceinline__ uint32_t ordered_key(float x) {
  if (x == 0.0f) x = 0.0f;
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---- block-wide reductions and scans ---------------------------------------------------------
// Every thread of the block must call them (they synchronise); blockDim.x a multiple of 32, at
// most 1024; `scratch`: 32 elements of shared memory, reusable right after the call returns.
// V: a type __shfl_xor_sync takes (int, unsigned, long long, unsigned long long, float, double).
// The combination order is fixed (lane butterfly, then warps in order): deterministic.

// op over the values of all threads, returned to every thread.
template <class V, class Op>
__device__ __forceinline__ V block_allreduce(V v, Op op, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();  // a previous call may still read scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  return r;
}

// Exclusive prefix sum in thread order (thread 0 gets V(0)); the block total in `total`.
template <class V>
__device__ __forceinline__ V block_exclusive_sum(V v, V* scratch, V& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  V group = v, before = V(0);  // total of the aligned lane group holding this lane; lanes below it
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V other = __shfl_xor_sync(0xffffffffu, group, off);
    if (lane & off) before += other;
    group += other;
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = group;
  __syncthreads();
  V r = V(0), t = V(0);
  for (int w = 0; w < warps; ++w) {
    if (w == warp) r = t;
    t += scratch[w];
  }
  total = t;
  return r + before;
}

// ---- warp-aggregated updates -----------------------------------------------------------------
// The sum of v over `peers` (this lane's group as __match_any_sync returns it: the lanes that
// share a key) arrives in the group's lowest lane; other lanes end with partial sums. All 32
// lanes call it together (lanes without an item pass a key of their own). A tree over the
// ranks within each group: round r adds the value of the peer 2^r ranks above, at most 5
// rounds. Integer sums are exact; float sums have a fixed order. (The peer reduction of
// NVIDIA's "Voting and shuffling to optimize atomic operations".)
template <class V>
__device__ __forceinline__ V warp_sum_peers(unsigned peers, V v) {
  const int lane = threadIdx.x & 31;
  unsigned rank = __popc(peers & ((1u << lane) - 1u));  // peers below this lane
  unsigned above = peers & (0xfffffffeu << lane);       // peers above it still holding a value
  while (__any_sync(0xffffffffu, above != 0u)) {
    const int next = __ffs(above);  // 1 + the lowest remaining peer above, 0 if none
    const V other = __shfl_sync(0xffffffffu, v, next > 0 ? next - 1 : lane);
    if (next > 0) v += other;
    above &= ~__ballot_sync(0xffffffffu, (rank & 1u) != 0u);  // lanes whose value was just taken
    rank >>= 1;
  }
  return v;
}

// Four consecutive accumulators from 16-byte aligned shared memory.
__device__ __forceinline__ void load4(const float* p, float (&r)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&r)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  r[0] = a.x; r[1] = a.y; r[2] = b.x; r[3] = b.y;
}

// ---- token tensors -----------------------------------------------------------------------
// One (b, h) of a TokenTensor: element (n, d) at base[n * sn + d].
template <class T> struct TokenView {
  T* base;
  int64_t sn;
  __device__ __forceinline__ T* row(int64_t n) const { return base + n * sn; }
};

// Index: the type of the b, h division; uint32_t (a few instructions instead of a 64-bit
// division's call) where the caller knows bh < 2^32.
template <class T, class Index = int64_t>
__device__ __forceinline__ TokenView<T> token_view(const TokenTensor& t, int64_t bh, int64_t heads) {
  const int64_t b = static_cast<Index>(bh) / static_cast<Index>(heads), h = bh - b * heads;
  TokenView<T> v;
  v.base = static_cast<T*>(t.data) + b * t.stride_b + h * t.stride_h;
  v.sn = t.stride_n;
  return v;
}

// A head b * heads + h kept as (b, h) for kernels that walk heads in order: the next head's
// views cost no division. The starting index must be below 2^32 (a 32-bit division).
struct HeadIndex {
  int64_t bh, b, h;
  __device__ __forceinline__ void start(int64_t index, int64_t heads) {
    bh = index;
    b = static_cast<uint32_t>(index) / static_cast<uint32_t>(heads);
    h = index - b * heads;
  }
  __device__ __forceinline__ void next(int64_t heads) {
    ++bh;
    if (++h == heads) {
      h = 0;
      ++b;
    }
  }
  template <class T> __device__ __forceinline__ TokenView<T> view(const TokenTensor& t) const {
    return {static_cast<T*>(t.data) + b * t.stride_b + h * t.stride_h, t.stride_n};
  }
};

// v, opaque to the compiler: a loop then keeps it in a register instead of recomputing it from
// its inputs every iteration (NVVM rematerializes cheap per-thread values inside long loops,
// e.g. a copy cursor's offsets; the VQ search's loop spent ~60 instructions per slice on them).
__device__ __forceinline__ uint32_t kept_in_register(uint32_t v) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+r"(v));
#endif
  return v;
}
template <class T> __device__ __forceinline__ const T* kept_in_register(const T* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("" : "+l"(p));
#endif
  return p;
}

// ---- asynchronous copies into shared memory (cp.async) ----------------------------------
// cp_async16(dst, src, valid) starts a 16-byte global -> shared copy (both 16-byte aligned)
// that bypasses registers and L1, or writes 16 zero bytes when !valid (src is then not read,
// but must still be a mapped address). Copies a thread issued become visible to it after
// cp_async_wait<n>() leaves at most n of its committed groups pending, and to the block after
// a __syncthreads() that follows every thread's wait. Before sm_80 the copy is synchronous.
// The host emulator (tests/cuda_emulator) lands each copy at random at its issue or only at the
// wait, so a read before the wait or the barrier, or a refill of a stage still being read, shows.
#ifndef MMFAST_CUDA_EMULATED
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  *static_cast<uint4*>(dst) = valid ? *static_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int Pending> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}
#endif  // !MMFAST_CUDA_EMULATED

// ---- thread-block clusters (sm_90) -----------------------------------------------------------
// cluster_block_rank(): this block's rank in its cluster (%cluster_ctarank); cluster_block_count():
// the cluster's blocks; cluster_barrier(): every thread of every block of the cluster arrives
// (release) and waits (acquire), so shared-memory writes before it are visible to the cluster's
// reads after it (warp-uniform: .aligned); cluster_peer(p, rank): the address of the same
// shared-memory offset as p in block `rank` of the cluster (mapa), read with plain loads. A
// block's shared memory must outlive its peers' reads: a cluster kernel ends with a barrier.
// Cluster kernels are launched only on sm_90 or newer; older code traps. The host emulator
// defines its own (a cluster's blocks run together there).
// The launch attribute that groups a 1-D grid into clusters of cluster_blocks blocks.
inline cudaLaunchAttribute cluster_dimension(unsigned cluster_blocks) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster_blocks;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  return attribute;
}

#ifndef MMFAST_CUDA_EMULATED
__device__ __forceinline__ unsigned cluster_block_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  return 0;
#endif
}
__device__ __forceinline__ unsigned cluster_block_count() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return n;
#else
  return 1;
#endif
}
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __syncwarp();  // .aligned: the warp reaches the barrier converged (a lane-0-only store may precede it)
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
template <class V> __device__ __forceinline__ V* cluster_peer(V* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t out;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(out) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<V*>(out);
#else
  (void)rank;
  return p;
#endif
}

// Launches kernel as `clusters` clusters of cluster_blocks blocks each (a 1-D grid of
// clusters * cluster_blocks blocks); above 8 blocks the kernel must allow non-portable sizes
// (allow_cluster_blocks). The launch's own error, or cudaSuccess.
template <class... Params, class... Args>
cudaError_t launch_clusters(void (*kernel)(Params...), unsigned clusters, unsigned cluster_blocks, unsigned block,
                            size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(clusters * cluster_blocks, 1, 1);
  config.blockDim = dim3(block, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1] = {cluster_dimension(cluster_blocks)};
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}
#endif  // !MMFAST_CUDA_EMULATED

// A block-uniform exchange of one 64-bit value per thread between the blocks of a cluster, in
// `slots`: 2 x blockDim.x u64 of dynamic shared memory (the same offset in every block). gather
// stores this thread's value, passes a cluster barrier, reads the same thread's slot of every
// block (all reads issued before any is used) and calls f(rank, value) in rank order. The
// slots are used alternately: the ones written at one exchange are rewritten two exchanges
// later, after a barrier every reader of the first has passed, so one barrier per exchange is
// enough. Every thread of every block calls gather in the same sequence. At most MaxBlocks
// blocks per cluster.
template <unsigned MaxBlocks> struct ClusterExchange {
  unsigned long long* slots = nullptr;
  unsigned blocks = 1;
  int parity = 0;
  template <class F> __device__ __forceinline__ void gather(unsigned long long mine, F f) {
    unsigned long long* const slot = slots + parity * blockDim.x + threadIdx.x;
    *slot = mine;
    cluster_barrier();
    unsigned long long v[MaxBlocks];
#pragma unroll
    for (unsigned r = 0; r < MaxBlocks; ++r)
      if (r < blocks) v[r] = *cluster_peer(slot, r);
#pragma unroll
    for (unsigned r = 0; r < MaxBlocks; ++r)
      if (r < blocks) f(r, v[r]);
    parity ^= 1;
  }
};

// Every cluster launch goes through this macro (an expression: the launch's cudaError_t), which
// the host emulator defines first.
#ifndef MMFAST_LAUNCH_CLUSTERS
#define MMFAST_LAUNCH_CLUSTERS(kernel, clusters, cluster_blocks, block, smem, stream, ...) \
  ::mmfast::cuda::launch_clusters(kernel, (clusters), (cluster_blocks), (block), (smem), (stream), __VA_ARGS__)
#endif

// A kernel's dynamic shared memory, 128-byte aligned (the emulator defines its own).
#ifndef MMFAST_DYNAMIC_SHARED
#define MMFAST_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

// True when every token row of t (D elements of elem_bytes each, unit stride) starts on a
// multiple of `bytes` and holds whole multiples of it: the rows can be accessed in bytes-wide
// pieces (16: copied with cp_async16; 4: pairs of 16-bit elements stored as one word).
inline bool rows_aligned(const TokenTensor& t, int64_t D, int64_t elem_bytes, int64_t bytes) {
  const auto aligned = [&](int64_t elems) { return (elems * elem_bytes) % bytes == 0; };
  return reinterpret_cast<uintptr_t>(t.data) % bytes == 0 && aligned(D) && aligned(t.stride_n) &&
         aligned(t.stride_h) && aligned(t.stride_b);
}
inline bool rows_16b_aligned(const TokenTensor& t, int64_t D, int64_t elem_bytes) {
  return rows_aligned(t, D, elem_bytes, 16);
}

// ---- launches ------------------------------------------------------------------------------
// Kernels loop over their work items with a grid stride, so a 1-D grid of at most INT_MAX
// blocks covers any problem (no 65,535 limit of grid y/z).
constexpr int64_t kMaxGrid = INT_MAX;

inline unsigned grid_for(int64_t items) {
  if (items < 1) items = 1;
  return static_cast<unsigned>(items > kMaxGrid ? kMaxGrid : items);
}

// ---- device queries (current device; conservative answers when a query fails) ------------
inline int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    return 132;
  }
  return sms;
}

inline int compute_capability_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return major;
}

// Shared memory one block may opt in to on the current device (48 KB when the query fails).
inline size_t max_shared_per_block() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess || bytes <= 0) {
    (void)cudaGetLastError();
    return 48 * 1024;
  }
  return static_cast<size_t>(bytes);
}

// Lets kernel take up to all the dynamic shared memory a block may opt in to (needed above
// 48 KB; at least bytes). Always the same value per device, never a call-specific one: a launch
// in another host thread, or a captured graph, never sees the limit lowered under it.
template <class Kernel> cudaError_t allow_dynamic_shared(Kernel* kernel, size_t bytes) {
  const void* entry = reinterpret_cast<const void*>(kernel);
  cudaFuncAttributes attributes;
  cudaError_t err = cudaFuncGetAttributes(&attributes, entry);
  if (err != cudaSuccess) return err;
  const size_t most = max_shared_per_block() - attributes.sharedSizeBytes;  // static shared memory counts too
  if (bytes > most) return cudaErrorInvalidValue;
  return cudaFuncSetAttribute(entry, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(most));
}

// Whether kernel's code for the current device comes from PTX of compute capability
// min_arch_x10 or newer: a binary JIT-compiled from older PTX (TORCH_CUDA_ARCH_LIST="7.5+PTX"
// run on an A100) holds the pre-sm_80 fallback of an inline-PTX wrapper (mma.sync: a trap).
// The PTX version is queried once per (device, its compute capability, kernel) and remembered:
// cudaFuncGetAttributes costs microseconds, and the dispatch asks on every call (a failed query
// is not remembered).
template <class Kernel> bool compiled_for(Kernel* kernel, int min_arch_x10) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  using Key = std::tuple<int, int, const void*>;
  static std::mutex mutex;
  static std::map<Key, int> known;  // PTX version
  const Key key{dev, compute_capability_major(), reinterpret_cast<const void*>(kernel)};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(key);
    if (found != known.end()) return found->second >= min_arch_x10;
  }
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)) != cudaSuccess) {
    (void)cudaGetLastError();  // the caller takes another kernel; the error is not sticky
    return false;
  }
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(key, attributes.ptxVersion);
  return attributes.ptxVersion >= min_arch_x10;
}

// Blocks of kernel (threads per block, dynamic shared bytes) that one SM holds, after opting
// in to that much shared memory: 0 when a query fails (cudaGetLastError then says why).
template <class Kernel> int resident_blocks_per_sm(Kernel* kernel, int threads, size_t smem) {
  int blocks = 0;
  if (allow_dynamic_shared(kernel, smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, reinterpret_cast<const void*>(kernel), threads, smem) !=
          cudaSuccess)
    return 0;
  return blocks;
}

// resident_blocks_per_sm, queried once per (device, kernel, threads, shared memory) and then
// remembered: the queries (function attributes, the shared-memory opt-in, the occupancy
// calculator) cost microseconds per call, a visible share of a 20 us kernel. The opt-in they
// set stays on the function. A failed query is not remembered.
template <class Kernel> int resident_blocks_per_sm_once(Kernel* kernel, int threads, size_t smem) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return resident_blocks_per_sm(kernel, threads, smem);
  }
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int> known;
  const Key key{dev, reinterpret_cast<const void*>(kernel), threads, smem};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(key);
    if (found != known.end()) return found->second;
  }
  const int blocks = resident_blocks_per_sm(kernel, threads, smem);
  if (blocks > 0) {
    const std::lock_guard<std::mutex> lock(mutex);
    known.emplace(key, blocks);
  }
  return blocks;
}

// Clusters of cluster_blocks blocks of kernel (threads, dynamic shared bytes) that the current
// device holds at once (cudaOccupancyMaxActiveClusters, after opting in to the shared memory and,
// above 8 blocks, to non-portable cluster sizes): 0 when none fits, -1 when a query fails (its
// error cleared).
template <class Kernel>
int resident_clusters(Kernel* kernel, unsigned cluster_blocks, int threads, size_t smem) {
  const void* entry = reinterpret_cast<const void*>(kernel);
  if (allow_dynamic_shared(kernel, smem) != cudaSuccess ||
      (cluster_blocks > 8 && cudaFuncSetAttribute(entry, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
    (void)cudaGetLastError();
    return -1;
  }
  cudaLaunchAttribute attribute[1] = {cluster_dimension(cluster_blocks)};
  // {grid, block, dynamic shared bytes, stream, attributes, count}: the emulator's gridDim and
  // blockDim macros would rename the members
  const cudaLaunchConfig_t config = {dim3(cluster_blocks, 1, 1), dim3(static_cast<unsigned>(threads), 1, 1), smem,
                                     nullptr, attribute, 1};
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, entry, &config) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return clusters;
}

// The grid of a persistent kernel (grid-stride or range loop over items): the blocks that are
// resident at once, never more than items. cudaErrorInvalidConfiguration when not one block
// fits (the occupancy query's own error when it fails).
template <class Kernel>
cudaError_t persistent_grid(Kernel* kernel, int threads, size_t smem, int64_t items, unsigned& grid) {
  const int per_sm = resident_blocks_per_sm_once(kernel, threads, smem);
  if (per_sm < 1) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
  }
  grid = grid_for(min_i64(items, static_cast<int64_t>(sm_count()) * per_sm));
  return cudaSuccess;
}

// persistent_grid for a kernel that has another to fall back to: false, with the query's error
// cleared, when not one block fits or the occupancy query fails (the caller launches the other).
template <class Kernel>
bool fits_persistent_grid(Kernel* kernel, int threads, size_t smem, int64_t items, unsigned& grid) {
  if (persistent_grid(kernel, threads, smem, items, grid) == cudaSuccess) return true;
  (void)cudaGetLastError();
  return false;
}

// An A/B switch of the environment: on unless it is set to something starting with '0'. Callers
// read it once (a function-local static).
inline bool env_switch_on(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || env[0] != '0';
}

// MMFAST_CUDA_ASYNC_COPY=0 keeps every kernel on its register-staged loads (for A/B timing).
inline bool async_copy_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_ASYNC_COPY");
  return enabled;
}

// MMFAST_CUDA_WGMMA=0 keeps the kernels that have a wgmma variant (sm_90a) on mma.sync.
inline bool wgmma_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_WGMMA");
  return enabled;
}

// MMFAST_CUDA_TENSOR_CORES=0 keeps every kernel on its exact SIMT path.
inline bool tensor_cores_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_TENSOR_CORES");
  return enabled;
}

// Calls f(T{}) with T the storage type of dtype.
template <class F> cudaError_t dispatch_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mmfast
