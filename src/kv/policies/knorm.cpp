// K-norm: keys with a small L2 norm tend to receive more attention (keep the smallest norms).
// The score depends only on the key: computed once, from the model's F32 key, as the token
// enters the cache (key_scorer); scoring a round reads the kept scores.
#include "kv/policies/policies.h"
#include "tensor/kernels.h"

#include <cmath>

namespace qf::kv::policies {

namespace {
float minus_norm(const float* key, int d) { return -std::sqrt(dot_f32(key, key, d)); }

class KNorm final : public Policy {
 public:
  std::string_view name() const override { return "knorm"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.key_scores = true}; }

  KeyScorer key_scorer(const CacheShape& s) const override {
    return [d = s.head_dim](int, int, const float* key, int32_t) { return minus_norm(key, d); };
  }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    if (copy_key_scores(hc, scores)) return;
    const int d = cache.shape().head_dim;
    for_each_key(hc, d, [&](int j, const float* key) { scores[j] = minus_norm(key, d); });
  }
};
}  // namespace

std::unique_ptr<Policy> make_knorm(const PolicyOptions&) { return std::make_unique<KNorm>(); }

}  // namespace qf::kv::policies
