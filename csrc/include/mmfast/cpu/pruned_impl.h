// CPU masked_group_norm, written once and compiled per ISA (torch-free). Per-ISA code, included
// only through mmfast/cpu/instantiate_isas.h (see csrc/cpu/pruned_kernels.cpp).
//
// One task per (sample, group): the mean over the group's kept channels, then the variance
// around it (two passes over the group, which a task's cache still holds for the second: no
// cancellation in E[x^2] - mean^2), then one pass that writes every channel of the group
// (kept: normalised, affine, optional SiLU; masked: 0). fp32 / fp16 / bf16 run in fp32 vector
// lanes (sums flushed to double every kSumBlock elements; SiLU by exp_vec), fp64 in scalar
// double.
#ifndef MMFAST_CPU_ISA_NS
#error "mmfast/cpu/pruned_impl.h is included by mmfast/cpu/instantiate_isas.h only"
#endif

namespace mmfast {
namespace cpu {
namespace MMFAST_CPU_ISA_NS {
namespace pruned {  // this family's names, apart from other families' in the same ISA namespace

inline float exp_acc(float x) { return __builtin_expf(x); }
inline double exp_acc(double x) { return __builtin_exp(x); }

inline int64_t code_of(const CodeRouting& r, int64_t b) {
  return r.code_bytes == 8 ? static_cast<const int64_t*>(r.sample_codes)[b]
                           : static_cast<const int32_t*>(r.sample_codes)[b];
}

// ---- per-channel loops: fp32 vector lanes for fp32 / fp16 / bf16, scalar double for fp64 ----
using FloatVec = Vec<float>::type;
constexpr int64_t kFloatLanes = Vec<float>::width;
constexpr int64_t kSumBlock = 1024;  // elements summed in float lanes before the total (double) takes them

// load_floats / store_floats: simd.h's (fp32 lanes from and to fp32, fp16 and bf16).
inline float lane_sum(FloatVec v) {
  float lanes[kFloatLanes];
  store<float>(lanes, v);
  float total = 0;
  for (int64_t k = 0; k < kFloatLanes; ++k) total += lanes[k];
  return total;
}

// The sum over x[0, n) of x - shift (Square false) or (x - shift)^2 (Square true): four vector
// accumulators over each block of kSumBlock elements (16 terms per lane with AVX-512), every
// block's total added in double (a float running sum over a ~10^5-element group would lose
// ~10^-4 relative).
template <bool Square, typename scalar_t>
inline double channel_sum(const scalar_t* x, int64_t n, float shift) {
  const FloatVec s = splat<float>(shift);
  double total = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = min_i64(n, start + kSumBlock);
    FloatVec acc[4] = {};
    int64_t i = start;
    for (; i + 4 * kFloatLanes <= end; i += 4 * kFloatLanes)
      for (int u = 0; u < 4; ++u) {
        const FloatVec d = load_floats(x + i + u * kFloatLanes) - s;
        acc[u] += Square ? d * d : d;
      }
    for (; i + kFloatLanes <= end; i += kFloatLanes) {
      const FloatVec d = load_floats(x + i) - s;
      acc[0] += Square ? d * d : d;
    }
    float part = lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (; i < end; ++i) {
      const float d = to_acc(x[i]) - shift;
      part += Square ? d * d : d;
    }
    total += part;
  }
  return total;
}
template <bool Square>
inline double channel_sum(const double* x, int64_t n, double shift) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += Square ? (x[i] - shift) * (x[i] - shift) : x[i] - shift;
  return total;
}

inline float silu(float v) { return v / (1.0f + exp_acc(-v)); }
inline double silu(double v) { return v / (1.0 + exp_acc(-v)); }

// out[i] = (x[i] - mean) * scale + shift (+ SiLU) for i < n. (x - mean) * scale + shift, not
// x * scale + (shift - mean * scale): with a small variance the latter cancels (eps alone
// makes rstd ~316).
template <typename scalar_t>
inline void normalize_channel(const scalar_t* x, scalar_t* out, int64_t n, float mean, float scale, float shift,
                              bool with_silu) {
  const FloatVec m = splat<float>(mean), a = splat<float>(scale), b = splat<float>(shift), one = splat<float>(1.0f);
  int64_t i = 0;
  for (; i + kFloatLanes <= n; i += kFloatLanes) {
    FloatVec v = (load_floats(x + i) - m) * a + b;
    // exp_vec saturates at exp(88): below -88 SiLU is v * 0 (-0, as v / (1 + inf); NaN for -inf)
    if (with_silu) v = v < splat<float>(-88.0f) ? v * splat<float>(0.0f) : v / (one + exp_vec(-v));
    store_floats(out + i, v);
  }
  for (; i < n; ++i) {
    const float v = (to_acc(x[i]) - mean) * scale + shift;
    out[i] = FromAcc<scalar_t>::convert(with_silu ? silu(v) : v);
  }
}
inline void normalize_channel(const double* x, double* out, int64_t n, double mean, double scale, double shift,
                              bool with_silu) {
  for (int64_t i = 0; i < n; ++i) {
    const double v = (x[i] - mean) * scale + shift;
    out[i] = with_silu ? silu(v) : v;
  }
}

template <typename scalar_t, typename acc_t>
struct GroupNormJob {
  const MaskedGroupNormParams* p;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const MaskedGroupNormParams& p = *static_cast<GroupNormJob*>(ctx)->p;
    for (int64_t task = begin; task < end; ++task) one_group(p, task / p.groups, task % p.groups);
  }

  static void one_group(const MaskedGroupNormParams& p, int64_t b, int64_t g) {
    const int64_t per_group = p.channels / p.groups, code = code_of(p.routing, b);
    const bool* keep = p.routing.out_mask + code * p.channels + g * per_group;
    const int64_t first = (b * p.channels + g * per_group) * p.plane;
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + first;
    scalar_t* y = static_cast<scalar_t*>(p.y) + first;
    int64_t kept = 0;
    double sum = 0;
    for (int64_t c = 0; c < per_group; ++c)
      if (keep[c]) ++kept, sum += channel_sum<false>(x + c * p.plane, p.plane, acc_t(0));
    const double count = static_cast<double>(kept) * static_cast<double>(p.plane);
    const double mean_exact = kept ? sum / count : 0.0;
    const acc_t mean = static_cast<acc_t>(mean_exact);
    double squares = 0;
    for (int64_t c = 0; c < per_group; ++c)
      if (keep[c]) squares += channel_sum<true>(x + c * p.plane, p.plane, mean);
    // Squares around the rounded mean exceed those around the exact one by count * (gap)^2.
    const double gap = static_cast<double>(mean) - mean_exact;
    // >= 0: with a near-constant group the correction can exceed the rounded squares
    const double variance = kept ? __builtin_fmax(squares / count - gap * gap, 0.0) : 0.0;
    const acc_t rstd = kept ? static_cast<acc_t>(1.0 / __builtin_sqrt(variance + p.eps)) : acc_t(0);
    const scalar_t* weight = static_cast<const scalar_t*>(p.weight);
    const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
    const int64_t affine = code * p.affine_code_stride + g * per_group;
    for (int64_t c = 0; c < per_group; ++c) {
      scalar_t* out = y + c * p.plane;
      if (!keep[c]) {  // +0 is all-zero bits in every dtype
        __builtin_memset(static_cast<void*>(out), 0, static_cast<size_t>(p.plane) * sizeof(scalar_t));
        continue;
      }
      const acc_t scale = rstd * (weight ? to_acc(weight[affine + c]) : acc_t(1));
      const acc_t shift = bias ? to_acc(bias[affine + c]) : acc_t(0);
      normalize_channel(x + c * p.plane, out, p.plane, mean, scale, shift, p.silu);
    }
  }
};

inline int64_t group_norm(const MaskedGroupNormParams& p) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t code = code_of(p.routing, b);
    if (code < 0 || code >= p.routing.num_codes) return b;
  }
  return dispatch_dtype(p.dtype, int64_t(-1), [&](auto scalar, auto acc) {
    GroupNormJob<decltype(scalar), decltype(acc)> job{&p};
    parallel_for(p.batch * p.groups, &job, &GroupNormJob<decltype(scalar), decltype(acc)>::run);
    return int64_t(-1);
  });
}

// ---- gather / scatter of kept channels ---------------------------------------------------------

template <typename T>
inline void copy_typed(char* dst, const char* src, int64_t count) {
  T* d = reinterpret_cast<T*>(dst);
  const T* s = reinterpret_cast<const T*>(src);
  for (int64_t i = 0; i < count; ++i) d[i] = s[i];
}

// count elements of element_bytes (2, 4 or 8): typed loops, so the single elements of the
// token layout (inner = 1) cost no library call.
inline void copy_elements(char* dst, const char* src, int64_t count, int64_t element_bytes) {
  if (count >= 16) {
    __builtin_memcpy(dst, src, static_cast<size_t>(count * element_bytes));
  } else if (element_bytes == 4) {
    copy_typed<uint32_t>(dst, src, count);
  } else if (element_bytes == 2) {
    copy_typed<uint16_t>(dst, src, count);
  } else {
    copy_typed<uint64_t>(dst, src, count);
  }
}

// Both jobs run over rows (a row's channels are one contiguous stretch of dst / src), so the
// per-element work is one index load and a short copy.
struct GatherJob {
  const ChannelGatherParams* p;
  static void run(void* ctx, int64_t begin, int64_t end) {
    const ChannelGatherParams& p = *static_cast<GatherJob*>(ctx)->p;
    const int64_t e = p.element_bytes, bytes = p.inner * e;
    const char* src = static_cast<const char*>(p.src);
    for (int64_t r = begin; r < end; ++r) {
      const char* row = src + p.row_index[r] * p.src_row_stride * e;
      char* out = static_cast<char*>(p.dst) + r * p.channels * bytes;
      // Channels come in runs (APTP keeps whole GroupNorm groups): one copy per run of
      // consecutive channels when they are adjacent in src.
      const bool adjacent = p.src_channel_stride == p.inner;
      for (int64_t j = 0; j < p.channels;) {
        int64_t run = 1;
        while (adjacent && j + run < p.channels && p.channel_index[j + run] == p.channel_index[j] + run) ++run;
        copy_elements(out + j * bytes, row + p.channel_index[j] * p.src_channel_stride * e, run * p.inner, e);
        j += run;
      }
    }
  }
};

inline void gather(const ChannelGatherParams& p) {
  GatherJob job{&p};
  parallel_for(p.rows, &job, &GatherJob::run);
}

struct ScatterJob {
  const ChannelScatterParams* p;
  static void run(void* ctx, int64_t begin, int64_t end) {
    const ChannelScatterParams& p = *static_cast<ScatterJob*>(ctx)->p;
    const int64_t e = p.element_bytes, bytes = p.inner * e;
    for (int64_t r = begin; r < end; ++r) {
      char* row = static_cast<char*>(p.dst) + p.row_index[r] * p.dst_row_stride * e;
      const char* compact = static_cast<const char*>(p.src) + r * p.kept * bytes;
      // Runs of masked channels are zeroed, runs of consecutive kept channels copied, each in
      // one go when the channels are adjacent in dst (the token layout has inner = 1).
      const bool adjacent = p.dst_channel_stride == p.inner;
      for (int64_t c = 0; c < p.dst_channels;) {
        const int64_t j = p.kept_position[c];
        int64_t run = 1;
        while (adjacent && c + run < p.dst_channels &&
               (j < 0 ? p.kept_position[c + run] < 0 : p.kept_position[c + run] == j + run))
          ++run;
        char* out = row + c * p.dst_channel_stride * e;
        if (j < 0) {
          __builtin_memset(out, 0, static_cast<size_t>(run * bytes));  // +0.0 in every float dtype
        } else {
          copy_elements(out, compact + j * bytes, run * p.inner, e);
        }
        c += run;
      }
    }
  }
};

inline void scatter(const ChannelScatterParams& p) {
  ScatterJob job{&p};
  parallel_for(p.rows, &job, &ScatterJob::run);
}

}  // namespace pruned

PrunedKernels pruned_kernels() { return {&pruned::group_norm, &pruned::gather, &pruned::scatter}; }

}  // namespace MMFAST_CPU_ISA_NS
}  // namespace cpu
}  // namespace mmfast
