// Cost of one decode step's attention in one layer (SmolLM2-135M shape: 9 query heads, 3 KV
// heads, head_dim 64), fused vs with the statistics attention-based policies need, and the cost
// of one streaming eviction round per policy at budget 512: scoring alone (BM_Score) and the
// whole round (BM_ScoreAndEvict: score + select + compact). One thread, so the numbers are
// per-core work; multiply by the compressed layers for a whole decode step. BM_ScoreTypes:
// qfilters and knorm scoring keys stored as each KV type (f32, f16, bf16, q8_0, q4_0). Read CPU
// time on a shared machine. BM_ObserveQueries: the per-token query bookkeeping of the policies
// that read query moments.
#include <benchmark/benchmark.h>

#include <cmath>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "kv/compressor.h"
#include "kv/policy.h"
#include "tensor/threadpool.h"

namespace {

using namespace qf;
using namespace qf::kv;

constexpr int kHeads = 9, kKvHeads = 3, kDim = 64;

void fill(Cache& c, int n, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> k(size_t(n) * kKvHeads * kDim), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int32_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  c.append(0, k.data(), v.data(), pos.data(), n);
}

struct DecodeQuery {
  std::vector<float> q, out;
  int32_t pos;
  AttentionArgs args() {
    return {.layer = 0, .n_heads = kHeads, .scale = 0.125f, .n_tok = 1, .q = q.data(), .q_pos = &pos, .out = out.data()};
  }
};

DecodeQuery make_query(int32_t pos, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  DecodeQuery d{std::vector<float>(kHeads * kDim), std::vector<float>(kHeads * kDim), pos};
  for (auto& x : d.q) x = nd(rng);
  return d;
}

// Args: cached tokens.
void BM_AttendFused(benchmark::State& state) {
  const int n = int(state.range(0));
  std::mt19937 rng(1);
  Cache c({1, kKvHeads, kDim}, {n});
  fill(c, n, rng);
  DecodeQuery dq = make_query(n - 1, rng);
  ThreadPool pool(1);
  const AttentionArgs a = dq.args();
  for (auto _ : state) {
    attend_fused(c, a, pool);
    benchmark::DoNotOptimize(dq.out.data());
  }
}
BENCHMARK(BM_AttendFused)->Arg(512)->Arg(8192)->Unit(benchmark::kMicrosecond);

// Args: cached tokens; statistics of 0 snapkv (window sum), 1 tova (last query), 2 h2o
// (sum + count).
void BM_AttendWithStats(benchmark::State& state) {
  const int n = int(state.range(0));
  const int kind = int(state.range(1));
  const AttentionStats st = kind == 0   ? AttentionStats{.window = 64}
                            : kind == 1 ? AttentionStats{.last_query = true}
                                        : AttentionStats{.accumulate = true};
  state.SetLabel(kind == 0 ? "snapkv" : kind == 1 ? "tova" : "h2o");
  std::mt19937 rng(1);
  Cache c({1, kKvHeads, kDim}, {n}, st);
  fill(c, n, rng);
  DecodeQuery dq = make_query(n - 1, rng);
  ThreadPool pool(1);
  const AttentionArgs a = dq.args();
  for (auto _ : state) {
    attend_with_stats(c, a, pool);
    benchmark::DoNotOptimize(dq.out.data());
  }
}
BENCHMARK(BM_AttendWithStats)->ArgsProduct({{512, 8192}, {0, 1, 2}})->Unit(benchmark::kMicrosecond);

const std::vector<std::string>& bench_policies() {
  static const std::vector<std::string> names = {"qfilters", "knorm",           "streaming",          "random",
                                                 "snapkv",   "tova",            "h2o",                "expected_attention",
                                                 "qfilters+layer", "expected_attention+layer",
                                                 "qfilters_rope",  "ea_calibrated",   "qfilters_rope+layer",
                                                 "qfilters_adaptive", "qfilters_adaptive+layer", "keydiff",
                                                 "qfilters_max"};
  return names;
}

// A cache of one layer holding budget + 1 tokens per head (the state after a decode step's
// append), with the statistics the policy needs set to plausible values.
struct RoundSetup {
  static constexpr int kBudget = 512, kWindow = 64;
  std::vector<float> filters = std::vector<float>(kKvHeads * kDim);
  // qfilters_rope, ea_calibrated: calibrated query statistics of rank 8 (what qf calibrate stores).
  static constexpr int kStatsRank = 8;
  std::vector<float> query_mean = std::vector<float>(kHeads * kDim),
                     query_factors = std::vector<float>(kHeads * kStatsRank * kDim);
  PolicyOptions opt;
  std::unique_ptr<Compressor> comp;
  std::unique_ptr<Cache> cache;
  std::vector<float> k = std::vector<float>(kKvHeads * kDim), v = std::vector<float>(kKvHeads * kDim);

  explicit RoundSetup(const std::string& name, KvTypes types = {}) {
    std::mt19937 rng(2);
    std::normal_distribution<float> nd;
    for (auto& x : filters) x = nd(rng);
    opt.filters = filters;
    for (auto& x : query_mean) x = nd(rng);
    for (auto& x : query_factors) x = nd(rng) * 0.3f;
    opt.query_mean = query_mean;
    opt.query_factors = query_factors;
    opt.n_query_heads = kHeads;
    opt.stats_rank = kStatsRank;
    opt.seed = 3;
    comp = std::make_unique<Compressor>(make_policy(name, opt), opt, CompressionConfig{.budget = kBudget, .window = kWindow});
    cache = std::make_unique<Cache>(CacheShape{1, kKvHeads, kDim}, std::vector<int>{comp->capacity(0, 1 << 30, 1)}, comp->needs(),
                                    types);
    cache->set_key_scorer(comp->policy().key_scorer(cache->shape()));  // as a session does (qfilters, knorm)
    fill(*cache, kBudget + 1, rng);
    std::uniform_real_distribution<float> u(0.0f, 0.01f);
    for (int h = 0; h < kKvHeads; ++h) {
      HeadCache& hc = cache->head(0, h);
      for (int j = 0; j < hc.n; ++j) {
        if (!hc.attn_sum.empty()) hc.attn_sum[j] = u(rng);
        if (!hc.attn_cnt.empty()) hc.attn_cnt[j] = kBudget + 1 - j;
        if (!hc.attn_last.empty()) hc.attn_last[j] = u(rng);
      }
    }
    // Llama's rotary (a session always sets it): the query-statistics policies move their moments.
    cache->rope.n_rot = kDim;
    cache->rope.inv_freq.assign(1, std::vector<double>(kDim / 2));
    for (int i = 0; i < kDim / 2; ++i) cache->rope.inv_freq[0][i] = std::pow(10000.0, -2.0 * i / kDim);
    if (!cache->query_moments.empty()) {  // expected_attention, qfilters_adaptive: earlier queries
      std::vector<float> q(kHeads * kDim);
      for (int t = 0; t < kBudget; ++t) {
        for (auto& x : q) x = nd(rng);
        cache->query_moments[0].add(q.data(), kHeads, kDim, cache->stats().query_recent, cache->stats().query_moments);
      }
    }
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
  }
};

// Scoring alone: every KV head of one layer at budget + 1 tokens. Args: policy index.
void BM_Score(benchmark::State& state) {
  const std::string& name = bench_policies()[state.range(0)];
  state.SetLabel(name);
  RoundSetup s(name);
  auto policy = make_policy(name, s.opt);
  std::vector<std::vector<float>> scores;
  for (auto _ : state) {
    policy->score_layer(*s.cache, 0, scores);
    benchmark::DoNotOptimize(scores.data());
  }
}
BENCHMARK(BM_Score)->DenseRange(0, 16)->Unit(benchmark::kMicrosecond);

// Scoring from stored keys of each type. Args: 0 qfilters / 1 knorm, KV type index (kv_types()).
void BM_ScoreTypes(benchmark::State& state) {
  const std::string name = state.range(0) == 0 ? "qfilters" : "knorm";
  const KvType type = kv_types()[state.range(1)];
  state.SetLabel(name + " " + std::string(kv_type_name(type)));
  RoundSetup s(name, {type, type});
  auto policy = make_policy(name, s.opt);
  std::vector<std::vector<float>> scores;
  for (auto _ : state) {
    policy->score_layer(*s.cache, 0, scores);
    benchmark::DoNotOptimize(scores.data());
  }
}
BENCHMARK(BM_ScoreTypes)->ArgsProduct({{0, 1}, {0, 1, 2, 3, 4}})->Unit(benchmark::kMicrosecond);

// One streaming round in one layer at budget 512, window 64, evict_every 1: score the 513
// cached tokens of each KV head, evict one, compact; then append the next token (a memcpy of
// 3 x 64 x 2 floats). Args: policy index.
void ScoreAndEvict(benchmark::State& state, KvTypes types) {
  const std::string& name = bench_policies()[state.range(0)];
  state.SetLabel(name);
  RoundSetup s(name, types);
  int32_t pos = RoundSetup::kBudget + 1;
  for (auto _ : state) {
    s.comp->after_step(*s.cache);
    s.cache->append(0, s.k.data(), s.v.data(), &pos, 1);
    ++pos;
  }
  if (s.comp->stats().evictions != state.iterations()) state.SkipWithError("expected one eviction per step");
}
void BM_ScoreAndEvict(benchmark::State& state) { ScoreAndEvict(state, {}); }
BENCHMARK(BM_ScoreAndEvict)->DenseRange(0, 16)->Unit(benchmark::kMicrosecond);
// The same round with keys and values stored as f16, the CLI's and server's default.
void BM_ScoreAndEvictF16(benchmark::State& state) { ScoreAndEvict(state, {KvType::F16, KvType::F16}); }
BENCHMARK(BM_ScoreAndEvictF16)->DenseRange(0, 16)->Unit(benchmark::kMicrosecond);

// What the query-reading policies add to every decode step of one layer, eviction or not: one
// token's 9 queries added to the sums and outer products (expected_attention) or to the recent
// queries (qfilters_adaptive). Args: 0 moments, 1 recent queries only.
void BM_ObserveQueries(benchmark::State& state) {
  const bool recent = state.range(0) == 1;
  state.SetLabel(recent ? "qfilters_adaptive: recent queries" : "expected_attention: moments");
  std::mt19937 rng(4);
  std::normal_distribution<float> nd;
  std::vector<float> q(kHeads * kDim);
  for (auto& x : q) x = nd(rng);
  QueryMoments m;
  for (auto _ : state) {
    m.add(q.data(), kHeads, kDim, recent ? 16 : 0, !recent);
    benchmark::DoNotOptimize(m.recent.data());
    benchmark::DoNotOptimize(m.sum.data());
  }
}
BENCHMARK(BM_ObserveQueries)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

}  // namespace
