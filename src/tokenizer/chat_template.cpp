#include "tokenizer/chat_template.h"

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf {

namespace {

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";

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
  // Detection by content, as llama.cpp does: ChatML uses <|im_start|>; Phi-4 (<|im_sep|>) and
  // SmolVLM (<end_of_utterance>) use it too but are other formats.
  if (src.find(kImStart) != std::string_view::npos && src.find("<|im_sep|>") == std::string_view::npos &&
      src.find("<end_of_utterance>") == std::string_view::npos) {
    t.format_ = Format::kChatML;
    t.default_system_ = find_default_system(src);
    return t;
  }
  std::string head(src.substr(0, 80));
  for (char& c : head)
    if (c == '\n' || c == '\r') c = ' ';
  fail("unsupported chat template (only ChatML is supported): \"", head, src.size() > 80 ? "...\"" : "\"");
}

ChatTemplate ChatTemplate::from_gguf(const gguf::File& file) {
  return from_source(file.get_str("tokenizer.chat_template", ""));
}

ChatTemplate ChatTemplate::from_tokenizer(const Tokenizer& tok) { return from_source(tok.chat_template()); }

std::string ChatTemplate::apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
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
