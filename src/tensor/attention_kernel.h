// The inner loops of fused attention: online softmax over tiles of keys (never a full score row
// in memory). Two kernels, same contract:
//  - attention_group_f32: one token's GQA group against one head's keys. Best for decode, where
//    there is one query row per query head and nothing to share a pass over the keys with.
//  - attention_block_f32: a block of consecutive tokens' GQA groups (tens of query rows, held
//    transposed in scratch) against tiles of keys, so scores and the weighted sum of values are
//    broadcast-FMAs into register tiles with no horizontal sums, and each key and value is read
//    once per block instead of once per token. Best for prefill (2 or more tokens).
// attention_f32 runs a whole layer, choosing the kernel and splitting the work over a pool.
#pragma once
#include <cstddef>

#include "tensor/threadpool.h"

namespace qf {

// For each of the n_q query vectors q[i * d ...] (the query heads sharing one KV head):
//   out[i * d ...] = sum_j softmax_j(scale * <q_i, k_j>) v_j   over j in [0, n),
// with keys and values stored as n rows of d floats. n == 0 writes zeros.
void attention_group_f32(const float* q, int n_q, const float* k, const float* v, int n, int d, float scale,
                         float* out);

// The same for n_tok tokens at once: token t's n_q query rows are q[t * q_stride + i * d ...],
// its outputs out[t * out_stride + i * d ...], and it sees keys [0, visible[t]) (visible[t] == 0
// writes zeros). Any visible counts are correct; non-decreasing ones (causal prefill) skip the
// most work. The result for a row does not depend on the other rows of the block.
// d <= kAttentionMaxDim.
void attention_block_f32(const float* q, size_t q_stride, int n_tok, int n_q, const float* k, const float* v,
                         const int* visible, int d, float scale, float* out, size_t out_stride);

constexpr int kAttentionMaxDim = 256;

// One KV head of a layer: keys and values as rows of d floats, and the number of them each of
// the n_tok tokens sees.
struct AttentionKv {
  const float* k = nullptr;
  const float* v = nullptr;
  const int* visible = nullptr;  // [n_tok]
};

// A layer's attention: q and out are [n_tok][n_heads][d]; query heads [g * n_heads / n_kv, ...)
// share kv[g]. Requires n_heads % n_kv == 0 and d <= kAttentionMaxDim. The result does not
// depend on the pool's size.
void attention_f32(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                   float* out, ThreadPool& pool);

}  // namespace qf
