// CPU linear-attention kernels, written once and compiled per ISA (torch-free).
//
// Per-ISA code like mmfast/cpu/simd.h, whose building blocks it uses: included only through
// mmfast/cpu/instantiate_isas.h (see csrc/cpu/linear_attention_kernels.cpp), once per ISA.
//
// Layout of the work: tokens are processed in tiles of kTile rows. A tile of phi(k),
// phi(q), v or grad_out is converted to dense, zero-padded accumulator rows (phi applied
// once per element on load), and simd.h's micro-kernels do the D x D math. State and
// grad-state passes are split over N into chunks; each chunk writes an fp32 (fp64)
// partial to the workspace and a second parallel loop reduces them.
#ifndef MMFAST_CPU_ISA_NS
#error "mmfast/cpu/linear_attention_impl.h is included by mmfast/cpu/instantiate_isas.h only"
#endif

namespace mmfast {
namespace cpu {
namespace MMFAST_CPU_ISA_NS {
namespace la {  // this family's names, apart from other families' in the same ISA namespace

constexpr int64_t kMinChunk = 256;  // fewest tokens per parallel task

// x[0:n] / z: by the reciprocal (one division per row) where it is finite, else entry by entry
// (eps = 0 allows a subnormal z, whose reciprocal overflows where x / z need not).
template <typename acc_t>
inline void divide_row(acc_t* x, int64_t n, acc_t z) {
  if (__builtin_fabs(z) >= std::numeric_limits<acc_t>::min()) {
    const acc_t inv_z = acc_t(1) / z;
    for (int64_t e = 0; e < n; ++e) x[e] *= inv_z;
  } else {
    for (int64_t e = 0; e < n; ++e) x[e] /= z;
  }
}

template <typename acc_t>
inline acc_t feature(acc_t x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::kElu1: return x > 0 ? x + acc_t(1) : acc_t(__builtin_exp(double(x)));
    case FeatureMap::kRelu: return x < 0 ? acc_t(0) : x;  // keeps NaN (and -0), as torch.relu
    case FeatureMap::kNone: break;
  }
  return x;
}

template <>
inline float feature<float>(float x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::kElu1: return x > 0 ? x + 1.0f : __builtin_expf(x);
    case FeatureMap::kRelu: return x < 0 ? 0.0f : x;
    case FeatureMap::kNone: break;
  }
  return x;
}

// ---- tiles ---------------------------------------------------------------------------

template <typename scalar_t>
inline const scalar_t* token_row(const TokenTensor& t, int64_t b, int64_t n, int64_t h) {
  return static_cast<const scalar_t*>(t.data) + b * t.stride_b + n * t.stride_n + h * t.stride_h;
}

// phi over a row of `ld` floats (ld a multiple of the vector width), vectorised.
inline void feature_row(float* row, int64_t ld, FeatureMap fm) {
  using V = Vec<float>::type;
  constexpr int64_t W = Vec<float>::width;
  if (fm == FeatureMap::kNone) return;
  for (int64_t d = 0; d < ld; d += W) {
    V x = load<float>(row + d);
    if (fm == FeatureMap::kElu1)
      x = x > splat<float>(0.0f) ? x + splat<float>(1.0f) : exp_vec(x);
    else  // relu; `x < 0 ? 0 : x` keeps NaN (a max with 0 would drop it)
      x = x < splat<float>(0.0f) ? splat<float>(0.0f) : x;
    store<float>(row + d, x);
  }
}

inline void feature_row(double* row, int64_t ld, FeatureMap fm) {
  for (int64_t d = 0; d < ld; ++d) row[d] = feature<double>(row[d], fm);
}

// Heads [h0, h0 + count) of a batch entry: one task's share of the heads.
struct Heads {
  int64_t h0, count;
};

// Tiles of the task's heads: tiles[h][kTile][ld] <- tokens n0 .. n0+rows of batch entry b,
// head h0 + h. Rows are visited in (token, head) order, the memory order of a (B, N, H, D)
// tensor, so DRAM is streamed in long runs. Padding rows and columns are zero.
template <typename scalar_t, typename acc_t>
void load_tiles(const TokenTensor& t, int64_t b, int64_t n0, int64_t rows, Heads heads, int64_t dim, int64_t ld,
                bool apply_feature, FeatureMap fm, acc_t* tiles) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads.count; ++h) {
      const scalar_t* src = token_row<scalar_t>(t, b, n0 + r, heads.h0 + h);
      acc_t* dst = tiles + (h * kTile + r) * ld;
      to_acc_row(src, dst, dim);
      if (apply_feature) feature_row(dst, ld, fm);
      for (int64_t d = dim; d < ld; ++d) dst[d] = 0;  // phi(0) may be non-zero: keep padding inert
    }
  if (rows < kTile)
    for (int64_t h = 0; h < heads.count; ++h)
      __builtin_memset(tiles + (h * kTile + rows) * ld, 0, sizeof(acc_t) * (kTile - rows) * ld);
}

template <typename scalar_t, typename acc_t>
void store_tiles(const acc_t* tiles, int64_t ld, int64_t rows, Heads heads, int64_t dim, const TokenTensor& t,
                 int64_t b, int64_t n0) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads.count; ++h) {
      scalar_t* dst = const_cast<scalar_t*>(token_row<scalar_t>(t, b, n0 + r, heads.h0 + h));
      const acc_t* src = tiles + (h * kTile + r) * ld;
      from_acc_row(src, dst, dim);
    }
}

// Backward epilogue, vectorised: row[d] = grad_d * phi'(x_d) with grad_d = row[d] + scale *
// add[d], phi' recovered from phi(x_d) and applied as torch's autograd does: elu1 -> grad * phi
// where phi < 1 (x <= 0), else grad (also for NaN); relu -> 0 where phi <= 0 (selected, so a
// NaN grad gives 0 there), else grad; none -> grad. ld is a multiple of the vector width.
template <typename acc_t>
inline void feature_grad_row(acc_t* row, const acc_t* add, acc_t scale, const acc_t* phi, int64_t ld, FeatureMap fm) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const V s = splat<acc_t>(scale), one = splat<acc_t>(1), zero = splat<acc_t>(0);
  for (int64_t d = 0; d < ld; d += W) {
    const V grad = load<acc_t>(row + d) + s * load<acc_t>(add + d);
    const V f = load<acc_t>(phi + d);
    V result = grad;
    if (fm == FeatureMap::kElu1) result = f < one ? grad * f : grad;
    if (fm == FeatureMap::kRelu) result = f <= zero ? zero : grad;  // a select, as torch: 0 even for a NaN grad
    store<acc_t>(row + d, result);
  }
}

// ---- work split ------------------------------------------------------------------------
//
// A task is (b, chunk of tokens, group of heads). For each tile of tokens it walks its heads
// in memory order, so the (B, N, H, D) rows are streamed from DRAM contiguously. Heads are
// grouped only when the chunks alone are too few for the threads (short sequences): reading
// a subset of each row's heads streams worse (measured).

struct Split {
  int64_t chunks;       // chunks of the sequence per batch entry
  int64_t chunk_len;    // tokens per chunk (a multiple of kTile)
  int64_t groups;       // head groups per (batch entry, chunk)
  int64_t group_heads;  // heads per group (the last may have fewer)

  struct Task {
    int64_t b, chunk, n_begin, n_end;
    Heads heads;
  };

  int64_t tasks(const LinearAttentionParams& p) const { return p.batch * chunks * groups; }
  Task task(const LinearAttentionParams& p, int64_t index) const {
    const int64_t group = index % groups, rest = index / groups;
    Task t;
    t.chunk = rest % chunks;
    t.b = rest / chunks;
    t.n_begin = t.chunk * chunk_len;
    t.n_end = min_i64(p.seqlen, t.n_begin + chunk_len);
    t.heads.h0 = group * group_heads;
    t.heads.count = min_i64(group_heads, p.heads - t.heads.h0);
    return t;
  }
};

// `chunks` chunks of the sequence per batch entry; when batch * chunks leaves threads idle, the
// heads are split into groups too. Heads change no sum, so their grouping may follow the
// thread count even where the chunking may not.
inline Split make_split(const LinearAttentionParams& p, int64_t chunks) {
  Split s;
  s.chunk_len = round_up(ceil_div(p.seqlen, max_i64(1, chunks)), kTile);
  s.chunks = ceil_div(p.seqlen, s.chunk_len);
  const int64_t wanted = ceil_div(4 * max_i64(1, max_threads()), max_i64(1, p.batch * s.chunks));
  s.group_heads = ceil_div(p.heads, max_i64(1, min_i64(p.heads, wanted)));
  s.groups = ceil_div(p.heads, s.group_heads);
  return s;
}

// Per-token passes (apply, state_backward): enough chunks to keep every thread busy, of at
// least kMinChunk tokens. No token's result depends on the split.
inline Split split_tokens(const LinearAttentionParams& p) {
  const int64_t wanted = ceil_div(4 * max_i64(1, max_threads()), max_i64(1, p.batch));
  return make_split(p, min_i64(wanted, max_i64(1, ceil_div(p.seqlen, kMinChunk))));
}

// Reductions over tokens (state, apply_backward): chunks fixed by the shape alone, never by
// the thread count, so every sum -- and so every result -- is bitwise identical for any number
// of threads. Chunks of at least max(1024, 16 D) tokens keep the partials (doubles) under
// about 4% of the token bytes; at most kMaxReductionChunks chunks per batch entry.
constexpr int64_t kMinReductionChunk = 1024;
constexpr int64_t kMaxReductionChunks = 8;

inline int64_t reduction_chunks(const LinearAttentionParams& p) {
  const int64_t min_len = max_i64(kMinReductionChunk, 16 * max_i64(p.dim_k, p.dim_v));
  return max_i64(1, min_i64(kMaxReductionChunks, p.seqlen / min_len));
}

inline Split split_reduction(const LinearAttentionParams& p) { return make_split(p, reduction_chunks(p)); }

// Accuracy of the reductions: within a task, tokens are summed in acc_t (fp32 for fp16/bf16/
// fp32 inputs) over kFlushTiles tiles at most, then that block sum is added into the task's
// double partial and the fp32 accumulator restarts from zero; the partials of a (b, h) are
// summed in double in chunk order. No fp32 accumulator ever sums more than 128 tokens, so the
// error of S and m does not grow with N (one fp32 rounding of a <= 128-term sum, then doubles).
// Flushing every 2 tiles cost ~10% of the state pass, every 4 ~6% (measured, 2 threads).
constexpr int64_t kFlushTiles = 4;

// hi[i] += lo[i] and lo[i] = 0 for i < count: ends one block of acc_t accumulation.
template <typename acc_t>
inline void flush_into(double* __restrict__ hi, acc_t* __restrict__ lo, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    hi[i] += lo[i];
    lo[i] = 0;
  }
}

// Workspace: one double [pk*pv + pk] partial per (b, chunk, h), for state and apply_backward.
template <typename acc_t>
size_t partials_bytes(const LinearAttentionParams& p) {
  const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v);
  return sizeof(double) * static_cast<size_t>(p.bh() * reduction_chunks(p) * (pk * pv + pk));
}

// The task's partials: [b][chunk][h][pk*pv + pk], heads h0 .. of (b, chunk).
inline double* task_partials(double* partials, const LinearAttentionParams& p, const Split& split,
                             const Split::Task& t, int64_t stride) {
  return partials + ((t.b * split.chunks + t.chunk) * p.heads + t.heads.h0) * stride;
}

// Padded copies of heads h0 .. of a (B, H, rows, cols) state, batch entry b: [count][prow][pcol].
template <typename acc_t>
void pad_heads(const void* states, const LinearAttentionParams& p, int64_t b, Heads heads, int64_t rows, int64_t cols,
               acc_t scale, bool transpose, acc_t* dst, int64_t prow, int64_t pcol) {
  for (int64_t h = 0; h < heads.count; ++h)
    pad_matrix<acc_t>(static_cast<const acc_t*>(states) + (b * p.heads + heads.h0 + h) * rows * cols, rows, cols,
                      scale, transpose, dst + h * prow * pcol, prow, pcol);
}

// [S | m] of the task's heads, zero-padded to [count][pk][pa] (pa >= Dv + 1): the mean rides in
// column Dv, so one micro-kernel yields numerators and denominators.
template <typename acc_t>
void pad_states_with_mean(const LinearAttentionParams& p, int64_t b, Heads heads, acc_t* states, int64_t pk,
                          int64_t pa) {
  pad_heads<acc_t>(p.state, p, b, heads, p.dim_k, p.dim_v, acc_t(1), false, states, pk, pa);
  const acc_t* means = static_cast<const acc_t*>(p.mean) + (b * p.heads + heads.h0) * p.dim_k;
  for (int64_t h = 0; h < heads.count; ++h)
    for (int64_t d = 0; d < p.dim_k; ++d) states[(h * pk + d) * pa + p.dim_v] = means[h * p.dim_k + d];
}

// The [pk*pv + pk] double partials of one (b, h) summed over chunks in chunk order, divided
// by `divisor`, unpadded into acc_t.
template <typename acc_t>
void sum_partials(const double* partials, int64_t chunks, int64_t chunk_stride, int64_t pk, int64_t pv, int64_t dk,
                  int64_t dv, double divisor, acc_t* matrix, acc_t* vector) {
  for (int64_t d = 0; d < dk; ++d) {
    for (int64_t e = 0; e < dv; ++e) {
      double s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partials[c * chunk_stride + d * pv + e];
      matrix[d * dv + e] = static_cast<acc_t>(s / divisor);
    }
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * chunk_stride + pk * pv + d];
    vector[d] = static_cast<acc_t>(s / divisor);
  }
}

// Reduces partials laid out [b][chunk][h][pk*pv + pk] into (B, H, Dk, Dv) and (B, H, Dk).
template <typename acc_t>
struct ReducePartials {
  const LinearAttentionParams* p;
  Split split;
  const double* partials;
  double divisor;
  acc_t* matrices;
  acc_t* vectors;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<ReducePartials*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v), stride = pk * pv + pk;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      sum_partials<acc_t>(job.partials + (b * job.split.chunks * p.heads + h) * stride, job.split.chunks,
                          p.heads * stride, pk, pv, p.dim_k, p.dim_v, job.divisor,
                          job.matrices + bh * p.dim_k * p.dim_v, job.vectors + bh * p.dim_k);
    }
  }
};

template <typename acc_t>
void reduce_partials(const LinearAttentionParams& p, const Split& split, const double* partials, double divisor,
                     void* matrices, void* vectors) {
  ReducePartials<acc_t> job{&p, split, partials, divisor, static_cast<acc_t*>(matrices), static_cast<acc_t*>(vectors)};
  parallel_for(p.bh(), &job, &ReducePartials<acc_t>::run);
}

// ---- state: S = mean_j phi(k_j)^T v_j, m = mean_j phi(k_j) ------------------------------

template <typename scalar_t, typename acc_t>
struct StateJob {
  const LinearAttentionParams* p;
  Split split;
  double* partials;  // [b][chunk][h][pk*pv + pk]


  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<StateJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v), stride = pk * pv + pk;
    const int64_t heads = job.split.group_heads;
    Scratch<acc_t> scratch(heads * (kTile * (pk + pv) + stride));
    acc_t* phi_k_tiles = scratch.data;                  // [heads][kTile][pk]
    acc_t* v_tiles = phi_k_tiles + heads * kTile * pk;  // [heads][kTile][pv]
    acc_t* block = v_tiles + heads * kTile * pv;        // [heads][pk*pv + pk]: this block's sums
    __builtin_memset(block, 0, sizeof(acc_t) * heads * stride);
    for (int64_t index = begin; index < end; ++index) {
      const Split::Task t = job.split.task(p, index);
      double* partials = task_partials(job.partials, p, job.split, t, stride);
      __builtin_memset(partials, 0, sizeof(double) * t.heads.count * stride);
      for (int64_t n0 = t.n_begin; n0 < t.n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, t.n_end - n0);
        load_tiles<scalar_t, acc_t>(p.k, t.b, n0, rows, t.heads, p.dim_k, pk, true, p.feature_map, phi_k_tiles);
        load_tiles<scalar_t, acc_t>(p.v, t.b, n0, rows, t.heads, p.dim_v, pv, false, p.feature_map, v_tiles);
        for (int64_t h = 0; h < t.heads.count; ++h) {
          acc_t* state = block + h * stride;
          acc_t* mean = state + pk * pv;
          const acc_t* phi_k = phi_k_tiles + h * kTile * pk;
          tile_outer_accum<acc_t>(phi_k, pk, pk, v_tiles + h * kTile * pv, pv, pv, state, pv);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t d = 0; d < pk; ++d) mean[d] += phi_k[r * pk + d];
        }
        if ((n0 - t.n_begin) / kTile % kFlushTiles == kFlushTiles - 1 || n0 + kTile >= t.n_end)
          flush_into<acc_t>(partials, block, t.heads.count * stride);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* state_typed(const LinearAttentionParams& p) {
  if (p.workspace_bytes < partials_bytes<acc_t>(p)) return "linear_attention_state: workspace too small";
  using Job = StateJob<scalar_t, acc_t>;
  Job job{&p, split_reduction(p), static_cast<double*>(p.workspace)};
  parallel_for(job.split.tasks(p), &job, &Job::run_tasks);
  reduce_partials<acc_t>(p, job.split, job.partials, static_cast<double>(p.seqlen), p.state, p.mean);
  return nullptr;
}

// ---- apply: out_i = phi(q_i) S / (phi(q_i) . m + eps) -----------------------------------
// The mean rides along as an extra column of the padded state, so the same micro-kernel
// produces the numerator and the denominator: [S | m] has pa = padded(Dv + 1) columns.

template <typename scalar_t, typename acc_t>
struct ApplyJob {
  const LinearAttentionParams* p;
  Split split;


  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<ApplyJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pa = padded<acc_t>(p.dim_v + 1);
    const int64_t heads = job.split.group_heads;
    Scratch<acc_t> scratch(heads * (pk * pa + kTile * (pk + pa)));
    acc_t* states = scratch.data;                        // [heads][pk][pa], column Dv holds m
    acc_t* phi_q_tiles = states + heads * pk * pa;       // [heads][kTile][pk]
    acc_t* out_tiles = phi_q_tiles + heads * kTile * pk;  // [heads][kTile][pa]
    int64_t loaded = -1;  // b * H + h0 of the states in `states`
    for (int64_t index = begin; index < end; ++index) {
      const Split::Task t = job.split.task(p, index);
      if (t.b * p.heads + t.heads.h0 != loaded) {
        pad_states_with_mean<acc_t>(p, t.b, t.heads, states, pk, pa);
        loaded = t.b * p.heads + t.heads.h0;
      }
      for (int64_t n0 = t.n_begin; n0 < t.n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, t.n_end - n0);
        load_tiles<scalar_t, acc_t>(p.q, t.b, n0, rows, t.heads, p.dim_k, pk, true, p.feature_map, phi_q_tiles);
        for (int64_t h = 0; h < t.heads.count; ++h) {
          acc_t* out = out_tiles + h * kTile * pa;
          tile_matmul<acc_t>(phi_q_tiles + h * kTile * pk, pk, states + h * pk * pa, pa, p.dim_k, pa, out, pa);
          for (int64_t r = 0; r < rows; ++r) divide_row<acc_t>(out + r * pa, p.dim_v, out[r * pa + p.dim_v] + acc_t(p.eps));
        }
        store_tiles<scalar_t, acc_t>(out_tiles, pa, rows, t.heads, p.dim_v, p.out, t.b, n0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* apply_typed(const LinearAttentionParams& p) {
  using Job = ApplyJob<scalar_t, acc_t>;
  Job job{&p, split_tokens(p)};
  parallel_for(job.split.tasks(p), &job, &Job::run_tasks);
  return nullptr;
}

// ---- apply backward: grad_q and the chunk partials of grad_state, grad_mean -------------

template <typename scalar_t, typename acc_t>
struct ApplyBackwardJob {
  const LinearAttentionParams* p;
  Split split;
  double* partials;  // [b][chunk][h][pk*pv + pk]

  // One worker's buffers for `heads` heads (pk, pv, pa: padded Dk, Dv, Dv + 1).
  struct Buffers {
    int64_t pk, pv, pa;
    acc_t* states;        // [heads][pk][pa]: S | m
    acc_t* states_t;      // [heads][pv][pk]: S^T
    acc_t* means;         // [heads][pk]: m
    acc_t* phi_q_tiles;   // [heads][kTile][pk]
    acc_t* grad_q_tiles;  // [heads][kTile][pk]
    acc_t* g_tiles;       // [heads][kTile][pv]: grad_out, then g = grad_out / z
    acc_t* o;             // [kTile][pa]: phi_q S | z - eps
    acc_t* dz;            // [kTile]
    acc_t* block;         // [heads][pk*pv + pk]: this block's sums of dS | dm

    Buffers(acc_t* base, int64_t heads, int64_t pk_, int64_t pv_, int64_t pa_) : pk(pk_), pv(pv_), pa(pa_) {
      states = base;
      states_t = states + heads * pk * pa;
      means = states_t + heads * pk * pv;
      phi_q_tiles = means + heads * pk;
      grad_q_tiles = phi_q_tiles + heads * kTile * pk;
      g_tiles = grad_q_tiles + heads * kTile * pk;
      o = g_tiles + heads * kTile * pv;
      dz = o + kTile * pa;
      block = dz + kTile;
    }
    static int64_t elements(int64_t heads, int64_t pk, int64_t pv, int64_t pa) {
      return heads * (pk * (pa + pv + 1) + kTile * (2 * pk + pv) + pk * pv + pk) + kTile * (pa + 1);
    }
  };


  // Head h of the loaded tile (`rows` real tokens): grad_phi_q, and dS, dm into the block sums.
  //   z = phi_q.m + eps; o = phi_q S / z; g = do / z; dS += phi_q^T g; dz = -(g . o)
  //   dphi_q = g S^T + dz m; dm += dz phi_q; dq = dphi_q * phi'(q)
  static void head(const LinearAttentionParams& p, const Buffers& w, int64_t h, int64_t rows) {
    const int64_t pk = w.pk, pv = w.pv, pa = w.pa;
    acc_t* grad_state = w.block + h * (pk * pv + pk);
    acc_t* grad_mean = grad_state + pk * pv;
    const acc_t* phi_q = w.phi_q_tiles + h * kTile * pk;
    acc_t* grad_phi_q = w.grad_q_tiles + h * kTile * pk;
    acc_t* g = w.g_tiles + h * kTile * pv;
    tile_matmul<acc_t>(phi_q, pk, w.states + h * pk * pa, pa, p.dim_k, pa, w.o, pa);
    for (int64_t r = 0; r < kTile; ++r) {
      if (r >= rows) {  // padding rows: phi_q = 0 and g = 0 stay inert (never scaled by a 0 * inf z)
        w.dz[r] = 0;
        continue;
      }
      const acc_t z = w.o[r * pa + p.dim_v] + acc_t(p.eps);
      divide_row<acc_t>(g + r * pv, pv, z);
      w.dz[r] = -dot_padded<acc_t>(g + r * pv, w.o + r * pa, pv);  // g is 0 past Dv
      divide_row<acc_t>(w.dz + r, 1, z);
    }
    tile_outer_accum<acc_t>(phi_q, pk, pk, g, pv, pv, grad_state, pv);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < pk; ++d) grad_mean[d] += w.dz[r] * phi_q[r * pk + d];
    tile_matmul<acc_t>(g, pv, w.states_t + h * pv * pk, pk, p.dim_v, pk, grad_phi_q, pk);
    for (int64_t r = 0; r < rows; ++r)
      feature_grad_row<acc_t>(grad_phi_q + r * pk, w.means + h * pk, w.dz[r], phi_q + r * pk, pk, p.feature_map);
  }

  static void load_states(const LinearAttentionParams& p, const Buffers& w, int64_t b, Heads heads) {
    pad_states_with_mean<acc_t>(p, b, heads, w.states, w.pk, w.pa);
    pad_heads<acc_t>(p.state, p, b, heads, p.dim_k, p.dim_v, acc_t(1), true, w.states_t, w.pv, w.pk);
    pad_heads<acc_t>(p.mean, p, b, heads, 1, p.dim_k, acc_t(1), false, w.means, 1, w.pk);
  }

  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<ApplyBackwardJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v), pa = padded<acc_t>(p.dim_v + 1);
    const int64_t stride = pk * pv + pk;
    Scratch<acc_t> scratch(Buffers::elements(job.split.group_heads, pk, pv, pa));
    const Buffers w(scratch.data, job.split.group_heads, pk, pv, pa);
    __builtin_memset(w.block, 0, sizeof(acc_t) * job.split.group_heads * stride);
    int64_t loaded = -1;  // b * H + h0 of the states in the buffers
    for (int64_t index = begin; index < end; ++index) {
      const Split::Task t = job.split.task(p, index);
      if (t.b * p.heads + t.heads.h0 != loaded) {
        load_states(p, w, t.b, t.heads);
        loaded = t.b * p.heads + t.heads.h0;
      }
      double* partials = task_partials(job.partials, p, job.split, t, stride);
      __builtin_memset(partials, 0, sizeof(double) * t.heads.count * stride);
      for (int64_t n0 = t.n_begin; n0 < t.n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, t.n_end - n0);
        load_tiles<scalar_t, acc_t>(p.q, t.b, n0, rows, t.heads, p.dim_k, pk, true, p.feature_map, w.phi_q_tiles);
        load_tiles<scalar_t, acc_t>(p.grad_out, t.b, n0, rows, t.heads, p.dim_v, pv, false, p.feature_map, w.g_tiles);
        for (int64_t h = 0; h < t.heads.count; ++h) head(p, w, h, rows);
        store_tiles<scalar_t, acc_t>(w.grad_q_tiles, pk, rows, t.heads, p.dim_k, p.grad_q, t.b, n0);
        if ((n0 - t.n_begin) / kTile % kFlushTiles == kFlushTiles - 1 || n0 + kTile >= t.n_end)
          flush_into<acc_t>(partials, w.block, t.heads.count * stride);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* apply_backward_typed(const LinearAttentionParams& p) {
  if (p.workspace_bytes < partials_bytes<acc_t>(p)) return "linear_attention_apply_backward: workspace too small";
  using Job = ApplyBackwardJob<scalar_t, acc_t>;
  Job job{&p, split_reduction(p), static_cast<double*>(p.workspace)};
  parallel_for(job.split.tasks(p), &job, &Job::run_tasks);
  reduce_partials<acc_t>(p, job.split, job.partials, 1.0, p.grad_state, p.grad_mean);
  return nullptr;
}

// ---- state backward: dphi_k = (v dS^T + dm) / N, dv = phi_k dS / N ----------------------

template <typename scalar_t, typename acc_t>
struct StateBackwardJob {
  const LinearAttentionParams* p;
  Split split;


  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<StateBackwardJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v);
    const int64_t heads = job.split.group_heads;
    Scratch<acc_t> scratch(heads * (2 * pk * pv + pk + kTile * (2 * pk + 2 * pv)));
    acc_t* grad_states = scratch.data;                   // [heads][pk][pv] / N
    acc_t* grad_states_t = grad_states + heads * pk * pv;  // [heads][pv][pk] / N
    acc_t* grad_means = grad_states_t + heads * pk * pv;   // [heads][pk] / N
    acc_t* phi_k_tiles = grad_means + heads * pk;           // [heads][kTile][pk]
    acc_t* grad_k_tiles = phi_k_tiles + heads * kTile * pk;  // [heads][kTile][pk]
    acc_t* v_tiles = grad_k_tiles + heads * kTile * pk;      // [heads][kTile][pv]
    acc_t* grad_v_tiles = v_tiles + heads * kTile * pv;      // [heads][kTile][pv]
    const acc_t inv_n = acc_t(1) / acc_t(p.seqlen);
    int64_t loaded = -1;  // b * H + h0 of the states in the buffers
    for (int64_t index = begin; index < end; ++index) {
      const Split::Task t = job.split.task(p, index);
      if (t.b * p.heads + t.heads.h0 != loaded) {
        pad_heads<acc_t>(p.grad_state, p, t.b, t.heads, p.dim_k, p.dim_v, inv_n, false, grad_states, pk, pv);
        pad_heads<acc_t>(p.grad_state, p, t.b, t.heads, p.dim_k, p.dim_v, inv_n, true, grad_states_t, pv, pk);
        pad_heads<acc_t>(p.grad_mean, p, t.b, t.heads, 1, p.dim_k, inv_n, false, grad_means, 1, pk);
        loaded = t.b * p.heads + t.heads.h0;
      }
      for (int64_t n0 = t.n_begin; n0 < t.n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, t.n_end - n0);
        load_tiles<scalar_t, acc_t>(p.k, t.b, n0, rows, t.heads, p.dim_k, pk, true, p.feature_map, phi_k_tiles);
        load_tiles<scalar_t, acc_t>(p.v, t.b, n0, rows, t.heads, p.dim_v, pv, false, p.feature_map, v_tiles);
        for (int64_t h = 0; h < t.heads.count; ++h) {
          const acc_t* phi_k = phi_k_tiles + h * kTile * pk;
          acc_t* grad_k = grad_k_tiles + h * kTile * pk;
          tile_matmul<acc_t>(v_tiles + h * kTile * pv, pv, grad_states_t + h * pv * pk, pk, p.dim_v, pk, grad_k, pk);
          tile_matmul<acc_t>(phi_k, pk, grad_states + h * pk * pv, pv, p.dim_k, pv, grad_v_tiles + h * kTile * pv, pv);
          for (int64_t r = 0; r < rows; ++r)
            feature_grad_row<acc_t>(grad_k + r * pk, grad_means + h * pk, acc_t(1), phi_k + r * pk, pk, p.feature_map);
        }
        store_tiles<scalar_t, acc_t>(grad_k_tiles, pk, rows, t.heads, p.dim_k, p.grad_k, t.b, n0);
        store_tiles<scalar_t, acc_t>(grad_v_tiles, pv, rows, t.heads, p.dim_v, p.grad_v, t.b, n0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* state_backward_typed(const LinearAttentionParams& p) {
  using Job = StateBackwardJob<scalar_t, acc_t>;
  Job job{&p, split_tokens(p)};
  parallel_for(job.split.tasks(p), &job, &Job::run_tasks);
  return nullptr;
}

// ---- entry points ------------------------------------------------------------------------

#define MMFAST_LA_ENTRY(name, typed)                                                              \
  const char* name(const LinearAttentionParams& p) {                                              \
    return dispatch_dtype(p.dtype, "linear_attention: unsupported dtype",                         \
                          [&](auto scalar, auto acc) { return typed<decltype(scalar), decltype(acc)>(p); }); \
  }
MMFAST_LA_ENTRY(state, state_typed)
MMFAST_LA_ENTRY(apply, apply_typed)
MMFAST_LA_ENTRY(apply_backward, apply_backward_typed)
MMFAST_LA_ENTRY(state_backward, state_backward_typed)
#undef MMFAST_LA_ENTRY

size_t workspace_bytes(const LinearAttentionParams& p) {
  return p.dtype == DType::kFloat64 ? partials_bytes<double>(p) : partials_bytes<float>(p);
}

}  // namespace la

LinearAttentionKernels linear_attention_kernels() {
  return {&la::workspace_bytes, &la::state, &la::apply, &la::apply_backward, &la::state_backward};
}

}  // namespace MMFAST_CPU_ISA_NS
}  // namespace cpu
}  // namespace mmfast
