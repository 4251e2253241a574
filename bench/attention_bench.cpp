// Attention kernels on the SmolLM2-135M shape (9 query heads over 3 KV heads, head_dim 64):
//
//   BM_Prefill/<context>/<threads>/<kernel>: the last 256-token chunk of a causal prefill of
//     <context> tokens (the chunk's queries against all keys up to each one's position), i.e.
//     one layer's attention work for the most expensive chunk. kernel 0 = per-token kernel
//     (attention_group_f32 per token and KV head, the pre-tiling code path), 1 = attention_f32
//     (tiled blocks for many tokens). tok/s counts the chunk's tokens.
//   BM_Decode/<context>/<kernel>: one token against <context> keys, one thread.
//   BM_PrefillStats/<context>/<threads>/<mode>: the BM_Prefill chunk through
//     attention_stats_f32 (what attend_with_stats runs for snapkv / tova / h2o): mode 0 =
//     attention_f32 alone for comparison, 1 = every token's weights summed (h2o), 2 = the last
//     32 tokens' (snapkv's window), 3 = the last token's only (tova).
//   BM_DecodeStats/<context>/<mode>: one token, one thread; mode 0 = attention_f32, 1 = with
//     sums and last-query weights (h2o + tova).
//
//   BM_DecodeTypes/<context>/<pair>, BM_PrefillTypes/<context>/<pair>: BM_Decode (kernel 1) and
//     BM_Prefill (tiled, 1 thread) with keys and values stored as a KV type pair: 0 f32/f32,
//     1 f16/f16, 2 bf16/bf16, 3 q8_0/q8_0, 4 q8_0/f16, 5 q4_0/q4_0 (label = the pair).
//     BM_DecodeStatsTypes/<context>/<pair>: BM_DecodeStats mode 1 on a type pair.
//   BM_BatchedStep/<sessions>/<pair>: the attention of one batched decode step, every layer of
//     <sessions> compressed sessions (520 keys per KV head) on one thread, KV from memory.
//
// QF_SIMD_TARGET=avx2|avx512|scalar selects a lower SIMD target. Read CPU time on a shared machine.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kv/cache.h"
#include "tensor/attention_kernel.h"
#include "tensor/threadpool.h"

namespace {

using namespace qf;

constexpr int kHeads = 9, kKvHeads = 3, kDim = 64, kChunk = 256;

struct Layer {
  std::vector<float> q, out;
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<int>> visible;
  std::vector<AttentionKv> heads;
  int n_tok;
};

// n_tok queries at positions [context - n_tok, context) over `context` keys per KV head.
Layer make_layer(int context, int n_tok) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  Layer l;
  l.n_tok = n_tok;
  l.q.resize(size_t(n_tok) * kHeads * kDim);
  l.out.resize(l.q.size());
  for (auto& x : l.q) x = nd(rng);
  for (int g = 0; g < kKvHeads; ++g) {
    std::vector<float> k(size_t(context) * kDim), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    std::vector<int> vis(n_tok);
    for (int t = 0; t < n_tok; ++t) vis[t] = context - n_tok + t + 1;
    l.k.push_back(std::move(k));
    l.v.push_back(std::move(v));
    l.visible.push_back(std::move(vis));
  }
  for (int g = 0; g < kKvHeads; ++g) l.heads.push_back({f32_rows(l.k[g].data(), kDim), f32_rows(l.v[g].data(), kDim), l.visible[g].data()});
  return l;
}

void run(Layer& l, int kernel, ThreadPool& pool) {
  const float scale = 1.0f / std::sqrt(float(kDim));
  if (kernel == 1) {
    attention_f32(l.q.data(), l.n_tok, kHeads, l.heads.data(), kKvHeads, kDim, scale, l.out.data(), pool);
    return;
  }
  const int group = kHeads / kKvHeads;
  pool.parallel_for(int64_t(l.n_tok) * kKvHeads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int t = int(i / kKvHeads), g = int(i % kKvHeads);
      const size_t off = (size_t(t) * kHeads + size_t(g) * group) * kDim;
      attention_group_f32(l.q.data() + off, group, l.k[g].data(), l.v[g].data(), l.visible[g][t], kDim, scale,
                          l.out.data() + off);
    }
  });
}

void BM_Prefill(benchmark::State& state) {
  const int context = int(state.range(0)), threads = int(state.range(1)), kernel = int(state.range(2));
  Layer l = make_layer(context, std::min(kChunk, context));
  ThreadPool pool(threads);
  for (auto _ : state) {
    run(l, kernel, pool);
    benchmark::DoNotOptimize(l.out.data());
  }
  state.SetLabel(kernel == 0 ? "per-token" : "tiled");
  state.counters["tok/s"] = benchmark::Counter(double(l.n_tok) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Prefill)
    ->ArgsProduct({{512, 2048, 8192}, {1, 2}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_Decode(benchmark::State& state) {
  const int context = int(state.range(0)), kernel = int(state.range(1));
  Layer l = make_layer(context, 1);
  ThreadPool pool(1);
  for (auto _ : state) {
    run(l, kernel, pool);
    benchmark::DoNotOptimize(l.out.data());
  }
  state.SetLabel(kernel == 0 ? "per-token" : "attention_f32");
}
BENCHMARK(BM_Decode)->ArgsProduct({{512, 8192}, {0, 1}})->Unit(benchmark::kMicrosecond);

struct Stats {
  std::vector<std::vector<float>> sum, last;
  std::vector<std::vector<int32_t>> cnt;
  std::vector<AttentionColumns> cols;
  std::vector<uint8_t> counted;
};

Stats make_stats(const Layer& l, int context, int mode) {
  Stats s;
  s.counted.assign(l.n_tok, 0);
  for (int t = 0; t < l.n_tok; ++t) s.counted[t] = mode == 1 || (mode == 2 && t >= l.n_tok - 32);
  for (int g = 0; g < kKvHeads; ++g) {
    s.sum.emplace_back(context, 0.0f);
    s.last.emplace_back(context, 0.0f);
    s.cnt.emplace_back(context, 0);
    s.cols.push_back({context, s.sum[g].data(), mode == 1 ? s.cnt[g].data() : nullptr,
                      mode == 3 ? s.last[g].data() : nullptr});
  }
  return s;
}

void run_stats(Layer& l, Stats& s, int mode, ThreadPool& pool) {
  const float scale = 1.0f / std::sqrt(float(kDim));
  if (mode == 0)
    attention_f32(l.q.data(), l.n_tok, kHeads, l.heads.data(), kKvHeads, kDim, scale, l.out.data(), pool);
  else
    attention_stats_f32(l.q.data(), l.n_tok, kHeads, l.heads.data(), kKvHeads, kDim, scale, s.counted.data(),
                        s.cols.data(), l.out.data(), pool);
}

void BM_PrefillStats(benchmark::State& state) {
  const int context = int(state.range(0)), threads = int(state.range(1)), mode = int(state.range(2));
  Layer l = make_layer(context, std::min(kChunk, context));
  Stats s = make_stats(l, context, mode);
  ThreadPool pool(threads);
  for (auto _ : state) {
    run_stats(l, s, mode, pool);
    benchmark::DoNotOptimize(l.out.data());
  }
  const char* labels[] = {"attention_f32", "stats all", "stats last 32", "stats last"};
  state.SetLabel(labels[mode]);
  state.counters["tok/s"] = benchmark::Counter(double(l.n_tok) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PrefillStats)
    ->ArgsProduct({{512, 2048, 8192}, {1, 2}, {0, 1, 2, 3}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_DecodeStats(benchmark::State& state) {
  const int context = int(state.range(0)), mode = int(state.range(1));
  Layer l = make_layer(context, 1);
  Stats s = make_stats(l, context, mode);
  if (mode == 1)
    for (int g = 0; g < kKvHeads; ++g) s.cols[g].cnt = s.cnt[g].data(), s.cols[g].last = s.last[g].data();
  ThreadPool pool(1);
  for (auto _ : state) {
    run_stats(l, s, mode, pool);
    benchmark::DoNotOptimize(l.out.data());
  }
  state.SetLabel(mode == 0 ? "attention_f32" : "stats");
}
BENCHMARK(BM_DecodeStats)->ArgsProduct({{288, 512, 8192}, {0, 1}})->Unit(benchmark::kMicrosecond);

// Small batches (speculative / short chunks): where the tiled kernel starts to pay.
// Args: tokens, kernel (0 per-token, 2 tiled forced via a one-block call).
void BM_SmallBatch(benchmark::State& state) {
  const int n_tok = int(state.range(0)), kernel = int(state.range(1));
  const int context = 2048;
  Layer l = make_layer(context, n_tok);
  ThreadPool pool(1);
  const float scale = 1.0f / std::sqrt(float(kDim));
  const int group = kHeads / kKvHeads;
  for (auto _ : state) {
    if (kernel == 0) {
      run(l, 0, pool);
    } else {
      for (int g = 0; g < kKvHeads; ++g) {
        const size_t off = size_t(g) * group * kDim, stride = size_t(kHeads) * kDim;
        attention_block_f32(l.q.data() + off, stride, n_tok, group, l.k[g].data(), l.v[g].data(), l.visible[g].data(),
                            kDim, scale, l.out.data() + off, stride);
      }
    }
    benchmark::DoNotOptimize(l.out.data());
  }
  state.SetLabel(kernel == 0 ? "per-token" : "tiled");
}
// ---------------------------------------------------------------------------------------------
// KV storage types.

const kv::KvTypes kPairs[] = {{kv::KvType::F32, kv::KvType::F32},   {kv::KvType::F16, kv::KvType::F16},
                              {kv::KvType::BF16, kv::KvType::BF16}, {kv::KvType::Q8_0, kv::KvType::Q8_0},
                              {kv::KvType::Q8_0, kv::KvType::F16},  {kv::KvType::Q4_0, kv::KvType::Q4_0}};

// A Layer's keys and values stored as a type pair (the cache's own conversion).
struct TypedLayer {
  Layer l;
  std::vector<std::vector<uint8_t>> k, v;
  std::string label;
};

std::vector<uint8_t> store(kv::KvType t, const std::vector<float>& rows) {
  const size_t n = rows.size() / kDim, rb = kv::kv_row_bytes(t, kDim);
  std::vector<uint8_t> out(n * rb);
  for (size_t j = 0; j < n; ++j) kv::kv_quantize_row(t, rows.data() + j * kDim, kDim, out.data() + j * rb);
  return out;
}

TypedLayer make_typed(int context, int n_tok, int pair) {
  const kv::KvTypes types = kPairs[pair];
  TypedLayer t{make_layer(context, n_tok), {}, {},
               std::string(kv::kv_type_name(types.k)) + "/" + std::string(kv::kv_type_name(types.v))};
  for (int g = 0; g < kKvHeads; ++g) {
    t.k.push_back(store(types.k, t.l.k[g]));
    t.v.push_back(store(types.v, t.l.v[g]));
    t.l.heads[g].k = {types.k, t.k[g].data(), kv::kv_row_bytes(types.k, kDim)};
    t.l.heads[g].v = {types.v, t.v[g].data(), kv::kv_row_bytes(types.v, kDim)};
  }
  return t;
}

void BM_DecodeTypes(benchmark::State& state) {
  TypedLayer t = make_typed(int(state.range(0)), 1, int(state.range(1)));
  ThreadPool pool(1);
  for (auto _ : state) {
    run(t.l, 1, pool);
    benchmark::DoNotOptimize(t.l.out.data());
  }
  state.SetLabel(t.label);
}
BENCHMARK(BM_DecodeTypes)->ArgsProduct({{512, 8192}, {0, 1, 2, 3, 4, 5}})->Unit(benchmark::kMicrosecond);

void BM_PrefillTypes(benchmark::State& state) {
  const int context = int(state.range(0));
  TypedLayer t = make_typed(context, std::min(kChunk, context), int(state.range(1)));
  ThreadPool pool(1);
  for (auto _ : state) {
    run(t.l, 1, pool);
    benchmark::DoNotOptimize(t.l.out.data());
  }
  state.SetLabel(t.label);
  state.counters["tok/s"] = benchmark::Counter(double(t.l.n_tok) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PrefillTypes)->ArgsProduct({{2048, 8192}, {0, 1, 3, 5}})->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_DecodeStatsTypes(benchmark::State& state) {
  const int context = int(state.range(0));
  TypedLayer t = make_typed(context, 1, int(state.range(1)));
  Stats s = make_stats(t.l, context, 1);
  for (int g = 0; g < kKvHeads; ++g) s.cols[g].last = s.last[g].data();
  ThreadPool pool(1);
  for (auto _ : state) {
    run_stats(t.l, s, 1, pool);
    benchmark::DoNotOptimize(t.l.out.data());
  }
  state.SetLabel(t.label);
}
BENCHMARK(BM_DecodeStatsTypes)->ArgsProduct({{512, 8192}, {0, 1, 3, 5}})->Unit(benchmark::kMicrosecond);

// The attention of one batched decode step: <sessions> sessions x 30 layers, each session's
// layer one token against 520 keys per KV head (qfilters B=512 plus slack) stored as type pair
// <pair>, every layer one attention_f32_many call over all sessions (what Forward runs), one
// thread. At 16 sessions the keys and values (192 MB in f16) do not fit the caches, as in the
// server: this measures the kernel streaming from memory, which BM_DecodeTypes (one layer,
// cache-resident) does not.
void BM_BatchedStep(benchmark::State& state) {
  constexpr int kLayers = 30, kKeys = 520;
  const int sessions = int(state.range(0)), pair = int(state.range(1));
  std::vector<TypedLayer> layers;  // [layer][session]
  layers.reserve(size_t(kLayers) * sessions);
  for (int i = 0; i < kLayers * sessions; ++i) {
    layers.push_back(make_typed(kKeys, 1, pair));
    if (pair != 0)  // the typed copies are what the kernel reads: drop the f32 rows
      for (int g = 0; g < kKvHeads; ++g) std::vector<float>().swap(layers.back().l.k[g]), std::vector<float>().swap(layers.back().l.v[g]);
  }
  const float scale = 1.0f / std::sqrt(float(kDim));
  std::vector<AttentionCall> calls(sessions);
  ThreadPool pool(1);
  for (auto _ : state) {
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int s = 0; s < sessions; ++s) {
        Layer& l = layers[size_t(layer) * sessions + s].l;
        calls[s] = {l.q.data(), 1, kHeads, l.heads.data(), kKvHeads, kDim, scale, l.out.data()};
      }
      attention_f32_many(calls.data(), sessions, pool);
    }
    benchmark::DoNotOptimize(calls.data());
  }
  state.SetLabel(layers[0].label);
  state.counters["sessions/s"] = benchmark::Counter(double(sessions) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_BatchedStep)->ArgsProduct({{1, 16}, {1, 3}})->Unit(benchmark::kMillisecond);

BENCHMARK(BM_SmallBatch)->ArgsProduct({{1, 2, 3, 4, 6, 8}, {0, 1}})->Unit(benchmark::kMicrosecond);

}  // namespace
