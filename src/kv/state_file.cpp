#include "kv/state_file.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tensor/types.h"
#include "util/error.h"
#include "util/hash.h"

namespace qf::kv {

static_assert(std::endian::native == std::endian::little, "state files are little-endian, as is this code");

namespace {

// Appends fixed-width values and length-prefixed arrays.
class Writer {
 public:
  std::vector<uint8_t> bytes;

  template <typename T>
  void put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof v);
  }
  void put_str(std::string_view s) {
    put<uint64_t>(s.size());
    bytes.insert(bytes.end(), s.begin(), s.end());
  }
  template <typename T>
  void put_raw(const std::vector<T>& v) {  // the count is written (or implied) elsewhere
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    bytes.insert(bytes.end(), p, p + v.size() * sizeof(T));
  }
};

// Reads what Writer wrote, failing with "NAME: corrupt (...)" instead of reading past the end.
class Reader {
 public:
  Reader(std::span<const uint8_t> b, std::string_view name) : b_(b), name_(name) {}

  template <typename T>
  T get(const char* what) {
    need(sizeof(T), 1, what);
    T v;
    std::memcpy(&v, b_.data() + at_, sizeof v);
    at_ += sizeof v;
    return v;
  }
  // An int that must lie in [lo, hi].
  int get_int(const char* what, int64_t lo, int64_t hi) {
    const int64_t v = get<int64_t>(what);
    if (v < lo || v > hi) bad(what, " is ", v, ", outside [", lo, ", ", hi, "]");
    return static_cast<int>(v);
  }
  std::string get_str(const char* what) {
    const uint64_t n = get<uint64_t>(what);
    need(1, n, what);
    std::string s(reinterpret_cast<const char*>(b_.data() + at_), n);
    at_ += n;
    return s;
  }
  template <typename T>
  void get_raw(std::vector<T>& out, uint64_t count, const char* what) {
    need(sizeof(T), count, what);  // before allocating: a hostile count must not exhaust memory
    out.resize(count);
    if (count == 0) return;  // no memcpy from / to a null pointer
    std::memcpy(out.data(), b_.data() + at_, count * sizeof(T));
    at_ += count * sizeof(T);
  }
  size_t left() const { return b_.size() - at_; }

  template <typename... Args>
  [[noreturn]] void bad(const Args&... args) const {
    fail(name_, ": corrupt state file (", args..., ")");
  }

 private:
  void need(size_t elem, uint64_t count, const char* what) const {
    if (count > left() / elem) bad(what, " runs past the end of the file");
  }
  std::span<const uint8_t> b_;
  std::string_view name_;
  size_t at_ = 0;
};

// Upper bounds that no real model reaches: they keep a hostile header from asking for absurd
// amounts of work before the payload's own size checks catch it.
constexpr int64_t kMaxLayers = 4096, kMaxHeads = 4096, kMaxHeadDim = 1 << 16;
constexpr int64_t kMaxTokens = std::numeric_limits<int32_t>::max();

void put_config(Writer& w, const StateConfig& c, uint32_t version) {
  w.put_str(c.model_fingerprint);
  w.put_str(c.model_shape);
  for (int v : {c.n_layers, c.n_kv_heads, c.head_dim}) w.put<int64_t>(v);
  w.put<uint32_t>(static_cast<uint32_t>(c.type_k));
  w.put<uint32_t>(static_cast<uint32_t>(c.type_v));
  w.put_str(c.policy);
  for (int v : {c.budget, c.window, c.evict_every}) w.put<int64_t>(v);
  w.put<float>(c.ratio);
  w.put<int64_t>(c.skip_layers);
  w.put<uint64_t>(c.seed);
  for (int v : {c.n_sink, c.snapkv_window, c.snapkv_kernel}) w.put<int64_t>(v);
  w.put_str(c.filters_hash);
  w.put<uint8_t>(c.stats.accumulate);
  w.put<uint8_t>(c.stats.last_query);
  w.put<int64_t>(c.stats.window);
  w.put<uint8_t>(c.stats.query_moments);
  w.put<uint8_t>(c.stats.key_scores);
  if (version >= 3) w.put<int64_t>(c.stats.query_recent);
  if (version >= 4) {
    w.put<uint64_t>(c.layer_weights.size());
    w.put_raw(c.layer_weights);
  }
}

KvType get_type(Reader& r, const char* what, int head_dim) {
  const uint32_t id = r.get<uint32_t>(what);
  const TypeInfo& info = type_info(id);
  if (info.block_elems <= 0 || info.block_bytes == 0) r.bad(what, " is an unknown type id ", id);
  if (head_dim % info.block_elems != 0) r.bad(what, " ", info.name, " does not divide head_dim ", head_dim);
  return info.type;
}

bool get_flag(Reader& r, const char* what) {
  const uint8_t v = r.get<uint8_t>(what);
  if (v > 1) r.bad(what, " is ", static_cast<int>(v), ", not 0 or 1");
  return v == 1;
}

StateConfig get_config(Reader& r, uint32_t version) {
  StateConfig c;
  c.model_fingerprint = r.get_str("model fingerprint");
  c.model_shape = r.get_str("model shape");
  c.n_layers = r.get_int("n_layers", 1, kMaxLayers);
  c.n_kv_heads = r.get_int("n_kv_heads", 1, kMaxHeads);
  c.head_dim = r.get_int("head_dim", 1, kMaxHeadDim);
  c.type_k = get_type(r, "key type", c.head_dim);
  c.type_v = get_type(r, "value type", c.head_dim);
  c.policy = r.get_str("policy name");
  c.budget = r.get_int("budget", 0, kMaxTokens);
  c.window = r.get_int("window", 0, kMaxTokens);
  c.evict_every = r.get_int("evict_every", 0, kMaxTokens);
  c.ratio = r.get<float>("ratio");
  if (!(c.ratio >= 0.0f && c.ratio < 1.0f)) r.bad("ratio is outside [0, 1)");
  c.skip_layers = r.get_int("skip_layers", 0, c.n_layers);
  c.seed = r.get<uint64_t>("seed");
  c.n_sink = r.get_int("n_sink", 0, kMaxTokens);
  c.snapkv_window = r.get_int("snapkv window", 0, kMaxTokens);
  c.snapkv_kernel = r.get_int("snapkv kernel", 0, kMaxTokens);
  c.filters_hash = r.get_str("filters hash");
  c.stats.accumulate = get_flag(r, "accumulate flag");
  c.stats.last_query = get_flag(r, "last-query flag");
  c.stats.window = r.get_int("statistics window", 0, kMaxTokens);
  c.stats.query_moments = get_flag(r, "query-moments flag");
  c.stats.key_scores = get_flag(r, "key-scores flag");
  if (version >= 3) c.stats.query_recent = r.get_int("recent-query horizon", 0, kMaxTokens);
  if (version >= 4) {
    const uint64_t n = r.get<uint64_t>("layer-weight count");
    if (n != 0 && n != static_cast<uint64_t>(c.n_layers)) r.bad(n, " layer weights for ", c.n_layers, " layers");
    r.get_raw(c.layer_weights, n, "layer weights");
    for (float w : c.layer_weights)
      if (!(w > 0.0f) || !std::isfinite(w)) r.bad("layer weight ", w, " is not positive and finite");
  }
  return c;
}

// Statistics arrays a head carries, as Cache allocates them.
bool keeps_sum(const AttentionStats& s) { return s.accumulate || s.window > 0; }
// Whether the state holds per-layer query moments (sums, recent queries or both), as Cache does.
bool keeps_moments(const AttentionStats& s) { return s.query_moments || s.query_recent > 0; }

HeadState get_head(Reader& r, const SessionState& s, int layer, int kv_head) {
  const StateConfig& c = s.config;
  HeadState h;
  const int n = r.get_int("slot count", 0, s.n_past);
  r.get_raw(h.k, static_cast<uint64_t>(n) * row_bytes(c.type_k, c.head_dim), "keys");
  r.get_raw(h.v, static_cast<uint64_t>(n) * row_bytes(c.type_v, c.head_dim), "values");
  r.get_raw(h.pos, n, "positions");
  for (int j = 0; j < n; ++j)
    if (h.pos[j] < 0 || h.pos[j] >= s.n_past || (j > 0 && h.pos[j] <= h.pos[j - 1]))
      r.bad("layer ", layer, " head ", kv_head, ": positions must increase inside [0, n_past)");
  if (keeps_sum(c.stats)) r.get_raw(h.attn_sum, n, "attention sums");
  if (c.stats.accumulate) r.get_raw(h.attn_cnt, n, "attention counts");
  if (c.stats.last_query) r.get_raw(h.attn_last, n, "last-query attention");
  if (c.stats.key_scores) r.get_raw(h.key_score, n, "key scores");
  return h;
}

// One layer's query moments: empty (no query yet) or n_heads x head_dim with the sums.
QueryMoments get_moments(Reader& r, const StateConfig& c, int layer) {
  QueryMoments m;
  const int n_heads = r.get_int("query heads", 0, kMaxHeads);
  const int head_dim = r.get_int("query head_dim", 0, kMaxHeadDim);
  const int64_t count = r.get<int64_t>("query count");
  if (count < 0) r.bad("layer ", layer, ": negative query count");
  if (n_heads == 0 || head_dim == 0) {
    if (n_heads != 0 || head_dim != 0 || count != 0) r.bad("layer ", layer, ": query moments without a shape");
    return m;
  }
  if (head_dim != c.head_dim || n_heads % c.n_kv_heads != 0)
    r.bad("layer ", layer, ": query moments of ", n_heads, "x", head_dim, " do not fit ", c.n_kv_heads, " KV heads of ", c.head_dim);
  m.n_heads = n_heads, m.head_dim = head_dim, m.count = count;
  if (c.stats.query_moments) {
    r.get_raw(m.sum, static_cast<uint64_t>(n_heads) * head_dim, "query sums");
    r.get_raw(m.outer, static_cast<uint64_t>(n_heads) * head_dim * head_dim, "query outer sums");
  }
  if (c.stats.query_recent > 0) {
    const uint64_t n_recent = r.get<uint64_t>("recent-query count");
    if (n_recent != 0 && n_recent != static_cast<uint64_t>(n_heads) * head_dim)
      r.bad("layer ", layer, ": ", n_recent, " recent-query values for ", n_heads, "x", head_dim, " moments");
    r.get_raw(m.recent, n_recent, "recent queries");
  }
  return m;
}

}  // namespace

std::vector<uint8_t> encode_state(const SessionState& s) {
  const StateConfig& c = s.config;
  if (s.heads.size() != static_cast<size_t>(c.n_layers) * c.n_kv_heads) fail("encode_state: one head state per (layer, KV head) expected");
  if (s.version < kOldestStateVersion || s.version > kStateVersion) fail("encode_state: unknown version ", s.version);
  if (s.version < 3 && c.stats.query_recent > 0) fail("encode_state: version ", s.version, " has no recent queries");
  if (s.version < 4 && !c.layer_weights.empty()) fail("encode_state: version ", s.version, " has no layer weights");
  Writer w;
  w.bytes.resize(kStatePrefixBytes);
  put_config(w, c, s.version);
  w.put<int64_t>(s.n_past);
  w.put<int64_t>(s.prompt_end);
  w.put<int64_t>(s.queries_seen);
  w.put<int64_t>(s.evicted);
  w.put<int64_t>(s.evictions);
  w.put<uint64_t>(s.tokens.size());
  w.put_raw(s.tokens);
  w.put_str(s.policy_state);
  for (const HeadState& h : s.heads) {
    w.put<int64_t>(h.n());
    w.put_raw(h.k);
    w.put_raw(h.v);
    w.put_raw(h.pos);
    w.put_raw(h.attn_sum);
    w.put_raw(h.attn_cnt);
    w.put_raw(h.attn_last);
    w.put_raw(h.key_score);
  }
  if (keeps_moments(c.stats)) {
    if (s.query_moments.size() != static_cast<size_t>(c.n_layers)) fail("encode_state: query moments per layer expected");
    for (const QueryMoments& m : s.query_moments) {
      w.put<int64_t>(m.n_heads);
      w.put<int64_t>(m.head_dim);
      w.put<int64_t>(m.count);
      if (c.stats.query_moments) {
        if (m.n_heads && (m.sum.size() != static_cast<size_t>(m.n_heads) * m.head_dim || m.outer.size() != m.sum.size() * m.head_dim))
          fail("encode_state: query moments without their sums");
        w.put_raw(m.sum);
        w.put_raw(m.outer);
      }
      if (c.stats.query_recent > 0) {
        w.put<uint64_t>(m.recent.size());
        w.put_raw(m.recent);
      }
    }
  }
  const uint64_t body = w.bytes.size() - kStatePrefixBytes;
  const uint32_t crc = crc32(std::span(w.bytes).subspan(kStatePrefixBytes));
  uint8_t* p = w.bytes.data();
  std::memcpy(p, kStateMagic, 8);
  const uint32_t zero = 0;
  std::memcpy(p + 8, &s.version, 4);
  std::memcpy(p + 12, &zero, 4);
  std::memcpy(p + 16, &body, 8);
  std::memcpy(p + 24, &crc, 4);
  std::memcpy(p + 28, &zero, 4);
  return std::move(w.bytes);
}

SessionState decode_state(std::span<const uint8_t> bytes, std::string_view name) {
  if (bytes.size() < kStatePrefixBytes || std::memcmp(bytes.data(), kStateMagic, 8) != 0)
    fail(name, ": not a qfilters state file (no QFKVSTAT header)");
  uint32_t version, crc, reserved1, reserved2;
  uint64_t body;
  std::memcpy(&version, bytes.data() + 8, 4);
  std::memcpy(&reserved1, bytes.data() + 12, 4);
  std::memcpy(&body, bytes.data() + 16, 8);
  std::memcpy(&crc, bytes.data() + 24, 4);
  std::memcpy(&reserved2, bytes.data() + 28, 4);
  if (version < kOldestStateVersion || version > kStateVersion)
    fail(name, ": state file version ", version, " is not supported (this build reads versions ", kOldestStateVersion,
         " to ", kStateVersion, ")");
  if (reserved1 != 0 || reserved2 != 0) fail(name, ": corrupt state file (reserved header fields are not 0)");
  const uint64_t have = bytes.size() - kStatePrefixBytes;
  if (body != have)
    fail(name, ": truncated or padded state file (", kStatePrefixBytes + body, " bytes expected, ", bytes.size(), " found)");
  const std::span<const uint8_t> payload = bytes.subspan(kStatePrefixBytes);
  if (crc32(payload) != crc) fail(name, ": corrupt state file (checksum mismatch)");

  Reader r(payload, name);
  SessionState s;
  s.version = version;
  s.config = get_config(r, version);
  const StateConfig& c = s.config;
  s.n_past = r.get_int("n_past", 0, kMaxTokens);
  s.prompt_end = r.get_int("prompt_end", 0, s.n_past);
  s.queries_seen = r.get<int64_t>("queries seen");
  s.evicted = r.get<int64_t>("evicted");
  s.evictions = r.get<int64_t>("evictions");
  if (s.queries_seen < 0 || s.evicted < 0 || s.evictions < 0) r.bad("negative counters");
  const uint64_t n_tokens = r.get<uint64_t>("token count");
  if (n_tokens != 0 && n_tokens != static_cast<uint64_t>(s.n_past)) r.bad("holds ", n_tokens, " tokens for n_past ", s.n_past);
  r.get_raw(s.tokens, n_tokens, "tokens");
  for (int32_t t : s.tokens)
    if (t < 0) r.bad("negative token id ", t);
  s.policy_state = r.get_str("policy state");
  const uint64_t n_heads = static_cast<uint64_t>(c.n_layers) * c.n_kv_heads;
  if (n_heads > r.left() / sizeof(int64_t)) r.bad("heads run past the end of the file");
  s.heads.reserve(n_heads);
  for (int l = 0; l < c.n_layers; ++l)
    for (int h = 0; h < c.n_kv_heads; ++h) s.heads.push_back(get_head(r, s, l, h));
  if (keeps_moments(c.stats))
    for (int l = 0; l < c.n_layers; ++l) s.query_moments.push_back(get_moments(r, c, l));
  if (r.left() != 0) r.bad(r.left(), " bytes after the last head");
  return s;
}

}  // namespace qf::kv
