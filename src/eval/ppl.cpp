#include "eval/ppl.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "eval/metrics.h"
#include "eval/progress.h"
#include "util/error.h"

namespace qf::eval {

using nlohmann::json;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string cell_key(const std::string& doc, int budget, const std::string& policy) {
  return doc + "|" + std::to_string(budget) + "|" + policy;
}

json nll_json(const std::vector<double>& nll) {
  json a = json::array();
  for (double x : nll) a.push_back(round_to(x, 5));
  return a;
}

std::vector<double> nll_from(const json& cell) {
  std::vector<double> v;
  for (const auto& x : cell.at("nll")) v.push_back(x.get<double>());
  return v;
}

// NLL summed over one document's targets (from some position on).
struct DocNll {
  double sum = 0;
  int64_t n = 0;
};

// Perplexity of the pooled targets of the documents listed in ix (repetitions count again).
double pooled_ppl(const std::vector<DocNll>& docs, std::span<const int> ix) {
  double sum = 0;
  int64_t n = 0;
  for (int i : ix) sum += docs[i].sum, n += docs[i].n;
  return n ? std::exp(sum / static_cast<double>(n)) : NAN;
}

// Relative cost of a token processed in a batch vs one decoding step, for the ETA only.
constexpr double kBatchedTokenCost = 0.1;

}  // namespace

json PplSettings::to_json() const {
  return {{"budgets", budgets}, {"window", window},   {"evict_every", evict_every}, {"n_tokens", n_tokens},
          {"n_docs", n_docs},   {"skip_layers", skip_layers}};
}

void PplSettings::validate() const {
  if (budgets.empty()) fail("ppl: give at least one budget");
  if (n_tokens < 2) fail("ppl: --tokens must be >= 2");
  if (n_docs < 1) fail("ppl: --docs must be >= 1");
  if (curve_bin < 1) fail("ppl: curve bin must be >= 1");
  for (int b : budgets) {
    if (b <= window) fail("ppl: budget ", b, " must exceed the window (", window, ")");
    if (b >= n_tokens - 1) fail("ppl: budget ", b, " leaves nothing to evict in ", n_tokens, "-token documents");
    if (evict_every > b - window) fail("ppl: --evict-every ", evict_every, " exceeds budget - window for budget ", b);
  }
  if (evict_every < 1) fail("ppl: --evict-every must be >= 1");
  if (skip_layers < 0) fail("ppl: --skip-layers must be >= 0");
}

std::vector<TokenDoc> select_docs(const std::vector<TokenDoc>& all, int n_docs, int n_tokens) {
  std::vector<TokenDoc> out;
  for (const TokenDoc& d : all) {
    if (static_cast<int>(out.size()) == n_docs) break;
    if (static_cast<int>(d.tokens.size()) < n_tokens) continue;
    out.push_back({d.name, {d.tokens.begin(), d.tokens.begin() + n_tokens}});
  }
  if (static_cast<int>(out.size()) < n_docs)
    fail("only ", out.size(), " evaluation documents hold ", n_tokens, " tokens, ", n_docs, " wanted");
  return out;
}

void run_ppl(const EvalContext& ctx, const std::vector<TokenDoc>& docs, const PplSettings& st,
             const std::vector<std::string>& policies, CellLog& log) {
  st.validate();
  for (const auto& p : policies) check_policy(ctx, p);
  const int N = st.n_tokens;
  const int n_vocab = ctx.model->config().n_vocab;
  std::vector<std::string> compressed;
  for (const auto& p : policies)
    if (p != "none") compressed.push_back(p);

  // ETA units: one decoding step = 1.
  Progress bar("ppl", 0, ctx.progress);
  for (const TokenDoc& d : docs) {
    const double full = N * kBatchedTokenCost;
    if (log.has(cell_key(d.name, 0, "none"))) bar.skip(full); else bar.add_total(full);
    for (int b : st.budgets)
      for (const auto& p : compressed) {
        const double u = b * kBatchedTokenCost / compressed.size() + (N - 1 - b);
        bar.add_total(u);
        if (log.has(cell_key(d.name, b, p))) bar.skip(u);
      }
  }

  for (const TokenDoc& d : docs) {
    if (static_cast<int>(d.tokens.size()) != N) fail("ppl: document ", d.name, " is not ", N, " tokens long");
    const std::string full_key = cell_key(d.name, 0, "none");
    if (!log.has(full_key)) {
      const auto t0 = std::chrono::steady_clock::now();
      auto s = new_session(ctx, N, "none", {});
      std::vector<double> nll(N - 1);
      // Chunks keep the all-logits buffer small (n_batch x n_vocab). Every pass of this
      // evaluation uses the decode engine (TokenKind::decode), the one the policies' token loops
      // below run: the full cache and the shared prefixes then give each policy's session
      // exactly the numbers it would compute itself, so a gap is the policy's, never the
      // difference between the AMX prompt engine and the decode engine (~0.2% of perplexity).
      for (int i = 0; i < N - 1; i += ctx.n_batch) {
        poll_interrupt();  // a long document advances the bar only at its end
        const int m = std::min(ctx.n_batch, N - 1 - i);
        std::span<const float> logits = s->eval(std::span<const int32_t>(d.tokens.data() + i, m), true, TokenKind::decode);
        for (int t = 0; t < m; ++t)
          nll[i + t] = token_nll(logits.subspan(static_cast<size_t>(t) * n_vocab, n_vocab), d.tokens[i + t + 1]);
      }
      log.add(full_key, {{"doc", d.name}, {"budget", 0}, {"policy", "none"}, {"first_target", 1},
                         {"nll", nll_json(nll)}, {"seconds", round_to(seconds_since(t0), 3)}});
      bar.advance(N * kBatchedTokenCost, d.name + " full cache");
    }

    for (int b : st.budgets) {
      std::vector<std::string> todo;
      for (const auto& p : compressed)
        if (!log.has(cell_key(d.name, b, p))) todo.push_back(p);
      if (todo.empty()) continue;
      // The first b tokens: no eviction yet, identical for every policy. Two bases, so that each
      // policy's cache is bit for bit what its own session computes: score-only policies run the
      // fused attention kernel, attention-based ones the kernel that records weights. Policies
      // that score each key as it enters the cache (qfilters, knorm) read the prefix in their
      // own session: a copied cache holds only the rounded keys, not the scores of the F32 ones.
      const auto t_base = std::chrono::steady_clock::now();
      std::vector<std::string> plain, attn;
      for (const auto& p : todo)
        if (!policy_needs(ctx, p).key_scores) (is_attention_policy(ctx, p) ? attn : plain).push_back(p);
      std::unique_ptr<Session> base_plain, base_attn;
      if (!plain.empty()) {
        base_plain = new_session(ctx, N, "none", {}, union_needs(ctx, plain));  // query moments only
        base_plain->eval(std::span<const int32_t>(d.tokens.data(), b), false, TokenKind::decode);
      }
      if (!attn.empty()) {
        base_attn = new_session(ctx, N, "none", {}, union_needs(ctx, attn));
        base_attn->eval(std::span<const int32_t>(d.tokens.data(), b), false, TokenKind::decode);
      }
      const double base_seconds = seconds_since(t_base);
      const double shared = static_cast<double>(std::max<size_t>(1, plain.size() + attn.size()));

      for (const auto& p : todo) {
        const auto t0 = std::chrono::steady_clock::now();
        kv::CompressionConfig cc;
        cc.budget = b;
        cc.window = st.window;
        cc.evict_every = st.evict_every;
        cc.skip_layers = st.skip_layers;
        auto s = new_session(ctx, N, p, cc);
        const bool keyed = policy_needs(ctx, p).key_scores;
        if (keyed) s->eval(std::span<const int32_t>(d.tokens.data(), b), false, TokenKind::decode);
        else s->copy_state_from(is_attention_policy(ctx, p) ? *base_attn : *base_plain);
        std::vector<double> nll;
        nll.reserve(N - 1 - b);
        const std::string note = d.name + " B=" + std::to_string(b) + " " + p;
        for (int t = b; t < N - 1; ++t) {
          // One token at a time, as generation decodes (TokenKind::decode: the prompt engine
          // would only be slower for single tokens).
          std::span<const float> logits = s->decode(d.tokens[t]);
          nll.push_back(token_nll(logits, d.tokens[t + 1]));
          bar.advance(1, note);
        }
        const kv::CompressionStats& cs = s->compressor()->stats();
        log.add(cell_key(d.name, b, p),
                {{"doc", d.name}, {"budget", b}, {"policy", p}, {"first_target", b + 1}, {"nll", nll_json(nll)},
                 {"seconds", round_to(seconds_since(t0) + (keyed ? 0.0 : base_seconds / shared), 3)},
                 {"evicted", cs.evicted}, {"score_seconds", round_to(cs.score_seconds, 4)},
                 {"evict_seconds", round_to(cs.evict_seconds, 4)}});
        bar.advance(b * kBatchedTokenCost / compressed.size());
      }
    }
  }
  bar.finish();
}

PplSummary summarize_ppl(const CellLog& log, const std::vector<TokenDoc>& docs, const PplSettings& st,
                         const std::vector<std::string>& policies) {
  const int N = st.n_tokens;
  PplSummary out;
  json results = json::array(), curve = json::array();
  std::ostringstream csv, ccsv;
  csv << "budget,policy,ppl_all,ppl_after_budget,ppl_after_budget_lo,ppl_after_budget_hi,gap_ratio_after_budget,"
         "gap_ratio_lo,gap_ratio_hi,gap_minus_h2o,gap_minus_h2o_lo,gap_minus_h2o_hi,gap_ratio_all,n_targets,n_targets_after_budget,"
         "docs,evicted,seconds\n";
  ccsv << "budget,policy,position_start,position_end,mean_nll\n";
  csv.precision(6);
  ccsv.precision(6);

  for (int b : st.budgets) {
    // Per policy: NLL of every target of every document, position t at index t-1.
    struct Row {
      std::string policy;
      std::vector<std::vector<double>> per_doc;
      double seconds = 0;
      int64_t evicted = 0;
    };
    std::vector<Row> rows;
    for (const auto& p : policies) {
      Row r{p, {}, 0, 0};
      bool complete = true;
      for (const TokenDoc& d : docs) {
        const std::string fk = cell_key(d.name, 0, "none");
        if (!log.has(fk)) { complete = false; break; }
        std::vector<double> nll = nll_from(log.get(fk));
        if (p != "none") {
          const std::string k = cell_key(d.name, b, p);
          if (!log.has(k)) { complete = false; break; }
          const json& c = log.get(k);
          const std::vector<double> tail = nll_from(c);
          if (static_cast<int>(tail.size()) != N - 1 - b) fail("ppl: cell ", k, " has ", tail.size(), " targets");
          std::copy(tail.begin(), tail.end(), nll.begin() + b);
          r.seconds += c.value("seconds", 0.0);
          r.evicted += c.value("evicted", int64_t{0});
        } else {
          r.seconds += log.get(fk).value("seconds", 0.0);
        }
        r.per_doc.push_back(std::move(nll));
      }
      if (complete) rows.push_back(std::move(r));
    }
    auto pooled = [&](const Row& r, int first_target) {
      std::vector<double> v;
      for (const auto& nll : r.per_doc) v.insert(v.end(), nll.begin() + (first_target - 1), nll.end());
      return v;
    };
    auto find = [&](const std::string& p) -> const Row* {
      for (const auto& r : rows)
        if (r.policy == p) return &r;
      return nullptr;
    };
    // Per document NLL sums, so a bootstrap resample of documents pools them without copying.
    auto doc_sums = [&](const Row* r, int first_target) {
      std::vector<DocNll> v;
      if (!r) return v;
      for (const auto& nll : r->per_doc) {
        DocNll d;
        for (size_t t = first_target - 1; t < nll.size(); ++t) d.sum += nll[t], ++d.n;
        v.push_back(d);
      }
      return v;
    };
    const Row* full = find("none");
    const Row* streaming = find("streaming");
    const Row* h2o = find("h2o");
    const std::vector<DocNll> full_after_d = doc_sums(full, b + 1), str_after_d = doc_sums(streaming, b + 1),
                              h2o_after_d = doc_sums(h2o, b + 1);
    const double full_all = full ? perplexity(pooled(*full, 1)) : NAN;
    const double full_after = full ? perplexity(pooled(*full, b + 1)) : NAN;
    const double str_all = streaming ? perplexity(pooled(*streaming, 1)) : NAN;
    const double str_after = streaming ? perplexity(pooled(*streaming, b + 1)) : NAN;
    const double h2o_after = h2o ? perplexity(pooled(*h2o, b + 1)) : NAN;
    for (const Row& r : rows) {
      const std::vector<double> all = pooled(r, 1), after = pooled(r, b + 1);
      const double ppl_all = perplexity(all), ppl_after = perplexity(after);
      const double gap_after = gap_ratio(ppl_after, full_after, str_after);
      const double gap_all = gap_ratio(ppl_all, full_all, str_all);
      // Intervals: the same resampled documents for the policy, the full cache and streaming
      // (paired), so the document-to-document variation common to all policies cancels.
      const std::vector<DocNll> mine = doc_sums(&r, b + 1);
      const int nd = static_cast<int>(mine.size());
      const Interval ppl_ci = bootstrap_ci(nd, [&](std::span<const int> ix) { return pooled_ppl(mine, ix); });
      const Interval gap_ci = bootstrap_ci(nd, [&](std::span<const int> ix) {
        return full && streaming ? gap_ratio(pooled_ppl(mine, ix), pooled_ppl(full_after_d, ix), pooled_ppl(str_after_d, ix))
                                 : NAN;
      });
      // Gap ratio minus H2O's (the target): an interval excluding 0 is a difference
      // larger than the document-to-document noise.
      const double vs_h2o = full && streaming && h2o ? gap_after - gap_ratio(h2o_after, full_after, str_after) : NAN;
      const Interval vs_h2o_ci = bootstrap_ci(nd, [&](std::span<const int> ix) {
        if (!(full && streaming && h2o)) return static_cast<double>(NAN);
        const double f = pooled_ppl(full_after_d, ix), st = pooled_ppl(str_after_d, ix);
        return gap_ratio(pooled_ppl(mine, ix), f, st) - gap_ratio(pooled_ppl(h2o_after_d, ix), f, st);
      });
      results.push_back({{"budget", b},
                         {"policy", r.policy},
                         {"ppl_all", json_number(ppl_all)},
                         {"ppl_after_budget", json_number(ppl_after)},
                         {"ppl_after_budget_ci", {json_number(ppl_ci.lo), json_number(ppl_ci.hi)}},
                         {"gap_ratio_after_budget", json_number(gap_after)},
                         {"gap_ratio_after_budget_ci", {json_number(gap_ci.lo), json_number(gap_ci.hi)}},
                         {"gap_minus_h2o", json_number(vs_h2o)},
                         {"gap_minus_h2o_ci", {json_number(vs_h2o_ci.lo), json_number(vs_h2o_ci.hi)}},
                         {"gap_ratio_all", json_number(gap_all)},
                         {"n_targets", all.size()},
                         {"n_targets_after_budget", after.size()},
                         {"docs", r.per_doc.size()},
                         {"evicted", r.evicted},
                         {"seconds", round_to(r.seconds, 2)}});
      auto num = [](double x) { return std::isfinite(x) ? std::to_string(x) : std::string(); };
      csv << b << ',' << r.policy << ',' << num(ppl_all) << ',' << num(ppl_after) << ',' << num(ppl_ci.lo) << ','
          << num(ppl_ci.hi) << ',' << num(gap_after) << ',' << num(gap_ci.lo) << ',' << num(gap_ci.hi) << ','
          << num(vs_h2o) << ',' << num(vs_h2o_ci.lo) << ',' << num(vs_h2o_ci.hi) << ',' << num(gap_all) << ',' << all.size() << ',' << after.size() << ',' << r.per_doc.size() << ',' << r.evicted
          << ',' << round_to(r.seconds, 2) << '\n';
      // Curve: mean NLL over documents and over the positions of each bin.
      json pts = json::array();
      for (int t0 = 1; t0 < N; t0 += st.curve_bin) {
        const int t1 = std::min(N, t0 + st.curve_bin);  // targets [t0, t1)
        double sum = 0;
        int cnt = 0;
        for (const auto& nll : r.per_doc)
          for (int t = t0; t < t1; ++t) sum += nll[t - 1], ++cnt;
        const double m = sum / cnt;
        pts.push_back({t0, t1 - 1, round_to(m, 5)});
        ccsv << b << ',' << r.policy << ',' << t0 << ',' << t1 - 1 << ',' << m << '\n';
      }
      curve.push_back({{"budget", b}, {"policy", r.policy}, {"points", pts}});
    }
  }
  std::vector<std::string> names;
  for (const auto& d : docs) names.push_back(d.name);
  out.json = {{"evaluation", "ppl"}, {"settings", st.to_json()}, {"policies", policies}, {"docs", names},
              {"curve_columns", {"position_start", "position_end", "mean_nll"}},
              {"results", results}, {"curve", curve}};
  out.csv = csv.str();
  out.curve_csv = ccsv.str();
  return out;
}

}  // namespace qf::eval
