// TOVA (Oren et al., 2024), with kvpress TOVAPress semantics: a key's score is the attention the
// most recent query gives it, averaged over ALL query heads of the layer, so every KV head of
// the layer gets the same score for the same token; the newest token is always kept.
//
// attn_last (AttentionStats::last_query) holds, per KV head, the last query's weights averaged
// over that head's query group; groups have equal size, so the mean over KV heads is the mean
// over all query heads. Heads are matched by position, not by slot: under TOVA alone all heads
// of a layer evict the same tokens (same scores, same tie-break), but a head that does not hold
// a token (another eviction made the heads ragged) gave it zero attention, and counts so.
#include <limits>

#include "kv/policies/policies.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {
class Tova final : public Policy {
 public:
  std::string_view name() const override { return "tova"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.last_query = true}; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const int nkv = cache.shape().n_kv_heads;
    const HeadCache& self = cache.head(layer, kv_head);
    const int n = self.n;
    for (int i = 0; i < n; ++i) scores[i] = 0.0f;
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& other = cache.head(layer, h);
      if (other.attn_last.empty()) fail("tova: the cache keeps no last-query attention (build it with the policy's needs())");
      for_each_shared_position(self, other, [&](int i, int j) { scores[i] += other.attn_last[j]; });
    }
    const float inv = 1.0f / static_cast<float>(nkv);
    for (int i = 0; i < n; ++i) scores[i] *= inv;
    if (n > 0) scores[n - 1] = std::numeric_limits<float>::infinity();
  }
};
}  // namespace

std::unique_ptr<Policy> make_tova(const PolicyOptions&) { return std::make_unique<Tova>(); }

}  // namespace qf::kv::policies
