// SmolLM2-135M-Instruct (Q4_1) against llama.cpp, through goldens made by scripts/ref/make_goldens.sh
// (llama.cpp itself is not needed to run this test).
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/model.h"
#include "model/session.h"
#include "golden_compare.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

namespace {

using nlohmann::json;

json load_golden(const std::string& name) {
  std::ifstream in(qf::test::golden(name));
  return json::parse(in);
}

TEST(SmolLM2, TeacherForcedMatchesLlamaCpp) {
  const json g = load_golden("smollm2_teacher_forced.json");
  const auto tokens = g["tokens"].get<std::vector<int32_t>>();
  const auto ref_argmax = g["argmax"].get<std::vector<int32_t>>();
  const auto ref_top5 = g["top5_logits"].get<std::vector<std::vector<double>>>();
  ASSERT_GE(tokens.size(), 2000u);
  auto m = qf::Model::load(qf::test::smollm2_path());
  const int V = m->config().n_vocab;
  qf::SessionOptions so;
  so.n_ctx = 4096;
  so.n_batch = 512;
  qf::Session s(*m, std::move(so));
  const auto logits = s.eval(tokens, /*all_logits=*/true);

  const size_t n = tokens.size();
  qf::test::GoldenTally t;
  for (size_t i = 0; i < n; ++i)
    t.add(logits.data() + i * V, V, ref_argmax[i], ref_top5[i][0] - ref_top5[i][1], i + 1 < n ? tokens[i + 1] : -1);
  const double ref_ppl = g["perplexity"].get<double>();
  const double self = g["llama_cpp_self_agreement"]["decode_path_batch1"]["argmax_agreement"].get<double>();
  std::printf("teacher-forced over %zu tokens: argmax agreement %.2f%% (llama.cpp vs itself at batch 1: %.2f%%), "
              "on the %zu positions with a top-2 gap >= 0.5: %.2f%%; perplexity %.4f vs llama.cpp %.4f (%+.3f%%)\n",
              n, 100.0 * t.agreement(), 100.0 * self, t.stable, 100.0 * t.stable_agreement(), t.perplexity(), ref_ppl,
              100.0 * (t.perplexity() / ref_ppl - 1));
  EXPECT_NEAR(t.perplexity() / ref_ppl, 1.0, 0.01);
  EXPECT_GE(t.stable_agreement(), 0.99);
  EXPECT_GE(t.agreement(), self - 0.01) << "less agreement than llama.cpp has with itself";
}

TEST(SmolLM2, GreedyGenerationMatchesLlamaCpp) {
  const json g = load_golden("smollm2_generate.json");
  auto m = qf::Model::load(qf::test::smollm2_path());
  const qf::Tokenizer tok = qf::Tokenizer::from_gguf(m->file());
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
                c["name"].get<std::string>().c_str(), same, ref.size(), stable, tok.decode(ref).c_str(),
                tok.decode(got).c_str());
    EXPECT_GE(same, static_cast<size_t>(stable)) << "diverged before llama.cpp's first near tie";
  }
}

}  // namespace
