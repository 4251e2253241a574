// libFuzzer harness: the server's request bodies. The input is the body of an HTTP request; it
// goes through the code the server runs on it (src/server/protocol.h), as /v1/chat/completions,
// /v1/completions, /tokenize and /detokenize, with SmolLM2's tokenizer and chat template. Each
// endpoint either accepts it or throws HttpError with status 400 and a JSON error body; any other
// exception escapes (a finding), as does a broken property of an accepted request:
//   - every field lies inside the bounds the parser states, and the sampler that admission builds
//     from the request accepts it (a request that passes parsing never fails later on its values);
//   - the request serialised back to JSON (strictly: every string must be valid UTF-8) parses to
//     the same request;
//   - its stop strings are exactly the non-empty strings of "stop", in order, and a StopMatcher
//     fed the prompt token by token returns the text up to the first of them;
//   - the prompt tokens are in the vocabulary, not empty and shorter than the context (else 400);
//   - response bodies and stream chunks serialise (as the server does) into JSON that parses.
// The model comes from $QF_FUZZ_MODEL, or models/SmolLM2-135M-Instruct.Q4_1.gguf.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_tokenizer.h"
#include "gguf/gguf.h"
#include "sample/sampler.h"
#include "server/protocol.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace server_request_fuzz {

using qf::server::CompletionRequest;
using qf::server::HttpError;
using qf::server::json;

const qf::Tokenizer* g_tokenizer = nullptr;
const qf::ChatTemplate* g_template = nullptr;
constexpr int kContext = 64;  // small, so that long prompts reach the 400 for prompts over the context

// The server's defaults: a compressed cache and filters, so that "kv_policy": "none" clears them.
const qf::SamplerOptions kDefaults{};
qf::runtime::KvOptions server_kv() {
  qf::runtime::KvOptions kv;
  kv.policy = "qfilters";
  kv.filters = "filters.safetensors";
  kv.budget = 512;
  kv.window = 16;
  kv.positions = "shift";
  return kv;
}

[[noreturn]] void broken(const std::string& what) {
  std::fprintf(stderr, "server_request_fuzz: %s\n", what.c_str());
  std::abort();
}

void require(bool ok, const char* what) {
  if (!ok) broken(what);
}

// What the server sends: error_body dumped as send_json does (invalid UTF-8 in a message, e.g.
// the bytes a JSON parse error quotes, replaced). It must parse and say what the error says.
void check_error(const HttpError& e) {
  require(e.status == 400, "a request body was refused with a status other than 400");
  require(e.what()[0] != '\0', "an error without a message");
  const std::string sent = qf::server::error_body(e).dump(-1, ' ', false, json::error_handler_t::replace);
  const json back = json::parse(sent);
  require(back["error"]["type"] == e.type, "the error body lost its type");
  require(e.param.empty() ? back["error"]["param"].is_null() : back["error"]["param"] == e.param,
          "the error body lost its param");
}

void check_sent(const json& body) {
  const json back = json::parse(body.dump(-1, ' ', false, json::error_handler_t::replace));
  require(back.type() == body.type(), "a response body changed type when sent");
}

bool in(double x, double lo, double hi) { return x >= lo && x <= hi; }

// The bounds parse_completion promises (and the sampler and scheduler rely on).
void check_limits(const CompletionRequest& r, const json& body) {
  if (r.chat) {
    require(!r.messages.empty() && r.messages.size() == body["messages"].size(), "messages lost or added");
    for (const qf::ChatMessage& m : r.messages)
      require(m.role == "system" || m.role == "user" || m.role == "assistant", "a role outside system/user/assistant");
  } else {
    require(!r.prompt.empty() || !r.prompt_tokens.empty(), "an empty prompt was accepted");
    for (int32_t t : r.prompt_tokens) require(t >= 0, "a negative token id was accepted");
  }
  require(r.max_tokens == -1 || r.max_tokens >= 1, "max_tokens out of bounds");
  const qf::SamplerOptions& s = r.sampling;
  require(in(s.temperature, 0, 100) && in(s.top_p, 1e-6, 1) && s.top_k >= 0 && in(s.min_p, 0, 1) &&
              in(s.presence_penalty, -2, 2) && in(s.frequency_penalty, -2, 2) && in(s.repeat_penalty, 1e-3, 100) &&
              in(s.repeat_last_n, 0, 1 << 20),
          "a sampling setting out of its bounds");
  require(!r.seed_given || (body["seed"].is_number() && body["seed"].get<double>() >= 0), "seed_given without a seed");
  require(r.id_slot >= -1, "id_slot below -1");
  require(r.stop.size() <= 16, "more than 16 stop strings");
  std::vector<std::string> stops;
  if (body.contains("stop") && body["stop"].is_string()) stops.push_back(body["stop"].get<std::string>());
  if (body.contains("stop") && body["stop"].is_array())
    for (const json& x : body["stop"]) stops.push_back(x.get<std::string>());
  std::erase_if(stops, [](const std::string& x) { return x.empty(); });
  require(r.stop == stops, "the stop strings were not kept as sent");
  if (r.kv)
    require(r.kv->budget >= 0 && r.kv->window >= 0 && r.kv->evict_every >= 1 && in(r.kv->ratio, 0, 1) &&
                r.kv->skip_layers >= 0,
            "a KV setting out of its bounds");
  (void)qf::Sampler(s);  // what admission builds: throws qf::Error (a finding) on a value it refuses
}

// The request as a client would send it. dump() without a handler throws on invalid UTF-8.
json to_body(const CompletionRequest& r) {
  json b = json::object();
  if (r.chat) {
    b["messages"] = json::array();
    for (const qf::ChatMessage& m : r.messages) b["messages"].push_back({{"role", m.role}, {"content", m.content}});
  } else if (!r.prompt_tokens.empty()) {
    b["prompt"] = r.prompt_tokens;
  } else {
    b["prompt"] = r.prompt;
  }
  if (!r.model.empty()) b["model"] = r.model;
  if (r.max_tokens > 0) b["max_tokens"] = r.max_tokens;
  const qf::SamplerOptions& s = r.sampling;
  b["temperature"] = s.temperature;
  b["top_p"] = s.top_p;
  b["top_k"] = s.top_k;
  b["min_p"] = s.min_p;
  b["presence_penalty"] = s.presence_penalty;
  b["frequency_penalty"] = s.frequency_penalty;
  b["repeat_penalty"] = s.repeat_penalty;
  b["repeat_last_n"] = s.repeat_last_n;
  if (r.seed_given) b["seed"] = s.seed;
  if (!r.stop.empty()) b["stop"] = r.stop;
  b["stream"] = r.stream;
  if (r.include_usage) b["stream_options"] = {{"include_usage", true}};
  b["cache_prompt"] = r.cache_prompt;
  b["id_slot"] = r.id_slot;
  b["ignore_eos"] = r.ignore_eos;
  if (r.kv) {
    b["kv_policy"] = r.kv->policy;
    b["kv_budget"] = r.kv->budget;
    b["kv_window"] = r.kv->window;
    b["kv_evict_every"] = r.kv->evict_every;
    b["kv_ratio"] = r.kv->ratio;
    b["kv_skip_layers"] = r.kv->skip_layers;
    b["kv_positions"] = r.kv->positions;
  }
  return b;
}

bool same_request(const CompletionRequest& a, const CompletionRequest& b) {
  const qf::SamplerOptions &x = a.sampling, &y = b.sampling;
  bool same_messages = a.messages.size() == b.messages.size();
  for (size_t i = 0; same_messages && i < a.messages.size(); ++i)
    same_messages = a.messages[i].role == b.messages[i].role && a.messages[i].content == b.messages[i].content;
  return same_messages && a.chat == b.chat && a.prompt == b.prompt && a.prompt_tokens == b.prompt_tokens &&
         a.model == b.model && a.max_tokens == b.max_tokens && x.temperature == y.temperature && x.top_p == y.top_p &&
         x.top_k == y.top_k && x.min_p == y.min_p && x.presence_penalty == y.presence_penalty &&
         x.frequency_penalty == y.frequency_penalty && x.repeat_penalty == y.repeat_penalty &&
         x.repeat_last_n == y.repeat_last_n && x.seed == y.seed && a.seed_given == b.seed_given && a.stop == b.stop &&
         a.stream == b.stream && a.include_usage == b.include_usage && a.cache_prompt == b.cache_prompt &&
         a.id_slot == b.id_slot && a.ignore_eos == b.ignore_eos && a.kv == b.kv;
}

void check_round_trip(const CompletionRequest& r) {
  std::string text;
  try {
    text = to_body(r).dump();
  } catch (const json::type_error&) {
    broken("an accepted request holds a string that is not valid UTF-8");
  }
  const CompletionRequest again = qf::server::parse_completion(json::parse(text), r.chat, kDefaults, server_kv());
  require(same_request(r, again), "the request serialised back to JSON parses differently");
}

// Streams the prompt's text through the request's stop strings, one token's bytes at a time.
void check_stop_matching(const CompletionRequest& r, const std::vector<int32_t>& ids) {
  qf::server::StopMatcher matcher(r.stop);
  std::string full, sent;
  for (int32_t id : ids) {
    const std::string& piece = g_tokenizer->token_bytes(id);
    full += piece;
    sent += matcher.push(piece);
  }
  sent += matcher.flush();
  size_t cut = std::string::npos;
  for (const std::string& s : r.stop) cut = std::min(cut, full.find(s));
  require(sent == full.substr(0, cut), "the streamed text is not the text up to the first stop string");
  require(matcher.stopped() == (cut != std::string::npos), "StopMatcher::stopped() disagrees with the text");
}

void check_completion(const json& body, bool chat) {
  CompletionRequest r;
  std::vector<int32_t> ids;
  try {
    r = qf::server::parse_completion(body, chat, kDefaults, server_kv());
    check_limits(r, body);
    check_round_trip(r);
    ids = qf::server::prompt_tokens(r, *g_tokenizer, g_template, kContext);
  } catch (const HttpError& e) {
    check_error(e);
    return;
  }
  require(!ids.empty() && ids.size() < static_cast<size_t>(kContext), "prompt length outside (0, context)");
  for (int32_t id : ids) require(id >= 0 && id < g_tokenizer->n_vocab(), "a prompt token outside the vocabulary");
  check_stop_matching(r, ids);
  const std::string text = g_tokenizer->decode(ids, /*render_special=*/false);  // may end inside a character
  check_sent(qf::server::completion_response(r, "cmpl-1", 0, text, qf::server::FinishReason::kLength, {}, json::object()));
  check_sent(qf::server::completion_chunk(r, "cmpl-1", 0, text, std::nullopt, true));
  check_sent(qf::server::completion_chunk(r, "cmpl-1", 0, "", qf::server::FinishReason::kStop, false));
}

void check_tokenize(const json& body) {
  qf::server::TokenizeRequest t;
  try {
    t = qf::server::parse_tokenize(body);
  } catch (const HttpError& e) {
    check_error(e);
    return;
  }
  json tokens = json::array();
  for (int32_t id : g_tokenizer->encode(t.content, t.add_special, t.parse_special)) {
    require(id >= 0 && id < g_tokenizer->n_vocab(), "/tokenize: an id outside the vocabulary");
    tokens.push_back({{"id", id}, {"piece", g_tokenizer->token_bytes(id)}});
  }
  check_sent({{"tokens", tokens}});
}

void check_detokenize(const json& body) {
  std::vector<int32_t> ids;
  try {
    ids = qf::server::parse_detokenize(body, g_tokenizer->n_vocab());
  } catch (const HttpError& e) {
    check_error(e);
    return;
  }
  require(ids.size() == body["tokens"].size(), "/detokenize: ids lost or added");
  for (int32_t id : ids) require(id >= 0 && id < g_tokenizer->n_vocab(), "/detokenize: an id outside the vocabulary");
  check_sent({{"content", g_tokenizer->decode(ids, /*render_special=*/true)}});
}

}  // namespace server_request_fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const qf::Tokenizer& tok = fuzz_tokenizer("server_request_fuzz");
  try {
    static const qf::ChatTemplate tmpl = qf::ChatTemplate::from_tokenizer(tok);
    server_request_fuzz::g_template = &tmpl;
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "server_request_fuzz: no chat template: %s\n", e.what());
    std::exit(1);
  }
  server_request_fuzz::g_tokenizer = &tok;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace server_request_fuzz;
  json body;
  try {
    body = qf::server::parse_json_body({reinterpret_cast<const char*>(data), size});
  } catch (const HttpError& e) {
    check_error(e);
    return 0;
  }
  check_completion(body, /*chat=*/true);  // /v1/chat/completions (and /apply-template)
  check_completion(body, /*chat=*/false);
  check_tokenize(body);
  check_detokenize(body);
  return 0;
}
