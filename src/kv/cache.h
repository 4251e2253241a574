// Per-head KV cache. Every (layer, KV head) keeps its own set of tokens, because after eviction
// the heads of one layer disagree on which tokens matter. Keys are stored after the rotary
// embedding, so evicting never re-rotates anything and positions keep counting up.
//
// Storage for each head is allocated once, at construction, for `capacity` tokens; appends and
// evictions move data inside it. With a budget the resident memory is therefore flat however
// long a generation runs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qf::kv {

// Attention statistics a policy may need, kept per cached token only when asked for.
struct AttentionStats {
  bool accumulate = false;  // h2o: sum of attention received + number of queries that saw it
  bool last_query = false;  // tova: attention from the most recent query
  int window = 0;           // snapkv: attention summed over an observation window (prefill: the
                            // last `window` queries; the Compressor restarts it after each round)
};

struct HeadCache {
  int n = 0;                     // tokens held, slots [0, n), in increasing position order
  std::vector<float> k, v;       // capacity * head_dim each
  std::vector<int32_t> pos;      // position of each slot
  std::vector<float> attn_sum;   // AttentionStats::accumulate (and window for snapkv)
  std::vector<int32_t> attn_cnt; // queries that saw the slot (accumulate)
  std::vector<float> attn_last;  // AttentionStats::last_query

  const float* key(int slot, int head_dim) const { return k.data() + static_cast<size_t>(slot) * head_dim; }
  const float* value(int slot, int head_dim) const { return v.data() + static_cast<size_t>(slot) * head_dim; }
};

struct CacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
};

class Cache {
 public:
  // capacity[l]: tokens each head of layer l can hold at once.
  Cache(CacheShape shape, std::vector<int> capacity, AttentionStats stats = {});

  const CacheShape& shape() const { return shape_; }
  const AttentionStats& stats() const { return stats_; }
  int capacity(int layer) const { return capacity_[layer]; }
  HeadCache& head(int layer, int kv_head) { return heads_[index(layer, kv_head)]; }
  const HeadCache& head(int layer, int kv_head) const { return heads_[index(layer, kv_head)]; }

  // Appends n_tok tokens to every head of `layer`. k, v: [n_tok][n_kv_heads][head_dim].
  // Throws qf::Error if a head would overflow its capacity.
  void append(int layer, const float* k, const float* v, const int32_t* pos, int n_tok);

  // Keeps only the slots listed in `keep` (sorted ascending) of one head, compacting in place.
  void retain(int layer, int kv_head, std::span<const int> keep);

  // Empties every head (new sequence); memory stays allocated.
  void clear();

  // Number of slots in use over all heads, and the bytes their keys and values take.
  int64_t tokens_held() const;
  int64_t bytes_used() const;
  // Bytes reserved for keys and values (what the process actually holds).
  int64_t bytes_reserved() const;
  // Bytes a full, uncompressed cache would need for n_tokens tokens.
  int64_t full_cache_bytes(int64_t n_tokens) const;
  // Bytes one token's key and value take in one head.
  static int64_t bytes_per_token_head(int head_dim) { return 2 * static_cast<int64_t>(head_dim) * sizeof(float); }

  // Total queries seen (for the accumulate statistics' normaliser).
  int64_t queries_seen = 0;

 private:
  size_t index(int layer, int kv_head) const { return static_cast<size_t>(layer) * shape_.n_kv_heads + kv_head; }

  CacheShape shape_;
  std::vector<int> capacity_;
  AttentionStats stats_;
  std::vector<HeadCache> heads_;
};

}  // namespace qf::kv
