// The emulator's own checks: what the hardware allows or refuses must show up here too, or a
// kernel relying on the difference would pass CI and fail on a GPU. A planted race (a shuffle in
// place of a barrier) must be seen; launches a GPU refuses must be refused. Argument: the case
// level (unused: every case is quick).
#include "emulator.h"
#include "test_support.h"

#include <sys/wait.h>
#include <unistd.h>

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

__global__ void empty_kernel(int) {}

// The exit status of a child process that runs `launch` (the emulator ends a refused launch with
// exit(2) and an "EMU ERROR" line, which shows in this test's output on purpose).
int exit_status_of(void (*launch)()) {
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid == 0) {
    launch();
    std::fflush(stdout);
    std::_Exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

void check_launch_limits() {
  struct Case {
    const char* what;
    void (*launch)();
    int status;
  };
  const Case cases[] = {
      {"128 threads per block", [] { MMFAST_LAUNCH(empty_kernel, 1, 128, 0, nullptr, 0); }, 2},
      {"60 KB of dynamic shared memory without the opt-in",
       [] { MMFAST_LAUNCH(empty_kernel, 1, 256, 60 * 1024, nullptr, 0); }, 2},
      {"60 KB after cudaFuncSetAttribute to 60 KB",
       [] {
         cudaFuncSetAttribute(reinterpret_cast<const void*>(&empty_kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              60 * 1024);
         MMFAST_LAUNCH(empty_kernel, 1, 256, 60 * 1024, nullptr, 0);
       },
       0},
      {"past the device's opt-in limit", [] { MMFAST_LAUNCH(empty_kernel, 1, 256, 300 * 1024, nullptr, 0); }, 2},
  };
  std::printf("launches the hardware refuses (each EMU ERROR below is expected):\n");
  for (const Case& c : cases) {
    const int status = exit_status_of(c.launch);
    if (status != c.status)
      fail(std::string("launch with ") + c.what + ": exit status " + std::to_string(status) + ", expected " +
           std::to_string(c.status));
  }
}

int stale_reads(bool barrier) {
  int stale = 0;
  for (int i = 0; i < kLaunches; ++i)
    MMFAST_LAUNCH(shuffle_then_read_kernel, 1, 256, 32 * sizeof(int), nullptr, &stale, barrier);
  return stale;
}

}  // namespace

int main(int, char**) {
  check_launch_limits();
  const int without = stale_reads(false), with = stale_reads(true);
  if (without == 0) fail("a shuffle made warp 0's shared-memory writes visible to warp 1 (a block barrier)");
  if (with != 0) fail("stale reads after __syncthreads: " + std::to_string(with));
  std::printf("stale reads without a barrier: %d (of %d), with one: %d\n", without,
              kLaunches * static_cast<int>(emu::emu_blocks) * 32, with);
  std::printf("%s: %d failures\n", nfail ? "FAILED" : "passed", nfail);
  return nfail ? 1 : 0;
}
