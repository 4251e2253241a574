// SnapKV (Li et al., 2024), with kvpress SnapKVPress semantics: the attention the queries of an
// observation window give each older key, averaged over those queries, average-pooled along the
// key axis, averaged over the GQA group; the window's own tokens are always kept.
//
// Where the numbers come from: the cache's attn_sum (AttentionStats::window) holds, per slot, the
// attention received from the accumulating queries, already averaged over the query heads of the
// KV group (attend_with_stats); the Compressor zeroes it after every scoring round of a layer.
//  - Prefill: the model accumulates from position prompt_len - window, so attn_sum is the sum
//    over the last `window` prompt queries, exactly kvpress's observation window.
//  - Streaming (generation): the observation window is the queries since the layer's previous
//    eviction round (one query with --kv-evict-every 1, k with k). The newest `window`
//    positions are still protected, because they have been observed by too few queries to be
//    judged; a budget <= snapkv_window therefore degenerates to keeping the most recent tokens.
//    The first round sees everything accumulated since the cache started (or was copied).
//    Sums are divided by `window`: the exact mean in prefill, a constant factor in streaming
//    (rankings, all the Compressor uses, are unaffected). kvpress's DecodingPress likewise
//    scores from the tokens buffered since its previous compression.
//
// Pooling: kvpress calls F.avg_pool1d(kernel, padding=kernel//2, stride=1) with the default
// count_include_pad=True, so a border key's sum is divided by the full kernel width, not by the
// number of real neighbours (borders are pulled towards 0). The pooled sequence is the keys
// outside the window only: the window's attention never leaks into its neighbours' scores. We
// pool by POSITION (neighbours are the cached keys within +-kernel//2 positions): identical to
// kvpress on an unevicted prompt, and on a cache with holes an evicted neighbour counts as the
// zero padding does, rather than pulling in a key that sits far away.
#include <cmath>
#include <limits>

#include "kv/policies/policies.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {
class SnapKV final : public Policy {
 public:
  SnapKV(int window, int kernel) : window_(window), kernel_(kernel) {}
  std::string_view name() const override { return "snapkv"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.window = window_}; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    if (hc.attn_sum.empty()) fail("snapkv: the cache keeps no attention statistics (build it with the policy's needs())");
    const int n = hc.n;
    if (n == 0) return;
    // Slots [0, n_obs) are the observed keys; [n_obs, n) the newest `window` positions.
    const int64_t first_window_pos = static_cast<int64_t>(hc.pos[n - 1]) - window_ + 1;
    int n_obs = n;
    while (n_obs > 0 && hc.pos[n_obs - 1] >= first_window_pos) --n_obs;

    const int r = kernel_ / 2;
    const float norm = 1.0f / (static_cast<float>(window_) * static_cast<float>(kernel_));
    for (int i = 0; i < n_obs; ++i) {
      // Positions strictly increase with the slot, so the neighbours are contiguous slots.
      float sum = hc.attn_sum[i];
      for (int j = i - 1; j >= 0 && hc.pos[i] - hc.pos[j] <= r; --j) sum += hc.attn_sum[j];
      for (int j = i + 1; j < n_obs && hc.pos[j] - hc.pos[i] <= r; ++j) sum += hc.attn_sum[j];
      scores[i] = sum * norm;
    }
    for (int i = n_obs; i < n; ++i) scores[i] = std::numeric_limits<float>::infinity();
  }

 private:
  int window_, kernel_;
};
}  // namespace

std::unique_ptr<Policy> make_snapkv(const PolicyOptions& o) {
  if (o.snapkv_window < 1) fail("snapkv: the observation window must be >= 1 (got ", o.snapkv_window, ")");
  // An even kernel with padding kernel/2 changes the sequence length (kvpress cannot run it either).
  if (o.snapkv_kernel < 1 || o.snapkv_kernel % 2 == 0)
    fail("snapkv: the pooling kernel must be odd and >= 1 (got ", o.snapkv_kernel, ")");
  return std::make_unique<SnapKV>(o.snapkv_window, o.snapkv_kernel);
}

}  // namespace qf::kv::policies
