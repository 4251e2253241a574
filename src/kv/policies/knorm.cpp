// K-norm: keys with a small L2 norm tend to receive more attention (keep the smallest norms).
#include "kv/policies/policies.h"
#include "tensor/kernels.h"

#include <cmath>

namespace qf::kv::policies {

namespace {
class KNorm final : public Policy {
 public:
  std::string_view name() const override { return "knorm"; }
  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const int d = cache.shape().head_dim;
    const HeadCache& hc = cache.head(layer, kv_head);
    for_each_key(hc, d, [&](int j, const float* key) { scores[j] = -std::sqrt(dot_f32(key, key, d)); });
  }
};
}  // namespace

std::unique_ptr<Policy> make_knorm(const PolicyOptions&) { return std::make_unique<KNorm>(); }

}  // namespace qf::kv::policies
