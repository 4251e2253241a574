// Options and set-up shared by the qf subcommands.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "model/model.h"
#include "model/session.h"
#include "sample/sampler.h"

namespace qf::cli {

struct ModelOptions {
  std::string model;
  int n_ctx = 0;
  int n_threads = 0;
  int n_batch = 256;
};

struct KvOptions {
  std::string policy = "none";
  std::string filters;
  std::string filter_layout;  // "" = as the file says; gguf | hf for files not made by qf calibrate
  std::string filter_sign;    // "" = as the file says; keep_largest_dot | keep_smallest_dot
  int budget = 0;
  int window = 0;
  int evict_every = 1;
  float ratio = 0.0f;
  int skip_layers = 0;
  uint64_t seed = 0;
};

// Sampling flags as llama.cpp names them; seed -1 (the default) draws a random seed.
struct SamplingFlags {
  SamplerOptions options;
  int64_t seed = -1;
  // The options with the seed resolved (a random one for -1).
  SamplerOptions resolve() const;
};

void add_model_options(CLI::App* app, ModelOptions& o, bool model_required = true);
void add_kv_options(CLI::App* app, KvOptions& o);
void add_sampling_options(CLI::App* app, SamplingFlags& o);

// Holds what a compressor points into (the filters) for as long as the session lives.
struct Engine {
  std::unique_ptr<Model> model;
  std::vector<float> filters;
  std::unique_ptr<Session> session;
};

// Loads the model and builds a session with the requested KV policy. Throws qf::Error.
Engine make_engine(const ModelOptions& mo, const KvOptions& ko);
std::unique_ptr<Session> make_session(const Model& model, const ModelOptions& mo, const KvOptions& ko,
                                      std::vector<float>& filters_storage);

// One line describing the KV cache's state: bytes in use vs a full cache, evictions, time.
std::string kv_summary(const Session& s);

// Peak resident set size of this process, in MiB.
double peak_rss_mib();

}  // namespace qf::cli
