// Continuous batching: sessions stepped together through one forward pass (weights read once for
// all of them) give exactly the logits each gets alone, whatever else is in the batch: other
// sessions decoding, another session's prompt chunk, different KV policies and budgets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "kv/policy.h"
#include "model/forward.h"
#include "model/session.h"
#include "tensor/kernels.h"
#include "test_paths.h"
#include "util/error.h"

namespace qf {
namespace {

struct Plan {
  std::string policy;  // "none" = full cache
  int budget = 0;
  std::vector<int32_t> prompt;
  int start_step = 0;  // batched run: joins at this step (its prompt shares a pass with the others' decode)
};

std::unique_ptr<Session> make_session(const Model& m, const Plan& p, ThreadPool* pool) {
  SessionOptions so;
  so.n_ctx = 256;
  so.n_batch = 64;
  so.pool = pool;
  so.n_threads = 2;
  if (p.policy != "none") {
    kv::PolicyOptions po;
    po.seed = 7;
    kv::CompressionConfig cc;
    cc.budget = p.budget;
    cc.window = 4;
    cc.evict_every = 3;
    so.compressor = std::make_unique<kv::Compressor>(kv::make_policy(p.policy, po), po, cc);
  }
  return std::make_unique<Session>(m, std::move(so));
}

std::vector<Plan> plans(int n_vocab) {
  auto tokens = [&](int seed, int n) {
    std::vector<int32_t> t(n);
    for (int i = 0; i < n; ++i) t[i] = static_cast<int32_t>((seed * 7919 + i * 104729) % n_vocab);
    return t;
  };
  return {{"none", 0, tokens(1, 9), 0},
          {"knorm", 16, tokens(2, 13), 0},
          {"streaming", 12, tokens(3, 5), 2},
          {"random", 20, tokens(4, 21), 5},
          {"none", 0, tokens(5, 1), 7}};
}

constexpr int kSteps = 24;

int32_t argmax(std::span<const float> l) {
  return static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
}

// Logits of every step of one plan run alone: the prompt, then greedy decoding.
std::vector<std::vector<float>> run_alone(const Model& m, const Plan& p) {
  ThreadPool pool(2);
  auto s = make_session(m, p, &pool);
  std::vector<std::vector<float>> out;
  std::span<const float> l = s->eval(p.prompt);
  for (int step = 0; step < kSteps; ++step) {
    out.emplace_back(l.begin(), l.end());
    const int32_t next = argmax(l);
    l = s->decode(next);
  }
  return out;
}

void expect_batched_equals_alone(const std::string& path) {
  auto m = Model::load(path);
  const std::vector<Plan> ps = plans(m->config().n_vocab);
  std::vector<std::vector<std::vector<float>>> alone;
  for (const Plan& p : ps) alone.push_back(run_alone(*m, p));

  ThreadPool pool(2);
  Forward fw(*m, 128);
  std::vector<std::unique_ptr<Session>> sessions;
  for (const Plan& p : ps) sessions.push_back(make_session(*m, p, &pool));
  std::vector<int> done(ps.size(), 0);  // steps checked per session
  std::vector<int32_t> next(ps.size());
  for (int step = 0; step < kSteps + 8; ++step) {
    std::vector<BatchItem> items;
    std::vector<size_t> who;
    for (size_t i = 0; i < ps.size(); ++i) {
      if (step < ps[i].start_step || done[i] == kSteps) continue;
      const bool first = step == ps[i].start_step;
      // As the server: a prompt is prompt rows (the AMX engine where there is one), the token a
      // session sampled is a decode row, both kinds in one pass.
      if (first) items.push_back({sessions[i].get(), std::span<const int32_t>(ps[i].prompt), TokenKind::prompt});
      else items.push_back({sessions[i].get(), std::span<const int32_t>(&next[i], 1), TokenKind::decode});
      who.push_back(i);
    }
    if (items.empty()) break;
    const auto logits = Session::eval_batch(items, fw, pool);
    for (size_t j = 0; j < who.size(); ++j) {
      const size_t i = who[j];
      const std::vector<float>& want = alone[i][done[i]];
      ASSERT_EQ(logits[j].size(), want.size());
      for (size_t v = 0; v < want.size(); ++v)
        ASSERT_EQ(logits[j][v], want[v]) << "session " << i << " step " << done[i] << " logit " << v << " (batch of "
                                         << items.size() << ")";
      next[i] = argmax(logits[j]);
      ++done[i];
    }
  }
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_EQ(done[i], kSteps) << "session " << i;
}

// Every SIMD target: a matmul's row must not depend on how many rows share the product.
void on_every_target(const std::string& fixture) {
  for (const std::string& target : available_simd_targets()) {
    SCOPED_TRACE(target);
    ASSERT_TRUE(force_simd_target(target));
    expect_batched_equals_alone(test::fixture(fixture));
  }
  force_simd_target("best");
}

TEST(ModelBatch, FloatFixtureBatchedEqualsAlone) { on_every_target("llama_f32_gqa_tied.gguf"); }
TEST(ModelBatch, QuantizedFixtureBatchedEqualsAlone) { on_every_target("llama_q4_1_mqa.gguf"); }
TEST(ModelBatch, SlidingWindowFixtureBatchedEqualsAlone) { on_every_target("gemma3_f32_mqa_tied.gguf"); }
TEST(ModelBatch, SmolLM2BatchedEqualsAlone) { expect_batched_equals_alone(test::smollm2_path()); }

// Where the AMX engine runs, Model::load puts every matrix in the panel layout (the tied
// token_embd too: its rows are still read); QF_PANELS=0 keeps the rows layout. Decode then runs
// on different engines (VNNI over rows, the AMX engine's numbers over panels): both quantize
// the activations to 8 bits, so one rounding flip in a layer moves the logits by tenths after
// 30 layers (0.4-0.7 measured over these steps); greedy decoding picks the same tokens. Both
// engines are checked against references in tensor_test and against llama.cpp in smollm2_test.
TEST(ModelBatch, SmolLM2PanelLayout) {
  auto panels = Model::load(test::smollm2_path());
  const bool amx = amx_prompt_engine();
  const auto layout = amx ? WeightLayout::panels16 : WeightLayout::rows;
  for (const LayerWeights& w : panels->layers())
    for (const WeightView* v : {&w.wq, &w.wk, &w.wv, &w.wo, &w.ffn_gate, &w.ffn_up, &w.ffn_down})
      EXPECT_EQ(v->layout, layout);
  EXPECT_EQ(panels->token_embd().layout, layout);
  EXPECT_EQ(panels->output().layout, layout);
  if (!amx) GTEST_SKIP() << "no AMX engine here: every matrix keeps the rows layout (checked)";
  ::setenv("QF_PANELS", "0", 1);
  auto rows = Model::load(test::smollm2_path());
  ::setenv("QF_PANELS", "maybe", 1);
  EXPECT_THROW(Model::load(test::smollm2_path()), Error);
  ::unsetenv("QF_PANELS");
  EXPECT_EQ(rows->layers()[3].ffn_down.layout, WeightLayout::rows);
  EXPECT_EQ(rows->token_embd().layout, WeightLayout::rows);
  Plan p{"none", 0, {1, 504, 3458, 314, 260, 7825, 28, 2171}, 0};
  const auto a = run_alone(*panels, p), b = run_alone(*rows, p);
  for (size_t step = 0; step < a.size(); ++step) {
    ASSERT_EQ(argmax(a[step]), argmax(b[step])) << "step " << step;
    float worst = 0.0f;
    for (size_t v = 0; v < a[step].size(); ++v) worst = std::max(worst, std::abs(a[step][v] - b[step][v]));
    EXPECT_LT(worst, 1.5f) << "step " << step;
  }
}

TEST(ModelBatch, BadBatchesAreErrors) {
  auto m = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
  ThreadPool pool(1);
  Forward fw(*m, 4);
  Plan p{"none", 0, {1, 2, 3}, 0};
  auto a = make_session(*m, p, &pool);
  const std::vector<int32_t> three{1, 2, 3}, two{4, 5};
  EXPECT_THROW(Session::eval_batch(std::vector<BatchItem>{{a.get(), three}, {a.get(), two}}, fw, pool), Error);
  auto b = make_session(*m, p, &pool);
  EXPECT_THROW(Session::eval_batch(std::vector<BatchItem>{{a.get(), three}, {b.get(), two}}, fw, pool), Error);
  EXPECT_THROW(Session::eval_batch(std::vector<BatchItem>{{a.get(), {}}}, fw, pool), Error);
  const std::vector<int32_t> bad{-1};
  EXPECT_THROW(Session::eval_batch(std::vector<BatchItem>{{a.get(), bad}}, fw, pool), Error);
  EXPECT_EQ(a->n_past(), 0) << "a refused batch must not advance any session";
}

}  // namespace
}  // namespace qf
