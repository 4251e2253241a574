#include <string>
#include <utility>

#include "kv/policies/policies.h"
#include "util/error.h"

namespace qf::kv {

namespace {
using Factory = std::unique_ptr<Policy> (*)(const PolicyOptions&);
constexpr std::pair<std::string_view, Factory> kPolicies[] = {
    {"qfilters", policies::make_qfilters}, {"knorm", policies::make_knorm},
    {"streaming", policies::make_streaming}, {"random", policies::make_random},
    {"snapkv", policies::make_snapkv}, {"tova", policies::make_tova},
    {"h2o", policies::make_h2o},           {"expected_attention", policies::make_expected_attention},
    {"keydiff", policies::make_keydiff},
};
// They need a filter file with query statistics, which older files and the default sweeps lack.
constexpr std::pair<std::string_view, Factory> kQueryStatsPolicies[] = {
    {"qfilters_rope", policies::make_qfilters_rope},
    {"ea_calibrated", policies::make_ea_calibrated},
    {"qfilters_adaptive", policies::make_qfilters_adaptive},
    {"qfilters_max", policies::make_qfilters_max},
};
}  // namespace

std::vector<std::string> policy_names() {
  std::vector<std::string> names{"none"};
  for (const auto& [name, factory] : kPolicies) names.emplace_back(name);
  return names;
}

std::vector<std::string> query_stats_policy_names() {
  std::vector<std::string> names;
  for (const auto& [name, factory] : kQueryStatsPolicies) names.emplace_back(name);
  return names;
}

std::unique_ptr<Policy> make_policy(std::string_view name, const PolicyOptions& options) {
  if (name == "none") fail("KV policy 'none' is the uncompressed cache: it has no eviction policy object");
  if (name.size() > kLayerSuffix.size() && name.ends_with(kLayerSuffix)) {
    const std::string_view base = name.substr(0, name.size() - kLayerSuffix.size());
    if (base == "none" || base.ends_with(kLayerSuffix)) fail("KV policy '", name, "' has no layer-consistent variant");
    return policies::make_layer_consistent(make_policy(base, options));
  }
  for (const auto& [n, factory] : kPolicies)
    if (n == name) return factory(options);
  for (const auto& [n, factory] : kQueryStatsPolicies)
    if (n == name) return factory(options);
  std::string known;
  for (const auto& n : policy_names()) known += (known.empty() ? "" : ", ") + n;
  for (const auto& n : query_stats_policy_names()) known += ", " + n;
  fail("unknown KV policy '", name, "' (known: ", known, ")");
}

bool is_policy_name(std::string_view name) {
  if (name == "none") return true;
  const std::string_view base = base_policy_name(name);
  if (base == "none" || base.ends_with(kLayerSuffix)) return false;
  for (const auto& [n, factory] : kPolicies)
    if (n == base) return true;
  for (const auto& [n, factory] : kQueryStatsPolicies)
    if (n == base) return true;
  return false;
}

std::string_view base_policy_name(std::string_view name) {
  if (name.size() > kLayerSuffix.size() && name.ends_with(kLayerSuffix)) name.remove_suffix(kLayerSuffix.size());
  return name;
}

void Policy::score_layer(const Cache& cache, int layer, std::vector<std::vector<float>>& scores) {
  scores.resize(cache.shape().n_kv_heads);
  for (int h = 0; h < cache.shape().n_kv_heads; ++h) {
    scores[h].resize(cache.head(layer, h).n);
    score_head(cache, layer, h, scores[h]);
  }
}

void Policy::load_state(std::string_view state) {
  if (!state.empty()) fail("KV policy ", name(), " keeps no state, yet a state of ", state.size(), " bytes was given");
}

}  // namespace qf::kv
