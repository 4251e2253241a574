// Context shift (--kv-positions shift, Session::shift_context): endless teacher forcing on a
// 64-position context never errs and keeps positions below the context, and every step's logits
// equal, within float rounding, those of an independent reference: a session with a large context
// that never shifts, from which the test drops the same tokens. With no kept prefix (shift_keep
// 0) every remaining key moves back by the same amount, and RoPE attention depends on positions
// only through their differences, so the shifted cache, whose keys were rotated back, must give
// the reference's logits; a wrong rotation, layout (adjacent / halves pairs), rotary base,
// frequency factor, position update or dropped range shows as a logit difference of order one.
// The kept prefix (the default 4 sinks, which do not move and so come closer to new tokens) is
// checked separately: sinks untouched, moved keys equal to the reference's rotated forward.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "kv/policy.h"
#include "model/forward.h"
#include "model/ops.h"
#include "model/session.h"
#include "test_paths.h"
#include "util/error.h"

namespace qf {
namespace {

constexpr int kCtx = 64, kBatch = 16;

struct CacheSetup {
  std::string policy = "none";  // "none" = full cache
  int budget = 0;
  kv::KvType type = kv::KvType::F32;
  int keep = 0;  // SessionOptions::shift_keep
};

std::unique_ptr<Session> make_session(const Model& m, const CacheSetup& su, int n_ctx, PositionMode mode, ThreadPool* pool) {
  SessionOptions so;
  so.n_ctx = n_ctx;
  so.n_batch = kBatch;
  so.pool = pool;
  so.positions = mode;
  so.shift_keep = su.keep;
  so.kv_types = {su.type, su.type};
  if (su.policy != "none") {
    kv::PolicyOptions po;
    kv::CompressionConfig cc;
    cc.budget = su.budget;
    cc.window = 4;
    cc.evict_every = 2;
    so.compressor = std::make_unique<kv::Compressor>(kv::make_policy(su.policy, po), po, cc);
  }
  return std::make_unique<Session>(m, std::move(so));
}

std::vector<int32_t> random_tokens(int n, int n_vocab, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> pick(0, n_vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = pick(rng);
  return t;
}

// The reference forgets what a shift of the shifted session forgot: positions
// [keep + before, keep + after) of the unshifted sequence, in every head.
void drop_positions(Session& ref, int64_t from, int64_t to) {
  kv::Cache& c = ref.cache();
  for (int l = 0; l < c.shape().n_layers; ++l)
    for (int h = 0; h < c.shape().n_kv_heads; ++h) {
      const kv::HeadCache& hc = c.head(l, h);
      std::vector<int> keep;
      for (int i = 0; i < hc.n; ++i)
        if (hc.pos[i] < from || hc.pos[i] >= to) keep.push_back(i);
      c.retain(l, h, keep);
    }
}

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]));
  return d;
}

double max_abs(std::span<const float> a) {
  double m = 0;
  for (float x : a) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

// Where every head's keys and values live: a shift must move data inside them, never reallocate.
std::vector<const uint8_t*> storage(const Session& s) {
  std::vector<const uint8_t*> p;
  const kv::Cache& c = s.cache();
  for (int l = 0; l < c.shape().n_layers; ++l)
    for (int h = 0; h < c.shape().n_kv_heads; ++h) {
      p.push_back(c.head(l, h).k.data());
      p.push_back(c.head(l, h).v.data());
    }
  return p;
}


// Teacher-forces n_tokens (the first `prompt` in one prefill, then chunks of 1..3) through a
// shifting session and the unshifted reference; every step's logits must agree to `tol` x their
// magnitude. Returns the number of shifts.
int64_t expect_shift_matches_reference(const std::string& fixture, const CacheSetup& su, int n_tokens, double tol) {
  auto m = Model::load(fixture);
  ThreadPool pool(1);
  auto shifted = make_session(*m, su, kCtx, PositionMode::shift, &pool);
  auto ref = make_session(*m, su, 1 << 14, PositionMode::keep, &pool);
  const int keep = su.keep;
  const std::vector<const uint8_t*> where = storage(*shifted);
  const std::vector<int32_t> tokens = random_tokens(n_tokens, m->config().n_vocab, 11);
  int64_t shifts = 0;
  double worst = 0;
  for (int i = 0; i < n_tokens;) {
    const int n = i == 0 ? 20 : 1 + i % 3;
    const std::span<const int32_t> chunk(tokens.data() + i, std::min(n, n_tokens - i));
    const int64_t before = shifted->positions_shifted();
    const std::span<const float> a = i == 0 ? shifted->prefill(chunk) : shifted->eval(chunk);
    const int64_t after = shifted->positions_shifted();
    if (after > before) {
      EXPECT_EQ(after - before, (kCtx - keep) / 2) << "one shift per chunk, of half the unkept context";
      drop_positions(*ref, keep + before, keep + after);
      ++shifts;
    }
    const std::span<const float> b = i == 0 ? ref->prefill(chunk) : ref->eval(chunk);
    const double d = max_abs_diff(a, b), scale = std::max(1.0, max_abs(b));
    worst = std::max(worst, d / scale);
    if (d > tol * scale) {
      ADD_FAILURE() << "token " << i << ": logits differ by " << d << " (scale " << scale << ") after " << shifts
                    << " shifts";
      return shifts;
    }
    i += static_cast<int>(chunk.size());
    // Positions always below the context, in every head; the reference holds the same tokens.
    EXPECT_LE(shifted->n_past(), kCtx);
    EXPECT_EQ(shifted->n_past() + shifted->positions_shifted(), ref->n_past());
    const kv::Cache& c = shifted->cache();
    for (int l = 0; l < c.shape().n_layers; ++l)
      for (int h = 0; h < c.shape().n_kv_heads; ++h) {
        const kv::HeadCache& hs = c.head(l, h);
        const kv::HeadCache& hr = ref->cache().head(l, h);
        EXPECT_EQ(hs.n, hr.n) << "layer " << l << " head " << h;
        for (int j = 0; j < std::min(hs.n, hr.n); ++j) {
          EXPECT_LT(hs.pos[j], kCtx);
          EXPECT_EQ(hs.pos[j], hr.pos[j] < keep ? hr.pos[j] : hr.pos[j] - shifted->positions_shifted());
        }
      }
    if (::testing::Test::HasFailure()) return shifts;
  }
  EXPECT_EQ(storage(*shifted), where) << "memory flat: the cache's storage was never reallocated";
  std::printf("%s: %lld shifts over %d tokens, worst relative logit difference %.2e\n", fixture.c_str(),
              static_cast<long long>(shifts), n_tokens, worst);
  return shifts;
}

TEST(ContextShift, FullCacheMatchesUnshiftedReference) {
  // Adjacent pairs (llama layout), a full cache: the shift alone bounds it.
  EXPECT_GT(expect_shift_matches_reference(test::fixture("llama_f32_gqa_tied.gguf"), {}, 3000, 2e-4), 90);
}

TEST(ContextShift, BoundedCacheMatchesUnshiftedReference) {
  // A budget: a few of the policy's old tokens fall in each forgotten range, the rest move.
  // (random: its draws do not depend on the keys, so both sessions evict the same tokens; a
  // key-scoring policy could break near-ties differently, e.g. knorm on layer 0, where the same
  // token always has the same key norm up to the rotation's rounding.)
  EXPECT_GT(expect_shift_matches_reference(test::fixture("llama_f32_gqa_tied.gguf"), {"random", 24}, 3000, 2e-4), 90);
}

TEST(ContextShift, HalvesPairingAndLargeBaseMatchReference) {
  // NEOX layout (qwen2: pairs (i, i + n_rot/2)), rotary base 1e6, query/key biases, a budget.
  EXPECT_GT(expect_shift_matches_reference(test::fixture("qwen2_f32_gqa.gguf"), {"random", 20}, 2000, 2e-4), 50);
}

TEST(ContextShift, FrequencyFactorsMatchReference) {
  // Llama 3.1's rope_freqs divide the frequencies: the rotation back must use them too.
  EXPECT_GT(expect_shift_matches_reference(test::fixture("llama31_f32_gqa.gguf"), {}, 2000, 2e-4), 50);
}

TEST(ContextShift, SlidingWindowLayersMatchReference) {
  // Gemma 3: local layers (window 5, a ring of window + batch slots) beside a global one.
  EXPECT_GT(expect_shift_matches_reference(test::fixture("gemma3_f32_mqa_tied.gguf"), {"random", 24}, 2000, 2e-4), 50);
}

TEST(ContextShift, QuantizedKeysStayCloseToReference) {
  // q8_0 / f16 keys are dequantized, rotated and stored again: one more rounding per move, a key
  // moving at most twice. Logits stay within a few roundings of the unshifted reference (q8_0 on
  // this random-weight fixture: 0.036 of the logit scale; a wrong rotation gives 0.3 or more).
  EXPECT_GT(expect_shift_matches_reference(test::fixture("llama_f32_gqa_tied.gguf"), {"random", 24, kv::KvType::Q8_0},
                                           1500, 0.1), 40);
  EXPECT_GT(expect_shift_matches_reference(test::fixture("llama_f32_gqa_tied.gguf"), {"none", 0, kv::KvType::F16},
                                           1500, 5e-3), 40);
}

TEST(ContextShift, SinksStayAndMovedKeysAreRotatedBack) {
  // The default kept prefix: positions 0-3 (StreamingLLM's sinks, which the streaming policy
  // keeps by position) never move nor change. At the first shift, every moved key, rotated
  // forward again by the forward pass's own rotation for position d, is the unshifted
  // reference's key d positions later; then 3000 tokens with the sinks in place.
  auto m = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
  ThreadPool pool(1);
  const CacheSetup su{"streaming", 24, kv::KvType::F32, 4};
  auto shifted = make_session(*m, su, kCtx, PositionMode::shift, &pool);
  auto ref = make_session(*m, su, 1 << 14, PositionMode::keep, &pool);
  const int D = m->config().head_dim, d = (kCtx - 4) / 2;
  const kv::Cache& c = shifted->cache();
  ops::Rotary rot(m->config(), m->rope_freq_factors());
  rot.prepare(&d, 1);
  const std::vector<int32_t> tokens = random_tokens(3000, m->config().n_vocab, 4);
  shifted->prefill(std::span<const int32_t>(tokens.data(), 8));
  ref->prefill(std::span<const int32_t>(tokens.data(), 8));
  std::vector<std::vector<float>> sinks;  // per head: the keys of positions 0-3
  for (int l = 0; l < c.shape().n_layers; ++l)
    for (int h = 0; h < c.shape().n_kv_heads; ++h) {
      const std::vector<float> k = kv::keys_f32(c.head(l, h), D);
      sinks.emplace_back(k.begin(), k.begin() + 4 * D);
    }
  bool compared = false;
  for (size_t i = 8; i < tokens.size(); ++i) {
    const std::span<const float> logits = shifted->eval(std::span<const int32_t>(&tokens[i], 1));
    ASSERT_TRUE(std::all_of(logits.begin(), logits.end(), [](float x) { return std::isfinite(x); }));
    ASSERT_LE(shifted->n_past(), kCtx);
    if (!compared && shifted->positions_shifted() > 0) {
      compared = true;
      ASSERT_EQ(shifted->positions_shifted(), d);
      int checked = 0;
      for (int l = 0; l < c.shape().n_layers; ++l)
        for (int h = 0; h < c.shape().n_kv_heads; ++h) {
          const kv::HeadCache& hs = c.head(l, h);
          const kv::HeadCache& hr = ref->cache().head(l, h);
          const std::vector<float> ks = kv::keys_f32(hs, D), kr = kv::keys_f32(hr, D);
          for (int j = 0; j < hs.n && hs.pos[j] < shifted->n_past() - 1; ++j) {
            if (hs.pos[j] < 4) continue;
            const int r = static_cast<int>(std::find(hr.pos.begin(), hr.pos.begin() + hr.n, hs.pos[j] + d) - hr.pos.begin());
            ASSERT_LT(r, hr.n) << "position " << hs.pos[j] << " + " << d << " is not in the reference";
            std::vector<float> k(ks.begin() + j * D, ks.begin() + (j + 1) * D);
            rot.apply(l, k.data(), 1, 1);
            for (int e = 0; e < D; ++e) ASSERT_NEAR(k[e], kr[r * D + e], 1e-5) << "layer " << l << " head " << h;
            ++checked;
          }
        }
      EXPECT_GT(checked, 100);
    }
    if (!compared) ref->eval(std::span<const int32_t>(&tokens[i], 1));
  }
  EXPECT_TRUE(compared);
  EXPECT_GT(shifted->positions_shifted(), 90 * d);
  size_t head = 0;
  for (int l = 0; l < c.shape().n_layers; ++l)
    for (int h = 0; h < c.shape().n_kv_heads; ++h, ++head) {
      const kv::HeadCache& hs = c.head(l, h);
      ASSERT_GE(hs.n, 4);
      for (int j = 0; j < 4; ++j) EXPECT_EQ(hs.pos[j], j);
      const std::vector<float> k = kv::keys_f32(hs, D);
      EXPECT_TRUE(std::equal(sinks[head].begin(), sinks[head].end(), k.begin())) << "layer " << l << " head " << h;
    }
}

TEST(ContextShift, RotationsCompose) {
  // rotate_by(-d) after the rotation for position p is the rotation for p - d, both layouts.
  for (RopePairing pairing : {RopePairing::adjacent, RopePairing::halves}) {
    ModelConfig c;
    c.head_dim = c.n_rot = 16;
    c.rope_pairing = pairing;
    c.layers = {LayerConfig{0, 10000.0f, 1.0f}, LayerConfig{0, 1e6f, 4.0f}};
    ops::Rotary rot(c, nullptr);
    std::mt19937 rng(3);
    std::normal_distribution<float> g;
    std::vector<float> x(16);
    for (float& v : x) v = g(rng);
    for (int layer = 0; layer < 2; ++layer) {
      const int p = 5000, d = 2043;
      std::vector<float> a = x, b = x;
      int pos = p;
      rot.prepare(&pos, 1);
      rot.apply(layer, a.data(), 1, 1);
      rot.rotate_by(layer, a.data(), 1, -d);
      pos = p - d;
      rot.prepare(&pos, 1);
      rot.apply(layer, b.data(), 1, 1);
      for (int i = 0; i < 16; ++i) EXPECT_NEAR(a[i], b[i], 2e-5) << rope_pairing_name(pairing) << " layer " << layer;
    }
  }
}

TEST(ContextShift, CacheShiftDropsTheRangeAndMovesTheRest) {
  kv::Cache c({1, 1, 4}, {16});
  std::vector<float> k(4), v(4, 0.0f);
  for (int32_t p : {0, 1, 2, 5, 6, 9, 10, 12}) {
    std::fill(k.begin(), k.end(), static_cast<float>(p));
    c.append(0, k.data(), v.data(), &p, 1);
  }
  int rotated_rows = 0;
  c.shift(0, 0, 2, 8, [&](float* rows, int n) {
    rotated_rows = n;
    for (int i = 0; i < n * 4; ++i) rows[i] += 100;  // stands for the rotation
  });
  // Positions 2, 5, 6 and 9 lie in [2, 10): gone. 0 and 1 stay; 10 and 12 move to 2 and 4.
  const kv::HeadCache& hc = c.head(0, 0);
  ASSERT_EQ(hc.n, 4);
  EXPECT_EQ(std::vector<int32_t>(hc.pos.begin(), hc.pos.begin() + 4), (std::vector<int32_t>{0, 1, 2, 4}));
  EXPECT_EQ(rotated_rows, 2);
  const std::vector<float> keys = kv::keys_f32(hc, 4);
  for (int slot = 0; slot < 4; ++slot)
    EXPECT_EQ(keys[slot * 4], (std::vector<float>{0, 1, 110, 112})[slot]) << "slot " << slot;
  EXPECT_THROW(c.shift(0, 0, 0, 0, [](float*, int) {}), Error);
}

TEST(ContextShift, KeepModeStopsAFullCacheAndExtendsABoundedOne) {
  auto m = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
  ThreadPool pool(1);
  const std::vector<int32_t> tokens = random_tokens(200, m->config().n_vocab, 5);
  auto full = make_session(*m, {}, kCtx, PositionMode::keep, &pool);
  EXPECT_FALSE(full->has_room(kCtx + 1));
  try {
    full->eval(tokens);
    ADD_FAILURE() << "a full cache with keep must stop at the context";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the context of 64"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--kv-positions shift"), std::string::npos) << e.what();
  }
  auto bounded = make_session(*m, {"streaming", 24}, kCtx, PositionMode::keep, &pool);
  for (int32_t t : tokens) bounded->eval(std::span<const int32_t>(&t, 1));
  EXPECT_EQ(bounded->n_past(), 200);  // past the context, positions the model never saw
  EXPECT_EQ(bounded->positions_shifted(), 0);
}

TEST(ContextShift, BatchedStepsEqualSessionsAlone) {
  // The server's path: sessions shifting inside Session::eval_batch give exactly what they give
  // alone, whatever shares the pass.
  auto m = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
  ThreadPool pool(1);
  const std::vector<CacheSetup> setups{{}, {"streaming", 24}, {"knorm", 20, kv::KvType::Q8_0}};
  const std::vector<int32_t> tokens = random_tokens(400, m->config().n_vocab, 9);
  std::vector<std::vector<std::vector<float>>> alone;
  for (const CacheSetup& su : setups) {
    auto s = make_session(*m, su, kCtx, PositionMode::shift, &pool);
    alone.emplace_back();
    for (int32_t t : tokens) {
      auto l = s->eval(std::span<const int32_t>(&t, 1));
      alone.back().emplace_back(l.begin(), l.end());
    }
  }
  Forward fw(*m, 8);
  std::vector<std::unique_ptr<Session>> sessions;
  for (const CacheSetup& su : setups) sessions.push_back(make_session(*m, su, kCtx, PositionMode::shift, &pool));
  for (size_t step = 0; step < tokens.size(); ++step) {
    std::vector<BatchItem> items;
    for (auto& s : sessions) items.push_back({s.get(), std::span<const int32_t>(&tokens[step], 1)});
    const auto logits = Session::eval_batch(items, fw, pool);
    for (size_t i = 0; i < setups.size(); ++i)
      ASSERT_TRUE(std::equal(logits[i].begin(), logits[i].end(), alone[i][step].begin()))
          << "session " << i << " step " << step;
  }
  for (auto& s : sessions) EXPECT_GT(s->positions_shifted(), 0);
}

TEST(ContextShift, BadSettingsAreErrors) {
  auto m = Model::load(test::fixture("llama_f32_gqa_tied.gguf"));
  ThreadPool pool(1);
  EXPECT_THROW(make_session(*m, {}, 1, PositionMode::shift, &pool), Error);  // nothing to give up
  EXPECT_THROW(parse_position_mode("rotate"), Error);
  EXPECT_EQ(parse_position_mode("shift"), PositionMode::shift);
  EXPECT_EQ(position_mode_name(PositionMode::keep), "keep");
  // A batch item longer than one shift's worth cannot be made room for.
  auto s = make_session(*m, {}, kCtx, PositionMode::shift, &pool);
  const std::vector<int32_t> tokens = random_tokens(kCtx, m->config().n_vocab, 1);
  s->eval(std::span<const int32_t>(tokens.data(), kCtx - 1));
  Forward fw(*m, kCtx);
  const std::vector<BatchItem> items{{s.get(), std::span<const int32_t>(tokens.data(), 40)}};
  EXPECT_THROW(Session::eval_batch(items, fw, pool), Error);
}

}  // namespace
}  // namespace qf
