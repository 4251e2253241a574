// The qf binary on bad input: one clear line on stderr and a non-zero exit, never a crash.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "cli_helpers.h"
#include "test_paths.h"

namespace {

using qf::test::CliResult;
using qf::test::expect_clean_failure;
using qf::test::run_qf;

std::string model() { return qf::test::smollm2_path(); }

std::string write_temp(const std::string& name, const std::string& bytes) {
  const std::string p = qf::test::temp_file(name);
  std::ofstream(p, std::ios::binary) << bytes;
  return p;
}

TEST(Cli, MissingModelFile) { expect_clean_failure(run_qf("run -m /nonexistent.gguf -p hi"), "nonexistent"); }

TEST(Cli, UnknownFlag) { expect_clean_failure(run_qf("run -m " + model() + " -p hi --no-such-flag"), "no-such-flag"); }

TEST(Cli, NoSubcommand) { expect_clean_failure(run_qf(""), "subcommand"); }

TEST(Cli, NotAGgufFile) {
  const std::string p = write_temp("qf_not_gguf.gguf", "this is not a gguf file at all, just text");
  expect_clean_failure(run_qf("run -m " + p + " -p hi"), "qf_not_gguf.gguf");
}

TEST(Cli, TruncatedModel) {
  std::ifstream in(model(), std::ios::binary);
  std::string head(200000, '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  const std::string p = write_temp("qf_truncated.gguf", head);
  expect_clean_failure(run_qf("run -m " + p + " -p hi -n 1"), "qf_truncated.gguf");
}

TEST(Cli, PromptLongerThanContext) {
  expect_clean_failure(run_qf("run -m " + model() + " -c 16 -n 4 -p \"" + std::string(400, 'a') + " b c d e f g\""),
                       "context");
}

TEST(Cli, UnknownPolicy) {
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --kv-policy nosuch --kv-budget 64"), "nosuch");
}

TEST(Cli, WindowLargerThanBudget) {
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --kv-policy knorm --kv-budget 16 --kv-window 32"),
                       "--kv-window");
}

TEST(Cli, QFiltersWithoutFilters) {
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --kv-policy qfilters --kv-budget 64"), "--filters");
}

TEST(Cli, BadRatio) {
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --kv-policy knorm --kv-ratio 1.5"), "--kv-ratio");
}

TEST(Cli, CorruptFilterFile) {
  const std::string p = write_temp("qf_bad_filters.safetensors", std::string("\x10\0\0\0\0\0\0\0{\"broken", 15));
  expect_clean_failure(
      run_qf("run -m " + model() + " -p hi -n 1 --kv-policy qfilters --kv-budget 64 --filters " + p), "qf_bad_filters");
}

TEST(Cli, BadSamplingFlags) {
  expect_clean_failure(run_qf("run -m " + model() + " -p hi --min-p 1.5"), "--min-p");
  expect_clean_failure(run_qf("run -m " + model() + " -p hi --seed -7"), "--seed");
  expect_clean_failure(run_qf("run -m " + model() + " -p hi --repeat-penalty 0"), "--repeat-penalty");
  expect_clean_failure(run_qf("run -m " + model() + " -p hi --repeat-last-n -3"), "--repeat-last-n");
}

TEST(Cli, InfoDescribesTheModel) {
  const CliResult r = run_qf("info " + model());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("llama"), std::string::npos);
  EXPECT_NE(r.out.find("30 layers"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Q4_1"), std::string::npos);
}

TEST(Cli, RunGeneratesAndReportsTimingAndKv) {
  const CliResult r = run_qf("run -m " + model() + " -p \"The capital of France is\" -n 8 -t 2");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("The capital of France is"), std::string::npos);
  EXPECT_GT(r.out.size(), std::string("The capital of France is").size() + 2);
  EXPECT_NE(r.err.find("tok/s"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("kv:"), std::string::npos) << r.err;
}

TEST(Cli, SameSeedSameOutput) {
  const std::string args = "run -m " + model() + " -p \"Once upon a time\" -n 24 --temp 0.9 --seed 7";
  const CliResult a = run_qf(args), b = run_qf(args);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  const CliResult c = run_qf("run -m " + model() + " -p \"Once upon a time\" -n 24 --temp 0.9 --seed 8");
  EXPECT_NE(a.out, c.out) << "different seeds gave the same 24 sampled tokens";
}

// The penalties reach the sampler: greedy decoding of a looping prompt repeats itself, and a
// strong repetition penalty over the whole window breaks the loop.
TEST(Cli, RepeatPenaltyChangesGreedyOutput) {
  const std::string base = "run -m " + model() + " -p \"one two one two one two one two\" -n 16 --temp 0 -t 1";
  const CliResult plain = run_qf(base), penalised = run_qf(base + " --repeat-penalty 1.5 --repeat-last-n 64");
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  ASSERT_EQ(penalised.exit_code, 0) << penalised.err;
  EXPECT_NE(plain.out, penalised.out);
}

// -ctk / -ctv as llama.cpp spells them (and the long names), in the KV summary line with the
// bytes one token takes per layer (SmolLM2: 3 KV heads of 64 values); f16 by default.
TEST(Cli, KvCacheTypes) {
  const std::string base = "run -m " + model() + " -p \"The capital of France is\" -n 4 -t 2";
  CliResult r = run_qf(base);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("kv: f16/f16, 768 bytes per token per layer"), std::string::npos) << r.err;
  r = run_qf(base + " -ctk q8_0 -ctv f16");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("kv: q8_0/f16, 588 bytes per token per layer"), std::string::npos) << r.err;
  r = run_qf(base + " --cache-type-k=q4_0 -ctv=q4_0 --kv-policy knorm --kv-budget 8");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("kv: q4_0/q4_0, 216 bytes per token per layer"), std::string::npos) << r.err;
  r = run_qf("bench -m " + model() + " -p 16 -n 4 -r 1 -t 2 --json -ctk f32 -ctv bf16");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\"cache_type_k\":\"f32\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"kv_bytes_per_token_per_layer\":1152"), std::string::npos) << r.out;
  expect_clean_failure(run_qf(base + " -ctk q4_1"), "cache-type-k");
  expect_clean_failure(run_qf(base + " -ctv f8"), "cache-type-v");
}

// qf run --save-state / --load-state: a document read once, then a question appended to it; a
// state for other KV flags, a corrupt or foreign file is one clear line.
TEST(Cli, SaveAndLoadState) {
  const std::string state = qf::test::temp_file("state.qfstate");
  const std::string kv = " -t 1 -c 256 --kv-policy knorm --kv-budget 16 --kv-window 4";
  const CliResult saved = run_qf("run -m " + model() + kv + " -p 'The capital of France is Paris. The capital of Italy is' -n 0 --save-state " + state);
  ASSERT_EQ(saved.exit_code, 0) << saved.err;
  EXPECT_NE(saved.err.find("state: saved 12 positions"), std::string::npos) << saved.err;
  const CliResult loaded = run_qf("run -m " + model() + kv + " --load-state " + state + " -p ' Rome. The capital of Spain is' -n 4 --temp 0 --no-display-prompt");
  ASSERT_EQ(loaded.exit_code, 0) << loaded.err;
  EXPECT_NE(loaded.err.find("state: restored 12 positions"), std::string::npos) << loaded.err;
  EXPECT_NE(loaded.err.find("prompt: 7 tokens"), std::string::npos) << loaded.err;  // only the new ones are read
  EXPECT_NE(loaded.out.find("Madrid"), std::string::npos) << loaded.out;

  expect_clean_failure(run_qf("run -m " + model() + " -t 1 -c 256 --kv-policy knorm --kv-budget 32 --kv-window 4 --load-state " + state + " -p x -n 1"),
                       "budget 16");
  expect_clean_failure(run_qf("run -m " + model() + " -t 1 -c 256 --load-state " + state + " -p x -n 1"), "full cache");
  std::ifstream in(state, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  bytes[bytes.size() / 2] ^= 0x5a;
  expect_clean_failure(run_qf("run -m " + model() + kv + " --load-state " + write_temp("qf_corrupt.qfstate", bytes) + " -p x -n 1"),
                       "checksum mismatch");
  expect_clean_failure(run_qf("run -m " + model() + kv + " --load-state " + model() + " -p x -n 1"), "not a qfilters state file");
  const std::string fixture = qf::test::fixture("llama_f32_gqa_tied.gguf");
  expect_clean_failure(run_qf("run -m " + fixture + kv + " --load-state " + state + " -p x -n 1"), "saved for another model");
  std::filesystem::remove(state);
}

// --layer-weights in qf run and bench: a state saved with per-layer budgets restores under the
// same weights only; a wrong count, or 'spread' without query statistics, is one clear line.
TEST(Cli, LayerWeights) {
  std::string weights;  // SmolLM2's 30 layers: the first half keeps twice what the second keeps
  for (int l = 0; l < 30; ++l) weights += (l ? "," : "") + std::string(l < 15 ? "2" : "1");
  const std::string state = qf::test::temp_file("layers.qfstate");
  const std::string kv = " -t 1 -c 256 --kv-policy knorm --kv-budget 16 --kv-window 4";
  const CliResult saved = run_qf("run -m " + model() + kv + " --layer-weights " + weights +
                                 " -p 'The capital of France is Paris. The capital of Italy is' -n 0 --save-state " + state);
  ASSERT_EQ(saved.exit_code, 0) << saved.err;
  const CliResult loaded = run_qf("run -m " + model() + kv + " --layer-weights " + weights + " --load-state " + state +
                                  " -p ' Rome.' -n 2 --temp 0");
  ASSERT_EQ(loaded.exit_code, 0) << loaded.err;
  EXPECT_NE(loaded.err.find("state: restored 12 positions"), std::string::npos) << loaded.err;
  expect_clean_failure(run_qf("run -m " + model() + kv + " --load-state " + state + " -p x -n 1"),
                       "saved with per-layer budget weights 2,2,");
  std::filesystem::remove(state);
  expect_clean_failure(run_qf("run -m " + model() + kv + " --layer-weights 1,2 -p x -n 1"),
                       "--layer-weights: 2 weights for a model of 30 layers");
  expect_clean_failure(run_qf("run -m " + model() + kv + " --layer-weights spread -p x -n 1"),
                       "--layer-weights spread needs --filters with query statistics");
  const CliResult bench = run_qf("bench -m " + model() + " -p 16 -n 4 -r 1 -t 1 --json --kv-policy knorm --kv-budget 8 "
                                 "--kv-window 2 --layer-weights " + weights);
  ASSERT_EQ(bench.exit_code, 0) << bench.err;
  EXPECT_NE(bench.out.find("\"kv_layer_weights\":\"" + weights + "\""), std::string::npos) << bench.out;
}

}  // namespace
