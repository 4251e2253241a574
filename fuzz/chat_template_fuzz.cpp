// libFuzzer harness: chat templates. The input is a template source (Jinja text or a format
// name) and a conversation, separated by NUL bytes: source \0 role \0 content \0 role ...
// Recognising a template either succeeds or throws qf::Error; rendering either throws qf::Error
// (Gemma's template raises on roles that do not alternate) or keeps every message's content
// (verbatim in ChatML, trimmed of surrounding whitespace in Gemma, as its Jinja template does).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/chat_template.h"
#include "util/error.h"

namespace {

std::vector<std::string_view> split_on_nul(std::string_view s) {
  std::vector<std::string_view> parts;
  for (size_t start = 0;;) {
    const size_t end = s.find('\0', start);
    parts.push_back(s.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
    if (end == std::string_view::npos) return parts;
    start = end + 1;
  }
}

// What the rendered prompt must contain of a message. Gemma's template trims the content of
// what Python's str.isspace() calls whitespace; the check strips a superset (ASCII whitespace,
// the separators 0x1c-0x1f and any non-ASCII byte at either end), so it stays a true lower bound.
std::string expected_content(const qf::ChatTemplate& tmpl, const std::string& content) {
  if (tmpl.format() != qf::ChatTemplate::Format::kGemma) return content;
  auto strippable = [](unsigned char c) { return c <= 0x20 || c >= 0x80; };
  size_t first = 0, last = content.size();
  while (first < last && strippable(static_cast<unsigned char>(content[first]))) ++first;
  while (last > first && strippable(static_cast<unsigned char>(content[last - 1]))) --last;
  return content.substr(first, last - first);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string_view> parts = split_on_nul({reinterpret_cast<const char*>(data), size});
  qf::ChatTemplate tmpl;
  try {
    tmpl = qf::ChatTemplate::from_source(parts[0]);
  } catch (const qf::Error&) {
    return 0;
  }
  std::vector<qf::ChatMessage> messages;
  for (size_t i = 1; i + 1 < parts.size(); i += 2) messages.push_back({std::string(parts[i]), std::string(parts[i + 1])});
  for (bool generation_prompt : {false, true}) {
    std::string prompt;
    try {
      prompt = tmpl.apply(messages, generation_prompt);
    } catch (const qf::Error&) {
      return 0;
    }
    for (size_t i = 0; i < messages.size(); ++i) {
      // Gemma folds a leading system message into the first user turn: alone, it renders nothing
      // (as Gemma 3's Jinja template does).
      const bool gemma_lone_system = tmpl.format() == qf::ChatTemplate::Format::kGemma && i == 0 &&
                                     messages.size() == 1 && messages[0].role == "system";
      if (!gemma_lone_system && prompt.find(expected_content(tmpl, messages[i].content)) == std::string::npos)
        std::abort();
    }
  }
  return 0;
}
