// CPU VQ kernels, written once and compiled per ISA (torch-free). Per-ISA code, included only
// through mmfast/cpu/instantiate_isas.h (see csrc/cpu/vq_kernels.cpp).
//
// vq_quantize is a GEMM fused with an argmin: the codebook is packed once per call into panels
// of 2 vector widths of codes ([panel][d][2 W], converted to the accumulation type) with each
// code's bias -||e_c||^2 / 2, and a register-blocked micro-kernel takes kMR rows of z against
// one panel: kMR x 2 vector accumulators start at the bias and sum z . e_c over D, so they end
// at s_c = z . e_c - ||e_c||^2 / 2 = -score_c / 2, and the argmin of score is the argmax of s.
// The argmax is lazy: per row and vector lane only the running maximum and the group of panels
// that first reached it are kept (two VMAXPS per row and panel, a compare and a masked move per
// row and group: D = 8 spends 16 FMAs per row and panel, so an eager per-code index would cost
// a third of the time, a per-panel one a tenth). Each row's winning code is found at the end by
// recomputing the winning group for that row, with the same operations in the same order, so
// the same bits. Codes are visited in increasing order and a lane changes only for a strictly
// larger s, so ties keep the lowest index; a NaN never enters the maximum. Work is split into
// tasks of kTaskRows rows, and over code ranges when the row tasks alone are too few for the
// threads (one image, N = 1024); the code ranges are combined in order with the same rule, so
// the result does not depend on the split.
#ifndef MMFAST_CPU_ISA_NS
#error "mmfast/cpu/vq_impl.h is included by mmfast/cpu/instantiate_isas.h only"
#endif

namespace mmfast {
namespace cpu {
namespace MMFAST_CPU_ISA_NS {
namespace vq {  // this family's names, apart from other families' in the same ISA namespace

constexpr int64_t kMR = 6;                        // rows of a micro-kernel
constexpr int64_t kTaskRows = 8 * kMR;            // rows of a task
// Packed codes a task walks before its next rows: a third of L1d, so a block stays in L1
// beside the rows of z (one thread on Sapphire Rapids: 1.06x at D = 8, 1.12x at D = 256 over
// 128 KB blocks in L2).
constexpr int64_t kCodeBlockBytes = 16 * 1024;

// Lane indices, the integer vector type a comparison of Vec<acc_t> yields.
template <typename acc_t> struct Lanes;
template <> struct Lanes<float> {
  typedef int32_t scalar;
  typedef int32_t type __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
};
template <> struct Lanes<double> {
  typedef int64_t scalar;
  typedef int64_t type __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
};

template <typename acc_t> constexpr int64_t panel_codes() { return 2 * Vec<acc_t>::width; }

// Where everything lives in the workspace, and how the work is split. Another micro-kernel
// (the AMX one) packs codes its own way: packed_code_bytes per code, task_rows rows per task.
template <typename acc_t>
struct Plan {
  int64_t panels, block_panels, code_blocks, row_tasks, splits;
  size_t packed_offset, bias_offset, score_offset, index_offset, bytes;

  explicit Plan(const VQParams& p) : Plan(p, p.dim * int64_t(sizeof(acc_t)), kTaskRows, kCodeBlockBytes) {}

  Plan(const VQParams& p, int64_t packed_code_bytes, int64_t rows_per_task, int64_t block_bytes) {
    constexpr int64_t nr = panel_codes<acc_t>();
    panels = ceil_div(p.codes, nr);
    block_panels = max_i64(1, block_bytes / max_i64(1, nr * packed_code_bytes));
    code_blocks = ceil_div(panels, block_panels);
    row_tasks = ceil_div(p.rows, rows_per_task);
    const int64_t threads = max_i64(1, max_threads());
    splits = row_tasks >= 2 * threads ? 1 : min_i64(code_blocks, ceil_div(2 * threads, max_i64(1, row_tasks)));
    packed_offset = 0;
    bias_offset = round_up(packed_offset + size_t(panels * nr * packed_code_bytes), 64);
    score_offset = bias_offset + sizeof(acc_t) * size_t(panels * nr);
    const size_t scores_end = score_offset + (splits > 1 ? sizeof(acc_t) * size_t(splits * p.rows) : 0);
    index_offset = round_up(scores_end, 64);  // int64 indices after an odd count of fp32 scores
    bytes = index_offset + (splits > 1 ? sizeof(int64_t) * size_t(splits * p.rows) : 0) + 64;
  }
  template <typename T> T* at(const VQParams& p, size_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(p.workspace) + offset);
  }
};

// ---- packing the codebook -------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct PackJob {
  const VQParams* p;
  acc_t* packed;  // [panel][D][nr]
  acc_t* bias;    // [panel * nr]: -||e_c||^2 / 2 (or -given / 2); -inf for padding codes

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<PackJob*>(ctx);
    const auto& p = *job.p;
    constexpr int64_t nr = panel_codes<acc_t>();
    const scalar_t* codebook = static_cast<const scalar_t*>(p.codebook);
    const acc_t* given = static_cast<const acc_t*>(p.codebook_sqnorm);
    for (int64_t panel = begin; panel < end; ++panel) {
      acc_t* dst = job.packed + panel * p.dim * nr;
      for (int64_t j = 0; j < nr; ++j) {
        const int64_t code = panel * nr + j;
        acc_t norm = 0;
        for (int64_t d = 0; d < p.dim; ++d) {
          const acc_t x = code < p.codes ? to_acc(codebook[code * p.dim + d]) : acc_t(0);
          dst[d * nr + j] = x;
          norm += x * x;
        }
        const acc_t sqnorm = code >= p.codes ? acc_t(__builtin_inf()) : given != nullptr ? given[code] : norm;
        job.bias[code] = sqnorm * acc_t(-0.5);
      }
    }
  }
};

// ---- the fused GEMM + argmin -----------------------------------------------------------------

// Per row and vector lane of one task: the largest s so far over the codes of that lane (both
// vector halves of every panel visited; -inf for none) and the first panel of the first group
// of panels that reached it.
template <typename acc_t>
struct Best {
  typename Vec<acc_t>::type value;
  typename Lanes<acc_t>::type panel;
};

// Panels per group of the lazy argmax: with D <= 32 the per-group compare and masked move are a
// tenth of a panel's work at D = 8 and worth saving (recomputing a group per row costs 8 panels
// out of K / 32); with a larger D they are noise beside the FMAs, so every panel is its own group.
constexpr int64_t group_panels(int64_t dim) { return dim <= 32 ? 8 : 1; }

// acc[r][v] += z_r[d] * e[d] for the MR rows at zrows (row stride dim) and the codes v W .. of
// the panel at `codes`.
template <typename acc_t, int64_t MR>
__attribute__((always_inline)) inline void micro_step(const acc_t* zrows, const acc_t* codes, int64_t dim, int64_t d,
                                                      typename Vec<acc_t>::type (&acc)[MR][2]) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const V b0 = load<acc_t>(codes + d * 2 * W);
  const V b1 = load<acc_t>(codes + d * 2 * W + W);
  for (int64_t r = 0; r < MR; ++r) {
    const V a = splat<acc_t>(zrows[r * dim + d]);
    acc[r][0] += a * b0;
    acc[r][1] += a * b1;
  }
}

// acc[r][v] = bias + z_r . e for the MR rows at zrows (row stride D) and the codes v W .. of
// the panel at `codes`: s of those codes. D = kDim when kDim > 0 (the compiler's own loop
// schedule for a fixed trip count), else dim, unrolled by 8 (one thread: 1.05-1.08x at D = 64
// and 256; unrolling the fixed D = 8 / 16 / 32 loops as well was 0.74-0.96x). The same
// operations whatever MR, so resolve_row's recomputation (MR = 1) gives the bits the search
// compared.
template <typename acc_t, int64_t MR, int64_t kDim>
__attribute__((always_inline)) inline void micro_scores(const acc_t* zrows, const acc_t* codes, const acc_t* bias,
                                                        int64_t dim, typename Vec<acc_t>::type (&acc)[MR][2]) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const V bias0 = load<acc_t>(bias), bias1 = load<acc_t>(bias + W);
  for (int64_t r = 0; r < MR; ++r) acc[r][0] = bias0, acc[r][1] = bias1;
  if constexpr (kDim > 0) {
    for (int64_t d = 0; d < kDim; ++d) micro_step<acc_t, MR>(zrows, codes, kDim, d, acc);
  } else {
#pragma GCC unroll 8
    for (int64_t d = 0; d < dim; ++d) micro_step<acc_t, MR>(zrows, codes, dim, d, acc);
  }
}

// The larger of x and top, top when x is NaN (VMAXPS/VMAXPD with top second).
template <typename acc_t>
inline typename Vec<acc_t>::type max_keep(typename Vec<acc_t>::type top, typename Vec<acc_t>::type x) {
  return x > top ? x : top;
}

// MR rows against panels [p0, p1) in groups of group_panels(dim) from p0: the running maximum
// per panel, the group's first panel where a lane's maximum grew (strictly larger wins).
// dim == kDim when kDim > 0.
template <typename acc_t, int64_t MR, int64_t kDim>
__attribute__((always_inline)) inline void search_panels(const acc_t* zrows, const acc_t* packed, const acc_t* bias,
                                                         int64_t dim, int64_t p0, int64_t p1, Best<acc_t>* best) {
  using V = typename Vec<acc_t>::type;
  using L = typename Lanes<acc_t>::type;
  using I = typename Lanes<acc_t>::scalar;
  constexpr int64_t nr = panel_codes<acc_t>();
  V top[MR];
  for (int64_t r = 0; r < MR; ++r) top[r] = best[r].value;
  for (int64_t group = p0; group < p1; group += group_panels(dim)) {
    for (int64_t panel = group; panel < min_i64(p1, group + group_panels(dim)); ++panel) {
      V acc[MR][2];
      micro_scores<acc_t, MR, kDim>(zrows, packed + panel * dim * nr, bias + panel * nr, dim, acc);
      for (int64_t r = 0; r < MR; ++r) top[r] = max_keep<acc_t>(max_keep<acc_t>(top[r], acc[r][0]), acc[r][1]);
    }
    const L id = L{} + static_cast<I>(group);
    for (int64_t r = 0; r < MR; ++r) {
      best[r].panel = top[r] > best[r].value ? id : best[r].panel;
      best[r].value = top[r];
    }
  }
}

// search_panels, with the small dims of tokenizers' codebooks known at compile time (1.4x at
// LlamaGen's D = 8 over the runtime-D loop). resolve_row's recomputation takes the same cases
// (row_scores).
template <typename acc_t, int64_t MR>
inline void search_rows(const acc_t* zrows, const acc_t* packed, const acc_t* bias, int64_t dim, int64_t p0,
                        int64_t p1, Best<acc_t>* best) {
  switch (dim) {
    case 4: return search_panels<acc_t, MR, 4>(zrows, packed, bias, 4, p0, p1, best);
    case 8: return search_panels<acc_t, MR, 8>(zrows, packed, bias, 8, p0, p1, best);
    case 16: return search_panels<acc_t, MR, 16>(zrows, packed, bias, 16, p0, p1, best);
    case 32: return search_panels<acc_t, MR, 32>(zrows, packed, bias, 32, p0, p1, best);
    default: return search_panels<acc_t, MR, 0>(zrows, packed, bias, dim, p0, p1, best);
  }
}

// micro_scores of one row, through the same compile-time dims as search_rows.
template <typename acc_t>
inline void row_scores(const acc_t* zrow, const acc_t* codes, const acc_t* bias, int64_t dim,
                       typename Vec<acc_t>::type (&acc)[1][2]) {
  switch (dim) {
    case 4: return micro_scores<acc_t, 1, 4>(zrow, codes, bias, 4, acc);
    case 8: return micro_scores<acc_t, 1, 8>(zrow, codes, bias, 8, acc);
    case 16: return micro_scores<acc_t, 1, 16>(zrow, codes, bias, 16, acc);
    case 32: return micro_scores<acc_t, 1, 32>(zrow, codes, bias, 32, acc);
    default: return micro_scores<acc_t, 1, 0>(zrow, codes, bias, dim, acc);
  }
}

// Lane i's lowest code holding top among panels [group, end): the first whose recomputed s
// equals top. The same operations give the same bits, so one does, and it lies in the group
// (where the lane's maximum first reached top). Should a compiler contract the two
// instantiations differently (-mtune's FMA-chain rules), the largest recomputed s (the lowest
// code on ties) is still the best code to within that rounding.
template <typename acc_t>
inline int64_t lane_code(acc_t top, int64_t i, int64_t group, int64_t end, const acc_t* zrow, const acc_t* packed,
                         const acc_t* bias, int64_t dim) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width, nr = panel_codes<acc_t>();
  int64_t nearest = group * nr + i;
  acc_t nearest_s = -acc_t(__builtin_inf());
  for (int64_t panel = group; panel < end; ++panel) {
    V acc[1][2];
    row_scores<acc_t>(zrow, packed + panel * dim * nr, bias + panel * nr, dim, acc);
    for (int64_t half = 0; half < 2; ++half) {
      const acc_t s = acc[0][half][i];
      if (s == top) return panel * nr + half * W + i;
      if (s > nearest_s) nearest_s = s, nearest = panel * nr + half * W + i;
    }
  }
  return nearest;
}

// The row's best s over the lanes and its lowest code: each lane holding the maximum names
// the group of panels where it first reached it, recomputed for this row (up to the end of
// its code block, where a group may be cut short). score = -2 s (+inf, index 0, when no s is
// above -inf).
template <typename acc_t>
inline void resolve_row(const Best<acc_t>& best, const acc_t* zrow, const acc_t* packed, const acc_t* bias,
                        int64_t dim, const Plan<acc_t>& plan, acc_t* score, int64_t* index) {
  constexpr int64_t W = Vec<acc_t>::width;
  acc_t top = -acc_t(__builtin_inf());
  for (int64_t i = 0; i < W; ++i) top = best.value[i] > top ? best.value[i] : top;
  int64_t code = -1;
  if (top > -acc_t(__builtin_inf())) {
    for (int64_t i = 0; i < W; ++i) {
      if (!(best.value[i] == top)) continue;
      const int64_t group = best.panel[i], block_end = (group / plan.block_panels + 1) * plan.block_panels;
      const int64_t end = min_i64(min_i64(plan.panels, block_end), group + group_panels(dim));
      const int64_t c = lane_code<acc_t>(top, i, group, end, zrow, packed, bias, dim);
      if (code < 0 || c < code) code = c;
    }
  }
  *score = acc_t(-2) * top;
  *index = code < 0 ? 0 : code;
}

// ||z_n||^2 in the accumulation type.
template <typename scalar_t, typename acc_t>
inline acc_t z_row_sqnorm(const VQParams& p, int64_t n) {
  const scalar_t* z = static_cast<const scalar_t*>(p.z) + n * p.z_row_stride;
  acc_t s = 0;
  for (int64_t d = 0; d < p.dim; ++d) s += to_acc(z[d]) * to_acc(z[d]);
  return s;
}

// Index and distance of row n from its best score: the rules of mmfast/vq.h.
template <typename acc_t>
inline void finish_row(const VQParams& p, int64_t n, acc_t score, int64_t index, acc_t z_sqnorm) {
  acc_t* distance = static_cast<acc_t*>(p.distance);
  if (!__builtin_isfinite(z_sqnorm)) {
    p.indices[n] = 0;
    distance[n] = z_sqnorm;
    return;
  }
  const acc_t d = score + z_sqnorm;  // +inf when no score was finite
  p.indices[n] = index;
  distance[n] = d < 0 ? acc_t(0) : d;  // rounding can leave -eps for a code equal to z
}

// Row n's best score over split `split` of the codes: finished when the codes were not split,
// else kept for CombineJob. A score that is not below +inf (none finite, or one that
// overflowed) counts as no score: index 0, as in mmfast/vq.h, whatever split found it.
template <typename scalar_t, typename acc_t>
inline void record_score(const VQParams& p, const Plan<acc_t>& plan, int64_t split, int64_t n, acc_t score,
                         int64_t index) {
  if (!(score < acc_t(__builtin_inf()))) index = 0;
  if (plan.splits == 1) {
    finish_row<acc_t>(p, n, score, index, z_row_sqnorm<scalar_t, acc_t>(p, n));
  } else {
    plan.template at<acc_t>(p, plan.score_offset)[split * p.rows + n] = score;
    plan.template at<int64_t>(p, plan.index_offset)[split * p.rows + n] = index;
  }
}

// Every row's best: -inf in panel 0.
template <typename acc_t>
inline void reset_best(Best<acc_t>* best, int64_t rows) {
  using L = typename Lanes<acc_t>::type;
  for (int64_t r = 0; r < rows; ++r) {
    best[r].value = splat<acc_t>(-acc_t(__builtin_inf()));
    best[r].panel = L{};
  }
}

template <typename scalar_t, typename acc_t>
struct QuantizeJob {
  const VQParams* p;
  Plan<acc_t> plan;
  const acc_t* packed;
  const acc_t* bias;

  // Rows r0 .. r0 + count of z into zbuf as acc_t, zero rows up to a multiple of kMR.
  static void load_rows(const VQParams& p, int64_t r0, int64_t count, acc_t* zbuf) {
    const scalar_t* z = static_cast<const scalar_t*>(p.z);
    for (int64_t r = 0; r < round_up(count, kMR); ++r)
      for (int64_t d = 0; d < p.dim; ++d)
        zbuf[r * p.dim + d] = r < count ? to_acc(z[(r0 + r) * p.z_row_stride + d]) : acc_t(0);
  }

  // The code blocks of split s, all panels of each, for every micro-block of rows.
  void search(int64_t split, int64_t rows, const acc_t* zbuf, Best<acc_t>* best) const {
    const int64_t dim = p->dim;
    const int64_t b0 = plan.code_blocks * split / plan.splits, b1 = plan.code_blocks * (split + 1) / plan.splits;
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t p0 = block * plan.block_panels, p1 = min_i64(plan.panels, p0 + plan.block_panels);
      for (int64_t m = 0; m < rows; m += kMR)
        search_rows<acc_t, kMR>(zbuf + m * dim, packed, bias, dim, p0, p1, best + m);
    }
  }

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<QuantizeJob*>(ctx);
    const auto& p = *job.p;
    Scratch<acc_t> zbuf(kTaskRows * p.dim);
    Best<acc_t> best[kTaskRows];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_task = task / job.plan.splits, split = task % job.plan.splits;
      const int64_t r0 = row_task * kTaskRows, rows = min_i64(kTaskRows, p.rows - r0);
      load_rows(p, r0, rows, zbuf.data);
      reset_best<acc_t>(best, kTaskRows);
      job.search(split, rows, zbuf.data, best);
      for (int64_t r = 0; r < rows; ++r) {
        acc_t score;
        int64_t index;
        resolve_row<acc_t>(best[r], zbuf.data + r * p.dim, job.packed, job.bias, p.dim, job.plan, &score, &index);
        record_score<scalar_t, acc_t>(p, job.plan, split, r0 + r, score, index);
      }
    }
  }
};

// The code ranges of every row combined in order (strictly smaller wins: ties keep the earlier,
// lower codes), then finished.
template <typename scalar_t, typename acc_t>
struct CombineJob {
  const VQParams* p;
  Plan<acc_t> plan;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<CombineJob*>(ctx);
    const auto& p = *job.p;
    const acc_t* scores = job.plan.template at<acc_t>(p, job.plan.score_offset);
    const int64_t* indices = job.plan.template at<int64_t>(p, job.plan.index_offset);
    for (int64_t n = begin; n < end; ++n) {
      acc_t score = scores[n];
      int64_t index = indices[n];
      for (int64_t s = 1; s < job.plan.splits; ++s)
        if (scores[s * p.rows + n] < score) score = scores[s * p.rows + n], index = indices[s * p.rows + n];
      finish_row<acc_t>(p, n, score, index, z_row_sqnorm<scalar_t, acc_t>(p, n));
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* quantize_typed(const VQParams& p) {
  const Plan<acc_t> plan(p);
  if (p.workspace_bytes < plan.bytes) return "vq_quantize: workspace too small";
  acc_t* packed = plan.template at<acc_t>(p, plan.packed_offset);
  acc_t* bias = plan.template at<acc_t>(p, plan.bias_offset);
  PackJob<scalar_t, acc_t> pack{&p, packed, bias};
  parallel_for(plan.panels, &pack, &PackJob<scalar_t, acc_t>::run);
  QuantizeJob<scalar_t, acc_t> job{&p, plan, packed, bias};
  parallel_for(plan.row_tasks * plan.splits, &job, &QuantizeJob<scalar_t, acc_t>::run);
  if (plan.splits > 1) {
    CombineJob<scalar_t, acc_t> combine{&p, plan};
    parallel_for(p.rows, &combine, &CombineJob<scalar_t, acc_t>::run);
  }
  return nullptr;
}

// ---- lookup -----------------------------------------------------------------------------------

// out-of-range positions are skipped (nothing read); the smallest one is reported.
template <typename scalar_t>
struct LookupJob {
  const VQLookupParams* p;
  int64_t* first_bad;  // the smallest position of an index out of range, or -1

  static int64_t index_at(const VQLookupParams& p, int64_t i) {
    return p.index_bytes == 8 ? static_cast<const int64_t*>(p.indices)[i] : static_cast<const int32_t*>(p.indices)[i];
  }

  static void report(int64_t* first_bad, int64_t position) {
    int64_t seen = __atomic_load_n(first_bad, __ATOMIC_RELAXED);
    while ((seen < 0 || position < seen) &&
           !__atomic_compare_exchange_n(first_bad, &seen, position, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<LookupJob*>(ctx);
    const auto& p = *job.p;
    const scalar_t* codebook = static_cast<const scalar_t*>(p.codebook);
    scalar_t* out = static_cast<scalar_t*>(p.out);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = index_at(p, i);
      if (c < 0 || c >= p.codes) {
        report(job.first_bad, i);
        continue;
      }
      const scalar_t* row = codebook + c * p.dim;
      if (!p.channels_first) {
        __builtin_memcpy(out + i * p.dim, row, sizeof(scalar_t) * p.dim);
      } else {  // index i = b * P + q  ->  out[b][d][q]
        const int64_t b = i / p.plane, q = i - b * p.plane;
        scalar_t* dst = out + b * p.dim * p.plane + q;
        for (int64_t d = 0; d < p.dim; ++d) dst[d * p.plane] = row[d];
      }
    }
  }
};

template <typename scalar_t>
int64_t dequantize_typed(const VQLookupParams& p) {
  int64_t first_bad = -1;
  LookupJob<scalar_t> job{&p, &first_bad};
  parallel_for(p.count, &job, &LookupJob<scalar_t>::run);
  return first_bad;
}

// ---- entry points ------------------------------------------------------------------------------

size_t quantize_workspace_bytes(const VQParams& p) {
  return p.dtype == DType::kFloat64 ? Plan<double>(p).bytes : Plan<float>(p).bytes;
}

const char* quantize(const VQParams& p) {
  if (p.rows == 0) return nullptr;
  return dispatch_dtype(p.dtype, "vq_quantize: unsupported dtype", [&](auto scalar, auto acc) {
    return quantize_typed<decltype(scalar), decltype(acc)>(p);
  });
}

int64_t dequantize(const VQLookupParams& p) {
  return dispatch_dtype(p.dtype, int64_t(-2), [&](auto scalar, auto) { return dequantize_typed<decltype(scalar)>(p); });
}

}  // namespace vq

VQKernels vq_kernels() { return {&vq::quantize_workspace_bytes, &vq::quantize, &vq::dequantize}; }

}  // namespace MMFAST_CPU_ISA_NS
}  // namespace cpu
}  // namespace mmfast
