// One sequence being evaluated: the KV cache, the optional compressor that bounds it, scratch
// buffers, and the forward pass. Prompts are processed in chunks of up to n_batch tokens as
// matrix-matrix products; decoding is the same code with a chunk of one token.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "kv/compressor.h"
#include "model/model.h"
#include "model/forward.h"
#include "model/ops.h"
#include "tensor/threadpool.h"

namespace qf {

// What happens to positions when a sequence reaches the context (qf's --kv-positions).
enum class PositionMode {
  // Positions keep counting. A full cache stops at the context (an error); a bounded cache goes
  // on past it, with rotary phases the model never saw in training.
  keep,
  // Context shift (llama.cpp's): when the next token would not fit, the first `shift_keep`
  // positions stay, the next half of the rest is forgotten, and every later key moves back by
  // that much (positions and rotary phases), so positions stay below the context forever.
  shift,
};
// "keep" / "shift"; throws qf::Error naming both otherwise.
PositionMode parse_position_mode(std::string_view name);
std::string_view position_mode_name(PositionMode m);

struct SessionOptions {
  int n_ctx = 0;      // longest sequence (positions); 0 = the model's training context
  int n_threads = 0;  // 0 = all cores; ignored when `pool` is given
  ThreadPool* pool = nullptr;  // shared pool (must outlive the session); null = the session owns one
  int n_batch = 256;  // tokens per forward chunk during prefill
  std::unique_ptr<kv::Compressor> compressor{};  // null = full cache
  // Attention statistics to keep in addition to the compressor's needs (e.g. for a session whose
  // cache is shared with several policies through copy_state_from). accumulate and window both
  // write attn_sum, so asking for both mixes them.
  kv::AttentionStats stats{};
  // Scorer of a cache asked to keep key scores (stats.key_scores) without a compressor whose
  // policy scores single keys, e.g. an evaluation's prefix shared by several sessions of one
  // policy. A compressor's own scorer (Policy::key_scorer) is used otherwise.
  kv::KeyScorer key_scorer{};
  // Storage types of the cached keys and values (the CLI's -ctk / -ctv; the CLI defaults to f16).
  kv::KvTypes kv_types{};
  // At the end of the context: keep counting, or shift (see PositionMode). Evaluations keep the
  // library default (a result never silently shifts); qf run / chat / serve default to shift.
  PositionMode positions = PositionMode::keep;
  // Shift: the first positions that never move nor go (StreamingLLM's attention sinks, which
  // its policy scores by position < 4); at most a quarter of the context.
  int shift_keep = 4;
};

// Called inside the forward pass with each layer's queries and keys after the QK norm (if the
// model has one) and the rotary embedding, before any query scaling:
// q [n_tok][n_heads][head_dim], k [n_tok][n_kv_heads][head_dim]. Used by calibration and the
// attention-fidelity evaluation; must not keep the pointers.
using QkHook = std::function<void(int layer, const float* q, const float* k, const int32_t* pos, int n_tok)>;

// The model's rotary embedding as the KV policies see it (the forward pass's own angles).
kv::RopeGeometry rope_geometry(const Model& model);

class Session;

// One session's share of a batched step: the tokens to append to it, prompt tokens or the token
// it sampled last (TokenKind::decode, the engine Session::decode uses).
struct BatchItem {
  Session* session = nullptr;
  std::span<const int32_t> tokens;
  TokenKind kind = TokenKind::prompt;
};

class Session {
 public:
  Session(const Model& model, SessionOptions options);

  // Tokens each head of each layer can hold at once in a session of n_ctx positions (0 = the
  // model's training context) that appends up to n_batch tokens between compressions: the context
  // for a full cache, the compressor's budget plus a batch, a sliding window plus a batch.
  static std::vector<int> cache_capacity(const Model& model, const kv::Compressor* compressor, int n_ctx, int n_batch);

  const Model& model() const { return model_; }
  int n_ctx() const { return n_ctx_; }
  int n_past() const { return n_past_; }
  int n_batch() const { return n_batch_; }
  PositionMode positions() const { return positions_; }
  // Positions given up by context shifts since the last reset: while 0, slot i of the sequence
  // is the i-th token fed, so a cache can be reused for a prompt that extends it.
  int64_t positions_shifted() const { return positions_shifted_; }
  // Whether n more tokens can be appended through eval(): always with shift, past the context
  // with keep and a bounded cache, up to the context with keep and a full cache.
  bool has_room(int64_t n) const;
  ThreadPool& pool() { return pool_; }
  kv::Cache& cache() { return *cache_; }
  const kv::Cache& cache() const { return *cache_; }
  const kv::Compressor* compressor() const { return compressor_.get(); }
  kv::Compressor* compressor() { return compressor_.get(); }
  int prompt_end() const { return prompt_end_; }

  // Sets the position counters of a session whose cache was just refilled from a saved state
  // (runtime/session_state.h checks the state first). Throws qf::Error outside the context.
  void restore_position(int n_past, int prompt_end);

  // Processes a prompt (any length up to the context) and applies prefill compression at its end.
  // Returns the logits of its last token.
  std::span<const float> prefill(std::span<const int32_t> tokens);
  // Appends tokens to the sequence; streaming compression runs after each chunk. Returns the
  // logits of the last token, or of every token ([n][n_vocab]) when all_logits is set. `kind`
  // picks the matmul engine (TokenKind::decode: the numbers a decode step gives, which an
  // evaluation that compares a prefill with token-by-token decoding needs on both sides).
  std::span<const float> eval(std::span<const int32_t> tokens, bool all_logits = false,
                              TokenKind kind = TokenKind::prompt);
  // Appends the token the model just sampled (a decode step) and returns its logits. Prompt
  // tokens go through eval/prefill, which may use the AMX engine (TokenKind::prompt); decode
  // steps keep the engine a batched step uses, so a session decodes the same alone or batched.
  std::span<const float> decode(int32_t token);

  // Forgets the sequence; memory stays allocated.
  void reset();

  // Continues `src`'s sequence: copies its position and, per head, the cached keys, values,
  // positions and the attention statistics this cache keeps (zero where src keeps none), so one
  // prefill can be shared by several policies. Key scores are copied from a session of the same
  // policy (and filters); otherwise they are recomputed from the stored keys, rounded to the
  // storage type (an evaluation that wants them exact scores its prefix in its own session). Same model and KV types required; throws
  // qf::Error when a head of src holds more tokens than this cache can.
  void copy_state_from(const Session& src);

  void set_qk_hook(QkHook hook) { qk_hook_ = std::move(hook); }

  // Appends each item's tokens to its session in one forward pass, so the weights are read once
  // for all of them (continuous batching): sessions of the same model, each at most once, at most
  // fw.max_rows() tokens in all. Streaming compression then runs per session. Returns, per item,
  // the logits of its last token (the session's buffer, valid until its next call). The pool
  // must be free (sessions built with SessionOptions::pool share it).
  static std::vector<std::span<const float>> eval_batch(std::span<const BatchItem> items, Forward& fw, ThreadPool& pool);

 private:
  friend class Forward;
  void forward_chunk(const int32_t* tokens, int n, float* logits, bool all_logits, TokenKind kind);
  // Layer l for this session's n rows of a forward pass: hands q/k to the hook, stores k/v in the
  // cache (after trimming a sliding window) and returns the arguments of the n queries' attention
  // over the cache, written to `out` (Forward runs it: kv::attend_fused_many for sessions whose
  // policy needs no attention weights, attend_with_stats for the others).
  kv::AttentionArgs store_rows(int l, int n, const float* q, const float* k, const float* v, const int32_t* pos,
                               float* out);
  // Whether the cache's policy reads the softmax weights (snapkv, tova, h2o).
  bool attention_needs_stats() const;
  void attend_with_stats(kv::AttentionArgs args, ThreadPool& pool);
  // Adds the rows' queries, un-rotated, to the cache's query moments (AttentionStats::query_moments).
  void observe_queries(int l, int n, const float* q, const int32_t* pos);
  // Checks that n more tokens fit and are in the vocabulary; throws qf::Error.
  void check_tokens(std::span<const int32_t> tokens) const;
  // Shift mode: shifts the context when n more tokens (at most one shift's worth) would not fit.
  void make_room(int n);
  // Forgets positions [shift_keep_, shift_keep_ + shift_delta_) in every head and moves the later
  // ones back by shift_delta_, rotating their keys.
  void shift_context();
  // Sliding-window layers: before appending n tokens, drops what no later query can see once
  // the cache would overflow (a ring of the window, compacted every n_batch tokens or so).
  void drop_outside_window(int l, int n);

  const Model& model_;
  std::unique_ptr<ThreadPool> own_pool_;  // null when the pool is shared
  ThreadPool& pool_;
  int n_ctx_, n_batch_;
  int n_past_ = 0;
  int prompt_end_ = 0;  // position where the current prompt ends (snapkv's observation window)
  PositionMode positions_;
  int shift_keep_ = 0, shift_delta_ = 0;  // shift: positions kept, positions given up per shift
  int64_t positions_shifted_ = 0;
  bool bounded_ = false;  // every layer's cache holds a bounded number of tokens
  ops::Rotary rotary_;    // rotates cached keys back on a shift
  std::unique_ptr<kv::Compressor> compressor_;
  std::unique_ptr<kv::Cache> cache_;
  QkHook qk_hook_;

  std::unique_ptr<Forward> forward_;  // this session's own passes, n_batch rows
  std::vector<float> logits_;
  std::vector<int> keep_;
  std::vector<float> query_row_;  // observe_queries scratch
};

}  // namespace qf
