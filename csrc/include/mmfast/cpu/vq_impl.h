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
//
// How z . e is formed is a policy (Dot): FmaDot here, one dim per packed element and an FMA per
// dim; the AVX512-BF16 kernel (csrc/cpu/vq_avx512bf16_kernels.cpp) packs two bf16 dims per
// 32-bit element and runs VDPBF16PS on the same search, argmax and split machinery.
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

// z . e with one FMA per dim: packed elements are the dims themselves, converted to acc_t.
template <typename Acc>
struct FmaDot {
  using acc_t = Acc;
  using elem_t = Acc;  // one packed element of a code or a row of z
  static constexpr int64_t kDimsPerElem = 1;

  // Element e of a row of `dim` values (0 past the end).
  template <typename scalar_t>
  static elem_t element(const scalar_t* row, int64_t e, int64_t dim) {
    return e < dim ? to_acc(row[e]) : elem_t(0);
  }

  // acc[r][v] += element e of row r of z times element e of each code v W .. of the panel at
  // `codes`, for the MR rows at zrows (row stride `steps` elements).
  template <int64_t MR>
  __attribute__((always_inline)) static void step(const elem_t* zrows, const elem_t* codes, int64_t steps, int64_t e,
                                                  typename Vec<acc_t>::type (&acc)[MR][2]) {
    using V = typename Vec<acc_t>::type;
    constexpr int64_t W = Vec<acc_t>::width;
    const V b0 = load<acc_t>(codes + e * 2 * W);
    const V b1 = load<acc_t>(codes + e * 2 * W + W);
    for (int64_t r = 0; r < MR; ++r) {
      const V a = splat<acc_t>(zrows[r * steps + e]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
};

// Packed elements per code or row of z (the micro-kernel's trip count).
template <typename Dot> inline int64_t dot_steps(int64_t dim) { return ceil_div(dim, Dot::kDimsPerElem); }

// Where everything lives in the workspace, and how the work is split: packed_code_bytes per code
// (plan_for: a Dot's elements; the AMX kernel packs its own way), task_rows rows per task.
template <typename acc_t>
struct Plan {
  int64_t panels, block_panels, code_blocks, row_tasks, splits;
  size_t packed_offset, bias_offset, score_offset, index_offset, bytes;

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

template <typename scalar_t, typename Dot>
struct PackJob {
  using acc_t = typename Dot::acc_t;
  using elem_t = typename Dot::elem_t;
  const VQParams* p;
  elem_t* packed;  // [panel][steps][nr]
  acc_t* bias;     // [panel * nr]: -||e_c||^2 / 2 (or -given / 2); -inf for padding codes

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<PackJob*>(ctx);
    const auto& p = *job.p;
    constexpr int64_t nr = panel_codes<acc_t>();
    const int64_t steps = dot_steps<Dot>(p.dim);
    const scalar_t* codebook = static_cast<const scalar_t*>(p.codebook);
    const acc_t* given = static_cast<const acc_t*>(p.codebook_sqnorm);
    for (int64_t panel = begin; panel < end; ++panel) {
      elem_t* dst = job.packed + panel * steps * nr;
      const int64_t first = panel * nr, real = max_i64(0, min_i64(nr, p.codes - first));  // codes that exist
      const scalar_t* rows = codebook + first * p.dim;
      for (int64_t j = 0; j < nr; ++j)
        for (int64_t e = 0; e < steps; ++e)
          dst[e * nr + j] = j < real ? Dot::element(rows + j * p.dim, e, p.dim) : elem_t(0);
      acc_t sqnorm[nr];
      if (given != nullptr) {
        for (int64_t j = 0; j < real; ++j) sqnorm[j] = given[first + j];
      } else {
        squared_norms(rows, real, p.dim, sqnorm);
      }
      for (int64_t j = 0; j < nr; ++j) job.bias[first + j] = (j < real ? sqnorm[j] : acc_t(__builtin_inf())) * acc_t(-0.5);
    }
  }

  // ||e_j||^2 of `count` rows of `dim` values, each summed in dim order, the rows interleaved:
  // one code's sum is a chain of dim dependent adds, so 32 chains side by side run about 4x as
  // fast as one after another (the same bits).
  static void squared_norms(const scalar_t* rows, int64_t count, int64_t dim, acc_t* out) {
    for (int64_t j = 0; j < count; ++j) out[j] = 0;
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t j = 0; j < count; ++j) {
        const acc_t x = to_acc(rows[j * dim + d]);
        out[j] += x * x;
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

// Panels per group of the lazy argmax, by the micro-kernel's trip count (D; D / 2 for bf16
// pairs): up to 32 the per-group compare and masked move are a tenth of a panel's work at D = 8
// and worth saving (recomputing a group per row costs 8 panels out of K / 32); beyond, they are
// noise beside the products, so every panel is its own group.
constexpr int64_t group_panels(int64_t steps) { return steps <= 32 ? 8 : 1; }

// acc[r][v] = bias + z_r . e for the MR rows at zrows (row stride `steps` elements) and the
// codes v W .. of the panel at `codes`: s of those codes. steps = kSteps when kSteps > 0 (the
// compiler's own loop schedule for a fixed trip count), else unrolled by 8 (one thread: 1.05-1.08x
// at D = 64 and 256; unrolling the fixed D = 8 / 16 / 32 loops as well was 0.74-0.96x). The same
// operations whatever MR, so resolve_row's recomputation (MR = 1) gives the bits the search
// compared.
template <typename Dot, int64_t MR, int64_t kSteps>
__attribute__((always_inline)) inline void micro_scores(const typename Dot::elem_t* zrows,
                                                        const typename Dot::elem_t* codes,
                                                        const typename Dot::acc_t* bias, int64_t steps,
                                                        typename Vec<typename Dot::acc_t>::type (&acc)[MR][2]) {
  using acc_t = typename Dot::acc_t;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const V bias0 = load<acc_t>(bias), bias1 = load<acc_t>(bias + W);
  for (int64_t r = 0; r < MR; ++r) acc[r][0] = bias0, acc[r][1] = bias1;
  if constexpr (kSteps > 0) {
    for (int64_t e = 0; e < kSteps; ++e) Dot::template step<MR>(zrows, codes, kSteps, e, acc);
  } else {
#pragma GCC unroll 8
    for (int64_t e = 0; e < steps; ++e) Dot::template step<MR>(zrows, codes, steps, e, acc);
  }
}

// The larger of x and top, top when x is NaN (VMAXPS/VMAXPD with top second).
template <typename acc_t>
inline typename Vec<acc_t>::type max_keep(typename Vec<acc_t>::type top, typename Vec<acc_t>::type x) {
  return x > top ? x : top;
}

// MR rows against panels [p0, p1) in groups of group_panels(steps) from p0: the running maximum
// per panel, the group's first panel where a lane's maximum grew (strictly larger wins).
// steps == kSteps when kSteps > 0.
template <typename Dot, int64_t MR, int64_t kSteps>
__attribute__((always_inline)) inline void search_panels(const typename Dot::elem_t* zrows,
                                                         const typename Dot::elem_t* packed,
                                                         const typename Dot::acc_t* bias, int64_t steps, int64_t p0,
                                                         int64_t p1, Best<typename Dot::acc_t>* best) {
  using acc_t = typename Dot::acc_t;
  using V = typename Vec<acc_t>::type;
  using L = typename Lanes<acc_t>::type;
  using I = typename Lanes<acc_t>::scalar;
  constexpr int64_t nr = panel_codes<acc_t>();
  V top[MR];
  for (int64_t r = 0; r < MR; ++r) top[r] = best[r].value;
  for (int64_t group = p0; group < p1; group += group_panels(steps)) {
    for (int64_t panel = group; panel < min_i64(p1, group + group_panels(steps)); ++panel) {
      V acc[MR][2];
      micro_scores<Dot, MR, kSteps>(zrows, packed + panel * steps * nr, bias + panel * nr, steps, acc);
      for (int64_t r = 0; r < MR; ++r) top[r] = max_keep<acc_t>(max_keep<acc_t>(top[r], acc[r][0]), acc[r][1]);
    }
    const L id = L{} + static_cast<I>(group);
    for (int64_t r = 0; r < MR; ++r) {
      best[r].panel = top[r] > best[r].value ? id : best[r].panel;
      best[r].value = top[r];
    }
  }
}

// search_panels, with the small trip counts of tokenizers' codebooks known at compile time (1.4x
// at LlamaGen's D = 8 over the runtime loop). resolve_row's recomputation takes the same cases
// (row_scores).
template <typename Dot, int64_t MR>
inline void search_rows(const typename Dot::elem_t* zrows, const typename Dot::elem_t* packed,
                        const typename Dot::acc_t* bias, int64_t steps, int64_t p0, int64_t p1,
                        Best<typename Dot::acc_t>* best) {
  switch (steps) {
    case 4: return search_panels<Dot, MR, 4>(zrows, packed, bias, 4, p0, p1, best);
    case 8: return search_panels<Dot, MR, 8>(zrows, packed, bias, 8, p0, p1, best);
    case 16: return search_panels<Dot, MR, 16>(zrows, packed, bias, 16, p0, p1, best);
    case 32: return search_panels<Dot, MR, 32>(zrows, packed, bias, 32, p0, p1, best);
    default: return search_panels<Dot, MR, 0>(zrows, packed, bias, steps, p0, p1, best);
  }
}

// micro_scores of one row, through the same compile-time trip counts as search_rows.
template <typename Dot>
inline void row_scores(const typename Dot::elem_t* zrow, const typename Dot::elem_t* codes,
                       const typename Dot::acc_t* bias, int64_t steps,
                       typename Vec<typename Dot::acc_t>::type (&acc)[1][2]) {
  switch (steps) {
    case 4: return micro_scores<Dot, 1, 4>(zrow, codes, bias, 4, acc);
    case 8: return micro_scores<Dot, 1, 8>(zrow, codes, bias, 8, acc);
    case 16: return micro_scores<Dot, 1, 16>(zrow, codes, bias, 16, acc);
    case 32: return micro_scores<Dot, 1, 32>(zrow, codes, bias, 32, acc);
    default: return micro_scores<Dot, 1, 0>(zrow, codes, bias, steps, acc);
  }
}

// Lane i's lowest code holding top among panels [group, end): the first whose recomputed s
// equals top. The same operations give the same bits, so one does, and it lies in the group
// (where the lane's maximum first reached top). Should a compiler contract the two
// instantiations differently (-mtune's FMA-chain rules), the largest recomputed s (the lowest
// code on ties) is still the best code to within that rounding.
template <typename Dot>
inline int64_t lane_code(typename Dot::acc_t top, int64_t i, int64_t group, int64_t end,
                         const typename Dot::elem_t* zrow, const typename Dot::elem_t* packed,
                         const typename Dot::acc_t* bias, int64_t steps) {
  using acc_t = typename Dot::acc_t;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width, nr = panel_codes<acc_t>();
  int64_t nearest = group * nr + i;
  acc_t nearest_s = -acc_t(__builtin_inf());
  for (int64_t panel = group; panel < end; ++panel) {
    V acc[1][2];
    row_scores<Dot>(zrow, packed + panel * steps * nr, bias + panel * nr, steps, acc);
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
template <typename Dot>
inline void resolve_row(const Best<typename Dot::acc_t>& best, const typename Dot::elem_t* zrow,
                        const typename Dot::elem_t* packed, const typename Dot::acc_t* bias, int64_t steps,
                        const Plan<typename Dot::acc_t>& plan, typename Dot::acc_t* score, int64_t* index) {
  using acc_t = typename Dot::acc_t;
  constexpr int64_t W = Vec<acc_t>::width;
  acc_t top = -acc_t(__builtin_inf());
  for (int64_t i = 0; i < W; ++i) top = best.value[i] > top ? best.value[i] : top;
  int64_t code = -1;
  if (top > -acc_t(__builtin_inf())) {
    for (int64_t i = 0; i < W; ++i) {
      if (!(best.value[i] == top)) continue;
      const int64_t group = best.panel[i], block_end = (group / plan.block_panels + 1) * plan.block_panels;
      const int64_t end = min_i64(min_i64(plan.panels, block_end), group + group_panels(steps));
      const int64_t c = lane_code<Dot>(top, i, group, end, zrow, packed, bias, steps);
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

template <typename scalar_t, typename Dot>
struct QuantizeJob {
  using acc_t = typename Dot::acc_t;
  using elem_t = typename Dot::elem_t;
  const VQParams* p;
  Plan<acc_t> plan;
  const elem_t* packed;
  const acc_t* bias;

  // Rows r0 .. r0 + count of z into zbuf as packed elements, zero rows up to a multiple of kMR.
  static void load_rows(const VQParams& p, int64_t r0, int64_t count, elem_t* zbuf) {
    const scalar_t* z = static_cast<const scalar_t*>(p.z);
    const int64_t steps = dot_steps<Dot>(p.dim);
    for (int64_t r = 0; r < round_up(count, kMR); ++r)
      for (int64_t e = 0; e < steps; ++e)
        zbuf[r * steps + e] = r < count ? Dot::element(z + (r0 + r) * p.z_row_stride, e, p.dim) : elem_t(0);
  }

  // The code blocks of split s, all panels of each, for every micro-block of rows.
  void search(int64_t split, int64_t rows, const elem_t* zbuf, Best<acc_t>* best) const {
    const int64_t steps = dot_steps<Dot>(p->dim);
    const int64_t b0 = plan.code_blocks * split / plan.splits, b1 = plan.code_blocks * (split + 1) / plan.splits;
    for (int64_t block = b0; block < b1; ++block) {
      const int64_t p0 = block * plan.block_panels, p1 = min_i64(plan.panels, p0 + plan.block_panels);
      for (int64_t m = 0; m < rows; m += kMR)
        search_rows<Dot, kMR>(zbuf + m * steps, packed, bias, steps, p0, p1, best + m);
    }
  }

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<QuantizeJob*>(ctx);
    const auto& p = *job.p;
    const int64_t steps = dot_steps<Dot>(p.dim);
    Scratch<elem_t> zbuf(kTaskRows * steps);
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
        resolve_row<Dot>(best[r], zbuf.data + r * steps, job.packed, job.bias, steps, job.plan, &score, &index);
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

// The workspace plan of a search through Dot: packed codes of dot_steps elements.
template <typename Dot>
inline Plan<typename Dot::acc_t> plan_for(const VQParams& p) {
  return Plan<typename Dot::acc_t>(p, dot_steps<Dot>(p.dim) * int64_t(sizeof(typename Dot::elem_t)), kTaskRows,
                                   kCodeBlockBytes);
}

template <typename scalar_t, typename Dot>
const char* quantize_typed(const VQParams& p) {
  using acc_t = typename Dot::acc_t;
  using elem_t = typename Dot::elem_t;
  const Plan<acc_t> plan = plan_for<Dot>(p);
  // The search keeps a panel's number in an integer lane as wide as acc_t (search_panels).
  if (sizeof(typename Lanes<acc_t>::scalar) == 4 && plan.panels > (int64_t(1) << 31))
    return "vq_quantize: the codebook has more than 2^31 panels of codes (the CPU kernels number them in 32 bits "
           "for float32 / float16 / bfloat16); split the codebook, or search in float64";
  if (p.workspace_bytes < plan.bytes) return "vq_quantize: workspace too small";
  elem_t* packed = plan.template at<elem_t>(p, plan.packed_offset);
  acc_t* bias = plan.template at<acc_t>(p, plan.bias_offset);
  PackJob<scalar_t, Dot> pack{&p, packed, bias};
  parallel_for(plan.panels, &pack, &PackJob<scalar_t, Dot>::run);
  QuantizeJob<scalar_t, Dot> job{&p, plan, packed, bias};
  parallel_for(plan.row_tasks * plan.splits, &job, &QuantizeJob<scalar_t, Dot>::run);
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
  return p.dtype == DType::kFloat64 ? plan_for<FmaDot<double>>(p).bytes : plan_for<FmaDot<float>>(p).bytes;
}

const char* quantize(const VQParams& p) {
  if (p.rows == 0) return nullptr;
  return dispatch_dtype(p.dtype, "vq_quantize: unsupported dtype", [&](auto scalar, auto acc) {
    return quantize_typed<decltype(scalar), FmaDot<decltype(acc)>>(p);
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
