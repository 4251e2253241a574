// Resource limits: sizes asked for by a flag or declared by a file that the machine cannot hold
// are refused with one line and a non-zero exit before anything large is allocated; absurd
// thread counts are capped with a warning. (A prompt longer than the context: cli_test; filters
// made for another model: cli_calibrate_test.)
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "cli_helpers.h"
#include "test_paths.h"

namespace {

using qf::test::CliResult;

// Runs qf with `env` (VAR=value ...) in front.
CliResult run_qf(const std::string& env, const std::string& args) { return qf::test::run_qf(args, env); }

// One line on stderr, exit 1, no crash, and the line names what was too big.
void expect_refused(const CliResult& r, const std::string& must_mention) {
  EXPECT_EQ(r.signal, 0) << r.err;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(must_mention), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

// A copy of a fixture GGUF with one integer metadata value replaced in place (same size, so
// the file stays well-formed).
std::string with_metadata(const std::string& fixture, const std::string& key, uint32_t value) {
  std::ifstream in(qf::test::fixture(fixture), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = bytes.find(key);
  if (at == std::string::npos) throw std::runtime_error(fixture + " has no " + key);
  uint32_t type = 0;
  std::memcpy(&type, bytes.data() + at + key.size(), 4);
  const size_t value_at = at + key.size() + 4;
  if (type == 4) {  // UINT32
    std::memcpy(bytes.data() + value_at, &value, 4);
  } else if (type == 10) {  // UINT64
    const uint64_t v64 = value;
    std::memcpy(bytes.data() + value_at, &v64, 8);
  } else {
    throw std::runtime_error(key + " is not an unsigned integer in " + fixture);
  }
  const std::string path = qf::test::temp_file("limits_" + key + ".gguf");
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// Pretend the machine has 200 MiB, so the tests do not depend on the machine they run on.
const std::string kSmallMachine = "QF_MEMORY_LIMIT_MB=200";

TEST(CliLimits, ContextWhoseCacheDoesNotFitIsRefused) {
  // SmolLM2: 30 layers x 3 KV heads x 64 x (K + V) x f32 = 45 KiB per token: 352 MiB for 8k.
  const CliResult r = run_qf(kSmallMachine, "run -m " + qf::test::smollm2_path() + " -c 8000 -p hi -n 1 -ctk f32 -ctv f32");
  expect_refused(r, "a context of 8000 tokens");
  EXPECT_NE(r.err.find("-c"), std::string::npos) << r.err;
}

TEST(CliLimits, BoundedCacheMakesTheSameContextFit) {
  const CliResult r = run_qf(kSmallMachine, "run -m " + qf::test::smollm2_path() +
                                              " -c 8000 -p hi -n 2 --kv-policy knorm --kv-budget 64 --kv-window 8");
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(CliLimits, DeclaredTrainingContextTooLargeIsRefused) {
  // The default context is the model's: a file declaring 2^24 tokens must not size the cache.
  const std::string p = with_metadata("llama_f32_mha.gguf", "llama.context_length", 1u << 24);
  expect_refused(run_qf(kSmallMachine, "run -m " + p + " -p hi -n 1"), "training context");
}

TEST(CliLimits, DeclaredBlockCountBeyondTheTensorTableIsRefused) {
  const std::string p = with_metadata("llama_f32_mha.gguf", "llama.block_count", 1u << 24);
  expect_refused(run_qf("", "run -m " + p + " -p hi -n 1"), "block_count");
}

TEST(CliLimits, AbsurdThreadCountIsCappedWithAWarning) {
  const CliResult r = run_qf("", "run -m " + qf::test::fixture("llama_f32_mha.gguf") + " -t 10000 -p hi -n 2");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("warning: 10000 threads"), std::string::npos) << r.err;
}

TEST(CliLimits, NegativeThreadCountIsRefused) {
  const CliResult r = run_qf("", "run -m " + qf::test::fixture("llama_f32_mha.gguf") + " -t -3 -p hi -n 2");
  EXPECT_EQ(r.signal, 0);
  EXPECT_GT(r.exit_code, 0) << r.err;
  EXPECT_LT(r.exit_code, 128);
}

}  // namespace
