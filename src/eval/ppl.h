// Memory-constrained generation (docs/method.md section 6): teacher-forced decoding through a
// document with the cache capped at `budget` tokens per head (newest `window` always kept), the
// NLL of every next token, for every policy on the same tokens.
//
// Work is shared where the result cannot differ: the full-cache baseline runs in batched chunks;
// the first `budget` tokens never trigger an eviction, so one base session processes them in a
// batch (gathering the attention statistics every requested policy needs) and each policy's
// session starts from a copy of it, then steps token by token.
//
// Targets are positions t = 1 .. n_tokens-1 (token t predicted from tokens < t). For t <= budget
// every policy predicts exactly as the full cache, so those NLLs are the full cache's.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/engine.h"
#include "eval/results.h"

namespace qf::eval {

struct PplSettings {
  std::vector<int> budgets{128, 256, 512, 1024};
  int window = 64;       // newest tokens always kept (must be < every budget)
  int evict_every = 1;   // streaming eviction granularity
  int n_tokens = 2048;   // tokens per document (shorter documents are skipped)
  int n_docs = 8;        // documents used, in order (the bootstrap intervals resample them)
  int skip_layers = 0;   // first layers left uncompressed
  int curve_bin = 32;    // positions per point of the NLL curve
  nlohmann::json to_json() const;
  void validate() const;  // throws qf::Error
};

// Picks the documents: the first n_docs holding at least n_tokens tokens, cut to n_tokens.
// Throws qf::Error when there are fewer.
std::vector<TokenDoc> select_docs(const std::vector<TokenDoc>& all, int n_docs, int n_tokens);

// Computes every (document, budget, policy) cell missing from `log`. Policies: "none" plus
// registered names; the full cache ("none") is always computed, being the reference.
void run_ppl(const EvalContext& ctx, const std::vector<TokenDoc>& docs, const PplSettings& settings,
             const std::vector<std::string>& policies, CellLog& log);

// Aggregates the cells: per (budget, policy) perplexity over all targets and over targets after
// the budget (NLL pooled over documents), gap ratios against the full cache and StreamingLLM,
// and the NLL curve along the position.
struct PplSummary {
  nlohmann::json json;    // {"results": [...], "curve": [...], ...}
  std::string csv;        // one row per (budget, policy)
  std::string curve_csv;  // one row per (budget, policy, position bin)
};
PplSummary summarize_ppl(const CellLog& log, const std::vector<TokenDoc>& docs, const PplSettings& settings,
                         const std::vector<std::string>& policies);

}  // namespace qf::eval
