// Comparing qf's logits with llama.cpp's goldens (tests/golden/*.json, scripts/ref/make_goldens.*):
// argmax agreement overall and where llama.cpp's top two logits are clearly apart, perplexity of
// the same tokens, and greedy continuations. Shared by the real-model tests (SmolLM2, Gemma 3).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "model/session.h"

namespace qf::test {

inline int32_t argmax_row(const float* row, int n) {
  return static_cast<int32_t>(std::max_element(row, row + n) - row);
}

// log softmax(row)[target], in double.
inline double log_softmax_at(const float* row, int n, int32_t target) {
  const float mx = *std::max_element(row, row + n);
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
  return static_cast<double>(row[target]) - mx - std::log(sum);
}

// Teacher-forced agreement with a golden, position by position.
struct GoldenTally {
  // Where llama.cpp's own top two are closer than this, engines may legitimately differ
  // (llama.cpp disagrees with itself there across batch sizes: the goldens' self-agreement).
  static constexpr double kStableGap = 0.5;

  size_t positions = 0, agree = 0, stable = 0, stable_agree = 0, scored = 0;
  double nll = 0;

  // One position's logits against llama.cpp's argmax and the gap of its top two logits; next is
  // the token that follows (its log-probability counts towards perplexity), or -1 at the end.
  void add(const float* row, int n_vocab, int32_t ref_argmax, double ref_top_gap, int32_t next) {
    const bool same = argmax_row(row, n_vocab) == ref_argmax;
    ++positions;
    agree += same;
    if (ref_top_gap >= kStableGap) {
      ++stable;
      stable_agree += same;
    }
    if (next >= 0) {
      nll -= log_softmax_at(row, n_vocab, next);
      ++scored;
    }
  }
  double agreement() const { return static_cast<double>(agree) / positions; }
  double stable_agreement() const { return static_cast<double>(stable_agree) / stable; }
  double perplexity() const { return std::exp(nll / static_cast<double>(scored)); }
};

// n greedy tokens after the prompt.
inline std::vector<int32_t> greedy_continuation(Session& s, const std::vector<int32_t>& prompt, size_t n,
                                                int n_vocab) {
  auto logits = s.prefill(prompt);
  std::vector<int32_t> out;
  for (size_t k = 0; k < n; ++k) {
    const int32_t next = argmax_row(logits.data(), n_vocab);
    out.push_back(next);
    logits = s.decode(next);
  }
  return out;
}

// Length of the common prefix of a and b.
inline size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  return std::mismatch(a.begin(), a.begin() + std::min(a.size(), b.size()), b.begin()).first - a.begin();
}

}  // namespace qf::test
