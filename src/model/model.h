// A Llama-family model bound to a memory-mapped GGUF file. Weights are never expanded: the
// forward pass reads them in place through the fused dequantize-and-dot kernels.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "tensor/kernels.h"

namespace qf {

struct ModelConfig {
  std::string arch;         // "llama"
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
  float rope_base = 10000.0f;
  float rope_scale = 1.0f;  // linear position scaling (positions are divided by it)
  float rms_eps = 1e-5f;
  bool tied_output = false;

  // Shape fingerprint used to match filter files to models, e.g. "llama:L30:H9:KV3:D64:E576:V49152".
  std::string fingerprint() const;
};

struct LayerWeights {
  const float* attn_norm = nullptr;
  WeightView wq, wk, wv, wo;
  const float* ffn_norm = nullptr;
  WeightView ffn_gate, ffn_up, ffn_down;
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
  std::unique_ptr<gguf::File> file_;
  ModelConfig config_;
  WeightView token_embd_, output_;
  const float* output_norm_ = nullptr;
  const float* rope_freqs_ = nullptr;
  std::vector<LayerWeights> layers_;
};

}  // namespace qf
