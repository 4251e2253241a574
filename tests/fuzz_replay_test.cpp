// Replays the fuzz harnesses' seed corpora and every past finding (fuzz/regressions/<harness>/)
// through the harnesses themselves, compiled here without libFuzzer, so that the ordinary test
// command (and its sanitizer build) keeps each finding fixed without needing clang.
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include "calib/filter_file.h"
#include "gguf/gguf.h"
#include "kv/state_file.h"
#include "server/protocol.h"
#include "test_paths.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

// Each harness defines the libFuzzer entry points; rename them so that all of them fit here.
#define LLVMFuzzerTestOneInput gguf_fuzz_one
#include "../fuzz/gguf_fuzz.cpp"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput filter_file_fuzz_one
#include "../fuzz/filter_file_fuzz.cpp"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput chat_template_fuzz_one
#include "../fuzz/chat_template_fuzz.cpp"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput tokenizer_fuzz_one
#define LLVMFuzzerInitialize tokenizer_fuzz_init
#include "../fuzz/tokenizer_fuzz.cpp"
#undef LLVMFuzzerTestOneInput
#undef LLVMFuzzerInitialize
#define LLVMFuzzerTestOneInput state_file_fuzz_one
#include "../fuzz/state_file_fuzz.cpp"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput server_request_fuzz_one
#define LLVMFuzzerInitialize server_request_fuzz_init
#include "../fuzz/server_request_fuzz.cpp"
#undef LLVMFuzzerTestOneInput
#undef LLVMFuzzerInitialize

namespace {

namespace fs = std::filesystem;
using Harness = int (*)(const uint8_t*, size_t);

// Runs every file of fuzz/corpus/<name>/ and fuzz/regressions/<name>/; returns how many ran.
// A harness aborts on a broken property, which fails the test run.
int replay(const std::string& name, Harness harness) {
  int n = 0;
  for (const char* dir : {"corpus", "regressions"}) {
    const fs::path root = fs::path(qf::test::source_dir()) / "fuzz" / dir / name;
    if (!fs::is_directory(root)) continue;
    for (const auto& entry : fs::directory_iterator(root)) {
      std::ifstream in(entry.path(), std::ios::binary);
      const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      SCOPED_TRACE(entry.path().string());
      EXPECT_EQ(harness(bytes.data(), bytes.size()), 0);
      ++n;
    }
  }
  return n;
}

TEST(FuzzReplay, Gguf) { EXPECT_GE(replay("gguf", gguf_fuzz_one), 2); }

TEST(FuzzReplay, FilterFile) { EXPECT_GE(replay("filter_file", filter_file_fuzz_one), 3); }

TEST(FuzzReplay, ChatTemplate) { EXPECT_GE(replay("chat_template", chat_template_fuzz_one), 3); }

TEST(FuzzReplay, Tokenizer) {
  setenv("QF_FUZZ_MODEL", qf::test::smollm2_path().c_str(), 1);
  tokenizer_fuzz_init(nullptr, nullptr);
  EXPECT_GE(replay("tokenizer", tokenizer_fuzz_one), 7);
}

TEST(FuzzReplay, StateFile) { EXPECT_GE(replay("state_file", state_file_fuzz_one), 9); }

TEST(FuzzReplay, ServerRequest) {
  setenv("QF_FUZZ_MODEL", qf::test::smollm2_path().c_str(), 1);
  server_request_fuzz_init(nullptr, nullptr);
  EXPECT_GE(replay("server_request", server_request_fuzz_one), 21);
}

// The seeds named valid_* come from fuzz/make_seeds.py's own encoder of the format: the C++
// reader must accept them (and read back what was written), the others it must refuse.
TEST(FuzzReplay, StateFileSeedsFromThePythonEncoder) {
  const fs::path root = fs::path(qf::test::source_dir()) / "fuzz" / "corpus" / "state_file";
  int valid = 0;
  for (const auto& entry : fs::directory_iterator(root)) {
    std::ifstream in(entry.path(), std::ios::binary);
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string name = entry.path().filename().string();
    SCOPED_TRACE(name);
    if (name.rfind("version2_", 0) == 0) {  // an older version still reads, with no recent queries
      const qf::kv::SessionState s = qf::kv::decode_state(bytes, name);
      EXPECT_EQ(s.version, 2u);
      EXPECT_EQ(s.config.stats.query_recent, 0);
      EXPECT_EQ(s.query_moments.size(), s.config.stats.query_moments ? static_cast<size_t>(s.config.n_layers) : 0u);
      for (const qf::kv::QueryMoments& m : s.query_moments) EXPECT_TRUE(m.recent.empty());
      EXPECT_EQ(qf::kv::encode_state(s), bytes);  // in its own version
      ++valid;
    } else if (name.rfind("version3_", 0) == 0) {  // the previous version: uniform budgets
      const qf::kv::SessionState s = qf::kv::decode_state(bytes, name);
      EXPECT_EQ(s.version, 3u);
      EXPECT_GT(s.config.stats.query_recent, 0);
      EXPECT_TRUE(s.config.layer_weights.empty());
      EXPECT_EQ(qf::kv::encode_state(s), bytes);  // in its own version
      ++valid;
    } else if (name.rfind("valid_", 0) == 0) {
      const qf::kv::SessionState s = qf::kv::decode_state(bytes, name);
      EXPECT_EQ(s.config.n_layers * s.config.n_kv_heads, static_cast<int>(s.heads.size()));
      EXPECT_EQ(s.evicted, 7);
      EXPECT_EQ(s.config.model_fingerprint, "0123456789abcdef");
      // Expected Attention's state carries one layer's query moments per layer (4 query heads).
      const bool moments = s.config.stats.query_moments || s.config.stats.query_recent > 0;
      EXPECT_EQ(s.query_moments.size(), moments ? static_cast<size_t>(s.config.n_layers) : 0u);
      // qfilters and knorm carry one key score per kept slot.
      for (const qf::kv::HeadState& h : s.heads)
        EXPECT_EQ(h.key_score.size(), s.config.stats.key_scores ? static_cast<size_t>(h.n()) : 0u);
      for (const qf::kv::QueryMoments& m : s.query_moments) {
        EXPECT_EQ(m.n_heads, 4);
        // Expected Attention's sums; qfilters_adaptive's recent queries only.
        const size_t per_head = static_cast<size_t>(m.n_heads) * m.head_dim;
        EXPECT_EQ(m.sum.size(), s.config.stats.query_moments ? per_head : 0u);
        EXPECT_EQ(m.outer.size(), s.config.stats.query_moments ? per_head * m.head_dim : 0u);
        EXPECT_EQ(m.recent.size(), s.config.stats.query_recent > 0 ? per_head : 0u);
      }
      EXPECT_EQ(s.version, qf::kv::kStateVersion);
      // Per-layer budget weights: none (uniform), or one per layer as written.
      if (name == "valid_tova_layer_weights.qfstate") EXPECT_EQ(s.config.layer_weights, (std::vector<float>{1.5f, 0.5f}));
      else EXPECT_TRUE(s.config.layer_weights.empty());
      EXPECT_EQ(qf::kv::encode_state(s), bytes);  // reads back what was written
      ++valid;
    } else {
      EXPECT_THROW(qf::kv::decode_state(bytes, name), qf::Error);
    }
  }
  EXPECT_EQ(valid, 12);
}

}  // namespace
