// The runtime every front end shares (qf's subcommands, the server, later the Python package):
// options as plain structs, one loaded model, one thread pool for the whole process, and the one
// builder that turns KV options into a session with its compressor.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "calib/filters.h"
#include "runtime/layer_weights.h"
#include "model/model.h"
#include "kv/cache.h"
#include "kv/policy.h"
#include "model/session.h"
#include "tensor/threadpool.h"

namespace qf::runtime {

struct ModelOptions {
  std::string model;  // GGUF path
  int n_ctx = 0;      // 0 = the model's training context
  int n_threads = 0;  // 0 = all cores
  int n_batch = 256;  // prompt tokens per forward chunk
  // Storage types of every session's cached keys and values (llama.cpp's -ctk / -ctv and their
  // default, f16); a subcommand may change the default before registering its flags.
  std::string cache_type_k = "f16";
  std::string cache_type_v = "f16";
};

// The parsed cache types. Throws qf::Error naming the accepted ones for an unknown name.
kv::KvTypes kv_types(const ModelOptions& o);

// Settings of the policies that score with calibrated query statistics (kv::PolicyOptions; qf
// eval, every subcommand with --kv-policy, the server's per-request fields and Python alike).
struct QueryStatsOptions {
  int future_positions = kv::PolicyOptions{}.query_future_positions;  // also expected_attention's
  float filter_blend = kv::PolicyOptions{}.filter_blend;              // qfilters_adaptive, qfilters_max
  int filter_horizon = kv::PolicyOptions{}.filter_horizon;            // qfilters_adaptive, qfilters_max
  float filter_decay = kv::PolicyOptions{}.filter_decay;              // qfilters_max; infinity: no memory

  void apply(kv::PolicyOptions& po) const;
  bool operator==(const QueryStatsOptions&) const = default;
};

// The KV cache of one session: policy and its settings (see kv::CompressionConfig).
struct KvOptions {
  std::string policy = "none";
  std::string filters;        // Q-Filters file
  std::string filter_layout;  // "" = as the file says; gguf | hf for files not made by qf calibrate
  std::string filter_sign;    // "" = as the file says; keep_largest_dot | keep_smallest_dot
  int budget = 0;
  int window = 0;
  int evict_every = 1;
  float ratio = 0.0f;
  int skip_layers = 0;
  // Per-layer budgets at equal total (kv::CompressionConfig::layer_weights): "" = uniform, "spread"
  // (calib::query_spread of the --filters file) or one weight per layer, comma-separated.
  std::string layer_weights;
  uint64_t seed = 0;
  // At the end of the context: "keep" counting positions, or "shift" them (see PositionMode).
  std::string positions = "keep";
  // Storage types of this session's keys and values; "" = the engine's (-ctk / -ctv).
  std::string cache_type_k;
  std::string cache_type_v;
  QueryStatsOptions query_stats;

  bool operator==(const KvOptions&) const = default;
};

// A model, the thread pool its sessions share, and the filter files loaded for them (each once).
// Sessions made here borrow the pool: run them from one thread at a time.
class Engine {
 public:
  // Loads and validates the model; throws qf::Error.
  explicit Engine(const ModelOptions& options);
  ~Engine();

  const Model& model() const { return *model_; }
  ThreadPool& pool() { return *pool_; }
  const ModelOptions& options() const { return options_; }
  int n_ctx() const;  // sessions' context: -c, or the model's training context

  // A session with the given KV cache; n_ctx 0 = options().n_ctx. Throws qf::Error on
  // inconsistent KV options (the messages name the CLI flags).
  std::unique_ptr<Session> new_session(const KvOptions& kv, int n_ctx = 0);

  // Bytes of keys and values a session with these options reserves, plus what its policy keeps
  // per slot (Policy::state_bytes_per_slot): what admission control charges for it, without
  // building one.
  int64_t session_kv_bytes(const KvOptions& kv, int n_ctx = 0);

  // The per-layer weights kv.layer_weights names (loading the filter file for "spread").
  std::vector<float> layer_weights(const KvOptions& kv);

 private:
  std::unique_ptr<kv::Compressor> make_compressor(const KvOptions& kv);
  kv::KvTypes session_kv_types(const KvOptions& kv) const;
  // The filters and, when the file has them, the query statistics (qfilters_rope, ea_calibrated).
  const calib::Filters& filters(const KvOptions& kv);

  ModelOptions options_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ThreadPool> pool_;
  std::map<std::string, calib::Filters> filters_;  // by file and layout/sign; never erased
};

// One line describing the KV cache's state: bytes in use vs a full cache, evictions, time.
std::string kv_summary(const Session& s);

}  // namespace qf::runtime
