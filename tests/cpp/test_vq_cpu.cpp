// Torch-free test of the CPU VQ kernels: every ISA variant this CPU runs (fp32 and bf16 inputs),
// and the AMX and AVX512-BF16 bf16 kernels where the CPU has them, against a float64 search
// written out plainly. Exact where the answer is exact (ties, duplicate codes, NaN and
// Inf rows, lookups); elsewhere the chosen code's distance must equal the minimum within the
// fp32 rounding of the dots (near-ties may pick either code).
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "mmfast/cpu/isa.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/vq.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/vq_impl.h"
#include "avx512_on_avx2.h"

using namespace mmfast;

namespace {

struct Result {
  std::vector<int64_t> indices;
  std::vector<float> distance;
};

inline float stored(float x, float) { return x; }
inline cpu::BFloat16 stored(float x, cpu::BFloat16) { return cpu::to_bfloat16(x); }

// Inputs are given as floats that T holds exactly (rounded by the caller for bf16). pad > 0: rows
// of z lie `dim + pad` apart with NaN between them (never read); sqnorm: the codes' ||e||^2 given.
template <typename T>
Result quantize(const cpu::VQKernels& k, const std::vector<float>& z, const std::vector<float>& codebook, int64_t n,
                int64_t codes, int64_t dim, int64_t pad = 0, const std::vector<float>* sqnorm = nullptr) {
  constexpr bool bf16 = sizeof(T) == 2;
  std::vector<T> zt(n * (dim + pad), stored(NAN, T{})), codebook_t(codebook.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) zt[i * (dim + pad) + d] = stored(z[i * dim + d], T{});
  for (size_t i = 0; i < codebook.size(); ++i) codebook_t[i] = stored(codebook[i], T{});
  Result r{std::vector<int64_t>(n, -7), std::vector<float>(n, -7.0f)};
  VQParams p;
  p.rows = n, p.codes = codes, p.dim = dim, p.dtype = bf16 ? DType::kBFloat16 : DType::kFloat32;
  p.z = zt.data(), p.z_row_stride = dim + pad, p.codebook = codebook_t.data();
  p.codebook_sqnorm = sqnorm != nullptr ? sqnorm->data() : nullptr;
  p.indices = r.indices.data(), p.distance = r.distance.data();
  std::vector<char> workspace(k.quantize_workspace_bytes(p));
  p.workspace = workspace.data(), p.workspace_bytes = workspace.size();
  if (k.quantize(p) != nullptr) r.indices.assign(n, -9);
  return r;
}

double distance(const std::vector<float>& z, const std::vector<float>& codebook, int64_t n, int64_t c, int64_t dim) {
  double s = 0;
  for (int64_t d = 0; d < dim; ++d) s += (double(z[n * dim + d]) - codebook[c * dim + d]) * (double(z[n * dim + d]) - codebook[c * dim + d]);
  return s;
}

// Returns the number of rows that break the rules.
template <typename T>
int check_random(const cpu::VQKernels& k, int64_t n, int64_t codes, int64_t dim, std::mt19937& rng, int64_t pad = 0,
                 bool give_sqnorm = false) {
  std::normal_distribution<float> normal;
  const auto draw = [&] { return sizeof(T) == 2 ? cpu::to_float(cpu::to_bfloat16(normal(rng))) : normal(rng); };
  std::vector<float> z(n * dim), codebook(codes * dim), sqnorm(codes, 0.0f);
  for (auto& x : z) x = draw();
  for (auto& x : codebook) x = draw();
  for (int64_t c = 0; c < codes; ++c)
    for (int64_t d = 0; d < dim; ++d) sqnorm[c] += codebook[c * dim + d] * codebook[c * dim + d];
  const Result r = quantize<T>(k, z, codebook, n, codes, dim, pad, give_sqnorm ? &sqnorm : nullptr);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    double best = INFINITY, scale = 0;
    for (int64_t c = 0; c < codes; ++c) best = std::min(best, distance(z, codebook, i, c, dim));
    for (int64_t d = 0; d < dim; ++d) scale += double(z[i * dim + d]) * z[i * dim + d];
    const double tol = 1e-5 * (scale + 1) * std::sqrt(double(dim));
    const int64_t c = r.indices[i];
    const bool ok = c >= 0 && c < codes && distance(z, codebook, i, c, dim) <= best + tol &&
                    std::fabs(r.distance[i] - best) <= tol;
    bad += !ok;
  }
  return bad;
}

// Duplicate codes (ties: the lowest index), a NaN row and an Inf row (index 0), a code of NaN
// (never chosen), and lookups with an out-of-range index.
template <typename T>
int check_rules(const cpu::VQKernels& k) {
  const int64_t dim = 3, codes = 40, n = 4;
  std::vector<float> codebook(codes * dim);
  for (int64_t c = 0; c < codes; ++c)
    for (int64_t d = 0; d < dim; ++d) codebook[c * dim + d] = float((c % 10) + d);  // codes c, c+10, ... equal
  codebook[0] = NAN;  // code 0 is never chosen
  std::vector<float> z = {3, 4, 5, 7, 8, 9, NAN, 0, 0, INFINITY, 0, 0};
  const Result r = quantize<T>(k, z, codebook, n, codes, dim);
  int bad = 0;
  bad += r.indices[0] != 3 || r.distance[0] != 0.0f;   // equals codes 3, 13, 23, 33: the lowest
  bad += r.indices[1] != 7 || r.distance[1] != 0.0f;
  bad += r.indices[2] != 0 || !std::isnan(r.distance[2]);
  bad += r.indices[3] != 0 || !std::isinf(r.distance[3]);
  // Lookup: rows, channels-first, and the first out-of-range position.
  std::vector<int64_t> indices = {5, 1, 39, 2, 0, 7};
  std::vector<float> out(indices.size() * dim, -1);
  VQLookupParams lp;
  lp.count = 6, lp.codes = codes, lp.dim = dim, lp.indices = indices.data(), lp.codebook = codebook.data();
  lp.out = out.data();
  bad += k.dequantize(lp) != -1 || out[3 * 2 + 1] != codebook[39 * dim + 1];
  lp.channels_first = true, lp.plane = 3;  // (B = 2, P = 3) -> (2, D, 3)
  bad += k.dequantize(lp) != -1 || out[(1 * dim + 2) * 3 + 2] != codebook[7 * dim + 2];
  indices[4] = codes, indices[2] = -1;
  lp.channels_first = false;
  bad += k.dequantize(lp) != 2;
  return bad;
}

// Ties at D = 8 (a dim the kernels unroll): codes c, c + 37 and c + 74 are equal, so equal
// scores sit in different lanes, vector halves and panels; the lowest code must win.
template <typename T>
int check_ties_unrolled_dim(const cpu::VQKernels& k) {
  const int64_t dim = 8, codes = 100, n = 6;
  std::vector<float> codebook(codes * dim);
  for (int64_t c = 0; c < codes; ++c)
    for (int64_t d = 0; d < dim; ++d) codebook[c * dim + d] = float((c % 37) - 2 * d) * 0.25f;
  const int64_t copies[n] = {40, 36, 74, 99, 0, 73};  // rows of z equal to these codes
  const int64_t lowest[n] = {3, 36, 0, 25, 0, 36};
  std::vector<float> z(n * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) z[i * dim + d] = codebook[copies[i] * dim + d];
  const Result r = quantize<T>(k, z, codebook, n, codes, dim);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += r.indices[i] != lowest[i] || r.distance[i] != 0.0f;
  return bad;
}

// Ties far apart, for the lazy argmax's groups of panels (8 panels = 256 codes at D <= 32 from
// each code block's start, cut short where a block ends; one panel above): copies of one code
// at 300, 332 (same lane, same group: the first match must win), 555 and 900 (other groups,
// lanes and code blocks), and of another at 600 and 700 (one group, other panels); every other
// code differs. 400 rows, so that every task searches every code block itself (no split over
// codes). Values 0-3 are exact in bf16 and every dot exact in fp32, so the copies tie exactly.
template <typename T>
int check_ties_across_groups(const cpu::VQKernels& k, int64_t dim) {
  const int64_t codes = 1100, n = 400;
  std::vector<float> codebook(codes * dim);
  for (int64_t c = 0; c < codes; ++c)
    for (int64_t d = 0; d < dim; ++d) codebook[c * dim + d] = float((c >> (d % 10)) & 1);
  for (int64_t c : {300, 332, 555, 900})
    for (int64_t d = 0; d < dim; ++d) codebook[c * dim + d] = 3;
  for (int64_t c : {600, 700})
    for (int64_t d = 0; d < dim; ++d) codebook[c * dim + d] = 2;
  std::vector<float> z(n * dim);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) z[i * dim + d] = i % 2 == 0 ? 3 : 2;
  const Result r = quantize<T>(k, z, codebook, n, codes, dim);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += r.indices[i] != (i % 2 == 0 ? 300 : 600) || r.distance[i] != 0.0f;
  return bad;
}

// Random shapes and the rules for one kernel table and input type.
template <typename T>
void check_table(const char* name, const cpu::VQKernels& k, std::mt19937& rng, int& passed, int& failures) {
  // D = 4, 8, 16 and 32 take the micro-kernels with a fixed trip count, the others the general
  // one (unrolled by 8); 1100 codes of 32 dims span several code blocks.
  const int64_t shapes[][3] = {{1, 1, 1},      {5, 7, 3},      {100, 100, 8},   {300, 1000, 40}, {37, 513, 256},
                               {1025, 64, 5},  {61, 333, 4},   {50, 700, 16},   {49, 1100, 32}};
  const char* type = sizeof(T) == 2 ? "bf16" : "fp32";
  for (const auto& s : shapes) {
    const int bad = check_random<T>(k, s[0], s[1], s[2], rng);
    (bad == 0 ? passed : failures)++;
    std::printf("%s %s %s N=%lld K=%lld D=%lld: %d rows off\n", bad ? "FAIL" : "ok  ", name, type, (long long)s[0],
                (long long)s[1], (long long)s[2], bad);
  }
  for (const auto& s : {std::array<int64_t, 3>{37, 100, 7}, std::array<int64_t, 3>{13, 70, 256}}) {
    const int bad_strided = check_random<T>(k, s[0], s[1], s[2], rng, 3, true);
    (bad_strided == 0 ? passed : failures)++;
    std::printf("%s %s %s N=%lld K=%lld D=%lld, rows %lld apart (NaN between), ||e||^2 given: %d rows off\n",
                bad_strided ? "FAIL" : "ok  ", name, type, (long long)s[0], (long long)s[1], (long long)s[2],
                (long long)(s[2] + 3), bad_strided);
  }
  const int bad = check_rules<T>(k);
  (bad == 0 ? passed : failures)++;
  std::printf("%s %s %s ties, NaN/Inf rows, NaN code, lookups: %d checks off\n", bad ? "FAIL" : "ok  ", name, type,
              bad);
  const int bad_ties = check_ties_unrolled_dim<T>(k);
  (bad_ties == 0 ? passed : failures)++;
  std::printf("%s %s %s ties across lanes and panels at D = 8: %d rows off\n", bad_ties ? "FAIL" : "ok  ", name, type,
              bad_ties);
  for (int64_t dim : {4, 8, 12, 32, 40}) {
    const int bad_far = check_ties_across_groups<T>(k, dim);
    (bad_far == 0 ? passed : failures)++;
    std::printf("%s %s %s ties across panel groups and code blocks at D = %lld: %d rows off\n", bad_far ? "FAIL" : "ok  ",
                name, type, (long long)dim, bad_far);
  }
}

}  // namespace

// A codebook of more than 2^31 panels (2^36 + 1 codes: more than 2^31 panels at every vector
// width) is refused before anything is read: the panel numbers would wrap in the 32-bit lanes.
// Nothing is allocated: the kernel returns before touching the (dummy) inputs.
template <typename T>
int check_panel_limit(const cpu::VQKernels& k) {
  const T dummy[1] = {};
  int64_t index = 0;
  float distance = 0;
  VQParams p;
  p.rows = 1, p.codes = (int64_t(1) << 36) + 1, p.dim = 1;
  p.dtype = sizeof(T) == 2 ? DType::kBFloat16 : DType::kFloat32;
  p.z = dummy, p.z_row_stride = 1, p.codebook = dummy, p.indices = &index, p.distance = &distance;
  const char* error = k.quantize(p);
  return error != nullptr && std::strstr(error, "more than 2^31 panels") != nullptr ? 0 : 1;
}

int main() {
  const auto variants = test::runnable_isa_variants(cpu::isa_generic::vq_kernels, cpu::isa_avx2::vq_kernels,
                                                    cpu::isa_avx512::vq_kernels,
                                                    cpu::isa_avx512_on_avx2::vq_kernels);
  int failures = 0, passed = 0;
  std::mt19937 rng(0);
  for (const auto& variant : variants) {
    check_table<float>(variant.name, variant.kernels(), rng, passed, failures);
    check_table<cpu::BFloat16>(variant.name, variant.kernels(), rng, passed, failures);
    const int bad = check_panel_limit<float>(variant.kernels()) + check_panel_limit<cpu::BFloat16>(variant.kernels());
    (bad == 0 ? passed : failures)++;
    std::printf("%s %s more than 2^31 panels refused: %d dtypes off\n", bad ? "FAIL" : "ok  ", variant.name, bad);
  }
  if (cpu::amx_bf16_supported()) {
    check_table<cpu::BFloat16>("amx", cpu::isa_amx::vq_amx_kernels(), rng, passed, failures);
    check_table<float>("amx (fp32: the avx512 kernels)", cpu::isa_amx::vq_amx_kernels(), rng, passed, failures);
  } else {
    std::printf("skip amx (no AMX-BF16 tiles on this CPU or OS)\n");
  }
  if (cpu::avx512_bf16_supported()) {
    check_table<cpu::BFloat16>("avx512bf16", cpu::isa_avx512bf16::vq_avx512bf16_kernels(), rng, passed, failures);
    check_table<float>("avx512bf16 (fp32: the avx512 kernels)", cpu::isa_avx512bf16::vq_avx512bf16_kernels(), rng,
                       passed, failures);
  } else {
    std::printf("skip avx512bf16 (no AVX512-BF16 on this CPU)\n");
  }
  std::printf("%d passed, %d failed\n", passed, failures);
  return failures == 0 ? 0 : 1;
}
