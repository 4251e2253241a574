// What every evaluation shares: the model, threads, policy options, session construction, and
// the pieces that let one prefill serve several policies.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "kv/policy.h"
#include "model/model.h"
#include "model/session.h"

namespace qf::eval {

struct EvalContext {
  const Model* model = nullptr;
  int n_threads = 0;                  // 0 = all cores
  int n_batch = 256;                  // prefill chunk
  kv::PolicyOptions policy_options;   // seed, snapkv window, filters (storage owned by the caller)
  kv::KvTypes kv_types;               // storage types of every session's keys and values
  std::vector<float> layer_weights;   // per-layer budgets of every compressed session (CompressionConfig)
  bool progress = true;               // progress line on stderr
};

// "none" or a registered policy name; throws qf::Error otherwise (qfilters without filters too).
void check_policy(const EvalContext& ctx, const std::string& policy);
// Attention statistics the policy needs ({} for none and the score-only policies).
kv::AttentionStats policy_needs(const EvalContext& ctx, const std::string& policy);
bool is_attention_policy(const EvalContext& ctx, const std::string& policy);
// Union of the statistics of several policies, as one base session gathers them for all: snapkv's
// window is served by accumulate (see QueryTail for the prefill case), so it is never set.
kv::AttentionStats union_needs(const EvalContext& ctx, const std::vector<std::string>& policies);

// A session of n_ctx positions; policy "none" (or a config that compresses nothing) = full cache.
// `key_scorer`: SessionOptions::key_scorer, for a cache that keeps key scores (extra.key_scores)
// without running the policy that makes them.
std::unique_ptr<Session> new_session(const EvalContext& ctx, int n_ctx, const std::string& policy,
                                     const kv::CompressionConfig& cc, const kv::AttentionStats& extra = {},
                                     kv::KeyScorer key_scorer = {});
std::unique_ptr<kv::Compressor> new_compressor(const EvalContext& ctx, const std::string& policy,
                                               const kv::CompressionConfig& cc);

// The scores a key-scoring policy (qfilters, knorm) gives the F32 keys of a prefill, captured
// through Session::set_qk_hook, so a cell that compresses a copy of the shared cache scores what
// the policy's own session would have kept: the copy holds only the keys rounded to the storage
// type, not the scores of the model's keys.
class KeyScoreTable {
 public:
  KeyScoreTable(const kv::CacheShape& shape, kv::KeyScorer scorer);
  const kv::KeyScorer& scorer() const { return scorer_; }
  void clear();
  // k [n_tok][n_kv_heads][head_dim], as the QK hook gives them.
  void add(int layer, const float* k, const int32_t* pos, int n_tok);
  // Overwrites key_score[0, n) of every head with the scores of the positions it holds; throws
  // qf::Error for a position the table has not seen (or a cache that keeps no key scores).
  void fill(kv::Cache& cache) const;

 private:
  kv::CacheShape shape_;
  kv::KeyScorer scorer_;
  std::vector<std::vector<float>> scores_;  // [layer * n_kv_heads + head][position]
  std::vector<std::vector<uint8_t>> seen_;  // same shape: whether the position was added
};

// The last `window` queries of every layer of a prefill, captured through Session::set_qk_hook,
// so snapkv's observation statistics can be rebuilt on a shared cache instead of running a
// second prefill: fill_window_attention() writes into attn_sum exactly what attend_with_stats
// accumulates when a prompt is prefilled under snapkv (the prompt's last `window` queries,
// softmax over the keys each can see, with each layer's score scale and sliding window, averaged
// over the GQA group).
class QueryTail {
 public:
  QueryTail(const ModelConfig& config, int window);
  void clear();
  void add(int layer, const float* q, const int32_t* pos, int n_tok);
  QkHook hook();  // calls add(); the QueryTail must outlive the hook's use
  int window() const { return window_; }
  // Overwrites attn_sum[0, n) of every head (the cache must keep attn_sum).
  void fill_window_attention(kv::Cache& cache, ThreadPool& pool) const;

 private:
  int n_layers_, n_heads_, head_dim_, window_;
  std::vector<LayerAttention> attention_;  // [layer]
  std::vector<std::vector<float>> q_;      // [layer] rows of n_heads * head_dim, oldest first
  std::vector<std::vector<int32_t>> pos_;  // [layer]
};

// Tokens with a name, e.g. one evaluation document.
struct TokenDoc {
  std::string name;
  std::vector<int32_t> tokens;
};

}  // namespace qf::eval
