#include "model/session.h"

#include <algorithm>
#include <cmath>

#include "kv/attention.h"
#include "util/error.h"

namespace qf {

namespace {

void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * inv * w[i];
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

Session::Session(const Model& model, SessionOptions opt)
    : model_(model),
      pool_(opt.n_threads),
      n_ctx_(opt.n_ctx > 0 ? opt.n_ctx : model.config().n_ctx_train),
      n_batch_(std::max(1, opt.n_batch)),
      compressor_(std::move(opt.compressor)) {
  const ModelConfig& c = model.config();
  n_batch_ = std::min(n_batch_, n_ctx_);
  kv::AttentionStats stats;
  std::vector<int> capacity(c.n_layers, n_ctx_);
  if (compressor_) {
    compressor_->config().validate(c.n_layers);
    stats = compressor_->needs();
    for (int l = 0; l < c.n_layers; ++l) capacity[l] = compressor_->capacity(l, n_ctx_, n_batch_);
  }
  stats.accumulate |= opt.stats.accumulate;
  stats.last_query |= opt.stats.last_query;
  stats.window = std::max(stats.window, opt.stats.window);
  cache_ = std::make_unique<kv::Cache>(kv::CacheShape{c.n_layers, c.n_kv_heads, c.head_dim}, capacity, stats,
                                       opt.kv_types);

  // Rotary frequencies: pairs (2i, 2i+1) rotate by pos * base^(-2i/n_rot) (GGUF's row order).
  inv_freq_.resize(c.n_rot / 2);
  for (int i = 0; i < c.n_rot / 2; ++i) {
    double f = std::pow(static_cast<double>(c.rope_base), -2.0 * i / c.n_rot);
    if (model.rope_freq_factors()) f /= model.rope_freq_factors()[i];
    inv_freq_[i] = f / c.rope_scale;
  }

  const size_t nb = n_batch_;
  x_.resize(nb * c.n_embd);
  h_.resize(nb * std::max(c.n_embd, c.n_heads * c.head_dim));
  q_.resize(nb * c.n_heads * c.head_dim);
  k_.resize(nb * c.n_kv_heads * c.head_dim);
  v_.resize(nb * c.n_kv_heads * c.head_dim);
  att_.resize(nb * c.n_heads * c.head_dim);
  ff_a_.resize(nb * c.n_ff);
  ff_b_.resize(nb * c.n_ff);
  pos_.resize(nb);
}

void Session::reset() {
  cache_->clear();
  n_past_ = 0;
  prompt_end_ = 0;
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
    }
  to.queries_seen = from.queries_seen;
  n_past_ = src.n_past_;
  prompt_end_ = src.prompt_end_;
}

std::span<const float> Session::prefill(std::span<const int32_t> tokens) {
  if (tokens.empty()) fail("empty prompt");
  prompt_end_ = n_past_ + static_cast<int>(tokens.size());
  auto logits = eval(tokens, false);
  if (compressor_) compressor_->after_prefill(*cache_, static_cast<int>(tokens.size()));
  return logits;
}

std::span<const float> Session::eval(std::span<const int32_t> tokens, bool all_logits) {
  const ModelConfig& c = model_.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return {};
  if (n_past_ + n > n_ctx_)
    fail("sequence of ", n_past_ + n, " tokens exceeds the context of ", n_ctx_, " (raise -c)");
  for (int32_t t : tokens)
    if (t < 0 || t >= c.n_vocab) fail("token id ", t, " is outside the vocabulary (", c.n_vocab, ")");
  const size_t rows = all_logits ? static_cast<size_t>(n) : 1;
  if (logits_.size() < rows * c.n_vocab) logits_.resize(rows * c.n_vocab);
  for (int64_t i = 0; i < n; i += n_batch_) {
    const int m = static_cast<int>(std::min<int64_t>(n_batch_, n - i));
    const bool last_chunk = i + m == n;
    float* out = all_logits ? logits_.data() + static_cast<size_t>(i) * c.n_vocab : (last_chunk ? logits_.data() : nullptr);
    forward_chunk(tokens.data() + i, m, out, all_logits);
    if (compressor_) compressor_->after_step(*cache_);
  }
  return {logits_.data(), rows * c.n_vocab};
}

void Session::forward_chunk(const int32_t* tokens, int n, float* logits, bool all_logits) {
  const ModelConfig& c = model_.config();
  const int E = c.n_embd, D = c.head_dim, H = c.n_heads, KVH = c.n_kv_heads;
  for (int t = 0; t < n; ++t) {
    pos_[t] = n_past_ + t;
    dequantize_row(model_.token_embd(), tokens[t], x_.data() + static_cast<size_t>(t) * E);
  }

  // Rotary table for this chunk; pairs (2i, 2i+1) of the first n_rot dimensions rotate.
  const int half = c.n_rot / 2;
  rope_cos_.resize(static_cast<size_t>(n) * half);
  rope_sin_.resize(static_cast<size_t>(n) * half);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < half; ++i) {
      const double theta = static_cast<double>(pos_[t]) * inv_freq_[i];
      rope_cos_[static_cast<size_t>(t) * half + i] = static_cast<float>(std::cos(theta));
      rope_sin_[static_cast<size_t>(t) * half + i] = static_cast<float>(std::sin(theta));
    }
  auto rope = [&](float* v, int n_head_vecs) {
    for (int t = 0; t < n; ++t) {
      const float* cs = &rope_cos_[static_cast<size_t>(t) * half];
      const float* sn = &rope_sin_[static_cast<size_t>(t) * half];
      for (int h = 0; h < n_head_vecs; ++h) {
        float* p = v + (static_cast<size_t>(t) * n_head_vecs + h) * D;
        for (int i = 0; i < half; ++i) {
          const float a = p[2 * i], b = p[2 * i + 1];
          p[2 * i] = a * cs[i] - b * sn[i];
          p[2 * i + 1] = a * sn[i] + b * cs[i];
        }
      }
    }
  };

  const bool with_stats = cache_->stats().accumulate || cache_->stats().last_query || cache_->stats().window > 0;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = model_.layers()[l];
    for (int t = 0; t < n; ++t) rmsnorm(&h_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E], w.attn_norm, E, c.rms_eps);
    matmul(w.wq, h_.data(), n, q_.data(), pool_);
    matmul(w.wk, h_.data(), n, k_.data(), pool_);
    matmul(w.wv, h_.data(), n, v_.data(), pool_);
    rope(q_.data(), H);
    rope(k_.data(), KVH);
    if (qk_hook_) qk_hook_(l, q_.data(), k_.data(), pos_.data(), n);
    cache_->append(l, k_.data(), v_.data(), pos_.data(), n);

    kv::AttentionArgs args;
    args.layer = l;
    args.n_heads = H;
    args.scale = 1.0f / std::sqrt(static_cast<float>(D));
    args.n_tok = n;
    args.q = q_.data();
    args.q_pos = pos_.data();
    args.out = att_.data();
    if (with_stats) {
      // snapkv observes only the last `window` queries of the prompt; h2o every query.
      const int window = cache_->stats().window;
      args.accumulate_from_pos = window > 0 ? std::max(0, prompt_end_ - window) : 0;
      kv::attend_with_stats(*cache_, args, pool_);
    } else {
      kv::attend_fused(*cache_, args, pool_);
    }

    matmul(w.wo, att_.data(), n, h_.data(), pool_);
    for (size_t i = 0; i < static_cast<size_t>(n) * E; ++i) x_[i] += h_[i];

    for (int t = 0; t < n; ++t) rmsnorm(&h_[static_cast<size_t>(t) * E], &x_[static_cast<size_t>(t) * E], w.ffn_norm, E, c.rms_eps);
    matmul(w.ffn_gate, h_.data(), n, ff_a_.data(), pool_);
    matmul(w.ffn_up, h_.data(), n, ff_b_.data(), pool_);
    for (size_t i = 0; i < static_cast<size_t>(n) * c.n_ff; ++i) ff_a_[i] = silu(ff_a_[i]) * ff_b_[i];
    matmul(w.ffn_down, ff_a_.data(), n, h_.data(), pool_);
    for (size_t i = 0; i < static_cast<size_t>(n) * E; ++i) x_[i] += h_[i];
  }
  n_past_ += n;

  if (!logits) return;
  // Only the rows whose logits are wanted go through the (large) output matrix.
  const int first = all_logits ? 0 : n - 1;
  const int rows = n - first;
  for (int t = first; t < n; ++t)
    rmsnorm(&h_[static_cast<size_t>(t - first) * E], &x_[static_cast<size_t>(t) * E], model_.output_norm(), E, c.rms_eps);
  matmul(model_.output(), h_.data(), rows, logits, pool_);
}

}  // namespace qf
