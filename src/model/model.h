// A model bound to a memory-mapped GGUF file. Weights are never expanded: the forward pass reads
// them in place through the fused dequantize-and-dot kernels. What the forward pass computes is
// in ModelConfig (model/config.h), filled by the file's architecture (model/arch/).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "model/config.h"
#include "tensor/kernels.h"

namespace qf {

// One layer's tensors; the optional ones are null unless the config asks for them.
struct LayerWeights {
  const float* attn_norm = nullptr;
  WeightView wq, wk, wv, wo;
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr;  // qkv_bias
  const float *q_norm = nullptr, *k_norm = nullptr;         // qk_norm: [head_dim]
  const float* attn_post_norm = nullptr;                    // post_norms
  const float* ffn_norm = nullptr;
  WeightView ffn_gate, ffn_up, ffn_down;
  const float* ffn_post_norm = nullptr;                     // post_norms
};

class Model {
 public:
  // Opens, validates and binds; throws qf::Error naming the problem (missing tensor, wrong
  // shape, unsupported architecture or tensor type).
  static std::unique_ptr<Model> load(const std::string& path);

  const ModelConfig& config() const { return config_; }
  const gguf::File& file() const { return *file_; }
  const WeightView& token_embd() const { return token_embd_; }
  const WeightView& output() const { return output_; }
  const float* output_norm() const { return output_norm_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const float* rope_freq_factors() const { return rope_freqs_; }  // may be null

 private:
  Model() = default;
  // On machines with the AMX engine, the matrices take the panel layout (kernels.h) in the
  // process's own copy of the weights: decode reads them with plain loads and gives the same
  // numbers batched or alone, in a prompt or a step. QF_PANELS=0, or weights left in the file
  // mapping (QF_MMAP_WEIGHTS=1), keep the rows layout.
  void use_panel_layout();
  std::unique_ptr<gguf::File> file_;
  ModelConfig config_;
  WeightView token_embd_, output_;
  const float* output_norm_ = nullptr;
  const float* rope_freqs_ = nullptr;
  std::vector<LayerWeights> layers_;
};

}  // namespace qf
