// Attention over a per-head cache. Two paths:
//  - attend_fused: FlashAttention-style online softmax over tiles of keys; never materialises
//    the attention weights. What every score-only policy (qfilters, knorm, streaming, random)
//    and the full cache use.
//  - attend_with_stats: computes each query's softmax weights explicitly so attention-based
//    policies (snapkv, tova, h2o) can read them; it is the price those policies pay.
// Causality: a query at position p sees the cached slots whose position is <= p.
#pragma once
#include <cstdint>

#include "kv/cache.h"
#include "tensor/threadpool.h"

namespace qf::kv {

struct AttentionArgs {
  int layer = 0;
  int n_heads = 0;            // query heads; n_heads / n_kv_heads share one KV head
  float scale = 1.0f;         // usually 1/sqrt(head_dim)
  int n_tok = 0;
  const float* q = nullptr;   // [n_tok][n_heads][head_dim], after rotary embedding
  const int32_t* q_pos = nullptr;
  float* out = nullptr;       // [n_tok][n_heads][head_dim]
  // attend_with_stats only: queries at position >= this add their weights to attn_sum.
  int32_t accumulate_from_pos = 0;
};

void attend_fused(const Cache& cache, const AttentionArgs& args, ThreadPool& pool);
void attend_with_stats(Cache& cache, const AttentionArgs& args, ThreadPool& pool);

// Straightforward two-pass softmax attention, in double, for tests.
void attend_reference(const Cache& cache, const AttentionArgs& args);

}  // namespace qf::kv
