// The inner loop of fused attention: one GQA group of queries against one head's contiguous
// keys and values, online softmax over tiles of keys (never a full score row in memory).
#pragma once

namespace qf {

// For each of the n_q query vectors q[i * d ...] (the query heads sharing one KV head):
//   out[i * d ...] = sum_j softmax_j(scale * <q_i, k_j>) v_j   over j in [0, n),
// with keys and values stored as n rows of d floats. n == 0 writes zeros.
void attention_group_f32(const float* q, int n_q, const float* k, const float* v, int n, int d, float scale,
                         float* out);

}  // namespace qf
