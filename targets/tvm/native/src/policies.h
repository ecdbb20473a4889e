// Eviction policies and the cache bookkeeping, mirroring edgemoe/schedule/policies.py exactly
// (CacheBook, LRU, LFU, Planned): the same access sequence gives the same hits, misses and victims.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace edgemoe {

using Key = std::pair<int, int>;  // (layer, expert)

class Policy {
 public:
  virtual ~Policy() = default;
  virtual const char* name() const = 0;
  virtual void begin_step(int64_t step, int layer, const std::vector<Key>& keys);
  virtual void touch(const Key& key);
  virtual void inserted(const Key& key);
  virtual void evicted(const Key&) {}
  // The candidate to evict (ties: the first in ``candidates`` order, as Python's min / max).
  virtual Key victim(const std::vector<Key>& candidates);
  // Candidates a prefetch of ``key`` may evict (base: all).
  virtual std::vector<Key> outliving(const std::vector<Key>& candidates, const Key& key);

 protected:
  int64_t last_use_or(const Key& k) const;
  int64_t clock_ = 0;
  std::map<Key, int64_t> last_use_;
  int layer_ = 0;
  int64_t step_ = 0;
  std::set<Key> step_keys_;
  std::set<Key> done_;
};

class LRU : public Policy {
 public:
  const char* name() const override { return "lru"; }
};

class LFU : public Policy {
 public:
  const char* name() const override { return "lfu"; }
  void touch(const Key& key) override;
  Key victim(const std::vector<Key>& candidates) override;

 private:
  std::map<Key, int64_t> count_;
};

class Planned : public Policy {
 public:
  Planned(std::vector<std::vector<double>> prob, std::vector<std::vector<double>> recency, bool has_recency);
  const char* name() const override { return "planned"; }
  void begin_step(int64_t step, int layer, const std::vector<Key>& keys) override;
  Key victim(const std::vector<Key>& candidates) override;
  std::vector<Key> outliving(const std::vector<Key>& candidates, const Key& key) override;
  double expected_next_use(const Key& key) const;

 private:
  std::vector<std::vector<double>> prob_;
  int layers_;
  std::vector<std::vector<double>> recency_;
  bool has_recency_;
  std::map<int, std::map<int, int64_t>> since_;
};

// Python's make_policy: ConfigError for an unknown name or planned without probabilities.
std::unique_ptr<Policy> make_policy(const std::string& name, const std::vector<std::vector<double>>* prob,
                                    const std::vector<std::vector<double>>* recency);

class CacheBook {
 public:
  CacheBook(int64_t capacity, std::map<Key, int64_t> sizes, Policy* policy);

  std::vector<Key> evictable(const std::set<Key>& keep) const;
  // Victims so that ``key`` fits; false if pins (for a prefetch, also the policy) prevent it.
  bool room_for(const Key& key, const std::set<Key>& keep, bool prefetch, std::vector<Key>* victims);
  void evict(const Key& key);
  void reserve(const Key& key);
  void ready(const Key& key);
  bool cached(const Key& key) const;
  bool is_ready(const Key& key) const;
  void drop(const Key& key);  // a failed load: remove the reservation (no eviction counted)

  int64_t capacity;
  std::map<Key, int64_t> sizes;
  Policy* policy;
  std::vector<std::pair<Key, bool>> entries;  // key -> ready, in insertion order (as a Python dict)
  std::map<Key, int> pins;
  // Misses a step loads before running them (ExpertCache::fetch, fetch_rule in Python): counted
  // then, kept from eviction until accessed.
  std::set<Key> claimed;
  int64_t used = 0, peak = 0, hits = 0, misses = 0, evictions = 0, bytes_loaded = 0;
};

}  // namespace edgemoe
