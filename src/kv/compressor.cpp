#include "kv/compressor.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "util/error.h"

namespace qf::kv {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

void CompressionConfig::validate(int n_layers, int n_kv_heads) const {
  if (budget < 0) fail("--kv-budget must be >= 0");
  if (window < 0) fail("--kv-window must be >= 0");
  if (budget > 0 && window >= budget) fail("--kv-window (", window, ") must be smaller than --kv-budget (", budget, ")");
  if (evict_every < 1) fail("--kv-evict-every must be >= 1");
  if (budget > 0 && evict_every > budget - window)
    fail("--kv-evict-every (", evict_every, ") must not exceed budget - window (", budget - window, ")");
  if (!(prefill_ratio >= 0.0f && prefill_ratio < 1.0f)) fail("--kv-ratio must be in [0, 1)");
  if (skip_layers < 0 || skip_layers > n_layers) fail("--kv-skip-layers must be in [0, ", n_layers, "]");
  if (!layer_weights.empty()) {
    const size_t per_head = static_cast<size_t>(n_layers) * n_kv_heads;
    if (layer_weights.size() != static_cast<size_t>(n_layers) && (n_kv_heads < 2 || layer_weights.size() != per_head))
      fail("--layer-weights: ", layer_weights.size(), " weights for a model of ", n_layers, " layers",
           n_kv_heads > 1 ? " (per layer, or " + std::to_string(per_head) + " per KV head)" : std::string());
    for (float w : layer_weights)
      if (!(w > 0.0f) || !std::isfinite(w)) fail("--layer-weights: every weight must be positive and finite (got ", w, ")");
  }
}

Compressor::Compressor(std::unique_ptr<Policy> policy, PolicyOptions options, CompressionConfig config)
    : policy_(std::move(policy)), options_(options), config_(config) {
  if (!policy_) fail("compressor needs a policy");
  compute_shares();
}

void Compressor::configure_layers(std::vector<bool> exempt, int n_kv_heads) {
  exempt_ = std::move(exempt);
  n_kv_heads_ = n_kv_heads;
  compute_shares();
}

bool Compressor::compresses(int layer) const {
  return layer >= config_.skip_layers && !(static_cast<size_t>(layer) < exempt_.size() && exempt_[layer]);
}

void Compressor::compute_shares() {
  const std::vector<float>& w = config_.layer_weights;
  shares_.clear();
  if (w.empty()) return;
  // Per KV head only with n_layers x n_kv_heads weights (configure_layers gives both counts).
  const bool per_layer = n_kv_heads_ < 2 || w.size() != exempt_.size() * n_kv_heads_;
  share_heads_ = per_layer ? 1 : n_kv_heads_;
  const int n_layers = static_cast<int>(w.size()) / share_heads_;
  double sum = 0;
  int n = 0;
  for (int l = 0; l < n_layers; ++l)
    if (compresses(l))
      for (int h = 0; h < share_heads_; ++h) sum += w[static_cast<size_t>(l) * share_heads_ + h], ++n;
  shares_.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) shares_[i] = n ? w[i] * n / sum : 1.0;
}

int Compressor::capacity(int layer, int kv_head, int n_ctx, int max_step) const {
  if (!compresses(layer) || config_.budget <= 0 || config_.prefill_ratio > 0) return n_ctx;
  return std::min(n_ctx, head_budget(layer, kv_head) + max_step);
}

int Compressor::capacity(int layer, int n_ctx, int max_step) const {
  int most = capacity(layer, 0, n_ctx, max_step);
  for (int h = 1; h < share_heads_; ++h) most = std::max(most, capacity(layer, h, n_ctx, max_step));
  return most;
}

double Compressor::head_share(int layer, int kv_head) const {
  if (shares_.empty()) return 1.0;
  return shares_.at(static_cast<size_t>(layer) * share_heads_ + (share_heads_ > 1 ? kv_head : 0));
}

int Compressor::head_budget(int layer, int kv_head) const {
  if (shares_.empty()) return config_.budget;
  return std::max(config_.window + 1, static_cast<int>(std::lround(config_.budget * head_share(layer, kv_head))));
}

void Compressor::after_step(Cache& cache) {
  if (config_.budget <= 0) return;
  const int n_kv = cache.shape().n_kv_heads;
  targets_.resize(n_kv);
  for (int l = config_.skip_layers; l < cache.shape().n_layers; ++l) {
    if (!compresses(l)) continue;
    // Once a head is over its budget, every head above budget - (evict_every - 1) goes down to it.
    bool over = false;
    for (int h = 0; h < n_kv; ++h) {
      const int budget = head_budget(l, h);
      targets_[h] = std::max(config_.window, budget - (config_.evict_every - 1));
      over |= cache.head(l, h).n > budget;
    }
    if (over) compress_layer(cache, l, targets_, config_.window);
  }
}

void Compressor::after_prefill(Cache& cache, int n_prompt) {
  if (config_.prefill_ratio <= 0) return;
  const int n_kv = cache.shape().n_kv_heads;
  targets_.resize(n_kv);
  for (int l = config_.skip_layers; l < cache.shape().n_layers; ++l) {
    if (!compresses(l)) continue;
    for (int h = 0; h < n_kv; ++h) {
      const int n = cache.head(l, h).n;
      const double kept = static_cast<double>(std::min(n, n_prompt)) * (1.0 - config_.prefill_ratio) * head_share(l, h);
      targets_[h] = std::clamp(static_cast<int>(kept), 1, std::max(n, 1));
    }
    compress_layer(cache, l, targets_, config_.window);
  }
}

void Compressor::compress_layer(Cache& cache, int layer, int target, int keep_recent) {
  if (keep_recent > target) fail("compress_layer: keep_recent > target");
  targets_.assign(cache.shape().n_kv_heads, target);
  compress_layer(cache, layer, std::span<const int>(targets_), keep_recent);
}

void Compressor::compress_layer(Cache& cache, int layer, std::span<const int> targets, int keep_recent) {
  if (targets.size() != static_cast<size_t>(cache.shape().n_kv_heads)) fail("compress_layer: one target per KV head expected");
  auto t0 = std::chrono::steady_clock::now();
  policy_->score_layer(cache, layer, scores_);
  stats_.score_seconds += seconds_since(t0);

  t0 = std::chrono::steady_clock::now();
  bool any = false;
  for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
    const int n = cache.head(layer, h).n, target = targets[h], keep = std::min(keep_recent, target);
    if (n <= target) continue;
    any = true;
    const int n_old = n - keep, n_keep_old = target - keep;
    const std::vector<float>& s = scores_[h];
    order_.resize(n_old);
    for (int i = 0; i < n_old; ++i) order_[i] = i;
    // Descending score; among equal scores the newer slot ranks first. NaN ranks last.
    auto better = [&](int a, int b) {
      const float sa = s[a], sb = s[b];
      if (sa != sb && !(std::isnan(sa) && std::isnan(sb))) {  // two NaNs tie like equal scores
        if (std::isnan(sa)) return false;
        if (std::isnan(sb)) return true;
        return sa > sb;
      }
      return a > b;
    };
    // Select the slots to evict, usually few (evict_every), with a heap: O(n log k), and no
    // sort of the kept ones, which cost more than scoring a streaming round. (nth_element's
    // median-of-3 pivot degenerated on streaming's sinks-then-ascending scores: 3x slower.)
    const int n_evict = n_old - n_keep_old;
    auto worse = [&](int a, int b) { return better(b, a); };
    std::partial_sort(order_.begin(), order_.begin() + n_evict, order_.end(), worse);
    std::sort(order_.begin(), order_.begin() + n_evict);
    keep_.clear();
    for (int i = 0, e = 0; i < n; ++i) {
      if (e < n_evict && order_[e] == i) ++e;
      else keep_.push_back(i);
    }
    cache.retain(layer, h, keep_);
    stats_.evicted += n - target;
  }
  // Window statistics (snapkv) observe the queries since the layer's last scoring round.
  const AttentionStats want = needs();
  if (want.window > 0 && !want.accumulate)
    for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
      HeadCache& hc = cache.head(layer, h);
      std::fill(hc.attn_sum.begin(), hc.attn_sum.end(), 0.0f);
    }
  if (any) ++stats_.evictions;
  stats_.evict_seconds += seconds_since(t0);
}

}  // namespace qf::kv
