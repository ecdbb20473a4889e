// Prefetch predictors, mirroring edgemoe/schedule/predict.py (PreGate, Affinity, Static, lookahead).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "json.h"
#include "policies.h"

namespace edgemoe {

class Predictor {
 public:
  virtual ~Predictor() = default;
  virtual std::string name() const = 0;
  // Experts of layer ``layer + 1`` to prefetch, most likely first.
  virtual std::vector<int> predict(int layer, const std::vector<int>& experts, const std::vector<int>* pregate) const = 0;
};

class PreGate : public Predictor {
 public:
  std::string name() const override { return "pregate"; }
  std::vector<int> predict(int, const std::vector<int>&, const std::vector<int>* pregate) const override {
    return pregate ? *pregate : std::vector<int>{};
  }
};

// Nothing ahead: only a step's own misses load early (every prefetch mode does that; see ExpertCache::fetch).
class Routed : public Predictor {
 public:
  std::string name() const override { return "routed"; }
  std::vector<int> predict(int, const std::vector<int>&, const std::vector<int>*) const override { return {}; }
};

class Affinity : public Predictor {
 public:
  Affinity(std::vector<std::vector<std::vector<double>>> table, std::vector<int> width)
      : table_(std::move(table)), width_(std::move(width)) {}
  std::string name() const override { return "affinity"; }
  std::vector<int> predict(int layer, const std::vector<int>& experts, const std::vector<int>*) const override;

 private:
  std::vector<std::vector<std::vector<double>>> table_;
  std::vector<int> width_;
};

class Static : public Predictor {
 public:
  Static(std::vector<std::vector<int>> order, std::vector<int> width) : order_(std::move(order)), width_(std::move(width)) {}
  static std::unique_ptr<Static> from_probabilities(const std::vector<std::vector<double>>& prob);
  std::string name() const override { return "static"; }
  std::vector<int> experts(int layer) const;
  std::vector<int> predict(int layer, const std::vector<int>&, const std::vector<int>*) const override {
    return experts(layer + 1);
  }

 private:
  std::vector<std::vector<int>> order_;
  std::vector<int> width_;
};

// predictor_from_json (ConfigError on a garbled or unknown entry).
std::unique_ptr<Predictor> predictor_from_json(const Json& data);

std::vector<Key> lookahead(const Predictor* near, const Static* far, int layer, const std::vector<int>& experts,
                           const std::vector<int>* pregate, int num_layers, int depth);

}  // namespace edgemoe
