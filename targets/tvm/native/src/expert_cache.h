// The expert cache, mirroring edgemoe/runtime/expert_cache.py: a byte budget over routed experts,
// pins while a kernel runs, coalesced in-flight loads and one background prefetch loader thread.
// Hits, misses and victims come from CacheBook + the policy (policies.h), as in Python.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "buffer.h"
#include "policies.h"

namespace edgemoe {

struct CacheEvent {
  int64_t step;  // the MoE step begun last (-1: before the first)
  int layer;
  int expert;
  const char* kind;  // hit, miss, evict, load (demand), prefetch (issued)
};

class ExpertCache {
 public:
  // Reads and checks one expert's blob into ``into`` (its size); throws on failure.
  using LoadFn = std::function<void(const Key&, char* into)>;

  ExpertCache(int64_t capacity, std::map<Key, int64_t> sizes, std::unique_ptr<Policy> policy, LoadFn load,
              bool log_events);
  ~ExpertCache();

  void begin_step(int layer, const std::vector<Key>& keys);
  // Pins ``key`` and returns its weights, loading it (or waiting for its load) if needed.
  const char* acquire(const Key& key);
  void release(const Key& key);
  // Starts background loads of ``keys`` not cached yet, in order; never evicts ``protect``, never
  // waits. Returns the keys not issued for want of room.
  std::vector<Key> prefetch(const std::vector<Key>& keys, const std::vector<Key>& protect);
  // Starts background loads of a step's own misses now (fetch_rule in edgemoe/swap/book.py) and
  // returns the order to run its experts in: cached, loading, just issued, left to load on demand.
  std::vector<Key> fetch(const std::vector<Key>& keys);
  void wait_idle();
  void close();

  // Counters (read after runs, or under no concurrent use).
  const CacheBook& book() const { return book_; }
  int64_t experts_ever() const { return static_cast<int64_t>(ever_.size()); }
  int64_t prefetch_issued() const { return prefetch_issued_; }
  int64_t prefetch_used() const { return prefetch_used_; }
  double stall_ms() const { return stall_s_ * 1e3; }
  const std::vector<CacheEvent>& events() const { return events_; }

 private:
  void log(const Key& k, const char* kind);
  std::vector<AlignedBuffer> evict_locked(const std::vector<Key>& victims);
  char* reserve_locked(const Key& key, std::vector<AlignedBuffer>& freed);
  void finish(const Key& key, std::exception_ptr error);
  void start_loader_locked();
  void run_loader();

  std::unique_ptr<Policy> policy_;
  CacheBook book_;
  LoadFn load_;
  bool log_events_;
  std::mutex mu_;
  std::condition_variable cond_;
  std::map<Key, AlignedBuffer> buffers_;  // memory of each cached or loading expert
  std::set<Key> inflight_;
  std::map<Key, std::exception_ptr> failed_;
  std::set<Key> prefetched_;
  std::set<Key> ever_;
  std::deque<Key> queue_;
  bool stop_ = false;
  std::thread loader_;
  int64_t prefetch_issued_ = 0, prefetch_used_ = 0;
  double stall_s_ = 0;
  int64_t step_ = 0;
  std::vector<CacheEvent> events_;
};

}  // namespace edgemoe
