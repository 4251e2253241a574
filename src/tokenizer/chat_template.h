// Chat prompts. GGUF files carry their chat template as Jinja source (tokenizer.chat_template);
// like llama.cpp we do not run Jinja but recognise the format from the source and render it
// natively. Supported:
//  - ChatML (<|im_start|>role\ncontent<|im_end|>\n), including a default system message the
//    template inserts when the conversation does not start with one (SmolLM2: "You are a
//    helpful AI assistant named SmolLM, trained by Hugging Face");
//  - Gemma (<start_of_turn>user\ncontent<end_of_turn>\n, "assistant" becomes "model"), rendered
//    as Gemma 3's Jinja template does: contents trimmed, a leading system message folded into
//    the first user turn as "system\n\n", roles must alternate. A file without a template whose
//    vocabulary has <start_of_turn> and <end_of_turn> (the Gemma 3 270M GGUF) gets this format.
#pragma once
#include <span>
#include <string>
#include <string_view>

namespace qf {

namespace gguf {
class File;
}
class Tokenizer;

struct ChatMessage {
  std::string role;  // "system", "user", "assistant", ...
  std::string content;
};

class ChatTemplate {
 public:
  enum class Format { kChatML, kGemma };

  // From Jinja source, or a format name ("chatml", "gemma"). Throws qf::Error for an empty or
  // unrecognised template.
  static ChatTemplate from_source(std::string_view source);
  // tokenizer.chat_template of the file, else the vocabulary's turn tokens (see above); throws
  // qf::Error when neither says.
  static ChatTemplate from_gguf(const gguf::File& file);
  static ChatTemplate from_tokenizer(const Tokenizer& tok);

  // The prompt text, to be encoded with add_special = true (the tokenizer adds BOS where the
  // model wants it; Jinja templates that print bos_token themselves differ by just that) and
  // parse_special = true. add_generation_prompt appends the assistant header so that the model
  // writes the next turn. Throws qf::Error where the Jinja template raises (Gemma: roles that do
  // not alternate).
  std::string apply(std::span<const ChatMessage> messages, bool add_generation_prompt) const;

  Format format() const { return format_; }
  // Inserted as a first system message when the conversation has none; empty if the template
  // has no default.
  const std::string& default_system() const { return default_system_; }

 private:
  Format format_ = Format::kChatML;
  std::string default_system_;
};

// Shorthands for ChatTemplate::from_gguf(file).apply(...) and from_tokenizer(tok).apply(...).
std::string apply_chat_template(const gguf::File& file, std::span<const ChatMessage> messages,
                                bool add_generation_prompt);
std::string apply_chat_template(const Tokenizer& tok, std::span<const ChatMessage> messages,
                                bool add_generation_prompt);

}  // namespace qf
