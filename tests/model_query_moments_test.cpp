// Query moments (AttentionStats::query_moments, read by expected_attention) on the real model: the
// session undoes the rotary embedding exactly as the forward pass applied it, leaves out the first
// kQueryMomentSinks positions, counts every later query once however the prompt is chunked, and
// copy_state_from carries the moments along.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kv/policy.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/session.h"
#include "test_paths.h"

namespace {

TEST(QueryMoments, SessionAccumulatesTheQueriesBeforeRotary) {
  auto model = qf::Model::load(qf::test::smollm2_path());
  const qf::ModelConfig& c = model->config();
  const int T = 40, D = c.head_dim, H = c.n_heads, layer = 7;
  std::mt19937 rng(9);
  std::vector<int32_t> tokens(T);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % c.n_vocab);

  qf::SessionOptions so;
  so.n_ctx = 64;
  so.n_threads = 1;
  so.n_batch = 16;  // several chunks
  so.stats.query_moments = true;
  qf::Session s(*model, std::move(so));
  // The hook sees the queries after the rotary embedding; undo it with the forward pass's own
  // rotary code at the negated positions, independently of kv::RopeGeometry.
  std::vector<double> sum(static_cast<size_t>(H) * D, 0.0);
  int64_t count = 0;
  qf::ops::Rotary rot(c, model->rope_freq_factors());
  s.set_qk_hook([&](int l, const float* q, const float*, const int32_t* pos, int n) {
    if (l != layer) return;
    std::vector<float> x(q, q + static_cast<size_t>(n) * H * D);
    std::vector<int> neg(n);
    for (int t = 0; t < n; ++t) neg[t] = -pos[t];
    rot.prepare(neg.data(), n);
    rot.apply(l, x.data(), n, H);
    for (int t = 0; t < n; ++t) {
      if (pos[t] < qf::kv::kQueryMomentSinks) continue;
      ++count;
      for (size_t i = 0; i < static_cast<size_t>(H) * D; ++i) sum[i] += x[static_cast<size_t>(t) * H * D + i];
    }
  });
  s.eval(tokens);
  const qf::kv::QueryMoments& m = s.cache().query_moments.at(layer);
  ASSERT_EQ(m.count, T - qf::kv::kQueryMomentSinks);
  ASSERT_EQ(count, m.count);
  ASSERT_EQ(m.n_heads, H);
  double max_err = 0, max_abs = 0;
  for (size_t i = 0; i < sum.size(); ++i) {
    max_err = std::max(max_err, std::abs(m.sum[i] - sum[i]));
    max_abs = std::max(max_abs, std::abs(sum[i]));
  }
  EXPECT_LT(max_err, 1e-4 * max_abs) << max_abs;
  // The covariance is a covariance: symmetric, non-negative diagonal.
  std::vector<double> mean, cov;
  m.mean_cov(0, mean, cov);
  for (int i = 0; i < D; ++i) {
    EXPECT_GE(cov[static_cast<size_t>(i) * D + i], 0.0);
    for (int j = 0; j < D; ++j) EXPECT_EQ(cov[static_cast<size_t>(i) * D + j], cov[static_cast<size_t>(j) * D + i]);
  }

  // Copies carry the moments; a session that keeps none ignores them; reset clears them.
  qf::SessionOptions so2;
  so2.n_ctx = 64;
  so2.n_threads = 1;
  so2.stats.query_moments = true;
  qf::Session copy(*model, std::move(so2));
  copy.copy_state_from(s);
  EXPECT_EQ(copy.cache().query_moments.at(layer).sum, m.sum);
  EXPECT_EQ(copy.cache().rope.inv_freq.size(), static_cast<size_t>(c.n_layers));
  qf::Session plain(*model, qf::SessionOptions{.n_ctx = 64, .n_threads = 1});
  plain.copy_state_from(s);
  EXPECT_TRUE(plain.cache().query_moments.empty());
  copy.reset();
  EXPECT_EQ(copy.cache().query_moments.at(layer).count, 0);
}

}  // namespace
