// --layer-weights specs (per-layer KV budgets at equal total memory), apart from the engine so
// that the server's request parser (and its fuzz harness) can use them without the model code.
#pragma once
#include <string>
#include <vector>

#include "calib/filters.h"

namespace qf::runtime {

// The weights a --layer-weights spec names: {} for "" (uniform), calib::query_spread(*stats) for
// "spread" (stats: the filter file, null without one), else the comma-separated numbers. Throws a
// one-line qf::Error for a malformed number or "spread" without query statistics; the count and
// signs are checked by kv::CompressionConfig::validate.
std::vector<float> parse_layer_weights(const std::string& spec, const calib::Filters* stats);
// The spec of explicit weights that parse_layer_weights reads back exactly ("" for none).
std::string format_layer_weights(const std::vector<float>& weights);

}  // namespace qf::runtime
