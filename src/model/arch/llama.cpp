// llama (also Mistral, SmolLM2, Llama 3.x): SwiGLU, RMS norms before attention and FFN, rotary
// embedding on adjacent pairs, optional rope_freqs.weight factors (Llama 3.1). All defaults.
#include "model/arch/arch.h"

namespace qf::arch {

void configure_llama(const gguf::File&, ModelConfig&) {}

}  // namespace qf::arch
