// Session state files: save, restore, continue gives logits bit-identical to never having saved,
// for every policy x several KV storage types (fixtures: a GQA llama and a Gemma 3 with sliding-
// window layers; and SmolLM2 with its calibrated Q-Filters through the runtime Engine); a file
// for another model, type, shape or policy, a truncated or corrupt file, is a one-line qf::Error
// and leaves the session as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#include "kv/compressor.h"
#include "kv/policy.h"
#include "kv/state_file.h"
#include "model/session.h"
#include "runtime/engine.h"
#include "runtime/session_state.h"
#include "test_paths.h"
#include "util/error.h"
#include "util/hash.h"

namespace qf {
namespace {

namespace fs = std::filesystem;

struct KvSetup {
  std::string policy = "none";
  kv::KvTypes types;
  int budget = 24, window = 4, evict_every = 3;
  float ratio = 0;
  float filter_blend = kv::PolicyOptions{}.filter_blend;  // qfilters_adaptive
  int filter_horizon = kv::PolicyOptions{}.filter_horizon;
  float filter_decay = kv::PolicyOptions{}.filter_decay;  // qfilters_max
  std::vector<float> layer_weights;                        // per-layer budgets
};

// Deterministic stand-ins for a filter file: filters, and the calibrated query statistics of
// qfilters_rope / ea_calibrated (mean and `rank` covariance factors per layer and query head).
struct PolicyData {
  std::vector<float> filters, query_mean, query_factors;
  int n_query_heads = 0, rank = 2, future_positions = 512;
};

std::vector<float> pseudo_random(size_t n, uint32_t salt) {
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = static_cast<float>((i * 2654435761u + salt) % 1000) / 500.0f - 1.0f;
  return x;
}

PolicyData make_policy_data(const ModelConfig& c, uint32_t salt = 0) {
  PolicyData d;
  d.filters = pseudo_random(static_cast<size_t>(c.n_layers) * c.n_kv_heads * c.head_dim, salt);
  d.n_query_heads = c.n_heads;
  const size_t per_head = static_cast<size_t>(c.n_layers) * c.n_heads * c.head_dim;
  d.query_mean = pseudo_random(per_head, salt + 1);
  d.query_factors = pseudo_random(per_head * d.rank, salt + 2);
  return d;
}

bool uses_query_stats(const std::string& policy) {
  const auto names = kv::query_stats_policy_names();
  return std::ranges::find(names, kv::base_policy_name(policy)) != names.end();
}

std::unique_ptr<Session> make_session(const Model& m, const KvSetup& s, ThreadPool& pool, const PolicyData& data) {
  SessionOptions so;
  so.n_ctx = 192;
  so.n_batch = 16;
  so.pool = &pool;
  so.kv_types = s.types;
  if (s.policy != "none") {
    kv::PolicyOptions po;
    po.seed = 11;
    po.snapkv_window = 8;
    if (kv::base_policy_name(s.policy) == "qfilters" || uses_query_stats(s.policy)) po.filters = data.filters;
    if (uses_query_stats(s.policy)) {
      po.query_mean = data.query_mean;
      po.query_factors = data.query_factors;
      po.n_query_heads = data.n_query_heads;
      po.stats_rank = data.rank;
      po.query_future_positions = data.future_positions;
      po.filter_blend = s.filter_blend;
      po.filter_horizon = s.filter_horizon;
      po.filter_decay = s.filter_decay;
    }
    kv::CompressionConfig cc;
    cc.budget = s.ratio > 0 ? 0 : s.budget;
    cc.window = s.ratio > 0 ? 0 : s.window;
    cc.evict_every = s.ratio > 0 ? 1 : s.evict_every;
    cc.prefill_ratio = s.ratio;
    cc.layer_weights = s.layer_weights;
    so.compressor = std::make_unique<kv::Compressor>(kv::make_policy(s.policy, po), po, cc);
  }
  return std::make_unique<Session>(m, std::move(so));
}

std::vector<int32_t> tokens(int seed, int n, int n_vocab) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<int32_t>((seed * 7919 + i * 104729 + 13) % n_vocab);
  return t;
}

int32_t argmax(std::span<const float> l) { return static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin()); }

// Appends a question (a chunk of tokens), then decodes greedily: every step's logits.
std::vector<std::vector<float>> continue_from(Session& s, const std::vector<int32_t>& question, int steps) {
  std::vector<std::vector<float>> out;
  std::span<const float> l = s.eval(question);
  for (int i = 0; i < steps; ++i) {
    out.emplace_back(l.begin(), l.end());
    const int32_t next = argmax(l);
    l = s.eval(std::span<const int32_t>(&next, 1));
  }
  return out;
}

void expect_bit_identical(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].size(), b[i].size());
    ASSERT_EQ(std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(float)), 0) << "step " << i;
  }
}

// Reads a document, decodes a little (so streaming policies have evicted), saves; then the
// original and a fresh session restored from the bytes both read the same question and decode.
void expect_round_trip(const Model& m, const KvSetup& setup) {
  const int V = m.config().n_vocab;
  const PolicyData filters = make_policy_data(m.config());
  const std::string fp = runtime::model_fingerprint(m);
  ThreadPool pool(1);
  auto original = make_session(m, setup, pool, filters);
  std::vector<int32_t> history = tokens(1, 70, V);
  std::span<const float> l = original->prefill(history);
  for (int i = 0; i < 5; ++i) {
    const int32_t next = argmax(l);
    history.push_back(next);
    l = original->eval(std::span<const int32_t>(&next, 1));
  }
  if (setup.policy != "none" && setup.ratio == 0) {
    ASSERT_GT(original->compressor()->stats().evicted, 0) << "the test should save a compressed cache";
  }
  const std::vector<uint8_t> bytes = kv::encode_state(runtime::capture_state(*original, fp, history));

  auto restored = make_session(m, setup, pool, filters);
  restored->eval(tokens(9, 20, V));  // something to overwrite
  const kv::SessionState st = kv::decode_state(bytes, "<memory>");
  EXPECT_EQ(st.tokens, history);
  runtime::restore_state(*restored, st, fp, "<memory>");
  EXPECT_EQ(restored->n_past(), original->n_past());
  EXPECT_EQ(restored->cache().tokens_held(), original->cache().tokens_held());

  const std::vector<int32_t> question = tokens(2, 23, V);
  expect_bit_identical(continue_from(*original, question, 12), continue_from(*restored, question, 12));
  if (setup.policy != "none") {
    EXPECT_EQ(restored->compressor()->stats().evicted, original->compressor()->stats().evicted);
  }
}

// Every policy, those scoring with calibrated query statistics and layer-consistent variants too
// (random's generator must survive inside one).
std::vector<std::string> all_policies() {
  std::vector<std::string> names = kv::policy_names();
  for (const std::string& n : kv::query_stats_policy_names()) names.push_back(n);
  for (const char* n : {"qfilters+layer", "ea_calibrated+layer", "expected_attention+layer", "qfilters_adaptive+layer",
                        "random+layer"})
    names.emplace_back(n);
  return names;
}

void every_policy_and_type(const std::string& fixture) {
  auto m = Model::load(test::fixture(fixture));
  const kv::KvType F32 = kv::KvType::F32, F16 = kv::KvType::F16, BF16 = kv::KvType::BF16, Q8 = kv::KvType::Q8_0,
                   Q4 = kv::KvType::Q4_0;
  const std::vector<kv::KvTypes> types = {{F32, F32}, {F16, F16}, {BF16, Q8}, {Q8, Q4}};
  for (const std::string& policy : all_policies())
    for (const kv::KvTypes& t : types) {
      SCOPED_TRACE(policy + " " + std::string(kv::kv_type_name(t.k)) + "/" + std::string(kv::kv_type_name(t.v)));
      KvSetup s;
      s.policy = policy;
      s.types = t;
      expect_round_trip(*m, s);
    }
  {  // with a horizon above 1 the recent queries carry over from before the save
    SCOPED_TRACE("qfilters_adaptive blend 0.5 horizon 16");
    KvSetup s;
    s.policy = "qfilters_adaptive";
    s.filter_blend = 0.5f;
    s.filter_horizon = 16;
    expect_round_trip(*m, s);
  }
  {  // qfilters_max without memory keeps no state
    SCOPED_TRACE("qfilters_max decay inf");
    KvSetup s;
    s.policy = "qfilters_max";
    s.filter_decay = std::numeric_limits<float>::infinity();
    expect_round_trip(*m, s);
  }
  for (const std::string policy : {"snapkv", "knorm", "h2o"}) {  // prefill compression (--kv-ratio)
    SCOPED_TRACE(std::string(policy) + " ratio");
    KvSetup s;
    s.policy = policy;
    s.ratio = 0.5f;
    expect_round_trip(*m, s);
  }
}

// Per-layer budgets: each layer's heads hold their own budget; saved and restored, the session
// continues bit-identically (streaming and prefill compression, several policies).
TEST(SessionState, PerLayerBudgetsContinueBitIdentically) {
  auto m = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
  for (const std::string policy : {"knorm", "tova", "h2o", "qfilters_adaptive+layer", "random"}) {
    SCOPED_TRACE(policy);
    KvSetup s;
    s.policy = policy;
    s.budget = 30;
    s.layer_weights = {2.0f, 1.0f, 0.5f};  // budgets 51, 26, 13 (mean weight 7/6)
    expect_round_trip(*m, s);
  }
  {  // the weights really size the caches: budget + one prefill chunk (n_batch 16) per layer
    KvSetup s;
    s.policy = "knorm";
    s.budget = 30;
    s.layer_weights = {2.0f, 1.0f, 0.5f};
    ThreadPool pool(1);
    auto session = make_session(*m, s, pool, make_policy_data(m->config()));
    EXPECT_EQ(session->cache().capacity(0), 51 + 16);
    EXPECT_EQ(session->cache().capacity(1), 26 + 16);
    EXPECT_EQ(session->cache().capacity(2), 13 + 16);
  }
  KvSetup ratio;
  ratio.policy = "snapkv";
  ratio.ratio = 0.5f;
  ratio.layer_weights = {1.0f, 1.0f, 0.5f};
  expect_round_trip(*m, ratio);
}

TEST(SessionState, EveryPolicyAndTypeContinuesBitIdentically) { every_policy_and_type("llama_f32_gqa_tied.gguf"); }
TEST(SessionState, SlidingWindowModelContinuesBitIdentically) { every_policy_and_type("gemma3_f32_mqa_tied.gguf"); }

// The KV options rebuilt from a state's header (a server restoring a slot) are the options the
// state's session was made with, so a request with those options continues it.
TEST(SessionState, KvOptionsRoundTripThroughTheStateHeader) {
  runtime::ModelOptions mo;
  mo.model = test::fixture("llama_f32_gqa_tied.gguf");
  mo.n_ctx = 128;
  mo.n_threads = 1;
  runtime::Engine engine(mo);
  const std::string fp = runtime::model_fingerprint(engine.model());
  runtime::KvOptions knorm;
  knorm.policy = "knorm";
  knorm.budget = 24, knorm.window = 4, knorm.evict_every = 3, knorm.skip_layers = 1;
  knorm.cache_type_k = "q8_0";
  runtime::KvOptions random = knorm;
  random.policy = "random", random.seed = 7, random.cache_type_k = "", random.cache_type_v = "f32";
  runtime::KvOptions snap;
  snap.policy = "snapkv", snap.ratio = 0.5f;
  runtime::KvOptions weighted = knorm;
  weighted.layer_weights = "0.5,1.25,3";
  for (const runtime::KvOptions& kv : {runtime::KvOptions{}, knorm, random, snap, weighted}) {
    SCOPED_TRACE(kv.policy);
    const kv::StateConfig c = runtime::state_config(*engine.new_session(kv), fp);
    EXPECT_EQ(c.stats.key_scores, kv.policy == "knorm");
    EXPECT_EQ(runtime::kv_options_for_state(c, runtime::KvOptions{}, engine, "s"), kv);
  }
  kv::StateConfig with_filters = runtime::state_config(*engine.new_session(knorm), fp);
  with_filters.filters_hash = "00112233aabbccdd";
  EXPECT_THROW(runtime::kv_options_for_state(with_filters, {}, engine, "s"), Error);
}

TEST(SessionState, Crc32MatchesZlib) {
  const std::string check = "123456789";
  EXPECT_EQ(crc32(std::span(reinterpret_cast<const uint8_t*>(check.data()), check.size())), 0xCBF43926u);
  EXPECT_EQ(crc32({}), 0u);
}

// A saved llama fixture state, its session, and what it must refuse.
class StateErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
    fp_ = runtime::model_fingerprint(*model_);
    data_ = make_policy_data(model_->config());
    setup_.policy = "random";
    auto s = make_session(*model_, setup_, pool_, data_);
    s->prefill(tokens(3, 60, model_->config().n_vocab));
    bytes_ = kv::encode_state(runtime::capture_state(*s, fp_, {}));
  }
  // Restoring `bytes` into a session of `setup` fails with a message containing `expect`, and the
  // session continues exactly as one that never saw the file.
  void expect_refused(const std::vector<uint8_t>& bytes, const KvSetup& setup, const std::string& expect) {
    expect_refused(bytes, setup, expect, data_);
  }
  void expect_refused(const std::vector<uint8_t>& bytes, const KvSetup& setup, const std::string& expect,
                      const PolicyData& data) {
    const int V = model_->config().n_vocab;
    auto victim = make_session(*model_, setup, pool_, data);
    auto untouched = make_session(*model_, setup, pool_, data);
    victim->eval(tokens(5, 30, V));
    untouched->eval(tokens(5, 30, V));
    try {
      runtime::restore_state(*victim, kv::decode_state(bytes, "state.bin"), fp_, "state.bin");
      ADD_FAILURE() << "accepted; expected an error containing: " << expect;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(expect), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
      EXPECT_EQ(msg.rfind("state.bin", 0), 0u) << msg;
    }
    expect_bit_identical(continue_from(*victim, tokens(6, 5, V), 3), continue_from(*untouched, tokens(6, 5, V), 3));
  }

  ThreadPool pool_{1};
  std::unique_ptr<Model> model_;
  std::string fp_;
  PolicyData data_;
  KvSetup setup_;
  std::vector<uint8_t> bytes_;
};

TEST_F(StateErrors, TruncatedFiles) {
  for (size_t keep : {size_t{0}, size_t{7}, size_t{31}, size_t{32}, bytes_.size() / 2, bytes_.size() - 1}) {
    SCOPED_TRACE(keep);
    const std::vector<uint8_t> cut(bytes_.begin(), bytes_.begin() + keep);
    expect_refused(cut, setup_, keep < 32 ? "not a qfilters state file" : "truncated");
  }
}

TEST_F(StateErrors, CorruptBytes) {
  for (size_t at : {size_t{40}, bytes_.size() / 3, bytes_.size() - 2}) {
    std::vector<uint8_t> bad = bytes_;
    bad[at] ^= 0x10;
    expect_refused(bad, setup_, "checksum mismatch");
  }
  std::vector<uint8_t> version = bytes_;
  version[8] = 9;
  expect_refused(version, setup_, "version 9 is not supported");
}

TEST_F(StateErrors, ForeignPolicyTypesAndShapes) {
  KvSetup other = setup_;
  other.policy = "knorm";
  expect_refused(bytes_, other, "saved with --kv-policy random");
  other = setup_;
  other.budget = 32;
  expect_refused(bytes_, other, "budget 24");
  other = setup_;
  other.types = {kv::KvType::F16, kv::KvType::F16};
  expect_refused(bytes_, other, "saved with KV types f32/f32");
  other.policy = "none";
  other.types = {};
  expect_refused(bytes_, other, "this session uses a full cache");
}

// A state pins its per-layer budget weights: restoring it under uniform budgets, or other weights,
// is refused (the heads would hold more than their budgets, or evict differently).
TEST_F(StateErrors, OtherLayerWeights) {
  KvSetup uneven = setup_;
  uneven.layer_weights = {2.0f, 1.0f, 0.5f};
  auto s = make_session(*model_, uneven, pool_, data_);
  s->prefill(tokens(3, 60, model_->config().n_vocab));
  const std::vector<uint8_t> bytes = kv::encode_state(runtime::capture_state(*s, fp_, {}));
  EXPECT_EQ(kv::decode_state(bytes, "s").config.layer_weights, uneven.layer_weights);
  expect_refused(bytes, setup_, "saved with per-layer budget weights 2,1,0.5; this session uses uniform budgets");
  KvSetup other = uneven;
  other.layer_weights = {1.0f, 1.0f, 2.0f};
  expect_refused(bytes, other, "this session uses per-layer budget weights 1,1,2 (--layer-weights)");
  expect_refused(bytes_, uneven, "saved with uniform budgets; this session uses per-layer budget weights 2,1,0.5");
}

// A version 3 file (before layer weights) still restores, and the older version cannot carry them.
TEST_F(StateErrors, Version3StillRestores) {
  kv::SessionState st = kv::decode_state(bytes_, "s");
  EXPECT_EQ(st.version, kv::kStateVersion);
  st.version = 3;
  const std::vector<uint8_t> v3 = kv::encode_state(st);
  EXPECT_EQ(v3.size(), bytes_.size() - sizeof(uint64_t));  // no layer-weight count
  const kv::SessionState back = kv::decode_state(v3, "s");
  EXPECT_EQ(back.version, 3u);
  EXPECT_TRUE(back.config.layer_weights.empty());
  const int V = model_->config().n_vocab;
  auto restored = make_session(*model_, setup_, pool_, data_);
  auto original = make_session(*model_, setup_, pool_, data_);
  runtime::restore_state(*restored, back, fp_, "s");
  runtime::restore_state(*original, kv::decode_state(bytes_, "s"), fp_, "s");
  expect_bit_identical(continue_from(*original, tokens(6, 9, V), 4), continue_from(*restored, tokens(6, 9, V), 4));
  st.config.layer_weights = {1.0f, 2.0f, 1.0f};
  EXPECT_THROW(kv::encode_state(st), Error);
}

TEST_F(StateErrors, ForeignModel) {
  auto gemma = Model::load(test::fixture("gemma3_f32_mqa_tied.gguf"));
  EXPECT_NE(runtime::model_fingerprint(*gemma), fp_);
  ThreadPool pool(1);
  auto s = make_session(*gemma, setup_, pool, make_policy_data(gemma->config()));
  try {
    runtime::restore_state(*s, kv::decode_state(bytes_, "state.bin"), runtime::model_fingerprint(*gemma), "state.bin");
    ADD_FAILURE() << "a llama state restored into gemma";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("saved for another model"), std::string::npos) << e.what();
  }
  EXPECT_EQ(s->n_past(), 0);
}

// A state pins what eviction reads from the filter file: a position-aware policy's state is
// refused with other query statistics or other future positions; a qfilters state's hash reads
// only the filters, as it always has (states saved before the statistics existed still restore).
TEST_F(StateErrors, OtherFilterFileData) {
  KvSetup rope = setup_;
  rope.policy = "qfilters_rope";
  auto s = make_session(*model_, rope, pool_, data_);
  s->prefill(tokens(3, 60, model_->config().n_vocab));
  const std::vector<uint8_t> bytes = kv::encode_state(runtime::capture_state(*s, fp_, {}));
  // Only what the filter file gives differs: the message says which settings to match.
  const std::string kOtherFilters = "saved with other Q-Filters or query-statistics settings";
  PolicyData other_stats = data_;
  other_stats.query_mean[5] += 0.25f;
  expect_refused(bytes, rope, kOtherFilters, other_stats);
  PolicyData other_future = data_;
  other_future.future_positions = 64;
  expect_refused(bytes, rope, kOtherFilters, other_future);

  // The filters that follow the recent queries also follow their blend and horizon.
  for (const std::string policy : {"qfilters_adaptive", "qfilters_max"}) {
    KvSetup adaptive = setup_;
    adaptive.policy = policy;
    auto a = make_session(*model_, adaptive, pool_, data_);
    a->prefill(tokens(3, 60, model_->config().n_vocab));
    const std::vector<uint8_t> adaptive_bytes = kv::encode_state(runtime::capture_state(*a, fp_, {}));
    KvSetup other_blend = adaptive;
    other_blend.filter_blend = 0.25f;
    expect_refused(adaptive_bytes, other_blend, kOtherFilters);
    KvSetup other_horizon = adaptive;
    other_horizon.filter_horizon = 8;
    expect_refused(adaptive_bytes, other_horizon, kOtherFilters);
    if (policy == "qfilters_max") {  // and qfilters_max its memory's decay
      KvSetup other_decay = adaptive;
      other_decay.filter_decay = 0.5f;
      expect_refused(adaptive_bytes, other_decay, kOtherFilters);
    }
  }

  KvSetup qfilters = setup_;
  qfilters.policy = "qfilters";
  Fnv1a64 h;
  h.add_u64(data_.filters.size());
  h.add(std::span(reinterpret_cast<const uint8_t*>(data_.filters.data()), data_.filters.size() * sizeof(float)));
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h.value()));
  EXPECT_EQ(runtime::state_config(*make_session(*model_, qfilters, pool_, data_), fp_).filters_hash, hex);
}

TEST_F(StateErrors, StateLargerThanTheContext) {
  SessionOptions so;
  so.n_ctx = 32;  // the state holds 60 positions
  so.pool = &pool_;
  kv::PolicyOptions po;
  po.seed = 11;
  po.snapkv_window = 8;
  const kv::CompressionConfig cc{.budget = 24, .window = 4, .evict_every = 3};
  so.compressor = std::make_unique<kv::Compressor>(kv::make_policy("random", po), po, cc);
  Session small(*model_, std::move(so));
  EXPECT_THROW(runtime::restore_state(small, kv::decode_state(bytes_, "s"), fp_, "s"), Error);
  EXPECT_EQ(small.n_past(), 0);
}

TEST_F(StateErrors, BadPolicyStateChangesNothing) {
  kv::SessionState st = kv::decode_state(bytes_, "s");
  st.policy_state = "not a generator";
  expect_refused(kv::encode_state(st), setup_, "random policy: the saved generator state is not valid");
}

// SmolLM2 with its calibrated Q-Filters through the runtime Engine and state files on disk, as
// qf run --save-state / --load-state and the server use them.
TEST(SessionState, SmolLM2QFiltersFileRoundTrip) {
  const std::string filters = test::source_dir() + "/models/SmolLM2-135M-Instruct.qfilters.safetensors";
  if (!fs::exists(filters)) GTEST_SKIP() << "no " << filters;
  runtime::ModelOptions mo;
  mo.model = test::smollm2_path();
  mo.n_ctx = 512;
  mo.n_threads = 2;
  mo.n_batch = 64;
  runtime::Engine engine(mo);
  runtime::KvOptions kv;
  kv.policy = "qfilters";
  kv.filters = filters;
  kv.budget = 96;
  kv.window = 16;
  kv.evict_every = 8;
  const int V = engine.model().config().n_vocab;
  const std::string fp = runtime::model_fingerprint(engine.model());
  auto original = engine.new_session(kv);
  const std::vector<int32_t> doc = tokens(4, 200, V);
  original->prefill(doc);
  const fs::path path = fs::temp_directory_path() / ("qf_state_test_" + std::to_string(::getpid()) + ".qfstate");
  runtime::save_state_file(path.string(), *original, fp, doc);

  auto restored = engine.new_session(kv);
  const kv::SessionState st = runtime::load_state_file(path.string(), *restored, fp);
  fs::remove(path);
  EXPECT_EQ(st.tokens, doc);
  EXPECT_EQ(st.config.policy, "qfilters");
  EXPECT_EQ(st.config.filters_hash.size(), 16u);
  const std::vector<int32_t> question = tokens(8, 12, V);
  expect_bit_identical(continue_from(*original, question, 8), continue_from(*restored, question, 8));

  runtime::KvOptions other = kv;
  other.budget = 128;
  auto mismatched = engine.new_session(other);
  runtime::save_state_file(path.string(), *original, fp, {});
  EXPECT_THROW(runtime::load_state_file(path.string(), *mismatched, fp), Error);
  fs::remove(path);
  EXPECT_THROW(runtime::load_state_file(path.string(), *mismatched, fp), Error);  // gone
}

}  // namespace
}  // namespace qf
