#include "cli/common.h"

#include <sys/resource.h>

#include <cstdio>

#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf::cli {

void add_model_options(CLI::App* app, ModelOptions& o, bool model_required) {
  auto* m = app->add_option("-m,--model", o.model, "GGUF model file");
  if (model_required) m->required();
  m->check(CLI::ExistingFile);
  app->add_option("-c,--ctx-size", o.n_ctx, "longest sequence in tokens (0 = the model's training context)")
      ->check(CLI::NonNegativeNumber);
  app->add_option_function<int>(
         "-t,--threads",
         [&o](int n) {
           const ThreadCount tc = resolve_thread_count(n);  // absurd counts are capped, with a warning
           if (!tc.warning.empty()) std::fprintf(stderr, "%s\n", tc.warning.c_str());
           o.n_threads = tc.n;
         },
         "threads (0 = all cores; at most " + std::to_string(kMaxThreadsPerCpu) + " per core)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("-b,--batch-size", o.n_batch, "prompt tokens per forward chunk")->check(CLI::PositiveNumber);
  std::vector<std::string> types;
  for (kv::KvType t : kv::kv_types()) types.emplace_back(kv::kv_type_name(t));
  // -ctk / -ctv (llama.cpp's spelling) reach these through spell_out_llama_flags().
  app->add_option("--cache-type-k", o.cache_type_k, "-ctk: KV cache storage type of keys")
      ->check(CLI::IsMember(types))->capture_default_str()->group("KV cache");
  app->add_option("--cache-type-v", o.cache_type_v, "-ctv: KV cache storage type of values")
      ->check(CLI::IsMember(types))->capture_default_str()->group("KV cache");
}

std::vector<std::string> spell_out_llama_flags(int argc, char** argv) {
  const std::pair<std::string, std::string> names[] = {
      {"-ctk", "--cache-type-k"}, {"-ctv", "--cache-type-v"}, {"-np", "--parallel"}};
  std::vector<std::string> args(argv, argv + argc);
  for (std::string& a : args)
    for (const auto& [short_name, long_name] : names)
      if (a == short_name || a.rfind(short_name + "=", 0) == 0) a = long_name + a.substr(short_name.size());
  return args;
}

void add_kv_options(CLI::App* app, KvOptions& o) {
  std::string names;
  for (const auto& n : kv::policy_names()) names += (names.empty() ? "" : ", ") + n;
  std::string with_stats;
  for (const auto& n : kv::query_stats_policy_names()) with_stats += (with_stats.empty() ? "" : ", ") + n;
  app->add_option("--kv-policy", o.policy,
                  "KV eviction policy: " + names + "; with a --filters file holding query statistics (qf calibrate "
                  "--stats-rank N): " + with_stats + " (NAME+layer: one selection per layer, kept in all its KV heads or none)")
      ->group("KV cache");
  app->add_option("--filters", o.filters, "filter file (safetensors, qf calibrate) for the qfilters* and ea_calibrated policies")
      ->check(CLI::ExistingFile)->group("KV cache");
  app->add_option("--filter-layout", o.filter_layout,
                  "row order of a --filters file not made by qf (published filters: hf)")
      ->check(CLI::IsMember({"gguf", "hf"}))->group("KV cache");
  app->add_option("--filter-sign", o.filter_sign,
                  "sign convention of a --filters file not made by qf (published filters: keep_smallest_dot)")
      ->check(CLI::IsMember({"keep_largest_dot", "keep_smallest_dot"}))->group("KV cache");
  app->add_option("--kv-budget", o.budget, "streaming: tokens each KV head keeps (0 = unbounded)")
      ->check(CLI::NonNegativeNumber)->group("KV cache");
  app->add_option("--kv-window", o.window, "streaming: newest tokens always kept")->check(CLI::NonNegativeNumber)->group("KV cache");
  app->add_option("--kv-evict-every", o.evict_every, "streaming: evict this many tokens at a time")
      ->check(CLI::PositiveNumber)->group("KV cache");
  app->add_option("--kv-ratio", o.ratio, "prefill: fraction of the prompt's tokens evicted per head, in [0, 1)")->group("KV cache");
  app->add_option("--kv-skip-layers", o.skip_layers, "leave the first N layers uncompressed")
      ->check(CLI::NonNegativeNumber)->group("KV cache");
  app->add_option("--layer-weights", o.layer_weights, kLayerWeightsHelp)->group("KV cache");
  app->add_option("--kv-seed", o.seed, "seed of the random policy")->group("KV cache");
  app->add_option("--kv-positions", o.positions,
                  "at the end of the context (-c): shift = forget the older half of the sequence after its first 4 "
                  "tokens and move the rest back, so generation never ends; keep = positions keep counting (a "
                  "bounded cache goes past -c with positions the model never saw, a full cache stops)")
      ->check(CLI::IsMember({"keep", "shift"}))->capture_default_str()->group("KV cache");
  add_query_stats_options(app, o.query_stats, "KV cache");
}

void add_query_stats_options(CLI::App* app, runtime::QueryStatsOptions& o, const std::string& group) {
  const std::vector<CLI::Option*> added{
      app->add_option("--future-positions", o.future_positions,
                      "expected_attention, qfilters_rope, ea_calibrated, qfilters_adaptive, qfilters_max: positions after "
                      "the newest key the query statistics are moved to (mean rotary rotation)")
          ->check(CLI::PositiveNumber),
      app->add_option("--filter-blend", o.filter_blend,
                      "qfilters_adaptive, qfilters_max: weight in [0, 1] of the recent queries in the filter (0 = "
                      "qfilters_rope)")
          ->check(CLI::Range(0.0, 1.0)),
      app->add_option("--filter-horizon", o.filter_horizon,
                      "qfilters_adaptive, qfilters_max: horizon in tokens of the recent queries' moving average (1 = "
                      "the last query)")
          ->check(CLI::PositiveNumber),
      app->add_option("--filter-decay", o.filter_decay,
                      "qfilters_max: standard deviations per position by which a kept token's remembered score fades "
                      "(inf = no memory, each round's score alone)"),
  };
  for (CLI::Option* opt : added) {
    opt->capture_default_str();
    if (!group.empty()) opt->group(group);
  }
}

void add_sampling_options(CLI::App* app, SamplingFlags& o) {
  SamplerOptions& s = o.options;
  app->add_option("--temp", s.temperature, "temperature (0 = greedy)")->capture_default_str()->group("Sampling");
  app->add_option("--top-k", s.top_k, "top-k cut (0 = off)")->capture_default_str()->group("Sampling");
  app->add_option("--top-p", s.top_p, "nucleus cut (1 = off)")->capture_default_str()->group("Sampling");
  app->add_option("--min-p", s.min_p, "drop tokens less likely than min-p x the best one (0 = off)")
      ->capture_default_str()->group("Sampling");
  app->add_option("--repeat-penalty", s.repeat_penalty, "penalise repeats of the last --repeat-last-n tokens (1 = off)")
      ->capture_default_str()->group("Sampling");
  app->add_option("--repeat-last-n", s.repeat_last_n, "tokens the penalties look back over (0 = off)")
      ->capture_default_str()->group("Sampling");
  app->add_option("--presence-penalty", s.presence_penalty, "subtracted from tokens already in the window (0 = off)")
      ->capture_default_str()->group("Sampling");
  app->add_option("--frequency-penalty", s.frequency_penalty, "subtracted per occurrence in the window (0 = off)")
      ->capture_default_str()->group("Sampling");
  app->add_option("-s,--seed", o.seed, "sampling seed (-1 = random)")->capture_default_str()->group("Sampling");
}

SamplerOptions SamplingFlags::resolve() const {
  if (seed < -1) fail("--seed must be >= 0, or -1 for a random seed");
  SamplerOptions s = options;
  s.seed = seed == -1 ? random_seed() : static_cast<uint64_t>(seed);
  return s;
}

Engine make_engine(const ModelOptions& mo, const KvOptions& ko) {
  Engine e;
  e.runtime = std::make_unique<runtime::Engine>(mo);
  e.model = &e.runtime->model();
  e.session = e.runtime->new_session(ko);
  return e;
}

double peak_rss_mib() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;  // Linux reports KiB
}

}  // namespace qf::cli
