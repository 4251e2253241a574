#include "eval/needle.h"

#include <algorithm>

#include "sample/sampler.h"
#include "util/error.h"

namespace qf::eval {

float ratio_for_compression(int compression) {
  if (compression < 1) fail("compression must be >= 1 (got ", compression, ")");
  return compression == 1 ? 0.0f : static_cast<float>(1.0 - 1.0 / compression);
}

NeedleRunner::NeedleRunner(const EvalContext& ctx, int n_ctx, const std::vector<std::string>& policies)
    : ctx_(ctx), policies_(policies) {
  for (const auto& p : policies_) check_policy(ctx_, p);
  const kv::AttentionStats stats = union_needs(ctx_, policies_);
  base_ = new_session(ctx_, n_ctx, "none", {}, stats);
  const kv::CacheShape& shape = base_->cache().shape();
  for (const auto& p : policies_)
    if (policy_needs(ctx_, p).key_scores)
      key_tables_.emplace(p, KeyScoreTable(shape, kv::make_policy(p, ctx_.policy_options)->key_scorer(shape)));
  // The work session keeps the key scores its cells compress by (answer() sets the scorer).
  kv::AttentionStats work_stats = stats;
  work_stats.key_scores = !key_tables_.empty();
  work_ = new_session(ctx_, n_ctx, "none", {}, work_stats,
                      key_tables_.empty() ? kv::KeyScorer{} : key_tables_.begin()->second.scorer());
  if (std::find(policies_.begin(), policies_.end(), "snapkv") != policies_.end()) {
    const ModelConfig& c = ctx_.model->config();
    tail_ = std::make_unique<QueryTail>(c, std::max(1, ctx_.policy_options.snapkv_window));
  }
}

void NeedleRunner::prefill(std::span<const int32_t> context) {
  if (context.empty()) fail("needle: empty context");
  base_->reset();
  if (tail_) tail_->clear();
  for (auto& [name, table] : key_tables_) table.clear();
  if (tail_ || !key_tables_.empty())
    base_->set_qk_hook([this](int l, const float* q, const float* k, const int32_t* pos, int n) {
      if (tail_) tail_->add(l, q, pos, n);
      for (auto& [name, table] : key_tables_) table.add(l, k, pos, n);
    });
  base_->prefill(context);
  base_->set_qk_hook(nullptr);
  n_context_ = static_cast<int>(context.size());
}

NeedleRunner::Answer NeedleRunner::answer(const std::string& policy, int compression, int skip_layers,
                                          std::span<const int32_t> question, int max_new,
                                          const std::function<bool(int32_t)>& eog,
                                          const std::function<bool(const std::vector<int32_t>&)>& done,
                                          std::span<const int> watch) {
  if (n_context_ == 0) fail("needle: answer() before prefill()");
  if (std::find(policies_.begin(), policies_.end(), policy) == policies_.end())
    fail("needle: policy ", policy, " was not declared to the runner");
  if (question.empty()) fail("needle: empty question");
  kv::Cache& cache = work_->cache();
  const auto table = key_tables_.find(policy);
  if (table != key_tables_.end()) cache.set_key_scorer(table->second.scorer());
  work_->copy_state_from(*base_);
  if (table != key_tables_.end()) table->second.fill(cache);
  const float ratio = ratio_for_compression(compression);
  if (policy != "none" && ratio > 0) {
    if (policy == "snapkv") tail_->fill_window_attention(cache, work_->pool());
    kv::CompressionConfig cc;
    cc.prefill_ratio = ratio;
    cc.skip_layers = skip_layers;
    auto comp = new_compressor(ctx_, policy, cc);
    comp->after_prefill(cache, n_context_);
  }
  Answer a;
  const kv::CacheShape& s = cache.shape();
  int64_t held = 0, heads = 0, watched = 0;
  for (int l = skip_layers; l < s.n_layers; ++l)
    for (int h = 0; h < s.n_kv_heads; ++h) {
      const kv::HeadCache& hc = cache.head(l, h);
      held += hc.n, ++heads;
      for (int i = 0; i < hc.n; ++i) watched += std::find(watch.begin(), watch.end(), hc.pos[i]) != watch.end();
    }
  a.kept_per_head = heads ? static_cast<double>(held) / heads : n_context_;
  if (heads && !watch.empty()) a.watched_kept = static_cast<double>(watched) / (static_cast<double>(heads) * watch.size());

  std::span<const float> logits = work_->eval(question);
  for (int i = 0; i < max_new; ++i) {
    const int32_t next = argmax(logits);
    if (eog && eog(next)) break;
    a.tokens.push_back(next);
    if ((done && done(a.tokens)) || i + 1 == max_new || work_->n_past() >= work_->n_ctx()) break;
    logits = work_->decode(next);
  }
  return a;
}

}  // namespace qf::eval
