// KV cache storage, the two attention paths and the Compressor, each checked against an
// independent brute-force computation written here (double precision, no shared code).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "kv/compressor.h"
#include "kv/policy.h"
#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf::kv {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Appends n_tok random tokens at positions first_pos.. to every head of `layer`.
void append_random(Cache& c, int layer, int n_tok, int first_pos, std::mt19937& rng) {
  const int nkv = c.shape().n_kv_heads, d = c.shape().head_dim;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(static_cast<size_t>(n_tok) * nkv * d), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int32_t> pos(n_tok);
  std::iota(pos.begin(), pos.end(), first_pos);
  c.append(layer, k.data(), v.data(), pos.data(), n_tok);
}

// Keeps each slot of one head with probability p (never an empty head unless p == 0).
void thin_head(Cache& c, int layer, int h, double p, std::mt19937& rng) {
  std::bernoulli_distribution keep(p);
  std::vector<int> slots;
  for (int j = 0; j < c.head(layer, h).n; ++j)
    if (keep(rng)) slots.push_back(j);
  c.retain(layer, h, slots);
}

std::vector<int32_t> positions(const HeadCache& hc) { return {hc.pos.begin(), hc.pos.begin() + hc.n}; }

// Softmax weights of one query head over the slots of its KV head it may see (by position),
// in double: weights[slot] (0 for masked slots) and the output.
struct NaiveHead {
  std::vector<double> w;
  std::vector<double> out;
};

NaiveHead naive_head(const Cache& c, int layer, int kv_head, const float* q, int32_t qpos, float scale) {
  const HeadCache& hc = c.head(layer, kv_head);
  const int d = c.shape().head_dim;
  const std::vector<float> keys = keys_f32(hc, d), values = values_f32(hc, d);
  NaiveHead r{std::vector<double>(hc.n, 0.0), std::vector<double>(d, 0.0)};
  double mx = -std::numeric_limits<double>::infinity();
  std::vector<double> logit(hc.n);
  for (int j = 0; j < hc.n; ++j) {
    if (hc.pos[j] > qpos) continue;
    double s = 0;
    for (int i = 0; i < d; ++i) s += double(q[i]) * keys[size_t(j) * d + i];
    logit[j] = s * scale;
    mx = std::max(mx, logit[j]);
  }
  double z = 0;
  for (int j = 0; j < hc.n; ++j)
    if (hc.pos[j] <= qpos) z += (r.w[j] = std::exp(logit[j] - mx));
  for (int j = 0; j < hc.n; ++j) {
    if (hc.pos[j] > qpos) continue;
    r.w[j] /= z;
    for (int i = 0; i < d; ++i) r.out[i] += r.w[j] * values[size_t(j) * d + i];
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Cache

TEST(Cache, AppendRetainClearAndStats) {
  Cache c({2, 2, 4}, {8, 5}, AttentionStats{.accumulate = true, .last_query = true});
  // k[t][h][i] = 100t + 10h + i, v = -k.
  std::vector<float> k(3 * 2 * 4), v(k.size());
  for (int t = 0; t < 3; ++t)
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 4; ++i) k[(t * 2 + h) * 4 + i] = 100.0f * t + 10.0f * h + i, v[(t * 2 + h) * 4 + i] = -k[(t * 2 + h) * 4 + i];
  const int32_t pos[3] = {10, 11, 12};
  c.append(0, k.data(), v.data(), pos, 3);
  for (int h = 0; h < 2; ++h) {
    const HeadCache& hc = c.head(0, h);
    ASSERT_EQ(hc.n, 3);
    for (int t = 0; t < 3; ++t) {
      EXPECT_EQ(hc.pos[t], 10 + t);
      for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(keys_f32(hc, 4)[size_t(t) * 4 + i], 100.0f * t + 10.0f * h + i);
        EXPECT_EQ(values_f32(hc, 4)[size_t(t) * 4 + i], -(100.0f * t + 10.0f * h + i));
      }
    }
  }
  EXPECT_EQ(c.head(1, 0).n, 0);

  // Statistics travel with their slot.
  HeadCache& h1 = c.head(0, 1);
  for (int j = 0; j < 3; ++j) h1.attn_sum[j] = 1.0f + j, h1.attn_cnt[j] = 10 + j, h1.attn_last[j] = 0.5f * j;
  const int keep[] = {0, 2};
  c.retain(0, 1, keep);
  ASSERT_EQ(h1.n, 2);
  EXPECT_EQ(positions(h1), (std::vector<int32_t>{10, 12}));
  EXPECT_EQ(keys_f32(h1, 4)[size_t(1) * 4 + 3], 213.0f);
  EXPECT_EQ(values_f32(h1, 4)[size_t(1) * 4 + 0], -210.0f);
  EXPECT_EQ(h1.attn_sum[1], 3.0f);
  EXPECT_EQ(h1.attn_cnt[1], 12);
  EXPECT_EQ(h1.attn_last[1], 1.0f);
  EXPECT_EQ(c.head(0, 0).n, 3);  // the other head is untouched

  // A new token lands after the kept ones with fresh statistics.
  const int32_t p13 = 13;
  c.append(0, k.data(), v.data(), &p13, 1);
  EXPECT_EQ(h1.n, 3);
  EXPECT_EQ(h1.pos[2], 13);
  EXPECT_EQ(keys_f32(h1, 4)[size_t(2) * 4 + 1], 11.0f);
  EXPECT_EQ(h1.attn_sum[2], 0.0f);
  EXPECT_EQ(h1.attn_cnt[2], 0);
  EXPECT_EQ(h1.attn_last[2], 0.0f);

  // Bytes: 4 + 3 tokens of 4 floats of K and V.
  EXPECT_EQ(c.tokens_held(), 7);
  EXPECT_EQ(c.bytes_used(), 7 * 4 * 2 * 4);
  EXPECT_EQ(c.bytes_reserved(), (8 + 5) * 2 * 4 * 2 * 4);
  EXPECT_EQ(c.full_cache_bytes(100), int64_t(100) * 2 * 2 * 4 * 2 * 4);

  c.queries_seen = 5;
  c.clear();
  EXPECT_EQ(c.tokens_held(), 0);
  EXPECT_EQ(c.bytes_used(), 0);
  EXPECT_EQ(c.queries_seen, 0);
  EXPECT_EQ(c.bytes_reserved(), (8 + 5) * 2 * 4 * 2 * 4);  // memory stays
  EXPECT_EQ(c.head(1, 1).k.size(), 5u * 4 * sizeof(float));  // bytes of 5 f32 rows
}

// Every head's keys and values are regions of one buffer: the sizes asked for, cache-line
// aligned, disjoint, zeroed; a session-sized cache is in 2 MiB pages where the kernel offers them.
TEST(Cache, HeadsAreDisjointAlignedRegionsOfOneBuffer) {
  const CacheShape shape{3, 2, 64};
  const KvTypes types{KvType::Q8_0, KvType::F16};
  Cache c(shape, {4000, 3000, 5}, {}, types);  // 2.7 MiB
  std::vector<std::pair<uintptr_t, uintptr_t>> regions;
  for (int l = 0; l < shape.n_layers; ++l)
    for (int h = 0; h < shape.n_kv_heads; ++h) {
      const HeadCache& hc = c.head(l, h);
      EXPECT_EQ(hc.k.size(), size_t(c.capacity(l)) * kv_row_bytes(types.k, 64));
      EXPECT_EQ(hc.v.size(), size_t(c.capacity(l)) * kv_row_bytes(types.v, 64));
      for (const auto& s : {hc.k, hc.v}) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(s.data()) % 64, 0u);
        EXPECT_TRUE(std::all_of(s.begin(), s.end(), [](uint8_t b) { return b == 0; }));
        regions.emplace_back(reinterpret_cast<uintptr_t>(s.data()), reinterpret_cast<uintptr_t>(s.data() + s.size()));
      }
    }
  std::sort(regions.begin(), regions.end());
  for (size_t i = 1; i < regions.size(); ++i) EXPECT_LT(regions[i - 1].second, regions[i].first);  // a guard gap between
  const size_t span = regions.back().second - regions.front().first;
  EXPECT_GE(span, size_t(2) << 20);
  const uintptr_t first = regions.front().first;
  if (huge_pages_on_request()) {
    EXPECT_EQ(first % (size_t(2) << 20), 0u) << "a 2 MiB cache should start on a huge page";
  }
#if defined(__SANITIZE_ADDRESS__)  // the gap after a region is poisoned: writing past a head is caught
  uint8_t* past = c.head(1, 0).v.data() + c.head(1, 0).v.size();
  EXPECT_DEATH(*static_cast<volatile uint8_t*>(past) = 1, "AddressSanitizer");
#endif
}

TEST(Cache, AllocatesOnlyRequestedStatistics) {
  Cache none({1, 1, 2}, {3});
  EXPECT_TRUE(none.head(0, 0).attn_sum.empty());
  EXPECT_TRUE(none.head(0, 0).attn_cnt.empty());
  EXPECT_TRUE(none.head(0, 0).attn_last.empty());
  Cache win({1, 1, 2}, {3}, AttentionStats{.window = 4});
  EXPECT_EQ(win.head(0, 0).attn_sum.size(), 3u);
  EXPECT_TRUE(win.head(0, 0).attn_cnt.empty());
  Cache last({1, 1, 2}, {3}, AttentionStats{.last_query = true});
  EXPECT_TRUE(last.head(0, 0).attn_sum.empty());
  EXPECT_EQ(last.head(0, 0).attn_last.size(), 3u);
}

// retain() moves whole runs of kept slots at once: with several gaps, leading kept slots, a
// lone slot and a run at the end, every row and per-slot statistic lands where a slot-by-slot
// copy puts it, and keeping everything changes nothing.
TEST(Cache, RetainMovesRunsOfSlotsWithTheirRowsAndStatistics) {
  std::mt19937 rng(7);
  Cache c({1, 2, 4}, {12}, AttentionStats{.accumulate = true, .last_query = true, .key_scores = true});
  c.set_key_scorer([](int, int, const float* key, int32_t) { return key[0]; });
  append_random(c, 0, 12, 100, rng);
  HeadCache& hc = c.head(0, 1);
  for (int j = 0; j < 12; ++j) hc.attn_sum[j] = 1.0f + j, hc.attn_cnt[j] = 50 + j, hc.attn_last[j] = 0.25f * j;
  const std::vector<float> keys = keys_f32(hc, 4), values = values_f32(hc, 4);
  const std::vector<float> key_score(hc.key_score.begin(), hc.key_score.begin() + 12);
  const std::vector<int> keep{0, 1, 4, 5, 6, 8, 10, 11};
  c.retain(0, 1, keep);
  ASSERT_EQ(hc.n, static_cast<int>(keep.size()));
  const std::vector<float> kept_keys = keys_f32(hc, 4), kept_values = values_f32(hc, 4);
  for (size_t i = 0; i < keep.size(); ++i) {
    const int from = keep[i];
    EXPECT_EQ(hc.pos[i], 100 + from) << i;
    EXPECT_EQ(hc.attn_sum[i], 1.0f + from) << i;
    EXPECT_EQ(hc.attn_cnt[i], 50 + from) << i;
    EXPECT_EQ(hc.attn_last[i], 0.25f * from) << i;
    EXPECT_EQ(hc.key_score[i], key_score[from]) << i;
    for (int e = 0; e < 4; ++e) {
      EXPECT_EQ(kept_keys[i * 4 + e], keys[from * 4 + e]) << i;
      EXPECT_EQ(kept_values[i * 4 + e], values[from * 4 + e]) << i;
    }
  }
  EXPECT_EQ(c.head(0, 0).n, 12);  // the other head is untouched
  const std::vector<int32_t> before = positions(hc);
  std::vector<int> all(hc.n);
  std::iota(all.begin(), all.end(), 0);
  c.retain(0, 1, all);
  EXPECT_EQ(positions(hc), before);
  EXPECT_EQ(keys_f32(hc, 4), kept_keys);
}

TEST(Cache, OverflowThrowsAndLeavesEveryHeadUnchanged) {
  std::mt19937 rng(1);
  Cache c({2, 2, 4}, {8, 5});
  append_random(c, 1, 5, 0, rng);
  EXPECT_THROW(append_random(c, 1, 1, 5, rng), Error);
  EXPECT_EQ(c.head(1, 0).n, 5);
  EXPECT_EQ(c.head(1, 1).n, 5);
  // Ragged layer: head 0 has room, head 1 does not; neither may change.
  append_random(c, 0, 8, 0, rng);
  const int keep[] = {0, 1};
  c.retain(0, 0, keep);
  EXPECT_THROW(append_random(c, 0, 1, 8, rng), Error);
  EXPECT_EQ(c.head(0, 0).n, 2);
  EXPECT_EQ(c.head(0, 1).n, 8);
  try {
    append_random(c, 0, 1, 8, rng);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("kv cache full"), std::string::npos) << e.what();
  }
}

TEST(Cache, BadArgumentsThrow) {
  EXPECT_THROW(Cache({0, 1, 4}, {}), Error);
  EXPECT_THROW(Cache({1, 0, 4}, {4}), Error);
  EXPECT_THROW(Cache({1, 1, 0}, {4}), Error);
  EXPECT_THROW(Cache({2, 1, 4}, {4}), Error);      // one capacity per layer
  EXPECT_THROW(Cache({2, 1, 4}, {4, 0}), Error);   // positive capacities
  std::mt19937 rng(2);
  Cache c({1, 1, 4}, {8});
  append_random(c, 0, 4, 0, rng);
  const int descending[] = {1, 0}, duplicate[] = {1, 1}, outside[] = {4}, negative[] = {-1};
  EXPECT_THROW(c.retain(0, 0, descending), Error);
  EXPECT_THROW(c.retain(0, 0, duplicate), Error);
  EXPECT_THROW(c.retain(0, 0, outside), Error);
  EXPECT_THROW(c.retain(0, 0, negative), Error);
  const int ok[] = {1};
  EXPECT_THROW(c.retain(1, 0, ok), Error);
  EXPECT_THROW(c.retain(0, 1, ok), Error);
  EXPECT_THROW(append_random(c, 1, 1, 9, rng), Error);
  // Positions must keep increasing (attention binary-searches them), within a batch too.
  EXPECT_THROW(append_random(c, 0, 1, 3, rng), Error);
  const float kv[8] = {};
  const int32_t repeated[] = {7, 7};
  EXPECT_THROW(c.append(0, kv, kv, repeated, 2), Error);
  EXPECT_EQ(c.head(0, 0).n, 4);
  append_random(c, 0, 1, 10, rng);  // gaps are fine
  EXPECT_EQ(c.head(0, 0).pos[4], 10);
}

// ---------------------------------------------------------------------------------------------
// Attention: fused, with statistics and the library's reference all match a naive computation
// on ragged heads, for several GQA groupings, head sizes and thread counts.

class AttentionMatch : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(AttentionMatch, RaggedCausalBatches) {
  const auto [group, threads, d] = GetParam();
  const int nkv = 2, n_heads = nkv * group, layer = 1;
  std::mt19937 rng(100 + group * 10 + threads + d);
  Cache c({2, nkv, d}, {128, 128}, AttentionStats{.accumulate = true, .last_query = true});
  append_random(c, 0, 20, 0, rng);  // another layer, must be ignored
  append_random(c, layer, 90, 0, rng);
  // Different token sets per head; head 1 also loses its first 10 tokens so early queries see
  // nothing there.
  thin_head(c, layer, 0, 0.7, rng);
  {
    std::vector<int> keep;
    std::bernoulli_distribution b(0.4);
    for (int j = 10; j < c.head(layer, 1).n; ++j)
      if (b(rng)) keep.push_back(j);
    c.retain(layer, 1, keep);
  }
  ASSERT_NE(positions(c.head(layer, 0)), positions(c.head(layer, 1)));
  append_random(c, layer, 6, 90, rng);  // the batch's own keys

  ThreadPool pool(threads);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  const std::vector<std::vector<int32_t>> batches = {{90, 91, 92, 93, 94, 95}, {3, 47, 200}, {95}};
  for (const auto& qpos : batches) {
    const int n_tok = static_cast<int>(qpos.size());
    std::vector<float> q(size_t(n_tok) * n_heads * d);
    for (auto& x : q) x = nd(rng);
    std::vector<float> o_fused(q.size(), 7.0f), o_stats(q.size(), 7.0f), o_ref(q.size(), 7.0f);
    AttentionArgs a;
    a.layer = layer;
    a.n_heads = n_heads;
    a.scale = 1.0f / std::sqrt(float(d));
    a.n_tok = n_tok;
    a.q = q.data();
    a.q_pos = qpos.data();
    a.out = o_fused.data();
    attend_fused(c, a, pool);
    a.out = o_stats.data();
    attend_with_stats(c, a, pool);
    a.out = o_ref.data();
    attend_reference(c, a);
    for (int t = 0; t < n_tok; ++t)
      for (int h = 0; h < n_heads; ++h) {
        const size_t off = (size_t(t) * n_heads + h) * d;
        const NaiveHead want = naive_head(c, layer, h / group, q.data() + off, qpos[t], a.scale);
        for (int i = 0; i < d; ++i) {
          ASSERT_NEAR(o_fused[off + i], want.out[i], 1e-5) << "fused t=" << t << " h=" << h << " i=" << i;
          ASSERT_NEAR(o_stats[off + i], want.out[i], 1e-5) << "stats t=" << t << " h=" << h << " i=" << i;
          ASSERT_NEAR(o_ref[off + i], want.out[i], 1e-5) << "reference t=" << t << " h=" << h << " i=" << i;
        }
      }
  }
}

INSTANTIATE_TEST_SUITE_P(GroupsThreadsDims, AttentionMatch,
                         ::testing::Combine(::testing::Values(1, 3, 4), ::testing::Values(1, 2, 3),
                                            ::testing::Values(64, 13)));

TEST(AttentionStats, HandComputedSoftmax) {
  // Keys 0 and ln 3 against q = 1: weights 1/4 and 3/4.
  Cache c({1, 1, 1}, {4}, AttentionStats{.accumulate = true, .last_query = true});
  const float k[] = {0.0f, std::log(3.0f)}, v[] = {1.0f, 5.0f};
  const int32_t pos[] = {0, 1};
  c.append(0, k, v, pos, 2);
  const float q = 1.0f;
  const int32_t qp = 1;
  float out = 0;
  AttentionArgs a{.layer = 0, .n_heads = 1, .scale = 1.0f, .n_tok = 1, .q = &q, .q_pos = &qp, .out = &out};
  ThreadPool pool(1);
  attend_with_stats(c, a, pool);
  EXPECT_NEAR(out, 4.0f, 1e-6);
  const HeadCache& hc = c.head(0, 0);
  EXPECT_NEAR(hc.attn_sum[0], 0.25f, 1e-7);
  EXPECT_NEAR(hc.attn_sum[1], 0.75f, 1e-7);
  EXPECT_EQ(hc.attn_cnt[0], 1);
  EXPECT_EQ(hc.attn_cnt[1], 1);
  EXPECT_NEAR(hc.attn_last[0], 0.25f, 1e-7);
  EXPECT_NEAR(hc.attn_last[1], 0.75f, 1e-7);
}

TEST(AttentionStats, MatchBruteForceWeights) {
  const int nkv = 2, group = 3, n_heads = nkv * group, d = 16;
  std::mt19937 rng(7);
  Cache c({1, nkv, d}, {64}, AttentionStats{.accumulate = true, .last_query = true});
  append_random(c, 0, 30, 0, rng);
  thin_head(c, 0, 0, 0.6, rng);
  thin_head(c, 0, 1, 0.8, rng);
  append_random(c, 0, 6, 30, rng);
  ThreadPool pool(2);
  std::normal_distribution<float> nd(0.0f, 2.0f);

  std::vector<std::vector<double>> sum(nkv), last(nkv);
  std::vector<std::vector<int>> cnt(nkv);
  for (int h = 0; h < nkv; ++h) sum[h].assign(c.head(0, h).n, 0.0), cnt[h].assign(c.head(0, h).n, 0);

  // Two calls: a 6-token batch accumulating from position 32, then a one-token decode step.
  auto run = [&](const std::vector<int32_t>& qpos, int32_t from) {
    const int n_tok = int(qpos.size());
    std::vector<float> q(size_t(n_tok) * n_heads * d), out(q.size());
    for (auto& x : q) x = nd(rng);
    AttentionArgs a{.layer = 0, .n_heads = n_heads, .scale = 0.25f, .n_tok = n_tok, .q = q.data(),
                    .q_pos = qpos.data(), .out = out.data(), .accumulate_from_pos = from};
    attend_with_stats(c, a, pool);
    for (int h = 0; h < nkv; ++h) {
      sum[h].resize(c.head(0, h).n, 0.0);
      cnt[h].resize(c.head(0, h).n, 0);
      last[h].assign(c.head(0, h).n, 0.0);
    }
    for (int t = 0; t < n_tok; ++t)
      for (int qh = 0; qh < n_heads; ++qh) {
        const int h = qh / group;
        const NaiveHead w = naive_head(c, 0, h, q.data() + (size_t(t) * n_heads + qh) * d, qpos[t], a.scale);
        for (int j = 0; j < c.head(0, h).n; ++j) {
          if (qpos[t] >= from) sum[h][j] += w.w[j] / group;
          if (t == n_tok - 1) last[h][j] += w.w[j] / group;
          if (qpos[t] >= from && qh % group == 0 && c.head(0, h).pos[j] <= qpos[t]) ++cnt[h][j];
        }
      }
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& hc = c.head(0, h);
      for (int j = 0; j < hc.n; ++j) {
        EXPECT_NEAR(hc.attn_sum[j], sum[h][j], 1e-5) << "h=" << h << " j=" << j;
        EXPECT_EQ(hc.attn_cnt[j], cnt[h][j]) << "h=" << h << " j=" << j;
        EXPECT_NEAR(hc.attn_last[j], last[h][j], 1e-5) << "h=" << h << " j=" << j;
      }
    }
  };
  run({30, 31, 32, 33, 34, 35}, 32);
  append_random(c, 0, 1, 36, rng);
  run({36}, 32);
  // Weights of one query sum to one over its visible keys, so the sums add up to the number of
  // accumulating queries.
  double total = 0;
  for (int j = 0; j < c.head(0, 0).n; ++j) total += c.head(0, 0).attn_sum[j];
  EXPECT_NEAR(total, 5.0, 1e-5);
}

// ---------------------------------------------------------------------------------------------
// Compressor

// A policy that returns preset scores, so eviction can be checked against a brute-force ranking.
class Scripted final : public Policy {
 public:
  explicit Scripted(std::vector<std::vector<float>> s) : s_(std::move(s)) {}
  std::string_view name() const override { return "scripted"; }
  void score_head(const Cache& c, int layer, int h, std::span<float> out) override {
    std::copy(s_[h].begin(), s_[h].begin() + c.head(layer, h).n, out.begin());
  }

 private:
  std::vector<std::vector<float>> s_;
};

// Brute force: sort every older slot by (score descending, NaN last, newer first on ties),
// take the top, add the `keep_recent` newest.
std::vector<int> brute_keep(const std::vector<float>& s, int n, int target, int keep_recent) {
  std::vector<int> all(n);
  std::iota(all.begin(), all.end(), 0);
  if (n <= target) return all;
  std::vector<int> old(all.begin(), all.end() - keep_recent);
  std::sort(old.begin(), old.end(), [&](int a, int b) {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return nb;
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a > b;
  });
  std::vector<int> keep(old.begin(), old.begin() + (target - keep_recent));
  for (int i = n - keep_recent; i < n; ++i) keep.push_back(i);
  std::sort(keep.begin(), keep.end());
  return keep;
}

TEST(Compressor, EvictsExactlyTheTopScoredWithTiesAndWindows) {
  std::mt19937 rng(11);
  const float values[] = {-1.0f, 0.0f, 0.5f, 1.0f, kInf, -kInf, kNaN};
  std::uniform_int_distribution<int> pick(0, 6);
  const int nkv = 3, d = 4;
  for (int trial = 0; trial < 60; ++trial) {
    Cache c({1, nkv, d}, {64});
    append_random(c, 0, 40, 0, rng);
    for (int h = 0; h < nkv; ++h) thin_head(c, 0, h, 0.5 + 0.2 * h, rng);
    std::vector<std::vector<float>> s(nkv);
    for (int h = 0; h < nkv; ++h)
      for (int j = 0; j < c.head(0, h).n; ++j) s[h].push_back(values[pick(rng)]);
    const int target = 1 + trial % 25, keep_recent = std::min(target, trial % 7);
    std::vector<std::vector<int32_t>> want(nkv);
    std::vector<std::vector<uint8_t>> want_k(nkv);
    int64_t evicted = 0;
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& hc = c.head(0, h);
      for (int slot : brute_keep(s[h], hc.n, target, keep_recent)) {
        want[h].push_back(hc.pos[slot]);
        want_k[h].insert(want_k[h].end(), hc.k.begin() + slot * hc.k_row_bytes, hc.k.begin() + (slot + 1) * hc.k_row_bytes);
      }
      evicted += hc.n - int(want[h].size());
    }
    Compressor comp(std::make_unique<Scripted>(s), {}, {});
    comp.compress_layer(c, 0, target, keep_recent);
    for (int h = 0; h < nkv; ++h) {
      const HeadCache& hc = c.head(0, h);
      ASSERT_EQ(positions(hc), want[h]) << "trial " << trial << " head " << h;
      ASSERT_TRUE(std::equal(want_k[h].begin(), want_k[h].end(), hc.k.begin())) << "trial " << trial;
    }
    EXPECT_EQ(comp.stats().evicted, evicted);
  }
}

std::vector<float> random_filters(int n_layers, int nkv, int d, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> f(size_t(n_layers) * nkv * d);
  for (auto& x : f) x = nd(rng);
  return f;
}

// Random queries at the newest n positions through attend_with_stats, so the attention
// policies have real statistics.
void query_with_stats(Cache& c, int layer, int n_heads, int n, int32_t accumulate_from, std::mt19937& rng,
                      ThreadPool& pool) {
  const int d = c.shape().head_dim;
  std::normal_distribution<float> nd(0.0f, 1.5f);
  int32_t newest = 0;
  for (int h = 0; h < c.shape().n_kv_heads; ++h) newest = std::max(newest, c.head(layer, h).pos[c.head(layer, h).n - 1]);
  std::vector<int32_t> qpos(n);
  std::iota(qpos.begin(), qpos.end(), newest + 1 - n);
  std::vector<float> q(size_t(n) * n_heads * d), out(q.size());
  for (auto& x : q) x = nd(rng);
  AttentionArgs a{.layer = layer, .n_heads = n_heads, .scale = 1.0f / std::sqrt(float(d)), .n_tok = n,
                  .q = q.data(), .q_pos = qpos.data(), .out = out.data(), .accumulate_from_pos = accumulate_from};
  attend_with_stats(c, a, pool);
  // expected_attention reads the queries' moments (no rotary embedding in these caches).
  if (!c.query_moments.empty())
    for (int t = 0; t < n; ++t)
      if (qpos[t] >= kQueryMomentSinks)
        c.query_moments[layer].add(q.data() + size_t(t) * n_heads * d, n_heads, d, c.stats().query_recent,
                                   c.stats().query_moments);
}

// Every registered policy, plus layer-consistent variants.
std::vector<std::string> policies_under_test() {
  std::vector<std::string> names;
  for (const auto& n : policy_names())
    if (n != "none") names.push_back(n);
  names.push_back("qfilters+layer");
  names.push_back("expected_attention+layer");
  names.push_back("tova+layer");
  for (const auto& n : query_stats_policy_names()) names.push_back(n);
  names.push_back("qfilters_rope+layer");
  names.push_back("qfilters_adaptive+layer");
  names.push_back("keydiff+layer");
  return names;
}

// Calibrated query statistics of `group` query heads per KV head (the queries the test feeds the
// cache, which qfilters_adaptive's recent queries must match), rank 2, for the policies that need them.
struct RandomQueryStats {
  std::vector<float> mean, factors;
  int group;
  RandomQueryStats(int n_layers, int nkv, int d, int group, std::mt19937& rng) : group(group) {
    mean = random_filters(n_layers, group * nkv, d, rng);
    factors = random_filters(n_layers, group * nkv * 2, d, rng);
  }
  void set(PolicyOptions& o, int nkv) const {
    o.query_mean = mean;
    o.query_factors = factors;
    o.n_query_heads = group * nkv;
    o.stats_rank = 2;
  }
};

TEST(Compressor, EveryPolicyEvictsItsOwnTopScores) {
  const int nkv = 3, group = 3, d = 8, L = 2;
  std::mt19937 rng(21);
  const std::vector<float> filters = random_filters(L, nkv, d, rng);
  const RandomQueryStats stats(L, nkv, d, group, rng);
  PolicyOptions opt;
  opt.seed = 5;
  opt.snapkv_window = 6;
  opt.filters = filters;
  stats.set(opt, nkv);
  ThreadPool pool(2);
  for (const std::string& name : policies_under_test()) {
    SCOPED_TRACE(name);
    for (int trial = 0; trial < 8; ++trial) {
      auto policy = make_policy(name, opt);
      Cache c({L, nkv, d}, {80, 80}, policy->needs(opt));
      c.set_key_scorer(policy->key_scorer(c.shape()));  // as a session does (qfilters, knorm)
      for (int l = 0; l < L; ++l) append_random(c, l, 50, 0, rng);
      for (int h = 0; h < nkv; ++h) thin_head(c, 1, h, 0.6 + 0.1 * h, rng);
      // The thinned heads still end at the same newest tokens, as after a streaming eviction.
      append_random(c, 1, 4, 50, rng);
      query_with_stats(c, 1, nkv * group, c.head(1, 0).n, 40, rng, pool);

      std::vector<std::vector<float>> scores;
      make_policy(name, opt)->score_layer(c, 1, scores);  // same seed: same random draws
      const int target = 10 + 3 * trial, keep_recent = trial % 5;
      std::vector<std::vector<int32_t>> want(nkv);
      for (int h = 0; h < nkv; ++h) {
        ASSERT_EQ(int(scores[h].size()), c.head(1, h).n);
        for (int slot : brute_keep(scores[h], c.head(1, h).n, target, keep_recent))
          want[h].push_back(c.head(1, h).pos[slot]);
      }
      const std::vector<int32_t> layer0 = positions(c.head(0, 0));
      Compressor comp(std::move(policy), opt, {});
      comp.compress_layer(c, 1, target, keep_recent);
      for (int h = 0; h < nkv; ++h) ASSERT_EQ(positions(c.head(1, h)), want[h]) << "trial " << trial << " head " << h;
      EXPECT_EQ(positions(c.head(0, 0)), layer0);
    }
  }
}

TEST(Compressor, BudgetAboveSequenceEvictsNothing) {
  const int nkv = 3, d = 8, L = 2;
  std::mt19937 rng(31);
  const std::vector<float> filters = random_filters(L, nkv, d, rng);
  const RandomQueryStats stats(L, nkv, d, 1, rng);  // one query per KV head below
  PolicyOptions opt;
  opt.filters = filters;
  opt.snapkv_window = 4;
  stats.set(opt, nkv);
  ThreadPool pool(1);
  for (const std::string& name : policies_under_test()) {
    SCOPED_TRACE(name);
    Compressor comp(make_policy(name, opt), opt, {.budget = 200, .window = 8});
    Cache c({L, nkv, d}, {comp.capacity(0, 300, 1), comp.capacity(1, 300, 1)}, comp.needs());
    c.set_key_scorer(comp.policy().key_scorer(c.shape()));
    for (int t = 0; t < 150; ++t)
      for (int l = 0; l < L; ++l) {
        append_random(c, l, 1, t, rng);
        query_with_stats(c, l, nkv, 1, 0, rng, pool);  // the new token's query
        comp.after_step(c);
      }
    EXPECT_EQ(comp.stats().evicted, 0);
    EXPECT_EQ(comp.stats().evictions, 0);
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < nkv; ++h) EXPECT_EQ(c.head(l, h).n, 150);
    comp.after_prefill(c, 150);  // no prefill ratio: no-op
    EXPECT_EQ(c.tokens_held(), 150 * L * nkv);
  }
}

// Per-layer budgets share the uniform total out by the weights of the compressed layers: each
// layer's cache is allocated for its own budget (memory really freed), streaming holds each layer
// at its budget, and prefill keeps each layer's share of the kept tokens.
TEST(Compressor, PerLayerBudgetsShareTheSameTotal) {
  const int nkv = 2, d = 4, L = 4, budget = 20, window = 4, steps = 80;
  std::mt19937 rng(43);
  // Layer 0 is skipped: its weight does not count. Shares of layers 1-3: 0.5, 1, 1.5.
  CompressionConfig cfg{.budget = budget, .window = window, .skip_layers = 1, .layer_weights = {9, 1, 2, 3}};
  cfg.validate(L);
  Compressor comp(make_policy("knorm", {}), {}, cfg);
  EXPECT_DOUBLE_EQ(comp.layer_share(1), 0.5);
  EXPECT_DOUBLE_EQ(comp.layer_share(3), 1.5);
  EXPECT_EQ(comp.layer_budget(1), 10);
  EXPECT_EQ(comp.layer_budget(3), 30);
  std::vector<int> cap;
  for (int l = 0; l < L; ++l) cap.push_back(comp.capacity(l, 1000, 1));
  EXPECT_EQ(cap, (std::vector<int>{1000, 11, 21, 31}));
  Compressor uniform(make_policy("knorm", {}), {}, {.budget = budget, .window = window, .skip_layers = 1});
  Cache c({L, nkv, d}, cap, comp.needs());
  Cache u({L, nkv, d}, {1000, uniform.capacity(1, 1000, 1), uniform.capacity(2, 1000, 1), uniform.capacity(3, 1000, 1)},
          uniform.needs());
  EXPECT_EQ(c.bytes_reserved(), u.bytes_reserved());  // the same memory, shared out differently
  c.set_key_scorer(comp.policy().key_scorer(c.shape()));
  for (int t = 0; t < steps; ++t) {
    for (int l = 0; l < L; ++l) append_random(c, l, 1, t, rng);
    comp.after_step(c);
  }
  for (int h = 0; h < nkv; ++h) {
    EXPECT_EQ(c.head(0, h).n, steps);
    EXPECT_EQ(c.head(1, h).n, 10);
    EXPECT_EQ(c.head(2, h).n, 20);
    EXPECT_EQ(c.head(3, h).n, 30);
  }

  // Prefill: 40 tokens, ratio 0.5: the uniform 20 become 10, 20, 30; a share above what the
  // prompt holds keeps all of it.
  Compressor pre(make_policy("knorm", {}), {}, {.prefill_ratio = 0.5f, .skip_layers = 1, .layer_weights = {1, 1, 2, 3}});
  Compressor greedy(make_policy("knorm", {}), {}, {.prefill_ratio = 0.25f, .skip_layers = 1, .layer_weights = {1, 1, 1, 4}});
  for (Compressor* cp : {&pre, &greedy}) {
    Cache p({L, nkv, d}, {40, 40, 40, 40}, cp->needs());
    p.set_key_scorer(cp->policy().key_scorer(p.shape()));
    for (int l = 0; l < L; ++l) append_random(p, l, 40, 0, rng);
    cp->after_prefill(p, 40);
    const std::vector<int> want = cp == &pre ? std::vector<int>{40, 10, 20, 30} : std::vector<int>{40, 15, 15, 40};
    for (int l = 0; l < L; ++l) EXPECT_EQ(p.head(l, 1).n, want[l]) << "layer " << l;
  }
}

TEST(Compressor, PerLayerWeightsAreChecked) {
  EXPECT_THROW((CompressionConfig{.layer_weights = {1, 2}}.validate(3)), Error);
  EXPECT_THROW((CompressionConfig{.layer_weights = {1, 0, 2}}.validate(3)), Error);
  EXPECT_THROW((CompressionConfig{.layer_weights = {1, -1, 2}}.validate(3)), Error);
  EXPECT_THROW((CompressionConfig{.layer_weights = {1, NAN, 2}}.validate(3)), Error);
  EXPECT_NO_THROW((CompressionConfig{.layer_weights = {1, 0.5f, 2}}.validate(3)));
}

TEST(Compressor, StreamingKeepsBudgetWindowAndSkippedLayers) {
  const int nkv = 2, d = 4, L = 3, budget = 16, window = 4, every = 3, steps = 100;
  std::mt19937 rng(41);
  CompressionConfig cfg{.budget = budget, .window = window, .evict_every = every, .skip_layers = 1};
  cfg.validate(L);
  Compressor comp(make_policy("knorm", {}), {}, cfg);
  EXPECT_EQ(comp.capacity(0, 1000, 1), 1000);
  EXPECT_EQ(comp.capacity(1, 1000, 1), budget + 1);
  EXPECT_EQ(comp.capacity(2, 10, 1), 10);
  Cache c({L, nkv, d}, {comp.capacity(0, 1000, 1), comp.capacity(1, 1000, 1), comp.capacity(2, 1000, 1)});
  int64_t rounds = 0;
  for (int t = 0; t < steps; ++t) {
    for (int l = 0; l < L; ++l) append_random(c, l, 1, t, rng);
    const bool over = c.head(1, 0).n > budget;
    comp.after_step(c);
    rounds += over;
    for (int l = 1; l < L; ++l)
      for (int h = 0; h < nkv; ++h) {
        const HeadCache& hc = c.head(l, h);
        ASSERT_LE(hc.n, budget);
        if (over) {
          ASSERT_EQ(hc.n, budget - every + 1);
        }
        for (int i = 0; i < std::min(window, t + 1); ++i) ASSERT_EQ(hc.pos[hc.n - 1 - i], t - i);
      }
  }
  EXPECT_EQ(c.head(0, 0).n, steps);
  EXPECT_EQ(comp.stats().evictions, rounds * (L - 1));
  EXPECT_EQ(comp.stats().evicted, int64_t(steps) * L * nkv - c.tokens_held());
  EXPECT_GT(rounds, 0);
}

TEST(Compressor, PrefillKeepsRatioAndWindow) {
  const int nkv = 2, d = 4;
  std::mt19937 rng(51);
  Compressor comp(make_policy("knorm", {}), {}, {.window = 5, .prefill_ratio = 0.25f});
  Cache c({1, nkv, d}, {comp.capacity(0, 128, 100)});
  append_random(c, 0, 100, 0, rng);
  std::vector<std::vector<float>> s;
  make_policy("knorm", {})->score_layer(c, 0, s);
  std::vector<std::vector<int32_t>> want(nkv);
  for (int h = 0; h < nkv; ++h)
    for (int slot : brute_keep(s[h], 100, 75, 5)) want[h].push_back(c.head(0, h).pos[slot]);
  comp.after_prefill(c, 100);
  for (int h = 0; h < nkv; ++h) {
    EXPECT_EQ(c.head(0, h).n, 75);
    EXPECT_EQ(positions(c.head(0, h)), want[h]);
    EXPECT_EQ(c.head(0, h).pos[74], 99);
  }
}

TEST(Compressor, SnapKVObservationRestartsAfterEachRound) {
  std::mt19937 rng(61);
  PolicyOptions opt;
  opt.snapkv_window = 4;
  Compressor comp(make_policy("snapkv", opt), opt, {});
  Cache c({2, 2, 4}, {32, 32}, comp.needs());
  for (int l = 0; l < 2; ++l) {
    append_random(c, l, 20, 0, rng);
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 20; ++j) c.head(l, h).attn_sum[j] = 1.0f + j;
  }
  comp.compress_layer(c, 1, 12, 2);
  for (int h = 0; h < 2; ++h) {
    for (int j = 0; j < c.head(1, h).n; ++j) EXPECT_EQ(c.head(1, h).attn_sum[j], 0.0f);
    EXPECT_EQ(c.head(0, h).attn_sum[5], 6.0f);  // other layers keep observing
  }
}

TEST(Compressor, BadArgumentsThrow) {
  EXPECT_THROW(Compressor(nullptr, {}, {}), Error);
  Compressor comp(make_policy("knorm", {}), {}, {});
  Cache c({1, 1, 4}, {8});
  EXPECT_THROW(comp.compress_layer(c, 0, 2, 3), Error);

  CompressionConfig ok{.budget = 128, .window = 64, .evict_every = 64, .skip_layers = 2};
  EXPECT_NO_THROW(ok.validate(30));
  EXPECT_NO_THROW(CompressionConfig{}.validate(30));
  EXPECT_NO_THROW(CompressionConfig{.prefill_ratio = 0.5f}.validate(30));
  const CompressionConfig bad[] = {
      {.budget = -1},
      {.budget = 64, .window = 64},                      // window >= budget
      {.budget = 64, .window = 100},
      {.window = -1},
      {.budget = 64, .window = 8, .evict_every = 0},
      {.budget = 64, .window = 8, .evict_every = 57},    // more than budget - window
      {.prefill_ratio = 1.0f},
      {.prefill_ratio = -0.1f},
      {.prefill_ratio = kNaN},
      {.skip_layers = -1},
      {.skip_layers = 31},
  };
  for (const auto& cfg : bad) EXPECT_THROW(cfg.validate(30), Error) << cfg.budget << " " << cfg.window;
}

}  // namespace
}  // namespace qf::kv
