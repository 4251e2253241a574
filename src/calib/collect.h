// Query collection for calibration: documents go through the engine's own forward pass and a
// Session::QkHook copies the post-RoPE queries of pre-drawn token positions, so the filters see
// exactly the queries the engine computes (no second copy of the model code).
//
// Memory: only the drawn positions are stored, n_layers x n_samples x n_head x head_dim floats
// (SmolLM2-135M, 3000 samples: 207 MB), never every query of every token.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "calib/filters.h"
#include "calib/report.h"
#include "kv/query_moments.h"
#include "model/session.h"

namespace qf::calib {

// Seed of an independent random stream (splitmix64 of seed and stream id), so a layer's draw does
// not depend on how many numbers other layers used.
uint64_t stream_seed(uint64_t seed, uint64_t stream);

// Which token positions give query samples. Per layer, min(n_samples, total tokens) distinct
// positions are drawn uniformly without replacement over all tokens of all documents (layers draw
// independently, as the reference does). Same seed and document lengths, same positions.
class SamplePlan {
 public:
  SamplePlan(std::vector<int> doc_lengths, int n_layers, int n_samples, uint64_t seed);
  int n_layers() const { return n_layers_; }
  int n_samples() const { return n_samples_; }  // per layer, after clipping to the token count
  int64_t n_tokens() const { return offsets_.back(); }
  int n_docs() const { return static_cast<int>(offsets_.size()) - 1; }
  int doc_length(int doc) const;
  int64_t doc_offset(int doc) const;  // global index of the document's first token
  // Sorted global token indices drawn for a layer.
  const std::vector<int64_t>& positions(int layer) const;

 private:
  int n_layers_, n_samples_;
  std::vector<int64_t> offsets_;               // [n_docs + 1]
  std::vector<std::vector<int64_t>> drawn_;    // [layer] sorted
};

// Receives the forward pass's q/k through hook() and keeps the planned query rows plus the running
// key means of every token. Feed each document from position 0 (reset the session first) after
// begin_document(); tokens may come in any chunking, but each position exactly once.
class QueryCollector {
 public:
  QueryCollector(const ModelConfig& config, SamplePlan plan);

  const SamplePlan& plan() const { return plan_; }
  void begin_document(int doc);
  // The hook to install with Session::set_qk_hook; valid while this collector lives.
  QkHook hook();
  // Rows filled so far (all layers together), and the positions fed so far.
  int64_t rows_filled() const { return rows_filled_; }
  int64_t tokens_seen() const { return tokens_seen_; }

  // Throws qf::Error unless every planned row was filled. Then computes every layer's filters into
  // `cal` (one layer at a time, freeing its samples) and leaves the collector empty. With a
  // non-empty `rope` (the model's rotary embedding) and stats_rank >= 1 (at most head_dim is used), also the query
  // statistics before the rotary embedding (Calibrator::add_query_stats): each sample is rotated
  // back by its position, and samples at positions below kv::kQueryMomentSinks are left out.
  void finish(Calibrator& cal, const kv::RopeGeometry& rope = {}, int stats_rank = 0);
  const KeyMeans& key_means() const { return keys_; }

  // Queries stored for a layer, [n_samples][n_head][head_dim] in plan order (for tests).
  std::span<const float> layer_queries(int layer) const;

 private:
  void on_qk(int layer, const float* q, const float* k, const int32_t* pos, int n_tok);

  SamplePlan plan_;
  int n_layers_, n_head_, head_dim_;
  size_t row_;  // floats per sample row: n_head * head_dim
  std::vector<std::vector<float>> rows_;       // [layer][sample][n_head][head_dim]
  std::vector<std::vector<uint8_t>> filled_;   // [layer][sample]
  std::vector<std::vector<int32_t>> row_pos_;  // [layer][sample]: position in its document
  KeyMeans keys_;
  int doc_ = -1;
  int64_t rows_filled_ = 0, tokens_seen_ = 0;
};

// Progress: units done so far and the total, in tokens (generation and teacher forcing alike).
using ProgressFn = std::function<void(int64_t done, int64_t total)>;

struct CollectOptions {
  int n_samples = 3000;  // query positions drawn per layer
  uint64_t seed = 0;
  OrientationRule rule = OrientationRule::kMeanProjection;
  // > 0: also the query statistics before the rotary embedding, with this covariance rank
  // (QueryCollector::finish; the session's model gives the rotary embedding).
  int stats_rank = 0;
};

struct CalibrationRun {
  Calibrator calibrator;
  KeyMeans keys;
  int n_samples = 0;  // per layer, after clipping to the token count
  int64_t n_tokens = 0;
};

// Runs every document through `session` (reset before each, fed in n_batch chunks) with a
// collector attached, then computes the filters. The session's hook is cleared on return.
// Documents must be non-empty and fit the session's context.
CalibrationRun calibrate_documents(Session& session, const std::vector<std::vector<int32_t>>& docs,
                                   const CollectOptions& opt, const ProgressFn& progress = {});

// ---- Calibration text sampled from the model itself ----------------------------------------------

// Picks the next token from one row of logits (the CLI passes a seeded qf::Sampler).
using SampleFn = std::function<int32_t(std::span<const float> logits)>;

struct SynthesisOptions {
  int n_docs = 4;
  int doc_len = 512;    // tokens per document, seed prompts included
  int segment_len = 0;  // > 0: a new seed prompt every segment_len sampled tokens within a document
  std::vector<int32_t> separator = {};  // fed before every seed prompt but a document's first (e.g. "\n\n")
  std::vector<int32_t> doc_prefix = {};  // fed at the start of every document (e.g. BOS)
};

// Samples `n_docs` documents of exactly doc_len tokens. Each document starts with a seed prompt
// (prompts are used in turn, cycling), continues by sampling, and whenever the model ends its text
// (an end-of-generation token, kept in the document) or segment_len tokens were sampled, the next
// prompt is appended (after opt.separator) and sampling goes on. When `collector` is given (its plan must have these
// document lengths), queries are collected during generation, so no second pass is needed.
// Returns the token ids of every document.
std::vector<std::vector<int32_t>> synthesize_documents(Session& session, const std::vector<std::vector<int32_t>>& prompts,
                                                       const std::vector<int32_t>& end_tokens, const SynthesisOptions& opt,
                                                       const SampleFn& sample, QueryCollector* collector = nullptr,
                                                       const ProgressFn& progress = {});

// Calibration documents of at most doc_len tokens from tokenized texts: each text's first piece,
// then, while fewer than n_docs, the second pieces of texts long enough, then the third, ...
// (a later piece must hold a quarter of doc_len). Throws qf::Error when nothing is left.
std::vector<std::vector<int32_t>> cut_documents(const std::vector<std::vector<int32_t>>& texts, int n_docs,
                                                int doc_len);

}  // namespace qf::calib
