// Options and set-up shared by the qf subcommands.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "model/model.h"
#include "model/session.h"
#include "runtime/engine.h"
#include "sample/sampler.h"

namespace qf::cli {

using runtime::KvOptions;
using runtime::ModelOptions;
using runtime::kv_summary;
using runtime::kv_types;

// Sampling flags as llama.cpp names them; seed -1 (the default) draws a random seed.
struct SamplingFlags {
  SamplerOptions options;
  int64_t seed = -1;
  // The options with the seed resolved (a random one for -1).
  SamplerOptions resolve() const;
};

// --layer-weights (qf eval and every subcommand with --kv-budget).
inline constexpr const char* kLayerWeightsHelp =
    "per-layer budgets at equal total: 'spread' (from the --filters file's query statistics: how much each "
    "layer's queries vary; more needles found at the same memory, docs/results.md section 5) or one positive "
    "weight per layer, comma-separated; compressed layer l keeps w_l / mean(w over the compressed layers) times "
    "the uniform budget (or kept prefill tokens)";

void add_model_options(CLI::App* app, ModelOptions& o, bool model_required = true);
// argv with llama.cpp's several-letter one-dash flags (-ctk, -ctv, -np), which CLI11 would read
// as bundled one-letter flags, spelled out as their long names.
std::vector<std::string> spell_out_llama_flags(int argc, char** argv);
void add_kv_options(CLI::App* app, KvOptions& o);
// --future-positions, --filter-blend, --filter-horizon, --filter-decay (also qf eval's).
void add_query_stats_options(CLI::App* app, runtime::QueryStatsOptions& o, const std::string& group);
void add_sampling_options(CLI::App* app, SamplingFlags& o);

// A runtime with the one session a subcommand runs (declared last: destroyed first, since it
// borrows the runtime's thread pool).
struct Engine {
  std::unique_ptr<runtime::Engine> runtime;
  const Model* model = nullptr;
  std::unique_ptr<Session> session;
};

// Loads the model and builds a session with the requested KV policy. Throws qf::Error.
Engine make_engine(const ModelOptions& mo, const KvOptions& ko);

// Peak resident set size of this process, in MiB.
double peak_rss_mib();

}  // namespace qf::cli
