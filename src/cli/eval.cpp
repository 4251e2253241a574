// qf eval: streaming perplexity, needle in a haystack and attention fidelity of every KV policy
// on held-out text. Each writes, under --out, a JSON-lines file of finished cells (an interrupted
// sweep resumes from it) and the summaries: <eval>.json, <eval>.csv and the per-position /
// per-cell / per-head CSV that scripts/plot_results.py draws.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "calib/filter_file.h"
#include "calib/filters.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "eval/corpus.h"
#include "eval/engine.h"
#include "eval/fidelity.h"
#include "eval/niah.h"
#include "eval/ppl.h"
#include "eval/results.h"
#include "kv/policy.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf::cli {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

struct CommonOptions {
  ModelOptions model;
  std::string filters;
  std::vector<std::string> policies;  // empty = every policy (qfilters only with --filters)
  std::vector<std::string> data{"data/sotu"};
  int min_year = 2000, max_year = 0;
  std::string out;
  bool fresh = false, quick = false, no_progress = false;
  uint64_t seed = 0;  // random policy
  int snapkv_window = 64;
  runtime::QueryStatsOptions query_stats;  // expected_attention and the query-statistics policies
  std::string layer_weights;               // per-layer budgets: "", "spread" or w0,w1,...
};

struct EvalOptions {
  CommonOptions common;
  eval::PplSettings ppl;
  eval::NiahSettings niah;
  eval::FidelitySettings fid;
  bool chat = false, no_chat = false;
};

void add_common(CLI::App* cmd, CommonOptions& o) {
  add_model_options(cmd, o.model);
  cmd->add_option("--filters", o.filters, "Q-Filters file for the qfilters policy (qf calibrate); without it qfilters is skipped")
      ->check(CLI::ExistingFile);
  std::string names;
  for (const auto& n : kv::policy_names()) names += (names.empty() ? "" : ",") + n;
  std::string stats_names;
  for (const auto& n : kv::query_stats_policy_names()) stats_names += (stats_names.empty() ? "" : ",") + n;
  cmd->add_option("--policies", o.policies,
                  "comma-separated policies (default: " + names + "; also " + stats_names +
                      ", with a --filters file holding query statistics, and NAME+layer)")
      ->delimiter(',');
  cmd->add_option("--data", o.data, "evaluation text: files or directories of .txt (default data/sotu)");
  cmd->add_option("--min-year", o.min_year, "leave out files named YYYY_* before this year (0 = no bound; default 2000, "
                                            "held out from calibration on pre-1950 addresses)");
  cmd->add_option("--max-year", o.max_year, "leave out files named YYYY_* after this year (0 = no bound)");
  cmd->add_option("-o,--out", o.out, "results directory (default results/<model>[-quick])");
  cmd->add_flag("--fresh", o.fresh, "discard earlier results in --out instead of resuming");
  cmd->add_flag("--quick", o.quick, "small sweep (a few minutes on 2 cores); explicit options still apply");
  cmd->add_flag("--no-progress", o.no_progress, "no progress line on stderr");
  cmd->add_option("--kv-seed", o.seed, "seed of the random policy");
  cmd->add_option("--snapkv-window", o.snapkv_window, "snapkv observation window (queries)")->check(CLI::PositiveNumber);
  add_query_stats_options(cmd, o.query_stats, "");
  cmd->add_option("--layer-weights", o.layer_weights, kLayerWeightsHelp);
}

void add_ppl(CLI::App* cmd, eval::PplSettings& s) {
  cmd->add_option("--budgets", s.budgets, "cache budgets (tokens per head), comma-separated")->delimiter(',');
  cmd->add_option("--window", s.window, "newest tokens always kept");
  cmd->add_option("--evict-every", s.evict_every, "evict this many tokens at a time");
  cmd->add_option("--tokens", s.n_tokens, "tokens per document");
  cmd->add_option("--docs", s.n_docs, "documents (default 8; intervals are a bootstrap over them)");
  cmd->add_option("--skip-layers", s.skip_layers, "first layers left uncompressed");
}

void add_niah(CLI::App* cmd, eval::NiahSettings& s, EvalOptions& o) {
  cmd->add_option("--lengths", s.lengths, "prompt lengths in tokens, comma-separated (capped at the model's context)")
      ->delimiter(',');
  cmd->add_option("--depths", s.n_depths, "needle depths, evenly spaced from 0% to 100%");
  cmd->add_option("--compressions", s.compressions, "compression factors, comma-separated (4 = keep 1/4)")->delimiter(',');
  cmd->add_option("--skip-layers", s.skip_layers,
                  "first layers left uncompressed, comma-separated for a sweep (default 2, as in the paper's needle test)")
      ->delimiter(',');
  cmd->add_option("--digits", s.digits, "digits of the magic number, comma-separated (e.g. 7,3: a short needle too)")
      ->delimiter(',');
  cmd->add_option("--max-new", s.max_new, "answer tokens (0 = the longest digits + 8)");
  cmd->add_option("--seed,--seeds", s.seeds, "seeds of the magic numbers, comma-separated (one needle per seed)")
      ->delimiter(',');
  cmd->add_flag("--chat", o.chat, "always use the ChatML frame");
  cmd->add_flag("--no-chat", o.no_chat, "never use the chat frame (default: when the model has a ChatML template)");
}

void add_fidelity(CLI::App* cmd, eval::FidelitySettings& s) {
  cmd->add_option("--tokens", s.n_tokens, "tokens per document");
  cmd->add_option("--docs", s.n_docs, "documents");
}

bool given(const CLI::App* cmd, const std::string& name) {
  try {
    return cmd->get_option(name)->count() > 0;
  } catch (const CLI::OptionNotFound&) {
    return false;
  }
}

// --quick presets, for the options the user did not set.
void apply_quick(const CLI::App* cmd, EvalOptions& o, const std::string& which) {
  if (!o.common.quick) return;
  if (which == "ppl") {
    if (!given(cmd, "--budgets")) o.ppl.budgets = {128};
    if (!given(cmd, "--window")) o.ppl.window = 32;
    if (!given(cmd, "--tokens")) o.ppl.n_tokens = 512;
    if (!given(cmd, "--docs")) o.ppl.n_docs = 1;
  } else if (which == "niah") {
    if (!given(cmd, "--lengths")) o.niah.lengths = {1024};
    if (!given(cmd, "--depths")) o.niah.n_depths = 3;
    if (!given(cmd, "--compressions")) o.niah.compressions = {4, 16};
  } else if (which == "fidelity") {
    if (!given(cmd, "--tokens")) o.fid.n_tokens = 512;
    if (!given(cmd, "--docs")) o.fid.n_docs = 1;
  }
}

// What every evaluation needs, loaded once.
struct Setup {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::vector<float> filters;
  calib::Filters query_stats;  // the filter file's query statistics (none when it has none)
  json filters_metadata;
  eval::EvalContext ctx;
  std::vector<std::string> policies;
  std::vector<eval::Document> docs;
  std::string out;
  json run;
};

Setup setup(const CommonOptions& o) {
  Setup s;
  s.model = Model::load(o.model.model);
  const ModelConfig& c = s.model->config();
  s.tok = std::make_unique<Tokenizer>(Tokenizer::from_gguf(s.model->file()));
  if (!o.filters.empty()) {
    calib::LoadedFilters lf =
        calib::load_filters(o.filters, calib::FilterExpectation{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()});
    if (lf.fingerprint_missing)
      std::fprintf(stderr, "warning: %s does not say which model it was made for\n", o.filters.c_str());
    s.filters_metadata = lf.filters.metadata;
    s.filters = std::move(lf.filters.data);
    s.query_stats = std::move(lf.filters);
  }
  s.ctx.model = s.model.get();
  s.ctx.n_threads = o.model.n_threads;
  s.ctx.n_batch = o.model.n_batch;
  s.ctx.policy_options.seed = o.seed;
  s.ctx.policy_options.snapkv_window = o.snapkv_window;
  s.ctx.policy_options.filters = s.filters;
  s.ctx.policy_options.query_mean = s.query_stats.query_mean;
  s.ctx.policy_options.query_factors = s.query_stats.query_factors;
  s.ctx.policy_options.n_query_heads = s.query_stats.n_query_heads;
  s.ctx.policy_options.stats_rank = s.query_stats.stats_rank;
  o.query_stats.apply(s.ctx.policy_options);
  s.ctx.layer_weights = runtime::parse_layer_weights(o.layer_weights, &s.query_stats);
  if (!s.ctx.layer_weights.empty()) kv::CompressionConfig{.layer_weights = s.ctx.layer_weights}.validate(c.n_layers);
  s.ctx.kv_types = kv_types(o.model);
  s.ctx.progress = !o.no_progress;

  if (o.policies.empty()) {
    for (const auto& p : kv::policy_names()) {
      if (p == "qfilters" && s.filters.empty()) {
        std::fprintf(stderr, "note: qfilters skipped: no --filters FILE (make one with: qf calibrate -m MODEL --text data/sotu -o FILE)\n");
        continue;
      }
      s.policies.push_back(p);
    }
  } else {
    for (const auto& p : o.policies) {
      if (std::find(s.policies.begin(), s.policies.end(), p) != s.policies.end()) continue;
      eval::check_policy(s.ctx, p);  // unknown names, qfilters without filters
      s.policies.push_back(p);
    }
  }
  s.docs = eval::load_documents(o.data, o.min_year, o.max_year);
  s.out = o.out;
  if (s.out.empty()) s.out = "results/" + fs::path(o.model.model).stem().string() + (o.quick ? "-quick" : "");
  ThreadPool probe(o.model.n_threads);
  s.run = eval::run_info(o.model.model, c.fingerprint(), o.filters, probe.size());
  s.run["filters_metadata"] = s.filters_metadata;
  s.run["data"] = o.data;
  s.run["min_year"] = o.min_year;
  s.run["max_year"] = o.max_year;
  s.run["policy_seed"] = o.seed;
  s.run["snapkv_window"] = o.snapkv_window;
  const runtime::QueryStatsOptions& q = o.query_stats;
  s.run["future_positions"] = q.future_positions;
  s.run["filter_blend"] = q.filter_blend;
  s.run["filter_horizon"] = q.filter_horizon;
  s.run["filter_decay"] = std::isfinite(q.filter_decay) ? json(q.filter_decay) : json("inf");
  s.run["layer_weights"] = s.ctx.layer_weights;  // the numbers, also for 'spread'
  s.run["batch"] = o.model.n_batch;
  s.run["cache_type_k"] = o.model.cache_type_k;
  s.run["cache_type_v"] = o.model.cache_type_v;
  return s;
}

// Tokenizes documents in order until `n` of them hold `n_tokens` tokens.
std::vector<eval::TokenDoc> token_docs(const Setup& s, int n, int n_tokens) {
  std::vector<eval::TokenDoc> all;
  int long_enough = 0;
  for (const auto& d : s.docs) {
    if (long_enough == n) break;
    all.push_back({d.name, s.tok->encode(d.text, true, false)});
    long_enough += static_cast<int>(all.back().tokens.size()) >= n_tokens;
  }
  return eval::select_docs(all, n, n_tokens);
}

std::string path_in(const Setup& s, const std::string& name) { return (fs::path(s.out) / name).string(); }

// Settings that decide the results: a resumed file must have been made with the same ones.
json cell_settings(const Setup& s, const json& eval_settings) {
  json settings = {{"model_fingerprint", s.model->config().fingerprint()},
          {"model", s.run["model"]},
          {"filters", s.run["filters"]},
          {"policy_seed", s.run["policy_seed"]},
          {"snapkv_window", s.run["snapkv_window"]},
          {"batch", s.run["batch"]},
          {"cache_type_k", s.run["cache_type_k"]},
          {"cache_type_v", s.run["cache_type_v"]},
          {"data", s.run["data"]},
          {"min_year", s.run["min_year"]},
          {"max_year", s.run["max_year"]},
          {"eval", eval_settings}};
  // Only when not the default, so results made before the option existed still resume.
  const runtime::QueryStatsOptions defaults;
  if (s.run["future_positions"] != defaults.future_positions) settings["future_positions"] = s.run["future_positions"];
  if (s.run["filter_blend"] != defaults.filter_blend) settings["filter_blend"] = s.run["filter_blend"];
  if (s.run["filter_horizon"] != defaults.filter_horizon) settings["filter_horizon"] = s.run["filter_horizon"];
  if (!s.run["layer_weights"].empty()) settings["layer_weights"] = s.run["layer_weights"];
  // qfilters_max remembers scores since 2026-12-01: results made before do not resume as its own.
  if (std::ranges::any_of(s.policies, [](const std::string& p) { return kv::base_policy_name(p) == "qfilters_max"; }))
    settings["filter_decay"] = s.run["filter_decay"];
  return settings;
}

void finish(const Setup& s, json& summary, double seconds) {
  summary["run"] = s.run;
  summary["run"]["seconds"] = eval::round_to(seconds, 1);
  summary["run"]["finished"] = eval::utc_now();
}

// Appends the run's identity (model, filters, seeds, version, start time) as trailing columns to
// every row, so a CSV row is self-describing once tables of several runs are concatenated.
std::string with_run_columns(const std::string& csv, const json& run,
                             const std::vector<std::pair<std::string, std::string>>& extra = {}) {
  auto str = [](const json& v) { return v.is_string() ? v.get<std::string>() : v.is_null() ? std::string() : v.dump(); };
  std::string head = ",model,filters,policy_seed,cache_type_k,cache_type_v";
  std::string vals = "," + str(run["model"]) + "," + str(run["filters"]) + "," + str(run["policy_seed"]) + "," +
                     str(run["cache_type_k"]) + "," + str(run["cache_type_v"]);
  for (const auto& [k, v] : extra) head += "," + k, vals += "," + v;
  head += ",version,time";
  vals += "," + str(run["version"]) + "," + str(run["time"]);
  std::string out;
  size_t start = 0;
  bool first = true;
  while (start < csv.size()) {
    size_t end = csv.find('\n', start);
    if (end == std::string::npos) end = csv.size();
    out += csv.substr(start, end - start) + (first ? head : vals) + "\n";
    first = false;
    start = end + 1;
  }
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string fmt(const json& v, const char* f = "%.3f") {
  if (!v.is_number()) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, f, v.get<double>());
  return buf;
}

void eval_ppl(const EvalOptions& o, Setup& s) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::string> pols = s.policies;
  if (std::find(pols.begin(), pols.end(), "none") == pols.end()) pols.insert(pols.begin(), "none");
  o.ppl.validate();
  const auto docs = token_docs(s, o.ppl.n_docs, o.ppl.n_tokens);
  eval::CellLog log(path_in(s, "ppl.jsonl"), cell_settings(s, o.ppl.to_json()), !o.common.fresh);
  eval::run_ppl(s.ctx, docs, o.ppl, pols, log);
  eval::PplSummary sum = eval::summarize_ppl(log, docs, o.ppl, pols);
  finish(s, sum.json, seconds_since(t0));
  eval::write_text_file(path_in(s, "ppl.json"), sum.json.dump(1) + "\n");
  eval::write_text_file(path_in(s, "ppl.csv"), with_run_columns(sum.csv, s.run));
  eval::write_text_file(path_in(s, "ppl_curve.csv"), sum.curve_csv);
  std::printf("streaming perplexity: %zu docs x %d tokens, window %d (%s)\n", docs.size(), o.ppl.n_tokens, o.ppl.window,
              path_in(s, "ppl.json").c_str());
  std::printf("%7s  %-20s %10s %12s %10s %17s\n", "budget", "policy", "ppl(all)", "ppl(>budget)", "gap ratio",
              "95% interval");
  for (const auto& r : sum.json["results"])
    std::printf("%7d  %-20s %10s %12s %10s   [%6s, %6s]\n", r["budget"].get<int>(), r["policy"].get<std::string>().c_str(),
                fmt(r["ppl_all"]).c_str(), fmt(r["ppl_after_budget"]).c_str(), fmt(r["gap_ratio_after_budget"]).c_str(),
                fmt(r["gap_ratio_after_budget_ci"][0], "%.2f").c_str(), fmt(r["gap_ratio_after_budget_ci"][1], "%.2f").c_str());
}

void eval_niah(const EvalOptions& o, Setup& s) {
  const auto t0 = std::chrono::steady_clock::now();
  eval::NiahSettings st = o.niah;
  if (o.chat && o.no_chat) fail("--chat and --no-chat exclude each other");
  st.chat = o.chat ? 1 : o.no_chat ? 0 : -1;
  st.validate();
  std::string haystack;
  for (const auto& d : s.docs) {
    if (!haystack.empty()) haystack += "\n\n";
    haystack += d.text;
  }
  eval::CellLog log(path_in(s, "niah.jsonl"), cell_settings(s, st.to_json()), !o.common.fresh);
  eval::run_niah(s.ctx, *s.tok, haystack, st, s.policies, log);
  const int n_ctx_train = s.model->config().n_ctx_train;
  eval::NiahSummary sum = eval::summarize_niah(log, st, s.policies, n_ctx_train);
  finish(s, sum.json, seconds_since(t0));
  eval::write_text_file(path_in(s, "niah.json"), sum.json.dump(1) + "\n");
  std::string seeds;
  for (uint64_t x : st.seeds) seeds += (seeds.empty() ? "" : ";") + std::to_string(x);
  const std::vector<std::pair<std::string, std::string>> seed{{"needle_seeds", seeds}};
  eval::write_text_file(path_in(s, "niah.csv"), with_run_columns(sum.csv, s.run, seed));
  eval::write_text_file(path_in(s, "niah_grid.csv"), with_run_columns(sum.grid_csv, s.run, seed));
  std::printf("needle in a haystack: lengths");
  for (int l : eval::effective_lengths(st, n_ctx_train)) std::printf(" %d", l);
  std::printf(", %d depths (%s)\n", st.n_depths, path_in(s, "niah.json").c_str());
  std::printf("%6s %5s  %-20s %4s %9s %17s %8s\n", "digits", "skip", "policy", "x", "accuracy", "95% interval", "partial");
  for (const auto& r : sum.json["results"])
    std::printf("%6d %5d  %-20s %4d %9s   [%5s, %5s] %8s\n", r["digits"].get<int>(), r["skip_layers"].get<int>(),
                r["policy"].get<std::string>().c_str(), r["compression"].get<int>(), fmt(r["accuracy"]).c_str(),
                fmt(r["accuracy_ci"][0], "%.2f").c_str(), fmt(r["accuracy_ci"][1], "%.2f").c_str(),
                fmt(r["partial"]).c_str());
}

void eval_fidelity(const EvalOptions& o, Setup& s) {
  const auto t0 = std::chrono::steady_clock::now();
  o.fid.validate();
  const auto docs = token_docs(s, o.fid.n_docs, o.fid.n_tokens);
  eval::CellLog log(path_in(s, "fidelity.jsonl"), cell_settings(s, o.fid.to_json()), !o.common.fresh);
  eval::run_fidelity(s.ctx, docs, o.fid, s.policies, log);
  eval::FidelitySummary sum = eval::summarize_fidelity(s.ctx, log, docs, o.fid, s.policies);
  finish(s, sum.json, seconds_since(t0));
  eval::write_text_file(path_in(s, "fidelity.json"), sum.json.dump(1) + "\n");
  eval::write_text_file(path_in(s, "fidelity.csv"), with_run_columns(sum.csv, s.run));
  eval::write_text_file(path_in(s, "fidelity_heads.csv"), sum.heads_csv);
  std::printf("attention fidelity: %zu docs x %d tokens (%s)\n", docs.size(), o.fid.n_tokens,
              path_in(s, "fidelity.json").c_str());
  if (sum.json.contains("summary_layers"))
    std::printf("over the heads of layers %s (policies leave the sliding-window layers alone)\n",
                sum.json["summary_layers"].dump().c_str());
  std::printf("%-10s %8s %8s  %s\n", "policy", "mean", "median", "Spearman over heads");
  for (const auto& r : sum.json["results"])
    std::printf("%-10s %8s %8s  %s\n", r["policy"].get<std::string>().c_str(), fmt(r["mean_spearman"]).c_str(),
                fmt(r["median_spearman"]).c_str(), r["circular"].get<bool>() ? "(circular: scored from attention)" : "");
  if (sum.json.contains("qfilters_beats_knorm")) {
    const json& w = sum.json["qfilters_beats_knorm"];
    std::printf("qfilters beats knorm on %d of %d heads (%s)\n", w["wins"].get<int>(), w["heads"].get<int>(),
                fmt(w["share"], "%.2f").c_str());
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  CLI::App* ev = app.add_subcommand("eval", "evaluate KV policies: streaming perplexity, needle in a haystack, attention fidelity");
  ev->require_subcommand(1);

  auto po = std::make_shared<EvalOptions>();
  CLI::App* ppl = ev->add_subcommand("ppl", "perplexity with the cache capped at a budget, every policy on the same tokens");
  add_common(ppl, po->common);
  add_ppl(ppl, po->ppl);
  ppl->callback([po, ppl] {
    apply_quick(ppl, *po, "ppl");
    Setup s = setup(po->common);
    eval_ppl(*po, s);
  });

  auto no = std::make_shared<EvalOptions>();
  CLI::App* niah = ev->add_subcommand("niah", "needle in a haystack with prefill compression");
  add_common(niah, no->common);
  add_niah(niah, no->niah, *no);
  niah->callback([no, niah] {
    apply_quick(niah, *no, "niah");
    Setup s = setup(no->common);
    eval_niah(*no, s);
  });

  auto fo = std::make_shared<EvalOptions>();
  CLI::App* fid = ev->add_subcommand("fidelity", "Spearman correlation of each policy's key scores with the attention keys receive");
  add_common(fid, fo->common);
  add_fidelity(fid, fo->fid);
  fid->callback([fo, fid] {
    apply_quick(fid, *fo, "fidelity");
    Setup s = setup(fo->common);
    eval_fidelity(*fo, s);
  });

  auto ao = std::make_shared<EvalOptions>();
  CLI::App* all = ev->add_subcommand("all", "ppl, niah and fidelity with their default (or --quick) settings, one --out");
  add_common(all, ao->common);
  all->callback([ao, all] {
    for (const char* w : {"ppl", "niah", "fidelity"}) apply_quick(all, *ao, w);
    Setup s = setup(ao->common);
    eval_ppl(*ao, s);
    eval_niah(*ao, s);
    eval_fidelity(*ao, s);
  });
}

}  // namespace qf::cli
