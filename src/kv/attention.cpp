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

// First slot a query at position p sees with a sliding window: the first position > p - window.
int first_window_slot(const HeadCache& hc, int32_t p, int window) {
  const int64_t oldest = static_cast<int64_t>(p) - window;  // excluded
  return static_cast<int>(std::upper_bound(hc.pos.begin(), hc.pos.begin() + hc.n, oldest,
                                           [](int64_t a, int32_t b) { return a < b; }) - hc.pos.begin());
}

bool sees(int32_t key_pos, int32_t q_pos, int window) {
  return key_pos <= q_pos && (window <= 0 || static_cast<int64_t>(key_pos) > static_cast<int64_t>(q_pos) - window);
}

void check_args(const Cache& cache, const AttentionArgs& a) {
  const int nkv = cache.shape().n_kv_heads;
  if (a.n_heads <= 0 || a.n_heads % nkv != 0) fail("attention: ", a.n_heads, " query heads do not group over ", nkv, " KV heads");
  if (a.layer < 0 || a.layer >= cache.shape().n_layers) fail("attention: layer out of range");
  if (a.window < 0) fail("attention: negative sliding window ", a.window);
}

}  // namespace

std::vector<AttentionKv> layer_views(const Cache& cache, int layer, std::span<const int32_t> q_pos,
                                     std::vector<int>& slots, int window) {
  const int nkv = cache.shape().n_kv_heads;
  const size_t n_tok = q_pos.size(), per_layer = static_cast<size_t>(nkv) * n_tok;
  slots.resize(window > 0 ? 2 * per_layer : per_layer);
  std::vector<AttentionKv> heads(nkv);
  for (int g = 0; g < nkv; ++g) {
    const HeadCache& hc = cache.head(layer, g);
    int* vis = slots.data() + g * n_tok;
    int* first = window > 0 ? slots.data() + per_layer + g * n_tok : nullptr;
    for (size_t t = 0; t < n_tok; ++t) {
      vis[t] = visible_slots(hc, q_pos[t]);
      if (first) first[t] = std::min(vis[t], first_window_slot(hc, q_pos[t], window));
    }
    heads[g] = {hc.keys(), hc.values(), vis, first};
  }
  return heads;
}

void attend_fused(const Cache& cache, const AttentionArgs& a, ThreadPool& pool) {
  check_args(cache, a);
  const int nkv = cache.shape().n_kv_heads;
  if (a.n_tok <= 0) return;
  std::vector<int> visible;
  const std::vector<AttentionKv> heads =
      layer_views(cache, a.layer, {a.q_pos, static_cast<size_t>(a.n_tok)}, visible, a.window);
  attention_f32(a.q, a.n_tok, a.n_heads, heads.data(), nkv, cache.shape().head_dim, a.scale, a.out, pool);
}

void attend_fused_many(std::span<const AttentionJob> jobs, ThreadPool& pool) {
  std::vector<std::vector<int>> slots(jobs.size());
  std::vector<std::vector<AttentionKv>> views(jobs.size());
  std::vector<AttentionCall> calls;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const Cache& cache = *jobs[i].cache;
    const AttentionArgs& a = jobs[i].args;
    check_args(cache, a);
    if (a.n_tok <= 0) continue;
    views[i] = layer_views(cache, a.layer, {a.q_pos, static_cast<size_t>(a.n_tok)}, slots[i], a.window);
    calls.push_back({a.q, a.n_tok, a.n_heads, views[i].data(), cache.shape().n_kv_heads, cache.shape().head_dim,
                     a.scale, a.out});
  }
  attention_f32_many(calls.data(), static_cast<int>(calls.size()), pool);
}

void attend_with_stats(Cache& cache, const AttentionArgs& a, ThreadPool& pool) {
  check_args(cache, a);
  const int nkv = cache.shape().n_kv_heads;
  if (a.n_tok <= 0) return;
  const AttentionStats& st = cache.stats();
  std::vector<int> visible;
  const std::vector<AttentionKv> heads =
      layer_views(cache, a.layer, {a.q_pos, static_cast<size_t>(a.n_tok)}, visible, a.window);
  std::vector<AttentionColumns> cols(nkv);
  for (int g = 0; g < nkv; ++g) {
    HeadCache& hc = cache.head(a.layer, g);
    AttentionColumns& c = cols[g];
    c.n_keys = hc.n;
    if (!hc.attn_sum.empty()) {
      c.sum = hc.attn_sum.data();
      if (!hc.attn_cnt.empty()) c.cnt = hc.attn_cnt.data();
    }
    if (st.last_query && !hc.attn_last.empty()) c.last = hc.attn_last.data();
  }
  std::vector<uint8_t> counted(a.n_tok);
  for (int t = 0; t < a.n_tok; ++t) counted[t] = a.q_pos[t] >= a.accumulate_from_pos;
  attention_stats_f32(a.q, a.n_tok, a.n_heads, heads.data(), nkv, cache.shape().head_dim, a.scale, counted.data(),
                      cols.data(), a.out, pool);
}

void attend_reference(const Cache& cache, const AttentionArgs& a) {
  check_args(cache, a);
  const int d = cache.shape().head_dim;
  const int group = a.n_heads / cache.shape().n_kv_heads;
  // Every head's keys and values as floats, converted one row at a time by the scalar path.
  std::vector<std::vector<float>> keys, values;
  for (int g = 0; g < cache.shape().n_kv_heads; ++g) {
    keys.push_back(keys_f32(cache.head(a.layer, g), d));
    values.push_back(values_f32(cache.head(a.layer, g), d));
  }
  for (int t = 0; t < a.n_tok; ++t) {
    for (int h = 0; h < a.n_heads; ++h) {
      const HeadCache& hc = cache.head(a.layer, h / group);
      const float* key = keys[h / group].data();
      const float* value = values[h / group].data();
      const size_t off = (static_cast<size_t>(t) * a.n_heads + h) * d;
      std::vector<double> s;
      std::vector<int> idx;
      for (int j = 0; j < hc.n; ++j) {
        if (!sees(hc.pos[j], a.q_pos[t], a.window)) continue;
        double dot = 0;
        for (int i = 0; i < d; ++i) dot += static_cast<double>(a.q[off + i]) * key[static_cast<size_t>(j) * d + i];
        s.push_back(dot * a.scale);
        idx.push_back(j);
      }
      const double mx = s.empty() ? 0.0 : *std::max_element(s.begin(), s.end());
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - mx));
      for (int i = 0; i < d; ++i) {
        double o = 0;
        for (size_t j = 0; j < s.size(); ++j) o += s[j] / sum * value[static_cast<size_t>(idx[j]) * d + i];
        a.out[off + i] = static_cast<float>(o);
      }
    }
  }
}

}  // namespace qf::kv
