// StreamingLLM: the first n_sink tokens (attention sinks) and the most recent ones.
#include "kv/policies/policies.h"

namespace qf::kv::policies {

namespace {
class Streaming final : public Policy {
 public:
  explicit Streaming(int n_sink) : n_sink_(n_sink) {}
  std::string_view name() const override { return "streaming"; }
  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    // Sinks are scored above everything; the rest by recency (position).
    for (int j = 0; j < hc.n; ++j)
      scores[j] = hc.pos[j] < n_sink_ ? 1e30f : static_cast<float>(hc.pos[j]);
  }

 private:
  int n_sink_;
};
}  // namespace

std::unique_ptr<Policy> make_streaming(const PolicyOptions& o) { return std::make_unique<Streaming>(o.n_sink); }

}  // namespace qf::kv::policies
