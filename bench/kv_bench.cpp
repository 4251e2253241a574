// Cost of one decode step's attention in one layer (SmolLM2-135M shape: 9 query heads, 3 KV
// heads, head_dim 64), fused vs with the statistics attention-based policies need, and the cost
// of one streaming eviction round (score + select + compact) per policy at budget 512.
// One thread, so the numbers are per-core work; multiply by 30 layers for a whole step.
#include <benchmark/benchmark.h>

#include <cmath>
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
  static const std::vector<std::string> names = {"qfilters", "knorm", "streaming", "random", "snapkv", "tova", "h2o"};
  return names;
}

// One streaming round in one layer at budget 512, window 64, evict_every 1: append the new
// token, then score the 513 cached tokens of each KV head and evict one. Args: policy index.
void BM_ScoreAndEvict(benchmark::State& state) {
  const std::string& name = bench_policies()[state.range(0)];
  state.SetLabel(name);
  constexpr int kBudget = 512, kWindow = 64;
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  std::vector<float> filters(kKvHeads * kDim);
  for (auto& x : filters) x = nd(rng);
  PolicyOptions opt;
  opt.filters = filters;
  opt.seed = 3;
  Compressor comp(make_policy(name, opt), opt, {.budget = kBudget, .window = kWindow});
  Cache c({1, kKvHeads, kDim}, {comp.capacity(0, 1 << 30, 1)}, comp.needs());
  fill(c, kBudget, rng);
  // Plausible statistics so the selection is not on a constant score.
  std::uniform_real_distribution<float> u(0.0f, 0.01f);
  for (int h = 0; h < kKvHeads; ++h) {
    HeadCache& hc = c.head(0, h);
    for (int j = 0; j < hc.n; ++j) {
      if (!hc.attn_sum.empty()) hc.attn_sum[j] = u(rng);
      if (!hc.attn_cnt.empty()) hc.attn_cnt[j] = kBudget - j;
      if (!hc.attn_last.empty()) hc.attn_last[j] = u(rng);
    }
  }
  std::vector<float> k(kKvHeads * kDim), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  int32_t pos = kBudget;
  for (auto _ : state) {
    c.append(0, k.data(), v.data(), &pos, 1);
    ++pos;
    comp.after_step(c);
  }
  const double it = double(state.iterations());
  state.counters["score_us"] = comp.stats().score_seconds / it * 1e6;
  state.counters["evict_us"] = comp.stats().evict_seconds / it * 1e6;
  if (comp.stats().evictions != state.iterations()) state.SkipWithError("expected one eviction per step");
}
BENCHMARK(BM_ScoreAndEvict)->DenseRange(0, 6)->Unit(benchmark::kMicrosecond);

}  // namespace
