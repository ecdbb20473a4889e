#include "session.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>

#include "errors.h"
#include "sha256.h"

namespace edgemoe {

namespace {

std::string join_names(const Json& obj) {
  std::string out;
  for (const auto& kv : obj.members()) out += (out.empty() ? "" : ", ") + kv.first;
  return out;
}

int64_t int_field(const Json& j, const char* key) { return j.at(key).as_int(); }

std::vector<std::string> strings(const Json& j) {
  std::vector<std::string> out;
  for (const Json& s : j.items()) out.push_back(s.as_string());
  return out;
}

std::string shape_repr(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// numpy dtype name of an .npy descr ("<f4" -> "float32").
std::string npy_name(const std::string& descr) {
  char kind = descr[1];
  int bytes = std::atoi(descr.c_str() + 2);
  if (kind == 'b') return "bool";
  std::string base = kind == 'f' ? "float" : kind == 'i' ? "int" : "uint";
  return base + std::to_string(bytes * 8);
}

template <typename T>
double get_as_double(const char* p, int64_t i) {
  T v;
  std::memcpy(&v, p + i * sizeof(T), sizeof(T));
  return static_cast<double>(v);
}

// Element i of an .npy array as double (numbers of every supported kind).
double npy_value(const NpyArray& a, int64_t i) {
  char kind = a.descr[1];
  int bytes = std::atoi(a.descr.c_str() + 2);
  const char* p = a.data.data();
  if (kind == 'f') {
    if (bytes == 4) return get_as_double<float>(p, i);
    if (bytes == 8) return get_as_double<double>(p, i);
    // float16
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    int e = (h >> 10) & 0x1f, f = h & 0x3ff;
    double v = e == 0 ? std::ldexp(f, -24) : e == 31 ? (f ? NAN : INFINITY) : std::ldexp(f + 1024, e - 25);
    return (h & 0x8000) ? -v : v;
  }
  if (kind == 'b' || (kind == 'u' && bytes == 1)) return static_cast<unsigned char>(p[i]);
  if (kind == 'i') {
    if (bytes == 1) return static_cast<signed char>(p[i]);
    if (bytes == 2) return get_as_double<int16_t>(p, i);
    if (bytes == 4) return get_as_double<int32_t>(p, i);
    return get_as_double<int64_t>(p, i);
  }
  if (bytes == 2) return get_as_double<uint16_t>(p, i);
  if (bytes == 4) return get_as_double<uint32_t>(p, i);
  return get_as_double<uint64_t>(p, i);
}

int64_t npy_int(const NpyArray& a, int64_t i) {
  char kind = a.descr[1];
  int bytes = std::atoi(a.descr.c_str() + 2);
  const char* p = a.data.data();
  if (kind == 'i' && bytes == 8) {
    int64_t v;
    std::memcpy(&v, p + 8 * i, 8);
    return v;
  }
  if (kind == 'u' && bytes == 8) {
    uint64_t v;
    std::memcpy(&v, p + 8 * i, 8);
    return static_cast<int64_t>(v);
  }
  return static_cast<int64_t>(npy_value(a, i));
}

std::map<Key, int64_t> expert_sizes(const Json& manifest, const Json* task) {
  std::map<Key, int64_t> out;
  const auto& layers = manifest.at("moe_layers").items();
  for (size_t li = 0; li < layers.size(); ++li) {
    std::set<int64_t> kept;
    if (task)
      for (const Json& e : task->at("experts")[li].items()) kept.insert(e.as_int());
    for (const Json& e : layers[li].at("experts").items())
      if (!task || kept.count(e.at("index").as_int()))
        out[{static_cast<int>(li), static_cast<int>(e.at("index").as_int())}] = e.at("bytes").as_int();
  }
  return out;
}

int64_t shared_bytes_of(const Json& manifest) {
  int64_t total = 0;
  for (const Json& layer : manifest.at("moe_layers").items())
    if (const Json* shared = layer.find("shared"))
      for (const Json& e : shared->items()) total += e.at("bytes").as_int();
  return total;
}

std::vector<std::vector<double>> matrix(const Json& j) {
  std::vector<std::vector<double>> out;
  for (const Json& row : j.items()) {
    std::vector<double> r;
    for (const Json& x : row.items()) r.push_back(x.as_double());
    out.push_back(r);
  }
  return out;
}

}  // namespace

int64_t parse_budget(const std::string& raw, const Json& manifest) {
  std::string s = raw;
  s.erase(0, s.find_first_not_of(" \t"));
  s.erase(s.find_last_not_of(" \t") + 1);
  std::smatch mt;
  if (std::regex_match(s, mt, std::regex(R"((\d+(?:\.\d+)?)\s*%)"))) {
    double pct = std::stod(mt[1]);
    if (!(pct > 0 && pct <= 100)) throw ConfigError("budget percentage must be in (0, 100], got " + s);
    int64_t total = 0;
    for (const auto& kv : expert_sizes(manifest, nullptr)) total += kv.second;
    return static_cast<int64_t>(static_cast<double>(total) * pct / 100) + shared_bytes_of(manifest);
  }
  std::string low = s;
  std::transform(low.begin(), low.end(), low.begin(), ::tolower);
  if (std::regex_match(low, std::regex(R"(\d+(?:\.\d+)?\s*(?:[kmg]i?)?b?)"))) {
    std::string t;
    for (char c : low)
      if (c != ' ') t += c;
    size_t cut = t.find_last_not_of("kmgib");
    std::string num = t.substr(0, cut + 1), unit = t.substr(cut + 1);
    static const std::map<std::string, double> units = {{"", 1},         {"b", 1},          {"kb", 1e3},
                                                        {"mb", 1e6},     {"gb", 1e9},       {"kib", 1024.0},
                                                        {"mib", 1048576.0}, {"gib", 1073741824.0}};
    auto u = units.find(unit);
    double value = std::stod(num);
    if (u != units.end() && value > 0) return static_cast<int64_t>(value * u->second);
  }
  throw ConfigError("budget must be a percentage of expert bytes (e.g. 25%) or a size (e.g. 100000, 6MB, 6MiB), got '" +
                    s + "'");
}

Session::Session(const std::string& bundle, const SessionOptions& opts) : bundle_(bundle) {
  log_events_ = opts.log_events;
  const Json& tasks = m().at("tasks");
  try {
    if (opts.task.empty()) {
      if (tasks.size() != 1) throw TaskError("bundle has tasks " + join_names(tasks) + ": choose one");
      task_ = tasks.members().front().first;
    } else {
      if (!tasks.contains(opts.task))
        throw TaskError("unknown task '" + opts.task + "' (bundle has: " + join_names(tasks) + ")");
      task_ = opts.task;
    }
    task_rec_ = &tasks.at(task_);
    const std::string executor = m().at("target").at("executor").as_string();
    if (executor != "tvm")
      throw BundleError("edgemoe-rt runs TVM bundles; this bundle's executor is '" + executor + "'");
    const Json& graphs = m().at("graphs");
    auto add_graph = [&](const std::string& name) {
      if (std::find(graph_names_.begin(), graph_names_.end(), name) != graph_names_.end()) return;
      if (!graphs.contains(name)) throw BundleError("garbled manifest: graph '" + name + "' is not listed");
      graph_names_.push_back(name);
    };
    for (const auto& name : strings(m().at("segments"))) add_graph(name);
    for (const auto& name : strings(task_rec_->at("gates"))) add_graph(name);
    add_graph(task_rec_->at("head").as_string());
    // The layers, their kept experts (those the task may route to) and their kernels.
    const auto& mlayers = m().at("moe_layers").items();
    const Json& kept = task_rec_->at("experts");
    if (task_rec_->at("gates").size() != mlayers.size())
      throw BundleError("garbled manifest: task '" + task_ + "' has a gate count unlike its MoE layers");
    for (size_t li = 0; li < mlayers.size(); ++li) {
      const Json& L = mlayers[li];
      Layer layer;
      layer.top_k = static_cast<int>(int_field(L, "top_k"));
      auto parse_expert = [&](const Json& e, const std::string& kernel) {
        Expert x;
        x.file = bundle_.resolve(e);
        x.bytes = x.file.bytes;
        x.kernel = kernel;
        for (const Json& t : e.at("tensors").items()) {
          TensorSpec ts;
          ts.name = t.at("name").as_string();
          ts.dtype = dtype_from_name(t.at("dtype").as_string());
          for (const Json& d : t.at("shape").items()) ts.shape.push_back(d.as_int());
          ts.offset = t.at("offset").as_int();
          int64_t count = 1;
          for (int64_t d : ts.shape) count *= d;
          if (ts.offset < 0 || ts.offset + count * (ts.dtype.bits / 8) > x.bytes)
            throw IntegrityError("tensor " + ts.name + " runs past the end of its expert blob");
          x.tensors.push_back(ts);
        }
        return x;
      };
      for (const Json& e : L.at("experts").items()) {
        const Json* k = e.find("kernel");
        layer.experts[static_cast<int>(e.at("index").as_int())] =
            parse_expert(e, k ? k->as_string() : L.at("kernel").as_string());
      }
      for (const Json& e : kept[li].items()) {
        int idx = static_cast<int>(e.as_int());
        if (!layer.experts.count(idx))
          throw BundleError("garbled manifest: task '" + task_ + "' keeps experts [" + std::to_string(idx) +
                            "] of layer " + std::to_string(li) + ", which the bundle does not list");
        layer.kept.insert(idx);
      }
      if (const Json* shared = L.find("shared"))
        for (const Json& e : shared->items()) layer.shared.push_back(parse_expert(e, e.at("kernel").as_string()));
      layers_.push_back(std::move(layer));
    }
    for (size_t li = 0; li < layers_.size(); ++li) {
      for (int e : layers_[li].kept) add_graph(layers_[li].experts.at(e).kernel);
      for (const Expert& s : layers_[li].shared) add_graph(s.kernel);
    }
    setup_cache(opts);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw BundleError(std::string("garbled manifest: ") + e.what());
  }
  threads_ = opts.threads;
  auto verify_start = std::chrono::steady_clock::now();
  // Every file the task uses is checked before any library of the bundle is loaded: the
  // libraries (their verified bytes are kept: exactly those get loaded), the shared experts and,
  // unless --lazy-verify, every expert the task may route to (streamed through the hash; only
  // routed experts are read into the cache later, re-hashed unless the file is unchanged).
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp && *tmp ? tmp : "/tmp") + "/edgemoe-rt-XXXXXX";
  if (!::mkdtemp(&dir[0])) throw BundleError("cannot create a private folder under " + dir.substr(0, dir.rfind('/')));
  private_.dir = dir;
  for (size_t i = 0; i < graph_names_.size(); ++i) {
    const std::string& name = graph_names_[i];
    FileRecord rec = bundle_.resolve(m().at("graphs").at(name));
    std::string base = rec.rel.substr(rec.rel.find_last_of('/') + 1);
    std::string path = private_.dir + "/" + std::to_string(i) + "_" + base;
    std::string head;
    bundle_.copy_verified(rec, path, &head);
    private_.files[name] = {path, head};
    graph_bytes_ += rec.bytes;
    verify_bytes_ += rec.bytes;
  }
  for (auto& layer : layers_) {
    for (Expert& s : layer.shared) {
      s.sig = bundle_.check_file(s.file);
      verify_bytes_ += s.bytes;
    }
    if (!opts.lazy_verify)
      for (int e : layer.kept) {
        Expert& x = layer.experts.at(e);
        x.sig = bundle_.check_file(x.file);
        x.checked = true;
        verify_bytes_ += x.bytes;
      }
  }
  verify_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - verify_start).count();
}

void Session::setup_cache(const SessionOptions& opts) {
  const Json* schedule_root = m().find("schedule");
  const Json* schedule = nullptr;
  if (schedule_root && schedule_root->is_object())
    if (const Json* t = schedule_root->find("tasks"))
      schedule = t->find(task_);
  sizes_ = expert_sizes(m(), task_rec_);
  // Use probabilities: the schedule's, else the calibration counts (Session._count_probabilities).
  if (schedule) {
    prob_ = matrix(schedule->at("probability"));
  } else {
    const auto& mlayers = m().at("moe_layers").items();
    const Json* counts = task_rec_->find("expert_counts");
    size_t n = counts ? std::min(mlayers.size(), counts->size()) : 0;
    for (size_t li = 0; li < n; ++li) {
      std::vector<double> c;
      for (const Json& x : (*counts)[li].items()) c.push_back(x.as_double());
      double sum = 0;
      for (double v : c) sum += v;  // integer counts: exact in any order
      double top_k = static_cast<double>(int_field(mlayers[li], "top_k"));
      std::vector<double> p;
      for (double v : c) p.push_back(std::min(1.0, v / std::max(sum, 1.0) * top_k));
      prob_.push_back(p);
    }
    if (prob_.empty())
      for (const Json& L : mlayers) prob_.push_back(std::vector<double>(int_field(L, "num_experts"), 1.0));
  }
  if (schedule)
    if (const Json* r = schedule->find("recency")) {
      if (!r->is_null()) {
        recency_ = matrix(*r);
        has_recency_ = true;
      }
    }
  if (schedule)
    if (const Json* res = schedule->find("resident"))
      for (const Json& k : res->items())
        resident_.emplace_back(static_cast<int>(k[0].as_int()), static_cast<int>(k[1].as_int()));
  int64_t resident_bytes = schedule && schedule->contains("resident_bytes") ? schedule->at("resident_bytes").as_int() : 0;

  // Budget: --memory-budget (none: unbounded), else the schedule's, else unbounded (Session's rules).
  from_schedule_ = schedule_root && schedule_root->is_object();
  std::string budget_text = opts.budget;
  bool unbounded = budget_text == "none" || budget_text == "unbounded";
  if (unbounded) budget_text.clear();
  if (!unbounded && budget_text.empty() && from_schedule_ && schedule_root->contains("budget_bytes"))
    budget_text = std::to_string(schedule_root->at("budget_bytes").as_int());
  if (budget_text.empty()) {
    capacity_ = 0;
    for (const auto& kv : sizes_) capacity_ += kv.second;
    memory_budget_ = 0;
  } else {
    int64_t budget = parse_budget(budget_text, m());
    // check_budget (planner.py): shared experts + resident set + the largest expert must fit.
    int64_t shared = shared_bytes_of(m()), largest = 0;
    for (const auto& kv : sizes_) largest = std::max(largest, kv.second);
    if (budget < shared + resident_bytes + largest)
      throw ConfigError("memory budget of " + std::to_string(budget) + " bytes is below shared experts (" +
                        std::to_string(shared) + " B) + resident set (" + std::to_string(resident_bytes) +
                        " B) + largest expert (" + std::to_string(largest) +
                        " B) = " + std::to_string(shared + resident_bytes + largest) + " bytes");
    capacity_ = budget - shared;
    const auto& mlayers = m().at("moe_layers").items();
    for (size_t li = 0; li < mlayers.size(); ++li) {
      std::vector<int64_t> ls;
      for (const auto& kv : sizes_)
        if (kv.first.first == static_cast<int>(li)) ls.push_back(kv.second);
      std::sort(ls.rbegin(), ls.rend());
      int64_t top_k = int_field(mlayers[li], "top_k"), working = 0;
      for (int64_t i = 0; i < top_k && i < static_cast<int64_t>(ls.size()); ++i) working += ls[i];
      if (capacity_ - resident_bytes < working) {
        warnings.push_back("memory budget leaves " + std::to_string(capacity_ - resident_bytes) +
                           " bytes for the expert cache, below layer " + std::to_string(li) + "'s top-" +
                           std::to_string(top_k) + " working set of " + std::to_string(working) +
                           " bytes: every token will reload experts (thrashing)");
        break;
      }
    }
    memory_budget_ = budget;
  }
  policy_name_ = opts.policy;
  if (policy_name_.empty()) {
    policy_name_ = "lru";
    if (schedule_root && schedule_root->is_object())
      if (const Json* p = schedule_root->find("policy")) policy_name_ = p->as_string();
  }
  make_policy(policy_name_, &prob_, has_recency_ ? &recency_ : nullptr);  // validates the name now
  if (capacity_ < 0) capacity_ = 0;
  // Prefetch (Session._make_predictor).
  prefetch_depth_ = opts.prefetch_depth;
  if (prefetch_depth_ < 1) throw ConfigError("prefetch_depth must be at least 1, got " + std::to_string(prefetch_depth_));
  std::string want = opts.prefetch;
  if (want.empty() && from_schedule_)
    if (const Json* p = schedule_root->find("predictor"))
      if (p->is_string() && !p->as_string().empty()) want = "plan";
  if (want.empty() || want == "off" || want == "none") return;
  const Json* predictors = schedule ? schedule->find("predictors") : nullptr;
  const Json* stat = predictors ? predictors->find("static") : nullptr;
  if (stat) {
    auto p = predictor_from_json(*stat);
    far_.reset(dynamic_cast<Static*>(p.release()));
  } else {
    far_ = Static::from_probabilities(prob_);
  }
  if (want == "pregate") {
    prefetch_ = want;
    return;
  }
  if (want == "routed") {  // nothing ahead, not even the calibration order
    prefetch_ = want;
    far_.reset();
    return;
  }
  std::unique_ptr<Predictor> predictor;
  if (want == "plan") {
    if (!schedule) throw ConfigError("prefetch='plan' needs a schedule in the bundle: run `edgemoe plan` first");
    const Json& planned = schedule->at("prefetch");
    if (planned.is_null()) {  // the plan found that no predictor pays on its device: load on demand
      far_.reset();
      return;
    }
    predictor = predictor_from_json(planned);
  } else if (want == "static" && !schedule) {
    predictor = std::make_unique<Static>(*far_);
  } else if (want == "static" || want == "affinity") {
    if (!schedule)
      throw ConfigError("prefetch='" + want + "' needs a schedule in the bundle: run `edgemoe plan` first");
    const Json* entry = predictors ? predictors->find(want) : nullptr;
    predictor = entry ? predictor_from_json(*entry) : predictor_from_json(Json::parse("{\"name\": \"" + want + "\"}"));
  } else {
    throw ConfigError("unknown prefetch predictor '" + want + "' (known: pregate, affinity, static, routed, plan)");
  }
  if (predictor->name() == "pregate") {
    prefetch_ = "pregate";
    return;
  }
  if (predictor->name() == "routed") {
    prefetch_ = "routed";
    far_.reset();
    return;
  }
  prefetch_ = want;
  predictor_ = std::move(predictor);
}

Session::~Session() { close(); }

Session::PrivateCopies::~PrivateCopies() {
  for (const auto& kv : files) ::unlink(kv.second.first.c_str());
  if (!dir.empty()) ::rmdir(dir.c_str());
}

void Session::load() {
  auto start = std::chrono::steady_clock::now();
  configure_threads(threads_);
  const Json& graphs = m().at("graphs");
  for (const auto& name : graph_names_) {
    const Json& rec = graphs.at(name);
    const Json* inputs = rec.find("inputs");
    const Json* outputs = rec.find("outputs");
    if (!inputs || !outputs || !inputs->is_array() || !outputs->is_array())
      throw BundleError("garbled manifest entry for " + rec.at("file").as_string() + ": no input / output names");
    auto it = private_.files.find(name);
    graphs_[name] = std::make_unique<TvmGraph>(rec.at("file").as_string(), it->second.first, it->second.second,
                                               strings(*inputs), strings(*outputs));
    private_.files.erase(it);  // mapped by the loader now, and removed
  }
  for (const auto& name : strings(m().at("segments"))) segments_.push_back(graphs_.at(name).get());
  for (const auto& name : strings(task_rec_->at("gates"))) gates_.push_back(graphs_.at(name).get());
  head_ = graphs_.at(task_rec_->at("head").as_string()).get();
  // Shared experts run on every token: loaded now, always resident.
  for (auto& layer : layers_) {
    std::vector<SharedWeights> ws;
    for (Expert& s : layer.shared) {
      SharedWeights w;
      w.kernel = graphs_.at(s.kernel).get();
      w.data = AlignedBuffer(static_cast<size_t>(s.bytes));
      s.sig = bundle_.read_into(s.file, w.data.data(), &s.sig);
      w.args = weight_args(*w.kernel, s.tensors, w.data.data(), s.file.rel);
      shared_bytes_ += s.bytes;
      ws.push_back(std::move(w));
    }
    shared_.push_back(std::move(ws));
  }
  cache_ = std::make_unique<ExpertCache>(
      capacity_, sizes_, make_policy(policy_name_, &prob_, has_recency_ ? &recency_ : nullptr),
      [this](const Key& k, char* into) { read_expert(k, into); }, log_events_);
  load_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

std::string Session::profile() const {
  char line[256];
  std::string out;
  std::snprintf(line, sizeof line, "profile: verify %.1f ms (%lld bytes, sha256 %s), load %.1f ms\n", verify_ms,
                static_cast<long long>(verify_bytes_), sha256_impl(), load_ms);
  out += line;
  for (const auto& kv : graphs_) {
    std::snprintf(line, sizeof line, "profile: %-28s %9.2f ms in %lld calls\n", kv.first.c_str(), kv.second->total_ms(),
                  static_cast<long long>(kv.second->calls()));
    out += line;
  }
  std::snprintf(line, sizeof line, "profile: expert stall %.2f ms\n", cache_->stall_ms());
  return out + line;
}

void Session::read_expert(const Key& key, char* into) {
  Expert& x = layers_.at(key.first).experts.at(key.second);
  // Checked up front (or on a previous load) and unchanged since: read without the hash.
  FileSignature known = x.sig;
  x.sig = bundle_.read_into(x.file, into, x.checked ? &known : nullptr);
  x.checked = true;
}

std::vector<ffi::Tensor> Session::weight_args(const TvmGraph& kernel, const std::vector<TensorSpec>& tensors, char* base,
                                              const std::string& what) const {
  std::vector<ffi::Tensor> out;
  const auto& names = kernel.input_names();
  for (size_t i = 1; i < names.size(); ++i) {
    auto t = std::find_if(tensors.begin(), tensors.end(), [&](const TensorSpec& s) { return s.name == names[i]; });
    if (t == tensors.end()) throw BundleError("expert blob " + what + " has no tensor '" + names[i] + "' for " + kernel.name());
    out.push_back(host_borrow(base + t->offset, t->shape, t->dtype));
  }
  return out;
}

ffi::Tensor Session::check_input(const NpyArray& x) const {
  const Json& spec = m().at("input");
  std::vector<int64_t> shape = x.shape;
  const auto& want = spec.at("shape").items();
  if (shape.size() + 1 == want.size()) shape.insert(shape.begin(), 1);
  bool ok = shape.size() == want.size();
  for (size_t i = 0; ok && i < want.size(); ++i)
    if (!want[i].is_null() && want[i].as_int() != shape[i]) ok = false;
  if (!ok) {
    std::string shown = "[";
    for (size_t i = 0; i < want.size(); ++i)
      shown += (i ? ", " : "") + (want[i].is_null() ? std::string("'*'") : std::to_string(want[i].as_int()));
    throw InputError("input has shape " + shape_repr(x.shape.size() + 1 == want.size() ? shape : x.shape) +
                     ", bundle expects " + shown + "] (* = any size)");
  }
  const std::string dtype = spec.at("dtype").as_string();
  DLDataType dt = dtype_from_name(dtype);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  char kind = x.descr[1];
  ffi::Tensor out = host_empty(shape, dt);
  if (dt.code == kDLFloat) {
    if (kind != 'f' && kind != 'i' && kind != 'u') throw InputError("input has dtype " + npy_name(x.descr) + ", bundle expects " + dtype);
    if (dt.bits != 32) throw InputError("edgemoe-rt reads float32 inputs; this bundle expects " + dtype);
    float* p = data_of<float>(out);
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
      p[i] = static_cast<float>(npy_value(x, i));
      if (!std::isfinite(p[i])) finite = false;
    }
    if (!finite) throw InputError("input contains NaN or Inf");
  } else if (dt.code == kDLInt || dt.code == kDLUInt) {
    if (kind != 'i' && kind != 'u') throw InputError("input has dtype " + npy_name(x.descr) + ", bundle expects integer ids (" + dtype + ")");
    if (dt.bits != 64 || dt.code != kDLInt) throw InputError("edgemoe-rt reads int64 ids; this bundle expects " + dtype);
    int64_t* p = data_of<int64_t>(out);
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < n; ++i) {
      p[i] = npy_int(x, i);
      if (i == 0 || p[i] < lo) lo = p[i];
      if (i == 0 || p[i] > hi) hi = p[i];
    }
    const Json* high = spec.find("high");
    bool bounded = high && !high->is_null();
    if (n && (lo < 0 || (bounded && hi >= high->as_int())))
      throw InputError("input ids must lie in [0, " + (bounded ? std::to_string(high->as_int()) : std::string("None")) +
                       "), got [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  } else {
    throw InputError("edgemoe-rt cannot feed inputs of dtype " + dtype);
  }
  return out;
}

std::vector<Key> Session::lookahead_keys(int layer, const std::vector<int>& experts, const std::vector<int>* pregate) const {
  if (prefetch_.empty()) return {};
  const Predictor* near = predictor_.get();
  PreGate pg;
  if (prefetch_ == "pregate" && pregate) near = &pg;
  if (layer < 0) near = nullptr;  // nothing routed yet: the calibration order names the first layers
  return lookahead(near, far_.get(), layer, experts, pregate, static_cast<int>(layers_.size()), prefetch_depth_);
}

ffi::Tensor Session::moe(int li, const ffi::Tensor& h) {
  static const DLDataType f32{kDLFloat, 32, 1};
  if (!is_dtype(h, f32)) throw BundleError("MoE layer " + std::to_string(li) + " input is " + dtype_name(h.dtype()) + ", not float32");
  std::vector<int64_t> shape = shape_of(h);
  if (shape.empty()) throw BundleError("MoE layer " + std::to_string(li) + " input is a scalar");
  const int64_t D = shape.back(), N = D ? numel(h) / D : 0;
  const float* flat = data_of<float>(h);
  std::vector<ffi::Tensor> gate_out = gates_.at(li)->run({h});
  if (gate_out.size() < 2) throw BundleError("gate of layer " + std::to_string(li) + " returned no scores");
  const ffi::Tensor& idx_t = gate_out[0];
  const ffi::Tensor& score_t = gate_out[1];
  std::vector<int64_t> ishape = shape_of(idx_t);
  const int64_t k = ishape.empty() ? 1 : ishape.back();
  if (!k || numel(idx_t) != N * k || numel(score_t) != N * k || !is_dtype(score_t, f32))
    throw BundleError("gate of layer " + std::to_string(li) + " returned routing unlike its input");
  std::vector<int64_t> idx(static_cast<size_t>(N * k));
  if (is_dtype(idx_t, {kDLInt, 64, 1})) {
    std::memcpy(idx.data(), data_of<int64_t>(idx_t), idx.size() * 8);
  } else if (is_dtype(idx_t, {kDLInt, 32, 1})) {
    const int32_t* p = data_of<int32_t>(idx_t);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = p[i];
  } else {
    throw BundleError("gate of layer " + std::to_string(li) + " returned expert indices of dtype " + dtype_name(idx_t.dtype()));
  }
  const float* scores = data_of<float>(score_t);
  ffi::Tensor out_t = host_empty(shape, f32);
  float* out = data_of<float>(out_t);
  std::fill(out, out + N * D, 0.0f);
  std::vector<int> experts;
  {
    std::set<int64_t> uniq(idx.begin(), idx.end());
    for (int64_t e : uniq) experts.push_back(static_cast<int>(e));
  }
  Layer& layer = layers_.at(li);
  for (int e : experts)
    if (!layer.kept.count(e))
      // The gate is masked to the kept set, so this means the bundle is inconsistent.
      throw BundleError("task '" + task_ + "' routed to expert " + std::to_string(e) + " of layer " + std::to_string(li) +
                        ", outside its kept set");
  std::vector<Key> keys;
  for (int e : experts) keys.emplace_back(li, e);
  ExpertCache& cache = *cache_;
  cache.begin_step(li, keys);
  // With prefetch on, the step's misses load at once and its cached experts run first.
  const std::vector<Key> order = prefetch_.empty() ? keys : cache.fetch(keys);
  std::vector<Key> ahead, pending;
  if (!prefetch_.empty()) {
    std::vector<int> pregate;
    bool have_pregate = false;
    if (prefetch_ == "pregate" && li + 1 < static_cast<int>(layers_.size())) {
      // Pre-gating: the next layer's gate on this layer's MoE input names its experts one layer ahead.
      std::vector<ffi::Tensor> nxt = gates_.at(li + 1)->run({h});
      std::set<int64_t> u;
      if (is_dtype(nxt[0], {kDLInt, 64, 1})) {
        const int64_t* p = data_of<int64_t>(nxt[0]);
        u.insert(p, p + numel(nxt[0]));
      } else {
        const int32_t* p = data_of<int32_t>(nxt[0]);
        u.insert(p, p + numel(nxt[0]));
      }
      for (int64_t e : u) pregate.push_back(static_cast<int>(e));
      have_pregate = true;
    }
    ahead = lookahead_keys(li, experts, have_pregate ? &pregate : nullptr);
    if (!ahead.empty()) {
      std::vector<Key> protect = keys;
      protect.insert(protect.end(), resident_.begin(), resident_.end());
      pending = cache.prefetch(ahead, protect);
    }
  }
  std::vector<int64_t> tok;
  std::vector<int64_t> slot;
  // Each expert's weighted output, added in ascending expert order once all have run (float sums
  // depend on their order; the experts may run in another).
  std::map<int, std::pair<std::vector<int64_t>, std::vector<float>>> parts;
  for (size_t j = 0; j < order.size(); ++j) {
    const Key& key = order[j];
    const int e = key.second;
    tok.clear();
    slot.clear();
    for (int64_t t = 0; t < N; ++t)
      for (int64_t s = 0; s < k; ++s)
        if (idx[t * k + s] == e) tok.push_back(t), slot.push_back(s);
    const int64_t n = static_cast<int64_t>(tok.size());
    ffi::Tensor xe = host_empty({n, D}, f32);
    float* xp = data_of<float>(xe);
    for (int64_t i = 0; i < n; ++i) std::memcpy(xp + i * D, flat + tok[i] * D, D * sizeof(float));
    const Expert& rec = layer.experts.at(e);
    const TvmGraph& kernel = *graphs_.at(rec.kernel);
    // Pinned while the kernel runs: eviction cannot free the weights under it.
    const char* w = cache.acquire(key);
    ffi::Tensor y;
    try {
      std::vector<ffi::Tensor> args = weight_args(kernel, rec.tensors, const_cast<char*>(w), rec.file.rel);
      args.insert(args.begin(), xe);
      std::vector<ffi::Tensor> r = kernel.run(args);
      if (r.size() != 1 || !is_dtype(r[0], f32) || numel(r[0]) != n * D)
        throw BundleError("expert kernel " + kernel.name() + " returned an output unlike its input");
      y = r[0];
    } catch (...) {
      cache.release(key);
      throw;
    }
    cache.release(key);
    const float* yp = data_of<float>(y);
    auto& part = parts[e];
    part.first = tok;
    part.second.resize(static_cast<size_t>(n * D));
    for (int64_t i = 0; i < n; ++i) {
      const float s = scores[tok[i] * k + slot[i]];
      for (int64_t d = 0; d < D; ++d) part.second[i * D + d] = yp[i * D + d] * s;  // as numpy: rounded to float32
    }
    if (!pending.empty() && std::find(resident_.begin(), resident_.end(), key) == resident_.end()) {
      // The expert just done may make room: stream the next layers' experts into its slot.
      std::vector<Key> protect(order.begin() + j + 1, order.end());
      protect.insert(protect.end(), resident_.begin(), resident_.end());
      protect.insert(protect.end(), ahead.begin(), ahead.begin() + (ahead.size() - pending.size()));
      pending = cache.prefetch(pending, protect);
    }
  }
  for (const auto& [e, part] : parts) {
    const auto& [rows, prods] = part;
    for (size_t i = 0; i < rows.size(); ++i) {
      float* o = out + rows[i] * D;
      const float* pi = prods.data() + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = o[d] + pi[d];
    }
  }
  if (!shared_.at(li).empty()) {
    // The gate's third output weighs each shared expert per token (ones where ungated).
    if (gate_out.size() < 3 || !is_dtype(gate_out[2], f32) || !N || numel(gate_out[2]) % N)
      throw BundleError("gate of layer " + std::to_string(li) + " returned no shared-expert weights");
    const float* ss = data_of<float>(gate_out[2]);
    const int64_t cols = numel(gate_out[2]) / N;
    ffi::Tensor flat_t = host_borrow(const_cast<float*>(flat), {N, D}, f32);
    for (size_t j = 0; j < shared_[li].size(); ++j) {
      const SharedWeights& sw = shared_[li][j];
      std::vector<ffi::Tensor> args = sw.args;
      args.insert(args.begin(), flat_t);
      std::vector<ffi::Tensor> r = sw.kernel->run(args);
      if (r.size() != 1 || !is_dtype(r[0], f32) || numel(r[0]) != N * D)
        throw BundleError("shared expert kernel " + sw.kernel->name() + " returned an output unlike its input");
      const float* yp = data_of<float>(r[0]);
      for (int64_t t = 0; t < N; ++t) {
        const float s = ss[t * cols + static_cast<int64_t>(j)];
        for (int64_t d = 0; d < D; ++d) {
          const float prod = yp[t * D + d] * s;
          out[t * D + d] = out[t * D + d] + prod;
        }
      }
    }
  }
  return out_t;
}

ffi::Tensor Session::run(const ffi::Tensor& x) {
  if (!prefetch_.empty()) {
    // The first layers' experts load while the trunk runs.
    std::vector<Key> ahead = lookahead_keys(-1, {}, nullptr);
    if (!ahead.empty()) cache_->prefetch(ahead, resident_);
  }
  std::vector<ffi::Tensor> outs = segments_.at(0)->run({x});
  for (size_t li = 0; li < layers_.size(); ++li) {
    // Segments hand on (hidden, moe_input, *carried): carried tensors (e.g. masks) pass through.
    if (outs.size() < 2) throw BundleError("segment " + std::to_string(li) + " returned fewer than 2 outputs");
    std::vector<ffi::Tensor> args = outs;
    args[1] = moe(static_cast<int>(li), outs[1]);
    outs = segments_.at(li + 1)->run(args);
  }
  std::vector<ffi::Tensor> y = head_->run(outs);
  if (y.size() != 1) throw BundleError("head " + head_->name() + " returned " + std::to_string(y.size()) + " outputs");
  ++runs_;
  return y[0];
}

Json Session::stats_json() const {
  Json j = Json::object();
  int64_t experts_task = 0, bytes_task = 0;
  for (const auto& layer : layers_)
    for (int e : layer.kept) ++experts_task, bytes_task += layer.experts.at(e).bytes;
  const Json& totals = m().at("totals");
  j["experts_loaded"] = Json(cache_->experts_ever());
  j["experts_task"] = Json(experts_task);
  j["experts_total"] = Json(totals.at("experts_model").as_int());
  j["expert_bytes_loaded"] = Json(cache_->book().bytes_loaded);
  j["expert_bytes_task"] = Json(bytes_task);
  j["expert_bytes_total"] = Json(totals.at("expert_bytes_model").as_int());
  j["graph_bytes"] = Json(graph_bytes_);
  return j;
}

Json Session::cache_json() const {
  const CacheBook& book = cache_->book();
  Json j = Json::object();
  j["budget_bytes"] = memory_budget_ ? Json(memory_budget_) : Json();
  j["capacity_bytes"] = Json(capacity_);
  j["shared_bytes"] = Json(shared_bytes_);
  j["policy"] = Json(policy_name_);
  j["prefetch"] = prefetch_.empty() ? Json() : Json(prefetch_);
  j["from_schedule"] = Json(from_schedule_);
  j["peak_expert_bytes"] = Json(book.peak);
  j["hits"] = Json(book.hits);
  j["misses"] = Json(book.misses);
  j["evictions"] = Json(book.evictions);
  j["prefetched"] = Json(cache_->prefetch_issued());
  j["prefetch_hits"] = Json(cache_->prefetch_used());
  j["stall_ms"] = Json(cache_->stall_ms());
  j["bytes_read"] = Json(book.bytes_loaded + shared_bytes_);
  return j;
}

void Session::write_events(const std::string& path) const {
  std::ofstream f(path, std::ios::trunc);
  if (!f) throw InputError("cannot write " + path);
  for (const CacheEvent& e : cache_->events())
    f << "{\"step\": " << e.step << ", \"layer\": " << e.layer << ", \"expert\": " << e.expert << ", \"kind\": \""
      << e.kind << "\"}\n";
}

void Session::close() {
  if (cache_) cache_->close();
}

}  // namespace edgemoe
