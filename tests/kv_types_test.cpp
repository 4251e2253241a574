// KV storage types in the cache: names, ggml's rounding (checked on hand-made blocks), what the
// cache stores and moves on eviction, attention (fused, statistics, reference) over every type
// pair and with sliding windows against a brute force in double on the dequantized values, and
// the key-scoring policies: reading the stored keys of a plain cache, and the scores of the F32
// keys that a cache keeping key scores computed as the tokens came in.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kv/attention.h"
#include "kv/cache.h"
#include "kv/policy.h"
#include "tensor/kernels.h"
#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf::kv {
namespace {

std::string label(KvTypes t) { return std::string(kv_type_name(t.k)) + "/" + std::string(kv_type_name(t.v)); }

void append_random(Cache& c, int layer, int n_tok, int first_pos, std::mt19937& rng) {
  const int nkv = c.shape().n_kv_heads, d = c.shape().head_dim;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(size_t(n_tok) * nkv * d), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int32_t> pos(n_tok);
  std::iota(pos.begin(), pos.end(), first_pos);
  c.append(layer, k.data(), v.data(), pos.data(), n_tok);
}

std::vector<float> round_trip(KvType t, const std::vector<float>& x) {
  const int d = static_cast<int>(x.size());
  std::vector<uint8_t> row(kv_row_bytes(t, d));
  kv_quantize_row(t, x.data(), d, row.data());
  std::vector<float> y(d);
  kv_dequantize_row(t, row.data(), d, y.data());
  return y;
}

TEST(KvTypes, NamesAndErrors) {
  for (KvType t : kv_types()) EXPECT_EQ(parse_kv_type(kv_type_name(t)), t);
  EXPECT_EQ(kv_types().size(), 5u);
  try {
    parse_kv_type("q4_1");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unknown KV cache type 'q4_1' (one of: f32, f16, bf16, q8_0, q4_0)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(kv_row_bytes(KvType::F16, 13), 26u);
  EXPECT_EQ(kv_row_bytes(KvType::Q8_0, 64), 68u);
  EXPECT_EQ(kv_row_bytes(KvType::Q4_0, 64), 36u);
  EXPECT_THROW(kv_row_bytes(KvType::Q8_0, 48), Error);
  EXPECT_THROW(kv_row_bytes(KvType::Q4_1, 64), Error);
  EXPECT_THROW(Cache({1, 1, 48}, {4}, {}, {KvType::F16, KvType::Q4_0}), Error);
}

// ggml's rounding on blocks worked out by hand.
TEST(KvTypes, QuantizedRoundingByHand) {
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f, x[1] = -63.5f, x[2] = 0.49f, x[3] = 2.5f;  // q8_0: d = 1, round half away from zero
  std::vector<float> want(32, 0.0f);
  want[0] = 127, want[1] = -64, want[2] = 0, want[3] = 3;
  EXPECT_EQ(round_trip(KvType::Q8_0, x), want);
  // q4_0: the largest magnitude -16 gives d = 2 and level 0; levels round(x / d) + 8, at most 15.
  std::fill(x.begin(), x.end(), 0.0f);
  x[0] = -16.0f, x[1] = 14.0f, x[2] = 15.9f, x[17] = 3.0f, x[18] = -2.9f;
  std::fill(want.begin(), want.end(), 0.0f);
  want[0] = -16, want[1] = 14, want[2] = 14, want[17] = 4, want[18] = -2;
  EXPECT_EQ(round_trip(KvType::Q4_0, x), want);
  // A block of zeros stays zeros (scale 0, no division by zero).
  EXPECT_EQ(round_trip(KvType::Q4_0, std::vector<float>(32, 0.0f)), std::vector<float>(32, 0.0f));
  EXPECT_EQ(round_trip(KvType::Q8_0, std::vector<float>(64, 0.0f)), std::vector<float>(64, 0.0f));
}

// q8_0's quants are roundf(x / d), ties away from zero, for every value: at and beside the
// halves (where truncate-then-step and round-to-nearest-even differ from roundf), then random
// rows against std::round.
TEST(KvTypes, Q8_0QuantsAreRoundfOfTheScaledValues) {
  auto quants = [](const std::vector<float>& x) {
    std::vector<uint8_t> row(kv_row_bytes(KvType::Q8_0, static_cast<int>(x.size())));
    kv_quantize_row(KvType::Q8_0, x.data(), static_cast<int>(x.size()), row.data());
    std::vector<int> q;
    for (size_t b = 0; b < x.size() / 32; ++b)
      for (int i = 0; i < 32; ++i) q.push_back(static_cast<int8_t>(row[b * 34 + 2 + i]));
    return q;
  };
  std::vector<float> x{127.0f};  // d = 1: the quants are the rounded values themselves
  for (float h : {0.5f, 1.5f, 2.5f, 63.5f, 126.5f})
    for (float v : {h, std::nextafter(h, 0.0f), std::nextafter(h, 200.0f)}) x.push_back(v), x.push_back(-v);
  x.resize(32, 0.0f);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(quants(x)[i], static_cast<int>(std::round(x[i]))) << x[i];
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> r(4096);
  for (int trial = 0; trial < 50; ++trial) {
    for (float& v : r) v = nd(rng);
    const std::vector<int> q = quants(r);
    for (size_t b = 0; b < r.size() / 32; ++b) {
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(r[b * 32 + i]));
      const float id = 1.0f / (amax / 127.0f);
      for (int i = 0; i < 32; ++i)
        ASSERT_EQ(q[b * 32 + i], static_cast<int>(std::round(r[b * 32 + i] * id))) << trial << " " << b << " " << i;
    }
  }
}

// Relative error of a round trip on normal data: what each type promises.
TEST(KvTypes, RoundTripErrorPerType) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  std::vector<float> x(4096);
  for (auto& v : x) v = nd(rng);
  const struct {
    KvType t;
    double max_rel;  // of max |x| of the block (quantized) or of |x| (float types, normal range)
  } cases[] = {// half a step of the 11- and 8-bit significands
               {KvType::F32, 0.0}, {KvType::F16, 1.0 / 2048}, {KvType::BF16, 1.0 / 256},
               // half a step of 1/127 of the block's largest value, plus the fp16 scale's rounding
               {KvType::Q8_0, 0.5 / 127 + 1.0 / 2048},
               // the largest value's opposite clips from level 16 to 15: one step of 1/8
               {KvType::Q4_0, 1.0 / 8 + 1.0 / 2048}};
  for (const auto& c : cases) {
    const std::vector<float> y = round_trip(c.t, x);
    double worst = 0;
    for (size_t b = 0; b < x.size(); b += 32) {
      float amax = 0;
      for (size_t i = b; i < b + 32; ++i) amax = std::max(amax, std::abs(x[i]));
      for (size_t i = b; i < b + 32; ++i) {
        const double ref = c.t == KvType::Q8_0 || c.t == KvType::Q4_0 ? amax : std::max(std::abs(x[i]), 1e-3f);
        worst = std::max(worst, std::abs(double(y[i]) - x[i]) / ref);
      }
    }
    EXPECT_LE(worst, c.max_rel) << kv_type_name(c.t);
  }
}

// The cache stores each token as its own row of blocks; eviction moves those bytes unchanged.
TEST(KvTypes, CacheStoresAndMovesRows) {
  for (KvType kt : kv_types())
    for (KvType vt : {KvType::F16, KvType::Q4_0}) {
      SCOPED_TRACE(label({kt, vt}));
      const int d = 64, nkv = 2;
      Cache c({1, nkv, d}, {16}, {}, {kt, vt});
      std::mt19937 rng(4);
      std::normal_distribution<float> nd;
      std::vector<float> k(size_t(6) * nkv * d), v(k.size());
      for (auto& x : k) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      const int32_t pos[] = {0, 1, 2, 3, 4, 5};
      c.append(0, k.data(), v.data(), pos, 6);
      EXPECT_EQ(c.bytes_per_token_per_layer(), int64_t(nkv) * (kv_row_bytes(kt, d) + kv_row_bytes(vt, d)));
      EXPECT_EQ(c.bytes_used(), 6 * c.bytes_per_token_per_layer());
      EXPECT_EQ(c.bytes_reserved(), 16 * c.bytes_per_token_per_layer());
      const auto token = [&](const std::vector<float>& a, int t, int h) {
        return std::vector<float>(a.begin() + (size_t(t) * nkv + h) * d, a.begin() + (size_t(t) * nkv + h + 1) * d);
      };
      const int keep[] = {1, 4, 5};
      c.retain(0, 1, keep);
      for (int h = 0; h < nkv; ++h) {
        const HeadCache& hc = c.head(0, h);
        const std::vector<float> keys = keys_f32(hc, d), values = values_f32(hc, d);
        for (int j = 0; j < hc.n; ++j) {
          const int t = hc.pos[j];
          EXPECT_EQ(std::vector<float>(keys.begin() + j * d, keys.begin() + (j + 1) * d), round_trip(kt, token(k, t, h)));
          EXPECT_EQ(std::vector<float>(values.begin() + j * d, values.begin() + (j + 1) * d),
                    round_trip(vt, token(v, t, h)));
        }
      }
      EXPECT_EQ(c.head(0, 1).n, 3);
    }
}

// Brute force over one query head: softmax over the slots with position in (p - window, p].
std::vector<double> naive(const Cache& c, int layer, int g, const float* q, int32_t p, float scale, int window,
                          std::vector<double>* weights = nullptr) {
  const HeadCache& hc = c.head(layer, g);
  const int d = c.shape().head_dim;
  const std::vector<float> keys = keys_f32(hc, d), values = values_f32(hc, d);
  std::vector<double> w(hc.n, 0.0), out(d, 0.0);
  const auto seen = [&](int j) { return hc.pos[j] <= p && (window == 0 || hc.pos[j] > p - window); };
  double mx = -INFINITY, z = 0;
  for (int j = 0; j < hc.n; ++j) {
    if (!seen(j)) continue;
    double s = 0;
    for (int i = 0; i < d; ++i) s += double(q[i]) * keys[size_t(j) * d + i];
    mx = std::max(mx, w[j] = s * scale);
  }
  for (int j = 0; j < hc.n; ++j)
    if (seen(j)) z += (w[j] = std::exp(w[j] - mx));
  for (int j = 0; j < hc.n; ++j) {
    w[j] = seen(j) ? w[j] / z : 0.0;
    for (int i = 0; i < d; ++i) out[i] += w[j] * values[size_t(j) * d + i];
  }
  if (weights) *weights = w;
  return out;
}

// attend_fused, attend_with_stats and attend_reference on per-head thinned caches of every type
// pair, causal batches, decode steps and sliding windows: outputs within float rounding of the
// brute force on the dequantized values (the type's own rounding is in both), and the
// statistics' summed weights too.
TEST(KvTypes, AttentionEveryTypePairAndWindow) {
  const int d = 64, nkv = 2, group = 3, n_heads = nkv * group;
  ThreadPool pool(2);
  for (KvType kt : kv_types())
    for (KvType vt : kv_types())
      for (int window : {0, 1, 17, 64}) {
        SCOPED_TRACE(label({kt, vt}) + " window " + std::to_string(window));
        std::mt19937 rng(50 + window);
        Cache c({1, nkv, d}, {200}, AttentionStats{.accumulate = true}, {kt, vt});
        append_random(c, 0, 150, 0, rng);
        for (int h = 0; h < nkv; ++h) {
          std::vector<int> keep;
          std::bernoulli_distribution b(0.5 + 0.3 * h);
          for (int j = 0; j < c.head(0, h).n; ++j)
            if (b(rng)) keep.push_back(j);
          c.retain(0, h, keep);
        }
        append_random(c, 0, 5, 150, rng);
        for (const std::vector<int32_t>& qpos : {std::vector<int32_t>{150, 151, 152, 153, 154}, {154}, {80}}) {
          const int n_tok = static_cast<int>(qpos.size());
          std::vector<float> q(size_t(n_tok) * n_heads * d);
          std::normal_distribution<float> nq(0.0f, 1.5f);
          for (auto& x : q) x = nq(rng);
          std::vector<float> fused(q.size()), stats(q.size()), ref(q.size());
          for (int h = 0; h < nkv; ++h) std::fill(c.head(0, h).attn_sum.begin(), c.head(0, h).attn_sum.end(), 0.0f);
          AttentionArgs a{.layer = 0, .n_heads = n_heads, .scale = 1.0f / 8, .n_tok = n_tok, .q = q.data(),
                          .q_pos = qpos.data(), .out = fused.data(), .accumulate_from_pos = 0, .window = window};
          attend_fused(c, a, pool);
          a.out = stats.data();
          attend_with_stats(c, a, pool);
          a.out = ref.data();
          attend_reference(c, a);
          ASSERT_EQ(fused, stats);
          std::vector<std::vector<double>> want_sum(nkv);
          for (int h = 0; h < nkv; ++h) want_sum[h].assign(c.head(0, h).n, 0.0);
          for (int t = 0; t < n_tok; ++t)
            for (int h = 0; h < n_heads; ++h) {
              const size_t off = (size_t(t) * n_heads + h) * d;
              std::vector<double> w;
              const auto want = naive(c, 0, h / group, q.data() + off, qpos[t], a.scale, window, &w);
              for (size_t j = 0; j < w.size(); ++j) want_sum[h / group][j] += w[j] / group;
              for (int i = 0; i < d; ++i) {
                ASSERT_NEAR(fused[off + i], want[i], 2e-5 + 2e-5 * std::abs(want[i])) << "t=" << t << " h=" << h;
                ASSERT_NEAR(ref[off + i], want[i], 1e-6) << "t=" << t << " h=" << h;
              }
            }
          for (int h = 0; h < nkv; ++h)
            for (size_t j = 0; j < want_sum[h].size(); ++j)
              ASSERT_NEAR(c.head(0, h).attn_sum[j], want_sum[h][j], 1e-6 + 1e-5 * want_sum[h][j]) << "slot " << j;
        }
      }
}

// qfilters and knorm score the keys the cache holds (dequantized), not the model's F32 keys.
TEST(KvTypes, KeyPoliciesScoreStoredKeys) {
  const int d = 64, nkv = 2;
  std::mt19937 rng(8);
  std::normal_distribution<float> nd;
  std::vector<float> filters(size_t(nkv) * d);
  for (auto& x : filters) x = nd(rng);
  PolicyOptions po;
  po.filters = filters;
  for (KvType kt : kv_types()) {
    SCOPED_TRACE(kv_type_name(kt));
    Cache c({1, nkv, d}, {100}, {}, {kt, KvType::F16});
    append_random(c, 0, 100, 0, rng);
    for (const char* name : {"qfilters", "knorm"}) {
      auto policy = make_policy(name, po);
      std::vector<std::vector<float>> scores;
      policy->score_layer(c, 0, scores);
      for (int h = 0; h < nkv; ++h) {
        const std::vector<float> keys = keys_f32(c.head(0, h), d);
        for (int j = 0; j < c.head(0, h).n; ++j) {
          double dot = 0, norm = 0;
          for (int i = 0; i < d; ++i) {
            dot += double(keys[size_t(j) * d + i]) * filters[size_t(h) * d + i];
            norm += double(keys[size_t(j) * d + i]) * keys[size_t(j) * d + i];
          }
          const double want = std::string(name) == "knorm" ? -std::sqrt(norm) : dot;
          ASSERT_NEAR(scores[h][j], want, 1e-5 * (1 + std::abs(want))) << name << " head " << h << " slot " << j;
        }
      }
    }
  }
}

// A cache that keeps key scores scores each token once, from the F32 key it was given, through
// the policy's key_scorer: the scores match a brute force in double on those keys and are the
// same numbers for every storage type; retain moves them with their slots, a context shift
// rescores the rotated keys, and the bytes are counted.
TEST(KvTypes, KeptKeyScoresComeFromTheF32KeysForEveryType) {
  const int d = 64, nkv = 2, n = 40;
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  std::vector<float> filters(size_t(nkv) * d), k(size_t(n) * nkv * d), v(k.size());
  for (auto& x : filters) x = nd(rng);
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<int32_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  PolicyOptions po;
  po.filters = filters;
  for (const char* name : {"qfilters", "knorm", "qfilters+layer"}) {
    SCOPED_TRACE(name);
    auto policy = make_policy(name, po);
    ASSERT_TRUE(policy->needs(po).key_scores);
    std::vector<std::vector<float>> first;  // the f32 cache's scores, per head
    for (KvType kt : kv_types()) {
      SCOPED_TRACE(kv_type_name(kt));
      Cache c({1, nkv, d}, {n}, policy->needs(po), {kt, KvType::F16});
      EXPECT_THROW(c.append(0, k.data(), v.data(), pos.data(), n), Error);  // no scorer yet
      EXPECT_EQ(c.head(0, 0).n, 0);
      c.set_key_scorer(policy->key_scorer(c.shape()));
      c.append(0, k.data(), v.data(), pos.data(), n);
      for (int h = 0; h < nkv; ++h) {
        const HeadCache& hc = c.head(0, h);
        for (int j = 0; j < n; ++j) {
          const float* key = k.data() + (size_t(j) * nkv + h) * d;
          double dot = 0, norm = 0;
          for (int i = 0; i < d; ++i) dot += double(key[i]) * filters[size_t(h) * d + i], norm += double(key[i]) * key[i];
          const double want = std::string(name) == "knorm" ? -std::sqrt(norm) : dot;
          ASSERT_NEAR(hc.key_score[j], want, 1e-5 * (1 + std::abs(want))) << "head " << h << " slot " << j;
        }
        std::vector<float> got(hc.key_score.begin(), hc.key_score.begin() + n);
        if (kt == KvType::F32) first.push_back(got);
        else EXPECT_EQ(got, first[h]) << "head " << h << ": the scores depend on the storage type";
      }
      EXPECT_EQ(c.bytes_reserved(), int64_t{n} * nkv * (int64_t(kv_row_bytes(kt, d) + kv_row_bytes(KvType::F16, d)) + 4));
      // Retain moves the scores along with their slots.
      const std::vector<int> keep = {1, 5, 17, 39};
      c.retain(0, 1, keep);
      for (size_t i = 0; i < keep.size(); ++i) EXPECT_EQ(c.head(0, 1).key_score[i], first[1][keep[i]]);
      // A shift rescores the moved keys from their rotated rows, dequantized from the storage
      // type (the F32 keys are gone): here a "rotation" that negates them.
      const std::vector<float> stored = keys_f32(c.head(0, 0), d);
      c.shift(0, 0, 2, 3, [&](float* rows, int m) {
        for (int i = 0; i < m * d; ++i) rows[i] = -rows[i];
      });
      const HeadCache& h0 = c.head(0, 0);
      ASSERT_EQ(h0.n, n - 3);
      EXPECT_EQ(h0.key_score[1], first[0][1]);  // below `keep`: untouched
      for (int j = 2; j < h0.n; ++j) {
        const float* key = stored.data() + size_t(j + 3) * d;
        double dot = 0, norm = 0;
        for (int i = 0; i < d; ++i) dot -= double(key[i]) * filters[i], norm += double(key[i]) * key[i];
        const double want = std::string(name) == "knorm" ? -std::sqrt(norm) : dot;
        EXPECT_NEAR(h0.key_score[j], want, 1e-5 * (1 + std::abs(want))) << "slot " << j;
      }
      // The policy reads the kept scores (the layer-consistent variant mixes the heads).
      if (std::string(name).find('+') == std::string::npos) {
        std::vector<std::vector<float>> scores;
        policy->score_layer(c, 0, scores);
        for (int h = 0; h < nkv; ++h)
          for (int j = 0; j < c.head(0, h).n; ++j) EXPECT_EQ(scores[h][j], c.head(0, h).key_score[j]);
      }
    }
  }
}

TEST(KvTypes, NegativeWindowThrows) {
  Cache c({1, 1, 32}, {4}, {}, {KvType::Q8_0, KvType::Q8_0});
  std::vector<float> q(32), out(32);
  const int32_t p = 0;
  ThreadPool pool(1);
  AttentionArgs a{.layer = 0, .n_heads = 1, .scale = 1, .n_tok = 1, .q = q.data(), .q_pos = &p, .out = out.data(),
                  .window = -1};
  EXPECT_THROW(attend_fused(c, a, pool), Error);
}

}  // namespace
}  // namespace qf::kv
