// The server's wire format: OpenAI's (and llama.cpp's) request fields parsed and checked into
// plain structs, and the JSON bodies of responses, stream chunks and errors. No I/O here, so
// every rule is unit-testable (and fuzzable).
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine.h"
#include "sample/sampler.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace qf::server {

using json = nlohmann::json;

// A request the server refuses: HTTP status, OpenAI error type, and the offending field.
struct HttpError : std::runtime_error {
  HttpError(int status, std::string message, std::string type = "invalid_request_error", std::string param = "")
      : std::runtime_error(std::move(message)), status(status), type(std::move(type)), param(std::move(param)) {}
  int status;
  std::string type;
  std::string param;
};

// {"error": {"message", "type", "param", "code"}} as OpenAI sends it.
json error_body(const HttpError& e);

struct CompletionRequest {
  bool chat = false;
  std::vector<ChatMessage> messages;   // chat
  std::string prompt;                  // completion (text)
  std::vector<int32_t> prompt_tokens;  // completion given as token ids (llama.cpp allows it)
  std::string model;
  int max_tokens = -1;                 // -1: until end of text or the context
  SamplerOptions sampling;
  bool seed_given = false;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;          // stream_options.include_usage: a last chunk with usage
  bool cache_prompt = true;            // reuse a slot's cache for a common prefix (llama.cpp)
  int id_slot = -1;                    // ask for a slot (llama.cpp); -1 = any
  bool ignore_eos = false;             // never sample end-of-generation tokens (llama.cpp)
  std::optional<runtime::KvOptions> kv;  // per-request KV settings (extension fields kv_*)
};

// The JSON of a request body. Anything that is not JSON (invalid UTF-8, numbers beyond double,
// truncated text) is a 400.
json parse_json_body(std::string_view body);

// Parses a /v1/chat/completions (chat = true) or /v1/completions body. Fields the server does
// not implement but clients commonly send (n = 1, logprobs = false, user, ...) are accepted when
// they ask for the default; anything else is a 400 naming the field.
CompletionRequest parse_completion(const json& body, bool chat, const SamplerOptions& defaults,
                                   const runtime::KvOptions& server_kv);

// The prompt of a request as token ids: the chat template (null: the model has none the server
// knows, a 400 for chat requests) and the tokenizer applied, or the ids given, each checked
// against the vocabulary. A 400 when it is empty or does not leave room for one token in n_ctx.
std::vector<int32_t> prompt_tokens(const CompletionRequest& r, const Tokenizer& tok, const ChatTemplate* tmpl, int n_ctx);

// llama.cpp's /tokenize body: {"content": "...", "add_special", "parse_special", "with_pieces"}.
struct TokenizeRequest {
  std::string content;
  bool add_special = false;
  bool parse_special = true;
  bool with_pieces = false;
};
TokenizeRequest parse_tokenize(const json& body);

// llama.cpp's /detokenize body: {"tokens": [ids]}, each id inside [0, n_vocab).
std::vector<int32_t> parse_detokenize(const json& body, int32_t n_vocab);

// Why a generation ended, as OpenAI names it.
enum class FinishReason { kStop, kLength };
const char* finish_reason_name(FinishReason r);

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int cached_tokens = 0;  // prompt tokens reused from the slot's cache (prompt_tokens_details)
};

json usage_json(const Usage& u);

// Response bodies. `id` is e.g. "chatcmpl-42"; `created` is Unix seconds.
json completion_response(const CompletionRequest& r, const std::string& id, int64_t created, const std::string& text,
                         FinishReason finish, const Usage& usage, const json& extra);
// One server-sent-events chunk: a text delta, or the final chunk (finish set).
json completion_chunk(const CompletionRequest& r, const std::string& id, int64_t created, const std::string& delta,
                      std::optional<FinishReason> finish, bool first);

// Incremental stop-string matching over streamed text: push() returns what can be sent now
// (holding back a tail that may still become a stop string); stopped() once one matched, after
// which the text up to (not including) it has been returned.
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  std::string push(const std::string& text);
  std::string flush();  // the held-back tail at the end of generation (no stop matched)
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace qf::server
