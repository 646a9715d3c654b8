// The masked ops' static plan: packed weights kept across calls (CPU: one code's kept rows and
// columns, csrc/cpu/pruned.cpp; CUDA: every code's in the packed path's layout,
// csrc/cuda/pruned.cu). One process-wide cache and budget for both.
//
// APTP's codes and expert weights do not change over a sampling run (25-50 denoising steps, each
// calling every layer), so a packed weight is made once and kept. Key: the source weight's
// storage, held weakly (its StorageImpl is not freed while we hold it, so no later tensor can
// share the address), storage offset and a tag (the code; -1 for every code). An entry is
// served while every source it was made from (the weight; on CUDA also both masks) still has
// the same storage, offset, shape, dtype and version counter (an in-place op on the tensor or a
// view of it is a new version), and its signature (the CPU: the code's kept channels) matches.
// Writes through an alias with a counter of its own (`.data`, as gradcheck makes, `.numpy()`,
// DLPack, `set_`, the untyped storage) are not seen: the reason it is opt-in. The budget (MiB,
// 0 = off) starts at MMFAST_PRUNED_WEIGHT_CACHE_MB (read once, default 0) and is set by
// mmfast.ops.keep_packed_weights through pruned_weight_cache. When full, further weights are
// packed per call instead of evicting others (a UNet visits its layers in a cycle, where
// least-recently-used eviction would miss every time). Entries of freed weights are dropped on
// the next insertion or by a clear. Inference tensors (no version counter) and non-contiguous
// sources (copied per call, so a new storage each time) are packed per call.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "glue/common.h"

namespace mmfast {
namespace glue {

class PackedWeightCache {
 public:
  // Never destroyed (as the CPU output pool): destroyed at exit, its CUDA entries would be freed
  // after the CUDA runtime and torch's caching allocator may already be gone.
  static PackedWeightCache& instance() {
    static PackedWeightCache* cache = new PackedWeightCache();
    return *cache;
  }

  // The packed tensor kept for (sources, tag, signature), or pack(true) now, kept when there is
  // room (needed bytes), else pack(false) (the caller may then pack into scratch). sources[0] is
  // the weight (the key).
  template <class Pack>
  at::Tensor get(const std::vector<at::Tensor>& sources, int64_t tag, const std::vector<int64_t>& signature,
                 size_t needed, Pack pack) {
    const size_t budget = size_t(budget_mb_.load()) << 20;
    const bool keepable = std::all_of(sources.begin(), sources.end(), [](const at::Tensor& t) {
      return !t.is_inference() && t.is_contiguous();
    });
    if (budget != 0 && needed != 0 && keepable) {
      const at::Tensor& weight = sources.front();
      const Key key{weight.storage().unsafeGetStorageImpl(), weight.storage_offset(), tag};
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = entries_.find(key);
      if (it != entries_.end()) {
        if (it->second.matches(sources, signature)) return it->second.packed;
        bytes_ -= it->second.packed.nbytes();
        entries_.erase(it);  // stale: a source was updated in place, or the masks changed
      }
      drop_freed();
      if (bytes_ + needed <= budget) {
        Entry entry;
        for (const at::Tensor& t : sources) entry.stamps.push_back(Stamp::of(t));
        entry.signature = signature;
        entry.packed = pack(true);
        bytes_ += entry.packed.nbytes();
        return entries_.emplace(key, std::move(entry)).first->second.packed;
      }
    }
    return pack(false);  // per call (outside the lock)
  }

  // (entries, bytes, budget in MiB) before setting the budget (when budget_mb >= 0) and clearing.
  std::vector<int64_t> control(int64_t budget_mb, bool clear) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int64_t> before{static_cast<int64_t>(entries_.size()), static_cast<int64_t>(bytes_),
                                budget_mb_.load()};
    if (budget_mb >= 0) budget_mb_.store(std::min<int64_t>(budget_mb, kMaxBudgetMb));
    if (clear) entries_.clear(), bytes_ = 0;
    return before;
  }

 private:
  struct Key {
    const void* storage;
    int64_t offset, tag;
    bool operator==(const Key& o) const { return storage == o.storage && offset == o.offset && tag == o.tag; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.storage) ^ (std::hash<int64_t>()(k.offset) * 31) ^
             (std::hash<int64_t>()(k.tag) * 1000003);
    }
  };
  // What an entry was made from: one source tensor as it was then.
  struct Stamp {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t offset;
    std::vector<int64_t> sizes;
    at::ScalarType dtype;
    int64_t version;

    static Stamp of(const at::Tensor& t) {
      return {t.storage().getWeakStorageImpl(), t.storage_offset(), t.sizes().vec(), t.scalar_type(), t._version()};
    }
    bool matches(const at::Tensor& t) const {
      return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
             t.storage_offset() == offset && t.sizes() == at::IntArrayRef(sizes) && t.scalar_type() == dtype &&
             t._version() == version;
    }
  };
  struct Entry {
    std::vector<Stamp> stamps;
    std::vector<int64_t> signature;
    at::Tensor packed;

    bool matches(const std::vector<at::Tensor>& sources, const std::vector<int64_t>& sig) const {
      if (sources.size() != stamps.size() || sig != signature) return false;
      for (size_t i = 0; i < sources.size(); ++i)
        if (!stamps[i].matches(sources[i])) return false;
      return true;
    }
    bool expired() const {  // a source freed: the entry can never match again
      return std::any_of(stamps.begin(), stamps.end(), [](const Stamp& st) { return st.storage.expired(); });
    }
  };

  PackedWeightCache() : budget_mb_(initial_budget_mb()) { hold_across_fork<&PackedWeightCache::instance_lock>(); }
  static std::mutex& instance_lock() { return instance().mutex_; }

  // MMFAST_PRUNED_WEIGHT_CACHE_MB (unset or empty: 0).
  static int64_t initial_budget_mb() {
    return budget_mb_from_env("MMFAST_PRUNED_WEIGHT_CACHE_MB", 0, "no packed weights kept");
  }

  void drop_freed() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.expired()) {
        bytes_ -= it->second.packed.nbytes();
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }

  std::mutex mutex_;
  std::unordered_map<Key, Entry, KeyHash> entries_;
  size_t bytes_ = 0;
  std::atomic<int64_t> budget_mb_;
};

}  // namespace glue
}  // namespace mmfast
