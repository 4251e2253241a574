// Attention fidelity (docs/method.md section 6): per (layer, KV head), the Spearman correlation
// between a policy's score of each key and the attention the key actually receives, on average,
// from the later queries of the document (softmax over the causal keys, averaged over the query
// heads of the GQA group). The last key has no later query and is left out.
//
// Sliding-window layers (Gemma 3's local layers) are scored too, against the attention their
// window allows, but policies never evict from them, so the summary's statistics cover the other
// layers only (per_layer_mean still lists every layer).
//
// Scores come from the policies' own code, scoring the full cache after the document. For the
// attention-based policies (snapkv, tova, h2o) the score is itself made of attention weights of
// the same document, so their correlation is partly circular; they are reported with that flag.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/engine.h"
#include "eval/results.h"

namespace qf::eval {

struct FidelitySettings {
  int n_tokens = 2048;  // tokens per document (one forward chunk)
  int n_docs = 2;
  nlohmann::json to_json() const;
  void validate() const;
};

// The target of one layer: avg[kv_head][j] = mean over the later queries i > j that see key j of
// the attention query i gives it (mean over the group's query heads), with the layer's own score
// scale and sliding window (att: ModelConfig::attention). q: [T][n_heads][head_dim],
// k: [T][n_kv_heads][head_dim], post-RoPE, positions 0..T-1. A key no later query sees (the last
// one; every key under a window of 1) is NaN. Exposed for tests.
std::vector<std::vector<double>> mean_received_attention(const float* q, const float* k, int T, int n_heads,
                                                         int n_kv_heads, int head_dim, LayerAttention att,
                                                         ThreadPool& pool);

// The layers KV policies act on (all but the sliding-window layers, which keep only their window).
std::vector<int> policy_layers(const ModelConfig& c);

// Policies whose correlation is circular (their score is made of the same attention weights).
bool fidelity_is_circular(const EvalContext& ctx, const std::string& policy);

// One cell per document missing from `log`; "none" in `policies` is ignored.
void run_fidelity(const EvalContext& ctx, const std::vector<TokenDoc>& docs, const FidelitySettings& settings,
                  const std::vector<std::string>& policies, CellLog& log);

struct FidelitySummary {
  nlohmann::json json;
  std::string csv;        // one row per policy
  std::string heads_csv;  // one row per (policy, layer, kv head): Spearman averaged over documents
};
FidelitySummary summarize_fidelity(const EvalContext& ctx, const CellLog& log, const std::vector<TokenDoc>& docs,
                                   const FidelitySettings& settings, const std::vector<std::string>& policies);

}  // namespace qf::eval
