// SentencePiece tokenizer tests. The oracle is llama.cpp: tests/golden/tokenizer_gemma3.json
// holds its tokens and detokenized text for the tricky strings plus Gemma's own corner cases,
// every State of the Union address (by count and hash), the same vocabulary with
// add_space_prefix = true (Llama 2 style), and Gemma chat prompts rendered by the Jinja template
// (scripts/ref/tokenize_golden.py gemma3). Only the file's metadata is read: Gemma's weight types
// do not matter here. Unit tests on synthetic vocabularies pin the merge order, byte fallback and
// errors.
#include <gtest/gtest.h>

#include <chrono>
#include <cctype>
#include <cmath>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

#include "gguf/gguf.h"
#include "test_paths.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer_helpers.h"
#include "util/error.h"

namespace qf {
namespace {

using json = nlohmann::json;
using namespace test;  // tokenizer_helpers.h

const json& golden() {
  static const json g = json::parse(read_file(test::golden("tokenizer_gemma3.json")));
  return g;
}

std::string gemma3_path() {
  const std::string p = test::source_dir() + "/models/gemma-3-270m-q4_k_m.gguf";
  if (!std::ifstream(p)) throw std::runtime_error(p + " missing: run scripts/fetch_model.sh gemma3");
  return p;
}

class Gemma3 : public RealTokenizerTest<Gemma3> {
 public:
  static std::string model_path() { return gemma3_path(); }
};

std::string pieces_fnv1a(const Tokenizer& t) {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&](const void* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char*>(p)[i]) * 0x100000001b3ull;
  };
  for (int32_t id = 0; id < t.n_vocab(); ++id) {
    const std::string& b = t.token_bytes(id);
    const auto len = static_cast<uint32_t>(b.size());
    mix(&len, 4);
    mix(b.data(), b.size());
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

void expect_vocab_facts(const Tokenizer& t, const json& v) {
  EXPECT_EQ(t.n_vocab(), v["n_vocab"].get<int>());
  EXPECT_EQ(t.bos(), v["bos"].get<int>());
  EXPECT_EQ(t.eos(), v["eos"].get<int>());
  EXPECT_EQ(t.add_bos(), v["add_bos"].get<bool>());
  EXPECT_EQ(t.add_eos(), v["add_eos"].get<bool>());
  EXPECT_EQ(t.eog_ids(), v["eog"].get<std::vector<int32_t>>());
  // Every token's bytes, fingerprinted as llama_token_to_piece(special = true) was.
  EXPECT_EQ(pieces_fnv1a(t), v["pieces_fnv1a"].get<std::string>());
}

// Tokens, the concatenated pieces and llama_detokenize's text for every case.
void expect_cases(const Tokenizer& t, const json& cases, const std::string& what) {
  for (const auto& c : cases) {
    const std::string name = what + ", case '" + c["name"].get<std::string>() + "'";
    const std::string text = base64_decode(c["text_b64"].get<std::string>());
    const Tokens want = c["tokens"].get<Tokens>();
    const Tokens got = t.encode(text, c["add_special"].get<bool>(), c["parse_special"].get<bool>());
    EXPECT_EQ(got, want) << name << "\n  got  " << show(got) << "\n  want " << show(want);
    std::string pieces;
    for (int32_t id : want) pieces += t.token_bytes(id);
    EXPECT_EQ(pieces, base64_decode(c["detok_b64"].get<std::string>())) << "pieces, " << name;
    EXPECT_EQ(t.decode(want), base64_decode(c["detokenize_b64"].get<std::string>())) << "decode, " << name;
  }
}

// ---------------------------------------------------------------------------------------------
// Against llama.cpp

TEST_F(Gemma3, VocabularyFactsMatchLlamaCpp) {
  EXPECT_EQ(tok_->model(), TokenizerModel::kSpm);
  EXPECT_FALSE(tok_->add_space_prefix());
  expect_vocab_facts(*tok_, golden()["vocab"]);
  const int32_t end_of_turn = tok_->find("<end_of_turn>").value();
  EXPECT_TRUE(tok_->is_eog(end_of_turn));
  EXPECT_TRUE(tok_->is_control(end_of_turn));
  EXPECT_FALSE(tok_->is_eog(tok_->find("<start_of_turn>").value()));
  EXPECT_EQ(tok_->token_type(tok_->find("<0x41>").value()), TokenType::kByte);
  EXPECT_EQ(tok_->token_bytes(tok_->find("<0x41>").value()), "A");
  EXPECT_EQ(tok_->token_bytes(tok_->find("\xe2\x96\x81the").value()), " the");
}

TEST_F(Gemma3, GoldenCasesMatchLlamaCpp) {
  ASSERT_GE(golden()["cases"].size(), 100u);
  expect_cases(*tok_, golden()["cases"], "gemma3");
}

TEST_F(Gemma3, SpacePrefixVariantMatchesLlamaCpp) {
  // Llama 2 style files put a space before the text and after every special token, and
  // llama_detokenize takes the first one off again.
  GgufBuilder b = metadata();
  b.set("tokenizer.ggml.add_space_prefix", GgufBuilder::boolean(true));
  MemGguf g(b);
  const Tokenizer t = Tokenizer::from_gguf(*g.file);
  EXPECT_TRUE(t.add_space_prefix());
  const json& v = golden()["space_prefix_variant"];
  expect_vocab_facts(t, v["vocab"]);
  expect_cases(t, v["cases"], "add_space_prefix");
}

TEST_F(Gemma3, WholeDocumentsMatchLlamaCpp) {
  for (const auto& d : golden()["documents"]) {
    const std::string path = test::source_dir() + "/data/sotu/" + d["file"].get<std::string>();
    const std::string text = read_file(path);
    if (text.empty()) GTEST_SKIP() << path << " missing: run scripts/fetch_text.sh";
    ASSERT_EQ(fnv1a(text.data(), text.size()), d["fnv1a"].get<std::string>()) << path << " differs from the golden's copy";
    const Tokens got = tok_->encode(text, false, true);
    const Tokens want = d["tokens"].get<Tokens>();
    ASSERT_EQ(got.size(), want.size()) << path;
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i]) << path << ": first difference at token " << i;
    EXPECT_EQ(tok_->decode(got), text);
  }
}

// All 233 addresses (~11 MB, ~2.1M tokens); also reports the speed (rough on a loaded machine).
TEST_F(Gemma3, WholeCorpusMatchesLlamaCpp) {
  size_t n_tokens = 0, n_bytes = 0;
  double seconds = 0;
  for (const auto& d : golden()["corpus"]) {
    const std::string path = test::source_dir() + "/data/sotu/" + d["file"].get<std::string>();
    const std::string text = read_file(path);
    if (text.size() != d["bytes"].get<size_t>() || fnv1a(text.data(), text.size()) != d["fnv1a"].get<std::string>())
      GTEST_SKIP() << path << " missing or different: run scripts/fetch_text.sh";
    const auto t0 = std::chrono::steady_clock::now();
    const Tokens got = tok_->encode(text, false, true);
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(got.size(), d["n_tokens"].get<size_t>()) << path;
    EXPECT_EQ(fnv1a(got.data(), got.size() * sizeof(int32_t)), d["tokens_fnv1a"].get<std::string>()) << path;
    n_tokens += got.size();
    n_bytes += text.size();
  }
  std::printf("corpus: %zu files, %zu bytes, %zu tokens in %.2f s (%.0f tokens/s)\n", golden()["corpus"].size(),
              n_bytes, n_tokens, seconds, n_tokens / std::max(seconds, 1e-9));
}

TEST_F(Gemma3, ChatPromptsMatchTheJinjaTemplate) {
  // The file has no tokenizer.chat_template; its turn tokens choose the Gemma format.
  ASSERT_FALSE(file_->has("tokenizer.chat_template"));
  const ChatTemplate tmpl = ChatTemplate::from_gguf(*file_);
  EXPECT_EQ(tmpl.format(), ChatTemplate::Format::kGemma);
  EXPECT_EQ(ChatTemplate::from_tokenizer(*tok_).format(), ChatTemplate::Format::kGemma);
  ASSERT_GE(golden()["chats"].size(), 6u);
  for (const auto& c : golden()["chats"]) {
    std::vector<ChatMessage> msgs;
    for (const auto& m : c["messages"]) msgs.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    const std::string text = tmpl.apply(msgs, c["add_generation_prompt"].get<bool>());
    // The Jinja template prints bos_token itself; here encode() adds BOS.
    EXPECT_EQ("<bos>" + text, c["jinja"].get<std::string>());
    EXPECT_EQ(tok_->encode(text, true, true), c["jinja_tokens"].get<Tokens>());
    // llama.cpp's built-in Gemma format trims the system message too; otherwise they agree.
    const std::string& first = msgs[0].content;
    const bool padded_system = msgs[0].role == "system" && (std::isspace(static_cast<unsigned char>(first.front())) ||
                                                            std::isspace(static_cast<unsigned char>(first.back())));
    if (!padded_system) {
      EXPECT_EQ(text, c["llama_cpp_builtin"].get<std::string>());
    }
  }
}

TEST(ChatTemplateGemma, ExactText) {
  const ChatTemplate tmpl = ChatTemplate::from_source("gemma");
  const std::vector<ChatMessage> m = {{"system", "Be brief."}, {"user", " Hello! "}, {"assistant", "Hi.\n"}};
  EXPECT_EQ(tmpl.apply(m, true),
            "<start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n"
            "<start_of_turn>model\nHi.<end_of_turn>\n"
            "<start_of_turn>model\n");
  // Unicode whitespace is trimmed as Python's str.strip() does; U+200B is no whitespace there.
  const std::vector<ChatMessage> u = {{"user", "\xe3\x80\x80\xc2\xa0x\xe2\x80\x8b\xe2\x80\xa8"}};
  EXPECT_EQ(tmpl.apply(u, false), "<start_of_turn>user\nx\xe2\x80\x8b<end_of_turn>\n");
  EXPECT_EQ(tmpl.apply(std::span<const ChatMessage>{}, true), "<start_of_turn>model\n");
}

TEST(ChatTemplateGemma, RolesOutOfTurnAreErrors) {
  const ChatTemplate tmpl = ChatTemplate::from_source("gemma");
  const std::vector<ChatMessage> two_users = {{"user", "a"}, {"user", "b"}};
  EXPECT_THROW(tmpl.apply(two_users, true), Error);
  const std::vector<ChatMessage> assistant_first = {{"system", "s"}, {"assistant", "a"}};
  EXPECT_THROW(tmpl.apply(assistant_first, true), Error);
}

TEST(ChatTemplateGemma, DetectedAfterTheFormatsLlamaCppTriesFirst) {
  // Jinja source is recognised by its turn marker, after the formats llama.cpp tries first.
  EXPECT_EQ(ChatTemplate::from_source("{{ '<start_of_turn>' + role }}").format(), ChatTemplate::Format::kGemma);
  EXPECT_EQ(ChatTemplate::from_source("<|im_start|><start_of_turn>").format(), ChatTemplate::Format::kChatML);
  EXPECT_THROW(ChatTemplate::from_source("[INST] <start_of_turn>"), Error);
}

TEST_F(Gemma3, EveryByteStringRoundTrips) {
  // Byte fallback makes SentencePiece lossless: whatever the bytes (stray continuation bytes,
  // control characters, special-token texts), decode(encode(x)) == x. Two exceptions, shared
  // with llama.cpp (and pinned by the goldens): U+2581 itself, which the escaping makes
  // indistinguishable from a space, and a lead byte without its continuation bytes, which
  // swallows the next bytes as its "character", an escaped space included.
  std::mt19937 rng(7);
  const std::vector<std::string> alphabet = {"a", " ", "  ", "\n", "\t", "\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\x98\x80",
                                             "\x80", "\x80\xbf", "<start_of_turn>", "<0x41>",
                                             "<b>", "\x00", "the", "The"};
  for (int iter = 0; iter < 300; ++iter) {
    std::string s;
    const int len = static_cast<int>(rng() % 40);
    for (int i = 0; i < len; ++i) s += alphabet[rng() % alphabet.size()];
    for (bool parse : {false, true}) {
      const Tokens t = tok_->encode(s, false, parse);
      EXPECT_EQ(tok_->decode(t), s) << "parse_special=" << parse << " " << show(t);
    }
  }
}

TEST_F(Gemma3, MetadataErrorsAreOneLine) {
  auto expect_error = [](const GgufBuilder& b, const std::string& needle) {
    MemGguf g(b);
    try {
      Tokenizer::from_gguf(*g.file);
      ADD_FAILURE() << "no error, expected: " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    }
  };
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.scores", GgufBuilder::i32s({1, 2, 3}));
    expect_error(b, "tokenizer.ggml.scores has 3 entries for 262144 tokens");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.scores", GgufBuilder::strs({"x"}));
    expect_error(b, "tokenizer.ggml.scores");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.add_bos_token", GgufBuilder::boolean(true));
    b.set("tokenizer.ggml.bos_token_id", GgufBuilder::u32(1u << 30));  // out of range: default 1 (<eos>)
    MemGguf g(b);
    EXPECT_EQ(Tokenizer::from_gguf(*g.file).bos(), 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic SentencePiece vocabularies

// tokens with scores; types default to normal. "▁" is U+2581.
Tokenizer spm(const std::vector<std::string>& tokens, const std::vector<float>& scores,
              const std::vector<int32_t>& types = {}, bool space_prefix = false) {
  GgufBuilder b;
  b.set("tokenizer.ggml.model", GgufBuilder::str("llama"));
  b.set("tokenizer.ggml.tokens", GgufBuilder::strs(tokens));
  gguf::Array a{gguf::ValueType::F32, {}};
  for (float s : scores) a.items.push_back({gguf::ValueType::F32, double{s}});
  b.set("tokenizer.ggml.scores", {gguf::ValueType::ARRAY, std::move(a)});
  if (!types.empty()) b.set("tokenizer.ggml.token_type", GgufBuilder::i32s(types));
  b.set("tokenizer.ggml.add_space_prefix", GgufBuilder::boolean(space_prefix));
  b.set("tokenizer.ggml.add_bos_token", GgufBuilder::boolean(false));
  MemGguf g(b);
  return Tokenizer::from_gguf(*g.file);
}

TEST(TokenizerSpm, HighestScoringPairMergesFirst) {
  const std::vector<std::string> vocab = {"a", "b", "c", "ab", "bc", "abc"};
  // "bc" outscores "ab": a + bc -> abc.
  EXPECT_EQ(spm(vocab, {0, 0, 0, -2, -1, -3}).encode("abc", false, false), (Tokens{5}));
  // "ab" outscores "bc", and "ab" + "c" is "abc" too.
  EXPECT_EQ(spm(vocab, {0, 0, 0, -1, -2, -3}).encode("abc", false, false), (Tokens{5}));
  // Without "abc": whichever pair wins decides.
  const std::vector<std::string> no_abc = {"a", "b", "c", "ab", "bc"};
  EXPECT_EQ(spm(no_abc, {0, 0, 0, -1, -2}).encode("abc", false, false), (Tokens{3, 2}));
  EXPECT_EQ(spm(no_abc, {0, 0, 0, -2, -1}).encode("abc", false, false), (Tokens{0, 4}));
}

TEST(TokenizerSpm, EqualScoresMergeLeftmostFirst) {
  const Tokenizer t = spm({"a", "aa", "aaa"}, {0, -1, -1});
  EXPECT_EQ(t.encode("aaa", false, false), (Tokens{2}));      // (a a) a -> aa a -> aaa
  EXPECT_EQ(t.encode("aaaa", false, false), (Tokens{2, 0}));   // (a a) a a -> (aa a) a: the left pair first
  const Tokenizer u = spm({"a", "aa"}, {0, -1});
  EXPECT_EQ(u.encode("aaaaa", false, false), (Tokens{1, 1, 0}));
}

TEST(TokenizerSpm, SpacesAreEscapedAndPrefixed) {
  const std::string sp = "\xe2\x96\x81";
  const std::vector<std::string> vocab = {"h", "i", sp, sp + "h", sp + "hi"};
  const std::vector<float> scores = {0, 0, 0, -1, -2};
  const Tokenizer plain = spm(vocab, scores);
  EXPECT_EQ(plain.encode("hi hi", false, false), (Tokens{0, 1, 4}));
  EXPECT_EQ(plain.decode(Tokens{0, 1, 4}), "hi hi");
  const Tokenizer prefixed = spm(vocab, scores, {}, true);
  EXPECT_EQ(prefixed.encode("hi hi", false, false), (Tokens{4, 4}));
  EXPECT_EQ(prefixed.decode(Tokens{4, 4}), "hi hi");  // the added space is dropped again
  EXPECT_EQ(prefixed.decode(Tokens{4}), "hi");
}

TEST(TokenizerSpm, UnknownCharactersFallBackToByteTokens) {
  std::vector<std::string> vocab = {"<unk>", "a"};
  std::vector<float> scores = {0, 0};
  std::vector<int32_t> types = {2, 1};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab.push_back(name);
    scores.push_back(0);
    types.push_back(6);
  }
  const Tokenizer t = spm(vocab, scores, types);
  // "é" = C3 A9 is no token: its two bytes.
  EXPECT_EQ(t.encode("a\xc3\xa9", false, false), (Tokens{1, 2 + 0xC3, 2 + 0xA9}));
  EXPECT_EQ(t.decode(Tokens{1, 2 + 0xC3, 2 + 0xA9}), "a\xc3\xa9");
  // A lone continuation byte and a truncated sequence are symbols of their own: bytes again.
  EXPECT_EQ(t.encode("\x80" "a\xe2\x96", false, false), (Tokens{2 + 0x80, 1, 2 + 0xE2, 2 + 0x96}));
}

TEST(TokenizerSpm, MissingByteTokenIsAnError) {
  const Tokenizer t = spm({"a"}, {0});
  EXPECT_EQ(t.encode("aa", false, false), (Tokens{0, 0}));
  EXPECT_THROW(t.encode("ab", false, false), Error);
}

TEST(TokenizerSpm, TokenBytesFollowTheirType) {
  // normal, control, user-defined, unused, byte "<0xA>" (read like strtol), unknown
  const Tokenizer t = spm({"\xe2\x96\x81x\xe2\x96\x81", "<c>", "<u>", "<unused>", "<0xA>", "<unk>"}, {0, 0, 0, 0, 0, 0},
                          {1, 3, 4, 5, 6, 2});
  EXPECT_EQ(t.token_bytes(0), " x ");
  EXPECT_EQ(t.token_bytes(1), "<c>");
  EXPECT_EQ(t.token_bytes(2), "<u>");
  EXPECT_EQ(t.token_bytes(3), "");
  EXPECT_EQ(t.token_bytes(4), "\n");
  EXPECT_EQ(t.decode(Tokens{1, 0, 5}, /*render_special=*/false), " x ");
  EXPECT_EQ(t.decode(Tokens{1, 0, 5}, /*render_special=*/true), "<c> x <unk>");
}

TEST(TokenizerSpm, NanScoreIsAnError) {
  EXPECT_THROW(spm({"a", "b"}, {0, std::numeric_limits<float>::quiet_NaN()}), Error);
}

TEST(TokenizerSpm, SpmDefaultsAreLlamaCpps) {
  // No add_bos_token key: SPM adds BOS (id 1 by default); no add_space_prefix key: true.
  GgufBuilder b;
  b.set("tokenizer.ggml.model", GgufBuilder::str("llama"));
  b.set("tokenizer.ggml.tokens", GgufBuilder::strs({"<unk>", "<s>", "</s>", "x"}));
  MemGguf g(b);
  const Tokenizer t = Tokenizer::from_gguf(*g.file);
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 2);
  EXPECT_TRUE(t.add_bos());
  EXPECT_TRUE(t.add_space_prefix());
  EXPECT_EQ(t.encode("", true, false), (Tokens{1}));
  EXPECT_THROW(t.encode(" x", true, false), Error);  // "▁" has no token and no byte fallback
}

}  // namespace
}  // namespace qf
