#include "cli/common.h"

#include <sys/resource.h>

#include <cstdio>
#include <sstream>

#include "calib/filter_file.h"
#include "util/error.h"

namespace qf::cli {

void add_model_options(CLI::App* app, ModelOptions& o, bool model_required) {
  auto* m = app->add_option("-m,--model", o.model, "GGUF model file");
  if (model_required) m->required();
  m->check(CLI::ExistingFile);
  app->add_option("-c,--ctx-size", o.n_ctx, "longest sequence in tokens (0 = the model's training context)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("-t,--threads", o.n_threads, "threads (0 = all cores)")->check(CLI::NonNegativeNumber);
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
  const std::pair<std::string, std::string> names[] = {{"-ctk", "--cache-type-k"}, {"-ctv", "--cache-type-v"}};
  std::vector<std::string> args(argv, argv + argc);
  for (std::string& a : args)
    for (const auto& [short_name, long_name] : names)
      if (a == short_name || a.rfind(short_name + "=", 0) == 0) a = long_name + a.substr(short_name.size());
  return args;
}

kv::KvTypes kv_types(const ModelOptions& o) { return {kv::parse_kv_type(o.cache_type_k), kv::parse_kv_type(o.cache_type_v)}; }

void add_kv_options(CLI::App* app, KvOptions& o) {
  std::string names;
  for (const auto& n : kv::policy_names()) names += (names.empty() ? "" : ", ") + n;
  app->add_option("--kv-policy", o.policy, "KV eviction policy: " + names)->group("KV cache");
  app->add_option("--filters", o.filters, "Q-Filters file (safetensors) for --kv-policy qfilters")
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
  app->add_option("--kv-seed", o.seed, "seed of the random policy")->group("KV cache");
}

std::unique_ptr<Session> make_session(const Model& model, const ModelOptions& mo, const KvOptions& ko,
                                      std::vector<float>& filters_storage) {
  const ModelConfig& c = model.config();
  if (mo.n_ctx > 0 && mo.n_ctx > c.n_ctx_train && ko.budget == 0)
    std::fprintf(stderr, "warning: -c %d exceeds the model's training context (%d)\n", mo.n_ctx, c.n_ctx_train);
  SessionOptions so;
  so.n_ctx = mo.n_ctx;
  so.n_threads = mo.n_threads;
  so.n_batch = mo.n_batch;
  so.kv_types = kv_types(mo);
  const bool compress = ko.budget > 0 || ko.ratio > 0;
  if (ko.policy != "none") {
    if (!compress) fail("--kv-policy ", ko.policy, " needs --kv-budget and/or --kv-ratio");
    kv::PolicyOptions po;
    po.seed = ko.seed;
    if (!ko.filters.empty()) {
      calib::FilterExpectation expect{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()};
      calib::LoadOptions lo;
      if (!ko.filter_layout.empty()) lo.layout = calib::parse_filter_layout(ko.filter_layout);
      if (!ko.filter_sign.empty()) lo.sign = calib::parse_sign_convention(ko.filter_sign);
      calib::LoadedFilters lf = calib::load_filters(ko.filters, expect, lo);
      if (lf.fingerprint_missing)
        std::fprintf(stderr, "warning: %s does not say which model it was made for\n", ko.filters.c_str());
      filters_storage = std::move(lf.filters.data);
      po.filters = filters_storage;
    } else if (ko.policy == "qfilters") {
      fail("--kv-policy qfilters needs --filters FILE (make one with: qf calibrate -m MODEL -o FILE)");
    }
    kv::CompressionConfig cc;
    cc.budget = ko.budget;
    cc.window = ko.window;
    cc.evict_every = ko.evict_every;
    cc.prefill_ratio = ko.ratio;
    cc.skip_layers = ko.skip_layers;
    cc.validate(c.n_layers);
    so.compressor = std::make_unique<kv::Compressor>(kv::make_policy(ko.policy, po), po, cc);
  } else if (compress || !ko.filters.empty()) {
    fail("--kv-budget, --kv-ratio and --filters need a --kv-policy (e.g. qfilters)");
  }
  if (ko.filters.empty() && (!ko.filter_layout.empty() || !ko.filter_sign.empty())) {
    fail("--filter-layout and --filter-sign describe a --filters FILE, and none was given");
  }
  return std::make_unique<Session>(model, std::move(so));
}

Engine make_engine(const ModelOptions& mo, const KvOptions& ko) {
  Engine e;
  e.model = Model::load(mo.model);
  e.session = make_session(*e.model, mo, ko, e.filters);
  return e;
}

std::string kv_summary(const Session& s) {
  const kv::Cache& c = s.cache();
  const double mib = 1024.0 * 1024.0;
  std::ostringstream os;
  os.precision(2);
  os << std::fixed << "kv: " << kv::kv_type_name(c.types().k) << "/" << kv::kv_type_name(c.types().v) << ", "
     << c.bytes_per_token_per_layer() << " bytes per token per layer | " << c.bytes_used() / mib << " MiB in use (" << c.bytes_reserved() / mib
     << " MiB reserved) vs " << c.full_cache_bytes(s.n_past()) / mib << " MiB for a full cache of " << s.n_past()
     << " tokens";
  if (const kv::Compressor* comp = s.compressor()) {
    const kv::CompressionStats& st = comp->stats();
    os << " | policy " << comp->policy().name() << ": " << st.evicted << " slots evicted in " << st.evictions
       << " rounds, scoring " << st.score_seconds * 1e3 << " ms, evicting " << st.evict_seconds * 1e3 << " ms";
  }
  return os.str();
}

double peak_rss_mib() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;  // Linux reports KiB
}

}  // namespace qf::cli
