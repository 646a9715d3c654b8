// The CUDA masked-channel kernels (masked_conv2d, masked_linear as a 1x1 conv, masked_group_norm)
// run on the host under emulator.h and are checked against a float64 reference: every dtype
// (fp16 / bf16 through the emulated TF32 tensor cores, the packed path's mma.sync and wgmma, and
// through SIMT), stride 1 and 2,
// padding, dilation, 1x1 / 3x3 / 2x3 kernels, odd channel counts (Cin = 13, C = 30 in groups of
// 10), several channel and pixel tiles (a tile straddling the kept count), masks keeping
// nothing / everything / whole groups / random channels, per-code and shared (code stride 0)
// weights and affine, no bias, int32 and int64 codes, codes outside [0, K) (NaN), x read
// through channels-last, transposed and gapped strides, y written through gapped strides.
// Masked input channels of x and masked weights hold NaN (never read); every element of x's
// and y's buffers outside the logical tensor is poisoned (x: NaN, so a read shows; y: a
// sentinel that must survive, so a write out of bounds shows).
// Argument: 0 (quick), >= 1 (+ a larger conv with several tiles in every dimension).
#include "emulator.h"
#include "test_support.h"
#include "mmfast/cuda/pruned.cuh"

#include <cmath>
#include <cstring>
#include <memory>
#include <string>

using namespace mmfast;

std::mt19937 grng(7);

constexpr double kPoison = 777.0;

// Rounding unit of the storage type (output rounding) and of the accumulator.
template <class T> double out_eps() { return std::is_same<T, double>::value ? 1.2e-16 : std::is_same<T, float>::value ? 6e-8 : std::is_same<T, __half>::value ? 4.9e-4 : 3.9e-3; }
template <class T> double acc_eps() { return std::is_same<T, double>::value ? 1.2e-16 : 6e-8; }

// A 4-D strided buffer: element (a, b, c, d) at s[0]a + s[1]b + s[2]c + s[3]d, every other
// element of the allocation holding `poison`.
template <class T> struct Strided {
  int64_t n[4], s[4];
  std::vector<T> data;
  std::vector<char> logical;
  Strided(const int64_t (&sizes)[4], const int64_t (&strides)[4], double poison) {
    int64_t span = 1;
    for (int d = 0; d < 4; ++d) {
      n[d] = sizes[d];
      s[d] = strides[d];
      if (n[d] > 0) span += (n[d] - 1) * s[d];
    }
    data.assign(span + 5, fromd<T>(poison));  // guard elements past the end too
    logical.assign(data.size(), 0);
    for (int64_t a = 0; a < n[0]; ++a)
      for (int64_t b = 0; b < n[1]; ++b)
        for (int64_t c = 0; c < n[2]; ++c)
          for (int64_t d = 0; d < n[3]; ++d) logical[off(a, b, c, d)] = 1;
  }
  int64_t off(int64_t a, int64_t b, int64_t c, int64_t d) const { return a * s[0] + b * s[1] + c * s[2] + d * s[3]; }
  T& at(int64_t a, int64_t b, int64_t c, int64_t d) { return data[off(a, b, c, d)]; }
};

enum class XLayout { kContiguous, kChannelsLast, kGapped };

struct ConvCase {
  const char* name;
  int64_t B, Cin, Cout, H, W, kh, kw, sh, sw, ph, pw, dh, dw, K;
  bool shared_weight, has_bias, shared_bias, int32_codes;
  XLayout layout;
  std::vector<int64_t> codes;  // B entries, may be out of [0, K)
  int mask_mode;  // 0 random; 1 code 0 keeps no input but every output, code 1 every input but no
                  // output, the rest random; 2 whole groups of 10; 4 random keeping 95%
  bool linear = false;         // x (B, N=H, Cin), y (B, N, Cout) through the (B, C, N, 1) views
  bool linear_transposed_x = false;
  bool inf_input = false;      // +Inf at pixel (0, 0) of sample 0's first kept input channel
  int workspace_shift = 0;     // bytes past 16-byte alignment (not 0: the tiled kernel runs)
  int sms = 132;               // the emulated device's SMs (1 resident block each): few tiles for
                               // many SMs split each tile's reduction on the packed path
  bool split = false;          // whether the packed path splits (checked)
  bool null_x = false;         // x's pointer null, as torch's for an empty (H or W = 0) input
};

std::vector<char> make_masks(int64_t K, int64_t C, int mode, double keep) {
  std::vector<char> m(K * C);
  std::bernoulli_distribution coin(keep);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      if (mode == 1 && k == 0) m[k * C + c] = 0;
      else if (mode == 1 && k == 1) m[k * C + c] = 1;
      else if (mode == 3 && k == 0) m[k * C + c] = 1;
      else if (mode == 3 && k == 1) m[k * C + c] = 0;
      else if (mode == 4) m[k * C + c] = coin(grng) || coin(grng) || coin(grng);
      else if (mode == 2) m[k * C + c] = ((c / 10 + k) % 3) != 0;  // whole groups of 10
      else m[k * C + c] = coin(grng);
    }
  }
  return m;
}

// Whether the last masked_conv2d launched a kernel whose name starts with `prefix` (a name the
// launch put in parentheses, for its template arguments' commas, counts without them).
bool launched(const char* prefix) {
  for (const auto& l : emu::launches)
    if (std::strncmp(l.kernel + (l.kernel[0] == '('), prefix, std::strlen(prefix)) == 0) return true;
  return false;
}

// The dynamic shared memory of the last masked_conv_async_kernel launch (its ring: the wgmma
// one's or the mma.sync one's).
size_t conv_async_smem() {
  for (const auto& l : emu::launches)
    if (std::strstr(l.kernel, "masked_conv_async_kernel") != nullptr) return l.smem;
  return 0;
}

template <class T>
void run_conv_on_device(const ConvCase& cc) {
  const int64_t B = cc.B, Cin = cc.Cin, Cout = cc.Cout, K = cc.K, taps = cc.kh * cc.kw;
  const int64_t Ho = (cc.H + 2 * cc.ph - cc.dh * (cc.kh - 1) - 1) / cc.sh + 1;
  const int64_t Wo = (cc.W + 2 * cc.pw - cc.dw * (cc.kw - 1) - 1) / cc.sw + 1;
  std::string cfg = std::string(cc.name) + " T=" + dtype_name(dtype_of<T>()) +
                    " tc=" + std::to_string(emu::compute_major >= 8) + " sms=" + std::to_string(emu::sms);
  std::normal_distribution<double> normal;
  const auto in_mask = make_masks(K, Cin, cc.mask_mode, 0.6);
  const auto out_mask = make_masks(K, Cout, cc.mask_mode == 1 ? 3 : cc.mask_mode, 0.7);
  auto code_ok = [&](int64_t c) { return c >= 0 && c < K; };

  // x, logical (B, Cin, H, W)
  int64_t xs[4];
  if (cc.linear) {  // storage (B, N, Cin) or (B, Cin, N) transposed; logical view (B, Cin, N, 1)
    const int64_t N = cc.H;
    if (cc.linear_transposed_x) { xs[0] = Cin * N; xs[1] = N; xs[2] = 1; xs[3] = 0; }
    else { xs[0] = N * Cin; xs[1] = 1; xs[2] = Cin; xs[3] = 0; }
  } else if (cc.layout == XLayout::kChannelsLast) {
    xs[0] = cc.H * cc.W * Cin; xs[1] = 1; xs[2] = cc.W * Cin; xs[3] = Cin;
  } else if (cc.layout == XLayout::kGapped) {
    xs[3] = 2; xs[2] = 2 * cc.W + 3; xs[1] = xs[2] * cc.H + 1; xs[0] = xs[1] * Cin + 7;
  } else {
    xs[3] = 1; xs[2] = cc.W; xs[1] = cc.H * cc.W; xs[0] = Cin * cc.H * cc.W;
  }
  const int64_t xn[4] = {B, Cin, cc.H, cc.W};
  Strided<T> x(xn, xs, NAN);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Cin; ++i)
      for (int64_t h = 0; h < cc.H; ++h)
        for (int64_t w = 0; w < cc.W; ++w) {
          const bool masked = code_ok(cc.codes[b]) && !in_mask[cc.codes[b] * Cin + i];
          x.at(b, i, h, w) = fromd<T>(masked ? NAN : normal(grng));  // masked inputs: never read
        }
  if (cc.inf_input && code_ok(cc.codes[0]))
    for (int64_t i = 0; i < Cin; ++i)
      if (in_mask[cc.codes[0] * Cin + i]) {
        x.at(0, i, 0, 0) = fromd<T>(INFINITY);
        break;
      }

  // weight (K | 1, Cout, Cin, kh, kw), bias (K | 1, Cout)
  const int64_t wsets = cc.shared_weight ? 1 : K, bsets = cc.shared_bias ? 1 : K;
  const int64_t wblock = Cout * Cin * taps;
  std::vector<T> weight(wsets * wblock + 3, fromd<T>(NAN));
  for (int64_t k = 0; k < wsets; ++k)
    for (int64_t o = 0; o < Cout; ++o)
      for (int64_t i = 0; i < Cin; ++i)
        for (int64_t t = 0; t < taps; ++t) {
          const bool masked = !cc.shared_weight && !(out_mask[k * Cout + o] && in_mask[k * Cin + i]);
          weight[k * wblock + (o * Cin + i) * taps + t] = fromd<T>(masked ? NAN : normal(grng) / std::sqrt(double(Cin * taps)));
        }
  std::vector<T> bias(bsets * Cout + 3, fromd<T>(NAN));
  for (int64_t k = 0; k < bsets; ++k)
    for (int64_t o = 0; o < Cout; ++o)
      if (cc.shared_bias || out_mask[k * Cout + o]) bias[k * Cout + o] = fromd<T>(normal(grng));

  // y, logical (B, Cout, Ho, Wo): gapped strides (conv) or the linear view of (B, N, Cout)
  int64_t ys[4];
  if (cc.linear) { ys[0] = Ho * Cout; ys[1] = 1; ys[2] = Cout; ys[3] = 0; }
  else { ys[3] = 1; ys[2] = Wo + 2; ys[1] = ys[2] * Ho + 3; ys[0] = ys[1] * Cout + 5; }
  const int64_t yn[4] = {B, Cout, Ho, Wo};
  Strided<T> y(yn, ys, kPoison);

  std::vector<int64_t> codes64(cc.codes.begin(), cc.codes.end());
  std::vector<int32_t> codes32(cc.codes.begin(), cc.codes.end());
  std::unique_ptr<bool[]> in_arr(new bool[K * Cin + 1]), out_arr(new bool[K * Cout + 1]);
  for (int64_t e = 0; e < K * Cin; ++e) in_arr[e] = in_mask[e];
  for (int64_t e = 0; e < K * Cout; ++e) out_arr[e] = out_mask[e];

  MaskedConvParams p;
  p.batch = B, p.in_channels = Cin, p.out_channels = Cout, p.height = cc.H, p.width = cc.W;
  p.out_height = Ho, p.out_width = Wo, p.kernel_h = cc.kh, p.kernel_w = cc.kw;
  p.stride_h = cc.sh, p.stride_w = cc.sw, p.pad_h = cc.ph, p.pad_w = cc.pw, p.dilation_h = cc.dh, p.dilation_w = cc.dw;
  p.dtype = dtype_of<T>();
  p.routing.num_codes = K;
  p.routing.sample_codes = cc.int32_codes ? static_cast<const void*>(codes32.data()) : codes64.data();
  p.routing.code_bytes = cc.int32_codes ? 4 : 8;
  p.routing.in_mask = in_arr.get();
  p.routing.out_mask = out_arr.get();
  p.x = cc.null_x ? nullptr : x.data.data();
  for (int d = 0; d < 4; ++d) p.x_strides[d] = xs[d], p.y_strides[d] = ys[d];
  p.weight = weight.data();
  p.weight_code_stride = cc.shared_weight ? 0 : wblock;
  p.bias = cc.has_bias ? bias.data() : nullptr;
  p.bias_code_stride = cc.shared_bias ? 0 : Cout;
  p.y = y.data.data();
  const size_t ws_bytes = cuda::masked_conv2d_workspace_bytes(p);
  if (ws_bytes == 0) return fail("workspace query " + cfg);
  std::vector<char> ws(ws_bytes + 64, 0x5a);
  char* ws_start = ws.data() + (16 - reinterpret_cast<uintptr_t>(ws.data()) % 16) % 16 + cc.workspace_shift;
  p.workspace = ws_start, p.workspace_bytes = ws_bytes;
  emu::launches.clear();
  if (cuda::masked_conv2d(p, nullptr) != cudaSuccess) return fail("launch " + cfg);
  const bool want_async = (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) &&
                          emu::compute_major >= 8 && cc.workspace_shift == 0 && emu::occupancy_blocks > 0;
  if (launched("masked_conv_async_kernel") != want_async || launched("masked_conv_kernel<") == want_async)
    fail("conv kernel choice " + cfg);
  if (launched("masked_conv_split_reduce_kernel") != (want_async && cc.split)) fail("split reduction choice " + cfg);
  if constexpr (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) {
    // sm_90: the wgmma multiplier (unless MMFAST_CUDA_WGMMA=0), else mma.sync
    const bool wgmma = emu::compute_major == 9 && cuda::wgmma_enabled();
    const size_t ring = wgmma ? cuda::NtWgmma::kSmemBytes<T> : cuda::NtMmaSync::kSmemBytes<T>;
    if (want_async && conv_async_smem() != ring) fail("conv multiplier choice " + cfg);
  }
  for (const char* c = ws_start + ws_bytes; c < ws.data() + ws.size(); ++c)
    if (*c != 0x5a) {
      fail("wrote past the workspace " + cfg);
      break;
    }

  if (want_async) {  // the static plan: every code's weights packed once, then a call that reads them
    std::vector<char> packed(cuda::masked_conv2d_packed_weight_bytes(p) + 16, 0x5a);
    void* dst = packed.data() + (16 - reinterpret_cast<uintptr_t>(packed.data()) % 16) % 16;
    MaskedConvParams pack = p;  // packed for a batch of one sample of code 0: every code is packed all the same
    const int64_t code0 = 0;
    pack.batch = 1, pack.routing.sample_codes = &code0, pack.routing.code_bytes = 8;
    if (cuda::masked_conv2d_pack_weights(pack, dst, nullptr) != cudaSuccess) return fail("pack weights " + cfg);
    Strided<T> y2(yn, ys, kPoison);
    MaskedConvParams p2 = p;
    p2.y = y2.data.data();
    p2.packed_weight = dst;
    const size_t ws2_bytes = cuda::masked_conv2d_workspace_bytes(p2);
    if (ws2_bytes >= ws_bytes && Cin > 0) fail("the workspace still holds the packed weights " + cfg);
    std::vector<char> ws2(ws2_bytes + 64, 0x5a);
    p2.workspace = ws2.data() + (16 - reinterpret_cast<uintptr_t>(ws2.data()) % 16) % 16;
    p2.workspace_bytes = ws2_bytes;
    emu::launches.clear();
    if (cuda::masked_conv2d(p2, nullptr) != cudaSuccess) return fail("launch with packed weights " + cfg);
    if (launched("masked_pack_weight_kernel") || !launched("masked_conv_async_kernel"))
      fail("kernels with packed weights " + cfg);
    if (std::memcmp(y.data.data(), y2.data.data(), y.data.size() * sizeof(T)) != 0)
      fail("packed weights give another y " + cfg);
  }

  int bad = 0, shown = 0;
  auto report = [&](const char* what, int64_t b, int64_t o, int64_t h, int64_t w, double got, double want) {
    if (shown++ < 5)
      std::printf("  %s b=%ld o=%ld h=%ld w=%ld got %.10g want %.10g\n", what, (long)b, (long)o, (long)h, (long)w, got,
                  want);
    ++bad;
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = cc.codes[b];
    const int64_t wk = cc.shared_weight ? 0 : c, bk = cc.shared_bias ? 0 : c;
    for (int64_t o = 0; o < Cout; ++o)
      for (int64_t ho = 0; ho < Ho; ++ho)
        for (int64_t wo = 0; wo < Wo; ++wo) {
          const double got = tod(y.at(b, o, ho, wo));
          if (!code_ok(c)) {
            if (!std::isnan(got)) report("invalid code not NaN", b, o, ho, wo, got, NAN);
            continue;
          }
          if (!out_mask[c * Cout + o]) {
            if (got != 0.0 || std::signbit(got)) report("masked output not 0", b, o, ho, wo, got, 0);
            continue;
          }
          double want = cc.has_bias ? tod(bias[bk * Cout + o]) : 0.0, mag = std::fabs(want);
          int64_t terms = 0;
          for (int64_t i = 0; i < Cin; ++i) {
            if (!in_mask[c * Cin + i]) continue;
            for (int64_t r = 0; r < cc.kh; ++r)
              for (int64_t s = 0; s < cc.kw; ++s) {
                ++terms;
                const int64_t h = ho * cc.sh - cc.ph + r * cc.dh, w = wo * cc.sw - cc.pw + s * cc.dw;
                if (h < 0 || h >= cc.H || w < 0 || w >= cc.W) continue;
                const double t = tod(weight[wk * wblock + (o * Cin + i) * taps + r * cc.kw + s]) * tod(x.at(b, i, h, w));
                want += t;
                mag += std::fabs(t);
              }
          }
          const double tol = acc_eps<T>() * (terms + 2) * mag + out_eps<T>() * std::fabs(want) + 1e-300;
          if (!std::isfinite(want)) {  // an infinite input: the same Inf, or NaN where +Inf meets -Inf
            if (!(got == want || (std::isnan(want) && std::isnan(got)))) report("non-finite", b, o, ho, wo, got, want);
          } else if (!(std::fabs(got - want) <= tol)) {
            report("value", b, o, ho, wo, got, want);
          }
        }
  }
  for (size_t e = 0; e < y.data.size(); ++e)
    if (!y.logical[e] && tod(y.data[e]) != tod(fromd<T>(kPoison))) {
      if (shown++ < 5) std::printf("  wrote outside y at %zu\n", e);
      ++bad;
    }
  if (bad) fail(std::to_string(bad) + " elements off: " + cfg);
}

template <class T>
void run_conv(const ConvCase& cc) {
  const int sms_before = emu::sms;
  emu::sms = cc.sms;
  run_conv_on_device<T>(cc);
  emu::sms = sms_before;
}

// ---- group norm ----------------------------------------------------------------------------
struct NormCase {
  const char* name;
  int64_t B, C, G, P, K;
  bool has_weight, has_bias, per_code_affine, silu, int32_codes;
  std::vector<int64_t> codes;
  int mask_mode;     // 0 random channels, 1 code 0 nothing / code 1 everything, 2 whole groups of 10
  double offset;     // added to x: a large mean tests the variance's cancellation
  int64_t shift = 0;  // elements x and y start past their buffers' (16-byte aligned) starts
};

template <class T>
void run_norm(const NormCase& nc) {
  const int64_t B = nc.B, C = nc.C, G = nc.G, P = nc.P, K = nc.K, per = C / G;
  const std::string cfg = std::string(nc.name) + " T=" + dtype_name(dtype_of<T>());
  std::normal_distribution<double> normal;
  const auto mask = make_masks(K, C, nc.mask_mode, 0.6);
  auto code_ok = [&](int64_t c) { return c >= 0 && c < K; };
  // x, y start `shift` elements into buffers operator new aligns to 16 bytes (x86-64 glibc).
  std::vector<T> x_buf(nc.shift + B * C * P + 5), y_buf(nc.shift + B * C * P + 5);
  if (reinterpret_cast<uintptr_t>(x_buf.data()) % 16 || reinterpret_cast<uintptr_t>(y_buf.data()) % 16)
    return fail("buffers not 16-byte aligned: " + cfg);
  T* x = x_buf.data() + nc.shift;
  T* y = y_buf.data() + nc.shift;
  for (int64_t e = 0; e < B * C * P + 5; ++e) x[e] = fromd<T>(NAN), y[e] = fromd<T>(kPoison);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t i = 0; i < P; ++i) {
        const bool masked = code_ok(nc.codes[b]) && !mask[nc.codes[b] * C + ch];
        x[(b * C + ch) * P + i] = fromd<T>(masked ? NAN : nc.offset + normal(grng) * (1 + ch % 3));
      }
  const int64_t sets = nc.per_code_affine ? K : 1;
  std::vector<T> weight(sets * C), bias(sets * C);
  for (auto& v : weight) v = fromd<T>(1 + 0.5 * normal(grng));
  for (auto& v : bias) v = fromd<T>(normal(grng));
  std::vector<int64_t> codes64(nc.codes.begin(), nc.codes.end());
  std::vector<int32_t> codes32(nc.codes.begin(), nc.codes.end());
  std::unique_ptr<bool[]> mask_arr(new bool[K * C]);
  for (int64_t e = 0; e < K * C; ++e) mask_arr[e] = mask[e];

  MaskedGroupNormParams p;
  p.batch = B, p.channels = C, p.groups = G, p.plane = P, p.dtype = dtype_of<T>();
  p.routing.num_codes = K;
  p.routing.sample_codes = nc.int32_codes ? static_cast<const void*>(codes32.data()) : codes64.data();
  p.routing.code_bytes = nc.int32_codes ? 4 : 8;
  p.routing.out_mask = mask_arr.get();
  p.x = x, p.y = y;
  p.weight = nc.has_weight ? weight.data() : nullptr;
  p.bias = nc.has_bias ? bias.data() : nullptr;
  p.affine_code_stride = nc.per_code_affine ? C : 0;
  p.eps = 1e-5;
  p.silu = nc.silu;
  if (cuda::masked_group_norm(p, nullptr) != cudaSuccess) return fail("launch " + cfg);

  int bad = 0, shown = 0;
  auto report = [&](const char* what, int64_t b, int64_t ch, int64_t i, double got, double want) {
    if (shown++ < 5) std::printf("  %s b=%ld c=%ld i=%ld got %.10g want %.10g\n", what, (long)b, (long)ch, (long)i, got, want);
    ++bad;
  };
  for (int64_t b = 0; b < B; ++b) {
    const int64_t code = nc.codes[b];
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, count = 0;
      if (code_ok(code))
        for (int64_t ch = g * per; ch < (g + 1) * per; ++ch)
          if (mask[code * C + ch])
            for (int64_t i = 0; i < P; ++i) sum += tod(x[(b * C + ch) * P + i]), ++count;
      const double mean = count ? sum / count : 0;
      double sq = 0;
      if (code_ok(code))
        for (int64_t ch = g * per; ch < (g + 1) * per; ++ch)
          if (mask[code * C + ch])
            for (int64_t i = 0; i < P; ++i) sq += (tod(x[(b * C + ch) * P + i]) - mean) * (tod(x[(b * C + ch) * P + i]) - mean);
      const double var = count ? sq / count : 0, rstd = 1 / std::sqrt(var + 1e-5);
      for (int64_t ch = g * per; ch < (g + 1) * per; ++ch)
        for (int64_t i = 0; i < P; ++i) {
          const double got = tod(y[(b * C + ch) * P + i]);
          if (!code_ok(code)) {
            if (!std::isnan(got)) report("invalid code not NaN", b, ch, i, got, NAN);
            continue;
          }
          if (!mask[code * C + ch]) {
            if (got != 0.0 || std::signbit(got)) report("masked channel not 0", b, ch, i, got, 0);
            continue;
          }
          const int64_t a = (nc.per_code_affine ? code * C : 0) + ch;
          const double w = nc.has_weight ? tod(weight[a]) : 1.0;
          double want = (tod(x[(b * C + ch) * P + i]) - mean) * rstd * w + (nc.has_bias ? tod(bias[a]) : 0.0);
          if (nc.silu) want = want / (1 + std::exp(-want));
          // fp32 statistics: the mean's error relative to the spread grows with |offset| / std
          const double stat = acc_eps<T>() * 64 * std::sqrt(count + 1) * (1 + std::fabs(mean) * rstd) * (std::fabs(w) + 1);
          const double tol = stat + 2 * out_eps<T>() * (std::fabs(want) + 1e-3);
          if (!(std::fabs(got - want) <= tol)) report("value", b, ch, i, got, want);
        }
    }
  }
  for (int64_t e = B * C * P; e < B * C * P + 5; ++e)
    if (tod(y[e]) != tod(fromd<T>(kPoison))) ++bad;
  if (bad) fail(std::to_string(bad) + " elements off: " + cfg);
}

template <class T>
void run_all(int level) {
  // name, B, Cin, Cout, H, W, kh, kw, sh, sw, ph, pw, dh, dw, K, shared_w, bias, shared_b, int32, layout, codes, mask
  run_conv<T>({"3x3 s1 p1 per-code", 4, 13, 30, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 3, false, true, false, false,
               XLayout::kContiguous, {2, 0, 1, 2}, 0});
  run_conv<T>({"3x3 s2 p1 shared weight+bias, channels-last, int32", 3, 13, 30, 9, 8, 3, 3, 2, 2, 1, 1, 1, 1, 3, true,
               true, true, true, XLayout::kChannelsLast, {1, 2, 0}, 0});
  run_conv<T>({"3x3 dil2 p2 no bias, gapped x, invalid codes, keep none / all", 5, 13, 30, 6, 6, 3, 3, 1, 1, 2, 2, 2, 2,
               3, false, false, false, false, XLayout::kGapped, {1, -1, 0, 3, 2}, 1});
  run_conv<T>({"2x3 s(2,1) p(0,1) d(1,2) groups of 10", 2, 20, 30, 7, 9, 2, 3, 2, 1, 0, 1, 1, 2, 3, false, true, false,
               false, XLayout::kContiguous, {0, 2}, 2});
  run_conv<T>({"1x1 Cin=Cout=70, 81 pixels: 2 channel and 2 pixel tiles", 2, 70, 70, 9, 9, 1, 1, 1, 1, 0, 0, 1, 1, 2,
               false, true, false, false, XLayout::kContiguous, {1, 0}, 4});
  ConvCase lin{"linear N=20 Cin=13 Cout=30 groups of 10", 3, 13, 30, 20, 1, 1, 1, 1, 1, 0, 0, 1, 1, 3, false, true,
               false, false, XLayout::kContiguous, {2, 0, 1}, 2};
  lin.linear = true;
  run_conv<T>(lin);
  ConvCase inf{"1x1 Cin=Cout=70, an infinite kept input: masked outputs stay 0", 2, 70, 70, 9, 9, 1, 1, 1, 1, 0, 0,
               1, 1, 2, false, true, false, false, XLayout::kContiguous, {1, 0}, 0};
  inf.inf_input = true;
  run_conv<T>(inf);
  ConvCase shifted{"3x3 s1 p1, workspace 8 bytes past alignment", 2, 13, 30, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 2, false,
                   true, false, false, XLayout::kContiguous, {1, 0}, 0};
  shifted.workspace_shift = 8;
  run_conv<T>(shifted);
  ConvCase lin_t{"linear transposed x, shared weight, no bias, invalid code", 3, 13, 30, 20, 1, 1, 1, 1, 1, 0, 0, 1, 1,
                 2, true, false, false, true, XLayout::kContiguous, {1, 5, 0}, 0};
  lin_t.linear = lin_t.linear_transposed_x = true;
  run_conv<T>(lin_t);
  // The packed path's split reduction (at most 18 steps: 2 splits for 4 tiles on 132 SMs): a
  // code keeping no input (empty shares: y = bias), one keeping no output, an invalid code.
  ConvCase split{"3x3 Cin=40 Cout=30 keep none / all, invalid code: 2 splits", 4, 40, 30, 6, 6, 3, 3, 1, 1, 1, 1, 1,
                 1, 3, false, true, false, false, XLayout::kContiguous, {0, 1, 2, 5}, 1};
  split.split = true;
  run_conv<T>(split);
  // An empty input plane under padding: the output is all padding (bias or 0; NaN for the
  // invalid code) and the null x is never read (the register-staged path once read x[0]).
  ConvCase empty_plane{"3x3 p2 on a 0x5 input plane, null x, invalid code", 3, 13, 30, 0, 5, 3, 3, 1, 1, 2, 2, 1, 1, 2,
                       false, true, false, false, XLayout::kContiguous, {1, 4, 0}, 0};
  empty_plane.null_x = true;
  run_conv<T>(empty_plane);
  if (level >= 1 && (std::is_same<T, float>::value || std::is_same<T, __half>::value)) {
    ConvCase tiles{"3x3 Cin=40 Cout=130 12x12, 3 channel / 3 pixel tiles", 3, 40, 130, 12, 12, 3, 3, 1, 1, 1, 1, 1, 1,
                   4, false, true, false, false, XLayout::kChannelsLast, {3, 1, 3}, 0};
    tiles.split = true;  // 18 steps, 2 splits
    run_conv<T>(tiles);
  }
  if (level >= 1 && (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value)) {
    // the packed path (conv_async.cuh) over several of its 128-wide tiles: 3 input slices per
    // tap, a channel tile straddling the kept count, 2 pixel tiles, whole (one SM: no split) and
    // in 3 splits of 9 steps; and stride 2 with dilation (2 splits)
    ConvCase wide{"3x3 Cin=72 Cout=300 11x13, 95% kept: 27 steps, 3 channel / 2 pixel tiles", 2, 72, 300, 11, 13, 3,
                  3, 1, 1, 1, 1, 1, 1, 2, false, true, false, false, XLayout::kContiguous, {1, 0}, 4};
    wide.sms = 1;
    run_conv<T>(wide);
    wide.sms = 132, wide.split = true;
    run_conv<T>(wide);
    ConvCase strided{"3x3 s2 p2 d2 Cin=48 gapped x, invalid code", 3, 48, 40, 17, 15, 3, 3, 2, 2, 2, 2, 2, 2, 2, false,
                     true, false, false, XLayout::kGapped, {1, 2, 0}, 4};
    strided.split = true;
    run_conv<T>(strided);
    // Splits starting inside a tap, on both kernel rows, kh != kw and dh != dw: ~60 kept steps
    // (10 taps x 6 slices) in 4 splits on 132 SMs (one item per block), in 3 on 3 SMs (two
    // items per block).
    ConvCase mid_tap{"2x5 d(2,1) p(1,2) Cin=200, splits inside taps", 2, 200, 40, 9, 11, 2, 5, 1, 1, 1, 2, 2, 1, 2,
                     false, true, false, false, XLayout::kContiguous, {1, 0}, 4};
    mid_tap.split = true;
    run_conv<T>(mid_tap);
    mid_tap.sms = 3;
    run_conv<T>(mid_tap);
  }

  // name, B, C, G, P, K, weight, bias, per-code affine, silu, int32, codes, mask, offset
  run_norm<T>({"C=30 G=3 P=7 per-code affine silu", 4, 30, 3, 7, 3, true, true, true, true, false, {2, 0, 1, 1}, 2, 0});
  run_norm<T>({"random channels, shared affine, invalid codes", 4, 30, 3, 7, 3, true, true, false, false, true,
               {1, 3, 0, -2}, 0, 0});
  run_norm<T>({"keep none / all, no affine, silu", 3, 30, 3, 5, 2, false, false, false, true, false, {0, 1, 1}, 1, 0});
  run_norm<T>({"(B, C) input P=1, G=1, weight only", 3, 13, 1, 1, 2, true, false, true, false, false, {1, 0, 1}, 0, 0});
  run_norm<T>({"P=300 > block, offset mean 50", 2, 8, 2, 300, 2, true, true, true, false, false, {1, 0}, 0, 50});
  run_norm<T>({"P=100, bias only, groups of 10", 2, 20, 2, 100, 3, false, true, false, true, false, {2, 1}, 2, 0});
  // P a multiple of every pack width: 16-byte packs for every dtype, 4 loads in flight per
  // thread over several rounds; a large mean (the one-pass statistics' cancellation).
  run_norm<T>({"P=64 16-byte packs, offset 1000, invalid code", 3, 40, 4, 64, 3, true, true, true, true, false,
               {2, 7, 0}, 2, 1000});
  run_norm<T>({"P=16 G=1 C=100: packs across many channels", 2, 100, 1, 16, 2, true, true, false, false, true,
               {1, 0}, 0, 0});
  // The same shapes one element past alignment: the one-element path.
  run_norm<T>({"P=64 misaligned x / y, offset 1000, invalid code", 3, 40, 4, 64, 3, true, true, true, true, false,
               {2, 7, 0}, 2, 1000, 1});
}

// Sizes past the kernel's int32 coordinates are refused before any launch.
void run_coordinate_limit() {
  MaskedConvParams p;
  p.batch = 1, p.in_channels = 1, p.out_channels = 1, p.kernel_h = p.kernel_w = 1;
  p.height = p.out_height = int64_t(1) << 29, p.width = p.out_width = 1;
  if (cuda::masked_conv2d_coordinates_fit(p) || cuda::masked_conv2d(p, nullptr) != cudaErrorInvalidValue)
    fail("a 2^29-row input is not refused");
  p.height = p.out_height = (int64_t(1) << 29) - 1;
  if (!cuda::masked_conv2d_coordinates_fit(p)) fail("a (2^29 - 1)-row input is refused");
  p.out_height = (int64_t(1) << 28), p.stride_h = 2;  // out_height * stride reaches 2^29
  if (cuda::masked_conv2d_coordinates_fit(p)) fail("out_height * stride = 2^29 is not refused");
}

// The packed path keeps a weight tile's chunks at 32-bit offsets (SliceSource): below 2^24
// packed input channels; wider convs take the tile kernel.
void run_packed_offset_limit() {
  MaskedConvParams p;
  p.batch = 1, p.out_channels = 1, p.kernel_h = p.kernel_w = 1, p.height = p.width = p.out_height = p.out_width = 1;
  p.in_channels = (int64_t(1) << 24) - 8;
  if (!cuda::prunedk::use_async_conv<__nv_bfloat16>(p)) fail("2^24 - 8 input channels leave the packed path");
  p.in_channels = (int64_t(1) << 24) - 7;  // packed to 2^24
  if (cuda::prunedk::use_async_conv<__nv_bfloat16>(p)) fail("2^24 packed input channels take the packed path");
}

// The split count of the packed path at SD-2.1's levels on an H200 (132 SMs x 2 resident
// blocks): only tiles fewer than the blocks split, by the fewest rounds per unit of work.
void run_split_count() {
  struct Level {
    int64_t batch, channels, side, kernel, want;
  };
  const Level levels[] = {
      {8, 320, 96, 3, 1},  {8, 640, 48, 3, 1},  {8, 1280, 24, 3, 1}, {8, 1280, 12, 3, 3},  // 160 tiles: 2 rounds of 1/3
      {8, 1280, 8, 3, 3},  {2, 640, 48, 3, 4},  {1, 320, 96, 3, 1},                        // 216 tiles: no gain
      {1, 1280, 8, 3, 8},                                                                    // 10 tiles: at most 8
      {8, 1280, 12, 1, 3}, {1, 1280, 8, 1, 3},                                               // 40 steps: at most 5
  };
  for (const Level& l : levels) {
    MaskedConvParams p;
    p.batch = l.batch, p.in_channels = p.out_channels = l.channels;
    p.height = p.width = p.out_height = p.out_width = l.side;
    p.kernel_h = p.kernel_w = l.kernel;
    const int64_t got = cuda::prunedk::split_count(p, 264);
    if (got != l.want)
      fail("split_count B=" + std::to_string(l.batch) + " C=" + std::to_string(l.channels) + " " +
           std::to_string(l.side) + "x" + std::to_string(l.side) + " k=" + std::to_string(l.kernel) + ": " +
           std::to_string(got) + ", want " + std::to_string(l.want));
  }
}

int main(int argc, char** argv) {
  const int level = argc > 1 ? std::atoi(argv[1]) : 0;
  {  // First, before any occupancy query is remembered: where not one packed-path block fits,
     // masked_conv2d runs the register-staged kernel (no split reduction), with the same results.
    emu::occupancy_blocks = 0;
    const ConvCase none_fit{"3x3 Cin=40 Cout=30, no resident packed-path block", 4, 40, 30, 6, 6, 3, 3, 1, 1, 1, 1, 1,
                            1, 3, false, true, false, false, XLayout::kContiguous, {2, 0, 1, 2}, 0};
    run_conv<__half>(none_fit);
    run_conv<__nv_bfloat16>(none_fit);
    emu::occupancy_blocks = 1;
  }
  run_coordinate_limit();
  run_packed_offset_limit();
  run_split_count();
  run_all<float>(level);
  run_all<double>(level);
  run_all<__half>(level);  // sm_90: the packed path by wgmma
  run_all<__nv_bfloat16>(level);
  emu::compute_major = 8;  // the packed path by mma.sync
  run_all<__half>(level);
  run_all<__nv_bfloat16>(level);
  emu::compute_major = 7;  // fp16 / bf16 on the SIMT path (no TF32 tensor cores)
  run_all<__half>(0);
  run_all<__nv_bfloat16>(0);
  std::printf("%s: %d failures\n", nfail ? "FAILED" : "passed", nfail);
  return nfail ? 1 : 0;
}
