// Policies that score with calibrated query statistics taken BEFORE the rotary embedding
// (`qf calibrate --stats-rank`, PolicyOptions::query_mean / query_factors), moved at every
// scoring round to the positions where they will be used: the mean rotation R over the next
// `future` positions after the newest key. A cached key k_p is stored rotated, k_p = R(p) k, so
// <R(t) q, k_p> = <q, R(p - t) k> depends on the distance t - p only. Post-rotary filters, averaged
// over calibration positions 0..2047, instead bake in a dependence on the key's absolute position.
//
//  - qfilters_rope: Q-Filters with a position-aware filter. Per KV head, f = the mean of its query
//    heads' mean queries (so <k, f> is the group's mean expected logit); score <k, R f>. One dot
//    product per key, like qfilters; the filter is rotated once per head and round.
//  - ea_calibrated: Expected Attention from calibrated moments. Per query head, with mu' = R mu
//    and u'_r = R u_r (Sigma ~= sum_r u_r u_r^T, so R Sigma R^T ~= sum_r u'_r u'_r^T), the logit
//    mu'.k / sqrt(d) + sum_r (u'_r.k)^2 / (2d), softmax over the head's keys, averaged over the GQA
//    group, times ||v||; the first kQueryMomentSinks positions are always kept. (rank + 1) dot
//    products per key and query head, instead of head_dim^2 for the session-moment version.
//
//  - qfilters_adaptive: qfilters_rope's filter blended with the recent queries of the same KV
//    group: f = normalize((1 - a) c + a r), c the unit group-mean calibrated query, r the unit mean
//    of the group's recent-query directions (QueryMoments::recent, an exponential moving average
//    of the unit queries before the rotary embedding, so queries at different positions add up
//    in one frame instead of smearing over rotations); score <k, R f>. One dot product per kept key
//    per round, like qfilters_rope. With a = 1 and horizon 1 it ranks a head's keys by the logits
//    of the group's last query (TOVA's ranking for one query head) without attention weights.
//
//  - qfilters_max: qfilters_adaptive's filter per query head (not per group); the projections
//    standardised per query head, and a token's score the maximum over all the layer's query heads,
//    so every KV head of the layer keeps the same tokens; a kept token remembers its past scores,
//    fading with position (see the class).
//
// None computes an attention weight, so the fused attention kernel stays. Scores change as the
// position advances, so they are recomputed at every eviction round (score_head).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include "kv/policies/policies.h"
#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {

// The statistics of one model, checked against the cache on first use.
struct QueryStats {
  std::span<const float> mean, factors;
  int n_heads = 0, rank = 0;

  void check(const CacheShape& s, std::string_view policy) const {
    const size_t per_head = static_cast<size_t>(s.n_layers) * n_heads * s.head_dim;
    if (n_heads < 1 || n_heads % s.n_kv_heads != 0 || mean.size() != per_head || factors.size() != per_head * rank)
      fail(policy, ": query statistics of ", n_heads, " query heads (", mean.size(), " + ", factors.size(),
           " values) do not fit the model's ", s.n_layers, " layers x ", s.n_kv_heads, " KV heads x ", s.head_dim);
  }
  const float* head_mean(int layer, int h, int d) const { return mean.data() + (static_cast<size_t>(layer) * n_heads + h) * d; }
  const float* head_factors(int layer, int h, int d) const {
    return factors.data() + (static_cast<size_t>(layer) * n_heads + h) * rank * d;
  }
};

// Position after the newest key of any head of the layer: where the next query will be.
int64_t next_position(const Cache& cache, int layer) {
  int64_t next = 0;
  for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
    const HeadCache& hc = cache.head(layer, h);
    if (hc.n) next = std::max<int64_t>(next, hc.pos[hc.n - 1] + 1);
  }
  return next;
}

// The mean rotation over the `future` positions after the layer's newest key (where the next
// queries will be). Its pair amplitudes depend on the layer and `future` only, so they are
// computed once per layer, not at every scoring round.
class FutureRotation {
 public:
  explicit FutureRotation(int future) : future_(future) {}
  RopeGeometry::PairMatrix at(const Cache& cache, int layer) {
    if (amplitudes_.size() != static_cast<size_t>(cache.shape().n_layers)) amplitudes_.assign(cache.shape().n_layers, {});
    if (amplitudes_[layer].empty()) amplitudes_[layer] = cache.rope.mean_pair_amplitudes(layer, future_);
    return cache.rope.mean_pair_rotation(layer, next_position(cache, layer), future_, cache.shape().head_dim,
                                         amplitudes_[layer]);
  }

 private:
  int future_;
  std::vector<std::vector<double>> amplitudes_;  // [layer]
};

// out = R x for the sparse mean rotation, scaled by `scale`.
template <class T>
void apply(const RopeGeometry::PairMatrix& r, const T* x, int d, double scale, float* out) {
  for (int i = 0; i < d; ++i) out[i] = static_cast<float>((r.diag[i] * x[i] + r.off[i] * x[r.partner[i]]) * scale);
}

// scores[j] = <k_j, R f> over the head's keys: the filter f (before the rotary embedding) moved
// by R, the layer's FutureRotation. `moved` is scratch.
template <class T>
void score_moved_filter(const Cache& cache, int layer, int kv_head, const T* f, const RopeGeometry::PairMatrix& r,
                        std::vector<float>& moved, std::span<float> scores) {
  const int d = cache.shape().head_dim;
  moved.resize(d);
  apply(r, f, d, 1.0, moved.data());
  for_each_key_tile(cache.head(layer, kv_head), d, [&](int j0, int m, const float* tile) {
    project_rows_f32(tile, m, d, moved.data(), 1, scores.data() + j0, scores.size() - j0);
  });
}

class QFiltersRope final : public Policy {
 public:
  QFiltersRope(QueryStats stats, int future) : stats_(stats), rotation_(future) {}
  std::string_view name() const override { return "qfilters_rope"; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const CacheShape& s = cache.shape();
    stats_.check(s, name());
    const int d = s.head_dim, group = stats_.n_heads / s.n_kv_heads;
    std::vector<float> f(d, 0.0f);
    for (int g = 0; g < group; ++g) {
      const float* mu = stats_.head_mean(layer, kv_head * group + g, d);
      for (int i = 0; i < d; ++i) f[i] += mu[i] / static_cast<float>(group);
    }
    score_moved_filter(cache, layer, kv_head, f.data(), rotation_.at(cache, layer), filter_, scores);
  }

 private:
  QueryStats stats_;
  FutureRotation rotation_;
  std::vector<float> filter_;
};

// Unit-length copy of x (zeros stay zeros); returns false for a zero vector.
bool normalize(std::vector<double>& x) {
  double n2 = 0;
  for (double v : x) n2 += v * v;
  if (!(n2 > 0)) return false;
  const double inv = 1.0 / std::sqrt(n2);
  for (double& v : x) v *= inv;
  return true;
}

// normalize((1 - a) c + a r) for unit c and r; c itself when r is zero or they cancel (exactly
// opposite directions at a = 0.5).
std::vector<double> blend_directions(const std::vector<double>& c, const std::vector<double>& r, double a) {
  if (!(a > 0)) return c;
  std::vector<double> f(c.size());
  for (size_t i = 0; i < f.size(); ++i) f[i] = (1.0 - a) * c[i] + a * r[i];
  return normalize(f) ? f : c;
}

// The layer's recent queries (QueryMoments::recent), or null while none is known; recent queries
// of another shape than the statistics' are an error, not a misread.
const std::vector<double>* recent_queries(const Cache& cache, int layer, const QueryStats& stats,
                                          std::string_view policy) {
  if (cache.query_moments.empty()) return nullptr;
  const QueryMoments& m = cache.query_moments[layer];
  if (m.recent.empty()) return nullptr;
  if (m.n_heads != stats.n_heads || m.head_dim != cache.shape().head_dim)
    fail(policy, ": recent queries of ", m.n_heads, "x", m.head_dim, " heads do not fit the statistics' ",
         stats.n_heads, " query heads of ", cache.shape().head_dim);
  return &m.recent;
}

class AdaptiveQFilters final : public Policy {
 public:
  AdaptiveQFilters(QueryStats stats, int future, double blend, int horizon)
      : stats_(stats), rotation_(future), blend_(blend), horizon_(horizon) {}
  std::string_view name() const override { return "qfilters_adaptive"; }
  AttentionStats needs(const PolicyOptions&) const override {
    return {.query_recent = horizon_};  // not the sums: only the recent queries
  }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    stats_.check(cache.shape(), name());
    const std::vector<double> f = blended_filter(cache, layer, kv_head);
    score_moved_filter(cache, layer, kv_head, f.data(), rotation_.at(cache, layer), filter_, scores);
  }

 private:
  // normalize((1 - a) c + a r) before the rotary embedding; c alone while no recent query is known.
  std::vector<double> blended_filter(const Cache& cache, int layer, int kv_head) const {
    const int d = cache.shape().head_dim, group = stats_.n_heads / cache.shape().n_kv_heads;
    std::vector<double> cal(d, 0.0), recent(d, 0.0);
    for (int g = 0; g < group; ++g) {
      const float* mu = stats_.head_mean(layer, kv_head * group + g, d);
      for (int i = 0; i < d; ++i) cal[i] += mu[i];
    }
    normalize(cal);
    if (!(blend_ > 0)) return cal;
    const std::vector<double>* rq = recent_queries(cache, layer, stats_, name());
    if (!rq) return cal;
    std::vector<double> one(d);
    for (int g = 0; g < group; ++g) {
      const double* src = rq->data() + static_cast<size_t>(kv_head * group + g) * d;
      one.assign(src, src + d);
      if (normalize(one))
        for (int i = 0; i < d; ++i) recent[i] += one[i];
    }
    if (!normalize(recent)) return cal;
    return blend_directions(cal, recent, blend_);
  }

  QueryStats stats_;
  FutureRotation rotation_;
  double blend_;
  int horizon_;
  std::vector<float> filter_;
};

// qfilters_max: qfilters_adaptive's filter per query head instead of per KV group, and a token's
// score the best of the layer's query heads. Each query head h scores the keys of its KV head with
// f_h = normalize((1 - a) c_h + a r_h) (c_h its unit calibrated mean query, r_h the unit moving
// average of its recent queries), moved to the next positions; the projections are standardised
// per query head; a position's score is the maximum over every query head of the layer whose KV
// head holds it. So a token one head singles out (a digit the question will need) outranks one
// that all heads find ordinary, as in TOVA's average of peaked softmax rows, and every KV head of
// the layer gets the same score for the same token (kept in all or none). group dot products per
// kept key, no attention weight: the fused kernel stays.
// Memory (PolicyOptions::filter_decay = D): a kept token's score is max(this round's, its previous
// score - D x the positions since), so a token a query head singled out stays ranked for a while
// after, as H2O's accumulated attention keeps it. The memory is per slot of each head, matched by
// position and by the first bytes of the stored key, so a cache that was reset, refilled, shifted
// or copied meanwhile never inherits another token's score.
class QFiltersMax final : public Policy {
 public:
  QFiltersMax(QueryStats stats, int future, double blend, int horizon, double decay)
      : stats_(stats), rotation_(future), blend_(blend), horizon_(horizon), decay_(decay) {}
  std::string_view name() const override { return "qfilters_max"; }
  AttentionStats needs(const PolicyOptions&) const override { return {.query_recent = horizon_}; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    score_layer(cache, layer, layer_scores_);
    std::copy(layer_scores_[kv_head].begin(), layer_scores_[kv_head].end(), scores.begin());
  }

  void score_layer(const Cache& cache, int layer, std::vector<std::vector<float>>& scores) override {
    const CacheShape& s = cache.shape();
    stats_.check(s, name());
    const int nkv = s.n_kv_heads;
    moved_filters(cache, layer, rotation_.at(cache, layer));
    head_best_.resize(nkv);
    for (int kv = 0; kv < nkv; ++kv) best_of_group(cache, layer, kv, head_best_[kv]);
    scores.resize(nkv);
    if (same_positions(cache, layer)) {  // the usual case: this policy keeps the same tokens in every head
      scores[0] = head_best_[0];
      float* layer_best = scores[0].data();
      for (int kv = 1; kv < nkv; ++kv) {
        const float* b = head_best_[kv].data();
        for (size_t j = 0; j < scores[0].size(); ++j) layer_best[j] = std::max(layer_best[j], b[j]);
      }
      // One score per token: head 0's slots stand for the layer's, in the memory too.
      if (std::isfinite(decay_)) remember(cache, layer, scores, 1);
      for (int kv = 1; kv < nkv; ++kv) scores[kv] = scores[0];
      return;
    }
    for (int kv = 0; kv < nkv; ++kv) {
      const HeadCache& self = cache.head(layer, kv);
      scores[kv] = head_best_[kv];
      for (int o = 0; o < nkv; ++o)
        if (o != kv)
          for_each_shared_position(self, cache.head(layer, o), [&](int i, int j) {
            scores[kv][i] = std::max(scores[kv][i], head_best_[o][j]);
          });
    }
    if (std::isfinite(decay_)) remember(cache, layer, scores, nkv);
  }

  std::string save_state() const override;
  void load_state(std::string_view state) override;
  // The memory: a position, a key fingerprint and a score per slot; one head's worth per layer
  // when the heads hold the same positions, every head's at most.
  size_t state_bytes_per_slot() const override {
    return std::isfinite(decay_) ? sizeof(int32_t) + sizeof(uint64_t) + sizeof(float) : 0;
  }

 private:
  // What a head remembers of its slots after a round: their positions, key fingerprints and scores.
  struct HeadMemory {
    std::vector<int32_t> pos;
    std::vector<uint64_t> key;
    std::vector<float> score;
  };
  struct LayerMemory {
    int64_t next_position = 0;  // of the round that wrote it
    std::vector<HeadMemory> heads;
  };

  // fingerprints[j] = the first (up to) 8 bytes of slot j's stored key: with the position, what
  // identifies the token.
  static void key_fingerprints(const HeadCache& hc, std::vector<uint64_t>& fingerprints) {
    const KvRows rows = hc.keys();
    fingerprints.resize(hc.n);
    const uint8_t* row = rows.data;
    if (rows.row_bytes >= sizeof(uint64_t)) {  // every type at head_dim >= 4: a fixed-size copy
      for (int j = 0; j < hc.n; ++j, row += rows.row_bytes) std::memcpy(&fingerprints[j], row, sizeof(uint64_t));
      return;
    }
    for (int j = 0; j < hc.n; ++j, row += rows.row_bytes) {
      fingerprints[j] = 0;
      std::memcpy(&fingerprints[j], row, rows.row_bytes);
    }
  }

  // scores = max(scores, remembered - decay x positions since) for the slots of KV heads
  // [0, n_heads) remembered from the layer's previous round; then the memory becomes this round's
  // scores. n_heads = 1 when head 0's slots stand for every head's.
  void remember(const Cache& cache, int layer, std::vector<std::vector<float>>& scores, int n_heads) {
    if (memory_.size() != static_cast<size_t>(cache.shape().n_layers)) memory_.assign(cache.shape().n_layers, {});
    LayerMemory& mem = memory_[layer];
    const int64_t now = next_position(cache, layer);
    const double forgotten = decay_ * static_cast<double>(std::max<int64_t>(0, now - mem.next_position));
    mem.heads.resize(n_heads);
    for (int kv = 0; kv < n_heads; ++kv) {
      const HeadCache& hc = cache.head(layer, kv);
      HeadMemory& old = mem.heads[kv];
      HeadMemory& next = next_memory_;  // scratch, swapped in: no allocation once warm
      next.pos.assign(hc.pos.begin(), hc.pos.begin() + hc.n);
      key_fingerprints(hc, next.key);
      float* score = scores[kv].data();
      const int n_old = static_cast<int>(old.pos.size());
      for (int j = 0, o = 0; j < hc.n; ++j) {  // both in position order: a merge
        while (o < n_old && old.pos[o] < next.pos[j]) ++o;
        if (o < n_old && old.pos[o] == next.pos[j] && old.key[o] == next.key[j])
          score[j] = std::max(score[j], static_cast<float>(old.score[o] - forgotten));
      }
      next.score.assign(scores[kv].begin(), scores[kv].end());
      std::swap(old, next);
    }
    mem.next_position = now;
  }

  // moved_[q] = R f_q for every query head q of the layer, f_q = normalize((1 - a) c_q + a r_q).
  void moved_filters(const Cache& cache, int layer, const RopeGeometry::PairMatrix& r) {
    const int d = cache.shape().head_dim, n_heads = stats_.n_heads;
    if (unit_means_.empty()) {  // the calibrated means, normalised once
      unit_means_.resize(static_cast<size_t>(cache.shape().n_layers) * n_heads);
      for (int l = 0; l < cache.shape().n_layers; ++l)
        for (int q = 0; q < n_heads; ++q) {
          std::vector<double>& c = unit_means_[static_cast<size_t>(l) * n_heads + q];
          c.assign(stats_.head_mean(l, q, d), stats_.head_mean(l, q, d) + d);
          normalize(c);
        }
    }
    const std::vector<double>* rq = recent_queries(cache, layer, stats_, name());
    moved_.resize(static_cast<size_t>(n_heads) * d);
    for (int q = 0; q < n_heads; ++q) {
      const std::vector<double>& cal = unit_means_[static_cast<size_t>(layer) * n_heads + q];
      const double* f = cal.data();
      if (rq) {
        recent_.assign(rq->data() + static_cast<size_t>(q) * d, rq->data() + static_cast<size_t>(q + 1) * d);
        if (normalize(recent_)) f = (blended_ = blend_directions(cal, recent_, blend_)).data();
      }
      apply(r, f, d, 1.0, moved_.data() + static_cast<size_t>(q) * d);
    }
  }

  // best[j] = the largest standardised projection of KV head kv's key j on the moved filters of
  // the head's query group.
  void best_of_group(const Cache& cache, int layer, int kv, std::vector<float>& best) {
    const HeadCache& hc = cache.head(layer, kv);
    const int d = cache.shape().head_dim, group = stats_.n_heads / cache.shape().n_kv_heads, n = hc.n;
    const float* filters = moved_.data() + static_cast<size_t>(kv) * group * d;
    // The projections, [group][n]; each query head's standardised (in float: the ranking within a
    // head does not depend on it, the maximum across heads hardly), the best kept per key.
    proj_.resize(static_cast<size_t>(group) * n);
    for_each_key_tile(hc, d, [&](int j0, int m, const float* tile) {
      project_rows_f32(tile, m, d, filters, group, proj_.data() + j0, n);
    });
    best.assign(n, -std::numeric_limits<float>::infinity());
    for (int g = 0; g < group; ++g) {
      const std::span<float> p(proj_.data() + static_cast<size_t>(g) * n, n);
      const std::optional<Standardisation> z = Standardisation::of_finite(p);
      if (!z) {  // a non-finite key: standardise() leaves it out
        standardise(p);
        for (int j = 0; j < n; ++j) best[j] = std::max(best[j], p[j]);
        continue;
      }
      const float mean = static_cast<float>(z->mean), inv_sd = static_cast<float>(z->inv_sd);
      for (int j = 0; j < n; ++j) best[j] = std::max(best[j], (p[j] - mean) * inv_sd);
    }
  }

  // Whether every KV head of the layer holds the same positions.
  static bool same_positions(const Cache& cache, int layer) {
    const HeadCache& first = cache.head(layer, 0);
    for (int kv = 1; kv < cache.shape().n_kv_heads; ++kv) {
      const HeadCache& hc = cache.head(layer, kv);
      if (hc.n != first.n || !std::equal(first.pos.begin(), first.pos.begin() + first.n, hc.pos.begin())) return false;
    }
    return true;
  }

  QueryStats stats_;
  FutureRotation rotation_;
  double blend_;
  int horizon_;
  double decay_;                     // infinity: no memory
  std::vector<LayerMemory> memory_;  // [layer], empty until the layer's first round
  HeadMemory next_memory_;
  std::vector<std::vector<double>> unit_means_;  // [layer * n_heads + q]
  std::vector<double> recent_, blended_;
  std::vector<float> moved_, proj_;  // [n_heads][d], [group][n]
  std::vector<std::vector<float>> head_best_, layer_scores_;
};

// The memory as bytes: "qfmax1", the layer count, then per layer its round's next position, the
// head count, and per head the slot count and the slots' positions, key fingerprints and scores.
// Empty without memory (or before any round).
std::string QFiltersMax::save_state() const {
  std::string out;
  if (memory_.empty()) return out;
  auto put = [&out](const auto& v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); };
  auto put_all = [&out](const auto& vec) {
    out.append(reinterpret_cast<const char*>(vec.data()), vec.size() * sizeof vec[0]);
  };
  out = "qfmax1";
  put(static_cast<uint32_t>(memory_.size()));
  for (const LayerMemory& l : memory_) {
    put(l.next_position);
    put(static_cast<uint32_t>(l.heads.size()));
    for (const HeadMemory& h : l.heads) {
      put(static_cast<uint32_t>(h.pos.size()));
      put_all(h.pos), put_all(h.key), put_all(h.score);
    }
  }
  return out;
}

void QFiltersMax::load_state(std::string_view state) {
  if (state.empty()) {
    memory_.clear();
    return;
  }
  auto bad = [] { fail("qfilters_max: the saved policy state is not valid"); };
  size_t at = 0;
  auto take = [&](void* dst, size_t n) {
    if (n > state.size() - at) bad();
    std::memcpy(dst, state.data() + at, n);
    at += n;
  };
  auto get_u32 = [&] {
    uint32_t v;
    take(&v, sizeof v);
    return v;
  };
  // A count no larger than the bytes left could hold, so a corrupt one cannot ask for gigabytes.
  auto get_count = [&](size_t min_bytes_each) {
    const uint32_t n = get_u32();
    if (n > (state.size() - at) / min_bytes_each) bad();
    return n;
  };
  if (state.substr(0, 6) != "qfmax1") bad();
  at = 6;
  std::vector<LayerMemory> memory(get_count(sizeof(int64_t) + sizeof(uint32_t)));
  for (LayerMemory& l : memory) {
    take(&l.next_position, sizeof l.next_position);
    l.heads.resize(get_count(sizeof(uint32_t)));
    for (HeadMemory& h : l.heads) {
      const uint32_t n = get_count(sizeof(int32_t) + sizeof(uint64_t) + sizeof(float));
      h.pos.resize(n), h.key.resize(n), h.score.resize(n);
      take(h.pos.data(), n * sizeof(int32_t));
      take(h.key.data(), n * sizeof(uint64_t));
      take(h.score.data(), n * sizeof(float));
    }
  }
  if (at != state.size()) bad();
  memory_ = std::move(memory);
}

class CalibratedExpectedAttention final : public Policy {
 public:
  CalibratedExpectedAttention(QueryStats stats, int future) : stats_(stats), rotation_(future) {}
  std::string_view name() const override { return "ea_calibrated"; }

  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    const CacheShape& s = cache.shape();
    stats_.check(s, name());
    const HeadCache& hc = cache.head(layer, kv_head);
    const int n = hc.n, d = s.head_dim, rank = stats_.rank, group = stats_.n_heads / s.n_kv_heads;
    if (n == 0) return;
    const RopeGeometry::PairMatrix r = rotation_.at(cache, layer);
    const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d)), inv_sqrt_2d = 1.0 / std::sqrt(2.0 * d);
    const int rows = rank + 1;
    moved_.resize(static_cast<size_t>(group) * rows * d);
    for (int g = 0; g < group; ++g) {
      const int q = kv_head * group + g;
      // Row 0: mu' / sqrt(d); rows 1..rank: u'_r / sqrt(2d), so that the logit is
      // <row0, k> + sum_r <row_r, k>^2.
      float* m = moved_.data() + static_cast<size_t>(g) * rows * d;
      apply(r, stats_.head_mean(layer, q, d), d, inv_sqrt_d, m);
      for (int k = 0; k < rank; ++k)
        apply(r, stats_.head_factors(layer, q, d) + static_cast<size_t>(k) * d, d, inv_sqrt_2d,
              m + static_cast<size_t>(k + 1) * d);
    }
    // proj_[g * rows + k][i] = <row k of query head g, key i>, every key read once.
    proj_.resize(static_cast<size_t>(group) * rows * n);
    for_each_key_tile(hc, d, [&](int j0, int m, const float* tile) {
      project_rows_f32(tile, m, d, moved_.data(), static_cast<size_t>(group) * rows, proj_.data() + j0, n);
    });
    acc_.assign(n, 0.0);
    logit_.resize(n);
    for (int g = 0; g < group; ++g) {
      // The logits in float, a projection at a time (contiguous, so the loops vectorise).
      const float* p = proj_.data() + static_cast<size_t>(g) * rows * n;
      std::copy(p, p + n, logit_.begin());
      for (int k = 1; k <= rank; ++k) {
        const float* pk = p + static_cast<size_t>(k) * n;
        for (int i = 0; i < n; ++i) logit_[i] += pk[i] * pk[i];
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int i = 0; i < n; ++i)
        if (hc.pos[i] >= kQueryMomentSinks) mx = std::max(mx, logit_[i]);
      double z = 0;
      for (int i = 0; i < n; ++i)
        if (hc.pos[i] >= kQueryMomentSinks) z += (logit_[i] = std::exp(logit_[i] - mx));
      const double share = 1.0 / (z * group);
      for (int i = 0; i < n; ++i)
        if (hc.pos[i] >= kQueryMomentSinks) acc_[i] += logit_[i] * share;
    }
    scale_by_value_norms(hc, d, scores);
  }

 private:
  // scores[i] = acc_[i] * ||v_i|| (the stored values, converted 64 rows at a time); sinks +inf.
  void scale_by_value_norms(const HeadCache& hc, int d, std::span<float> scores) {
    constexpr int kRows = 64;
    vals_.resize(static_cast<size_t>(std::min(kRows, hc.n)) * d);
    for (int j0 = 0; j0 < hc.n; j0 += kRows) {
      const int rows = std::min(kRows, hc.n - j0);
      dequantize_kv_rows(hc.values(), j0, rows, d, vals_.data());
      for (int j = 0; j < rows; ++j) {
        const float* v = vals_.data() + static_cast<size_t>(j) * d;
        const int i = j0 + j;
        scores[i] = hc.pos[i] < kQueryMomentSinks
                        ? std::numeric_limits<float>::infinity()
                        : static_cast<float>(acc_[i] * std::sqrt(static_cast<double>(dot_f32(v, v, d))));
      }
    }
  }

  QueryStats stats_;
  FutureRotation rotation_;
  std::vector<float> vals_, moved_, proj_;  // moved_: [group][rank + 1][d]; proj_: [group][rank + 1][n]
  std::vector<double> acc_;
  std::vector<float> logit_;
};

QueryStats stats_of(const PolicyOptions& o, std::string_view policy) {
  if (o.query_mean.empty())
    fail("--kv-policy ", policy, " needs a filter file with query statistics (qf calibrate --stats-rank N, N >= 1)");
  if (o.query_future_positions < 1)
    fail(policy, ": the future positions must be >= 1 (got ", o.query_future_positions, ")");
  return {o.query_mean, o.query_factors, o.n_query_heads, o.stats_rank};
}

void check_recent_options(const PolicyOptions& o, std::string_view policy) {
  if (!(o.filter_blend >= 0.0f && o.filter_blend <= 1.0f))
    fail(policy, ": --filter-blend must lie in [0, 1] (got ", o.filter_blend, ")");
  if (o.filter_horizon < 1) fail(policy, ": --filter-horizon must be >= 1 token (got ", o.filter_horizon, ")");
}

}  // namespace

std::unique_ptr<Policy> make_qfilters_rope(const PolicyOptions& o) {
  return std::make_unique<QFiltersRope>(stats_of(o, "qfilters_rope"), o.query_future_positions);
}

std::unique_ptr<Policy> make_qfilters_adaptive(const PolicyOptions& o) {
  check_recent_options(o, "qfilters_adaptive");
  return std::make_unique<AdaptiveQFilters>(stats_of(o, "qfilters_adaptive"), o.query_future_positions, o.filter_blend,
                                            o.filter_horizon);
}

std::unique_ptr<Policy> make_qfilters_max(const PolicyOptions& o) {
  check_recent_options(o, "qfilters_max");
  if (!(o.filter_decay >= 0)) fail("qfilters_max: --filter-decay must be >= 0, or inf for no memory (got ", o.filter_decay, ")");
  return std::make_unique<QFiltersMax>(stats_of(o, "qfilters_max"), o.query_future_positions, o.filter_blend,
                                       o.filter_horizon, o.filter_decay);
}

std::unique_ptr<Policy> make_ea_calibrated(const PolicyOptions& o) {
  const QueryStats s = stats_of(o, "ea_calibrated");
  if (s.rank < 1) fail("ea_calibrated: the filter file's query statistics have no covariance factors");
  return std::make_unique<CalibratedExpectedAttention>(s, o.query_future_positions);
}

}  // namespace qf::kv::policies
