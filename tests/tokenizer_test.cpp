// Tokenizer tests. The oracle is llama.cpp: tests/golden/tokenizer_smollm2.json holds its tokens
// for tricky strings, whole State of the Union addresses, chat prompts and the other supported
// pre-tokenizers on the SmolLM2 vocabulary (scripts/ref/tokenize_golden.py). Unit tests on small
// synthetic vocabularies pin BPE merging, special-token matching, streaming and errors.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "gguf/gguf.h"
#include "test_paths.h"
#include "tokenizer_helpers.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "util/error.h"

namespace qf {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Helpers

using namespace test;  // tokenizer_helpers.h

const json& golden() {
  static const json g = json::parse(read_file(test::golden("tokenizer_smollm2.json")));
  return g;
}

// The real model, opened once.
class SmolLM2 : public RealTokenizerTest<SmolLM2> {
 public:
  static std::string model_path() { return test::smollm2_path(); }
};

// ---------------------------------------------------------------------------------------------
// Against llama.cpp

TEST_F(SmolLM2, VocabularyFactsMatchLlamaCpp) {
  const json& v = golden()["vocab"];
  EXPECT_EQ(tok_->n_vocab(), v["n_vocab"].get<int>());
  EXPECT_EQ(tok_->bos(), v["bos"].get<int>());
  EXPECT_EQ(tok_->eos(), v["eos"].get<int>());
  EXPECT_EQ(tok_->add_bos(), v["add_bos"].get<bool>());
  EXPECT_EQ(tok_->add_eos(), v["add_eos"].get<bool>());
  EXPECT_EQ(tok_->eog_ids(), v["eog"].get<std::vector<int32_t>>());
  EXPECT_TRUE(tok_->is_eog(tok_->find("<|im_end|>").value()));
  EXPECT_FALSE(tok_->is_eog(tok_->find("<|im_start|>").value()));
  EXPECT_EQ(tok_->pre_tokenizer(), PreTokenizer::kDigitsGpt2);

  // Every token's bytes, fingerprinted as llama_token_to_piece(special = true) was.
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&](const void* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char*>(p)[i]) * 0x100000001b3ull;
  };
  for (int32_t id = 0; id < tok_->n_vocab(); ++id) {
    const std::string b = tok_->token_bytes(id);
    const uint32_t len = static_cast<uint32_t>(b.size());
    mix(&len, 4);
    mix(b.data(), b.size());
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  EXPECT_EQ(hex, v["pieces_fnv1a"].get<std::string>());
}

TEST_F(SmolLM2, GoldenCasesMatchLlamaCpp) {
  const json& cases = golden()["cases"];
  ASSERT_GE(cases.size(), 60u);
  for (const auto& c : cases) {
    const std::string text = base64_decode(c["text_b64"].get<std::string>());
    const Tokens want = c["tokens"].get<Tokens>();
    const Tokens got = tok_->encode(text, c["add_special"].get<bool>(), c["parse_special"].get<bool>());
    EXPECT_EQ(got, want) << "case '" << c["name"].get<std::string>() << "'\n  got  " << show(got) << "\n  want "
                         << show(want);
    EXPECT_EQ(tok_->decode(want), base64_decode(c["detok_b64"].get<std::string>()))
        << "decode, case '" << c["name"].get<std::string>() << "'";
  }
}

TEST_F(SmolLM2, DecodeRoundTripsValidText) {
  // Bytes with no token of their own are dropped by BPE (as in llama.cpp): SmolLM2 lacks
  // tokens for 0x04 0x06 0x13 0x14 0x16 0x1D and for lead bytes of planes 4+.
  const std::vector<std::string> lossy = {"control chars", "only control chars", "plane 4 codepoint"};
  int checked = 0;
  for (const auto& c : golden()["cases"]) {
    const std::string name = c["name"].get<std::string>();
    const std::string text = base64_decode(c["text_b64"].get<std::string>());
    if (!valid_utf8(text) || std::find(lossy.begin(), lossy.end(), name) != lossy.end()) continue;
    EXPECT_EQ(tok_->decode(tok_->encode(text, false, false)), text) << name;
    EXPECT_EQ(tok_->decode(tok_->encode(text, false, true)), text) << name;
    ++checked;
  }
  EXPECT_GT(checked, 60);
}

TEST_F(SmolLM2, WholeDocumentsMatchLlamaCpp) {
  for (const auto& d : golden()["documents"]) {
    const std::string path = test::source_dir() + "/data/sotu/" + d["file"].get<std::string>();
    const std::string text = read_file(path);
    if (text.empty()) GTEST_SKIP() << path << " missing: run scripts/fetch_text.sh";
    ASSERT_EQ(text.size(), d["bytes"].get<size_t>()) << path << " differs from the golden's copy";
    ASSERT_EQ(fnv1a(text.data(), text.size()), d["fnv1a"].get<std::string>()) << path;
    const Tokens got = tok_->encode(text, false, true);
    if (d.contains("tokens")) {
      const Tokens want = d["tokens"].get<Tokens>();
      ASSERT_EQ(got.size(), want.size()) << path;
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_EQ(got[i], want[i]) << path << ": first difference at token " << i;
      EXPECT_EQ(tok_->decode(got), text);
    } else {
      EXPECT_EQ(got.size(), d["n_tokens"].get<size_t>()) << path;
      EXPECT_EQ(fnv1a(got.data(), got.size() * sizeof(int32_t)), d["tokens_fnv1a"].get<std::string>()) << path;
    }
  }
}

// The whole corpus (~11 MB); opt in with QF_TOKENIZER_CORPUS=1.
TEST_F(SmolLM2, WholeCorpusMatchesLlamaCpp) {
  if (!std::getenv("QF_TOKENIZER_CORPUS")) GTEST_SKIP() << "set QF_TOKENIZER_CORPUS=1 to run";
  size_t n = 0;
  for (const auto& d : golden()["corpus"]) {
    const std::string path = test::source_dir() + "/data/sotu/" + d["file"].get<std::string>();
    const std::string text = read_file(path);
    if (text.size() != d["bytes"].get<size_t>() || fnv1a(text.data(), text.size()) != d["fnv1a"].get<std::string>())
      GTEST_SKIP() << path << " missing or different: run scripts/fetch_text.sh";
    const Tokens got = tok_->encode(text, false, true);
    EXPECT_EQ(got.size(), d["n_tokens"].get<size_t>()) << path;
    EXPECT_EQ(fnv1a(got.data(), got.size() * sizeof(int32_t)), d["tokens_fnv1a"].get<std::string>()) << path;
    n += got.size();
  }
  std::printf("corpus: %zu tokens\n", n);
}

TEST_F(SmolLM2, ChatPromptsMatchTheJinjaTemplate) {
  const ChatTemplate tmpl = ChatTemplate::from_gguf(*file_);
  EXPECT_EQ(tmpl.default_system(), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  for (const auto& c : golden()["chats"]) {
    std::vector<ChatMessage> msgs;
    for (const auto& m : c["messages"]) msgs.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    const std::string text = tmpl.apply(msgs, c["add_generation_prompt"].get<bool>());
    EXPECT_EQ(text, c["jinja"].get<std::string>());
    EXPECT_EQ(tok_->encode(text, false, true), c["jinja_tokens"].get<Tokens>());
    // llama.cpp's built-in ChatML agrees whenever the conversation brings its own system turn.
    if (msgs[0].role == "system") {
      EXPECT_EQ(text, c["llama_cpp_builtin"].get<std::string>());
    }
  }
}

TEST_F(SmolLM2, OtherPreTokenizersMatchLlamaCpp) {
  const std::map<std::string, PreTokenizer> kinds = {{"llama-bpe", PreTokenizer::kLlama3},
                                                     {"qwen2", PreTokenizer::kQwen2},
                                                     {"gpt-2", PreTokenizer::kGpt2},
                                                     {"default", PreTokenizer::kDefault}};
  ASSERT_EQ(golden()["pre_variants"].size(), kinds.size());
  for (const auto& [pre, variant] : golden()["pre_variants"].items()) {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.pre", GgufBuilder::str(pre));
    MemGguf g(b);
    const Tokenizer t = Tokenizer::from_gguf(*g.file);
    EXPECT_EQ(t.pre_tokenizer(), kinds.at(pre));
    EXPECT_EQ(t.eog_ids(), variant["vocab"]["eog"].get<std::vector<int32_t>>());
    for (const auto& c : variant["cases"]) {
      const std::string text = base64_decode(c["text_b64"].get<std::string>());
      const Tokens want = c["tokens"].get<Tokens>();
      const Tokens got = t.encode(text, c["add_special"].get<bool>(), c["parse_special"].get<bool>());
      EXPECT_EQ(got, want) << pre << ", case '" << c["name"].get<std::string>() << "'\n  got  " << show(got)
                           << "\n  want " << show(want);
    }
  }
}

TEST_F(SmolLM2, InputsLlamaCppThrowsOnAreTreatedAsInvalidBytes) {
  // llama.cpp throws "invalid codepoint" for 4-byte forms above U+10FFFF; we replace each of
  // their bytes with U+FFFD like any other invalid sequence.
  const std::string fffd = "\xEF\xBF\xBD";
  for (const auto& e : golden()["llama_cpp_errors"]) {
    const std::string text = base64_decode(e["text_b64"].get<std::string>());
    std::vector<uint32_t> cpts;
    unicode::decode_utf8(text, cpts);
    std::string replaced;
    for (uint32_t c : cpts) unicode::append_utf8(c, replaced);
    EXPECT_NE(replaced.find(fffd + fffd + fffd + fffd), std::string::npos) << e["name"];
    EXPECT_EQ(tok_->encode(text, false, true), tok_->encode(replaced, false, true)) << e["name"];
  }
}

// ---------------------------------------------------------------------------------------------
// Behaviour on the real vocabulary

TEST_F(SmolLM2, SpecialTokensAreParsedOnlyWhenAsked) {
  const int32_t im_start = tok_->find("<|im_start|>").value();
  const int32_t im_end = tok_->find("<|im_end|>").value();
  const Tokens parsed = tok_->encode("<|im_start|>user<|im_end|>", false, true);
  ASSERT_EQ(parsed.size(), 3u);
  EXPECT_EQ(parsed[0], im_start);
  EXPECT_EQ(parsed[2], im_end);
  const Tokens raw = tok_->encode("<|im_start|>user<|im_end|>", false, false);
  EXPECT_GT(raw.size(), 6u);
  EXPECT_EQ(std::count(raw.begin(), raw.end(), im_start), 0);
  EXPECT_EQ(tok_->decode(raw), "<|im_start|>user<|im_end|>");
  // Control tokens render as their text unless asked not to.
  EXPECT_EQ(tok_->decode(parsed), "<|im_start|>user<|im_end|>");
  EXPECT_EQ(tok_->decode(parsed, /*render_special=*/false), "user");
}

TEST_F(SmolLM2, DigitsAreSplitOneByOne) {
  const Tokens t = tok_->encode("2024", false, false);
  ASSERT_EQ(t.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(tok_->token_bytes(t[i]), std::string(1, "2024"[i]));
}

TEST_F(SmolLM2, StreamDecoderHoldsBackSplitCharacters) {
  const std::string text = "Pizza 🍕 costs €5 — ça va? 中文";
  const Tokens toks = tok_->encode(text, false, false);
  // The emoji alone takes several tokens, each a fragment of its 4 bytes.
  size_t partial = 0;
  for (int32_t t : toks)
    if (!valid_utf8(tok_->token_bytes(t))) ++partial;
  ASSERT_GT(partial, 0u) << "test needs tokens that split a character";

  StreamDecoder dec(*tok_);
  std::string out;
  size_t held = 0;
  for (int32_t t : toks) {
    const std::string piece = dec.push(t);
    EXPECT_TRUE(valid_utf8(piece)) << "token " << t;
    if (piece.empty()) ++held;
    out += piece;
  }
  EXPECT_GT(held, 0u);
  out += dec.flush();
  EXPECT_EQ(out, text);
  EXPECT_EQ(dec.flush(), "");
}

TEST_F(SmolLM2, StreamDecoderFlushesIncompleteTail) {
  // "🍕" without its last token: the held-back bytes come out on flush, unchanged.
  Tokens toks = tok_->encode("a🍕", false, false);
  ASSERT_GE(toks.size(), 2u);
  toks.pop_back();
  StreamDecoder dec(*tok_);
  std::string out;
  for (int32_t t : toks) out += dec.push(t);
  EXPECT_EQ(out, "a");
  const std::string tail = dec.flush();
  EXPECT_FALSE(tail.empty());
  EXPECT_EQ("a" + tail, tok_->decode(toks));
}

TEST_F(SmolLM2, StreamDecoderPassesInvalidBytesThrough) {
  // A lone continuation byte can never be completed: it is not held back.
  const Tokens t = tok_->encode("x\x80", false, false);
  StreamDecoder dec(*tok_);
  std::string out;
  for (int32_t id : t) out += dec.push(id);
  out += dec.flush();
  EXPECT_EQ(out, tok_->decode(t));
}

TEST_F(SmolLM2, RandomBytesNeverCrash) {
  std::mt19937 rng(1234);
  const std::string alphabet = "ab '\n\t1<|im_end|>\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x8D\x95";
  for (int iter = 0; iter < 3000; ++iter) {
    std::string s(rng() % 48, '\0');
    for (char& c : s) c = (rng() % 2) ? static_cast<char>(rng() & 0xFF) : alphabet[rng() % alphabet.size()];
    const Tokens t = tok_->encode(s, iter % 2 == 0, iter % 3 == 0);
    for (int32_t id : t) ASSERT_TRUE(id >= 0 && id < tok_->n_vocab());
    (void)tok_->decode(t);
  }
}

TEST_F(SmolLM2, EncodesFortyThousandTokensQuickly) {
  const json* doc = nullptr;
  for (const auto& d : golden()["documents"])
    if (d.contains("n_tokens")) doc = &d;
  ASSERT_NE(doc, nullptr);
  const std::string text = read_file(test::source_dir() + "/data/sotu/" + (*doc)["file"].get<std::string>());
  if (text.empty()) GTEST_SKIP() << "data/sotu missing: run scripts/fetch_text.sh";
  const auto t0 = std::chrono::steady_clock::now();
  const Tokens toks = tok_->encode(text, false, true);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("encoded %zu bytes -> %zu tokens in %.3f s (%.1f MB/s)\n", text.size(), toks.size(), s,
              text.size() / s / 1e6);
  EXPECT_GT(toks.size(), 30000u);
  // Generous bound (shared CI cores, sanitizer builds); a release build takes a few 10 ms.
  EXPECT_LT(s, 5.0);
}

TEST_F(SmolLM2, TokenIdsOutOfRangeThrow) {
  EXPECT_THROW(tok_->token_bytes(-1), Error);
  EXPECT_THROW(tok_->token_bytes(tok_->n_vocab()), Error);
  const Tokens bad = {1, 49152};
  EXPECT_THROW(tok_->decode(bad), Error);
  StreamDecoder dec(*tok_);
  EXPECT_THROW(dec.push(-5), Error);
  EXPECT_FALSE(tok_->is_eog(-1));
  EXPECT_FALSE(tok_->find("no such token").has_value());
  EXPECT_EQ(tok_->piece(tok_->find("Ġthe").value()), "Ġthe");
}

// ---------------------------------------------------------------------------------------------
// Bad metadata

TEST_F(SmolLM2, BadMetadataIsAnError) {
  auto expect_error = [](const GgufBuilder& b, const std::string& needle) {
    MemGguf g(b);
    try {
      (void)Tokenizer::from_gguf(*g.file);
      ADD_FAILURE() << "no error, expected one mentioning '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.pre", GgufBuilder::str("klingon"));
    expect_error(b, "unsupported pre-tokenizer tokenizer.ggml.pre = 'klingon'");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.pre", GgufBuilder::str("gpt2"));  // llama.cpp spells it "gpt-2"
    expect_error(b, "unsupported pre-tokenizer");
  }
  {
    GgufBuilder b = metadata();
    b.erase("tokenizer.ggml.merges");
    expect_error(b, "tokenizer.ggml.merges is missing");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.merges", GgufBuilder::i32s({1, 2, 3}));
    expect_error(b, "tokenizer.ggml.merges");
  }
  {
    GgufBuilder b = metadata();
    b.erase("tokenizer.ggml.tokens");
    expect_error(b, "tokenizer.ggml.tokens is missing");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.model", GgufBuilder::str("bert"));
    expect_error(b, "tokenizer.ggml.model is 'bert'; supported: 'gpt2'");
  }
  {
    GgufBuilder b = metadata();
    b.erase("tokenizer.ggml.model");
    expect_error(b, "tokenizer.ggml.model is missing");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.token_type", GgufBuilder::i32s({1, 1, 1}));
    expect_error(b, "token_type has 3 entries for 49152 tokens");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.tokens", GgufBuilder::strs({"a", "b", "a"}));
    b.set("tokenizer.ggml.token_type", GgufBuilder::i32s({1, 1, 1}));
    expect_error(b, "duplicate token 'a'");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.tokens", GgufBuilder::strs({}));
    expect_error(b, "tokens is empty");
  }
  {
    GgufBuilder b = metadata();
    b.set("tokenizer.ggml.pre", gguf::Value{gguf::ValueType::U32, uint64_t{7}});
    expect_error(b, "tokenizer.ggml.pre");
  }
}

TEST_F(SmolLM2, MissingPreTokenizerMeansDefault) {
  // llama.cpp falls back to its "default" split (with a warning) when the key is absent.
  GgufBuilder b = metadata();
  b.erase("tokenizer.ggml.pre");
  MemGguf g(b);
  EXPECT_EQ(Tokenizer::from_gguf(*g.file).pre_tokenizer(), PreTokenizer::kDefault);
}

TEST_F(SmolLM2, Llama3AddsBosUnlessMetadataSaysNot) {
  GgufBuilder b = metadata();
  b.set("tokenizer.ggml.pre", GgufBuilder::str("llama-bpe"));
  b.erase("tokenizer.ggml.add_bos_token");
  {
    MemGguf g(b);
    const Tokenizer t = Tokenizer::from_gguf(*g.file);
    EXPECT_TRUE(t.add_bos());
    const Tokens toks = t.encode("Hi", true, false);
    ASSERT_FALSE(toks.empty());
    EXPECT_EQ(toks[0], t.bos());
    EXPECT_EQ(t.encode("Hi", false, false).size(), toks.size() - 1);
  }
  b.set("tokenizer.ggml.add_bos_token", GgufBuilder::boolean(false));
  b.set("tokenizer.ggml.add_eos_token", GgufBuilder::boolean(true));
  {
    MemGguf g(b);
    const Tokenizer t = Tokenizer::from_gguf(*g.file);
    const Tokens toks = t.encode("Hi", true, false);
    EXPECT_NE(toks.front(), t.bos());
    EXPECT_EQ(toks.back(), t.eos());
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic vocabularies: BPE merging and special-token matching by hand

// A vocabulary with the given tokens (GPT-2 alphabet; "Ġ" is a space), types and merges.
Tokenizer synthetic(const std::vector<std::string>& tokens, const std::vector<std::string>& merges,
                    const std::vector<int32_t>& types = {}, const std::string& pre = "gpt-2") {
  GgufBuilder b;
  b.set("tokenizer.ggml.model", GgufBuilder::str("gpt2"));
  b.set("tokenizer.ggml.pre", GgufBuilder::str(pre));
  b.set("tokenizer.ggml.tokens", GgufBuilder::strs(tokens));
  b.set("tokenizer.ggml.merges", GgufBuilder::strs(merges));
  if (!types.empty()) b.set("tokenizer.ggml.token_type", GgufBuilder::i32s(types));
  MemGguf g(b);
  return Tokenizer::from_gguf(*g.file);
}

TEST(TokenizerBpe, MergesApplyInRankOrder) {
  const std::vector<std::string> vocab = {"a", "b", "c", "ab", "bc", "abc"};
  // "b c" first, then "a bc".
  const Tokenizer t1 = synthetic(vocab, {"b c", "a b", "a bc"});
  EXPECT_EQ(t1.encode("abc", false, false), (Tokens{5}));
  EXPECT_EQ(t1.encode("ab", false, false), (Tokens{3}));
  // "a b" first; "ab c" is not a merge, so "ab" + "c" stays.
  const Tokenizer t2 = synthetic(vocab, {"a b", "b c", "a bc"});
  EXPECT_EQ(t2.encode("abc", false, false), (Tokens{3, 2}));
  // No merges at all: one token per byte.
  const Tokenizer t3 = synthetic(vocab, {});
  EXPECT_EQ(t3.encode("cab", false, false), (Tokens{2, 0, 1}));
}

TEST(TokenizerBpe, EqualRanksMergeLeftmostFirst) {
  const Tokenizer t = synthetic({"a", "aa", "aaa"}, {"a a", "aa a"});
  EXPECT_EQ(t.encode("aaa", false, false), (Tokens{2}));     // (a a) a -> aa a -> aaa
  EXPECT_EQ(t.encode("aaaa", false, false), (Tokens{1, 1}));  // (a a)(a a); "aa aa" is no merge
  EXPECT_EQ(t.encode("aaaaa", false, false), (Tokens{1, 2}));  // aa aa a -> aa aaa
}

TEST(TokenizerBpe, MergeResultsNeedNotBeTokens) {
  // "x y" makes "xy", which is no token; "xy z" makes "xyz", which is. A leftover non-token
  // symbol falls back to its single-byte tokens (only ASCII bytes have those).
  const Tokenizer t = synthetic({"x", "y", "z", "xyz"}, {"x y", "xy z"});
  EXPECT_EQ(t.encode("xyz", false, false), (Tokens{3}));
  EXPECT_EQ(t.encode("xy", false, false), (Tokens{0, 1}));
}

TEST(TokenizerBpe, BytesWithoutTokensAreDropped) {
  // No token for "é" (bytes C3 A9 -> "Ã©"): llama.cpp emits nothing for it.
  const Tokenizer t = synthetic({"a", "Ġ"}, {});
  EXPECT_EQ(t.encode("a\xC3\xA9 a", false, false), (Tokens{0, 1, 0}));
}

TEST(TokenizerBpe, SpacesUseTheByteAlphabet) {
  const Tokenizer t = synthetic({"h", "i", "Ġ", "Ġh", "Ġhi", "Ċ"}, {"Ġ h", "Ġh i"});
  EXPECT_EQ(t.encode(" hi\n", false, false), (Tokens{4, 5}));
  EXPECT_EQ(t.decode(Tokens{4, 5}), " hi\n");
  EXPECT_EQ(t.token_bytes(2), " ");
}

TEST(TokenizerSpecial, LongestSpecialTokenWins) {
  // types: 1 normal, 3 control, 4 user-defined
  const std::vector<std::string> vocab = {"<", "a", ">", "b", "<a>", "<a>b", "<x>"};
  const Tokenizer t = synthetic(vocab, {}, {1, 1, 1, 1, 3, 3, 4});
  EXPECT_EQ(t.encode("<a>b<a>", false, true), (Tokens{5, 4}));
  EXPECT_EQ(t.encode("b<a>bb", false, true), (Tokens{3, 5, 3}));
  // Not parsing: control tokens are plain text, user-defined ones still match.
  EXPECT_EQ(t.encode("<a>", false, false), (Tokens{0, 1, 2}));
  EXPECT_EQ(t.encode("<x><a>", false, false), (Tokens{6, 0, 1, 2}));
}

TEST(TokenizerSpecial, EndOfTurnTextsBecomeControlAndEog) {
  // "<|im_end|>" typed as a normal token is made a control token and an end of generation, as
  // llama.cpp does; EOS defaults to llama.cpp's BPE default id 11 only when it exists.
  const Tokenizer t = synthetic({"a", "<|im_end|>", "b"}, {});
  EXPECT_EQ(t.token_type(1), TokenType::kControl);
  EXPECT_TRUE(t.is_eog(1));
  EXPECT_FALSE(t.is_eog(0));
  EXPECT_EQ(t.eos(), -1);
  EXPECT_EQ(t.bos(), -1);
  EXPECT_EQ(t.encode("a<|im_end|>b", false, true), (Tokens{0, 1, 2}));
}

TEST(TokenizerSpecial, EmptyTokensGetPlaceholderText) {
  const Tokenizer t = synthetic({"a", "", "b"}, {});
  EXPECT_EQ(t.piece(1), "[EMPTY_1]");
}

// ---------------------------------------------------------------------------------------------
// Unicode tables and pre-tokenizers directly

TEST(Unicode, CategoriesAndWhitespace) {
  using namespace unicode;
  EXPECT_STREQ(kUnicodeVersion, "15.1.0");
  EXPECT_EQ(category('a'), kLetter);
  EXPECT_EQ(category(0x4E2D), kLetter);     // 中
  EXPECT_EQ(category(0x2EBF0), kLetter);    // CJK Ext I, new in 15.1
  EXPECT_EQ(category(0x0663), kNumber);     // Arabic-Indic 3
  EXPECT_EQ(category(0x2167), kNumber);     // Roman numeral VIII (Nl)
  EXPECT_EQ(category(0x0301), kMark);
  EXPECT_EQ(category(0x2019), kPunct);
  EXPECT_EQ(category('$'), kSymbol);
  EXPECT_EQ(category(0x1F355), kSymbol);    // 🍕
  EXPECT_EQ(category(0xE000), kControl);    // private use (Co)
  EXPECT_EQ(category(0x0378), kUnassigned);
  EXPECT_EQ(category(0x110000), kUnassigned);
  for (uint32_t c : {0x09u, 0x0Au, 0x0Du, 0x20u, 0x85u, 0xA0u, 0x2003u, 0x3000u}) EXPECT_TRUE(is_whitespace(c)) << c;
  for (uint32_t c : {0x1Cu, 0x200Bu, 0xFEFFu, uint32_t{'x'}}) EXPECT_FALSE(is_whitespace(c)) << c;
}

TEST(Unicode, DecodesLikeLlamaCpp) {
  std::vector<uint32_t> c;
  unicode::decode_utf8("a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x8D\x95", c);
  EXPECT_EQ(c, (std::vector<uint32_t>{'a', 0xE9, 0x4E2D, 0x1F355}));
  unicode::decode_utf8("\x80\xC3", c);  // stray continuation, truncated sequence
  EXPECT_EQ(c, (std::vector<uint32_t>{0xFFFD, 0xFFFD}));
  unicode::decode_utf8("\xC1\x81\xED\xA0\x80", c);  // overlong 'A', surrogate: decoded, not rejected
  EXPECT_EQ(c, (std::vector<uint32_t>{'A', 0xD800}));
  unicode::decode_utf8("\xF4\x90\x80\x80", c);  // above U+10FFFF
  EXPECT_EQ(c, (std::vector<uint32_t>(4, 0xFFFD)));
}

std::vector<std::string> words(PreTokenizer kind, const std::string& text) {
  std::vector<uint32_t> cpts, lens;
  unicode::decode_utf8(text, cpts);
  pre_tokenize(kind, cpts, lens);
  std::vector<std::string> out;
  size_t pos = 0;
  for (uint32_t len : lens) {
    std::string w;
    for (size_t i = pos; i < pos + len; ++i) unicode::append_utf8(cpts[i], w);
    out.push_back(w);
    pos += len;
  }
  return out;
}

using W = std::vector<std::string>;

TEST(PreTokenizer, Gpt2) {
  EXPECT_EQ(words(PreTokenizer::kGpt2, "Hello world's 123 abc!!  x   "),
            (W{"Hello", " world", "'s", " 123", " abc", "!!", " ", " x", "   "}));
  EXPECT_EQ(words(PreTokenizer::kGpt2, "I'M\tok"), (W{"I", "'", "M", "\t", "ok"}));
}

TEST(PreTokenizer, SmolLMIsolatesDigits) {
  EXPECT_EQ(words(PreTokenizer::kDigitsGpt2, "in 2024, x1"), (W{"in", " ", "2", "0", "2", "4", ",", " x", "1"}));
  // A space run before a digit ends at the digit's segment boundary, so it stays whole.
  EXPECT_EQ(words(PreTokenizer::kDigitsGpt2, "a  1"), (W{"a", "  ", "1"}));
}

TEST(PreTokenizer, Llama3) {
  EXPECT_EQ(words(PreTokenizer::kLlama3, "I'M 12345 ok.\n\n  hi"),
            (W{"I", "'M", " ", "123", "45", " ok", ".\n\n", " ", " hi"}));
  EXPECT_EQ(words(PreTokenizer::kLlama3, "x \r\n y"), (W{"x", " \r\n", " y"}));
}

TEST(PreTokenizer, Qwen2) {
  EXPECT_EQ(words(PreTokenizer::kQwen2, "abc123"), (W{"abc", "1", "2", "3"}));
}

TEST(PreTokenizer, Default) {
  EXPECT_EQ(words(PreTokenizer::kDefault, "a+b=12345"), (W{"a", "+", "b", "=", "123", "45"}));
}

// ---------------------------------------------------------------------------------------------
// Chat templates

TEST_F(SmolLM2, ChatTemplateExactText) {
  const std::vector<ChatMessage> no_system = {{"user", "Hello!"}, {"assistant", "Hi, how can I help?"}};
  EXPECT_EQ(apply_chat_template(*file_, no_system, false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\nHi, how can I help?<|im_end|>\n");
  const std::vector<ChatMessage> with_system = {{"system", "Be brief."}, {"user", "Hello!"}};
  EXPECT_EQ(apply_chat_template(*tok_, with_system, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(apply_chat_template(*tok_, std::span<const ChatMessage>{}, true), "<|im_start|>assistant\n");
}

TEST(ChatTemplate, PlainChatMLHasNoDefaultSystem) {
  const ChatTemplate t = ChatTemplate::from_source(
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
      "'<|im_end|>' + '\\n'}}{% endfor %}");
  EXPECT_EQ(t.default_system(), "");
  const std::vector<ChatMessage> m = {{"user", "x"}};
  EXPECT_EQ(t.apply(m, false), "<|im_start|>user\nx<|im_end|>\n");
  EXPECT_EQ(ChatTemplate::from_source("chatml").apply(m, true), "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, EscapedDefaultSystemIsUnescaped) {
  const ChatTemplate t = ChatTemplate::from_source(
      "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou\\'re Qwen.<|im_end|>\\n' }}{% endif %}"
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% endfor %}");
  EXPECT_EQ(t.default_system(), "You're Qwen.");
}

TEST(ChatTemplate, UnknownTemplatesAreErrors) {
  EXPECT_THROW(ChatTemplate::from_source(""), Error);
  EXPECT_THROW(ChatTemplate::from_source("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                                         "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"),
               Error);
  EXPECT_THROW(ChatTemplate::from_source("{% for m in messages %}<|im_start|>{{m.role}}<|im_sep|>{% endfor %}"), Error);
  try {
    ChatTemplate::from_source("[INST] {{ messages[0]['content'] }} [/INST]");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unsupported chat template"), std::string::npos) << e.what();
  }
}

TEST_F(SmolLM2, ModelWithoutTemplateIsAnError) {
  GgufBuilder b = metadata();
  b.erase("tokenizer.chat_template");
  MemGguf g(b);
  EXPECT_THROW(ChatTemplate::from_gguf(*g.file), Error);
  EXPECT_EQ(Tokenizer::from_gguf(*g.file).chat_template(), "");
}

}  // namespace
}  // namespace qf
