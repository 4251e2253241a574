// What the forward pass computes for one model, filled from GGUF metadata by the model's
// architecture file (src/model/arch/<name>.cpp). The forward pass (session.cpp) is written once
// over named operations and only reads this: a new architecture is a new file, never a branch
// on the architecture's name.
#pragma once
#include <string>
#include <vector>

namespace qf {

// Of the gated feed-forward network: down(act(gate(x)) * up(x)).
enum class Activation { silu, gelu_tanh };

// Which dimensions of a head rotate together. ggml's "normal" mode rotates adjacent pairs
// (2i, 2i+1) (llama: the converter permutes Q/K rows into that order); NEOX mode rotates
// (i, i + n_rot/2) (gemma, qwen). Pair i turns by pos * base^(-2i/n_rot) in both.
enum class RopePairing { adjacent, halves };

const char* activation_name(Activation a);
const char* rope_pairing_name(RopePairing p);

struct LayerConfig {
  int window = 0;           // sliding-window attention: a query at p sees keys at positions > p - window (0: all)
  float rope_base = 10000.0f;
  float rope_scale = 1.0f;  // linear position scaling (positions are divided by it)
  bool local() const { return window > 0; }
};

// How one layer's queries attend: scores = scale * <q, k> over the keys at positions
// (p - window, p] (window 0: all of [0, p]). Everything that recomputes attention outside the
// forward pass (evaluation targets, rebuilt policy statistics) takes it from here.
struct LayerAttention {
  float scale = 1.0f;
  int window = 0;
};

struct ModelConfig {
  std::string arch;         // general.architecture
  std::string name;         // general.name, if any
  int n_layers = 0;
  int n_embd = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int n_rot = 0;            // rotary dimensions per head (<= head_dim)
  int n_ff = 0;
  int n_vocab = 0;
  int n_ctx_train = 0;
  float rope_base = 10000.0f;  // of the full-attention layers (metadata rope.freq_base)
  float rope_scale = 1.0f;     // of the full-attention layers (rope.scaling linear factor)
  float rms_eps = 1e-5f;
  bool tied_output = false;

  // The operations (set by the architecture file; the defaults are llama's).
  Activation activation = Activation::silu;
  RopePairing rope_pairing = RopePairing::adjacent;
  bool qkv_bias = false;       // biases added to the Q, K and V projections
  bool qk_norm = false;        // RMS norm of each query and key head before the rotary embedding
  bool post_norms = false;     // RMS norm of the attention and FFN outputs before each residual add
  float embd_scale = 1.0f;     // token embeddings are multiplied by it
  float attn_scale = 0.0f;     // attention scores = attn_scale * <q, k>
  float logit_softcap = 0.0f;  // > 0: logits = c * tanh(logits / c)
  std::vector<LayerConfig> layers;

  int n_local_layers() const;
  LayerAttention attention(int layer) const;  // throws qf::Error for a layer out of range

  // Shape fingerprint used to match filter files to models, e.g. "llama:L30:H9:KV3:D64:E576:V49152".
  std::string fingerprint() const;
};

}  // namespace qf
