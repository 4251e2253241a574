// gemma3: embeddings scaled by sqrt(n_embd), GeGLU (tanh GELU), QK norm, RMS norms both before
// and after attention and FFN, NEOX rotary pairs, and interleaved sliding-window layers.
// Facts as llama.cpp applies them (src/models/gemma3.cpp, llama-hparams.cpp):
//  - with attention.sliding_window = W > 0, layer l is local when l % P < P - 1, where P is
//    attention.sliding_window_pattern (default 6; 0: every layer local): five local layers, then one global;
//  - local layers use rope.freq_base_swa (default 10000) and no position scaling; global layers
//    rope.freq_base and the rope.scaling factor;
//  - queries are scaled by 1/sqrt(key_length), except the 62-layer (27B) model's
//    1/sqrt(n_embd / n_heads) (query_pre_attn_scalar);
//  - final_logit_softcapping only when the key is present.
// Norm weights need no +1: the converter already stored Gemma's (1 + w).
#include <cmath>

#include "model/arch/arch.h"
#include "util/error.h"

namespace qf::arch {

void configure_gemma3(const gguf::File& f, ModelConfig& c) {
  c.activation = Activation::gelu_tanh;
  c.rope_pairing = RopePairing::halves;
  c.qk_norm = true;
  c.post_norms = true;
  c.embd_scale = std::sqrt(static_cast<float>(c.n_embd));
  c.attn_scale = c.n_layers == 62 ? 1.0f / std::sqrt(static_cast<float>(c.n_embd / c.n_heads))
                                  : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  c.logit_softcap = f.get_f32(key(c, "final_logit_softcapping"), 0.0f);
  if (!(c.logit_softcap >= 0.0f)) fail(f.path(), ": final_logit_softcapping must be >= 0");

  const uint64_t window = f.get_u64(key(c, "attention.sliding_window"), 0);
  if (window == 0) return;
  if (window > (1u << 24)) fail(f.path(), ": attention.sliding_window = ", window, " is out of range");
  const uint64_t pattern = f.get_u64(key(c, "attention.sliding_window_pattern"), 6);
  if (pattern > (1u << 24)) fail(f.path(), ": attention.sliding_window_pattern = ", pattern, " is out of range");
  const float local_base = f.get_f32(key(c, "rope.freq_base_swa"), 10000.0f);
  if (!(local_base > 0.0f)) fail(f.path(), ": rope.freq_base_swa must be positive");
  for (int l = 0; l < c.n_layers; ++l)
    if (pattern == 0 || static_cast<uint64_t>(l) % pattern < pattern - 1) c.layers[l] = LayerConfig{static_cast<int>(window), local_base, 1.0f};
}

}  // namespace qf::arch
