// libFuzzer harness: chat templates. The input is a template source (Jinja text or a format
// name) and a conversation, separated by NUL bytes: source \0 role \0 content \0 role ...
// Recognising a template either succeeds or throws qf::Error; rendering never fails and keeps
// every message's content verbatim.
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
    const std::string prompt = tmpl.apply(messages, generation_prompt);
    for (const qf::ChatMessage& m : messages)
      if (prompt.find(m.content) == std::string::npos) std::abort();
  }
  return 0;
}
