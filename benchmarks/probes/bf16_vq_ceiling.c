// Why bf16 vq_quantize cannot reach 2x the fp32 kernel at D = 8 on a Sapphire Rapids-class CPU, nor
// anywhere on an AMD Zen 4-class EPYC (there VDPBF16PS makes 1.85x the products of fp32 FMAs).
// A standalone probe (no mmfast, no torch): it times the instruction streams each kernel design
// would run, on one core, and prints how many distance sums (one row x one code) per ns each
// design could produce at best.
//
//   gcc -O2 -o /tmp/bf16_vq_ceiling benchmarks/probes/bf16_vq_ceiling.c && /tmp/bf16_vq_ceiling
//
//   fp32 FMA         VFMADD231PS: D = 8 needs 8 FMAs per 16 sums (the fp32 kernel's inner loop).
//   AVX512-BF16      VDPBF16PS: 4 per 16 sums at D = 8 (two bf16 products per lane each).
//   AMX dp           TDPBF16PS alone: 16 x 16 sums per instruction (K = 32 dims; D = 8 pads).
//   AMX dp + store   plus TILESTORED of every sums tile: the only way sums leave a tile.
//   AMX dp+store+scan plus one vector load and max per 16 stored sums: the argmax's least work.
// Each line is the best of 5 runs of its loop; compare the sums/ns with the fp32 FMA line.
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 12
// Instructions per ns of `step` (updating acc[i]) over CHAINS independent accumulators; x is the
// other operand, kept opaque to the compiler.
#define CHAIN_RATE(name, isa, x_type, x_init, step)                      \
  __attribute__((target(isa))) static double name(long n) {               \
    __m512 acc[CHAINS];                                                   \
    x_type x = x_init;                                                    \
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps((float)i);   \
    double t = now();                                                     \
    for (long k = 0; k < n; ++k) {                                        \
      _Pragma("GCC unroll 12") for (int i = 0; i < CHAINS; ++i) acc[i] = step; \
      __asm__ volatile("" : "+v"(x));                                     \
    }                                                                     \
    t = now() - t;                                                        \
    float s = 0;                                                          \
    for (int i = 0; i < CHAINS; ++i) s += acc[i][0];                      \
    __asm__ volatile("" ::"x"(s));                                        \
    return n * CHAINS / t * 1e-9;                                         \
  }

CHAIN_RATE(fma_per_ns, "avx512f,fma", __m512, _mm512_set1_ps(1e-9f), _mm512_fmadd_ps(x, x, acc[i]))
CHAIN_RATE(dpbf16_per_ns, "avx512f,avx512bf16", __m512bh, (__m512bh)_mm512_set1_epi32(0x3f803f80),
           _mm512_dpbf16_ps(acc[i], x, x))

struct __attribute__((aligned(64))) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static int amx_permitted(void) {
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

static uint16_t operands[16 * 32] __attribute__((aligned(64)));
static float sums[2][16 * 256] __attribute__((aligned(64)));  // 2 chunks of 16 rows x 256 codes: 32 KB

// Sums tiles (16 x 16) per ns: `mode` 0 = TDPBF16PS only, 1 = + TILESTORED, 2 = + the scan.
__attribute__((target("avx512f,amx-tile,amx-bf16"))) static double amx_tiles_per_ns(long n, int mode) {
  struct TileConfig config = {1};
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  _tile_loadd(4, operands, 64);
  _tile_loadd(6, operands, 64);
  __m512 best[8];
  for (int a = 0; a < 8; ++a) best[a] = _mm512_set1_ps(-1e30f);
  double t = now();
  for (long k = 0; k < n; k += 16) {  // 16 tiles = 16 rows x 256 codes, stored as a 16 KB chunk
    float* chunk = sums[(k / 16) % 2];
    for (int j = 0; j < 16; j += 4) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 4, 6);
      if (mode >= 1) {
        _tile_stored(0, chunk + (j + 0) * 16, 256 * 4);
        _tile_stored(1, chunk + (j + 1) * 16, 256 * 4);
        _tile_stored(2, chunk + (j + 2) * 16, 256 * 4);
        _tile_stored(3, chunk + (j + 3) * 16, 256 * 4);
      }
    }
    if (mode >= 2)  // 8 independent running maxima, as the kernel's rows are independent
      for (int i = 0; i < 16 * 256; i += 8 * 16)
        for (int a = 0; a < 8; ++a) best[a] = _mm512_max_ps(best[a], _mm512_load_ps(chunk + i + a * 16));
  }
  t = now() - t;
  _tile_release();
  for (int a = 1; a < 8; ++a) best[0] = _mm512_max_ps(best[0], best[a]);
  __asm__ volatile("" ::"v"(best[0]));
  return n / t * 1e-9;
}

static double best_of(double (*f)(long), long n) {
  double b = 0;
  for (int r = 0; r < 5; ++r) {
    const double x = f(n);
    b = x > b ? x : b;
  }
  return b;
}
static double amx0(long n) { return amx_tiles_per_ns(n, 0); }
static double amx1(long n) { return amx_tiles_per_ns(n, 1); }
static double amx2(long n) { return amx_tiles_per_ns(n, 2); }

int main(void) {
  const int dim = 8;
  const double fma = best_of(fma_per_ns, 20000000), dp = best_of(dpbf16_per_ns, 20000000);
  printf("%-22s %8.2f instr/ns -> %6.2f sums/ns at D = %d (1.00x)\n", "fp32 FMA", fma, fma * 16 / dim, dim);
  printf("%-22s %8.2f instr/ns -> %6.2f sums/ns at D = %d (%.2fx)\n", "AVX512-BF16 VDPBF16PS", dp, dp * 32 / dim, dim,
         dp * 2 / fma);
  if (!amx_permitted()) {
    puts("AMX: not available (CPU or OS)");
    return 0;
  }
  const char* names[3] = {"AMX dp", "AMX dp + store", "AMX dp + store + scan"};
  double (*fns[3])(long) = {amx0, amx1, amx2};
  for (int m = 0; m < 3; ++m) {
    const double tiles = best_of(fns[m], 4000000);
    printf("%-22s %8.3f tiles/ns -> %6.2f sums/ns at any D <= 29 (%.2fx)\n", names[m], tiles, tiles * 256,
           tiles * 256 / (fma * 16 / dim));
  }
  return 0;
}
