// The emulator's own checks: a race the hardware allows must show up here too, or a kernel
// relying on it would pass CI and fail on a GPU. Each case plants one and counts what the
// emulated blocks saw. Argument: the case level (unused: every case is quick).
#include "emulator.h"
#include "test_support.h"

namespace {

constexpr int kLaunches = 20;  // x emu_blocks blocks: enough schedules for a planted race to show

// Warp 0 writes one int per lane into shared memory, every warp passes one full-mask shuffle,
// then warp 1 reads warp 0's ints. A shuffle synchronises a warp, not the block: without
// __syncthreads warp 1 may read before warp 0 writes (the dynamic shared memory starts as 0xff).
// The emulator made every shuffle a block barrier until 2026-12-06, which hid exactly this.
__global__ void shuffle_then_read_kernel(int* stale, bool barrier) {
  MMFAST_DYNAMIC_SHARED(smem);
  int* slot = reinterpret_cast<int*>(smem);
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  if (warp == 0) slot[lane] = 1000 + lane;
  const int partner = __shfl_xor_sync(0xffffffffu, lane, 1);
  if (barrier) __syncthreads();
  if (warp == 1 && (slot[lane] != 1000 + lane || partner != (lane ^ 1))) atomicAdd(stale, 1);
}

int stale_reads(bool barrier) {
  int stale = 0;
  for (int i = 0; i < kLaunches; ++i)
    MMFAST_LAUNCH(shuffle_then_read_kernel, 1, 256, 32 * sizeof(int), nullptr, &stale, barrier);
  return stale;
}

}  // namespace

int main(int, char**) {
  const int without = stale_reads(false), with = stale_reads(true);
  if (without == 0) fail("a shuffle made warp 0's shared-memory writes visible to warp 1 (a block barrier)");
  if (with != 0) fail("stale reads after __syncthreads: " + std::to_string(with));
  std::printf("stale reads without a barrier: %d (of %d), with one: %d\n", without,
              kLaunches * static_cast<int>(emu::emu_blocks) * 32, with);
  std::printf("%s: %d failures\n", nfail ? "FAILED" : "passed", nfail);
  return nfail ? 1 : 0;
}
