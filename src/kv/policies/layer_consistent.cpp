// Layer-consistent selection (kLayerSuffix): per-head eviction lets the KV heads of a layer keep
// different tokens (different digits of one number in different heads); averaging standardised
// scores over the layer's heads makes them keep the same ones, as TOVA does by construction.
#include <cmath>
#include <limits>
#include <string>

#include "kv/policies/policies.h"

namespace qf::kv::policies {

Standardisation Standardisation::of(double sum, double sum_sq, int n) {
  if (n <= 0) return {};
  const double m = sum / n, var = std::max(0.0, sum_sq / n - m * m);
  return {m, var > 0 ? 1.0 / std::sqrt(var) : 0.0};
}

std::optional<Standardisation> Standardisation::of_finite(std::span<const float> s) {
  constexpr size_t kLanes = 8;
  const size_t whole = s.size() / kLanes * kLanes;
  float lane_sum[kLanes] = {}, lane_sq[kLanes] = {};
  for (size_t j = 0; j < whole; j += kLanes)
    for (size_t k = 0; k < kLanes; ++k) lane_sum[k] += s[j + k];
  for (size_t j = 0; j < whole; j += kLanes)
    for (size_t k = 0; k < kLanes; ++k) lane_sq[k] += s[j + k] * s[j + k];
  double sum = 0, sq = 0;
  for (size_t k = 0; k < kLanes; ++k) sum += lane_sum[k], sq += lane_sq[k];
  for (size_t j = whole; j < s.size(); ++j) sum += s[j], sq += static_cast<double>(s[j]) * s[j];
  if (!std::isfinite(sum) || !std::isfinite(sq)) return std::nullopt;
  return of(sum, sq, static_cast<int>(s.size()));
}

void standardise(std::span<float> s) {
  double sum = 0, sq = 0;
  int n = 0;
  for (float x : s)
    if (std::isfinite(x)) sum += x, sq += static_cast<double>(x) * x, ++n;
  if (n == 0) return;
  const Standardisation z = Standardisation::of(sum, sq, n);
  for (float& x : s)
    if (std::isfinite(x)) x = z(x);
}

namespace {

class LayerConsistent final : public Policy {
 public:
  explicit LayerConsistent(std::unique_ptr<Policy> inner)
      : inner_(std::move(inner)), name_(std::string(inner_->name()) + std::string(kLayerSuffix)) {}
  std::string_view name() const override { return name_; }
  AttentionStats needs(const PolicyOptions& o) const override { return inner_->needs(o); }
  KeyScorer key_scorer(const CacheShape& shape) const override { return inner_->key_scorer(shape); }
  std::string save_state() const override { return inner_->save_state(); }
  void load_state(std::string_view state) override { inner_->load_state(state); }
  size_t state_bytes_per_slot() const override { return inner_->state_bytes_per_slot(); }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    score_layer(cache, layer, layer_scores_);
    std::copy(layer_scores_[kv_head].begin(), layer_scores_[kv_head].end(), scores.begin());
  }

  void score_layer(const Cache& cache, int layer, std::vector<std::vector<float>>& scores) override {
    const int nkv = cache.shape().n_kv_heads;
    inner_->score_layer(cache, layer, raw_);
    for (auto& s : raw_) standardise(s);
    scores.resize(nkv);
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& self = cache.head(layer, h);
      scores[h].assign(self.n, 0.0f);
      count_.assign(self.n, 0);
      for (int o = 0; o < nkv; ++o)
        for_each_shared_position(self, cache.head(layer, o), [&](int i, int j) {
          scores[h][i] += raw_[o][j];
          ++count_[i];
        });
      for (int i = 0; i < self.n; ++i) scores[h][i] /= static_cast<float>(count_[i]);  // count >= 1: itself
    }
  }

 private:
  std::unique_ptr<Policy> inner_;
  std::string name_;
  std::vector<std::vector<float>> raw_, layer_scores_;
  std::vector<int> count_;
};

}  // namespace

std::unique_ptr<Policy> make_layer_consistent(std::unique_ptr<Policy> inner) {
  return std::make_unique<LayerConsistent>(std::move(inner));
}

}  // namespace qf::kv::policies
