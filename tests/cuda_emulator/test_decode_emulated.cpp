// The CUDA decode kernels run on the host under emulator.h (fibers for the 256 threads of a
// block, switched at __syncthreads and shuffles in random order) and are checked against a
// float64 reference written here:
//   kv_cache_append: every dtype, strided inputs, rows whose slots leave [0, T_max) skipped,
//     nothing outside the new slots written;
//   decode_attention: both kernels (stream: 16-bit, D 64 / 128 / 256, up to 4 rows per KV head;
//     tiled: the rest, and everything under MMFAST_CUDA_DECODE_STREAM=0, which ctest runs too; the
//     launch checked), every dtype, Sq 1 / 3 / 16, GQA groups 1 / 2 / 4 / 8, D 64 / 128 / 256 and
//     odd D, per-row lengths 1 .. T_max, windows and soft-capping, one and many key splits (the
//     SM count varied), rows with lengths outside [Sq, T_max] (NaN rows), cache slots past each
//     row's length filled with NaN (a read there would show), poisoned padding of the output;
//   sample: every dtype, greedy with ties, top-k with ties at the k-th value, top-p boundaries
//     and tie groups, top_p = 0, CFG, NaN / +inf / all -inf rows, u = 0 and u just below 1,
//     padded rows (NaN padding), run-to-run identical tokens, random rows against the
//     reference draw (a mismatch is accepted only where u * total lies within 1e-5 of a CDF
//     step or a top-p mass within 1e-5 of top_p * total, the documented rounding cases);
//     narrow rows with many ties (whole warps in one histogram bin); the row staged in shared
//     memory and, with the opt-in limit lowered, re-read on every pass (the launch checked);
//   warp_sum_peers: exact group sums in each group's lowest lane.
// It cannot check alignment, races between blocks or speed: that needs a GPU.
// Argument: 0 (quick), 1 or 2 (+ more shapes).
#include "emulator.h"
#include "test_support.h"
#include "mmfast/cuda/decode.cuh"

#include <cmath>
#include <cstring>
#include <numeric>
#include <string>

using namespace mmfast;

template <class T> const char* tname() {
  return std::is_same<T, float>::value ? "f32" : std::is_same<T, double>::value ? "f64" : std::is_same<T, __half>::value ? "f16" : "bf16";
}
template <class T> double tol_of() {
  return std::is_same<T, double>::value ? 1e-10 : std::is_same<T, float>::value ? 2e-5 : std::is_same<T, __half>::value ? 2e-3 : 1.6e-2;
}

std::mt19937 grng(17);
double urand(double lo = -1.5, double hi = 1.5) { return std::uniform_real_distribution<double>(lo, hi)(grng); }
int ncases = 0;

constexpr double kPoison = 12345.0;

// A (B, N, H, D) tensor: layout 0 = (B, N, H, D + pad), 1 = (B, H, N, D + pad); a poisoned tail.
template <class T> struct Tok {
  std::vector<T> buf;
  TokenTensor t;
  int64_t B, N, H, D, ld;
  Tok(int64_t B_, int64_t N_, int64_t H_, int64_t D_, int layout, int pad) : B(B_), N(N_), H(H_), D(D_), ld(D_ + pad) {
    buf.assign(B * N * H * ld + 16, fromd<T>(kPoison));
    if (layout == 0) { t.stride_n = H * ld; t.stride_h = ld; t.stride_b = N * H * ld; }
    else { t.stride_h = N * ld; t.stride_n = ld; t.stride_b = N * H * ld; }
    t.data = buf.data();
  }
  T& at(int64_t b, int64_t n, int64_t h, int64_t d) { return buf[b * t.stride_b + n * t.stride_n + h * t.stride_h + d]; }
  double g(int64_t b, int64_t n, int64_t h, int64_t d) { return tod(at(b, n, h, d)); }
  void fill() {
    for (int64_t b = 0; b < B; ++b) for (int64_t n = 0; n < N; ++n) for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) at(b, n, h, d) = fromd<T>(urand());
  }
  // Elements outside the (B, N, H, D) region still hold the poison.
  bool outside_intact() {
    std::vector<char> inside(buf.size(), 0);
    for (int64_t b = 0; b < B; ++b) for (int64_t n = 0; n < N; ++n) for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) inside[b * t.stride_b + n * t.stride_n + h * t.stride_h + d] = 1;
    for (size_t e = 0; e < buf.size(); ++e)
      if (!inside[e] && tod(buf[e]) != tod(fromd<T>(kPoison))) return false;
    return true;
  }
};

// ---- kv_cache_append --------------------------------------------------------------------------
template <class T>
void run_append(int64_t B, int64_t S, int64_t Tmax, int64_t Hkv, int64_t D, std::vector<int32_t> lens, int layout) {
  ++ncases;
  char cfg[160];
  std::snprintf(cfg, sizeof cfg, "append %s B=%ld S=%ld T=%ld Hkv=%ld D=%ld layout=%d", tname<T>(), (long)B, (long)S,
                (long)Tmax, (long)Hkv, (long)D, layout);
  Tok<T> kc(B, Tmax, Hkv, D, 0, 0), vc(B, Tmax, Hkv, D, 0, 0), k(B, S, Hkv, D, layout, 3), v(B, S, Hkv, D, layout, 3);
  kc.fill(), vc.fill(), k.fill(), v.fill();
  const std::vector<T> k0 = kc.buf, v0 = vc.buf;
  KVCacheAppendParams p;
  p.batch = B, p.new_tokens = S, p.max_tokens = Tmax, p.kv_heads = Hkv, p.head_dim = D, p.dtype = dtype_of<T>();
  p.k_cache = kc.t, p.v_cache = vc.t, p.k = k.t, p.v = v.t, p.cache_seqlens = lens.data();
  if (cuda::kv_cache_append(p, nullptr) != cudaSuccess) return fail(std::string("launch ") + cfg);
  int bad = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    const bool skip = len < 0 || len + S > Tmax;
    for (int64_t n = 0; n < Tmax; ++n) for (int64_t h = 0; h < Hkv; ++h) for (int64_t d = 0; d < D; ++d) {
      const size_t e = b * kc.t.stride_b + n * kc.t.stride_n + h * kc.t.stride_h + d;
      const bool written = !skip && n >= len && n < len + S;
      const double wk = written ? k.g(b, n - len, h, d) : tod(k0[e]);
      const double wv = written ? v.g(b, n - len, h, d) : tod(v0[e]);
      bad += tod(kc.buf[e]) != wk || tod(vc.buf[e]) != wv;
    }
  }
  for (size_t e = kc.buf.size() - 16; e < kc.buf.size(); ++e) bad += tod(kc.buf[e]) != tod(fromd<T>(kPoison)) || tod(vc.buf[e]) != tod(fromd<T>(kPoison));
  if (bad) fail(std::to_string(bad) + " elements off: " + cfg);
}

// ---- decode_attention -------------------------------------------------------------------------
// out against the fp64 softmax attention of q, kc, vc (a NaN where a row is invalid or sees a NaN key).
template <class T>
void check_attention(Tok<T>& q, Tok<T>& out, Tok<T>& kc, Tok<T>& vc, const std::vector<int32_t>& lens, int64_t Sq,
                     int64_t H, int64_t Hkv, int64_t D, int64_t W, float softcap, float scale, const char* cfg) {
  const int64_t B = q.B, G = H / Hkv, Tmax = kc.N;
  double maxerr = 0;
  int bad = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = lens[b];
    const bool valid = len >= Sq && len <= Tmax;
    for (int64_t i = 0; i < Sq; ++i) for (int64_t h = 0; h < H; ++h) {
      if (!valid) {
        for (int64_t d = 0; d < D; ++d) bad += !std::isnan(out.g(b, i, h, d));
        continue;
      }
      const int64_t pos = len - Sq + i, kvh = h / G;
      std::vector<double> s(len, -INFINITY);
      double mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) {
        if (j > pos || (W > 0 && pos - j >= W)) continue;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += q.g(b, i, h, d) * kc.g(b, j, kvh, d);
        double x = double(scale) * dot;
        if (softcap > 0) x = double(softcap) * std::tanh(x / double(softcap));
        s[j] = x;
        mx = std::isnan(x) || std::isnan(mx) ? NAN : std::max(mx, x);  // softmax: a NaN score, a NaN row
      }
      double den = 0;
      std::vector<double> o(D, 0.0);
      for (int64_t j = 0; j < len; ++j) {
        if (s[j] == -INFINITY) continue;
        const double w = std::exp(s[j] - mx);
        den += w;
        for (int64_t d = 0; d < D; ++d) o[d] += w * vc.g(b, j, kvh, d);
      }
      for (int64_t d = 0; d < D; ++d) {
        const double ref = o[d] / den, got = out.g(b, i, h, d);
        if (std::isnan(ref)) {
          bad += !std::isnan(got);
          continue;
        }
        const double err = std::fabs(got - ref);
        if (!(err <= tol_of<T>() * (1 + std::fabs(ref)))) ++bad;
        if (!(err <= maxerr)) maxerr = std::isnan(err) ? INFINITY : err;
      }
    }
  }
  if (!out.outside_intact()) fail(std::string("wrote outside the output ") + cfg);
  if (bad) fail(std::to_string(bad) + " elements off (max err " + std::to_string(maxerr) + "): " + cfg);
}

template <class T>
void run_attention(int64_t B, int64_t Sq, int64_t H, int64_t Hkv, int64_t D, int64_t Tmax, std::vector<int32_t> lens,
                   int64_t W, float softcap, int sms, int layout = 0, int kv_pad = 1, int64_t nan_key = -1) {
  ++ncases;
  emu::sms = sms;
  const float scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  Tok<T> q(B, Sq, H, D, layout, 2), out(B, Sq, H, D, layout, 2), kc(B, Tmax, Hkv, D, 0, kv_pad), vc(B, Tmax, Hkv, D, 0, kv_pad);
  q.fill(), kc.fill(), vc.fill();
  for (int64_t b = 0; b < B; ++b) {  // slots past a valid row's length are NaN: reading one shows
    if (lens[b] < Sq || lens[b] > Tmax) continue;
    for (int64_t n = lens[b]; n < Tmax; ++n) for (int64_t h = 0; h < Hkv; ++h) for (int64_t d = 0; d < D; ++d)
      kc.at(b, n, h, d) = vc.at(b, n, h, d) = fromd<T>(NAN);
  }
  if (nan_key >= 0)  // a NaN key of row 0 (KV head 0): every query that sees it must come out NaN
    kc.at(0, nan_key, 0, 0) = fromd<T>(NAN);
  DecodeAttentionParams p;
  p.batch = B, p.queries = Sq, p.heads = H, p.kv_heads = Hkv, p.head_dim = D, p.max_tokens = Tmax;
  p.dtype = dtype_of<T>(), p.q = q.t, p.out = out.t, p.k_cache = kc.t, p.v_cache = vc.t;
  p.cache_seqlens = lens.data(), p.scale = scale, p.softcap = softcap, p.window = W;
  const int64_t splits = cuda::decodek::attention_plan(p, cuda::decodek::attention_launch<T>(p)).splits;
  char cfg[200];
  std::snprintf(cfg, sizeof cfg,
                "attention %s B=%ld Sq=%ld H=%ld Hkv=%ld D=%ld T=%ld W=%ld cap=%g sms=%d splits=%ld kv_pad=%d nan_key=%ld",
                tname<T>(), (long)B, (long)Sq, (long)H, (long)Hkv, (long)D, (long)Tmax, (long)W, softcap, sms,
                (long)splits, kv_pad, (long)nan_key);
  const size_t bytes = cuda::decode_attention_workspace_bytes(p);
  std::vector<char> ws(bytes + 64, 0x7f);
  p.workspace = bytes ? ws.data() : nullptr, p.workspace_bytes = bytes;
  emu::launches.clear();
  if (cuda::decode_attention(p, nullptr) != cudaSuccess) return fail(std::string("launch ") + cfg);
  for (size_t e = bytes; e < ws.size(); ++e)
    if (ws[e] != 0x7f) return fail(std::string("wrote past the workspace ") + cfg);
  // The kernel taken: the stream kernel for 16-bit caches with D of 64 / 128 / 256, at most 4
  // query rows per KV head and aligned K and V rows (unless MMFAST_CUDA_DECODE_STREAM=0); else the
  // tiled kernel, its V tile copied with cp.async into KT x D elements of dynamic shared memory for
  // aligned rows (unless MMFAST_CUDA_ASYNC_COPY=0), staged after the scores (no dynamic memory) otherwise.
  const bool aligned = cuda::rows_16b_aligned(p.k_cache, D, sizeof(T)) && cuda::rows_16b_aligned(p.v_cache, D, sizeof(T));
  const char* no_stream = std::getenv("MMFAST_CUDA_DECODE_STREAM");
  const bool stream = sizeof(T) == 2 && (D == 64 || D == 128 || D == 256) && H / Hkv * Sq <= 4 && aligned &&
                      !(no_stream != nullptr && no_stream[0] == '0');
  const bool v_async = !stream && cuda::rows_16b_aligned(p.v_cache, D, sizeof(T)) && cuda::async_copy_enabled();
  const size_t v_smem = v_async ? size_t(cuda::decodek::attn_key_tile<cuda::acc_t<T>>(D) * D) * sizeof(T) : 0;
  if (emu::launches.empty() || emu::launches[0].smem != v_smem ||
      (std::strstr(emu::launches[0].kernel, "stream") != nullptr) != stream)
    return fail(std::string(stream ? "stream kernel" : "tiled kernel, V tile path (dynamic shared memory ") +
                (stream ? "" : std::to_string(v_smem) + " B") + " expected) " + cfg);
  check_attention(q, out, kc, vc, lens, Sq, H, Hkv, D, W, softcap, scale, cfg);
  if (bytes > 0) {
    // A workspace smaller than the plan's (the caller's occupancy query failed, the launch's
    // succeeded: more splits planned) runs fewer splits within it: the same result, nothing
    // written past it.
    std::vector<char> small(bytes - 1 + 64, 0x7f);
    DecodeAttentionParams fewer = p;
    fewer.workspace = small.data(), fewer.workspace_bytes = bytes - 1;
    std::fill(out.buf.begin(), out.buf.end(), fromd<T>(kPoison));  // every row must be written again
    emu::launches.clear();
    if (cuda::decode_attention(fewer, nullptr) != cudaSuccess) return fail(std::string("small workspace: launch ") + cfg);
    if (emu::launches.empty()) return fail(std::string("small workspace: nothing launched ") + cfg);
    for (size_t e = bytes - 1; e < small.size(); ++e)
      if (small[e] != 0x7f) return fail(std::string("small workspace: wrote past it ") + cfg);
    check_attention(q, out, kc, vc, lens, Sq, H, Hkv, D, W, softcap, scale, (std::string("small workspace ") + cfg).c_str());
  }
}

// ---- sample -------------------------------------------------------------------------------------
struct SampleRef {
  int64_t token;
  int status;
  double margin;  // distance (relative to the total) of the draw or a top-p boundary from a decision
  std::vector<double> probs;
};

// The rules of mmfast/decode.h in fp64 (mixing and temperature in fp32, as the kernels do).
template <class T>
SampleRef sample_reference(const T* cond, const T* uncond, float cfg_scale, int64_t V, float temperature,
                           int64_t top_k, float top_p, float u) {
  SampleRef r{0, 0, INFINITY, {}};
  std::vector<float> x(V);
  for (int64_t i = 0; i < V; ++i) {
    const float c = static_cast<float>(tod(cond[i]));
    if (uncond == nullptr) x[i] = c;
    else {
      const float un = static_cast<float>(tod(uncond[i]));
      volatile float diff = c - un;
      volatile float prod = diff * cfg_scale;
      x[i] = un + prod;
    }
  }
  bool bad = false, all_neg_inf = true;
  for (float v : x) {
    bad = bad || std::isnan(v) || v == INFINITY;
    all_neg_inf = all_neg_inf && v == -INFINITY;
  }
  if (bad || all_neg_inf) {
    r.status = 1;
    return r;
  }
  if (temperature == 0) {
    r.token = std::max_element(x.begin(), x.end()) - x.begin();  // the first maximum
    return r;
  }
  std::vector<double> xs(V);
  for (int64_t i = 0; i < V; ++i) xs[i] = static_cast<double>(x[i] / temperature);
  if (top_k > 0 && top_k < V) {
    std::vector<double> sorted = xs;
    std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<double>());
    const double kth = sorted[top_k - 1];
    for (auto& v : xs) if (v < kth) v = -INFINITY;
  }
  const double mx = *std::max_element(xs.begin(), xs.end());
  std::vector<double> probs(V);
  double total = 0;
  for (int64_t i = 0; i < V; ++i) total += probs[i] = std::exp(xs[i] - mx);
  if (top_p < 1) {
    std::vector<int64_t> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return xs[a] > xs[b]; });
    double above = 0;
    const double cut = double(top_p) * total;
    for (int64_t k = 0; k < V;) {
      int64_t e = k;
      double group = 0;
      while (e < V && xs[order[e]] == xs[order[k]]) group += probs[order[e++]];
      const bool keep = k == 0 || above < cut;
      if (k > 0 && probs[order[k]] > 0) r.margin = std::min(r.margin, std::fabs(above - cut) / total);
      if (!keep) for (int64_t t = k; t < e; ++t) probs[order[t]] = 0;
      above += group;
      k = e;
    }
  }
  double kept = 0;
  int64_t last = 0;
  for (int64_t i = 0; i < V; ++i) {
    kept += probs[i];
    if (probs[i] > 0) last = i;
  }
  const double target = double(u) * kept;
  double running = 0;
  r.token = last;
  for (int64_t i = 0; i < V; ++i) {
    running += probs[i];
    if (probs[i] > 0) r.margin = std::min(r.margin, std::fabs(running - target) / kept);
    if (running > target) {
      r.token = i;
      break;
    }
  }
  r.probs = probs;
  return r;
}

template <class T>
void run_sample(const std::vector<double>& logits_d, int64_t rows, int64_t V, bool cfg, float cfg_scale, float temperature,
                int64_t top_k, float top_p, std::vector<float> uniform, const char* what, int pad = 0) {
  ++ncases;
  const int64_t P = cfg ? rows / 2 : rows, stride = V + pad;
  std::vector<T> logits(rows * stride + 8, fromd<T>(NAN));  // padding and tail NaN: reading them shows
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < V; ++i) logits[r * stride + i] = fromd<T>(logits_d[r * V + i]);
  std::vector<int64_t> tokens(P + 1, -7);
  std::vector<int32_t> status(P + 1, -7);
  SampleParams p;
  p.rows = P, p.vocab = V, p.dtype = dtype_of<T>(), p.logits = logits.data(), p.row_stride = stride, p.cfg = cfg;
  p.cfg_scale = cfg_scale, p.temperature = temperature, p.top_k = top_k, p.top_p = top_p;
  p.uniform = uniform.data(), p.tokens = tokens.data(), p.status = status.data();
  char cfgs[200];
  std::snprintf(cfgs, sizeof cfgs, "sample %s [%s] P=%ld V=%ld cfg=%d t=%g k=%ld p=%g", tname<T>(), what, (long)P,
                (long)V, (int)cfg, temperature, (long)top_k, top_p);
  emu::launches.clear();
  if (cuda::sample(p, nullptr) != cudaSuccess) return fail(std::string("launch ") + cfgs);
  // The launch follows the plan: clusters, or one block per row with the row staged in V floats
  // of dynamic shared memory where the block may opt in to them, else re-read.
  const auto plan = cuda::decodek::sample_plan<T>(P, V);
  const size_t padded = size_t((V + 7) / 8 * 8) * sizeof(float);  // whole draw segments of 8
  const size_t stage = padded <= size_t(emu::max_shared_optin) ? padded : 0;
  if (plan.cluster_blocks == 1 && plan.smem != stage)
    return fail(std::string("staging (dynamic shared memory ") + std::to_string(stage) + " B expected) " + cfgs);
  const bool clustered = plan.cluster_blocks > 1;
  if (emu::launches.size() != 1 || emu::launches[0].smem != plan.smem ||
      emu::launches[0].cluster_blocks != plan.cluster_blocks ||
      (std::strstr(emu::launches[0].kernel, "cluster") != nullptr) != clustered)
    return fail(std::string("the launch is not the plan's ") + cfgs);
  if (tokens[P] != -7 || status[P] != -7) fail(std::string("wrote past the outputs ") + cfgs);
  // Another way to run it, in another random schedule, gives the same integers (so it is also
  // run-to-run identical): one block per row, and clusters of 2, 3 or 4 blocks, in turn from case
  // to case (slices of a few indices for tiny rows, empty slices past V).
  static unsigned turn = 0;
  std::vector<cuda::decodek::SamplePlan> others;
  if (clustered) {
    cuda::decodek::SamplePlan one;
    one.slice = V, one.smem = stage;
    others.push_back(one);
  }
  const unsigned blocks = 2 + turn++ % 3;
  const auto forced = cuda::decodek::sample_cluster_plan(V, blocks);
  // (a forced plan, as sample_plan's own: within the device's shared memory, which a case shrinks)
  if (blocks != plan.cluster_blocks && forced.smem <= size_t(emu::max_shared_optin)) others.push_back(forced);
  for (const auto& other : others) {
    std::vector<int64_t> tokens3(P + 1, -7);
    std::vector<int32_t> status3(P + 1, -7);
    p.tokens = tokens3.data(), p.status = status3.data();
    if (cuda::decodek::launch_sample_plan<T>(p, other, nullptr) != cudaSuccess) return fail(std::string("launch ") + cfgs);
    if (tokens3 != tokens || status3 != status)
      fail(std::string("in clusters of ") + std::to_string(other.cluster_blocks) + " blocks, not the same tokens " + cfgs);
    if (tokens3[P] != -7 || status3[P] != -7) fail(std::string("wrote past the outputs ") + cfgs);
  }
  for (int64_t r = 0; r < P; ++r) {
    const SampleRef ref = sample_reference(logits.data() + r * stride, cfg ? logits.data() + (P + r) * stride : (T*)nullptr,
                                           cfg_scale, V, temperature, top_k, top_p, uniform[r]);
    char msg[300];
    std::snprintf(msg, sizeof msg, "%s row %ld: got token %ld status %d, want %ld status %d (margin %.2g)", cfgs,
                  (long)r, (long)tokens[r], status[r], (long)ref.token, ref.status, ref.margin);
    if (tokens[r] < 0 || tokens[r] >= V) { fail(std::string("token out of range: ") + msg); continue; }
    if (status[r] != ref.status) { fail(msg); continue; }
    if (tokens[r] == ref.token) continue;
    const bool kept = ref.probs.empty() || ref.probs[tokens[r]] > 0;
    if (!kept || ref.margin > 1e-5) fail(msg);
    else std::printf("note (rounding case accepted): %s\n", msg);
  }
}

template <class T>
void sample_suite(int level) {
  // Hand-made rows.
  {  // greedy with ties (first index), a -inf entry; temperature 0 ignores top-k / top-p
    const int64_t V = 11;
    std::vector<double> l(3 * V, 0.0);
    for (int64_t i = 0; i < V; ++i) l[i] = -double(i % 4), l[V + i] = 0.5, l[2 * V + i] = double(i) * 0.1;
    l[7] = 0.0;                  // row 0: ties of 0 at 0, 4, 7, 8: token 0
    l[V + 9] = 2, l[V + 3] = 2;  // row 1: ties at 3 and 9: token 3
    l[2 * V + 10] = -INFINITY;   // row 2: max at 9
    run_sample<T>(l, 3, V, false, 1, 0.0f, 3, 0.5f, {0.3f, 0.9f, 0.99f}, "greedy ties");
  }
  {  // top-k with ties at the k-th value: x = [1, 3, 3, 2, 3, 0, 3, 2]; k = 2 keeps the four 3s
    const int64_t V = 8;
    const double row[V] = {1, 3, 3, 2, 3, 0, 3, 2};
    std::vector<double> l;
    std::vector<float> us = {0.0f, 0.1f, 0.26f, 0.49f, 0.51f, 0.74f, 0.76f, 0.999f, std::nextafter(1.0f, 0.0f)};
    for (size_t r = 0; r < us.size(); ++r) l.insert(l.end(), row, row + V);
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 2, 1.0f, us, "top-k ties");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 5, 1.0f, us, "top-k ties 5");  // 3s and both 2s kept
    run_sample<T>(l, us.size(), V, false, 1, 0.7f, 1, 1.0f, us, "top-k 1");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 7, 1.0f, us, "top-k V-1");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 8, 1.0f, us, "top-k V");
  }
  {  // top-p: probabilities 0.4, 0.3, 0.2, 0.1 (scrambled); masses above: 0, 0.4, 0.7, 0.9
    const int64_t V = 6;
    const double row[V] = {std::log(0.2), std::log(0.4), -INFINITY, std::log(0.1), std::log(0.3), -INFINITY};
    std::vector<double> l;
    std::vector<float> us;
    for (int r = 0; r < 12; ++r) l.insert(l.end(), row, row + V), us.push_back((r + 0.5f) / 12);
    us.back() = std::nextafter(1.0f, 0.0f);
    for (float tp : {0.0f, 0.2f, 0.39f, 0.41f, 0.65f, 0.75f, 0.95f, 1.0f})
      run_sample<T>(l, us.size(), V, false, 1, 1.0f, 0, tp, us, "top-p boundary");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 3, 0.75f, us, "top-k then top-p");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 2, 0.5f, us, "top-k then top-p 2");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 3, 0.95f, us, "top-k then top-p 3");  // keeps the k-th
  }
  {  // a tie group crossing the threshold: 0.3, 0.3, 0.3, 0.1 -> top_p 0.5 keeps the three 0.3s
    const int64_t V = 4;
    const double row[V] = {std::log(0.3), std::log(0.1), std::log(0.3), std::log(0.3)};
    std::vector<double> l;
    std::vector<float> us;
    for (int r = 0; r < 8; ++r) l.insert(l.end(), row, row + V), us.push_back((r + 0.25f) / 8);
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 0, 0.5f, us, "top-p tie group");
    run_sample<T>(l, us.size(), V, false, 1, 1.0f, 0, 0.0f, us, "top-p 0 ties");
  }
  {  // invalid rows: NaN, +inf, all -inf; a valid row with -inf entries and an underflowing one
    const int64_t V = 37;
    std::vector<double> l(5 * V);
    for (auto& x : l) x = urand(-3, 3);
    l[0 * V + 5] = NAN;
    l[1 * V + 36] = INFINITY;
    for (int64_t i = 0; i < V; ++i) l[2 * V + i] = -INFINITY;
    for (int64_t i = 0; i < V; i += 2) l[3 * V + i] = -INFINITY;
    l[4 * V + 3] = -200;
    for (float t : {0.0f, 1.0f})
      run_sample<T>(l, 5, V, false, 1, t, 4, 0.9f, {0.5f, 0.5f, 0.5f, std::nextafter(1.0f, 0.0f), 0.0f}, "invalid rows");
  }
  {  // CFG: rows [0, P) conditional, [P, 2P) unconditional; one pair mixes into a NaN (inf - inf)
    const int64_t V = 301, P = 4;
    std::vector<double> l(2 * P * V);
    for (auto& x : l) x = urand(-4, 4);
    l[3 * V + 7] = INFINITY, l[(P + 3) * V + 7] = INFINITY;  // pair 3: u + s (inf - inf) = NaN
    std::vector<float> us = {0.1f, 0.5f, 0.9f, 0.3f};
    run_sample<T>(l, 2 * P, V, true, 3.0f, 1.0f, 0, 1.0f, us, "cfg");
    run_sample<T>(l, 2 * P, V, true, 1.5f, 0.8f, 50, 0.9f, us, "cfg top-k top-p");
    run_sample<T>(l, 2 * P, V, true, 3.0f, 0.0f, 0, 1.0f, us, "cfg greedy");
  }
  {  // a narrow range with many ties: most keys share their top 16 bits, so whole warps fall into
     // one histogram bin (the peer sums' full groups) in the first passes
    const int64_t V = 3001, P = 4;
    std::vector<double> l(P * V);
    for (auto& x : l) x = 1.0 + std::floor(urand(0, 40)) / 1024;
    std::vector<float> us = {0.05f, 0.5f, 0.77f, std::nextafter(1.0f, 0.0f)};
    run_sample<T>(l, P, V, false, 1, 1.0f, 700, 1.0f, us, "narrow top-k");
    run_sample<T>(l, P, V, false, 1, 0.02f, 0, 0.6f, us, "narrow top-p");
    run_sample<T>(l, P, V, false, 1, 0.01f, 2000, 0.3f, us, "narrow top-k top-p");
  }
  // Random rows: several chunks of the draw, padded rows, temperatures, filters.
  const int64_t V = level >= 1 ? 5003 : 2500, P = 6;
  std::vector<double> l(P * V);
  for (auto& x : l) x = urand(-6, 6);
  std::vector<float> us;
  for (int64_t r = 0; r < P; ++r) us.push_back(static_cast<float>(urand(0, 1)));
  us[P - 1] = std::nextafter(1.0f, 0.0f);
  us[0] = 0.0f;
  run_sample<T>(l, P, V, false, 1, 1.0f, 0, 1.0f, us, "random", 5);
  run_sample<T>(l, P, V, false, 1, 0.3f, 0, 0.9f, us, "random top-p");
  run_sample<T>(l, P, V, false, 1, 2.0f, 100, 1.0f, us, "random top-k");
  run_sample<T>(l, P, V, false, 1, 1.0f, 1000, 0.8f, us, "random top-k top-p", 3);
  run_sample<T>(l, P, V, false, 1, 0.05f, 0, 0.5f, us, "random cold");
  if (level >= 1) run_sample<T>(l, P, V, false, 1, 5.0f, 4000, 0.99f, us, "random hot");
}

// warp_sum_peers: groups of lanes sharing a key (one group of 32, singletons, a few keys) get
// their exact sums in the group's lowest lane, for 64-bit integers and doubles.
template <class V>
void run_warp_sum_peers(int distinct, const char* what) {
  ++ncases;
  std::vector<unsigned> keys(256);
  std::vector<V> vals(256), got(256);
  for (int t = 0; t < 256; ++t) {
    keys[t] = distinct >= 32 ? t : static_cast<unsigned>(grng() % distinct);
    vals[t] = static_cast<V>(grng() % (1u << 30)) * (std::is_same<V, double>::value ? V(0.25) : V(1u << 20));
  }
  emu::run([&] {
    const unsigned peers = __match_any_sync(0xffffffffu, keys[threadIdx.x]);
    got[threadIdx.x] = cuda::warp_sum_peers(peers, vals[threadIdx.x]);
  });
  for (int t = 0; t < 256; ++t) {
    const int w0 = t & ~31;
    bool leader = true;
    V want = 0;
    for (int l = w0; l < w0 + 32; ++l) {
      if (keys[l] != keys[t]) continue;
      if (l < t) leader = false;
      want += vals[l];
    }
    if (leader && got[t] != want) return fail(std::string("warp_sum_peers ") + what + " lane " + std::to_string(t));
  }
}

template <class T>
void attention_suite(int level) {
  const int64_t T1 = 300;
  // Sq 1 / 3 / 16, GQA groups 1 / 2 / 4 / 8, D 64 / 128 / 256 and odd D, many splits and one split.
  run_attention<T>(2, 1, 4, 4, 64, T1, {300, 1}, 0, 0.0f, 132);       // MHA, lengths T_max and 1, many splits
  run_attention<T>(2, 1, 4, 4, 64, T1, {300, 1}, 0, 0.0f, 1);         // one split
  run_attention<T>(2, 3, 8, 2, 40, T1, {77, 300}, 0, 0.0f, 132, 1);   // odd D, G = 4, Sq = 3, transposed q / out
  run_attention<T>(1, 16, 8, 1, 128, 200, {200}, 0, 0.0f, 132);      // G = 8, Sq = 16: 8 row tiles
  run_attention<T>(3, 1, 16, 2, 256, 150, {150, 64, 3}, 0, 0.0f, 2);  // D = 256, G = 8
  run_attention<T>(2, 2, 4, 2, 64, T1, {250, 2}, 37, 0.0f, 132);      // window
  run_attention<T>(2, 1, 2, 1, 64, T1, {300, 129}, 0, 5.0f, 132);     // softcap, G = 2
  run_attention<T>(2, 3, 4, 2, 33, T1, {299, 5}, 20, 2.0f, 1);        // window + softcap, one split
  // Lengths outside [Sq, T_max]: NaN rows; the others exact; Sq = 3 with a row of length 2.
  run_attention<T>(4, 3, 4, 2, 64, 100, {-5, 2, 101, 100}, 0, 0.0f, 132);
  run_attention<T>(3, 1, 2, 2, 16, 100, {0, 50, 1000}, 0, 0.0f, 1);
  // Unpadded caches: rows 16-byte aligned whenever D * sizeof(T) is a multiple of 16, so the
  // K / V tiles are staged with 16-byte loads (D = 64, 256, and 40 for 2- and 8-byte types;
  // D = 36 for 4-byte ones), else one element at a time (D = 33).
  run_attention<T>(2, 1, 4, 4, 64, T1, {300, 1}, 0, 0.0f, 132, 0, 0);
  run_attention<T>(3, 1, 16, 2, 256, 150, {150, 64, 3}, 0, 0.0f, 2, 0, 0);
  run_attention<T>(2, 3, 8, 2, 40, T1, {77, 300}, 25, 3.0f, 1, 1, 0);
  run_attention<T>(2, 2, 4, 2, 36, 90, {90, 40}, 0, 0.0f, 132, 0, 0);
  run_attention<T>(2, 2, 4, 2, 33, 90, {90, 40}, 0, 0.0f, 132, 0, 0);
  // The stream kernel's shapes (16-bit, aligned rows, D 64 / 128 / 256, G x Sq <= 4 in items of up
  // to 2 rows): Liquid's MHA D = 256 with many splits and one; D = 128 with window and softcap;
  // Llama-3's G = 4 (two row tiles); G = 2; Sq = 2; G x Sq = 3 (a row tile of 1); transposed q /
  // out, a NaN row, a length-1 row.
  run_attention<T>(2, 1, 4, 4, 256, 200, {200, 77}, 0, 0.0f, 132, 0, 0);
  run_attention<T>(2, 1, 4, 4, 256, 200, {200, 77}, 0, 0.0f, 1, 0, 0);
  run_attention<T>(2, 1, 4, 4, 128, T1, {300, 5}, 50, 20.0f, 132, 0, 0);
  run_attention<T>(2, 1, 8, 2, 128, T1, {300, 5}, 50, 20.0f, 132, 0, 0);
  run_attention<T>(3, 1, 6, 3, 64, 150, {150, 1, 400}, 0, 0.0f, 2, 1, 0);
  run_attention<T>(1, 2, 2, 2, 128, 100, {60}, 7, 0.0f, 132, 1, 0);
  run_attention<T>(2, 3, 2, 2, 64, 100, {100, 3}, 0, 0.0f, 1, 0, 0);
  run_attention<T>(2, 1, 8, 2, 64, 120, {120, 90}, 0, 0.0f, 1, 0, 0);
  // two-row items over several splits (both rows' partials and the combine), D = 256 with two
  // rows, a window over several splits
  run_attention<T>(2, 1, 4, 2, 128, T1, {300, 77}, 0, 0.0f, 132, 0, 0);
  run_attention<T>(2, 1, 8, 4, 256, T1, {300, 5}, 0, 0.0f, 132, 0, 0);
  run_attention<T>(1, 2, 2, 2, 128, T1, {300}, 200, 0.0f, 132, 1, 0);
  // A NaN key alone among the visible keys of its split / key tile (window 1), and among others:
  // softmax gives NaN (the CPU kernel's max once skipped it), on the tiled and the stream kernels.
  run_attention<T>(2, 1, 4, 4, 64, T1, {300, 5}, 1, 0.0f, 132, 0, 0, 299);
  run_attention<T>(2, 1, 4, 4, 40, T1, {300, 5}, 1, 0.0f, 132, 0, 1, 299);
  run_attention<T>(2, 1, 4, 4, 64, T1, {300, 5}, 0, 0.0f, 132, 0, 0, 17);
  run_attention<T>(2, 1, 4, 4, 40, T1, {300, 5}, 0, 0.0f, 1, 0, 1, 299);
  if (level >= 1) {
    run_attention<T>(1, 1, 8, 8, 128, 700, {700}, 0, 0.0f, 132);
    run_attention<T>(2, 4, 4, 4, 256, 260, {260, 40}, 100, 30.0f, 132);
    run_attention<T>(1, 16, 16, 2, 96, 100, {57}, 0, 0.0f, 4);
  }
}

template <class T>
void run_all(int level, bool attention_only) {
  if (!attention_only) {
    run_append<T>(4, 2, 7, 2, 5, {0, 5, 6, -1}, 0);
    run_append<T>(3, 3, 9, 3, 64, {6, 0, 7}, 1);
    run_append<T>(2, 1, 4, 1, 1, {3, 4}, 0);
  }
  attention_suite<T>(level);
  if (!attention_only) sample_suite<T>(level);
}

// test_decode_emulated [level] [attention]: "attention" runs only decode_attention's cases (the
// A/B switches of the ctest variants change no other kernel).
int main(int argc, char** argv) {
  const int level = argc > 1 ? std::atoi(argv[1]) : 0;
  const bool attention_only = argc > 2 && std::strcmp(argv[2], "attention") == 0;
  {  // D > 256 and bad shapes are refused
    DecodeAttentionParams p;
    p.batch = 1, p.queries = 1, p.heads = 1, p.kv_heads = 1, p.head_dim = 257, p.max_tokens = 4;
    int32_t len = 1;
    float buf[8];
    p.q.data = p.out.data = p.k_cache.data = p.v_cache.data = buf;
    p.cache_seqlens = &len;
    if (cuda::decode_attention(p, nullptr) != cudaErrorInvalidValue) fail("D = 257 accepted");
    p.head_dim = 4, p.heads = 3, p.kv_heads = 2;
    if (cuda::decode_attention(p, nullptr) != cudaErrorInvalidValue) fail("H % H_kv != 0 accepted");
  }
  {  // the split count: one wave of resident blocks where it fits, never more than two waves
    const struct { int64_t tiles, slots, max_splits, splits; } plans[] = {
        {128, 396, 64, 3}, {200, 396, 64, 3}, {16, 396, 16, 16}, {8, 132, 4, 4},
        {500, 396, 64, 1}, {396, 396, 64, 1}, {1, 1, 5, 1}, {128, 396, 2, 2}, {0, 0, 0, 1}};
    for (const auto& c : plans) {
      const int64_t got = cuda::decodek::attention_splits(c.tiles, c.slots, c.max_splits);
      if (got != c.splits)
        fail("attention_splits(" + std::to_string(c.tiles) + ", " + std::to_string(c.slots) + ", " +
             std::to_string(c.max_splits) + ") = " + std::to_string(got) + ", expected " + std::to_string(c.splits));
    }
  }
  {  // the sampler's plan: clusters of up to 16 blocks while rows x blocks fit the SMs and every
     // block keeps 512 indices, the largest cluster the device holds; else one block per row (the
     // fit is remembered per size and shared memory: each case has its own V)
    const bool on = cuda::decodek::sample_clusters_enabled();
    const int major = emu::compute_major, most = emu::max_cluster_blocks, optin = emu::max_shared_optin;
    const struct { int64_t rows, V; int major, most, optin; unsigned blocks; } plans[] = {
        {4, 8192, 9, 16, 232448, 16}, {4, 8200, 9, 4, 232448, 4}, {9, 8192, 9, 16, 232448, 8},
        {4, 4000, 9, 16, 232448, 4},  {100, 8192, 9, 16, 232448, 1}, {4, 8192, 8, 16, 232448, 1},
        {4, 264192, 9, 16, 232448, 16}, {4, 8192, 9, 16, 1024, 1}, {1, 1000, 9, 16, 232448, 1},
        {4, 264192, 9, 16, 48 * 1024, 1}};
    for (const auto& c : plans) {
      emu::compute_major = c.major, emu::max_cluster_blocks = c.most, emu::max_shared_optin = c.optin;
      const auto plan = cuda::decodek::sample_plan<float>(c.rows, c.V);
      const unsigned want = on ? c.blocks : 1u;
      const bool slices = plan.cluster_blocks == 1 ? plan.slice == c.V
                                                   : plan.slice * plan.cluster_blocks >= c.V && plan.slice % 8 == 0;
      if (plan.cluster_blocks != want || !slices)
        fail("sample_plan(" + std::to_string(c.rows) + ", " + std::to_string(c.V) + ") on sm_" +
             std::to_string(c.major) + "0 with clusters of up to " + std::to_string(c.most) + ": " +
             std::to_string(plan.cluster_blocks) + " blocks, expected " + std::to_string(want));
    }
    emu::compute_major = major, emu::max_cluster_blocks = most, emu::max_shared_optin = optin;
  }
  for (int distinct : {1, 2, 5, 32}) {
    run_warp_sum_peers<unsigned long long>(distinct, "u64");
    run_warp_sum_peers<double>(distinct, "f64");
  }
  run_all<float>(level, attention_only);
  run_all<double>(level, attention_only);
  run_all<__half>(level, attention_only);
  run_all<__nv_bfloat16>(level, attention_only);
  if (!attention_only) {  // Liquid's sampler in the H200's plan: clusters of 16 blocks of 512 indices
    const int most = emu::max_cluster_blocks, sms = emu::sms;
    emu::max_cluster_blocks = 16, emu::sms = 132;
    const int64_t V = 8192, P = 4;
    std::vector<double> l(2 * P * V);
    for (auto& x : l) x = urand(-8, 8);
    std::vector<float> us = {0.0f, 0.37f, 0.81f, std::nextafter(1.0f, 0.0f)};
    if (cuda::decodek::sample_plan<float>(P, V).cluster_blocks != (cuda::decodek::sample_clusters_enabled() ? 16u : 1u))
      fail("Liquid's sampler shape does not take clusters of 16");
    run_sample<float>(l, 2 * P, V, true, 3.0f, 0.9f, 4096, 0.96f, us, "liquid clusters of 16");
    emu::max_cluster_blocks = most, emu::sms = sms;
  }
  if (!attention_only) {  // the sampler without staging (a block granted too little shared memory): every pass re-reads
    const int optin = emu::max_shared_optin;
    emu::max_shared_optin = 1024;  // rows of up to 256 logits staged
    sample_suite<float>(0);
    sample_suite<__nv_bfloat16>(0);
    emu::max_shared_optin = optin;
  }
  std::printf("%s: %d failures in %d cases\n", nfail ? "FAILED" : "passed", nfail, ncases);
  return nfail ? 1 : 0;
}
