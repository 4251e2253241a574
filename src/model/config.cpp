#include "model/config.h"

#include "util/error.h"

namespace qf {

const char* activation_name(Activation a) { return a == Activation::silu ? "silu" : "gelu_tanh"; }
const char* rope_pairing_name(RopePairing p) { return p == RopePairing::adjacent ? "adjacent" : "neox"; }

int ModelConfig::n_local_layers() const {
  int n = 0;
  for (const LayerConfig& l : layers) n += l.local();
  return n;
}

LayerAttention ModelConfig::attention(int layer) const {
  if (layer < 0 || layer >= static_cast<int>(layers.size())) fail("layer ", layer, " is out of range (", layers.size(), " layers)");
  return {attn_scale, layers[layer].window};
}

std::string ModelConfig::fingerprint() const {
  return arch + ":L" + std::to_string(n_layers) + ":H" + std::to_string(n_heads) + ":KV" +
         std::to_string(n_kv_heads) + ":D" + std::to_string(head_dim) + ":E" + std::to_string(n_embd) +
         ":V" + std::to_string(n_vocab);
}

}  // namespace qf
