// The tokenizer the text harnesses run against: the model named by QF_FUZZ_MODEL, else the
// default SmolLM2 file, loaded once for the whole run (the file is mapped once, not per input).
// A file that does not load ends the run with one line and exit 1.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

inline const qf::Tokenizer& fuzz_tokenizer(const char* harness) {
  const char* env = std::getenv("QF_FUZZ_MODEL");
  const std::string path = env ? env : QF_SOURCE_DIR "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  try {
    static std::unique_ptr<qf::gguf::File> file = qf::gguf::File::open(path);
    static const qf::Tokenizer tok = qf::Tokenizer::from_gguf(*file);
    return tok;
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "%s: cannot load %s: %s\n", harness, path.c_str(), e.what());
    std::exit(1);
  }
}
