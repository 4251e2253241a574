// A bounded cache keeps resident memory flat however long the generation runs.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <random>

#include "kv/compressor.h"
#include "model/model.h"
#include "model/session.h"
#include "test_paths.h"

namespace {

// AddressSanitizer keeps freed blocks in a quarantine (256 MiB by default) instead of reusing
// them, so the small transient allocations of every decode step (thread-pool jobs) would show
// up as growth of the resident size. This binary turns the quarantine off (the environment's
// ASAN_OPTIONS still apply on top) so that the check below measures the cache, not ASan.
#if defined(__SANITIZE_ADDRESS__)
}  // namespace
extern "C" const char* __asan_default_options() { return "quarantine_size_mb=0"; }
namespace {
constexpr double kSlackMiB = 4.0;
#else
constexpr double kSlackMiB = 2.0;
#endif

double resident_mib() {
  std::ifstream in("/proc/self/statm");
  long size = 0, resident = 0;
  in >> size >> resident;
  return static_cast<double>(resident) * sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}

void generate(qf::Session& s, int n, std::mt19937& rng, int n_vocab) {
  for (int i = 0; i < n; ++i) {
    const int32_t t = static_cast<int32_t>(rng() % n_vocab);
    s.eval(std::span<const int32_t>(&t, 1));
  }
}

TEST(ModelMemory, FlatOver20000TokensWithBudget512) {
  auto m = qf::Model::load(qf::test::fixture("llama_q4_1_gqa_tied.gguf"));
  const int n_vocab = m->config().n_vocab;
  qf::kv::PolicyOptions po;
  qf::kv::CompressionConfig cc;
  cc.budget = 512;
  cc.window = 32;
  cc.evict_every = 16;
  qf::SessionOptions so;
  so.n_ctx = 20000;
  so.n_threads = 1;
  so.compressor = std::make_unique<qf::kv::Compressor>(qf::kv::make_policy("knorm", po), po, cc);
  qf::Session s(*m, std::move(so));
  std::mt19937 rng(1);
  generate(s, 1000, rng, n_vocab);
  const double rss_early = resident_mib();
  const int64_t reserved = s.cache().bytes_reserved();
  generate(s, 19000, rng, n_vocab);
  const double rss_late = resident_mib();
  EXPECT_EQ(s.n_past(), 20000);
  EXPECT_EQ(s.cache().bytes_reserved(), reserved);
  for (int l = 0; l < m->config().n_layers; ++l)
    for (int h = 0; h < m->config().n_kv_heads; ++h) EXPECT_LE(s.cache().head(l, h).n, 512);
  EXPECT_LT(s.cache().bytes_used() * 20, s.cache().full_cache_bytes(20000));
  EXPECT_LT(rss_late - rss_early, kSlackMiB) << "resident memory grew from " << rss_early << " to " << rss_late << " MiB";
  std::printf("resident: %.1f MiB after 1000 tokens, %.1f MiB after 20000; cache %lld bytes reserved\n", rss_early,
              rss_late, static_cast<long long>(reserved));
}

// The instrument itself: touching 8 MiB shows up in the resident size, so the check above
// could fail if the cache grew.
TEST(ModelMemory, ResidentSizeSeesGrowth) {
  const double before = resident_mib();
  std::vector<char> block(8 << 20);
  volatile char* pages = block.data();  // volatile stores: clang may not elide the allocation
  for (size_t i = 0; i < block.size(); i += 4096) pages[i] = 1;
  EXPECT_GT(resident_mib() - before, 7.0);
}

}  // namespace
