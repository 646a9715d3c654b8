// sample on the GPU: CFG + temperature + top-k + top-p + inverse-CDF draw, fused, without a
// sort (namespace mmfast::cuda::decodek).
//
//   sample_kernel  one 256-thread block per output row (grid stride over rows), about 10 passes
//     over the row (max, 4 radix digits for top-k, 4 for top-p, the draw; a total instead of the
//     top-p digits when top-p is off: the top-p cut's last digit gives the kept total). The first pass
//     computes mix_i = u_i + scale * (c_i - u_i) in fp32 with separately rounded ops (cond row r,
//     uncond row P + r) and, when the row fits (V x 4 bytes of dynamic shared memory next to
//     16 KB of histograms: V up to about 53K on sm_90, 37K on sm_80), stages it there, then
//     divides it in place by the temperature: x_i = mix_i / temperature. Later passes read x
//     there, or for larger V re-read and re-mix the logits (L2-resident for a block's row) and
//     divide again. Every pass sees the same bits.
//     1. validity and max: a NaN or +inf, or all -inf -> status 1, token 0; temperature 0 ->
//        the first index of the maximum.
//     2. top-k, top-p: radix select over order-preserving uint32 keys of x (4 passes of 8
//        bits). One routine finds the smallest key v* with W(key > v*) < T: weights 1 and T = k
//        give the k-th largest value (top-k); weights exp(x - max) over the top-k set and
//        T = top_p * total give the top-p cut (the largest value is always kept: T <= 0 gives
//        v* = max). Kept: key(x) >= v*. Histograms: one 256-bin copy per warp in shared
//        memory; a warp's lanes that fall into one bin are summed first (__match_any_sync and
//        a peer reduction) and their lowest lane adds the sum with a plain read-modify-write,
//        so no atomics (64-bit shared atomics are compare-and-swap loops, and top-k's first
//        digit, sign and top exponent bits, puts the row into a few bins); lanes without an
//        item are single-lane groups.
//     3. the draw: the smallest index whose running sum of kept weights exceeds u * total, a
//        block-wide prefix sum over chunks of 2048 indices in index order.
//   Determinism: the weights exp(x - max) (fp32 exp, in (0, 1]) are summed as 64-bit fixed point
//   (x 2^S, S = 63 - ceil(log2 V), 2^-45 for V = 150k): integer sums are exact whatever their
//   order, so histograms, totals and the prefix sums of the draw are bit-reproducible run to
//   run; the draw target floor(u * total) is below the total, so the token is always a kept
//   index in [0, V). The result differs from the fp64 reference only where u * total lies
//   within rounding (fp32 exp, the 2^-S quantum) of a CDF step, or the top-p mass of a value
//   lies within that rounding of top_p * total.
#pragma once

#include <cmath>
#include <map>
#include <mutex>

#include "mmfast/cuda/common.cuh"
#include "mmfast/cuda/decode/append.cuh"
#include "mmfast/decode.h"

namespace mmfast {
namespace cuda {
namespace decodek {

using u64 = unsigned long long;    // the type of CUDA's 64-bit atomicAdd and shuffles
constexpr int kDrawPerThread = 8;  // consecutive indices per thread in a draw chunk

// The fp32 logits of one output row, mixed (CFG) and divided by the temperature on the fly.
template <class T> struct SampleRow {
  const T* cond;
  const T* uncond;  // nullptr without CFG
  float cfg_scale;
  __device__ __forceinline__ float mixed(int64_t i) const {
    const float c = to_f32(cond[i]);
    if (uncond == nullptr) return c;
    const float u = to_f32(uncond[i]);
    return add_rn(u, mul_rn(c - u, cfg_scale));  // uncond + (cond - uncond) * scale, no FMA
  }
};

constexpr int kSampleWarps = kThreads / 32;
constexpr uint32_t kNoBin = 256;  // the bin of a lane without an item in a histogram pass
constexpr int kSampleItems = 4;   // items per thread whose bins a histogram pass computes together

struct SampleShared {
  u64* warp_hist;  // kSampleWarps x 256 bins, one histogram per warp
  u64* scratch;    // 32
  int* sel_bin;
  u64* sel_above;
  u64* sel_kept;
};

// Adds weight w to bin `bin` (kNoBin: nothing) of this warp's histogram; all 32 lanes call it
// together. One plain read-modify-write per distinct bin, by the bin's lowest lane (the warp
// owns its histogram; the leaders' bins differ); Counts: every weight is 1 (a popcount).
template <bool Counts>
__device__ __forceinline__ void warp_histogram_add(u64* hist, uint32_t bin, u64 w) {
  // Every lane takes part in the match (full mask); lanes without an item then count as
  // single-lane groups: many of them (most lanes of a top-p pass, where weights underflow to 0)
  // would otherwise make the peer sum run all 5 rounds.
  unsigned peers = __match_any_sync(0xffffffffu, bin);
  if (bin == kNoBin) peers = 1u << (threadIdx.x & 31);
  const u64 sum = Counts ? static_cast<u64>(__popc(peers)) : warp_sum_peers(peers, w);
  if (bin != kNoBin && __ffs(peers) - 1 == static_cast<int>(threadIdx.x & 31)) hist[bin] += sum;
  __syncwarp();  // the next item's leader of this bin may be another lane
}

// v* and the weight of the elements whose key is >= v* (the kept total).
struct RadixCut {
  uint32_t key;
  u64 kept;
};

// The smallest key v* with (sum of the weights of the elements whose key > v*) < T, over the
// elements i in [0, n) for which item(i, key, weight) returns true (Counts: weight 1 each), with
// T = target(total weight of those elements), known after the first digit's histogram. Needs
// T > 0 (then the answer is the key of an element of positive weight, or the smallest key of
// the lowest bucket when the total is below T). Block-uniform arguments; every thread calls it,
// with blockDim.x == 256 (a thread per bin).
template <bool Counts, class Item, class Target>
__device__ RadixCut radix_threshold(int64_t n, Item item, Target target, const SampleShared& sh) {
  u64* hist = sh.warp_hist + (threadIdx.x >> 5) * 256;
  uint32_t prefix = 0;
  double T = 0.0;
  u64 above = 0;  // weight of the elements whose key is above the prefix's range
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
    for (int b = threadIdx.x; b < kSampleWarps * 256; b += blockDim.x) sh.warp_hist[b] = 0;
    __syncthreads();
    // Whole warps in every iteration; kSampleItems items' bins first, then their updates, so
    // their loads are in flight together where the row is re-read from global memory.
    for (int64_t base = 0; base < n; base += int64_t(blockDim.x) * kSampleItems) {
      uint32_t bins[kSampleItems];
      u64 ws[kSampleItems];
#pragma unroll
      for (int e = 0; e < kSampleItems; ++e) {
        const int64_t i = base + int64_t(e) * blockDim.x + threadIdx.x;
        uint32_t key = 0;
        bins[e] = kNoBin, ws[e] = 0;
        if (i < n && item(i, key, ws[e]) && ws[e] != 0 && (key & high) == prefix) bins[e] = (key >> shift) & 255u;
      }
#pragma unroll
      for (int e = 0; e < kSampleItems; ++e) warp_histogram_add<Counts>(hist, bins[e], ws[e]);
    }
    __syncthreads();
    const int bin = 255 - static_cast<int>(threadIdx.x);  // thread order = descending bins
    u64 h = 0;
    for (int w = 0; w < kSampleWarps; ++w) h += sh.warp_hist[w * 256 + bin];
    u64 total;
    const u64 above_bin = above + block_exclusive_sum(h, sh.scratch, total);  // keys above this bin
    if (shift == 24) T = target(total);  // the first digit's bins hold every element
    // W(> top of bin) = above_bin is non-increasing in bin: the smallest qualifying bin is the one
    // whose lower neighbour does not qualify. above < T holds on entry, so bin 255 qualifies.
    const bool ok = static_cast<double>(above_bin) < T;
    const bool ok_below = bin > 0 && static_cast<double>(above_bin + h) < T;
    if (ok && !ok_below) {
      *sh.sel_bin = bin;
      *sh.sel_above = above_bin;
      *sh.sel_kept = above_bin + h;  // at the last digit the bin is the key v* itself
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(*sh.sel_bin) << shift;
    above = *sh.sel_above;
  }
  return {prefix, *sh.sel_kept};  // read before any later call writes it (barriers between)
}

// staged: the row's mixed logits, then x, go to dynamic shared memory (V floats; launch_sample).
// One block per row, few rows: (256, 1) lets ptxas take 76 registers without spills (left to
// itself it took 48 and spilled 12 B around the division's slow-path calls).
template <class T>
__global__ void __launch_bounds__(kThreads, 1) sample_kernel(SampleParams p, int staged) {
  __shared__ u64 warp_hist[kSampleWarps * 256];
  __shared__ u64 scratch_u[32];
  __shared__ float scratch_f[32];
  __shared__ int scratch_i[32];
  __shared__ long long scratch_l[32];
  __shared__ int sel_bin;
  __shared__ u64 sel_above, sel_kept;
  __shared__ long long sel_token;
  MMFAST_DYNAMIC_SHARED(dynamic_smem);
  float* const stage = staged ? reinterpret_cast<float*>(dynamic_smem) : nullptr;
  const SampleShared sh{warp_hist, scratch_u, &sel_bin, &sel_above, &sel_kept};
  const int tid = threadIdx.x;
  const int64_t V = p.vocab;
  int bits = 0;
  while (bits < 62 && (int64_t(1) << bits) < V) ++bits;
  const int S = 63 - bits > 62 ? 62 : 63 - bits;  // V * 2^S <= 2^63: no sum overflows
  const float unit = static_cast<float>(u64(1) << S);
  const T* logits = static_cast<const T*>(p.logits);
  const float inf = INFINITY;
  const auto fmax_op = [](float a, float b) { return a > b ? a : b; };
  const auto imax_op = [](int a, int b) { return a > b ? a : b; };
  const auto lmin_op = [](long long a, long long b) { return a < b ? a : b; };
  const auto lmax_op = [](long long a, long long b) { return a > b ? a : b; };
  const auto sum_op = [](u64 a, u64 b) { return a + b; };

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    SampleRow<T> rd;
    rd.cond = logits + row * p.row_stride;
    rd.uncond = p.cfg ? logits + (p.rows + row) * p.row_stride : nullptr;
    rd.cfg_scale = p.cfg_scale;
    // 1. validity and the maximum of the mixed logits.
    float mx = -inf;
    int bad = 0;
#pragma unroll 8  // loads in flight: the logits are read from global memory here
    for (int64_t i = tid; i < V; i += kThreads) {
      const float x = rd.mixed(i);
      if (stage != nullptr) stage[i] = x;
      if (!(x == x) || x == inf) bad = 1;
      else if (x > mx) mx = x;
    }
    bad = block_allreduce(bad, imax_op, scratch_i);
    mx = block_allreduce(mx, fmax_op, scratch_f);
    // Block-uniform: the staged row (visible after the reductions' barriers) or the logits.
    const auto mixed = [&](int64_t i) { return stage != nullptr ? stage[i] : rd.mixed(i); };
    if (bad || mx == -inf) {
      if (tid == 0) {
        p.tokens[row] = 0;
        p.status[row] = 1;
      }
      continue;
    }
    if (p.temperature == 0.0f) {  // greedy: the first index of the maximum
      long long first = V;
      for (int64_t i = tid; i < V; i += kThreads)
        if (mixed(i) == mx) {
          first = i;
          break;
        }
      first = block_allreduce(first, lmin_op, scratch_l);
      if (tid == 0) {
        p.tokens[row] = first < V ? first : 0;
        p.status[row] = 0;
      }
      continue;
    }
    const float temperature = p.temperature;
    const float m = mx / temperature;  // = max of x / temperature (rounding is monotone)
    if (stage != nullptr) {  // divided once: later passes read x itself
      for (int64_t i = tid; i < V; i += kThreads) stage[i] = stage[i] / temperature;
      __syncthreads();
    }
    const auto value = [&](int64_t i) { return stage != nullptr ? stage[i] : rd.mixed(i) / temperature; };
    const auto weight = [&](float x) -> u64 {
      const float w = x == m ? 1.0f : expf(x - m);  // x == m also covers m = +inf after scaling
      return static_cast<u64>(w * unit);
    };
    const auto kept_total = [&](uint32_t thr) {
      u64 s = 0;
#pragma unroll 8  // loads in flight where the row is re-read
      for (int64_t i = tid; i < V; i += kThreads) {
        const float x = value(i);
        if (ordered_key(x) >= thr) s += weight(x);
      }
      return block_allreduce(s, sum_op, scratch_u);
    };
    // 2. top-k: the k-th largest value; then top-p over the top-k set. total: the kept weight,
    // from the top-p cut's last digit, else one more pass.
    uint32_t thr = 0;
    if (p.top_k > 0 && p.top_k < V) {
      thr = radix_threshold<true>(
                V,
                [&](int64_t i, uint32_t& key, u64& w) {
                  key = ordered_key(value(i));
                  w = 1;
                  return true;
                },
                [&](u64) { return static_cast<double>(p.top_k); }, sh)
                .key;
    }
    u64 total;
    if (p.top_p < 1.0f && p.top_p > 0.0) {
      const uint32_t thr_k = thr;
      const RadixCut cut = radix_threshold<false>(
          V,
          [&](int64_t i, uint32_t& key, u64& w) {
            const float x = value(i);
            key = ordered_key(x);
            if (key < thr_k) return false;
            w = weight(x);
            return true;
          },
          [&](u64 top_k_total) { return static_cast<double>(p.top_p) * static_cast<double>(top_k_total); }, sh);
      thr = cut.key;
      total = cut.kept;
    } else {
      if (p.top_p < 1.0f) thr = ordered_key(m);  // top_p = 0: the largest value (and its ties) only
      total = kept_total(thr);
    }
    // 3. the draw: the smallest index whose running kept sum exceeds floor(u * total) < total.
    const float u = p.uniform[row];
    u64 target = u > 0.0f ? static_cast<u64>(static_cast<double>(u) * static_cast<double>(total)) : 0;
    if (target >= total) target = total - 1;  // total >= 2^S > 0: the maximum has weight 1
    long long token = -1;
    u64 running = 0;
    for (int64_t base = 0; base < V; base += int64_t(kThreads) * kDrawPerThread) {
      const int64_t seg = base + int64_t(tid) * kDrawPerThread;
      u64 s = 0;
      for (int e = 0; e < kDrawPerThread; ++e) {
        const int64_t i = seg + e;
        if (i >= V) break;
        const float x = value(i);
        if (ordered_key(x) >= thr) s += weight(x);
      }
      u64 chunk;
      const u64 before = running + block_exclusive_sum(s, scratch_u, chunk);
      if (running + chunk > target) {  // block-uniform: the step is in this chunk
        if (before <= target && before + s > target) {  // ... in this thread's segment
          u64 r = before;
          for (int e = 0; e < kDrawPerThread; ++e) {
            const int64_t i = seg + e;
            if (i >= V) break;
            const float x = value(i);
            if (ordered_key(x) >= thr) r += weight(x);
            if (r > target) {
              sel_token = i;
              break;
            }
          }
        }
        __syncthreads();
        token = sel_token;
        break;
      }
      running += chunk;
    }
    if (token < 0) {  // not reachable with exact sums; the last kept index keeps the token in range
      long long last = -1;
      for (int64_t i = tid; i < V; i += kThreads)
        if (ordered_key(value(i)) >= thr) last = i;
      last = block_allreduce(last, lmax_op, scratch_l);
      token = last >= 0 && last < V ? last : 0;
    }
    if (tid == 0) {
      p.tokens[row] = token >= 0 && token < V ? token : 0;
      p.status[row] = 0;
    }
  }
}

// The dynamic shared memory that stages a row of V mixed logits: V floats (rounded up to a
// multiple of kDrawPerThread) when the device
// grants them to a block of sample_kernel<T> next to its static histograms, else 0 (the passes
// re-read the logits). The size check needs the kernel's static shared memory, queried once per
// device; only a failing CUDA query (its own error, then cleared) leaves 0 unremembered.
template <class T>
size_t sample_stage_bytes(int64_t V) {
  if (V < 1 || V > static_cast<int64_t>(max_shared_per_block() / sizeof(float))) return 0;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  static std::mutex mutex;
  static std::map<int, size_t> static_smem;  // per device
  size_t histograms = 0;
  bool known = false;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = static_smem.find(dev);
    if (found != static_smem.end()) histograms = found->second, known = true;
  }
  if (!known) {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(sample_kernel<T>)) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    histograms = attributes.sharedSizeBytes;
    const std::lock_guard<std::mutex> lock(mutex);
    static_smem.emplace(dev, histograms);
  }
  // Rounded up to whole draw segments: the compiler turns a thread's 8 consecutive staged reads
  // in the draw into 16-byte loads that run past V before the loop's bound check (compute-
  // sanitizer memcheck on the H200 saw them read out of bounds when V was not a multiple of 8).
  const size_t bytes = static_cast<size_t>(round_up(V, kDrawPerThread)) * sizeof(float);
  if (bytes + histograms > max_shared_per_block()) return 0;  // more than a block may opt in to
  if (resident_blocks_per_sm_once(sample_kernel<T>, kThreads, bytes) < 1) {
    (void)cudaGetLastError();  // the occupancy query's own error
    return 0;
  }
  return bytes;
}

template <class T>
cudaError_t launch_sample(const SampleParams& p, cudaStream_t stream) {
  const size_t stage = sample_stage_bytes<T>(p.vocab);
  MMFAST_LAUNCH(sample_kernel<T>, grid_for(p.rows), kThreads, stage, stream, p, stage > 0 ? 1 : 0);
  return cudaGetLastError();
}

}  // namespace decodek
}  // namespace cuda
}  // namespace mmfast
