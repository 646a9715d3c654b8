// Torch-free test of the CPU decode kernels: every ISA variant this CPU runs, against float64
// references written out plainly (attention by direct softmax, the sampler's filter by a full
// sort). Guard elements around every output catch writes out of bounds.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "mmfast/cpu/decode.h"
#include "mmfast/cpu/isa.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/decode_impl.h"
#include "avx512_on_avx2.h"
#include "worst_error.h"

// One more copy of the SIMD header, without a target pragma, for sum_lanes_tree and the 16-bit
// conversions at every width (GCC emulates vectors wider than the baseline ISA with the same
// IEEE operations).
#pragma GCC diagnostic ignored "-Wpsabi"  // 32/64-byte vectors by value: these never cross a library
// exp_vec_nonpositive over a row (n a multiple of the vector width), for the copy of simd.h just
// included: the sampler's weights.
#define MMFAST_TEST_EXP_ROW                                                           \
  namespace mmfast::cpu::MMFAST_CPU_ISA_NS {                                         \
  void exp_nonpositive_row(const double* in, double* out, int64_t n) {              \
    for (int64_t i = 0; i < n; i += MMFAST_VECTOR_BYTES / 8)                        \
      store<double>(out + i, exp_vec_nonpositive(load<double>(in + i)));             \
  }                                                                                  \
  }
#define MMFAST_CPU_ISA_NS simd_test
#define MMFAST_VECTOR_BYTES 16
#include "mmfast/cpu/simd.h"
MMFAST_TEST_EXP_ROW
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES

// fp16 through F16C as the library's AVX2 and AVX-512 copies convert it: n halves (a multiple of
// 16) to floats and back, compiled for those targets (run only where the CPU has them).
// MMFAST_TEST_HALF_CONVERTERS defines both for the copy of simd.h just included.
#define MMFAST_TEST_HALF_CONVERTERS                                                  \
  namespace mmfast::cpu::MMFAST_CPU_ISA_NS {                                         \
  void halves_to_floats(const Half* in, float* out, int64_t n) {                    \
    for (int64_t i = 0; i < n; i += MMFAST_VECTOR_BYTES / 4)                        \
      store_floats(out + i, load_floats(in + i));                                    \
  }                                                                                  \
  void floats_to_halves(const float* in, Half* out, int64_t n) {                    \
    for (int64_t i = 0; i < n; i += MMFAST_VECTOR_BYTES / 4)                        \
      store_floats(out + i, load_floats(in + i));                                    \
  }                                                                                  \
  }
#if defined(__x86_64__) && defined(__GNUC__)
#define MMFAST_TEST_F16C 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MMFAST_CPU_ISA_NS simd_f16c_test
#define MMFAST_VECTOR_BYTES 32
#define MMFAST_CPU_F16C 256
#include "mmfast/cpu/simd.h"
MMFAST_TEST_HALF_CONVERTERS
MMFAST_TEST_EXP_ROW
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#undef MMFAST_CPU_F16C
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#define MMFAST_CPU_ISA_NS simd_f16c512_test
#define MMFAST_VECTOR_BYTES 64
#define MMFAST_CPU_F16C 512
#include "mmfast/cpu/simd.h"
MMFAST_TEST_HALF_CONVERTERS
MMFAST_TEST_EXP_ROW
#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#undef MMFAST_CPU_F16C
#pragma GCC pop_options
#else
#define MMFAST_TEST_F16C 0
#endif

using namespace mmfast;

namespace {

constexpr float kGuard = 12345.0f;

TokenTensor view(std::vector<float>& data, int64_t offset, int64_t tokens, int64_t heads, int64_t dim) {
  TokenTensor t;
  t.data = data.data() + offset;
  t.stride_b = tokens * heads * dim, t.stride_n = heads * dim, t.stride_h = dim;
  return t;
}

// Appends S tokens to rows of different lengths; everything else must stay as it was.
int check_append(const cpu::DecodeKernels& k) {
  const int64_t B = 3, S = 2, T = 9, H = 2, D = 5;
  std::vector<float> k_cache(B * T * H * D, kGuard), v_cache(B * T * H * D, kGuard), k_new(B * S * H * D),
      v_new(B * S * H * D);
  std::iota(k_new.begin(), k_new.end(), 1.0f);
  std::iota(v_new.begin(), v_new.end(), -100.0f);
  std::vector<int32_t> lengths = {0, 4, 7};
  KVCacheAppendParams p;
  p.batch = B, p.new_tokens = S, p.max_tokens = T, p.kv_heads = H, p.head_dim = D;
  p.k_cache = view(k_cache, 0, T, H, D), p.v_cache = view(v_cache, 0, T, H, D);
  p.k = view(k_new, 0, S, H, D), p.v = view(v_new, 0, S, H, D);
  p.cache_seqlens = lengths.data();
  int bad = k.append(p) != -1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < H * D; ++e) {
        const int64_t at = (b * T + t) * H * D + e, s = t - lengths[b];
        const bool written = s >= 0 && s < S;
        bad += k_cache[at] != (written ? k_new[(b * S + s) * H * D + e] : kGuard);
        bad += v_cache[at] != (written ? v_new[(b * S + s) * H * D + e] : kGuard);
      }
  lengths[1] = 8;  // 8 + 2 > 9: row 1 does not fit, and nothing at all is written
  std::fill(k_cache.begin(), k_cache.end(), kGuard);
  bad += k.append(p) != 1;
  bad += std::count(k_cache.begin(), k_cache.end(), kGuard) != int64_t(k_cache.size());
  return bad;
}

struct AttentionCase {
  int64_t B, Sq, H, Hkv, D, T, window;
  double softcap;
};

// Max abs error against a float64 softmax, or a large number when guards are touched.
double check_attention(const cpu::DecodeKernels& k, const AttentionCase& c, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> q(c.B * c.Sq * c.H * c.D), kc(c.B * c.T * c.Hkv * c.D), vc(kc.size());
  for (auto* v : {&q, &kc, &vc})
    for (auto& x : *v) x = normal(rng);
  std::vector<int32_t> lengths(c.B);
  for (int64_t b = 0; b < c.B; ++b) lengths[b] = int32_t(c.Sq + rng() % (c.T - c.Sq + 1));
  lengths[0] = int32_t(c.T);
  const int64_t out_size = c.B * c.Sq * c.H * c.D;
  std::vector<float> out(out_size + 16, kGuard);
  DecodeAttentionParams p;
  p.batch = c.B, p.queries = c.Sq, p.heads = c.H, p.kv_heads = c.Hkv, p.head_dim = c.D, p.max_tokens = c.T;
  p.q = view(q, 0, c.Sq, c.H, c.D), p.out = view(out, 0, c.Sq, c.H, c.D);
  p.k_cache = view(kc, 0, c.T, c.Hkv, c.D), p.v_cache = view(vc, 0, c.T, c.Hkv, c.D);
  p.cache_seqlens = lengths.data();
  p.scale = 1.0 / std::sqrt(double(c.D)), p.softcap = c.softcap, p.window = c.window;
  if (k.attention(p) != -1) return 1e9;
  for (int64_t i = out_size; i < out_size + 16; ++i)
    if (out[i] != kGuard) return 1e9;
  double worst = 0;
  const int64_t group = c.H / c.Hkv;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = 0; i < c.Sq; ++i)
      for (int64_t h = 0; h < c.H; ++h) {
        const int64_t pos = lengths[b] - c.Sq + i, kvh = h / group;
        std::vector<double> w(pos + 1, 0.0);
        double max = -INFINITY, sum = 0;
        for (int64_t j = 0; j <= pos; ++j) {
          if (c.window > 0 && pos - j >= c.window) continue;
          double s = 0;
          for (int64_t d = 0; d < c.D; ++d)
            s += double(q[((b * c.Sq + i) * c.H + h) * c.D + d]) * kc[((b * c.T + j) * c.Hkv + kvh) * c.D + d];
          s *= p.scale;
          if (c.softcap > 0) s = c.softcap * std::tanh(s / c.softcap);
          w[j] = s;
          max = std::max(max, s);
        }
        for (int64_t j = 0; j <= pos; ++j) {
          const bool visible = !(c.window > 0 && pos - j >= c.window);
          w[j] = visible ? std::exp(w[j] - max) : 0.0;
          sum += w[j];
        }
        for (int64_t d = 0; d < c.D; ++d) {
          double o = 0;
          for (int64_t j = 0; j <= pos; ++j) o += w[j] * vc[((b * c.T + j) * c.Hkv + kvh) * c.D + d];
          worst = worse_error(worst, std::fabs(o / sum - out[((b * c.Sq + i) * c.H + h) * c.D + d]));
        }
      }
  lengths[c.B - 1] = int32_t(c.T + 1);  // out of range: reported, row B - 1
  return k.attention(p) == c.B - 1 ? worst : 1e9;
}

// Kept tokens by a full sort (top-k then top-p over the top-k softmax), float64.
std::vector<bool> kept_by_sort(const std::vector<float>& x, int64_t top_k, double top_p) {
  const int64_t V = int64_t(x.size());
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
  std::vector<bool> keep(V, true);
  if (top_k > 0 && top_k < V)
    for (int64_t i = 0; i < V; ++i) keep[i] = x[i] >= x[order[top_k - 1]];
  if (top_p < 1) {
    double total = 0, above = 0;
    for (int64_t i = 0; i < V; ++i) total += keep[i] ? std::exp(double(x[i]) - x[order[0]]) : 0.0;
    float threshold = x[order[0]];
    for (int64_t r = 0; r < V && keep[order[r]]; ++r) {
      if (r > 0 && x[order[r]] != x[order[r - 1]] && above >= top_p * total) break;
      threshold = x[order[r]];
      above += std::exp(double(x[order[r]]) - x[order[0]]);
    }
    for (int64_t i = 0; i < V; ++i) keep[i] = keep[i] && x[i] >= threshold;
  }
  return keep;
}

// One row drawn with u sweeping [0, 1): every token drawn is in range and kept by the sort
// reference; greedy is the first maximum; invalid rows are flagged with token 0.
int check_sample(const cpu::DecodeKernels& k, int64_t V, int64_t top_k, float top_p, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  const int64_t rows = 64;
  std::vector<float> logits(rows * V);
  for (auto& x : logits) x = 2 * normal(rng);
  for (int64_t r = 0; r < rows; ++r) logits[r * V + 1] = logits[r * V];  // a tie in every row
  std::vector<float> uniform(rows);
  for (int64_t r = 0; r < rows; ++r) uniform[r] = float(r) / rows;
  std::vector<int64_t> tokens(rows + 4, -5);
  std::vector<int32_t> status(rows + 4, -5);
  SampleParams p;
  p.rows = rows, p.vocab = V, p.logits = logits.data(), p.row_stride = V;
  p.temperature = 1.0f, p.top_k = top_k, p.top_p = top_p, p.uniform = uniform.data();
  p.tokens = tokens.data(), p.status = status.data();
  for (int64_t r = 0; r < rows; ++r) std::copy_n(logits.begin(), V, logits.begin() + r * V);  // one row, many u
  k.sample(p);
  const std::vector<float> row(logits.begin(), logits.begin() + V);
  const std::vector<bool> keep = kept_by_sort(row, top_k, top_p);
  int bad = tokens[rows] != -5 || status[rows] != -5;
  for (int64_t r = 0; r < rows; ++r) bad += status[r] != 0 || tokens[r] < 0 || tokens[r] >= V || !keep[tokens[r]];
  p.temperature = 0;
  k.sample(p);
  const int64_t first_max = std::max_element(row.begin(), row.end()) - row.begin();
  bad += tokens[0] != first_max;
  logits[3 * V + 2] = NAN, logits[5 * V] = INFINITY;
  std::fill_n(logits.begin() + 7 * V, V, -INFINITY);
  p.temperature = 1;
  k.sample(p);
  bad += status[3] != 1 || status[5] != 1 || status[7] != 1 || tokens[3] != 0 || status[4] != 0;
  return bad;
}

// y = x W^T + b for M rows (register-block tails in M and N, K not a multiple of the vector).
double check_linear(const cpu::DecodeKernels& k, int64_t M, int64_t K, int64_t N, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> x(M * K), w(N * K), b(N), y(M * N + 8, kGuard);
  for (auto* v : {&x, &w, &b})
    for (auto& e : *v) e = normal(rng);
  DecodeLinearParams p;
  p.rows = M, p.in_features = K, p.out_features = N;
  p.x = x.data(), p.x_row_stride = K, p.weight = w.data(), p.bias = b.data(), p.y = y.data();
  k.linear(p);
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = b[n];
      for (int64_t i = 0; i < K; ++i) s += double(x[m * K + i]) * w[n * K + i];
      worst = worse_error(worst, std::fabs(s - y[m * N + n]) / std::sqrt(double(K)));
    }
  for (int64_t i = M * N; i < M * N + 8; ++i)
    if (y[i] != kGuard) return 1e9;
  return worst;
}

// sum_lanes_tree adds lanes in one fixed tree (lane i + lane i + n/2, halves recursively) at
// every vector width: its shuffle form and the memory form used before GCC 12 must give the
// same bits, so decode_linear's and the attention scores' sums do not depend on the compiler.
// The values span 2^-30..2^30 with both signs, so a different order changes the result.
template <typename acc_t, int bytes>
int check_sum_lanes_tree(std::mt19937& rng) {
  constexpr int lanes = bytes / int(sizeof(acc_t));
  typedef acc_t V __attribute__((vector_size(bytes)));
  std::uniform_real_distribution<double> mantissa(-1.0, 1.0);
  std::uniform_int_distribution<int> exponent(-30, 30);
  int mismatches = 0, order_matters = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    acc_t lane[lanes], tree[lanes];
    for (int i = 0; i < lanes; ++i) tree[i] = lane[i] = acc_t(std::ldexp(mantissa(rng), exponent(rng)));
    V v;
    std::memcpy(&v, lane, sizeof(v));
    for (int half = lanes / 2; half >= 1; half /= 2)
      for (int i = 0; i < half; ++i) tree[i] += tree[i + half];
    acc_t sequential = 0;
    for (int i = 0; i < lanes; ++i) sequential += lane[i];
    const acc_t got = cpu::simd_test::sum_lanes_tree<acc_t, bytes>(v);
    mismatches += std::memcmp(&got, &tree[0], sizeof(acc_t)) != 0;
    order_matters += sequential != tree[0];
  }
  // a test whose inputs could not tell two orders apart would prove nothing
  return lanes > 2 && order_matters == 0 ? -1 : mismatches;  // two lanes: one order only
}


// The largest distance, in units in the last place of the exact result, between exp(x) from
// `row` and expl(x) rounded to double (denormal results in units of 2^-1074), over x <= 0: the
// ends and specials, the denormal range, the reduction's boundaries (x = (k + 1/2) ln2) and
// 400,000 random points; -inf and x below -745.14 must give exactly 0.
double exp_ulp_error(void (*row)(const double*, double*, int64_t), std::mt19937& rng) {
  std::vector<double> xs = {0.0, -0.0, -1e-300, -1e-17, -0.5, -1.0, -88.0, -700.0, -708.39, -708.4, -709.78,
                            -720.0, -740.0, -745.0, -745.13, -745.134, -745.2, -746.0, -800.0, -1e300,
                            -INFINITY};
  const double ln2 = 0.6931471805599453;
  for (int k = 0; k < 1076; ++k)
    for (const double d : {-1e-13, 0.0, 1e-13}) xs.push_back(-(k + 0.5) * ln2 + d);
  std::uniform_real_distribution<double> anywhere(-746.0, 0.0), near_zero(-2.0, 0.0), denormal(-745.2, -708.0);
  for (int i = 0; i < 400000; ++i) xs.push_back(i % 4 == 0 ? near_zero(rng) : i % 4 == 1 ? denormal(rng) : anywhere(rng));
  while (xs.size() % 8) xs.push_back(-1.0);
  std::vector<double> got(xs.size());
  row(xs.data(), got.data(), int64_t(xs.size()));
  double worst = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double exact = double(expl((long double)xs[i]));
    if (exact == 0.0) {
      worst = got[i] == 0.0 ? worst : INFINITY;
      continue;
    }
    const double ulp = std::max(std::nextafter(exact, INFINITY) - exact, std::ldexp(1.0, -1074));
    worst = worse_error(worst, std::fabs(got[i] - exact) / ulp);
  }
  return worst;
}

// Greedy sampling of CFG pairs whose mix uncond + (cond - uncond) * scale differs by an ulp when
// the product and the sum are fused into one FMA: the token must be the argmax of the mix rounded
// after each operation (torch's separate ops, Liquid's expression). The pair's second token mixes
// to the same float as its first (cond == uncond == that float) when rounded twice, and above it
// when fused: the first wins. Rows of V = 69 tokens (more than 4 vectors of 16 floats, and a tail),
// the pair at the start (the vector loop) or at the end (the tail), the rest far below. Returns
// the rows that took another token (or -1 when no such pair was found: a test that could not tell
// the two apart).
int check_sample_cfg_mix(const cpu::DecodeKernels& k, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  const float scale = 2.5f;
  const int64_t V = 2 + 4 * 16 + 3;
  std::vector<float> cond, uncond;
  std::vector<int64_t> expected;
  for (int tries = 0; tries < 100000 && expected.size() < 2 * 37; ++tries) {
    const float c = 3 * normal(rng), u = 3 * normal(rng);
    volatile float product = (c - u) * scale;  // rounded: volatile keeps the compiler from fusing
    const float twice_rounded = u + product;
    if (std::fma(c - u, scale, u) <= twice_rounded) continue;
    const int64_t at = expected.size() % 2 ? V - 2 : 0;
    std::vector<float> row_c(V, -1e30f), row_u(V, -1e30f);
    row_c[at] = row_u[at] = twice_rounded;
    row_c[at + 1] = c, row_u[at + 1] = u;
    cond.insert(cond.end(), row_c.begin(), row_c.end());
    uncond.insert(uncond.end(), row_u.begin(), row_u.end());
    expected.push_back(at);
  }
  const int64_t rows = int64_t(expected.size());
  if (rows == 0) return -1;
  std::vector<float> logits(cond);
  logits.insert(logits.end(), uncond.begin(), uncond.end());
  std::vector<float> uniform(rows, 0.5f);
  std::vector<int64_t> tokens(rows, -5);
  std::vector<int32_t> status(rows, -5);
  SampleParams p;
  p.rows = rows, p.vocab = V, p.logits = logits.data(), p.row_stride = V, p.cfg = true, p.cfg_scale = scale;
  p.temperature = 0, p.uniform = uniform.data(), p.tokens = tokens.data(), p.status = status.data();
  k.sample(p);
  int bad = 0;
  for (int64_t r = 0; r < rows; ++r) bad += tokens[r] != expected[r] || status[r] != 0;
  return bad;
}

// A u below 0 (not checked by the kernel: the Python op and torch.compile pass it through) draws
// the first kept token, also when the blocks before it keep nothing (found in review: the draw
// returned a token of such a block). Returns the draws off.
int check_sample_negative_u(const cpu::DecodeKernels& k) {
  const int64_t V = 512;
  std::vector<float> logits(V, 0.0f);
  logits[300] = 5.0f;
  float uniform = -0.5f;
  int64_t token = -5;
  int32_t status = -5;
  SampleParams p;
  p.rows = 1, p.vocab = V, p.logits = logits.data(), p.row_stride = V, p.temperature = 1.0f, p.top_k = 1;
  p.uniform = &uniform, p.tokens = &token, p.status = &status;
  k.sample(p);
  int bad = token != 300 || status != 0;
  std::fill_n(logits.begin(), 256, -INFINITY);  // no filter: the first block keeps nothing (weight 0)
  p.top_k = 0;
  k.sample(p);
  return bad + (token != 256);
}

// Floats whose conversion to fp16 / bf16 tells rounding apart: specials, the overflow boundary,
// every finite half and the midpoint above it (both signs), and a million random bit patterns,
// padded to a multiple of 16.
std::vector<uint32_t> conversion_test_words(std::mt19937& rng) {
  std::vector<uint32_t> words = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7fc12345u,
                                 0xffc00001u, 0x7f800001u, 0x477fefffu, 0x477ff000u, 0x33000000u, 0x33000001u,
                                 0x00000001u, 0x807fffffu, 0x387fe000u, 0x7f7fffffu, 0x3f800000u, 0xbf7fffffu};
  for (uint32_t bits = 0; bits < 0x7c00u; ++bits) {
    const double here = cpu::to_float(cpu::Half{uint16_t(bits)});
    const double above = cpu::to_float(cpu::Half{uint16_t(bits + 1)});
    for (const double value : {here, (here + above) / 2})
      for (const double sign : {1.0, -1.0}) words.push_back(cpu::float_bits(float(sign * value)));
  }
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 1000000; ++i) words.push_back(any(rng));
  while (words.size() % 16) words.push_back(0);
  return words;
}

// F16C's fp16 conversions (the AVX2 / AVX-512 copies): the scalar conversions' bits for every
// half and every test float, except NaN, which must stay a NaN of the same sign.
int check_f16c_conversions(void (*to_floats)(const cpu::Half*, float*, int64_t),
                           void (*to_halves)(const float*, cpu::Half*, int64_t), std::mt19937& rng) {
  int bad = 0;
  std::vector<cpu::Half> halves(65536);
  std::vector<float> floats(65536);
  for (uint32_t b = 0; b < 65536; ++b) halves[b].bits = uint16_t(b);
  to_floats(halves.data(), floats.data(), 65536);
  for (uint32_t b = 0; b < 65536; ++b) {
    const float want = cpu::to_float(halves[b]), got = floats[b];
    bad += want != want ? !(got != got) || std::signbit(got) != std::signbit(want)
                        : cpu::float_bits(got) != cpu::float_bits(want);
  }
  const std::vector<uint32_t> words = conversion_test_words(rng);
  std::vector<float> inputs(words.size());
  std::vector<cpu::Half> outputs(words.size());
  for (size_t i = 0; i < words.size(); ++i) inputs[i] = cpu::bits_float(words[i]);
  to_halves(inputs.data(), outputs.data(), int64_t(inputs.size()));
  for (size_t i = 0; i < words.size(); ++i) {
    const uint16_t want = cpu::to_half(inputs[i]).bits, got = outputs[i].bits;
    const bool want_nan = (want & 0x7fffu) > 0x7c00u, got_nan = (got & 0x7fffu) > 0x7c00u;
    bad += want_nan ? !got_nan || (got & 0x8000u) != (want & 0x8000u) : got != want;
  }
  return bad;
}

// simd.h's load_floats / store_floats give the bits of numeric.h's scalar conversions: every
// fp16 and bf16 value to float (zeros, subnormals, inf, NaN payloads), and float to fp16 / bf16
// for every half, the midpoints between neighbouring halves (ties to even), the overflow
// boundary, specials and a million random bit patterns. Returns the lanes that differ.
template <int bytes>
int check_16bit_conversions(std::mt19937& rng) {
  namespace simd = cpu::simd_test;
  constexpr int lanes = bytes / 4;
  int bad = 0;
  for (uint32_t start = 0; start < 65536; start += lanes) {
    cpu::Half h[lanes];
    cpu::BFloat16 b[lanes];
    for (int i = 0; i < lanes; ++i) h[i].bits = b[i].bits = uint16_t(start + i);
    float from_half[lanes], from_bf16[lanes];
    simd::store_floats<bytes>(from_half, simd::load_floats<bytes>(h));
    simd::store_floats<bytes>(from_bf16, simd::load_floats<bytes>(b));
    for (int i = 0; i < lanes; ++i)
      bad += cpu::float_bits(from_half[i]) != cpu::float_bits(cpu::to_float(h[i])) ||
             cpu::float_bits(from_bf16[i]) != cpu::float_bits(cpu::to_float(b[i]));
  }
  const std::vector<uint32_t> words = conversion_test_words(rng);
  for (size_t start = 0; start < words.size(); start += lanes) {
    float f[lanes];
    for (int i = 0; i < lanes; ++i) f[i] = cpu::bits_float(words[start + i]);
    cpu::Half h[lanes];
    cpu::BFloat16 b[lanes];
    simd::store_floats<bytes>(h, simd::load_floats<bytes>(f));
    simd::store_floats<bytes>(b, simd::load_floats<bytes>(f));
    for (int i = 0; i < lanes; ++i)
      bad += h[i].bits != cpu::to_half(f[i]).bits || b[i].bits != cpu::to_bfloat16(f[i]).bits;
  }
  return bad;
}
}  // namespace

// A per-call scratch that malloc cannot give throws a clear error (the kernels once wrote
// through the null pointer): 2^60 floats exceed any address space, SIZE_MAX elements overflow
// the byte count. Not under AddressSanitizer, whose allocator aborts on such sizes instead.
int check_scratch_allocation_failure() {
#if defined(__SANITIZE_ADDRESS__)
  std::printf("skip scratch allocation failure (AddressSanitizer)\n");
  return 0;
#else
  int bad = 0;
  for (const size_t elements : {size_t(1) << 60, ~size_t(0)}) {
    try {
      cpu::simd_test::Scratch<float> scratch(elements);
      ++bad;  // allocated: impossible for these sizes
    } catch (const std::runtime_error& error) {
      if (std::strstr(error.what(), "out of memory") == nullptr) ++bad;
      const bool overflows = elements == ~size_t(0);
      if ((std::strstr(error.what(), "more bytes than size_t holds") != nullptr) != overflows) ++bad;
    }
  }
  cpu::simd_test::Scratch<float> small(1000);  // an ordinary size still works, 64-byte aligned
  if (reinterpret_cast<uintptr_t>(small.data) % 64 != 0) ++bad;
  small.data[999] = 1.0f;
  return bad;
#endif
}

int main() {
  const auto variants = test::runnable_isa_variants(cpu::isa_generic::decode_kernels, cpu::isa_avx2::decode_kernels,
                                                    cpu::isa_avx512::decode_kernels,
                                                    cpu::isa_avx512_on_avx2::decode_kernels);
  const AttentionCase cases[] = {{2, 1, 4, 4, 64, 40, 0, 0}, {3, 3, 8, 2, 40, 1100, 0, 0}, {1, 16, 4, 1, 8, 20, 0, 0},
                                 {2, 2, 2, 2, 256, 700, 300, 30.0}, {2, 1, 6, 3, 3, 5, 2, 0},
                                 // read in place across a block of heads: Llama-3's GQA over three chunks, Liquid's
                                 // MHA (16 heads of 256) with Sq = 2, a group of 3 (a row block and a single row)
                                 {2, 1, 32, 8, 128, 1100, 0, 0}, {1, 2, 16, 16, 256, 600, 0, 0},
                                 {2, 1, 6, 2, 64, 530, 0, 0}};
  int failures = 0, passed = 0;
  std::mt19937 rng(0);
  const struct {
    const char* name;
    int (*check)(std::mt19937&);
  } trees[] = {{"float x4", check_sum_lanes_tree<float, 16>},   {"float x8", check_sum_lanes_tree<float, 32>},
               {"float x16", check_sum_lanes_tree<float, 64>},  {"double x2", check_sum_lanes_tree<double, 16>},
               {"double x4", check_sum_lanes_tree<double, 32>}, {"double x8", check_sum_lanes_tree<double, 64>}};
  std::mt19937 tree_rng(7);  // its own generator: the cases below keep their inputs
  for (const auto& t : trees) {
    const int bad = t.check(tree_rng);
    (bad == 0 ? passed : failures)++;
    std::printf("%s sum_lanes_tree %s: %d of 2000 off the fixed tree%s\n", bad ? "FAIL" : "ok  ", t.name,
                bad < 0 ? 0 : bad, bad < 0 ? " (inputs did not depend on the order)" : "");
  }
  const struct {
    const char* name;
    int (*check)(std::mt19937&);
  } conversions[] = {{"x4", check_16bit_conversions<16>},
                     {"x8", check_16bit_conversions<32>},
                     {"x16", check_16bit_conversions<64>}};
  for (const auto& c : conversions) {
    const int bad = c.check(tree_rng);
    (bad == 0 ? passed : failures)++;
    std::printf("%s fp16 / bf16 conversions %s: %d lanes off the scalar bits\n", bad ? "FAIL" : "ok  ", c.name, bad);
  }
#if MMFAST_TEST_F16C
  const struct {
    const char* name;
    bool runs;
    void (*to_floats)(const cpu::Half*, float*, int64_t);
    void (*to_halves)(const float*, cpu::Half*, int64_t);
  } f16c_paths[] = {
      {"F16C x8 (avx2)", cpu::isa_supported(cpu::Isa::kAvx2), cpu::simd_f16c_test::halves_to_floats,
       cpu::simd_f16c_test::floats_to_halves},
      {"F16C x16 (avx512)", cpu::isa_supported(cpu::Isa::kAvx512), cpu::simd_f16c512_test::halves_to_floats,
       cpu::simd_f16c512_test::floats_to_halves}};
  for (const auto& f : f16c_paths) {
    if (!f.runs) {
      std::printf("skip fp16 conversions %s (not supported by this CPU)\n", f.name);
      continue;
    }
    const int bad = check_f16c_conversions(f.to_floats, f.to_halves, tree_rng);
    (bad == 0 ? passed : failures)++;
    std::printf("%s fp16 conversions %s: %d values off the scalar bits (NaN: NaN-ness and sign)\n",
                bad ? "FAIL" : "ok  ", f.name, bad);
  }
#endif
  const struct {
    const char* name;
    bool runs;
    void (*row)(const double*, double*, int64_t);
  } exp_paths[] = {{"x2 (baseline)", true, cpu::simd_test::exp_nonpositive_row}
#if MMFAST_TEST_F16C
                   ,
                   {"x4 (avx2, fma)", cpu::isa_supported(cpu::Isa::kAvx2), cpu::simd_f16c_test::exp_nonpositive_row},
                   {"x8 (avx512)", cpu::isa_supported(cpu::Isa::kAvx512), cpu::simd_f16c512_test::exp_nonpositive_row}
#endif
  };
  for (const auto& e : exp_paths) {
    if (!e.runs) {
      std::printf("skip fp64 exp %s (not supported by this CPU)\n", e.name);
      continue;
    }
    const double worst = exp_ulp_error(e.row, tree_rng);
    const bool ok = worst <= 1.0;
    (ok ? passed : failures)++;
    std::printf("%s fp64 exp of x <= 0 %s: %.3f ulp at most\n", ok ? "ok  " : "FAIL", e.name, worst);
  }
  {
    const int bad = check_scratch_allocation_failure();
    (bad == 0 ? passed : failures)++;
    std::printf("%s scratch allocation failure: %d checks off\n", bad ? "FAIL" : "ok  ", bad);
  }
  for (const auto& variant : variants) {
    const cpu::DecodeKernels k = variant.kernels();
    const char* name = variant.name;
    int bad = check_append(k);
    (bad == 0 ? passed : failures)++;
    std::printf("%s %s append: %d checks off\n", bad ? "FAIL" : "ok  ", name, bad);
    for (const auto& c : cases) {
      const double err = check_attention(k, c, rng);
      const bool ok = err < 2e-5;
      (ok ? passed : failures)++;
      std::printf("%s %s attention B=%lld Sq=%lld H=%lld/%lld D=%lld T=%lld window=%lld softcap=%g: max err %.2e\n",
                  ok ? "ok  " : "FAIL", name, (long long)c.B, (long long)c.Sq, (long long)c.H, (long long)c.Hkv,
                  (long long)c.D, (long long)c.T, (long long)c.window, c.softcap, err);
    }
    // M = 1 at K > 4096: the register blocks instead of the stream
    const int64_t linears[][3] = {{1, 768, 100}, {1, 100, 7}, {1, 3, 5},  {8, 37, 11},
                                  {5, 3, 2},     {16, 64, 7}, {1, 5003, 7}};
    for (const auto& l : linears) {
      const double err = check_linear(k, l[0], l[1], l[2], rng);
      const bool ok = err < 1e-5;
      (ok ? passed : failures)++;
      std::printf("%s %s linear M=%lld K=%lld N=%lld: max err / sqrt(K) %.2e\n", ok ? "ok  " : "FAIL", name,
                  (long long)l[0], (long long)l[1], (long long)l[2], err);
    }
    const struct {
      int64_t V, top_k;
      float top_p;
    } samplers[] = {{1000, 0, 1.0f},  {8192, 4096, 0.96f}, {500, 20, 0.5f},
                    {7, 3, 0.0f},     {300, 0, 0.3f},      {20000, 50, 1.0f},  // top-k's block-max prefilter
                    {4099, 3, 0.9f}};
    bad = check_sample_cfg_mix(k, rng);
    (bad == 0 ? passed : failures)++;
    std::printf("%s %s sample CFG mix rounded per operation: %d rows off\n", bad ? "FAIL" : "ok  ", name, bad);
    bad = check_sample_negative_u(k);
    (bad == 0 ? passed : failures)++;
    std::printf("%s %s sample u < 0 draws the first kept token: %d draws off\n", bad ? "FAIL" : "ok  ", name, bad);
    for (const auto& s : samplers) {
      bad = check_sample(k, s.V, s.top_k, s.top_p, rng);
      (bad == 0 ? passed : failures)++;
      std::printf("%s %s sample V=%lld top_k=%lld top_p=%g: %d checks off\n", bad ? "FAIL" : "ok  ", name,
                  (long long)s.V, (long long)s.top_k, s.top_p, bad);
    }
  }
  std::printf("%d passed, %d failed\n", passed, failures);
  return failures == 0 ? 0 : 1;
}
