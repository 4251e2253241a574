// qfilters.evaluate: the engine's evaluations (streaming perplexity, needle in a haystack,
// attention fidelity) on texts given from Python. Each returns the summary JSON the CLI writes
// (`qf eval ...`), which the Python side turns into plain dicts and lists. Ctrl-C stops a run at
// its next progress step (KeyboardInterrupt); the cell log is a temporary file the caller removes.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "eval/engine.h"
#include "eval/fidelity.h"
#include "eval/niah.h"
#include "eval/ppl.h"
#include "eval/progress.h"
#include "eval/results.h"
#include "util/error.h"

namespace qf::py {

namespace {

using Texts = std::vector<std::pair<std::string, std::string>>;  // (name, text)

// The context every evaluation shares; `filters` must outlive it.
struct Setup {
  eval::EvalContext ctx;
  std::vector<std::string> policies;
};

Setup make_setup(PyModel& m, const std::vector<float>& filters, const std::vector<std::string>& policies,
                 uint64_t seed, int snapkv_window, bool progress) {
  const ModelConfig& c = m.engine.model().config();
  if (!filters.empty() && filters.size() != size_t(c.n_layers) * c.n_kv_heads * c.head_dim)
    fail("the filters' shape does not match the model (", c.n_layers, " x ", c.n_kv_heads, " x ", c.head_dim, ")");
  Setup s;
  s.ctx.model = &m.engine.model();
  s.ctx.n_threads = m.engine.pool().size();
  s.ctx.n_batch = m.engine.options().n_batch;
  s.ctx.policy_options.seed = seed;
  s.ctx.policy_options.snapkv_window = snapkv_window;
  s.ctx.policy_options.filters = filters;
  s.ctx.progress = progress;
  for (const auto& p : policies) {
    if (std::find(s.policies.begin(), s.policies.end(), p) != s.policies.end()) continue;
    if (p != "none") eval::check_policy(s.ctx, p);  // unknown names, qfilters without filters
    s.policies.push_back(p);
  }
  if (s.policies.empty()) fail("give at least one policy");
  return s;
}

// Tokenizes texts in order until `n` of them hold `n_tokens` tokens (as qf eval does).
std::vector<eval::TokenDoc> token_docs(const Tokenizer& tok, const Texts& texts, int n, int n_tokens) {
  std::vector<eval::TokenDoc> all;
  int long_enough = 0;
  for (const auto& [name, text] : texts) {
    if (long_enough == n) break;
    all.push_back({name, tok.encode(text, true, false)});
    long_enough += static_cast<int>(all.back().tokens.size()) >= n_tokens;
  }
  return eval::select_docs(all, n, n_tokens);
}

nlohmann::json settings_key(const PyModel& m, const nlohmann::json& eval_settings) {
  return {{"model_fingerprint", m.engine.model().config().fingerprint()}, {"eval", eval_settings}};
}

std::string perplexity(PyModel& m, const Texts& texts, const std::vector<std::string>& policies,
                       const std::vector<float>& filters, const std::vector<int>& budgets, int window, int evict_every,
                       int n_tokens, int n_docs, int skip_layers, uint64_t seed, const std::string& log_path,
                       bool progress) {
  eval::PplSettings st;
  st.budgets = budgets;
  st.window = window;
  st.evict_every = evict_every;
  st.n_tokens = n_tokens;
  st.n_docs = n_docs;
  st.skip_layers = skip_layers;
  st.validate();
  Setup s = make_setup(m, filters, policies, seed, 64, progress);
  if (std::find(s.policies.begin(), s.policies.end(), "none") == s.policies.end())
    s.policies.insert(s.policies.begin(), "none");  // the reference every gap is measured against
  nb::gil_scoped_release nogil;
  std::lock_guard lock(m.compute);
  const eval::ScopedInterruptPoll ctrl_c(check_interrupt_nogil);
  const auto docs = token_docs(m.tokenizer, texts, n_docs, n_tokens);
  eval::CellLog log(log_path, settings_key(m, st.to_json()), false);
  eval::run_ppl(s.ctx, docs, st, s.policies, log);
  return eval::summarize_ppl(log, docs, st, s.policies).json.dump();
}

std::string needle(PyModel& m, const Texts& texts, const std::vector<std::string>& policies,
                   const std::vector<float>& filters, const std::vector<int>& lengths, int n_depths,
                   const std::vector<int>& compressions, const std::vector<int>& skip_layers,
                   const std::vector<int>& digits, const std::vector<uint64_t>& needle_seed,
                   std::optional<bool> chat, uint64_t seed, const std::string& log_path, bool progress) {
  eval::NiahSettings st;
  st.lengths = lengths;
  st.n_depths = n_depths;
  st.compressions = compressions;
  st.skip_layers = skip_layers;  // every combination is run (a sweep), as qf eval niah's lists
  st.digits = digits;
  st.seeds = needle_seed;
  st.chat = chat ? int(*chat) : -1;
  st.validate();
  Setup s = make_setup(m, filters, policies, seed, 64, progress);
  std::string haystack;
  for (const auto& [name, text] : texts) haystack += (haystack.empty() ? "" : "\n\n") + text;
  nb::gil_scoped_release nogil;
  std::lock_guard lock(m.compute);
  const eval::ScopedInterruptPoll ctrl_c(check_interrupt_nogil);
  eval::CellLog log(log_path, settings_key(m, st.to_json()), false);
  eval::run_niah(s.ctx, m.tokenizer, haystack, st, s.policies, log);
  return eval::summarize_niah(log, st, s.policies, m.engine.model().config().n_ctx_train).json.dump();
}

std::string fidelity(PyModel& m, const Texts& texts, const std::vector<std::string>& policies,
                     const std::vector<float>& filters, int n_tokens, int n_docs, uint64_t seed,
                     const std::string& log_path, bool progress) {
  eval::FidelitySettings st;
  st.n_tokens = n_tokens;
  st.n_docs = n_docs;
  st.validate();
  Setup s = make_setup(m, filters, policies, seed, 64, progress);
  std::erase(s.policies, std::string("none"));
  nb::gil_scoped_release nogil;
  std::lock_guard lock(m.compute);
  const eval::ScopedInterruptPoll ctrl_c(check_interrupt_nogil);
  const auto docs = token_docs(m.tokenizer, texts, n_docs, n_tokens);
  eval::CellLog log(log_path, settings_key(m, st.to_json()), false);
  eval::run_fidelity(s.ctx, docs, st, s.policies, log);
  return eval::summarize_fidelity(s.ctx, log, docs, st, s.policies).json.dump();
}

}  // namespace

void bind_evaluate(nb::module_& m) {
  m.def("eval_perplexity", &perplexity, nb::arg("model"), nb::arg("texts"), nb::arg("policies"), nb::arg("filters"),
        nb::arg("budgets"), nb::arg("window"), nb::arg("evict_every"), nb::arg("n_tokens"), nb::arg("n_docs"),
        nb::arg("skip_layers"), nb::arg("seed"), nb::arg("log_path"), nb::arg("progress"));
  m.def("eval_needle", &needle, nb::arg("model"), nb::arg("texts"), nb::arg("policies"), nb::arg("filters"),
        nb::arg("lengths"), nb::arg("n_depths"), nb::arg("compressions"), nb::arg("skip_layers"), nb::arg("digits"),
        nb::arg("needle_seed"), nb::arg("chat").none(), nb::arg("seed"), nb::arg("log_path"), nb::arg("progress"));
  m.def("eval_fidelity", &fidelity, nb::arg("model"), nb::arg("texts"), nb::arg("policies"), nb::arg("filters"),
        nb::arg("n_tokens"), nb::arg("n_docs"), nb::arg("seed"), nb::arg("log_path"), nb::arg("progress"));
}

}  // namespace qf::py
