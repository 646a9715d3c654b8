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

template <typename acc_t>
inline acc_t feature(acc_t x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::kElu1: return x > 0 ? x + acc_t(1) : acc_t(__builtin_exp(double(x)));
    case FeatureMap::kRelu: return x > 0 ? x : acc_t(0);
    case FeatureMap::kNone: break;
  }
  return x;
}

template <>
inline float feature<float>(float x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::kElu1: return x > 0 ? x + 1.0f : __builtin_expf(x);
    case FeatureMap::kRelu: return x > 0 ? x : 0.0f;
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
    else
      x = x > splat<float>(0.0f) ? x : splat<float>(0.0f);
    store<float>(row + d, x);
  }
}

inline void feature_row(double* row, int64_t ld, FeatureMap fm) {
  for (int64_t d = 0; d < ld; ++d) row[d] = feature<double>(row[d], fm);
}

// Tiles of every head: tiles[h][kTile][ld] <- tokens n0 .. n0+rows of batch entry b.
// Rows are visited in (token, head) order, i.e. memory order of a (B, N, H, D) tensor, so
// DRAM is streamed sequentially. Padding rows and columns are zero.
template <typename scalar_t, typename acc_t>
void load_tiles(const TokenTensor& t, int64_t b, int64_t n0, int64_t rows, int64_t heads, int64_t dim, int64_t ld,
                bool apply_feature, FeatureMap fm, acc_t* tiles) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const scalar_t* src = token_row<scalar_t>(t, b, n0 + r, h);
      acc_t* dst = tiles + (h * kTile + r) * ld;
      for (int64_t d = 0; d < dim; ++d) dst[d] = to_acc(src[d]);
      if (apply_feature) feature_row(dst, ld, fm);
      for (int64_t d = dim; d < ld; ++d) dst[d] = 0;  // phi(0) may be non-zero: keep padding inert
    }
  if (rows < kTile)
    for (int64_t h = 0; h < heads; ++h)
      __builtin_memset(tiles + (h * kTile + rows) * ld, 0, sizeof(acc_t) * (kTile - rows) * ld);
}

template <typename scalar_t, typename acc_t>
void store_tiles(const acc_t* tiles, int64_t ld, int64_t rows, int64_t heads, int64_t dim, const TokenTensor& t,
                 int64_t b, int64_t n0) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      scalar_t* dst = const_cast<scalar_t*>(token_row<scalar_t>(t, b, n0 + r, h));
      const acc_t* src = tiles + (h * kTile + r) * ld;
      for (int64_t d = 0; d < dim; ++d) dst[d] = FromAcc<scalar_t>::convert(src[d]);
    }
}


// Backward epilogue, vectorised: row[d] = (row[d] + scale * add[d]) * phi'(x_d), with phi'
// recovered from phi(x_d): elu1 -> min(phi, 1), relu -> (phi > 0), none -> 1. ld is a
// multiple of the vector width.
template <typename acc_t>
inline void feature_grad_row(acc_t* row, const acc_t* add, acc_t scale, const acc_t* phi, int64_t ld, FeatureMap fm) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  const V s = splat<acc_t>(scale), one = splat<acc_t>(1), zero = splat<acc_t>(0);
  for (int64_t d = 0; d < ld; d += W) {
    const V grad = load<acc_t>(row + d) + s * load<acc_t>(add + d);
    const V f = load<acc_t>(phi + d);
    V slope = one;
    if (fm == FeatureMap::kElu1) slope = f < one ? f : one;
    if (fm == FeatureMap::kRelu) slope = f > zero ? one : zero;
    store<acc_t>(row + d, grad * slope);
  }
}

// ---- work split ------------------------------------------------------------------------
//
// A task is (b, chunk of tokens) and covers every head: for each tile of tokens it walks the
// heads in memory order, so the (B, N, H, D) rows are streamed from DRAM contiguously
// instead of with an H*D stride per head.

struct Split {
  int64_t chunks;     // chunks of the sequence per batch entry
  int64_t chunk_len;  // tokens per chunk (a multiple of kTile)

  int64_t tasks(const LinearAttentionParams& p) const { return p.batch * chunks; }
  int64_t begin(int64_t chunk) const { return chunk * chunk_len; }
  int64_t end(const LinearAttentionParams& p, int64_t chunk) const {
    return min_i64(p.seqlen, (chunk + 1) * chunk_len);
  }
};

// Enough (b, chunk) tasks to keep every thread busy, but chunks of at least kMinChunk
// tokens so the per-chunk partial states stay small next to the tokens they summarise.
inline Split split_sequence(const LinearAttentionParams& p) {
  const int64_t threads = max_i64(1, max_threads());
  const int64_t wanted = ceil_div(4 * threads, max_i64(1, p.batch));
  const int64_t most = max_i64(1, ceil_div(p.seqlen, kMinChunk));
  Split s;
  s.chunks = max_i64(1, min_i64(wanted, most));
  s.chunk_len = round_up(ceil_div(p.seqlen, s.chunks), kTile);
  s.chunks = ceil_div(p.seqlen, s.chunk_len);
  return s;
}

// Workspace: one [pk*pv + pk] partial per (b, chunk, h), for state and apply_backward.
template <typename acc_t>
size_t partials_bytes(const LinearAttentionParams& p) {
  const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v);
  return sizeof(acc_t) * static_cast<size_t>(p.bh() * split_sequence(p).chunks * (pk * pv + pk));
}

// Padded per-head copies of a (B, H, rows, cols) state for batch entry b: [H][prow][pcol].
template <typename acc_t>
void pad_heads(const void* states, const LinearAttentionParams& p, int64_t b, int64_t rows, int64_t cols,
               acc_t scale, bool transpose, acc_t* dst, int64_t prow, int64_t pcol) {
  for (int64_t h = 0; h < p.heads; ++h)
    pad_matrix<acc_t>(static_cast<const acc_t*>(states) + (b * p.heads + h) * rows * cols, rows, cols, scale,
                      transpose, dst + h * prow * pcol, prow, pcol);
}

// [S | m] of every head of batch entry b, zero-padded to [H][pk][pa] (pa >= Dv + 1): the
// mean rides in column Dv, so one micro-kernel yields numerators and denominators.
template <typename acc_t>
void pad_states_with_mean(const LinearAttentionParams& p, int64_t b, acc_t* states, int64_t pk, int64_t pa) {
  pad_heads<acc_t>(p.state, p, b, p.dim_k, p.dim_v, acc_t(1), false, states, pk, pa);
  const acc_t* means = static_cast<const acc_t*>(p.mean) + b * p.heads * p.dim_k;
  for (int64_t h = 0; h < p.heads; ++h)
    for (int64_t d = 0; d < p.dim_k; ++d) states[(h * pk + d) * pa + p.dim_v] = means[h * p.dim_k + d];
}

// sum over chunks of the [pk*pv + pk] partials of one (b, h), scaled, unpadded.
template <typename acc_t>
void sum_partials(const acc_t* partials, int64_t chunks, int64_t chunk_stride, int64_t pk, int64_t pv, int64_t dk,
                  int64_t dv, acc_t scale, acc_t* matrix, acc_t* vector) {
  for (int64_t d = 0; d < dk; ++d) {
    for (int64_t e = 0; e < dv; ++e) {
      acc_t s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partials[c * chunk_stride + d * pv + e];
      matrix[d * dv + e] = s * scale;
    }
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * chunk_stride + pk * pv + d];
    vector[d] = s * scale;
  }
}

// Reduces partials laid out [b][chunk][h][pk*pv + pk] into (B, H, Dk, Dv) and (B, H, Dk).
template <typename acc_t>
struct ReducePartials {
  const LinearAttentionParams* p;
  Split split;
  const acc_t* partials;
  acc_t scale;
  acc_t* matrices;
  acc_t* vectors;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<ReducePartials*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v), stride = pk * pv + pk;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      sum_partials<acc_t>(job.partials + (b * job.split.chunks * p.heads + h) * stride, job.split.chunks,
                          p.heads * stride, pk, pv, p.dim_k, p.dim_v, job.scale,
                          job.matrices + bh * p.dim_k * p.dim_v, job.vectors + bh * p.dim_k);
    }
  }
};

template <typename acc_t>
void reduce_partials(const LinearAttentionParams& p, const Split& split, const acc_t* partials, acc_t scale,
                     void* matrices, void* vectors) {
  ReducePartials<acc_t> job{&p, split, partials, scale, static_cast<acc_t*>(matrices), static_cast<acc_t*>(vectors)};
  parallel_for(p.bh(), &job, &ReducePartials<acc_t>::run);
}

// ---- state: S = mean_j phi(k_j)^T v_j, m = mean_j phi(k_j) ------------------------------

template <typename scalar_t, typename acc_t>
struct StateJob {
  const LinearAttentionParams* p;
  Split split;
  acc_t* partials;  // [b][chunk][h][pk*pv + pk]

  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<StateJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v), stride = pk * pv + pk;
    Scratch<acc_t> scratch(p.heads * kTile * (pk + pv));
    acc_t* phi_k_tiles = scratch.data;                    // [H][kTile][pk]
    acc_t* v_tiles = phi_k_tiles + p.heads * kTile * pk;  // [H][kTile][pv]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / job.split.chunks, chunk = task % job.split.chunks;
      acc_t* partials = job.partials + task * p.heads * stride;
      __builtin_memset(partials, 0, sizeof(acc_t) * p.heads * stride);
      const int64_t n_end = job.split.end(p, chunk);
      for (int64_t n0 = job.split.begin(chunk); n0 < n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, n_end - n0);
        load_tiles<scalar_t, acc_t>(p.k, b, n0, rows, p.heads, p.dim_k, pk, true, p.feature_map, phi_k_tiles);
        load_tiles<scalar_t, acc_t>(p.v, b, n0, rows, p.heads, p.dim_v, pv, false, p.feature_map, v_tiles);
        for (int64_t h = 0; h < p.heads; ++h) {
          acc_t* state = partials + h * stride;
          acc_t* mean = state + pk * pv;
          const acc_t* phi_k = phi_k_tiles + h * kTile * pk;
          const acc_t* v = v_tiles + h * kTile * pv;
          tile_outer_accum<acc_t>(phi_k, pk, pk, v, pv, pv, state, pv);
          for (int64_t t = 0; t < rows; ++t)
            for (int64_t d = 0; d < pk; ++d) mean[d] += phi_k[t * pk + d];
        }
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* state_typed(const LinearAttentionParams& p) {
  if (p.workspace_bytes < partials_bytes<acc_t>(p)) return "linear_attention_state: workspace too small";
  StateJob<scalar_t, acc_t> job{&p, split_sequence(p), static_cast<acc_t*>(p.workspace)};
  parallel_for(job.split.tasks(p), &job, &StateJob<scalar_t, acc_t>::run_tasks);
  reduce_partials<acc_t>(p, job.split, job.partials, acc_t(1) / acc_t(p.seqlen), p.state, p.mean);
  return nullptr;
}

// ---- apply: out_i = phi(q_i) S / (phi(q_i) . m + eps) -----------------------------------
// The mean rides along as an extra column of the padded state, so the same micro-kernel
// produces the numerator and the denominator: [S | m] has pv_aug = padded(Dv + 1) columns.

template <typename scalar_t, typename acc_t>
struct ApplyJob {
  const LinearAttentionParams* p;
  Split split;

  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<ApplyJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pa = padded<acc_t>(p.dim_v + 1);
    Scratch<acc_t> scratch(p.heads * (pk * pa + kTile * (pk + pa)));
    acc_t* states = scratch.data;                      // [H][pk][pa], column Dv holds m
    acc_t* phi_q_tiles = states + p.heads * pk * pa;     // [H][kTile][pk]
    acc_t* out_tiles = phi_q_tiles + p.heads * kTile * pk;  // [H][kTile][pa]
    int64_t loaded_b = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / job.split.chunks, chunk = task % job.split.chunks;
      if (b != loaded_b) {
        pad_states_with_mean<acc_t>(p, b, states, pk, pa);
        loaded_b = b;
      }
      const int64_t n_end = job.split.end(p, chunk);
      for (int64_t n0 = job.split.begin(chunk); n0 < n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, n_end - n0);
        load_tiles<scalar_t, acc_t>(p.q, b, n0, rows, p.heads, p.dim_k, pk, true, p.feature_map, phi_q_tiles);
        for (int64_t h = 0; h < p.heads; ++h) {
          acc_t* out = out_tiles + h * kTile * pa;
          tile_matmul<acc_t>(phi_q_tiles + h * kTile * pk, pk, states + h * pk * pa, pa, p.dim_k, pa, out, pa);
          for (int64_t t = 0; t < rows; ++t) {
            const acc_t inv_z = acc_t(1) / (out[t * pa + p.dim_v] + acc_t(p.eps));
            for (int64_t e = 0; e < p.dim_v; ++e) out[t * pa + e] *= inv_z;
          }
        }
        store_tiles<scalar_t, acc_t>(out_tiles, pa, rows, p.heads, p.dim_v, p.out, b, n0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* apply_typed(const LinearAttentionParams& p) {
  ApplyJob<scalar_t, acc_t> job{&p, split_sequence(p)};
  parallel_for(job.split.tasks(p), &job, &ApplyJob<scalar_t, acc_t>::run_tasks);
  return nullptr;
}

// ---- apply backward: grad_q and the chunk partials of grad_state, grad_mean -------------
//   z = phi_q.m + eps; o = phi_q S / z; g = do / z; dS += phi_q^T g; dz = -(g . o)
//   dphi_q = g S^T + dz m; dm += dz phi_q; dq = dphi_q * phi'(q)

template <typename scalar_t, typename acc_t>
struct ApplyBackwardJob {
  const LinearAttentionParams* p;
  Split split;
  acc_t* partials;  // [b][chunk][h][pk*pv + pk]

  static void run_tasks(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<ApplyBackwardJob*>(ctx);
    const auto& p = *job.p;
    const int64_t pk = padded<acc_t>(p.dim_k), pv = padded<acc_t>(p.dim_v), pa = padded<acc_t>(p.dim_v + 1);
    const int64_t stride = pk * pv + pk;
    Scratch<acc_t> scratch(p.heads * (pk * (pa + pv + 1) + kTile * (2 * pk + pv)) + kTile * (pa + 1));
    acc_t* states = scratch.data;                            // [H][pk][pa]: S | m
    acc_t* states_t = states + p.heads * pk * pa;             // [H][pv][pk]: S^T
    acc_t* means = states_t + p.heads * pk * pv;              // [H][pk]: m
    acc_t* phi_q_tiles = means + p.heads * pk;                // [H][kTile][pk]
    acc_t* grad_q_tiles = phi_q_tiles + p.heads * kTile * pk;  // [H][kTile][pk]
    acc_t* g_tiles = grad_q_tiles + p.heads * kTile * pk;      // [H][kTile][pv]
    acc_t* o = g_tiles + p.heads * kTile * pv;                // [kTile][pa]: phi_q S | z - eps
    acc_t* dz = o + kTile * pa;                    // [kTile]
    int64_t loaded_b = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / job.split.chunks, chunk = task % job.split.chunks;
      if (b != loaded_b) {
        pad_states_with_mean<acc_t>(p, b, states, pk, pa);
        pad_heads<acc_t>(p.state, p, b, p.dim_k, p.dim_v, acc_t(1), true, states_t, pv, pk);
        pad_heads<acc_t>(p.mean, p, b, 1, p.dim_k, acc_t(1), false, means, 1, pk);
        loaded_b = b;
      }
      acc_t* partials = job.partials + task * p.heads * stride;
      __builtin_memset(partials, 0, sizeof(acc_t) * p.heads * stride);
      const int64_t n_end = job.split.end(p, chunk);
      for (int64_t n0 = job.split.begin(chunk); n0 < n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, n_end - n0);
        load_tiles<scalar_t, acc_t>(p.q, b, n0, rows, p.heads, p.dim_k, pk, true, p.feature_map, phi_q_tiles);
        load_tiles<scalar_t, acc_t>(p.grad_out, b, n0, rows, p.heads, p.dim_v, pv, false, p.feature_map, g_tiles);
        for (int64_t h = 0; h < p.heads; ++h) {
          acc_t* grad_state = partials + h * stride;
          acc_t* grad_mean = grad_state + pk * pv;
          const acc_t* phi_q = phi_q_tiles + h * kTile * pk;
          acc_t* grad_phi_q = grad_q_tiles + h * kTile * pk;
          acc_t* g = g_tiles + h * kTile * pv;
          tile_matmul<acc_t>(phi_q, pk, states + h * pk * pa, pa, p.dim_k, pa, o, pa);
          for (int64_t t = 0; t < kTile; ++t) {
            // Padding rows have phi_q = 0 and grad_out = 0: g = 0 and dz = 0 keep them inert.
            const acc_t inv_z = acc_t(1) / (o[t * pa + p.dim_v] + acc_t(p.eps));
            for (int64_t e = 0; e < pv; ++e) g[t * pv + e] *= inv_z;
            dz[t] = -dot_padded<acc_t>(g + t * pv, o + t * pa, pv) * inv_z;  // g is 0 past Dv
          }
          tile_outer_accum<acc_t>(phi_q, pk, pk, g, pv, pv, grad_state, pv);
          for (int64_t t = 0; t < rows; ++t)
            for (int64_t d = 0; d < pk; ++d) grad_mean[d] += dz[t] * phi_q[t * pk + d];
          tile_matmul<acc_t>(g, pv, states_t + h * pv * pk, pk, p.dim_v, pk, grad_phi_q, pk);
          for (int64_t t = 0; t < rows; ++t)
            feature_grad_row<acc_t>(grad_phi_q + t * pk, means + h * pk, dz[t], phi_q + t * pk, pk, p.feature_map);
        }
        store_tiles<scalar_t, acc_t>(grad_q_tiles, pk, rows, p.heads, p.dim_k, p.grad_q, b, n0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* apply_backward_typed(const LinearAttentionParams& p) {
  if (p.workspace_bytes < partials_bytes<acc_t>(p)) return "linear_attention_apply_backward: workspace too small";
  ApplyBackwardJob<scalar_t, acc_t> job{&p, split_sequence(p), static_cast<acc_t*>(p.workspace)};
  parallel_for(job.split.tasks(p), &job, &ApplyBackwardJob<scalar_t, acc_t>::run_tasks);
  reduce_partials<acc_t>(p, job.split, job.partials, acc_t(1), p.grad_state, p.grad_mean);
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
    Scratch<acc_t> scratch(p.heads * (2 * pk * pv + pk + kTile * (2 * pk + 2 * pv)));
    acc_t* grad_states = scratch.data;                     // [H][pk][pv] / N
    acc_t* grad_states_t = grad_states + p.heads * pk * pv;  // [H][pv][pk] / N
    acc_t* grad_means = grad_states_t + p.heads * pk * pv;   // [H][pk] / N
    acc_t* phi_k_tiles = grad_means + p.heads * pk;             // [H][kTile][pk]
    acc_t* grad_k_tiles = phi_k_tiles + p.heads * kTile * pk;   // [H][kTile][pk]
    acc_t* v_tiles = grad_k_tiles + p.heads * kTile * pk;       // [H][kTile][pv]
    acc_t* grad_v_tiles = v_tiles + p.heads * kTile * pv;       // [H][kTile][pv]
    const acc_t inv_n = acc_t(1) / acc_t(p.seqlen);
    int64_t loaded_b = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / job.split.chunks, chunk = task % job.split.chunks;
      if (b != loaded_b) {
        pad_heads<acc_t>(p.grad_state, p, b, p.dim_k, p.dim_v, inv_n, false, grad_states, pk, pv);
        pad_heads<acc_t>(p.grad_state, p, b, p.dim_k, p.dim_v, inv_n, true, grad_states_t, pv, pk);
        pad_heads<acc_t>(p.grad_mean, p, b, 1, p.dim_k, inv_n, false, grad_means, 1, pk);
        loaded_b = b;
      }
      const int64_t n_end = job.split.end(p, chunk);
      for (int64_t n0 = job.split.begin(chunk); n0 < n_end; n0 += kTile) {
        const int64_t rows = min_i64(kTile, n_end - n0);
        load_tiles<scalar_t, acc_t>(p.k, b, n0, rows, p.heads, p.dim_k, pk, true, p.feature_map, phi_k_tiles);
        load_tiles<scalar_t, acc_t>(p.v, b, n0, rows, p.heads, p.dim_v, pv, false, p.feature_map, v_tiles);
        for (int64_t h = 0; h < p.heads; ++h) {
          const acc_t* grad_mean = grad_means + h * pk;
          const acc_t* phi_k = phi_k_tiles + h * kTile * pk;
          const acc_t* v = v_tiles + h * kTile * pv;
          acc_t* grad_k = grad_k_tiles + h * kTile * pk;
          acc_t* grad_v = grad_v_tiles + h * kTile * pv;
          tile_matmul<acc_t>(v, pv, grad_states_t + h * pv * pk, pk, p.dim_v, pk, grad_k, pk);
          tile_matmul<acc_t>(phi_k, pk, grad_states + h * pk * pv, pv, p.dim_k, pv, grad_v, pv);
          for (int64_t t = 0; t < rows; ++t)
            feature_grad_row<acc_t>(grad_k + t * pk, grad_mean, acc_t(1), phi_k + t * pk, pk, p.feature_map);
        }
        store_tiles<scalar_t, acc_t>(grad_k_tiles, pk, rows, p.heads, p.dim_k, p.grad_k, b, n0);
        store_tiles<scalar_t, acc_t>(grad_v_tiles, pv, rows, p.heads, p.dim_v, p.grad_v, b, n0);
      }
    }
  }
};

template <typename scalar_t, typename acc_t>
const char* state_backward_typed(const LinearAttentionParams& p) {
  StateBackwardJob<scalar_t, acc_t> job{&p, split_sequence(p)};
  parallel_for(job.split.tasks(p), &job, &StateBackwardJob<scalar_t, acc_t>::run_tasks);
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
