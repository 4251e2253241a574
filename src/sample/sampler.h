// Token sampling as llama.cpp's default chain does it: repetition / presence / frequency
// penalties over the recent tokens, then top-k, top-p (nucleus) and min-p cuts on the model's
// distribution, then temperature, then a seeded draw. Temperature <= 0 is greedy (argmax of the
// penalised logits). Same seed, same history, same tokens.
#pragma once
#include <cstdint>
#include <deque>
#include <random>
#include <span>
#include <unordered_map>
#include <vector>

namespace qf {

struct SamplerOptions {
  float temperature = 0.8f;        // <= 0: greedy (argmax)
  int top_k = 40;                  // <= 0: no top-k cut
  float top_p = 0.95f;             // >= 1: no nucleus cut
  float min_p = 0.05f;             // <= 0: no min-p cut; keeps tokens with p >= min_p * p_max
  float repeat_penalty = 1.0f;     // 1: off. > 1 divides positive / multiplies negative logits
  int repeat_last_n = 64;          // how many recent tokens the penalties look at (0: off)
  float presence_penalty = 0.0f;   // subtracted once from every token seen in the window
  float frequency_penalty = 0.0f;  // subtracted per occurrence in the window
  uint64_t seed = 0;
  std::vector<int32_t> banned;     // never sampled (e.g. end-of-generation tokens for ignore_eos)

  bool penalties_on() const {
    return repeat_last_n > 0 && (repeat_penalty != 1.0f || presence_penalty != 0.0f || frequency_penalty != 0.0f);
  }
};

class Sampler {
 public:
  // Throws qf::Error on options out of range (the messages name llama.cpp's flags).
  explicit Sampler(SamplerOptions options);

  // Picks the next token from one row of logits. Does not record it: call accept().
  int32_t sample(std::span<const float> logits);
  // Records a token the sequence now holds (prompt or generated) for the penalties.
  void accept(int32_t token);
  // sample() then accept().
  int32_t sample_and_accept(std::span<const float> logits);
  // Forgets the penalty history (new sequence); the random stream continues.
  void reset_history();

  const SamplerOptions& options() const { return opt_; }

 private:
  void apply_penalties(std::vector<float>& logits) const;
  void top_candidates(std::span<const float> logits, int k);

  SamplerOptions opt_;
  std::mt19937_64 rng_;
  std::deque<int32_t> recent_;                 // last repeat_last_n accepted tokens
  std::unordered_map<int32_t, int> counts_;    // occurrences of each token in recent_
  std::vector<float> work_;                    // penalised logits
  std::vector<std::pair<float, int32_t>> cand_;
  std::vector<double> prob_;
};

// Index of the largest logit (lowest index on ties).
int32_t argmax(std::span<const float> logits);

// A seed for "-s -1" (llama.cpp's "random seed"): from the OS's entropy source.
uint64_t random_seed();

}  // namespace qf
