// KeyDiff (Park et al., 2025, arXiv 2504.15364), with kvpress KeyDiffPress semantics: a key that
// points where most keys of its head point is redundant, so the score is minus the cosine between
// the key and the anchor, the mean of the head's unit keys (the kept ones, after the rotary
// embedding, as the cache stores them). Distinctive keys, such as a number in prose, are kept.
// Attention-free: it reads only the cached keys, so the fused attention kernel stays. The anchor
// moves as tokens come and go, so every round rescans the head's keys: O(n d) per head.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kv/policies/policies.h"
#include "tensor/kernels.h"

namespace qf::kv::policies {

namespace {

// A zero key has no direction: it gets cosine 0, as torch's normalize / cosine_similarity give it.
constexpr float kMinNorm = 1e-12f;

class KeyDiff final : public Policy {
 public:
  std::string_view name() const override { return "keydiff"; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const HeadCache& hc = cache.head(layer, kv_head);
    const int d = cache.shape().head_dim;
    unit_keys_.resize(static_cast<size_t>(hc.n) * d);
    anchor_.assign(d, 0.0f);
    for_each_key(hc, d, [&](int j, const float* key) {
      float* u = unit_keys_.data() + static_cast<size_t>(j) * d;
      const float inv = 1.0f / std::max(std::sqrt(dot_f32(key, key, d)), kMinNorm);
      for (int i = 0; i < d; ++i) anchor_[i] += (u[i] = key[i] * inv);
    });
    // The mean's 1/n does not change the cosine, so the anchor is the sum, made unit here.
    const float anchor_norm = std::sqrt(dot_f32(anchor_.data(), anchor_.data(), d));
    const float inv_anchor = anchor_norm > kMinNorm ? 1.0f / anchor_norm : 0.0f;
    for (int j = 0; j < hc.n; ++j)
      scores[j] = -dot_f32(unit_keys_.data() + static_cast<size_t>(j) * d, anchor_.data(), d) * inv_anchor;
  }

 private:
  std::vector<float> unit_keys_, anchor_;  // scratch, reused across heads and rounds
};

}  // namespace

std::unique_ptr<Policy> make_keydiff(const PolicyOptions&) { return std::make_unique<KeyDiff>(); }

}  // namespace qf::kv::policies
