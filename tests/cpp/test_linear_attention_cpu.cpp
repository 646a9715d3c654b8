// Torch-free test of the CPU linear-attention kernels: every ISA variant this CPU runs,
// forward and both backward passes, against a float64 reference written out plainly.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "mmfast/cpu/isa.h"
#include "mmfast/cpu/linear_attention.h"

#define MMFAST_CPU_FAMILY_IMPL "mmfast/cpu/linear_attention_impl.h"
#include "avx512_on_avx2.h"
#include "worst_error.h"

using namespace mmfast;

namespace {

struct Case {
  int64_t b, n, h, dk, dv;
};

double phi(double x) { return x > 0 ? x + 1 : std::exp(x); }
double phi_grad(double x) { return x > 0 ? 1 : std::exp(x); }

TokenTensor view(std::vector<float>& data, const Case& c, int64_t d) {
  return TokenTensor{data.data(), c.n * c.h * d, c.h * d, d};
}

double max_error(const std::vector<float>& got, const std::vector<double>& want) {
  double err = 0, scale = 1;  // inputs are O(1): errors relative to max(1, |reference|)
  for (size_t i = 0; i < got.size(); ++i) {
    err = worse_error(err, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  return err / scale;
}

// Returns the worst relative error over out, dq, dk, dv for one case.
double run_case(const cpu::LinearAttentionKernels& kernels, const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  auto randn = [&](int64_t count) {
    std::vector<float> x(count);
    for (auto& e : x) e = normal(rng);
    return x;
  };
  const int64_t tokens = c.b * c.n * c.h;
  std::vector<float> q = randn(tokens * c.dk), k = randn(tokens * c.dk), v = randn(tokens * c.dv);
  std::vector<float> grad_out = randn(tokens * c.dv), out(tokens * c.dv), grad_q(q.size()), grad_k(k.size()),
                     grad_v(v.size());
  std::vector<float> state(c.b * c.h * c.dk * c.dv), mean(c.b * c.h * c.dk), grad_state(state.size()),
      grad_mean(mean.size());

  LinearAttentionParams p;
  p.batch = c.b, p.seqlen = c.n, p.heads = c.h, p.dim_k = c.dk, p.dim_v = c.dv, p.eps = 1e-4;
  p.q = view(q, c, c.dk), p.k = view(k, c, c.dk), p.v = view(v, c, c.dv), p.out = view(out, c, c.dv);
  p.grad_out = view(grad_out, c, c.dv), p.grad_q = view(grad_q, c, c.dk);
  p.grad_k = view(grad_k, c, c.dk), p.grad_v = view(grad_v, c, c.dv);
  p.state = state.data(), p.mean = mean.data();
  std::vector<char> workspace(kernels.workspace_bytes(p));
  p.workspace = workspace.data(), p.workspace_bytes = workspace.size();
  if (kernels.state(p) || kernels.apply(p)) return INFINITY;
  p.grad_state = grad_state.data(), p.grad_mean = grad_mean.data();
  if (kernels.apply_backward(p)) return INFINITY;
  if (kernels.state_backward(p)) return INFINITY;  // reads grad_state/grad_mean just written

  std::vector<double> ref_out(out.size()), ref_dq(q.size()), ref_dk(k.size()), ref_dv(v.size());
  auto at = [&](int64_t b, int64_t n, int64_t h, int64_t d, int64_t dim) { return ((b * c.n + n) * c.h + h) * dim + d; };
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < c.h; ++h) {
      std::vector<double> S(c.dk * c.dv, 0), m(c.dk, 0), dS(c.dk * c.dv, 0), dm(c.dk, 0);
      for (int64_t n = 0; n < c.n; ++n)
        for (int64_t i = 0; i < c.dk; ++i) {
          const double pk = phi(k[at(b, n, h, i, c.dk)]);
          m[i] += pk / c.n;
          for (int64_t j = 0; j < c.dv; ++j) S[i * c.dv + j] += pk * v[at(b, n, h, j, c.dv)] / c.n;
        }
      for (int64_t n = 0; n < c.n; ++n) {
        std::vector<double> pq(c.dk), o(c.dv, 0), g(c.dv);
        double z = 1e-4, dz = 0;
        for (int64_t i = 0; i < c.dk; ++i) pq[i] = phi(q[at(b, n, h, i, c.dk)]), z += pq[i] * m[i];
        for (int64_t j = 0; j < c.dv; ++j) {
          for (int64_t i = 0; i < c.dk; ++i) o[j] += pq[i] * S[i * c.dv + j];
          o[j] /= z;
          ref_out[at(b, n, h, j, c.dv)] = o[j];
          g[j] = grad_out[at(b, n, h, j, c.dv)] / z;
          dz -= g[j] * o[j];
        }
        for (int64_t i = 0; i < c.dk; ++i) {
          double d = dz * m[i];
          for (int64_t j = 0; j < c.dv; ++j) d += g[j] * S[i * c.dv + j], dS[i * c.dv + j] += pq[i] * g[j];
          dm[i] += dz * pq[i];
          ref_dq[at(b, n, h, i, c.dk)] = d * phi_grad(q[at(b, n, h, i, c.dk)]);
        }
      }
      for (int64_t n = 0; n < c.n; ++n) {
        for (int64_t i = 0; i < c.dk; ++i) {
          double d = dm[i];
          for (int64_t j = 0; j < c.dv; ++j) d += v[at(b, n, h, j, c.dv)] * dS[i * c.dv + j];
          ref_dk[at(b, n, h, i, c.dk)] = d / c.n * phi_grad(k[at(b, n, h, i, c.dk)]);
        }
        for (int64_t j = 0; j < c.dv; ++j) {
          double d = 0;
          for (int64_t i = 0; i < c.dk; ++i) d += phi(k[at(b, n, h, i, c.dk)]) * dS[i * c.dv + j];
          ref_dv[at(b, n, h, j, c.dv)] = d / c.n;
        }
      }
    }
  return std::max(std::max(max_error(out, ref_out), max_error(grad_q, ref_dq)),
                  std::max(max_error(grad_k, ref_dk), max_error(grad_v, ref_dv)));
}

}  // namespace

int main() {
  const Case cases[] = {{1, 1, 1, 16, 16}, {2, 7, 3, 40, 40}, {1, 1025, 2, 64, 64}, {1, 33, 2, 160, 80}, {2, 300, 1, 7, 256}};
  const auto variants = test::runnable_isa_variants(
      cpu::isa_generic::linear_attention_kernels, cpu::isa_avx2::linear_attention_kernels,
      cpu::isa_avx512::linear_attention_kernels, cpu::isa_avx512_on_avx2::linear_attention_kernels);
  int failures = 0, passed = 0;
  std::mt19937 rng(0);
  for (const auto& variant : variants) {
    for (const Case& c : cases) {
      const double err = run_case(variant.kernels(), c, rng);
      const bool ok = err < 2e-5;
      (ok ? passed : failures)++;
      std::printf("%s %s B=%lld N=%lld H=%lld Dk=%lld Dv=%lld max rel err %.2e\n", ok ? "ok  " : "FAIL",
                  variant.name, (long long)c.b, (long long)c.n, (long long)c.h, (long long)c.dk,
                  (long long)c.dv, err);
    }
  }
  std::printf("%d passed, %d failed\n", passed, failures);
  return failures == 0 ? 0 : 1;
}
