// Attention over a per-head cache. Two paths:
//  - attend_fused: FlashAttention-style online softmax over tiles of keys; never materialises
//    the attention weights. What every score-only policy (qfilters, knorm, streaming, random)
//    and the full cache use.
//  - attend_with_stats: the same output (bit for bit: the same kernel), plus the softmax weights
//    each cached slot gets, which the attention-based policies (snapkv, tova, h2o) read. A second
//    pass over the keys recomputes the weights per tile of keys (attention_stats_f32): the price
//    those policies pay. Per KV head, a query's weights are averaged over its GQA group; queries
//    at position >= accumulate_from_pos add them to attn_sum (and 1 to attn_cnt of every slot
//    they see); attn_last is overwritten with the call's last query's weights. The sums do not
//    depend on the thread count nor on how a prompt is split into calls.
// Causality: a query at position p sees the cached slots whose position is <= p (and, with a
// sliding window W > 0, > p - W). Keys and values are read in the cache's storage types.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "kv/cache.h"
#include "tensor/attention_kernel.h"
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
  // Sliding-window attention (Gemma 3's local layers): a query at position p sees only keys at
  // positions > p - window. 0 = off.
  int window = 0;
};

// The kernels' view of one layer's KV heads for queries at positions q_pos: each head's keys,
// values and, per query, the slots [first, visible) it sees (each head keeps its own slots).
// `slots` holds the bounds (visible counts, then first slots when window > 0, each
// [n_kv_heads][q_pos.size()]) and must outlive the views.
std::vector<AttentionKv> layer_views(const Cache& cache, int layer, std::span<const int32_t> q_pos,
                                     std::vector<int>& slots, int window = 0);

void attend_fused(const Cache& cache, const AttentionArgs& args, ThreadPool& pool);
void attend_with_stats(Cache& cache, const AttentionArgs& args, ThreadPool& pool);

// One session's share of a layer's attention in a batched step (several sessions, one pass).
struct AttentionJob {
  const Cache* cache = nullptr;
  AttentionArgs args;
};
// attend_fused for every job, bit for bit, with the decode steps' heads in one parallel region
// (attention_f32_many).
void attend_fused_many(std::span<const AttentionJob> jobs, ThreadPool& pool);

// Straightforward two-pass softmax attention, in double, on the dequantized keys and values,
// for tests.
void attend_reference(const Cache& cache, const AttentionArgs& args);

}  // namespace qf::kv
