#include "policies.h"

#include <algorithm>
#include <cmath>

#include "errors.h"

namespace edgemoe {

namespace {
int pymod(int a, int n) { return ((a % n) + n) % n; }  // Python's % for a positive modulus
}  // namespace

void Policy::begin_step(int64_t step, int layer, const std::vector<Key>& keys) {
  step_ = step;
  layer_ = layer;
  step_keys_ = std::set<Key>(keys.begin(), keys.end());
  done_.clear();
}

void Policy::touch(const Key& key) {
  ++clock_;
  last_use_[key] = clock_;
  done_.insert(key);
}

void Policy::inserted(const Key& key) { last_use_.emplace(key, clock_); }

int64_t Policy::last_use_or(const Key& k) const {
  auto it = last_use_.find(k);
  return it == last_use_.end() ? -1 : it->second;
}

Key Policy::victim(const std::vector<Key>& candidates) {
  Key best = candidates.front();
  int64_t best_use = last_use_or(best);
  for (const Key& k : candidates) {
    int64_t u = last_use_or(k);
    if (u < best_use) best = k, best_use = u;
  }
  return best;
}

std::vector<Key> Policy::outliving(const std::vector<Key>& candidates, const Key&) { return candidates; }

void LFU::touch(const Key& key) {
  Policy::touch(key);
  ++count_[key];
}

Key LFU::victim(const std::vector<Key>& candidates) {
  auto score = [&](const Key& k) {
    auto it = count_.find(k);
    return std::make_pair(it == count_.end() ? int64_t(0) : it->second, last_use_or(k));
  };
  Key best = candidates.front();
  auto best_score = score(best);
  for (const Key& k : candidates) {
    auto s = score(k);
    if (s < best_score) best = k, best_score = s;
  }
  return best;
}

Planned::Planned(std::vector<std::vector<double>> prob, std::vector<std::vector<double>> recency, bool has_recency)
    : prob_(std::move(prob)), layers_(static_cast<int>(prob_.size())), recency_(std::move(recency)),
      has_recency_(has_recency) {}

void Planned::begin_step(int64_t step, int layer, const std::vector<Key>& keys) {
  auto& since = since_[layer];
  for (auto& kv : since) ++kv.second;
  for (const Key& k : keys)
    if (k.first == layer) since[k.second] = 1;
  Policy::begin_step(step, layer, keys);
}

double Planned::expected_next_use(const Key& key) const {
  const int layer = key.first, expert = key.second;
  double p = 0.0;
  if (layer < layers_ && expert < static_cast<int>(prob_[layer].size())) p = prob_[layer][expert];
  auto since_layer = since_.find(layer);
  if (p <= 0) {
    if (layer >= layers_ || since_layer == since_.end() || !since_layer->second.count(expert))
      return std::numeric_limits<double>::infinity();
    p = 1.0;
    bool any = false;
    for (double q : prob_[layer])
      if (q > 0 && (!any || q < p)) p = q, any = true;
  }
  int d = pymod(layer - layer_, layers_);
  if (d == 0 && (done_.count(key) || !step_keys_.count(key))) d = layers_;
  if (d == 0) return 0.0;
  if (has_recency_ && layer < static_cast<int>(recency_.size()) && !recency_[layer].empty()) {
    const auto& table = recency_[layer];
    int64_t r = static_cast<int64_t>(table.size());
    if (since_layer != since_.end()) {
      auto it = since_layer->second.find(expert);
      if (it != since_layer->second.end()) r = it->second;
    }
    return d + layers_ * (table[std::min<int64_t>(r, table.size()) - 1] - 1.0);
  }
  return d + layers_ * (1.0 - p) / p;
}

Key Planned::victim(const std::vector<Key>& candidates) {
  // max by (expected next use, -last use): the first maximal candidate.
  Key best = candidates.front();
  double best_due = expected_next_use(best);
  int64_t best_use = last_use_or(best);
  for (const Key& k : candidates) {
    double due = expected_next_use(k);
    int64_t use = last_use_or(k);
    if (due > best_due || (due == best_due && -use > -best_use)) best = k, best_due = due, best_use = use;
  }
  return best;
}

std::vector<Key> Planned::outliving(const std::vector<Key>& candidates, const Key& key) {
  int due = pymod(key.first - layer_, layers_);
  if (due == 0) due = layers_;
  std::vector<Key> out;
  for (const Key& v : candidates)
    if (expected_next_use(v) > due) out.push_back(v);
  return out;
}

std::unique_ptr<Policy> make_policy(const std::string& name, const std::vector<std::vector<double>>* prob,
                                    const std::vector<std::vector<double>>* recency) {
  if (name == "lru") return std::make_unique<LRU>();
  if (name == "lfu") return std::make_unique<LFU>();
  if (name == "planned") {
    if (!prob) throw ConfigError("the planned policy needs per-expert probabilities from calibration traces");
    return std::make_unique<Planned>(*prob, recency ? *recency : std::vector<std::vector<double>>{},
                                     recency != nullptr);
  }
  throw ConfigError("unknown cache policy '" + name + "' (known: lru, lfu, planned)");
}

CacheBook::CacheBook(int64_t capacity_, std::map<Key, int64_t> sizes_, Policy* policy_)
    : capacity(capacity_), sizes(std::move(sizes_)), policy(policy_) {
  int64_t largest = 0;
  for (const auto& kv : sizes) largest = std::max(largest, kv.second);
  if (capacity < largest)
    throw ConfigError("expert cache of " + std::to_string(capacity) + " bytes cannot hold the largest expert (" +
                      std::to_string(largest) + " bytes)");
}

bool CacheBook::cached(const Key& key) const {
  for (const auto& e : entries)
    if (e.first == key) return true;
  return false;
}

bool CacheBook::is_ready(const Key& key) const {
  for (const auto& e : entries)
    if (e.first == key) return e.second;
  return false;
}

std::vector<Key> CacheBook::evictable(const std::set<Key>& keep) const {
  std::vector<Key> out;
  for (const auto& e : entries) {
    auto pin = pins.find(e.first);
    if (e.second && (pin == pins.end() || pin->second == 0) && !keep.count(e.first) && !claimed.count(e.first))
      out.push_back(e.first);
  }
  return out;
}

bool CacheBook::room_for(const Key& key, const std::set<Key>& keep, bool prefetch, std::vector<Key>* victims) {
  victims->clear();
  int64_t need = used + sizes.at(key) - capacity;
  if (need <= 0) return true;
  std::vector<Key> candidates = evictable(keep);
  if (prefetch) candidates = policy->outliving(candidates, key);
  while (need > 0) {
    if (candidates.empty()) return false;
    Key v = policy->victim(candidates);
    candidates.erase(std::find(candidates.begin(), candidates.end(), v));
    victims->push_back(v);
    need -= sizes.at(v);
  }
  return true;
}

void CacheBook::evict(const Key& key) {
  drop(key);
  ++evictions;
  policy->evicted(key);
}

void CacheBook::drop(const Key& key) {
  claimed.erase(key);
  for (auto it = entries.begin(); it != entries.end(); ++it)
    if (it->first == key) {
      entries.erase(it);
      used -= sizes.at(key);
      return;
    }
}

void CacheBook::reserve(const Key& key) {
  entries.emplace_back(key, false);
  used += sizes.at(key);
  peak = std::max(peak, used);
  if (used > capacity) throw std::logic_error("expert cache over budget");
  bytes_loaded += sizes.at(key);
  policy->inserted(key);
}

void CacheBook::ready(const Key& key) {
  for (auto& e : entries)
    if (e.first == key) e.second = true;
}

}  // namespace edgemoe
