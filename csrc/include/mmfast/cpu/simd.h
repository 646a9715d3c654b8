// SIMD building blocks of the CPU kernels (torch-free), compiled once per ISA.
//
// Not a normal header: mmfast/cpu/instantiate_isas.h includes it (and each family's
// *_impl.h after it) once per ISA, inside `namespace mmfast::cpu::MMFAST_CPU_ISA_NS` with
// MMFAST_VECTOR_BYTES the vector width and the ISA's `#pragma GCC target` in force. So
// everything here is per-ISA code: GCC vector extensions and builtins only (no SIMD
// intrinsics headers, no std templates), and each ISA namespace holds its own copy.
//
// What is here: Vec<acc_t> (acc_t = float or double), VecOf / load_n (other widths), load / store /
// splat, load_floats / store_floats and to_acc_row / from_acc_row (fp32 lanes from and to fp32,
// fp16 and bf16 storage), sum_lanes, a vectorised expf, two register-blocked micro-kernels over tiles of kTile rows
//   tile_matmul:      C[t][:] = A[t][:] @ B        (A: tile x K, B: K x cols)
//   tile_outer_accum: C      += A^T @ B            (A: tile x X, B: tile x Y)
// dot_padded, per-call Scratch memory, pad_matrix and dispatch_dtype. Leading dimensions are padded to
// padded<acc_t>(d), a multiple of the vector width and of kRowBlock, with zeros.
#ifndef MMFAST_CPU_ISA_NS
#error "mmfast/cpu/simd.h is included by mmfast/cpu/instantiate_isas.h only"
#endif

namespace mmfast {
namespace cpu {
namespace MMFAST_CPU_ISA_NS {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
  static constexpr int64_t width = MMFAST_VECTOR_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
  static constexpr int64_t width = MMFAST_VECTOR_BYTES / 8;
};

constexpr int64_t kTile = 32;      // tokens per tile
constexpr int64_t kRowBlock = 4;   // rows of a micro-kernel register block

template <typename acc_t>
inline int64_t padded(int64_t d) {
  return round_up(d, max_i64(Vec<acc_t>::width, kRowBlock));
}

template <typename acc_t>
inline typename Vec<acc_t>::type load(const acc_t* p) {
  typename Vec<acc_t>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// A vector of `bytes` bytes of T, narrower than the ISA's where a kernel wants that (decode_linear's
// M = 1 stream), and its unaligned load.
template <typename T, int bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(bytes)));
};

template <int bytes, typename T>
inline typename VecOf<T, bytes>::type load_n(const T* p) {
  typename VecOf<T, bytes>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store(acc_t* p, typename Vec<acc_t>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// ---- floats from and to storage types, `bytes` bytes of floats at a time -----------------------
// Lane-wise the exact conversions of numeric.h (to_float, to_half, to_bfloat16), branch-free:
// 16-bit caches, weights and activations convert at vector speed (the scalar loops with
// branches ran fp16 kernels 2-7x slower than bf16 ones). Same bits as the scalar functions
// for every input, fp16 NaN payloads excepted where F16C converts (below)
// (tests/cpp/test_decode_cpu.cpp checks all 65,536 halves and bf16s on each path the CPU runs).
template <int bytes>
using FloatsOf = typename VecOf<float, bytes>::type;
template <int bytes>
using WordsOf = typename VecOf<uint32_t, bytes>::type;

template <int bytes>
inline FloatsOf<bytes> as_floats(WordsOf<bytes> w) {
  FloatsOf<bytes> f;
  __builtin_memcpy(&f, &w, sizeof(f));
  return f;
}
template <int bytes>
inline WordsOf<bytes> as_words(FloatsOf<bytes> f) {
  WordsOf<bytes> w;
  __builtin_memcpy(&w, &f, sizeof(w));
  return w;
}
// Lanes where mask is all ones take a, the others b.
template <int bytes>
inline WordsOf<bytes> select_words(WordsOf<bytes> mask, WordsOf<bytes> a, WordsOf<bytes> b) {
  return (a & mask) | (b & ~mask);
}

template <int bytes, typename T>  // T: Half or BFloat16
inline WordsOf<bytes> load_16bit_words(const T* p) {
  typename VecOf<uint16_t, bytes / 2>::type bits;
  __builtin_memcpy(&bits, p, sizeof(bits));
  return __builtin_convertvector(bits, WordsOf<bytes>);
}
template <int bytes, typename T>
inline void store_16bit_words(T* p, WordsOf<bytes> w) {
  const auto bits = __builtin_convertvector(w, typename VecOf<uint16_t, bytes / 2>::type);
  __builtin_memcpy(p, &bits, sizeof(bits));
}

template <int bytes = MMFAST_VECTOR_BYTES>
inline FloatsOf<bytes> load_floats(const float* p) {
  return load_n<bytes>(p);
}
template <int bytes = MMFAST_VECTOR_BYTES>
inline FloatsOf<bytes> load_floats(const BFloat16* p) {
  return as_floats<bytes>(load_16bit_words<bytes>(p) << 16);
}
// F16C's conversions, one instruction per 8 (16 with AVX-512) lanes, in the copies compiled with
// MMFAST_CPU_F16C = 256 (the AVX2 copy) or 512 (the AVX-512 copy): the same values as the
// scalar conversions, rounded to nearest even, except that a NaN may come out quieted or with
// another payload (still a NaN of the same sign).
#if defined(MMFAST_CPU_F16C) && MMFAST_CPU_F16C >= 256
constexpr bool kF16c = true;
#else
constexpr bool kF16c = false;
#endif

template <int bytes>
inline FloatsOf<bytes> f16c_load(const Half* p) {
  FloatsOf<bytes> out;
#if defined(MMFAST_CPU_F16C) && MMFAST_CPU_F16C >= 512
  if constexpr (bytes == 64) {
    typename VecOf<short, 32>::type h;
    __builtin_memcpy(&h, p, sizeof(h));
    return __builtin_ia32_vcvtph2ps512_mask(h, FloatsOf<64>{}, static_cast<unsigned short>(0xffff), 4);
  }
#endif
#if defined(MMFAST_CPU_F16C) && MMFAST_CPU_F16C >= 256
  for (int half = 0; half < bytes / 32; ++half) {
    typename VecOf<short, 16>::type h;
    __builtin_memcpy(&h, p + 8 * half, sizeof(h));
    const FloatsOf<32> part = __builtin_ia32_vcvtph2ps256(h);
    __builtin_memcpy(reinterpret_cast<char*>(&out) + 32 * half, &part, sizeof(part));
  }
#endif
  return out;
}

template <int bytes>
inline void f16c_store(Half* p, FloatsOf<bytes> f) {
#if defined(MMFAST_CPU_F16C) && MMFAST_CPU_F16C >= 512
  if constexpr (bytes == 64) {
    const auto h = __builtin_ia32_vcvtps2ph512_mask(f, 0, typename VecOf<short, 32>::type{},  // 0: to nearest even
                                                    static_cast<unsigned short>(0xffff));
    __builtin_memcpy(p, &h, sizeof(h));
    return;
  }
#endif
#if defined(MMFAST_CPU_F16C) && MMFAST_CPU_F16C >= 256
  for (int half = 0; half < bytes / 32; ++half) {
    FloatsOf<32> part;
    __builtin_memcpy(&part, reinterpret_cast<const char*>(&f) + 32 * half, sizeof(part));
    const auto h = __builtin_ia32_vcvtps2ph256(part, 0);  // 0: to nearest even
    __builtin_memcpy(p + 8 * half, &h, sizeof(h));
  }
#endif
}

template <int bytes = MMFAST_VECTOR_BYTES>
inline FloatsOf<bytes> load_floats(const Half* p) {
  if constexpr (kF16c && bytes % 32 == 0) return f16c_load<bytes>(p);
  using W = WordsOf<bytes>;
  const W h = load_16bit_words<bytes>(p), exponent = h & 0x7c00u;
  W bits = ((h & 0x7fffu) << 13) + ((127u - 15u) << 23);
  bits += W(exponent == 0x7c00u) & ((128u - 16u) << 23);  // inf / NaN: exponent 255
  const W subnormal = as_words<bytes>(as_floats<bytes>(bits + (1u << 23)) - bits_float(113u << 23));
  bits = select_words<bytes>(W(exponent == 0u), subnormal, bits);
  return as_floats<bytes>(bits | ((h & 0x8000u) << 16));
}

template <int bytes = MMFAST_VECTOR_BYTES>
inline void store_floats(float* p, FloatsOf<bytes> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
template <int bytes = MMFAST_VECTOR_BYTES>
inline void store_floats(BFloat16* p, FloatsOf<bytes> v) {
  using W = WordsOf<bytes>;
  const W u = as_words<bytes>(v);
  const W rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest even
  const W quiet_nan = (u >> 16) | 0x40u;
  store_16bit_words<bytes>(p, select_words<bytes>(W((u & 0x7fffffffu) > 0x7f800000u), quiet_nan, rounded));
}
template <int bytes = MMFAST_VECTOR_BYTES>
inline void store_floats(Half* p, FloatsOf<bytes> f) {
  if constexpr (kF16c && bytes % 32 == 0) return f16c_store<bytes>(p, f);
  using W = WordsOf<bytes>;
  const W w = as_words<bytes>(f), shl1_w = w + w, sign = w & 0x80000000u;
  FloatsOf<bytes> base = (as_floats<bytes>(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  W bias = shl1_w & 0xff000000u;
  bias = select_words<bytes>(W(bias < 0x71000000u), W{} + 0x71000000u, bias);
  base = as_floats<bytes>((bias >> 1) + 0x07800000u) + base;
  const W bits = as_words<bytes>(base);
  const W nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  store_16bit_words<bytes>(p, (sign >> 16) | select_words<bytes>(W(shl1_w > 0xff000000u), W{} + 0x7e00u, nonsign));
}

// fp64 rounded to fp32 lane by lane (to nearest even, as float(double)).
template <int bytes = MMFAST_VECTOR_BYTES>
inline FloatsOf<bytes> load_floats(const double* p) {
  typedef double Doubles __attribute__((vector_size(2 * bytes)));
  Doubles d;
  __builtin_memcpy(&d, p, sizeof(d));
  return __builtin_convertvector(d, FloatsOf<bytes>);
}

// dst[0:n] = src[0:n] in the accumulation type (float lanes for fp32 / fp16 / bf16; fp64 as is),
// and back (rounded to nearest even).
template <typename T>
inline void to_acc_row(const T* src, float* dst, int64_t n) {
  constexpr int64_t W = MMFAST_VECTOR_BYTES / 4;
  int64_t i = 0;
  for (; i + W <= n; i += W) store_floats(dst + i, load_floats(src + i));
  for (; i < n; ++i) dst[i] = to_acc(src[i]);
}
inline void to_acc_row(const double* src, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
template <typename T>
inline void from_acc_row(const float* src, T* dst, int64_t n) {
  constexpr int64_t W = MMFAST_VECTOR_BYTES / 4;
  int64_t i = 0;
  for (; i + W <= n; i += W) store_floats(dst + i, load_floats(src + i));
  for (; i < n; ++i) dst[i] = FromAcc<T>::convert(src[i]);
}
inline void from_acc_row(const double* src, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

template <typename acc_t>
inline typename Vec<acc_t>::type splat(acc_t x) {
  typename Vec<acc_t>::type v = {};
  return x - v;  // x - (+0) == x for every x, so this folds to a plain broadcast
}

// exp(x) for a vector of floats: Cephes-style range reduction x = n ln2 + r and a degree-6
// polynomial, within 2 ulp of expf on [-87, 88]; 0 below (expf's denormal tail flushed),
// exp(88) above, NaN for NaN.
inline Vec<float>::type exp_vec(Vec<float>::type x_in) {
  using V = Vec<float>::type;
  using I = int __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
  V x = x_in < splat<float>(-87.0f) ? splat<float>(-87.0f) : x_in;
  x = x > splat<float>(88.0f) ? splat<float>(88.0f) : x;
  const V magic = splat<float>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V shifted = x * splat<float>(1.44269504088896341f) + magic;
  const V n = shifted - magic;
  const V r = (x - n * splat<float>(0.693359375f)) + n * splat<float>(2.12194440e-4f);
  V p = splat<float>(1.9875691500e-4f);
  p = p * r + splat<float>(1.3981999507e-3f);
  p = p * r + splat<float>(8.3334519073e-3f);
  p = p * r + splat<float>(4.1665795894e-2f);
  p = p * r + splat<float>(1.6666665459e-1f);
  p = p * r + splat<float>(5.0000001201e-1f);
  p = p * r * r + r + splat<float>(1.0f);
  I bits;
  __builtin_memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - I{} - 0x4b400000 + 127) << 23;  // 2^n from the integer in shifted's mantissa
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  // Below -87 (-inf included) the result is 0; NaN compares false and stays NaN.
  return x_in < splat<float>(-87.0f) ? splat<float>(0.0f) : p * scale;
}

// exp(x) for a vector of doubles x <= 0 (-inf included), within 1 ulp of the correctly rounded
// exp (tests/cpp/test_decode_cpu.cpp), denormal results included (0 below about -745.13). Cody-Waite reduction x = n ln2 + r (fdlibm's split of ln2,
// n ln2_hi exact), |r| <= ln2 / 2, and the degree-13 Taylor polynomial of e^r (truncation
// error below 1e-17 relative); 2^n applied as 2^(n + 1000) * 2^-1000 below n = -1000 so that a
// denormal result is rounded once.
inline Vec<double>::type exp_vec_nonpositive(Vec<double>::type x_in) {
  using V = Vec<double>::type;
  using L = long long __attribute__((vector_size(MMFAST_VECTOR_BYTES)));
  const V x = x_in < splat<double>(-746.0) ? splat<double>(-746.0) : x_in;
  const V magic = splat<double>(6755399441055744.0);  // 1.5 * 2^52: adding it rounds to an integer
  const V shifted = x * splat<double>(1.4426950408889634074) + magic;
  const V n = shifted - magic;
  const V r = (x - n * splat<double>(6.93147180369123816490e-01)) - n * splat<double>(1.90821492927058770002e-10);
  constexpr double kInverseFactorials[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                           1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                           1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                           1.0 / 24.0,         1.0 / 6.0,         0.5,
                                           1.0,                1.0};  // 1/13! .. 1/0!
  V p = splat<double>(kInverseFactorials[0]);
  for (int i = 1; i < 14; ++i) p = p * r + splat<double>(kInverseFactorials[i]);
  L k;
  __builtin_memcpy(&k, &shifted, sizeof(k));
  k = k - L{} - 0x4338000000000000LL;  // n as an integer, from shifted's mantissa
  const L tiny = k < -1000;
  k = tiny ? k + 1000 : k;
  const L bits = (k + 1023) << 52;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale * (tiny ? splat<double>(0x1p-1000) : splat<double>(1.0));
}

// v as computed: an empty asm that may have rewritten v in memory, so that the compiler rounds a
// product that made v before a later addition uses it (GCC contracts a * b + c into an FMA
// across statements in C++, clang within one expression). For expressions that must round like torch's separate ops. A memory
// operand, not a register one: the test copies use vectors wider than the target's registers.
template <typename T>
inline T rounded(T v) {
  __asm__("" : "+m"(v));
  return v;
}

// True when any lane of a comparison's mask (0 / -1 lanes) is set.
template <typename M>
inline bool any_lane(M mask) {
  constexpr int lanes = sizeof(M) / sizeof(mask[0]);
  decltype(+mask[0]) bits[lanes];
  __builtin_memcpy(bits, &mask, sizeof(mask));
  decltype(+mask[0]) any = 0;
  for (int i = 0; i < lanes; ++i) any |= bits[i];
  return any != 0;
}

// The lanes of a vector of `bytes` bytes summed as a tree, halves added pairwise
// (lanes[i] + lanes[i + lanes / 2], recursively), with register shuffles. The same tree
// through a lane array in memory (or halves taken by memcpy) made GCC keep the accumulators
// on the stack: store-forwarding stalls on every row of decode_linear's M = 1 stream.
// GCC before 12 has no __builtin_shufflevector: the same tree through memory there.
template <typename acc_t, int bytes>
inline acc_t sum_lanes_tree(acc_t __attribute__((vector_size(bytes))) v) {
  constexpr int lanes = bytes / int(sizeof(acc_t));
  static_assert(lanes == 2 || lanes == 4 || lanes == 8 || lanes == 16, "sum_lanes_tree: 2 to 16 lanes");
#if !defined(__clang__) && defined(__GNUC__) && __GNUC__ < 12
  acc_t lane[lanes];
  __builtin_memcpy(lane, &v, bytes);
  for (int half = lanes / 2; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) lane[i] += lane[i + half];
  return lane[0];
#else
  if constexpr (lanes == 2)
    return v[0] + v[1];
  else if constexpr (lanes == 4)
    return sum_lanes_tree<acc_t, bytes / 2>(__builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3));
  else if constexpr (lanes == 8)
    return sum_lanes_tree<acc_t, bytes / 2>(__builtin_shufflevector(v, v, 0, 1, 2, 3) +
                                            __builtin_shufflevector(v, v, 4, 5, 6, 7));
  else
    return sum_lanes_tree<acc_t, bytes / 2>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                                            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#endif
}

template <typename acc_t>
inline acc_t sum_lanes(typename Vec<acc_t>::type v) {
  return sum_lanes_tree<acc_t, MMFAST_VECTOR_BYTES>(v);
}

// ---- micro-kernels -------------------------------------------------------------------

// C[t][0:cols] = sum_k A[t][k] * B[k][0:cols] for t < kTile.
// A: [kTile][lda], B: [inner][ldb], C: [kTile][ldc]; cols and the lds are multiples of
// the vector width.
template <typename acc_t>
void tile_matmul(const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb, int64_t inner, int64_t cols, acc_t* C,
                 int64_t ldc) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  for (int64_t t0 = 0; t0 < kTile; t0 += kRowBlock) {
    int64_t c0 = 0;
    for (; c0 + 2 * W <= cols; c0 += 2 * W) {
      V acc[kRowBlock][2] = {};
      for (int64_t k = 0; k < inner; ++k) {
        const V b0 = load<acc_t>(B + k * ldb + c0);
        const V b1 = load<acc_t>(B + k * ldb + c0 + W);
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const V a = splat<acc_t>(A[(t0 + r) * lda + k]);
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int64_t r = 0; r < kRowBlock; ++r) {
        store<acc_t>(C + (t0 + r) * ldc + c0, acc[r][0]);
        store<acc_t>(C + (t0 + r) * ldc + c0 + W, acc[r][1]);
      }
    }
    for (; c0 < cols; c0 += W) {
      V acc[kRowBlock] = {};
      for (int64_t k = 0; k < inner; ++k) {
        const V b0 = load<acc_t>(B + k * ldb + c0);
        for (int64_t r = 0; r < kRowBlock; ++r) acc[r] += splat<acc_t>(A[(t0 + r) * lda + k]) * b0;
      }
      for (int64_t r = 0; r < kRowBlock; ++r) store<acc_t>(C + (t0 + r) * ldc + c0, acc[r]);
    }
  }
}

// C[x][0:cols] += sum_t A[t][x] * B[t][0:cols] for x < rows (a multiple of kRowBlock).
// A: [kTile][lda], B: [kTile][ldb], C: [rows][ldc].
template <typename acc_t>
void tile_outer_accum(const acc_t* A, int64_t lda, int64_t rows, const acc_t* B, int64_t ldb, int64_t cols, acc_t* C,
                      int64_t ldc) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  for (int64_t x0 = 0; x0 < rows; x0 += kRowBlock) {
    int64_t c0 = 0;
    for (; c0 + 2 * W <= cols; c0 += 2 * W) {
      V acc[kRowBlock][2];
      for (int64_t r = 0; r < kRowBlock; ++r) {
        acc[r][0] = load<acc_t>(C + (x0 + r) * ldc + c0);
        acc[r][1] = load<acc_t>(C + (x0 + r) * ldc + c0 + W);
      }
      for (int64_t t = 0; t < kTile; ++t) {
        const V b0 = load<acc_t>(B + t * ldb + c0);
        const V b1 = load<acc_t>(B + t * ldb + c0 + W);
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const V a = splat<acc_t>(A[t * lda + x0 + r]);
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int64_t r = 0; r < kRowBlock; ++r) {
        store<acc_t>(C + (x0 + r) * ldc + c0, acc[r][0]);
        store<acc_t>(C + (x0 + r) * ldc + c0 + W, acc[r][1]);
      }
    }
    for (; c0 < cols; c0 += W) {
      V acc[kRowBlock];
      for (int64_t r = 0; r < kRowBlock; ++r) acc[r] = load<acc_t>(C + (x0 + r) * ldc + c0);
      for (int64_t t = 0; t < kTile; ++t) {
        const V b0 = load<acc_t>(B + t * ldb + c0);
        for (int64_t r = 0; r < kRowBlock; ++r) acc[r] += splat<acc_t>(A[t * lda + x0 + r]) * b0;
      }
      for (int64_t r = 0; r < kRowBlock; ++r) store<acc_t>(C + (x0 + r) * ldc + c0, acc[r]);
    }
  }
}

// sum_d a[d] * b[d] over a padded length (a multiple of the vector width).
template <typename acc_t>
inline acc_t dot_padded(const acc_t* a, const acc_t* b, int64_t ld) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::width;
  V acc = {};
  for (int64_t d = 0; d < ld; d += W) acc += load<acc_t>(a + d) * load<acc_t>(b + d);
  acc_t lanes[W];
  __builtin_memcpy(lanes, &acc, sizeof(acc));
  acc_t sum = 0;
  for (int64_t i = 0; i < W; ++i) sum += lanes[i];
  return sum;
}

// Per-call scratch of one worker: tiles and padded per-head copies of the state. data is
// 64-byte aligned (malloc gives 16), so full-width vector loads and AMX tile rows at multiples
// of 64 bytes never straddle two cache lines (split loads halve the load throughput), with 64
// bytes of slack past the end. A failed allocation throws (memory.h), as does a size whose
// bytes do not fit size_t.
template <typename acc_t>
struct Scratch {
  acc_t* data = nullptr;
  explicit Scratch(size_t elements) {
    if (elements > (~size_t(0) - 128) / sizeof(acc_t)) throw_scratch_allocation_failed(elements, sizeof(acc_t));
    raw_ = __builtin_malloc(sizeof(acc_t) * elements + 128);
    if (raw_ == nullptr) throw_scratch_allocation_failed(elements, sizeof(acc_t));
    data = reinterpret_cast<acc_t*>((reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t(63));
  }
  ~Scratch() { __builtin_free(raw_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

 private:
  void* raw_ = nullptr;
};

// Copies a dense (rows x cols) matrix into a zero-padded [prow][pcol] buffer, scaled,
// optionally transposed.
template <typename acc_t>
void pad_matrix(const acc_t* src, int64_t rows, int64_t cols, acc_t scale, bool transpose, acc_t* dst,
                int64_t prow, int64_t pcol) {
  __builtin_memset(dst, 0, sizeof(acc_t) * prow * pcol);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      if (transpose)
        dst[c * pcol + r] = src[r * cols + c] * scale;
      else
        dst[r * pcol + c] = src[r * cols + c] * scale;
    }
}

// f(scalar_t{}, acc_t{}) with the storage and accumulator types of `dtype` (Half and
// BFloat16 accumulate in float, double in double); `otherwise` for any other dtype.
template <class R, class F>
R dispatch_dtype(DType dtype, R otherwise, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{}, float{});
    case DType::kFloat16: return f(Half{}, float{});
    case DType::kBFloat16: return f(BFloat16{}, float{});
    case DType::kFloat64: return f(double{}, double{});
  }
  return otherwise;
}

}  // namespace MMFAST_CPU_ISA_NS
}  // namespace cpu
}  // namespace mmfast
