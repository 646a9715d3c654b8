// The CUDA VQ kernels run on the host under emulator.h and are checked against a float64
// search: every dtype (fp16/bf16 through the emulated TF32 tensor cores), odd N, K and D,
// one and several code splits, given and computed code norms, ties, NaN / Inf rows, and the
// lookups (rows, channels-first, the NaN guard for out-of-range indices), with poisoned
// guard elements after every output to catch writes out of bounds.
// Argument: 0 (quick), 1 (+ D = 256 and K = 8192 shapes).
#include "emulator.h"
#include "test_support.h"
#include "mmfast/cuda/vq.cuh"

#include <cmath>
#include <cstring>
#include <string>

using namespace mmfast;


std::mt19937 grng(11);

// Which search kernel the last vq_quantize launched: "wgmma" or "async" (the cp.async one on
// either multiplier, told apart by its ring's shared memory) or "tile" (the tile-GEMM one).
template <class T> std::string launched_search() {
  for (const auto& l : emu::launches)
    if (std::strstr(l.kernel, "vq_search_async_kernel") != nullptr) {
      if constexpr (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value)
        if (l.smem == cuda::NtWgmma::kSmemBytes<T>) return "wgmma";
      return "async";
    }
  return "tile";
}

// z_offset elements before z's first row (1: a base pointer off 16-byte alignment).
template <class T>
void run_search(int64_t N, int64_t K, int64_t D, int64_t row_stride, bool given_norms, int sms, int64_t z_offset = 0) {
  using A = cuda::acc_t<T>;
  emu::sms = sms;
  char cfg[200];
  std::snprintf(cfg, sizeof cfg, "T=%d N=%ld K=%ld D=%ld stride=%ld norms=%d sms=%d offset=%ld major=%d rz=%d",
                (int)dtype_of<T>(), (long)N, (long)K, (long)D, (long)row_stride, (int)given_norms, sms, (long)z_offset,
                emu::compute_major, (int)emu::mma_round_toward_zero);
  std::normal_distribution<double> normal;
  std::vector<T> z_buffer(z_offset + N * row_stride + 1, fromd<T>(1e30)), codebook(K * D);
  T* z = z_buffer.data() + z_offset;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) z[n * row_stride + d] = fromd<T>(normal(grng));
  for (auto& x : codebook) x = fromd<T>(normal(grng));
  if (K > 3) codebook[2 * D] = fromd<T>(NAN);  // code 2 never wins
  if (N > 2) {
    for (int64_t d = 0; d < D; ++d) z[0 * row_stride + d] = codebook[(K - 1) * D + d];  // exactly the last code
    z[1 * row_stride] = fromd<T>(NAN);                                                   // a NaN row: index 0
  }
  if (N > 3 && K > 6) {  // code K - 2 repeats code 4, and row 3 equals it: the tie goes to code 4
    for (int64_t d = 0; d < D; ++d) codebook[(K - 2) * D + d] = codebook[4 * D + d];
    for (int64_t d = 0; d < D; ++d) z[3 * row_stride + d] = codebook[4 * D + d];
  }
  std::vector<A> norms(K);
  for (int64_t c = 0; c < K; ++c) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += tod(codebook[c * D + d]) * tod(codebook[c * D + d]);
    norms[c] = static_cast<A>(s);
  }
  std::vector<int64_t> indices(N + 1, -7);
  std::vector<A> distance(N + 1, A(-7));
  VQParams p;
  p.rows = N, p.codes = K, p.dim = D, p.dtype = dtype_of<T>();
  p.z = z, p.z_row_stride = row_stride, p.codebook = codebook.data();
  p.codebook_sqnorm = given_norms ? norms.data() : nullptr;
  p.indices = indices.data(), p.distance = distance.data();
  std::vector<char> ws(cuda::vq_quantize_workspace_bytes(p) + 64);
  p.workspace = ws.data(), p.workspace_bytes = ws.size();
  emu::launches.clear();
  if (cuda::vq_quantize(p, nullptr) != cudaSuccess) return fail(std::string("launch ") + cfg);
  // fp16 / bf16 with 16-byte aligned rows take the cp.async search (wgmma on sm_90, unless
  // MMFAST_CUDA_WGMMA=0; mma.sync before), the rest the tile GEMM.
  const bool half = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
  const bool async = half && D % 8 == 0 && row_stride % 8 == 0 && z_offset % 8 == 0 && emu::compute_major >= 8 &&
                     row_stride < (int64_t{1} << 24) && cuda::tensor_cores_enabled() && cuda::async_copy_enabled() &&
                     emu::occupancy_blocks > 0;
  const char* expected = !async ? "tile" : emu::compute_major == 9 && cuda::wgmma_enabled() ? "wgmma" : "async";
  if (launched_search<T>() != expected) fail(std::string("search kernel choice: ") + launched_search<T>() + " " + cfg);
  if (indices[N] != -7 || distance[N] != A(-7)) fail(std::string("wrote past the outputs ") + cfg);
  int bad = 0;
  for (int64_t n = 0; n < N; ++n) {
    double best = INFINITY, sq = 0;
    bool finite = true;
    for (int64_t d = 0; d < D; ++d) {
      const double x = tod(z[n * row_stride + d]);
      sq += x * x;
      finite = finite && std::isfinite(x);
    }
    for (int64_t c = 0; c < K; ++c) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += (tod(z[n * row_stride + d]) - tod(codebook[c * D + d])) * (tod(z[n * row_stride + d]) - tod(codebook[c * D + d]));
      if (s < best) best = s;
    }
    if (!finite) {
      bad += indices[n] != 0 || !std::isnan(distance[n]);
      continue;
    }
    const int64_t c = indices[n];
    double chosen = INFINITY;
    if (c >= 0 && c < K) {
      chosen = 0;
      for (int64_t d = 0; d < D; ++d) chosen += (tod(z[n * row_stride + d]) - tod(codebook[c * D + d])) * (tod(z[n * row_stride + d]) - tod(codebook[c * D + d]));
    }
    const double tol = (std::is_same<T, double>::value ? 1e-10 : 2e-5) * (sq + 1) * std::sqrt(double(D));
    bad += !(chosen <= best + tol) || !(std::fabs(tod(distance[n]) - best) <= tol);
  }
  if (N > 2 && indices[0] != K - 1) fail(std::string("a row equal to the last code ") + cfg);
  if (N > 3 && K > 6 && indices[3] != 4) fail(std::string("a tie between codes 4 and K - 2 ") + cfg);
  if (bad) fail(std::to_string(bad) + " rows off " + cfg);
}

template <class T>
void run_lookup(int64_t B, int64_t P, int64_t K, int64_t D, bool channels_first, bool int32_indices) {
  std::vector<T> codebook(K * D);
  for (int64_t i = 0; i < K * D; ++i) codebook[i] = fromd<T>(double(i % 97) - 40.0);
  const int64_t count = B * P;
  std::vector<int64_t> idx64(count);
  std::vector<int32_t> idx32(count);
  for (int64_t i = 0; i < count; ++i) idx64[i] = idx32[i] = static_cast<int32_t>((i * 7919) % K);
  if (count > 3) idx64[3] = idx32[3] = static_cast<int32_t>(K);  // out of range: a NaN row
  std::vector<T> out(count * D + 8, fromd<T>(123.0));
  VQLookupParams p;
  p.count = count, p.codes = K, p.dim = D, p.dtype = dtype_of<T>();
  p.indices = int32_indices ? static_cast<const void*>(idx32.data()) : idx64.data();
  p.index_bytes = int32_indices ? 4 : 8;
  p.codebook = codebook.data(), p.out = out.data(), p.channels_first = channels_first, p.plane = P;
  if (cuda::vq_dequantize(p, nullptr) != cudaSuccess) return fail("lookup launch");
  int bad = 0;
  for (int64_t i = 0; i < count; ++i)
    for (int64_t d = 0; d < D; ++d) {
      const int64_t b = i / P, q = i % P;
      const double got = tod(out[channels_first ? (b * D + d) * P + q : i * D + d]);
      if (idx64[i] >= K) bad += !std::isnan(got);
      else bad += got != tod(codebook[idx64[i] * D + d]);
    }
  for (int64_t e = count * D; e < count * D + 8; ++e) bad += tod(out[e]) != 123.0;
  if (bad) fail("lookup: " + std::to_string(bad) + " elements off (channels_first=" + std::to_string(channels_first) + ")");
}

template <class T>
void run_all(int level) {
  run_search<T>(1, 1, 1, 1, false, 132);
  run_search<T>(5, 7, 3, 3, true, 132);
  run_search<T>(70, 200, 40, 43, false, 132);   // strided rows, several row and code tiles
  run_search<T>(33, 300, 8, 8, true, 1);        // one SM: few splits
  run_search<T>(130, 129, 70, 70, false, 132);  // D over two staged slices
  // 16-byte aligned rows (the cp.async search for fp16 / bf16): D = 40 (a 32-dim slice and a
  // zero-filled one), strided rows, 2 row tiles of 128 and 3 code tiles over 1-3 splits and SMs
  // (blocks walk several items; the ring's slice stream crosses code tiles); K < one tile. On
  // sm_90 by wgmma, on sm_80 by mma.sync.
  for (const int major : {9, 8}) {
    emu::compute_major = major;
    run_search<T>(200, 300, 40, 48, false, 2);
    run_search<T>(150, 383, 64, 64, true, 1);
    run_search<T>(9, 10, 16, 24, false, 132);
    run_search<T>(200, 300, 40, 48, false, 1);  // 2 splits, the second over 2 code tiles, a zero-filled slice
    run_search<T>(130, 100, 64, 64, false, 132);  // codes 4 and 98 tie across column warps (0 and 3) / lane quads
    run_search<T>(70, 129, 96, 96, false, 3);     // rows past the tile's first warpgroup; one code past a tile
  }
  emu::compute_major = 9;
  // The tile-GEMM search instead: z's base pointer off 16 bytes; a pre-sm_80 device; 16-bit z
  // rows 2^24 elements apart (a 128-row tile past 32-bit offsets; the largest stride within
  // them: the cp.async search).
  run_search<T>(70, 200, 64, 64, false, 132, 1);
  if constexpr (sizeof(T) == 2) {
    run_search<T>(2, 10, 16, int64_t{1} << 24, false, 132);
    run_search<T>(2, 10, 16, (int64_t{1} << 24) - 8, false, 132);
  }
  emu::compute_major = 7;
  run_search<T>(70, 200, 64, 64, false, 132);
  emu::compute_major = 9;
  // Truncating tensor cores (mma.sync / wgmma results rounded toward zero) stay within the tolerance.
  emu::mma_round_toward_zero = true;
  run_search<T>(150, 383, 64, 64, true, 1);
  emu::compute_major = 8;
  run_search<T>(150, 383, 64, 64, true, 1);
  emu::compute_major = 9;
  emu::mma_round_toward_zero = false;
  if (level >= 1) {
    run_search<T>(64, 8192, 256, 256, true, 132);
    run_search<T>(257, 1000, 256, 256, false, 4);
  }
  run_lookup<T>(1, 7, 5, 3, false, false);
  run_lookup<T>(2, 6, 9, 4, true, true);
  run_lookup<T>(3, 35, 100, 33, true, false);
}

int main(int argc, char** argv) {
  const int level = argc > 1 ? std::atoi(argv[1]) : 0;
  // First, before any occupancy query is remembered: where not one cp.async search block fits,
  // vq_quantize runs the tile-GEMM search, with the same results.
  emu::occupancy_blocks = 0;
  run_search<__half>(200, 300, 40, 48, false, 2);
  run_search<__nv_bfloat16>(150, 383, 64, 64, true, 1);
  emu::occupancy_blocks = 1;
  run_all<float>(level);
  run_all<double>(level);
  run_all<__half>(level);
  run_all<__nv_bfloat16>(level);
  std::printf("%s: %d failures\n", nfail ? "FAILED" : "passed", nfail);
  return nfail ? 1 : 0;
}
