#include "model/session.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "kv/attention.h"
#include "util/error.h"
#include "util/memory.h"

namespace qf {

namespace {

// What the constructor is about to allocate: keys and values in their storage types for every
// slot of every layer's capacity, plus the per-batch activation buffers.
uint64_t planned_bytes(const ModelConfig& c, const std::vector<int>& capacity, int n_batch, kv::KvTypes types,
                       bool key_scores) {
  uint64_t slots = 0;
  for (int cap : capacity) slots += static_cast<uint64_t>(cap) * c.n_kv_heads;
  const uint64_t kv = slots * (kv::kv_row_bytes(types.k, c.head_dim) + kv::kv_row_bytes(types.v, c.head_dim) +
                               (key_scores ? sizeof(float) : 0));
  const uint64_t q_dim = static_cast<uint64_t>(c.n_heads) * c.head_dim, kv_dim = static_cast<uint64_t>(c.n_kv_heads) * c.head_dim;
  const uint64_t per_token = 2 * c.n_embd + 3 * q_dim + 2 * kv_dim + 2 * static_cast<uint64_t>(c.n_ff);
  return kv + static_cast<uint64_t>(n_batch) * per_token * sizeof(float);
}

// Whether every layer's cache holds a bounded number of tokens however long the sequence: a
// sliding window, or a streaming budget (its capacity does not grow with the context).
bool cache_is_bounded(const ModelConfig& c, const kv::Compressor* compressor, int n_batch) {
  constexpr int kHuge = INT_MAX / 2;
  for (int l = 0; l < c.n_layers; ++l)
    if (!c.layers[l].local() && !(compressor && compressor->capacity(l, kHuge, n_batch) < kHuge)) return false;
  return true;
}

}  // namespace

PositionMode parse_position_mode(std::string_view name) {
  if (name == "keep") return PositionMode::keep;
  if (name == "shift") return PositionMode::shift;
  fail("--kv-positions must be keep or shift, not '", name, "'");
}

std::string_view position_mode_name(PositionMode m) { return m == PositionMode::shift ? "shift" : "keep"; }

Session::Session(const Model& model, SessionOptions opt)
    : model_(model),
      own_pool_(opt.pool ? nullptr : std::make_unique<ThreadPool>(opt.n_threads)),
      pool_(opt.pool ? *opt.pool : *own_pool_),
      n_ctx_(opt.n_ctx > 0 ? opt.n_ctx : model.config().n_ctx_train),
      n_batch_(std::max(1, opt.n_batch)),
      positions_(opt.positions),
      rotary_(model.config(), model.rope_freq_factors()),
      compressor_(std::move(opt.compressor)) {
  const ModelConfig& c = model.config();
  n_batch_ = std::min(n_batch_, n_ctx_);
  if (positions_ == PositionMode::shift) {
    // llama.cpp's choice: give up half of what is not kept. Each shift then buys half a context
    // of tokens, and a key moves at most twice before it is given up (one rounding per move).
    shift_keep_ = std::clamp(opt.shift_keep, 0, n_ctx_ / 4);
    shift_delta_ = (n_ctx_ - shift_keep_) / 2;
    if (shift_delta_ < 1) fail("a context of ", n_ctx_, " tokens is too short to shift (--kv-positions keep, or a larger -c)");
    n_batch_ = std::min(n_batch_, shift_delta_);  // one shift always makes room for a chunk
  }
  kv::AttentionStats stats;
  if (compressor_) {
    compressor_->config().validate(c.n_layers);
    std::vector<bool> local(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) local[l] = c.layers[l].local();
    compressor_->exempt_layers(local);  // a sliding window already bounds them
    stats = compressor_->needs();
  }
  const std::vector<int> capacity = cache_capacity(model, compressor_.get(), n_ctx_, n_batch_);
  bounded_ = cache_is_bounded(c, compressor_.get(), n_batch_);
  stats.accumulate |= opt.stats.accumulate;
  stats.last_query |= opt.stats.last_query;
  stats.window = std::max(stats.window, opt.stats.window);
  stats.query_moments |= opt.stats.query_moments;
  stats.query_recent = std::max(stats.query_recent, opt.stats.query_recent);
  stats.key_scores |= opt.stats.key_scores;
  check_fits_in_memory(planned_bytes(c, capacity, n_batch_, opt.kv_types, stats.key_scores),
                       "a context of " + std::to_string(n_ctx_) + " tokens (KV cache and activations)",
                       opt.n_ctx > 0 ? "use a smaller -c or a bounded cache (--kv-budget)"
                                     : "the model's training context is the default; choose a smaller -c");
  cache_ = std::make_unique<kv::Cache>(kv::CacheShape{c.n_layers, c.n_kv_heads, c.head_dim}, capacity, stats,
                                       opt.kv_types);
  // A compressor that scores single keys scores them as they enter the cache.
  kv::KeyScorer scorer = compressor_ ? compressor_->policy().key_scorer(cache_->shape()) : kv::KeyScorer{};
  if (scorer && opt.key_scorer) fail("a session's cache keeps the key scores of its own policy, not of another one");
  cache_->set_key_scorer(scorer ? std::move(scorer) : std::move(opt.key_scorer));
  // Always: policies that score with calibrated query statistics move them to the current position.
  cache_->rope = rope_geometry(model);

  forward_ = std::make_unique<Forward>(model, n_batch_);
}

kv::RopeGeometry rope_geometry(const Model& model) {
  const ModelConfig& c = model.config();
  const ops::Rotary rotary(c, model.rope_freq_factors());
  kv::RopeGeometry g;
  g.n_rot = rotary.n_rot();
  g.adjacent = rotary.adjacent_pairs();
  for (int l = 0; l < c.n_layers; ++l) g.inv_freq.push_back(rotary.inv_freq(l));
  return g;
}

std::vector<int> Session::cache_capacity(const Model& model, const kv::Compressor* compressor, int n_ctx, int n_batch) {
  const ModelConfig& c = model.config();
  if (n_ctx <= 0) n_ctx = c.n_ctx_train;
  n_batch = std::clamp(n_batch, 1, n_ctx);
  std::vector<int> capacity(c.n_layers, n_ctx);
  for (int l = 0; l < c.n_layers; ++l) {
    if (c.layers[l].local()) capacity[l] = std::min(n_ctx, c.layers[l].window + n_batch);
    else if (compressor) capacity[l] = compressor->capacity(l, n_ctx, n_batch);
  }
  return capacity;
}

void Session::reset() {
  cache_->clear();
  n_past_ = 0;
  prompt_end_ = 0;
  positions_shifted_ = 0;
}

void Session::restore_position(int n_past, int prompt_end) {
  if (n_past < 0 || n_past > n_ctx_ || prompt_end < 0 || prompt_end > n_past)
    fail("restore_position: n_past ", n_past, " / prompt_end ", prompt_end, " outside the context of ", n_ctx_);
  n_past_ = n_past;
  prompt_end_ = prompt_end;
}

void Session::copy_state_from(const Session& src) {
  if (&src == this) return;
  if (&src.model_ != &model_) fail("copy_state_from: the sessions run different models");
  if (src.n_past_ > n_ctx_) fail("copy_state_from: ", src.n_past_, " tokens exceed this session's context of ", n_ctx_);
  const kv::Cache& from = *src.cache_;
  kv::Cache& to = *cache_;
  const kv::CacheShape& s = to.shape();
  if (from.types().k != to.types().k || from.types().v != to.types().v)
    fail("copy_state_from: the caches store different KV types");
  for (int l = 0; l < s.n_layers; ++l)
    for (int h = 0; h < s.n_kv_heads; ++h)
      if (from.head(l, h).n > to.capacity(l))
        fail("copy_state_from: layer ", l, " holds ", from.head(l, h).n, " tokens, this cache only ", to.capacity(l));
  // Key scores depend on the policy that made them: kept only between sessions of the same one.
  const bool same_scores = from.stats().key_scores && to.stats().key_scores && src.compressor_ && compressor_ &&
                           src.compressor_->policy().name() == compressor_->policy().name() &&
                           src.compressor_->options().filters.data() == compressor_->options().filters.data();
  auto copy_stat = [](const auto& a, auto& b, int n) {
    if (b.empty()) return;
    if (a.empty()) std::fill(b.begin(), b.begin() + n, 0);
    else std::copy(a.begin(), a.begin() + n, b.begin());
  };
  for (int l = 0; l < s.n_layers; ++l)
    for (int h = 0; h < s.n_kv_heads; ++h) {
      const kv::HeadCache& a = from.head(l, h);
      kv::HeadCache& b = to.head(l, h);
      std::copy(a.k.begin(), a.k.begin() + a.n * a.k_row_bytes, b.k.begin());
      std::copy(a.v.begin(), a.v.begin() + a.n * a.v_row_bytes, b.v.begin());
      std::copy(a.pos.begin(), a.pos.begin() + a.n, b.pos.begin());
      copy_stat(a.attn_sum, b.attn_sum, a.n);
      copy_stat(a.attn_cnt, b.attn_cnt, a.n);
      copy_stat(a.attn_last, b.attn_last, a.n);
      b.n = a.n;
      if (same_scores) copy_stat(a.key_score, b.key_score, a.n);
      else if (to.stats().key_scores) to.score_stored_keys(l, h);
    }
  to.queries_seen = from.queries_seen;
  if (!to.query_moments.empty()) {
    if (from.query_moments.empty()) for (auto& m : to.query_moments) m.clear();
    else to.query_moments = from.query_moments;
  }
  n_past_ = src.n_past_;
  prompt_end_ = src.prompt_end_;
  positions_shifted_ = src.positions_shifted_;
}

std::span<const float> Session::prefill(std::span<const int32_t> tokens) {
  if (tokens.empty()) fail("empty prompt");
  prompt_end_ = n_past_ + static_cast<int>(tokens.size());
  auto logits = eval(tokens, false);
  if (compressor_) compressor_->after_prefill(*cache_, static_cast<int>(tokens.size()));
  return logits;
}

bool Session::has_room(int64_t n) const {
  if (positions_ == PositionMode::shift) return true;
  // Keep with a bounded cache: positions may pass the context, not int32.
  return n_past_ + n <= (bounded_ ? INT32_MAX / 2 : n_ctx_);
}

void Session::check_tokens(std::span<const int32_t> tokens) const {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (!has_room(n))
    fail("sequence of ", n_past_ + n, " tokens exceeds the context of ", n_ctx_,
         bounded_ ? "" : " (raise -c, or --kv-positions shift)");
  for (int32_t t : tokens)
    if (t < 0 || t >= model_.config().n_vocab)
      fail("token id ", t, " is outside the vocabulary (", model_.config().n_vocab, ")");
}

std::span<const float> Session::decode(int32_t token) {
  return eval(std::span<const int32_t>(&token, 1), false, TokenKind::decode);
}

std::span<const float> Session::eval(std::span<const int32_t> tokens, bool all_logits, TokenKind kind) {
  const ModelConfig& c = model_.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return {};
  check_tokens(tokens);
  const size_t rows = all_logits ? static_cast<size_t>(n) : 1;
  if (logits_.size() < rows * c.n_vocab) logits_.resize(rows * c.n_vocab);
  for (int64_t i = 0; i < n; i += n_batch_) {
    const int m = static_cast<int>(std::min<int64_t>(n_batch_, n - i));
    const bool last_chunk = i + m == n;
    make_room(m);
    float* out = all_logits ? logits_.data() + static_cast<size_t>(i) * c.n_vocab : (last_chunk ? logits_.data() : nullptr);
    forward_chunk(tokens.data() + i, m, out, all_logits, kind);  // evicts each layer after its attention
  }
  return {logits_.data(), rows * c.n_vocab};
}

std::vector<std::span<const float>> Session::eval_batch(std::span<const BatchItem> items, Forward& fw,
                                                         ThreadPool& pool) {
  std::vector<Segment> segments;
  int rows = 0;
  for (const BatchItem& it : items) {
    Session& s = *it.session;
    if (it.tokens.empty()) fail("eval_batch: an item without tokens");
    for (const Segment& seg : segments)
      if (seg.session == &s) fail("eval_batch: a session appears twice in one batch");
    s.check_tokens(it.tokens);
    s.make_room(static_cast<int>(it.tokens.size()));
    const size_t vocab = s.model_.config().n_vocab;
    if (s.logits_.size() < vocab) s.logits_.resize(vocab);
    segments.push_back({&s, it.tokens.data(), static_cast<int>(it.tokens.size()), s.logits_.data(), false, it.kind});
    rows += static_cast<int>(it.tokens.size());
  }
  if (rows > fw.max_rows()) fail("eval_batch: ", rows, " tokens exceed the batch of ", fw.max_rows());
  fw.run(segments, pool);  // each session evicts each layer after its attention, the sessions in parallel
  std::vector<std::span<const float>> out;
  for (const Segment& seg : segments) out.emplace_back(seg.session->logits_.data(), seg.session->model_.config().n_vocab);
  return out;
}

void Session::make_room(int n) {
  if (positions_ != PositionMode::shift || n_past_ + n <= n_ctx_) return;
  if (n > shift_delta_)
    fail(n, " tokens at once do not fit after a context shift of ", shift_delta_, " positions (at most ", n_batch_,
         " per step)");
  shift_context();
}

void Session::shift_context() {
  const kv::CacheShape& s = cache_->shape();
  for (int l = 0; l < s.n_layers; ++l) {
    auto rotate_back = [&](float* rows, int n) { rotary_.rotate_by(l, rows, n, -shift_delta_); };
    for (int h = 0; h < s.n_kv_heads; ++h) cache_->shift(l, h, shift_keep_, shift_delta_, rotate_back);
  }
  n_past_ -= shift_delta_;
  prompt_end_ = std::max(0, prompt_end_ - shift_delta_);
  positions_shifted_ += shift_delta_;
}

void Session::forward_chunk(const int32_t* tokens, int n, float* logits, bool all_logits, TokenKind kind) {
  const Segment seg{this, tokens, n, logits, all_logits, kind};
  forward_->run(std::span<const Segment>(&seg, 1), pool_);
}

kv::AttentionArgs Session::store_rows(int l, int n, const float* q, const float* k, const float* v,
                                     const int32_t* pos, float* out) {
  const ModelConfig& c = model_.config();
  if (qk_hook_) qk_hook_(l, q, k, pos, n);
  if (!cache_->query_moments.empty()) observe_queries(l, n, q, pos);
  if (c.layers[l].local()) drop_outside_window(l, n);
  cache_->append(l, k, v, pos, n);
  kv::AttentionArgs args;
  args.layer = l;
  args.n_heads = c.n_heads;
  const LayerAttention att = c.attention(l);
  args.scale = att.scale;
  args.window = att.window;
  args.n_tok = n;
  args.q = q;
  args.q_pos = pos;
  args.out = out;
  return args;
}

bool Session::attention_needs_stats() const {
  const kv::AttentionStats& st = cache_->stats();
  return st.accumulate || st.last_query || st.window > 0;
}

void Session::attend_with_stats(kv::AttentionArgs args, ThreadPool& pool) {
  // snapkv observes only the last `window` queries of the prompt; h2o every query.
  const int window = cache_->stats().window;
  args.accumulate_from_pos = window > 0 ? std::max(0, prompt_end_ - window) : 0;
  kv::attend_with_stats(*cache_, args, pool);
}

void Session::observe_queries(int l, int n, const float* q, const int32_t* pos) {
  const ModelConfig& c = model_.config();
  const size_t row = static_cast<size_t>(c.n_heads) * c.head_dim;
  query_row_.resize(row);
  for (int t = 0; t < n; ++t) {
    if (pos[t] < kv::kQueryMomentSinks) continue;
    std::copy(q + t * row, q + (t + 1) * row, query_row_.begin());
    // Undo the rotary embedding: the moments are of the queries before it.
    cache_->rope.rotate(l, -static_cast<double>(pos[t]), query_row_.data(), c.n_heads, c.head_dim);
    cache_->query_moments[l].add(query_row_.data(), c.n_heads, c.head_dim, cache_->stats().query_recent,
                                 cache_->stats().query_moments);
  }
}

void Session::drop_outside_window(int l, int n) {
  // The next query is at n_past_ or later and sees positions > n_past_ - window.
  const int32_t oldest_visible = n_past_ - model_.config().layers[l].window + 1;
  for (int h = 0; h < cache_->shape().n_kv_heads; ++h) {
    const kv::HeadCache& hc = cache_->head(l, h);
    if (hc.n + n <= cache_->capacity(l)) continue;
    const int first = static_cast<int>(std::lower_bound(hc.pos.begin(), hc.pos.begin() + hc.n, oldest_visible) - hc.pos.begin());
    keep_.resize(hc.n - first);
    for (size_t i = 0; i < keep_.size(); ++i) keep_[i] = first + static_cast<int>(i);
    cache_->retain(l, h, keep_);
  }
}

}  // namespace qf
