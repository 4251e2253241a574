#include "runtime/engine.h"

#include <cstdio>
#include <sstream>

#include "calib/filter_file.h"
#include "kv/compressor.h"
#include "util/error.h"

namespace qf::runtime {

void QueryStatsOptions::apply(kv::PolicyOptions& po) const {
  po.query_future_positions = future_positions;
  po.ea_future_positions = future_positions;
  po.filter_blend = filter_blend;
  po.filter_horizon = filter_horizon;
  po.filter_decay = filter_decay;
}

kv::KvTypes kv_types(const ModelOptions& o) {
  return {kv::parse_kv_type(o.cache_type_k), kv::parse_kv_type(o.cache_type_v)};
}

Engine::Engine(const ModelOptions& options) : options_(options) {
  kv_types(options);  // an unknown type fails before the model loads
  model_ = Model::load(options.model);
  const ModelConfig& c = model_->config();
  if (options.n_ctx < 0) fail("-c must be >= 0");
  if (options.n_batch <= 0) fail("-b must be > 0");
  if (options.n_ctx > c.n_ctx_train)
    std::fprintf(stderr, "warning: -c %d exceeds the model's training context (%d)\n", options.n_ctx, c.n_ctx_train);
  pool_ = std::make_unique<ThreadPool>(options.n_threads);
}

Engine::~Engine() = default;

int Engine::n_ctx() const { return options_.n_ctx > 0 ? options_.n_ctx : model_->config().n_ctx_train; }

const calib::Filters& Engine::filters(const KvOptions& kv) {
  const std::string key = kv.filters + '\n' + kv.filter_layout + '\n' + kv.filter_sign;
  if (auto it = filters_.find(key); it != filters_.end()) return it->second;
  const ModelConfig& c = model_->config();
  calib::FilterExpectation expect{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()};
  calib::LoadOptions lo;
  if (!kv.filter_layout.empty()) lo.layout = calib::parse_filter_layout(kv.filter_layout);
  if (!kv.filter_sign.empty()) lo.sign = calib::parse_sign_convention(kv.filter_sign);
  calib::LoadedFilters lf = calib::load_filters(kv.filters, expect, lo);
  if (lf.fingerprint_missing)
    std::fprintf(stderr, "warning: %s does not say which model it was made for\n", kv.filters.c_str());
  return filters_.emplace(key, std::move(lf.filters)).first->second;
}

// Null for a full cache. The flag names in the messages are the CLI's (and the server's).
std::unique_ptr<kv::Compressor> Engine::make_compressor(const KvOptions& kv) {
  const bool compress = kv.budget > 0 || kv.ratio > 0;
  if (kv.filters.empty() && (!kv.filter_layout.empty() || !kv.filter_sign.empty()))
    fail("--filter-layout and --filter-sign describe a --filters FILE, and none was given");
  if (kv.policy == "none") {
    if (compress || !kv.filters.empty() || !kv.layer_weights.empty())
      fail("--kv-budget, --kv-ratio, --filters and --layer-weights need a --kv-policy (e.g. qfilters)");
    return nullptr;
  }
  if (!compress) fail("--kv-policy ", kv.policy, " needs --kv-budget and/or --kv-ratio");
  kv::PolicyOptions po;
  po.seed = kv.seed;
  kv.query_stats.apply(po);
  if (!kv.filters.empty()) {
    const calib::Filters& f = filters(kv);
    po.filters = f.data;
    po.query_mean = f.query_mean;
    po.query_factors = f.query_factors;
    po.n_query_heads = f.n_query_heads;
    po.stats_rank = f.stats_rank;
  } else if (kv::base_policy_name(kv.policy) == "qfilters") {
    fail("--kv-policy ", kv.policy, " needs --filters FILE (make one with: qf calibrate -m MODEL -o FILE)");
  }
  kv::CompressionConfig cc;
  cc.budget = kv.budget;
  cc.window = kv.window;
  cc.evict_every = kv.evict_every;
  cc.prefill_ratio = kv.ratio;
  cc.skip_layers = kv.skip_layers;
  cc.layer_weights = layer_weights(kv);
  const ModelConfig& c = model_->config();
  cc.validate(c.n_layers);
  auto comp = std::make_unique<kv::Compressor>(kv::make_policy(kv.policy, po), po, cc);
  // As the session will: sliding-window layers keep their window, so per-layer budgets share the
  // total among the others, here too (session_kv_bytes sizes caches from this compressor).
  std::vector<bool> local(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) local[l] = c.layers[l].local();
  comp->exempt_layers(std::move(local));
  return comp;
}

std::vector<float> Engine::layer_weights(const KvOptions& kv) {
  if (kv.layer_weights != "spread") return parse_layer_weights(kv.layer_weights, nullptr);
  return parse_layer_weights(kv.layer_weights, kv.filters.empty() ? nullptr : &filters(kv));
}

std::unique_ptr<Session> Engine::new_session(const KvOptions& kv, int n_ctx) {
  SessionOptions so;
  so.n_ctx = n_ctx > 0 ? n_ctx : options_.n_ctx;
  so.n_threads = options_.n_threads;
  so.n_batch = options_.n_batch;
  so.pool = pool_.get();
  so.kv_types = session_kv_types(kv);
  so.compressor = make_compressor(kv);
  so.positions = parse_position_mode(kv.positions);
  return std::make_unique<Session>(*model_, std::move(so));
}

kv::KvTypes Engine::session_kv_types(const KvOptions& kv) const {
  ModelOptions o = options_;
  if (!kv.cache_type_k.empty()) o.cache_type_k = kv.cache_type_k;
  if (!kv.cache_type_v.empty()) o.cache_type_v = kv.cache_type_v;
  return kv_types(o);
}

int64_t Engine::session_kv_bytes(const KvOptions& kv, int n_ctx) {
  const ModelConfig& c = model_->config();
  const std::unique_ptr<kv::Compressor> comp = make_compressor(kv);
  parse_position_mode(kv.positions);  // checked here too: admission is where the server validates
  int64_t slots = 0;
  for (int cap : Session::cache_capacity(*model_, comp.get(), n_ctx > 0 ? n_ctx : this->n_ctx(), options_.n_batch))
    slots += cap;
  const kv::KvTypes types = session_kv_types(kv);
  const bool key_scores = comp && comp->needs().key_scores;  // one float per slot (Cache::bytes_reserved)
  const size_t policy_state = comp ? comp->policy().state_bytes_per_slot() : 0;  // held by the policy, not the cache
  return slots * c.n_kv_heads *
         static_cast<int64_t>(kv::kv_row_bytes(types.k, c.head_dim) + kv::kv_row_bytes(types.v, c.head_dim) +
                              (key_scores ? sizeof(float) : 0) + policy_state);
}

std::string kv_summary(const Session& s) {
  const kv::Cache& c = s.cache();
  const double mib = 1024.0 * 1024.0;
  const int64_t seen = s.n_past() + s.positions_shifted();  // tokens fed since the last reset
  std::ostringstream os;
  os.precision(2);
  os << std::fixed << "kv: " << kv::kv_type_name(c.types().k) << "/" << kv::kv_type_name(c.types().v) << ", "
     << c.bytes_per_token_per_layer() << " bytes per token per layer | " << c.bytes_used() / mib << " MiB in use ("
     << c.bytes_reserved() / mib
     << " MiB reserved) vs " << c.full_cache_bytes(seen) / mib << " MiB for a full cache of " << seen << " tokens";
  if (s.positions_shifted() > 0)
    os << " | context shifted back by " << s.positions_shifted() << " positions (--kv-positions shift)";
  const ModelConfig& mc = s.model().config();
  if (const int n_local = mc.n_local_layers(); n_local > 0) {
    std::string global;
    for (int l = 0; l < mc.n_layers; ++l)
      if (!mc.layers[l].local()) global += (global.empty() ? "" : ",") + std::to_string(l);
    const bool one = global.find(',') == std::string::npos;
    os << " | " << n_local << " sliding-window layers keep their window; " << (one ? "layer " : "layers ")
       << (global.empty() ? "(none)" : global) << (one ? " is" : " are") << " global"
       << (s.compressor() ? " (the policy acts on " + std::string(one ? "it" : "these") + ")" : "");
  }
  if (const kv::Compressor* comp = s.compressor()) {
    const kv::CompressionStats& st = comp->stats();
    os << " | policy " << comp->policy().name() << ": " << st.evicted << " slots evicted in " << st.evictions
       << " rounds, scoring " << st.score_seconds * 1e3 << " ms, evicting " << st.evict_seconds * 1e3 << " ms";
  }
  return os.str();
}

}  // namespace qf::runtime
