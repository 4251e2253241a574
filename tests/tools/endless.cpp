// Measurement tool for endless generation (scripts/bench_endless.py drives it; not a test):
//   endless gen MODEL KV N_CTX POSITIONS PROMPT_FILE N_TOKENS EVERY
//     samples N_TOKENS tokens (llama.cpp's default sampling, seed 1, end-of-text ignored) after
//     the first 64 tokens of PROMPT_FILE; every EVERY tokens prints a JSON line with the tokens
//     generated, the session's position, the positions shifted so far and the resident memory.
//   endless nll MODEL KV N_CTX POSITIONS TEXT_FILE N_TOKENS CHUNK
//     teacher-forces the first N_TOKENS tokens of TEXT_FILE in chunks of CHUNK and prints, per
//     512 targets, the summed negative log-likelihood (JSON lines), then the perplexity of the
//     targets inside the context (token index < N_CTX) and past it.
// KV: POLICY:BUDGET[:FILTERS], e.g. qfilters:512:models/x.qfilters.safetensors, or none:0.
// POSITIONS: keep | shift. One thread, the engine's default KV types (f16).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "runtime/engine.h"
#include "sample/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace {

using namespace qf;

long rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      long kib = 0;
      in >> kib;
      return kib;
    }
    in.ignore(1 << 16, '\n');
  }
  return -1;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read ", path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

runtime::KvOptions parse_kv(const std::string& spec, const std::string& positions) {
  runtime::KvOptions kv;
  const size_t a = spec.find(':');
  if (a == std::string::npos) fail("KV must be POLICY:BUDGET[:FILTERS], not ", spec);
  const size_t b = spec.find(':', a + 1);
  kv.policy = spec.substr(0, a);
  kv.budget = std::atoi(spec.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1).c_str());
  if (b != std::string::npos) kv.filters = spec.substr(b + 1);
  if (kv.policy != "none") kv.window = 16;
  kv.positions = positions;
  return kv;
}

// -log softmax(logits)[target], in double.
double nll(const float* logits, int n_vocab, int32_t target) {
  double mx = logits[0];
  for (int i = 1; i < n_vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0;
  for (int i = 0; i < n_vocab; ++i) sum += std::exp(logits[i] - mx);
  return std::log(sum) + mx - logits[target];
}

int generate(Session& s, const std::vector<int32_t>& text, int64_t n_tokens, int every) {
  const std::vector<int32_t> prompt(text.begin(), text.begin() + std::min<size_t>(64, text.size()));
  SamplerOptions so;
  so.seed = 1;
  Sampler sampler(so);
  for (int32_t t : prompt) sampler.accept(t);
  std::span<const float> logits = s.prefill(prompt);
  for (int64_t i = 1; i <= n_tokens; ++i) {
    const int32_t next = sampler.sample_and_accept(logits);
    logits = s.decode(next);
    if (i % every == 0 || i == n_tokens) {
      std::printf("{\"tokens\": %lld, \"n_past\": %d, \"shifted\": %lld, \"rss_kib\": %ld}\n",
                  static_cast<long long>(i), s.n_past(), static_cast<long long>(s.positions_shifted()), rss_kib());
      std::fflush(stdout);
    }
  }
  return 0;
}

int teacher_force(Session& s, const std::vector<int32_t>& tokens, int chunk) {
  const int n_vocab = s.model().config().n_vocab, n = static_cast<int>(tokens.size());
  double in_sum = 0, past_sum = 0, bin_sum = 0;
  int64_t in_n = 0, past_n = 0, bin_n = 0, bin_start = 1;
  for (int i = 0; i + 1 < n; i += chunk) {
    const int m = std::min(chunk, n - 1 - i);
    std::span<const float> logits = s.eval(std::span<const int32_t>(tokens.data() + i, m), /*all_logits=*/true);
    for (int j = 0; j < m; ++j) {
      const int target = i + j + 1;  // predicted from tokens [0, target)
      const double l = nll(logits.data() + static_cast<size_t>(j) * n_vocab, n_vocab, tokens[target]);
      (target < s.n_ctx() ? in_sum : past_sum) += l;
      ++(target < s.n_ctx() ? in_n : past_n);
      bin_sum += l;
      if (++bin_n == 512 || target == n - 1) {
        std::printf("{\"start\": %lld, \"end\": %d, \"nll_sum\": %.6f, \"count\": %lld, \"shifted\": %lld}\n",
                    static_cast<long long>(bin_start), target + 1, bin_sum, static_cast<long long>(bin_n),
                    static_cast<long long>(s.positions_shifted()));
        std::fflush(stdout);
        bin_start = target + 1;
        bin_sum = 0;
        bin_n = 0;
      }
    }
  }
  // JSON has no NaN: no target past the context (a text shorter than -c) is null.
  const std::string past = past_n > 0 ? std::to_string(std::exp(past_sum / past_n)) : "null";
  std::printf("{\"ppl_in_context\": %.6f, \"targets_in_context\": %lld, \"ppl_past_context\": %s, "
              "\"targets_past_context\": %lld}\n",
              std::exp(in_sum / std::max<int64_t>(1, in_n)), static_cast<long long>(in_n), past.c_str(),
              static_cast<long long>(past_n));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr,
                 "usage: endless gen MODEL KV N_CTX POSITIONS PROMPT_FILE N_TOKENS EVERY\n"
                 "       endless nll MODEL KV N_CTX POSITIONS TEXT_FILE N_TOKENS CHUNK\n");
    return 2;
  }
  try {
    const std::string mode = argv[1];
    runtime::ModelOptions mo;
    mo.model = argv[2];
    mo.n_ctx = std::atoi(argv[4]);
    // One thread unless QF_THREADS says otherwise (memory and perplexity do not depend on it).
    const char* threads = std::getenv("QF_THREADS");
    mo.n_threads = threads ? std::max(1, std::atoi(threads)) : 1;
    runtime::Engine engine(mo);
    auto session = engine.new_session(parse_kv(argv[3], argv[5]));
    const Tokenizer tok = Tokenizer::from_gguf(engine.model().file());
    std::vector<int32_t> tokens = tok.encode(read_text(argv[6]), /*add_special=*/true, /*parse_special=*/false);
    const int64_t n_tokens = std::atoll(argv[7]);
    const int arg = std::atoi(argv[8]);
    if (n_tokens < 1 || arg < 1) fail("N_TOKENS and EVERY / CHUNK must be positive");
    if (mode == "gen") return generate(*session, tokens, n_tokens, arg);
    if (mode != "nll") fail("mode must be gen or nll");
    if (static_cast<int64_t>(tokens.size()) < n_tokens) fail(argv[6], " has only ", tokens.size(), " tokens");
    tokens.resize(n_tokens);
    return teacher_force(*session, tokens, arg);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
