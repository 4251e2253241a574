// When and how much to evict. Two modes, usable together:
//  - streaming (generation): a head holds at most `budget` tokens between steps; the newest
//    `window` tokens are always kept; once a head exceeds the budget, the lowest-scored older
//    tokens go, `evict_every` at a time so the scoring cost is amortised;
//  - prefill: after the prompt, each head keeps int(T * (1 - ratio)) of its T prompt tokens by
//    top score (kvpress ScorerPress semantics).
// The first `skip_layers` layers are never compressed, nor the exempt ones (sliding-window
// layers, whose window already bounds them). Per-layer budgets (layer_weights) share the same
// total out unevenly: compressed layer l gets budget x w_l / mean(w) (streaming; its cache is
// allocated for that many, so memory is really freed) or keeps that multiple of the prefill's
// kept tokens, the mean taken over the compressed layers.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kv/cache.h"
#include "kv/policy.h"

namespace qf::kv {

struct CompressionConfig {
  int budget = 0;           // 0: no streaming cap
  int window = 0;           // newest tokens always kept (streaming)
  int evict_every = 1;      // streaming eviction granularity
  float prefill_ratio = 0;  // 0: no prefill compression; else in (0, 1)
  int skip_layers = 0;
  std::vector<float> layer_weights{};  // empty: the same budget / ratio for every compressed layer
  bool enabled() const { return budget > 0 || prefill_ratio > 0; }
  // Throws qf::Error on inconsistent settings (window >= budget, ratio outside [0, 1), ...).
  void validate(int n_layers) const;
};

struct CompressionStats {
  int64_t evicted = 0;       // slots evicted, over all heads
  int64_t evictions = 0;     // eviction rounds
  double score_seconds = 0;  // time in policy scoring
  double evict_seconds = 0;  // time compacting the cache
};

class Compressor {
 public:
  Compressor(std::unique_ptr<Policy> policy, PolicyOptions options, CompressionConfig config);

  const Policy& policy() const { return *policy_; }
  Policy& policy() { return *policy_; }
  const PolicyOptions& options() const { return options_; }
  const CompressionConfig& config() const { return config_; }
  const CompressionStats& stats() const { return stats_; }
  // A restored session continues its counters (runtime/session_state).
  void set_eviction_counts(int64_t evicted, int64_t evictions) {
    stats_.evicted = evicted;
    stats_.evictions = evictions;
  }
  AttentionStats needs() const { return policy_->needs(options_); }

  // exempt[l]: leave layer l alone.
  void exempt_layers(std::vector<bool> exempt) { exempt_ = std::move(exempt); }
  bool compresses(int layer) const;

  // Tokens each head of `layer` must be able to hold at once, when at most `max_step` tokens
  // are appended between compressions and a sequence is at most `n_ctx` long.
  int capacity(int layer, int n_ctx, int max_step) const;
  // w_l / mean of w over the compressed layers (1 without layer_weights).
  double layer_share(int layer) const;
  // Streaming budget of `layer`: round(budget x layer_share), at least window + 1.
  int layer_budget(int layer) const;

  // Streaming: call after every forward step (or after_layer for every layer during it).
  void after_step(Cache& cache);
  // Streaming, one layer: evicts it down to its budget when it holds more. The forward pass
  // calls it right after the layer's attention, while the layer's keys are still in the core's
  // caches; the layer's slots do not change again until the next step, so the result is
  // after_step's.
  void after_layer(Cache& cache, int layer);
  // Prefill: call once after the whole prompt of `n_prompt` tokens is in the cache.
  void after_prefill(Cache& cache, int n_prompt);

  // Keeps, in each head of `layer`, the `keep_recent` newest slots plus the top-scored
  // `target - keep_recent` older ones (ties: the newer slot wins). Exposed for tests.
  void compress_layer(Cache& cache, int layer, int target, int keep_recent);

 private:
  std::unique_ptr<Policy> policy_;
  PolicyOptions options_;
  CompressionConfig config_;
  CompressionStats stats_;
  std::vector<std::vector<float>> scores_;  // reused between calls
  std::vector<int> order_, keep_;
  std::vector<bool> exempt_;
};

}  // namespace qf::kv
