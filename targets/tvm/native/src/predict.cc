#include "predict.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "errors.h"

namespace edgemoe {

namespace {
// Indices by descending value, ties in index order (numpy argsort(-x, kind="stable")).
std::vector<int> stable_desc(const std::vector<double>& x) {
  std::vector<int> idx(x.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return -x[a] < -x[b]; });
  return idx;
}

// numpy's float64 sum of a short 1-d array (pairwise with 8 accumulators from 8 elements on).
double np_sum(const std::vector<double>& a) {
  size_t n = a.size();
  if (n < 8) {
    double s = -0.0;
    for (double v : a) s += v;
    return n ? s : 0.0;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t half = n / 2;
  half -= half % 8;
  return np_sum(std::vector<double>(a.begin(), a.begin() + half)) +
         np_sum(std::vector<double>(a.begin() + half, a.end()));
}
}  // namespace

std::vector<int> Affinity::predict(int layer, const std::vector<int>& experts, const std::vector<int>*) const {
  if (layer >= static_cast<int>(table_.size()) || experts.empty()) return {};
  const auto& t = table_[layer];
  size_t width = t.empty() ? 0 : t[0].size();
  std::vector<double> score(width, 0.0);
  bool first = true;
  for (int e : experts) {  // rows summed in order (numpy sum over axis 0)
    if (e < 0 || e >= static_cast<int>(t.size())) continue;
    for (size_t j = 0; j < width && j < t[e].size(); ++j) score[j] = first ? t[e][j] : score[j] + t[e][j];
    first = false;
  }
  std::vector<int> out;
  int limit = layer + 1 < static_cast<int>(width_.size()) ? width_[layer + 1] : 0;
  std::vector<int> order = stable_desc(score);
  for (int i = 0; i < limit && i < static_cast<int>(order.size()); ++i)
    if (score[order[i]] > 0) out.push_back(order[i]);
  return out;
}

std::unique_ptr<Static> Static::from_probabilities(const std::vector<std::vector<double>>& prob) {
  std::vector<std::vector<int>> order;
  std::vector<int> width;
  for (const auto& p : prob) {
    std::vector<int> o;
    for (int e : stable_desc(p))
      if (p[e] > 0) o.push_back(e);
    order.push_back(o);
    width.push_back(std::max(1, static_cast<int>(std::ceil(np_sum(p) - 1e-9))));
  }
  return std::make_unique<Static>(order, width);
}

std::vector<int> Static::experts(int layer) const {
  if (layer < 0 || layer >= static_cast<int>(order_.size())) return {};
  const auto& o = order_[layer];
  int w = layer < static_cast<int>(width_.size()) ? width_[layer] : 0;
  return std::vector<int>(o.begin(), o.begin() + std::min<size_t>(std::max(w, 0), o.size()));
}

std::unique_ptr<Predictor> predictor_from_json(const Json& data) {
  try {
    const std::string& name = data.at("name").as_string();
    if (name == "pregate") return std::make_unique<PreGate>();
    if (name == "routed") return std::make_unique<Routed>();
    auto ints = [](const Json& j) {
      std::vector<int> v;
      for (const Json& x : j.items()) v.push_back(static_cast<int>(x.as_int()));
      return v;
    };
    if (name == "affinity") {
      std::vector<std::vector<std::vector<double>>> table;
      for (const Json& m : data.at("table").items()) {
        std::vector<std::vector<double>> rows;
        for (const Json& r : m.items()) {
          std::vector<double> row;
          for (const Json& x : r.items()) row.push_back(x.as_double());
          rows.push_back(row);
        }
        table.push_back(rows);
      }
      return std::make_unique<Affinity>(table, ints(data.at("width")));
    }
    if (name == "static") {
      std::vector<std::vector<int>> order;
      for (const Json& o : data.at("order").items()) order.push_back(ints(o));
      return std::make_unique<Static>(order, ints(data.at("width")));
    }
    throw ConfigError("unknown prefetch predictor '" + name + "' in the manifest");
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw ConfigError(std::string("garbled prefetch plan in the manifest: ") + e.what());
  }
}

std::vector<Key> lookahead(const Predictor* near, const Static* far, int layer, const std::vector<int>& experts,
                           const std::vector<int>* pregate, int num_layers, int depth) {
  std::vector<Key> out;
  for (int d = 1; d <= std::min(depth, num_layers); ++d) {
    int target = layer + d;
    std::vector<int> named;
    if (d == 1 && near && target < num_layers) named = near->predict(layer, experts, pregate);
    else if (far) named = far->experts(target % num_layers);
    else break;
    for (int e : named) out.emplace_back(target % num_layers, e);
  }
  return out;
}

}  // namespace edgemoe
