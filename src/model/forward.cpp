#include "model/forward.h"

#include <algorithm>
#include <cstring>

#include "model/session.h"
#include "util/error.h"

namespace qf {

Forward::Forward(const Model& model, int max_rows)
    : model_(model), max_rows_(std::max(1, max_rows)), rotary_(model.config(), model.rope_freq_factors()) {
  const ModelConfig& c = model.config();
  const size_t nr = max_rows_;
  x_.resize(nr * c.n_embd);
  h_.resize(nr * std::max(c.n_embd, c.n_heads * c.head_dim));
  q_.resize(nr * c.n_heads * c.head_dim);
  k_.resize(nr * c.n_kv_heads * c.head_dim);
  v_.resize(nr * c.n_kv_heads * c.head_dim);
  att_.resize(nr * c.n_heads * c.head_dim);
  ff_a_.resize(nr * c.n_ff);
  ff_b_.resize(nr * c.n_ff);
  pos_.resize(nr);
}

void Forward::run(std::span<const Segment> segments, ThreadPool& pool) {
  const ModelConfig& c = model_.config();
  const size_t E = c.n_embd;
  int n = 0;
  for (const Segment& s : segments) {
    if (&s.session->model() != &model_) fail("forward: a session runs another model");
    for (int t = 0; t < s.n; ++t) {
      if (n + t >= max_rows_) fail("forward: more than ", max_rows_, " rows in one pass");
      pos_[n + t] = s.session->n_past_ + t;
      dequantize_row(model_.token_embd(), s.tokens[t], x_.data() + (n + t) * E);
    }
    n += s.n;
  }
  if (n == 0) return;
  seg_row_.clear();
  runs_.clear();
  for (int row = 0; const Segment& s : segments) {
    seg_row_.push_back(row);
    if (!runs_.empty() && runs_.back().kind == s.kind) runs_.back().n += s.n;
    else runs_.push_back({row, s.n, s.kind});
    row += s.n;
  }
  if (c.embd_scale != 1.0f) ops::scale(x_.data(), n * E, c.embd_scale);
  rotary_.prepare(pos_.data(), n);
  for (int l = 0; l < c.n_layers; ++l) {
    attention_block(l, segments, n, pool);
    ffn_block(l, n, pool);
  }
  for (const Segment& s : segments) s.session->n_past_ += s.n;
  output_logits(segments, pool);
}

void Forward::attention_block(int l, std::span<const Segment> segments, int n, ThreadPool& pool) {
  const ModelConfig& c = model_.config();
  const LayerWeights& w = model_.layers()[l];
  const int E = c.n_embd, D = c.head_dim, H = c.n_heads, KVH = c.n_kv_heads;
  ops::rmsnorm_rows(h_.data(), x_.data(), w.attn_norm, n, E, c.rms_eps);
  project_shared({w.wq, w.wk, w.wv}, h_.data(), {q_.data(), k_.data(), v_.data()}, pool);
  if (w.bq) {
    ops::add_bias_rows(q_.data(), w.bq, n, H * D);
    ops::add_bias_rows(k_.data(), w.bk, n, KVH * D);
    ops::add_bias_rows(v_.data(), w.bv, n, KVH * D);
  }
  if (w.q_norm) {
    ops::rmsnorm_rows(q_.data(), q_.data(), w.q_norm, static_cast<size_t>(n) * H, D, c.rms_eps);
    ops::rmsnorm_rows(k_.data(), k_.data(), w.k_norm, static_cast<size_t>(n) * KVH, D, c.rms_eps);
  }
  rotary_.apply(l, q_.data(), n, H);
  rotary_.apply(l, k_.data(), n, KVH);
  // Each session stores its rows' keys and values (converting them to its storage type) and
  // attends over its own cache. The stores of several sessions run on the pool unless a hook must
  // see them one at a time; sessions whose policy reads the attention weights then attend one at
  // a time, the others all together, in one parallel region over every (session, KV head).
  args_.resize(segments.size());
  const auto store = [&](size_t i) {
    const Segment& s = segments[i];
    const size_t qo = static_cast<size_t>(seg_row_[i]) * H * D, ko = static_cast<size_t>(seg_row_[i]) * KVH * D;
    args_[i] = s.session->store_rows(l, s.n, q_.data() + qo, k_.data() + ko, v_.data() + ko, pos_.data() + seg_row_[i],
                                     att_.data() + qo);
  };
  const bool hooked = std::any_of(segments.begin(), segments.end(), [](const Segment& s) { return s.session->qk_hook_ != nullptr; });
  if (segments.size() > 1 && !hooked) {
    pool.parallel_for(static_cast<int64_t>(segments.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) store(static_cast<size_t>(i));
    });
  } else {
    for (size_t i = 0; i < segments.size(); ++i) store(i);
  }
  jobs_.clear();
  for (size_t i = 0; i < segments.size(); ++i) {
    Session& ss = *segments[i].session;
    if (ss.attention_needs_stats()) ss.attend_with_stats(args_[i], pool);
    else jobs_.push_back({&ss.cache(), args_[i]});
  }
  kv::attend_fused_many(jobs_, pool);
  evict_layer(l, segments, pool);
  project(w.wo, att_.data(), h_.data(), pool);
  if (w.attn_post_norm) ops::rmsnorm_rows(h_.data(), h_.data(), w.attn_post_norm, n, E, c.rms_eps);
  ops::add(x_.data(), h_.data(), static_cast<size_t>(n) * E);
}

// Streaming eviction of layer l right after its attention: the round reads the layer's keys
// while they are still in the core's caches (after the whole step it read them from memory:
// qfilters_max's scoring took 1.8x its time with hot keys). Each session evicts from its own
// cache with its own compressor, so several sessions evict in parallel.
void Forward::evict_layer(int l, std::span<const Segment> segments, ThreadPool& pool) {
  evicting_.clear();
  for (const Segment& s : segments)
    if (s.session->compressor_) evicting_.push_back(s.session);
  const auto evict = [l](Session* s) { s->compressor_->after_layer(*s->cache_, l); };
  if (evicting_.size() <= 1) {
    if (!evicting_.empty()) evict(evicting_[0]);
    return;
  }
  pool.parallel_for(static_cast<int64_t>(evicting_.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) evict(evicting_[static_cast<size_t>(i)]);
  });
}

void Forward::ffn_block(int l, int n, ThreadPool& pool) {
  const ModelConfig& c = model_.config();
  const LayerWeights& w = model_.layers()[l];
  const int E = c.n_embd;
  ops::rmsnorm_rows(h_.data(), x_.data(), w.ffn_norm, n, E, c.rms_eps);
  project_shared({w.ffn_gate, w.ffn_up}, h_.data(), {ff_a_.data(), ff_b_.data()}, pool);
  ops::gated_activation(ff_a_.data(), ff_b_.data(), static_cast<size_t>(n) * c.n_ff, c.activation);
  project(w.ffn_down, ff_a_.data(), h_.data(), pool);
  if (w.ffn_post_norm) ops::rmsnorm_rows(h_.data(), h_.data(), w.ffn_post_norm, n, E, c.rms_eps);
  ops::add(x_.data(), h_.data(), static_cast<size_t>(n) * E);
}

void Forward::project(const WeightView& w, const float* x, float* y, ThreadPool& pool) const {
  for (const KindRun& r : runs_)
    matmul(w, x + static_cast<size_t>(r.row) * w.cols, r.n, y + static_cast<size_t>(r.row) * w.rows, pool, r.kind);
}

template <size_t N>
void Forward::project_shared(const WeightView (&ws)[N], const float* x, float* const (&ys)[N], ThreadPool& pool) const {
  for (const KindRun& r : runs_) {
    float* out[N];
    for (size_t i = 0; i < N; ++i) out[i] = ys[i] + static_cast<size_t>(r.row) * ws[i].rows;
    matmul_shared_input(ws, x + static_cast<size_t>(r.row) * ws[0].cols, r.n, out, pool, r.kind);
  }
}

// Only the rows whose logits are wanted go through the (large) output matrix, all in one product,
// on the decode engine whatever the rows' kind: a token's logits are computed one way only, and
// the prompt engine would gain nothing on the one row a prompt chunk usually wants.
void Forward::output_logits(std::span<const Segment> segments, ThreadPool& pool) {
  const ModelConfig& c = model_.config();
  const size_t E = c.n_embd, V = c.n_vocab;
  out_rows_.clear();
  int row = 0;
  for (const Segment& s : segments) {
    if (s.logits) {
      for (int t = s.all_logits ? 0 : s.n - 1; t < s.n; ++t) out_rows_.push_back(row + t);
    }
    row += s.n;
  }
  const int k = static_cast<int>(out_rows_.size());
  if (k == 0) return;
  for (int i = 0; i < k; ++i)
    ops::rmsnorm_rows(h_.data() + i * E, x_.data() + out_rows_[i] * E, model_.output_norm(), 1, c.n_embd, c.rms_eps);
  // One segment writes straight into its buffer; several share one product, then scatter.
  const bool direct = segments.size() == 1;
  if (!direct && logits_.size() < static_cast<size_t>(k) * V) logits_.resize(static_cast<size_t>(k) * V);
  float* out = direct ? segments[0].logits : logits_.data();
  matmul(model_.output(), h_.data(), k, out, pool);
  if (c.logit_softcap > 0.0f) ops::softcap(out, static_cast<size_t>(k) * V, c.logit_softcap);
  if (direct) return;
  const float* src = logits_.data();
  for (const Segment& s : segments) {
    if (!s.logits) continue;
    const size_t rows = s.all_logits ? s.n : 1;
    std::memcpy(s.logits, src, rows * V * sizeof(float));
    src += rows * V;
  }
}

}  // namespace qf
