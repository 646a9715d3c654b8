// Torch-free test of the CPU kernels of the masked-channel ops, every ISA variant this CPU runs:
// masked_group_norm against a float64 GroupNorm over the kept channels written out plainly
// (masked channels exactly 0 and poisoned with NaN in the input, so a read would show; an
// invalid code reported before anything is written), and the gather / scatter data movement.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "mmfast/cpu/isa.h"
#include "mmfast/cpu/pruned.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/pruned_impl.h"
#include "avx512_on_avx2.h"

using namespace mmfast;

namespace {

struct Case {
  int64_t batch, channels, groups, plane, codes;
  bool per_code_affine, silu;
  float offset = 0;  // added to x: a large mean tests the variance for cancellation
};

// Returns the number of wrong output elements.
int check(const cpu::PrunedKernels& k, const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.5f, 2.0f);
  std::bernoulli_distribution keep(0.6);
  const int64_t n = c.batch * c.channels * c.plane, affine_sets = c.per_code_affine ? c.codes : 1;
  std::vector<int64_t> codes(c.batch);
  for (int64_t b = 0; b < c.batch; ++b) codes[b] = b % c.codes;
  std::vector<char> mask_bytes(c.codes * c.channels);  // bool storage without vector<bool>
  for (auto& m : mask_bytes) m = keep(rng);
  const bool* mask = reinterpret_cast<const bool*>(mask_bytes.data());
  std::vector<float> x(n), y(n, -7.0f), weight(affine_sets * c.channels), bias(affine_sets * c.channels);
  for (auto& v : x) v = c.offset + normal(rng);
  for (auto& v : weight) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t ch = 0; ch < c.channels; ++ch)
      if (!mask[codes[b] * c.channels + ch])
        for (int64_t i = 0; i < c.plane; ++i) x[(b * c.channels + ch) * c.plane + i] = NAN;
  MaskedGroupNormParams p;
  p.batch = c.batch, p.channels = c.channels, p.groups = c.groups, p.plane = c.plane;
  p.routing.num_codes = c.codes, p.routing.sample_codes = codes.data(), p.routing.code_bytes = 8;
  p.routing.out_mask = mask;
  p.x = x.data(), p.y = y.data(), p.weight = weight.data(), p.bias = bias.data();
  p.affine_code_stride = c.per_code_affine ? c.channels : 0;
  p.eps = 1e-5, p.silu = c.silu;
  if (k.group_norm(p) != -1) return static_cast<int>(n);
  int bad = 0;
  const int64_t per_group = c.channels / c.groups;
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t code = codes[b];
    for (int64_t g = 0; g < c.groups; ++g) {
      double sum = 0, squares = 0, count = 0;
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch)
        if (mask[code * c.channels + ch])
          for (int64_t i = 0; i < c.plane; ++i) sum += x[(b * c.channels + ch) * c.plane + i], ++count;
      const double mean = count ? sum / count : 0;
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch)
        if (mask[code * c.channels + ch])
          for (int64_t i = 0; i < c.plane; ++i) {
            const double d = x[(b * c.channels + ch) * c.plane + i] - mean;
            squares += d * d;
          }
      const double rstd = count ? 1.0 / std::sqrt(squares / count + 1e-5) : 0;
      for (int64_t ch = g * per_group; ch < (g + 1) * per_group; ++ch) {
        const bool kept = mask[code * c.channels + ch];
        const int64_t a = (c.per_code_affine ? code * c.channels : 0) + ch;
        for (int64_t i = 0; i < c.plane; ++i) {
          const int64_t at = (b * c.channels + ch) * c.plane + i;
          double want = 0;
          if (kept) {
            want = (x[at] - mean) * rstd * weight[a] + bias[a];
            if (c.silu) want = want / (1 + std::exp(-want));
          }
          const bool ok = kept ? std::fabs(y[at] - want) <= 2e-5 * (1 + std::fabs(want)) : y[at] == 0.0f;
          bad += !ok;
        }
      }
    }
  }
  return bad;
}

// An invalid code: reported (its sample's index), nothing written.
int check_invalid_code(const cpu::PrunedKernels& k) {
  std::vector<float> x(2 * 4 * 3, 1.0f), y(x.size(), -7.0f);
  const int64_t codes[2] = {0, 3};
  const bool mask[8] = {true, true, true, true, true, true, true, true};
  MaskedGroupNormParams p;
  p.batch = 2, p.channels = 4, p.groups = 2, p.plane = 3;
  p.routing.num_codes = 2, p.routing.sample_codes = codes, p.routing.out_mask = mask;
  p.x = x.data(), p.y = y.data();
  int bad = k.group_norm(p) == 1 ? 0 : 1;
  for (float v : y) bad += v != -7.0f;
  return bad;
}

// SiLU of very negative values is -0 (v / (1 + inf)) in the vector lanes and the tail alike,
// not v / exp(88) (exp_vec saturates there): a bias of -1e37 would give -0.06.
int check_silu_saturates(const cpu::PrunedKernels& k) {
  const int64_t plane = 37;  // vectors and a scalar tail at every ISA's width
  std::vector<float> x(2 * plane), y(x.size(), -7.0f), weight{1.0f, 1.0f}, bias{-1e37f, -200.0f};
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 5);
  const int64_t codes[1] = {0};
  const bool mask[2] = {true, true};
  MaskedGroupNormParams p;
  p.batch = 1, p.channels = 2, p.groups = 1, p.plane = plane;
  p.routing.num_codes = 1, p.routing.sample_codes = codes, p.routing.out_mask = mask;
  p.x = x.data(), p.y = y.data(), p.weight = weight.data(), p.bias = bias.data();
  p.silu = true;
  int bad = k.group_norm(p) == -1 ? 0 : 1;
  for (float v : y) bad += !(v == 0.0f);
  return bad;
}

// gather then scatter of random rows / channels (with runs of adjacent channels, as APTP's whole
// groups give) through element type T, inner sizes 1 and 9 (tokens, 3x3 taps): every packed
// element equals its source, every dense output channel of the chosen rows is the packed value
// or exactly 0, and nothing else of dst (poisoned) is touched.
template <typename T>
int check_gather_scatter(const cpu::PrunedKernels& k, int64_t inner, std::mt19937& rng) {
  const int64_t src_rows = 7, channels = 23;
  std::bernoulli_distribution keep(0.5);
  std::vector<T> src(src_rows * channels * inner);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<T>(i + 1);
  std::vector<int64_t> rows{5, 0, 3}, kept;
  for (int64_t c = 0; c < channels; ++c)
    if (keep(rng)) kept.push_back(c);
  std::vector<T> packed(rows.size() * kept.size() * inner, T(0));
  ChannelGatherParams g;
  g.element_bytes = sizeof(T), g.src = src.data(), g.src_row_stride = channels * inner, g.src_channel_stride = inner;
  g.row_index = rows.data(), g.channel_index = kept.data();
  g.rows = static_cast<int64_t>(rows.size()), g.channels = static_cast<int64_t>(kept.size()), g.inner = inner;
  g.dst = packed.data();
  k.gather(g);
  int bad = 0;
  for (size_t r = 0; r < rows.size(); ++r)
    for (size_t j = 0; j < kept.size(); ++j)
      for (int64_t t = 0; t < inner; ++t)
        bad += packed[(r * kept.size() + j) * inner + t] != src[(rows[r] * channels + kept[j]) * inner + t];
  std::vector<int64_t> position(channels, -1);
  for (size_t j = 0; j < kept.size(); ++j) position[kept[j]] = static_cast<int64_t>(j);
  std::vector<T> dense(src.size(), T(-7));
  ChannelScatterParams sc;
  sc.element_bytes = sizeof(T), sc.src = packed.data(), sc.kept = static_cast<int64_t>(kept.size());
  sc.kept_position = position.data(), sc.dst_channels = channels, sc.row_index = rows.data();
  sc.rows = static_cast<int64_t>(rows.size()), sc.inner = inner, sc.dst = dense.data();
  sc.dst_row_stride = channels * inner, sc.dst_channel_stride = inner;
  k.scatter(sc);
  for (int64_t row = 0; row < src_rows; ++row) {
    const bool chosen = row == 5 || row == 0 || row == 3;
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t t = 0; t < inner; ++t) {
        const int64_t at = (row * channels + c) * inner + t;
        const T want = !chosen ? T(-7) : position[c] < 0 ? T(0) : src[at];
        bad += dense[at] != want;
      }
  }
  return bad;
}

}  // namespace

int main() {
  const auto variants = test::runnable_isa_variants(cpu::isa_generic::pruned_kernels, cpu::isa_avx2::pruned_kernels,
                                                    cpu::isa_avx512::pruned_kernels,
                                                    cpu::isa_avx512_on_avx2::pruned_kernels);
  const Case cases[] = {{5, 30, 3, 20, 3, true, true},  {4, 32, 32, 7, 2, false, false},
                        {3, 12, 4, 1, 5, true, false},  {2, 40, 4, 129, 1, false, true},
                        // several sum blocks per channel, a vector tail, a mean 50 standard deviations out
                        {2, 6, 2, 2500, 2, true, true, 100.0f}};
  int failures = 0;
  std::mt19937 rng(7);
  for (const auto& variant : variants) {
    const cpu::PrunedKernels k = variant.kernels();
    for (const Case& c : cases) {
      const int bad = check(k, c, rng);
      std::printf("%s %s group_norm B=%lld C=%lld G=%lld P=%lld: %d elements off\n", bad ? "FAIL" : "ok  ",
                  variant.name, (long long)c.batch, (long long)c.channels, (long long)c.groups,
                  (long long)c.plane, bad);
      failures += bad != 0;
    }
    const int bad = check_invalid_code(k);
    std::printf("%s %s group_norm invalid code\n", bad ? "FAIL" : "ok  ", variant.name);
    failures += bad != 0;
    const int saturated = check_silu_saturates(k);
    std::printf("%s %s group_norm SiLU of -1e37 and -200\n", saturated ? "FAIL" : "ok  ", variant.name);
    failures += saturated != 0;
    for (int64_t inner : {1, 9}) {
      const int moved = check_gather_scatter<float>(k, inner, rng) + check_gather_scatter<uint16_t>(k, inner, rng) +
                        check_gather_scatter<double>(k, inner, rng);
      std::printf("%s %s gather / scatter inner=%lld: %d elements off\n", moved ? "FAIL" : "ok  ",
                  variant.name, (long long)inner, moved);
      failures += moved != 0;
    }
  }
  return failures == 0 ? 0 : 1;
}
