// Measurement tool for continuous batching (not a test; scripts/bench_batch.sh drives it, and it
// is what to run under `perf record` to see where a batched decode step spends its time):
//   batch_step MODEL KV CONTEXT SESSIONS STEPS THREADS [CTK CTV]
// One session reads a CONTEXT-token prompt (pseudo-random token ids: the speed does not depend
// on the text), then for each count N in SESSIONS (e.g. 1,16) N copies of it decode STEPS tokens
// together through Session::eval_batch, each sampling its next token with llama.cpp's default
// chain, on the thread pool as the server does. Prints, per N, a JSON line: milliseconds per
// step (the forward pass and the sampling apart), aggregate tokens/s and its ratio to the
// first N's.
// KV: POLICY:BUDGET[:FILTERS] (the server benchmark's settings: window 64, eviction every 16),
// or none:0 for a full cache. CTK / CTV: KV storage types (default f16).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "model/forward.h"
#include "runtime/engine.h"
#include "sample/sampler.h"
#include "util/error.h"

namespace {

using namespace qf;
using Clock = std::chrono::steady_clock;

runtime::KvOptions parse_kv(const std::string& spec) {
  runtime::KvOptions kv;
  const size_t a = spec.find(':');
  if (a == std::string::npos) fail("KV must be POLICY:BUDGET[:FILTERS], not ", spec);
  const size_t b = spec.find(':', a + 1);
  kv.policy = spec.substr(0, a);
  kv.budget = std::atoi(spec.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1).c_str());
  if (b != std::string::npos) kv.filters = spec.substr(b + 1);
  if (kv.policy != "none") {
    kv.window = 64;
    kv.evict_every = 16;
  }
  return kv;
}

std::vector<int> parse_counts(const std::string& list) {
  std::vector<int> out;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');) {
    const int n = std::atoi(item.c_str());
    if (n < 1) fail("session counts must be >= 1: ", list);
    out.push_back(n);
  }
  if (out.empty()) fail("no session counts in '", list, "'");
  return out;
}

double ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

struct Timing {
  double forward_ms = 0, sample_ms = 0;
};

// N copies of `seed` decode `steps` tokens together; returns the mean time per step.
Timing decode_together(runtime::Engine& engine, const runtime::KvOptions& kv, const Session& seed, int n, int steps) {
  std::vector<std::unique_ptr<Session>> sessions;
  std::vector<Sampler> samplers;
  std::vector<int32_t> next(n);
  for (int i = 0; i < n; ++i) {
    sessions.push_back(engine.new_session(kv));
    sessions.back()->copy_state_from(seed);
    SamplerOptions so;
    so.seed = static_cast<uint64_t>(i + 1);
    samplers.emplace_back(so);
    next[i] = static_cast<int32_t>((i * 7919 + 13) % engine.model().config().n_vocab);
  }
  Forward fw(engine.model(), n);
  Timing t;
  for (int step = 0; step < steps; ++step) {
    std::vector<BatchItem> items;
    for (int i = 0; i < n; ++i)  // decode rows, as the server batches them (the decode engine)
      items.push_back({sessions[i].get(), std::span<const int32_t>(&next[i], 1), TokenKind::decode});
    const auto t0 = Clock::now();
    const auto logits = Session::eval_batch(items, fw, engine.pool());
    const auto t1 = Clock::now();
    engine.pool().parallel_for(n, 1, [&](int64_t b, int64_t e) {  // on the pool, as the server samples
      for (int64_t i = b; i < e; ++i) next[i] = samplers[i].sample_and_accept(logits[i]);
    });
    const auto t2 = Clock::now();
    t.forward_ms += ms(t1 - t0);
    t.sample_ms += ms(t2 - t1);
  }
  t.forward_ms /= steps;
  t.sample_ms /= steps;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7 && argc != 9) {
    std::fprintf(stderr, "usage: batch_step MODEL KV CONTEXT SESSIONS STEPS THREADS [CTK CTV]\n");
    return 2;
  }
  try {
    const int context = std::atoi(argv[3]), steps = std::atoi(argv[5]);
    if (context < 1 || steps < 1) fail("CONTEXT and STEPS must be >= 1");
    runtime::ModelOptions mo;
    mo.model = argv[1];
    mo.n_ctx = context + steps + 64;
    mo.n_threads = std::atoi(argv[6]);
    if (argc == 9) {
      mo.cache_type_k = argv[7];
      mo.cache_type_v = argv[8];
    }
    runtime::Engine engine(mo);
    const runtime::KvOptions kv = parse_kv(argv[2]);
    const std::vector<int> counts = parse_counts(argv[4]);

    auto seed = engine.new_session(kv);
    std::vector<int32_t> prompt(context);
    for (int i = 0; i < context; ++i) prompt[i] = static_cast<int32_t>((i * 104729 + 17) % engine.model().config().n_vocab);
    seed->prefill(prompt);

    double base_tok_s = 0;
    for (int n : counts) {
      const Timing t = decode_together(engine, kv, *seed, n, steps);
      const double tok_s = n * 1000.0 / (t.forward_ms + t.sample_ms);
      if (base_tok_s == 0) base_tok_s = tok_s / n;
      std::printf("{\"sessions\": %d, \"context\": %d, \"kv\": \"%s\", \"ctk\": \"%s\", \"threads\": %d, "
                  "\"forward_ms_per_step\": %.3f, \"sample_ms_per_step\": %.3f, \"aggregate_tok_s\": %.1f, "
                  "\"ratio_to_one\": %.2f}\n",
                  n, context, kv.policy.c_str(), mo.cache_type_k.c_str(), engine.pool().size(), t.forward_ms,
                  t.sample_ms, tok_s, tok_s / base_tok_s);
      std::fflush(stdout);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "batch_step: %s\n", e.what());
    return 1;
  }
}
