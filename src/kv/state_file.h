// The state file of one session ("compress once, ask many"): everything that decides the logits
// of whatever the session reads next, so that restoring and continuing gives bit-identical logits
// to never having saved. Per (layer, KV head): the kept keys and values in their storage type,
// their positions and the attention statistics the policy keeps; per session: its position, the
// tokens it has read (for prompt reuse and the samplers' penalties), the policy's own state (the
// random policy's generator); and a header that pins what the state is only valid for: the model
// (a fingerprint of its architecture, tensor table and tokenizer), the KV storage types and
// shapes, the policy and its parameters.
//
// Layout (little-endian), version 4 (version 3, still read, had no per-layer budget weights;
// version 2, still read, no recent queries either; version 1 no key scores):
//   [0, 8)   magic "QFKVSTAT"
//   [8, 12)  u32 version
//   [12, 16) u32 reserved (0)
//   [16, 24) u64 body bytes (the file is exactly 32 + this long)
//   [24, 28) u32 CRC-32 of the body
//   [28, 32) u32 reserved (0)
//   body: the SessionState fields in declaration order (strings and arrays length-prefixed),
//         the config's layer weights as a u64 count (0: uniform budgets, else n_layers) and floats,
//         then every head's n, keys, values, positions and kept statistics (attention sums,
//         counts, last-query attention, key scores: the ones config.stats names), then (when the
//         statistics include query moments or recent queries) per layer: n_heads, head_dim, count,
//         the sums and outer sums (query moments), the recent queries, length-prefixed (a
//         recent-query horizon).
//
// This file only reads and writes the format and checks that a file is consistent in itself;
// runtime/session_state.h matches a state to a session and restores it.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kv/cache.h"

namespace qf::kv {

// What a state is valid for: a session restores it only when all of this matches its own.
struct StateConfig {
  std::string model_fingerprint;  // runtime::model_fingerprint(): architecture, tensor table, tokenizer
  std::string model_shape;        // ModelConfig::fingerprint(), e.g. "llama:L30:H9:KV3:D64:E576:V49152"
  int n_layers = 0, n_kv_heads = 0, head_dim = 0;
  KvType type_k = KvType::F32, type_v = KvType::F32;
  std::string policy = "none";    // "none": a full cache; the fields below are then 0
  int budget = 0, window = 0, evict_every = 0;
  float ratio = 0.0f;
  int skip_layers = 0;
  uint64_t seed = 0;
  int n_sink = 0, snapkv_window = 0, snapkv_kernel = 0;
  std::string filters_hash;       // hash of what eviction reads from the filter file ("" without one)
  AttentionStats stats;           // the statistics the cache keeps per slot
  std::vector<float> layer_weights;  // CompressionConfig::layer_weights (empty: uniform budgets)

  bool operator==(const StateConfig&) const = default;
};

// One (layer, KV head): slots [0, n) as the cache holds them.
struct HeadState {
  std::vector<uint8_t> k, v;       // n rows of the key / value row bytes
  std::vector<int32_t> pos;        // n positions, increasing
  std::vector<float> attn_sum;     // n, when config.stats keeps them (else empty)
  std::vector<int32_t> attn_cnt;
  std::vector<float> attn_last;
  std::vector<float> key_score;    // n, when config.stats.key_scores (qfilters, knorm)
  int n() const { return static_cast<int>(pos.size()); }
};

struct SessionState {
  uint32_t version = 4;            // of the file it was read from; encode_state writes it back
  StateConfig config;
  int n_past = 0;                  // positions read so far
  int prompt_end = 0;              // where the last prompt ended (snapkv's observation window)
  int64_t queries_seen = 0;        // Cache::queries_seen
  int64_t evicted = 0, evictions = 0;  // the compressor's counters, so reports continue
  std::vector<int32_t> tokens;     // the tokens read: n_past of them, or none if not tracked
  std::string policy_state;        // Policy::save_state()
  std::vector<HeadState> heads;    // [layer * n_kv_heads + kv_head]
  std::vector<QueryMoments> query_moments;  // per layer, when config.stats.query_moments or query_recent (else empty)
};

inline constexpr char kStateMagic[8] = {'Q', 'F', 'K', 'V', 'S', 'T', 'A', 'T'};
inline constexpr uint32_t kStateVersion = 4;  // = SessionState{}.version
inline constexpr uint32_t kOldestStateVersion = 2;  // read as recent-query horizon 0
inline constexpr size_t kStatePrefixBytes = 32;

std::vector<uint8_t> encode_state(const SessionState& s);

// Parses and checks a state file's bytes; `name` (the path) starts every error message.
// Throws qf::Error for a file that is not a state file, of another version, truncated,
// corrupt (checksum) or inconsistent in itself (counts, positions, shapes).
SessionState decode_state(std::span<const uint8_t> bytes, std::string_view name);

}  // namespace qf::kv
