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

void CompressionConfig::validate(int n_layers) const {
  if (budget < 0) fail("--kv-budget must be >= 0");
  if (window < 0) fail("--kv-window must be >= 0");
  if (budget > 0 && window >= budget) fail("--kv-window (", window, ") must be smaller than --kv-budget (", budget, ")");
  if (evict_every < 1) fail("--kv-evict-every must be >= 1");
  if (budget > 0 && evict_every > budget - window)
    fail("--kv-evict-every (", evict_every, ") must not exceed budget - window (", budget - window, ")");
  if (!(prefill_ratio >= 0.0f && prefill_ratio < 1.0f)) fail("--kv-ratio must be in [0, 1)");
  if (skip_layers < 0 || skip_layers > n_layers) fail("--kv-skip-layers must be in [0, ", n_layers, "]");
  if (!layer_weights.empty()) {
    if (layer_weights.size() != static_cast<size_t>(n_layers))
      fail("--layer-weights: ", layer_weights.size(), " weights for a model of ", n_layers, " layers");
    for (float w : layer_weights)
      if (!(w > 0.0f) || !std::isfinite(w)) fail("--layer-weights: every weight must be positive and finite (got ", w, ")");
  }
}

Compressor::Compressor(std::unique_ptr<Policy> policy, PolicyOptions options, CompressionConfig config)
    : policy_(std::move(policy)), options_(options), config_(config) {
  if (!policy_) fail("compressor needs a policy");
}

bool Compressor::compresses(int layer) const {
  return layer >= config_.skip_layers && !(static_cast<size_t>(layer) < exempt_.size() && exempt_[layer]);
}

int Compressor::capacity(int layer, int n_ctx, int max_step) const {
  if (!compresses(layer) || config_.budget <= 0 || config_.prefill_ratio > 0) return n_ctx;
  return std::min(n_ctx, layer_budget(layer) + max_step);
}

double Compressor::layer_share(int layer) const {
  const std::vector<float>& w = config_.layer_weights;
  if (w.empty()) return 1.0;
  double sum = 0;
  int n = 0;
  for (int l = 0; l < static_cast<int>(w.size()); ++l)
    if (compresses(l)) sum += w[l], ++n;
  return n ? w.at(layer) * n / sum : 1.0;
}

int Compressor::layer_budget(int layer) const {
  if (config_.layer_weights.empty()) return config_.budget;
  return std::max(config_.window + 1, static_cast<int>(std::lround(config_.budget * layer_share(layer))));
}

void Compressor::after_step(Cache& cache) {
  for (int l = 0; l < cache.shape().n_layers; ++l) after_layer(cache, l);
}

void Compressor::after_layer(Cache& cache, int l) {
  if (config_.budget <= 0 || l < config_.skip_layers || !compresses(l)) return;
  const int budget = layer_budget(l);
  bool over = false;
  for (int h = 0; h < cache.shape().n_kv_heads; ++h) over |= cache.head(l, h).n > budget;
  if (over) compress_layer(cache, l, std::max(config_.window, budget - (config_.evict_every - 1)), config_.window);
}

void Compressor::after_prefill(Cache& cache, int n_prompt) {
  if (config_.prefill_ratio <= 0) return;
  for (int l = config_.skip_layers; l < cache.shape().n_layers; ++l) {
    if (!compresses(l)) continue;
    // All heads of a layer hold the same count before compression.
    const int n = cache.head(l, 0).n;
    const double kept = static_cast<double>(std::min(n, n_prompt)) * (1.0 - config_.prefill_ratio) * layer_share(l);
    const int target = std::clamp(static_cast<int>(kept), 1, std::max(n, 1));
    compress_layer(cache, l, target, std::min(config_.window, target));
  }
}

void Compressor::compress_layer(Cache& cache, int layer, int target, int keep_recent) {
  if (keep_recent > target) fail("compress_layer: keep_recent > target");
  auto t0 = std::chrono::steady_clock::now();
  policy_->score_layer(cache, layer, scores_);
  stats_.score_seconds += seconds_since(t0);

  t0 = std::chrono::steady_clock::now();
  bool any = false;
  for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
    const int n = cache.head(layer, h).n;
    if (n <= target) continue;
    any = true;
    const int n_old = n - keep_recent, n_keep_old = target - keep_recent;
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
