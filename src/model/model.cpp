#include "model/model.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "model/arch/arch.h"
#include "util/error.h"

namespace qf {

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

// Binds one layer's tensors, the optional ones as the config asks.
LayerWeights bind_layer(const gguf::File& f, const ModelConfig& c, int l) {
  const std::string p = "blk." + std::to_string(l) + ".";
  const int64_t q_dim = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  LayerWeights w;
  w.attn_norm = vector_f32(f, p + "attn_norm.weight", c.n_embd);
  w.wq = matrix(f, p + "attn_q.weight", c.n_embd, q_dim);
  w.wk = matrix(f, p + "attn_k.weight", c.n_embd, kv_dim);
  w.wv = matrix(f, p + "attn_v.weight", c.n_embd, kv_dim);
  w.wo = matrix(f, p + "attn_output.weight", q_dim, c.n_embd);
  w.ffn_norm = vector_f32(f, p + "ffn_norm.weight", c.n_embd);
  w.ffn_gate = matrix(f, p + "ffn_gate.weight", c.n_embd, c.n_ff);
  w.ffn_up = matrix(f, p + "ffn_up.weight", c.n_embd, c.n_ff);
  w.ffn_down = matrix(f, p + "ffn_down.weight", c.n_ff, c.n_embd);
  if (c.qkv_bias) {
    w.bq = vector_f32(f, p + "attn_q.bias", q_dim);
    w.bk = vector_f32(f, p + "attn_k.bias", kv_dim);
    w.bv = vector_f32(f, p + "attn_v.bias", kv_dim);
  } else if (f.find_tensor(p + "attn_q.bias") || f.find_tensor(p + "attn_k.bias") || f.find_tensor(p + "attn_v.bias")) {
    fail(f.path(), ": attention biases are not supported for ", c.arch);
  }
  if (c.qk_norm) {
    w.q_norm = vector_f32(f, p + "attn_q_norm.weight", c.head_dim);
    w.k_norm = vector_f32(f, p + "attn_k_norm.weight", c.head_dim);
  }
  if (c.post_norms) {
    w.attn_post_norm = vector_f32(f, p + "post_attention_norm.weight", c.n_embd);
    w.ffn_post_norm = vector_f32(f, p + "post_ffw_norm.weight", c.n_embd);
  }
  return w;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = gguf::File::open(path);
  // Weights in 2 MiB pages decode faster (gguf.h); QF_MMAP_WEIGHTS=1 keeps them in the file
  // mapping instead (shared page cache between processes, nothing copied at load).
  const char* keep_mapped = std::getenv("QF_MMAP_WEIGHTS");
  if (!(keep_mapped && std::string_view(keep_mapped) == "1")) m->file_->move_tensor_data_to_huge_pages();
  const gguf::File& f = *m->file_;
  ModelConfig& c = m->config_;
  c.arch = f.get_str("general.architecture");
  const arch::Architecture* a = arch::find(c.arch);
  if (!a) fail(path, ": architecture '", c.arch, "' is not supported (supported: ", arch::supported_names(), ")");
  c.name = f.get_str("general.name", "");
  arch::read_common_metadata(f, c);
  a->configure(f, c);

  const gguf::TensorInfo& embd = f.tensor("token_embd.weight");
  if (embd.ne.size() != 2 || embd.ne[0] != c.n_embd) fail(path, ": token_embd.weight has shape ", shape_str(embd.ne));
  if (embd.ne[1] <= 0 || embd.ne[1] > (1 << 24)) fail(path, ": vocabulary size ", embd.ne[1], " is out of range");
  c.n_vocab = static_cast<int>(embd.ne[1]);
  m->token_embd_ = matrix(f, "token_embd.weight", c.n_embd, c.n_vocab);
  m->output_norm_ = vector_f32(f, "output_norm.weight", c.n_embd);
  c.tied_output = f.find_tensor("output.weight") == nullptr;
  m->output_ = c.tied_output ? m->token_embd_ : matrix(f, "output.weight", c.n_embd, c.n_vocab);
  if (f.find_tensor("rope_freqs.weight")) m->rope_freqs_ = vector_f32(f, "rope_freqs.weight", c.n_rot / 2);

  // Every layer has several tensors: a block_count beyond the tensor table is a lie, and would
  // size the layer table (up to 2^24 entries) before the first missing tensor is noticed.
  if (static_cast<size_t>(c.n_layers) > f.tensors().size())
    fail(path, ": block_count = ", c.n_layers, " but the file has only ", f.tensors().size(), " tensors");
  m->layers_.reserve(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) m->layers_.push_back(bind_layer(f, c, l));
  m->use_panel_layout();
  return m;
}

void Model::use_panel_layout() {
  const char* env = std::getenv("QF_PANELS");
  if (env && *env && std::string_view(env) != "1") {
    if (std::string_view(env) != "0") fail("QF_PANELS=", env, " is not 0 (rows layout) or 1 (panels where the CPU has AMX)");
    return;
  }
  std::vector<WeightView*> matrices;
  for (LayerWeights& w : layers_)
    for (WeightView* v : {&w.wq, &w.wk, &w.wv, &w.wo, &w.ffn_gate, &w.ffn_up, &w.ffn_down}) matrices.push_back(v);
  matrices.push_back(&token_embd_);  // dequantize_row reads its rows from either layout
  if (!config_.tied_output) matrices.push_back(&output_);
  std::erase_if(matrices, [](const WeightView* v) { return !panels_supported(*v); });
  if (matrices.empty()) return;
  file_->edit_tensor_data([&](uint8_t* begin, uint8_t* end) {
    for (WeightView* v : matrices) {
      if (v->data < begin || v->data + v->rows * row_bytes(v->type, v->cols) > end)
        fail("a weight lies outside the model's tensor data");
      to_panels(*v, begin + (v->data - begin));  // the same bytes, writable
    }
  });
  if (config_.tied_output) output_ = token_embd_;
}

}  // namespace qf
