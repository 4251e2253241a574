// Expected Attention (Devoto et al., 2025), with kvpress ExpectedAttentionPress semantics: the
// queries to come are modelled as Gaussian, with the mean mu and covariance Sigma of the queries
// seen so far before the rotary embedding (every position but the first kQueryMomentSinks), moved
// to the next `future` positions by the mean rotary rotation R (mu' = R mu, Sigma' = R Sigma R^T).
// For a Gaussian q, E[exp(q.k / sqrt(d))] = exp(mu'.k / sqrt(d) + k' Sigma' k / (2d)); that logit is
// softmax-normalised over the head's keys, averaged over the GQA group, and multiplied by ||v||.
// The first kQueryMomentSinks positions are always kept. No attention weight is computed: the
// queries' moments come from the forward pass (AttentionStats::query_moments), so the fused
// attention kernel stays.
//
// Where kvpress scores after a prefill from the prompt's queries, this scores at every eviction
// round from all the queries seen so far (prefill and decoding alike): in the prefill protocol the
// two are the same.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kv/policies/policies.h"
#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {

class ExpectedAttention final : public Policy {
 public:
  explicit ExpectedAttention(int future) : future_(future) {}
  std::string_view name() const override { return "expected_attention"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.query_moments = true}; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    prepare(cache, layer);
    score_prepared(cache, layer, kv_head, scores);
  }

  void score_layer(const Cache& cache, int layer, std::vector<std::vector<float>>& scores) override {
    prepare(cache, layer);  // once for the layer's KV heads
    scores.resize(cache.shape().n_kv_heads);
    for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
      scores[h].resize(cache.head(layer, h).n);
      score_prepared(cache, layer, h, scores[h]);
    }
  }

 private:
  // mu' and Sigma' / (2d) of every query head of `layer`, at the positions after its newest key.
  void prepare(const Cache& cache, int layer) {
    if (cache.query_moments.empty())
      fail("expected_attention: the cache keeps no query moments (build it with the policy's needs())");
    const QueryMoments& m = cache.query_moments[layer];
    const int d = cache.shape().head_dim;
    n_heads_ = m.count > 0 ? m.n_heads : 0;
    if (n_heads_ && (m.head_dim != d || n_heads_ % cache.shape().n_kv_heads != 0))
      fail("expected_attention: query moments of ", m.n_heads, "x", m.head_dim, " do not fit the cache's ",
           cache.shape().n_kv_heads, " KV heads of ", d);
    int64_t next = 0;
    for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
      const HeadCache& hc = cache.head(layer, h);
      if (hc.n) next = std::max<int64_t>(next, hc.pos[hc.n - 1] + 1);
    }
    const RopeGeometry::PairMatrix r = cache.rope.mean_pair_rotation(layer, next, future_, d);
    mu_.assign(static_cast<size_t>(n_heads_) * d, 0.0f);
    quad_.assign(static_cast<size_t>(n_heads_) * d * d, 0.0f);
    std::vector<double> mean, cov;
    const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d)), inv_2d = 1.0 / (2.0 * d);
    for (int q = 0; q < n_heads_; ++q) {
      m.mean_cov(q, mean, cov);
      float* mu = mu_.data() + static_cast<size_t>(q) * d;
      float* quad = quad_.data() + static_cast<size_t>(q) * d * d;
      for (int i = 0; i < d; ++i) mu[i] = static_cast<float>((r.diag[i] * mean[i] + r.off[i] * mean[r.partner[i]]) * inv_sqrt_d);
      // (R Sigma R^T)_ij with two non-zeros per row of R.
      auto S = [&](int i, int j) { return cov[static_cast<size_t>(i) * d + j]; };
      for (int i = 0; i < d; ++i) {
        const int pi = r.partner[i];
        for (int j = 0; j < d; ++j) {
          const int pj = r.partner[j];
          const double v = r.diag[i] * (r.diag[j] * S(i, j) + r.off[j] * S(i, pj)) +
                           r.off[i] * (r.diag[j] * S(pi, j) + r.off[j] * S(pi, pj));
          quad[static_cast<size_t>(i) * d + j] = static_cast<float>(v * inv_2d);
        }
      }
    }
  }

  void score_prepared(const Cache& cache, int layer, int kv_head, std::span<float> scores) {
    const HeadCache& hc = cache.head(layer, kv_head);
    const int n = hc.n, d = cache.shape().head_dim;
    if (n == 0) return;
    const int group = n_heads_ / cache.shape().n_kv_heads;
    keys_.resize(static_cast<size_t>(n) * d);
    for_each_key(hc, d, [&](int j, const float* key) { std::copy(key, key + d, keys_.data() + static_cast<size_t>(j) * d); });
    acc_.assign(n, 0.0);
    logit_.resize(n);
    tmp_.resize(d);
    for (int g = 0; g < group; ++g) {
      const int q = kv_head * group + g;
      const float* mu = mu_.data() + static_cast<size_t>(q) * d;
      const float* quad = quad_.data() + static_cast<size_t>(q) * d * d;
      double mx = -std::numeric_limits<double>::infinity();
      for (int i = 0; i < n; ++i) {
        if (hc.pos[i] < kQueryMomentSinks) continue;
        const float* k = keys_.data() + static_cast<size_t>(i) * d;
        for (int a = 0; a < d; ++a) tmp_[a] = dot_f32(quad + static_cast<size_t>(a) * d, k, d);
        logit_[i] = static_cast<double>(dot_f32(mu, k, d)) + dot_f32(tmp_.data(), k, d);
        mx = std::max(mx, logit_[i]);
      }
      double z = 0;
      for (int i = 0; i < n; ++i)
        if (hc.pos[i] >= kQueryMomentSinks) z += (logit_[i] = std::exp(logit_[i] - mx));
      for (int i = 0; i < n; ++i)
        if (hc.pos[i] >= kQueryMomentSinks) acc_[i] += logit_[i] / z / group;
    }
    if (group == 0) {  // no query seen yet: every key expects the same attention
      int real = 0;
      for (int i = 0; i < n; ++i) real += hc.pos[i] >= kQueryMomentSinks;
      for (int i = 0; i < n; ++i) acc_[i] = real ? 1.0 / real : 0.0;
    }
    // ||v|| of the stored values, converted 64 rows at a time.
    constexpr int kRows = 64;
    vals_.resize(static_cast<size_t>(std::min(kRows, n)) * d);
    for (int j0 = 0; j0 < n; j0 += kRows) {
      const int rows = std::min(kRows, n - j0);
      dequantize_kv_rows(hc.values(), j0, rows, d, vals_.data());
      for (int j = 0; j < rows; ++j) {
        const float* v = vals_.data() + static_cast<size_t>(j) * d;
        const int i = j0 + j;
        scores[i] = hc.pos[i] < kQueryMomentSinks ? std::numeric_limits<float>::infinity()
                                                  : static_cast<float>(acc_[i] * std::sqrt(static_cast<double>(dot_f32(v, v, d))));
      }
    }
  }

  int future_;
  int n_heads_ = 0;
  std::vector<float> mu_, quad_, keys_, vals_, tmp_;  // per layer / per head scratch
  std::vector<double> acc_, logit_;
};

}  // namespace

std::unique_ptr<Policy> make_expected_attention(const PolicyOptions& o) {
  if (o.ea_future_positions < 1)
    fail("expected_attention: the future positions must be >= 1 (got ", o.ea_future_positions, ")");
  return std::make_unique<ExpectedAttention>(o.ea_future_positions);
}

}  // namespace qf::kv::policies
