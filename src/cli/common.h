// Options and set-up shared by the qf subcommands.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "kv/compressor.h"
#include "model/model.h"
#include "model/session.h"

namespace qf::cli {

struct ModelOptions {
  std::string model;
  int n_ctx = 0;
  int n_threads = 0;
  int n_batch = 256;
  std::string cache_type_k = "f16";  // KV storage types, llama.cpp's -ctk / -ctv (and default);
                                     // a subcommand may change the default before add_model_options
  std::string cache_type_v = "f16";
};

// The parsed -ctk / -ctv types. Throws qf::Error for an unknown name.
kv::KvTypes kv_types(const ModelOptions& o);

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

void add_model_options(CLI::App* app, ModelOptions& o, bool model_required = true);
// argv with llama.cpp's several-letter one-dash flags (-ctk, -ctv), which CLI11 would read as
// bundled one-letter flags, spelled out as their long names.
std::vector<std::string> spell_out_llama_flags(int argc, char** argv);
void add_kv_options(CLI::App* app, KvOptions& o);

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

// One line describing the KV cache's state: storage types and bytes per token per layer, bytes
// in use vs a full cache, evictions, time.
std::string kv_summary(const Session& s);

// Peak resident set size of this process, in MiB.
double peak_rss_mib();

}  // namespace qf::cli
