// qf eval on the real model: the --quick runs finish, write their files, and make sense (the full
// cache is at least as good as every policy on perplexity; the uncompressed needle row finds the
// needle), a second run resumes instead of recomputing, and bad input fails cleanly.
// Needs models/SmolLM2-135M-Instruct.Q4_1.gguf and data/sotu (scripts/fetch_model.sh, fetch_text.sh).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "calib/filter_file.h"
#include "calib/filters.h"
#include "eval/corpus.h"
#include "eval/niah.h"
#include "kv/policy.h"
#include "model/model.h"
#include "model/session.h"
#include "cli_helpers.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

using qf::test::CliResult;
using qf::test::expect_clean_failure;
using qf::test::run_qf;

json read_json(const fs::path& p) {
  std::ifstream in(p);
  return json::parse(in);
}

std::string sotu_dir() {
  const std::string d = qf::test::source_dir() + "/data/sotu";
  if (!fs::exists(d)) throw std::runtime_error(d + " is missing: run scripts/fetch_text.sh");
  return d;
}

class CliEval : public ::testing::Test {
 protected:
  // Filters for the qfilters policy, calibrated here (so this test does not depend on `qf
  // calibrate`) on addresses before 1950: held out from the post-2000 evaluation text.
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("qf_cli_eval_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    auto model = qf::Model::load(qf::test::smollm2_path());
    const qf::ModelConfig& c = model->config();
    const qf::Tokenizer tok = qf::Tokenizer::from_gguf(model->file());
    const auto docs = qf::eval::load_documents({sotu_dir()}, 0, 1949);
    qf::SessionOptions so;
    so.n_ctx = 512;
    so.n_threads = 2;
    qf::Session s(*model, std::move(so));
    std::vector<std::vector<float>> q(c.n_layers);
    s.set_qk_hook([&](int l, const float* qs, const float*, const int32_t*, int n) {
      q[l].insert(q[l].end(), qs, qs + size_t(n) * c.n_heads * c.head_dim);
    });
    for (size_t i = 0; i < 2 && i < docs.size(); ++i) {
      auto ids = tok.encode(docs[i].text, true, false);
      ids.resize(std::min<size_t>(ids.size(), 512));
      s.reset();
      s.eval(ids);
    }
    qf::calib::Calibrator cal(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
    for (int l = 0; l < c.n_layers; ++l)
      cal.add_layer(l, q[l].data(), static_cast<int>(q[l].size() / (size_t(c.n_heads) * c.head_dim)));
    qf::calib::CalibrationInfo info;
    info.model_name = "SmolLM2-135M-Instruct.Q4_1";
    info.architecture = c.arch;
    info.fingerprint = c.fingerprint();
    info.corpus = "data/sotu (before 1950, 2 x 512 tokens)";
    qf::calib::set_calibration_metadata(cal.filters(), info);
    filters_ = (dir_ / "filters.safetensors").string();
    qf::calib::write_filters(filters_, cal.filters());
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::string common() {
    return "-m " + qf::test::smollm2_path() + " --data " + sotu_dir() + " -t 2 --no-progress --filters " + filters_;
  }

  static inline fs::path dir_;
  static inline std::string filters_;
};

TEST_F(CliEval, QuickPerplexity) {
  const fs::path out = dir_ / "ppl";
  const auto t0 = std::chrono::steady_clock::now();
  CliResult r = run_qf("eval ppl --quick " + common() + " -o " + out.string());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* f : {"ppl.jsonl", "ppl.json", "ppl.csv", "ppl_curve.csv"}) EXPECT_TRUE(fs::exists(out / f)) << f;
  const json j = read_json(out / "ppl.json");
  EXPECT_EQ(j["run"]["model"], "SmolLM2-135M-Instruct.Q4_1.gguf");
  EXPECT_EQ(j["run"]["version"], QF_VERSION);
  EXPECT_FALSE(j["run"]["time"].get<std::string>().empty());
  EXPECT_EQ(j["run"]["cache_type_k"], "f16");  // llama.cpp's default KV storage
  EXPECT_EQ(j["run"]["cache_type_v"], "f16");
  const std::vector<std::string> want{"none", "qfilters", "knorm", "streaming", "random",
                                      "snapkv", "tova", "h2o", "expected_attention", "keydiff"};
  EXPECT_EQ(j["policies"].get<std::vector<std::string>>(), want);
  double full = 0;
  for (const auto& row : j["results"])
    if (row["policy"] == "none") full = row["ppl_after_budget"];
  ASSERT_GT(full, 1.0);
  ASSERT_EQ(j["results"].size(), want.size());
  for (const auto& row : j["results"]) {
    SCOPED_TRACE(row.dump());
    const double p = row["ppl_after_budget"];
    // Evicting context should never help on average; 0.1% slack for a lucky short sample.
    EXPECT_GE(p, full * 0.999);
    EXPECT_LT(p, full * 3.0);  // and a budget of 128 should not wreck the model either
    EXPECT_EQ(row["n_targets_after_budget"], 512 - 1 - 128);
    if (row["policy"] != "none") { EXPECT_GT(row["evicted"].get<int64_t>(), 0); }
    // One document: the bootstrap interval is the estimate itself.
    EXPECT_NEAR(row["ppl_after_budget_ci"][0].get<double>(), p, 1e-9 * p);
    EXPECT_NEAR(row["ppl_after_budget_ci"][1].get<double>(), p, 1e-9 * p);
  }
  EXPECT_NE(r.out.find("qfilters"), std::string::npos);
  std::printf("qf eval ppl --quick: %.1f s\n", secs);

  // Second run: every cell resumed, nothing recomputed (well under the first run's time).
  const auto t1 = std::chrono::steady_clock::now();
  r = run_qf("eval ppl --quick " + common() + " -o " + out.string());
  const double again = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_LT(again, secs / 2 + 2.0);
  EXPECT_EQ(read_json(out / "ppl.json")["results"], j["results"]);
  // Other settings on the same results: refused with a hint, not mixed.
  r = run_qf("eval ppl --quick --window 16 " + common() + " -o " + out.string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("other settings"), std::string::npos) << r.err;
  // The KV storage types are settings too.
  r = run_qf("eval ppl --quick -ctk q8_0 " + common() + " -o " + out.string());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("other settings"), std::string::npos) << r.err;
}

TEST_F(CliEval, QuickNeedleAndFidelity) {
  const fs::path out = dir_ / "niah";
  CliResult r = run_qf("eval niah --quick --lengths 512 " + common() + " -o " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* f : {"niah.jsonl", "niah.json", "niah.csv", "niah_grid.csv"}) EXPECT_TRUE(fs::exists(out / f)) << f;
  const json n = read_json(out / "niah.json");
  // 3 depths x (full + every policy x 2 compressions).
  const size_t n_policies = qf::kv::policy_names().size() - 1;
  EXPECT_EQ(n["grid"].size(), 3u * (1 + n_policies * 2));
  for (const auto& row : n["results"]) {
    if (row["policy"] == "none") { EXPECT_GE(row["accuracy"].get<double>(), 2.0 / 3.0) << "the full cache should find the needle"; }
    // Share of the needle's number tokens still cached: all of them uncompressed, at most all otherwise.
    ASSERT_TRUE(row["number_kept"].is_number()) << row.dump();
    const double kept = row["number_kept"];
    if (row["policy"] == "none") { EXPECT_EQ(kept, 1.0); }
    EXPECT_GE(kept, 0.0);
    EXPECT_LE(kept, 1.0);
  }

  r = run_qf("eval fidelity --quick " + common() + " -o " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json f = read_json(out / "fidelity.json");
  ASSERT_TRUE(f.contains("qfilters_beats_knorm"));
  EXPECT_EQ(f["qfilters_beats_knorm"]["heads"], 30 * 3);
  for (const auto& row : f["results"]) {
    const double m = row["mean_spearman"];
    EXPECT_GE(m, -1.0);
    EXPECT_LE(m, 1.0);
    if (row["policy"] == "h2o") { EXPECT_GT(m, 0.8) << "h2o's score is the attention received itself"; }
    if (row["policy"] == "random") { EXPECT_LT(std::abs(m), 0.1); }
  }
}

// Prompts on the real tokenizer: exact length, the needle whole at a sentence boundary near the
// requested depth, ChatML frame, question last and uncompressed.
TEST(NeedleBuilder, BuildsExactPrompts) {
  auto model = qf::Model::load(qf::test::smollm2_path());
  const qf::Tokenizer tok = qf::Tokenizer::from_gguf(model->file());
  ASSERT_TRUE(qf::eval::is_chatml(tok));
  EXPECT_EQ(qf::eval::chatml_default_system(tok), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  const auto docs = qf::eval::load_documents({sotu_dir()}, 2000, 2001);
  std::string hay;
  for (const auto& d : docs) hay += d.text + "\n\n";
  for (bool chat : {true, false}) {
    qf::eval::NeedleBuilder b(tok, hay, chat, 1024);
    double last_depth = -1;
    for (double depth : {0.0, 25.0, 50.0, 75.0, 100.0}) {
      SCOPED_TRACE(std::to_string(depth) + (chat ? " chat" : " plain"));
      const auto p = b.build(1024, depth, "7341952");
      EXPECT_EQ(p.context.size() + p.question.size(), 1024u);
      EXPECT_EQ(p.number, "7341952");
      EXPECT_LE(p.depth_actual, depth + 1e-9);
      EXPECT_GT(p.depth_actual, depth - 10.0);  // sentences are short
      EXPECT_GT(p.depth_actual, last_depth);
      last_depth = p.depth_actual;
      const std::string ctx = tok.decode(p.context);
      const std::string needle = " The special magic number is 7341952.";
      ASSERT_NE(ctx.find(needle), std::string::npos);
      EXPECT_EQ(tok.decode(std::vector<int32_t>(p.context.begin() + p.needle_at, p.context.end())).rfind(needle, 0), 0u);
      if (p.needle_at > 0 && depth > 0) {
        const std::string before = tok.decode(std::vector<int32_t>(p.context.begin(), p.context.begin() + p.needle_at));
        const char c = before.back();
        EXPECT_TRUE(c == '.' || c == '!' || c == '?' || before.find('\n', before.size() - 3) != std::string::npos)
            << "needle inside a sentence: ..." << before.substr(before.size() - 40);
      }
      const std::string q = tok.decode(p.question);
      EXPECT_NE(q.find("What is the special magic number"), std::string::npos);
      EXPECT_TRUE(q.ends_with("The special magic number mentioned in the provided text is")) << q;
      if (chat) {
        EXPECT_EQ(ctx.rfind("<|im_start|>system\nYou are a helpful AI assistant", 0), 0u);
        EXPECT_NE(q.find("<|im_end|>\n<|im_start|>assistant\n"), std::string::npos);
      } else {
        EXPECT_EQ(ctx.find("<|im_start|>"), std::string::npos);
      }
    }
    EXPECT_THROW(b.build(40, 50, "7341952"), qf::Error);      // no room for a haystack
    EXPECT_THROW(b.build(100000, 50, "7341952"), qf::Error);  // more than the haystack holds
  }
}

TEST_F(CliEval, BadInputFailsCleanly) {

  const std::string m = "-m " + qf::test::smollm2_path() + " --no-progress -o " + (dir_ / "bad").string();
  expect_clean_failure(run_qf("eval ppl " + m + " --policies bogus"), "bogus");
  expect_clean_failure(run_qf("eval ppl " + m + " --policies qfilters"), "--filters");
  expect_clean_failure(run_qf("eval ppl " + m + " --data " + sotu_dir() + " --budgets 32 --window 64"), "window");
  expect_clean_failure(run_qf("eval niah " + m + " --data /nonexistent/dir"), "/nonexistent/dir");
  expect_clean_failure(run_qf("eval niah " + m + " --data " + sotu_dir() + " --compressions 1"), "compressions");
  expect_clean_failure(run_qf("eval fidelity " + m + " --data " + sotu_dir() + " --docs 500"), "documents");
  expect_clean_failure(run_qf("eval"), "subcommand");
}

}  // namespace
