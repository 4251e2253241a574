#include "tokenizer/pretokenizer.h"

#include <array>

#include "tokenizer/unicode.h"

namespace qf {

namespace {

struct NameEntry {
  std::string_view name;
  PreTokenizerInfo info;
};

// The names llama.cpp (src/llama-vocab.cpp) maps onto these five split rules, with the two flags
// it sets alongside that change tokenization. Names it maps to other rules are not accepted.
constexpr std::array kNames = {
    NameEntry{"smollm", {PreTokenizer::kDigitsGpt2, false, false}},
    NameEntry{"starcoder", {PreTokenizer::kDigitsGpt2, false, false}},
    NameEntry{"refact", {PreTokenizer::kDigitsGpt2, false, false}},
    NameEntry{"codeshell", {PreTokenizer::kDigitsGpt2, false, false}},
    NameEntry{"command-r", {PreTokenizer::kDigitsGpt2, false, false}},
    NameEntry{"llama3", {PreTokenizer::kLlama3, true, true}},
    NameEntry{"llama-v3", {PreTokenizer::kLlama3, true, true}},
    NameEntry{"llama-bpe", {PreTokenizer::kLlama3, true, true}},
    NameEntry{"falcon3", {PreTokenizer::kLlama3, true, true}},
    NameEntry{"dbrx", {PreTokenizer::kLlama3, false, false}},
    NameEntry{"smaug-bpe", {PreTokenizer::kLlama3, false, false}},
    NameEntry{"qwen2", {PreTokenizer::kQwen2, false, false}},
    NameEntry{"deepseek-r1-qwen", {PreTokenizer::kQwen2, false, false}},
    NameEntry{"stablelm2", {PreTokenizer::kQwen2, false, false}},
    NameEntry{"gpt-2", {PreTokenizer::kGpt2, false, false}},
    NameEntry{"phi-2", {PreTokenizer::kGpt2, false, false}},
    NameEntry{"mpt", {PreTokenizer::kGpt2, false, false}},
    NameEntry{"olmo", {PreTokenizer::kGpt2, false, false}},
    NameEntry{"default", {PreTokenizer::kDefault, false, false}},
};

constexpr uint32_t kOut = 0xFFFFFFFF;  // "no codepoint": past the end of the segment

// One segment [b, e) of the codepoints and the word boundaries found in it. The accessors
// answer "no" past the end, as llama.cpp's _get_cpt/_get_flags do.
class Segment {
 public:
  Segment(const uint32_t* c, size_t b, size_t e, std::vector<uint32_t>& out) : c_(c), end_(e), prev_(b), out_(out) {}

  bool in(size_t i) const { return i < end_; }
  uint32_t cpt(size_t i) const { return i < end_ ? c_[i] : kOut; }
  uint8_t flags(size_t i) const { return unicode::flags(c_[i]); }
  bool letter(size_t i) const { return in(i) && unicode::is_letter(c_[i]); }
  bool number(size_t i) const { return in(i) && unicode::is_number(c_[i]); }
  bool space(size_t i) const { return in(i) && unicode::is_whitespace(c_[i]); }
  // [^\s\p{L}\p{N}] at i (false past the end)
  bool other(size_t i) const {
    if (!in(i)) return false;
    const uint8_t f = flags(i);
    const uint8_t cat = f & unicode::kCategoryMask;
    return !(f & unicode::kWhitespace) && cat != unicode::kLetter && cat != unicode::kNumber;
  }
  // Ends the current word at `end`; returns its length.
  size_t emit(size_t end) {
    const size_t len = end - prev_;
    if (len > 0) out_.push_back(static_cast<uint32_t>(len));
    prev_ = end;
    return len;
  }
  size_t end() const { return end_; }

 private:
  const uint32_t* c_;
  size_t end_;
  size_t prev_;
  std::vector<uint32_t>& out_;
};

uint32_t ascii_lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// 's|'t|'re|'ve|'m|'ll|'d at pos; returns its length or 0. The llama3/qwen2 rule is case
// insensitive. (No non-ASCII codepoint lower-cases to one of these letters; the table
// generator checks that.)
size_t contraction(const Segment& s, size_t pos, bool any_case) {
  if (s.cpt(pos) != '\'' || !s.in(pos + 1)) return 0;
  auto low = [&](size_t i) { return any_case ? ascii_lower(s.cpt(i)) : s.cpt(i); };
  const uint32_t n1 = low(pos + 1);
  if (n1 == 's' || n1 == 't' || n1 == 'm' || n1 == 'd') return 2;
  if (!s.in(pos + 2)) return 0;
  const uint32_t n2 = low(pos + 2);
  if ((n1 == 'r' && n2 == 'e') || (n1 == 'v' && n2 == 'e') || (n1 == 'l' && n2 == 'l')) return 3;
  return 0;
}

void split_gpt2(const uint32_t* c, size_t b, size_t e, std::vector<uint32_t>& out) {
  Segment s(c, b, e, out);
  size_t pos = b;
  while (pos < e) {
    if (const size_t n = contraction(s, pos, false)) {
      pos += s.emit(pos + n);
      continue;
    }
    const bool sp = s.cpt(pos) == ' ';
    const size_t at = sp ? pos + 1 : pos;  // " ?X": the class is tested after an optional space
    if (s.letter(at)) {
      pos = at;
      while (s.letter(pos)) ++pos;
      s.emit(pos);
      continue;
    }
    if (s.number(at)) {
      pos = at;
      while (s.number(pos)) ++pos;
      s.emit(pos);
      continue;
    }
    if (s.other(at)) {
      pos = at;
      while (s.other(pos)) ++pos;
      s.emit(pos);
      continue;
    }
    size_t n_ws = 0;
    while (s.space(pos + n_ws)) ++n_ws;
    if (n_ws > 1 && s.in(pos + n_ws)) {  // \s+(?!\S): leave the last space to the next word
      pos += n_ws - 1;
      s.emit(pos);
      continue;
    }
    if (n_ws > 0) {
      pos += n_ws;
      s.emit(pos);
      continue;
    }
    s.emit(++pos);
  }
}

// Llama 3 (max_digits 3) and Qwen 2 (max_digits 1).
void split_llama3(const uint32_t* c, size_t b, size_t e, size_t max_digits, std::vector<uint32_t>& out) {
  Segment s(c, b, e, out);
  size_t pos = b;
  while (pos < e) {
    if (const size_t n = contraction(s, pos, true)) {
      pos += s.emit(pos + n);
      continue;
    }
    const uint32_t cp = s.cpt(pos);
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (!(cp == '\r' || cp == '\n' || s.number(pos)) && (s.letter(pos) || s.letter(pos + 1))) {
      ++pos;
      while (s.letter(pos)) ++pos;
      s.emit(pos);
      continue;
    }
    // \p{N}{1,max_digits}
    if (s.number(pos)) {
      size_t ini = pos;
      while (s.number(pos)) {
        if (++pos - ini >= max_digits) {
          s.emit(pos);
          ini = pos;
        }
      }
      s.emit(pos);
      continue;
    }
    // " ?[^\s\p{L}\p{N}]+[\r\n]*". As in llama.cpp, a space at the very end of the segment
    // takes this branch too (a lone " " either way).
    const bool sp = cp == ' ';
    const size_t at = sp ? pos + 1 : pos;
    if (s.other(at) || !s.in(at)) {
      pos = at;
      while (s.other(pos)) ++pos;
      while (s.cpt(pos) == '\r' || s.cpt(pos) == '\n') ++pos;
      s.emit(pos);
      continue;
    }
    size_t n_ws = 0;
    size_t last_rn = 0;  // one past the last \r or \n of the whitespace run
    while (s.space(pos + n_ws)) {
      const uint32_t w = s.cpt(pos + n_ws);
      if (w == '\r' || w == '\n') last_rn = pos + n_ws + 1;
      ++n_ws;
    }
    if (last_rn > 0) {  // \s*[\r\n]+
      pos = last_rn;
      s.emit(pos);
      continue;
    }
    if (n_ws > 1 && s.in(pos + n_ws)) {  // \s+(?!\S)
      pos += n_ws - 1;
      s.emit(pos);
      continue;
    }
    if (n_ws > 0) {  // \s+
      pos += n_ws;
      s.emit(pos);
      continue;
    }
    s.emit(++pos);
  }
}

// A std::regex split stage with a one-codepoint class: matches (runs of the class, or single
// codepoints when !runs) and the text between them become separate words.
template <typename Pred>
void split_class(const uint32_t* c, size_t b, size_t e, bool runs, Pred in_class, std::vector<uint32_t>& out) {
  size_t pos = b;
  while (pos < e) {
    const size_t start = pos;
    if (in_class(c[pos])) {
      ++pos;
      if (runs)
        while (pos < e && in_class(c[pos])) ++pos;
    } else {
      while (pos < e && !in_class(c[pos])) ++pos;
    }
    out.push_back(static_cast<uint32_t>(pos - start));
  }
}

bool is_ascii_digit(uint32_t c) { return c >= '0' && c <= '9'; }

// "[0-9][0-9][0-9]": leftmost non-overlapping triples of ASCII digits become words.
void split_digit_triples(const uint32_t* c, size_t b, size_t e, std::vector<uint32_t>& out) {
  size_t prev = b;
  size_t pos = b;
  while (pos + 3 <= e) {
    if (is_ascii_digit(c[pos]) && is_ascii_digit(c[pos + 1]) && is_ascii_digit(c[pos + 2])) {
      if (pos > prev) out.push_back(static_cast<uint32_t>(pos - prev));
      out.push_back(3);
      pos += 3;
      prev = pos;
    } else {
      ++pos;
    }
  }
  if (e > prev) out.push_back(static_cast<uint32_t>(e - prev));
}

// \p{P} as llama.cpp's std::regex fallback sees it (ASCII: Unicode's P plus the symbols the
// default regex lists explicitly, $+<=>^~|; others: category P and not whitespace).
bool default_punct(uint32_t c) {
  if (c < 0x80) return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x5F) ||
                       (c >= 0x7B && c <= 0x7E);
  return !unicode::is_whitespace(c) && unicode::is_punct(c);
}

bool number_cpt(uint32_t c) { return unicode::is_number(c); }

// Applies one stage to every segment of `in`, writing the refined segmentation to `out`.
template <typename Stage>
void refine(const uint32_t* c, const std::vector<uint32_t>& in, std::vector<uint32_t>& out, Stage stage) {
  out.clear();
  size_t b = 0;
  for (uint32_t len : in) {
    stage(c, b, b + len, out);
    b += len;
  }
}

}  // namespace

bool pre_tokenizer_from_name(std::string_view name, PreTokenizerInfo& info) {
  if (name.empty()) name = "default";  // llama.cpp: missing pre-tokenizer -> default (with a warning)
  for (const auto& e : kNames) {
    if (e.name == name) {
      info = e.info;
      return true;
    }
  }
  return false;
}

std::string_view supported_pre_tokenizers() {
  return "smollm, starcoder, refact, codeshell, command-r, llama3, llama-v3, llama-bpe, falcon3, dbrx, "
         "smaug-bpe, qwen2, deepseek-r1-qwen, stablelm2, gpt-2, phi-2, mpt, olmo, default";
}

void pre_tokenize(PreTokenizer kind, std::span<const uint32_t> cpts, std::vector<uint32_t>& words) {
  words.clear();
  if (cpts.empty()) return;
  const uint32_t* c = cpts.data();
  const size_t n = cpts.size();
  std::vector<uint32_t> tmp;
  switch (kind) {
    case PreTokenizer::kGpt2:
      split_gpt2(c, 0, n, words);
      break;
    case PreTokenizer::kDigitsGpt2:
      split_class(c, 0, n, /*runs=*/false, number_cpt, tmp);
      refine(c, tmp, words, split_gpt2);
      break;
    case PreTokenizer::kLlama3:
      split_llama3(c, 0, n, 3, words);
      break;
    case PreTokenizer::kQwen2:
      split_llama3(c, 0, n, 1, words);
      break;
    case PreTokenizer::kDefault:
      split_class(c, 0, n, /*runs=*/true, default_punct, words);
      refine(c, words, tmp, split_gpt2);
      refine(c, tmp, words, [](const uint32_t* c2, size_t b, size_t e, std::vector<uint32_t>& o) {
        split_class(c2, b, e, /*runs=*/true, number_cpt, o);
      });
      refine(c, words, tmp, split_digit_triples);
      words.swap(tmp);
      break;
  }
}

}  // namespace qf
