// AMX tile building blocks (torch-free), for kernels compiled inside a
// `#pragma GCC target("amx-tile,amx-bf16,...")` region after <immintrin.h>, and called only
// when mmfast::cpu::amx_bf16_active() (mmfast/cpu/isa.h) says the CPU and OS allow the tiles.
//
// Every tile used here has one shape: 16 rows of 64 bytes (16 x 32 bf16 operands, or
// 16 x 16 fp32 sums), so one configuration serves all eight tiles. The configuration is per
// thread: load it at the start of each parallel range and release the tiles at its end.
#pragma once

#include <cstdint>

namespace mmfast {
namespace cpu {
namespace amx {

constexpr int64_t kTileRows = 16;   // rows of every tile
constexpr int64_t kTileBytes = 64;  // bytes of every tile row
constexpr int64_t kBf16PerRow = kTileBytes / 2;

// The 64-byte operand of LDTILECFG (Intel SDM vol. 2, "LDTILECFG"), palette 1.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 as 16 x 64 B, for the calling thread; undo with _tile_release().
inline void configure_all_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = kTileBytes, config.rows[t] = kTileRows;
  _tile_loadconfig(&config);
}

// Element (pair k, column n, half h) of a bf16 B tile in VNNI order: row k holds, for each of
// the 16 columns, the two operands 2k and 2k + 1 that TDPBF16PS multiplies with A's row pair.
constexpr int64_t vnni_offset(int64_t k, int64_t n, int64_t h) { return k * kBf16PerRow + n * 2 + h; }

}  // namespace amx
}  // namespace cpu
}  // namespace mmfast
