#include "runtime/layer_weights.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "util/error.h"

namespace qf::runtime {

std::vector<float> parse_layer_weights(const std::string& spec, const calib::Filters* stats) {
  if (spec.empty()) return {};
  if (spec == "spread") {
    if (!stats || !stats->has_query_stats())
      fail("--layer-weights spread needs --filters with query statistics (qf calibrate --stats-rank N)");
    return calib::query_spread(*stats);
  }
  std::vector<float> w;
  for (size_t at = 0; at <= spec.size();) {
    const size_t comma = std::min(spec.find(',', at), spec.size());
    const std::string item = spec.substr(at, comma - at);
    char* end = nullptr;
    const float v = std::strtof(item.c_str(), &end);
    if (item.empty() || end != item.c_str() + item.size())
      fail("--layer-weights: '", item, "' is not a number (give 'spread' or comma-separated weights)");
    w.push_back(v);
    at = comma + 1;
  }
  return w;
}

std::string format_layer_weights(const std::vector<float>& weights) {
  std::string spec;
  char buf[32];
  for (float w : weights) {
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(w));  // 9 digits: a float reads back exactly
    if (!spec.empty()) spec += ',';
    spec += buf;
  }
  return spec;
}

}  // namespace qf::runtime
