// The forward pass over a batch of rows that may belong to several sessions of one model: every
// weight matrix is read once for all rows (the expensive part of decoding), while keys and values
// go to each row's own session cache and attention runs per session. A single session's prompt
// chunk is the one-segment case.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "kv/attention.h"
#include "model/model.h"
#include "model/ops.h"
#include "tensor/kernels.h"
#include "tensor/threadpool.h"

namespace qf {

class Session;

// Consecutive rows of one session: its next n tokens.
struct Segment {
  Session* session = nullptr;
  const int32_t* tokens = nullptr;
  int n = 0;
  float* logits = nullptr;  // null: no logits; else [n_vocab] of the last token, or [n][n_vocab]
  bool all_logits = false;
  // Picks the matmul engine of the segment's rows (tensor/kernels.h): prompt tokens may take the
  // AMX engine, decode steps keep the engine whose numbers do not depend on the batch.
  TokenKind kind = TokenKind::prompt;
};

class Forward {
 public:
  // Scratch for up to max_rows rows at once.
  Forward(const Model& model, int max_rows);

  int max_rows() const { return max_rows_; }

  // Runs the segments' tokens through the model, appending them to their sessions (positions
  // continue each session's sequence). Rows in total <= max_rows(); each session at most once.
  void run(std::span<const Segment> segments, ThreadPool& pool);

 private:
  void attention_block(int l, std::span<const Segment> segments, int n, ThreadPool& pool);
  void evict_layer(int l, std::span<const Segment> segments, ThreadPool& pool);
  void ffn_block(int l, int n, ThreadPool& pool);
  void output_logits(std::span<const Segment> segments, ThreadPool& pool);
  // y = W x over the pass's n rows: one matmul per run of consecutive rows of one TokenKind.
  void project(const WeightView& w, const float* x, float* y, ThreadPool& pool) const;
  // The same for matrices that read the same x (q, k, v; gate, up): matmul_shared_input.
  template <size_t N>
  void project_shared(const WeightView (&ws)[N], const float* x, float* const (&ys)[N], ThreadPool& pool) const;

  struct KindRun {
    int row, n;
    TokenKind kind;
  };

  const Model& model_;
  int max_rows_;
  ops::Rotary rotary_;
  std::vector<float> x_, h_, q_, k_, v_, att_, ff_a_, ff_b_, logits_;
  std::vector<int32_t> pos_;
  std::vector<int> out_rows_;  // rows whose logits are wanted
  std::vector<int> seg_row_;  // first row of each segment
  std::vector<KindRun> runs_;  // the pass's rows by kind
  std::vector<kv::AttentionArgs> args_;  // attention_block scratch
  std::vector<kv::AttentionJob> jobs_;
  std::vector<Session*> evicting_;  // evict_layer scratch: the segments' sessions with a compressor
};

}  // namespace qf
