// H2O (Zhang et al., 2023) as kvpress ObservedAttentionPress scores it: the attention a key has
// received, summed over the queries that saw it and divided by their number (a key that arrived
// late is not penalised for having had fewer chances), averaged over the GQA group (attn_sum
// already is). H2O's recent window is the Compressor's --kv-window.
// Accumulation never restarts: in streaming mode a key's score covers every accumulating query
// since it entered the cache. A key no accumulating query has seen scores 0.
#include "kv/policies/policies.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {
class H2O final : public Policy {
 public:
  std::string_view name() const override { return "h2o"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.accumulate = true}; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    if (hc.attn_sum.empty() || hc.attn_cnt.empty())
      fail("h2o: the cache keeps no accumulated attention (build it with the policy's needs())");
    for (int j = 0; j < hc.n; ++j)
      scores[j] = hc.attn_cnt[j] > 0 ? hc.attn_sum[j] / static_cast<float>(hc.attn_cnt[j]) : 0.0f;
  }
};
}  // namespace

std::unique_ptr<Policy> make_h2o(const PolicyOptions&) { return std::make_unique<H2O>(); }

}  // namespace qf::kv::policies
