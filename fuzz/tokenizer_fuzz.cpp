// libFuzzer harness: the tokenizer of SmolLM2 (byte-level BPE, loaded once) on arbitrary bytes.
// Encoding never fails, every id is in the vocabulary, and for valid UTF-8 text (special tokens
// not parsed) decoding gives back the input, less the bytes the vocabulary cannot spell (SmolLM2
// has no token for the control bytes 0x04 0x06 0x13 0x14 0x16 0x1D; like llama.cpp, they are
// dropped). The model comes from $QF_FUZZ_MODEL, or models/SmolLM2-135M-Instruct.Q4_1.gguf.
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz_tokenizer.h"
#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace {

const qf::Tokenizer* g_tokenizer = nullptr;
std::array<bool, 256> g_spellable{};  // bytes that are a token on their own

std::string without_unspellable(std::string_view s) {
  std::string out;
  for (char c : s)
    if (g_spellable[static_cast<uint8_t>(c)]) out.push_back(c);
  return out;
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF): only such text is
// expected to round-trip; anything else is replaced by U+FFFD when encoded.
bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<uint8_t>(s[i]);
    size_t len;
    uint32_t cpt;
    if (b < 0x80) { len = 1; cpt = b; }
    else if ((b & 0xE0) == 0xC0) { len = 2; cpt = b & 0x1F; }
    else if ((b & 0xF0) == 0xE0) { len = 3; cpt = b & 0x0F; }
    else if ((b & 0xF8) == 0xF0) { len = 4; cpt = b & 0x07; }
    else return false;
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto c = static_cast<uint8_t>(s[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      cpt = (cpt << 6) | (c & 0x3F);
    }
    static constexpr uint32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cpt < kMinForLength[len] || cpt > 0x10FFFF || (cpt >= 0xD800 && cpt <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const qf::Tokenizer& tok = fuzz_tokenizer("tokenizer_fuzz");
  g_tokenizer = &tok;
  for (int32_t id = 0; id < tok.n_vocab(); ++id) {
    const std::string& bytes = tok.token_bytes(id);
    if (bytes.size() == 1 && !tok.is_control(id)) g_spellable[static_cast<uint8_t>(bytes[0])] = true;
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const qf::Tokenizer& tok = *g_tokenizer;
  for (bool parse_special : {false, true}) {
    const std::vector<int32_t> ids = tok.encode(text, /*add_special=*/parse_special, parse_special);
    for (int32_t id : ids)
      if (id < 0 || id >= tok.n_vocab()) std::abort();
    (void)tok.decode(ids, /*render_special=*/false);
  }
  if (is_valid_utf8(text)) {
    const std::vector<int32_t> ids = tok.encode(text, false, false);
    if (tok.decode(ids) != without_unspellable(text)) {
      std::fprintf(stderr, "round trip failed for %zu bytes of valid UTF-8\n", size);
      std::abort();
    }
  }
  return 0;
}
