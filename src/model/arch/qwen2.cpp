// qwen2 (Qwen2, Qwen2.5): llama with biases on the Q, K and V projections and NEOX rotary pairs.
#include "model/arch/arch.h"

namespace qf::arch {

void configure_qwen2(const gguf::File&, ModelConfig& c) {
  c.qkv_bias = true;
  c.rope_pairing = RopePairing::halves;
}

}  // namespace qf::arch
