#include "runtime/session_state.h"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <type_traits>
#include <variant>

#include "kv/policy.h"
#include "util/error.h"
#include "util/hash.h"

namespace qf::runtime {

namespace {

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

void hash_value(Fnv1a64& h, const gguf::Value& v) {
  h.add_u64(static_cast<uint64_t>(v.type));
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::string>) {
          h.add(x);
        } else if constexpr (std::is_same_v<T, gguf::Array>) {
          h.add_u64(static_cast<uint64_t>(x.elem_type));
          h.add_u64(x.items.size());
          for (const gguf::Value& item : x.items) hash_value(h, item);
        } else if constexpr (std::is_same_v<T, double>) {
          h.add_u64(std::bit_cast<uint64_t>(x));
        } else {
          h.add_u64(static_cast<uint64_t>(x));
        }
      },
      v.v);
}

void hash_floats(Fnv1a64& h, std::span<const float> x) {
  h.add_u64(x.size());
  h.add(std::span(reinterpret_cast<const uint8_t*>(x.data()), x.size_bytes()));
}

// What eviction reads from the filter file: the filters, and for the policies that score with
// calibrated query statistics (query_stats_policy_names(), also +layer) those statistics, the
// positions they are moved to (and the blend and horizon of the filters that follow the recent
// queries), so a state restored with another file, or other
// --future-positions, is refused instead of evicting differently. "" without a filter file. The
// filters alone hash as they always have, so earlier states of the other policies still restore.
std::string filters_hash(std::string_view policy, const kv::PolicyOptions& po) {
  if (po.filters.empty()) return "";
  Fnv1a64 h;
  hash_floats(h, po.filters);
  policy = kv::base_policy_name(policy);
  const std::vector<std::string> stats_policies = kv::query_stats_policy_names();
  if (std::ranges::find(stats_policies, policy) != stats_policies.end()) {
    hash_floats(h, po.query_mean);
    hash_floats(h, po.query_factors);
    h.add_u64(static_cast<uint64_t>(po.n_query_heads));
    h.add_u64(static_cast<uint64_t>(po.stats_rank));
    h.add_u64(static_cast<uint64_t>(po.query_future_positions));
    if (policy == "qfilters_adaptive" || policy == "qfilters_max") {  // their filters also follow these
      const double blend = po.filter_blend;
      h.add(std::span(reinterpret_cast<const uint8_t*>(&blend), sizeof blend));
      h.add_u64(static_cast<uint64_t>(po.filter_horizon));
    }
    if (policy == "qfilters_max") {  // and how fast its memory fades
      const double decay = po.filter_decay;
      h.add(std::span(reinterpret_cast<const uint8_t*>(&decay), sizeof decay));
    }
  }
  return hex64(h.value());
}

// "qfilters budget 512 window 64 evict_every 1 ratio 0 skip_layers 0 seed 0 filters 1a2b..."
std::string describe_policy(const kv::StateConfig& c) {
  if (c.policy == "none") return "a full cache (no --kv-policy)";
  std::ostringstream os;
  os << "--kv-policy " << c.policy << " budget " << c.budget << " window " << c.window << " evict_every "
     << c.evict_every << " ratio " << c.ratio << " skip_layers " << c.skip_layers;
  const std::string_view base = kv::base_policy_name(c.policy);
  if (base == "random") os << " seed " << c.seed;
  if (base == "streaming") os << " sinks " << c.n_sink;
  if (base == "snapkv") os << " observation window " << c.snapkv_window << " kernel " << c.snapkv_kernel;
  if (!c.filters_hash.empty()) os << " filters " << c.filters_hash;
  return os.str();
}

// "uniform budgets" or "per-layer budget weights 1.2,0.81,..." (as --layer-weights spells them).
std::string describe_budgets(const std::vector<float>& w) {
  return w.empty() ? "uniform budgets" : "per-layer budget weights " + format_layer_weights(w);
}

std::string describe_stats(const kv::AttentionStats& s) {
  return std::string("accumulate ") + (s.accumulate ? "on" : "off") + ", last query " + (s.last_query ? "on" : "off") +
         ", window " + std::to_string(s.window) + ", query moments " + (s.query_moments ? "on" : "off") +
         ", key scores " + (s.key_scores ? "on" : "off") + ", recent-query horizon " + std::to_string(s.query_recent);
}

// Fails with the first way the file's configuration differs from the session's.
void check_config(const kv::StateConfig& file, const kv::StateConfig& mine, std::string_view name) {
  if (file.model_fingerprint != mine.model_fingerprint || file.model_shape != mine.model_shape)
    fail(name, ": saved for another model (", file.model_shape, ", fingerprint ", file.model_fingerprint,
         "); this is ", mine.model_shape, ", fingerprint ", mine.model_fingerprint);
  if (file.n_layers != mine.n_layers || file.n_kv_heads != mine.n_kv_heads || file.head_dim != mine.head_dim)
    fail(name, ": saved for ", file.n_layers, " layers x ", file.n_kv_heads, " KV heads x ", file.head_dim,
         " dims; this model has ", mine.n_layers, " x ", mine.n_kv_heads, " x ", mine.head_dim);
  if (file.type_k != mine.type_k || file.type_v != mine.type_v)
    fail(name, ": saved with KV types ", kv::kv_type_name(file.type_k), "/", kv::kv_type_name(file.type_v),
         "; this session stores ", kv::kv_type_name(mine.type_k), "/", kv::kv_type_name(mine.type_v), " (-ctk/-ctv)");
  kv::StateConfig a = file, b = mine;
  a.stats = b.stats = {};
  a.layer_weights = b.layer_weights = {};
  if (a != b && !a.filters_hash.empty() && !b.filters_hash.empty()) {
    kv::StateConfig same_filters = a;
    same_filters.filters_hash = b.filters_hash;
    if (same_filters == b)
      fail(name, ": saved with other Q-Filters or query-statistics settings (filters ", file.filters_hash, ", this session ",
           mine.filters_hash, "): use the same --filters, --future-positions, --filter-blend, --filter-horizon and "
           "--filter-decay");
  }
  if (a != b) fail(name, ": saved with ", describe_policy(file), "; this session uses ", describe_policy(mine));
  if (file.layer_weights != mine.layer_weights)
    fail(name, ": saved with ", describe_budgets(file.layer_weights), "; this session uses ",
         describe_budgets(mine.layer_weights), " (--layer-weights)");
  if (!(file.stats == mine.stats))
    fail(name, ": saved with attention statistics (", describe_stats(file.stats), "); this session keeps (",
         describe_stats(mine.stats), ")");
}

// Fails unless every head of the state fits the session's cache and context.
void check_fits(const Session& s, const kv::SessionState& st, std::string_view name) {
  if (st.n_past > s.n_ctx())
    fail(name, ": the state holds ", st.n_past, " positions, this session's context is ", s.n_ctx(), " (raise -c)");
  const int n_vocab = s.model().config().n_vocab;
  for (int32_t t : st.tokens)
    if (t >= n_vocab) fail(name, ": token id ", t, " is outside the vocabulary (", n_vocab, ")");
  const kv::Cache& cache = s.cache();
  for (int l = 0; l < st.config.n_layers; ++l)
    for (int h = 0; h < st.config.n_kv_heads; ++h) {
      const int n = st.heads[static_cast<size_t>(l) * st.config.n_kv_heads + h].n();
      if (n > cache.capacity(l))
        fail(name, ": layer ", l, " head ", h, " holds ", n, " tokens, this session's cache only ", cache.capacity(l),
             " (a different -c or -b?)");
    }
  if (!st.policy_state.empty() && !s.compressor()) fail(name, ": the state has a policy state, this session no policy");
  const int n_heads = s.model().config().n_heads;
  for (const kv::QueryMoments& m : st.query_moments)
    if (m.n_heads != 0 && m.n_heads != n_heads)
      fail(name, ": query moments of ", m.n_heads, " heads; this model has ", n_heads);
}

template <typename T, typename Storage>  // Storage: a vector or a span of the cache's storage
void copy_into(const std::vector<T>& from, Storage& to) {
  std::copy(from.begin(), from.end(), to.begin());
}

}  // namespace

std::string model_fingerprint(const Model& model) {
  Fnv1a64 h;
  const gguf::File& f = model.file();
  h.add_u64(f.metadata().size());
  for (const auto& [key, value] : f.metadata()) {
    h.add(key);
    hash_value(h, value);
  }
  h.add_u64(f.tensors().size());
  for (const gguf::TensorInfo& t : f.tensors()) {
    h.add(t.name);
    h.add_u64(static_cast<uint64_t>(t.type));
    h.add_u64(t.ne.size());
    for (int64_t d : t.ne) h.add_u64(static_cast<uint64_t>(d));
    h.add_u64(t.offset);
  }
  return hex64(h.value());
}

kv::StateConfig state_config(const Session& s, const std::string& fingerprint) {
  const ModelConfig& mc = s.model().config();
  const kv::Cache& cache = s.cache();
  kv::StateConfig c;
  c.model_fingerprint = fingerprint;
  c.model_shape = mc.fingerprint();
  c.n_layers = cache.shape().n_layers;
  c.n_kv_heads = cache.shape().n_kv_heads;
  c.head_dim = cache.shape().head_dim;
  c.type_k = cache.types().k;
  c.type_v = cache.types().v;
  c.stats = cache.stats();
  if (const kv::Compressor* comp = s.compressor()) {
    const kv::CompressionConfig& cc = comp->config();
    const kv::PolicyOptions& po = comp->options();
    c.policy = std::string(comp->policy().name());
    c.budget = cc.budget;
    c.window = cc.window;
    c.evict_every = cc.evict_every;
    c.ratio = cc.prefill_ratio;
    c.skip_layers = cc.skip_layers;
    c.seed = po.seed;
    c.n_sink = po.n_sink;
    c.snapkv_window = po.snapkv_window;
    c.snapkv_kernel = po.snapkv_kernel;
    c.filters_hash = filters_hash(c.policy, po);
    c.layer_weights = cc.layer_weights;
  }
  return c;
}

KvOptions kv_options_for_state(const kv::StateConfig& c, KvOptions kv, Engine& engine, std::string_view name) {
  const std::vector<float> base_weights = engine.layer_weights(kv);  // before the filter file may be dropped
  kv.policy = c.policy;
  if (c.policy == "none") {  // a full cache, as a request's "kv_policy": "none" spells it
    kv.budget = 0;
    kv.ratio = 0;
  } else {
    kv.budget = c.budget;
    kv.window = c.window;
    kv.evict_every = c.evict_every;
    kv.ratio = c.ratio;
    kv.skip_layers = c.skip_layers;
    kv.seed = c.seed;
  }
  if (c.filters_hash.empty()) {
    kv.filters.clear();
    kv.filter_layout.clear();
    kv.filter_sign.clear();
  } else if (kv.filters.empty()) {
    fail(name, ": saved with Q-Filters (", c.filters_hash, "); start with the same --filters");
  }
  // `base`'s spelling ("spread") where it gives the state's weights, else the numbers themselves.
  if (base_weights != c.layer_weights || (kv.layer_weights == "spread" && kv.filters.empty()))
    kv.layer_weights = format_layer_weights(c.layer_weights);
  ModelOptions types = engine.options();
  if (!kv.cache_type_k.empty()) types.cache_type_k = kv.cache_type_k;
  if (!kv.cache_type_v.empty()) types.cache_type_v = kv.cache_type_v;
  const kv::KvTypes mine = kv_types(types);
  if (mine.k != c.type_k) kv.cache_type_k = std::string(kv::kv_type_name(c.type_k));
  if (mine.v != c.type_v) kv.cache_type_v = std::string(kv::kv_type_name(c.type_v));
  return kv;
}

kv::SessionState capture_state(const Session& s, const std::string& fingerprint, std::span<const int32_t> tokens) {
  if (!tokens.empty() && tokens.size() != static_cast<size_t>(s.n_past()))
    fail("save state: ", tokens.size(), " tokens given for a session at position ", s.n_past());
  kv::SessionState st;
  st.config = state_config(s, fingerprint);
  st.n_past = s.n_past();
  st.prompt_end = s.prompt_end();
  const kv::Cache& cache = s.cache();
  st.queries_seen = cache.queries_seen;
  if (const kv::Compressor* comp = s.compressor()) {
    st.evicted = comp->stats().evicted;
    st.evictions = comp->stats().evictions;
    st.policy_state = comp->policy().save_state();
  }
  st.tokens.assign(tokens.begin(), tokens.end());
  for (int l = 0; l < st.config.n_layers; ++l)
    for (int h = 0; h < st.config.n_kv_heads; ++h) {
      const kv::HeadCache& hc = cache.head(l, h);
      kv::HeadState hs;
      hs.k.assign(hc.k.begin(), hc.k.begin() + static_cast<size_t>(hc.n) * hc.k_row_bytes);
      hs.v.assign(hc.v.begin(), hc.v.begin() + static_cast<size_t>(hc.n) * hc.v_row_bytes);
      hs.pos.assign(hc.pos.begin(), hc.pos.begin() + hc.n);
      if (!hc.attn_sum.empty()) hs.attn_sum.assign(hc.attn_sum.begin(), hc.attn_sum.begin() + hc.n);
      if (!hc.attn_cnt.empty()) hs.attn_cnt.assign(hc.attn_cnt.begin(), hc.attn_cnt.begin() + hc.n);
      if (!hc.attn_last.empty()) hs.attn_last.assign(hc.attn_last.begin(), hc.attn_last.begin() + hc.n);
      if (!hc.key_score.empty()) hs.key_score.assign(hc.key_score.begin(), hc.key_score.begin() + hc.n);
      st.heads.push_back(std::move(hs));
    }
  if (st.config.stats.query_moments || st.config.stats.query_recent > 0) st.query_moments = cache.query_moments;
  return st;
}

void restore_state(Session& s, const kv::SessionState& st, const std::string& fingerprint, std::string_view name) {
  check_config(st.config, state_config(s, fingerprint), name);
  check_fits(s, st, name);
  // The one step that can still fail changes nothing when it does; everything after it cannot fail.
  if (kv::Compressor* comp = s.compressor()) {
    try {
      comp->policy().load_state(st.policy_state);
    } catch (const Error& e) {
      fail(name, ": ", e.what());
    }
    comp->set_eviction_counts(st.evicted, st.evictions);
  }
  kv::Cache& cache = s.cache();
  for (int l = 0; l < st.config.n_layers; ++l)
    for (int h = 0; h < st.config.n_kv_heads; ++h) {
      const kv::HeadState& hs = st.heads[static_cast<size_t>(l) * st.config.n_kv_heads + h];
      kv::HeadCache& hc = cache.head(l, h);
      copy_into(hs.k, hc.k);
      copy_into(hs.v, hc.v);
      copy_into(hs.pos, hc.pos);
      copy_into(hs.attn_sum, hc.attn_sum);
      copy_into(hs.attn_cnt, hc.attn_cnt);
      copy_into(hs.attn_last, hc.attn_last);
      copy_into(hs.key_score, hc.key_score);
      hc.n = hs.n();
    }
  if (st.config.stats.query_moments || st.config.stats.query_recent > 0) cache.query_moments = st.query_moments;
  cache.queries_seen = st.queries_seen;
  s.restore_position(st.n_past, st.prompt_end);
}

size_t save_state_file(const std::string& path, const Session& s, const std::string& fingerprint,
                       std::span<const int32_t> tokens) {
  const std::vector<uint8_t> bytes = kv::encode_state(capture_state(s, fingerprint, tokens));
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write the state file ", path);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::error_code ignored;
      std::filesystem::remove(tmp, ignored);
      fail("cannot write the state file ", path, " (disk full?)");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    fail("cannot write the state file ", path, ": ", ec.message());
  }
  return bytes.size();
}

kv::SessionState load_state_file(const std::string& path, Session& s, const std::string& fingerprint) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail(path, ": no such state file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot read the state file");
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail(path, ": cannot read the state file");
  kv::SessionState st = kv::decode_state(bytes, path);
  restore_state(s, st, fingerprint, path);
  return st;
}

}  // namespace qf::runtime
