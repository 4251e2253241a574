// Query collection through the engine's hook, and calibration of the real SmolLM2-135M.
//
// The central check is the paper's observation, measured independently of the filter code: on a
// held-out document, the projection <k, f> ranks keys by the attention they actually receive from
// later queries better than -||k|| (K-norm) does, for most heads. The attention is recomputed here
// from the hook's q and k with a plain softmax, not with the engine's attention kernels.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <set>

#include "calib/collect.h"
#include "calib/filter_file.h"
#include "calib/filters.h"
#include "calib/report.h"
#include "model/model.h"
#include "model/ops.h"
#include "model/session.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf::calib {
namespace {

// ---- Synthetic: the plan and the collector, no model ---------------------------------------------

ModelConfig tiny_config() {
  ModelConfig c;
  c.arch = "llama";
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 2;
  c.n_embd = 8;
  c.n_vocab = 10;
  return c;
}

TEST(SamplePlan, DistinctSortedInRangeAndReproducible) {
  const SamplePlan a({100, 7, 50}, 4, 60, 42), b({100, 7, 50}, 4, 60, 42), c({100, 7, 50}, 4, 60, 43);
  EXPECT_EQ(a.n_tokens(), 157);
  EXPECT_EQ(a.n_samples(), 60);
  EXPECT_EQ(a.doc_offset(2), 107);
  for (int l = 0; l < 4; ++l) {
    const auto& p = a.positions(l);
    ASSERT_EQ(p.size(), 60u);
    EXPECT_TRUE(std::is_sorted(p.begin(), p.end()));
    EXPECT_EQ(std::set<int64_t>(p.begin(), p.end()).size(), p.size()) << "positions must be distinct";
    EXPECT_GE(p.front(), 0);
    EXPECT_LT(p.back(), 157);
    EXPECT_EQ(p, b.positions(l)) << "same seed, same draw";
  }
  EXPECT_NE(a.positions(0), a.positions(1)) << "layers draw independently";
  EXPECT_NE(a.positions(0), c.positions(0)) << "another seed, another draw";
}

TEST(SamplePlan, UniformOverAllTokens) {
  // 40 layers x 100 of 200 tokens: each token is drawn 20 times on average, a binomial(40, 0.5).
  const SamplePlan p({120, 80}, 40, 100, 7);
  std::vector<int> hits(200, 0);
  for (int l = 0; l < 40; ++l)
    for (int64_t g : p.positions(l)) ++hits[g];
  const int first_doc = std::accumulate(hits.begin(), hits.begin() + 120, 0);
  EXPECT_NEAR(first_doc / 4000.0, 0.6, 0.03);
  EXPECT_GT(*std::min_element(hits.begin(), hits.end()), 5);  // P(binomial(40, .5) <= 5) ~ 1e-6 per token
  EXPECT_LT(*std::max_element(hits.begin(), hits.end()), 35);
}

TEST(SamplePlan, ClipsToTheTokenCountAndRejectsBadInput) {
  const SamplePlan p({5, 3}, 2, 1000, 1);
  EXPECT_EQ(p.n_samples(), 8);
  EXPECT_EQ(p.positions(1), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_THROW(SamplePlan({}, 2, 10, 1), Error);
  EXPECT_THROW(SamplePlan({5, 0}, 2, 10, 1), Error);
  EXPECT_THROW(SamplePlan({5}, 2, 0, 1), Error);
  EXPECT_THROW(p.positions(2), Error);
}

// A fake forward pass: q of (doc, pos, head, dim) and k encode where they came from.
float qval(int layer, int64_t global, int h, int d) { return float(layer * 100000 + global * 10 + h) + 0.25f * d; }

void feed(QueryCollector& col, const ModelConfig& c, int doc, int from, int n) {
  const int64_t base = col.plan().doc_offset(doc);
  std::vector<float> q(size_t(n) * c.n_heads * c.head_dim), k(size_t(n) * c.n_kv_heads * c.head_dim, 1.0f);
  std::vector<int32_t> pos(n);
  QkHook hook = col.hook();
  for (int l = 0; l < c.n_layers; ++l) {
    for (int t = 0; t < n; ++t) {
      pos[t] = from + t;
      for (int h = 0; h < c.n_heads; ++h)
        for (int d = 0; d < c.head_dim; ++d) q[(size_t(t) * c.n_heads + h) * c.head_dim + d] = qval(l, base + from + t, h, d);
    }
    hook(l, q.data(), k.data(), pos.data(), n);
  }
}

TEST(QueryCollector, KeepsExactlyThePlannedRowsWhateverTheChunking) {
  const ModelConfig c = tiny_config();
  QueryCollector col(c, SamplePlan({30, 17}, c.n_layers, 20, 5));
  col.begin_document(0);
  feed(col, c, 0, 0, 7);
  feed(col, c, 0, 7, 1);
  feed(col, c, 0, 8, 22);
  col.begin_document(1);
  feed(col, c, 1, 0, 17);
  EXPECT_EQ(col.tokens_seen(), 47);
  EXPECT_EQ(col.rows_filled(), 60);
  EXPECT_EQ(col.key_means().count(0), 47);
  for (int l = 0; l < c.n_layers; ++l) {
    const auto rows = col.layer_queries(l);
    const auto& pos = col.plan().positions(l);
    for (size_t s = 0; s < pos.size(); ++s)
      for (int h = 0; h < c.n_heads; ++h)
        for (int d = 0; d < c.head_dim; ++d)
          ASSERT_EQ(rows[(s * c.n_heads + h) * c.head_dim + d], qval(l, pos[s], h, d)) << "layer " << l << " sample " << s;
  }
  Calibrator cal(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
  col.finish(cal);
  EXPECT_TRUE(cal.complete());
}

TEST(QueryCollector, RejectsMisuse) {
  const ModelConfig c = tiny_config();
  {
    QueryCollector col(c, SamplePlan({10}, c.n_layers, 10, 1));
    EXPECT_THROW(feed(col, c, 0, 0, 4), Error) << "no begin_document";
    col.begin_document(0);
    EXPECT_THROW(feed(col, c, 0, 5, 6), Error) << "runs past the document";
    feed(col, c, 0, 0, 5);
    EXPECT_THROW(feed(col, c, 0, 4, 2), Error) << "position fed twice";
  }
  {
    QueryCollector col(c, SamplePlan({10, 10}, c.n_layers, 20, 1));
    col.begin_document(0);
    feed(col, c, 0, 0, 10);
    Calibrator cal(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
    EXPECT_THROW(col.finish(cal), Error) << "document 1 never fed";
    EXPECT_THROW(col.begin_document(2), Error);
  }
  ModelConfig other = c;
  other.n_layers = 4;
  EXPECT_THROW(QueryCollector(other, SamplePlan({10}, 3, 5, 1)), Error);
}

// ---- SmolLM2 --------------------------------------------------------------------------------------

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path + " (run scripts/fetch_text.sh)");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string sotu(const std::string& name) { return qf::test::source_dir() + "/data/sotu/" + name; }

// Ranks with ties averaged, then Pearson: Spearman's rho.
std::vector<double> ranks(const std::vector<double>& x) {
  std::vector<size_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), size_t{0});
  std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  std::vector<double> r(x.size());
  for (size_t i = 0; i < idx.size();) {
    size_t j = i;
    while (j + 1 < idx.size() && x[idx[j + 1]] == x[idx[i]]) ++j;
    for (size_t k = i; k <= j; ++k) r[idx[k]] = 0.5 * double(i + j);
    i = j + 1;
  }
  return r;
}

double spearman(const std::vector<double>& a, const std::vector<double>& b) {
  const std::vector<double> ra = ranks(a), rb = ranks(b);
  const double ma = std::accumulate(ra.begin(), ra.end(), 0.0) / ra.size();
  const double mb = std::accumulate(rb.begin(), rb.end(), 0.0) / rb.size();
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < ra.size(); ++i) {
    ab += (ra[i] - ma) * (rb[i] - mb);
    aa += (ra[i] - ma) * (ra[i] - ma);
    bb += (rb[i] - mb) * (rb[i] - mb);
  }
  return ab / std::sqrt(aa * bb);
}

SessionOptions session_options(int n_ctx, int n_batch = 256) {
  SessionOptions o;
  o.n_ctx = n_ctx;
  o.n_threads = 2;
  o.n_batch = n_batch;
  return o;
}

class CalibSmolLM2 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = Model::load(qf::test::smollm2_path()).release();
    tok_ = new Tokenizer(Tokenizer::from_gguf(model_->file()));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete model_;
  }
  static std::vector<int32_t> doc(const std::string& file, size_t n) {
    std::vector<int32_t> t = tok_->encode(read_file(sotu(file)), true, false);
    if (t.size() < n) throw std::runtime_error(file + " has fewer than " + std::to_string(n) + " tokens");
    t.resize(n);
    return t;
  }
  static Model* model_;
  static Tokenizer* tok_;
};
Model* CalibSmolLM2::model_ = nullptr;
Tokenizer* CalibSmolLM2::tok_ = nullptr;

// The collector stores exactly the rows the forward pass computed at the planned positions.
TEST_F(CalibSmolLM2, CollectorRowsAreTheForwardPassQueries) {
  const ModelConfig& c = model_->config();
  const std::vector<int32_t> d = doc("1901_theodore_roosevelt_r.txt", 96);
  Session s(*model_, session_options(96, 32));
  std::vector<std::vector<float>> all(c.n_layers);
  s.set_qk_hook([&](int l, const float* q, const float*, const int32_t*, int n) {
    all[l].insert(all[l].end(), q, q + size_t(n) * c.n_heads * c.head_dim);
  });
  s.eval(d);
  s.reset();
  QueryCollector col(c, SamplePlan({96}, c.n_layers, 40, 3));
  s.set_qk_hook(col.hook());
  col.begin_document(0);
  s.eval(d);
  s.set_qk_hook(nullptr);
  const size_t row = size_t(c.n_heads) * c.head_dim;
  for (int l = 0; l < c.n_layers; ++l) {
    const auto rows = col.layer_queries(l);
    const auto& pos = col.plan().positions(l);
    for (size_t i = 0; i < pos.size(); ++i)
      ASSERT_TRUE(std::equal(rows.begin() + i * row, rows.begin() + (i + 1) * row, all[l].begin() + pos[i] * row))
          << "layer " << l << " position " << pos[i];
  }
}

// The query statistics are the moments of the planned rows rotated back by their positions with
// the forward pass's own rotary code (positions below kQueryMomentSinks left out).
TEST_F(CalibSmolLM2, QueryStatsAreThePreRotaryMomentsOfThePlannedRows) {
  const ModelConfig& c = model_->config();
  const std::vector<int32_t> d = doc("1901_theodore_roosevelt_r.txt", 96);
  Session s(*model_, session_options(96, 32));
  QueryCollector col(c, SamplePlan({96}, c.n_layers, 40, 3));
  s.set_qk_hook(col.hook());
  col.begin_document(0);
  s.eval(d);
  s.set_qk_hook(nullptr);
  const size_t row = size_t(c.n_heads) * c.head_dim;
  std::vector<std::vector<float>> planned(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) planned[l].assign(col.layer_queries(l).begin(), col.layer_queries(l).end());
  std::vector<std::vector<int64_t>> pos(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) pos[l] = col.plan().positions(l);
  Calibrator cal(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
  const int rank = 3;
  col.finish(cal, rope_geometry(*model_), rank);
  const Filters& f = cal.filters();
  ASSERT_TRUE(f.has_query_stats());
  ASSERT_EQ(f.n_query_heads, c.n_heads);
  ASSERT_EQ(f.stats_rank, rank);

  const ops::Rotary rotary(c, model_->rope_freq_factors());
  for (int l : {0, c.n_layers / 2, c.n_layers - 1}) {
    std::vector<double> sum(row, 0.0);
    int used = 0;
    for (size_t i = 0; i < pos[l].size(); ++i) {
      if (pos[l][i] < kv::kQueryMomentSinks) continue;
      std::vector<float> q(planned[l].begin() + i * row, planned[l].begin() + (i + 1) * row);
      rotary.rotate_by(l, q.data(), c.n_heads, -static_cast<int>(pos[l][i]));
      for (size_t j = 0; j < row; ++j) sum[j] += q[j];
      ++used;
    }
    ASSERT_GT(used, 30);
    for (size_t j = 0; j < row; ++j) {
      const double want = sum[j] / used;
      ASSERT_NEAR(f.query_mean[size_t(l) * row + j], want, 2e-4 * (1 + std::abs(want))) << "layer " << l << " " << j;
    }
  }
}

TEST_F(CalibSmolLM2, SynthesisFillsDocumentsAndRestartsAfterTheEnd) {
  const ModelConfig& c = model_->config();
  Session s(*model_, session_options(40));
  const std::vector<std::vector<int32_t>> prompts = {tok_->encode("Once upon a time", false, false),
                                                     tok_->encode("The weather today", false, false)};
  const int32_t end = tok_->eog_ids().front();
  // Greedy, except that the 6th sampled token of every run is the end token.
  int step = 0;
  auto sample = [&](std::span<const float> logits) {
    ++step;
    return step % 6 == 0 ? end : int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  };
  QueryCollector col(c, SamplePlan({40, 40}, c.n_layers, 30, 1));
  const auto docs = synthesize_documents(s, prompts, {end}, SynthesisOptions{.n_docs = 2, .doc_len = 40, .segment_len = 0},
                                         sample, &col);
  ASSERT_EQ(docs.size(), 2u);
  for (const auto& d : docs) EXPECT_EQ(d.size(), 40u);
  // Document 0: prompt 0, 5 sampled tokens, the end token, then prompt 1 follows.
  const auto& p0 = prompts[0];
  const auto& p1 = prompts[1];
  ASSERT_TRUE(std::equal(p0.begin(), p0.end(), docs[0].begin()));
  EXPECT_EQ(docs[0][p0.size() + 5], end);
  EXPECT_TRUE(std::equal(p1.begin(), p1.end(), docs[0].begin() + p0.size() + 6));
  EXPECT_EQ(col.rows_filled(), 30 * c.n_layers);
  Calibrator cal(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim);
  col.finish(cal);

  // segment_len: a new prompt, after the separator, every 4 sampled tokens; the prefix opens the document.
  auto greedy = [](std::span<const float> l) { return int32_t(std::max_element(l.begin(), l.end()) - l.begin()); };
  const std::vector<int32_t> sep = tok_->encode("\n\n", false, false);
  ASSERT_FALSE(sep.empty());
  const int32_t prefix = 1;
  const auto seg = synthesize_documents(
      s, prompts, {},
      SynthesisOptions{.n_docs = 1, .doc_len = 30, .segment_len = 4, .separator = sep, .doc_prefix = {prefix}}, greedy);
  ASSERT_EQ(seg[0].size(), 30u);
  EXPECT_EQ(seg[0][0], prefix);
  EXPECT_TRUE(std::equal(p0.begin(), p0.end(), seg[0].begin() + 1));
  EXPECT_TRUE(std::equal(sep.begin(), sep.end(), seg[0].begin() + 1 + p0.size() + 4));
  EXPECT_TRUE(std::equal(p1.begin(), p1.end(), seg[0].begin() + 1 + p0.size() + 4 + sep.size()));

  EXPECT_THROW(synthesize_documents(s, prompts, {}, SynthesisOptions{.n_docs = 1, .doc_len = 41}, greedy), Error)
      << "longer than the context";
  EXPECT_THROW(synthesize_documents(s, {}, {}, SynthesisOptions{.n_docs = 1, .doc_len = 10}, greedy), Error);
}

// Calibrate on pre-1950 addresses, then check the filters against real attention on a 2001 one.
TEST_F(CalibSmolLM2, FiltersPredictAttentionBetterThanKeyNorm) {
  const ModelConfig& c = model_->config();
  const int L = 512;
  const std::vector<std::vector<int32_t>> cal_docs = {doc("1861_abraham_lincoln_r.txt", L), doc("1905_theodore_roosevelt_r.txt", L),
                                                      doc("1934_franklin_d_roosevelt_d.txt", L),
                                                      doc("1823_james_monroe_dr.txt", L)};
  Session s(*model_, session_options(L));
  CalibrationRun run = calibrate_documents(s, cal_docs, CollectOptions{.n_samples = 1000, .seed = 0});
  ASSERT_TRUE(run.calibrator.complete());
  EXPECT_EQ(run.n_samples, 1000);
  EXPECT_EQ(run.n_tokens, 4 * L);
  const Filters& f = run.calibrator.filters();
  const FilterReport rep = make_report(f, run.calibrator.head_reports(), c.n_heads, &run.keys);
  std::printf("calibration: energy share %.3f, keys against the filter %d/%d, orientation disagreements %d/%d\n",
              rep.energy_share_mean, rep.keys_against, rep.n_kv_heads, rep.orientation_disagreements, rep.n_heads);
  EXPECT_GT(rep.energy_share_mean, 0.3) << "queries should be strongly anisotropic";

  // Held-out document: every post-RoPE q and k of every layer.
  const int T = 512;
  const std::vector<int32_t> held = doc("2001_george_w_bush_r.txt", T);
  const size_t qrow = size_t(c.n_heads) * c.head_dim, krow = size_t(c.n_kv_heads) * c.head_dim;
  std::vector<std::vector<float>> qs(c.n_layers), ks(c.n_layers);
  s.reset();
  s.set_qk_hook([&](int l, const float* q, const float* k, const int32_t*, int n) {
    qs[l].insert(qs[l].end(), q, q + n * qrow);
    ks[l].insert(ks[l].end(), k, k + n * krow);
  });
  s.eval(held);
  s.set_qk_hook(nullptr);

  const int D = c.head_dim, group = c.n_heads / c.n_kv_heads;
  int wins = 0, heads = 0;
  double rho_qf_sum = 0, rho_kn_sum = 0;
  std::vector<double> p(T);
  for (int l = 0; l < c.n_layers; ++l) {
    for (int g = 0; g < c.n_kv_heads; ++g) {
      // received[j] = mean over i > j of softmax_i(j), averaged over the group's query heads.
      std::vector<double> received(T, 0.0);
      for (int h = g * group; h < (g + 1) * group; ++h) {
        for (int i = 1; i < T; ++i) {
          const float* q = &qs[l][i * qrow + h * D];
          double mx = -1e300;
          for (int j = 0; j <= i; ++j) {
            const float* k = &ks[l][j * krow + g * D];
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += double(q[d]) * k[d];
            p[j] = dot / std::sqrt(double(D));
            mx = std::max(mx, p[j]);
          }
          double z = 0;
          for (int j = 0; j <= i; ++j) z += (p[j] = std::exp(p[j] - mx));
          for (int j = 0; j < i; ++j) received[j] += p[j] / z;
        }
      }
      std::vector<double> target, qf, kn;
      for (int j = 0; j < T - 1; ++j) {
        target.push_back(received[j] / (double(T - 1 - j) * group));
        const float* k = &ks[l][j * krow + g * D];
        double dot = 0, nn = 0;
        for (int d = 0; d < D; ++d) {
          dot += double(k[d]) * f.at(l, g)[d];
          nn += double(k[d]) * k[d];
        }
        qf.push_back(dot);
        kn.push_back(-std::sqrt(nn));
      }
      const double rq = spearman(qf, target), rk = spearman(kn, target);
      rho_qf_sum += rq;
      rho_kn_sum += rk;
      wins += rq > rk;
      ++heads;
    }
  }
  std::printf("held-out attention (2001 address, %d tokens): Q-Filters beats K-norm on %d/%d heads (%.0f%%); "
              "mean Spearman %.3f vs %.3f\n",
              T, wins, heads, 100.0 * wins / heads, rho_qf_sum / heads, rho_kn_sum / heads);
  EXPECT_GT(wins, heads / 2) << "the paper's observation: <k, f> predicts attention better than -||k|| for most heads";
  EXPECT_GT(rho_qf_sum / heads, rho_kn_sum / heads);

  // The file round-trips with the fingerprint check.
  Filters out = f;
  CalibrationInfo info;
  info.model_name = "SmolLM2-135M-Instruct";
  info.architecture = c.arch;
  info.fingerprint = c.fingerprint();
  info.corpus = "test";
  set_calibration_metadata(out, info);
  const std::string path = (std::filesystem::temp_directory_path() / ("qf_calib_smollm2_test_" + std::to_string(::getpid()) + ".safetensors")).string();
  write_filters(path, out);
  const LoadedFilters back = load_filters(path, FilterExpectation{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()});
  EXPECT_FALSE(back.fingerprint_missing);
  EXPECT_EQ(back.filters.data, f.data);
  EXPECT_THROW(load_filters(path, FilterExpectation{c.n_layers, c.n_kv_heads, c.head_dim, "llama:L30:H9:KV3:D64:E576:V1"}), Error);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace qf::calib
