// bf16 vq_quantize on AMX tiles (torch-free). The fused GEMM + argmin of mmfast/cpu/vq_impl.h
// with its products done by TDPBF16PS (exact bf16 products, fp32 sums): one instruction
// multiplies a 16 x 32 tile of z by 32 x 16 codes. Used only when amx_bf16_active()
// (mmfast/cpu/isa.h) and D > kVectorMaxDim; other dtypes, dims and CPUs take vq_impl.h's
// kernels, whose split over codes, combine and row rules (compiled here once more, namespace
// isa_amx) this kernel shares.
//
// The score constant rides in the GEMM: each code gets three more dims holding -||e||^2 / 2
// split into bf16 hi + mid + lo (exact to fp32's 24 bits) and each row of z three dims of 1,
// so a sum is s_c = z . e_c - ||e_c||^2 / 2 and the nearest code is the largest s_c
// (score = -2 s_c exactly). A small D (up to 29) pads to the 32-dim tile step anyway, so
// the constant costs nothing there, and the argmax needs no per-code arithmetic: a chunk of
// 32 rows x 256 codes of sums is stored (32 KB, in L1), each row's chunk maximum is taken with
// one vector max per 16 codes (a NaN never wins), and only when it beats the row's best is
// the chunk searched again for its lowest code. Codes are visited in increasing order and only
// a strictly larger sum wins, so ties keep the lowest index, as in vq_impl.h.
//
// Layout: the codebook is packed per call into panels of 32 codes, each two B tiles of 16
// codes in VNNI order, [panel][half][dim pair][16 codes][2], with D + 3 zero-padded to a
// multiple of 32; rows of z are copied into a zero-padded bf16 block. A step of 32 dims loads
// two A tiles (32 rows) and two B tiles (32 codes) into four TDPBF16PS (32 x 32 sums).
#include "mmfast/cpu/vq.h"

#if MMFAST_CPU_AMX_COMPILED

#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "mmfast/common.h"
#include "mmfast/cpu/memory.h"
#include "mmfast/cpu/numeric.h"
#include "mmfast/cpu/parallel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,amx-tile,amx-bf16")
#include "mmfast/cpu/amx.h"
#define MMFAST_CPU_ISA_NS isa_amx
#define MMFAST_VECTOR_BYTES 64
#include "mmfast/cpu/simd.h"
#include "mmfast/cpu/vq_impl.h"

namespace mmfast {
namespace cpu {
namespace isa_amx {
namespace vq_amx {

using vq::Plan;

constexpr int64_t kPanelCodes = vq::panel_codes<float>();  // 32 = two B tiles
constexpr int64_t kBlockRows = 2 * amx::kTileRows;         // two A tiles
constexpr int64_t kStepDims = amx::kBf16PerRow;            // dims of one tile step
constexpr int64_t kTaskRows = 4 * kBlockRows;              // rows sharing one pass over a code block
constexpr int64_t kChunkPanels = 8;                        // sums kept for one argmax pass: 32 KB
constexpr int64_t kCodeBlockBytes = 128 * 1024;            // bf16 codes a task walks before its next rows (L2)
constexpr int64_t kNormDims = 3;                           // -||e||^2 / 2 as bf16 hi + mid + lo
constexpr uint16_t kBf16One = 0x3f80;
static_assert(kPanelCodes == 2 * amx::kTileRows, "a panel is two B tiles of 16 codes");

inline int64_t padded_dim(int64_t dim) { return round_up(dim + kNormDims, kStepDims); }
// vq_impl.h's plan with bf16 codes of padded_dim dims (its bias area stays unused: the
// constant is folded into the codes).
inline Plan<float> plan_of(const VQParams& p) {
  return Plan<float>(p, 2 * padded_dim(p.dim), kTaskRows, kCodeBlockBytes);
}

// The running maximum of one row's sums and its (lowest) code.
struct RowBest {
  float value;
  int64_t index;
};

// x as bf16 hi, mid, lo with hi + mid + lo == x (for finite x; differences are exact in fp32).
inline void split_three(float x, uint16_t* parts) {
  const BFloat16 hi = to_bfloat16(x);
  const BFloat16 mid = to_bfloat16(x - to_float(hi));
  const BFloat16 lo = to_bfloat16(x - to_float(hi) - to_float(mid));
  parts[0] = hi.bits, parts[1] = mid.bits, parts[2] = lo.bits;
}

// Panels [begin, end) of the codebook in VNNI order, with the folded constant; padding codes
// get -inf (and no NaN), so they never win.
struct PackJob {
  const VQParams* p;
  uint16_t* packed;

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<PackJob*>(ctx);
    const auto& p = *job.p;
    const BFloat16* codebook = static_cast<const BFloat16*>(p.codebook);
    const float* given = static_cast<const float*>(p.codebook_sqnorm);
    const int64_t dp = padded_dim(p.dim);
    for (int64_t panel = begin; panel < end; ++panel)
      for (int64_t half = 0; half < 2; ++half) {
        uint16_t* tiles = job.packed + (panel * 2 + half) * dp * amx::kTileRows;  // dp / 2 rows of 32
        for (int64_t j = 0; j < amx::kTileRows; ++j) {
          const int64_t code = panel * kPanelCodes + half * amx::kTileRows + j;
          const bool real = code < p.codes;
          float norm = 0;
          for (int64_t d = 0; d < dp; ++d) {
            const BFloat16 x = real && d < p.dim ? codebook[code * p.dim + d] : BFloat16{0};
            tiles[amx::vnni_offset(d / 2, j, d % 2)] = x.bits;
            if (given == nullptr) norm += to_float(x) * to_float(x);  // a serial chain: only when needed
          }
          uint16_t constant[kNormDims] = {to_bfloat16(-__builtin_inff()).bits, 0, 0};
          if (real) split_three(-0.5f * (given != nullptr ? given[code] : norm), constant);
          for (int64_t i = 0; i < kNormDims; ++i)
            tiles[amx::vnni_offset((p.dim + i) / 2, j, (p.dim + i) % 2)] = constant[i];
        }
      }
  }
};

struct QuantizeJob {
  const VQParams* p;
  Plan<float> plan;
  const uint16_t* packed;

  // Rows r0 .. r0 + count of z as bf16 bits, then 1s for the folded constant, zero-padded to
  // dp dims and whole blocks of rows.
  static void load_rows(const VQParams& p, int64_t r0, int64_t count, uint16_t* zbuf) {
    const BFloat16* z = static_cast<const BFloat16*>(p.z);
    const int64_t dp = padded_dim(p.dim);
    for (int64_t r = 0; r < round_up(count, kBlockRows); ++r)
      for (int64_t d = 0; d < dp; ++d)
        zbuf[r * dp + d] = r >= count ? uint16_t(0)
                           : d < p.dim ? z[(r0 + r) * p.z_row_stride + d].bits
                           : d < p.dim + kNormDims ? kBf16One : uint16_t(0);
  }

  // The two A tiles of the rows at zrows, dims s .. s + 31.
  void load_a(const uint16_t* zrows, int64_t s) const {
    const int64_t dp = padded_dim(p->dim);
    _tile_loadd(4, zrows + s, 2 * dp);
    _tile_loadd(5, zrows + amx::kTileRows * dp + s, 2 * dp);
  }

  // The 32 x 32 sums of the rows at zrows and panel `panel`, stored at sums (row stride ld
  // floats). With one step (D <= 29) the caller loads the A tiles once for all panels.
  void block_sums(const uint16_t* zrows, int64_t panel, float* sums, int64_t ld) const {
    const int64_t dp = padded_dim(p->dim);
    const uint16_t* b0 = packed + panel * 2 * dp * amx::kTileRows;
    const uint16_t* b1 = b0 + dp * amx::kTileRows;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < dp; s += kStepDims) {
      const int64_t b_step = (s / 2) * amx::kBf16PerRow;  // 16 pair rows per step
      if (dp > kStepDims) load_a(zrows, s);
      _tile_loadd(6, b0 + b_step, amx::kTileBytes);
      _tile_loadd(7, b1 + b_step, amx::kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    const int64_t stride = ld * int64_t(sizeof(float));
    _tile_stored(0, sums, stride);
    _tile_stored(1, sums + amx::kTileRows, stride);
    _tile_stored(2, sums + amx::kTileRows * ld, stride);
    _tile_stored(3, sums + amx::kTileRows * ld + amx::kTileRows, stride);
  }

  // best = the larger of best and the `width` sums of one row (codes first_code ..); only a
  // strictly larger sum wins, and within the chunk the lowest code holding it.
  static void update_best(const float* sums, int64_t width, int64_t first_code, RowBest& best) {
    using V = Vec<float>::type;
    V top0 = splat<float>(-__builtin_inff()), top1 = top0;
    for (int64_t j = 0; j < width; j += 32) {
      const V x0 = load<float>(sums + j), x1 = load<float>(sums + j + 16);
      top0 = x0 > top0 ? x0 : top0;  // one VMAXPS each; a NaN sum compares false and is never taken
      top1 = x1 > top1 ? x1 : top1;
    }
    const V top = top1 > top0 ? top1 : top0;
    if (_mm512_cmp_ps_mask(__m512(top), _mm512_set1_ps(best.value), _CMP_GT_OQ) == 0) return;  // the usual case
    float value = top[0];
    for (int64_t i = 1; i < 16; ++i) value = top[i] > value ? top[i] : value;
    const __m512 wanted = _mm512_set1_ps(value);
    int64_t j = 0;
    __mmask16 hit;
    while ((hit = _mm512_cmp_ps_mask(_mm512_load_ps(sums + j), wanted, _CMP_EQ_OQ)) == 0) j += 16;
    best.value = value;
    best.index = first_code + j + __builtin_ctz(hit);
  }

  void search(int64_t split, int64_t rows, const uint16_t* zbuf, RowBest* best) const {
    const int64_t dp = padded_dim(p->dim);
    const int64_t c0 = plan.code_blocks * split / plan.splits, c1 = plan.code_blocks * (split + 1) / plan.splits;
    alignas(64) float sums[kBlockRows * kChunkPanels * kPanelCodes];
    for (int64_t block = c0; block < c1; ++block) {
      const int64_t p0 = block * plan.block_panels, p1 = min_i64(plan.panels, p0 + plan.block_panels);
      for (int64_t m = 0; m < rows; m += kBlockRows) {
        if (dp == kStepDims) load_a(zbuf + m * dp, 0);
        for (int64_t chunk = p0; chunk < p1; chunk += kChunkPanels) {
          const int64_t width = min_i64(kChunkPanels, p1 - chunk) * kPanelCodes;
          for (int64_t panel = chunk; panel < chunk + width / kPanelCodes; ++panel)
            block_sums(zbuf + m * dp, panel, sums + (panel - chunk) * kPanelCodes, width);
          for (int64_t r = 0; r < kBlockRows; ++r)
            update_best(sums + r * width, width, chunk * kPanelCodes, best[m + r]);
        }
      }
    }
  }

  static void run(void* ctx, int64_t begin, int64_t end) {
    const auto& job = *static_cast<QuantizeJob*>(ctx);
    const auto& p = *job.p;
    Scratch<uint16_t> zbuf(kTaskRows * padded_dim(p.dim));
    RowBest best[kTaskRows];
    amx::configure_all_tiles();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_task = task / job.plan.splits, split = task % job.plan.splits;
      const int64_t r0 = row_task * kTaskRows, rows = min_i64(kTaskRows, p.rows - r0);
      load_rows(p, r0, rows, zbuf.data);
      for (auto& b : best) b = RowBest{-__builtin_inff(), 0};
      job.search(split, rows, zbuf.data, best);
      for (int64_t r = 0; r < rows; ++r)  // score = sqnorm - 2 z . e = -2 s (+inf when nothing won)
        vq::record_score<BFloat16, float>(p, job.plan, split, r0 + r, -2.0f * best[r].value, best[r].index);
    }
    _tile_release();
  }
};

// Dims up to which vq_impl.h's AVX-512 kernel (bf16 converted on load) beats the tiles. The tile
// kernel's rate is flat for D <= 29 (one TDPBF16PS step, bound by storing and scanning the
// sums), the vector kernel's falls as 1/D; one Sapphire Rapids-class core, bf16, paired: the
// vector kernel 2.07x at D = 4, 1.06-1.32x at D = 8; the tiles 1.21x at D = 12, 1.78x at D = 16.
constexpr int64_t kVectorMaxDim = 8;

inline bool on_tiles(const VQParams& p) { return p.dtype == DType::kBFloat16 && p.dim > kVectorMaxDim; }

size_t quantize_workspace_bytes(const VQParams& p) {
  return on_tiles(p) ? plan_of(p).bytes : vq::quantize_workspace_bytes(p);
}

const char* quantize(const VQParams& p) {
  if (!on_tiles(p)) return vq::quantize(p);
  if (p.rows == 0) return nullptr;
  const Plan<float> plan = plan_of(p);
  if (p.workspace_bytes < plan.bytes) return "vq_quantize: workspace too small";
  uint16_t* packed = plan.at<uint16_t>(p, plan.packed_offset);
  PackJob pack{&p, packed};
  parallel_for(plan.panels, &pack, &PackJob::run);
  QuantizeJob job{&p, plan, packed};
  parallel_for(plan.row_tasks * plan.splits, &job, &QuantizeJob::run);
  if (plan.splits > 1) {
    vq::CombineJob<BFloat16, float> combine{&p, plan};
    parallel_for(p.rows, &combine, &vq::CombineJob<BFloat16, float>::run);
  }
  return nullptr;
}

}  // namespace vq_amx

VQKernels vq_amx_kernels() { return {&vq_amx::quantize_workspace_bytes, &vq_amx::quantize, &vq::dequantize}; }

}  // namespace isa_amx
}  // namespace cpu
}  // namespace mmfast

#undef MMFAST_CPU_ISA_NS
#undef MMFAST_VECTOR_BYTES
#pragma GCC pop_options

#else  // no AMX kernels in this build: amx_bf16_active() is false and this table is never used

namespace mmfast {
namespace cpu {
namespace isa_amx {
VQKernels vq_amx_kernels() { return isa_generic::vq_kernels(); }
}  // namespace isa_amx
}  // namespace cpu
}  // namespace mmfast

#endif
