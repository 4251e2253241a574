// Eviction policies. A policy only scores cached tokens (higher = more worth keeping); the
// Compressor decides when to evict and how many, so a new policy is one small file with one
// scoring function (see kv/policies/), registered in kv/policies/registry.cpp.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kv/cache.h"

namespace qf::kv {

struct PolicyOptions {
  uint64_t seed = 0;                 // random
  int n_sink = 4;                    // streaming
  int snapkv_window = 64;            // snapkv: queries whose attention is observed
  int snapkv_kernel = 5;             // snapkv: average-pooling width
  int ea_future_positions = 512;     // expected_attention: positions the queries are averaged over
  // qfilters: [n_layers][n_kv_heads][head_dim], oriented so that a larger <k, f> means keep.
  std::span<const float> filters;
  // qfilters_rope, ea_calibrated: calibrated query statistics before the rotary embedding
  // (calib::Filters::query_mean / query_factors): per layer and query head the mean query
  // [n_layers][n_query_heads][head_dim] and `stats_rank` covariance factors
  // [n_layers][n_query_heads][stats_rank][head_dim]; moved to the next `query_future_positions`.
  std::span<const float> query_mean, query_factors;
  int n_query_heads = 0, stats_rank = 0;
  int query_future_positions = 512;
  // qfilters_adaptive: weight of the recent queries in the filter, in [0, 1] (0 = qfilters_rope's
  // filter), and the horizon in tokens of their exponential moving average (1 = the last query).
  // The defaults are what found the most needles (docs/results.md, "Adaptive filters").
  float filter_blend = 1.0f;
  int filter_horizon = 1;
  // qfilters_max: how fast a kept token forgets that a query head singled it out, in standard
  // deviations of its standardised score per position; infinity = no memory (each round's score
  // alone). Its memory keeps H2O's strength, accumulated attention, without attention weights.
  float filter_decay = 0.03f;
};

class Policy {
 public:
  virtual ~Policy() = default;
  virtual std::string_view name() const = 0;
  // Attention statistics the cache must keep for this policy (forces the non-fused path).
  virtual AttentionStats needs(const PolicyOptions&) const { return {}; }
  // A policy whose score of a token depends only on that token's key and position asks for
  // AttentionStats::key_scores and returns here the function that scores one key, checked
  // against the cache's shape once: the cache calls it as a token is appended, with the model's
  // F32 key, so the kept set does not depend on the storage type and score_head only reads the
  // kept scores. Other policies return an empty function. Throws qf::Error when the policy's
  // data (e.g. the filters) does not fit the shape.
  virtual KeyScorer key_scorer(const CacheShape&) const { return {}; }
  // Scores the first `hc.n` slots of one head into scores[0..n). Higher is kept.
  virtual void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) = 0;
  // Scores every head of a layer (one score_head call per KV head); a policy whose heads could
  // share work may override it. TOVA mixes heads inside score_head, reading the cache.
  virtual void score_layer(const Cache& cache, int layer, std::vector<std::vector<float>>& scores);

  // State that changes as the policy scores (e.g. a random generator), saved with a session so
  // that a restored one evicts exactly as the original would have. Stateless policies keep "".
  // load_state throws qf::Error (and changes nothing) for a state it did not write.
  virtual std::string save_state() const { return {}; }
  virtual void load_state(std::string_view state);
  // Bytes the policy itself keeps per cached slot of each KV head, at most (qfilters_max's
  // memory): admission control charges them beside the keys and values.
  virtual size_t state_bytes_per_slot() const { return 0; }
};

// Names accepted by make_policy, e.g. for --help and error messages.
std::vector<std::string> policy_names();
// Policies that also need calibrated query statistics (a filter file from qf calibrate
// --stats-rank): accepted by make_policy, but not in policy_names(), so default sweeps and
// filter files without statistics work as before.
std::vector<std::string> query_stats_policy_names();
// Suffix of a layer-consistent variant: "<policy>+layer" standardises each KV head's scores
// (mean 0, standard deviation 1 over its finite scores) and gives every head of the layer the mean
// over the heads holding that position, so a token is kept in all heads of the layer or in none
// (+inf in any head: kept). Any policy but none takes it; policy_names() does not list them.
inline constexpr std::string_view kLayerSuffix = "+layer";
// The policy under its +layer suffix ("ea_calibrated+layer" -> "ea_calibrated").
std::string_view base_policy_name(std::string_view name);
// Whether make_policy knows `name` ("none", a policy of either list, or one with kLayerSuffix),
// whatever options it would also need.
bool is_policy_name(std::string_view name);
// Throws qf::Error for an unknown name or options the policy cannot use (e.g. qfilters
// without filters).
std::unique_ptr<Policy> make_policy(std::string_view name, const PolicyOptions& options);

}  // namespace qf::kv
