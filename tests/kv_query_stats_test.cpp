// The policies that score with calibrated query statistics before the rotary embedding
// (qfilters_rope, ea_calibrated, qfilters_adaptive, qfilters_max) against direct double-precision computations with dense rotation
// matrices, and the property that motivates them: a key's score depends on its distance to the
// current position, not on its absolute position.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "kv/policy.h"
#include "util/error.h"

namespace qf::kv {
namespace {

using Matrix = std::vector<std::vector<double>>;

// Rotation of `pos` with pairs (i, i + n_rot/2) (NeoX pairing), dimensions from n_rot on fixed.
Matrix neox_rotation(int d, int n_rot, const std::vector<double>& inv_freq, double pos) {
  Matrix r(d, std::vector<double>(d, 0.0));
  for (int i = 0; i < d; ++i) r[i][i] = 1.0;
  for (int i = 0; i < n_rot / 2; ++i) {
    const int a = i, b = i + n_rot / 2;
    const double th = pos * inv_freq[i];
    r[a][a] = std::cos(th), r[a][b] = -std::sin(th), r[b][a] = std::sin(th), r[b][b] = std::cos(th);
  }
  return r;
}

// Mean of the rotations of positions p0 .. p0 + n - 1.
Matrix mean_rotation(int d, int n_rot, const std::vector<double>& inv_freq, int64_t p0, int n) {
  Matrix m(d, std::vector<double>(d, 0.0));
  for (int p = 0; p < n; ++p) {
    const Matrix r = neox_rotation(d, n_rot, inv_freq, double(p0 + p));
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) m[i][j] += r[i][j] / n;
  }
  return m;
}

std::vector<double> times(const Matrix& m, const float* x) {
  std::vector<double> y(m.size(), 0.0);
  for (size_t i = 0; i < m.size(); ++i)
    for (size_t j = 0; j < m.size(); ++j) y[i] += m[i][j] * x[j];
  return y;
}

double dot(const std::vector<double>& a, const float* b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

struct StatsCase {
  static constexpr int d = 8, nkv = 2, group = 3, n_heads = nkv * group, rank = 2, n_rot = 6;
  const std::vector<double> inv_freq{0.5, 0.1, 0.01};
  std::vector<float> mean, factors;
  PolicyOptions options;

  explicit StatsCase(uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    mean.resize(size_t(n_heads) * d);
    factors.resize(size_t(n_heads) * rank * d);
    for (auto& x : mean) x = nd(rng) * 2.0f;
    for (auto& x : factors) x = nd(rng);
    options.query_mean = mean;
    options.query_factors = factors;
    options.n_query_heads = n_heads;
    options.stats_rank = rank;
  }
  RopeGeometry rope() const { return {.n_rot = n_rot, .adjacent = false, .inv_freq = {inv_freq}}; }

  // A one-layer cache holding T random keys (stored rotated by their positions first .. first+T-1)
  // and values; head 1 lost a few positions, a sink among them.
  Cache cache(int T, int first, uint32_t seed, std::vector<float>* keys_out = nullptr, AttentionStats stats = {}) const {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    Cache c({1, nkv, d}, {T}, stats);
    c.rope = rope();
    std::vector<float> k(size_t(T) * nkv * d), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    std::vector<int32_t> pos(T);
    std::iota(pos.begin(), pos.end(), first);
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < nkv; ++h) c.rope.rotate(0, pos[t], k.data() + (size_t(t) * nkv + h) * d);
    c.append(0, k.data(), v.data(), pos.data(), T);
    std::vector<int> keep;
    for (int i = 0; i < T; ++i)
      if (i % 7 != 2) keep.push_back(i);
    c.retain(0, 1, keep);
    if (keys_out) *keys_out = k;
    return c;
  }
};

std::vector<float> score(Policy& p, const Cache& c, int h) {
  std::vector<float> s(c.head(0, h).n, -123.0f);
  p.score_head(c, 0, h, s);
  return s;
}

TEST(QueryStatsPolicies, QFiltersRopeIsTheGroupMeanQueryMovedToTheNextPositions) {
  StatsCase s(5);
  const int T = 40, future = 16;
  std::vector<float> k;
  const Cache c = s.cache(T, 0, 9, &k);
  s.options.query_future_positions = future;
  auto p = make_policy("qfilters_rope", s.options);
  EXPECT_EQ(p->name(), "qfilters_rope");
  EXPECT_EQ(p->needs(s.options), AttentionStats{});  // no attention statistics: the fused kernel stays
  const Matrix R = mean_rotation(StatsCase::d, StatsCase::n_rot, s.inv_freq, T, future);
  for (int h = 0; h < StatsCase::nkv; ++h) {
    std::vector<float> f(StatsCase::d, 0.0f);
    for (int g = 0; g < StatsCase::group; ++g)
      for (int i = 0; i < StatsCase::d; ++i) f[i] += s.mean[(h * StatsCase::group + g) * StatsCase::d + i] / StatsCase::group;
    const std::vector<double> rf = times(R, f.data());
    const std::vector<float> got = score(*p, c, h);
    const HeadCache& hc = c.head(0, h);
    for (int j = 0; j < hc.n; ++j) {
      const double want = dot(rf, k.data() + (size_t(hc.pos[j]) * StatsCase::nkv + h) * StatsCase::d);
      EXPECT_NEAR(got[j], want, 1e-4 * (1 + std::abs(want))) << "head " << h << " pos " << hc.pos[j];
    }
  }
}

TEST(QueryStatsPolicies, QFiltersRopeScoresDependOnDistanceNotOnAbsolutePosition) {
  StatsCase s(6);
  s.options.query_future_positions = 1;
  auto p = make_policy("qfilters_rope", s.options);
  // The same keys, the whole sequence 1,000 positions later: every score is the same.
  const Cache early = s.cache(30, 0, 11), late = s.cache(30, 1000, 11);
  for (int h = 0; h < StatsCase::nkv; ++h) {
    const std::vector<float> a = score(*p, early, h), b = score(*p, late, h);
    ASSERT_EQ(a.size(), b.size());
    for (size_t j = 0; j < a.size(); ++j) EXPECT_NEAR(a[j], b[j], 1e-4 * (1 + std::abs(a[j]))) << h << " " << j;
  }
  // A fixed post-rotary filter (what qfilters scores with) does not have this property.
  std::vector<float> fixed(size_t(StatsCase::nkv) * StatsCase::d, 1.0f);
  PolicyOptions o;
  o.filters = fixed;
  auto q = make_policy("qfilters", o);
  double diff = 0;
  for (int h = 0; h < StatsCase::nkv; ++h) {
    const std::vector<float> a = score(*q, early, h), b = score(*q, late, h);
    for (size_t j = 0; j < a.size(); ++j) diff = std::max(diff, double(std::abs(a[j] - b[j])));
  }
  EXPECT_GT(diff, 0.1);
}

TEST(QueryStatsPolicies, EaCalibratedMatchesADirectComputation) {
  StatsCase s(7);
  const int T = 40, future = 16, d = StatsCase::d;
  std::vector<float> k;
  const Cache c = s.cache(T, 0, 13, &k);
  s.options.query_future_positions = future;
  auto p = make_policy("ea_calibrated", s.options);
  const Matrix R = mean_rotation(d, StatsCase::n_rot, s.inv_freq, T, future);
  for (int h = 0; h < StatsCase::nkv; ++h) {
    const HeadCache& hc = c.head(0, h);
    const std::vector<float> vals = values_f32(hc, d);
    std::vector<double> want(hc.n, 0.0);
    for (int g = 0; g < StatsCase::group; ++g) {
      const int qh = h * StatsCase::group + g;
      // Sigma = sum_r u_r u_r^T; logit = (R mu).k / sqrt(d) + k' R Sigma R^T k / (2d).
      Matrix S(d, std::vector<double>(d, 0.0));
      for (int r = 0; r < StatsCase::rank; ++r) {
        const float* u = s.factors.data() + (size_t(qh) * StatsCase::rank + r) * d;
        for (int i = 0; i < d; ++i)
          for (int j = 0; j < d; ++j) S[i][j] += double(u[i]) * u[j];
      }
      const std::vector<double> mu = times(R, s.mean.data() + size_t(qh) * d);
      std::vector<double> logit(hc.n);
      double mx = -1e300, z = 0;
      for (int j = 0; j < hc.n; ++j) {
        if (hc.pos[j] < kQueryMomentSinks) continue;
        const float* key = k.data() + (size_t(hc.pos[j]) * StatsCase::nkv + h) * d;
        std::vector<double> rk(d, 0.0);  // R^T k
        for (int i = 0; i < d; ++i)
          for (int m = 0; m < d; ++m) rk[i] += R[m][i] * key[m];
        double quad = 0;
        for (int i = 0; i < d; ++i)
          for (int m = 0; m < d; ++m) quad += rk[i] * S[i][m] * rk[m];
        logit[j] = dot(mu, key) / std::sqrt(double(d)) + quad / (2.0 * d);
        mx = std::max(mx, logit[j]);
      }
      for (int j = 0; j < hc.n; ++j)
        if (hc.pos[j] >= kQueryMomentSinks) z += std::exp(logit[j] - mx);
      for (int j = 0; j < hc.n; ++j)
        if (hc.pos[j] >= kQueryMomentSinks) want[j] += std::exp(logit[j] - mx) / z / StatsCase::group;
    }
    const std::vector<float> got = score(*p, c, h);
    for (int j = 0; j < hc.n; ++j) {
      if (hc.pos[j] < kQueryMomentSinks) {
        EXPECT_EQ(got[j], std::numeric_limits<float>::infinity()) << "sink " << hc.pos[j];
        continue;
      }
      double vn = 0;
      for (int i = 0; i < d; ++i) vn += double(vals[size_t(j) * d + i]) * vals[size_t(j) * d + i];
      const double w = want[j] * std::sqrt(vn);
      EXPECT_NEAR(got[j], w, 2e-4 * w + 1e-7) << "head " << h << " pos " << hc.pos[j];
    }
  }
}

// ---- qfilters_adaptive ------------------------------------------------------------------------

std::vector<double> unit(std::vector<double> x) {
  double n = 0;
  for (double v : x) n += v * v;
  for (double& v : x) v /= std::sqrt(n);
  return x;
}

// Random queries before the rotary embedding, [n][n_heads][d], at positions first .. first+n-1.
std::vector<float> random_queries(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> q(size_t(n) * StatsCase::n_heads * StatsCase::d);
  for (auto& x : q) x = nd(rng) + 0.7f;  // a common direction, as real queries have
  return q;
}

// Query head qh's recent queries from scratch: the explicit sum sum_t (1 - 1/H)^(n-1-t) q_t / ||q_t||,
// unit.
std::vector<double> recent_direction(const std::vector<float>& q, int n_q, int qh, int horizon) {
  const int d = StatsCase::d;
  std::vector<double> ema(d, 0.0);
  for (int t = 0; t < n_q; ++t) {
    const float* x = q.data() + (size_t(t) * StatsCase::n_heads + qh) * d;
    double n2 = 0;
    for (int i = 0; i < d; ++i) n2 += double(x[i]) * x[i];
    const double w = std::pow(1.0 - 1.0 / horizon, n_q - 1 - t) / std::sqrt(n2);
    for (int i = 0; i < d; ++i) ema[i] += w * x[i];
  }
  return unit(ema);
}

// unit((1 - blend) cal + blend recent) for unit cal and recent, moved by the dense mean rotation.
std::vector<double> blend_and_move(const std::vector<double>& cal, const std::vector<double>& recent, double blend,
                                   const Matrix& R) {
  const int d = StatsCase::d;
  std::vector<double> f(d);
  for (int i = 0; i < d; ++i) f[i] = (1 - blend) * cal[i] + blend * recent[i];
  f = unit(f);
  std::vector<double> rf(d, 0.0);
  for (int i = 0; i < d; ++i)
    for (int j = 0; j < d; ++j) rf[i] += R[i][j] * f[j];
  return rf;
}

// The adaptive filter computed from scratch: each query head's recent direction; the group's mean
// of those, unit; blended with the unit group-mean calibrated query; unit; moved.
std::vector<double> adaptive_filter(const StatsCase& s, const std::vector<float>& q, int n_q, int h, double blend,
                                    int horizon, const Matrix& R) {
  const int d = StatsCase::d;
  std::vector<double> cal(d, 0.0), recent(d, 0.0);
  for (int g = 0; g < StatsCase::group; ++g) {
    const int qh = h * StatsCase::group + g;
    for (int i = 0; i < d; ++i) cal[i] += s.mean[size_t(qh) * d + i];
    const std::vector<double> ema = recent_direction(q, n_q, qh, horizon);
    for (int i = 0; i < d; ++i) recent[i] += ema[i];
  }
  return blend_and_move(unit(cal), unit(recent), blend, R);
}

// A policy that follows the recent queries, on a one-layer cache of 40 keys (head 1 lost every 7th
// position) after 25 random queries, with the dense mean rotation to the 16 positions it scores for.
struct RecentQueriesCase {
  static constexpr int T = 40, future = 16, n_q = 25;
  StatsCase s;
  std::unique_ptr<Policy> policy;
  std::vector<float> keys, queries;
  Cache cache;
  Matrix R;
};

RecentQueriesCase recent_queries_case(const std::string& name, float blend, int horizon, uint32_t seed) {
  using C = RecentQueriesCase;
  StatsCase s(seed);
  s.options.query_future_positions = C::future;
  s.options.filter_blend = blend;
  s.options.filter_horizon = horizon;
  auto p = make_policy(name, s.options);
  EXPECT_EQ(p->name(), name);
  // Only the recent queries (not even their moments): no attention statistics, so the fused kernel stays.
  EXPECT_EQ(p->needs(s.options), (AttentionStats{.query_recent = horizon}));
  std::vector<float> k;
  Cache c = s.cache(C::T, 0, seed + 2, &k, p->needs(s.options));
  std::vector<float> q = random_queries(C::n_q, seed + 8);
  for (int t = 0; t < C::n_q; ++t)
    c.query_moments[0].add(q.data() + size_t(t) * StatsCase::n_heads * StatsCase::d, StatsCase::n_heads, StatsCase::d,
                           horizon);
  Matrix R = mean_rotation(StatsCase::d, StatsCase::n_rot, s.inv_freq, C::T, C::future);
  return {std::move(s), std::move(p), std::move(k), std::move(q), std::move(c), std::move(R)};
}

TEST(QueryStatsPolicies, AdaptiveFilterBlendsTheRecentQueriesAsADirectComputation) {
  for (const auto& [blend, horizon] : std::vector<std::pair<float, int>>{{0.5f, 8}, {1.0f, 1}, {0.3f, 100}}) {
    SCOPED_TRACE("blend " + std::to_string(blend) + " horizon " + std::to_string(horizon));
    RecentQueriesCase rc = recent_queries_case("qfilters_adaptive", blend, horizon, 21);
    for (int h = 0; h < StatsCase::nkv; ++h) {
      const std::vector<double> rf = adaptive_filter(rc.s, rc.queries, rc.n_q, h, blend, horizon, rc.R);
      const std::vector<float> got = score(*rc.policy, rc.cache, h);
      const HeadCache& hc = rc.cache.head(0, h);
      for (int j = 0; j < hc.n; ++j) {
        const double want = dot(rf, rc.keys.data() + (size_t(hc.pos[j]) * StatsCase::nkv + h) * StatsCase::d);
        EXPECT_NEAR(got[j], want, 1e-4 * (1 + std::abs(want))) << "head " << h << " pos " << hc.pos[j];
      }
    }
  }
}

// Head 0 keeps the positions head 1 holds (the case has two KV heads; head 1 lost some): every
// head of the layer then holds the same positions, as qfilters_max keeps them.
void align_heads(Cache& c) {
  ASSERT_EQ(StatsCase::nkv, 2);
  std::vector<int> keep;
  const HeadCache &h0 = c.head(0, 0), &h1 = c.head(0, 1);
  for (int j = 0, o = 0; j < h0.n; ++j)
    if (o < h1.n && h1.pos[o] == h0.pos[j]) keep.push_back(j), ++o;
  c.retain(0, 0, keep);
  ASSERT_EQ(c.head(0, 0).n, c.head(0, 1).n);
}

// qfilters_max from scratch: every query head's own blended filter, its projections standardised
// (mean 0, population standard deviation 1) over its KV head's keys, the maximum over the group,
// then over the KV heads holding the same position.
// Both on the ragged cache (head 1 lost positions: the merge by position) and with every head
// holding the same positions (the usual case, an element-wise maximum).
TEST(QueryStatsPolicies, QFiltersMaxIsTheBestStandardisedProjectionOverTheLayersQueryHeads) {
  const int d = StatsCase::d, group = StatsCase::group, nkv = StatsCase::nkv;
  for (const bool aligned : {false, true})
  for (const auto& [blend, horizon] : std::vector<std::pair<float, int>>{{1.0f, 1}, {0.5f, 8}, {0.0f, 1}}) {
    SCOPED_TRACE("blend " + std::to_string(blend) + " horizon " + std::to_string(horizon) + (aligned ? " aligned" : ""));
    RecentQueriesCase rc = recent_queries_case("qfilters_max", blend, horizon, 51);
    if (aligned) align_heads(rc.cache);
    const Cache& c = rc.cache;
    std::vector<std::vector<double>> best(nkv);  // [kv head][slot]
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& hc = c.head(0, h);
      best[h].assign(hc.n, -1e300);
      for (int g = 0; g < group; ++g) {
        const int qh = h * group + g;
        const std::vector<double> cal =
            unit(std::vector<double>(rc.s.mean.begin() + qh * d, rc.s.mean.begin() + (qh + 1) * d));
        const std::vector<double> rf = blend_and_move(cal, recent_direction(rc.queries, rc.n_q, qh, horizon), blend, rc.R);
        std::vector<double> z(hc.n);
        double m = 0, sq = 0;
        for (int j = 0; j < hc.n; ++j) m += z[j] = dot(rf, rc.keys.data() + (size_t(hc.pos[j]) * nkv + h) * d);
        m /= hc.n;
        for (double x : z) sq += (x - m) * (x - m);
        const double sd = std::sqrt(sq / hc.n);
        for (int j = 0; j < hc.n; ++j) best[h][j] = std::max(best[h][j], (z[j] - m) / sd);
      }
    }
    std::vector<std::vector<float>> layer;
    rc.policy->score_layer(c, 0, layer);
    ASSERT_EQ(layer.size(), size_t(nkv));
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& hc = c.head(0, h);
      const std::vector<float> got = score(*rc.policy, c, h);
      ASSERT_EQ(got, layer[h]);
      for (int j = 0; j < hc.n; ++j) {
        double want = -1e300;
        for (int o = 0; o < nkv; ++o) {
          const HeadCache& other = c.head(0, o);
          for (int i = 0; i < other.n; ++i)
            if (other.pos[i] == hc.pos[j]) want = std::max(want, best[o][i]);
        }
        EXPECT_NEAR(got[j], want, 1e-4 * (1 + std::abs(want))) << "head " << h << " pos " << hc.pos[j];
      }
    }
    // A position both heads hold has one score: the layer keeps it in every head or in none.
    if (aligned) {
      EXPECT_EQ(layer[0], layer[1]);
      continue;
    }
    ASSERT_EQ(c.head(0, 0).pos[3], 3);
    ASSERT_EQ(c.head(0, 1).pos[2], 3);  // head 1 lost position 2
    EXPECT_EQ(layer[0][3], layer[1][2]);
  }
}

// qfilters_max's memory: after a round, a slot that is still there (same position, same key)
// scores max(this round's score, last round's - decay x positions since); a new slot, or one whose
// key changed at the same position (a refilled cache), scores this round's alone. Without memory
// (decay inf) every round is its own. The memory survives save_state / load_state.
// Both on the ragged cache (a memory per KV head) and with every head holding the same positions
// (one memory for the layer, keyed by head 0's slots).
TEST(QueryStatsPolicies, QFiltersMaxRemembersEachSlotsScoreFadingWithPosition) {
  size_t remembering_ragged_state_bytes = 0;
  for (const bool aligned : {false, true}) {
    SCOPED_TRACE(aligned ? "aligned" : "ragged");
    const int d = StatsCase::d, nkv = StatsCase::nkv;
    const float decay = 0.05f;
    RecentQueriesCase rc = recent_queries_case("qfilters_max", 1.0f, 1, 61);
    if (aligned) align_heads(rc.cache);
    PolicyOptions with = rc.s.options, without = rc.s.options;
    with.filter_decay = decay;
    without.filter_decay = std::numeric_limits<float>::infinity();
    auto remembering = make_policy("qfilters_max", with), forgetting = make_policy("qfilters_max", without);
    Cache& c = rc.cache;
    std::vector<std::vector<float>> first, raw, got;
    remembering->score_layer(c, 0, first);
    forgetting->score_layer(c, 0, raw);
    EXPECT_EQ(first, raw);  // nothing remembered before the first round
    EXPECT_EQ(forgetting->save_state(), "");

    // The next round: three slots evicted per head, three tokens appended, another query seen.
    auto positions = [&](int h) {
      const HeadCache& hc = c.head(0, h);
      return std::vector<int32_t>(hc.pos.begin(), hc.pos.begin() + hc.n);
    };
    const std::vector<std::vector<int32_t>> before{positions(0), positions(1)};
    for (int h = 0; h < nkv; ++h) {
      std::vector<int> keep;
      for (int j = 0; j < c.head(0, h).n; ++j)
        if (j != 4 && j != 11 && j != 20) keep.push_back(j);
      c.retain(0, h, keep);
    }
    std::mt19937 rng(62);
    std::normal_distribution<float> nd;
    std::vector<float> k(size_t(3) * nkv * d), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    const int32_t next[3] = {RecentQueriesCase::T, RecentQueriesCase::T + 1, RecentQueriesCase::T + 2};
    c.append(0, k.data(), v.data(), next, 3);
    const std::vector<float> q = random_queries(1, 63);
    c.query_moments[0].add(q.data(), StatsCase::n_heads, d, 1);
    const std::string saved = remembering->save_state();
    remembering->score_layer(c, 0, got);
    forgetting->score_layer(c, 0, raw);
    int lifted = 0;
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& hc = c.head(0, h);
      for (int j = 0; j < hc.n; ++j) {
        const auto was = std::find(before[h].begin(), before[h].end(), hc.pos[j]);
        float want = raw[h][j];
        if (was != before[h].end())  // 3 positions later: the newest key moved from T - 1 to T + 2
          want = std::max(want, static_cast<float>(first[h][was - before[h].begin()] - decay * 3.0));
        EXPECT_EQ(got[h][j], want) << "head " << h << " pos " << hc.pos[j];
        lifted += got[h][j] > raw[h][j];
      }
    }
    EXPECT_GT(lifted, 0);  // the case exercises the memory
    if (aligned) {  // one score per token, remembered once for the layer
      EXPECT_EQ(got[0], got[1]);
      EXPECT_LT(saved.size(), remembering_ragged_state_bytes);
    } else {
      remembering_ragged_state_bytes = saved.size();
    }

    // Restored into a fresh policy, the memory scores the round alike.
    auto restored = make_policy("qfilters_max", with);
    restored->load_state(saved);
    std::vector<std::vector<float>> again;
    restored->score_layer(c, 0, again);
    EXPECT_EQ(again, got);
    EXPECT_THROW(restored->load_state(saved.substr(0, saved.size() - 1)), Error);
    EXPECT_THROW(restored->load_state("qfmax1 and more"), Error);
    EXPECT_THROW(restored->load_state("nonsense"), Error);
    // Mutated states (bytes changed, cut short) load or throw Error: never read out of bounds
    // (ASan) or allocate what the bytes cannot hold.
    std::mt19937 mut(65);
    for (int trial = 0; trial < 300; ++trial) {
      std::string bad = saved;
      for (int k = 0; k < 1 + trial % 4; ++k) bad[mut() % bad.size()] = static_cast<char>(mut());
      if (trial % 3 == 0) bad.resize(mut() % bad.size());
      try {
        restored->load_state(bad);
      } catch (const Error&) {
      }
    }

    // The same positions refilled with other keys inherit nothing.
    Cache refilled = rc.s.cache(c.head(0, 0).n, 0, 64, nullptr, remembering->needs(with));
    refilled.query_moments[0] = c.query_moments[0];
    remembering->score_layer(refilled, 0, got);
    forgetting->score_layer(refilled, 0, raw);
    EXPECT_EQ(got, raw);

    with.filter_decay = -1.0f;
    EXPECT_THROW(make_policy("qfilters_max", with), Error);
    with.filter_decay = std::numeric_limits<float>::quiet_NaN();
    EXPECT_THROW(make_policy("qfilters_max", with), Error);
  }
}

TEST(QueryStatsPolicies, AdaptiveFilterWithoutRecentQueriesRanksAsQFiltersRope) {
  StatsCase s(31);
  s.options.query_future_positions = 8;
  auto rope = make_policy("qfilters_rope", s.options);
  std::vector<float> q = random_queries(10, 37);
  for (const float blend : {0.0f, 0.6f}) {
    s.options.filter_blend = blend;
    auto p = make_policy("qfilters_adaptive", s.options);
    Cache c = s.cache(30, 0, 33, nullptr, p->needs(s.options));
    // Blend 0 ignores the recent queries; blend 0.6 has none to blend yet.
    if (blend == 0.0f)
      for (int t = 0; t < 10; ++t)
        c.query_moments[0].add(q.data() + size_t(t) * StatsCase::n_heads * StatsCase::d, StatsCase::n_heads,
                               StatsCase::d, s.options.filter_horizon);
    for (int h = 0; h < StatsCase::nkv; ++h) {
      const std::vector<float> a = score(*p, c, h), b = score(*rope, c, h);
      // The same filter direction, unit length instead of the mean query's: b = ||f|| a.
      double ratio = 0;
      for (size_t j = 0; j < a.size(); ++j)
        if (std::abs(a[j]) > 1e-3) ratio = b[j] / a[j];
      ASSERT_GT(ratio, 0);
      for (size_t j = 0; j < a.size(); ++j) EXPECT_NEAR(b[j], ratio * a[j], 1e-4 * (1 + std::abs(b[j]))) << blend;
    }
  }
}

TEST(QueryStatsPolicies, RecentQueriesAreADecayedSumOfUnitQueries) {
  QueryMoments m;
  const float q1[2] = {3.0f, 4.0f}, q2[2] = {0.0f, -2.0f}, zero[2] = {0.0f, 0.0f};
  m.add(q1, 1, 2, 4);
  m.add(q2, 1, 2, 4);
  m.add(zero, 1, 2, 4);  // a zero query adds nothing, but the older ones still decay
  ASSERT_EQ(m.recent.size(), 2u);
  EXPECT_NEAR(m.recent[0], 0.75 * 0.75 * 0.6, 1e-12);
  EXPECT_NEAR(m.recent[1], 0.75 * (0.75 * 0.8 - 1.0), 1e-12);
  QueryMoments last;  // horizon 1: the last query only
  last.add(q1, 1, 2, 1);
  last.add(q2, 1, 2, 1);
  EXPECT_EQ(last.recent, (std::vector<double>{0.0, -1.0}));
  QueryMoments none;  // horizon 0: no recent queries kept
  none.add(q1, 1, 2);
  EXPECT_TRUE(none.recent.empty());
  QueryMoments only_recent;  // recent queries without the sums (what qfilters_adaptive asks for)
  only_recent.add(q1, 1, 2, 1, false);
  ASSERT_EQ(only_recent.recent.size(), 2u);
  EXPECT_NEAR(only_recent.recent[0], 0.6, 1e-7);  // 3/5 and 4/5 of a float query
  EXPECT_NEAR(only_recent.recent[1], 0.8, 1e-7);
  EXPECT_TRUE(only_recent.sum.empty() && only_recent.outer.empty());
  std::vector<double> mean, cov;
  EXPECT_THROW(only_recent.mean_cov(0, mean, cov), Error);      // no sums to read
  EXPECT_THROW(only_recent.add(q2, 1, 2, 1, true), Error);      // sums would miss the first query
  last.clear();
  EXPECT_EQ(last.recent, (std::vector<double>{0.0, 0.0}));
}

TEST(QueryStatsPolicies, AdaptiveFilterOptionsAreChecked) {
  for (const char* name : {"qfilters_adaptive", "qfilters_max"}) {
    SCOPED_TRACE(name);
    StatsCase s(41);
    s.options.filter_blend = 1.5f;
    EXPECT_THROW(make_policy(name, s.options), Error);
    s.options.filter_blend = -0.1f;
    EXPECT_THROW(make_policy(name, s.options), Error);
    s.options.filter_blend = 0.5f;
    s.options.filter_horizon = 0;
    EXPECT_THROW(make_policy(name, s.options), Error);
    s.options.filter_horizon = 4;
    // Recent queries of another shape than the statistics' are an error, not a misread.
    auto p = make_policy(name, s.options);
    Cache c = s.cache(10, 0, 3, nullptr, p->needs(s.options));
    const std::vector<float> q(size_t(2) * StatsCase::d, 1.0f);
    c.query_moments[0].add(q.data(), 2, StatsCase::d, 4);
    std::vector<float> out(c.head(0, 0).n);
    EXPECT_THROW(p->score_head(c, 0, 0, out), Error);
  }
}

TEST(QueryStatsPolicies, MissingOrMisshapenStatisticsAreErrors) {
  for (const char* name : {"qfilters_rope", "ea_calibrated", "qfilters_rope+layer", "qfilters_adaptive", "qfilters_max"}) {
    SCOPED_TRACE(name);
    try {
      make_policy(name, {});
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--stats-rank"), std::string::npos) << e.what();
    }
  }
  StatsCase s(8);
  s.options.query_future_positions = 0;
  EXPECT_THROW(make_policy("qfilters_rope", s.options), Error);
  s.options.query_future_positions = 4;
  // Statistics for 3 KV heads' worth of query heads do not fit a cache of 2 KV heads of 4 dims.
  const Cache c = s.cache(10, 0, 3);
  Cache other({1, StatsCase::nkv, 4}, {10}, {});
  other.head(0, 0).n = 0;
  for (const char* name : {"qfilters_rope", "ea_calibrated", "qfilters_adaptive", "qfilters_max"}) {
    auto p = make_policy(name, s.options);
    std::vector<float> out(c.head(0, 0).n);
    EXPECT_NO_THROW(p->score_head(c, 0, 0, out));
    std::vector<float> none;
    EXPECT_THROW(p->score_head(other, 0, 0, none), Error) << name;
  }
  // Listed apart from the default policies.
  const std::vector<std::string> names = query_stats_policy_names();
  EXPECT_EQ(names, (std::vector<std::string>{"qfilters_rope", "ea_calibrated", "qfilters_adaptive", "qfilters_max"}));
  for (const auto& n : policy_names()) EXPECT_NE(n, "qfilters_rope");
}

}  // namespace
}  // namespace qf::kv
