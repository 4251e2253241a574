// attend_with_stats (src/kv/attention.cpp over attention_stats_f32 in
// src/tensor/attention_kernel.cpp) against a softmax in double precision written here: attn_sum,
// attn_cnt, attn_last and the output, on caches with gaps after per-head eviction, with
// accumulate_from_pos inside a call, GQA groups 1/3/4, head sizes 64 and 13, for every SIMD
// target. Then the exactness properties callers rely on: the output is attend_fused's bit for
// bit, and the statistics do not depend on the thread count nor on how a sequence is split into
// calls (what lets eval's QueryTail rebuild snapkv's statistics from captured queries).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "tensor/attention_kernel.h"
#include "tensor/kernels.h"
#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf::kv {
namespace {

class AttentionStatsTest : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(force_simd_target("best")); }
};

// Appends n_tok random tokens at positions pos[0..n_tok) to every KV head of layer 0.
void append(Cache& c, const std::vector<int32_t>& pos, std::mt19937& rng) {
  const int nkv = c.shape().n_kv_heads, d = c.shape().head_dim;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(pos.size() * nkv * d), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  c.append(0, k.data(), v.data(), pos.data(), static_cast<int>(pos.size()));
}

std::vector<int32_t> range(int32_t first, int n) {
  std::vector<int32_t> p(n);
  std::iota(p.begin(), p.end(), first);
  return p;
}

// A layer-0 cache with `past` tokens thinned differently per head (gaps in the positions, as
// after evictions), ready for queries at positions >= past.
Cache make_cache(int nkv, int d, int past, int capacity, std::mt19937& rng) {
  Cache c({1, nkv, d}, {capacity}, AttentionStats{.accumulate = true, .last_query = true});
  append(c, range(0, past), rng);
  for (int g = 0; g < nkv; ++g) {
    std::bernoulli_distribution keep(0.5 + 0.15 * g);
    std::vector<int> slots;
    for (int j = 0; j < c.head(0, g).n; ++j)
      if (keep(rng)) slots.push_back(j);
    c.retain(0, g, slots);
  }
  return c;
}

// Expected statistics in double, accumulated over calls exactly as the contract says.
struct Expected {
  std::vector<std::vector<double>> sum, last;  // [kv head][slot]
  std::vector<std::vector<int>> cnt;
  std::vector<double> out;  // of the latest call
};

// Adds one call's weights (queries q at q_pos against the cache as it is now) to `e`.
void reference_call(const Cache& c, int n_heads, float scale, const std::vector<float>& q,
                    const std::vector<int32_t>& q_pos, int32_t from, Expected& e) {
  const int nkv = c.shape().n_kv_heads, d = c.shape().head_dim, group = n_heads / nkv;
  const int n_tok = static_cast<int>(q_pos.size());
  e.sum.resize(nkv), e.last.resize(nkv), e.cnt.resize(nkv);
  e.out.assign(q.size(), 0.0);
  for (int g = 0; g < nkv; ++g) {
    const HeadCache& hc = c.head(0, g);
    e.sum[g].resize(hc.n, 0.0), e.cnt[g].resize(hc.n, 0);
    e.last[g].assign(hc.n, 0.0);
  }
  for (int t = 0; t < n_tok; ++t)
    for (int h = 0; h < n_heads; ++h) {
      const int g = h / group;
      const HeadCache& hc = c.head(0, g);
      const std::vector<float> keys = keys_f32(hc, d), values = values_f32(hc, d);
      const float* qh = q.data() + (size_t(t) * n_heads + h) * d;
      std::vector<double> w(hc.n, 0.0);
      double mx = -INFINITY;
      for (int j = 0; j < hc.n; ++j) {
        if (hc.pos[j] > q_pos[t]) continue;
        double s = 0;
        for (int x = 0; x < d; ++x) s += double(qh[x]) * keys[size_t(j) * d + x];
        w[j] = s * scale;
        mx = std::max(mx, w[j]);
      }
      double z = 0;
      for (int j = 0; j < hc.n; ++j)
        if (hc.pos[j] <= q_pos[t]) z += (w[j] = std::exp(w[j] - mx));
      for (int j = 0; j < hc.n; ++j) {
        if (hc.pos[j] > q_pos[t]) continue;
        w[j] /= z;
        for (int x = 0; x < d; ++x) e.out[(size_t(t) * n_heads + h) * d + x] += w[j] * values[size_t(j) * d + x];
        if (q_pos[t] >= from) e.sum[g][j] += w[j] / group;
        if (q_pos[t] >= from && h % group == 0) ++e.cnt[g][j];
        if (t == n_tok - 1) e.last[g][j] += w[j] / group;
      }
    }
}

std::vector<float> random_queries(int n_tok, int n_heads, int d, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> q(size_t(n_tok) * n_heads * d);
  for (auto& x : q) x = nd(rng);
  return q;
}

struct Snapshot {
  std::vector<std::vector<float>> sum, last;
  std::vector<std::vector<int32_t>> cnt;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(const Cache& c) {
  Snapshot s;
  for (int g = 0; g < c.shape().n_kv_heads; ++g) {
    const HeadCache& hc = c.head(0, g);
    s.sum.emplace_back(hc.attn_sum.begin(), hc.attn_sum.begin() + hc.n);
    s.cnt.emplace_back(hc.attn_cnt.begin(), hc.attn_cnt.begin() + hc.n);
    s.last.emplace_back(hc.attn_last.begin(), hc.attn_last.begin() + hc.n);
  }
  return s;
}

void expect_near_reference(const Cache& c, const Expected& e, const std::vector<float>& out, const std::string& what) {
  for (int g = 0; g < c.shape().n_kv_heads; ++g) {
    const HeadCache& hc = c.head(0, g);
    for (int j = 0; j < hc.n; ++j) {
      // A slot no counted query saw gets exactly nothing.
      if (e.cnt[g][j] == 0) {
        ASSERT_EQ(hc.attn_sum[j], 0.0f) << what << " g=" << g << " j=" << j;
      }
      ASSERT_NEAR(hc.attn_sum[j], e.sum[g][j], 1e-5 + 1e-5 * e.sum[g][j]) << what << " g=" << g << " j=" << j;
      ASSERT_EQ(hc.attn_cnt[j], e.cnt[g][j]) << what << " g=" << g << " j=" << j;
      if (e.last[g][j] == 0.0) {
        ASSERT_EQ(hc.attn_last[j], 0.0f) << what << " g=" << g << " j=" << j;
      }
      ASSERT_NEAR(hc.attn_last[j], e.last[g][j], 1e-6 + 1e-5 * e.last[g][j]) << what << " g=" << g << " j=" << j;
    }
  }
  for (size_t i = 0; i < out.size(); ++i)
    ASSERT_NEAR(out[i], e.out[i], 2e-5 + 2e-5 * std::abs(e.out[i])) << what << " out[" << i << "]";
}

struct Call {
  std::vector<int32_t> pos;  // query positions; their keys are appended first
  int32_t from;              // accumulate_from_pos
};

// A prefill chunk crossing key tiles with the accumulation boundary inside it, a decode step,
// a chunk with the boundary before it, and one whose queries all skip (boundary after it).
std::vector<Call> calls_after(int past) {
  return {{range(past, 70), past + 23}, {range(past + 70, 1), 0}, {range(past + 71, 9), past + 60},
          {range(past + 80, 5), past + 1000}, {range(past + 85, 1), past + 1000}};
}

// Reference values for every target, identical results for 1, 2 and 3 threads.
TEST_F(AttentionStatsTest, MatchesReferenceEveryTargetAndThreadCount) {
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  struct Shape {
    int nkv, group, d;
  };
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (const Shape& s : {Shape{3, 3, 64}, Shape{2, 1, 13}, Shape{1, 4, 64}, Shape{2, 4, 13}, Shape{3, 3, 13}}) {
      const int n_heads = s.nkv * s.group, past = 150;
      const float scale = 1.0f / std::sqrt(float(s.d));
      std::vector<Snapshot> first_stats;
      std::vector<std::vector<float>> first_out;
      for (ThreadPool& pool : pools) {
        const std::string what = target + " nkv=" + std::to_string(s.nkv) + " group=" + std::to_string(s.group) +
                                 " d=" + std::to_string(s.d) + " threads=" + std::to_string(pool.size());
        std::mt19937 rng(21);
        Cache c = make_cache(s.nkv, s.d, past, 400, rng);
        Expected e;
        int call_no = 0;
        for (const Call& call : calls_after(past)) {
          append(c, call.pos, rng);
          const int n_tok = static_cast<int>(call.pos.size());
          const auto q = random_queries(n_tok, n_heads, s.d, rng);
          std::vector<float> out(q.size(), NAN);
          attend_with_stats(c, {.layer = 0, .n_heads = n_heads, .scale = scale, .n_tok = n_tok, .q = q.data(),
                                .q_pos = call.pos.data(), .out = out.data(), .accumulate_from_pos = call.from},
                            pool);
          if (&pool == &pools[0]) {
            reference_call(c, n_heads, scale, q, call.pos, call.from, e);
            expect_near_reference(c, e, out, what + " call " + std::to_string(call_no));
            if (HasFatalFailure()) return;
            first_stats.push_back(snapshot(c));
            first_out.push_back(out);
          } else {
            ASSERT_TRUE(snapshot(c) == first_stats[call_no]) << what << " call " << call_no;
            ASSERT_EQ(out, first_out[call_no]) << what << " call " << call_no;
          }
          ++call_no;
        }
      }
    }
  }
}

// The output is attend_fused's, bit for bit (same kernel), for decode steps and chunks.
TEST_F(AttentionStatsTest, OutputIsFusedOutputEveryTarget) {
  ThreadPool pool(2);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (int d : {64, 13}) {
      std::mt19937 rng(22);
      Cache c = make_cache(3, d, 200, 600, rng);
      int32_t next = 200;
      for (int n_tok : {1, 2, 37, 1, 130}) {
        const auto pos = range(next, n_tok);
        next += n_tok;
        append(c, pos, rng);
        const auto q = random_queries(n_tok, 9, d, rng);
        std::vector<float> fused(q.size(), NAN), stats(q.size(), NAN);
        AttentionArgs a{.layer = 0, .n_heads = 9, .scale = 0.125f, .n_tok = n_tok, .q = q.data(), .q_pos = pos.data()};
        a.out = fused.data();
        attend_fused(c, a, pool);
        a.out = stats.data();
        attend_with_stats(c, a, pool);
        ASSERT_EQ(stats, fused) << target << " d=" << d << " n_tok=" << n_tok;
      }
    }
  }
}

// One call over a sequence adds exactly what any split of it into calls adds (prefill chunks,
// single-token steps), the accumulation boundary falling anywhere.
TEST_F(AttentionStatsTest, StatisticsIndependentOfSplitEveryTarget) {
  ThreadPool pool(2);
  const int past = 90, total = 140;
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (int group : {1, 3}) {
      const int nkv = 2, n_heads = nkv * group, d = 64;
      for (int32_t from : {0, past + 61, past + total - 1}) {
        const std::vector<std::vector<int>> splits = {{total}, {1, 1, 70, 1, 67}, {3, 64, 64, 9}, {139, 1}};
        std::vector<Snapshot> results;
        for (const auto& split : splits) {
          std::mt19937 rng(23);
          Cache c = make_cache(nkv, d, past, 400, rng);
          const auto q = random_queries(total, n_heads, d, rng);
          const auto pos = range(past, total);
          // Every split appends the same keys: draw them once, in the same order.
          std::vector<float> k(size_t(total) * nkv * d), v(k.size());
          std::normal_distribution<float> nd;
          for (auto& x : k) x = nd(rng);
          for (auto& x : v) x = nd(rng);
          int t0 = 0;
          for (int n : split) {
            const size_t kv_off = size_t(t0) * nkv * d;
            c.append(0, k.data() + kv_off, v.data() + kv_off, pos.data() + t0, n);
            std::vector<float> out(size_t(n) * n_heads * d);
            attend_with_stats(c, {.layer = 0, .n_heads = n_heads, .scale = 0.2f, .n_tok = n,
                                  .q = q.data() + size_t(t0) * n_heads * d, .q_pos = pos.data() + t0,
                                  .out = out.data(), .accumulate_from_pos = from},
                              pool);
            t0 += n;
          }
          results.push_back(snapshot(c));
        }
        for (size_t i = 1; i < results.size(); ++i)
          ASSERT_TRUE(results[i] == results[0])
              << target << " group=" << group << " from=" << from << " split " << i;
      }
    }
  }
}

// The kernel level: statistics alone (no output, as QueryTail asks) are the ones that come with
// the output; counted == nullptr counts every token; keys a query must not see get nothing
// however large their scores.
TEST_F(AttentionStatsTest, StatisticsOnlyAndMaskedKeys) {
  ThreadPool pool(2);
  const int d = 16, n = 100, n_tok = 3;
  std::vector<float> k(size_t(n) * d), v(size_t(n) * d, 1.0f), q(size_t(n_tok) * d, 1.0f);
  for (int j = 0; j < n; ++j)
    for (int x = 0; x < d; ++x) k[size_t(j) * d + x] = j < 10 ? 0.01f * j : 50.0f;
  const int visible[n_tok] = {10, 3, 10};
  const AttentionKv kv{f32_rows(k.data(), d), f32_rows(v.data(), d), visible};
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::vector<float> sum_a(n, 0.0f), sum_b(n, 0.0f), last_a(n, 7.0f), last_b(n, 7.0f), out(q.size());
    std::vector<int32_t> cnt(n, 0);
    const AttentionColumns ca{.n_keys = n, .sum = sum_a.data(), .cnt = cnt.data(), .last = last_a.data()};
    const AttentionColumns cb{.n_keys = n, .sum = sum_b.data(), .last = last_b.data()};
    const uint8_t all[n_tok] = {1, 1, 1};
    attention_stats_f32(q.data(), n_tok, 1, &kv, 1, d, 1.0f, all, &ca, out.data(), pool);
    attention_stats_f32(q.data(), n_tok, 1, &kv, 1, d, 1.0f, nullptr, &cb, nullptr, pool);
    EXPECT_EQ(sum_a, sum_b) << target;
    EXPECT_EQ(last_a, last_b) << target;
    double total = 0;
    for (int j = 0; j < n; ++j) {
      total += sum_a[j];
      EXPECT_EQ(cnt[j], j < 3 ? 3 : j < 10 ? 2 : 0) << target << " j=" << j;
      if (j >= 10) {
        EXPECT_EQ(sum_a[j], 0.0f) << target << " j=" << j;
        EXPECT_EQ(last_a[j], 0.0f) << target << " j=" << j;
      }
    }
    EXPECT_NEAR(total, 3.0, 1e-5) << target;  // each query's weights sum to 1
  }
}

// Every way the kernel can run (output from the tiled kernel; statistics alone for many rows;
// statistics alone or next to the per-token kernel for a few rows) adds the same sums, for any
// subset of counted tokens: one call over 40 tokens = 40 one-token calls, with or without output.
TEST_F(AttentionStatsTest, EveryPathAddsTheSame) {
  ThreadPool pool(3);
  const int n_tok = 40, nkv = 3, n_heads = 9, d = 24, past = 100;
  std::mt19937 rng(24);
  std::normal_distribution<float> nd;
  std::vector<std::vector<float>> k(nkv), v(nkv);
  std::vector<std::vector<int>> vis(nkv);
  std::vector<AttentionKv> kv(nkv);
  for (int g = 0; g < nkv; ++g) {
    k[g].resize(size_t(past + n_tok) * d), v[g].resize(k[g].size());
    for (auto& x : k[g]) x = nd(rng);
    for (auto& x : v[g]) x = nd(rng);
    for (int t = 0; t < n_tok; ++t) vis[g].push_back(past - 30 * g + t + 1);  // causal, ragged per head
    kv[g] = {f32_rows(k[g].data(), d), f32_rows(v[g].data(), d), vis[g].data()};
  }
  const auto q = random_queries(n_tok, n_heads, d, rng);
  std::vector<uint8_t> counted(n_tok);
  for (int t = 0; t < n_tok; ++t) counted[t] = t % 3 != 0;
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::vector<Snapshot> got;
    for (int mode = 0; mode < 4; ++mode) {  // bit 0: with output, bit 1: token by token
      Snapshot s;
      s.sum.assign(nkv, std::vector<float>(past + n_tok, 0.0f));
      s.last.assign(nkv, std::vector<float>(past + n_tok, 0.0f));
      s.cnt.assign(nkv, std::vector<int32_t>(past + n_tok, 0));
      std::vector<AttentionColumns> cols(nkv);
      for (int g = 0; g < nkv; ++g) cols[g] = {past + n_tok, s.sum[g].data(), s.cnt[g].data(), s.last[g].data()};
      std::vector<float> out(q.size());
      const bool with_out = mode & 1;
      if (mode & 2) {
        for (int t = 0; t < n_tok; ++t) {
          std::vector<AttentionKv> one(kv);
          for (int g = 0; g < nkv; ++g) one[g].visible = vis[g].data() + t;
          const size_t off = size_t(t) * n_heads * d;
          attention_stats_f32(q.data() + off, 1, n_heads, one.data(), nkv, d, 0.3f, &counted[t], cols.data(),
                              with_out ? out.data() + off : nullptr, pool);
        }
      } else {
        attention_stats_f32(q.data(), n_tok, n_heads, kv.data(), nkv, d, 0.3f, counted.data(), cols.data(),
                            with_out ? out.data() : nullptr, pool);
      }
      got.push_back(s);
    }
    for (int mode = 1; mode < 4; ++mode) ASSERT_TRUE(got[mode] == got[0]) << target << " mode " << mode;
    for (int g = 0; g < nkv; ++g) {
      const int n_counted = std::count(counted.begin(), counted.end(), 1);
      EXPECT_EQ(got[0].cnt[g][0], n_counted) << target;
      EXPECT_NEAR(std::accumulate(got[0].sum[g].begin(), got[0].sum[g].end(), 0.0), n_counted, 1e-4) << target;
      EXPECT_NEAR(std::accumulate(got[0].last[g].begin(), got[0].last[g].end(), 0.0), 1.0, 1e-5) << target;
    }
  }
}

TEST_F(AttentionStatsTest, BadInputThrows) {
  ThreadPool pool(1);
  std::vector<float> q(64), out(64), sum(4);
  const int vis = 5;
  const AttentionKv kv{f32_rows(q.data(), 8), f32_rows(q.data(), 8), &vis};
  const AttentionColumns cols{.n_keys = 4, .sum = sum.data()};
  // A token seeing more keys than the statistics cover.
  EXPECT_THROW(attention_stats_f32(q.data(), 1, 1, &kv, 1, 8, 1.0f, nullptr, &cols, out.data(), pool), Error);
  const AttentionColumns ok{.n_keys = 8, .sum = sum.data()};
  EXPECT_THROW(attention_stats_f32(q.data(), 1, 4, &kv, 3, 8, 1.0f, nullptr, &ok, out.data(), pool), Error);
  EXPECT_THROW(attention_stats_f32(q.data(), 1, 1, &kv, 1, 300, 1.0f, nullptr, &ok, out.data(), pool), Error);
  Cache c({1, 3, 8}, {4}, AttentionStats{.accumulate = true});
  const int32_t p = 0;
  EXPECT_THROW(attend_with_stats(c, {.layer = 0, .n_heads = 4, .scale = 1.0f, .n_tok = 1, .q = q.data(), .q_pos = &p,
                                     .out = out.data()},
                                 pool),
               Error);
}

}  // namespace
}  // namespace qf::kv
