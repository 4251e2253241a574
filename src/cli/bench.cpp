// qf bench: prefill and decode speed at a given prompt length, median of several runs, plus
// peak memory and, with a KV policy, the share of decode time spent scoring and evicting.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <time.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "sample/sampler.h"
#include "util/error.h"

namespace qf::cli {

namespace {

struct BenchOptions {
  ModelOptions model;
  KvOptions kv;
  int n_prompt = 512;
  int n_gen = 128;
  int reps = 5;
  bool json = false;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// Process CPU time, beside wall time: with -t 1 on a machine shared with other jobs, tokens per
// CPU second approximate the idle machine's speed (not its memory bandwidth share); llama_ref
// bench reports the same. With more threads it also counts the pool's spinning.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

int bench(const BenchOptions& o) {
  if (o.n_prompt < 1 || o.n_gen < 0 || o.reps < 1) fail("bench needs -p >= 1, -n >= 0, -r >= 1");
  ModelOptions mo = o.model;
  if (mo.n_ctx == 0) mo.n_ctx = o.n_prompt + o.n_gen;
  if (o.kv.budget == 0) mo.n_batch = std::max(mo.n_batch, std::min(o.n_prompt, 512));
  Engine e = make_engine(mo, o.kv);
  Session& s = *e.session;
  if (o.n_prompt + o.n_gen > s.n_ctx()) fail("-p + -n exceeds the context (-c ", s.n_ctx(), ")");
  const int n_vocab = e.model->config().n_vocab;

  std::mt19937 rng(1234);
  std::vector<int32_t> prompt(o.n_prompt);
  for (auto& t : prompt) t = static_cast<int32_t>(rng() % n_vocab);

  std::vector<double> prefill_runs, decode_runs, prefill_cpu_runs, decode_cpu_runs, overhead_share;
  double kv_used = 0, kv_full = 0;
  using clock = std::chrono::steady_clock;
  for (int r = 0; r < o.reps; ++r) {
    s.reset();
    const double c0 = cpu_seconds();
    const auto t0 = clock::now();
    std::span<const float> logits = s.prefill(prompt);
    const double t_prefill = std::chrono::duration<double>(clock::now() - t0).count();
    const double c1 = cpu_seconds();
    prefill_runs.push_back(o.n_prompt / t_prefill);
    prefill_cpu_runs.push_back(o.n_prompt / (c1 - c0));
    const kv::CompressionStats before = s.compressor() ? s.compressor()->stats() : kv::CompressionStats{};
    const auto t1 = clock::now();
    for (int i = 0; i < o.n_gen; ++i) {
      const int32_t next = argmax(logits);
      logits = s.decode(next);
    }
    const double t_decode = std::chrono::duration<double>(clock::now() - t1).count();
    if (o.n_gen > 0) {
      decode_runs.push_back(o.n_gen / t_decode);
      decode_cpu_runs.push_back(o.n_gen / (cpu_seconds() - c1));
    }
    if (s.compressor() && o.n_gen > 0) {
      const kv::CompressionStats& after = s.compressor()->stats();
      const double spent = (after.score_seconds - before.score_seconds) + (after.evict_seconds - before.evict_seconds);
      overhead_share.push_back(spent / t_decode);
    }
    kv_used = static_cast<double>(s.cache().bytes_used());
    kv_full = static_cast<double>(s.cache().full_cache_bytes(s.n_past()));
    if (!o.json)
      std::fprintf(stderr, "  run %d/%d: prefill %.1f tok/s, decode %.1f tok/s\n", r + 1, o.reps, prefill_runs.back(),
                   decode_runs.empty() ? 0.0 : decode_runs.back());
  }

  nlohmann::json j;
  j["model"] = o.model.model;
  j["threads"] = s.pool().size();
  j["simd"] = simd_target_name();
  j["amx_prompt"] = amx_prompt_engine();
  j["prompt_tokens"] = o.n_prompt;
  j["gen_tokens"] = o.n_gen;
  j["reps"] = o.reps;
  j["prefill_tok_s"] = median(prefill_runs);
  j["decode_tok_s"] = median(decode_runs);
  j["prefill_runs"] = prefill_runs;
  j["decode_runs"] = decode_runs;
  j["prefill_tok_per_cpu_s"] = median(prefill_cpu_runs);
  j["decode_tok_per_cpu_s"] = median(decode_cpu_runs);
  j["peak_rss_mb"] = peak_rss_mib();
  j["kv_policy"] = o.kv.policy;
  j["kv_budget"] = o.kv.budget;
  if (!o.kv.layer_weights.empty()) j["kv_layer_weights"] = o.kv.layer_weights;
  j["kv_bytes_used"] = kv_used;
  j["kv_bytes_full"] = kv_full;
  j["kv_bytes_reserved"] = s.cache().bytes_reserved();
  j["cache_type_k"] = std::string(kv::kv_type_name(s.cache().types().k));
  j["cache_type_v"] = std::string(kv::kv_type_name(s.cache().types().v));
  j["kv_bytes_per_token_per_layer"] = s.cache().bytes_per_token_per_layer();
  j["n_ctx"] = s.n_ctx();  // the cache shape, for comparisons with other engines' caches
  j["n_layers"] = s.cache().shape().n_layers;
  j["n_kv_heads"] = s.cache().shape().n_kv_heads;
  j["head_dim"] = s.cache().shape().head_dim;
  if (!overhead_share.empty()) j["kv_overhead_share"] = median(overhead_share);
  if (o.json) {
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("prefill %d tokens: %.1f tok/s | decode %d tokens: %.1f tok/s | median of %d, %d threads, %s | peak RSS %.1f MiB\n",
                o.n_prompt, median(prefill_runs), o.n_gen, median(decode_runs), o.reps, s.pool().size(),
                simd_description().c_str(), peak_rss_mib());
    std::printf("per CPU second: prefill %.1f tok, decode %.1f tok\n", median(prefill_cpu_runs), median(decode_cpu_runs));
    std::printf("KV %s/%s, %lld bytes per token per layer: %.2f MiB in use vs %.2f MiB for a full cache",
                std::string(kv::kv_type_name(s.cache().types().k)).c_str(),
                std::string(kv::kv_type_name(s.cache().types().v)).c_str(),
                static_cast<long long>(s.cache().bytes_per_token_per_layer()), kv_used / 1048576.0, kv_full / 1048576.0);
    if (!overhead_share.empty()) std::printf(" | scoring+eviction %.2f%% of decode time", 100.0 * median(overhead_share));
    std::printf("\n");
  }
  return 0;
}

}  // namespace

void register_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* cmd = app.add_subcommand("bench", "measure prefill and decode speed");
  add_model_options(cmd, o->model);
  cmd->add_option("-p,--n-prompt", o->n_prompt, "prompt tokens (random ids)");
  cmd->add_option("-n,--n-gen", o->n_gen, "tokens decoded after the prompt");
  cmd->add_option("-r,--repetitions", o->reps, "runs; the median is reported");
  cmd->add_flag("--json", o->json, "print one JSON object");
  add_kv_options(cmd, o->kv);
  cmd->callback([o] { bench(*o); });
}

}  // namespace qf::cli
