#include "tokenizer/chat_template.h"

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "util/error.h"

namespace qf {

namespace {

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";
constexpr std::string_view kStartOfTurn = "<start_of_turn>";
constexpr std::string_view kEndOfTurn = "<end_of_turn>";

// Python's str.isspace(), which Jinja's trim filter strips.
bool is_python_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The codepoint of the well-formed UTF-8 sequence s[i, i + len), or -1.
int64_t codepoint_at(std::string_view s, size_t i, size_t len) {
  if (len == 0 || i + len > s.size()) return -1;
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (len == 1) return b0 < 0x80 ? b0 : -1;
  static constexpr unsigned char kLeadMask[] = {0, 0, 0x1F, 0x0F, 0x07};
  if (unicode::utf8_len(b0) != len) return -1;
  uint32_t c = b0 & kLeadMask[len];
  for (size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) return -1;
    c = (c << 6) | (b & 0x3F);
  }
  return c;
}

// Jinja's trim: strips leading and trailing whitespace characters as Python sees them.
std::string_view trim(std::string_view s) {
  size_t begin = 0, end = s.size();
  while (begin < end) {
    const size_t len = unicode::utf8_len(static_cast<unsigned char>(s[begin]));
    const int64_t c = codepoint_at(s.substr(0, end), begin, len);
    if (c < 0 || !is_python_space(static_cast<uint32_t>(c))) break;
    begin += len;
  }
  while (end > begin) {
    size_t start = end - 1;
    while (start > begin && end - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    const int64_t c = codepoint_at(s.substr(0, end), start, end - start);
    if (c < 0 || !is_python_space(static_cast<uint32_t>(c))) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

// Gemma 3's template: a leading system message becomes a prefix of the first user turn, the
// others must alternate user, assistant, user, ..., and "assistant" is called "model".
std::string apply_gemma(std::span<const ChatMessage> messages, bool add_generation_prompt) {
  std::string out;
  std::string first_prefix;
  size_t first = 0;
  if (!messages.empty() && messages[0].role == "system") {
    first_prefix = messages[0].content + "\n\n";  // not trimmed, as in the template
    first = 1;
  }
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool user_turn = (i - first) % 2 == 0;
    if ((m.role == "user") != user_turn)
      fail("Gemma chat template: conversation roles must alternate user/assistant/user/assistant/... (message ", i,
           " is '", m.role, "')");
    out += kStartOfTurn;
    out += m.role == "assistant" ? std::string_view("model") : std::string_view(m.role);
    out += '\n';
    if (i == first) out += first_prefix;
    out += trim(m.content);
    out += kEndOfTurn;
    out += '\n';
  }
  if (add_generation_prompt) {
    out += kStartOfTurn;
    out += "model\n";
  }
  return out;
}

bool contains(std::string_view s, std::string_view what) { return s.find(what) != std::string_view::npos; }

// Markers of the formats llama.cpp's llm_chat_detect_template tries before Gemma's: a template
// with one of them is not Gemma's even if it mentions <start_of_turn>.
bool earlier_format(std::string_view src) {
  return src.starts_with("mistral") || contains(src, "[INST]") ||
         (contains(src, "<|assistant|>") && (contains(src, "<|end|>") || contains(src, "<|user|>"))) ||
         contains(src, "[gMASK]<sop>") ||
         (contains(src, "<|{{ item['role'] }}|>") && contains(src, "<|begin_of_image|>")) ||
         (contains(src, "<|user|>") && contains(src, "<|endoftext|>")) || contains(src, "bos_token + message['role']");
}

bool has_gemma_turn_tokens(const std::vector<std::string>& tokens) {
  bool start = false, end = false;
  for (const std::string& t : tokens) {
    start = start || t == kStartOfTurn;
    end = end || t == kEndOfTurn;
  }
  return start && end;
}

// Reads the Jinja string literal whose opening quote is at q, unescaped, into out; false when
// it does not close.
bool read_literal(std::string_view src, size_t q, std::string& out) {
  const char quote = src[q];
  out.clear();
  for (size_t i = q + 1; i < src.size(); ++i) {
    const char c = src[i];
    if (c == quote) return true;
    if (c == '\\' && i + 1 < src.size()) {
      const char e = src[++i];
      switch (e) {
        case 'n': out.push_back('\n'); break;
        case 't': out.push_back('\t'); break;
        case 'r': out.push_back('\r'); break;
        default: out.push_back(e); break;  // \\ \' \"
      }
      continue;
    }
    out.push_back(c);
  }
  return false;
}

// A default system message is a string literal "<|im_start|>system\n...<|im_end|>" in a
// template that looks at the first message's role (to add it only when that is not "system").
std::string find_default_system(std::string_view src) {
  const bool checks_first_role = src.find("messages[0]['role']") != std::string_view::npos ||
                                 src.find("messages[0][\"role\"]") != std::string_view::npos ||
                                 src.find("messages[0].role") != std::string_view::npos;
  if (!checks_first_role) return {};
  const std::string head = std::string(kImStart) + "system\n";
  std::string lit;
  for (size_t p = src.find(kImStart); p != std::string_view::npos; p = src.find(kImStart, p + 1)) {
    if (p == 0 || (src[p - 1] != '\'' && src[p - 1] != '"')) continue;
    if (!read_literal(src, p - 1, lit) || !lit.starts_with(head)) continue;
    const size_t end = lit.find(kImEnd, head.size());
    if (end == std::string::npos || end == head.size()) continue;
    return lit.substr(head.size(), end - head.size());
  }
  return {};
}

}  // namespace

ChatTemplate ChatTemplate::from_source(std::string_view src) {
  if (src.empty()) fail("the model has no chat template (tokenizer.chat_template)");
  ChatTemplate t;
  if (src == "chatml") return t;
  if (src == "gemma") {
    t.format_ = Format::kGemma;
    return t;
  }
  // Detection by content, in llama.cpp's order: ChatML uses <|im_start|>; Phi-4 (<|im_sep|>) and
  // SmolVLM (<end_of_utterance>) use it too but are other formats.
  const bool im_start = contains(src, kImStart);
  if (im_start && !contains(src, "<|im_sep|>") && !contains(src, "<end_of_utterance>")) {
    t.format_ = Format::kChatML;
    t.default_system_ = find_default_system(src);
    return t;
  }
  if (!im_start && !earlier_format(src) && contains(src, kStartOfTurn)) {
    t.format_ = Format::kGemma;
    return t;
  }
  std::string head(src.substr(0, 80));
  for (char& c : head)
    if (c == '\n' || c == '\r') c = ' ';
  fail("unsupported chat template (supported: ChatML, Gemma): \"", head, src.size() > 80 ? "...\"" : "\"");
}

ChatTemplate ChatTemplate::from_gguf(const gguf::File& file) {
  const std::string src = file.get_str("tokenizer.chat_template", "");
  if (src.empty() && file.has("tokenizer.ggml.tokens") &&
      has_gemma_turn_tokens(file.get_str_array("tokenizer.ggml.tokens")))
    return from_source("gemma");
  return from_source(src);
}

ChatTemplate ChatTemplate::from_tokenizer(const Tokenizer& tok) {
  if (tok.chat_template().empty() && tok.find(kStartOfTurn) && tok.find(kEndOfTurn)) return from_source("gemma");
  return from_source(tok.chat_template());
}

std::string ChatTemplate::apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  if (format_ == Format::kGemma) return apply_gemma(messages, add_generation_prompt);
  std::string out;
  auto turn = [&](std::string_view role, std::string_view content) {
    out += kImStart;
    out += role;
    out += '\n';
    out += content;
    out += kImEnd;
    out += '\n';
  };
  // SmolLM2's template adds it inside its message loop: an empty conversation gets none.
  if (!default_system_.empty() && !messages.empty() && messages[0].role != "system") turn("system", default_system_);
  for (const ChatMessage& m : messages) turn(m.role, m.content);
  if (add_generation_prompt) out += std::string(kImStart) + "assistant\n";
  return out;
}

std::string apply_chat_template(const gguf::File& file, std::span<const ChatMessage> messages,
                                bool add_generation_prompt) {
  return ChatTemplate::from_gguf(file).apply(messages, add_generation_prompt);
}

std::string apply_chat_template(const Tokenizer& tok, std::span<const ChatMessage> messages,
                                bool add_generation_prompt) {
  return ChatTemplate::from_tokenizer(tok).apply(messages, add_generation_prompt);
}

}  // namespace qf
