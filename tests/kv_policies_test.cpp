// Each policy's scores equal its definition: on hand-made caches (exact numbers), and for the
// attention-based ones also against kvpress's formulas recomputed here from brute-force softmax
// weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "kv/compressor.h"
#include "kv/policy.h"
#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf::kv {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// A cache of one layer whose head h holds the given positions; key i of head h is keys[h][i].
Cache hand_cache(int d, const std::vector<std::vector<int32_t>>& pos, AttentionStats stats = {},
                 const std::vector<std::vector<std::vector<float>>>& keys = {}) {
  const int nkv = int(pos.size());
  int n_max = 0;
  for (const auto& p : pos) n_max = std::max(n_max, int(p.size()));
  Cache c({1, nkv, d}, {std::max(n_max, 1)}, stats);
  for (int h = 0; h < nkv; ++h) {
    HeadCache& hc = c.head(0, h);
    hc.n = int(pos[h].size());
    for (int j = 0; j < hc.n; ++j) {
      hc.pos[j] = pos[h][j];
      if (!keys.empty()) std::memcpy(hc.k.data() + j * hc.k_row_bytes, keys[h][j].data(), hc.k_row_bytes);  // f32
    }
  }
  return c;
}

std::vector<float> score(Policy& p, const Cache& c, int layer, int h) {
  std::vector<float> s(c.head(layer, h).n, -123.0f);
  p.score_head(c, layer, h, s);
  return s;
}

// Prefill of T random tokens (positions 0..T-1) through attend_with_stats; returns the
// brute-force softmax weights w[t][query head][key], in double.
using Weights = std::vector<std::vector<std::vector<double>>>;
Weights prefill(Cache& c, int n_heads, int T, int32_t accumulate_from, uint32_t seed) {
  const int nkv = c.shape().n_kv_heads, d = c.shape().head_dim, group = n_heads / nkv;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f), nq(0.0f, 2.0f);
  std::vector<float> k(size_t(T) * nkv * d), v(k.size()), q(size_t(T) * n_heads * d), out(q.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nq(rng);
  std::vector<int32_t> pos(T);
  std::iota(pos.begin(), pos.end(), 0);
  c.append(0, k.data(), v.data(), pos.data(), T);
  const float scale = 1.0f / std::sqrt(float(d));
  ThreadPool pool(2);
  AttentionArgs a{.layer = 0, .n_heads = n_heads, .scale = scale, .n_tok = T, .q = q.data(), .q_pos = pos.data(),
                  .out = out.data(), .accumulate_from_pos = accumulate_from};
  attend_with_stats(c, a, pool);

  Weights w(T, std::vector<std::vector<double>>(n_heads, std::vector<double>(T, 0.0)));
  for (int t = 0; t < T; ++t)
    for (int qh = 0; qh < n_heads; ++qh) {
      const int kvh = qh / group;
      std::vector<double> logit(t + 1);
      double mx = -1e300, z = 0;
      for (int j = 0; j <= t; ++j) {
        double s = 0;
        for (int i = 0; i < d; ++i) s += double(q[(size_t(t) * n_heads + qh) * d + i]) * k[(size_t(j) * nkv + kvh) * d + i];
        mx = std::max(mx, logit[j] = s * scale);
      }
      for (int j = 0; j <= t; ++j) z += (w[t][qh][j] = std::exp(logit[j] - mx));
      for (int j = 0; j <= t; ++j) w[t][qh][j] /= z;
    }
  return w;
}

// ---------------------------------------------------------------------------------------------
// Registry and bad input

TEST(Policies, RegistryNamesAndUnknownName) {
  const std::vector<std::string> names = policy_names();
  for (const char* n : {"none", "qfilters", "knorm", "streaming", "random", "snapkv", "tova", "h2o"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  const std::vector<float> f(8, 1.0f);
  PolicyOptions opt;
  opt.filters = f;
  for (const auto& n : names) {
    if (n != "none") {
      EXPECT_EQ(make_policy(n, opt)->name(), n);
    }
  }
  try {
    make_policy("lru", opt);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown KV policy 'lru'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("snapkv"), std::string::npos) << e.what();
  }
  // is_policy_name: what make_policy knows, whatever options a policy would also need.
  for (const char* n : {"none", "tova", "tova+layer", "qfilters_max", "ea_calibrated+layer"}) EXPECT_TRUE(is_policy_name(n)) << n;
  for (const char* n : {"lru", "none+layer", "tova+layer+layer", "+layer", ""}) EXPECT_FALSE(is_policy_name(n)) << n;
}

TEST(Policies, BadOptionsThrow) {
  EXPECT_THROW(make_policy("qfilters", {}), Error);
  PolicyOptions o;
  o.snapkv_kernel = 4;
  EXPECT_THROW(make_policy("snapkv", o), Error);
  o.snapkv_kernel = 0;
  EXPECT_THROW(make_policy("snapkv", o), Error);
  o.snapkv_kernel = 5;
  o.snapkv_window = 0;
  EXPECT_THROW(make_policy("snapkv", o), Error);
  // Filters of the wrong shape for the cache are reported when scoring, not read out of bounds.
  const std::vector<float> f(7, 1.0f);
  o.filters = f;
  auto q = make_policy("qfilters", o);
  Cache c = hand_cache(2, {{0, 1}, {0, 1}});
  std::vector<float> s(2);
  EXPECT_THROW(q->score_head(c, 0, 0, s), Error);
}

TEST(Policies, AttentionPoliciesNeedTheirStatistics) {
  PolicyOptions o;
  o.snapkv_window = 32;
  EXPECT_EQ(make_policy("snapkv", o)->needs(o).window, 32);
  EXPECT_TRUE(make_policy("tova", o)->needs(o).last_query);
  EXPECT_TRUE(make_policy("h2o", o)->needs(o).accumulate);
  for (const char* n : {"knorm", "streaming", "random"}) {
    const AttentionStats s = make_policy(n, o)->needs(o);
    EXPECT_FALSE(s.accumulate || s.last_query || s.window > 0) << n;
  }
  // A cache built without them is an error, not a crash.
  Cache bare = hand_cache(2, {{0, 1, 2}});
  std::vector<float> s(3);
  for (const char* n : {"snapkv", "tova", "h2o"}) EXPECT_THROW(make_policy(n, o)->score_head(bare, 0, 0, s), Error) << n;
}

// ---------------------------------------------------------------------------------------------
// Score-only policies

TEST(Policies, KNormIsMinusL2Norm) {
  Cache c = hand_cache(2, {{0, 1, 2}}, {}, {{{3, 4}, {0, 0}, {-1, 1}}});
  auto p = make_policy("knorm", {});
  const auto s = score(*p, c, 0, 0);
  EXPECT_FLOAT_EQ(s[0], -5.0f);
  EXPECT_FLOAT_EQ(s[1], 0.0f);
  EXPECT_FLOAT_EQ(s[2], -std::sqrt(2.0f));
}

TEST(Policies, QFiltersIsProjectionOnTheLayerHeadFilter) {
  // Two layers, two heads, d = 3: filters[l][h] = (l + 1, h + 1, -1).
  std::vector<float> f;
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) f.insert(f.end(), {float(l + 1), float(h + 1), -1.0f});
  PolicyOptions o;
  o.filters = f;
  auto p = make_policy("qfilters", o);
  Cache c({2, 2, 3}, {2, 2});
  const float k[] = {1, 2, 3, 4, 5, 6, /*t1*/ -1, 0, 2, 0.5f, 0.5f, 0.5f};
  const int32_t pos[] = {0, 1};
  c.append(1, k, k, pos, 2);
  // Layer 1 uses filters (2, 1, -1) and (2, 2, -1).
  EXPECT_FLOAT_EQ(score(*p, c, 1, 0)[0], 2 * 1 + 1 * 2 - 3);
  EXPECT_FLOAT_EQ(score(*p, c, 1, 0)[1], 2 * -1 + 0 - 2);
  EXPECT_FLOAT_EQ(score(*p, c, 1, 1)[0], 2 * 4 + 2 * 5 - 6);
  EXPECT_FLOAT_EQ(score(*p, c, 1, 1)[1], 1 + 1 - 0.5f);
}

TEST(Policies, StreamingKeepsSinksThenRecency) {
  PolicyOptions o;
  o.n_sink = 3;
  auto p = make_policy("streaming", o);
  Cache c = hand_cache(1, {{0, 1, 2, 5, 6, 9, 12}});
  const auto s = score(*p, c, 0, 0);
  for (int sink = 0; sink < 3; ++sink)
    for (int j = 3; j < 7; ++j) EXPECT_GT(s[sink], s[j]);
  for (int j = 4; j < 7; ++j) EXPECT_GT(s[j], s[j - 1]);
  // Through the compressor: 3 sinks + the 2 newest.
  Compressor comp(make_policy("streaming", o), o, {});
  comp.compress_layer(c, 0, 5, 0);
  const HeadCache& hc = c.head(0, 0);
  EXPECT_EQ(std::vector<int32_t>(hc.pos.begin(), hc.pos.begin() + hc.n), (std::vector<int32_t>{0, 1, 2, 9, 12}));
}

TEST(Policies, RandomIsUniformAndDeterministicPerSeed) {
  Cache c = hand_cache(1, {std::vector<int32_t>(200)});
  PolicyOptions a, b;
  a.seed = 1;
  b.seed = 2;
  auto p1 = make_policy("random", a), p2 = make_policy("random", a), p3 = make_policy("random", b);
  const auto s1 = score(*p1, c, 0, 0), s2 = score(*p2, c, 0, 0), s3 = score(*p3, c, 0, 0);
  EXPECT_EQ(s1, s2);
  EXPECT_NE(s1, s3);
  EXPECT_NE(s1, score(*p1, c, 0, 0));  // later calls draw new numbers
  double mean = 0;
  for (float x : s1) {
    EXPECT_GE(x, 0.0f);
    EXPECT_LT(x, 1.0f);
    mean += x / s1.size();
  }
  EXPECT_NEAR(mean, 0.5, 0.1);
}

// ---------------------------------------------------------------------------------------------
// SnapKV

TEST(Policies, SnapKVPoolsWithZeroPaddingAndKeepsTheWindow) {
  PolicyOptions o;
  o.snapkv_window = 3;
  o.snapkv_kernel = 5;
  auto p = make_policy("snapkv", o);
  Cache c = hand_cache(1, {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}}, p->needs(o));
  // Observed keys 0..6 received 1..7; the window (7, 8, 9) received a lot, which must not leak
  // into its neighbours' pooled scores.
  for (int j = 0; j < 10; ++j) c.head(0, 0).attn_sum[j] = j < 7 ? 1.0f + j : 100.0f;
  const auto s = score(*p, c, 0, 0);
  // (sum of the in-range neighbours) / kernel / window: borders divide by the full kernel
  // (avg_pool1d's count_include_pad=True).
  const float want[] = {6, 10, 15, 20, 25, 22, 18};
  for (int j = 0; j < 7; ++j) EXPECT_FLOAT_EQ(s[j], want[j] / 15.0f) << j;
  for (int j = 7; j < 10; ++j) EXPECT_EQ(s[j], kInf) << j;
}

TEST(Policies, SnapKVPoolsByPositionOnACacheWithHoles) {
  PolicyOptions o;
  o.snapkv_window = 2;
  o.snapkv_kernel = 3;
  auto p = make_policy("snapkv", o);
  Cache c = hand_cache(1, {{0, 1, 3, 4, 5, 8, 9, 10}}, p->needs(o));
  const float a[] = {1, 2, 3, 4, 5, 6, 100, 100};
  std::copy(a, a + 8, c.head(0, 0).attn_sum.begin());
  const auto s = score(*p, c, 0, 0);
  // Window: positions 9, 10. Neighbours within +-1 position; 2, 6 and 7 are gone.
  const float want[] = {1 + 2, 1 + 2, 3 + 4, 3 + 4 + 5, 4 + 5, 6};
  for (int j = 0; j < 6; ++j) EXPECT_FLOAT_EQ(s[j], want[j] / 6.0f) << j;
  EXPECT_EQ(s[6], kInf);
  EXPECT_EQ(s[7], kInf);
}

TEST(Policies, SnapKVMatchesKvpressOnAPrefill) {
  const int nkv = 2, group = 3, n_heads = nkv * group, d = 16, T = 40, W = 8, K = 5;
  PolicyOptions o;
  o.snapkv_window = W;
  o.snapkv_kernel = K;
  auto p = make_policy("snapkv", o);
  Cache c({1, nkv, d}, {T}, p->needs(o));
  const Weights w = prefill(c, n_heads, T, T - W, 3);  // the model accumulates the last W queries
  const int L = T - W;
  for (int kvh = 0; kvh < nkv; ++kvh) {
    const auto s = score(*p, c, 0, kvh);
    for (int i = 0; i < L; ++i) {
      // kvpress: mean over the window's queries, avg_pool1d over keys [0, L), mean over group.
      double want = 0;
      for (int g = 0; g < group; ++g)
        for (int j = i - K / 2; j <= i + K / 2; ++j) {
          if (j < 0 || j >= L) continue;
          double a = 0;
          for (int t = L; t < T; ++t) a += w[t][kvh * group + g][j];
          want += a / W / K / group;
        }
      EXPECT_NEAR(s[i], want, 1e-6) << "head " << kvh << " key " << i;
    }
    for (int i = L; i < T; ++i) EXPECT_EQ(s[i], kInf);
  }
}

TEST(Policies, SnapKVInStreamingObservesTheQueriesSinceTheLastRound) {
  const int nkv = 1, group = 2, d = 8, T = 30, W = 4;
  PolicyOptions o;
  o.snapkv_window = W;
  o.snapkv_kernel = 3;
  Compressor comp(make_policy("snapkv", o), o, {});
  Cache c({1, nkv, d}, {T + 1}, comp.needs());
  prefill(c, nkv * group, T, T - W, 4);
  comp.compress_layer(c, 0, 20, 0);  // a round: the observation restarts
  // One decode step: its query's attention alone now drives the next round.
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  std::vector<float> k(d), v(d), q(group * d), out(q.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  for (auto& x : q) x = nd(rng);
  const int32_t p30 = T;
  c.append(0, k.data(), v.data(), &p30, 1);
  ThreadPool pool(1);
  const float scale = 1.0f / std::sqrt(float(d));
  attend_with_stats(c, {.layer = 0, .n_heads = group, .scale = scale, .n_tok = 1, .q = q.data(), .q_pos = &p30, .out = out.data()}, pool);
  const HeadCache& hc = c.head(0, 0);
  ASSERT_EQ(hc.n, 21);
  std::vector<double> a(hc.n, 0.0);
  for (int g = 0; g < group; ++g) {
    std::vector<double> logit(hc.n);
    double mx = -1e300, z = 0;
    const std::vector<float> keys = keys_f32(hc, d);
    for (int j = 0; j < hc.n; ++j) {
      double s = 0;
      for (int i = 0; i < d; ++i) s += double(q[g * d + i]) * keys[size_t(j) * d + i];
      mx = std::max(mx, logit[j] = s * scale);
    }
    for (int j = 0; j < hc.n; ++j) z += std::exp(logit[j] - mx);
    for (int j = 0; j < hc.n; ++j) a[j] += std::exp(logit[j] - mx) / z / group;
  }
  auto p = make_policy("snapkv", o);
  const auto s = score(*p, c, 0, 0);
  const int n_obs = hc.n - W;  // positions 27..30 are the newest W
  for (int i = 0; i < n_obs; ++i) {
    double want = 0;
    for (int j = 0; j < n_obs; ++j)
      if (std::abs(hc.pos[j] - hc.pos[i]) <= 1) want += a[j];
    EXPECT_NEAR(s[i], want / W / 3, 1e-6) << i;
  }
  for (int i = n_obs; i < hc.n; ++i) EXPECT_EQ(s[i], kInf);
}

// ---------------------------------------------------------------------------------------------
// TOVA

TEST(Policies, TovaAveragesAllHeadsByPosition) {
  auto p = make_policy("tova", {});
  // Head 1 lost position 1: it gave it no attention.
  Cache c = hand_cache(1, {{0, 1, 2, 3}, {0, 2, 3}}, p->needs({}));
  const float l0[] = {0.1f, 0.2f, 0.3f, 0.4f}, l1[] = {0.5f, 0.25f, 0.25f};
  std::copy(l0, l0 + 4, c.head(0, 0).attn_last.begin());
  std::copy(l1, l1 + 3, c.head(0, 1).attn_last.begin());
  const auto s0 = score(*p, c, 0, 0), s1 = score(*p, c, 0, 1);
  EXPECT_FLOAT_EQ(s0[0], 0.3f);
  EXPECT_FLOAT_EQ(s0[1], 0.1f);
  EXPECT_FLOAT_EQ(s0[2], 0.275f);
  EXPECT_EQ(s0[3], kInf);
  EXPECT_FLOAT_EQ(s1[0], 0.3f);
  EXPECT_FLOAT_EQ(s1[1], 0.275f);
  EXPECT_EQ(s1[2], kInf);
}

TEST(Policies, TovaMatchesKvpressOnAPrefill) {
  const int nkv = 3, group = 3, n_heads = nkv * group, d = 16, T = 25;
  auto p = make_policy("tova", {});
  Cache c({1, nkv, d}, {T}, p->needs({}));
  const Weights w = prefill(c, n_heads, T, 0, 5);
  std::vector<std::vector<float>> s;
  p->score_layer(c, 0, s);
  ASSERT_EQ(int(s.size()), nkv);
  for (int kvh = 0; kvh < nkv; ++kvh) {
    for (int j = 0; j < T - 1; ++j) {
      double want = 0;
      for (int qh = 0; qh < n_heads; ++qh) want += w[T - 1][qh][j] / n_heads;
      EXPECT_NEAR(s[kvh][j], want, 1e-6) << kvh << " " << j;
      EXPECT_EQ(s[kvh][j], s[0][j]);  // one score per token for the whole layer
    }
    EXPECT_EQ(s[kvh][T - 1], kInf);
  }
}

// ---------------------------------------------------------------------------------------------
// H2O

TEST(Policies, H2ONormalisesBySeenCount) {
  auto p = make_policy("h2o", {});
  Cache c = hand_cache(1, {{0, 1, 2}}, p->needs({}));
  HeadCache& hc = c.head(0, 0);
  hc.attn_sum[0] = 1.0f, hc.attn_cnt[0] = 2;
  hc.attn_sum[1] = 3.0f, hc.attn_cnt[1] = 4;
  hc.attn_sum[2] = 0.0f, hc.attn_cnt[2] = 0;  // never observed
  const auto s = score(*p, c, 0, 0);
  EXPECT_FLOAT_EQ(s[0], 0.5f);
  EXPECT_FLOAT_EQ(s[1], 0.75f);
  EXPECT_EQ(s[2], 0.0f);
}

TEST(Policies, H2OMatchesKvpressObservedAttentionOnAPrefill) {
  const int nkv = 2, group = 3, n_heads = nkv * group, d = 16, T = 30;
  auto p = make_policy("h2o", {});
  Cache c({1, nkv, d}, {T}, p->needs({}));
  const Weights w = prefill(c, n_heads, T, 0, 6);
  for (int kvh = 0; kvh < nkv; ++kvh) {
    const auto s = score(*p, c, 0, kvh);
    for (int j = 0; j < T; ++j) {
      // kvpress: attentions.sum over queries / (T - j), mean over the group.
      double want = 0;
      for (int g = 0; g < group; ++g)
        for (int t = j; t < T; ++t) want += w[t][kvh * group + g][j] / (T - j) / group;
      EXPECT_NEAR(s[j], want, 1e-6) << kvh << " " << j;
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Expected Attention and layer-consistent selection

// One pair's rotation written out as a matrix, independently of RopeGeometry: pair i of a
// half-split (neox) layout is (i, i + n_rot/2).
std::vector<std::vector<double>> neox_rotation(int d, int n_rot, const std::vector<double>& inv_freq, double pos) {
  std::vector<std::vector<double>> r(d, std::vector<double>(d, 0.0));
  for (int i = 0; i < d; ++i) r[i][i] = 1.0;
  for (int i = 0; i < n_rot / 2; ++i) {
    const int a = i, b = i + n_rot / 2;
    const double th = pos * inv_freq[i];
    r[a][a] = std::cos(th), r[a][b] = -std::sin(th), r[b][a] = std::sin(th), r[b][b] = std::cos(th);
  }
  return r;
}

TEST(QueryMoments, RopeGeometryRotatesAndAverages) {
  RopeGeometry g{.n_rot = 6, .adjacent = false, .inv_freq = {{0.5, 0.1, 0.01}}};
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> v(8), w;
  for (auto& x : v) x = nd(rng);
  w = v;
  g.rotate(0, 37, w.data());
  const auto r = neox_rotation(8, 6, g.inv_freq[0], 37);
  for (int i = 0; i < 8; ++i) {
    double s = 0;
    for (int j = 0; j < 8; ++j) s += r[i][j] * v[j];
    EXPECT_NEAR(w[i], s, 1e-5);
  }
  g.rotate(0, -37, w.data());  // undoes it
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(w[i], v[i], 1e-5);
  const std::vector<double> m = g.mean_rotation(0, 100, 5, 8);
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      double s = 0;
      for (int p = 100; p < 105; ++p) s += neox_rotation(8, 6, g.inv_freq[0], p)[i][j] / 5;
      EXPECT_NEAR(m[i * 8 + j], s, 1e-12) << i << "," << j;
    }
  // The sparse closed form equals the dense mean, far from position 0 too, for both pairings.
  for (bool adjacent : {false, true}) {
    g.adjacent = adjacent;
    const std::vector<std::pair<int64_t, int>> ranges{{100, 5}, {8000, 512}, {0, 1}};
    for (const auto& [p0, n] : ranges) {
      const std::vector<double> dense = g.mean_rotation(0, p0, n, 8);
      const RopeGeometry::PairMatrix sp = g.mean_pair_rotation(0, p0, n, 8);
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) {
          const double want = (j == i ? sp.diag[i] : 0.0) + (j == sp.partner[i] && j != i ? sp.off[i] : 0.0);
          EXPECT_NEAR(dense[i * 8 + j], want, 1e-9) << p0 << " " << i << "," << j;
        }
      // Amplitudes computed once give the same matrix at any later start.
      const std::vector<double> amplitudes = g.mean_pair_amplitudes(0, n);
      const RopeGeometry::PairMatrix later = g.mean_pair_rotation(0, p0 + 77, n, 8, amplitudes);
      EXPECT_EQ(later.diag, g.mean_pair_rotation(0, p0 + 77, n, 8).diag);
      EXPECT_EQ(later.off, g.mean_pair_rotation(0, p0 + 77, n, 8).off);
    }
  }
  EXPECT_THROW(g.mean_pair_rotation(0, 5, 4, 8, std::vector<double>(2)), Error);  // 3 pairs rotate
  QueryMoments q;
  q.add(v.data(), 2, 4);
  EXPECT_THROW(q.add(v.data(), 4, 2), Error);  // another shape
}

TEST(Policies, ExpectedAttentionMatchesADirectComputation) {
  const int d = 8, nkv = 2, n_heads = 4, group = 2, T = 40, n_q = 30, future = 16, n_rot = 6;
  const std::vector<double> inv_freq{0.5, 0.1, 0.01};
  std::mt19937 rng(17);
  std::normal_distribution<float> nd;
  Cache c({1, nkv, d}, {T}, {.query_moments = true});
  c.rope = {.n_rot = n_rot, .adjacent = false, .inv_freq = {inv_freq}};
  std::vector<float> k(size_t(T) * nkv * d), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int32_t> pos(T);
  std::iota(pos.begin(), pos.end(), 0);
  c.append(0, k.data(), v.data(), pos.data(), T);
  // A ragged cache: head 1 lost a few positions (a sink among them).
  std::vector<int> keep;
  for (int i = 0; i < T; ++i)
    if (i % 7 != 2) keep.push_back(i);
  c.retain(0, 1, keep);
  // Pre-rotary queries with a non-zero mean, so both terms matter.
  std::vector<std::vector<double>> qs(size_t(n_q) * n_heads, std::vector<double>(d));
  for (int t = 0; t < n_q; ++t) {
    std::vector<float> row(size_t(n_heads) * d);
    for (int h = 0; h < n_heads; ++h)
      for (int i = 0; i < d; ++i) row[h * d + i] = nd(rng) * (1.0f + 0.3f * i) + (i == h ? 2.0f : 0.0f);
    c.query_moments[0].add(row.data(), n_heads, d);
    for (int h = 0; h < n_heads; ++h)
      for (int i = 0; i < d; ++i) qs[size_t(t) * n_heads + h][i] = row[h * d + i];
  }
  PolicyOptions o;
  o.ea_future_positions = future;
  auto p = make_policy("expected_attention", o);
  EXPECT_TRUE(p->needs(o).query_moments);

  // Mean rotation over the positions after the newest key.
  std::vector<std::vector<double>> R(d, std::vector<double>(d, 0.0));
  for (int f = 0; f < future; ++f) {
    const auto r = neox_rotation(d, n_rot, inv_freq, T + f);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) R[i][j] += r[i][j] / future;
  }
  for (int h = 0; h < nkv; ++h) {
    const HeadCache& hc = c.head(0, h);
    std::vector<double> want(hc.n, 0.0);
    for (int g = 0; g < group; ++g) {
      const int qh = h * group + g;
      std::vector<double> mu(d, 0.0);
      for (int t = 0; t < n_q; ++t)
        for (int i = 0; i < d; ++i) mu[i] += qs[size_t(t) * n_heads + qh][i] / n_q;
      std::vector<std::vector<double>> S(d, std::vector<double>(d, 0.0));
      for (int t = 0; t < n_q; ++t)
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j)
            S[i][j] += (qs[size_t(t) * n_heads + qh][i] - mu[i]) * (qs[size_t(t) * n_heads + qh][j] - mu[j]) / n_q;
      std::vector<double> logit(hc.n);
      double mx = -1e300, z = 0;
      for (int s = 0; s < hc.n; ++s) {
        if (hc.pos[s] < kQueryMomentSinks) continue;
        const float* key = k.data() + (size_t(hc.pos[s]) * nkv + h) * d;
        // (R^T k) carries the key back: mu'.k = mu.(R^T k), k' R S R^T k = (R^T k)' S (R^T k).
        std::vector<double> rk(d, 0.0);
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j) rk[i] += R[j][i] * key[j];
        double lin = 0, quad = 0;
        for (int i = 0; i < d; ++i) {
          lin += mu[i] * rk[i];
          for (int j = 0; j < d; ++j) quad += rk[i] * S[i][j] * rk[j];
        }
        logit[s] = lin / std::sqrt(double(d)) + quad / (2.0 * d);
        mx = std::max(mx, logit[s]);
      }
      for (int s = 0; s < hc.n; ++s)
        if (hc.pos[s] >= kQueryMomentSinks) z += std::exp(logit[s] - mx);
      for (int s = 0; s < hc.n; ++s)
        if (hc.pos[s] >= kQueryMomentSinks) want[s] += std::exp(logit[s] - mx) / z / group;
    }
    const std::vector<float> got = score(*p, c, 0, h);
    for (int s = 0; s < hc.n; ++s) {
      if (hc.pos[s] < kQueryMomentSinks) {
        EXPECT_EQ(got[s], kInf) << "sink " << hc.pos[s];
        continue;
      }
      const float* val = v.data() + (size_t(hc.pos[s]) * nkv + h) * d;
      double vn = 0;
      for (int i = 0; i < d; ++i) vn += double(val[i]) * val[i];
      const double w = want[s] * std::sqrt(vn);
      EXPECT_NEAR(got[s], w, 2e-4 * w + 1e-7) << "head " << h << " pos " << hc.pos[s];
    }
    // score_layer (shared preparation) gives the same numbers.
    std::vector<std::vector<float>> all;
    p->score_layer(c, 0, all);
    EXPECT_EQ(all[h], got);
  }
  // Without its moments it is an error, not a crash.
  Cache bare = hand_cache(d, {{0, 1, 2}});
  std::vector<float> s(3);
  EXPECT_THROW(p->score_head(bare, 0, 0, s), Error);
  o.ea_future_positions = 0;
  EXPECT_THROW(make_policy("expected_attention", o), Error);
}

TEST(Policies, KeyDiffIsMinusCosineToTheMeanUnitKey) {
  // Unit keys (1,0), (1,0), (0,1) and a zero key: the anchor is (2,1)/sqrt(5); the zero key has
  // no direction (cosine 0) and does not move the anchor.
  Cache c = hand_cache(2, {{0, 1, 2, 3}}, {}, {{{3, 0}, {0.5f, 0}, {0, 2}, {0, 0}}});
  auto p = make_policy("keydiff", {});
  const auto s = score(*p, c, 0, 0);
  EXPECT_FLOAT_EQ(s[0], -2.0f / std::sqrt(5.0f));
  EXPECT_FLOAT_EQ(s[1], -2.0f / std::sqrt(5.0f));
  EXPECT_FLOAT_EQ(s[2], -1.0f / std::sqrt(5.0f));
  EXPECT_EQ(s[3], 0.0f);
  EXPECT_TRUE(p->key_scorer({1, 1, 2}) == nullptr);  // the anchor moves: no per-key score

  // Random keys on a ragged cache against kvpress's formula in double: -cos(k, mean_j k_j/|k_j|),
  // each head with its own anchor over the keys it holds.
  const int d = 16, nkv = 2, T = 50;
  std::mt19937 rng(29);
  std::normal_distribution<float> nd;
  Cache r({1, nkv, d}, {T}, {});
  std::vector<float> k(size_t(T) * nkv * d), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) k[i] = nd(rng) + (i % d == 3 ? 1.5f : 0.0f);  // a shared direction
  std::vector<int32_t> pos(T);
  std::iota(pos.begin(), pos.end(), 0);
  r.append(0, k.data(), v.data(), pos.data(), T);
  std::vector<int> keep;
  for (int i = 0; i < T; ++i)
    if (i % 5 != 1) keep.push_back(i);
  r.retain(0, 1, keep);
  for (int h = 0; h < nkv; ++h) {
    const HeadCache& hc = r.head(0, h);
    auto key = [&](int s) { return k.data() + (size_t(hc.pos[s]) * nkv + h) * d; };
    auto norm = [&](const float* x) {
      double n = 0;
      for (int i = 0; i < d; ++i) n += double(x[i]) * x[i];
      return std::sqrt(n);
    };
    std::vector<double> anchor(d, 0.0);
    for (int s = 0; s < hc.n; ++s)
      for (int i = 0; i < d; ++i) anchor[i] += key(s)[i] / norm(key(s)) / hc.n;
    double an = 0;
    for (double a : anchor) an += a * a;
    const std::vector<float> got = score(*p, r, 0, h);
    for (int s = 0; s < hc.n; ++s) {
      double dot = 0;
      for (int i = 0; i < d; ++i) dot += key(s)[i] * anchor[i];
      EXPECT_NEAR(got[s], -dot / norm(key(s)) / std::sqrt(an), 1e-5) << "head " << h << " pos " << hc.pos[s];
    }
  }
}

TEST(Policies, LayerConsistentAveragesStandardisedScoresByPosition) {
  // knorm on hand-made keys: head 0 holds positions 0..3, head 1 positions 1..3 (position 0 evicted).
  const std::vector<std::vector<std::vector<float>>> keys{{{1, 0}, {2, 0}, {3, 0}, {4, 0}}, {{0, 3}, {0, 1}, {0, 2}}};
  Cache c = hand_cache(2, {{0, 1, 2, 3}, {1, 2, 3}}, {}, keys);
  auto p = make_policy("knorm+layer", {});
  EXPECT_EQ(p->name(), "knorm+layer");
  // Standardised knorm scores: head 0: -(1,2,3,4) -> (1.342, 0.447, -0.447, -1.342);
  // head 1: -(3,1,2) -> (-1.225, 1.225, 0).
  const double a = 3.0 / std::sqrt(5.0), b = 1.0 / std::sqrt(5.0), e = std::sqrt(1.5);
  const std::vector<float> h0 = score(*p, c, 0, 0), h1 = score(*p, c, 0, 1);
  const std::vector<double> want0{a, (b - e) / 2, (-b + e) / 2, (-a + 0) / 2};
  const std::vector<double> want1{(b - e) / 2, (-b + e) / 2, (-a + 0) / 2};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(h0[i], want0[i], 1e-5) << i;
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(h1[i], want1[i], 1e-5) << i;
  // Both heads rank the positions they share the same way (2, then 1, then 3): plain knorm would
  // keep {1, 2} in head 0 and {2, 3} in head 1.
  Compressor comp(make_policy("knorm+layer", {}), {}, {});
  comp.compress_layer(c, 0, 2, 0);
  EXPECT_EQ(std::vector<int32_t>(c.head(0, 0).pos.begin(), c.head(0, 0).pos.begin() + 2), (std::vector<int32_t>{0, 2}));
  EXPECT_EQ(std::vector<int32_t>(c.head(0, 1).pos.begin(), c.head(0, 1).pos.begin() + 2), (std::vector<int32_t>{1, 2}));
  EXPECT_THROW(make_policy("none+layer", {}), Error);
  EXPECT_THROW(make_policy("knorm+layer+layer", {}), Error);
  EXPECT_THROW(make_policy("+layer", {}), Error);
  EXPECT_EQ(base_policy_name("ea_calibrated+layer"), "ea_calibrated");
  EXPECT_EQ(base_policy_name("tova"), "tova");
  EXPECT_EQ(base_policy_name("+layer"), "+layer");
}

}  // namespace
}  // namespace qf::kv
