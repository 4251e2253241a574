// The attention kernels on every KV storage type pair (f32, f16, bf16, q8_0, q4_0 for keys and
// values independently) and with sliding windows, against a two-pass softmax in double written
// here, on every SIMD target.
//
// The reference reads the same stored bytes converted by the weights' scalar dequantize_row (not
// the kernels' SIMD conversion), so the quantization error of a type is not part of the
// comparison: what remains is float rounding in the kernels (d-term dot products, exp, sums of a
// few hundred weights), the same tolerance as the f32 kernels' tests (2e-5 + 2e-5 |x|) for every
// type. A kernel that misread a block layout (nibble order, scale, offset 8) would miss by the
// size of a value, about 1.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "tensor/attention_kernel.h"
#include "tensor/kernels.h"
#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf {
namespace {

constexpr GgmlType kTypes[] = {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0};

std::string name(GgmlType t) { return std::string(type_info(t).name); }

// n random rows of d values stored as type t, each value of about unit size.
std::vector<uint8_t> random_rows(GgmlType t, int n, int d, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  const size_t rb = row_bytes(t, d);
  std::vector<uint8_t> out(rb * std::max(n, 1));
  const auto put16 = [&](size_t at, uint16_t h) { std::memcpy(out.data() + at, &h, 2); };
  switch (t) {
    case GgmlType::F32:
      for (size_t i = 0; i < out.size() / 4; ++i) {
        const float x = nd(rng);
        std::memcpy(out.data() + 4 * i, &x, 4);
      }
      break;
    case GgmlType::F16: case GgmlType::BF16:
      for (size_t i = 0; i < out.size() / 2; ++i) put16(2 * i, t == GgmlType::F16 ? f32_to_fp16(nd(rng)) : f32_to_bf16(nd(rng)));
      break;
    case GgmlType::Q8_0: case GgmlType::Q4_0: {
      const size_t bb = type_info(t).block_bytes;
      const float unit = t == GgmlType::Q8_0 ? 1.0f / 64 : 1.0f / 4;  // scale so values are ~1
      for (size_t b = 0; b < out.size() / bb; ++b) {
        put16(b * bb, f32_to_fp16(unit * std::uniform_real_distribution<float>(0.2f, 1.0f)(rng)));
        for (size_t i = 2; i < bb; ++i) out[b * bb + i] = static_cast<uint8_t>(byte(rng));
      }
      break;
    }
    default: ADD_FAILURE() << "not a KV type";
  }
  return out;
}

// Rows as floats through the scalar path.
std::vector<float> scalar_f32(GgmlType t, const std::vector<uint8_t>& rows, int n, int d) {
  std::vector<float> out(size_t(n) * d);
  const WeightView w{t, d, n, rows.data()};
  for (int j = 0; j < n; ++j) dequantize_row(w, j, out.data() + size_t(j) * d);
  return out;
}

// softmax(scale * q.K[lo, hi)) V[lo, hi) in double; zeros for an empty range.
std::vector<double> naive(const float* q, const float* k, const float* v, int lo, int hi, int d, float scale) {
  std::vector<double> out(d, 0.0);
  if (hi <= lo) return out;
  std::vector<double> s;
  for (int j = lo; j < hi; ++j) {
    double dot = 0;
    for (int x = 0; x < d; ++x) dot += double(q[x]) * k[size_t(j) * d + x];
    s.push_back(dot * scale);
  }
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (double& e : s) sum += (e = std::exp(e - mx));
  for (int j = lo; j < hi; ++j)
    for (int x = 0; x < d; ++x) out[x] += s[j - lo] / sum * v[size_t(j) * d + x];
  return out;
}

// A layer: n_tok causal queries after `past` tokens, GQA 9 over 3, keys/values of a type pair,
// optionally a sliding window (first[t] = visible[t] - window, at least 0).
struct Layer {
  int n_tok, n_heads = 9, n_kv = 3, d;
  GgmlType kt, vt;
  std::vector<float> q;
  std::vector<std::vector<uint8_t>> k, v;     // stored, per KV head
  std::vector<std::vector<float>> kf, vf;     // the same, as floats (scalar path)
  std::vector<std::vector<int>> visible, first;
  float scale;

  std::vector<AttentionKv> heads(bool windowed) const {
    std::vector<AttentionKv> h(n_kv);
    for (int g = 0; g < n_kv; ++g)
      h[g] = {{kt, k[g].data(), row_bytes(kt, d)}, {vt, v[g].data(), row_bytes(vt, d)}, visible[g].data(),
              windowed ? first[g].data() : nullptr};
    return h;
  }
  size_t off(int t, int h) const { return (size_t(t) * n_heads + h) * d; }
};

Layer make_layer(GgmlType kt, GgmlType vt, int n_tok, int d, int past, int window, std::mt19937& rng) {
  Layer l{n_tok, 9, 3, d, kt, vt, {}, {}, {}, {}, {}, {}, {}, 1.0f / std::sqrt(float(d))};
  std::normal_distribution<float> nd(0.0f, 1.0f);
  l.q.resize(size_t(n_tok) * l.n_heads * d);
  for (auto& x : l.q) x = nd(rng);
  for (int g = 0; g < l.n_kv; ++g) {
    const int n = past - 7 * g + n_tok;  // heads hold different counts, as after eviction
    l.k.push_back(random_rows(kt, n, d, rng));
    l.v.push_back(random_rows(vt, n, d, rng));
    l.kf.push_back(scalar_f32(kt, l.k.back(), n, d));
    l.vf.push_back(scalar_f32(vt, l.v.back(), n, d));
    std::vector<int> vis(n_tok), first(n_tok);
    for (int t = 0; t < n_tok; ++t) vis[t] = n - n_tok + t + 1, first[t] = window > 0 ? std::max(0, vis[t] - window) : 0;
    l.visible.push_back(vis);
    l.first.push_back(first);
  }
  return l;
}

void expect_matches_naive(const Layer& l, const std::vector<float>& out, const std::string& what) {
  const int group = l.n_heads / l.n_kv;
  for (int t = 0; t < l.n_tok; ++t)
    for (int h = 0; h < l.n_heads; ++h) {
      const int g = h / group;
      const auto want = naive(l.q.data() + l.off(t, h), l.kf[g].data(), l.vf[g].data(), l.first[g][t],
                              l.visible[g][t], l.d, l.scale);
      for (int x = 0; x < l.d; ++x)
        ASSERT_NEAR(out[l.off(t, h) + x], want[x], 2e-5 + 2e-5 * std::abs(want[x]))
            << what << " t=" << t << " h=" << h << " x=" << x;
    }
}

class AttentionTypes : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(force_simd_target("best")); }
};

// The kernels' SIMD conversion gives exactly the scalar path's floats, from any first row.
TEST_F(AttentionTypes, DequantizeMatchesScalarEveryTarget) {
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(31);
    for (GgmlType t : kTypes)
      for (int d : {32, 64, 96, 256}) {
        const int n = 70;
        const auto rows = random_rows(t, n, d, rng);
        const auto want = scalar_f32(t, rows, n, d);
        std::vector<float> got(size_t(n) * d, NAN);
        dequantize_kv_rows({t, rows.data(), row_bytes(t, d)}, 3, n - 3, d, got.data());
        ASSERT_TRUE(std::equal(got.begin(), got.begin() + size_t(n - 3) * d, want.begin() + 3 * d))
            << target << " " << name(t) << " d=" << d;
      }
    // Float types need no whole blocks.
    const auto rows = random_rows(GgmlType::F16, 5, 13, rng);
    std::vector<float> got(5 * 13);
    dequantize_kv_rows({GgmlType::F16, rows.data(), 26}, 0, 5, 13, got.data());
    EXPECT_EQ(got, scalar_f32(GgmlType::F16, rows, 5, 13)) << target;
  }
}

// Every type pair, decode (per-token kernel) and prefill (tiled kernel), with and without a
// sliding window, against the reference; and the same bits for 1 and 3 threads.
TEST_F(AttentionTypes, EveryTypePairMatchesNaiveEveryTarget) {
  ThreadPool one(1), three(3);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(32);
    for (GgmlType kt : kTypes)
      for (GgmlType vt : kTypes)
        for (const auto& [n_tok, d, past, window] : {std::tuple{1, 64, 150, 0}, std::tuple{1, 32, 300, 100},
                                                     std::tuple{19, 128, 70, 0}, std::tuple{40, 64, 90, 50}}) {
          const Layer l = make_layer(kt, vt, n_tok, d, past, window, rng);
          const auto heads = l.heads(window > 0);
          std::vector<float> a(l.q.size(), NAN), b(l.q.size(), NAN);
          attention_f32(l.q.data(), n_tok, l.n_heads, heads.data(), l.n_kv, d, l.scale, a.data(), one);
          attention_f32(l.q.data(), n_tok, l.n_heads, heads.data(), l.n_kv, d, l.scale, b.data(), three);
          const std::string what = target + " " + name(kt) + "/" + name(vt) + " n_tok=" + std::to_string(n_tok) +
                                   " window=" + std::to_string(window);
          expect_matches_naive(l, a, what);
          if (HasFatalFailure()) return;
          ASSERT_EQ(a, b) << what << ": depends on the thread count";
        }
  }
}

// Several layers' calls in one attention_f32_many (a batched step: sessions decoding, with their
// own type pairs, windows and key counts, and a prompt chunk): each output is attention_f32's on
// its own, bit for bit, for 1 and 3 threads; an empty call and a call that sees no key included.
TEST_F(AttentionTypes, ManyCallsEqualEachAloneEveryTarget) {
  ThreadPool one(1), three(3);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(41);
    std::vector<Layer> layers;
    const std::tuple<GgmlType, GgmlType, int, int, int> shapes[] = {
        {GgmlType::F16, GgmlType::F16, 1, 150, 0},  {GgmlType::Q8_0, GgmlType::Q8_0, 1, 90, 0},
        {GgmlType::F32, GgmlType::BF16, 1, 300, 64}, {GgmlType::F16, GgmlType::F16, 23, 70, 0},
        {GgmlType::Q4_0, GgmlType::F16, 1, 40, 0},  {GgmlType::F16, GgmlType::F16, 0, 30, 0}};
    for (const auto& [kt, vt, n_tok, past, window] : shapes) layers.push_back(make_layer(kt, vt, n_tok, 64, past, window, rng));
    layers[4].visible[1][0] = 0;  // one head of one session sees nothing: zeros
    std::vector<std::vector<AttentionKv>> heads;
    std::vector<std::vector<float>> want, got1, got3;
    std::vector<AttentionCall> calls1, calls3;
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& l = layers[i];
      heads.push_back(l.heads(std::get<4>(shapes[i]) > 0));
      want.emplace_back(l.q.size(), NAN);
      got1.emplace_back(l.q.size(), NAN);
      got3.emplace_back(l.q.size(), NAN);
    }
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& l = layers[i];
      attention_f32(l.q.data(), l.n_tok, l.n_heads, heads[i].data(), l.n_kv, l.d, l.scale, want[i].data(), one);
      calls1.push_back({l.q.data(), l.n_tok, l.n_heads, heads[i].data(), l.n_kv, l.d, l.scale, got1[i].data()});
      calls3.push_back({l.q.data(), l.n_tok, l.n_heads, heads[i].data(), l.n_kv, l.d, l.scale, got3[i].data()});
    }
    attention_f32_many(calls1.data(), static_cast<int>(calls1.size()), one);
    attention_f32_many(calls3.data(), static_cast<int>(calls3.size()), three);
    for (size_t i = 0; i < layers.size(); ++i) {
      for (size_t x = 0; x < want[i].size(); ++x) {
        ASSERT_EQ(std::memcmp(&got1[i][x], &want[i][x], sizeof(float)), 0) << target << " call " << i << " x=" << x;
        ASSERT_EQ(std::memcmp(&got3[i][x], &want[i][x], sizeof(float)), 0) << target << " call " << i << " x=" << x;
      }
    }
    const int group = layers[4].n_heads / layers[4].n_kv;
    for (int x = 0; x < group * 64; ++x) EXPECT_EQ(got1[4][group * 64 + x], 0.0f) << "a head that sees no key";
  }
  // A call the kernels cannot run is an error, as for attention_f32.
  std::mt19937 rng(42);
  const Layer l = make_layer(GgmlType::F16, GgmlType::F16, 1, 64, 30, 0, rng);
  const auto h = l.heads(false);
  std::vector<float> out(l.q.size());
  const AttentionCall bad{l.q.data(), 1, 8, h.data(), l.n_kv, l.d, l.scale, out.data()};
  EXPECT_THROW(attention_f32_many(&bad, 1, one), Error);
}

// The statistics path on every type pair: its output is attention_f32's bit for bit, and the
// weights it sums are the reference's softmax weights (windowed ones included).
TEST_F(AttentionTypes, StatisticsEveryTypePair) {
  ThreadPool pool(2);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(33);
    for (GgmlType kt : kTypes)
      for (GgmlType vt : kTypes)
        for (const auto& [n_tok, window] : {std::pair{1, 0}, std::pair{1, 90}, std::pair{30, 0}, std::pair{30, 70}}) {
          const int d = 64, past = 160;
          const Layer l = make_layer(kt, vt, n_tok, d, past, window, rng);
          const auto heads = l.heads(window > 0);
          std::vector<std::vector<float>> sum(l.n_kv);
          std::vector<AttentionColumns> cols(l.n_kv);
          for (int g = 0; g < l.n_kv; ++g) {
            sum[g].assign(l.visible[g].back(), 0.0f);
            cols[g] = {.n_keys = int(sum[g].size()), .sum = sum[g].data()};
          }
          std::vector<float> out(l.q.size()), want_out(l.q.size());
          attention_stats_f32(l.q.data(), n_tok, l.n_heads, heads.data(), l.n_kv, d, l.scale, nullptr, cols.data(),
                              out.data(), pool);
          attention_f32(l.q.data(), n_tok, l.n_heads, heads.data(), l.n_kv, d, l.scale, want_out.data(), pool);
          const std::string what = target + " " + name(kt) + "/" + name(vt) + " n_tok=" + std::to_string(n_tok) +
                                   " window=" + std::to_string(window);
          ASSERT_EQ(out, want_out) << what;
          const int group = l.n_heads / l.n_kv;
          for (int g = 0; g < l.n_kv; ++g) {
            std::vector<double> want(sum[g].size(), 0.0);
            for (int t = 0; t < n_tok; ++t)
              for (int h = g * group; h < (g + 1) * group; ++h) {
                // The weights are the output's coefficients: recover them from one-hot values.
                const int lo = l.first[g][t], hi = l.visible[g][t];
                std::vector<double> s;
                for (int j = lo; j < hi; ++j) {
                  double dot = 0;
                  for (int x = 0; x < d; ++x) dot += double(l.q[l.off(t, h) + x]) * l.kf[g][size_t(j) * d + x];
                  s.push_back(dot * l.scale);
                }
                const double mx = *std::max_element(s.begin(), s.end());
                double z = 0;
                for (double& e : s) z += (e = std::exp(e - mx));
                for (int j = lo; j < hi; ++j) want[j] += s[j - lo] / z / group;
              }
            for (size_t j = 0; j < want.size(); ++j)
              ASSERT_NEAR(sum[g][j], want[j], 1e-6 + 1e-5 * want[j]) << what << " head " << g << " key " << j;
          }
        }
  }
}

// Reading a stored type is exact: both kernels (the decode one widens in registers, the tiled
// one converts tiles to scratch) give on a type pair the very bits they give on the same rows
// converted to f32 first, on every target, including rows whose length is not a multiple of
// the vector (d = 40 for the half types: a scalar tail). So a cache of any type differs from
// an f32 one only by what storing the values rounded away.
TEST_F(AttentionTypes, StoredTypesGiveTheBitsOfTheirRowsAsF32) {
  ThreadPool pool(1);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(34);
    for (GgmlType kt : kTypes)
      for (GgmlType vt : kTypes)
        for (const int d : {64, 40}) {
          if (d % type_info(kt).block_elems != 0 || d % type_info(vt).block_elems != 0) continue;
          for (const auto& [n_tok, window] : {std::pair{1, 0}, std::pair{1, 70}, std::pair{9, 0}}) {
            const Layer l = make_layer(kt, vt, n_tok, d, 200, window, rng);
            Layer f = l;  // the same rows stored as f32, converted by the kernels' SIMD path
            f.kt = f.vt = GgmlType::F32;
            for (int g = 0; g < l.n_kv; ++g) {
              const int n = l.visible[g].back();
              std::vector<float> kf(size_t(n) * d), vf(size_t(n) * d);
              dequantize_kv_rows(l.heads(false)[g].k, 0, n, d, kf.data());
              dequantize_kv_rows(l.heads(false)[g].v, 0, n, d, vf.data());
              f.k[g].assign(reinterpret_cast<const uint8_t*>(kf.data()), reinterpret_cast<const uint8_t*>(kf.data() + kf.size()));
              f.v[g].assign(reinterpret_cast<const uint8_t*>(vf.data()), reinterpret_cast<const uint8_t*>(vf.data() + vf.size()));
            }
            std::vector<float> stored(l.q.size(), NAN), as_f32(l.q.size(), NAN);
            attention_f32(l.q.data(), n_tok, l.n_heads, l.heads(window > 0).data(), l.n_kv, d, l.scale, stored.data(),
                          pool);
            attention_f32(f.q.data(), n_tok, f.n_heads, f.heads(window > 0).data(), f.n_kv, d, f.scale, as_f32.data(),
                          pool);
            ASSERT_EQ(stored, as_f32) << target << " " << name(kt) << "/" << name(vt) << " d=" << d
                                      << " n_tok=" << n_tok << " window=" << window;
          }
        }
  }
}

TEST_F(AttentionTypes, BadTypesAndShapesThrow) {
  ThreadPool pool(1);
  std::vector<uint8_t> bytes(4096);
  std::vector<float> q(64), out(64);
  const int vis = 1;
  const auto attend = [&](KvRows k, KvRows v, int d) {
    const AttentionKv kv{k, v, &vis};
    attention_f32(q.data(), 1, 1, &kv, 1, d, 1.0f, out.data(), pool);
  };
  const KvRows f32{GgmlType::F32, bytes.data(), 64 * 4};
  EXPECT_NO_THROW(attend(f32, f32, 64));
  // A type the kernels do not read.
  EXPECT_THROW(attend({GgmlType::Q4_1, bytes.data(), row_bytes(GgmlType::Q4_1, 64)}, f32, 64), Error);
  EXPECT_THROW(attend(f32, {GgmlType::Q6_K, bytes.data(), 210}, 64), Error);
  // Quantized rows must be whole blocks; the row size must be the type's.
  EXPECT_THROW(attend({GgmlType::Q8_0, bytes.data(), 34}, {GgmlType::F32, bytes.data(), 48 * 4}, 48), Error);
  EXPECT_THROW(attend({GgmlType::Q8_0, bytes.data(), 60}, f32, 64), Error);
  EXPECT_THROW(dequantize_kv_rows({GgmlType::Q4_0, bytes.data(), 18}, 0, 1, 48, out.data()), Error);
  // A window may not start after the visible end.
  const int first = 2;
  const AttentionKv bad{f32, f32, &vis, &first};
  std::vector<float> sum(4);
  const AttentionColumns cols{.n_keys = 4, .sum = sum.data()};
  EXPECT_THROW(attention_stats_f32(q.data(), 1, 1, &bad, 1, 64, 1.0f, nullptr, &cols, out.data(), pool), Error);
  EXPECT_THROW(attention_f32(q.data(), 1, 1, &bad, 1, 64, 1.0f, out.data(), pool), Error);
  const int negative = -1;
  const AttentionKv before_zero{f32, f32, &vis, &negative};
  EXPECT_THROW(attention_f32(q.data(), 1, 1, &before_zero, 1, 64, 1.0f, out.data(), pool), Error);
}

}  // namespace
}  // namespace qf
