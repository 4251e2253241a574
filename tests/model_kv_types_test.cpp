// The forward pass with every KV storage type (f32, f16, bf16, q8_0, q4_0 keys and values):
// budgets larger than the sequence change nothing, chunked prefill and one-token decoding agree
// with one batch, the stored types stay close to an f32 cache by what their rounding allows,
// memory stays flat under a budget, the key-scoring policies (qfilters, knorm) score the model's
// F32 keys and so evict alike whatever the type, and what a type cannot store is a clear error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "model/model.h"
#include "model/session.h"
#include "test_paths.h"
#include "util/error.h"

namespace {

using qf::kv::KvType;
using qf::kv::KvTypes;

const KvTypes kPairs[] = {{KvType::F32, KvType::F32},   {KvType::F16, KvType::F16},   {KvType::BF16, KvType::BF16},
                          {KvType::Q8_0, KvType::Q8_0}, {KvType::Q8_0, KvType::F16},  {KvType::Q4_0, KvType::Q4_0},
                          {KvType::F16, KvType::Q4_0}};

std::string label(const KvTypes& t) {
  return std::string(qf::kv::kv_type_name(t.k)) + "/" + std::string(qf::kv::kv_type_name(t.v));
}

std::vector<int32_t> random_tokens(int n, int n_vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % n_vocab);
  return t;
}

std::vector<float> all_logits(const qf::Model& m, const std::vector<int32_t>& tokens, KvTypes types, int n_batch,
                              std::unique_ptr<qf::kv::Compressor> comp = nullptr) {
  qf::SessionOptions so;
  so.n_threads = 2;
  so.n_batch = n_batch;
  so.kv_types = types;
  so.compressor = std::move(comp);
  qf::Session s(m, std::move(so));
  auto l = s.eval(tokens, /*all_logits=*/true);
  return {l.begin(), l.end()};
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, static_cast<double>(std::abs(a[i] - b[i])));
  return m / max_abs(b);
}

class ModelKvTypes : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = qf::Model::load(qf::test::fixture("llama_f32_gqa_tied.gguf"));  // head_dim 32, GQA 2
    tokens_ = random_tokens(90, model_->config().n_vocab, 5);
  }
  std::unique_ptr<qf::Model> model_;
  std::vector<int32_t> tokens_;
};

// Every policy, fused or statistics path, with a budget above the sequence gives the full
// cache's logits for the same storage types.
TEST_F(ModelKvTypes, BudgetLargerThanSequenceChangesNothing) {
  const auto& c = model_->config();
  std::vector<float> filters(static_cast<size_t>(c.n_layers) * c.n_kv_heads * c.head_dim);
  std::mt19937 rng(3);
  for (float& x : filters) x = std::normal_distribution<float>()(rng);
  for (const KvTypes& types : kPairs) {
    SCOPED_TRACE(label(types));
    const std::vector<float> full = all_logits(*model_, tokens_, types, 8);
    for (const std::string& name : qf::kv::policy_names()) {
      if (name == "none") continue;
      SCOPED_TRACE(name);
      qf::kv::PolicyOptions po;
      po.filters = filters;
      qf::kv::CompressionConfig cc;
      cc.budget = static_cast<int>(tokens_.size()) + 10;
      cc.window = 2;
      auto comp = std::make_unique<qf::kv::Compressor>(qf::kv::make_policy(name, po), po, cc);
      const std::vector<float> got = all_logits(*model_, tokens_, types, 8, std::move(comp));
      ASSERT_EQ(got.size(), full.size());
      for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], full[i], 1e-5 * (1 + std::abs(full[i]))) << i;
    }
  }
}

// The tiled kernel (prefill chunks) and the per-token kernel (decoding) read the stored types
// alike.
TEST_F(ModelKvTypes, ChunkingAndDecodingAgreeWithOneBatch) {
  for (const KvTypes& types : kPairs) {
    SCOPED_TRACE(label(types));
    const std::vector<float> batch = all_logits(*model_, tokens_, types, 256);
    const std::vector<float> chunked = all_logits(*model_, tokens_, types, 7);
    qf::SessionOptions so;
    so.n_threads = 2;
    so.kv_types = types;
    qf::Session s(*model_, std::move(so));
    std::vector<float> stepped;
    for (int32_t t : tokens_) {
      auto l = s.eval(std::span<const int32_t>(&t, 1));
      stepped.insert(stepped.end(), l.begin(), l.end());
    }
    // As tests/model_test.cpp for the f32 cache: the kernels sum in different orders.
    EXPECT_LT(rel_diff(chunked, batch), 1e-4);
    EXPECT_LT(rel_diff(stepped, batch), 1e-4);
  }
}

// Against an f32 cache, each type moves the logits by about its relative rounding step (f16
// 2^-11, bf16 2^-8, q8_0 ~1/254 and q4_0 ~1/16 of a block's largest value), and by something:
// the type is really used.
TEST_F(ModelKvTypes, StoredTypesStayCloseToF32) {
  const std::vector<float> f32 = all_logits(*model_, tokens_, {}, 256);
  const struct {
    KvTypes types;
    double max_rel;
  } bounds[] = {{{KvType::F16, KvType::F16}, 2e-3},   {{KvType::BF16, KvType::BF16}, 1.5e-2},
                {{KvType::Q8_0, KvType::Q8_0}, 2e-2}, {{KvType::Q8_0, KvType::F16}, 2e-2},
                {{KvType::Q4_0, KvType::Q4_0}, 2e-1}};
  for (const auto& b : bounds) {
    const double d = rel_diff(all_logits(*model_, tokens_, b.types, 256), f32);
    std::printf("%-10s max |logit - f32 cache's| / max |logit| = %.2e\n", label(b.types).c_str(), d);
    EXPECT_LT(d, b.max_rel) << label(b.types);
    EXPECT_GT(d, 1e-7) << label(b.types) << ": no effect, is the type stored?";
  }
}

// Bytes per token and layer follow the block layouts; under a budget the reservation is fixed
// and the quantized cache holds what the budget allows.
TEST_F(ModelKvTypes, BytesFollowTheTypesAndStayFlat) {
  const auto& c = model_->config();
  const int64_t per_head_f32 = 2 * c.head_dim * 4;
  const struct {
    KvTypes types;
    int64_t bytes_per_head;  // key + value of one token in one KV head
  } cases[] = {{{KvType::F32, KvType::F32}, per_head_f32},
               {{KvType::F16, KvType::F16}, 2 * c.head_dim * 2},
               {{KvType::Q8_0, KvType::Q8_0}, 2 * c.head_dim / 32 * 34},
               {{KvType::Q4_0, KvType::F16}, c.head_dim / 32 * 18 + c.head_dim * 2}};
  for (const auto& x : cases) {
    SCOPED_TRACE(label(x.types));
    qf::kv::PolicyOptions po;
    qf::kv::CompressionConfig cc;
    cc.budget = 64;
    cc.window = 8;
    cc.evict_every = 4;
    qf::SessionOptions so;
    so.n_ctx = 2000;
    so.n_threads = 1;
    so.kv_types = x.types;
    so.compressor = std::make_unique<qf::kv::Compressor>(qf::kv::make_policy("knorm", po), po, cc);
    qf::Session s(*model_, std::move(so));
    EXPECT_EQ(s.cache().bytes_per_token_per_layer(), x.bytes_per_head * c.n_kv_heads);
    s.eval(random_tokens(200, c.n_vocab, 1));
    const int64_t reserved = s.cache().bytes_reserved();
    for (int i = 0; i < 10; ++i) s.eval(random_tokens(150, c.n_vocab, 2 + i));
    EXPECT_EQ(s.cache().bytes_reserved(), reserved);
    EXPECT_LE(s.cache().bytes_used(), int64_t{64} * c.n_layers * x.bytes_per_head * c.n_kv_heads);
    EXPECT_EQ(s.cache().full_cache_bytes(1700), int64_t{1700} * c.n_layers * x.bytes_per_head * c.n_kv_heads);
  }
}

// The behaviour before key scores, for comparison: the wrapped policy scores the stored (rounded)
// keys, because the cache keeps no scores.
class ScoresStoredKeys final : public qf::kv::Policy {
 public:
  explicit ScoresStoredKeys(std::unique_ptr<qf::kv::Policy> inner) : inner_(std::move(inner)) {}
  std::string_view name() const override { return inner_->name(); }
  void score_head(const qf::kv::Cache& c, int l, int h, std::span<float> s) override { inner_->score_head(c, l, h, s); }
  void score_layer(const qf::kv::Cache& c, int l, std::vector<std::vector<float>>& s) override { inner_->score_layer(c, l, s); }

 private:
  std::unique_ptr<qf::kv::Policy> inner_;
};

// Kept positions of every (layer, KV head), after each step of a long streaming run:
// trace[step * n_layers * n_kv_heads + layer * n_kv_heads + head].
using KeptTrace = std::vector<std::vector<int32_t>>;

KeptTrace streaming_trace(const qf::Model& m, const std::vector<int32_t>& tokens, KvTypes types, const std::string& policy,
                          const std::vector<float>& filters, bool stored_keys = false, const qf::QkHook& hook = nullptr,
                          std::vector<std::vector<float>>* scores = nullptr) {
  qf::kv::PolicyOptions po;
  po.filters = filters;
  qf::kv::CompressionConfig cc;
  cc.budget = 24;
  cc.window = 4;
  std::unique_ptr<qf::kv::Policy> p = qf::kv::make_policy(policy, po);
  if (stored_keys) p = std::make_unique<ScoresStoredKeys>(std::move(p));
  qf::SessionOptions so;
  so.n_threads = 1;
  so.n_batch = 16;
  so.kv_types = types;
  so.compressor = std::make_unique<qf::kv::Compressor>(std::move(p), po, cc);
  qf::Session s(m, std::move(so));
  s.set_qk_hook(hook);
  s.eval(std::span<const int32_t>(tokens.data(), 16));
  KeptTrace trace;
  const auto& shape = s.cache().shape();
  for (size_t t = 16; t < tokens.size(); ++t) {
    s.eval(std::span<const int32_t>(&tokens[t], 1));
    for (int l = 0; l < shape.n_layers; ++l)
      for (int h = 0; h < shape.n_kv_heads; ++h) {
        const qf::kv::HeadCache& hc = s.cache().head(l, h);
        trace.emplace_back(hc.pos.begin(), hc.pos.begin() + hc.n);
        if (scores && t + 1 == tokens.size()) scores->emplace_back(hc.key_score.begin(), hc.key_score.begin() + hc.n);
      }
  }
  return trace;
}

std::vector<float> random_filters(const qf::ModelConfig& c, uint32_t seed) {
  std::vector<float> f(static_cast<size_t>(c.n_layers) * c.n_kv_heads * c.head_dim);
  std::mt19937 rng(seed);
  for (float& x : f) x = std::normal_distribution<float>()(rng);
  return f;
}

// (head, step) pairs whose kept set differs between two traces: in layer 0, and in all layers.
std::pair<size_t, size_t> trace_differences(const KeptTrace& a, const KeptTrace& b, int heads_per_layer, int n_layers) {
  size_t layer0 = 0, all = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const bool differ = a[i] != b[i];
    all += differ;
    layer0 += differ && static_cast<int>(i % (static_cast<size_t>(heads_per_layer) * n_layers)) < heads_per_layer;
  }
  return {layer0, all};
}

// qfilters and knorm score each key once, from the model's F32 key, so over a long streaming run
// (budget 24, 280 eviction rounds per head) layer 0, whose keys depend only on the tokens, keeps
// exactly f32's tokens in every head with every storage type. Deeper layers' keys differ a little
// between types, through the attention outputs of the layers below; their kept sets still differ
// in fewer (head, step) pairs than when the policies scored the stored, rounded keys, and with
// f16 almost never.
TEST_F(ModelKvTypes, KeyScoringPoliciesEvictAlikeForEveryType) {
  const auto& c = model_->config();
  const std::vector<float> filters = random_filters(c, 4);
  const std::vector<int32_t> tokens = random_tokens(300, c.n_vocab, 11);
  for (const std::string policy : {"qfilters", "knorm", "knorm+layer"}) {
    SCOPED_TRACE(policy);
    const KeptTrace f32 = streaming_trace(*model_, tokens, {}, policy, filters);
    const KeptTrace f32_stored = streaming_trace(*model_, tokens, {}, policy, filters, true);
    EXPECT_EQ(f32_stored, f32);  // an f32 cache stores the F32 keys: same scores either way
    for (const KvTypes& types : kPairs) {
      SCOPED_TRACE(label(types));
      const auto [layer0, all] = trace_differences(streaming_trace(*model_, tokens, types, policy, filters), f32,
                                                   c.n_kv_heads, c.n_layers);
      const auto [layer0_before, all_before] = trace_differences(
          streaming_trace(*model_, tokens, types, policy, filters, true), f32, c.n_kv_heads, c.n_layers);
      std::printf("%-12s %-10s (head, step) pairs kept differently from f32: layer 0 %3zu (stored keys: %3zu), "
                  "all layers %4zu (stored keys: %4zu) of %zu\n",
                  policy.c_str(), label(types).c_str(), layer0, layer0_before, all, all_before, f32.size());
      EXPECT_EQ(layer0, 0u);
      EXPECT_LE(all, all_before);
      if (types.k == KvType::F16 && types.v == KvType::F16) {
        EXPECT_LE(all, f32.size() / 200);
      }
    }
  }
}

// The kept score of every slot is the dot of the model's F32 key (as the QK hook saw it) with
// its head's filter, computed in double here, for a stored type that rounds (q8_0).
TEST_F(ModelKvTypes, KeptScoresAreTheFiltersDotWithTheModelsKeys) {
  const auto& c = model_->config();
  const std::vector<float> filters = random_filters(c, 5);
  const std::vector<int32_t> tokens = random_tokens(120, c.n_vocab, 12);
  // keys[layer][pos]: n_kv_heads x head_dim floats.
  std::vector<std::vector<std::vector<float>>> keys(c.n_layers, std::vector<std::vector<float>>(tokens.size()));
  const size_t kv_dim = static_cast<size_t>(c.n_kv_heads) * c.head_dim;
  auto hook = [&](int l, const float*, const float* k, const int32_t* pos, int n) {
    for (int t = 0; t < n; ++t) keys[l][pos[t]].assign(k + t * kv_dim, k + (t + 1) * kv_dim);
  };
  std::vector<std::vector<float>> scores;
  const KeptTrace trace = streaming_trace(*model_, tokens, {KvType::Q8_0, KvType::Q8_0}, "qfilters", filters, false, hook, &scores);
  const size_t last = trace.size() - scores.size();
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const size_t head = static_cast<size_t>(l) * c.n_kv_heads + h;
      const std::vector<int32_t>& kept = trace[last + head];
      ASSERT_EQ(kept.size(), scores[head].size());
      for (size_t j = 0; j < kept.size(); ++j) {
        const float* key = keys[l][kept[j]].data() + static_cast<size_t>(h) * c.head_dim;
        const float* f = filters.data() + head * c.head_dim;
        double want = 0;
        for (int i = 0; i < c.head_dim; ++i) want += static_cast<double>(key[i]) * f[i];
        ASSERT_NEAR(scores[head][j], want, 1e-5 * (1 + std::abs(want))) << "layer " << l << " head " << h;
      }
    }
}

TEST_F(ModelKvTypes, WhatATypeCannotStoreIsAnError) {
  // head_dim 16 is not a whole q8_0 / q4_0 block; f16 needs none.
  auto mha = qf::Model::load(qf::test::fixture("llama_f32_mha.gguf"));
  ASSERT_EQ(mha->config().head_dim, 16);
  for (KvTypes types : {KvTypes{KvType::Q8_0, KvType::F16}, KvTypes{KvType::F16, KvType::Q4_0}}) {
    qf::SessionOptions so;
    so.kv_types = types;
    try {
      qf::Session s(*mha, std::move(so));
      ADD_FAILURE() << label(types) << " accepted head_dim 16";
    } catch (const qf::Error& e) {
      EXPECT_NE(std::string(e.what()).find("head_dim 16"), std::string::npos) << e.what();
    }
  }
  qf::SessionOptions ok;
  ok.kv_types = {KvType::F16, KvType::BF16};
  EXPECT_NO_THROW(qf::Session(*mha, std::move(ok)));
  // A type the cache does not store, and sessions of different types sharing a prefill.
  qf::SessionOptions bad;
  bad.kv_types = {KvType::Q4_1, KvType::F16};
  EXPECT_THROW(qf::Session(*model_, std::move(bad)), qf::Error);
  qf::SessionOptions a, b;
  b.kv_types = {KvType::Q8_0, KvType::Q8_0};
  qf::Session sa(*model_, std::move(a)), sb(*model_, std::move(b));
  sa.eval(tokens_);
  EXPECT_THROW(sb.copy_state_from(sa), qf::Error);
}

}  // namespace
