// qwen3: llama with an RMS norm on every query and key head before the rotary embedding, NEOX
// rotary pairs, and heads that may be wider than n_embd / n_heads (attention.key_length).
#include "model/arch/arch.h"

namespace qf::arch {

void configure_qwen3(const gguf::File&, ModelConfig& c) {
  c.qk_norm = true;
  c.rope_pairing = RopePairing::halves;
}

}  // namespace qf::arch
