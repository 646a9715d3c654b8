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
//   sample_cluster_kernel  the same passes with each row split over a thread-block cluster (sm_90;
//     up to 16 blocks): a block stages and scans its slice of V / blocks indices;
//     where one block reduces a value over the row, the cluster's blocks exchange their block
//     results through distributed shared memory (one cluster barrier each: the max, every radix
//     digit's 256 bins, the draw's slice totals) and combine them in rank order, so every block
//     takes the same decisions and the token is the same integer result as one block's. The
//     block whose slice holds the draw's CDF step writes the token. A row of batch 4 keeps 4 x 16
//     SMs busy instead of 4 (launch_sample's plan; MMFAST_CUDA_SAMPLE_CLUSTERS=0 turns it off).
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

// The shared memory a block's passes use (static arrays in sample_kernel; carved from dynamic
// shared memory in sample_cluster_kernel, whose blocks read each other's).
struct SampleShared {
  u64* warp_hist;  // kSampleWarps x 256 bins, one histogram per warp
  u64* scratch_u;  // 32 each: block reductions
  float* scratch_f;
  int* scratch_i;
  long long* scratch_l;
  int* sel_bin;  // the radix digit's selected bin, and the weights above it / kept with it
  u64* sel_above;
  u64* sel_kept;
  long long* sel_token;
  bool atomic_counts;  // top-k's counting passes add with 32-bit shared atomics (sample_atomic_counts)
};

__device__ __forceinline__ uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}
__device__ __forceinline__ float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}

constexpr unsigned kMaxSampleClusterBlocks = 16;  // sm_90's largest (non-portable above 8) cluster

// The indices [begin, end) of a row that one block scans, and how its block results meet the
// other blocks' of the row. Clustered = false: the block has the whole row (gather passes its
// own value). Clustered: block `rank` of a cluster, whose blocks exchange one u64 per thread
// (common.cuh's ClusterExchange: f(rank, value) for every block's value in rank order). Every
// thread of every block calls gather in the same sequence (block-uniform arguments where
// callers combine block results).
template <bool Clustered> struct RowSpan {
  int64_t begin = 0, end = 0;
  unsigned rank = 0;
  ClusterExchange<kMaxSampleClusterBlocks> exchange;  // 2 x kThreads slots of dynamic shared memory
  __device__ __forceinline__ bool leader() const { return rank == 0 && threadIdx.x == 0; }
  template <class F> __device__ __forceinline__ void gather(u64 mine, F f) {
    if (Clustered) exchange.gather(mine, f);
    else f(0u, mine);
  }
};

// Adds weight w to bin `bin` (kNoBin: nothing) of this warp's histogram; all 32 lanes call it
// together. One plain read-modify-write per distinct bin, by the bin's lowest lane (the warp
// owns its histogram; the leaders' bins differ); Counts: every weight is 1 (a popcount).
template <bool Counts>
__device__ __forceinline__ void warp_histogram_add(u64* hist, uint32_t bin, u64 w, bool atomic_counts) {
  // Counts with atomic_counts: one native 32-bit shared-memory add per item into the bin's low
  // word (a count stays below V < 2^31, so the high word stays 0; little-endian), no match and
  // no dependent chain; integer adds are exact in any order. A warp's lanes that share a bin
  // are serialised by the hardware (top-k's first digit puts the row into a few bins).
  if (Counts && atomic_counts) {
    if (bin != kNoBin) atomicAdd(reinterpret_cast<unsigned*>(hist + bin), 1u);
    return;
  }
  // A warp without an item skips the match (a vote instead of about 300 cycles of dependent
  // match, peer sum and read-modify-write): most warps of a top-p pass (weights that underflow
  // to 0, keys under the top-k cut) and the items past the end of a short slice. Warp-uniform.
  if (!__any_sync(0xffffffffu, bin != kNoBin)) return;
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
// row's elements i for which item(i, key, weight) returns true (Counts: weight 1 each), with
// T = target(total weight of those elements), known after the first digit's histogram. Needs
// T > 0 (then the answer is the key of an element of positive weight, or the smallest key of
// the lowest bucket when the total is below T). This block counts the indices of its span;
// each digit's bins are summed over the span's blocks. Block-uniform arguments; every thread
// calls it, with blockDim.x == 256 (a thread per bin).
template <bool Counts, bool Clustered, class Item, class Target>
__device__ RadixCut radix_threshold(RowSpan<Clustered>& span, Item item, Target target, const SampleShared& sh) {
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
    for (int64_t base = span.begin; base < span.end; base += int64_t(blockDim.x) * kSampleItems) {
      uint32_t bins[kSampleItems];
      u64 ws[kSampleItems];
#pragma unroll
      for (int e = 0; e < kSampleItems; ++e) {
        const int64_t i = base + int64_t(e) * blockDim.x + threadIdx.x;
        uint32_t key = 0;
        bins[e] = kNoBin, ws[e] = 0;
        if (i < span.end && item(i, key, ws[e]) && ws[e] != 0 && (key & high) == prefix) bins[e] = (key >> shift) & 255u;
      }
#pragma unroll
      for (int e = 0; e < kSampleItems; ++e) warp_histogram_add<Counts>(hist, bins[e], ws[e], sh.atomic_counts);
    }
    __syncthreads();
    const int bin = 255 - static_cast<int>(threadIdx.x);  // thread order = descending bins
    u64 mine = 0;
    for (int w = 0; w < kSampleWarps; ++w) mine += sh.warp_hist[w * 256 + bin];
    u64 h = 0;  // the bin over the row: this block's, or the sum of every block's in rank order
    span.gather(mine, [&](unsigned, u64 v) { h += v; });
    u64 total;
    const u64 above_bin = above + block_exclusive_sum(h, sh.scratch_u, total);  // keys above this bin
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

// Samples row `row` (mmfast/decode.h): its tokens / status entries are written by the span's
// leader (invalid and greedy rows) or by the block whose indices hold the draw. stage: the
// span's mixed logits, then x, as floats (a multiple of kDrawPerThread of them), or nullptr
// (re-read from the logits in every pass).
template <class T, bool Clustered>
__device__ void sample_row(const SampleParams& p, int64_t row, RowSpan<Clustered>& span, float* stage,
                           const SampleShared& sh) {
  const int tid = threadIdx.x;
  const int64_t V = p.vocab, b0 = span.begin, b1 = span.end;
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

  SampleRow<T> rd;
  rd.cond = logits + row * p.row_stride;
  rd.uncond = p.cfg ? logits + (p.rows + row) * p.row_stride : nullptr;
  rd.cfg_scale = p.cfg_scale;
  // 1. validity and the maximum of the mixed logits.
  float mx = -inf;
  int bad = 0;
#pragma unroll 8  // loads in flight: the logits are read from global memory here
  for (int64_t i = b0 + tid; i < b1; i += kThreads) {
    const float x = rd.mixed(i);
    if (stage != nullptr) stage[i - b0] = x;
    if (!(x == x) || x == inf) bad = 1;
    else if (x > mx) mx = x;
  }
  bad = block_allreduce(bad, imax_op, sh.scratch_i);
  mx = block_allreduce(mx, fmax_op, sh.scratch_f);
  if (Clustered) {  // the flag and the maximum's bits in one exchange
    const u64 mine = (static_cast<u64>(bad) << 32) | float_bits(mx);
    span.gather(mine, [&](unsigned, u64 v) {
      bad = imax_op(bad, static_cast<int>(v >> 32));
      mx = fmax_op(mx, bits_float(static_cast<uint32_t>(v)));
    });
  }
  // Block-uniform: the staged row (visible after the reductions' barriers) or the logits.
  const auto mixed = [&](int64_t i) { return stage != nullptr ? stage[i - b0] : rd.mixed(i); };
  if (bad || mx == -inf) {
    if (span.leader()) {
      p.tokens[row] = 0;
      p.status[row] = 1;
    }
    return;
  }
  if (p.temperature == 0.0f) {  // greedy: the first index of the maximum
    long long first = V;
    for (int64_t i = b0 + tid; i < b1; i += kThreads)
      if (mixed(i) == mx) {
        first = i;
        break;
      }
    first = block_allreduce(first, lmin_op, sh.scratch_l);
    if (Clustered) span.gather(static_cast<u64>(first), [&](unsigned, u64 v) { first = lmin_op(first, static_cast<long long>(v)); });
    if (span.leader()) {
      p.tokens[row] = first < V ? first : 0;
      p.status[row] = 0;
    }
    return;
  }
  const float temperature = p.temperature;
  const float m = mx / temperature;  // = max of x / temperature (rounding is monotone)
  if (stage != nullptr) {  // divided once: later passes read x itself
    for (int64_t i = b0 + tid; i < b1; i += kThreads) stage[i - b0] = stage[i - b0] / temperature;
    __syncthreads();
  }
  const auto value = [&](int64_t i) { return stage != nullptr ? stage[i - b0] : rd.mixed(i) / temperature; };
  const auto weight = [&](float x) -> u64 {
    const float w = x == m ? 1.0f : expf(x - m);  // x == m also covers m = +inf after scaling
    return static_cast<u64>(w * unit);
  };
  const auto kept_sum = [&](uint32_t thr) {  // the kept weight of this block's indices
    u64 s = 0;
#pragma unroll 8  // loads in flight where the row is re-read
    for (int64_t i = b0 + tid; i < b1; i += kThreads) {
      const float x = value(i);
      if (ordered_key(x) >= thr) s += weight(x);
    }
    return block_allreduce(s, sum_op, sh.scratch_u);
  };
  // 2. top-k: the k-th largest value; then top-p over the top-k set. total: the kept weight,
  // from the top-p cut's last digit, else one more pass.
  uint32_t thr = 0;
  if (p.top_k > 0 && p.top_k < V) {
    thr = radix_threshold<true>(
              span,
              [&](int64_t i, uint32_t& key, u64& w) {
                key = ordered_key(value(i));
                w = 1;
                return true;
              },
              [&](u64) { return static_cast<double>(p.top_k); }, sh)
              .key;
  }
  u64 total = 0;
  bool have_total = false;
  if (p.top_p < 1.0f && p.top_p > 0.0) {
    const uint32_t thr_k = thr;
    const RadixCut cut = radix_threshold<false>(
        span,
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
    have_total = true;
  } else if (p.top_p < 1.0f) {
    thr = ordered_key(m);  // top_p = 0: the largest value (and its ties) only
  }
  // The kept weight before this block's indices, and this block's own (clustered: one exchange
  // of the blocks' sums; the sum over all blocks is the total when top-p did not give it).
  u64 before = 0, own = 0;
  if (Clustered) {
    own = kept_sum(thr);
    u64 all = 0;
    span.gather(own, [&](unsigned r, u64 v) {
      all += v;
      if (r < span.rank) before += v;
    });
    if (!have_total) total = all;
  } else if (!have_total) {
    total = kept_sum(thr);
  }
  // 3. the draw: the smallest index whose running kept sum exceeds floor(u * total) < total.
  const float u = p.uniform[row];
  u64 target = u > 0.0f ? static_cast<u64>(static_cast<double>(u) * static_cast<double>(total)) : 0;
  if (target >= total) target = total - 1;  // total >= 2^S > 0: the maximum has weight 1
  if (Clustered && !(before <= target && target - before < own)) return;  // the step is in another block's indices
  long long token = -1;
  u64 running = before;
  for (int64_t base = b0; base < b1; base += int64_t(kThreads) * kDrawPerThread) {
    const int64_t seg = base + int64_t(tid) * kDrawPerThread;
    u64 s = 0;
    for (int e = 0; e < kDrawPerThread; ++e) {
      const int64_t i = seg + e;
      if (i >= b1) break;
      const float x = value(i);
      if (ordered_key(x) >= thr) s += weight(x);
    }
    u64 chunk;
    const u64 chunk_before = running + block_exclusive_sum(s, sh.scratch_u, chunk);
    if (running + chunk > target) {  // block-uniform: the step is in this chunk
      if (chunk_before <= target && chunk_before + s > target) {  // ... in this thread's segment
        u64 r = chunk_before;
        for (int e = 0; e < kDrawPerThread; ++e) {
          const int64_t i = seg + e;
          if (i >= b1) break;
          const float x = value(i);
          if (ordered_key(x) >= thr) r += weight(x);
          if (r > target) {
            *sh.sel_token = i;
            break;
          }
        }
      }
      __syncthreads();
      token = *sh.sel_token;
      break;
    }
    running += chunk;
  }
  if (token < 0) {  // not reachable with exact sums; the last kept index keeps the token in range
    long long last = -1;
    for (int64_t i = b0 + tid; i < b1; i += kThreads)
      if (ordered_key(value(i)) >= thr) last = i;
    last = block_allreduce(last, lmax_op, sh.scratch_l);
    token = last >= 0 && last < V ? last : 0;
  }
  if (tid == 0) {
    p.tokens[row] = token >= 0 && token < V ? token : 0;
    p.status[row] = 0;
  }
}

// One block per row. staged: the row's mixed logits, then x, go to dynamic shared memory (V
// floats; launch_sample). Few rows: (256, 1) lets ptxas take 76 registers without spills (left
// to itself it took 48 and spilled 12 B around the division's slow-path calls).
template <class T>
__global__ void __launch_bounds__(kThreads, 1) sample_kernel(SampleParams p, int staged, int atomic_counts) {
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
  const SampleShared sh{warp_hist, scratch_u, scratch_f, scratch_i,  scratch_l,
                        &sel_bin,  &sel_above, &sel_kept, &sel_token, atomic_counts != 0};
  RowSpan<false> span;
  span.end = p.vocab;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) sample_row<T>(p, row, span, stage, sh);
}

// The dynamic shared memory of a sample_cluster_kernel block in front of its staged slice:
// exchange slots, warp histograms, scratch and selections (128-byte multiples).
constexpr size_t kClusterExchangeBytes = 2 * kThreads * sizeof(u64);
constexpr size_t kClusterHistBytes = kSampleWarps * 256 * sizeof(u64);
constexpr size_t kClusterScratchBytes = 32 * (sizeof(u64) + sizeof(long long) + sizeof(float) + sizeof(int)) + 128;
constexpr size_t kClusterSharedBytes = kClusterExchangeBytes + kClusterHistBytes + kClusterScratchBytes;

// Row `cluster`, `cluster + clusters`, ... over the blocks of one cluster: block `rank` scans and
// stages indices [rank * slice, (rank + 1) * slice) of V (slice a multiple of kDrawPerThread).
// Everything a peer reads lives in dynamic shared memory (the emulator runs a cluster's blocks
// together and has one copy of each static __shared__ variable).
template <class T>
__global__ void __launch_bounds__(kThreads, 1) sample_cluster_kernel(SampleParams p, int64_t slice, int atomic_counts) {
  MMFAST_DYNAMIC_SHARED(dynamic_smem);
  // Constant offsets (a running pointer made ptxas lose the shared state space: generic loads).
  constexpr size_t kHist = kClusterExchangeBytes, kScratchU = kHist + kClusterHistBytes;
  constexpr size_t kScratchL = kScratchU + 32 * sizeof(u64), kScratchF = kScratchL + 32 * sizeof(long long);
  constexpr size_t kScratchI = kScratchF + 32 * sizeof(float), kSel = kScratchI + 32 * sizeof(int);
  static_assert(kSel + 4 * sizeof(u64) <= kClusterSharedBytes, "the selections fit in front of the stage");
  RowSpan<true> span;
  span.exchange.slots = reinterpret_cast<u64*>(dynamic_smem);
  u64* const sel = reinterpret_cast<u64*>(dynamic_smem + kSel);  // above, kept, token, bin
  const SampleShared sh{reinterpret_cast<u64*>(dynamic_smem + kHist),
                        reinterpret_cast<u64*>(dynamic_smem + kScratchU),
                        reinterpret_cast<float*>(dynamic_smem + kScratchF),
                        reinterpret_cast<int*>(dynamic_smem + kScratchI),
                        reinterpret_cast<long long*>(dynamic_smem + kScratchL),
                        reinterpret_cast<int*>(sel + 3),
                        sel,
                        sel + 1,
                        reinterpret_cast<long long*>(sel + 2),
                        atomic_counts != 0};
  float* const stage = reinterpret_cast<float*>(dynamic_smem + kClusterSharedBytes);
  span.rank = cluster_block_rank();
  span.exchange.blocks = cluster_block_count();
  span.begin = min_i64(p.vocab, static_cast<int64_t>(span.rank) * slice);
  span.end = min_i64(p.vocab, span.begin + slice);
  const int64_t clusters = gridDim.x / span.exchange.blocks, cluster = blockIdx.x / span.exchange.blocks;
  for (int64_t row = cluster; row < p.rows; row += clusters) sample_row<T>(p, row, span, stage, sh);
  cluster_barrier();  // a peer may still read this block's exchange slots
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

// MMFAST_CUDA_SAMPLE_CLUSTERS=0 keeps sample on one block per row (for A/B timing).
inline bool sample_clusters_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_SAMPLE_CLUSTERS");
  return enabled;
}

constexpr int64_t kMinClusterSlice = 512;  // indices per block below which more blocks mostly add exchanges

// How launch_sample runs: cluster_blocks blocks per row (1: sample_kernel), each scanning `slice`
// indices, with `smem` bytes of dynamic shared memory.
struct SamplePlan {
  unsigned cluster_blocks = 1;
  int64_t slice = 0;
  size_t smem = 0;
};

// sample_cluster_kernel's plan for rows of V split over `blocks` blocks (their slices whole
// draw segments), whether or not it fits.
inline SamplePlan sample_cluster_plan(int64_t V, unsigned blocks) {
  SamplePlan plan;
  plan.cluster_blocks = blocks;
  plan.slice = round_up(ceil_div(V, blocks), kDrawPerThread);
  plan.smem = kClusterSharedBytes + static_cast<size_t>(plan.slice) * sizeof(float);
  return plan;
}

// Clusters of the plan the device holds at once (queried once per device, size and shared
// memory; a failed query gives 0, remembered too: not re-run, and its error not cleared again,
// on every call).
template <class T>
int sample_resident_clusters(const SamplePlan& plan) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  using Key = std::tuple<int, unsigned, size_t>;
  static std::mutex mutex;
  static std::map<Key, int> known;
  const Key key{dev, plan.cluster_blocks, plan.smem};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(key);
    if (found != known.end()) return found->second;
  }
  const int queried = resident_clusters(sample_cluster_kernel<T>, plan.cluster_blocks, kThreads, plan.smem);
  const int clusters = queried < 0 ? 0 : queried;
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(key, clusters);
  return clusters;
}

// Clusters on sm_90, the largest (up to 16 blocks per row: batch 4 on an H200) whose rows all
// run at once (rows x blocks within the SMs, and as many clusters resident: a GPC holds whole
// clusters) with at least kMinClusterSlice indices per block, staged; else one block per row.
template <class T>
SamplePlan sample_plan(int64_t rows, int64_t V) {
  // compiled_for: a binary JIT-compiled from older PTX (an "8.0+PTX" build on a newer GPU) holds
  // the pre-sm_90 body of the cluster helpers, a trap.
  if (sample_clusters_enabled() && compute_capability_major() >= 9 && compiled_for(sample_cluster_kernel<T>, 90)) {
    const int64_t sms = sm_count();
    for (unsigned blocks = kMaxSampleClusterBlocks; blocks >= 2; blocks /= 2) {
      if (rows * blocks > sms || ceil_div(V, blocks) < kMinClusterSlice) continue;
      const SamplePlan plan = sample_cluster_plan(V, blocks);
      if (plan.smem <= max_shared_per_block() && sample_resident_clusters<T>(plan) >= rows) return plan;
    }
  }
  SamplePlan plan;
  plan.slice = V;
  plan.smem = sample_stage_bytes<T>(V);
  return plan;
}

// MMFAST_CUDA_SAMPLE_ATOMIC_COUNTS=0 keeps top-k's counting passes on the warp match and peer
// count (for A/B timing): both give the same counts.
inline bool sample_atomic_counts_enabled() {
  static const bool enabled = env_switch_on("MMFAST_CUDA_SAMPLE_ATOMIC_COUNTS");
  return enabled;
}

template <class T>
cudaError_t launch_sample_plan(const SampleParams& p, const SamplePlan& plan, cudaStream_t stream) {
  const int atomic_counts = sample_atomic_counts_enabled() && p.vocab < (int64_t(1) << 31) ? 1 : 0;
  if (plan.cluster_blocks > 1) {
    const cudaError_t err = MMFAST_LAUNCH_CLUSTERS(sample_cluster_kernel<T>, grid_for(p.rows), plan.cluster_blocks,
                                                   kThreads, plan.smem, stream, p, plan.slice, atomic_counts);
    return err != cudaSuccess ? err : cudaGetLastError();
  }
  MMFAST_LAUNCH(sample_kernel<T>, grid_for(p.rows), kThreads, plan.smem, stream, p, plan.smem > 0 ? 1 : 0,
                atomic_counts);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_sample(const SampleParams& p, cudaStream_t stream) {
  return launch_sample_plan<T>(p, sample_plan<T>(p.rows, p.vocab), stream);
}

}  // namespace decodek
}  // namespace cuda
}  // namespace mmfast
