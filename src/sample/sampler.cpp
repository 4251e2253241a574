#include "sample/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tensor/kernels.h"
#include "util/error.h"

namespace qf {

int32_t argmax(std::span<const float> logits) {
  if (logits.empty()) fail("argmax of empty logits");
  return static_cast<int32_t>(argmax_f32(logits.data(), logits.size()));
}

uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

Sampler::Sampler(SamplerOptions options) : opt_(options), rng_(options.seed) {
  if (!std::isfinite(opt_.temperature)) fail("--temp must be finite");
  if (!(opt_.top_p > 0.0f)) fail("--top-p must be > 0");
  if (!(opt_.min_p >= 0.0f && opt_.min_p <= 1.0f)) fail("--min-p must be in [0, 1]");
  if (!(opt_.repeat_penalty > 0.0f) || !std::isfinite(opt_.repeat_penalty)) fail("--repeat-penalty must be > 0");
  if (opt_.repeat_last_n < 0) fail("--repeat-last-n must be >= 0");
  if (!std::isfinite(opt_.presence_penalty) || !std::isfinite(opt_.frequency_penalty))
    fail("--presence-penalty and --frequency-penalty must be finite");
}

void Sampler::accept(int32_t token) {
  if (!opt_.penalties_on()) return;
  recent_.push_back(token);
  ++counts_[token];
  if (static_cast<int>(recent_.size()) > opt_.repeat_last_n) {
    const int32_t old = recent_.front();
    recent_.pop_front();
    if (--counts_[old] == 0) counts_.erase(old);
  }
}

int32_t Sampler::sample_and_accept(std::span<const float> logits) {
  const int32_t t = sample(logits);
  accept(t);
  return t;
}

void Sampler::reset_history() {
  recent_.clear();
  counts_.clear();
}

// llama.cpp's rule: a repeated token's logit is divided by the penalty when positive and
// multiplied when negative (so it always moves down), then the OpenAI-style presence and
// frequency terms are subtracted.
void Sampler::apply_penalties(std::vector<float>& logits) const {
  const int n = static_cast<int>(logits.size());
  for (const auto& [token, count] : counts_) {
    if (token < 0 || token >= n) continue;
    float& l = logits[token];
    l = l > 0.0f ? l / opt_.repeat_penalty : l * opt_.repeat_penalty;
    l -= static_cast<float>(count) * opt_.frequency_penalty + opt_.presence_penalty;
  }
}

// cand_ = the k highest logits, highest first, ties by lower id (deterministic). For a top-k cut
// one pass over the logits with a heap of k, whose worst entry is the bar a logit must clear:
// almost none do, so a batched step does not spend its time building and sorting every
// (logit, id) pair of a 49k-word vocabulary for each session.
void Sampler::top_candidates(std::span<const float> l, int k) {
  const int n = static_cast<int>(l.size());
  auto higher = [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; };
  // NaN ranks like -inf, so that `higher` stays a strict weak order (sorting with NaN is undefined).
  auto key = [](float x) { return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; };
  cand_.clear();
  if (k == n) {
    for (int i = 0; i < n; ++i) cand_.emplace_back(key(l[i]), i);
  } else {
    // A NaN logit never clears the bar below.
    for (int i = 0; i < k; ++i) cand_.emplace_back(key(l[i]), i);
    std::make_heap(cand_.begin(), cand_.end(), higher);  // front: the worst of the k
    for (int i = k; i < n; ++i)
      if (l[i] > cand_.front().first) {  // a later id never wins a tie
        std::pop_heap(cand_.begin(), cand_.end(), higher);
        cand_.back() = {l[i], i};
        std::push_heap(cand_.begin(), cand_.end(), higher);
      }
  }
  std::sort(cand_.begin(), cand_.end(), higher);
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (logits.empty()) fail("sampling from empty logits");
  std::span<const float> l = logits;
  const bool penalise = opt_.penalties_on() && !counts_.empty();
  if (penalise || !opt_.banned.empty()) {
    work_.assign(logits.begin(), logits.end());
    if (penalise) apply_penalties(work_);
    for (int32_t t : opt_.banned)
      if (t >= 0 && t < static_cast<int32_t>(work_.size())) work_[t] = -std::numeric_limits<float>::infinity();
    l = work_;
  }
  if (opt_.temperature <= 0.0f) return argmax(l);

  const int n = static_cast<int>(l.size());
  const int k = opt_.top_k > 0 ? std::min(opt_.top_k, n) : n;
  top_candidates(l, k);

  // The cuts look at the model's own distribution over the top-k (before temperature).
  const float mx = cand_[0].first;
  prob_.resize(k);
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += (prob_[i] = std::exp(static_cast<double>(cand_[i].first - mx)));
  int keep = k;
  if (opt_.top_p < 1.0f) {  // smallest prefix whose probability reaches top_p
    double acc = 0;
    for (int i = 0; i < keep; ++i) {
      acc += prob_[i] / sum;
      if (acc >= opt_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  if (opt_.min_p > 0.0f) {  // tokens at least min_p times as likely as the best one
    int m = 1;
    while (m < keep && prob_[m] >= opt_.min_p * prob_[0]) ++m;
    keep = m;
  }

  double total = 0;
  for (int i = 0; i < keep; ++i)
    total += (prob_[i] = std::exp(static_cast<double>(cand_[i].first - mx) / opt_.temperature));
  std::uniform_real_distribution<double> u(0.0, total);
  double r = u(rng_);
  for (int i = 0; i < keep; ++i) {
    if (r < prob_[i]) return cand_[i].second;
    r -= prob_[i];
  }
  return cand_[keep - 1].second;
}

}  // namespace qf
