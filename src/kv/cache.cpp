#include "kv/cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "tensor/kernels.h"
#include "util/error.h"
#include "util/memory.h"

namespace qf::kv {

namespace {

// The storage types and their names as llama.cpp's -ctk / -ctv spell them.
struct KvTypeName {
  KvType type;
  std::string_view name;
};
constexpr KvTypeName kKvTypeNames[] = {
    {KvType::F32, "f32"}, {KvType::F16, "f16"}, {KvType::BF16, "bf16"}, {KvType::Q8_0, "q8_0"}, {KvType::Q4_0, "q4_0"}};
constexpr KvType kKvTypes[] = {KvType::F32, KvType::F16, KvType::BF16, KvType::Q8_0, KvType::Q4_0};

// roundf(v) for |v| <= 127, inline: truncate, then step away from zero when the dropped part
// (exact in float) is at least one half. std::round is a libm call, once per stored value.
inline int round_half_away(float v) {
  const int t = static_cast<int>(v);
  const float frac = v - static_cast<float>(t);
  return t + (frac >= 0.5f) - (frac <= -0.5f);
}

// ggml's reference rounding: q8_0 scales by max|x| / 127 and rounds half away from zero.
void quantize_q8_0(const float* x, int n, uint8_t* out) {
  for (int b = 0; b < n / kQK; ++b, x += kQK, out += sizeof(BlockQ8_0)) {
    float amax = 0.0f;
    for (int i = 0; i < kQK; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ8_0 blk;
    blk.d = f32_to_fp16(d);
    for (int i = 0; i < kQK; ++i) blk.qs[i] = static_cast<int8_t>(round_half_away(x[i] * id));
    std::memcpy(out, &blk, sizeof blk);
  }
}

// q4_0: the value of largest magnitude maps to -8 (so its sign picks the scale's), the others
// to round(x / d) + 8 clamped to 15.
void quantize_q4_0(const float* x, int n, uint8_t* out) {
  for (int b = 0; b < n / kQK; ++b, x += kQK, out += sizeof(BlockQ4_0)) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < kQK; ++i)
      if (std::fabs(x[i]) > amax) amax = std::fabs(x[i]), max = x[i];
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    BlockQ4_0 blk;
    blk.d = f32_to_fp16(d);
    const auto level = [&](float v) { return static_cast<uint8_t>(std::min(15, static_cast<int>(v * id + 8.5f))); };
    for (int i = 0; i < kQK / 2; ++i) blk.qs[i] = static_cast<uint8_t>(level(x[i]) | level(x[i + kQK / 2]) << 4);
    std::memcpy(out, &blk, sizeof blk);
  }
}

}  // namespace

std::span<const KvType> kv_types() { return kKvTypes; }

std::string_view kv_type_name(KvType t) {
  for (const KvTypeName& n : kKvTypeNames)
    if (n.type == t) return n.name;
  return type_info(t).name;  // not a KV type; named for error messages
}

KvType parse_kv_type(std::string_view name) {
  std::string accepted;
  for (const KvTypeName& n : kKvTypeNames) {
    if (name == n.name) return n.type;
    accepted += (accepted.empty() ? "" : ", ") + std::string(n.name);
  }
  fail("unknown KV cache type '", name, "' (one of: ", accepted, ")");
}

size_t kv_row_bytes(KvType t, int head_dim) {
  if (!is_kv_type(t)) fail("KV cache type ", type_info(t).name, " is not supported (f32, f16, bf16, q8_0, q4_0)");
  const int64_t block = type_info(t).block_elems;
  if (head_dim <= 0 || head_dim % block != 0)
    fail("KV cache type ", kv_type_name(t), " stores blocks of ", block, " values; head_dim ", head_dim,
         " is not a multiple (use f16 or bf16)");
  return row_bytes(t, head_dim);
}

void kv_quantize_row(KvType t, const float* x, int head_dim, uint8_t* row) {
  switch (t) {
    case KvType::F32: std::memcpy(row, x, static_cast<size_t>(head_dim) * sizeof(float)); return;
    case KvType::F16: return f32_to_fp16_row(x, static_cast<size_t>(head_dim), row);
    case KvType::BF16:
      for (int i = 0; i < head_dim; ++i) {
        const uint16_t h = f32_to_bf16(x[i]);
        std::memcpy(row + 2 * static_cast<size_t>(i), &h, 2);
      }
      return;
    case KvType::Q8_0: return quantize_q8_0(x, head_dim, row);
    case KvType::Q4_0: return quantize_q4_0(x, head_dim, row);
    default: fail("KV cache type ", type_info(t).name, " is not supported");
  }
}

void kv_dequantize_row(KvType t, const uint8_t* row, int head_dim, float* x) {
  kv_row_bytes(t, head_dim);  // checks the type and the shape
  // The weights' scalar path: independent of the attention kernels' SIMD conversion.
  dequantize_row(WeightView{t, head_dim, 1, row}, 0, x);
}

namespace {
std::vector<float> rows_f32(KvType t, std::span<const uint8_t> data, size_t row_bytes, int n, int d) {
  std::vector<float> out(static_cast<size_t>(n) * d);
  for (int j = 0; j < n; ++j) kv_dequantize_row(t, data.data() + j * row_bytes, d, out.data() + static_cast<size_t>(j) * d);
  return out;
}
}  // namespace

std::vector<float> keys_f32(const HeadCache& hc, int head_dim) {
  return rows_f32(hc.k_type, hc.k, hc.k_row_bytes, hc.n, head_dim);
}
std::vector<float> values_f32(const HeadCache& hc, int head_dim) {
  return rows_f32(hc.v_type, hc.v, hc.v_row_bytes, hc.n, head_dim);
}

Cache::Cache(CacheShape shape, std::vector<int> capacity, AttentionStats stats, KvTypes types)
    : shape_(shape), capacity_(std::move(capacity)), stats_(stats), types_(types) {
  if (shape_.n_layers <= 0 || shape_.n_kv_heads <= 0 || shape_.head_dim <= 0)
    fail("kv cache: invalid shape");
  if (static_cast<int>(capacity_.size()) != shape_.n_layers) fail("kv cache: one capacity per layer expected");
  k_row_bytes_ = kv_row_bytes(types_.k, shape_.head_dim);
  v_row_bytes_ = kv_row_bytes(types_.v, shape_.head_dim);
  heads_.resize(static_cast<size_t>(shape_.n_layers) * shape_.n_kv_heads);
  for (int l = 0; l < shape_.n_layers; ++l)
    if (capacity_[l] <= 0) fail("kv cache: capacity of layer ", l, " must be positive");
  allocate_storage();
  const bool need_sum = stats_.accumulate || stats_.window > 0;
  for (int l = 0; l < shape_.n_layers; ++l) {
    const size_t cap = static_cast<size_t>(capacity_[l]);
    for (int h = 0; h < shape_.n_kv_heads; ++h) {
      HeadCache& hc = head(l, h);
      hc.k_type = types_.k;
      hc.v_type = types_.v;
      hc.k_row_bytes = k_row_bytes_;
      hc.v_row_bytes = v_row_bytes_;
      hc.pos.assign(cap, 0);
      if (need_sum) hc.attn_sum.assign(cap, 0.0f);
      if (stats_.accumulate) hc.attn_cnt.assign(cap, 0);
      if (stats_.last_query) hc.attn_last.assign(cap, 0.0f);
      if (stats_.key_scores) hc.key_score.assign(cap, 0.0f);
    }
  }
  if (stats_.query_moments || stats_.query_recent > 0) query_moments.resize(shape_.n_layers);
}

// One buffer for every head's keys and values: head (l, h)'s keys, then its values, each region
// starting on a cache line, with a cache line between regions that ASan builds poison, so a head
// that writes past its capacity is caught as it was when every region was its own allocation.
void Cache::allocate_storage() {
  constexpr size_t kLine = 64;
  const auto region = [](size_t bytes) { return (bytes + kLine - 1) / kLine * kLine + kLine; };
  size_t total = 0;
  for (int l = 0; l < shape_.n_layers; ++l) {
    const size_t cap = static_cast<size_t>(capacity_[l]);
    total += shape_.n_kv_heads * (region(cap * k_row_bytes_) + region(cap * v_row_bytes_));
  }
  check_fits_in_memory(total, "the KV cache", "lower the context (-c) or the KV budget, or use a smaller KV type (-ctk/-ctv)");
  storage_ = HugePageBuffer(total);
  uint8_t* at = storage_.data();
  const auto take = [&](size_t bytes) {
    const std::span<uint8_t> s(at, bytes);
    at += region(bytes);
    storage_.poison(s.data() + bytes, region(bytes) - bytes);
    return s;
  };
  for (int l = 0; l < shape_.n_layers; ++l) {
    const size_t cap = static_cast<size_t>(capacity_[l]);
    for (int h = 0; h < shape_.n_kv_heads; ++h) {
      head(l, h).k = take(cap * k_row_bytes_);
      head(l, h).v = take(cap * v_row_bytes_);
    }
  }
}

void Cache::append(int layer, const float* k, const float* v, const int32_t* pos, int n_tok) {
  const int d = shape_.head_dim, nkv = shape_.n_kv_heads;
  if (layer < 0 || layer >= shape_.n_layers || n_tok < 0) fail("kv cache: append to layer ", layer, " of ", n_tok, " tokens");
  // Check every head before writing any: heads may hold different counts after eviction.
  for (int h = 0; h < nkv; ++h) {
    const HeadCache& hc = head(layer, h);
    if (hc.n + n_tok > capacity_[layer])
      fail("kv cache full: layer ", layer, " holds ", hc.n, " tokens, capacity ", capacity_[layer],
           ", cannot add ", n_tok);
  }
  // Attention finds a query's visible slots by binary search on position.
  for (int t = 0; t < n_tok; ++t) {
    int32_t prev = t > 0 ? pos[t - 1] : -1;
    for (int h = 0; t == 0 && h < nkv; ++h)
      if (head(layer, h).n > 0) prev = std::max(prev, head(layer, h).pos[head(layer, h).n - 1]);
    if (pos[t] <= prev) fail("kv cache: positions must increase (layer ", layer, ": ", pos[t], " after ", prev, ")");
  }
  if (stats_.key_scores && !key_scorer_) fail("kv cache: keeps key scores but has no key scorer (set_key_scorer)");
  for (int h = 0; h < nkv; ++h) {
    HeadCache& hc = head(layer, h);
    for (int t = 0; t < n_tok; ++t) {
      const size_t src = (static_cast<size_t>(t) * nkv + h) * d;
      kv_quantize_row(types_.k, k + src, d, hc.k.data() + static_cast<size_t>(hc.n) * k_row_bytes_);
      kv_quantize_row(types_.v, v + src, d, hc.v.data() + static_cast<size_t>(hc.n) * v_row_bytes_);
      hc.pos[hc.n] = pos[t];
      if (!hc.attn_sum.empty()) hc.attn_sum[hc.n] = 0.0f;
      if (!hc.attn_cnt.empty()) hc.attn_cnt[hc.n] = 0;
      if (!hc.attn_last.empty()) hc.attn_last[hc.n] = 0.0f;
      if (!hc.key_score.empty()) hc.key_score[hc.n] = key_scorer_(layer, h, k + src, pos[t]);
      ++hc.n;
    }
  }
}

void Cache::retain(int layer, int kv_head, std::span<const int> keep) {
  if (layer < 0 || layer >= shape_.n_layers || kv_head < 0 || kv_head >= shape_.n_kv_heads)
    fail("kv cache: retain() on layer ", layer, " head ", kv_head, " out of range");
  HeadCache& hc = head(layer, kv_head);
  int prev = -1;
  for (int slot : keep) {
    // Strictly ascending: a repeated slot would duplicate a token.
    if (slot <= prev || slot >= hc.n) fail("kv cache: retain() needs strictly ascending slots inside the cache");
    prev = slot;
  }
  // Moves slots [from, from + len) down to [to, to + len), every per-slot array alike.
  auto move_run = [&](int to, int from, int len) {
    std::memmove(hc.k.data() + to * k_row_bytes_, hc.k.data() + from * k_row_bytes_, len * k_row_bytes_);
    std::memmove(hc.v.data() + to * v_row_bytes_, hc.v.data() + from * v_row_bytes_, len * v_row_bytes_);
    auto move = [&](auto& a) {
      if (!a.empty()) std::copy(a.begin() + from, a.begin() + from + len, a.begin() + to);
    };
    move(hc.pos), move(hc.attn_sum), move(hc.attn_cnt), move(hc.attn_last), move(hc.key_score);
  };
  // Kept slots come in runs of consecutive slots (all but the evicted few): one move per run.
  int out = 0;
  for (size_t i = 0; i < keep.size();) {
    size_t end = i + 1;
    while (end < keep.size() && keep[end] == keep[end - 1] + 1) ++end;
    const int len = static_cast<int>(end - i);
    if (keep[i] != out) move_run(out, keep[i], len);
    out += len, i = end;
  }
  hc.n = out;
}

void Cache::shift(int layer, int kv_head, int32_t keep, int32_t delta,
                  const std::function<void(float* rows, int n)>& rotate_back) {
  if (layer < 0 || layer >= shape_.n_layers || kv_head < 0 || kv_head >= shape_.n_kv_heads || keep < 0 || delta <= 0)
    fail("kv cache: shift(layer ", layer, ", head ", kv_head, ", keep ", keep, ", delta ", delta, ") out of range");
  if (stats_.key_scores && !key_scorer_) fail("kv cache: keeps key scores but has no key scorer (set_key_scorer)");
  HeadCache& hc = head(layer, kv_head);
  auto first_slot_at = [&hc](int64_t p) {
    return static_cast<int>(std::lower_bound(hc.pos.begin(), hc.pos.begin() + hc.n, p,
                                             [](int32_t a, int64_t b) { return a < b; }) - hc.pos.begin());
  };
  const int kept_below = first_slot_at(keep), first_moved = first_slot_at(static_cast<int64_t>(keep) + delta);
  if (first_moved > kept_below) {
    std::vector<int> slots;
    for (int i = 0; i < hc.n; ++i)
      if (i < kept_below || i >= first_moved) slots.push_back(i);
    retain(layer, kv_head, slots);
  }
  const int n_moved = hc.n - kept_below, d = shape_.head_dim;
  if (n_moved == 0) return;
  std::vector<float> rows(static_cast<size_t>(n_moved) * d);
  for (int i = 0; i < n_moved; ++i)
    kv_dequantize_row(types_.k, hc.k.data() + static_cast<size_t>(kept_below + i) * k_row_bytes_, d,
                      rows.data() + static_cast<size_t>(i) * d);
  rotate_back(rows.data(), n_moved);
  for (int i = 0; i < n_moved; ++i) {
    const float* row = rows.data() + static_cast<size_t>(i) * d;
    const int slot = kept_below + i;
    kv_quantize_row(types_.k, row, d, hc.k.data() + static_cast<size_t>(slot) * k_row_bytes_);
    hc.pos[slot] -= delta;
    if (!hc.key_score.empty()) hc.key_score[slot] = key_scorer_(layer, kv_head, row, hc.pos[slot]);
  }
}

void Cache::score_stored_keys(int layer, int kv_head) {
  if (!stats_.key_scores || !key_scorer_) fail("kv cache: score_stored_keys() without key scores or a key scorer");
  HeadCache& hc = head(layer, kv_head);
  std::vector<float> row(shape_.head_dim);
  for (int j = 0; j < hc.n; ++j) {
    kv_dequantize_row(types_.k, hc.k.data() + static_cast<size_t>(j) * k_row_bytes_, shape_.head_dim, row.data());
    hc.key_score[j] = key_scorer_(layer, kv_head, row.data(), hc.pos[j]);
  }
}

void Cache::clear() {
  for (auto& hc : heads_) hc.n = 0;
  queries_seen = 0;
  for (auto& m : query_moments) m.clear();
}

int64_t Cache::bytes_per_token_per_layer() const { return slot_bytes() * shape_.n_kv_heads; }

int64_t Cache::tokens_held() const {
  int64_t n = 0;
  for (const auto& hc : heads_) n += hc.n;
  return n;
}

int64_t Cache::bytes_used() const { return tokens_held() * slot_bytes(); }

int64_t Cache::bytes_reserved() const {
  int64_t slots = 0;
  for (int l = 0; l < shape_.n_layers; ++l) slots += static_cast<int64_t>(capacity_[l]) * shape_.n_kv_heads;
  return slots * (slot_bytes() + key_score_bytes_per_slot());
}

int64_t Cache::full_cache_bytes(int64_t n_tokens) const {
  return n_tokens * shape_.n_layers * bytes_per_token_per_layer();
}

}  // namespace qf::kv
