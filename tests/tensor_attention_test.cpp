// Tests for the attention kernels (src/tensor/attention_kernel.h) against a two-pass softmax in
// double precision written here: per-token and tiled kernels, every SIMD target, ragged and
// causal visibility, head sizes that are and are not multiples of the vector lanes, tile
// boundaries, and the layer driver's independence of the thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tensor/attention_kernel.h"
#include "tensor/kernels.h"
#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf {
namespace {

// out = softmax(scale * q.K[0, n)) V[0, n), in double; zeros when n == 0.
std::vector<double> naive(const float* q, const float* k, const float* v, int n, int d, float scale) {
  std::vector<double> out(d, 0.0);
  if (n == 0) return out;
  std::vector<double> s(n);
  for (int j = 0; j < n; ++j) {
    double dot = 0;
    for (int x = 0; x < d; ++x) dot += double(q[x]) * k[size_t(j) * d + x];
    s[j] = dot * scale;
  }
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0;
  for (double& e : s) sum += (e = std::exp(e - mx));
  for (int j = 0; j < n; ++j)
    for (int x = 0; x < d; ++x) out[x] += s[j] / sum * v[size_t(j) * d + x];
  return out;
}

struct Problem {
  int n_tok, n_heads, n_kv, d;
  std::vector<float> q;                 // [n_tok][n_heads][d]
  std::vector<std::vector<float>> k, v;  // per KV head, exactly max(visible) rows
  std::vector<std::vector<int>> visible;  // per KV head, [n_tok]
  float scale;

  std::vector<AttentionKv> heads() const {
    std::vector<AttentionKv> h(n_kv);
    for (int g = 0; g < n_kv; ++g) h[g] = {f32_rows(k[g].data(), d), f32_rows(v[g].data(), d), visible[g].data()};
    return h;
  }
  int group() const { return n_heads / n_kv; }
  size_t off(int t, int h) const { return (size_t(t) * n_heads + h) * d; }
};

enum class Vis { kCausal, kRagged, kArbitrary, kZeroFirst };

// Keys exactly as many as the largest visible count, so ASan sees any read past them.
Problem make_problem(int n_tok, int n_heads, int n_kv, int d, int past, Vis vis, std::mt19937& rng) {
  Problem p{n_tok, n_heads, n_kv, d, {}, {}, {}, {}, 1.0f / std::sqrt(float(d))};
  std::normal_distribution<float> nd(0.0f, 1.5f);
  p.q.resize(size_t(n_tok) * n_heads * d);
  for (auto& x : p.q) x = nd(rng);
  for (int g = 0; g < n_kv; ++g) {
    std::vector<int> c(n_tok);
    for (int t = 0; t < n_tok; ++t) {
      switch (vis) {
        case Vis::kCausal: c[t] = past + t + 1; break;
        case Vis::kRagged:  // non-decreasing with repeats and jumps, as after per-head eviction
          c[t] = (t == 0 ? std::uniform_int_distribution<int>(0, past)(rng) : c[t - 1]) +
                 std::uniform_int_distribution<int>(0, 1)(rng) * std::uniform_int_distribution<int>(0, 70)(rng);
          break;
        case Vis::kArbitrary: c[t] = std::uniform_int_distribution<int>(0, past + n_tok)(rng); break;
        case Vis::kZeroFirst: c[t] = t < n_tok / 2 ? 0 : past + t; break;
      }
    }
    const int n = *std::max_element(c.begin(), c.end());
    std::vector<float> k(size_t(std::max(n, 1)) * d), v(k.size());
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    p.k.push_back(std::move(k));
    p.v.push_back(std::move(v));
    p.visible.push_back(std::move(c));
  }
  return p;
}

void expect_matches_naive(const Problem& p, const std::vector<float>& out, const std::string& what) {
  for (int t = 0; t < p.n_tok; ++t)
    for (int h = 0; h < p.n_heads; ++h) {
      const int g = h / p.group();
      const auto want = naive(p.q.data() + p.off(t, h), p.k[g].data(), p.v[g].data(), p.visible[g][t], p.d, p.scale);
      for (int x = 0; x < p.d; ++x)
        ASSERT_NEAR(out[p.off(t, h) + x], want[x], 2e-5 + 2e-5 * std::abs(want[x]))
            << what << " t=" << t << " h=" << h << " x=" << x << " visible=" << p.visible[g][t];
    }
}

class AttentionKernel : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(force_simd_target("best")); }
};

struct Shape {
  int n_tok, n_heads, n_kv, d, past;
};
const Shape kShapes[] = {
    {1, 3, 1, 64, 0},   {2, 9, 3, 64, 5},    {7, 9, 3, 64, 60},   {33, 9, 3, 64, 100},  {40, 3, 1, 13, 70},
    {17, 4, 4, 1, 3},   {9, 5, 1, 80, 128},  {12, 2, 2, 256, 63}, {70, 9, 3, 17, 130}, {5, 8, 1, 33, 64},
    {64, 6, 2, 64, 0},  {3, 1, 1, 7, 1},     {100, 3, 3, 32, 10},
};

// The tiled kernel on one KV head's group, token block = the whole batch.
TEST_F(AttentionKernel, BlockMatchesNaiveEveryTarget) {
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(11);
    for (const Shape& s : kShapes)
      for (Vis vis : {Vis::kCausal, Vis::kRagged, Vis::kArbitrary, Vis::kZeroFirst}) {
        const Problem p = make_problem(s.n_tok, s.n_heads, s.n_kv, s.d, s.past, vis, rng);
        std::vector<float> out(p.q.size(), NAN);
        for (int g = 0; g < p.n_kv; ++g) {
          const size_t off = size_t(g) * p.group() * p.d, stride = size_t(p.n_heads) * p.d;
          attention_block_f32(p.q.data() + off, stride, p.n_tok, p.group(), p.k[g].data(), p.v[g].data(),
                              p.visible[g].data(), p.d, p.scale, out.data() + off, stride);
        }
        expect_matches_naive(p, out, target + " block d=" + std::to_string(s.d) + " n_tok=" + std::to_string(s.n_tok) +
                                         " vis=" + std::to_string(int(vis)));
        if (HasFatalFailure()) return;
      }
  }
}

// The per-token kernel, one token's group at a time.
TEST_F(AttentionKernel, GroupMatchesNaiveEveryTarget) {
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(12);
    for (const Shape& s : kShapes) {
      const Problem p = make_problem(s.n_tok, s.n_heads, s.n_kv, s.d, s.past, Vis::kRagged, rng);
      std::vector<float> out(p.q.size(), NAN);
      for (int t = 0; t < p.n_tok; ++t)
        for (int g = 0; g < p.n_kv; ++g)
          attention_group_f32(p.q.data() + p.off(t, g * p.group()), p.group(), p.k[g].data(), p.v[g].data(),
                              p.visible[g][t], p.d, p.scale, out.data() + p.off(t, g * p.group()));
      expect_matches_naive(p, out, target + " group d=" + std::to_string(s.d));
      if (HasFatalFailure()) return;
    }
  }
}

// A row's result must not depend on which other rows share its block: this is what makes the
// layer driver independent of how work is split.
TEST_F(AttentionKernel, BlockRowsIndependentOfBlock) {
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(13);
    const Problem p = make_problem(37, 3, 1, 64, 150, Vis::kCausal, rng);
    const size_t stride = size_t(p.n_heads) * p.d;
    std::vector<float> whole(p.q.size()), alone(p.q.size());
    attention_block_f32(p.q.data(), stride, p.n_tok, 3, p.k[0].data(), p.v[0].data(), p.visible[0].data(), p.d,
                        p.scale, whole.data(), stride);
    for (int t = 0; t < p.n_tok; ++t)
      attention_block_f32(p.q.data() + t * stride, stride, 1, 3, p.k[0].data(), p.v[0].data(), &p.visible[0][t], p.d,
                          p.scale, alone.data() + t * stride, stride);
    EXPECT_EQ(whole, alone) << target;
  }
}

// Keys a row must not see get exactly zero weight, however large their scores would be.
TEST_F(AttentionKernel, MaskedKeysGetZeroWeight) {
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    const int d = 16, n = 100;
    std::vector<float> k(size_t(n) * d, 0.0f), v(size_t(n) * d, 0.0f), q(3 * d, 1.0f);
    for (int j = 0; j < n; ++j) {
      const float big = j < 10 ? 0.0f : 50.0f;  // keys 10.. would dominate any softmax they enter
      for (int x = 0; x < d; ++x) k[size_t(j) * d + x] = big, v[size_t(j) * d + x] = j < 10 ? 1.0f : 1e30f;
    }
    const int visible[3] = {10, 3, 100};
    std::vector<float> out(3 * d);
    attention_block_f32(q.data(), d, 3, 1, k.data(), v.data(), visible, d, 1.0f, out.data(), d);
    for (int x = 0; x < d; ++x) {
      EXPECT_NEAR(out[x], 1.0f, 1e-6) << target;
      EXPECT_NEAR(out[d + x], 1.0f, 1e-6) << target;
      EXPECT_NEAR(out[2 * d + x], 1e30f, 1e24f) << target;
    }
  }
}

// The layer driver: both kernels (few and many tokens), bit-identical for 1, 2 and 3 threads.
TEST_F(AttentionKernel, LayerIndependentOfThreadsEveryTarget) {
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(14);
    const Shape shapes[] = {{1, 9, 3, 64, 500}, {3, 9, 3, 64, 40},  {256, 9, 3, 64, 300}, {77, 9, 3, 64, 0},
                            {50, 8, 2, 13, 65}, {45, 4, 1, 96, 20}, {200, 2, 2, 40, 7}};
    for (const Shape& s : shapes)
      for (Vis vis : {Vis::kCausal, Vis::kRagged}) {
        const Problem p = make_problem(s.n_tok, s.n_heads, s.n_kv, s.d, s.past, vis, rng);
        const auto heads = p.heads();
        std::vector<float> first;
        for (ThreadPool& pool : pools) {
          std::vector<float> out(p.q.size(), NAN);
          attention_f32(p.q.data(), p.n_tok, p.n_heads, heads.data(), p.n_kv, p.d, p.scale, out.data(), pool);
          if (first.empty()) {
            first = out;
            expect_matches_naive(p, out, target + " layer n_tok=" + std::to_string(s.n_tok));
            if (HasFatalFailure()) return;
          } else {
            ASSERT_EQ(out, first) << target << " threads=" << pool.size() << " n_tok=" << s.n_tok;
          }
        }
      }
  }
}

TEST_F(AttentionKernel, BadShapesThrow) {
  ThreadPool pool(1);
  std::vector<float> q(300), out(300);
  const int vis = 0;
  const AttentionKv kv{f32_rows(q.data(), 8), f32_rows(q.data(), 8), &vis};
  EXPECT_THROW(attention_f32(q.data(), 1, 1, &kv, 1, 257, 1.0f, out.data(), pool), Error);
  EXPECT_THROW(attention_f32(q.data(), 1, 1, &kv, 1, 0, 1.0f, out.data(), pool), Error);
  EXPECT_THROW(attention_f32(q.data(), 1, 4, &kv, 3, 8, 1.0f, out.data(), pool), Error);
  EXPECT_THROW(attention_block_f32(q.data(), 300, 1, 1, q.data(), q.data(), &vis, 300, 1.0f, out.data(), 300), Error);
}

}  // namespace
}  // namespace qf
