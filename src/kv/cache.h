// Per-head KV cache. Every (layer, KV head) keeps its own set of tokens, because after eviction
// the heads of one layer disagree on which tokens matter. Keys are stored after the rotary
// embedding, so evicting never re-rotates anything and positions keep counting up.
//
// Storage for every head is allocated once, at construction, for `capacity` tokens, in one
// buffer of 2 MiB pages (util/huge_pages.h: decode streams every kept key and value, and a
// batched step does so for every session, so the page size bounds its speed); appends and
// evictions move data inside it. With a budget the resident memory is therefore flat however
// long a generation runs.
//
// Storage type (the one place it lives): keys and values each have a KvType, llama.cpp's names
// (f32, f16, bf16, q8_0, q4_0) and ggml's block layouts. A token's head_dim values form one row
// of whole blocks, so eviction still moves or drops single tokens. Everything that reads the
// cache (attention, policies, evaluation) goes through HeadCache::keys()/values(), a KvRows view.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kv/query_moments.h"
#include "tensor/attention_kernel.h"
#include "tensor/types.h"
#include "util/huge_pages.h"

namespace qf::kv {

// A KV storage type is one of the ggml types kv_types() lists.
using KvType = GgmlType;

struct KvTypes {
  KvType k = KvType::F32;  // the library default keeps F32 (exact); the CLI defaults to f16
  KvType v = KvType::F32;
};

// The types a cache can store, in llama.cpp's order of -ctk/-ctv names.
std::span<const KvType> kv_types();
// "f32", "f16", "bf16", "q8_0", "q4_0". Throws qf::Error naming the accepted ones otherwise.
KvType parse_kv_type(std::string_view name);
std::string_view kv_type_name(KvType t);
// Bytes of one token's head_dim values; throws qf::Error when the type is not a KV type or
// head_dim is not a whole number of its blocks.
size_t kv_row_bytes(KvType t, int head_dim);

// Stores / reads back one row of head_dim values (ggml's rounding for the quantized types).
// kv_dequantize_row is the scalar path (tests, references); kernels use dequantize_kv_rows.
void kv_quantize_row(KvType t, const float* x, int head_dim, uint8_t* row);
void kv_dequantize_row(KvType t, const uint8_t* row, int head_dim, float* x);

// Attention statistics a policy may need, kept per cached token only when asked for.
struct AttentionStats {
  bool accumulate = false;  // h2o: sum of attention received + number of queries that saw it
  bool last_query = false;  // tova: attention from the most recent query
  int window = 0;           // snapkv: attention summed over an observation window (prefill: the
                            // last `window` queries; the Compressor restarts it after each round)
  bool query_moments = false;  // expected_attention: mean and covariance of the queries before the
                               // rotary embedding (Cache::query_moments; no attention weights)
  int query_recent = 0;        // qfilters_adaptive: the decayed sum of the recent unit queries over this
                               // horizon in tokens (QueryMoments::recent; without query_moments, no sums)
  bool key_scores = false;  // qfilters, knorm: each slot's score, computed once from the model's F32
                            // key as it is appended (Cache::set_key_scorer), so eviction does not
                            // depend on the storage type's rounding and no kept key is rescanned
  bool operator==(const AttentionStats&) const = default;
};

struct HeadCache {
  int n = 0;                     // tokens held, slots [0, n), in increasing position order
  std::span<uint8_t> k, v;       // capacity rows of k_row_bytes / v_row_bytes each, in the Cache's storage
  KvType k_type = KvType::F32, v_type = KvType::F32;
  size_t k_row_bytes = 0, v_row_bytes = 0;
  std::vector<int32_t> pos;      // position of each slot
  std::vector<float> attn_sum;   // AttentionStats::accumulate (and window for snapkv)
  std::vector<int32_t> attn_cnt; // queries that saw the slot (accumulate)
  std::vector<float> attn_last;  // AttentionStats::last_query
  std::vector<float> key_score;  // AttentionStats::key_scores

  KvRows keys() const { return {k_type, k.data(), k_row_bytes}; }
  KvRows values() const { return {v_type, v.data(), v_row_bytes}; }
};

// Slots [0, n) of a head's keys / values as floats, n rows of head_dim (scalar conversion, the
// kernels' SIMD one is not involved): for references, tests and diagnostics.
std::vector<float> keys_f32(const HeadCache& hc, int head_dim);
std::vector<float> values_f32(const HeadCache& hc, int head_dim);

// Scores one token of one head from its key as the model computed it (F32, after the rotary
// embedding, before the storage type rounds it): Policy::score_key for the policies whose score
// depends only on the token itself.
using KeyScorer = std::function<float(int layer, int kv_head, const float* key, int32_t pos)>;

struct CacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
};

class Cache {
 public:
  // capacity[l]: tokens each head of layer l can hold at once.
  Cache(CacheShape shape, std::vector<int> capacity, AttentionStats stats = {}, KvTypes types = {});

  const CacheShape& shape() const { return shape_; }
  const AttentionStats& stats() const { return stats_; }
  const KvTypes& types() const { return types_; }
  int capacity(int layer) const { return capacity_[layer]; }
  HeadCache& head(int layer, int kv_head) { return heads_[index(layer, kv_head)]; }
  const HeadCache& head(int layer, int kv_head) const { return heads_[index(layer, kv_head)]; }

  // The scorer that fills HeadCache::key_score as tokens are appended or shifted; a cache that
  // keeps key scores (AttentionStats::key_scores) refuses both without one.
  void set_key_scorer(KeyScorer scorer) { key_scorer_ = std::move(scorer); }
  const KeyScorer& key_scorer() const { return key_scorer_; }

  // Appends n_tok tokens to every head of `layer`, converted to the storage types (and scored
  // from the F32 keys when the cache keeps key scores).
  // k, v: [n_tok][n_kv_heads][head_dim]. Throws qf::Error if a head would overflow its capacity.
  void append(int layer, const float* k, const float* v, const int32_t* pos, int n_tok);

  // Keeps only the slots listed in `keep` (sorted ascending) of one head, compacting in place.
  void retain(int layer, int kv_head, std::span<const int> keep);

  // Context shift of one head: forgets the slots at positions [keep, keep + delta) and moves the
  // later ones back by delta: their positions, and their keys through `rotate_back`, which turns
  // n rows of head_dim floats by -delta positions (keys are stored rotated). Quantized keys are
  // dequantized, rotated and stored again, and their key scores recomputed from the rotated rows
  // (the dequantized ones: the F32 keys are gone). Positions below `keep` stay as they are.
  void shift(int layer, int kv_head, int32_t keep, int32_t delta,
             const std::function<void(float* rows, int n)>& rotate_back);

  // Recomputes one head's key scores from its stored keys (rounded to the storage type, so they
  // may differ from scores of the F32 keys): for a cache filled by copying another one.
  void score_stored_keys(int layer, int kv_head);

  // Empties every head (new sequence); memory stays allocated.
  void clear();

  // Bytes one token takes in one layer: keys and values of every KV head.
  int64_t bytes_per_token_per_layer() const;
  // Number of slots in use over all heads, and the bytes their keys and values take.
  int64_t tokens_held() const;
  int64_t bytes_used() const;
  // Bytes reserved for keys and values and the per-slot key scores (what the process actually
  // holds for them; the attention statistics of h2o/tova/snapkv are not counted).
  int64_t bytes_reserved() const;
  // Bytes of one slot's key score in one head: 4 when the cache keeps key scores, else 0.
  int64_t key_score_bytes_per_slot() const { return stats_.key_scores ? static_cast<int64_t>(sizeof(float)) : 0; }
  // Bytes a full, uncompressed cache of these types would need for n_tokens tokens.
  int64_t full_cache_bytes(int64_t n_tokens) const;

  // Total queries seen (for the accumulate statistics' normaliser).
  int64_t queries_seen = 0;

  // AttentionStats::query_moments / query_recent: per layer, the moments (or recent queries) of the
  // queries at positions >= kQueryMomentSinks (filled by the session, which knows the rotary embedding), and the rotary
  // geometry that carries them to later positions. Empty when not asked for.
  std::vector<QueryMoments> query_moments;
  RopeGeometry rope;

 private:
  size_t index(int layer, int kv_head) const { return static_cast<size_t>(layer) * shape_.n_kv_heads + kv_head; }
  // Bytes of one slot's key and value in one head.
  int64_t slot_bytes() const { return static_cast<int64_t>(k_row_bytes_ + v_row_bytes_); }
  void allocate_storage();

  CacheShape shape_;
  std::vector<int> capacity_;
  HugePageBuffer storage_;  // every head's keys and values (HeadCache::k / v are views into it)
  AttentionStats stats_;
  KvTypes types_;
  size_t k_row_bytes_ = 0, v_row_bytes_ = 0;
  std::vector<HeadCache> heads_;
  KeyScorer key_scorer_;
};

}  // namespace qf::kv
