// Pre-tokenizers: split text (as codepoints) into the words that BPE then merges within. Each
// is a hand-written matcher for one Hugging Face split regex, behaving exactly like llama.cpp's
// (src/unicode.cpp), including where llama.cpp's hand-written matchers differ from a real regex
// engine (each split stage sees only the segments of the previous stage, so `\s+(?!\S)` cannot
// look past a segment's end).
#pragma once
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace qf {

enum class PreTokenizer {
  // llama.cpp's fallback for a missing or "default" tokenizer.ggml.pre: punctuation runs, then
  // GPT-2, then number runs, then ASCII digit triples.
  kDefault,
  // GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
  kGpt2,
  // SmolLM / StarCoder: every \p{N} codepoint on its own, then GPT-2.
  kDigitsGpt2,
  // Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
  //          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kLlama3,
  // Qwen 2: as Llama 3 but \p{N} (single digits).
  kQwen2,
};

// Maps a tokenizer.ggml.pre value to its pre-tokenizer, with llama.cpp's name aliases. Also
// reports whether llama.cpp sets ignore_merges (a word that is a whole token is not merged) and
// add_bos by default for that name. Returns false for names that are not supported.
struct PreTokenizerInfo {
  PreTokenizer kind;
  bool ignore_merges;
  bool add_bos_default;
};
bool pre_tokenizer_from_name(std::string_view name, PreTokenizerInfo& info);
// The supported names, comma separated, for error messages.
std::string_view supported_pre_tokenizers();

// Splits cpts into words; appends each word's length in codepoints to `words` (cleared first).
void pre_tokenize(PreTokenizer kind, std::span<const uint32_t> cpts, std::vector<uint32_t>& words);

}  // namespace qf
