// The forward pass with every KV storage type (f32, f16, bf16, q8_0, q4_0 keys and values):
// budgets larger than the sequence change nothing, chunked prefill and one-token decoding agree
// with one batch, the stored types stay close to an f32 cache by what their rounding allows,
// memory stays flat under a budget, and what a type cannot store is a clear error.
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
