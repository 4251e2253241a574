// The supported architectures, one file each: the metadata keys and operations that set an
// architecture apart, written into a ModelConfig. Keys shared by every architecture
// (`<arch>.block_count`, `.embedding_length`, ...) are read once by read_common_metadata.
#pragma once
#include <string>
#include <string_view>

#include "gguf/gguf.h"
#include "model/config.h"

namespace qf::arch {

// `<arch>.<name>`, the GGUF spelling of an architecture's key.
inline std::string key(const ModelConfig& c, std::string_view name) { return c.arch + "." + std::string(name); }

// Fills the shape, norms epsilon, rotary settings and training context from the keys every
// architecture has, and one LayerConfig per layer with the full-attention rotary settings.
void read_common_metadata(const gguf::File& f, ModelConfig& c);

void configure_llama(const gguf::File& f, ModelConfig& c);
void configure_qwen2(const gguf::File& f, ModelConfig& c);
void configure_qwen3(const gguf::File& f, ModelConfig& c);
void configure_gemma3(const gguf::File& f, ModelConfig& c);

struct Architecture {
  const char* name;  // general.architecture
  // Called after read_common_metadata: sets the operations and per-layer settings.
  void (*configure)(const gguf::File& f, ModelConfig& c);
};

// The architecture called `name`, or null.
const Architecture* find(std::string_view name);
// "gemma3, llama, qwen2, qwen3"
std::string supported_names();

}  // namespace qf::arch
