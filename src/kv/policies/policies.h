// Factories of the built-in policies, one per file in this folder; make_policy() dispatches.
#pragma once
#include <algorithm>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kv/policy.h"

namespace qf::kv::policies {

// Calls f(j0, m, tile) for consecutive slots [j0, j0 + m) of hc, their stored (possibly
// quantized) keys given as m rows of d floats: converted 64 rows at a time (the attention
// kernels' SIMD conversion), so a policy scores the keys attention actually reads. F32 keys
// are read where they are stored.
template <class F>
void for_each_key_tile(const HeadCache& hc, int d, const F& f) {
  constexpr int kRows = 64;
  const KvRows keys = hc.keys();
  if (keys.type == GgmlType::F32 && keys.row_bytes == static_cast<size_t>(d) * sizeof(float)) {
    const float* rows = reinterpret_cast<const float*>(keys.data);
    for (int j0 = 0; j0 < hc.n; j0 += kRows) f(j0, std::min(kRows, hc.n - j0), rows + static_cast<size_t>(j0) * d);
    return;
  }
  std::vector<float> tile(static_cast<size_t>(std::min(kRows, hc.n)) * d);
  for (int j0 = 0; j0 < hc.n; j0 += kRows) {
    const int m = std::min(kRows, hc.n - j0);
    dequantize_kv_rows(hc.keys(), j0, m, d, tile.data());
    f(j0, m, tile.data());
  }
}

// Calls f(slot, key) for every slot of hc, the key as d floats (as for_each_key_tile).
template <class F>
void for_each_key(const HeadCache& hc, int d, const F& f) {
  for_each_key_tile(hc, d, [&](int j0, int m, const float* tile) {
    for (int j = 0; j < m; ++j) f(j0 + j, tile + static_cast<size_t>(j) * d);
  });
}

// Scores of one head from the scores its cache kept per slot (AttentionStats::key_scores),
// when it keeps them: false (nothing written) for a cache built without, e.g. by a caller that
// runs the policy on a cache of its own, which is then scored from the stored keys.
inline bool copy_key_scores(const HeadCache& hc, std::span<float> scores) {
  if (hc.key_score.empty()) return false;
  std::copy(hc.key_score.begin(), hc.key_score.begin() + hc.n, scores.begin());
  return true;
}

// Calls f(i, j) for every position that both heads hold, slot i of a and slot j of b (a head
// lists its positions in increasing order, so one merge pass finds them).
template <class F>
void for_each_shared_position(const HeadCache& a, const HeadCache& b, const F& f) {
  for (int i = 0, j = 0; i < a.n && j < b.n;) {
    if (a.pos[i] < b.pos[j]) ++i;
    else if (a.pos[i] > b.pos[j]) ++j;
    else f(i++, j++);
  }
}

// The map x -> (x - mean) / sd of n values with the given sum and sum of squares (in double, in
// slot order); a constant set maps to zeros.
struct Standardisation {
  double mean = 0, inv_sd = 0;
  static Standardisation of(double sum, double sum_sq, int n);
  // Of the values of s when all are finite (nullopt otherwise; standardise() leaves those out),
  // from float sums over independent lanes (so the loops vectorise) added up in double.
  static std::optional<Standardisation> of_finite(std::span<const float> s);
  float operator()(float x) const { return static_cast<float>((x - mean) * inv_sd); }
};

// Shifts and scales s to mean 0 and standard deviation 1 over its finite values (+-inf and NaN
// stay as they are; a constant head becomes all zeros), so that heads can be compared.
void standardise(std::span<float> s);

std::unique_ptr<Policy> make_qfilters(const PolicyOptions&);
std::unique_ptr<Policy> make_knorm(const PolicyOptions&);
std::unique_ptr<Policy> make_streaming(const PolicyOptions&);
std::unique_ptr<Policy> make_random(const PolicyOptions&);
std::unique_ptr<Policy> make_snapkv(const PolicyOptions&);
std::unique_ptr<Policy> make_tova(const PolicyOptions&);
std::unique_ptr<Policy> make_h2o(const PolicyOptions&);
std::unique_ptr<Policy> make_expected_attention(const PolicyOptions&);
std::unique_ptr<Policy> make_keydiff(const PolicyOptions&);
std::unique_ptr<Policy> make_qfilters_rope(const PolicyOptions&);
std::unique_ptr<Policy> make_ea_calibrated(const PolicyOptions&);
std::unique_ptr<Policy> make_qfilters_adaptive(const PolicyOptions&);
std::unique_ptr<Policy> make_qfilters_max(const PolicyOptions&);
// Wraps a policy into its layer-consistent variant (kLayerSuffix).
std::unique_ptr<Policy> make_layer_consistent(std::unique_ptr<Policy> inner);

}  // namespace qf::kv::policies
