// CPU decode kernels, written once and compiled per ISA (torch-free). Per-ISA code, included
// only through mmfast/cpu/instantiate_isas.h (see csrc/cpu/decode_kernels.cpp). Rules: mmfast/decode.h.
//
// decode_attention: a task is (row b, block of KV heads, chunk of kChunkKeys keys). A block's
// heads lie side by side in each token's cache row (up to 16 KB of it), and a task reads each
// key tile token by token across the block (one head's rows alone lie H_kv x D apart: read head
// by head, 1-4 KB of each 16 KB row, the reads reach 2/3 of a sequential stream's bandwidth).
// Keys are scored token-major (each token's K rows for every head of the block in turn, the
// same tokens' V rows hinted meanwhile), then each head's softmax and value sums run; converted
// rows (16-bit, or head_dim not a whole number of vectors) go head by head (heads_per_read). Per head
// it converts the group's H / H_kv query heads x Sq queries into rows (GQA: one K/V read serves
// the group, and each loaded vector serves kRowBlock rows), scores key tiles of kKeyTile keys
// against them (four keys per pass; K/V rows already in the accumulation type and a whole number
// of vectors long are read in place, others converted into the task's buffers), and keeps an online softmax
// (running max, sum and output rows) in the accumulation type. Chunks are folded in key order
// by a second pass (by the same task when a pair has one chunk: short contexts skip a second
// parallel pass). Chunks are fixed by the shape (not by the thread count), and each head's sums
// are its own whatever the block, so results are bitwise independent of the number of threads.
// decode_linear: tasks of kLinearRows weight rows; each task reads its rows once (from DRAM)
// and multiplies them with every row of x (converted to the accumulation type once per call),
// kLinearRows x kLinearXRows dot products in registers at a time, prefetching the next task's rows.
// A single row of x (M = 1) of at most 16 KB in the accumulation type (K <= 4096 in fp32) reads
// the weight rows one after another instead (stream_row), its dot products summed in another
// order: such a row alone is not bitwise equal to the same row inside a batch (each is exact to
// fp32 rounding; results stay independent of the thread count).
// sample: one row per task, in vector passes. Top-k and top-p thresholds are found by a radix
// select over order-preserving 32-bit keys of the fp32 values (4 passes of 8 bits, each over
// the keys still in range: no sort), with weights and sums in fp64; the draw is an inverse CDF
// in index order (details above `struct SampleJob`).
#ifndef MMFAST_CPU_ISA_NS
#error "mmfast/cpu/decode_impl.h is included by mmfast/cpu/instantiate_isas.h only"
#endif

namespace mmfast {
namespace cpu {
namespace MMFAST_CPU_ISA_NS {
namespace decode {  // this family's names, apart from other families' in the same ISA namespace

constexpr int64_t kKeyTile = 32;     // keys scored together
constexpr int64_t kChunkKeys = 512;  // keys of a task: the unit of the fixed-order fold
// Build-time overrides, for probes (benchmarks/probes/decode_attention_head_block.py).
#ifndef MMFAST_DECODE_ATTENTION_BLOCK_BYTES
#define MMFAST_DECODE_ATTENTION_BLOCK_BYTES 16384  // bytes of a token's K (or V) rows a task reads
#endif
constexpr int64_t kBlockBytes = MMFAST_DECODE_ATTENTION_BLOCK_BYTES;
constexpr int64_t kPrefetchKeys = 4;  // tokens ahead converted K / V rows are hinted
constexpr int64_t kBlockScratchBytes = 256 * 1024;  // cap on a block's query rows and scores (GQA x Sq rows)
static_assert(kBlockBytes >= 1, "decode_attention: block bytes >= 1");
// Query rows (GQA group x Sq) that share each loaded key / value vector. dot_keys keeps rows x 4
// accumulators (8 on AVX2, 16 on AVX-512), add_values kValueAccumulators: with the loaded
// vectors they fit the 16 / 32 vector registers.
constexpr int kRowBlock = MMFAST_VECTOR_BYTES >= 64 ? 4 : 2;
constexpr int kValueAccumulators = 8;

template <typename scalar_t>
const scalar_t* token_at(const TokenTensor& t, int64_t b, int64_t n, int64_t h) {
  return static_cast<const scalar_t*>(t.data) + b * t.stride_b + n * t.stride_n + h * t.stride_h;
}

template <typename scalar_t>
scalar_t* token_at_mut(const TokenTensor& t, int64_t b, int64_t n, int64_t h) {
  return static_cast<scalar_t*>(t.data) + b * t.stride_b + n * t.stride_n + h * t.stride_h;
}

// ---- kv_cache_append ---------------------------------------------------------------------------

template <typename scalar_t>
struct AppendJob {
  const KVCacheAppendParams* p;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& p = *static_cast<AppendJob*>(ctx)->p;
    const size_t bytes = sizeof(scalar_t) * size_t(p.head_dim);
    for (int64_t i = begin; i < end; ++i) {  // i = (b * S + s) * H_kv + h
      const int64_t h = i % p.kv_heads, token = i / p.kv_heads;
      const int64_t s = token % p.new_tokens, b = token / p.new_tokens;
      const int64_t slot = int64_t(p.cache_seqlens[b]) + s;
      __builtin_memcpy(token_at_mut<scalar_t>(p.k_cache, b, slot, h), token_at<scalar_t>(p.k, b, s, h), bytes);
      __builtin_memcpy(token_at_mut<scalar_t>(p.v_cache, b, slot, h), token_at<scalar_t>(p.v, b, s, h), bytes);
    }
  }
};

int64_t append(const KVCacheAppendParams& p) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = p.cache_seqlens[b];
    if (length < 0 || length + p.new_tokens > p.max_tokens) return b;
  }
  return dispatch_dtype(p.dtype, int64_t(-1), [&](auto scalar, auto) {
    AppendJob<decltype(scalar)> job{&p};
    parallel_for(p.batch * p.new_tokens * p.kv_heads, &job, &AppendJob<decltype(scalar)>::run);
    return int64_t(-1);
  });
}

// ---- decode_attention --------------------------------------------------------------------------

inline float exp_acc(float x) { return __builtin_expf(x); }
inline double exp_acc(double x) { return __builtin_exp(x); }
inline float tanh_acc(float x) { return __builtin_tanhf(x); }
inline double tanh_acc(double x) { return __builtin_tanh(x); }

// scores[0:n] = exp(scores[0:n] - max), n a multiple of the vector width.
inline void exp_shifted(float* scores, int64_t n, float max) {
  for (int64_t t = 0; t < n; t += Vec<float>::width)
    store<float>(scores + t, exp_vec(load<float>(scores + t) - splat<float>(max)));
}
inline void exp_shifted(double* scores, int64_t n, double max) {
  for (int64_t t = 0; t < n; ++t) scores[t] = __builtin_exp(scores[t] - max);
}

template <typename scalar_t, typename acc_t>
struct AttentionJob {
  const DecodeAttentionParams* p;
  int64_t group, rows, dp, chunks;
  int64_t head_block;  // KV heads per task (divides H_kv)
  acc_t* partial;  // [(b * H_kv + kv head) * chunks + chunk][rows][dp + 2]: output rows, then max, sum

  int64_t partial_stride() const { return dp + 2; }
  acc_t* partial_of(int64_t task) const { return partial + task * rows * partial_stride(); }

  // Query i of row b at position len - Sq + i sees keys [first_key(i), len - Sq + i].
  int64_t position(int64_t length, int64_t i) const { return length - p->queries + i; }
  int64_t first_key(int64_t length, int64_t i) const {
    return p->window > 0 ? max_i64(0, position(length, i) - p->window + 1) : 0;
  }

  // Heads whose tile rows are read together, token by token. Converted rows (16-bit, or head_dim
  // not a whole number of vectors) go head by head, so that a converted tile (kKeyTile x dp) stays
  // in L1: across a block they spilled to L2 and bf16 caches ran at 0.61-1.00x.
  int64_t heads_per_read() const { return reads_in_place() ? head_block : 1; }

  // Per-thread buffers of a task: the block's query rows, the scores of the heads read together,
  // one zero row (keys past a tile's count point to it: finite, masked out), a converted K and V
  // tile when the cache is not read in place, and the K / V row pointers of the heads read together.
  struct Buffers {
    Scratch<acc_t> values;
    Scratch<const acc_t*> rows;
    acc_t *q, *zero_row, *k, *v, *scores;
    const acc_t **key_row, **value_row;

    explicit Buffers(const AttentionJob& job)
        : values(size_t(job.head_block * job.rows * job.dp + job.heads_per_read() * job.rows * kKeyTile + job.dp +
                        (job.reads_in_place() ? 0 : 2 * kKeyTile * job.dp))),
          rows(size_t(2 * job.heads_per_read() * kKeyTile)) {
      const int64_t tile = job.reads_in_place() ? 0 : kKeyTile * job.dp;
      q = values.data;
      scores = q + job.head_block * job.rows * job.dp;
      zero_row = scores + job.heads_per_read() * job.rows * kKeyTile;
      k = zero_row + job.dp;
      v = k + tile;
      __builtin_memset(zero_row, 0, sizeof(acc_t) * size_t(job.dp + 2 * tile));  // and the padding past D
      key_row = rows.data;
      value_row = key_row + job.heads_per_read() * kKeyTile;
    }
  };

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<AttentionJob*>(ctx);
    Buffers buffers(job);
    for (int64_t task = begin; task < end; ++task) {
      job.run_task(task, buffers);
      if (job.chunks == 1)  // the pairs' only chunk: no second pass to wait for
        for (int64_t j = 0; j < job.head_block; ++j) job.fold(task * job.head_block + j);
    }
  }

  void load_queries(int64_t b, int64_t kv_head, acc_t* qbuf) const {
    __builtin_memset(qbuf, 0, sizeof(acc_t) * size_t(rows * dp));
    for (int64_t g = 0; g < group; ++g)
      for (int64_t i = 0; i < p->queries; ++i) {
        const scalar_t* src = token_at<scalar_t>(p->q, b, i, kv_head * group + g);
        acc_t* dst = qbuf + (g * p->queries + i) * dp;
        to_acc_row(src, dst, p->head_dim);
      }
  }

  // Cache rows already in the accumulation type and a whole number of vectors are read where they
  // are; others are converted into the task's buffers (zero-padded to dp).
  bool reads_in_place() const { return std::is_same<scalar_t, acc_t>::value && p->head_dim == dp; }

  // out[j * kKeyTile + t] = the K or V row of token k0 + t (t < count) and head first_head + j
  // (j < heads), in acc_t, dp wide; rows past count point to the zero row. Read token by token:
  // the heads' rows of a token lie side by side.
  // Converted rows are hinted kPrefetchKeys tokens ahead (up to end): without, bf16 caches ran at
  // 0.62-0.78x.
  void tile_rows(const TokenTensor& cache, int64_t b, int64_t first_head, int64_t heads, int64_t k0, int64_t count,
                 int64_t end, const Buffers& buffers, acc_t* converted, const acc_t** out) const {
    const bool in_place = reads_in_place();
    const int64_t row_bytes = p->head_dim * int64_t(sizeof(scalar_t));
    for (int64_t t = 0; t < count; ++t)
      for (int64_t j = 0; j < heads; ++j) {
        const scalar_t* src = token_at<scalar_t>(cache, b, k0 + t, first_head + j);
        if (in_place) {
          out[j * kKeyTile + t] = reinterpret_cast<const acc_t*>(src);
          continue;
        }
        if (k0 + t + kPrefetchKeys < end) {
          const char* ahead = reinterpret_cast<const char*>(token_at<scalar_t>(cache, b, k0 + t + kPrefetchKeys,
                                                                               first_head + j));
          for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off, 0, 3);
        }
        acc_t* row = converted + (j * kKeyTile + t) * dp;  // padding past head_dim stays zero
        to_acc_row(src, row, p->head_dim);
        out[j * kKeyTile + t] = row;
      }
    for (int64_t j = 0; j < heads; ++j)
      for (int64_t t = count; t < kKeyTile; ++t) out[j * kKeyTile + t] = buffers.zero_row;
  }

  // Task (b, block, chunk) = (b * H_kv / head_block + block) * chunks + chunk; its partial states
  // are those of (b, KV head, chunk) for the block's heads.
  void run_task(int64_t task, const Buffers& buffers) const {
    const int64_t chunk = task % chunks, first_pair = task / chunks * head_block, b = first_pair / p->kv_heads;
    const int64_t length = p->cache_seqlens[b];
    const int64_t lo = first_key(length, 0) + chunk * kChunkKeys, hi = min_i64(lo + kChunkKeys, length);
    const int64_t ps = partial_stride();
    for (int64_t j = 0; j < head_block; ++j) {
      acc_t* state = partial_of((first_pair + j) * chunks + chunk);
      for (int64_t r = 0; r < rows; ++r) {
        __builtin_memset(state + r * ps, 0, sizeof(acc_t) * size_t(dp));
        state[r * ps + dp] = -__builtin_inf();  // running max
        state[r * ps + dp + 1] = 0;             // running sum
      }
    }
    if (lo >= hi) return;
    const int64_t first_head = first_pair % p->kv_heads;
    for (int64_t j = 0; j < head_block; ++j) load_queries(b, first_head + j, buffers.q + j * rows * dp);
    const int64_t heads = heads_per_read();
    for (int64_t k0 = lo; k0 < hi; k0 += kKeyTile) {
      const int64_t count = min_i64(kKeyTile, hi - k0);
      for (int64_t j0 = 0; j0 < head_block; j0 += heads) {
        tile_rows(p->k_cache, b, first_head + j0, heads, k0, count, hi, buffers, buffers.k, buffers.key_row);
        tile_rows(p->v_cache, b, first_head + j0, heads, k0, count, hi, buffers, buffers.v, buffers.value_row);
        score_tile(buffers, j0, heads, count);
        for (int64_t j = j0; j < j0 + heads; ++j)
          add_tile_values(buffers.value_row + (j - j0) * kKeyTile, k0, count, length,
                          buffers.scores + (j - j0) * rows * kKeyTile, partial_of((first_pair + j) * chunks + chunk));
      }
    }
  }

  // The query rows of the block's heads j0 .. j0 + heads - 1 against the tile's keys, four tokens
  // at a time across those heads (the K rows read in memory order); in place, the same tokens' V
  // rows are hinted meanwhile, so that add_tile_values finds them in cache. scores: rows x
  // kKeyTile for each of those heads.
  void score_tile(const Buffers& buffers, int64_t j0, int64_t heads, int64_t count) const {
    static_assert(kKeyTile % 4 == 0, "dot_keys scores whole groups of four rows of the tile");
    const int64_t hint_bytes = reads_in_place() ? p->head_dim * int64_t(sizeof(scalar_t)) : 0;
    for (int64_t t = 0; t < count; t += 4)  // t >= count: masked later
      for (int64_t j = 0; j < heads; ++j) {
        const acc_t* const* keys = buffers.key_row + j * kKeyTile + t;
        const acc_t* const* values = buffers.value_row + j * kKeyTile + t;
        const char* hint[4];
        for (int u = 0; u < 4; ++u)
          hint[u] = t + u < count && hint_bytes > 0 ? reinterpret_cast<const char*>(values[u]) : nullptr;
        const acc_t* q = buffers.q + (j0 + j) * rows * dp;
        acc_t* scores = buffers.scores + j * rows * kKeyTile + t;
        int64_t r = 0;
        for (; r + kRowBlock <= rows; r += kRowBlock)  // the first block of rows issues the hints
          dot_keys<kRowBlock>(q + r * dp, keys, scores + r * kKeyTile, hint, r == 0 ? hint_bytes : 0);
        for (; r < rows; ++r) dot_keys<1>(q + r * dp, keys, scores + r * kKeyTile, hint, r == 0 ? hint_bytes : 0);
      }
  }

  // One head's scored tile: softmax and the value sums of its rows (kRowBlock at a time, so that
  // each value vector loaded serves several rows; a row's arithmetic is the same either way).
  // scores: rows x kKeyTile; state: rows x [output row (dp), max, sum].
  void add_tile_values(const acc_t* const* value_row, int64_t k0, int64_t count, int64_t length, acc_t* scores,
                       acc_t* state) const {
    const int64_t ps = partial_stride();
    const acc_t* block_scores[kRowBlock];
    acc_t block_rescale[kRowBlock];
    acc_t* block_state[kRowBlock];
    int live = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = r % p->queries;
      acc_t* row_scores = scores + r * kKeyTile;
      acc_t rescale;
      if (!softmax_tile(k0, count, first_key(length, i), position(length, i), row_scores, state + r * ps, rescale))
        continue;  // no visible key in this tile: the row's state is unchanged
      block_scores[live] = row_scores, block_rescale[live] = rescale, block_state[live] = state + r * ps;
      if (++live == kRowBlock) add_value_rows<kRowBlock>(value_row, count, block_scores, block_rescale, block_state),
                               live = 0;
    }
    for (int j = 0; j < live; ++j)
      add_value_rows<1>(value_row, count, block_scores + j, block_rescale + j, block_state + j);
  }

  // One row's raw dot products scores[0:kKeyTile] become exp(score - new max) (masked keys: 0);
  // the row's running max and sum move on, and rescale = exp(old max - new max) is what its
  // output row must be multiplied by. False (nothing changed) when no key of the tile is visible.
  // A NaN score (a NaN key, query or scale product) makes the row's max NaN, so its output is
  // NaN as softmax's (a max that skipped it dropped a NaN key alone among masked ones).
  bool softmax_tile(int64_t k0, int64_t count, int64_t first, int64_t last, acc_t* scores, acc_t* state,
                    acc_t& rescale) const {
    const acc_t neg_inf = -__builtin_inf();
    acc_t tile_max = neg_inf;
    bool nan_seen = false;
    for (int64_t t = 0; t < kKeyTile; ++t) {
      const int64_t key = k0 + t;
      acc_t s = neg_inf;
      if (t < count && key >= first && key <= last) {
        s = acc_t(p->scale) * scores[t];
        if (p->softcap > 0) s = acc_t(p->softcap) * tanh_acc(s / acc_t(p->softcap));
      }
      scores[t] = s;
      tile_max = s > tile_max ? s : tile_max;
      nan_seen |= s != s;
    }
    if (nan_seen) tile_max = __builtin_nan("");
    else if (tile_max == neg_inf) return false;
    acc_t& max = state[dp];
    acc_t& sum = state[dp + 1];
    const acc_t new_max = nan_seen || tile_max > max ? tile_max : max;
    rescale = exp_acc(max - new_max);  // 0 while max is -inf
    exp_shifted(scores, kKeyTile, new_max);
    acc_t tile_sum = 0;
    for (int64_t t = 0; t < count; ++t) tile_sum += scores[t];
    sum = sum * rescale + tile_sum;
    max = new_max;
    return true;
  }

  // scores[r * kKeyTile + j] = dot(query row r, keys[j]) for R rows (dp apart) and four keys:
  // 4R independent FMA chains (one key at a time is bound by the FMA latency, not by the reads).
  // hint: four rows (null: none) of which hint_bytes are prefetched, a line of each per step.
  template <int R>
  void dot_keys(const acc_t* q, const acc_t* const* keys, acc_t* scores, const char* const* hint,
                int64_t hint_bytes) const {
    using V = typename Vec<acc_t>::type;
    constexpr int64_t W = Vec<acc_t>::width;
    static_assert(W * sizeof(acc_t) <= 64, "a line per step: the hints (at most dp x acc_t) finish in the loop");
    V acc[R][4] = {};
    int64_t line = 0;
    for (int64_t d = 0; d < dp; d += W, line += 64) {
      if (line < hint_bytes)
        for (int j = 0; j < 4; ++j)
          if (hint[j] != nullptr) __builtin_prefetch(hint[j] + line, 0, 3);
      V key[4];
      for (int j = 0; j < 4; ++j) key[j] = load<acc_t>(keys[j] + d);
      for (int r = 0; r < R; ++r) {
        const V qv = load<acc_t>(q + r * dp + d);
        for (int j = 0; j < 4; ++j) acc[r][j] += qv * key[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) scores[r * kKeyTile + j] = sum_lanes<acc_t>(acc[r][j]);
  }

  // For R rows: output row = output row * rescale + sum_t scores[t] * value row t, in column
  // blocks of NV = kValueAccumulators / R vectors, then halves of that for the rest (each
  // element's sum runs in key order whatever R and NV are).
  template <int R, int NV = kValueAccumulators / R>
  void add_value_rows(const acc_t* const* value_row, int64_t count, const acc_t* const* scores,
                      const acc_t* rescale, acc_t* const* state, int64_t d = 0) const {
    static_assert(NV >= 1, "kValueAccumulators >= R");
    constexpr int64_t W = Vec<acc_t>::width;
    for (; d + NV * W <= dp; d += NV * W) add_values<R, NV>(d, value_row, count, scores, rescale, state);
    if constexpr (NV > 1) add_value_rows<R, NV / 2>(value_row, count, scores, rescale, state, d);
  }

  // state[r][d:d + NV * W] = state * rescale[r] + sum_t scores[r][t] * value row t: R x NV chains.
  template <int R, int NV>
  void add_values(int64_t d, const acc_t* const* value_row, int64_t count, const acc_t* const* scores,
                  const acc_t* rescale, acc_t* const* state) const {
    using V = typename Vec<acc_t>::type;
    constexpr int64_t W = Vec<acc_t>::width;
    V acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = load<acc_t>(state[r] + d + j * W) * splat<acc_t>(rescale[r]);
    for (int64_t t = 0; t < count; ++t) {
      V value[NV];
      for (int j = 0; j < NV; ++j) value[j] = load<acc_t>(value_row[t] + d + j * W);
      for (int r = 0; r < R; ++r) {
        const V s = splat<acc_t>(scores[r][t]);
        for (int j = 0; j < NV; ++j) acc[r][j] += s * value[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) store<acc_t>(state[r] + d + j * W, acc[r][j]);
  }

  // Folds the chunks of (b, KV head) in key order and writes the output rows.
  void fold(int64_t pair) const {
    const int64_t b = pair / p->kv_heads, kv_head = pair % p->kv_heads, ps = partial_stride();
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* total = partial_of(pair * chunks) + r * ps;
      for (int64_t c = 1; c < chunks; ++c) {
        const acc_t* part = partial_of(pair * chunks + c) + r * ps;
        if (part[dp] == -__builtin_inf()) continue;
        const acc_t new_max = part[dp] > total[dp] ? part[dp] : total[dp];
        const acc_t a = exp_acc(total[dp] - new_max), e = exp_acc(part[dp] - new_max);
        for (int64_t d = 0; d < dp; ++d) total[d] = total[d] * a + part[d] * e;
        total[dp + 1] = total[dp + 1] * a + part[dp + 1] * e;
        total[dp] = new_max;
      }
      const int64_t g = r / p->queries, i = r % p->queries;
      scalar_t* dst = token_at_mut<scalar_t>(p->out, b, i, kv_head * group + g);
      const acc_t inverse = acc_t(1) / total[dp + 1];
      for (int64_t d = 0; d < p->head_dim; ++d) dst[d] = FromAcc<scalar_t>::convert(total[d] * inverse);
    }
  }

  static void run_fold(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<AttentionJob*>(ctx);
    for (int64_t pair = begin; pair < end; ++pair) job.fold(pair);
  }
};

// KV heads per task: the most (a divisor of H_kv) whose rows fit kBlockBytes and whose query rows
// and scores (scratch_bytes a head) fit kBlockScratchBytes, while that still leaves two tasks per
// thread. Any choice gives the same bits: each head's sums are its own.
inline int64_t attention_head_block(int64_t kv_heads, int64_t row_bytes, int64_t scratch_bytes,
                                    int64_t tasks_per_head) {
  const auto too_big = [&](int64_t block) {
    return block * row_bytes > kBlockBytes || block * scratch_bytes > kBlockScratchBytes ||
           tasks_per_head * (kv_heads / block) < 2 * max_threads();
  };
  int64_t block = kv_heads;
  while (block > 1 && too_big(block)) {
    do --block;
    while (kv_heads % block != 0);
  }
  return block;
}

template <typename scalar_t, typename acc_t>
void attention_typed(const DecodeAttentionParams& p, int64_t longest_range) {
  AttentionJob<scalar_t, acc_t> job;
  job.p = &p;
  job.group = p.heads / p.kv_heads;
  job.rows = job.group * p.queries;
  job.dp = padded<acc_t>(p.head_dim);
  job.chunks = max_i64(1, ceil_div(longest_range, kChunkKeys));
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t scratch_bytes = job.rows * (job.dp + kKeyTile) * int64_t(sizeof(acc_t));
  job.head_block = attention_head_block(p.kv_heads, p.head_dim * int64_t(sizeof(scalar_t)), scratch_bytes,
                                        p.batch * job.chunks);
  Scratch<acc_t> partial(size_t(pairs * job.chunks * job.rows * (job.dp + 2)));
  job.partial = partial.data;
  parallel_for(pairs / job.head_block * job.chunks, &job, &AttentionJob<scalar_t, acc_t>::run);
  if (job.chunks > 1) parallel_for(pairs, &job, &AttentionJob<scalar_t, acc_t>::run_fold);
}

int64_t attention(const DecodeAttentionParams& p) {
  int64_t longest_range = 0;  // keys visible to a row's first query onwards
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = p.cache_seqlens[b];
    if (length < p.queries || length > p.max_tokens) return b;
    const int64_t first = p.window > 0 ? max_i64(0, length - p.queries - p.window + 1) : 0;
    longest_range = max_i64(longest_range, length - first);
  }
  dispatch_dtype(p.dtype, 0, [&](auto scalar, auto acc) {
    attention_typed<decltype(scalar), decltype(acc)>(p, longest_range);
    return 0;
  });
  return -1;
}

// ---- sample ------------------------------------------------------------------------------------
//
// One row per task, in vector passes over the row (a 32,000-token row: 2-3 us greedy, tens of us
// with filters, against 64-200 us for the scalar loops before): (1) the CFG mix, the validity
// checks and the maximum (greedy ends with the first maximal index); (2) x / temperature and the
// order keys; (3) top-k: a radix select over the keys; (4) the weights exp(x - max) of the kept
// tokens, in fp64 (exp_vec_nonpositive); top-p: a radix select over the weighted keys; (5) the
// draw: sums of the kept weights per block of kDrawBlock tokens, then a walk in index order
// inside the block where the running sum passes u * total. The sums are fp64 in another order
// than a plain running sum, so a token is chosen differently only where u * total falls within
// a few fp64 ulps of a boundary.

constexpr int64_t kDrawBlock = 256;  // tokens per partial sum of the draw
constexpr int64_t kKeyBlock = 64;    // keys per block maximum of top-k's prefilter

// Keys that order like the floats they come from (-inf lowest, -0 == +0; NaN rows never get here).
inline uint32_t order_key(float x) {
  if (x == 0.0f) x = 0.0f;  // -0 ties with +0, as in the comparisons of the reference
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline WordsOf<MMFAST_VECTOR_BYTES> order_keys(FloatsOf<MMFAST_VECTOR_BYTES> x) {
  using W = WordsOf<MMFAST_VECTOR_BYTES>;
  const W u = as_words<MMFAST_VECTOR_BYTES>(x == 0.0f ? FloatsOf<MMFAST_VECTOR_BYTES>{} : x);
  return (u >> 31) != 0u ? ~u : (u | 0x80000000u);
}

// uncond + (cond - uncond) * scale rounded after each operation, as torch's separate ops do:
// Liquid's CFG expression, bit for bit (an FMA would move some mixes by an ulp, and the argmax
// with them).
template <typename T>
inline T cfg_mix(T cond, T uncond, float scale) {
  return uncond + rounded((cond - uncond) * scale);
}

// One 8-bit digit's histogram: per bucket the count and the weight (1 per key when unweighted)
// of the keys >= floor with (key & mask) == prefix.
struct DigitHistogram {
  int64_t count[256];
  double mass[256];
};

template <bool Weighted>
void histogram_digit(const uint32_t* keys, const double* weights, int64_t n, int shift, uint32_t mask,
                     uint32_t prefix, uint32_t floor, DigitHistogram& out) {
  // Four interleaved partial histograms: runs of keys in one bucket (most logits share a few
  // exponents) do not wait on each other's read-modify-write.
  constexpr int kParts = 4;
  int64_t count[kParts][256] = {};
  double mass[kParts][256];
  if (Weighted) __builtin_memset(mass, 0, sizeof(mass));
  auto add = [&](int part, int64_t i) {
    const uint32_t key = keys[i];
    const bool in = key >= floor && (key & mask) == prefix;
    const uint32_t bucket = (key >> shift) & 255u;
    count[part][bucket] += in;
    if (Weighted) mass[part][bucket] += in ? weights[i] : 0.0;
  };
  int64_t i = 0;
  for (; i + kParts <= n; i += kParts)
    for (int part = 0; part < kParts; ++part) add(part, i + part);
  for (; i < n; ++i) add(0, i);
  for (int bucket = 0; bucket < 256; ++bucket) {
    out.count[bucket] = count[0][bucket] + count[1][bucket] + count[2][bucket] + count[3][bucket];
    out.mass[bucket] = Weighted ? (mass[0][bucket] + mass[1][bucket]) + (mass[2][bucket] + mass[3][bucket])
                                : double(out.count[bucket]);
  }
}

// The smallest key v (among keys >= floor) such that the weight of the keys > v is < limit
// (limit > 0; weight 1 per key when unweighted): a radix select, 8 bits per pass. After each
// pass the keys (and weights) still in range are copied to cand_keys / cand_weights (V entries
// each), so later passes read those only.
template <bool Weighted>
uint32_t select_threshold(const uint32_t* keys, const double* weights, int64_t n, double limit, uint32_t floor,
                          uint32_t* cand_keys, double* cand_weights) {
  uint32_t prefix = 0, mask = 0;
  double above = 0;  // weight of the keys above the current prefix range
  for (int shift = 24; shift >= 0; shift -= 8) {
    DigitHistogram h;
    histogram_digit<Weighted>(keys, weights, n, shift, mask, prefix, floor, h);
    int chosen = -1, lowest = -1;
    double above_lowest = above;
    for (int bucket = 255; bucket >= 0; --bucket) {
      if (!h.count[bucket]) continue;
      if (above + h.mass[bucket] >= limit) {
        chosen = bucket;
        break;
      }
      lowest = bucket;
      above_lowest = above;
      above += h.mass[bucket];
    }
    if (chosen < 0) {  // everything in range is kept: descend into the lowest bucket
      chosen = lowest;
      above = above_lowest;
    }
    prefix |= uint32_t(chosen) << shift;
    mask |= 255u << shift;
    if (shift == 0) break;
    int64_t kept = 0;  // in place once keys == cand_keys: entry i is read before entry kept <= i is written
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t key = keys[i];
      const double weight = Weighted ? weights[i] : 0.0;
      cand_keys[kept] = key;
      if (Weighted) cand_weights[kept] = weight;
      kept += key >= floor && (key & mask) == prefix;
    }
    keys = cand_keys, weights = cand_weights, n = kept, floor = 0;
  }
  return prefix;
}

struct SampleJob {
  const SampleParams* p;
  using V = FloatsOf<MMFAST_VECTOR_BYTES>;
  using I = typename VecOf<int32_t, MMFAST_VECTOR_BYTES>::type;  // a float comparison's mask
  static constexpr int64_t W = Vec<float>::width;

  // x = the row's (mixed) logits; returns false for an invalid row (a NaN or +inf, or all -inf),
  // else sets max.
  template <typename scalar_t>
  bool load_row(int64_t r, float* x, float& max) const {
    const scalar_t* cond = static_cast<const scalar_t*>(p->logits) + r * p->row_stride;
    const scalar_t* uncond = p->cfg ? cond + p->rows * p->row_stride : nullptr;
    const float inf = __builtin_inff();
    const int64_t n = p->vocab;
    V vmax = splat<float>(-inf);
    I bad = {}, finite_or_more = {};  // lanes that saw a NaN / +inf; lanes that saw more than -inf
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      V v = load_floats(cond + i);
      if (uncond) v = cfg_mix(v, load_floats(uncond + i), p->cfg_scale);
      store_floats(x + i, v);
      bad |= (v != v) | (v == inf);
      finite_or_more |= v != -inf;
      vmax = v > vmax ? v : vmax;
    }
    bool bad_tail = false, finite_tail = false;
    float m = -inf;
    for (; i < n; ++i) {
      float v = float(to_acc(cond[i]));
      if (uncond) v = cfg_mix(v, float(to_acc(uncond[i])), p->cfg_scale);
      x[i] = v;
      bad_tail |= v != v || v == inf;
      finite_tail |= v != -inf;
      m = v > m ? v : m;
    }
    if (bad_tail || any_lane(bad) || !(finite_tail || any_lane(finite_or_more))) return false;
    float lanes[W];
    __builtin_memcpy(lanes, &vmax, sizeof(vmax));
    for (int64_t l = 0; l < W; ++l) m = lanes[l] > m ? lanes[l] : m;
    max = m;
    return true;
  }

  // The first i with x[i] == max (the first maximal index: -0 and +0 tie, as in torch.argmax).
  int64_t first_index_of(const float* x, float max) const {
    const int64_t n = p->vocab;
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {  // four vectors per test
      const V m = splat<float>(max);
      const I hit = (load_floats(x + i) == m) | (load_floats(x + i + W) == m) | (load_floats(x + i + 2 * W) == m) |
                    (load_floats(x + i + 3 * W) == m);
      if (any_lane(hit)) break;
    }
    for (; i < n; ++i)
      if (x[i] == max) return i;
    return 0;  // unreachable: max is one of the values
  }

  // x /= temperature and keys = order_key(x); the max scales with them (division rounds monotonically).
  void scale_and_key(float* x, uint32_t* keys) const {
    const int64_t n = p->vocab;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const V v = load_floats(x + i) / splat<float>(p->temperature);
      store_floats(x + i, v);
      const auto k = order_keys(v);
      __builtin_memcpy(keys + i, &k, sizeof(k));
    }
    for (; i < n; ++i) {
      x[i] = x[i] / p->temperature;
      keys[i] = order_key(x[i]);
    }
  }

  // True when block_max (the top-k prefilter's, or null) shows no key >= floor in [begin, end).
  static bool nothing_kept(const uint32_t* block_max, uint32_t floor, int64_t begin, int64_t end) {
    if (block_max == nullptr) return false;
    for (int64_t b = begin / kKeyBlock; b * kKeyBlock < end; ++b)
      if (block_max[b] >= floor) return false;
    return true;
  }

  // w[i] = exp(x[i] - max) in fp64 for keys[i] >= floor, else 0; returns their sum. Blocks and
  // vectors with no key >= floor (most of a row under a small top-k) skip the exponentials.
  double weigh(const float* x, const uint32_t* keys, uint32_t floor, float max, double* w,
               const uint32_t* block_max) const {
    using D = Vec<double>::type;
    using L = long long __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
    constexpr int64_t WD = Vec<double>::width;
    typedef float HalfFloats __attribute__((vector_size(MMFAST_VECTOR_BYTES / 2)));
    typedef uint32_t HalfWords __attribute__((vector_size(MMFAST_VECTOR_BYTES / 2)));
    const int64_t n = p->vocab;
    const D dmax = splat<double>(double(max));
    D sum = {};
    double tail = 0;
    for (int64_t begin = 0; begin < n; begin += kKeyBlock) {
      const int64_t end = begin + kKeyBlock < n ? begin + kKeyBlock : n;
      if (nothing_kept(block_max, floor, begin, end)) {
        __builtin_memset(w + begin, 0, sizeof(double) * (end - begin));
        continue;
      }
      int64_t i = begin;
      for (; i + WD <= end; i += WD) {
        HalfWords kw;
        __builtin_memcpy(&kw, keys + i, sizeof(kw));
        const L kept = __builtin_convertvector(kw >= floor, L);
        D wi = {};
        if (any_lane(kept)) {
          HalfFloats xf;
          __builtin_memcpy(&xf, x + i, sizeof(xf));
          wi = kept ? exp_vec_nonpositive(__builtin_convertvector(xf, D) - dmax) : D{};
        }
        __builtin_memcpy(w + i, &wi, sizeof(wi));
        sum += wi;
      }
      for (; i < end; ++i) {  // the row's last, partial vector only (kKeyBlock is a whole number of vectors)
        w[i] = keys[i] >= floor ? exp_vec_nonpositive(splat<double>(double(x[i]) - double(max)))[0] : 0.0;
        tail += w[i];
      }
    }
    return sum_lanes<double>(sum) + tail;
  }

  // The inverse CDF in index order over the kept tokens (key >= floor, weight > 0) at u.
  int64_t draw(const uint32_t* keys, uint32_t floor, const double* w, float u, double* block_sums,
               const uint32_t* block_max) const {
    using D = Vec<double>::type;
    using L = long long __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
    constexpr int64_t WD = Vec<double>::width;
    typedef uint32_t HalfWords __attribute__((vector_size(MMFAST_VECTOR_BYTES / 2)));
    const int64_t n = p->vocab, blocks = (n + kDrawBlock - 1) / kDrawBlock;
    auto kept = [&](int64_t i) { return keys[i] >= floor ? w[i] : 0.0; };
    double total = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b = blk * kDrawBlock, end = b + kDrawBlock < n ? b + kDrawBlock : n;
      if (nothing_kept(block_max, floor, b, end)) {
        block_sums[blk] = 0;
        continue;
      }
      D acc = {};
      int64_t i = b;
      for (; i + WD <= end; i += WD) {
        HalfWords kw;
        __builtin_memcpy(&kw, keys + i, sizeof(kw));
        const D wi = __builtin_convertvector(kw >= floor, L) ? load<double>(w + i) : D{};
        acc += wi;
      }
      double s = sum_lanes<double>(acc);
      for (; i < end; ++i) s += kept(i);
      block_sums[blk] = s;
      total += s;
    }
    const double target = double(u) * total;
    double running = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      if (!(block_sums[blk] > 0) || !(running + block_sums[blk] > target)) {  // u < 0: the first kept token
        running += block_sums[blk];
        continue;
      }
      const int64_t b = blk * kDrawBlock, end = b + kDrawBlock < n ? b + kDrawBlock : n;
      int64_t last = b;
      for (int64_t i = b; i < end; ++i) {
        const double wi = kept(i);
        if (wi > 0) last = i;
        running += wi;
        if (running > target && wi > 0) return i;
      }
      return last;  // the block's own sum crossed the target, its running sum rounded short of it
    }
    for (int64_t blk = blocks - 1; blk >= 0; --blk) {  // u >= 1 or NaN (the ops pass [0, 1)): the last kept token
      if (!(block_sums[blk] > 0)) continue;
      const int64_t b = blk * kDrawBlock, end = b + kDrawBlock < n ? b + kDrawBlock : n;
      for (int64_t i = end - 1; i >= b; --i)
        if (kept(i) > 0) return i;
    }
    return 0;  // unreachable: the maximum is kept with weight 1
  }

  // The top-k threshold. A small k of a long row (an LLM's top-k 50) first takes the k-th largest
  // of the row's block maxima (kKeyBlock keys a block): at least k keys are >= it, so the k-th
  // largest key is too, and the radix select runs on the keys >= it of the blocks that hold any
  // (about k blocks) instead of passing over the whole row. Same threshold either way.
  // Sets prefiltered when it filled block_max (then weigh and draw skip the blocks below the floor).
  uint32_t top_k_floor(const uint32_t* keys, uint32_t* cand_keys, uint32_t* block_max, bool& prefiltered) const {
    const int64_t n = p->vocab, k = p->top_k, blocks = (n + kKeyBlock - 1) / kKeyBlock;
    prefiltered = blocks >= 4 * k;
    if (!prefiltered) return select_threshold<false>(keys, nullptr, n, double(k), 0, cand_keys, nullptr);
    using K = WordsOf<MMFAST_VECTOR_BYTES>;
    constexpr int64_t WK = MMFAST_VECTOR_BYTES / 4;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kKeyBlock, end = begin + kKeyBlock < n ? begin + kKeyBlock : n;
      int64_t i = begin;
      K m = {};
      for (; i + WK <= end; i += WK) {
        const K v = load_n<MMFAST_VECTOR_BYTES>(keys + i);
        m = v > m ? v : m;
      }
      uint32_t top = 0;
      for (int64_t l = 0; l < WK; ++l) top = m[l] > top ? m[l] : top;
      for (; i < end; ++i) top = keys[i] > top ? keys[i] : top;
      block_max[b] = top;
    }
    // cand_keys: the select's scratch here, then the candidates
    const uint32_t guess = select_threshold<false>(block_max, nullptr, blocks, double(k), 0, cand_keys, nullptr);
    int64_t m = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      if (block_max[b] < guess) continue;
      const int64_t begin = b * kKeyBlock, end = begin + kKeyBlock < n ? begin + kKeyBlock : n;
      for (int64_t i = begin; i < end; ++i) {
        cand_keys[m] = keys[i];
        m += keys[i] >= guess;
      }
    }
    return select_threshold<false>(cand_keys, nullptr, m, double(k), guess, cand_keys, nullptr);
  }

  // Scratch of one task: w and cand_weights (V doubles each), block sums, x, keys, cand_keys,
  // block maxima.
  static int64_t scratch_doubles(int64_t vocab) {
    return 2 * vocab + vocab / kDrawBlock + 1 + 3 * (vocab + 1) / 2 + (vocab / kKeyBlock + 2) / 2 + 8;
  }

  template <typename scalar_t>
  void sample_row(int64_t r, double* scratch) const {
    const int64_t n = p->vocab;
    double* w = scratch;
    double* cand_weights = w + n;
    double* block_sums = cand_weights + n;
    float* x = reinterpret_cast<float*>(block_sums + n / kDrawBlock + 1);
    uint32_t* keys = reinterpret_cast<uint32_t*>(x + n);
    uint32_t* cand_keys = keys + n;
    uint32_t* block_max = cand_keys + n;
    p->status[r] = 0;
    p->tokens[r] = 0;
    float max;
    if (!load_row<scalar_t>(r, x, max)) {
      p->status[r] = 1;
      return;
    }
    if (p->temperature == 0) {
      p->tokens[r] = first_index_of(x, max);
      return;
    }
    scale_and_key(x, keys);
    max = max / p->temperature;
    uint32_t floor = 0;
    bool prefiltered = false;
    if (p->top_k > 0 && p->top_k < n) floor = top_k_floor(keys, cand_keys, block_max, prefiltered);
    const uint32_t* kept_blocks = prefiltered ? block_max : nullptr;  // top-p only raises the floor
    const double total = weigh(x, keys, floor, max, w, kept_blocks);
    if (p->top_p < 1) {
      const double limit = p->top_p * total;
      const uint32_t top_p_floor =
          limit > 0 ? select_threshold<true>(keys, w, n, limit, floor, cand_keys, cand_weights) : order_key(max);
      floor = top_p_floor > floor ? top_p_floor : floor;
    }
    p->tokens[r] = draw(keys, floor, w, p->uniform[r], block_sums, kept_blocks);
  }

  template <typename scalar_t>
  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<SampleJob*>(ctx);
    Scratch<double> scratch(size_t(scratch_doubles(job.p->vocab)));
    for (int64_t r = begin; r < end; ++r) job.sample_row<scalar_t>(r, scratch.data);
  }
};

void sample(const SampleParams& p) {
  SampleJob job{&p};
  dispatch_dtype(p.dtype, 0, [&](auto scalar, auto) {
    parallel_for(p.rows, &job, &SampleJob::run<decltype(scalar)>);
    return 0;
  });
}

// ---- decode_linear -----------------------------------------------------------------------------

// Register blocks: 3 weight rows x 4 rows of x (12 accumulators + 3 weight vectors + 1 x
// vector: the 16 registers of AVX2 and SSE), or x 8 rows on AVX-512 (24 + 3 + 1 of 32), so
// that a batch of 8 (Liquid's 4 images with CFG) streams each weight row once, with its FMAs
// hiding the DRAM reads instead of following them.
constexpr int64_t kLinearRows = 3;
constexpr int64_t kLinearXRows = MMFAST_VECTOR_BYTES >= 64 ? 8 : 4;
// M = 1 (stream_row): the vector width and the accumulators per row (FMA latency x issue width
// in flight), and how far ahead of the loads the prefetch hints run, 0 for none (every build).
// Measured over the 551 MB of a Llama-138M step's 49 calls against a torch sum of the same bytes
// (weights and sum both on huge pages; AMD EPYC with AVX-512, 2026-12-05): the AVX-512 copy read
// 1.06-1.24x the sum with 64-byte vectors x 4 chains in the VM's fast-bandwidth phases (~60 GB/s)
// and 1.03-1.11x with 32-byte vectors x 8 chains (the same 256 bytes an iteration); 32 x 4:
// 1.06-1.12x, 32 x 16: 1.13-1.26x, 16 x 8: 1.04-1.21x, 64 x 2: 1.10-1.20x, 64 x 8: 1.66x (an
// earlier run); in slow phases (~33 GB/s) all within a few percent. So every copy streams with
// vectors of at most 32 bytes, the AVX-512 one with 8 chains; the AVX2 and generic copies keep 4
// (not re-measured on the AVX2-only EPYC, where 1, 2 and 4 read alike). Hints slowed the stream
// on both AMD EPYC kinds we ran: AVX2 only (2 KB: 1.19x, 512 B: 1.06x, none: 1.05x the sum) and
// AVX-512 (2 KB 1.19x / 1.31x, none 1.08x / 1.25x the read, slow and fast phase; one earlier
// AVX-512 VM had measured 2 KB at 1.02x). Each can be overridden at build time with -D (as
// benchmarks/probes/decode_stream_prefetch.py and decode_linear_ab.py do to time variants).
#ifndef MMFAST_DECODE_STREAM_VECTOR_BYTES
#define MMFAST_DECODE_STREAM_VECTOR_BYTES 32
#endif
#ifndef MMFAST_DECODE_STREAM_CHAINS
#define MMFAST_DECODE_STREAM_CHAINS (MMFAST_VECTOR_BYTES >= 64 ? 8 : 4)
#endif
#ifndef MMFAST_DECODE_STREAM_PREFETCH_BYTES
#define MMFAST_DECODE_STREAM_PREFETCH_BYTES 0
#endif
constexpr int kStreamVectorBytes =
    MMFAST_DECODE_STREAM_VECTOR_BYTES < MMFAST_VECTOR_BYTES ? MMFAST_DECODE_STREAM_VECTOR_BYTES : MMFAST_VECTOR_BYTES;
constexpr int kStreamChains = MMFAST_DECODE_STREAM_CHAINS;
constexpr int64_t kStreamPrefetchBytes = MMFAST_DECODE_STREAM_PREFETCH_BYTES;
static_assert(kStreamChains >= 1 && kStreamPrefetchBytes >= 0, "M = 1 stream: chains >= 1, prefetch bytes >= 0");
static_assert(kStreamVectorBytes >= 16 && (kStreamVectorBytes & (kStreamVectorBytes - 1)) == 0,
              "M = 1 stream: vectors of 16, 32 or 64 bytes");

// Consecutive elements of a weight row as a vector of `bytes` bytes of the accumulation type.
template <int bytes = MMFAST_VECTOR_BYTES, typename scalar_t>
inline typename VecOf<float, bytes>::type load_weights(const scalar_t* p) { return load_floats<bytes>(p); }
template <int bytes = MMFAST_VECTOR_BYTES>
inline typename VecOf<double, bytes>::type load_weights(const double* p) { return load_n<bytes>(p); }

template <typename scalar_t, typename acc_t>
struct LinearJob {
  const DecodeLinearParams* p;
  const acc_t* xbuf;  // (M, K) in acc_t

  // out[r][m] = dot(weight row n0 + r, x row m0 + m) for r < NR, m < MR.
  template <int NR, int MR>
  void block(int64_t n0, int64_t m0, acc_t out[kLinearRows][kLinearXRows]) const {
    using V = typename Vec<acc_t>::type;
    constexpr int64_t W = Vec<acc_t>::width;
    const int64_t k_total = p->in_features, k_vec = k_total / W * W;
    const scalar_t* weight = static_cast<const scalar_t*>(p->weight) + n0 * k_total;
    const acc_t* x = xbuf + m0 * k_total;
    V acc[NR][MR] = {};
    // The next task's weight rows, prefetched one block ahead: without it the FMAs of a batch
    // leave the DRAM stream idle (AVX-512 Xeon, one core: 1.7x at M = 8).
    const int64_t next_rows = m0 == 0 ? min_i64(NR, p->out_features - n0 - kLinearRows) : 0;
    const scalar_t* next = next_rows > 0 ? weight + kLinearRows * k_total : weight;
    for (int64_t k = 0; k < k_vec; k += W) {
      V w[NR];
      for (int r = 0; r < NR; ++r) w[r] = load_weights(weight + r * k_total + k);
      for (int r = 0; r < next_rows; ++r) __builtin_prefetch(next + r * k_total + k, 0, 3);
      for (int m = 0; m < MR; ++m) {
        const V xv = load<acc_t>(x + m * k_total + k);
        for (int r = 0; r < NR; ++r) acc[r][m] += w[r] * xv;
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) {
        acc_t sum = sum_lanes<acc_t>(acc[r][m]);
        for (int64_t k = k_vec; k < k_total; ++k) sum += acc_t(to_acc(weight[r * k_total + k])) * x[m * k_total + k];
        out[r][m] = sum;
      }
  }

  // block<NR, mr> for a run-time mr <= MR.
  template <int NR, int MR>
  void block_of(int64_t mr, int64_t n0, int64_t m0, acc_t out[kLinearRows][kLinearXRows]) const {
    if constexpr (MR > 1) {
      if (mr < MR) return block_of<NR, MR - 1>(mr, n0, m0, out);
    }
    block<NR, MR>(n0, m0, out);
  }

  template <int NR>
  void rows_of_weights(int64_t n0) const {
    scalar_t* y = static_cast<scalar_t*>(p->y);
    const scalar_t* bias = static_cast<const scalar_t*>(p->bias);
    acc_t out[kLinearRows][kLinearXRows];
    for (int64_t m0 = 0; m0 < p->rows; m0 += kLinearXRows) {
      const int64_t mr = min_i64(kLinearXRows, p->rows - m0);
      block_of<NR, kLinearXRows>(mr, n0, m0, out);
      for (int r = 0; r < NR; ++r)
        for (int64_t m = 0; m < mr; ++m) {
          const acc_t b = bias ? acc_t(to_acc(bias[n0 + r])) : acc_t(0);
          y[(m0 + m) * p->out_features + n0 + r] = FromAcc<scalar_t>::convert(out[r][m] + b);
        }
    }
  }

  // M = 1: dot(weight row n, x row 0), the row split over kStreamChains accumulators. Rows are
  // read one after another, so each thread reads one sequential stream that the hardware
  // prefetcher follows; three rows read side by side (the blocks above, which batches need for
  // reuse of each weight load) stalled it at M = 1: 1.2x slower on an AMD EPYC.
  acc_t stream_row(int64_t n) const {
    constexpr int bytes = kStreamVectorBytes;
    using V = typename VecOf<acc_t, bytes>::type;
    constexpr int64_t W = bytes / int64_t(sizeof(acc_t)), step = kStreamChains * W;
    constexpr int64_t step_bytes = step * int64_t(sizeof(scalar_t));
    const int64_t k_total = p->in_features;
    const scalar_t* weight = static_cast<const scalar_t*>(p->weight) + n * k_total;
    V acc[kStreamChains] = {};
    int64_t k = 0;
    for (; k + step <= k_total; k += step) {
      if constexpr (kStreamPrefetchBytes > 0) {
        // A hint kStreamPrefetchBytes ahead in the stream (past the matrix's end it is dropped).
        const char* ahead = reinterpret_cast<const char*>(weight + k) + kStreamPrefetchBytes;
        for (int64_t b = 0; b < step_bytes; b += 64) __builtin_prefetch(ahead + b, 0, 3);
      }
      for (int c = 0; c < kStreamChains; ++c)
        acc[c] += load_weights<bytes>(weight + k + c * W) * load_n<bytes>(xbuf + k + c * W);
    }
    for (; k + W <= k_total; k += W) acc[0] += load_weights<bytes>(weight + k) * load_n<bytes>(xbuf + k);
    for (int c = 1; c < kStreamChains; ++c) acc[0] += acc[c];
    acc_t sum = sum_lanes_tree<acc_t, bytes>(acc[0]);
    for (; k < k_total; ++k) sum += acc_t(to_acc(weight[k])) * xbuf[k];
    return sum;
  }

  static void run_one_row(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<LinearJob*>(ctx);
    scalar_t* y = static_cast<scalar_t*>(job.p->y);
    const scalar_t* bias = static_cast<const scalar_t*>(job.p->bias);
    for (int64_t n = begin * kLinearRows; n < min_i64(end * kLinearRows, job.p->out_features); ++n) {
      const acc_t b = bias ? acc_t(to_acc(bias[n])) : acc_t(0);
      y[n] = FromAcc<scalar_t>::convert(job.stream_row(n) + b);
    }
  }

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<LinearJob*>(ctx);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kLinearRows, nr = min_i64(kLinearRows, job.p->out_features - n0);
      if (nr == 3) job.template rows_of_weights<3>(n0);
      else if (nr == 2) job.template rows_of_weights<2>(n0);
      else job.template rows_of_weights<1>(n0);
    }
  }
};

// M = 1 streams the weight rows one after another (stream_row) while x's row, in the
// accumulation type, stays in L1 beside the stream; longer rows of x miss L1 on every load, and
// the register blocks of kLinearRows rows, which load each x vector once for all three, read
// faster. Paired on the AVX-512 AMD EPYC, weights read from DRAM (2026-12-05,
// benchmarks/probes/decode_linear_m1_paths.py): at K >= 5120 the blocks took 0.59-0.73x the
// stream's time in bf16 and 0.87-0.95x in fp32; at K <= 3072 the stream took 0.63-0.85x the
// blocks' in bf16 (fp32 0.72-0.99x); K = 4096 about even.
#ifndef MMFAST_DECODE_STREAM_MAX_ROW_BYTES
#define MMFAST_DECODE_STREAM_MAX_ROW_BYTES 16384
#endif
constexpr int64_t kStreamMaxRowBytes = MMFAST_DECODE_STREAM_MAX_ROW_BYTES;
inline bool streams_one_row(const DecodeLinearParams& p, size_t acc_bytes) {
  return p.rows == 1 && p.in_features * int64_t(acc_bytes) <= kStreamMaxRowBytes;
}

template <typename scalar_t, typename acc_t>
void linear_typed(const DecodeLinearParams& p) {
  Scratch<acc_t> xbuf(size_t(p.rows * p.in_features));
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  for (int64_t m = 0; m < p.rows; ++m)
    to_acc_row(x + m * p.x_row_stride, xbuf.data + m * p.in_features, p.in_features);
  LinearJob<scalar_t, acc_t> job{&p, xbuf.data};
  parallel_for(ceil_div(p.out_features, kLinearRows), &job,
               streams_one_row(p, sizeof(acc_t)) ? &LinearJob<scalar_t, acc_t>::run_one_row
                                                 : &LinearJob<scalar_t, acc_t>::run);
}

void linear(const DecodeLinearParams& p) {
  if (p.rows == 0 || p.out_features == 0) return;
  dispatch_dtype(p.dtype, 0, [&](auto scalar, auto acc) {
    linear_typed<decltype(scalar), decltype(acc)>(p);
    return 0;
  });
}

}  // namespace decode

DecodeKernels decode_kernels() { return {&decode::append, &decode::attention, &decode::sample, &decode::linear}; }

}  // namespace MMFAST_CPU_ISA_NS
}  // namespace cpu
}  // namespace mmfast
