#include "sample/sampler.h"

#include <algorithm>
#include <cmath>

#include "util/error.h"

namespace qf {

int32_t argmax(std::span<const float> logits) {
  if (logits.empty()) fail("argmax of empty logits");
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(SamplerOptions options) : opt_(options), rng_(options.seed) {
  if (!(opt_.top_p > 0.0f)) fail("--top-p must be > 0");
  if (!std::isfinite(opt_.temperature)) fail("--temp must be finite");
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (opt_.temperature <= 0.0f) return argmax(logits);
  const int n = static_cast<int>(logits.size());
  cand_.resize(n);
  for (int i = 0; i < n; ++i) cand_[i] = {logits[i], i};
  // Highest logit first; ties by lower id so the order is deterministic.
  auto higher = [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; };
  int k = opt_.top_k > 0 ? std::min(opt_.top_k, n) : n;
  std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), higher);
  cand_.resize(k);
  const float mx = cand_[0].first;
  double sum = 0;
  std::vector<double> p(k);
  for (int i = 0; i < k; ++i) sum += (p[i] = std::exp((cand_[i].first - mx) / opt_.temperature));
  // Nucleus: the smallest prefix whose probability reaches top_p.
  int keep = k;
  if (opt_.top_p < 1.0f) {
    double acc = 0;
    for (int i = 0; i < k; ++i) {
      acc += p[i] / sum;
      if (acc >= opt_.top_p) { keep = i + 1; break; }
    }
  }
  double total = 0;
  for (int i = 0; i < keep; ++i) total += p[i];
  std::uniform_real_distribution<double> u(0.0, total);
  double r = u(rng_);
  for (int i = 0; i < keep; ++i) {
    if (r < p[i]) return cand_[i].second;
    r -= p[i];
  }
  return cand_[keep - 1].second;
}

}  // namespace qf
