#include "model/model.h"

#include <string>

#include "util/error.h"

namespace qf {

std::string ModelConfig::fingerprint() const {
  return arch + ":L" + std::to_string(n_layers) + ":H" + std::to_string(n_heads) + ":KV" +
         std::to_string(n_kv_heads) + ":D" + std::to_string(head_dim) + ":E" + std::to_string(n_embd) +
         ":V" + std::to_string(n_vocab);
}

namespace {

std::string shape_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

WeightView matrix(const gguf::File& f, const std::string& name, int64_t cols, int64_t rows) {
  const gguf::TensorInfo& t = f.tensor(name);
  if (t.ne.size() != 2 || t.ne[0] != cols || t.ne[1] != rows)
    fail(f.path(), ": tensor ", name, " has shape ", shape_str(t.ne), ", expected [", cols, ", ", rows, "]");
  const TypeInfo ti = type_info(t.type);
  if (!ti.supported) fail(f.path(), ": tensor ", name, " has type ", ti.name, ", which qfilters does not support yet");
  return WeightView{t.type, cols, rows, t.data};
}

const float* vector_f32(const gguf::File& f, const std::string& name, int64_t n) {
  const gguf::TensorInfo& t = f.tensor(name);
  if (t.type != GgmlType::F32) fail(f.path(), ": tensor ", name, " must be F32, found ", type_info(t.type).name);
  if (t.n_elements() != n || t.ne[0] != n)
    fail(f.path(), ": tensor ", name, " has shape ", shape_str(t.ne), ", expected [", n, "]");
  if (reinterpret_cast<uintptr_t>(t.data) % alignof(float) != 0) fail(f.path(), ": tensor ", name, " is misaligned");
  return reinterpret_cast<const float*>(t.data);
}

int positive(uint64_t v, const char* what) {
  if (v == 0 || v > (1u << 24)) fail("model metadata: ", what, " = ", v, " is out of range");
  return static_cast<int>(v);
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = gguf::File::open(path);
  const gguf::File& f = *m->file_;
  ModelConfig& c = m->config_;
  c.arch = f.get_str("general.architecture");
  // Mistral and SmolLM GGUFs use the llama architecture name; others need their own code.
  if (c.arch != "llama") fail(path, ": architecture '", c.arch, "' is not supported (supported: llama)");
  const std::string a = c.arch + ".";
  c.name = f.get_str("general.name", "");
  c.n_layers = positive(f.get_u64(a + "block_count"), "block_count");
  c.n_embd = positive(f.get_u64(a + "embedding_length"), "embedding_length");
  c.n_heads = positive(f.get_u64(a + "attention.head_count"), "head_count");
  c.n_kv_heads = positive(f.get_u64(a + "attention.head_count_kv", c.n_heads), "head_count_kv");
  c.n_ff = positive(f.get_u64(a + "feed_forward_length"), "feed_forward_length");
  c.n_ctx_train = positive(f.get_u64(a + "context_length", 2048), "context_length");
  if (c.n_embd % c.n_heads != 0) fail(path, ": embedding_length is not a multiple of head_count");
  if (c.n_heads % c.n_kv_heads != 0) fail(path, ": head_count is not a multiple of head_count_kv");
  c.head_dim = positive(f.get_u64(a + "attention.key_length", c.n_embd / c.n_heads), "key_length");
  if (f.get_u64(a + "attention.value_length", c.head_dim) != static_cast<uint64_t>(c.head_dim))
    fail(path, ": key_length != value_length is not supported");
  c.n_rot = positive(f.get_u64(a + "rope.dimension_count", c.head_dim), "rope.dimension_count");
  if (c.n_rot > c.head_dim || c.n_rot % 2 != 0) fail(path, ": rope.dimension_count must be even and <= head size");
  c.rope_base = f.get_f32(a + "rope.freq_base", 10000.0f);
  c.rms_eps = f.get_f32(a + "attention.layer_norm_rms_epsilon", 1e-5f);
  if (!(c.rope_base > 0.0f) || !(c.rms_eps > 0.0f)) fail(path, ": rope.freq_base and rms epsilon must be positive");
  const std::string scaling = f.get_str(a + "rope.scaling.type", "none");
  if (scaling == "linear") {
    const float factor = f.get_f32(a + "rope.scaling.factor", 1.0f);
    if (!(factor > 0.0f)) fail(path, ": rope.scaling.factor must be positive");
    c.rope_scale = factor;
  } else if (scaling != "none") {
    fail(path, ": rope scaling '", scaling, "' is not supported");
  }

  const gguf::TensorInfo& embd = f.tensor("token_embd.weight");
  if (embd.ne.size() != 2 || embd.ne[0] != c.n_embd) fail(path, ": token_embd.weight has shape ", shape_str(embd.ne));
  c.n_vocab = positive(static_cast<uint64_t>(embd.ne[1]), "vocabulary size");
  m->token_embd_ = matrix(f, "token_embd.weight", c.n_embd, c.n_vocab);
  m->output_norm_ = vector_f32(f, "output_norm.weight", c.n_embd);
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  m->output_ = c.tied_output ? m->token_embd_ : matrix(f, "output.weight", c.n_embd, c.n_vocab);
  if (f.find_tensor("rope_freqs.weight")) m->rope_freqs_ = vector_f32(f, "rope_freqs.weight", c.n_rot / 2);

  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  // Every layer has several tensors: a block_count beyond the tensor table is a lie, and would
  // size the layer table (up to 2^24 entries) before the first missing tensor is noticed.
  if (static_cast<size_t>(c.n_layers) > f.tensors().size())
    fail(path, ": block_count = ", c.n_layers, " but the file has only ", f.tensors().size(), " tensors");
  m->layers_.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerWeights& w = m->layers_[l];
    w.attn_norm = vector_f32(f, p + "attn_norm.weight", c.n_embd);
    w.wq = matrix(f, p + "attn_q.weight", c.n_embd, q_dim);
    w.wk = matrix(f, p + "attn_k.weight", c.n_embd, kv_dim);
    w.wv = matrix(f, p + "attn_v.weight", c.n_embd, kv_dim);
    w.wo = matrix(f, p + "attn_output.weight", q_dim, c.n_embd);
    w.ffn_norm = vector_f32(f, p + "ffn_norm.weight", c.n_embd);
    w.ffn_gate = matrix(f, p + "ffn_gate.weight", c.n_embd, c.n_ff);
    w.ffn_up = matrix(f, p + "ffn_up.weight", c.n_embd, c.n_ff);
    w.ffn_down = matrix(f, p + "ffn_down.weight", c.n_ff, c.n_embd);
    if (f.find_tensor(p + "attn_q.bias") || f.find_tensor(p + "attn_k.bias"))
      fail(path, ": attention biases are not supported for llama");
  }
  return m;
}

}  // namespace qf
