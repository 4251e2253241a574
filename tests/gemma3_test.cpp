// Gemma 3 270M against llama.cpp, through goldens made by scripts/ref/make_goldens.py (llama.cpp
// itself is not needed to run this test). Each model file is checked against goldens llama.cpp
// made from that same file:
//   models/gemma-3-270m-deq.gguf     tests/golden/gemma3_*.json          (--set gemma3)
//   models/gemma-3-270m-q4_k_m.gguf  tests/golden/gemma3_q4_k_m_*.json   (--set gemma3_q4_k_m)
// The deq file is the Q4_K_M file with its K-quant and Q5_0 tensors expanded to F32 by
// scripts/dequantize_gguf.py (scripts/test.sh makes it); the Q4_K_M file runs qf's K-quant kernels.
// A missing file or golden skips its tests. Token ids come from the goldens (llama.cpp's
// tokenization), so these tests check the forward pass alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/model.h"
#include "model/session.h"
#include "golden_compare.h"
#include "test_paths.h"

namespace {

using nlohmann::json;

// One model file and the prefix of the goldens made from it.
struct Gemma3File {
  const char* name;
  const char* model;   // under the source directory
  const char* golden;  // tests/golden/<golden>_{teacher_forced,generate,long}.json
};

constexpr Gemma3File kFiles[] = {
    {"deq", "models/gemma-3-270m-deq.gguf", "gemma3"},
    {"q4_k_m", "models/gemma-3-270m-q4_k_m.gguf", "gemma3_q4_k_m"},
};

// SentencePiece pieces joined, "▁" as a space: enough to read a generation side by side.
std::string pieces(const std::vector<std::string>& vocab, const std::vector<int32_t>& ids) {
  std::string joined, out;
  for (int32_t id : ids) joined += vocab.at(id);
  for (size_t i = 0; i < joined.size();) {
    if (joined.compare(i, 3, "\xe2\x96\x81") == 0) out += ' ', i += 3;
    else out += joined[i++];
  }
  return out;
}

class Gemma3 : public ::testing::TestWithParam<Gemma3File> {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(model_path()))
      GTEST_SKIP() << model_path() << " is missing: scripts/fetch_model.sh gemma3 && scripts/dequantize_gguf.py "
                   << "models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m-deq.gguf";
  }
  std::string model_path() const { return qf::test::source_dir() + "/" + GetParam().model; }
  std::string golden_path(const std::string& kind) const {
    return qf::test::source_dir() + "/tests/golden/" + GetParam().golden + "_" + kind + ".json";
  }
  // The golden, or an empty object when it has not been made yet (the caller skips).
  json golden(const std::string& kind) const {
    std::ifstream in(golden_path(kind));
    return in ? json::parse(in) : json::object();
  }
};

#define LOAD_GOLDEN_OR_SKIP(var, kind)                                                                   \
  const json var = golden(kind);                                                                        \
  if (var.empty())                                                                                      \
    GTEST_SKIP() << "no " << golden_path(kind) << ": scripts/ref/make_goldens.py --set " << GetParam().golden \
                 << " --model " << GetParam().model;

TEST_P(Gemma3, TeacherForcedMatchesLlamaCpp) {
  LOAD_GOLDEN_OR_SKIP(g, "teacher_forced");
  const auto tokens = g["tokens"].get<std::vector<int32_t>>();
  const auto ref_argmax = g["argmax"].get<std::vector<int32_t>>();
  const auto ref_top5 = g["top5_logits"].get<std::vector<std::vector<double>>>();
  ASSERT_GE(tokens.size(), 2000u);
  auto m = qf::Model::load(model_path());
  ASSERT_EQ(m->config().n_local_layers(), 15);
  const int V = m->config().n_vocab;
  qf::SessionOptions so;
  so.n_ctx = 4096;
  so.n_batch = 512;
  qf::Session s(*m, std::move(so));

  // Chunks of a batch, so that only one batch of [n][262144] logits is held at a time.
  const size_t n = tokens.size();
  qf::test::GoldenTally t;
  for (size_t i0 = 0; i0 < n; i0 += 512) {
    const size_t m_tok = std::min<size_t>(512, n - i0);
    const auto logits = s.eval(std::span<const int32_t>(tokens.data() + i0, m_tok), /*all_logits=*/true);
    for (size_t k = 0, i = i0; k < m_tok; ++k, ++i)
      t.add(logits.data() + k * V, V, ref_argmax[i], ref_top5[i][0] - ref_top5[i][1], i + 1 < n ? tokens[i + 1] : -1);
  }
  const double ref_ppl = g["perplexity"].get<double>();
  const json& self_json = g["llama_cpp_self_agreement"];
  const double self = self_json["decode_path_batch1"]["argmax_agreement"].get<double>();
  const size_t self_n = self_json.value("decode_path_positions", n);  // a --quick golden measured a prefix
  std::printf("[%s] teacher-forced over %zu tokens: argmax agreement %.2f%% (llama.cpp vs itself at batch 1: %.2f%% over %zu positions), "
              "on the %zu positions with a top-2 gap >= 0.5: %.2f%%; perplexity %.4f vs llama.cpp %.4f (%+.3f%%)\n",
              GetParam().name, n, 100.0 * t.agreement(), 100.0 * self, self_n, t.stable, 100.0 * t.stable_agreement(),
              t.perplexity(), ref_ppl, 100.0 * (t.perplexity() / ref_ppl - 1));
  EXPECT_NEAR(t.perplexity() / ref_ppl, 1.0, 0.01);
  EXPECT_GE(t.stable_agreement(), 0.99);
  // Slack 1.5 points: the raw agreement is float-rounding noise at this model's many near-ties.
  // qf's own engines, which compute the same integer block products and differ only in the order
  // of float additions, measured 93.6-94.4% on q4_k_m (AVX2 94.38, AVX-512 94.14, VNNI 94.19, AMX
  // 93.62 with a sequential block sum and 93.71 with pairs; perplexity -0.10% to +0.23%), and
  // llama.cpp agrees with itself at batch 1 on 94.95%. The gap >= 0.5 positions above are the
  // sharp check.
  EXPECT_GE(t.agreement(), self - 0.015) << "less agreement than llama.cpp has with itself";
}

// 20,000 tokens, scored over the second half (positions 10,000 on): sliding windows and global
// rotary phases far past the window. Chunks before the scored half compute only their last
// token's logits. Opt-in (QF_GEMMA3_LONG=1): minutes per file on 2 cores, too long for the suite.
TEST_P(Gemma3, LongContextSecondHalfMatchesLlamaCpp) {
  if (!std::getenv("QF_GEMMA3_LONG")) GTEST_SKIP() << "20,000 tokens take minutes: QF_GEMMA3_LONG=1 runs it";
  LOAD_GOLDEN_OR_SKIP(g, "long");
  const auto tokens = g["tokens"].get<std::vector<int32_t>>();
  const auto ref_argmax = g["argmax"].get<std::vector<int32_t>>();
  const auto ref_top2 = g["top2_logits"].get<std::vector<std::vector<double>>>();
  const size_t from = g["score_from"].get<size_t>();
  ASSERT_EQ(ref_argmax.size(), tokens.size() - from);
  auto m = qf::Model::load(model_path());
  const int V = m->config().n_vocab;
  qf::SessionOptions so;
  so.n_ctx = static_cast<int>(tokens.size());
  so.n_batch = 512;
  qf::Session s(*m, std::move(so));

  const size_t n = tokens.size();
  qf::test::GoldenTally t;
  for (size_t i0 = 0; i0 < n; i0 += 512) {
    const size_t m_tok = std::min<size_t>(512, n - i0);
    const bool scored = i0 + m_tok > from;
    const auto logits = s.eval(std::span<const int32_t>(tokens.data() + i0, m_tok), /*all_logits=*/scored);
    if (!scored) continue;
    for (size_t k = 0, i = i0; k < m_tok; ++k, ++i) {
      if (i < from) continue;
      const auto& top2 = ref_top2[i - from];
      t.add(logits.data() + k * V, V, ref_argmax[i - from], top2[0] - top2[1], i + 1 < n ? tokens[i + 1] : -1);
    }
  }
  const double ref_ppl = g["perplexity"].get<double>();
  std::printf("[%s] positions %zu..%zu of a %zu-token prompt: argmax agreement %.2f%%, on the %zu positions with a top-2 "
              "gap >= 0.5: %.2f%%; perplexity %.4f vs llama.cpp %.4f (%+.3f%%)\n",
              GetParam().name, from, n - 1, n, 100.0 * t.agreement(), t.stable, 100.0 * t.stable_agreement(),
              t.perplexity(), ref_ppl, 100.0 * (t.perplexity() / ref_ppl - 1));
  EXPECT_NEAR(t.perplexity() / ref_ppl, 1.0, 0.01);
  EXPECT_GE(t.stable_agreement(), 0.99);
}

TEST_P(Gemma3, GreedyGenerationMatchesLlamaCpp) {
  LOAD_GOLDEN_OR_SKIP(g, "generate");
  auto m = qf::Model::load(model_path());
  const std::vector<std::string> vocab = m->file().get_str_array("tokenizer.ggml.tokens");
  for (const json& c : g["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const auto prompt = c["prompt_tokens"].get<std::vector<int32_t>>();
    const auto ref = c["tokens"].get<std::vector<int32_t>>();
    const int stable = c["stable_prefix"].get<int>();
    qf::SessionOptions so;
    so.n_ctx = 512;
    qf::Session s(*m, std::move(so));
    const auto got = qf::test::greedy_continuation(s, prompt, ref.size(), m->config().n_vocab);
    const size_t same = qf::test::common_prefix(got, ref);
    std::printf("[%s] identical for %zu of %zu greedy tokens (llama.cpp's stable prefix: %d)\n"
                "  llama.cpp: %s\n  qf       : %s\n",
                c["name"].get<std::string>().c_str(), same, ref.size(), stable, pieces(vocab, ref).c_str(),
                pieces(vocab, got).c_str());
    EXPECT_GE(same, static_cast<size_t>(stable)) << "diverged before llama.cpp's first near tie";
  }
}

INSTANTIATE_TEST_SUITE_P(Files, Gemma3, ::testing::ValuesIn(kFiles),
                         [](const ::testing::TestParamInfo<Gemma3File>& info) { return std::string(info.param.name); });

}  // namespace
