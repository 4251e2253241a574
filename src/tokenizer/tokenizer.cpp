#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "gguf/gguf.h"
#include "tokenizer/unicode.h"
#include "util/error.h"

namespace qf {

namespace {

// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes map
// in order to U+0100..U+0143, so every byte string is a printable Unicode string.
std::array<uint32_t, 256> byte_to_codepoint() {
  std::array<uint32_t, 256> map{};
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? b : next++;
  }
  return map;
}

// Token texts llama.cpp treats specially (src/llama-vocab.cpp). When the GGUF does not name
// these roles by id, llama.cpp finds them by text and forces them to be control tokens.
constexpr std::string_view kEotTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
    "<end_of_utterance>"};
constexpr std::string_view kEomTexts[] = {"<|eom_id|>"};
constexpr std::string_view kFimPreTexts[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
    "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>"};
constexpr std::string_view kFimSufTexts[] = {
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81hole\xef\xbd\x9c>",
    "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>"};
constexpr std::string_view kFimMidTexts[] = {
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
    "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>"};
constexpr std::string_view kFimPadTexts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"};
constexpr std::string_view kFimRepTexts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"};
constexpr std::string_view kFimSepTexts[] = {"<|file_sep|>"};
constexpr std::string_view kEogTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>", "[e~["};

template <size_t N>
bool one_of(std::string_view s, const std::string_view (&set)[N]) {
  return std::find(std::begin(set), std::end(set), s) != std::end(set);
}

constexpr char kHexDigits[] = "0123456789ABCDEF";
constexpr std::string_view kSpaceMark = "\xe2\x96\x81";  // U+2581, SentencePiece's space

}  // namespace

struct Tokenizer::Fragment {
  int32_t token;  // -1: raw text
  size_t off, len;
};

// Buffers reused across the words of one encode() call.
struct Tokenizer::Scratch {
  struct Sym {
    int32_t sym;  // symbol id, -1 when the string is neither a token nor in any merge
    int32_t prev, next;
    uint32_t off, len;  // bytes of the word it covers; len 0 once merged into its left neighbour
  };
  struct Bigram {
    int32_t rank, left, right, lsym, rsym, result;
  };
  struct SpmBigram {
    float score;
    int32_t left, right;
    uint32_t size;  // bytes of the pair when queued
  };
  std::vector<uint32_t> cpts, words;
  std::string bytes, enc;
  std::vector<Sym> syms;
  std::vector<Bigram> heap;
  std::vector<SpmBigram> spm_heap;
  // SPM: the tokens of every word seen in this encode() call.
  std::unordered_map<std::string, std::vector<int32_t>, TransparentHash, std::equal_to<>> spm_words;
};

int32_t Tokenizer::lookup(std::string_view s) const {
  const auto it = symbols_.find(s);
  return it == symbols_.end() ? -1 : it->second;
}

int32_t Tokenizer::intern(std::string_view s) {
  const auto [it, inserted] = symbols_.try_emplace(std::string(s), n_symbols_);
  if (inserted) ++n_symbols_;
  return it->second;
}

Tokenizer Tokenizer::from_gguf(const gguf::File& f) {
  const std::string& path = f.path();
  Tokenizer t;
  if (!f.has("tokenizer.ggml.model")) fail(path, ": tokenizer.ggml.model is missing (no tokenizer in this file?)");
  const std::string model = f.get_str("tokenizer.ggml.model");
  if (model == "gpt2") t.model_ = TokenizerModel::kBpe;
  else if (model == "llama") t.model_ = TokenizerModel::kSpm;
  else fail(path, ": tokenizer.ggml.model is '", model, "'; supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)");

  // SPM ignores tokenizer.ggml.pre, as llama.cpp does.
  if (t.model_ == TokenizerModel::kBpe) {
    t.pre_name_ = f.get_str("tokenizer.ggml.pre", "");
    if (!pre_tokenizer_from_name(t.pre_name_, t.pre_))
      fail(path, ": unsupported pre-tokenizer tokenizer.ggml.pre = '", t.pre_name_, "' (supported: ",
           supported_pre_tokenizers(), ")");
  }
  t.load_tokens(f);
  if (t.model_ == TokenizerModel::kBpe) t.load_bpe(f);
  else t.load_spm(f);
  t.load_special_tokens(f);
  t.find_end_of_generation();
  t.build_special_matcher();

  const size_t n = t.pieces_.size();
  t.bytes_.resize(n);
  for (size_t i = 0; i < n; ++i) t.bytes_[i] = t.bytes_of(static_cast<int32_t>(i));
  t.chat_template_ = f.get_str("tokenizer.chat_template", "");
  return t;
}

// tokenizer.ggml.tokens and token_type; every token's text gets its id as symbol.
void Tokenizer::load_tokens(const gguf::File& f) {
  const std::string& path = f.path();
  if (!f.has("tokenizer.ggml.tokens")) fail(path, ": tokenizer.ggml.tokens is missing");
  pieces_ = f.get_str_array("tokenizer.ggml.tokens");
  const size_t n = pieces_.size();
  if (n == 0) fail(path, ": tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX / 2)) fail(path, ": tokenizer.ggml.tokens has ", n, " entries, too many");

  types_.assign(n, TokenType::kNormal);
  if (f.has("tokenizer.ggml.token_type")) {
    const std::vector<int64_t> types = f.get_int_array("tokenizer.ggml.token_type");
    if (types.size() < n)
      fail(path, ": tokenizer.ggml.token_type has ", types.size(), " entries for ", n, " tokens");
    for (size_t i = 0; i < n; ++i)
      types_[i] = (types[i] >= 1 && types[i] <= 6) ? static_cast<TokenType>(types[i]) : TokenType::kUndefined;
  }

  symbols_.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    std::string& p = pieces_[i];
    if (p.empty()) p = "[EMPTY_" + std::to_string(i) + "]";  // as llama.cpp names empty tokens
    if (!symbols_.try_emplace(p, static_cast<int32_t>(i)).second)
      fail(path, ": tokenizer.ggml.tokens has a duplicate token '", p, "' at id ", i);
  }
  n_symbols_ = static_cast<int32_t>(n);
}

// Merges and the byte alphabet.
void Tokenizer::load_bpe(const gguf::File& f) {
  const std::string& path = f.path();
  const int32_t n = n_vocab();
  if (!f.has("tokenizer.ggml.merges")) fail(path, ": tokenizer.ggml.merges is missing (needed by BPE)");
  // Merges "left right": rank = index. The first space after the first byte splits (a left
  // part never starts with a space in GPT-2's alphabet, but llama.cpp allows it); lines without
  // one can never apply and are skipped; a repeated pair keeps its first (best) rank.
  const std::vector<std::string> merges = f.get_str_array("tokenizer.ggml.merges");
  if (merges.size() > static_cast<size_t>(INT32_MAX / 8))  // symbol ids must stay int32
    fail(path, ": tokenizer.ggml.merges has ", merges.size(), " entries, too many");
  merges_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string_view m = merges[i];
    const size_t sp = m.find(' ', 1);
    if (sp == std::string_view::npos) continue;
    const std::string_view left = m.substr(0, sp), right = m.substr(sp + 1);
    if (right.empty()) continue;
    const int32_t l = intern(left);
    const int32_t r = intern(right);
    const int32_t res = intern(std::string(left) + std::string(right));
    const uint64_t key = (uint64_t(uint32_t(l)) << 32) | uint32_t(r);
    merges_.try_emplace(key, Merge{static_cast<int32_t>(i), res});
  }

  const auto cp = byte_to_codepoint();
  for (int b = 0; b < 256; ++b) {
    byte_char_[b].clear();
    unicode::append_utf8(cp[b], byte_char_[b]);
    byte_symbol_[b] = lookup(byte_char_[b]);
    const int32_t s = lookup(std::string_view(std::string(1, static_cast<char>(b))));
    single_byte_token_[b] = (s >= 0 && s < n) ? s : -1;
  }
}

// Scores, the space prefix and the byte-fallback tokens.
void Tokenizer::load_spm(const gguf::File& f) {
  const std::string& path = f.path();
  const size_t n = pieces_.size();
  scores_.assign(n, 0.0f);  // llama.cpp: no scores, all zero
  if (f.has("tokenizer.ggml.scores")) {
    const gguf::Value* v = f.find("tokenizer.ggml.scores");
    const bool ints = v->type == gguf::ValueType::ARRAY && std::get<gguf::Array>(v->v).elem_type == gguf::ValueType::I32;
    std::vector<float> scores;
    if (ints) {
      for (int64_t s : f.get_int_array("tokenizer.ggml.scores")) scores.push_back(static_cast<float>(s));
    } else {
      scores = f.get_float_array("tokenizer.ggml.scores");
    }
    if (scores.size() < n) fail(path, ": tokenizer.ggml.scores has ", scores.size(), " entries for ", n, " tokens");
    for (size_t i = 0; i < n; ++i) {
      if (std::isnan(scores[i])) fail(path, ": tokenizer.ggml.scores[", i, "] is NaN");
      scores_[i] = scores[i];
    }
  }
  add_space_prefix_ = f.get_bool("tokenizer.ggml.add_space_prefix", true);
  for (const std::string& p : pieces_) {
    max_piece_len_ = std::max(max_piece_len_, p.size());
    // Bytes a U+2581 follows inside some token: a word cut must not fall after them.
    for (size_t at = p.find(kSpaceMark, 1); at != std::string::npos; at = p.find(kSpaceMark, at + 1))
      joins_space_after_[static_cast<uint8_t>(p[at - 1])] = true;
  }

  // Byte fallback: "<0xAB>" (upper-case hex, as llama.cpp looks it up), else the byte itself.
  for (int b = 0; b < 256; ++b) {
    const char name[] = {'<', '0', 'x', kHexDigits[b >> 4], kHexDigits[b & 15], '>'};
    int32_t id = lookup(std::string_view(name, sizeof name));
    if (id < 0) id = lookup(std::string_view(std::string(1, static_cast<char>(b))));
    byte_token_[b] = id;
  }
}

// BOS/EOS and the add_* flags, the roles llama.cpp finds by text, and the special-token list.
void Tokenizer::load_special_tokens(const gguf::File& f) {
  const std::string& path = f.path();
  const size_t n = pieces_.size();
  const bool spm = model_ == TokenizerModel::kSpm;
  // Special token ids: llama.cpp's defaults (BPE 11/11, SPM 1/2), replaced by the metadata when
  // in range.
  auto special_id = [&](std::string_view key, int32_t def) -> int32_t {
    if (def >= static_cast<int32_t>(n)) def = -1;
    const int64_t v = f.get_i64(key, -1);
    return (v >= 0 && v < static_cast<int64_t>(n)) ? static_cast<int32_t>(v) : def;
  };
  bos_ = special_id("tokenizer.ggml.bos_token_id", spm ? 1 : 11);
  eos_ = special_id("tokenizer.ggml.eos_token_id", spm ? 2 : 11);
  add_bos_ = f.get_bool("tokenizer.ggml.add_bos_token", spm ? true : pre_.add_bos_default);
  add_eos_ = f.get_bool("tokenizer.ggml.add_eos_token", false);
  if (!spm) add_space_prefix_ = f.get_bool("tokenizer.ggml.add_space_prefix", false);
  if (add_bos_ && bos_ < 0) fail(path, ": tokenizer.ggml.add_bos_token is set but there is no BOS token");
  if (add_eos_ && eos_ < 0) fail(path, ": tokenizer.ggml.add_eos_token is set but there is no EOS token");

  // Roles llama.cpp also finds by text (lowest id wins here; llama.cpp takes the first in hash
  // order, which only matters for a vocabulary with several candidates).
  auto role = [&](std::string_view key, std::string_view alt_key, const auto& texts) -> int32_t {
    int32_t id = special_id(key, -1);
    if (id < 0 && !alt_key.empty()) id = special_id(alt_key, -1);
    if (id >= 0) return id;
    for (size_t i = 0; i < n; ++i) {
      if (one_of(pieces_[i], texts)) {
        types_[i] = TokenType::kControl;
        return static_cast<int32_t>(i);
      }
    }
    return -1;
  };
  const int32_t eot = role("tokenizer.ggml.eot_token_id", "", kEotTexts);
  const int32_t eom = role("tokenizer.ggml.eom_token_id", "", kEomTexts);
  role("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id", kFimPreTexts);
  role("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id", kFimSufTexts);
  role("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id", kFimMidTexts);
  const int32_t fim_pad = role("tokenizer.ggml.fim_pad_token_id", "", kFimPadTexts);
  const int32_t fim_rep = role("tokenizer.ggml.fim_rep_token_id", "", kFimRepTexts);
  const int32_t fim_sep = role("tokenizer.ggml.fim_sep_token_id", "", kFimSepTexts);

  eog_flag_.assign(n, 0);
  for (int32_t id : {fim_pad, fim_rep, fim_sep, eos_, eot, eom})
    if (id >= 0) eog_flag_[id] = 1;
}

// End-of-generation tokens by text, with llama.cpp's exceptions.
void Tokenizer::find_end_of_generation() {
  const size_t n = pieces_.size();
  int32_t end_id = -1, s_id = -1;
  bool has_return = false, has_call = false, has_flush = false, has_tool_response = false;
  for (size_t i = 0; i < n; ++i) {
    const std::string& p = pieces_[i];
    if (one_of(p, kEogTexts)) {
      eog_flag_[i] = 1;
      types_[i] = TokenType::kControl;
    }
    if (!eog_flag_[i]) continue;
    if (p == "<|return|>") has_return = true;
    else if (p == "<|call|>" || p == "<|calls|>") has_call = true;
    else if (p == "<|flush|>") has_flush = true;
    else if (p == "<|tool_response>") has_tool_response = true;
    else if (p == "<|end|>") end_id = static_cast<int32_t>(i);
    else if (p == "</s>") s_id = static_cast<int32_t>(i);
  }
  // llama.cpp's exceptions: "<|end|>" is not an end of generation next to "<|return|>"/"<|call|>"
  // (gpt-oss) or "<|calls|>"/"<|flush|>"; "</s>" is not one next to "<|tool_response>".
  if (end_id >= 0 && has_call && (has_return || has_flush)) {
    eog_flag_[end_id] = 0;
    types_[end_id] = TokenType::kUserDefined;
  }
  if (s_id >= 0 && has_tool_response) {
    eog_flag_[s_id] = 0;
    types_[s_id] = TokenType::kNormal;
  }
  for (size_t i = 0; i < n; ++i)
    if (eog_flag_[i]) eog_.push_back(static_cast<int32_t>(i));
}

// The special-token list in matching order and the trie over their texts.
void Tokenizer::build_special_matcher() {
  const size_t n = pieces_.size();
  // Special tokens are matched longest first; std::sort with llama.cpp's comparator on the same
  // input order gives the same order for equal lengths too.
  for (size_t i = 0; i < n; ++i) {
    const TokenType ty = types_[i];
    if (ty == TokenType::kControl || ty == TokenType::kUserDefined || ty == TokenType::kUnknown)
      special_.push_back(static_cast<int32_t>(i));
  }
  std::sort(special_.begin(), special_.end(),
            [&](int32_t a, int32_t b) { return pieces_[a].size() > pieces_[b].size(); });
  special_rank_.assign(n, -1);
  trie_token_.assign(1, -1);
  for (size_t r = 0; r < special_.size(); ++r) {
    const int32_t id = special_[r];
    special_rank_[id] = static_cast<int32_t>(r);
    int32_t node = 0;
    trie_first_byte_[static_cast<unsigned char>(pieces_[id][0])] = true;
    for (unsigned char c : pieces_[id]) {
      const auto [it, added] = trie_edges_.try_emplace((uint64_t(uint32_t(node)) << 8) | c,
                                                        static_cast<int32_t>(trie_token_.size()));
      if (added) trie_token_.push_back(-1);
      node = it->second;
    }
    trie_token_[node] = id;
  }
}

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= n_vocab()) fail("token id ", id, " is out of range [0, ", n_vocab(), ")");
}

std::string_view Tokenizer::piece(int32_t id) const {
  check_id(id);
  return pieces_[id];
}

TokenType Tokenizer::token_type(int32_t id) const {
  check_id(id);
  return types_[id];
}

std::optional<int32_t> Tokenizer::find(std::string_view piece) const {
  const int32_t s = lookup(piece);
  if (s < 0 || s >= n_vocab()) return std::nullopt;
  return s;
}

bool Tokenizer::is_eog(int32_t id) const { return id >= 0 && id < n_vocab() && eog_flag_[id]; }

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_special && add_bos_) out.push_back(bos_);
  std::vector<Fragment> frags;
  split_special(text, parse_special, frags);
  Scratch sc;
  bool after_special = true;  // SPM: the start of the text counts as following a special token
  for (const Fragment& fr : frags) {
    if (fr.token >= 0) {
      out.push_back(fr.token);
      after_special = true;
      continue;
    }
    const std::string_view raw = text.substr(fr.off, fr.len);
    if (model_ == TokenizerModel::kBpe) encode_fragment(raw, sc, out);
    else spm_fragment(raw, add_space_prefix_ && after_special, sc, out);
    after_special = false;
  }
  if (add_special && add_eos_) out.push_back(eos_);
  return out;
}

// Cuts special tokens out of the raw bytes, one token at a time, longest first, every
// occurrence left to right within what is still raw text (llama.cpp's tokenizer_st_partition).
// Only tokens that occur somewhere in the text can cut it, so the trie finds those first and the
// thousands of others (Gemma has 6,000 "<unusedN>") cost nothing.
void Tokenizer::split_special(std::string_view text, bool parse_special, std::vector<Fragment>& frags) const {
  frags.clear();
  if (text.empty()) return;
  frags.push_back({-1, 0, text.size()});
  std::vector<uint8_t> occurs(special_.size(), 0);
  bool any = false;
  for (size_t i = 0; i < text.size(); ++i) {
    if (!trie_first_byte_[static_cast<unsigned char>(text[i])]) continue;
    int32_t node = 0;
    for (size_t j = i; j < text.size(); ++j) {
      const auto it = trie_edges_.find((uint64_t(uint32_t(node)) << 8) | static_cast<unsigned char>(text[j]));
      if (it == trie_edges_.end()) break;
      node = it->second;
      const int32_t id = trie_token_[node];
      if (id >= 0 && (parse_special || types_[id] == TokenType::kUserDefined)) {
        occurs[special_rank_[id]] = 1;
        any = true;
      }
    }
  }
  if (!any) return;

  std::vector<Fragment> next;
  for (size_t rank = 0; rank < special_.size(); ++rank) {
    if (!occurs[rank]) continue;
    const int32_t id = special_[rank];
    const std::string& st = pieces_[id];
    bool found = false;
    next.clear();
    for (const Fragment& fr : frags) {
      if (fr.token >= 0) {
        next.push_back(fr);
        continue;
      }
      size_t off = fr.off;
      const size_t end = fr.off + fr.len;
      for (;;) {
        const size_t m = text.substr(0, end).find(st, off);
        if (m == std::string_view::npos) break;
        found = true;
        if (m > off) next.push_back({-1, off, m - off});
        next.push_back({id, m, st.size()});
        off = m + st.size();
      }
      if (off < end) next.push_back({-1, off, end - off});
    }
    if (found) frags.swap(next);
  }
}

void Tokenizer::encode_fragment(std::string_view text, Scratch& sc, std::vector<int32_t>& out) const {
  std::vector<uint32_t>& cpts = sc.cpts;
  unicode::decode_utf8(text, cpts);
  pre_tokenize(pre_.kind, cpts, sc.words);
  std::string& bytes = sc.bytes;
  size_t pos = 0;
  for (uint32_t len : sc.words) {
    // Words are re-encoded from codepoints: an invalid byte has become U+FFFD's three bytes,
    // an overlong form its canonical encoding, as in llama.cpp.
    bytes.clear();
    for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(cpts[i], bytes);
    pos += len;
    bpe_word(bytes, sc, out);
  }
}

void Tokenizer::bpe_word(std::string_view bytes, Scratch& sc, std::vector<int32_t>& out) const {
  using Bigram = Scratch::Bigram;
  if (pre_.ignore_merges) {
    // A word that is a token as a whole is taken as is, whatever the merges would make of it.
    std::string& enc = sc.enc;
    enc.clear();
    for (unsigned char b : bytes) enc += byte_char_[b];
    const int32_t s = lookup(enc);
    if (s >= 0 && s < n_vocab()) {
      out.push_back(s);
      return;
    }
  }
  // Lowest rank first; among equal ranks the leftmost (llama.cpp's order).
  auto worse = [](const Bigram& a, const Bigram& b) { return a.rank > b.rank || (a.rank == b.rank && a.left > b.left); };

  const size_t n = bytes.size();
  auto& syms = sc.syms;
  syms.resize(n);
  for (size_t i = 0; i < n; ++i)
    syms[i] = {byte_symbol_[static_cast<unsigned char>(bytes[i])], static_cast<int32_t>(i) - 1,
               i + 1 < n ? static_cast<int32_t>(i + 1) : -1, static_cast<uint32_t>(i), 1};
  auto& heap = sc.heap;
  heap.clear();
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const int32_t ls = syms[l].sym, rs = syms[r].sym;
    if (ls < 0 || rs < 0) return;
    const auto it = merges_.find((uint64_t(uint32_t(ls)) << 32) | uint32_t(rs));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, l, r, ls, rs, it->second.result});
    std::push_heap(heap.begin(), heap.end(), worse);
  };
  for (size_t i = 1; i < n; ++i) try_add(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const Bigram bg = heap.back();
    heap.pop_back();
    Scratch::Sym& l = syms[bg.left];
    Scratch::Sym& r = syms[bg.right];
    // Stale entry: one side was merged away or has grown since it was queued.
    if (l.len == 0 || r.len == 0 || l.sym != bg.lsym || r.sym != bg.rsym) continue;
    l.sym = bg.result;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = bg.left;
    try_add(l.prev, bg.left);
    try_add(bg.left, l.next);
  }

  for (int32_t i = 0; i >= 0 && static_cast<size_t>(i) < n; i = syms[i].next) {
    const Scratch::Sym& s = syms[i];
    if (s.sym >= 0 && s.sym < n_vocab()) {
      out.push_back(s.sym);
      continue;
    }
    // Not a token: llama.cpp looks up each byte of the (GPT-2 alphabet) text on its own, which
    // finds only the ASCII ones; the others are dropped.
    for (uint32_t k = s.off; k < s.off + s.len; ++k)
      for (unsigned char x : byte_char_[static_cast<unsigned char>(bytes[k])])
        if (single_byte_token_[x] >= 0) out.push_back(single_byte_token_[x]);
  }
}

// SentencePiece on one raw fragment, as llama.cpp's SPM session: spaces become U+2581, the text
// is cut into UTF-8 characters (by lead byte only: invalid UTF-8 is no error), and the adjacent
// pair whose concatenation is the highest-scoring token is merged until no pair is a token (ties:
// the leftmost pair).
//
// llama.cpp runs one priority queue over the whole fragment (a whole document when it has no
// newlines). Merges are local, though: where no token contains the previous character followed
// by U+2581, no merge can ever join the two sides, and each side's merges happen in the same
// order on their own. So the fragment is cut there (before most spaces) into words, each merged
// alone, and a word seen before in this call reuses its tokens. Same result, far less work.
void Tokenizer::spm_fragment(std::string_view text, bool space_prefix, Scratch& sc, std::vector<int32_t>& out) const {
  std::string& s = sc.bytes;
  s.clear();
  if (space_prefix) s += kSpaceMark;
  for (char c : text) {
    if (c == ' ') s += kSpaceMark;
    else s.push_back(c);
  }
  if (s.size() >= UINT32_MAX) fail("text too long to tokenize (", text.size(), " bytes)");
  const std::string_view str = s;

  size_t word = 0;
  auto flush_word = [&](size_t end) {
    const std::string_view w = str.substr(word, end - word);
    const auto it = sc.spm_words.find(w);
    if (it != sc.spm_words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
    } else {
      const size_t first = out.size();
      spm_word(w, sc, out);
      sc.spm_words.emplace(std::string(w), std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(first), out.end()));
    }
    word = end;
  };
  // Characters as llama.cpp cuts them, so that a cut never falls inside one.
  for (size_t off = 0; off < s.size();) {
    const size_t len = std::min(unicode::utf8_len(static_cast<uint8_t>(s[off])), s.size() - off);
    if (off > word && str.substr(off, len) == kSpaceMark && !joins_space_after_[static_cast<uint8_t>(s[off - 1])])
      flush_word(off);
    off += len;
  }
  if (word < s.size()) flush_word(s.size());
}

// The merging of one word (see spm_fragment). A final symbol that is no token (an unmerged
// character missing from the vocabulary) becomes byte tokens. llama.cpp also keeps a table to
// re-split such a symbol into the pair that formed it, but merges only ever form tokens, so that
// table is never consulted.
void Tokenizer::spm_word(std::string_view str, Scratch& sc, std::vector<int32_t>& out) const {
  auto& syms = sc.syms;
  syms.clear();
  for (size_t off = 0; off < str.size();) {
    const size_t len = std::min(unicode::utf8_len(static_cast<uint8_t>(str[off])), str.size() - off);
    const auto idx = static_cast<int32_t>(syms.size());
    syms.push_back({-1, idx - 1, off + len < str.size() ? idx + 1 : -1, static_cast<uint32_t>(off),
                    static_cast<uint32_t>(len)});
    off += len;
  }

  using Bigram = Scratch::SpmBigram;
  // Highest score first; among equal scores the leftmost (llama.cpp's order).
  auto worse = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  auto& heap = sc.spm_heap;
  heap.clear();
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const uint32_t size = syms[l].len + syms[r].len;
    if (size > max_piece_len_) return;
    const int32_t tok = lookup(str.substr(syms[l].off, size));
    if (tok < 0) return;
    heap.push_back({scores_[tok], l, r, size});
    std::push_heap(heap.begin(), heap.end(), worse);
  };
  for (size_t i = 1; i < syms.size(); ++i) try_add(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const Bigram bg = heap.back();
    heap.pop_back();
    Scratch::Sym& l = syms[bg.left];
    Scratch::Sym& r = syms[bg.right];
    // Stale entry: one side was merged away, or the right side has grown since it was queued.
    if (l.len == 0 || r.len == 0 || l.len + r.len != bg.size) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = bg.left;
    try_add(l.prev, bg.left);
    try_add(bg.left, l.next);
  }

  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) {
    const std::string_view piece = str.substr(syms[i].off, syms[i].len);
    const int32_t tok = lookup(piece);
    if (tok >= 0) {
      out.push_back(tok);
      continue;
    }
    for (unsigned char b : piece) {
      if (byte_token_[b] < 0) fail("the vocabulary has no token for byte 0x", kHexDigits[b >> 4], kHexDigits[b & 15],
                                   " (no <0x", kHexDigits[b >> 4], kHexDigits[b & 15], "> byte-fallback token)");
      out.push_back(byte_token_[b]);
    }
  }
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  check_id(id);
  return bytes_[id];
}

std::string Tokenizer::bytes_of(int32_t id) const {
  return model_ == TokenizerModel::kSpm ? spm_bytes_of(id) : bpe_bytes_of(id);
}

// As llama.cpp's SPM token_to_piece: special texts as they are, U+2581 back to spaces, byte
// tokens as their byte (the hex digits read like strtol, so "<0xA>" is 0x0A), unused ones empty.
std::string Tokenizer::spm_bytes_of(int32_t id) const {
  const std::string& p = pieces_[id];
  switch (types_[id]) {
    case TokenType::kControl:
    case TokenType::kUserDefined:
    case TokenType::kUnknown:
      return p;
    case TokenType::kNormal: {
      std::string out;
      out.reserve(p.size());
      for (size_t i = 0; i < p.size(); ++i) {
        if (p.compare(i, 3, "\xe2\x96\x81") == 0) {
          out.push_back(' ');
          i += 2;
        } else {
          out.push_back(p[i]);
        }
      }
      return out;
    }
    case TokenType::kByte: {
      int value = 0;
      for (size_t i = 3; i < std::min<size_t>(p.size(), 5); ++i) {
        const char c = p[i];
        const int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
        if (d < 0) break;
        value = value * 16 + d;
      }
      return std::string(1, static_cast<char>(value));
    }
    case TokenType::kUnused:
    case TokenType::kUndefined:
      break;
  }
  return {};
}

std::string Tokenizer::bpe_bytes_of(int32_t id) const {
  const std::string& p = pieces_[id];
  switch (types_[id]) {
    case TokenType::kControl:
    case TokenType::kUserDefined:
    case TokenType::kUnknown:
      return p;
    case TokenType::kUnused:
    case TokenType::kUndefined:
      return {};
    case TokenType::kByte:
      if (p.size() == 6 && p.starts_with("<0x") && p.back() == '>') {
        const auto hex = [](char c) -> int {
          if (c >= '0' && c <= '9') return c - '0';
          if (c >= 'A' && c <= 'F') return c - 'A' + 10;
          if (c >= 'a' && c <= 'f') return c - 'a' + 10;
          return -1;
        };
        const int hi = hex(p[3]), lo = hex(p[4]);
        if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));
      }
      break;
    case TokenType::kNormal:
      break;
  }
  // GPT-2 alphabet -> bytes. A character outside the alphabet (not produced by a byte-level
  // converter) is kept as its UTF-8; llama.cpp would print an [UNK_BYTE_...] marker instead.
  static const std::array<int16_t, 0x144> kCharToByte = [] {
    std::array<int16_t, 0x144> m{};
    m.fill(-1);
    const auto cp = byte_to_codepoint();
    for (int b = 0; b < 256; ++b) m[cp[b]] = static_cast<int16_t>(b);
    return m;
  }();
  std::vector<uint32_t> cpts;
  unicode::decode_utf8(p, cpts);
  std::string out;
  out.reserve(cpts.size());
  for (uint32_t c : cpts) {
    if (c < kCharToByte.size() && kCharToByte[c] >= 0) out.push_back(static_cast<char>(kCharToByte[c]));
    else unicode::append_utf8(c, out);
  }
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> tokens, bool render_special) const {
  std::string out;
  // The first token only (rendered or not), as llama_detokenize.
  bool strip_space = add_space_prefix_;
  for (int32_t id : tokens) {
    check_id(id);
    const TokenType ty = types_[id];
    const bool strip = strip_space;
    strip_space = false;
    if (!render_special && (ty == TokenType::kControl || ty == TokenType::kUnknown)) continue;
    const std::string& b = bytes_[id];
    out.append(b, strip && !b.empty() && b[0] == ' ' ? 1 : 0);
  }
  return out;
}

std::string StreamDecoder::push(int32_t token) {
  const TokenType ty = tok_->token_type(token);
  if (!render_special_ && (ty == TokenType::kControl || ty == TokenType::kUnknown)) return {};
  pending_ += tok_->token_bytes(token);
  // Hold back a trailing lead byte (C2..F4) followed by fewer continuation bytes than it needs.
  size_t keep = 0;
  const size_t n = pending_.size();
  for (size_t k = 1; k <= 3 && k <= n; ++k) {
    const auto b = static_cast<unsigned char>(pending_[n - k]);
    if ((b & 0xC0) == 0x80) continue;
    if (b >= 0xC2 && b <= 0xF4 && unicode::utf8_len(b) > k) keep = k;
    break;
  }
  std::string ready = pending_.substr(0, n - keep);
  pending_.erase(0, n - keep);
  return ready;
}

std::string StreamDecoder::flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace qf
