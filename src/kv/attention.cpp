#include "kv/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "tensor/attention_kernel.h"
#include "util/error.h"

namespace qf::kv {

namespace {

// Slots visible to a query at position p: positions increase with the slot index.
int visible_slots(const HeadCache& hc, int32_t p) {
  return static_cast<int>(std::upper_bound(hc.pos.begin(), hc.pos.begin() + hc.n, p) - hc.pos.begin());
}

// First slot a query at p sees: positions > p - window.
int first_in_window(const HeadCache& hc, int32_t p, int window) {
  if (window <= 0) return 0;
  return static_cast<int>(std::lower_bound(hc.pos.begin(), hc.pos.begin() + hc.n, p - window + 1) - hc.pos.begin());
}

// Tokens [0, result) of the call see, in every head, a prefix of the slots (the window cuts
// nothing off). Positions increase along the call, so the rest are all cut.
int uncut_tokens(const Cache& cache, const AttentionArgs& a) {
  if (a.window <= 0) return a.n_tok;
  for (int t = 0; t < a.n_tok; ++t)
    for (int g = 0; g < cache.shape().n_kv_heads; ++g)
      if (first_in_window(cache.head(a.layer, g), a.q_pos[t], a.window) > 0) return t;
  return a.n_tok;
}

// One query token's view of each head: slots [first[g], visible), shifted so that it is a prefix.
std::vector<AttentionKv> window_views(const Cache& cache, int layer, int32_t p, int window, std::vector<int>& first,
                                      std::vector<int>& visible) {
  const int nkv = cache.shape().n_kv_heads;
  const size_t d = cache.shape().head_dim;
  first.resize(nkv);
  visible.resize(nkv);
  std::vector<AttentionKv> heads(nkv);
  for (int g = 0; g < nkv; ++g) {
    const HeadCache& hc = cache.head(layer, g);
    first[g] = first_in_window(hc, p, window);
    visible[g] = std::max(0, visible_slots(hc, p) - first[g]);
    heads[g] = {hc.k.data() + first[g] * d, hc.v.data() + first[g] * d, &visible[g]};
  }
  return heads;
}

void check_args(const Cache& cache, const AttentionArgs& a) {
  const int nkv = cache.shape().n_kv_heads;
  if (a.n_heads <= 0 || a.n_heads % nkv != 0) fail("attention: ", a.n_heads, " query heads do not group over ", nkv, " KV heads");
  if (a.layer < 0 || a.layer >= cache.shape().n_layers) fail("attention: layer out of range");
}

}  // namespace

std::vector<AttentionKv> layer_views(const Cache& cache, int layer, std::span<const int32_t> q_pos,
                                     std::vector<int>& visible) {
  const int nkv = cache.shape().n_kv_heads;
  const size_t n_tok = q_pos.size();
  visible.resize(static_cast<size_t>(nkv) * n_tok);
  std::vector<AttentionKv> heads(nkv);
  for (int g = 0; g < nkv; ++g) {
    const HeadCache& hc = cache.head(layer, g);
    int* vis = visible.data() + g * n_tok;
    for (size_t t = 0; t < n_tok; ++t) vis[t] = visible_slots(hc, q_pos[t]);
    heads[g] = {hc.k.data(), hc.v.data(), vis};
  }
  return heads;
}

void attend_fused(const Cache& cache, const AttentionArgs& a, ThreadPool& pool) {
  check_args(cache, a);
  const int nkv = cache.shape().n_kv_heads, d = cache.shape().head_dim;
  if (a.n_tok <= 0) return;
  const int n_uncut = uncut_tokens(cache, a);
  std::vector<int> visible, first;
  if (n_uncut > 0) {
    const std::vector<AttentionKv> heads = layer_views(cache, a.layer, {a.q_pos, static_cast<size_t>(n_uncut)}, visible);
    attention_f32(a.q, n_uncut, a.n_heads, heads.data(), nkv, d, a.scale, a.out, pool);
  }
  const size_t tok_stride = static_cast<size_t>(a.n_heads) * d;
  for (int t = n_uncut; t < a.n_tok; ++t) {
    const std::vector<AttentionKv> heads = window_views(cache, a.layer, a.q_pos[t], a.window, first, visible);
    attention_f32(a.q + t * tok_stride, 1, a.n_heads, heads.data(), nkv, d, a.scale, a.out + t * tok_stride, pool);
  }
}

namespace {

// Statistics columns of each head of `layer`, from slot first[g] on (all slots: first empty).
std::vector<AttentionColumns> stat_columns(Cache& cache, int layer, bool last_query, const std::vector<int>& first) {
  std::vector<AttentionColumns> cols(cache.shape().n_kv_heads);
  for (int g = 0; g < static_cast<int>(cols.size()); ++g) {
    HeadCache& hc = cache.head(layer, g);
    const int f = first.empty() ? 0 : first[g];
    AttentionColumns& c = cols[g];
    c.n_keys = hc.n - f;
    if (!hc.attn_sum.empty()) {
      c.sum = hc.attn_sum.data() + f;
      if (!hc.attn_cnt.empty()) c.cnt = hc.attn_cnt.data() + f;
    }
    if (last_query && !hc.attn_last.empty()) c.last = hc.attn_last.data() + f;
  }
  return cols;
}

}  // namespace

void attend_with_stats(Cache& cache, const AttentionArgs& a, ThreadPool& pool) {
  check_args(cache, a);
  const int nkv = cache.shape().n_kv_heads, d = cache.shape().head_dim;
  if (a.n_tok <= 0) return;
  const bool last_query = cache.stats().last_query;
  const int n_uncut = uncut_tokens(cache, a);
  std::vector<uint8_t> counted(a.n_tok);
  for (int t = 0; t < a.n_tok; ++t) counted[t] = a.q_pos[t] >= a.accumulate_from_pos;
  std::vector<int> visible, first;
  if (n_uncut > 0) {
    const std::vector<AttentionKv> heads = layer_views(cache, a.layer, {a.q_pos, static_cast<size_t>(n_uncut)}, visible);
    // attn_last belongs to the call's last query: written here only if no cut query follows.
    const std::vector<AttentionColumns> cols = stat_columns(cache, a.layer, last_query && n_uncut == a.n_tok, {});
    attention_stats_f32(a.q, n_uncut, a.n_heads, heads.data(), nkv, d, a.scale, counted.data(), cols.data(), a.out,
                        pool);
  }
  const size_t tok_stride = static_cast<size_t>(a.n_heads) * d;
  for (int t = n_uncut; t < a.n_tok; ++t) {
    const std::vector<AttentionKv> heads = window_views(cache, a.layer, a.q_pos[t], a.window, first, visible);
    const bool last = last_query && t == a.n_tok - 1;
    const std::vector<AttentionColumns> cols = stat_columns(cache, a.layer, last, first);
    if (last)  // the kernel zeroes the view's part; the slots before it get no weight either
      for (int g = 0; g < nkv; ++g) std::fill_n(cache.head(a.layer, g).attn_last.begin(), first[g], 0.0f);
    attention_stats_f32(a.q + t * tok_stride, 1, a.n_heads, heads.data(), nkv, d, a.scale, &counted[t], cols.data(),
                        a.out + t * tok_stride, pool);
  }
}

void attend_reference(const Cache& cache, const AttentionArgs& a) {
  check_args(cache, a);
  const int d = cache.shape().head_dim;
  const int group = a.n_heads / cache.shape().n_kv_heads;
  for (int t = 0; t < a.n_tok; ++t) {
    for (int h = 0; h < a.n_heads; ++h) {
      const HeadCache& hc = cache.head(a.layer, h / group);
      const size_t off = (static_cast<size_t>(t) * a.n_heads + h) * d;
      std::vector<double> s;
      std::vector<int> idx;
      for (int j = 0; j < hc.n; ++j) {
        if (hc.pos[j] > a.q_pos[t]) continue;
        if (a.window > 0 && hc.pos[j] <= a.q_pos[t] - a.window) continue;
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += static_cast<double>(a.q[off + i]) * hc.key(j, d)[i];
        s.push_back(dot * a.scale);
        idx.push_back(j);
      }
      const double mx = s.empty() ? 0.0 : *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int i = 0; i < d; ++i) {
        double o = 0;
        for (size_t j = 0; j < s.size(); ++j) o += s[j] / sum * hc.value(idx[j], d)[i];
        a.out[off + i] = static_cast<float>(o);
      }
    }
  }
}

}  // namespace qf::kv
