// The evaluation suite: metrics against hand-computed values, the results log's resume rules, and
// the work-sharing shortcuts (one prefill copied to every policy, snapkv's window rebuilt from
// captured queries) against the straightforward computation they replace, on a tiny fixture model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "eval/corpus.h"
#include "eval/engine.h"
#include "eval/fidelity.h"
#include "eval/metrics.h"
#include "eval/needle.h"
#include "eval/niah.h"
#include "eval/ppl.h"
#include "eval/results.h"
#include "model/model.h"
#include "model/session.h"
#include "sample/sampler.h"
#include "tensor/kernels.h"
#include "eval_fixture.h"
#include "test_paths.h"
#include "util/error.h"

namespace qf::eval {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// ---- metrics ----------------------------------------------------------------------------------

TEST(Metrics, TokenNllIsMinusLogSoftmax) {
  const std::vector<float> logits{1.0f, 2.0f, 3.0f};
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_NEAR(token_nll(logits, 0), -std::log(std::exp(1.0) / z), 1e-12);
  EXPECT_NEAR(token_nll(logits, 2), -std::log(std::exp(3.0) / z), 1e-12);
  // Large logits do not overflow: the max is subtracted.
  const std::vector<float> big{1000.0f, 1000.0f};
  EXPECT_NEAR(token_nll(big, 1), std::log(2.0), 1e-12);
  EXPECT_THROW(token_nll(logits, 3), Error);
  EXPECT_THROW(token_nll(logits, -1), Error);
}

TEST(Metrics, PerplexityAndGapRatio) {
  const std::vector<double> nll{std::log(2.0), std::log(8.0)};
  EXPECT_NEAR(perplexity(nll), 4.0, 1e-12);  // geometric mean of 2 and 8
  EXPECT_TRUE(std::isnan(perplexity({})));
  EXPECT_DOUBLE_EQ(gap_ratio(12.0, 10.0, 20.0), 0.2);
  EXPECT_DOUBLE_EQ(gap_ratio(10.0, 10.0, 20.0), 0.0);
  EXPECT_DOUBLE_EQ(gap_ratio(20.0, 10.0, 20.0), 1.0);
  EXPECT_TRUE(std::isnan(gap_ratio(12.0, 10.0, 10.0)));
  EXPECT_TRUE(std::isnan(gap_ratio(NAN, 10.0, 20.0)));
}

TEST(Metrics, AverageRanksShareTies) {
  const std::vector<double> x{10, 20, 20, 5, std::numeric_limits<double>::infinity(), 20};
  const std::vector<double> r = average_ranks(x);
  EXPECT_EQ(r, (std::vector<double>{2, 4, 4, 1, 6, 4}));
  EXPECT_THROW(average_ranks(std::vector<double>{1, NAN}), Error);
}

TEST(Metrics, SpearmanKnownValues) {
  const std::vector<double> a{1, 2, 3, 4, 5};
  EXPECT_NEAR(spearman(a, std::vector<double>{2, 4, 8, 16, 1000}), 1.0, 1e-12);  // monotone, not linear
  EXPECT_NEAR(spearman(a, std::vector<double>{5, 4, 3, 2, 1}), -1.0, 1e-12);
  // Hand computation: ranks b = (1, 3, 2, 5, 4); d = (0, -1, 1, -1, 1); rho = 1 - 6*4/(5*24) = 0.8.
  EXPECT_NEAR(spearman(a, std::vector<double>{10, 30, 20, 50, 40}), 0.8, 1e-12);
  // With ties (scipy.stats.spearmanr([1,2,3,4],[1,1,2,2]) = 0.894427...).
  EXPECT_NEAR(spearman(std::vector<double>{1, 2, 3, 4}, std::vector<double>{1, 1, 2, 2}), 0.8944271909999159, 1e-12);
  EXPECT_TRUE(std::isnan(spearman(a, std::vector<double>{3, 3, 3, 3, 3})));
  EXPECT_TRUE(std::isnan(spearman(std::vector<double>{1}, std::vector<double>{1})));
  EXPECT_THROW(spearman(a, std::vector<double>{1, 2}), Error);
}

TEST(Metrics, AnswerMatching) {
  EXPECT_TRUE(answer_matches(" The special magic number is 7341952.", "7341952"));
  EXPECT_TRUE(answer_matches("7,341,952", "7341952"));
  EXPECT_TRUE(answer_matches("It is 7341952", "7341952"));
  EXPECT_FALSE(answer_matches("73419520", "7341952"));  // a longer number is not the number
  EXPECT_FALSE(answer_matches("734195", "7341952"));
  EXPECT_FALSE(answer_matches("no number here", "7341952"));
  EXPECT_FALSE(answer_matches("7341952", ""));
  EXPECT_EQ(digit_runs("a 12, b 3.4 c 5. 6"), (std::vector<std::string>{"12", "34", "5", "6"}));
}

TEST(Metrics, PartialCreditCountsCorrectLeadingDigits) {
  EXPECT_DOUBLE_EQ(leading_digits_credit(" 716.", "7162423"), 3.0 / 7);  // a correct prefix
  EXPECT_DOUBLE_EQ(leading_digits_credit(" 7162423.", "7162423"), 1.0);
  EXPECT_DOUBLE_EQ(leading_digits_credit("7,162,423", "7162423"), 1.0);
  EXPECT_DOUBLE_EQ(leading_digits_credit(" 11", "7162423"), 0.0);         // a guess
  EXPECT_DOUBLE_EQ(leading_digits_credit("1 or 71624", "7162423"), 5.0 / 7);  // the best run counts
  EXPECT_DOUBLE_EQ(leading_digits_credit(" 71624239", "7162423"), 1.0);   // not exact, all leading digits right
  EXPECT_FALSE(answer_matches(" 71624239", "7162423"));
  EXPECT_DOUBLE_EQ(leading_digits_credit("no digits", "7162423"), 0.0);
  EXPECT_DOUBLE_EQ(leading_digits_credit("123", ""), 0.0);
}

TEST(Metrics, BootstrapIntervalOfAMean) {
  // 100 units, 40 ones and 60 zeros: the mean's standard error is sqrt(.4 * .6 / 100) = 0.049, so
  // the 95% percentile interval is about 0.4 -+ 1.96 * 0.049 = [0.304, 0.496].
  std::vector<double> x(100, 0.0);
  std::fill(x.begin(), x.begin() + 40, 1.0);
  auto mean_of = [&](std::span<const int> ix) {
    double s = 0;
    for (int i : ix) s += x[i];
    return s / static_cast<double>(ix.size());
  };
  const Interval ci = bootstrap_ci(100, mean_of, 4000);
  EXPECT_NEAR(ci.lo, 0.304, 0.02);
  EXPECT_NEAR(ci.hi, 0.496, 0.02);
  // Deterministic (fixed seed), and narrower at a lower level.
  const Interval again = bootstrap_ci(100, mean_of, 4000);
  EXPECT_EQ(ci.lo, again.lo);
  EXPECT_EQ(ci.hi, again.hi);
  const Interval narrow = bootstrap_ci(100, mean_of, 4000, 0.5);
  EXPECT_GT(narrow.lo, ci.lo);
  EXPECT_LT(narrow.hi, ci.hi);
  // Identical units: no spread. One unit: the statistic itself.
  const Interval same = bootstrap_ci(5, [](std::span<const int>) { return 2.5; });
  EXPECT_EQ(same.lo, 2.5);
  EXPECT_EQ(same.hi, 2.5);
  // Mostly undefined statistics, or no units: no interval.
  EXPECT_TRUE(std::isnan(bootstrap_ci(10, [](std::span<const int>) { return NAN; }).lo));
  EXPECT_TRUE(std::isnan(bootstrap_ci(0, mean_of).hi));
  EXPECT_THROW(bootstrap_ci(10, mean_of, 0), Error);
  EXPECT_THROW(bootstrap_ci(10, mean_of, 100, 1.0), Error);
}

TEST(Niah, AnswerCompleteAndNumbers) {
  EXPECT_FALSE(answer_complete(""));
  EXPECT_FALSE(answer_complete(" The"));
  EXPECT_FALSE(answer_complete(" 734"));       // the number may go on
  EXPECT_FALSE(answer_complete(" 7,341,"));    // a separator may be followed by more digits
  EXPECT_FALSE(answer_complete(" 7341952."));  // "." could still be a separator
  EXPECT_TRUE(answer_complete(" 7341952.\n"));
  EXPECT_TRUE(answer_complete(" 7341952 is"));
  EXPECT_TRUE(answer_complete(" unsure\n"));
  EXPECT_FALSE(answer_complete("\n"));
  const std::string a = needle_number(42, 1024, 3, 7), b = needle_number(42, 1024, 4, 7);
  EXPECT_EQ(a.size(), 7u);
  EXPECT_NE(a[0], '0');
  EXPECT_NE(a, b);
  EXPECT_EQ(a, needle_number(42, 1024, 3, 7));  // fixed seed, fixed numbers
  EXPECT_NE(a, needle_number(43, 1024, 3, 7));
  NiahSettings st;
  EXPECT_EQ(st.depths().size(), 11u);
  EXPECT_DOUBLE_EQ(st.depths()[10], 100.0);
  EXPECT_EQ(effective_lengths(st, 8192), (std::vector<int>{1024, 2048, 4096, 8192 - st.answer_tokens()}));
  st.compressions = {1};
  EXPECT_THROW(st.validate(), Error);
  st.compressions = {4};
  st.digits = {3, 7};
  EXPECT_EQ(st.answer_tokens(), 15);  // the longest number + 8
  st.digits = {};
  EXPECT_THROW(st.validate(), Error);
  st.digits = {7};
  st.seeds = {};
  EXPECT_THROW(st.validate(), Error);
  st.seeds = {1};
  st.skip_layers = {2, -1};
  EXPECT_THROW(st.validate(), Error);
}

TEST(Metrics, MeanMedian) {
  EXPECT_DOUBLE_EQ(mean(std::vector<double>{1, 2, 6}), 3.0);
  EXPECT_DOUBLE_EQ(median(std::vector<double>{5, 1, 3}), 3.0);
  EXPECT_DOUBLE_EQ(median(std::vector<double>{4, 1, 3, 2}), 2.5);
  EXPECT_TRUE(std::isnan(median({})));
}

// ---- results log, corpus ----------------------------------------------------------------------

using test::TempDir;

TEST(CellLog, ResumesOnlyUnderTheSameSettings) {
  TempDir tmp;
  const std::string path = (tmp.path / "sub" / "x.jsonl").string();
  const json settings{{"a", 1}};
  {
    CellLog log(path, settings, true);
    EXPECT_EQ(log.size(), 0u);
    log.add("k1", {{"v", 1}});
    log.add("k2", {{"v", 2}});
  }
  {
    CellLog log(path, settings, true);
    EXPECT_EQ(log.resumed(), 2u);
    EXPECT_TRUE(log.has("k1"));
    EXPECT_EQ(log.get("k2")["v"], 2);
    EXPECT_THROW(log.get("k3"), Error);
  }
  EXPECT_THROW(CellLog(path, json{{"a", 2}}, true), Error);
  {
    CellLog log(path, json{{"a", 2}}, false);  // fresh: starts over
    EXPECT_EQ(log.size(), 0u);
  }
  {
    CellLog log(path, json{{"a", 2}}, true);
    EXPECT_EQ(log.size(), 0u);
    log.add("k1", {{"v", 1}});
  }
  // A torn last line (killed mid-write) is dropped, and appending resumes on a clean line.
  {
    std::ofstream(path, std::ios::app) << "{\"key\": \"k2\", \"v\"";
  }
  {
    CellLog log(path, json{{"a", 2}}, true);
    EXPECT_EQ(log.size(), 1u);
    log.add("k2", {{"v", 2}});
  }
  CellLog log(path, json{{"a", 2}}, true);
  EXPECT_EQ(log.size(), 2u);
  EXPECT_EQ(log.cells()[1]["v"], 2);
  // A file that is not ours is refused.
  const std::string other = (tmp.path / "other.jsonl").string();
  std::ofstream(other) << "hello\nworld\n";
  EXPECT_THROW(CellLog(other, settings, true), Error);
}

TEST(Corpus, SelectsByYear) {
  TempDir tmp;
  for (const char* name : {"1949_a.txt", "1950_b.txt", "2001_c.txt", "notes.txt", "2005_d.md"})
    std::ofstream(tmp.path / name) << name;
  EXPECT_EQ(year_of("2001_george_w_bush_r.txt"), 2001);
  EXPECT_EQ(year_of("notes.txt"), -1);
  EXPECT_EQ(year_of("200x_a.txt"), -1);
  auto docs = load_documents({tmp.path.string()}, 1950, 0);
  ASSERT_EQ(docs.size(), 3u);  // 1950, 2001, and the year-less file; .md ignored
  EXPECT_EQ(docs[0].name, "1950_b.txt");
  EXPECT_EQ(docs[0].text, "1950_b.txt");
  EXPECT_EQ(docs[2].name, "notes.txt");
  docs = load_documents({tmp.path.string()}, 0, 1949);
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0].name, "1949_a.txt");
  EXPECT_THROW(load_documents({(tmp.path / "missing").string()}), Error);
  docs = load_documents({tmp.path.string()}, 3000, 0);  // year-less files always pass the filter
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_EQ(docs[0].name, "notes.txt");
  fs::remove(tmp.path / "notes.txt");
  EXPECT_THROW(load_documents({tmp.path.string()}, 3000, 0), Error);
}

// ---- work sharing on a tiny model ---------------------------------------------------------------

class TinyModel : public test::FixtureModel {
 protected:
  void load(const std::string& fixture) {
    FixtureModel::load(fixture, /*n_threads=*/2, /*filter_seed=*/3);
    ctx_.policy_options.seed = 7;
    ctx_.policy_options.snapkv_window = 8;
  }
  static std::vector<std::string> all_policies() {
    return {"none", "qfilters", "knorm", "streaming", "random", "snapkv", "tova", "h2o"};
  }
};

class Tiny : public TinyModel {
 protected:
  void SetUp() override { load("llama_f32_gqa_tied.gguf"); }
};

// Gemma 3's layout: window 5 on layers 0-4 and 6, layer 5 global, scores scaled by 1/sqrt(32).
class TinyGemma : public TinyModel {
 protected:
  void SetUp() override {
    load("gemma3_f32_mqa_tied.gguf");
    const ModelConfig& c = model_->config();
    ASSERT_EQ(c.n_layers, 7);
    for (int l = 0; l < c.n_layers; ++l) ASSERT_EQ(c.attention(l).window, l == 5 ? 0 : 5) << l;
    ASSERT_FLOAT_EQ(c.attention(0).scale, 1.0f / std::sqrt(32.0f));
  }
};

TEST_F(Tiny, CopiedStateContinuesExactly) {
  const auto t = tokens(70, 1);
  auto a = new_session(ctx_, 128, "none", {}, {.accumulate = true, .last_query = true});
  auto b = new_session(ctx_, 128, "none", {}, {.accumulate = true});
  a->eval(std::span<const int32_t>(t.data(), 60));
  b->copy_state_from(*a);
  EXPECT_EQ(b->n_past(), 60);
  for (int i = 60; i < 70; ++i) {
    const auto la = a->eval(std::span<const int32_t>(&t[i], 1));
    const std::vector<float> va(la.begin(), la.end());
    const auto lb = b->eval(std::span<const int32_t>(&t[i], 1));
    ASSERT_EQ(va, std::vector<float>(lb.begin(), lb.end())) << "token " << i;
  }
  for (int l = 0; l < model_->config().n_layers; ++l)
    for (int h = 0; h < model_->config().n_kv_heads; ++h) {
      const auto& ha = a->cache().head(l, h);
      const auto& hb = b->cache().head(l, h);
      ASSERT_EQ(ha.n, hb.n);
      for (int j = 0; j < ha.n; ++j) ASSERT_EQ(ha.attn_sum[j], hb.attn_sum[j]);
    }
  // A cache too small for the source is an error, not a silent truncation.
  kv::CompressionConfig cc;
  cc.budget = 20;
  cc.window = 4;
  auto small = new_session(ctx_, 128, "knorm", cc);
  EXPECT_THROW(small->copy_state_from(*a), Error);
}

// QueryTail's rebuilt statistics equal what a prefill under snapkv accumulates itself.
void expect_query_tail_rebuilds_snapkv(const EvalContext& ctx, const std::vector<int32_t>& prompt) {
  const ModelConfig& c = ctx.model->config();
  // Reference: the engine's own snapkv statistics over the prompt's last `window` queries.
  auto ref = new_session(ctx, 128, "none", {}, {.window = ctx.policy_options.snapkv_window});
  ref->prefill(prompt);
  auto base = new_session(ctx, 128, "none", {}, {.accumulate = true});
  QueryTail tail(c, ctx.policy_options.snapkv_window);
  base->set_qk_hook(tail.hook());
  base->prefill(prompt);
  tail.fill_window_attention(base->cache(), base->pool());
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const auto& a = ref->cache().head(l, h);
      const auto& b = base->cache().head(l, h);
      ASSERT_EQ(a.n, b.n);
      for (int j = 0; j < a.n; ++j) ASSERT_EQ(a.attn_sum[j], b.attn_sum[j]) << "layer " << l << " head " << h << " slot " << j;
    }
}

TEST_F(Tiny, QueryTailRebuildsSnapKvStatistics) {
  expect_query_tail_rebuilds_snapkv(ctx_, tokens(77, 2));  // not a multiple of the batch: the window spans chunks
}

// The local layers hold window + batch tokens, more than a query may see: the rebuilt statistics
// must apply each layer's window as the prefill did.
TEST_F(TinyGemma, QueryTailRebuildsSnapKvStatisticsUnderSlidingWindows) {
  expect_query_tail_rebuilds_snapkv(ctx_, tokens(77, 2));
}

// The shared path (one prefill, copies, external compression) must answer exactly as a session
// that prefills the context under the policy itself.
TEST_F(Tiny, NeedleRunnerMatchesDirectPrefillCompression) {
  const auto context = tokens(90, 4), question = tokens(7, 5);
  const int max_new = 6;
  // A runner serving every policy, and one per policy. Attention-based policies are exact in the
  // shared runner (same attention kernel as their own session); score-only ones are exact in a
  // runner of their own (fused kernel) and differ by float rounding only in the shared one.
  NeedleRunner shared(ctx_, 128, all_policies());
  shared.prefill(context);
  for (const auto& p : all_policies()) {
    NeedleRunner own(ctx_, 128, {p});
    own.prefill(context);
    NeedleRunner& runner = is_attention_policy(ctx_, p) ? shared : own;
    for (int x : {1, 4}) {
      if (p == "none" && x != 1) continue;
      for (int skip : {0, 1}) {
        SCOPED_TRACE(p + " x" + std::to_string(x) + " skip " + std::to_string(skip));
        const std::vector<int> watch{40, 41, 42, 43, 44, 45, 46};
        const NeedleRunner::Answer got = runner.answer(p, x, skip, question, max_new, nullptr, nullptr, watch);
        // Direct: the policy's own session.
        kv::CompressionConfig cc;
        cc.prefill_ratio = ratio_for_compression(x);
        cc.skip_layers = skip;
        auto s = new_session(ctx_, 128, p, cc);
        s->prefill(context);
        int64_t watched = 0, pairs = 0;
        for (int l = 0; l < model_->config().n_layers; ++l)
          for (int h = 0; h < model_->config().n_kv_heads; ++h) {
            const auto& a = s->cache().head(l, h);
            if (l >= skip) {
              pairs += static_cast<int64_t>(watch.size());
              for (int j = 0; j < a.n; ++j) watched += std::count(watch.begin(), watch.end(), a.pos[j]);
            }
            const auto& b = runner.work().cache().head(l, h);
            const std::vector<int32_t> pa(a.pos.begin(), a.pos.begin() + a.n);
            // runner.work() has also seen the question and answer: compare the context part.
            std::vector<int32_t> pb;
            for (int j = 0; j < b.n; ++j)
              if (b.pos[j] < static_cast<int32_t>(context.size())) pb.push_back(b.pos[j]);
            ASSERT_EQ(pa, pb) << "kept positions, layer " << l << " head " << h;
          }
        std::span<const float> logits = s->eval(question);
        std::vector<int32_t> want;
        for (int i = 0; i < max_new; ++i) {
          want.push_back(argmax(logits));
          if (i + 1 < max_new) logits = s->eval(std::span<const int32_t>(&want.back(), 1));
        }
        EXPECT_EQ(got.tokens, want);
        EXPECT_DOUBLE_EQ(got.watched_kept, static_cast<double>(watched) / pairs);
        if (x == 1) {
          EXPECT_EQ(got.watched_kept, 1.0);
        }
        if (p == "streaming" && x == 4) {
          EXPECT_EQ(got.watched_kept, 0.0);  // sinks + newest only
        }
        if (x == 4) {
          EXPECT_LT(got.kept_per_head, context.size() / 3.0);
        } else {
          EXPECT_EQ(got.kept_per_head, context.size());
        }
        if (&runner != &shared) {  // float rounding apart, the shared runner agrees
          EXPECT_EQ(shared.answer(p, x, skip, question, max_new, nullptr, nullptr).tokens, want);
        }
      }
    }
  }
  EXPECT_THROW(shared.answer("h2o", 0, 0, question, 1, nullptr, nullptr), Error);
  NeedleRunner few(ctx_, 128, {"knorm"});
  EXPECT_THROW(few.answer("knorm", 2, 0, question, 1, nullptr, nullptr), Error);  // before prefill
  few.prefill(context);
  EXPECT_THROW(few.answer("h2o", 2, 0, question, 1, nullptr, nullptr), Error);  // undeclared policy
}

TEST_F(Tiny, NeedleRunnerStopsOnRequest) {
  const auto context = tokens(40, 6), question = tokens(5, 7);
  NeedleRunner runner(ctx_, 128, {"none"});
  runner.prefill(context);
  const auto all = runner.answer("none", 1, 0, question, 8, nullptr, nullptr);
  ASSERT_EQ(all.tokens.size(), 8u);
  // End-of-generation tokens are not part of the answer; done() keeps the token that ends it.
  const int32_t third = all.tokens[2];
  auto a = runner.answer("none", 1, 0, question, 8, [&](int32_t t) { return t == third; }, nullptr);
  EXPECT_EQ(a.tokens, std::vector<int32_t>(all.tokens.begin(), std::find(all.tokens.begin(), all.tokens.end(), third)));
  a = runner.answer("none", 1, 0, question, 8, nullptr, [](const std::vector<int32_t>& v) { return v.size() == 3; });
  EXPECT_EQ(a.tokens, std::vector<int32_t>(all.tokens.begin(), all.tokens.begin() + 3));
}

// The ppl cells must equal the straightforward run: the policy's own session through the document.
TEST_F(Tiny, StreamingPerplexityMatchesDirectDecoding) {
  TempDir tmp;
  PplSettings st;
  st.budgets = {40, 72};
  st.window = 8;
  st.evict_every = 2;
  st.n_tokens = 150;
  st.n_docs = 1;
  st.skip_layers = 1;
  const std::vector<TokenDoc> docs{{"doc", tokens(150, 8)}};
  const auto policies = all_policies();
  CellLog log((tmp.path / "ppl.jsonl").string(), st.to_json(), true);
  run_ppl(ctx_, docs, st, policies, log);
  const int N = st.n_tokens, n_vocab = model_->config().n_vocab;
  const auto& x = docs[0].tokens;

  // Full cache: one token at a time (no batching) gives the same NLL up to float rounding.
  std::vector<double> full(N - 1);
  {
    auto s = new_session(ctx_, N, "none", {});
    for (int t = 0; t < N - 1; ++t) full[t] = token_nll(s->decode(x[t]), x[t + 1]);
    const json& cell = log.get("doc|0|none");
    ASSERT_EQ(cell["nll"].size(), static_cast<size_t>(N - 1));
    for (int t = 0; t < N - 1; ++t) EXPECT_NEAR(cell["nll"][t].get<double>(), full[t], 2e-4) << t;
  }
  for (int b : st.budgets)
    for (const auto& p : policies) {
      if (p == "none") continue;
      SCOPED_TRACE(p + " B=" + std::to_string(b));
      kv::CompressionConfig cc;
      cc.budget = b;
      cc.window = st.window;
      cc.evict_every = st.evict_every;
      cc.skip_layers = st.skip_layers;
      auto s = new_session(ctx_, N, p, cc);
      s->eval(std::span<const int32_t>(x.data(), b), false, TokenKind::decode);  // batched, as the shared base does
      const json& cell = log.get("doc|" + std::to_string(b) + "|" + p);
      ASSERT_EQ(cell["nll"].size(), static_cast<size_t>(N - 1 - b));
      EXPECT_GT(cell["evicted"].get<int64_t>(), 0);
      for (int t = b; t < N - 1; ++t) {
        const double want = token_nll(s->decode(x[t]), x[t + 1]);
        ASSERT_NEAR(cell["nll"][t - b].get<double>(), want, 6e-6) << "target " << t + 1;
      }
      (void)n_vocab;
    }

  // Summary: full = every cell's none NLL; a policy's "all" perplexity mixes the full cache's NLL
  // before the budget with its own after it.
  const PplSummary sum = summarize_ppl(log, docs, st, policies);
  const json& res = sum.json["results"];
  ASSERT_EQ(res.size(), st.budgets.size() * policies.size());
  auto row = [&](int b, const std::string& p) {
    for (const auto& r : res)
      if (r["budget"] == b && r["policy"] == p) return r;
    ADD_FAILURE() << "no row " << b << " " << p;
    return json();
  };
  const json& fcell = log.get("doc|0|none");
  std::vector<double> fn;
  for (const auto& v : fcell["nll"]) fn.push_back(v.get<double>());
  EXPECT_NEAR(row(40, "none")["ppl_all"].get<double>(), perplexity(fn), 1e-5);
  EXPECT_NEAR(row(40, "none")["ppl_after_budget"].get<double>(),
              perplexity(std::vector<double>(fn.begin() + 40, fn.end())), 1e-5);
  const json& kcell = log.get("doc|72|knorm");
  std::vector<double> kn(fn.begin(), fn.begin() + 72);
  for (const auto& v : kcell["nll"]) kn.push_back(v.get<double>());
  EXPECT_NEAR(row(72, "knorm")["ppl_all"].get<double>(), perplexity(kn), 1e-5);
  const double pf = row(72, "none")["ppl_after_budget"], ps = row(72, "streaming")["ppl_after_budget"],
               pk = row(72, "knorm")["ppl_after_budget"];
  EXPECT_NEAR(row(72, "knorm")["gap_ratio_after_budget"].get<double>(), (pk - pf) / (ps - pf), 1e-5);
  EXPECT_NEAR(row(72, "streaming")["gap_ratio_after_budget"].get<double>(), 1.0, 1e-9);
  EXPECT_NE(sum.csv.find("budget,policy,ppl_all"), std::string::npos);
  EXPECT_NE(sum.curve_csv.find("40,knorm,1,32,"), std::string::npos);

  // Resume: nothing left to do, nothing recomputed.
  CellLog again((tmp.path / "ppl.jsonl").string(), st.to_json(), true);
  const size_t n = again.size();
  run_ppl(ctx_, docs, st, policies, again);
  EXPECT_EQ(again.size(), n);
}

TEST_F(Tiny, PplSettingsAreChecked) {
  PplSettings st;
  st.n_tokens = 100;
  st.window = 8;
  st.budgets = {8};
  EXPECT_THROW(st.validate(), Error);  // budget <= window
  st.budgets = {99};
  EXPECT_THROW(st.validate(), Error);  // nothing to evict
  st.budgets = {20};
  st.evict_every = 13;
  EXPECT_THROW(st.validate(), Error);
  st.evict_every = 12;
  EXPECT_NO_THROW(st.validate());
  const std::vector<TokenDoc> docs{{"a", tokens(50, 1)}, {"b", tokens(120, 2)}};
  EXPECT_THROW(select_docs(docs, 2, 100), Error);
  const auto sel = select_docs(docs, 1, 100);
  ASSERT_EQ(sel.size(), 1u);
  EXPECT_EQ(sel[0].name, "b");
  EXPECT_EQ(sel[0].tokens.size(), 100u);
}

// Brute-force double-precision reference of the fidelity target: key j's attention from each
// later query i that sees it (j > i - window), averaged over those queries.
std::vector<std::vector<double>> brute_force_target(const std::vector<float>& q, const std::vector<float>& k, int T,
                                                    int H, int KV, int D, double scale, int window) {
  const int group = H / KV;
  auto sees = [&](int i, int j) { return j <= i && (window == 0 || j > i - window); };
  std::vector<std::vector<double>> want(KV, std::vector<double>(T, 0.0));
  for (int kvh = 0; kvh < KV; ++kvh) {
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      for (int i = 1; i < T; ++i) {
        std::vector<double> s(i + 1, 0.0);
        double mx = -1e300, z = 0;
        for (int j = 0; j <= i; ++j) {
          if (!sees(i, j)) continue;
          double dot = 0;
          for (int e = 0; e < D; ++e) dot += double(q[(size_t(i) * H + h) * D + e]) * k[(size_t(j) * KV + kvh) * D + e];
          mx = std::max(mx, s[j] = dot * scale);
        }
        for (int j = 0; j <= i; ++j)
          if (sees(i, j)) z += (s[j] = std::exp(s[j] - mx));
        for (int j = 0; j < i; ++j)
          if (sees(i, j)) want[kvh][j] += s[j] / z / group;
      }
    }
    for (int j = 0; j < T; ++j) {
      int later = 0;
      for (int i = j + 1; i < T; ++i) later += sees(i, j);
      want[kvh][j] = later ? want[kvh][j] / later : std::numeric_limits<double>::quiet_NaN();
    }
  }
  return want;
}

TEST(Fidelity, MeanReceivedAttentionMatchesBruteForce) {
  const int T = 23, H = 4, KV = 2, D = 8;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  std::vector<float> q(size_t(T) * H * D), k(size_t(T) * KV * D);
  for (auto& v : q) v = nd(rng);
  for (auto& v : k) v = nd(rng);
  ThreadPool pool(2);
  // The usual 1/sqrt(D), another scale, sliding windows (1: no key has a later query).
  for (const LayerAttention att : {LayerAttention{1.0f / std::sqrt(float(D)), 0}, LayerAttention{0.7f, 0},
                                   LayerAttention{0.7f, 5}, LayerAttention{0.35f, 2}, LayerAttention{0.35f, 1}}) {
    SCOPED_TRACE("scale " + std::to_string(att.scale) + " window " + std::to_string(att.window));
    const auto got = mean_received_attention(q.data(), k.data(), T, H, KV, D, att, pool);
    const auto want = brute_force_target(q, k, T, H, KV, D, att.scale, att.window);
    for (int kvh = 0; kvh < KV; ++kvh)
      for (int j = 0; j < T; ++j) {
        if (std::isnan(want[kvh][j])) {
          EXPECT_TRUE(std::isnan(got[kvh][j])) << kvh << " " << j;
          continue;
        }
        EXPECT_NEAR(got[kvh][j], want[kvh][j], 1e-6 * std::max(1.0, want[kvh][j])) << kvh << " " << j;
      }
    EXPECT_TRUE(std::isnan(got[0][T - 1]));
  }
  EXPECT_THROW(mean_received_attention(q.data(), k.data(), T, 3, 2, D, {0.5f, 0}, pool), Error);
  EXPECT_THROW(mean_received_attention(q.data(), k.data(), T, H, KV, D, {0.5f, -1}, pool), Error);
}

TEST_F(Tiny, FidelityCellsAreSpearmanOfPolicyScoreAndTarget) {
  TempDir tmp;
  FidelitySettings st;
  st.n_tokens = 64;
  st.n_docs = 1;
  const std::vector<TokenDoc> docs{{"d", tokens(64, 9)}};
  const auto policies = all_policies();
  CellLog log((tmp.path / "fid.jsonl").string(), st.to_json(), true);
  run_fidelity(ctx_, docs, st, policies, log);
  const json& cell = log.get("d");
  const ModelConfig& c = model_->config();
  for (const auto& p : policies) {
    if (p == "none") {
      EXPECT_FALSE(cell["spearman"].contains(p));
      continue;
    }
    ASSERT_TRUE(cell["spearman"].contains(p)) << p;
    ASSERT_EQ(cell["spearman"][p].size(), static_cast<size_t>(c.n_layers));
    for (const auto& layer : cell["spearman"][p])
      for (const auto& v : layer)
        if (!v.is_null()) {
          EXPECT_GE(v.get<double>(), -1.0);
          EXPECT_LE(v.get<double>(), 1.0);
        }
  }
  // Independent recomputation for knorm and qfilters: hook the queries and keys, brute-force the
  // target, score the keys by hand.
  std::vector<std::vector<float>> qs(c.n_layers), ks(c.n_layers);
  // Same attention kernel as the run (the policies need attention statistics), so same keys.
  auto s = new_session(ctx_, 64, "none", {}, union_needs(ctx_, policies));
  s->set_qk_hook([&](int l, const float* q, const float* k, const int32_t*, int n) {
    qs[l].insert(qs[l].end(), q, q + size_t(n) * c.n_heads * c.head_dim);
    ks[l].insert(ks[l].end(), k, k + size_t(n) * c.n_kv_heads * c.head_dim);
  });
  s->eval(docs[0].tokens);
  ThreadPool pool(1);
  const int T = st.n_tokens, D = c.head_dim;
  for (int l = 0; l < c.n_layers; ++l) {
    const auto target = mean_received_attention(qs[l].data(), ks[l].data(), T, c.n_heads, c.n_kv_heads, D,
                                                c.attention(l), pool);
    for (int h = 0; h < c.n_kv_heads; ++h) {
      std::vector<double> kn(T - 1), qf(T - 1), tg(target[h].begin(), target[h].end() - 1);
      const float* f = filters_.data() + (size_t(l) * c.n_kv_heads + h) * D;
      for (int j = 0; j < T - 1; ++j) {
        const float* key = ks[l].data() + (size_t(j) * c.n_kv_heads + h) * D;
        double nn = 0, dot = 0;
        for (int e = 0; e < D; ++e) nn += double(key[e]) * key[e], dot += double(key[e]) * f[e];
        (void)nn;
        // Layer 0 keys of repeated tokens have equal norms (RoPE preserves them) up to rounding:
        // compute the norm in float exactly as the policy does so ties break the same way.
        kn[j] = -std::sqrt(dot_f32(key, key, D));
        qf[j] = dot;
      }
      EXPECT_NEAR(cell["spearman"]["knorm"][l][h].get<double>(), spearman(kn, tg), 2e-5);
      EXPECT_NEAR(cell["spearman"]["qfilters"][l][h].get<double>(), spearman(qf, tg), 2e-5);
    }
  }
  const FidelitySummary sum = summarize_fidelity(ctx_, log, docs, st, policies);
  ASSERT_TRUE(sum.json.contains("qfilters_beats_knorm"));
  EXPECT_EQ(sum.json["qfilters_beats_knorm"]["heads"], c.n_layers * c.n_kv_heads);
  for (const auto& r : sum.json["results"])
    EXPECT_EQ(r["circular"].get<bool>(), r["policy"] == "snapkv" || r["policy"] == "tova" || r["policy"] == "h2o");
}

// The summary groups answers by (digits, skip, policy, compression) over lengths, depths and
// seeds, with partial credit beside exact match and an interval over the prompts.
TEST(Niah, SummaryGroupsSeedsDigitsAndSkips) {
  TempDir dir;
  NiahSettings st;
  st.lengths = {512};
  st.n_depths = 2;
  st.compressions = {4};
  st.skip_layers = {2, 20};
  st.digits = {3};
  st.seeds = {1, 2};
  CellLog log((dir.path / "n.jsonl").string(), st.to_json(), false);
  auto add = [&](int di, uint64_t seed, const std::string& policy, int x, int skip, const std::string& answer) {
    const std::string key = "512|" + std::to_string(di) + "|s" + std::to_string(seed) + "|d3|" + policy + "|x" +
                            std::to_string(x) + "|k" + std::to_string(skip);
    log.add(key, {{"correct", answer == "123"}, {"partial", leading_digits_credit(answer, "123")}, {"number_kept", 0.5}});
  };
  for (int di = 0; di < 2; ++di)
    for (uint64_t seed : {1u, 2u}) {
      add(di, seed, "none", 1, 0, "123");
      add(di, seed, "knorm", 4, 2, di == 0 ? "123" : "12");  // right at depth 0, a prefix at depth 1
      add(di, seed, "knorm", 4, 20, "123");
    }
  const NiahSummary sum = summarize_niah(log, st, {"none", "knorm"}, 8192);
  ASSERT_EQ(sum.json["results"].size(), 3u);  // none once, knorm per skip
  for (const auto& r : sum.json["results"]) {
    EXPECT_EQ(r["n"], 4);
    EXPECT_EQ(r["digits"], 3);
    if (r["policy"] == "knorm" && r["skip_layers"] == 2) {
      EXPECT_DOUBLE_EQ(r["accuracy"].get<double>(), 0.5);
      EXPECT_NEAR(r["partial"].get<double>(), (1.0 + 2.0 / 3) / 2, 1e-4);
      EXPECT_LE(r["accuracy_ci"][0].get<double>(), 0.5);
      EXPECT_GE(r["accuracy_ci"][1].get<double>(), 0.5);
      EXPECT_LT(r["accuracy_ci"][0].get<double>(), r["accuracy_ci"][1].get<double>());
    } else {
      EXPECT_DOUBLE_EQ(r["accuracy"].get<double>(), 1.0);
      EXPECT_EQ(r["accuracy_ci"][0].get<double>(), 1.0);
    }
  }
  // Grid: one row per (group, length, depth), seeds averaged.
  EXPECT_EQ(sum.json["grid"].size(), 3u * 2);
  EXPECT_NE(sum.csv.find("3,2,knorm,4,all,0.5"), std::string::npos) << sum.csv;
}

// On Gemma 3's layout the target follows each layer's window (5 on the local layers, none on
// layer 5) and scale, and the summary covers the global layer only (policies leave the local
// layers alone).
TEST_F(TinyGemma, FidelityFollowsEachLayersWindowAndScale) {
  TempDir tmp;
  FidelitySettings st;
  st.n_tokens = 40;
  st.n_docs = 1;
  const std::vector<TokenDoc> docs{{"d", tokens(st.n_tokens, 9)}};
  const std::vector<std::string> policies{"knorm", "qfilters"};
  CellLog log((tmp.path / "fid.jsonl").string(), st.to_json(), true);
  run_fidelity(ctx_, docs, st, policies, log);
  const json& cell = log.get("d");
  const ModelConfig& c = model_->config();
  std::vector<std::vector<float>> qs(c.n_layers), ks(c.n_layers);
  EvalContext one = ctx_;  // one chunk and the statistics path, as run_fidelity: the same keys
  one.n_batch = st.n_tokens;
  auto s = new_session(one, st.n_tokens, "none", {}, union_needs(ctx_, policies));
  s->set_qk_hook([&](int l, const float* q, const float* k, const int32_t*, int n) {
    qs[l].assign(q, q + size_t(n) * c.n_heads * c.head_dim);
    ks[l].assign(k, k + size_t(n) * c.n_kv_heads * c.head_dim);
  });
  s->eval(docs[0].tokens);
  const int T = st.n_tokens, D = c.head_dim;
  for (int l = 0; l < c.n_layers; ++l) {
    const int window = l == 5 ? 0 : 5;
    const auto target = brute_force_target(qs[l], ks[l], T, c.n_heads, c.n_kv_heads, D, 1.0 / std::sqrt(32.0), window);
    std::vector<double> kn, qf, tg;
    for (int j = 0; j < T - 1; ++j) {
      const float* key = ks[l].data() + size_t(j) * D;
      kn.push_back(-std::sqrt(dot_f32(key, key, D)));
      qf.push_back(dot_f32(key, filters_.data() + size_t(l) * D, D));
      tg.push_back(target[0][j]);
    }
    EXPECT_NEAR(cell["spearman"]["knorm"][l][0].get<double>(), spearman(kn, tg), 2e-5) << "layer " << l;
    EXPECT_NEAR(cell["spearman"]["qfilters"][l][0].get<double>(), spearman(qf, tg), 2e-5) << "layer " << l;
  }
  const FidelitySummary sum = summarize_fidelity(ctx_, log, docs, st, policies);
  EXPECT_EQ(sum.json["summary_layers"], json::array({5}));
  for (const auto& r : sum.json["results"]) {
    EXPECT_EQ(r["n_heads"].get<int>(), 1);
    EXPECT_EQ(r["per_layer_mean"].size(), 7u);
    EXPECT_NEAR(r["mean_spearman"].get<double>(), cell["spearman"][r["policy"].get<std::string>()][5][0].get<double>(), 1e-12);
  }
  EXPECT_EQ(sum.json["qfilters_beats_knorm"]["heads"].get<int>(), 1);
}

}  // namespace
}  // namespace qf::eval
