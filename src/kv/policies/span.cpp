// Span selection (kSpanSuffix): a number or a name is several tokens, and an answer needs all of
// them, but per-token scores keep some and evict others (a needle's leading digits survive, its
// last ones do not). Each token takes the best score within kSpanRadius positions of it among the
// tokens its head holds, so the neighbours of a token worth keeping are kept with it.
#include <cmath>
#include <string>

#include "kv/policies/policies.h"

namespace qf::kv::policies {

namespace {

// a ranks above b as the Compressor ranks scores (NaN lowest).
bool above(float a, float b) { return !std::isnan(a) && (std::isnan(b) || a > b); }

class Span final : public Policy {
 public:
  explicit Span(std::unique_ptr<Policy> inner)
      : inner_(std::move(inner)), name_(std::string(inner_->name()) + std::string(kSpanSuffix)) {}
  std::string_view name() const override { return name_; }
  AttentionStats needs(const PolicyOptions& o) const override { return inner_->needs(o); }
  KeyScorer key_scorer(const CacheShape& shape) const override { return inner_->key_scorer(shape); }
  std::string save_state() const override { return inner_->save_state(); }
  void load_state(std::string_view state) override { inner_->load_state(state); }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    raw_.resize(hc.n);
    inner_->score_head(cache, layer, kv_head, raw_);
    pool(hc, raw_, scores);
  }

  void score_layer(const Cache& cache, int layer, std::vector<std::vector<float>>& scores) override {
    inner_->score_layer(cache, layer, raw_layer_);
    scores.resize(raw_layer_.size());
    for (size_t h = 0; h < raw_layer_.size(); ++h) {
      scores[h].resize(raw_layer_[h].size());
      pool(cache.head(layer, static_cast<int>(h)), raw_layer_[h], scores[h]);
    }
  }

 private:
  // out[i] = the best raw[j] over slots j with |pos[j] - pos[i]| <= kSpanRadius (slots hold
  // increasing positions, so those slots are contiguous around i).
  static void pool(const HeadCache& hc, std::span<const float> raw, std::span<float> out) {
    for (int i = 0, lo = 0, hi = 0; i < hc.n; ++i) {
      while (hc.pos[lo] < hc.pos[i] - kSpanRadius) ++lo;
      hi = std::max(hi, i);
      while (hi + 1 < hc.n && hc.pos[hi + 1] <= hc.pos[i] + kSpanRadius) ++hi;
      float best = raw[i];
      for (int j = lo; j <= hi; ++j)
        if (above(raw[j], best)) best = raw[j];
      out[i] = best;
    }
  }

  std::unique_ptr<Policy> inner_;
  std::string name_;
  std::vector<float> raw_;
  std::vector<std::vector<float>> raw_layer_;
};

}  // namespace

std::unique_ptr<Policy> make_span(std::unique_ptr<Policy> inner) { return std::make_unique<Span>(std::move(inner)); }

}  // namespace qf::kv::policies
