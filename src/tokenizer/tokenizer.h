// The tokenizer read from GGUF metadata, matching llama.cpp token for token. Special tokens are
// cut out of the text first (longest first); the raw text between them is then tokenized by the
// file's model:
//  - byte-level BPE (tokenizer.ggml.model = "gpt2"): split into words by the pre-tokenizer, each
//    word's bytes (in GPT-2's printable byte alphabet) merged by rank;
//  - SentencePiece (tokenizer.ggml.model = "llama", llama.cpp's SPM): spaces become U+2581 (with a
//    leading one where add_space_prefix says), characters are merged pairwise, highest-scoring
//    token first, and whatever is left that is no token falls back to <0xXX> byte tokens.
// Checked against llama.cpp by tests/tokenizer_test.cpp (SmolLM2, BPE) and
// tests/tokenizer_spm_test.cpp (Gemma 3, SPM) with the goldens in tests/golden/.
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pretokenizer.h"

namespace qf {

namespace gguf {
class File;
}

// tokenizer.ggml.token_type values.
enum class TokenType : uint8_t {
  kUndefined = 0, kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6,
};

enum class TokenizerModel : uint8_t { kBpe, kSpm };

class Tokenizer {
 public:
  // Reads tokenizer.ggml.{model,pre,tokens,token_type,merges,scores,*_token_id,add_*_token,
  // add_space_prefix} and tokenizer.chat_template from the metadata alone (no tensors needed).
  // Throws qf::Error naming the problem for another tokenizer model, an unsupported
  // pre-tokenizer, missing or mistyped keys, duplicate tokens.
  static Tokenizer from_gguf(const gguf::File& file);

  // Text -> tokens, as llama_tokenize(vocab, text, add_special, parse_special). add_special:
  // prepend BOS / append EOS where tokenizer.ggml.add_bos_token / add_eos_token say (SmolLM2:
  // neither). parse_special: control tokens spelled in the text ("<|im_end|>") become those
  // tokens; user-defined tokens always do. Any bytes are accepted: invalid UTF-8 is tokenized
  // as llama.cpp does (each bad byte as U+FFFD). Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;

  // The bytes a token stands for: byte-level decoded for normal tokens, the text itself for
  // control / user-defined / unknown tokens, nothing for unused ones. A token can end in the
  // middle of a UTF-8 sequence (see StreamDecoder). Throws qf::Error when id is out of range.
  const std::string& token_bytes(int32_t id) const;
  // Concatenated token_bytes, as llama_detokenize(remove_special = false, unparse_special =
  // render_special): render_special = false drops control and unknown tokens, and where
  // add_space_prefix is set the first token loses one leading space (the one encode added).
  std::string decode(std::span<const int32_t> tokens, bool render_special = true) const;

  int32_t n_vocab() const { return static_cast<int32_t>(pieces_.size()); }
  TokenizerModel model() const { return model_; }
  // The raw vocabulary string (BPE: GPT-2 byte alphabet; SPM: U+2581 for spaces).
  std::string_view piece(int32_t id) const;
  // Type after llama.cpp's fix-ups (end-of-turn and FIM tokens found by text become control).
  TokenType token_type(int32_t id) const;
  bool is_control(int32_t id) const { return token_type(id) == TokenType::kControl; }
  std::optional<int32_t> find(std::string_view piece) const;

  int32_t bos() const { return bos_; }  // -1 when the vocabulary has none
  int32_t eos() const { return eos_; }
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  // SPM: a space is put before the text at the start and after every special token (Llama 2
  // style files; false for Gemma). decode() drops it again.
  bool add_space_prefix() const { return add_space_prefix_; }
  // End of generation: EOS, end-of-turn tokens such as "<|im_end|>", and the few others
  // llama.cpp stops on (for SmolLM2: 0 <|endoftext|>, 2 <|im_end|>, 4 <reponame>).
  bool is_eog(int32_t id) const;
  const std::vector<int32_t>& eog_ids() const { return eog_; }

  // BPE only (SPM files are not pre-tokenized).
  PreTokenizer pre_tokenizer() const { return pre_.kind; }
  const std::string& pre_name() const { return pre_name_; }
  // tokenizer.chat_template, empty when the file has none.
  const std::string& chat_template() const { return chat_template_; }

 private:
  Tokenizer() = default;

  struct TransparentHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct Merge {
    int32_t rank;
    int32_t result;  // symbol id of the merged string
  };

  // from_gguf, step by step.
  void load_tokens(const gguf::File& f);
  void load_bpe(const gguf::File& f);
  void load_spm(const gguf::File& f);
  void load_special_tokens(const gguf::File& f);
  void find_end_of_generation();
  void build_special_matcher();

  int32_t intern(std::string_view s);
  int32_t lookup(std::string_view s) const;  // symbol id or -1
  void check_id(int32_t id) const;
  struct Scratch;
  struct Fragment;
  void split_special(std::string_view text, bool parse_special, std::vector<Fragment>& frags) const;
  void encode_fragment(std::string_view text, Scratch& sc, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view bytes, Scratch& sc, std::vector<int32_t>& out) const;
  void spm_fragment(std::string_view text, bool space_prefix, Scratch& sc, std::vector<int32_t>& out) const;
  void spm_word(std::string_view word, Scratch& sc, std::vector<int32_t>& out) const;
  std::string bytes_of(int32_t id) const;
  std::string bpe_bytes_of(int32_t id) const;
  std::string spm_bytes_of(int32_t id) const;

  TokenizerModel model_ = TokenizerModel::kBpe;
  std::vector<std::string> pieces_;
  std::vector<std::string> bytes_;  // token_bytes of every token, computed once
  std::vector<TokenType> types_;
  std::vector<uint8_t> eog_flag_;
  std::vector<int32_t> eog_;
  // Every vocabulary string and every string a merge reads or makes gets a symbol id: the token
  // id for vocabulary strings, n_vocab and up for the others. BPE then works on integers.
  std::unordered_map<std::string, int32_t, TransparentHash, std::equal_to<>> symbols_;
  int32_t n_symbols_ = 0;
  std::unordered_map<uint64_t, Merge> merges_;  // (left symbol << 32 | right symbol) -> merge
  int32_t byte_symbol_[256];                    // symbol of each byte's GPT-2 character, or -1
  int32_t single_byte_token_[256];              // token whose text is that one raw byte, or -1
  std::string byte_char_[256];                  // GPT-2 character of each byte, as UTF-8
  std::vector<int32_t> special_;                // control/user-defined/unknown, longest text first
  std::vector<int32_t> special_rank_;           // per token: its index in special_, or -1
  // A byte trie over the special tokens' texts, to find which of them occur in a text at all.
  std::unordered_map<uint64_t, int32_t> trie_edges_;  // (node << 8 | byte) -> child node
  std::vector<int32_t> trie_token_;                   // per node: the token spelled so far, or -1
  bool trie_first_byte_[256] = {};                    // some special token starts with this byte
  // SPM: per-token scores (higher merges first) and the <0xXX> token of every byte (-1: none).
  std::vector<float> scores_;
  int32_t byte_token_[256];
  size_t max_piece_len_ = 0;          // no pair longer than this can be a token
  bool joins_space_after_[256] = {};  // some token has this byte right before a U+2581

  std::string pre_name_;
  PreTokenizerInfo pre_{};
  int32_t bos_ = -1;
  int32_t eos_ = -1;
  bool add_bos_ = false;
  bool add_eos_ = false;
  bool add_space_prefix_ = false;
  std::string chat_template_;
};

// Turns a token stream into text without ever splitting a UTF-8 character: push() returns what
// is complete so far and holds back a trailing incomplete sequence (at most 3 bytes) until the
// next token completes it; bytes that can never become valid are passed through as they are.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool render_special = true)
      : tok_(&tok), render_special_(render_special) {}
  std::string push(int32_t token);
  // Returns and clears what is held back (an incomplete sequence at the end of the stream).
  std::string flush();
  void reset() { pending_.clear(); }

 private:
  const Tokenizer* tok_;
  bool render_special_;
  std::string pending_;
};

}  // namespace qf
