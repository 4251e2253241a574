#include "kv/cache.h"

#include <algorithm>
#include <cstring>

#include "util/error.h"

namespace qf::kv {

Cache::Cache(CacheShape shape, std::vector<int> capacity, AttentionStats stats)
    : shape_(shape), capacity_(std::move(capacity)), stats_(stats) {
  if (shape_.n_layers <= 0 || shape_.n_kv_heads <= 0 || shape_.head_dim <= 0)
    fail("kv cache: invalid shape");
  if (static_cast<int>(capacity_.size()) != shape_.n_layers) fail("kv cache: one capacity per layer expected");
  heads_.resize(static_cast<size_t>(shape_.n_layers) * shape_.n_kv_heads);
  const bool need_sum = stats_.accumulate || stats_.window > 0;
  for (int l = 0; l < shape_.n_layers; ++l) {
    if (capacity_[l] <= 0) fail("kv cache: capacity of layer ", l, " must be positive");
    const size_t cap = static_cast<size_t>(capacity_[l]);
    for (int h = 0; h < shape_.n_kv_heads; ++h) {
      HeadCache& hc = head(l, h);
      hc.k.assign(cap * shape_.head_dim, 0.0f);
      hc.v.assign(cap * shape_.head_dim, 0.0f);
      hc.pos.assign(cap, 0);
      if (need_sum) hc.attn_sum.assign(cap, 0.0f);
      if (stats_.accumulate) hc.attn_cnt.assign(cap, 0);
      if (stats_.last_query) hc.attn_last.assign(cap, 0.0f);
    }
  }
}

void Cache::append(int layer, const float* k, const float* v, const int32_t* pos, int n_tok) {
  const int d = shape_.head_dim, nkv = shape_.n_kv_heads;
  if (layer < 0 || layer >= shape_.n_layers || n_tok < 0) fail("kv cache: append to layer ", layer, " of ", n_tok, " tokens");
  // Check every head before writing any: heads may hold different counts after eviction.
  for (int h = 0; h < nkv; ++h) {
    const HeadCache& hc = head(layer, h);
    if (hc.n + n_tok > capacity_[layer])
      fail("kv cache full: layer ", layer, " holds ", hc.n, " tokens, capacity ", capacity_[layer],
           ", cannot add ", n_tok);
  }
  // Attention finds a query's visible slots by binary search on position.
  for (int t = 0; t < n_tok; ++t) {
    int32_t prev = t > 0 ? pos[t - 1] : -1;
    for (int h = 0; t == 0 && h < nkv; ++h)
      if (head(layer, h).n > 0) prev = std::max(prev, head(layer, h).pos[head(layer, h).n - 1]);
    if (pos[t] <= prev) fail("kv cache: positions must increase (layer ", layer, ": ", pos[t], " after ", prev, ")");
  }
  for (int h = 0; h < nkv; ++h) {
    HeadCache& hc = head(layer, h);
    for (int t = 0; t < n_tok; ++t) {
      const size_t src = (static_cast<size_t>(t) * nkv + h) * d;
      std::memcpy(hc.k.data() + static_cast<size_t>(hc.n) * d, k + src, d * sizeof(float));
      std::memcpy(hc.v.data() + static_cast<size_t>(hc.n) * d, v + src, d * sizeof(float));
      hc.pos[hc.n] = pos[t];
      if (!hc.attn_sum.empty()) hc.attn_sum[hc.n] = 0.0f;
      if (!hc.attn_cnt.empty()) hc.attn_cnt[hc.n] = 0;
      if (!hc.attn_last.empty()) hc.attn_last[hc.n] = 0.0f;
      ++hc.n;
    }
  }
}

void Cache::retain(int layer, int kv_head, std::span<const int> keep) {
  if (layer < 0 || layer >= shape_.n_layers || kv_head < 0 || kv_head >= shape_.n_kv_heads)
    fail("kv cache: retain() on layer ", layer, " head ", kv_head, " out of range");
  HeadCache& hc = head(layer, kv_head);
  const int d = shape_.head_dim;
  int out = 0, prev = -1;
  for (int slot : keep) {
    // Strictly ascending: a repeated slot would duplicate a token.
    if (slot <= prev || slot >= hc.n) fail("kv cache: retain() needs strictly ascending slots inside the cache");
    prev = slot;
    if (slot != out) {
      std::memmove(hc.k.data() + static_cast<size_t>(out) * d, hc.k.data() + static_cast<size_t>(slot) * d,
                   d * sizeof(float));
      std::memmove(hc.v.data() + static_cast<size_t>(out) * d, hc.v.data() + static_cast<size_t>(slot) * d,
                   d * sizeof(float));
      hc.pos[out] = hc.pos[slot];
      if (!hc.attn_sum.empty()) hc.attn_sum[out] = hc.attn_sum[slot];
      if (!hc.attn_cnt.empty()) hc.attn_cnt[out] = hc.attn_cnt[slot];
      if (!hc.attn_last.empty()) hc.attn_last[out] = hc.attn_last[slot];
    }
    ++out;
  }
  hc.n = out;
}

void Cache::clear() {
  for (auto& hc : heads_) hc.n = 0;
  queries_seen = 0;
}

int64_t Cache::tokens_held() const {
  int64_t n = 0;
  for (const auto& hc : heads_) n += hc.n;
  return n;
}

int64_t Cache::bytes_used() const {
  return tokens_held() * shape_.head_dim * 2 * static_cast<int64_t>(sizeof(float));
}

int64_t Cache::bytes_reserved() const {
  int64_t slots = 0;
  for (int l = 0; l < shape_.n_layers; ++l) slots += static_cast<int64_t>(capacity_[l]) * shape_.n_kv_heads;
  return slots * shape_.head_dim * 2 * static_cast<int64_t>(sizeof(float));
}

int64_t Cache::full_cache_bytes(int64_t n_tokens) const {
  return n_tokens * shape_.n_layers * shape_.n_kv_heads * shape_.head_dim * 2 * static_cast<int64_t>(sizeof(float));
}

}  // namespace qf::kv
