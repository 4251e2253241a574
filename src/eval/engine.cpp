#include "eval/engine.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kv/attention.h"
#include "tensor/attention_kernel.h"
#include "util/error.h"

namespace qf::eval {

void check_policy(const EvalContext& ctx, const std::string& policy) {
  if (policy == "none") return;
  (void)kv::make_policy(policy, ctx.policy_options);
}

kv::AttentionStats policy_needs(const EvalContext& ctx, const std::string& policy) {
  if (policy == "none") return {};
  return kv::make_policy(policy, ctx.policy_options)->needs(ctx.policy_options);
}

bool is_attention_policy(const EvalContext& ctx, const std::string& policy) {
  const kv::AttentionStats s = policy_needs(ctx, policy);
  return s.accumulate || s.last_query || s.window > 0;
}

kv::AttentionStats union_needs(const EvalContext& ctx, const std::vector<std::string>& policies) {
  kv::AttentionStats u;
  for (const auto& p : policies) {
    const kv::AttentionStats s = policy_needs(ctx, p);
    u.accumulate |= s.accumulate || s.window > 0;
    u.last_query |= s.last_query;
    u.query_moments |= s.query_moments;
    u.query_recent = std::max(u.query_recent, s.query_recent);
  }
  return u;
}

std::unique_ptr<kv::Compressor> new_compressor(const EvalContext& ctx, const std::string& policy,
                                               const kv::CompressionConfig& config) {
  if (ctx.model == nullptr) fail("evaluation context without a model");
  kv::CompressionConfig cc = config;
  if (cc.layer_weights.empty()) cc.layer_weights = ctx.layer_weights;
  cc.validate(ctx.model->config().n_layers);
  return std::make_unique<kv::Compressor>(kv::make_policy(policy, ctx.policy_options), ctx.policy_options, cc);
}

std::unique_ptr<Session> new_session(const EvalContext& ctx, int n_ctx, const std::string& policy,
                                     const kv::CompressionConfig& cc, const kv::AttentionStats& extra,
                                     kv::KeyScorer key_scorer) {
  if (ctx.model == nullptr) fail("evaluation context without a model");
  SessionOptions so;
  so.n_ctx = n_ctx;
  so.n_threads = ctx.n_threads;
  so.n_batch = ctx.n_batch;
  so.stats = extra;
  so.kv_types = ctx.kv_types;
  so.key_scorer = std::move(key_scorer);
  if (policy != "none" && cc.enabled()) so.compressor = new_compressor(ctx, policy, cc);
  return std::make_unique<Session>(*ctx.model, std::move(so));
}

KeyScoreTable::KeyScoreTable(const kv::CacheShape& shape, kv::KeyScorer scorer)
    : shape_(shape), scorer_(std::move(scorer)) {
  if (!scorer_) fail("KeyScoreTable: the policy does not score single keys");
  scores_.resize(static_cast<size_t>(shape_.n_layers) * shape_.n_kv_heads);
  seen_.resize(scores_.size());
}

void KeyScoreTable::clear() {
  for (auto& s : scores_) s.clear();
  for (auto& s : seen_) s.clear();
}

void KeyScoreTable::add(int layer, const float* k, const int32_t* pos, int n_tok) {
  for (int h = 0; h < shape_.n_kv_heads; ++h) {
    const size_t head = static_cast<size_t>(layer) * shape_.n_kv_heads + h;
    for (int t = 0; t < n_tok; ++t) {
      const size_t p = static_cast<size_t>(pos[t]);
      if (scores_[head].size() <= p) scores_[head].resize(p + 1), seen_[head].resize(p + 1);
      scores_[head][p] = scorer_(layer, h, k + (static_cast<size_t>(t) * shape_.n_kv_heads + h) * shape_.head_dim, pos[t]);
      seen_[head][p] = 1;
    }
  }
}

void KeyScoreTable::fill(kv::Cache& cache) const {
  if (!cache.stats().key_scores) fail("KeyScoreTable: the cache keeps no key scores");
  for (int l = 0; l < shape_.n_layers; ++l)
    for (int h = 0; h < shape_.n_kv_heads; ++h) {
      const size_t head = static_cast<size_t>(l) * shape_.n_kv_heads + h;
      kv::HeadCache& hc = cache.head(l, h);
      for (int j = 0; j < hc.n; ++j) {
        const size_t p = static_cast<size_t>(hc.pos[j]);
        if (p >= seen_[head].size() || !seen_[head][p]) fail("KeyScoreTable: no score for position ", p);
        hc.key_score[j] = scores_[head][p];
      }
    }
}

QueryTail::QueryTail(const ModelConfig& config, int window)
    : n_layers_(config.n_layers),
      n_heads_(config.n_heads),
      head_dim_(config.head_dim),
      window_(window),
      q_(config.n_layers),
      pos_(config.n_layers) {
  if (n_layers_ <= 0 || n_heads_ <= 0 || head_dim_ <= 0 || window <= 0) fail("QueryTail: invalid shape");
  for (int l = 0; l < n_layers_; ++l) attention_.push_back(config.attention(l));
}

void QueryTail::clear() {
  for (auto& v : q_) v.clear();
  for (auto& v : pos_) v.clear();
}

void QueryTail::add(int layer, const float* q, const int32_t* pos, int n_tok) {
  if (layer < 0 || layer >= n_layers_) fail("QueryTail: layer ", layer, " out of range");
  const size_t row = static_cast<size_t>(n_heads_) * head_dim_;
  const int first = std::max(0, n_tok - window_);  // older rows of this chunk can never be kept
  std::vector<float>& qs = q_[layer];
  std::vector<int32_t>& ps = pos_[layer];
  qs.insert(qs.end(), q + first * row, q + static_cast<size_t>(n_tok) * row);
  ps.insert(ps.end(), pos + first, pos + n_tok);
  if (static_cast<int>(ps.size()) > window_) {
    const size_t drop = ps.size() - window_;
    ps.erase(ps.begin(), ps.begin() + drop);
    qs.erase(qs.begin(), qs.begin() + drop * row);
  }
}

QkHook QueryTail::hook() {
  return [this](int layer, const float* q, const float*, const int32_t* pos, int n_tok) { add(layer, q, pos, n_tok); };
}

void QueryTail::fill_window_attention(kv::Cache& cache, ThreadPool& pool) const {
  const kv::CacheShape& s = cache.shape();
  if (s.n_layers != n_layers_ || s.head_dim != head_dim_ || n_heads_ % s.n_kv_heads != 0)
    fail("QueryTail: cache shape does not match the captured queries");
  for (int l = 0; l < s.n_layers; ++l)
    for (int h = 0; h < s.n_kv_heads; ++h)
      if (cache.head(l, h).attn_sum.empty()) fail("QueryTail: the cache keeps no attn_sum");
  // The kernel attend_with_stats uses, on the same queries against the same keys: it adds each
  // query's weights one query at a time in order, so the sums match however the prefill that
  // gathered them was split into chunks.
  std::vector<int> visible;
  std::vector<AttentionColumns> cols(s.n_kv_heads);
  for (int l = 0; l < s.n_layers; ++l) {
    const LayerAttention att = attention_[l];
    const std::vector<AttentionKv> heads = kv::layer_views(cache, l, pos_[l], visible, att.window);
    for (int h = 0; h < s.n_kv_heads; ++h) {
      kv::HeadCache& hc = cache.head(l, h);
      std::fill(hc.attn_sum.begin(), hc.attn_sum.begin() + hc.n, 0.0f);
      cols[h] = {.n_keys = hc.n, .sum = hc.attn_sum.data()};
    }
    attention_stats_f32(q_[l].data(), static_cast<int>(pos_[l].size()), n_heads_, heads.data(), s.n_kv_heads,
                        head_dim_, att.scale, nullptr, cols.data(), nullptr, pool);
  }
}

}  // namespace qf::eval
