// The pool behind glue/cpu_output_pool.h. Blocks are mapped by mmfast itself (from 8 MiB:
// 2 MiB-aligned, advised huge pages unless MMFAST_CPU_HUGE_PAGES=0), handed out through a
// c10::Allocator (so a pooled tensor's storage stays resizable) and come back through the DataPtr's deleter, from
// whichever thread frees the tensor. A request takes the smallest idle block that holds it with
// at most 1/8 to spare (a UNet's outputs repeat a few sizes; a much larger block would hold
// memory the output does not use), else a fresh one. A returned block is kept while the idle
// bytes stay within the budget, the oldest idle blocks unmapped to make room; a block larger
// than the whole budget is unmapped at once. The budget starts at MMFAST_CPU_OUTPUT_POOL_MB
// (read once; default 512) and is set by mmfast.memory.cpu_output_pool. Where mmap fails, the
// idle blocks are released and the mapping tried once more, then torch's allocator serves the
// output (warned once). Reused blocks hold old values: every op writes its pooled output whole.
#include "glue/cpu_output_pool.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <deque>
#include <mutex>

#include "glue/common.h"
#include "mmfast/cpu/memory.h"

namespace mmfast {
namespace glue {
namespace {

constexpr int64_t kDefaultBudgetMb = 512;

// Blocks under kHugePageAdviceMinBytes are mapped in multiples of this, larger ones in 2 MiB.
constexpr size_t kSmallBlockGranule = size_t(64) << 10;

struct Block {
  void* data;
  size_t capacity;  // a multiple of kSmallBlockGranule (under 8 MiB) or of kHugePageBytes
};

int64_t initial_budget_mb() {
  return budget_mb_from_env("MMFAST_CPU_OUTPUT_POOL_MB", kDefaultBudgetMb, "no output blocks kept");
}

class OutputBlockPool final : public c10::Allocator {
 public:
  // Never destroyed: tensors freed during static destruction still return their blocks.
  static OutputBlockPool& instance() {
    static OutputBlockPool* pool = new OutputBlockPool();
    return *pool;
  }

  int64_t budget_mb() {
    std::lock_guard<std::mutex> lock(mutex_);
    return budget_mb_;
  }

  c10::DataPtr allocate(size_t bytes) override {
    const bool huge = bytes >= mmfast::cpu::kHugePageAdviceMinBytes;
    const size_t granule = huge ? mmfast::cpu::kHugePageBytes : kSmallBlockGranule;
    const size_t capacity = (bytes + granule - 1) & ~(granule - 1);
    Block block = take_idle(capacity);
    if (block.data == nullptr) block = {mmfast::cpu::map_block(capacity, huge && huge_page_outputs()), capacity};
    if (block.data == nullptr) {  // the system refused: give the idle blocks back and try once more
      control(-1, true);
      block = {mmfast::cpu::map_block(capacity, huge && huge_page_outputs()), capacity};
    }
    if (block.data == nullptr) {
      TORCH_WARN_ONCE("mmfast: could not map a ", capacity, "-byte CPU output block; this output and any other ",
                      "the pool cannot map come from torch's CPU allocator instead");
      return c10::GetDefaultCPUAllocator()->allocate(bytes);  // its own deleter: never comes back here
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += block.capacity;
    }
    return {block.data, new Block(block), &OutputBlockPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  std::vector<int64_t> control(int64_t budget_mb, bool clear) {
    std::vector<Block> unmap;
    std::vector<int64_t> before;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      before = {static_cast<int64_t>(idle_.size()), static_cast<int64_t>(idle_bytes_),
                static_cast<int64_t>(live_bytes_), budget_mb_};
      if (budget_mb >= 0) budget_mb_ = std::min(budget_mb, kMaxBudgetMb);
      evict_until_fits(clear ? SIZE_MAX : 0, unmap);
    }
    for (const Block& b : unmap) mmfast::cpu::unmap_block(b.data, b.capacity);
    return before;
  }

 private:
  OutputBlockPool() : budget_mb_(initial_budget_mb()) { hold_across_fork<&OutputBlockPool::instance_lock>(); }
  static std::mutex& instance_lock() { return instance().mutex_; }

  static void release(void* context) {
    const Block block = *static_cast<Block*>(context);
    delete static_cast<Block*>(context);
    instance().give_back(block);
  }

  void give_back(const Block& block) {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ -= block.capacity;
      if (block.capacity > budget_bytes()) {
        unmap.push_back(block);
      } else {
        evict_until_fits(block.capacity, unmap);
        idle_.push_back(block);
        idle_bytes_ += block.capacity;
      }
    }
    for (const Block& b : unmap) mmfast::cpu::unmap_block(b.data, b.capacity);  // outside the lock
  }

  // The smallest idle block of capacity..capacity * 9/8 bytes, removed from the pool; or none.
  Block take_idle(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if (it->capacity >= capacity && it->capacity - capacity <= capacity / 8 &&
          (best == idle_.end() || it->capacity < best->capacity))
        best = it;
    if (best == idle_.end()) return {nullptr, 0};
    const Block block = *best;
    idle_.erase(best);
    idle_bytes_ -= block.capacity;
    return block;
  }

  size_t budget_bytes() const { return static_cast<size_t>(budget_mb_) << 20; }

  // Moves the oldest idle blocks to `unmap` until `incoming` more bytes fit the budget (all of
  // them when incoming exceeds it). Caller holds the lock.
  void evict_until_fits(size_t incoming, std::vector<Block>& unmap) {
    while (!idle_.empty() && (incoming > budget_bytes() || idle_bytes_ + incoming > budget_bytes())) {
      unmap.push_back(idle_.front());
      idle_bytes_ -= idle_.front().capacity;
      idle_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Block> idle_;  // oldest first
  size_t idle_bytes_ = 0, live_bytes_ = 0;
  int64_t budget_mb_;
};

}  // namespace

at::Tensor pooled_cpu_empty(at::IntArrayRef shape, at::ScalarType dtype) {
#if defined(MMFAST_HAS_MMAP)
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  OutputBlockPool& pool = OutputBlockPool::instance();
  if (bytes < kPooledOutputMinBytes || pool.budget_mb() == 0) return at::Tensor();
  return at::detail::empty_generic(shape, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, c10::nullopt);
#else
  (void)shape, (void)dtype;
  return at::Tensor();  // no mmap (e.g. Windows): torch's allocator
#endif
}

std::vector<int64_t> cpu_output_pool(int64_t budget_mb, bool clear) {
  return OutputBlockPool::instance().control(budget_mb, clear);
}

}  // namespace glue
}  // namespace mmfast
