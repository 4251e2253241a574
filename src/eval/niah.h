// Needle in a haystack (docs/method.md section 6), kvpress-style prefill compression: a natural-text
// haystack of L tokens carries, at depth d%, the sentence "The special magic number is N." with
// a random N; the context (instruction + haystack) is compressed after prefill, the question is
// appended uncompressed, the greedy answer is right when it contains N's digits exactly.
// Instruct models get the ChatML frame and their default system prompt when the GGUF's chat
// template is ChatML; the answer is primed with "The special magic number ... is" (as RULER does).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/engine.h"
#include "eval/results.h"
#include "tokenizer/tokenizer.h"

namespace qf::eval {

struct NiahSettings {
  std::vector<int> lengths{1024, 2048, 4096, 8192};  // prompt tokens (context + question)
  int n_depths = 11;                                  // 0%, 10%, ..., 100%
  std::vector<int> compressions{4, 8, 16, 32};
  std::vector<int> skip_layers{2};  // first layers left uncompressed (the paper's needle test: 2); a sweep
  std::vector<int> digits{7};       // lengths of the magic number (a short needle beside the long one)
  int max_new = 0;                  // answer tokens (0 = the longest digits + 8)
  std::vector<uint64_t> seeds{42};  // one needle number per (seed, length, depth); the haystack is fixed
  int chat = -1;         // -1 = when the model has a ChatML template, 0 = never, 1 = always
  nlohmann::json to_json() const;
  void validate() const;
  std::vector<double> depths() const;  // percent
  int answer_tokens() const;
};

struct NeedlePrompt {
  std::vector<int32_t> context;   // compressed part: frame + instruction + haystack with needle
  std::vector<int32_t> question;  // appended uncompressed
  std::string number;
  int needle_at = 0;              // token index of the needle inside `context`
  std::vector<int> number_at;     // token indices (in `context`) of the tokens spelling the number
  double depth_actual = 0;        // percent of the haystack before the needle
};

// Builds prompts from a tokenized haystack; the needle goes at a sentence boundary at or before
// the requested depth, so it never splits a sentence.
class NeedleBuilder {
 public:
  // chat: wrap in ChatML (needs <|im_start|> / <|im_end|> tokens). max_length: longest prompt.
  NeedleBuilder(const Tokenizer& tok, const std::string& haystack, bool chat, int max_length);
  // Exactly `length` tokens in all (context + question). Throws qf::Error when the haystack is
  // too short or the length too small for the frame.
  NeedlePrompt build(int length, double depth_percent, const std::string& number) const;
  bool chat() const { return chat_; }

 private:
  const Tokenizer& tok_;
  bool chat_;
  std::vector<int32_t> hay_;
  std::vector<uint8_t> boundary_;  // boundary_[i]: a sentence ends just before hay_[i]
  std::vector<int32_t> prefix_, question_;
};

// Whether the model's chat template is ChatML (and its default system prompt, if any).
bool is_chatml(const Tokenizer& tok);
std::string chatml_default_system(const Tokenizer& tok);

// A `digits`-digit number (no leading zero) drawn from (seed, length, depth index).
std::string needle_number(uint64_t seed, int length, int depth_index, int digits);

// True once the text holds a complete number (a digit run followed by something else) or a line
// break after some text: decoding can stop.
bool answer_complete(const std::string& text);

// Lengths actually used: those above the model's context (minus the answer) are lowered to it.
std::vector<int> effective_lengths(const NiahSettings& st, int n_ctx_train);

void run_niah(const EvalContext& ctx, const Tokenizer& tok, const std::string& haystack, const NiahSettings& settings,
              const std::vector<std::string>& policies, CellLog& log);

// Per (digits, skip_layers, policy, compression): exact-match accuracy and partial credit (share of
// the number's leading digits the answer gets right), each with a 95% bootstrap interval over the
// prompts (length x depth x seed), overall and per length; the full cache ("none") once per digits.
struct NiahSummary {
  nlohmann::json json;
  std::string csv;       // digits, skip_layers, policy, compression, length (or "all"), accuracy (+ interval), partial, n
  std::string grid_csv;  // digits, skip_layers, policy, compression, length, depth, accuracy, partial, n (over seeds)
};
NiahSummary summarize_niah(const CellLog& log, const NiahSettings& settings, const std::vector<std::string>& policies,
                           int n_ctx_train);

}  // namespace qf::eval
