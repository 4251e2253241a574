// Sliding-window attention (AttentionArgs::window, src/kv/attention.cpp): a query at position p
// sees the cached keys at positions in (p - window, p]. attend_fused, attend_with_stats and
// attend_reference against a softmax in double written here, on caches with per-head gaps (as
// after eviction), for a prefill block whose first queries the window does not cut and whose
// later ones it does, and for one decoding query.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "tensor/threadpool.h"

namespace qf::kv {
namespace {

constexpr int kHeads = 4, kKvHeads = 2, kDim = 16;

struct WindowCase {
  Cache cache{{1, kKvHeads, kDim}, {64}, AttentionStats{.accumulate = true, .last_query = true}};
  std::vector<float> q;
  std::vector<int32_t> q_pos;
};

// Keys at positions [0, n_past + n_tok) with a few evicted per head; queries at the last n_tok.
WindowCase make(int n_past, int n_tok, std::mt19937& rng) {
  WindowCase s;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int n = n_past + n_tok;
  std::vector<int32_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<float> k(static_cast<size_t>(n) * kKvHeads * kDim), v(k.size());
  for (float& x : k) x = nd(rng);
  for (float& x : v) x = nd(rng);
  s.cache.append(0, k.data(), v.data(), pos.data(), n);
  for (int g = 0; g < kKvHeads; ++g) {
    std::vector<int> keep;
    for (int j = 0; j < n; ++j)
      if (j >= n_past || (j + g) % 4 != 1) keep.push_back(j);  // per-head gaps in the past only
    s.cache.retain(0, g, keep);
  }
  s.q.resize(static_cast<size_t>(n_tok) * kHeads * kDim);
  for (float& x : s.q) x = nd(rng);
  s.q_pos.assign(pos.end() - n_tok, pos.end());
  return s;
}

AttentionArgs args_for(WindowCase& s, std::vector<float>& out, int window) {
  AttentionArgs a;
  a.n_heads = kHeads;
  a.scale = 0.25f;
  a.n_tok = static_cast<int>(s.q_pos.size());
  a.q = s.q.data();
  a.q_pos = s.q_pos.data();
  out.assign(s.q.size(), 0.0f);
  a.out = out.data();
  a.window = window;
  return a;
}

// Softmax weights of query head h of token t over head g's slots, in double (0 outside the window).
std::vector<double> weights(const WindowCase& s, int t, int h, int window) {
  const HeadCache& hc = s.cache.head(0, h / (kHeads / kKvHeads));
  const int32_t p = s.q_pos[t];
  const std::vector<float> keys = keys_f32(hc, kDim);
  std::vector<double> w(hc.n, 0.0);
  double mx = -INFINITY;
  for (int j = 0; j < hc.n; ++j) {
    if (hc.pos[j] > p || hc.pos[j] <= p - window) continue;
    double dot = 0;
    for (int x = 0; x < kDim; ++x) dot += static_cast<double>(s.q[(static_cast<size_t>(t) * kHeads + h) * kDim + x]) * keys[static_cast<size_t>(j) * kDim + x];
    w[j] = dot * 0.25;
    mx = std::max(mx, w[j]);
  }
  double sum = 0;
  for (int j = 0; j < hc.n; ++j) {
    const bool seen = hc.pos[j] <= p && hc.pos[j] > p - window;
    w[j] = seen ? std::exp(w[j] - mx) : 0.0;
    sum += w[j];
  }
  for (double& x : w) x /= sum;
  return w;
}

void expect_output(const WindowCase& s, const std::vector<float>& out, int window) {
  for (size_t t = 0; t < s.q_pos.size(); ++t)
    for (int h = 0; h < kHeads; ++h) {
      const HeadCache& hc = s.cache.head(0, h / (kHeads / kKvHeads));
      const std::vector<double> w = weights(s, static_cast<int>(t), h, window);
      const std::vector<float> values = values_f32(hc, kDim);
      for (int x = 0; x < kDim; ++x) {
        double want = 0;
        for (int j = 0; j < hc.n; ++j) want += w[j] * values[static_cast<size_t>(j) * kDim + x];
        ASSERT_NEAR(out[(t * kHeads + h) * kDim + x], want, 2e-5) << "token " << t << " head " << h;
      }
    }
}

class WindowTest : public ::testing::TestWithParam<std::pair<int, int>> {};  // (n_past, n_tok)

TEST_P(WindowTest, FusedAndStatsPathsMatchDoubleSoftmax) {
  const auto [n_past, n_tok] = GetParam();
  std::mt19937 rng(n_past * 31 + n_tok);
  ThreadPool pool(2);
  for (int window : {1, 6, 13}) {
    SCOPED_TRACE(window);
    WindowCase s = make(n_past, n_tok, rng);
    std::vector<float> fused, stats, ref;
    attend_fused(s.cache, args_for(s, fused, window), pool);
    expect_output(s, fused, window);
    attend_reference(s.cache, args_for(s, ref, window));
    expect_output(s, ref, window);

    attend_with_stats(s.cache, args_for(s, stats, window), pool);
    EXPECT_EQ(stats, fused);  // the same kernels, bit for bit
    for (int g = 0; g < kKvHeads; ++g) {
      const HeadCache& hc = s.cache.head(0, g);
      std::vector<double> sum(hc.n, 0.0), last(hc.n, 0.0);
      std::vector<int> cnt(hc.n, 0);
      const int group = kHeads / kKvHeads;
      for (int t = 0; t < n_tok; ++t)
        for (int h = g * group; h < (g + 1) * group; ++h) {
          const std::vector<double> w = weights(s, t, h, window);
          for (int j = 0; j < hc.n; ++j) {
            sum[j] += w[j] / group;
            if (t == n_tok - 1) last[j] += w[j] / group;
            if (h == g * group) cnt[j] += hc.pos[j] <= s.q_pos[t] && hc.pos[j] > s.q_pos[t] - window;
          }
        }
      for (int j = 0; j < hc.n; ++j) {
        ASSERT_NEAR(hc.attn_sum[j], sum[j], 1e-5) << "head " << g << " slot " << j;
        ASSERT_NEAR(hc.attn_last[j], last[j], 1e-5) << "head " << g << " slot " << j;
        ASSERT_EQ(hc.attn_cnt[j], cnt[j]) << "head " << g << " slot " << j;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, WindowTest,
                         ::testing::Values(std::pair{0, 20},    // prefill from empty: cut after `window` tokens
                                           std::pair{20, 9},    // a later chunk: every query cut
                                           std::pair{30, 1}));  // decoding

// window == 0 is plain causal attention: the same bits as before the field existed.
TEST(Window, ZeroIsCausal) {
  std::mt19937 rng(5);
  ThreadPool pool(2);
  WindowCase s = make(10, 7, rng);
  std::vector<float> a, b;
  attend_fused(s.cache, args_for(s, a, 0), pool);
  attend_fused(s.cache, args_for(s, b, 1 << 20), pool);
  EXPECT_EQ(a, b);
  expect_output(s, a, 1 << 20);
}

}  // namespace
}  // namespace qf::kv
