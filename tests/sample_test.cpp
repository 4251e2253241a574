// Sampler: each cut and penalty against its definition, on hand-made logits.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "sample/sampler.h"
#include "util/error.h"

namespace qf {
namespace {

SamplerOptions plain(float temperature) {
  SamplerOptions o;
  o.temperature = temperature;
  o.top_k = 0;
  o.top_p = 1.0f;
  o.min_p = 0.0f;
  o.seed = 1234;
  return o;
}

std::map<int32_t, int> draw(Sampler& s, const std::vector<float>& logits, int n) {
  std::map<int32_t, int> counts;
  for (int i = 0; i < n; ++i) ++counts[s.sample(logits)];
  return counts;
}

TEST(Sampler, GreedyIsArgmaxLowestIndexOnTies) {
  Sampler s(plain(0.0f));
  EXPECT_EQ(s.sample(std::vector<float>{0.1f, 3.0f, -1.0f, 3.0f}), 1);
}

TEST(Sampler, TemperatureOneDrawsTheSoftmax) {
  const std::vector<float> logits{0.0f, std::log(2.0f), std::log(5.0f), -50.0f};  // p = 1/8, 2/8, 5/8, ~0
  Sampler s(plain(1.0f));
  const int n = 40000;
  const auto c = draw(s, logits, n);
  EXPECT_NEAR(c.at(0) / double(n), 1.0 / 8, 0.01);
  EXPECT_NEAR(c.at(1) / double(n), 2.0 / 8, 0.01);
  EXPECT_NEAR(c.at(2) / double(n), 5.0 / 8, 0.01);
  EXPECT_EQ(c.count(3), 0u);
}

TEST(Sampler, LowTemperatureSharpens) {
  const std::vector<float> logits{0.0f, 1.0f};
  Sampler s(plain(0.25f));  // p1 / p0 = e^4
  const auto c = draw(s, logits, 20000);
  EXPECT_NEAR(c.at(1) / 20000.0, std::exp(4.0) / (1 + std::exp(4.0)), 0.01);
}

TEST(Sampler, TopKTopPAndMinPCutTheSupport) {
  // p proportional to 8, 4, 2, 1, 1 (sum 16).
  const std::vector<float> logits{std::log(8.0f), std::log(4.0f), std::log(2.0f), 0.0f, 0.0f};
  auto support = [&](SamplerOptions o) {
    Sampler s(o);
    std::set<int32_t> ids;
    for (const auto& [id, n] : draw(s, logits, 4000)) ids.insert(id);
    return ids;
  };
  SamplerOptions o = plain(1.0f);
  o.top_k = 2;
  EXPECT_EQ(support(o), (std::set<int32_t>{0, 1}));
  o = plain(1.0f);
  o.top_p = 0.80f;  // 8/16 = 0.5 < 0.8, 12/16 = 0.75 < 0.8, 14/16 reaches it
  EXPECT_EQ(support(o), (std::set<int32_t>{0, 1, 2}));
  o = plain(1.0f);
  o.min_p = 0.3f;  // keeps p >= 0.3 * 8/16: 8 and 4 (2/8 = 0.25 is below)
  EXPECT_EQ(support(o), (std::set<int32_t>{0, 1}));
  o = plain(5.0f);  // the cuts use the untempered distribution, as llama.cpp's chain does
  o.min_p = 0.3f;
  EXPECT_EQ(support(o), (std::set<int32_t>{0, 1}));
}

// The top-k cut on a vocabulary the size of a real model's, with many ties: the support is
// exactly the k best by (logit, then lower id), wherever they sit in the vocabulary.
TEST(Sampler, TopKOnALargeVocabularyKeepsTheKBestLowerIdsFirst) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> logits(49152);
  for (float& x : logits) x = std::floor(nd(rng) * 4.0f) / 4.0f;  // ties in every bucket
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  for (int k : {1, 5, 40, 300}) {
    SamplerOptions o = plain(1.0f);
    o.top_k = k;
    Sampler s(o);
    std::set<int32_t> got;
    for (const auto& [id, n] : draw(s, logits, 40 * k)) got.insert(id);
    EXPECT_EQ(got, std::set<int32_t>(ids.begin(), ids.begin() + k)) << "k " << k;
  }
  // All equal: the k lowest ids.
  SamplerOptions o = plain(1.0f);
  o.top_k = 3;
  Sampler s(o);
  std::set<int32_t> got;
  for (const auto& [id, n] : draw(s, std::vector<float>(1000, 0.5f), 600)) got.insert(id);
  EXPECT_EQ(got, (std::set<int32_t>{0, 1, 2}));
}

// A broken row of logits (NaN) must not make the sort undefined or the NaN token drawn.
TEST(Sampler, NaNLogitsAreNeverDrawn) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> logits{nan, std::log(2.0f), nan, 0.0f, nan};
  for (int k : {0, 2, 4}) {
    SamplerOptions o = plain(1.0f);
    o.top_k = k;
    Sampler s(o);
    std::set<int32_t> got;
    for (const auto& [id, n] : draw(s, logits, 2000)) got.insert(id);
    EXPECT_EQ(got, (std::set<int32_t>{1, 3})) << "k " << k;
  }
}

TEST(Sampler, RepeatPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  SamplerOptions o = plain(0.0f);
  o.repeat_penalty = 2.0f;
  o.repeat_last_n = 8;
  // 0 is best (4.0); once seen it becomes 2.0 and loses to 1 (3.0).
  Sampler s(o);
  const std::vector<float> logits{4.0f, 3.0f, -1.0f};
  EXPECT_EQ(s.sample(logits), 0);
  s.accept(0);
  EXPECT_EQ(s.sample(logits), 1);
  // A negative logit moves down: -1 * 2 = -2 < -1.5.
  Sampler t(o);
  t.accept(0);
  t.accept(1);
  t.accept(2);
  EXPECT_EQ(t.sample(std::vector<float>{-1.6f, -1.5f, -1.0f}), 2) << "-1.6*2, -1.5*2 vs -1*2: -2.0 is largest";
  Sampler u(o);
  u.accept(2);
  EXPECT_EQ(u.sample(std::vector<float>{-1.6f, -1.5f, -1.0f}), 1) << "-1 * 2 = -2 falls below -1.5";
}

TEST(Sampler, PresenceAndFrequencyPenaltiesSubtract) {
  SamplerOptions o = plain(0.0f);
  o.repeat_last_n = 16;
  o.frequency_penalty = 0.4f;
  o.presence_penalty = 0.5f;
  Sampler s(o);
  const std::vector<float> logits{2.0f, 1.0f};
  s.accept(0);  // 2 - 0.4 - 0.5 = 1.1 > 1
  EXPECT_EQ(s.sample(logits), 0);
  s.accept(0);  // 2 - 0.8 - 0.5 = 0.7 < 1
  EXPECT_EQ(s.sample(logits), 1);
}

TEST(Sampler, PenaltiesForgetTokensThatLeaveTheWindow) {
  SamplerOptions o = plain(0.0f);
  o.repeat_penalty = 4.0f;
  o.repeat_last_n = 2;
  Sampler s(o);
  const std::vector<float> logits{4.0f, 3.0f, 0.0f, 0.0f};
  s.accept(0);
  EXPECT_EQ(s.sample(logits), 1);
  s.accept(2);
  s.accept(3);  // 0 left the window of 2
  EXPECT_EQ(s.sample(logits), 0);
  s.accept(0);
  s.reset_history();
  EXPECT_EQ(s.sample(logits), 0);
}

TEST(Sampler, BannedTokensAreNeverSampled) {
  const std::vector<float> logits = {0.0f, 5.0f, 4.0f, 1.0f};
  SamplerOptions greedy = plain(0.0f);
  greedy.banned = {1};
  EXPECT_EQ(Sampler(greedy).sample(logits), 2);  // the best token is banned: the next one
  SamplerOptions hot = plain(1.0f);
  hot.banned = {1, 2, 99};                        // an id outside the vocabulary is ignored
  Sampler s(hot);
  const auto counts = draw(s, logits, 2000);
  EXPECT_EQ(counts.count(1), 0u);
  EXPECT_EQ(counts.count(2), 0u);
  EXPECT_GT(counts.at(3), counts.at(0));          // the rest keep their softmax order
}

TEST(Sampler, SameSeedSameDraws) {
  const std::vector<float> logits{0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  SamplerOptions o = plain(1.0f);
  Sampler a(o), b(o);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.sample_and_accept(logits), b.sample_and_accept(logits));
}

TEST(Sampler, BadOptionsAreClearErrors) {
  auto bad = [](auto edit) {
    SamplerOptions o;
    edit(o);
    EXPECT_THROW(Sampler{o}, Error);
  };
  bad([](SamplerOptions& o) { o.top_p = 0.0f; });
  bad([](SamplerOptions& o) { o.min_p = 1.5f; });
  bad([](SamplerOptions& o) { o.repeat_penalty = 0.0f; });
  bad([](SamplerOptions& o) { o.repeat_last_n = -2; });
  bad([](SamplerOptions& o) { o.temperature = NAN; });
  bad([](SamplerOptions& o) { o.presence_penalty = INFINITY; });
  Sampler s(SamplerOptions{});
  EXPECT_THROW(s.sample(std::vector<float>{}), Error);
}

}  // namespace
}  // namespace qf
