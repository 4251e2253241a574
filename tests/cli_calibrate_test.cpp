// qf calibrate and qf filters end to end: a calibrated file is accepted by qf run, printed by
// qf filters, rejected on another model; published filters are imported; bad input fails cleanly.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>

#include "calib/filter_file.h"
#include "cli_helpers.h"
#include "test_paths.h"

namespace {

namespace fs = std::filesystem;

using qf::test::CliResult;
using qf::test::expect_clean_failure;
using qf::test::run_qf;
using qf::test::slurp;

std::string tmp(const std::string& name) { return qf::test::temp_file(name); }

std::string model() { return qf::test::smollm2_path(); }
std::string sotu(const std::string& name) { return qf::test::source_dir() + "/data/sotu/" + name; }
bool contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

// A published-style file: HF row order, -v stored (keep the smallest dot), only {"format": "pt"}.
std::string write_published(const qf::calib::Filters& canonical, const std::string& path) {
  const int L = canonical.n_layers, KV = canonical.n_kv_heads, D = canonical.head_dim;
  std::vector<float> data(canonical.data.size());
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < KV; ++h) {
      const float* g = canonical.at(l, h);
      float* o = data.data() + (size_t(l) * KV + h) * D;
      for (int i = 0; i < D / 2; ++i) {
        o[i] = -g[2 * i];
        o[i + D / 2] = -g[2 * i + 1];
      }
    }
  nlohmann::json hdr = {{"__metadata__", {{"format", "pt"}}},
                        {"q_filters", {{"dtype", "F32"}, {"shape", {L, KV, D}}, {"data_offsets", {0, data.size() * 4}}}}};
  std::string h = hdr.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h;
  out.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * 4));
  return path;
}

class CliCalibrate : public ::testing::Test {
 protected:
  // One small calibration on natural text shared by the tests.
  static void SetUpTestSuite() {
    filters_ = tmp("sotu.safetensors");
    const CliResult r = run_qf("calibrate -m " + model() + " --text " + sotu("1861_abraham_lincoln_r.txt") + " " +
                            sotu("1905_theodore_roosevelt_r.txt") + " --docs 2 --doc-len 128 --samples 100 -t 2 --report -o " +
                            filters_);
    calibrate_ = new CliResult(r);
  }
  static void TearDownTestSuite() { delete calibrate_; }
  static std::string filters_;
  static CliResult* calibrate_;
};
std::string CliCalibrate::filters_;
CliResult* CliCalibrate::calibrate_ = nullptr;

TEST_F(CliCalibrate, TextCalibrationWritesAFileThatRunAccepts) {
  ASSERT_EQ(calibrate_->exit_code, 0) << calibrate_->err;
  EXPECT_TRUE(contains(calibrate_->err, "256 tokens")) << calibrate_->err;
  EXPECT_TRUE(contains(calibrate_->err, "wrote")) << calibrate_->err;
  // --report: a header, 30 layers and the total.
  EXPECT_TRUE(contains(calibrate_->out, "energy_mean")) << calibrate_->out;
  EXPECT_TRUE(contains(calibrate_->out, "\n   29 ")) << calibrate_->out;
  EXPECT_TRUE(contains(calibrate_->out, "\n  all ")) << calibrate_->out;

  const std::string prompt = tmp("prompt.txt");
  std::ofstream(prompt) << slurp(sotu("2002_george_w_bush_r.txt")).substr(0, 1200);
  const CliResult r = run_qf("run -m " + model() + " -f " + prompt +
                          " -n 4 -t 2 --no-display-prompt --kv-policy qfilters --kv-budget 64 --filters " + filters_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "policy qfilters")) << r.err;
  EXPECT_FALSE(contains(r.err, " 0 slots evicted")) << "a 1200-character prompt must overflow a budget of 64: " << r.err;
}

TEST_F(CliCalibrate, FiltersPrintsTheStoredReportAndComparisons) {
  ASSERT_EQ(calibrate_->exit_code, 0) << calibrate_->err;
  CliResult r = run_qf("filters " + filters_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "fingerprint: llama:L30:H9:KV3:D64:E576:V49152")) << r.out;
  EXPECT_TRUE(contains(r.out, "text_source: files")) << r.out;
  EXPECT_TRUE(contains(r.out, "energy_mean")) << r.out;
  EXPECT_TRUE(contains(r.out, "\n  all ")) << r.out;

  r = run_qf("filters " + filters_ + " -m " + model());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "fingerprint matches the model")) << r.out;

  r = run_qf("filters " + filters_ + " --compare " + filters_ + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["shape"], nlohmann::json({30, 3, 64}));
  EXPECT_GT(j["report"]["summary"]["energy_share_mean"].get<double>(), 0.2);
  EXPECT_EQ(j["report"]["summary"]["n_heads"], 270);
  EXPECT_NEAR(j["report"]["summary"]["cosine_to_reference"].get<double>(), 1.0, 1e-9);
  EXPECT_EQ(j["cosine_per_head"].size(), 90u);
}

TEST_F(CliCalibrate, FiltersOfAnotherModelAreRejected) {
  ASSERT_EQ(calibrate_->exit_code, 0) << calibrate_->err;
  // Another shape: filters calibrated on a fixture model (text sampled from it, clipped to its context).
  const std::string other = tmp("fixture.safetensors");
  CliResult r = run_qf("calibrate -m " + qf::test::fixture("llama_f32_gqa_tied.gguf") +
                    " --docs 1 --doc-len 32 --samples 16 --no-progress -o " + other);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --kv-policy qfilters --kv-budget 64 --filters " + other),
                       "the model needs 30x3x64");
  expect_clean_failure(run_qf("filters " + other + " -m " + model()), "the model needs");

  // Same shape, another model: the fingerprint check.
  std::string bytes = slurp(filters_);
  const size_t at = bytes.find("V49152");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 6, "V49153");
  const std::string forged = tmp("forged.safetensors");
  std::ofstream(forged, std::ios::binary) << bytes;
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --kv-policy qfilters --kv-budget 64 --filters " + forged),
                       "were made for model llama:L30:H9:KV3:D64:E576:V49153");
}

TEST_F(CliCalibrate, PublishedFiltersImportAndLoad) {
  ASSERT_EQ(calibrate_->exit_code, 0) << calibrate_->err;
  const qf::calib::StoredFilters ours = qf::calib::read_filters(filters_);
  const std::string published = write_published(ours.filters, tmp("published.safetensors"));

  // Used directly, a foreign file needs its conventions spelled out.
  const std::string run = "run -m " + model() + " -p hi -n 1 --kv-policy qfilters --kv-budget 64 --filters " + published;
  expect_clean_failure(run_qf(run), "must be given");
  CliResult r = run_qf(run + " --filter-layout hf --filter-sign keep_smallest_dot");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  expect_clean_failure(run_qf("run -m " + model() + " -p hi -n 1 --filter-layout hf"), "--filters");

  // Imported, it becomes our canonical file: the same values as the original, with the fingerprint.
  const std::string imported = tmp("imported.safetensors");
  r = run_qf("filters import " + published + " -o " + imported + " --layout hf --sign keep_smallest_dot -m " + model());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const qf::calib::LoadedFilters back =
      qf::calib::load_filters(imported, qf::calib::FilterExpectation{30, 3, 64, "llama:L30:H9:KV3:D64:E576:V49152"});
  EXPECT_FALSE(back.foreign);
  EXPECT_FALSE(back.fingerprint_missing);
  EXPECT_EQ(back.filters.data, ours.filters.data);
  EXPECT_EQ(back.filters.metadata.at("converted_from"), "hf/keep_smallest_dot");
  EXPECT_EQ(back.filters.metadata.at("source_format"), "pt");

  r = run_qf("filters " + published + " --layout hf --sign keep_smallest_dot --compare " + filters_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.out, "mean 1.0000")) << r.out;
  EXPECT_TRUE(contains(r.out, "not made by qf")) << r.out;
  expect_clean_failure(run_qf("filters import " + published + " -o " + tmp("x.safetensors") + " -m " + model()), "--layout");
}

TEST(CliCalibrateText, ShortOnFilesLongFilesAreSplit) {
  // One long address, three documents of 128 tokens: its first three pieces.
  const CliResult r = run_qf("calibrate -m " + model() + " --text " + sotu("1861_abraham_lincoln_r.txt") +
                          " --docs 3 --doc-len 128 --samples 50 -t 2 --no-progress -o " + tmp("split.safetensors"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "3 documents, 384 tokens")) << r.err;
}

TEST(CliCalibrateSampled, SameSeedSameFile) {
  auto calibrate = [](const std::string& out, int seed) {
    return run_qf("calibrate -m " + model() + " --docs 1 --doc-len 40 --samples 30 -t 2 --no-progress -s " +
                  std::to_string(seed) + " -o " + out);
  };
  const std::string a = tmp("s5a.safetensors"), b = tmp("s5b.safetensors"), c = tmp("s6.safetensors");
  CliResult r = calibrate(a, 5);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(contains(r.err, "sampled from the model")) << r.err;
  ASSERT_EQ(calibrate(b, 5).exit_code, 0);
  ASSERT_EQ(calibrate(c, 6).exit_code, 0);
  EXPECT_EQ(slurp(a), slurp(b)) << "same seed, same file";
  EXPECT_NE(slurp(a), slurp(c));
  EXPECT_EQ(qf::calib::read_filters(a).filters.metadata.at("text_source"), "model");
}

TEST(CliCalibrateErrors, BadInputFailsCleanly) {
  expect_clean_failure(run_qf("calibrate -m " + model()), "-o FILE");
  expect_clean_failure(run_qf("calibrate -m " + model() + " --text /nonexistent/dir -o " + tmp("x.safetensors")),
                       "/nonexistent/dir");
  // Evaluation text (2000 on) is left out unless asked for.
  expect_clean_failure(run_qf("calibrate -m " + model() + " --text " + sotu("2001_george_w_bush_r.txt") + " -o " +
                              tmp("x.safetensors")),
                       "--max-year 0");
  expect_clean_failure(run_qf("calibrate -m " + model() + " --orientation sideways -o " + tmp("x.safetensors")),
                       "--orientation");
  expect_clean_failure(run_qf("filters"), "filter file");
  const std::string junk = tmp("junk.safetensors");
  std::ofstream(junk) << "not a safetensors file";
  expect_clean_failure(run_qf("filters " + junk), "junk.safetensors");
}

}  // namespace
