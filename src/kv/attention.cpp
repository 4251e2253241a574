#include "kv/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tensor/attention_kernel.h"
#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::kv {

namespace {

// Slots visible to a query at position p: positions increase with the slot index.
int visible_slots(const HeadCache& hc, int32_t p) {
  return static_cast<int>(std::upper_bound(hc.pos.begin(), hc.pos.begin() + hc.n, p) - hc.pos.begin());
}

void check_args(const Cache& cache, const AttentionArgs& a) {
  const int nkv = cache.shape().n_kv_heads;
  if (a.n_heads <= 0 || a.n_heads % nkv != 0) fail("attention: ", a.n_heads, " query heads do not group over ", nkv, " KV heads");
  if (a.layer < 0 || a.layer >= cache.shape().n_layers) fail("attention: layer out of range");
}

}  // namespace

void attend_fused(const Cache& cache, const AttentionArgs& a, ThreadPool& pool) {
  check_args(cache, a);
  const int nkv = cache.shape().n_kv_heads;
  if (a.n_tok <= 0) return;
  // Each head keeps its own slots, so each has its own visible count per token.
  std::vector<int> visible(static_cast<size_t>(nkv) * a.n_tok);
  std::vector<AttentionKv> heads(nkv);
  for (int g = 0; g < nkv; ++g) {
    const HeadCache& hc = cache.head(a.layer, g);
    int* vis = visible.data() + static_cast<size_t>(g) * a.n_tok;
    for (int t = 0; t < a.n_tok; ++t) vis[t] = visible_slots(hc, a.q_pos[t]);
    heads[g] = {hc.k.data(), hc.v.data(), vis};
  }
  attention_f32(a.q, a.n_tok, a.n_heads, heads.data(), nkv, cache.shape().head_dim, a.scale, a.out, pool);
}

void attend_with_stats(Cache& cache, const AttentionArgs& a, ThreadPool& pool) {
  check_args(cache, a);
  const int d = cache.shape().head_dim;
  const int nkv = cache.shape().n_kv_heads;
  const int group = a.n_heads / nkv;
  const AttentionStats& st = cache.stats();
  // Statistics are per KV head, so a KV head's queries run on one thread, in token order.
  pool.parallel_for(nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p;
    for (int64_t kvh = begin; kvh < end; ++kvh) {
      HeadCache& hc = cache.head(a.layer, static_cast<int>(kvh));
      if (st.last_query) std::fill(hc.attn_last.begin(), hc.attn_last.begin() + hc.n, 0.0f);
      for (int t = 0; t < a.n_tok; ++t) {
        const int n = visible_slots(hc, a.q_pos[t]);
        const bool accumulate = !hc.attn_sum.empty() && a.q_pos[t] >= a.accumulate_from_pos;
        const bool last = st.last_query && t == a.n_tok - 1;
        p.resize(n);
        for (int g = 0; g < group; ++g) {
          const int h = static_cast<int>(kvh) * group + g;
          const size_t off = (static_cast<size_t>(t) * a.n_heads + h) * d;
          const float* q = a.q + off;
          float mx = -std::numeric_limits<float>::infinity();
          for (int j = 0; j < n; ++j) {
            p[j] = dot_f32(q, hc.key(j, d), d) * a.scale;
            mx = std::max(mx, p[j]);
          }
          float sum = 0.0f;
          for (int j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
          const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
          float* out = a.out + off;
          std::fill(out, out + d, 0.0f);
          for (int j = 0; j < n; ++j) {
            p[j] *= inv;
            axpy_f32(p[j], hc.value(j, d), out, d);
          }
          const float share = 1.0f / group;  // statistics average the group's query heads
          if (accumulate)
            for (int j = 0; j < n; ++j) hc.attn_sum[j] += p[j] * share;
          if (last)
            for (int j = 0; j < n; ++j) hc.attn_last[j] += p[j] * share;
        }
        if (accumulate && !hc.attn_cnt.empty())
          for (int j = 0; j < n; ++j) ++hc.attn_cnt[j];
      }
    }
  });
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
