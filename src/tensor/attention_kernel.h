// The inner loops of fused attention: online softmax over tiles of keys (never a full score row
// in memory). Two kernels, same contract:
//  - attention_group_f32: one token's GQA group against one head's keys. Best for decode, where
//    there is one query row per query head and nothing to share a pass over the keys with.
//  - attention_block_f32: a block of consecutive tokens' GQA groups (tens of query rows, held
//    transposed in scratch) against tiles of keys, so scores and the weighted sum of values are
//    broadcast-FMAs into register tiles with no horizontal sums, and each key and value is read
//    once per block instead of once per token. Best for prefill (2 or more tokens).
// attention_f32 runs a whole layer, choosing the kernel and splitting the work over a pool;
// attention_stats_f32 also returns the softmax weights summed per key (two passes: the tiled
// kernel's per-row maximum and sum, then the weights recomputed per tile of keys).
// The layer kernels read keys and values in any KV storage type (KvRows: f32, f16, bf16, q8_0,
// q4_0, each of K and V on its own). The decode kernel reads f32/f16/bf16 rows in place,
// widening each vector in registers (a value is read once per GQA group; f16 halves the bytes a
// step streams), and converts q8_0/q4_0 one tile of 64 rows at a time to floats in scratch; the
// tiled kernel converts every type that way, each tile shared by the block's tens of query rows.
// Both conversions are exact and the arithmetic after them is the f32 kernels', so every type
// pair gives, bit for bit, the result of the same kernel on its rows converted to f32.
#pragma once
#include <cstddef>
#include <cstdint>

#include "tensor/threadpool.h"
#include "tensor/types.h"

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

// Rows of d values in one KV storage type: row j is row_bytes bytes at data + j * row_bytes
// (whole ggml blocks for q8_0 / q4_0).
struct KvRows {
  GgmlType type = GgmlType::F32;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
};

// Rows of d floats.
inline KvRows f32_rows(const float* p, int d) {
  return {GgmlType::F32, reinterpret_cast<const uint8_t*>(p), static_cast<size_t>(d) * sizeof(float)};
}

// Whether the attention kernels read this storage type (F32, F16, BF16, Q8_0, Q4_0).
bool is_kv_type(GgmlType t);
// Throws qf::Error unless rows of d values of type t can be read (a KV type, whole blocks,
// row_bytes matching).
void check_kv_rows(const KvRows& rows, int d);

// out[0, n * d) = rows [j0, j0 + n) as floats (SIMD, runtime dispatch). Types as is_kv_type.
void dequantize_kv_rows(const KvRows& rows, int j0, int n, int d, float* out);

// One KV head of a layer: keys and values, and the slots [first[t], visible[t]) each of the
// n_tok tokens sees (first == nullptr: from slot 0; a sliding window sets it).
struct AttentionKv {
  KvRows k, v;
  const int* visible = nullptr;  // [n_tok]
  const int* first = nullptr;    // [n_tok] or null
};

// A layer's attention: q and out are [n_tok][n_heads][d]; query heads [g * n_heads / n_kv, ...)
// share kv[g]. Requires n_heads % n_kv == 0, d <= kAttentionMaxDim and KV types the kernels read
// (qf::Error otherwise). The result does not depend on the pool's size.
void attention_f32(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                   float* out, ThreadPool& pool);

// One attention_f32 call's arguments, for attention_f32_many.
struct AttentionCall {
  const float* q = nullptr;
  int n_tok = 0, n_heads = 0;
  const AttentionKv* kv = nullptr;
  int n_kv = 0, d = 0;
  float scale = 1.0f;
  float* out = nullptr;
};

// Every call's attention_f32, with the same results bit for bit. The single-token calls (decode
// steps of several sessions in one batched step) share one parallel region over all their
// (call, KV head) pairs, so a step costs one region per layer rather than one per session and
// the threads stay balanced however few KV heads a model has; longer calls run one by one.
void attention_f32_many(const AttentionCall* calls, int n_calls, ThreadPool& pool);

// Per-key attention statistics of one KV head (arrays of n_keys; any pointer may be null).
struct AttentionColumns {
  int n_keys = 0;          // keys the arrays cover; no token may see more
  float* sum = nullptr;    // += over counted tokens' rows: share * softmax weight of the key
  int32_t* cnt = nullptr;  // += 1 per counted token that sees the key
  float* last = nullptr;   // = over the last token's rows: share * weight (zeroed first, all n_keys)
};

// attention_f32 plus the softmax weights each key of each KV head gets, for the attention-based
// cache policies. A token's rows are its group's query heads, each with share 1 / group (the
// statistics average the group). counted[t] != 0 (counted == nullptr: every token) makes token t
// add to sum and cnt. out == nullptr: statistics only.
// Exact contract, so that callers can rely on bit-identical results:
//  - out is bit-identical to attention_f32's.
//  - A row's weights are exp(s - m) * (share / l): s the tiled kernel's score, m and l the
//    tiled kernel's final running maximum and sum for the row (the same in every call and block).
//  - Each key's sum adds its rows' weights one at a time, in token then head order, to its
//    current value. So the statistics of a sequence do not depend on how it is split into calls
//    (one call for tokens [0, 8) adds exactly what calls for [0, 3) and [3, 8) add), nor on the
//    pool's size.
void attention_stats_f32(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                         const uint8_t* counted, const AttentionColumns* cols, float* out, ThreadPool& pool);

}  // namespace qf
