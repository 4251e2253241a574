// Token sampling: greedy, temperature, top-k, top-p. Same seed, same tokens.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace qf {

struct SamplerOptions {
  float temperature = 0.0f;  // <= 0: greedy (argmax)
  int top_k = 40;            // <= 0: no top-k cut
  float top_p = 0.95f;       // >= 1: no nucleus cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(SamplerOptions options);
  // Picks the next token from one row of logits.
  int32_t sample(std::span<const float> logits);
  const SamplerOptions& options() const { return opt_; }

 private:
  SamplerOptions opt_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

// Index of the largest logit (lowest index on ties).
int32_t argmax(std::span<const float> logits);

}  // namespace qf
