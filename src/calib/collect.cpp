#include "calib/collect.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>

#include "util/error.h"

namespace qf::calib {

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [0, n) by rejection. std::uniform_int_distribution is implementation-defined, which
// would make a calibration depend on the standard library it was built with.
uint64_t below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;  // largest multiple of n, exclusive
  uint64_t x;
  do x = rng();
  while (x >= limit);
  return x % n;
}

}  // namespace

uint64_t stream_seed(uint64_t seed, uint64_t stream) { return splitmix64(splitmix64(seed) ^ (stream * 0xd1b54a32d192ed03ull)); }

// ---- SamplePlan -----------------------------------------------------------------------------------

SamplePlan::SamplePlan(std::vector<int> doc_lengths, int n_layers, int n_samples, uint64_t seed)
    : n_layers_(n_layers) {
  if (doc_lengths.empty()) fail("calibration: no documents");
  if (n_layers <= 0) fail("calibration: invalid layer count ", n_layers);
  if (n_samples <= 0) fail("calibration: the number of samples per layer must be positive, got ", n_samples);
  offsets_.assign(1, 0);
  for (size_t d = 0; d < doc_lengths.size(); ++d) {
    if (doc_lengths[d] <= 0) fail("calibration: document ", d, " is empty");
    offsets_.push_back(offsets_.back() + doc_lengths[d]);
  }
  const int64_t total = offsets_.back();
  n_samples_ = static_cast<int>(std::min<int64_t>(n_samples, total));

  // Partial Fisher-Yates per layer over all token indices: exact sampling without replacement.
  std::vector<int64_t> idx(total);
  drawn_.resize(n_layers);
  for (int l = 0; l < n_layers; ++l) {
    std::iota(idx.begin(), idx.end(), int64_t{0});
    std::mt19937_64 rng(stream_seed(seed, static_cast<uint64_t>(l)));
    for (int i = 0; i < n_samples_; ++i) {
      const int64_t j = i + static_cast<int64_t>(below(rng, static_cast<uint64_t>(total - i)));
      std::swap(idx[i], idx[j]);
    }
    drawn_[l].assign(idx.begin(), idx.begin() + n_samples_);
    std::sort(drawn_[l].begin(), drawn_[l].end());
  }
}

int SamplePlan::doc_length(int doc) const {
  if (doc < 0 || doc >= n_docs()) fail("calibration: document ", doc, " out of range 0..", n_docs() - 1);
  return static_cast<int>(offsets_[doc + 1] - offsets_[doc]);
}

int64_t SamplePlan::doc_offset(int doc) const {
  if (doc < 0 || doc >= n_docs()) fail("calibration: document ", doc, " out of range 0..", n_docs() - 1);
  return offsets_[doc];
}

const std::vector<int64_t>& SamplePlan::positions(int layer) const {
  if (layer < 0 || layer >= n_layers_) fail("calibration: layer ", layer, " out of range 0..", n_layers_ - 1);
  return drawn_[layer];
}

// ---- QueryCollector -------------------------------------------------------------------------------

QueryCollector::QueryCollector(const ModelConfig& c, SamplePlan plan)
    : plan_(std::move(plan)),
      n_layers_(c.n_layers),
      n_head_(c.n_heads),
      head_dim_(c.head_dim),
      row_(static_cast<size_t>(c.n_heads) * c.head_dim),
      keys_(c.n_layers, c.n_kv_heads, c.head_dim) {
  if (plan_.n_layers() != c.n_layers)
    fail("calibration: sample plan has ", plan_.n_layers(), " layers, the model ", c.n_layers);
  rows_.resize(n_layers_);
  filled_.resize(n_layers_);
  row_pos_.resize(n_layers_);
  for (int l = 0; l < n_layers_; ++l) {
    rows_[l].assign(static_cast<size_t>(plan_.n_samples()) * row_, 0.0f);
    filled_[l].assign(plan_.n_samples(), 0);
    row_pos_[l].assign(plan_.n_samples(), 0);
  }
}

void QueryCollector::begin_document(int doc) {
  plan_.doc_length(doc);  // range check
  doc_ = doc;
}

QkHook QueryCollector::hook() {
  return [this](int layer, const float* q, const float* k, const int32_t* pos, int n_tok) { on_qk(layer, q, k, pos, n_tok); };
}

void QueryCollector::on_qk(int layer, const float* q, const float* k, const int32_t* pos, int n_tok) {
  if (doc_ < 0) fail("calibration: tokens fed before begin_document()");
  if (layer < 0 || layer >= n_layers_) fail("calibration: hook called for layer ", layer);
  if (n_tok <= 0) return;
  const int len = plan_.doc_length(doc_);
  const int64_t base = plan_.doc_offset(doc_);
  // A chunk covers consecutive positions; anything else means the session was not reset.
  if (pos[0] < 0 || pos[n_tok - 1] != pos[0] + n_tok - 1 || pos[n_tok - 1] >= len)
    fail("calibration: positions ", pos[0], "..", pos[n_tok - 1], " do not fit document ", doc_, " of ", len,
         " tokens (reset the session before each document)");

  keys_.add(layer, k, n_tok);
  if (layer == 0) tokens_seen_ += n_tok;

  const std::vector<int64_t>& drawn = plan_.positions(layer);
  const int64_t g0 = base + pos[0], g1 = g0 + n_tok;
  auto it = std::lower_bound(drawn.begin(), drawn.end(), g0);
  for (; it != drawn.end() && *it < g1; ++it) {
    const size_t slot = static_cast<size_t>(it - drawn.begin());
    if (filled_[layer][slot]) fail("calibration: position ", *it - base, " of document ", doc_, " was fed twice");
    std::memcpy(rows_[layer].data() + slot * row_, q + static_cast<size_t>(*it - g0) * row_, row_ * sizeof(float));
    filled_[layer][slot] = 1;
    row_pos_[layer][slot] = static_cast<int32_t>(*it - base);
    ++rows_filled_;
  }
}

std::span<const float> QueryCollector::layer_queries(int layer) const {
  if (layer < 0 || layer >= n_layers_) fail("calibration: layer ", layer, " out of range");
  return rows_[layer];
}

void QueryCollector::finish(Calibrator& cal, const kv::RopeGeometry& rope, int stats_rank) {
  const int64_t expected = static_cast<int64_t>(plan_.n_samples()) * n_layers_;
  if (rows_filled_ != expected)
    fail("calibration: ", rows_filled_, " of ", expected, " planned query samples were collected (were all documents fed?)");
  const bool stats = !rope.empty() && stats_rank > 0;
  std::vector<float> unrotated;
  for (int l = 0; l < n_layers_; ++l) {
    cal.add_layer(l, rows_[l].data(), plan_.n_samples());
    if (stats) {
      unrotated.clear();
      for (int i = 0; i < plan_.n_samples(); ++i) {
        if (row_pos_[l][i] < kv::kQueryMomentSinks) continue;  // outliers, as the session's moments
        const float* row = rows_[l].data() + static_cast<size_t>(i) * row_;
        unrotated.insert(unrotated.end(), row, row + row_);
        float* q = unrotated.data() + unrotated.size() - row_;
        rope.rotate(l, -static_cast<double>(row_pos_[l][i]), q, n_head_, head_dim_);
      }
      if (unrotated.empty()) fail("calibration: every query sample is among the first ", kv::kQueryMomentSinks, " positions");
      // A small head keeps every eigenpair it has.
      cal.add_query_stats(l, unrotated.data(), static_cast<int>(unrotated.size() / row_), std::min(stats_rank, head_dim_));
    }
    std::vector<float>().swap(rows_[l]);
    std::vector<uint8_t>().swap(filled_[l]);
    std::vector<int32_t>().swap(row_pos_[l]);
  }
}

// ---- Driving a session ----------------------------------------------------------------------------

namespace {

// Clears the hook even when the forward pass throws.
struct HookGuard {
  Session& s;
  HookGuard(Session& session, QkHook h) : s(session) { s.set_qk_hook(std::move(h)); }
  ~HookGuard() { s.set_qk_hook(nullptr); }
};

}  // namespace

CalibrationRun calibrate_documents(Session& session, const std::vector<std::vector<int32_t>>& docs,
                                   const CollectOptions& opt, const ProgressFn& progress) {
  const ModelConfig& c = session.model().config();
  std::vector<int> lengths;
  for (size_t d = 0; d < docs.size(); ++d) {
    if (docs[d].size() > static_cast<size_t>(session.n_ctx()))
      fail("calibration: document ", d, " has ", docs[d].size(), " tokens, the context holds ", session.n_ctx());
    lengths.push_back(static_cast<int>(docs[d].size()));
  }
  QueryCollector col(c, SamplePlan(lengths, c.n_layers, opt.n_samples, opt.seed));
  const int64_t total = col.plan().n_tokens();
  {
    HookGuard guard(session, col.hook());
    // Chunks of a few hundred tokens: the same matrix-matrix speed as one call, and a live progress line.
    constexpr size_t kChunk = 256;
    int64_t done = 0;
    for (size_t d = 0; d < docs.size(); ++d) {
      session.reset();
      col.begin_document(static_cast<int>(d));
      for (size_t i = 0; i < docs[d].size(); i += kChunk) {
        const size_t n = std::min(kChunk, docs[d].size() - i);
        session.eval(std::span<const int32_t>(docs[d].data() + i, n));
        done += static_cast<int64_t>(n);
        if (progress) progress(done, total);
      }
    }
  }
  session.reset();
  CalibrationRun run{Calibrator(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, opt.rule), col.key_means(),
                     col.plan().n_samples(), total};
  col.finish(run.calibrator, opt.stats_rank > 0 ? rope_geometry(session.model()) : kv::RopeGeometry{}, opt.stats_rank);
  return run;
}

std::vector<std::vector<int32_t>> synthesize_documents(Session& session, const std::vector<std::vector<int32_t>>& prompts,
                                                       const std::vector<int32_t>& end_tokens, const SynthesisOptions& opt,
                                                       const SampleFn& sample, QueryCollector* collector,
                                                       const ProgressFn& progress) {
  if (opt.n_docs <= 0 || opt.doc_len <= 1) fail("calibration: need documents of at least 2 tokens, got ", opt.n_docs, " x ", opt.doc_len);
  if (opt.doc_len > session.n_ctx())
    fail("calibration: documents of ", opt.doc_len, " tokens do not fit the context of ", session.n_ctx());
  if (opt.segment_len < 0) fail("calibration: negative segment length");
  if (prompts.empty()) fail("calibration: no seed prompts");
  for (const auto& p : prompts)
    if (p.empty()) fail("calibration: empty seed prompt");
  if (!sample) fail("calibration: no sampler");
  if (collector) {
    const SamplePlan& plan = collector->plan();
    bool match = plan.n_docs() == opt.n_docs;
    for (int d = 0; match && d < opt.n_docs; ++d) match = plan.doc_length(d) == opt.doc_len;
    if (!match) fail("calibration: the collector's plan does not match ", opt.n_docs, " documents of ", opt.doc_len, " tokens");
  }

  std::optional<HookGuard> guard;
  if (collector) guard.emplace(session, collector->hook());
  const int64_t total = static_cast<int64_t>(opt.n_docs) * opt.doc_len;
  int64_t done = 0;
  size_t next_prompt = 0;
  std::vector<std::vector<int32_t>> docs(opt.n_docs);
  for (int d = 0; d < opt.n_docs; ++d) {
    session.reset();
    if (collector) collector->begin_document(d);
    std::vector<int32_t>& doc = docs[d];
    doc.reserve(opt.doc_len);
    std::span<const float> logits;
    // Feeds tokens (at most what is left of the document) and keeps the last logits.
    auto feed = [&](std::span<const int32_t> toks) {
      toks = toks.first(std::min(toks.size(), static_cast<size_t>(opt.doc_len) - doc.size()));
      doc.insert(doc.end(), toks.begin(), toks.end());
      logits = session.eval(toks);
      done += static_cast<int64_t>(toks.size());
      if (progress) progress(done, total);
    };
    auto next_seed = [&] {
      if (doc.size() > opt.doc_prefix.size() && !opt.separator.empty()) feed(opt.separator);
      if (static_cast<int>(doc.size()) < opt.doc_len) feed(prompts[next_prompt++ % prompts.size()]);
    };
    if (!opt.doc_prefix.empty()) feed(opt.doc_prefix);
    next_seed();
    int sampled = 0;
    while (static_cast<int>(doc.size()) < opt.doc_len) {
      if (opt.segment_len > 0 && sampled >= opt.segment_len) {
        next_seed();
        sampled = 0;
        continue;
      }
      const int32_t t = sample(logits);
      feed(std::span<const int32_t>(&t, 1));
      ++sampled;
      const bool ended = std::find(end_tokens.begin(), end_tokens.end(), t) != end_tokens.end();
      if (ended && static_cast<int>(doc.size()) < opt.doc_len) {
        next_seed();
        sampled = 0;
      }
    }
  }
  session.reset();
  return docs;
}

std::vector<std::vector<int32_t>> cut_documents(const std::vector<std::vector<int32_t>>& texts, int n_docs,
                                                int doc_len) {
  std::vector<std::vector<int32_t>> docs;
  for (size_t piece = 0; static_cast<int>(docs.size()) < n_docs; ++piece) {
    bool any = false;
    for (const auto& t : texts) {
      const size_t begin = piece * static_cast<size_t>(doc_len);
      // Pieces after the first must be worth a document (a quarter of the length at least).
      if (begin >= t.size() || (piece > 0 && t.size() - begin < static_cast<size_t>(doc_len) / 4)) continue;
      const size_t end = std::min(t.size(), begin + doc_len);
      if (end - begin < 2) continue;
      docs.emplace_back(t.begin() + begin, t.begin() + end);
      any = true;
      if (static_cast<int>(docs.size()) == n_docs) break;
    }
    if (!any) break;
  }
  if (docs.empty()) fail("the calibration text is empty after tokenization");
  return docs;
}

}  // namespace qf::calib
