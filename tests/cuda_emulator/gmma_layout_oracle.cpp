// CuTe (CUTLASS 4, whose wgmma kernels run on every Hopper GPU) as the oracle for the wgmma
// layouts that mmfast's kernels and its host emulator assume, checked without a GPU:
//   1. SwizzledTile<bf16, 128, 32> (tile_gemm.cuh) places element (r, c) where CuTe's
//      GMMA::Layout_K_SW64_Atom, tiled to 128 x 32, does;
//   2. gmma_desc_sw64 equals CuTe's make_gmma_desc<Major::K> of each wgmma operand of such a
//      tile (A: 64 rows of a warpgroup, B: all 128; 16-column k-steps) in every field; the start
//      address (which CuTe reads from the shared window, absent in a host program) is the
//      operand's first byte, tile + 64 row0 + 32 k, in both;
//   3. the emulator's descriptor reads (emu::gmma_operand_address) land on CuTe's element;
//   4. the emulator's accumulator layout (emu::wgmma_d_coord) is CuTe's CLayout_64xN of
//      MMA_64x128x16_F32BF16BF16_SS.
// Built and run by tests/test_gmma_layout.py with the nvidia-cutlass wheel's headers. CuTe prints
// "cast_smem_ptr_to_uint not supported" for each host descriptor: expected (see 2).
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "emulator.h"
#include "mmfast/cuda/tile_gemm.cuh"

#include <cstdio>

static int failures = 0;
static void check(bool ok, const char* what, int a, int b, long got, long want) {
  if (!ok && ++failures <= 20) std::printf("MISMATCH %s (%d, %d): mmfast %ld, CuTe %ld\n", what, a, b, got, want);
}

int main() {
  using namespace cute;
  using T = cutlass::bfloat16_t;
  constexpr int kRows = 128, kCols = 32;
  auto layout = tile_to_shape(SM90::GMMA::Layout_K_SW64_Atom<T>{}, make_shape(Int<kRows>{}, Int<kCols>{}));
  alignas(1024) static T cute_buffer[kRows * kCols];
  auto tile = make_tensor(make_smem_ptr(cute_buffer), layout);
  const auto cute_offset = [&](int r, int c) {
    return static_cast<long>(reinterpret_cast<char*>(&tile(r, c)) - reinterpret_cast<char*>(cute_buffer));
  };

  static mmfast::cuda::SwizzledTile<__nv_bfloat16, kRows, kCols> ours;  // 1.
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kCols; ++c) {
      const long got = reinterpret_cast<char*>(ours.at(r, c)) - reinterpret_cast<char*>(ours.v);
      check(got == cute_offset(r, c), "SwizzledTile::at", r, c, got, cute_offset(r, c));
    }

  // 2. and 3.: each operand of the NT tile GEMM's wgmmas, by its first row and k-step.
  const auto check_operand = [&](auto rows, int row0, int k) {
    auto operand = local_tile(tile, make_shape(rows, Int<16>{}), make_coord(row0 / int(rows), k));
    const GmmaDescriptor theirs = SM90::GMMA::make_gmma_desc<SM90::GMMA::Major::K>(operand);
    const long start = reinterpret_cast<const char*>(raw_pointer_cast(operand.data())) -
                       reinterpret_cast<const char*>(cute_buffer);
    const uint32_t address = 64u * row0 + 32u * k;  // our start: the tile at shared address 0
    GmmaDescriptor mine(mmfast::cuda::gmma_desc_sw64(address));
    check(start == address, "operand start", row0, k, address, start);
    check(mine.bitfield.layout_type_ == theirs.bitfield.layout_type_, "layout type", row0, k,
          mine.bitfield.layout_type_, theirs.bitfield.layout_type_);
    check(mine.bitfield.leading_byte_offset_ == theirs.bitfield.leading_byte_offset_, "leading byte offset", row0, k,
          mine.bitfield.leading_byte_offset_, theirs.bitfield.leading_byte_offset_);
    check(mine.bitfield.stride_byte_offset_ == theirs.bitfield.stride_byte_offset_, "stride byte offset", row0, k,
          mine.bitfield.stride_byte_offset_, theirs.bitfield.stride_byte_offset_);
    check(mine.bitfield.base_offset_ == theirs.bitfield.base_offset_, "base offset", row0, k,
          mine.bitfield.base_offset_, theirs.bitfield.base_offset_);
    for (int i = 0; i < int(rows); ++i)
      for (int kk = 0; kk < 16; ++kk) {
        const long read = emu::gmma_operand_address(mine.desc_, i, kk);
        check(read == cute_offset(row0 + i, 16 * k + kk), "emulated descriptor read", row0 + i, 16 * k + kk, read,
              cute_offset(row0 + i, 16 * k + kk));
      }
  };
  for (int k = 0; k < kCols / 16; ++k) {
    check_operand(Int<64>{}, 0, k);   // A of warpgroup 0
    check_operand(Int<64>{}, 64, k);  // A of warpgroup 1
    check_operand(Int<128>{}, 0, k);  // B
  }

  // 4. CLayout: (thread, value) -> m + 64 n.
  using Traits = MMA_Traits<SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<SM90::GMMA::Major::K, SM90::GMMA::Major::K>>;
  const auto clayout = typename Traits::CLayout{};
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < 64; ++v) {
      const int index = clayout(t, v);
      const auto [row, col] = emu::wgmma_d_coord(t, v);
      check(row == index % 64 && col == index / 64, "accumulator (thread, value)", t, v, row + 64L * col, index);
    }

  std::printf("%s: %d mismatches\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
