// edgemoe-rt: run one task of an edgemoe TVM bundle natively (TVM's C++ runtime, no Python).
//
//   edgemoe-rt BUNDLE --task T --input x.npy --output y.npy [--memory-budget BYTES|NN%]
//              [--policy lru|lfu|planned] [--prefetch off|routed|pregate|static|affinity|plan]
//              [--repeat N] [--threads N] [--events FILE] [--lazy-verify] [--json]
//
// Errors print one line `error: <message>` on stderr and exit with the Python CLI's codes
// (edgemoe/errors.py): 2 usage, 4 config, 5 bundle, 6 integrity, 8 task, 9 input, 1 internal.
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "errors.h"
#include "json.h"
#include "npy.h"
#include "session.h"

using namespace edgemoe;

namespace {

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

const char* kUsage =
    "usage: edgemoe-rt BUNDLE [--task T] --input x.npy [--output y.npy] [--memory-budget BYTES|NN%]\n"
    "                  [--policy lru|lfu|planned] [--prefetch off|routed|pregate|static|affinity|plan]\n"
    "                  [--prefetch-depth N] [--repeat N] [--threads N] [--events FILE] [--lazy-verify] [--json]\n"
    "                  [--profile]\n"
    "\n"
    "Runs one task of an edgemoe TVM bundle with TVM's C++ runtime, loading only the experts its\n"
    "tokens are routed to, within an expert-cache byte budget (default: the bundle schedule's, else\n"
    "unbounded). Every file the task uses is checked (size + sha256) before any library is loaded;\n"
    "--lazy-verify checks routed expert blobs on their first load instead.\n";

struct Args {
  std::string bundle, input, output, events;
  SessionOptions opts;
  int repeat = 1;
  bool json = false;
  bool profile = false;
};

int to_int(const std::string& opt, const std::string& v) {
  char* end = nullptr;
  long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end) throw UsageError("option " + opt + " takes an integer, got '" + v + "'");
  return static_cast<int>(x);
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i], val;
    bool has_val = false;
    size_t eq = s.find('=');
    if (s.rfind("--", 0) == 0 && eq != std::string::npos) {
      val = s.substr(eq + 1);
      s = s.substr(0, eq);
      has_val = true;
    }
    auto value = [&]() -> std::string {
      if (has_val) return val;
      if (i + 1 >= argc) throw UsageError("option " + s + " requires an argument");
      return argv[++i];
    };
    if (s == "-h" || s == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (s == "--task") a.opts.task = value();
    else if (s == "--input") a.input = value();
    else if (s == "--output") a.output = value();
    else if (s == "--memory-budget") a.opts.budget = value();
    else if (s == "--policy") a.opts.policy = value();
    else if (s == "--prefetch") a.opts.prefetch = value();
    else if (s == "--prefetch-depth") a.opts.prefetch_depth = to_int(s, value());
    else if (s == "--repeat") a.repeat = to_int(s, value());
    else if (s == "--threads") a.opts.threads = to_int(s, value());
    else if (s == "--events") a.events = value();
    else if (s == "--lazy-verify") a.opts.lazy_verify = true;
    else if (s == "--json") a.json = true;
    else if (s == "--profile") a.profile = true;
    else if (s.size() > 1 && s[0] == '-') throw UsageError("no such option: " + s);
    else pos.push_back(s);
  }
  if (pos.size() != 1) throw UsageError(pos.empty() ? "missing argument BUNDLE" : "got unexpected extra argument " + pos[1]);
  a.bundle = pos[0];
  if (a.input.empty()) throw UsageError("missing option --input (a .npy array)");
  if (a.repeat < 1) throw InputError("--repeat must be at least 1, got " + std::to_string(a.repeat));
  if (!a.opts.policy.empty() && a.opts.policy != "lru" && a.opts.policy != "lfu" && a.opts.policy != "planned")
    throw UsageError("invalid value for --policy: '" + a.opts.policy + "' (choose from lru, lfu, planned)");
  a.opts.log_events = !a.events.empty();
  if (!a.output.empty() && (a.output.size() < 4 || a.output.compare(a.output.size() - 4, 4, ".npy") != 0))
    throw InputError("--output must be a .npy file, got " + a.output);
  return a;
}

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

void make_parents(const std::string& path) {
  for (size_t i = 1; i < path.size(); ++i)
    if (path[i] == '/') ::mkdir(path.substr(0, i).c_str(), 0777);
}

int run(int argc, char** argv) {
  Args a = parse(argc, argv);
  Session session(a.bundle, a.opts);  // manifest, task, budget, every file checked: no bundle code yet
  for (const auto& w : session.warnings) std::cerr << "warning: " << w << "\n";
  NpyArray raw = read_npy(a.input);
  ffi::Tensor x = session.check_input(raw);
  session.load();  // now the verified libraries are loaded
  std::vector<double> times;
  ffi::Tensor y;
  auto t0 = std::chrono::steady_clock::now();
  y = session.run(x);
  double first_ms = ms_since(t0);
  if (a.repeat == 1) {
    times.push_back(first_ms);
  } else {
    for (int i = 0; i < a.repeat; ++i) {
      auto t = std::chrono::steady_clock::now();
      y = session.run(x);
      times.push_back(ms_since(t));
    }
  }
  session.close();
  if (a.profile) std::cerr << session.profile();
  std::vector<int64_t> shape = shape_of(y);
  if (!a.output.empty()) {
    make_parents(a.output);
    write_npy(a.output, npy_descr(y.dtype()), shape, data_of<char>(y), nbytes(y));
  }
  if (!a.events.empty()) {
    make_parents(a.events);
    session.write_events(a.events);
  }
  std::sort(times.begin(), times.end());
  size_t n = times.size();
  double median = n % 2 ? times[n / 2] : (times[n / 2 - 1] + times[n / 2]) / 2;
  Json stats = session.stats_json();
  Json out = Json::object();
  out["task"] = Json(session.task());
  out["input"] = Json(a.input);
  Json shp = Json::array();
  for (int64_t d : shape) shp.push_back(Json(d));
  out["output_shape"] = shp;
  out["output_file"] = a.output.empty() ? Json() : Json(a.output);
  out["latency_ms"] = Json(median);
  out["first_run_ms"] = Json(first_ms);
  out["runs"] = Json(static_cast<int64_t>(n));
  for (const auto& kv : stats.members()) out[kv.first] = kv.second;
  out["png_files"] = Json();
  out["executor"] = Json(std::string("tvm"));
  out["driver"] = Json();
  Json providers = Json::object();
  providers["requested"] = Json::array();
  providers["used"] = Json::array();
  out["providers"] = providers;
  out["cache"] = session.cache_json();
  if (a.json) {
    std::cout << out.dump() << std::endl;
  } else {
    const Json& c = out.at("cache");
    std::string dims;
    for (size_t i = 0; i < shape.size(); ++i) dims += (i ? "x" : "") + std::to_string(shape[i]);
    std::printf("task %s: output %s from %s input\n", session.task().c_str(), dims.c_str(), a.input.c_str());
    std::printf("latency      %.2f ms (median of %zu; first run %.2f ms)\n", median, n, first_ms);
    std::printf("experts      %lld loaded / %lld kept for the task / %lld in the model\n",
                (long long)stats.at("experts_loaded").as_int(), (long long)stats.at("experts_task").as_int(),
                (long long)stats.at("experts_total").as_int());
    std::printf("expert bytes %lld loaded / %lld in the model\n", (long long)stats.at("expert_bytes_loaded").as_int(),
                (long long)stats.at("expert_bytes_total").as_int());
    std::printf("graph bytes  %lld\n", (long long)stats.at("graph_bytes").as_int());
    std::printf("cache        %s, budget %lld B: %lld hits, %lld misses, %lld evictions, peak %lld B\n",
                c.at("policy").as_string().c_str(),
                (long long)(c.at("budget_bytes").is_null() ? 0 : c.at("budget_bytes").as_int()),
                (long long)c.at("hits").as_int(), (long long)c.at("misses").as_int(),
                (long long)c.at("evictions").as_int(), (long long)c.at("peak_expert_bytes").as_int());
    if (!a.output.empty()) std::printf("output saved to %s\n", a.output.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Error& e) {
    std::cerr << "error: " << one_line(e.what()) << std::endl;
    std::fflush(stdout);
    std::_Exit(e.code());  // no static destructors: TVM's globals may still hold threads
  } catch (const std::exception& e) {
    std::cerr << "internal error: " << one_line(e.what()) << std::endl;
    std::fflush(stdout);
    std::_Exit(kInternal);
  }
}
