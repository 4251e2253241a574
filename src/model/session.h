// One sequence being evaluated: the KV cache, the optional compressor that bounds it, scratch
// buffers, and the forward pass. Prompts are processed in chunks of up to n_batch tokens as
// matrix-matrix products; decoding is the same code with a chunk of one token.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "kv/cache.h"
#include "kv/compressor.h"
#include "model/model.h"
#include "tensor/threadpool.h"

namespace qf {

struct SessionOptions {
  int n_ctx = 0;      // longest sequence (positions); 0 = the model's training context
  int n_threads = 0;  // 0 = all cores
  int n_batch = 256;  // tokens per forward chunk during prefill
  std::unique_ptr<kv::Compressor> compressor;  // null = full cache
  // Attention statistics to keep in addition to the compressor's needs (e.g. for a session whose
  // cache is shared with several policies through copy_state_from). accumulate and window both
  // write attn_sum, so asking for both mixes them.
  kv::AttentionStats stats;
  // Storage types of the cached keys and values (the CLI's -ctk / -ctv; the CLI defaults to f16).
  kv::KvTypes kv_types;
};

// Called inside the forward pass with each layer's queries and keys after the rotary embedding:
// q [n_tok][n_heads][head_dim], k [n_tok][n_kv_heads][head_dim]. Used by calibration and the
// attention-fidelity evaluation; must not keep the pointers.
using QkHook = std::function<void(int layer, const float* q, const float* k, const int32_t* pos, int n_tok)>;

class Session {
 public:
  Session(const Model& model, SessionOptions options);

  const Model& model() const { return model_; }
  int n_ctx() const { return n_ctx_; }
  int n_past() const { return n_past_; }
  ThreadPool& pool() { return pool_; }
  kv::Cache& cache() { return *cache_; }
  const kv::Cache& cache() const { return *cache_; }
  const kv::Compressor* compressor() const { return compressor_.get(); }

  // Processes a prompt (any length up to the context) and applies prefill compression at its end.
  // Returns the logits of its last token.
  std::span<const float> prefill(std::span<const int32_t> tokens);
  // Appends tokens to the sequence; streaming compression runs after each chunk. Returns the
  // logits of the last token, or of every token ([n][n_vocab]) when all_logits is set.
  std::span<const float> eval(std::span<const int32_t> tokens, bool all_logits = false);

  // Forgets the sequence; memory stays allocated.
  void reset();

  // Continues `src`'s sequence: copies its position and, per head, the cached keys, values,
  // positions and the attention statistics this cache keeps (zero where src keeps none), so one
  // prefill can be shared by several policies. Same model and KV types required; throws
  // qf::Error when a head of src holds more tokens than this cache can.
  void copy_state_from(const Session& src);

  void set_qk_hook(QkHook hook) { qk_hook_ = std::move(hook); }

 private:
  void forward_chunk(const int32_t* tokens, int n, float* logits, bool all_logits);

  const Model& model_;
  ThreadPool pool_;
  int n_ctx_, n_batch_;
  int n_past_ = 0;
  int prompt_end_ = 0;  // position where the current prompt ends (snapkv's observation window)
  std::unique_ptr<kv::Compressor> compressor_;
  std::unique_ptr<kv::Cache> cache_;
  QkHook qk_hook_;

  std::vector<double> inv_freq_;            // rotary frequency of each pair
  std::vector<float> rope_cos_, rope_sin_;  // [chunk token][n_rot / 2]
  // Scratch, sized for n_batch tokens.
  std::vector<float> x_, h_, q_, k_, v_, att_, ff_a_, ff_b_, logits_;
  std::vector<int32_t> pos_;
};

}  // namespace qf
