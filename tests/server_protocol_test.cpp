// The server's request parsing and response shapes, without a model or sockets.
#include <gtest/gtest.h>

#include <limits>

#include "server/protocol.h"

namespace qf::server {
namespace {

CompletionRequest parse(const std::string& body, bool chat = false) {
  return parse_completion(json::parse(body), chat, SamplerOptions{}, runtime::KvOptions{});
}

// The request is refused with a 400 that names `param`.
void expect_bad(const std::string& body, const std::string& param, bool chat = false) {
  try {
    parse(body, chat);
    ADD_FAILURE() << "accepted: " << body;
  } catch (const HttpError& e) {
    EXPECT_EQ(e.status, 400) << body;
    EXPECT_EQ(e.param, param) << body << " -> " << e.what();
    const json err = error_body(e);
    EXPECT_EQ(err["error"]["type"], "invalid_request_error");
    EXPECT_EQ(err["error"]["param"], param);
  }
}

TEST(ServerProtocol, ChatRequestWithEveryField) {
  const CompletionRequest r = parse(R"({
    "model": "m", "messages": [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
    "max_tokens": 12, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1, "seed": 3,
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "repeat_penalty": 1.1, "stop": ["\n\n", "END"],
    "stream": true, "stream_options": {"include_usage": true}, "n": 1, "logprobs": false,
    "kv_policy": "knorm", "kv_budget": 64, "kv_window": 8, "kv_positions": "keep", "kv_layer_weights": [1, 2.5, 3]})", true);
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[1].content, "hi there");
  EXPECT_EQ(r.max_tokens, 12);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_EQ(r.sampling.top_k, 7);
  EXPECT_FLOAT_EQ(r.sampling.min_p, 0.1f);
  EXPECT_TRUE(r.seed_given);
  EXPECT_EQ(r.sampling.seed, 3u);
  EXPECT_FLOAT_EQ(r.sampling.frequency_penalty, -0.5f);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n\n", "END"}));
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.include_usage);
  ASSERT_TRUE(r.kv.has_value());
  EXPECT_EQ(r.kv->policy, "knorm");
  EXPECT_EQ(r.kv->budget, 64);
  EXPECT_EQ(r.kv->window, 8);
  EXPECT_EQ(r.kv->positions, "keep");  // checked against keep | shift at admission
  EXPECT_EQ(r.kv->layer_weights, "1,2.5,3");  // --layer-weights' spelling; the count is checked at admission
}

TEST(ServerProtocol, LayerWeightsPerRequest) {
  runtime::KvOptions server;
  server.policy = "qfilters";
  server.layer_weights = "spread";
  auto kv = [&](const char* body) { return parse_completion(json::parse(body), false, {}, server).kv; };
  EXPECT_FALSE(kv(R"({"prompt": "x"})").has_value());  // the server's own, "spread" included
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_budget": 64})")->layer_weights, "spread");
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_layer_weights": "1,2"})")->layer_weights, "1,2");
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_layer_weights": [0.5, 1e-3]})")->layer_weights, "0.5,0.00100000005");
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_policy": "none"})")->layer_weights, "");  // a full cache has no budgets
  expect_bad(R"({"prompt": "x", "kv_layer_weights": []})", "kv_layer_weights");
  expect_bad(R"({"prompt": "x", "kv_layer_weights": [1, -1]})", "kv_layer_weights");
  expect_bad(R"({"prompt": "x", "kv_layer_weights": [1, 1e300]})", "kv_layer_weights");
  expect_bad(R"({"prompt": "x", "kv_layer_weights": [1, "2"]})", "kv_layer_weights");
  expect_bad(R"({"prompt": "x", "kv_layer_weights": 5})", "kv_layer_weights");
}

// The query-statistics settings (--future-positions, --filter-blend, --filter-horizon,
// --filter-decay) per request; the others keep the server's.
TEST(ServerProtocol, QueryStatsSettingsPerRequest) {
  runtime::KvOptions server;
  server.policy = "qfilters_max";
  server.query_stats.filter_horizon = 4;
  auto kv = [&](const char* body) { return parse_completion(json::parse(body), false, {}, server).kv; };
  EXPECT_FALSE(kv(R"({"prompt": "x"})").has_value());
  const std::optional<runtime::KvOptions> a = kv(R"({"prompt": "x", "kv_future_positions": 64, "kv_filter_blend": 0.5})");
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->query_stats.future_positions, 64);
  EXPECT_EQ(a->query_stats.filter_blend, 0.5f);
  EXPECT_EQ(a->query_stats.filter_horizon, 4);  // the server's
  EXPECT_EQ(a->query_stats.filter_decay, runtime::QueryStatsOptions{}.filter_decay);
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_filter_horizon": 8})")->query_stats.filter_horizon, 8);
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_filter_decay": 0.1})")->query_stats.filter_decay, 0.1f);
  EXPECT_EQ(kv(R"({"prompt": "x", "kv_filter_decay": "inf"})")->query_stats.filter_decay,
            std::numeric_limits<float>::infinity());
  expect_bad(R"({"prompt": "x", "kv_future_positions": 0})", "kv_future_positions");
  expect_bad(R"({"prompt": "x", "kv_filter_blend": 1.5})", "kv_filter_blend");
  expect_bad(R"({"prompt": "x", "kv_filter_horizon": 0})", "kv_filter_horizon");
  expect_bad(R"({"prompt": "x", "kv_filter_decay": -0.5})", "kv_filter_decay");
  expect_bad(R"({"prompt": "x", "kv_filter_decay": "forever"})", "kv_filter_decay");
  expect_bad(R"({"prompt": "x", "kv_filter_decay": 1e300})", "kv_filter_decay");
}

TEST(ServerProtocol, DefaultsComeFromTheServer) {
  SamplerOptions defaults;
  defaults.temperature = 0.3f;
  const CompletionRequest r = parse_completion(json::parse(R"({"prompt": "x"})"), false, defaults, runtime::KvOptions{});
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.3f);
  EXPECT_EQ(r.max_tokens, -1);
  EXPECT_FALSE(r.seed_given);
  EXPECT_FALSE(r.kv.has_value());
  EXPECT_EQ(parse(R"({"prompt": [1, 2, 3]})").prompt_tokens, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(parse(R"({"prompt": ["one string"]})").prompt, "one string");
  EXPECT_EQ(parse(R"({"prompt": "x", "n_predict": -1})").max_tokens, -1);
  EXPECT_EQ(parse(R"({"prompt": "x", "max_completion_tokens": 5})").max_tokens, 5);
}

TEST(ServerProtocol, BadRequestsNameTheField) {
  expect_bad(R"({"messages": []})", "messages", true);
  expect_bad(R"({"prompt": "x"})", "messages", true);
  expect_bad(R"({"messages": [{"role": "wizard", "content": "x"}]})", "messages[0].role", true);
  expect_bad(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", "messages[0].content", true);
  expect_bad(R"({"messages": "hello"})", "messages", true);
  expect_bad(R"({"prompt": ""})", "prompt");
  expect_bad(R"({})", "prompt");
  expect_bad(R"({"prompt": 5})", "prompt");
  expect_bad(R"({"prompt": [1, -2]})", "prompt");
  expect_bad(R"({"prompt": "x", "max_tokens": -3})", "max_tokens");
  expect_bad(R"({"prompt": "x", "max_tokens": 0})", "max_tokens");
  expect_bad(R"({"prompt": "x", "max_tokens": 1e12})", "max_tokens");
  expect_bad(R"({"prompt": "x", "max_tokens": "12"})", "max_tokens");
  expect_bad(R"({"prompt": "x", "max_tokens": 1.5})", "max_tokens");
  expect_bad(R"({"prompt": "x", "temperature": -1})", "temperature");
  expect_bad(R"({"prompt": "x", "temperature": "hot"})", "temperature");
  expect_bad(R"({"prompt": "x", "top_p": 0})", "top_p");
  expect_bad(R"({"prompt": "x", "min_p": 2})", "min_p");
  expect_bad(R"({"prompt": "x", "presence_penalty": 3})", "presence_penalty");
  expect_bad(R"({"prompt": "x", "stop": 5})", "stop");
  expect_bad(R"({"prompt": "x", "stop": ["a", 1]})", "stop");
  expect_bad(R"({"prompt": "x", "stream": "yes"})", "stream");
  expect_bad(R"({"prompt": "x", "n": 2})", "n");
  expect_bad(R"({"prompt": "x", "logprobs": true})", "logprobs");
  expect_bad(R"({"prompt": "x", "model": 7})", "model");
  expect_bad(R"({"prompt": "x", "kv_budget": -1})", "kv_budget");
  expect_bad(R"({"prompt": "x", "kv_ratio": 1.5})", "kv_ratio");
  EXPECT_THROW(parse("[1, 2]"), HttpError);
}

TEST(ServerProtocol, ResponseShapes) {
  CompletionRequest chat = parse(R"({"messages": [{"role": "user", "content": "x"}], "model": "m"})", true);
  const json full = completion_response(chat, "chatcmpl-1", 10, "hello", FinishReason::kStop, Usage{5, 2, 3}, json::object());
  EXPECT_EQ(full["object"], "chat.completion");
  EXPECT_EQ(full["choices"][0]["message"]["content"], "hello");
  EXPECT_EQ(full["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(full["usage"]["total_tokens"], 7);
  EXPECT_EQ(full["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
  const json first = completion_chunk(chat, "chatcmpl-1", 10, "he", std::nullopt, true);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "he");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  const json last = completion_chunk(chat, "chatcmpl-1", 10, "", FinishReason::kLength, false);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  EXPECT_FALSE(last["choices"][0]["delta"].contains("content"));
  CompletionRequest text = parse(R"({"prompt": "x"})");
  EXPECT_EQ(completion_chunk(text, "cmpl-1", 10, "a", std::nullopt, true)["choices"][0]["text"], "a");
}

TEST(ServerProtocol, StopStringsAcrossTokenBoundaries) {
  StopMatcher m({"END", "\n\n"});
  std::string out;
  out += m.push("Hello E");  // "E" may start END: held back
  EXPECT_EQ(out, "Hello ");
  out += m.push("N");
  EXPECT_EQ(out, "Hello ");
  out += m.push("Xtra ");  // "ENX" is not END: released
  EXPECT_EQ(out, "Hello ENXtra ");
  out += m.push("done\n");
  out += m.push("\nmore");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(out, "Hello ENXtra done");
  EXPECT_EQ(m.push("later"), "");
  EXPECT_EQ(m.flush(), "");

  StopMatcher tail({"END"});
  EXPECT_EQ(tail.push("abc EN"), "abc ");
  EXPECT_EQ(tail.flush(), "EN");  // generation ended without the stop string: nothing is lost
  StopMatcher none({});
  EXPECT_EQ(none.push("abc"), "abc");
}

// Inputs the request fuzzer (fuzz/server_request_fuzz.cpp) reached: each used to leave the
// parser as something other than a 400 (a 500, or undefined behaviour in a float-to-int cast).
TEST(ServerProtocol, FuzzFindingsAreCleanBadRequests) {
  auto expect_400 = [](auto&& call) {
    try {
      call();
      ADD_FAILURE() << "accepted";
    } catch (const HttpError& e) {
      EXPECT_EQ(e.status, 400) << e.what();
    }
  };
  expect_400([] { parse_json_body(R"({"prompt": "x", "max_tokens": 1e400})"); });  // json::out_of_range, not parse_error
  expect_400([] { parse_json_body("{\"prompt\": \"\xff\"}"); });
  expect_400([] { parse(R"({"prompt": "x", "seed": 9223372036854775808.0})"); });  // 2^63: no int64_t holds it
  expect_400([] { parse(R"({"prompt": "x", "seed": -9.3e18})"); });
  expect_400([] { parse(R"({"messages": [{"role": "user", "content": [{"type": 5, "text": "x"}]}]})", true); });
  expect_400([] { parse(R"({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]})", true); });
  expect_400([] { parse_tokenize(json::parse(R"({"content": "x", "add_special": "yes"})")); });
  expect_400([] { parse_tokenize(json::parse(R"({"content": 5})")); });
  expect_400([] { parse_tokenize(json::parse(R"(["content"])")); });
  expect_400([] { parse_detokenize(json::parse(R"({"tokens": [18446744073709551615]})"), 100); });
  expect_400([] { parse_detokenize(json::parse(R"({"tokens": [100]})"), 100); });
  expect_400([] { parse_detokenize(json::parse(R"({"tokens": [1.0]})"), 100); });
  EXPECT_EQ(parse(R"({"prompt": "x", "seed": 9223372036854775807})").sampling.seed, 9223372036854775807u);
}

// A float bound that is not a float (1e-6) still holds for the float the request keeps.
TEST(ServerProtocol, FloatSettingsStayInsideTheirBounds) {
  const CompletionRequest r = parse(R"({"prompt": "x", "top_p": 1e-6, "repeat_penalty": 0.001})");
  EXPECT_GE(r.sampling.top_p, 1e-6);
  EXPECT_GE(r.sampling.repeat_penalty, 1e-3);
  EXPECT_LT(r.sampling.top_p, 1.001e-6);
}

TEST(ServerProtocol, TokenizeAndDetokenizeBodies) {
  const TokenizeRequest t = parse_tokenize(json::parse(R"({"content": "hi", "add_special": true, "with_pieces": null})"));
  EXPECT_EQ(t.content, "hi");
  EXPECT_TRUE(t.add_special);
  EXPECT_TRUE(t.parse_special);
  EXPECT_FALSE(t.with_pieces);
  EXPECT_EQ(parse_detokenize(json::parse(R"({"tokens": [0, 99, 7]})"), 100), (std::vector<int32_t>{0, 99, 7}));
  EXPECT_TRUE(parse_detokenize(json::parse(R"({"tokens": []})"), 100).empty());
}

}  // namespace
}  // namespace qf::server
