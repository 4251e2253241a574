// quantize_model: re-quantizes a GGUF model with llama.cpp's llama_model_quantize (prebuilt
// libllama), e.g. SmolLM2 Q4_1 -> Q4_K_M, to produce K-quant files for qf's tests and benchmarks.
//
//   quantize_model IN.gguf OUT.gguf FTYPE [THREADS]
//   FTYPE: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_M Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K IQ4_NL
//
// Re-quantizing an already quantized file is allowed (allow_requantize): fine for speed, but
// its quality is worse than quantizing the original F16/BF16 weights.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

#include "llama.h"

namespace {

llama_ftype ftype_by_name(const std::string& n) {
  const std::pair<const char*, llama_ftype> names[] = {
      {"Q4_0", LLAMA_FTYPE_MOSTLY_Q4_0},     {"Q4_1", LLAMA_FTYPE_MOSTLY_Q4_1},
      {"Q5_0", LLAMA_FTYPE_MOSTLY_Q5_0},     {"Q5_1", LLAMA_FTYPE_MOSTLY_Q5_1},
      {"Q8_0", LLAMA_FTYPE_MOSTLY_Q8_0},     {"Q2_K", LLAMA_FTYPE_MOSTLY_Q2_K},
      {"Q3_K_M", LLAMA_FTYPE_MOSTLY_Q3_K_M}, {"Q4_K_S", LLAMA_FTYPE_MOSTLY_Q4_K_S},
      {"Q4_K_M", LLAMA_FTYPE_MOSTLY_Q4_K_M}, {"Q5_K_S", LLAMA_FTYPE_MOSTLY_Q5_K_S},
      {"Q5_K_M", LLAMA_FTYPE_MOSTLY_Q5_K_M}, {"Q6_K", LLAMA_FTYPE_MOSTLY_Q6_K},
      {"IQ4_NL", LLAMA_FTYPE_MOSTLY_IQ4_NL},
  };
  for (const auto& [name, t] : names)
    if (n == name) return t;
  std::fprintf(stderr, "quantize_model: unknown FTYPE %s\n", n.c_str());
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::fprintf(stderr, "usage: quantize_model IN.gguf OUT.gguf FTYPE [THREADS]\n");
    return 2;
  }
  llama_backend_init();
  llama_model_quantize_params p = llama_model_quantize_default_params();
  p.ftype = ftype_by_name(argv[3]);
  p.allow_requantize = true;
  p.nthread = argc == 5 ? std::atoi(argv[4]) : 0;
  const uint32_t rc = llama_model_quantize(argv[1], argv[2], &p);
  llama_backend_free();
  if (rc != 0) {
    std::fprintf(stderr, "quantize_model: llama_model_quantize failed (%u)\n", rc);
    return 1;
  }
  return 0;
}
