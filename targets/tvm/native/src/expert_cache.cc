#include "expert_cache.h"

#include <chrono>

#include "errors.h"

namespace edgemoe {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

ExpertCache::ExpertCache(int64_t capacity, std::map<Key, int64_t> sizes, std::unique_ptr<Policy> policy, LoadFn load,
                         bool log_events)
    : policy_(std::move(policy)),
      book_(capacity, std::move(sizes), policy_.get()),
      load_(std::move(load)),
      log_events_(log_events) {}

ExpertCache::~ExpertCache() { close(); }

void ExpertCache::log(const Key& k, const char* kind) {
  if (log_events_) events_.push_back({step_ - 1, k.first, k.second, kind});
}

void ExpertCache::begin_step(int layer, const std::vector<Key>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  policy_->begin_step(step_, layer, keys);
  ++step_;
}

std::vector<AlignedBuffer> ExpertCache::evict_locked(const std::vector<Key>& victims) {
  std::vector<AlignedBuffer> freed;
  for (const Key& v : victims) {
    book_.evict(v);
    prefetched_.erase(v);
    auto it = buffers_.find(v);
    freed.push_back(std::move(it->second));
    buffers_.erase(it);
    log(v, "evict");
  }
  return freed;
}

char* ExpertCache::reserve_locked(const Key& key, std::vector<AlignedBuffer>& freed) {
  book_.reserve(key);
  inflight_.insert(key);
  failed_.erase(key);
  size_t size = static_cast<size_t>(book_.sizes.at(key));
  AlignedBuffer buf;
  for (auto& b : freed)
    if (b.size() == size) {  // a load reuses the memory of the expert it replaces
      buf = std::move(b);
      break;
    }
  if (!buf.data() && size) buf = AlignedBuffer(size);
  char* p = buf.data();
  buffers_[key] = std::move(buf);
  return p;
}

void ExpertCache::finish(const Key& key, std::exception_ptr error) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error) {
    book_.drop(key);
    prefetched_.erase(key);
    buffers_.erase(key);
    failed_[key] = error;
  } else {
    book_.ready(key);
    ever_.insert(key);
  }
  inflight_.erase(key);
  cond_.notify_all();
}

const char* ExpertCache::acquire(const Key& key) {
  double start = now_s();
  bool loader = false;
  char* into = nullptr;
  std::unique_lock<std::mutex> lock(mu_);
  if (book_.claimed.erase(key)) {
    // fetched by its step: counted then, its load is in flight or done
  } else if (book_.cached(key)) {
    ++book_.hits;
    if (prefetched_.erase(key)) ++prefetch_used_;
    log(key, "hit");
  } else {
    ++book_.misses;
    log(key, "miss");
    std::vector<Key> victims;
    while (!book_.cached(key)) {
      if (book_.room_for(key, {}, false, &victims)) {
        auto freed = evict_locked(victims);
        into = reserve_locked(key, freed);
        log(key, "load");
        loader = true;
        break;
      }
      cond_.wait(lock);  // every byte is pinned or in flight: wait for a release
    }
  }
  ++book_.pins[key];
  policy_->touch(key);
  lock.unlock();
  std::exception_ptr error;
  if (loader) {
    try {
      load_(key, into);
    } catch (...) {
      error = std::current_exception();
    }
    finish(key, error);
  }
  lock.lock();
  cond_.wait(lock, [&] { return !inflight_.count(key); });
  stall_s_ += now_s() - start;
  if (!book_.is_ready(key)) {
    auto it = failed_.find(key);
    std::exception_ptr e = it != failed_.end() ? it->second : nullptr;
    lock.unlock();
    release(key);
    if (e) std::rethrow_exception(e);
    throw BundleError("expert " + std::to_string(key.second) + " of layer " + std::to_string(key.first) +
                      " failed to load");
  }
  return buffers_.at(key).data();
}

void ExpertCache::release(const Key& key) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = book_.pins.find(key);
  if (it != book_.pins.end() && --it->second <= 0) book_.pins.erase(it);
  cond_.notify_all();
}

std::vector<Key> ExpertCache::prefetch(const std::vector<Key>& keys, const std::vector<Key>& protect) {
  std::set<Key> keep(protect.begin(), protect.end());  // grows by the prediction up to the current key's layer
  std::lock_guard<std::mutex> lock(mu_);
  size_t end = 0;
  std::vector<Key> victims;
  for (size_t i = 0; i < keys.size(); ++i) {
    const Key& key = keys[i];
    while (end < keys.size() && (end <= i || keys[end].first == key.first)) keep.insert(keys[end++]);
    if (!book_.sizes.count(key) || book_.cached(key)) continue;
    if (!book_.room_for(key, keep, true, &victims)) return std::vector<Key>(keys.begin() + i, keys.end());
    auto freed = evict_locked(victims);
    reserve_locked(key, freed);
    prefetched_.insert(key);
    ++prefetch_issued_;
    log(key, "prefetch");
    queue_.push_back(key);
    start_loader_locked();
    cond_.notify_all();  // wakes the loader
  }
  return {};
}

std::vector<Key> ExpertCache::fetch(const std::vector<Key>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Key> order, loading, missing;
  for (const Key& k : keys) {
    if (!book_.cached(k))
      missing.push_back(k);
    else if (book_.is_ready(k))
      order.push_back(k);
    else
      loading.push_back(k);
  }
  order.insert(order.end(), loading.begin(), loading.end());
  const std::set<Key> keep(keys.begin(), keys.end());
  std::vector<Key> victims;
  for (size_t i = 0; i < missing.size(); ++i) {
    const Key& key = missing[i];
    if (!book_.room_for(key, keep, false, &victims)) {  // no room: these load on demand at their turn
      order.insert(order.end(), missing.begin() + i, missing.end());
      break;
    }
    ++book_.misses;
    log(key, "miss");
    book_.claimed.insert(key);
    auto freed = evict_locked(victims);
    reserve_locked(key, freed);
    log(key, "load");
    queue_.push_back(key);
    start_loader_locked();
    cond_.notify_all();  // wakes the loader
    order.push_back(key);
  }
  return order;
}

void ExpertCache::start_loader_locked() {
  if (!loader_.joinable()) loader_ = std::thread([this] { run_loader(); });
}

void ExpertCache::run_loader() {
  while (true) {
    Key key;
    char* into;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cond_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      key = queue_.front();
      queue_.pop_front();
      into = buffers_.at(key).data();
    }
    std::exception_ptr error;
    try {
      load_(key, into);
    } catch (...) {
      error = std::current_exception();
    }
    finish(key, error);
  }
}

void ExpertCache::wait_idle() {
  std::unique_lock<std::mutex> lock(mu_);
  cond_.wait(lock, [&] { return inflight_.empty(); });
}

void ExpertCache::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cond_.notify_all();
  }
  if (loader_.joinable()) loader_.join();
}

}  // namespace edgemoe
