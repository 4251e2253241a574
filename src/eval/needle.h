// The model side of needle-in-a-haystack with prefill compression (kvpress protocol): the
// context (haystack + needle) is prefilled and compressed, the question is appended uncompressed,
// the answer is decoded greedily.
//
// One prefill serves every (policy, compression) cell of a context: the base session prefills it
// once, gathering the attention statistics of every attention-based policy requested (h2o's
// accumulated attention, tova's last query, and snapkv's observation window rebuilt from the last
// queries by QueryTail, and the key scores of qfilters/knorm from the model's F32 keys by
// KeyScoreTable); each cell copies the base cache into a work session, compresses the copy
// exactly as Compressor::after_prefill would have after its own prefill, and decodes.
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "eval/engine.h"

namespace qf::eval {

class NeedleRunner {
 public:
  // Sessions hold up to n_ctx positions (context + question + answer).
  NeedleRunner(const EvalContext& ctx, int n_ctx, const std::vector<std::string>& policies);

  // Prefills the shared context.
  void prefill(std::span<const int32_t> context);

  struct Answer {
    std::vector<int32_t> tokens;  // greedy answer (a stopping token included, end-of-generation excluded)
    double kept_per_head = 0;     // mean tokens per KV head after compression (before the question)
    double watched_kept = NAN;    // share of (compressed head, watched position) pairs still cached
  };
  // Stops when `done(answer so far)` is true or after max_new tokens; `eog(token)` tokens end the
  // answer without being part of it. compression 1 (or policy "none") keeps the whole context.
  // `watch`: context positions (e.g. the needle's number) whose survival is reported.
  Answer answer(const std::string& policy, int compression, int skip_layers, std::span<const int32_t> question,
                int max_new, const std::function<bool(int32_t)>& eog,
                const std::function<bool(const std::vector<int32_t>&)>& done, std::span<const int> watch = {});

  int context_tokens() const { return n_context_; }
  Session& work() { return *work_; }
  Session& base() { return *base_; }

 private:
  EvalContext ctx_;
  std::vector<std::string> policies_;
  std::unique_ptr<Session> base_, work_;
  std::unique_ptr<QueryTail> tail_;  // only when snapkv is requested
  std::map<std::string, KeyScoreTable> key_tables_;  // per key-scoring policy requested
  int n_context_ = 0;
};

// prefill_ratio that keeps 1/compression of the context (kvpress: keep int(T * (1 - ratio))).
float ratio_for_compression(int compression);

}  // namespace qf::eval
