// qfilters.Session: one sequence with its (compressed) KV cache, evaluated and sampled from
// Python. Compute runs with the GIL released; Ctrl-C is checked between forward chunks.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kv/compressor.h"
#include "runtime/session_state.h"
#include "sample/sampler.h"
#include "util/error.h"

namespace qf::py {

namespace {

// KV storage types arrive with the kvtypes work (KvOptions::cache_type_k/v); until this build has
// them, asking for one is an error rather than silently ignored.
template <typename T>
void set_cache_type(T& kv, const std::string& k, const std::string& v) {
  if constexpr (requires { kv.cache_type_k = k; kv.cache_type_v = v; }) {
    if (!k.empty()) kv.cache_type_k = k;
    if (!v.empty()) kv.cache_type_v = v;
  } else {
    if (!k.empty() || !v.empty()) fail("cache_type_k / cache_type_v are not supported by this build of qfilters");
  }
}

runtime::KvOptions kv_options(const nb::dict& d) {
  runtime::KvOptions kv;
  auto get = [&]<typename T>(const char* key, T& out) {
    if (d.contains(key) && !d[key].is_none()) out = nb::cast<T>(d[key]);
  };
  get("policy", kv.policy);
  get("filters", kv.filters);
  get("filter_layout", kv.filter_layout);
  get("filter_sign", kv.filter_sign);
  get("budget", kv.budget);
  get("window", kv.window);
  get("evict_every", kv.evict_every);
  get("ratio", kv.ratio);
  get("skip_layers", kv.skip_layers);
  get("layer_weights", kv.layer_weights);
  get("seed", kv.seed);
  get("future_positions", kv.query_stats.future_positions);
  get("filter_blend", kv.query_stats.filter_blend);
  get("filter_horizon", kv.query_stats.filter_horizon);
  get("filter_decay", kv.query_stats.filter_decay);
  std::string ctk, ctv;
  get("cache_type_k", ctk);
  get("cache_type_v", ctv);
  set_cache_type(kv, ctk, ctv);
  return kv;
}

using Logits = nb::ndarray<nb::numpy, float>;

// A float array owned by Python (capsule frees it), shaped `shape`.
Logits new_array(std::vector<size_t> shape, float** data) {
  size_t n = 1;
  for (size_t s : shape) n *= s;
  float* buf = new float[n];
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  *data = buf;
  return Logits(buf, shape.size(), shape.data(), owner);
}

class PySession {
 public:
  PySession(PyModel& model, const nb::dict& kv, int n_ctx) : model_(model) {
    const runtime::KvOptions opt = kv_options(kv);
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    session_ = model_.engine.new_session(opt, n_ctx);
  }

  // Appends tokens; returns the last token's logits, or every token's ([n][n_vocab]).
  Logits eval(const std::vector<int32_t>& tokens, bool all_logits) {
    if (tokens.empty()) fail("eval needs at least one token");
    const size_t V = static_cast<size_t>(model_.engine.model().config().n_vocab);
    float* out = nullptr;
    Logits arr = all_logits ? new_array({tokens.size(), V}, &out) : new_array({V}, &out);
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    const size_t chunk = static_cast<size_t>(model_.engine.options().n_batch);
    for (size_t i = 0; i < tokens.size(); i += chunk) {
      check_interrupt_nogil();
      const size_t n = std::min(chunk, tokens.size() - i);
      std::span<const float> l = session_->eval(std::span(tokens).subspan(i, n), all_logits);
      note(std::span(tokens).subspan(i, n));
      if (all_logits) std::memcpy(out + i * V, l.data(), l.size_bytes());
      else if (i + n == tokens.size()) std::memcpy(out, l.data(), V * sizeof(float));
    }
    return arr;
  }

  // A prompt: applies prefill compression (KVConfig.ratio) at its end.
  Logits prefill(const std::vector<int32_t>& tokens) {
    const size_t V = static_cast<size_t>(model_.engine.model().config().n_vocab);
    float* out = nullptr;
    Logits arr = new_array({V}, &out);
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    std::span<const float> l = session_->prefill(tokens);
    note(tokens);
    std::memcpy(out, l.data(), V * sizeof(float));
    return arr;
  }

  // The session's state file (runtime/session_state.h): cache, position and the tokens read.
  void save_state(const std::string& path) {
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    runtime::save_state_file(path, *session_, fingerprint(), history_);
  }

  void load_state(const std::string& path) {
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    history_ = runtime::load_state_file(path, *session_, fingerprint()).tokens;
  }

  const std::vector<int32_t>& tokens() const { return history_; }

  // The tokens the session has read, kept for save_state (call with the compute lock held).
  void note(std::span<const int32_t> tokens) { history_.insert(history_.end(), tokens.begin(), tokens.end()); }
  void forget() { history_.clear(); }

  // The methods below wait for a computation running in another thread (the lock is taken with
  // the GIL released, as everywhere: a thread computing may need the GIL to check for Ctrl-C).
  void reset() {
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    session_->reset();
    history_.clear();
  }

  nb::dict kv_stats() const {
    int64_t n_past, used, reserved, full;
    std::string policy = "none", summary;
    kv::CompressionStats st;
    {
      nb::gil_scoped_release nogil;
      std::lock_guard lock(model_.compute);
      const kv::Cache& c = session_->cache();
      n_past = session_->n_past();
      used = c.bytes_used();
      reserved = c.bytes_reserved();
      full = c.full_cache_bytes(n_past);
      if (const kv::Compressor* comp = session_->compressor()) {
        policy = comp->policy().name();
        st = comp->stats();
      }
      summary = runtime::kv_summary(*session_);
    }
    nb::dict d;
    d["n_past"] = n_past;
    d["bytes_used"] = used;
    d["bytes_reserved"] = reserved;
    d["full_cache_bytes"] = full;
    d["policy"] = policy;
    d["evicted"] = st.evicted;
    d["evictions"] = st.evictions;
    d["score_seconds"] = st.score_seconds;
    d["evict_seconds"] = st.evict_seconds;
    d["summary"] = summary;
    return d;
  }

  // Positions each (layer, KV head) holds: [layer][kv_head][slot], increasing.
  std::vector<std::vector<std::vector<int32_t>>> kv_positions() const {
    nb::gil_scoped_release nogil;
    std::lock_guard lock(model_.compute);
    const kv::Cache& c = session_->cache();
    std::vector<std::vector<std::vector<int32_t>>> out(c.shape().n_layers);
    for (int l = 0; l < c.shape().n_layers; ++l)
      for (int h = 0; h < c.shape().n_kv_heads; ++h) {
        const kv::HeadCache& hc = c.head(l, h);
        out[l].emplace_back(hc.pos.begin(), hc.pos.begin() + hc.n);
      }
    return out;
  }

  PyModel& model() { return model_; }
  Session& session() { return *session_; }

 private:
  // The model's fingerprint, hashed on first use (call with the compute lock held).
  const std::string& fingerprint() {
    if (fingerprint_.empty()) fingerprint_ = runtime::model_fingerprint(model_.engine.model());
    return fingerprint_;
  }

  PyModel& model_;
  std::unique_ptr<Session> session_;
  std::vector<int32_t> history_;  // tokens read since the last reset (or restored)
  std::string fingerprint_;
};

// One generation, one token per next(): the Python side iterates it (streaming, stop strings), so
// Ctrl-C is seen between tokens. The session is reset first; the prompt counts for the penalties.
class Generation {
 public:
  Generation(PySession& s, std::vector<int32_t> prompt, const SamplerOptions& sampling, int max_tokens, bool ignore_eos)
      : s_(s), prompt_(std::move(prompt)), sampler_(sampling), stream_(s.model().tokenizer),
        max_tokens_(max_tokens), ignore_eos_(ignore_eos) {
    if (prompt_.empty()) fail("the prompt is empty after tokenization");
    if (max_tokens_ < 0) fail("max_tokens must be >= 0");
    const int n_ctx = s_.session().n_ctx();
    if (static_cast<int>(prompt_.size()) >= n_ctx)
      fail("prompt has ", prompt_.size(), " tokens, the context holds ", n_ctx, " (raise n_ctx or shorten the prompt)");
    for (int32_t id : prompt_) sampler_.accept(id);
  }

  // The next piece of text as bytes ("" while a UTF-8 character is incomplete; a model may also
  // produce invalid UTF-8, which Python decodes with replacement), or None when done.
  std::optional<nb::bytes> next() {
    if (done_) return std::nullopt;
    if (n_gen_ >= max_tokens_) return finish("length");
    const Tokenizer& tok = s_.model().tokenizer;
    int32_t token;
    {
      nb::gil_scoped_release nogil;
      std::lock_guard lock(s_.model().compute);
      Session& s = s_.session();
      if (!started_) {
        s.reset();
        s_.forget();
        logits_ = s.prefill(prompt_);
        s_.note(prompt_);
        started_ = true;
      } else {
        logits_ = s.decode(last_);
        s_.note(std::span<const int32_t>(&last_, 1));
      }
      token = sampler_.sample_and_accept(logits_);
    }
    ++n_gen_;
    if (tok.is_eog(token) && !ignore_eos_) return finish("stop");
    tokens_.push_back(token);
    last_ = token;
    std::string text = stream_.push(token);
    if (s_.session().n_past() >= s_.session().n_ctx()) {
      finish_reason_ = "length";
      done_ = true;
      text += stream_.flush();
    }
    return nb::bytes(text.data(), text.size());
  }

  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::string& finish_reason() const { return finish_reason_; }
  int prompt_tokens() const { return static_cast<int>(prompt_.size()); }

 private:
  std::optional<nb::bytes> finish(const char* reason) {
    done_ = true;
    finish_reason_ = reason;
    const std::string rest = stream_.flush();
    return nb::bytes(rest.data(), rest.size());
  }

  PySession& s_;
  std::vector<int32_t> prompt_;
  Sampler sampler_;
  StreamDecoder stream_;
  int max_tokens_;
  bool ignore_eos_;
  bool started_ = false, done_ = false;
  int n_gen_ = 0;
  int32_t last_ = 0;
  std::span<const float> logits_;
  std::vector<int32_t> tokens_;
  std::string finish_reason_;
};

SamplerOptions sampler_options(float temperature, int top_k, float top_p, float min_p, float repeat_penalty,
                               int repeat_last_n, float presence_penalty, float frequency_penalty,
                               std::optional<uint64_t> seed) {
  SamplerOptions o;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  o.min_p = min_p;
  o.repeat_penalty = repeat_penalty;
  o.repeat_last_n = repeat_last_n;
  o.presence_penalty = presence_penalty;
  o.frequency_penalty = frequency_penalty;
  o.seed = seed ? *seed : random_seed();
  return o;
}

}  // namespace

void bind_session(nb::module_& m) {
  nb::class_<PySession>(m, "Session")
      .def(nb::init<PyModel&, const nb::dict&, int>(), nb::arg("model"), nb::arg("kv"), nb::arg("n_ctx") = 0,
           nb::keep_alive<1, 2>())
      .def("eval", &PySession::eval, nb::arg("tokens"), nb::arg("all_logits") = false)
      .def("prefill", &PySession::prefill, nb::arg("tokens"))
      .def("reset", &PySession::reset)
      .def("kv_stats", &PySession::kv_stats)
      .def("kv_positions", &PySession::kv_positions)
      .def("save_state", &PySession::save_state, nb::arg("path"))
      .def("load_state", &PySession::load_state, nb::arg("path"))
      .def_prop_ro("tokens", &PySession::tokens)
      .def_prop_ro("n_past", [](PySession& s) { return s.session().n_past(); })
      .def_prop_ro("n_ctx", [](PySession& s) { return s.session().n_ctx(); });

  nb::class_<Generation>(m, "Generation")
      .def("__init__",
           [](Generation* g, PySession& s, std::vector<int32_t> prompt, int max_tokens, float temperature, int top_k,
              float top_p, float min_p, float repeat_penalty, int repeat_last_n, float presence_penalty,
              float frequency_penalty, std::optional<uint64_t> seed, bool ignore_eos) {
             new (g) Generation(s, std::move(prompt),
                                sampler_options(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                                                presence_penalty, frequency_penalty, seed),
                                max_tokens, ignore_eos);
           },
           nb::arg("session"), nb::arg("prompt"), nb::arg("max_tokens"), nb::arg("temperature"), nb::arg("top_k"),
           nb::arg("top_p"), nb::arg("min_p"), nb::arg("repeat_penalty"), nb::arg("repeat_last_n"),
           nb::arg("presence_penalty"), nb::arg("frequency_penalty"), nb::arg("seed").none(),
           nb::arg("ignore_eos"), nb::keep_alive<1, 2>())
      .def("next", &Generation::next)
      .def_prop_ro("tokens", &Generation::tokens)
      .def_prop_ro("finish_reason", &Generation::finish_reason)
      .def_prop_ro("prompt_tokens", &Generation::prompt_tokens);
}

}  // namespace qf::py
