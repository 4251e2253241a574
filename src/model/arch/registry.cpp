#include <array>
#include <cmath>

#include "model/arch/arch.h"
#include "util/error.h"

namespace qf::arch {

namespace {

constexpr std::array<Architecture, 4> kArchitectures{{
    {"gemma3", configure_gemma3},
    {"llama", configure_llama},  // also Mistral, SmolLM and Llama 3.x files
    {"qwen2", configure_qwen2},
    {"qwen3", configure_qwen3},
}};

int positive(uint64_t v, const std::string& what) {
  if (v == 0 || v > (1u << 24)) fail("model metadata: ", what, " = ", v, " is out of range");
  return static_cast<int>(v);
}

}  // namespace

const Architecture* find(std::string_view name) {
  for (const Architecture& a : kArchitectures)
    if (name == a.name) return &a;
  return nullptr;
}

std::string supported_names() {
  std::string s;
  for (const Architecture& a : kArchitectures) s += (s.empty() ? "" : ", ") + std::string(a.name);
  return s;
}

void read_common_metadata(const gguf::File& f, ModelConfig& c) {
  const std::string& path = f.path();
  auto u64 = [&](std::string_view name) { return positive(f.get_u64(key(c, name)), key(c, name)); };
  auto u64_or = [&](std::string_view name, uint64_t def) { return positive(f.get_u64(key(c, name), def), key(c, name)); };
  c.n_layers = u64("block_count");
  c.n_embd = u64("embedding_length");
  c.n_heads = u64("attention.head_count");
  c.n_kv_heads = u64_or("attention.head_count_kv", c.n_heads);
  c.n_ff = u64("feed_forward_length");
  c.n_ctx_train = u64_or("context_length", 2048);
  if (c.n_heads % c.n_kv_heads != 0) fail(path, ": head_count is not a multiple of head_count_kv");
  // Heads may be wider than n_embd / n_heads (gemma3, qwen3): key_length says so.
  if (!f.has(key(c, "attention.key_length")) && c.n_embd % c.n_heads != 0)
    fail(path, ": embedding_length is not a multiple of head_count");
  c.head_dim = u64_or("attention.key_length", c.n_embd / c.n_heads);
  if (f.get_u64(key(c, "attention.value_length"), c.head_dim) != static_cast<uint64_t>(c.head_dim))
    fail(path, ": key_length != value_length is not supported");
  c.n_rot = u64_or("rope.dimension_count", c.head_dim);
  if (c.n_rot > c.head_dim || c.n_rot % 2 != 0) fail(path, ": rope.dimension_count must be even and <= head size");
  c.rope_base = f.get_f32(key(c, "rope.freq_base"), 10000.0f);
  c.rms_eps = f.get_f32(key(c, "attention.layer_norm_rms_epsilon"), 1e-5f);
  if (!(c.rope_base > 0.0f) || !(c.rms_eps > 0.0f)) fail(path, ": rope.freq_base and rms epsilon must be positive");
  const std::string scaling = f.get_str(key(c, "rope.scaling.type"), "none");
  if (scaling == "linear") {
    const float factor = f.get_f32(key(c, "rope.scaling.factor"), 1.0f);
    if (!(factor > 0.0f)) fail(path, ": rope.scaling.factor must be positive");
    c.rope_scale = factor;
  } else if (scaling != "none") {
    fail(path, ": rope scaling '", scaling, "' is not supported");
  }
  c.attn_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  c.layers.assign(c.n_layers, LayerConfig{0, c.rope_base, c.rope_scale});
}

}  // namespace qf::arch
