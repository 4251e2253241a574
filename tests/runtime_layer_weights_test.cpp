// Per-layer budgets through the runtime (--layer-weights in qf run/chat/serve/bench, the Python
// package and qf eval): the spec is parsed in one place, sessions get those weights and caches
// sized by them (the same total memory as uniform budgets), bad specs are one-line errors, and
// "spread" reads the filter file's query statistics.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdint>
#include <limits>
#include <filesystem>
#include <string>
#include <vector>

#include "calib/filter_file.h"
#include "calib/filters.h"
#include "kv/compressor.h"
#include "runtime/engine.h"
#include "runtime/session_state.h"
#include "test_paths.h"
#include "util/error.h"

namespace qf::runtime {
namespace {

namespace fs = std::filesystem;

// Runs `f`, which must throw a one-line qf::Error containing `expect`.
template <typename F>
void expect_error(F&& f, const std::string& expect) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << expect;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(LayerWeights, ParseAndFormat) {
  EXPECT_TRUE(parse_layer_weights("", nullptr).empty());
  EXPECT_EQ(parse_layer_weights("1,2.5,3", nullptr), (std::vector<float>{1.0f, 2.5f, 3.0f}));
  EXPECT_EQ(format_layer_weights({}), "");
  EXPECT_EQ(format_layer_weights({0.5f, 1.25f, 3.0f}), "0.5,1.25,3");
  // Formatting then parsing gives the same floats, bit for bit.
  const std::vector<float> awkward = {0.1f, 1.0f / 3.0f, 1e-7f, 12345.678f, 0.81234567f};
  EXPECT_EQ(parse_layer_weights(format_layer_weights(awkward), nullptr), awkward);
  expect_error([] { parse_layer_weights("1,,2", nullptr); }, "--layer-weights: '' is not a number");
  expect_error([] { parse_layer_weights("1,x", nullptr); }, "--layer-weights: 'x' is not a number");
  expect_error([] { parse_layer_weights("1,2,", nullptr); }, "'' is not a number");
  expect_error([] { parse_layer_weights("spread", nullptr); }, "--layer-weights spread needs --filters with query statistics");
  const calib::Filters no_stats(3, 2, 32);
  expect_error([&] { parse_layer_weights("spread", &no_stats); }, "needs --filters with query statistics");
}

class EngineLayerWeights : public ::testing::Test {
 protected:
  static ModelOptions model_options() {
    ModelOptions mo;
    mo.model = test::fixture("llama_f32_gqa_tied.gguf");  // 3 layers, 4 query heads, 2 KV heads of 32
    mo.n_ctx = 128;
    mo.n_threads = 1;
    mo.n_batch = 8;  // caches hold budget + 8: well below the context, so budgets decide their size
    return mo;
  }
  static KvOptions knorm(const std::string& weights) {
    KvOptions kv;
    kv.policy = "knorm";
    kv.budget = 24;
    kv.window = 4;
    kv.layer_weights = weights;
    return kv;
  }
  // A filter file for the fixture with query statistics (mean and rank-2 factors per query head).
  std::string write_stats_file(bool with_stats) {
    const ModelConfig& c = engine_.model().config();
    calib::Filters f(c.n_layers, c.n_kv_heads, c.head_dim);
    for (size_t i = 0; i < f.data.size(); ++i) f.data[i] = static_cast<float>(i % 7) - 3.0f;
    if (with_stats) {
      f.n_query_heads = c.n_heads;
      f.stats_rank = 2;
      const size_t per_head = static_cast<size_t>(c.n_layers) * c.n_heads * c.head_dim;
      f.query_mean.resize(per_head);
      f.query_factors.resize(per_head * 2);
      for (size_t i = 0; i < f.query_mean.size(); ++i) f.query_mean[i] = 0.5f + static_cast<float>(i % 5) * 0.25f;
      for (size_t i = 0; i < f.query_factors.size(); ++i)  // layer l's factors grow with l: unequal spreads
        f.query_factors[i] = static_cast<float>((i % 11) + 1) * 0.1f * static_cast<float>(1 + i / (f.query_factors.size() / 3));
    }
    f.metadata["fingerprint"] = c.fingerprint();
    const std::string path = (fs::temp_directory_path() / ("qf_layer_weights_" + std::to_string(::getpid()) +
                                                           (with_stats ? "_stats" : "") + ".safetensors")).string();
    calib::write_filters(path, f);
    files_.push_back(path);
    return path;
  }
  void TearDown() override {
    for (const std::string& f : files_) fs::remove(f);
  }

  Engine engine_{model_options()};
  std::vector<std::string> files_;
};

// Weights 3,1,2 share 3 x 24 slots per head as 36, 12 and 24: each cache holds its budget plus one
// prompt chunk, what admission charges is what the cache reserves, and the total is the uniform one.
TEST_F(EngineLayerWeights, SessionsAreSizedByTheWeights) {
  auto uniform = engine_.new_session(knorm(""));
  auto weighted = engine_.new_session(knorm("3,1,2"));
  ASSERT_NE(weighted->compressor(), nullptr);
  EXPECT_EQ(weighted->compressor()->config().layer_weights, (std::vector<float>{3.0f, 1.0f, 2.0f}));
  EXPECT_EQ(weighted->cache().capacity(0), 36 + 8);
  EXPECT_EQ(weighted->cache().capacity(1), 12 + 8);
  EXPECT_EQ(weighted->cache().capacity(2), 24 + 8);
  for (int l = 0; l < 3; ++l) EXPECT_EQ(uniform->cache().capacity(l), 24 + 8);
  EXPECT_EQ(engine_.session_kv_bytes(knorm("3,1,2")), weighted->cache().bytes_reserved());
  EXPECT_EQ(weighted->cache().bytes_reserved(), uniform->cache().bytes_reserved());
  EXPECT_LT(weighted->cache().bytes_reserved(), engine_.session_kv_bytes(KvOptions{}));  // not a full cache
}

// qfilters_max keeps a memory per slot (position, key fingerprint, score: 16 bytes) outside the
// cache: admission charges it on top of what the cache reserves, for every slot of every KV head.
TEST_F(EngineLayerWeights, AdmissionChargesThePolicysMemory) {
  KvOptions kv = knorm("");
  kv.policy = "qfilters_max";
  kv.filters = write_stats_file(true);
  auto s = engine_.new_session(kv);
  const ModelConfig& c = engine_.model().config();
  int64_t slots = 0;
  for (int l = 0; l < c.n_layers; ++l) slots += s->cache().capacity(l);
  EXPECT_EQ(engine_.session_kv_bytes(kv), s->cache().bytes_reserved() + slots * c.n_kv_heads * 16);
  kv.policy = "qfilters_max+layer";  // the wrapper passes its inner policy's memory on
  EXPECT_EQ(engine_.session_kv_bytes(kv), s->cache().bytes_reserved() + slots * c.n_kv_heads * 16);
  kv.policy = "qfilters_adaptive";  // no memory
  EXPECT_EQ(engine_.session_kv_bytes(kv), engine_.new_session(kv)->cache().bytes_reserved());
  kv.policy = "qfilters_max";  // --filter-decay inf: no memory either
  kv.query_stats.filter_decay = std::numeric_limits<float>::infinity();
  EXPECT_EQ(engine_.session_kv_bytes(kv), engine_.new_session(kv)->cache().bytes_reserved());
}

// The query-statistics settings of KvOptions reach the policy: the engine's checks answer for them.
TEST_F(EngineLayerWeights, QueryStatsSettingsReachThePolicy) {
  KvOptions kv = knorm("");
  kv.policy = "qfilters_max";
  kv.filters = write_stats_file(true);
  kv.query_stats.filter_blend = 1.5f;
  expect_error([&] { engine_.new_session(kv); }, "--filter-blend must lie in [0, 1]");
  kv.query_stats.filter_blend = 0.5f;
  kv.query_stats.filter_horizon = 0;
  expect_error([&] { engine_.new_session(kv); }, "--filter-horizon must be >= 1");
  kv.query_stats.filter_horizon = 2;
  kv.query_stats.filter_decay = -1.0f;
  expect_error([&] { engine_.new_session(kv); }, "--filter-decay must be >= 0");
  kv.query_stats.filter_decay = 0.1f;
  kv.query_stats.future_positions = 0;
  expect_error([&] { engine_.new_session(kv); }, "the future positions must be >= 1");
  kv.query_stats.future_positions = 64;
  const auto s = engine_.new_session(kv);
  EXPECT_EQ(s->compressor()->options().query_future_positions, 64);
  EXPECT_EQ(s->compressor()->options().ea_future_positions, 64);
  EXPECT_EQ(s->compressor()->options().filter_blend, 0.5f);
  EXPECT_EQ(s->compressor()->options().filter_horizon, 2);
  EXPECT_EQ(s->compressor()->options().filter_decay, 0.1f);
}

TEST_F(EngineLayerWeights, BadWeightsAreOneLineErrors) {
  expect_error([&] { engine_.new_session(knorm("1,2")); }, "--layer-weights: 2 weights for a model of 3 layers");
  expect_error([&] { engine_.session_kv_bytes(knorm("1,0,2")); }, "every weight must be positive and finite");
  expect_error([&] { engine_.new_session(knorm("1,-1,2")); }, "every weight must be positive and finite");
  expect_error([&] { engine_.new_session(knorm("1,nan,2")); }, "every weight must be positive and finite");
  expect_error([&] { engine_.new_session(knorm("1;2;3")); }, "is not a number");
  expect_error([&] { engine_.new_session(knorm("spread")); }, "--layer-weights spread needs --filters with query statistics");
  KvOptions full;
  full.layer_weights = "1,1,1";
  expect_error([&] { engine_.new_session(full); }, "--layer-weights need a --kv-policy");
  KvOptions no_stats = knorm("spread");
  no_stats.filters = write_stats_file(false);
  expect_error([&] { engine_.new_session(no_stats); }, "needs --filters with query statistics");
}

// A model with sliding-window layers: those keep their window and the weights share the budget
// among the global layers only, in the session and in what admission charges for it alike.
TEST(LayerWeightsSlidingWindow, AdmissionChargesWhatTheSessionReserves) {
  ModelOptions mo;
  mo.model = test::fixture("gemma3_f32_mqa_tied.gguf");  // 7 layers, only layer 5 global
  mo.n_ctx = 128;
  mo.n_threads = 1;
  mo.n_batch = 8;
  Engine engine(mo);
  KvOptions kv;
  kv.policy = "knorm";
  kv.budget = 24;
  kv.window = 4;
  kv.layer_weights = "1,1,1,1,1,2,1";
  auto s = engine.new_session(kv);
  EXPECT_EQ(s->cache().capacity(5), 24 + 8);  // the one compressed layer keeps the whole budget
  EXPECT_EQ(engine.session_kv_bytes(kv), s->cache().bytes_reserved());
}

// "spread" is calib::query_spread of the --filters file, for any policy given that file; a state's
// KV options keep the spelling "spread" where it gives the state's weights (a server's own
// options then match a restored slot), else spell out the numbers.
TEST_F(EngineLayerWeights, SpreadComesFromTheFilterFile) {
  KvOptions kv = knorm("spread");
  kv.policy = "tova";
  kv.filters = write_stats_file(true);
  const ModelConfig& c = engine_.model().config();
  const calib::LoadedFilters loaded = calib::load_filters(
      kv.filters, calib::FilterExpectation{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()});
  const std::vector<float> spread = calib::query_spread(loaded.filters);
  ASSERT_EQ(spread.size(), 3u);
  EXPECT_LT(spread[0], spread[2]);  // the file's spreads differ, so the budgets do
  EXPECT_EQ(engine_.layer_weights(kv), spread);
  auto s = engine_.new_session(kv);
  EXPECT_EQ(s->compressor()->config().layer_weights, spread);
  EXPECT_LT(s->cache().capacity(0), s->cache().capacity(2));

  const kv::StateConfig state = state_config(*s, model_fingerprint(engine_.model()));
  EXPECT_EQ(state.layer_weights, spread);
  EXPECT_EQ(kv_options_for_state(state, kv, engine_, "s"), kv);
  KvOptions uniform_base = kv;
  uniform_base.layer_weights.clear();
  const KvOptions spelled = kv_options_for_state(state, uniform_base, engine_, "s");
  EXPECT_EQ(spelled.layer_weights, format_layer_weights(spread));
  EXPECT_EQ(engine_.layer_weights(spelled), spread);
}

}  // namespace
}  // namespace qf::runtime
