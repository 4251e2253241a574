#include "server/protocol.h"

#include <climits>
#include <cmath>
#include <limits>

namespace qf::server {

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& what) {
  throw HttpError(400, "'" + param + "' " + what, "invalid_request_error", param);
}

const json* field(const json& body, const char* key) {
  auto it = body.find(key);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

std::optional<int64_t> get_int(const json& body, const char* key, int64_t lo, int64_t hi) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_number_integer() && !(v->is_number_float() && std::trunc(v->get<double>()) == v->get<double>()))
    bad(key, "must be an integer");
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) bad(key, "is out of range");
  const double d = v->get<double>();
  // 2^63 passes a comparison with (double)INT64_MAX, which rounds up to it, but has no int64_t.
  if (v->is_number_float() && !(d >= -0x1p63 && d < 0x1p63)) bad(key, "is out of range");
  if (d < static_cast<double>(lo) || d > static_cast<double>(hi))
    bad(key, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  return v->is_number_float() ? static_cast<int64_t>(d) : v->get<int64_t>();
}

std::optional<float> get_float(const json& body, const char* key, double lo, double hi) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(key, "must be a number");
  const double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) bad(key, "must be between " + json(lo).dump() + " and " + json(hi).dump());
  // Rounding to float may step over a bound that is not a float (top_p's 1e-6): step back in.
  float f = static_cast<float>(d);
  if (f < lo) f = std::nextafter(f, INFINITY);
  if (f > hi) f = std::nextafter(f, -INFINITY);
  return f;
}

std::optional<bool> get_bool(const json& body, const char* key) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) bad(key, "must be true or false");
  return v->get<bool>();
}

std::optional<std::string> get_string(const json& body, const char* key) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) bad(key, "must be a string");
  return v->get<std::string>();
}

// OpenAI message content: a string, or an array of {"type": "text", "text": ...} parts.
std::string message_content(const json& content, const std::string& param) {
  if (content.is_string()) return content.get<std::string>();
  if (content.is_null()) return "";
  if (!content.is_array()) bad(param, "must be a string or an array of text parts");
  std::string text;
  for (const json& part : content) {
    const json* type = part.is_object() ? field(part, "type") : nullptr;
    const json* part_text = part.is_object() ? field(part, "text") : nullptr;
    if (!type || *type != "text" || !part_text || !part_text->is_string())
      bad(param, "parts must be {\"type\": \"text\", \"text\": \"...\"} (this server reads text only)");
    text += part_text->get_ref<const std::string&>();
  }
  return text;
}

std::vector<ChatMessage> parse_messages(const json& body) {
  const json* m = field(body, "messages");
  if (!m) bad("messages", "is required");
  if (!m->is_array() || m->empty()) bad("messages", "must be a non-empty array");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string p = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) bad(p, "must be an object");
    const json* role = field(msg, "role");
    if (!role || !role->is_string()) bad(p + ".role", "must be a string");
    std::string r = role->get<std::string>();
    if (r == "developer") r = "system";  // OpenAI's newer name for the system role
    if (r != "system" && r != "user" && r != "assistant") bad(p + ".role", "must be system, user or assistant");
    const auto it = msg.find("content");
    out.push_back({r, message_content(it == msg.end() ? json() : *it, p + ".content")});
  }
  return out;
}

void parse_prompt(const json& body, CompletionRequest& r) {
  const json* p = field(body, "prompt");
  if (!p) bad("prompt", "is required");
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) {
    r.prompt = (*p)[0].get<std::string>();
  } else if (p->is_array() && !p->empty() && std::all_of(p->begin(), p->end(), [](const json& t) { return t.is_number_integer(); })) {
    for (const json& t : *p) {
      const int64_t id = t.get<int64_t>();
      if (id < 0 || id > INT32_MAX) bad("prompt", "holds a token id out of range");
      r.prompt_tokens.push_back(static_cast<int32_t>(id));
    }
  } else {
    bad("prompt", "must be a string, a one-string array or an array of token ids");
  }
  if (r.prompt.empty() && r.prompt_tokens.empty()) bad("prompt", "is empty");
}

std::vector<std::string> parse_stop(const json& body) {
  const json* s = field(body, "stop");
  std::vector<std::string> out;
  if (!s) return out;
  if (s->is_string()) {
    out.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    if (s->size() > 16) bad("stop", "may hold at most 16 strings");
    for (const json& x : *s) {
      if (!x.is_string()) bad("stop", "must be a string or an array of strings");
      out.push_back(x.get<std::string>());
    }
  } else {
    bad("stop", "must be a string or an array of strings");
  }
  std::erase_if(out, [](const std::string& x) { return x.empty(); });
  return out;
}

// Fields clients send that only have one value here.
void check_unsupported(const json& body) {
  if (auto n = get_int(body, "n", 1, 1); n && *n != 1) bad("n", "must be 1");
  if (const json* lp = field(body, "logprobs"); lp && !(lp->is_boolean() && !lp->get<bool>()))
    throw HttpError(400, "'logprobs' is not supported by this server", "invalid_request_error", "logprobs");
  if (field(body, "tools") || field(body, "functions"))
    throw HttpError(400, "tool calls are not supported by this server", "invalid_request_error", "tools");
}

// kv_layer_weights: "spread", "w0,w1,..." or an array of numbers, as --layer-weights spells it
// (counts and signs are checked with the other KV options, at admission).
std::optional<std::string> get_layer_weights(const json& body, const char* key) {
  const json* v = field(body, key);
  if (!v) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (!v->is_array() || v->empty()) bad(key, "must be \"spread\" or an array of per-layer weights");
  std::vector<float> w;
  for (const json& x : *v) {
    if (!x.is_number()) bad(key, "must be \"spread\" or an array of per-layer weights");
    const double d = x.get<double>();
    if (!(d > 0) || !std::isfinite(static_cast<float>(d))) bad(key, "weights must be positive and finite");
    w.push_back(static_cast<float>(d));
  }
  return runtime::format_layer_weights(w);
}

// kv_filter_decay: a number >= 0, or "inf" (no memory), as --filter-decay spells it; JSON has no infinity.
std::optional<float> get_decay(const json& body, const char* key) {
  const json* v = field(body, key);
  if (v && v->is_string()) {
    if (v->get<std::string>() != "inf") bad(key, "must be a number >= 0 or \"inf\"");
    return std::numeric_limits<float>::infinity();
  }
  return get_float(body, key, 0.0, std::numeric_limits<float>::max());
}

std::optional<runtime::KvOptions> parse_kv(const json& body, const runtime::KvOptions& server_kv) {
  runtime::KvOptions kv = server_kv;
  bool any = false;
  if (auto p = get_string(body, "kv_policy")) kv.policy = *p, any = true;
  if (auto b = get_int(body, "kv_budget", 0, INT32_MAX)) kv.budget = static_cast<int>(*b), any = true;
  if (auto w = get_int(body, "kv_window", 0, INT32_MAX)) kv.window = static_cast<int>(*w), any = true;
  if (auto e = get_int(body, "kv_evict_every", 1, INT32_MAX)) kv.evict_every = static_cast<int>(*e), any = true;
  if (auto r = get_float(body, "kv_ratio", 0.0, 1.0)) kv.ratio = *r, any = true;
  if (auto s = get_int(body, "kv_skip_layers", 0, INT32_MAX)) kv.skip_layers = static_cast<int>(*s), any = true;
  if (auto w = get_layer_weights(body, "kv_layer_weights")) kv.layer_weights = *w, any = true;
  if (auto p = get_string(body, "kv_positions")) kv.positions = *p, any = true;  // keep | shift, checked at admission
  runtime::QueryStatsOptions& q = kv.query_stats;
  if (auto f = get_int(body, "kv_future_positions", 1, INT32_MAX)) q.future_positions = static_cast<int>(*f), any = true;
  if (auto b = get_float(body, "kv_filter_blend", 0.0, 1.0)) q.filter_blend = *b, any = true;
  if (auto h = get_int(body, "kv_filter_horizon", 1, INT32_MAX)) q.filter_horizon = static_cast<int>(*h), any = true;
  if (auto d = get_decay(body, "kv_filter_decay")) q.filter_decay = *d, any = true;
  if (!any) return std::nullopt;
  if (kv.policy == "none") kv.budget = 0, kv.ratio = 0, kv.filters.clear(), kv.layer_weights.clear();
  return kv;
}

}  // namespace

json parse_json_body(std::string_view body) {
  try {
    return json::parse(body);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for numbers beyond double
    throw HttpError(400, std::string("the request body is not valid JSON: ") + e.what());
  }
}

json error_body(const HttpError& e) {
  json err = {{"message", e.what()}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  if (e.status == 404 && e.param == "model") err["code"] = "model_not_found";
  return {{"error", err}};
}

CompletionRequest parse_completion(const json& body, bool chat, const SamplerOptions& defaults,
                                   const runtime::KvOptions& server_kv) {
  if (!body.is_object()) throw HttpError(400, "the request body must be a JSON object");
  CompletionRequest r;
  r.chat = chat;
  if (chat) r.messages = parse_messages(body);
  else parse_prompt(body, r);
  r.model = get_string(body, "model").value_or("");
  check_unsupported(body);

  // max_completion_tokens is OpenAI's newer name, n_predict llama.cpp's.
  for (const char* key : {"max_tokens", "max_completion_tokens", "n_predict"}) {
    const json* v = field(body, key);
    if (!v) continue;
    if (std::string(key) == "n_predict" && v->is_number_integer() && v->get<int64_t>() == -1) continue;
    r.max_tokens = static_cast<int>(*get_int(body, key, 1, INT32_MAX));
  }
  SamplerOptions& s = r.sampling;
  s = defaults;
  s.temperature = get_float(body, "temperature", 0.0, 100.0).value_or(s.temperature);
  s.top_p = get_float(body, "top_p", 1e-6, 1.0).value_or(s.top_p);
  s.top_k = static_cast<int>(get_int(body, "top_k", 0, INT32_MAX).value_or(s.top_k));
  s.min_p = get_float(body, "min_p", 0.0, 1.0).value_or(s.min_p);
  s.presence_penalty = get_float(body, "presence_penalty", -2.0, 2.0).value_or(s.presence_penalty);
  s.frequency_penalty = get_float(body, "frequency_penalty", -2.0, 2.0).value_or(s.frequency_penalty);
  s.repeat_penalty = get_float(body, "repeat_penalty", 1e-3, 100.0).value_or(s.repeat_penalty);
  s.repeat_last_n = static_cast<int>(get_int(body, "repeat_last_n", 0, 1 << 20).value_or(s.repeat_last_n));
  if (auto seed = get_int(body, "seed", INT64_MIN, INT64_MAX); seed && *seed >= 0) {
    s.seed = static_cast<uint64_t>(*seed);
    r.seed_given = true;
  }
  r.stop = parse_stop(body);
  r.stream = get_bool(body, "stream").value_or(false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object()) bad("stream_options", "must be an object");
    r.include_usage = get_bool(*so, "include_usage").value_or(false);
  }
  r.cache_prompt = get_bool(body, "cache_prompt").value_or(true);
  r.id_slot = static_cast<int>(get_int(body, "id_slot", -1, INT32_MAX).value_or(-1));
  r.ignore_eos = get_bool(body, "ignore_eos").value_or(false);
  r.kv = parse_kv(body, server_kv);
  return r;
}

std::vector<int32_t> prompt_tokens(const CompletionRequest& r, const Tokenizer& tok, const ChatTemplate* tmpl, int n_ctx) {
  std::vector<int32_t> ids;
  if (r.chat) {
    if (!tmpl) throw HttpError(400, "this model has no chat template the server knows: use /v1/completions");
    ids = tok.encode(tmpl->apply(r.messages, /*add_generation_prompt=*/true), /*add_special=*/true, /*parse_special=*/true);
  } else if (!r.prompt_tokens.empty()) {
    for (int32_t t : r.prompt_tokens)
      if (t >= tok.n_vocab())
        throw HttpError(400, "token id " + std::to_string(t) + " is outside the vocabulary", "invalid_request_error", "prompt");
    ids = r.prompt_tokens;
  } else {
    ids = tok.encode(r.prompt, /*add_special=*/true, /*parse_special=*/true);
  }
  const char* param = r.chat ? "messages" : "prompt";
  if (ids.empty()) throw HttpError(400, "the prompt is empty after tokenization", "invalid_request_error", param);
  if (static_cast<int64_t>(ids.size()) >= n_ctx)
    throw HttpError(400, "the prompt has " + std::to_string(ids.size()) + " tokens, the context holds " + std::to_string(n_ctx),
                    "invalid_request_error", param);
  return ids;
}

TokenizeRequest parse_tokenize(const json& body) {
  if (!body.is_object()) throw HttpError(400, "the request body must be a JSON object");
  TokenizeRequest t;
  const std::optional<std::string> content = get_string(body, "content");
  if (!content) bad("content", "is required");
  t.content = *content;
  t.add_special = get_bool(body, "add_special").value_or(t.add_special);
  t.parse_special = get_bool(body, "parse_special").value_or(t.parse_special);
  t.with_pieces = get_bool(body, "with_pieces").value_or(t.with_pieces);
  return t;
}

std::vector<int32_t> parse_detokenize(const json& body, int32_t n_vocab) {
  if (!body.is_object()) throw HttpError(400, "the request body must be a JSON object");
  const json* tokens = field(body, "tokens");
  if (!tokens || !tokens->is_array()) bad("tokens", "must be an array of token ids");
  std::vector<int32_t> ids;
  ids.reserve(tokens->size());
  for (const json& t : *tokens) {
    // An unsigned id above INT64_MAX would wrap negative through get<int64_t>: compare as unsigned.
    const bool in_vocab = t.is_number_unsigned() ? t.get<uint64_t>() < static_cast<uint64_t>(n_vocab)
                                                 : t.is_number_integer() && t.get<int64_t>() >= 0 && t.get<int64_t>() < n_vocab;
    if (!in_vocab) bad("tokens", "holds something that is not a token id of this model");
    ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
  }
  return ids;
}

const char* finish_reason_name(FinishReason r) { return r == FinishReason::kStop ? "stop" : "length"; }

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

json completion_response(const CompletionRequest& r, const std::string& id, int64_t created, const std::string& text,
                         FinishReason finish, const Usage& usage, const json& extra) {
  json choice = {{"index", 0}, {"finish_reason", finish_reason_name(finish)}, {"logprobs", nullptr}};
  if (r.chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
  else choice["text"] = text;
  json out = {{"id", id},
              {"object", r.chat ? "chat.completion" : "text_completion"},
              {"created", created},
              {"model", r.model},
              {"choices", json::array({choice})},
              {"usage", usage_json(usage)}};
  for (const auto& [k, v] : extra.items()) out[k] = v;
  return out;
}

json completion_chunk(const CompletionRequest& r, const std::string& id, int64_t created, const std::string& delta,
                      std::optional<FinishReason> finish, bool first) {
  json choice = {{"index", 0}, {"logprobs", nullptr},
                 {"finish_reason", finish ? json(finish_reason_name(*finish)) : json(nullptr)}};
  if (r.chat) {
    json d = json::object();
    if (first) d["role"] = "assistant";
    if (!delta.empty() || !finish) d["content"] = delta;
    choice["delta"] = d;
  } else {
    choice["text"] = delta;
  }
  return {{"id", id},
          {"object", r.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", r.model},
          {"choices", json::array({choice})}};
}

std::string StopMatcher::push(const std::string& text) {
  if (stopped_) return "";
  held_ += text;
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Hold back the longest tail that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  std::string out = stopped_ ? "" : held_;
  held_.clear();
  return out;
}

}  // namespace qf::server
