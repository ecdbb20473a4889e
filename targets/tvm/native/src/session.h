// Runs one task of a TVM bundle as edgemoe/runtime/session.py does: segment 0, then per MoE layer
// the task's gate, the expert kernel once per routed expert (weights from the expert cache), the
// weighted sum (+ shared experts), the next segment; finally the task's head.
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "bundle.h"
#include "expert_cache.h"
#include "npy.h"
#include "predict.h"
#include "tvm_graph.h"

namespace edgemoe {

struct SessionOptions {
  std::string task;            // empty: the bundle's only task
  std::string budget;          // "" : the schedule's budget if any, else unbounded; bytes or NN%
  std::string policy;          // "" : the schedule's policy if any, else lru
  std::string prefetch;  // "" : the schedule's plan if it chose a predictor, else off; off | routed | pregate | static | affinity | plan
  int prefetch_depth = 2;
  int threads = 0;
  bool lazy_verify = false;    // check routed expert blobs on first load only (not all up front)
  bool log_events = false;
};

struct TensorSpec {
  std::string name;
  DLDataType dtype;
  std::vector<int64_t> shape;
  int64_t offset = 0;
};

class Session {
 public:
  // Phase 1 (no native code of the bundle runs): manifest, task, budget and policy, and the size +
  // sha256 of every file the task uses. Libraries are loaded by load().
  Session(const std::string& bundle, const SessionOptions& opts);
  ~Session();
  // Phase 2: load the verified libraries into Relax VMs, the shared experts, and the cache.
  void load();

  // Validates an input against the bundle's input spec (InputError); returns the tensor to run.
  ffi::Tensor check_input(const NpyArray& x) const;
  ffi::Tensor run(const ffi::Tensor& x);

  const std::string& task() const { return task_; }
  const ExpertCache& cache() const { return *cache_; }
  Json stats_json() const;  // the run counters (experts_*, expert_bytes_*, graph_bytes)
  Json cache_json() const;
  void write_events(const std::string& path) const;
  // Per-graph time and calls, phase times (for --profile, on stderr).
  std::string profile() const;
  double verify_ms = 0, load_ms = 0;
  void close();

  std::vector<std::string> warnings;  // budget warnings (ThrashWarning), printed by the CLI

 private:
  struct Expert {
    FileRecord file;
    std::vector<TensorSpec> tensors;
    std::string kernel;
    int64_t bytes = 0;
    FileSignature sig;  // when its bytes were last checked (size, mtime, inode)
    bool checked = false;
  };
  struct Layer {
    std::map<int, Expert> experts;  // by index
    std::set<int> kept;
    std::vector<Expert> shared;
    int top_k = 0;
  };
  struct SharedWeights {
    const TvmGraph* kernel;
    AlignedBuffer data;
    std::vector<ffi::Tensor> args;  // the weights in kernel input order
  };

  const Json& m() const { return bundle_.manifest(); }
  std::vector<ffi::Tensor> weight_args(const TvmGraph& kernel, const std::vector<TensorSpec>& tensors, char* base,
                                       const std::string& what) const;
  ffi::Tensor moe(int layer, const ffi::Tensor& h);
  void read_expert(const Key& key, char* into);
  std::vector<Key> lookahead_keys(int layer, const std::vector<int>& experts, const std::vector<int>* pregate) const;
  void setup_cache(const SessionOptions& opts);

  Bundle bundle_;
  std::string task_;
  const Json* task_rec_;
  std::vector<Layer> layers_;
  std::vector<std::string> graph_names_;  // segments, gates, head, kernels (distinct), in load order
  // The checked library copies (graph -> (path, head)) in a private mkdtemp folder, until loaded;
  // removed with the session, also when its constructor fails.
  struct PrivateCopies {
    std::string dir;
    std::map<std::string, std::pair<std::string, std::string>> files;
    ~PrivateCopies();
  } private_;
  std::map<std::string, std::unique_ptr<TvmGraph>> graphs_;
  std::vector<const TvmGraph*> segments_, gates_;
  const TvmGraph* head_ = nullptr;
  std::vector<std::vector<SharedWeights>> shared_;
  int64_t graph_bytes_ = 0, shared_bytes_ = 0, verify_bytes_ = 0;
  int threads_ = 0;

  // Cache configuration.
  int64_t memory_budget_ = 0;  // 0: unbounded
  bool from_schedule_ = false;  // the bundle has a swap schedule (its budget, policy, plan are the defaults)
  int64_t capacity_ = 0;
  std::string policy_name_;
  std::map<Key, int64_t> sizes_;
  std::vector<std::vector<double>> prob_;
  std::vector<std::vector<double>> recency_;
  bool has_recency_ = false;
  std::vector<Key> resident_;
  std::string prefetch_;  // "" : off
  int prefetch_depth_ = 2;
  std::unique_ptr<Predictor> predictor_;
  std::unique_ptr<Static> far_;
  std::unique_ptr<ExpertCache> cache_;
  bool log_events_ = false;
  int64_t runs_ = 0;
};

// parse_budget (edgemoe/schedule/planner.py): "25%" of the bundle's routed expert bytes plus its
// shared experts, or a size ("100000", "6MB", "6MiB"). ConfigError otherwise.
int64_t parse_budget(const std::string& text, const Json& manifest);

}  // namespace edgemoe
