// Q-Filters (Godey et al., 2025): a key's projection on its head's filter estimates the mean
// attention logit future queries will give it, without computing any attention weight. The
// score depends only on the key, so it is computed once, from the model's F32 key, as the token
// enters the cache (key_scorer); scoring a round reads the kept scores.
#include "kv/policies/policies.h"
#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {
class QFilters final : public Policy {
 public:
  explicit QFilters(std::span<const float> filters) : filters_(filters) {}
  std::string_view name() const override { return "qfilters"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.key_scores = true}; }

  KeyScorer key_scorer(const CacheShape& s) const override {
    check_shape(s);
    return [f = filters_.data(), s](int layer, int kv_head, const float* key, int32_t) {
      return dot_f32(key, filter(f, s, layer, kv_head), s.head_dim);
    };
  }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    if (copy_key_scores(hc, scores)) return;
    const CacheShape& s = cache.shape();
    check_shape(s);
    const float* f = filter(filters_.data(), s, layer, kv_head);
    for_each_key(hc, s.head_dim, [&](int j, const float* key) { scores[j] = dot_f32(key, f, s.head_dim); });
  }

 private:
  static const float* filter(const float* filters, const CacheShape& s, int layer, int kv_head) {
    return filters + (static_cast<size_t>(layer) * s.n_kv_heads + kv_head) * s.head_dim;
  }
  void check_shape(const CacheShape& s) const {
    if (filters_.size() != static_cast<size_t>(s.n_layers) * s.n_kv_heads * s.head_dim)
      fail("qfilters: filters have ", filters_.size(), " values, the model needs ", s.n_layers, "x", s.n_kv_heads, "x", s.head_dim);
  }

  std::span<const float> filters_;
};
}  // namespace

std::unique_ptr<Policy> make_qfilters(const PolicyOptions& o) {
  if (o.filters.empty()) fail("--kv-policy qfilters needs a filter file (--filters FILE; make one with qf calibrate)");
  return std::make_unique<QFilters>(o.filters);
}

}  // namespace qf::kv::policies
