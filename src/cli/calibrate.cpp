// qf calibrate: compute a model's Q-Filters on the CPU, from text files or from text the model
// samples itself. qf filters: show a filter file's stored diagnostics, compare two files, and
// import published filters (Hugging Face row order, reference sign) into this engine's form.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <iterator>
#include <numeric>
#include <optional>
#include <random>

#include "calib/collect.h"
#include "calib/filter_file.h"
#include "calib/filters.h"
#include "calib/report.h"
#include "calib/recipe.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "eval/corpus.h"
#include "eval/progress.h"
#include "sample/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf::cli {

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

using calib::kSeedPrompts;
constexpr int kTextDocs = calib::kTextDocs, kTextDocLen = calib::kTextDocLen;
constexpr int kGenDocs = calib::kSampledDocs, kGenDocLen = calib::kSampledDocLen, kGenSegment = calib::kSampledSegment;

struct CalibrateOptions {
  ModelOptions model;
  std::string output;
  std::vector<std::string> text;
  int max_year = 1949;
  int n_docs = 0, doc_len = 0;  // 0: the default of the text source
  int n_samples = 3000;
  int stats_rank = 8;  // query statistics before the rotary embedding (0: none)
  uint64_t seed = 0;
  std::string orientation = "mean";
  float temperature = 1.0f, top_p = 0.95f;
  int top_k = 0;
  int segment_len = kGenSegment;
  std::string save_text;
  std::string compare;
  bool report = false, json = false, no_progress = false;
};

std::string file_stem(const std::string& path) { return fs::path(path).stem().string(); }

// Documents from text files: each file is one document truncated to doc_len tokens. With more
// files than n_docs, n_docs are drawn at random (seeded); with fewer, files longer than doc_len
// are cut into doc_len pieces (second pieces first, then third, ...) to make up the number.
std::vector<std::vector<int32_t>> text_documents(const std::vector<eval::Document>& files, const Tokenizer& tok,
                                                 int n_docs, int doc_len, uint64_t seed,
                                                 std::string& used_files) {
  std::vector<size_t> order(files.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::mt19937_64 rng(calib::stream_seed(seed, 0x7465787474657874ull));  // independent of the position draws
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
  if (order.size() > static_cast<size_t>(n_docs)) order.resize(n_docs);
  std::sort(order.begin(), order.end());  // keep file order: the result does not depend on the shuffle's tail

  std::vector<std::vector<int32_t>> tokens;
  for (size_t i : order) {
    tokens.push_back(tok.encode(files[i].text, /*add_special=*/true, /*parse_special=*/false));
    used_files += (used_files.empty() ? "" : ",") + files[i].name;
  }
  return calib::cut_documents(tokens, n_docs, doc_len);
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// Loads a filter file in canonical form. Files of our format describe themselves; the layout and
// sign flags apply only to foreign ones (a published file compared with ours, say).
calib::LoadedFilters load_any(const std::string& path, const calib::FilterExpectation* model_expect,
                              const calib::LoadOptions& foreign_opt, calib::StoredFilters* stored_out = nullptr) {
  calib::StoredFilters stored = calib::read_filters(path);
  const auto fmt_it = stored.filters.metadata.find("format");
  const bool ours = fmt_it != stored.filters.metadata.end() && fmt_it->second == calib::kFilterFormat;
  calib::FilterExpectation expect{stored.filters.n_layers, stored.filters.n_kv_heads, stored.filters.head_dim, ""};
  if (model_expect) expect = *model_expect;
  calib::LoadedFilters lf = calib::load_filters(path, expect, ours ? calib::LoadOptions{} : foreign_opt);
  if (stored_out) *stored_out = std::move(stored);
  return lf;
}

int calibrate(const CalibrateOptions& o) {
  if (o.output.empty() && !o.report && !o.json) fail("give -o FILE to write the filters (or --report to only print them)");
  if (o.n_samples <= 0) fail("--samples must be positive");
  const calib::OrientationRule rule = calib::parse_orientation_rule(o.orientation);
  const bool from_text = !o.text.empty();
  const auto t0 = std::chrono::steady_clock::now();

  std::unique_ptr<Model> model = Model::load(o.model.model);
  const ModelConfig& c = model->config();
  const Tokenizer tok = Tokenizer::from_gguf(model->file());
  const int ctx = o.model.n_ctx > 0 ? o.model.n_ctx : c.n_ctx_train;
  const int n_docs = o.n_docs > 0 ? o.n_docs : (from_text ? kTextDocs : kGenDocs);
  int doc_len = o.doc_len > 0 ? o.doc_len : (from_text ? kTextDocLen : kGenDocLen);
  if (doc_len > ctx) {
    std::fprintf(stderr, "note: documents clipped to the context of %d tokens\n", ctx);
    doc_len = ctx;
  }
  if (doc_len < 2) fail("--doc-len must be at least 2");

  SessionOptions so;
  so.n_ctx = doc_len;  // the cache never holds more than one document
  so.n_threads = o.model.n_threads;
  so.n_batch = o.model.n_batch;
  so.kv_types = kv_types(o.model);
  Session session(*model, std::move(so));

  calib::CollectOptions co;
  co.n_samples = o.n_samples;
  co.seed = o.seed;
  co.rule = rule;
  co.stats_rank = o.stats_rank;
  const bool progress_on = !o.no_progress;

  std::string corpus, used_files;
  std::vector<std::vector<int32_t>> docs;
  std::optional<calib::CalibrationRun> run;
  if (from_text) {
    std::vector<eval::Document> files;
    try {
      files = eval::load_documents(o.text);
    } catch (const Error& e) {
      fail("calibration text: ", e.what());
    }
    const size_t n_found = files.size();
    if (o.max_year > 0)
      std::erase_if(files, [&](const eval::Document& d) { return eval::year_of(d.name) > o.max_year; });
    if (files.empty())
      fail("calibration text: all ", n_found, " files are named after years later than ", o.max_year,
           " (held out for evaluation); --max-year 0 lifts the year filter");
    if (files.size() < n_found)
      std::fprintf(stderr, "note: %zu files named after years later than %d left out (held out for evaluation)\n",
                   n_found - files.size(), o.max_year);
    docs = text_documents(files, tok, n_docs, doc_len, o.seed, used_files);
    int64_t n_tok = 0;
    for (const auto& d : docs) n_tok += static_cast<int64_t>(d.size());
    std::string paths;
    for (const auto& p : o.text) paths += (paths.empty() ? "" : " ") + p;
    corpus = paths + " (" + std::to_string(docs.size()) + " of " + std::to_string(files.size()) + " files" +
             (o.max_year > 0 ? ", years <= " + std::to_string(o.max_year) : "") + ")";
    if (static_cast<int>(docs.size()) < n_docs)
      std::fprintf(stderr, "note: the text makes only %zu documents (asked for %d)\n", docs.size(), n_docs);
    std::fprintf(stderr, "calibrating on %zu documents, %lld tokens, from %s\n", docs.size(),
                 static_cast<long long>(n_tok), corpus.c_str());
    eval::Progress bar("calibrate", static_cast<double>(n_tok), progress_on);
    int64_t last = 0;
    run.emplace(calib::calibrate_documents(session, docs, co, [&](int64_t done, int64_t) {
      bar.advance(static_cast<double>(done - last), std::to_string(done) + " tokens");
      last = done;
    }));
    bar.finish();
  } else {
    std::vector<std::vector<int32_t>> prompts;
    for (const char* p : kSeedPrompts) prompts.push_back(tok.encode(p, /*add_special=*/false, /*parse_special=*/false));
    calib::SynthesisOptions gen;
    gen.n_docs = n_docs;
    gen.doc_len = doc_len;
    gen.segment_len = o.segment_len;
    gen.separator = tok.encode("\n\n", /*add_special=*/false, /*parse_special=*/false);
    if (tok.add_bos() && tok.bos() >= 0) gen.doc_prefix = {tok.bos()};  // as text files get from encode()
    SamplerOptions sopt;
    sopt.temperature = o.temperature;
    sopt.top_k = o.top_k;
    sopt.top_p = o.top_p;
    sopt.min_p = 0.0f;  // the calibration recipe: temperature, top-k and top-p only
    sopt.seed = calib::stream_seed(o.seed, 0x73616d706c65ull);
    Sampler sampler(sopt);
    calib::QueryCollector col(c, calib::SamplePlan(std::vector<int>(n_docs, doc_len), c.n_layers, o.n_samples, o.seed));
    corpus = "sampled from the model: " + std::to_string(n_docs) + " x " + std::to_string(doc_len) + " tokens, " +
             std::to_string(std::size(kSeedPrompts)) + " seed prompts, temperature " + fmt("%g", o.temperature) +
             ", top-k " + std::to_string(o.top_k) + ", top-p " + fmt("%g", o.top_p) +
             (o.segment_len > 0 ? ", new prompt every " + std::to_string(o.segment_len) + " tokens" : "");
    std::fprintf(stderr, "calibrating on text sampled from the model (%d documents x %d tokens; --text FILE... to use text)\n",
                 n_docs, doc_len);
    eval::Progress bar("sample+collect", static_cast<double>(n_docs) * doc_len, progress_on);
    int64_t last = 0;
    docs = calib::synthesize_documents(
        session, prompts, tok.eog_ids(), gen, [&](std::span<const float> logits) { return sampler.sample(logits); }, &col,
        [&](int64_t done, int64_t) {
          bar.advance(static_cast<double>(done - last), std::to_string(done) + " tokens");
          last = done;
        });
    bar.finish();
    run.emplace(calib::CalibrationRun{calib::Calibrator(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, rule),
                                      col.key_means(), col.plan().n_samples(), col.plan().n_tokens()});
    col.finish(run->calibrator, o.stats_rank > 0 ? rope_geometry(session.model()) : kv::RopeGeometry{}, o.stats_rank);
    if (!o.save_text.empty()) {
      std::ofstream out(o.save_text, std::ios::binary);
      for (size_t d = 0; d < docs.size(); ++d)
        out << "=== document " << d << " ===\n" << tok.decode(docs[d], /*render_special=*/true) << "\n";
      if (!out) fail("cannot write ", o.save_text);
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  calib::Filters filters = run->calibrator.filters();
  calib::CalibrationInfo info;
  info.model_name = c.name.empty() ? file_stem(o.model.model) : c.name;
  info.architecture = c.arch;
  info.fingerprint = c.fingerprint();
  info.corpus = corpus;
  info.n_docs = static_cast<int>(docs.size());
  info.doc_len = doc_len;
  info.n_samples = run->n_samples;
  info.seed = o.seed;
  info.orientation = std::string(calib::to_string(rule));
  calib::set_calibration_metadata(filters, info);
  filters.metadata["n_tokens"] = std::to_string(run->n_tokens);
  filters.metadata["text_source"] = from_text ? "files" : "model";
  if (from_text) filters.metadata["text_files"] = used_files;

  const calib::FilterReport stored_report =
      calib::make_report(filters, run->calibrator.head_reports(), c.n_heads, &run->keys);
  filters.metadata["report"] = stored_report.to_json().dump();

  calib::FilterReport report = stored_report;
  if (!o.compare.empty()) {
    const calib::FilterExpectation expect{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()};
    const calib::LoadedFilters other = load_any(o.compare, &expect, {});
    report.set_reference(calib::cosine_similarity(filters, other.filters));
  }
  if (!o.output.empty()) calib::write_filters(o.output, filters);

  if (o.json) {
    json j = report.to_json();
    j["seconds"] = seconds;
    j["n_tokens"] = run->n_tokens;
    j["n_samples"] = run->n_samples;
    j["corpus"] = corpus;
    if (!o.compare.empty()) j["compare"] = o.compare;
    std::printf("%s\n", j.dump(2).c_str());
  } else if (o.report) {
    std::printf("%s", report.to_text().c_str());
  }
  std::fprintf(stderr,
               "calibrated %d layers x %d query heads on %lld tokens (%d samples per layer) in %.1f s (%.0f tok/s, %d threads), "
               "peak RSS %.0f MiB\n",
               c.n_layers, c.n_heads, static_cast<long long>(run->n_tokens), run->n_samples, seconds,
               run->n_tokens / seconds, session.pool().size(), peak_rss_mib());
  std::fprintf(stderr, "energy on the filter direction %.3f (mean over heads), keys against the filter %d/%d KV heads, "
                       "orientation rules disagree on %d/%d heads%s\n",
               report.energy_share_mean, report.keys_against, report.n_kv_heads, report.orientation_disagreements,
               report.n_heads, report.has_reference ? (", cosine to " + o.compare + " " + fmt("%.4f", report.similarity_mean)).c_str() : "");
  if (c.n_local_layers() > 0) {
    std::string global;
    for (int l = 0; l < c.n_layers; ++l)
      if (!c.layers[l].local()) global += (global.empty() ? "" : ",") + std::to_string(l);
    std::fprintf(stderr, "note: %d of %d layers attend over a sliding window and keep only it, so KV policies use "
                         "the filters of layers %s only\n", c.n_local_layers(), c.n_layers, global.c_str());
  }
  if (!o.output.empty()) std::fprintf(stderr, "wrote %s\n", o.output.c_str());
  return 0;
}

// ---- qf filters ---------------------------------------------------------------------------------

struct FiltersOptions {
  std::string file, compare, model;
  std::string layout, sign;  // for foreign files
  bool json = false;
};

struct ImportOptions {
  std::string input, output, model, layout, sign;
};

struct ExportOptions {
  std::string input, output_dir, layout;
};

calib::LoadOptions foreign_options(const std::string& layout, const std::string& sign) {
  calib::LoadOptions lo;
  if (!layout.empty()) lo.layout = calib::parse_filter_layout(layout);
  if (!sign.empty()) lo.sign = calib::parse_sign_convention(sign);
  return lo;
}

int show_filters(const FiltersOptions& o) {
  if (o.file.empty()) fail("qf filters needs a filter file (or: qf filters import IN -o OUT ...)");
  std::unique_ptr<Model> model;
  std::optional<calib::FilterExpectation> expect;
  if (!o.model.empty()) {
    model = Model::load(o.model);
    const ModelConfig& c = model->config();
    expect = calib::FilterExpectation{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()};
  }
  const calib::LoadOptions lo = foreign_options(o.layout, o.sign);
  calib::StoredFilters stored;
  const calib::LoadedFilters lf = load_any(o.file, expect ? &*expect : nullptr, lo, &stored);
  const calib::Filters& f = lf.filters;

  std::optional<calib::FilterReport> report;
  if (auto it = stored.filters.metadata.find("report"); it != stored.filters.metadata.end()) {
    json j;
    try {
      j = json::parse(it->second);
    } catch (const json::exception& e) {
      fail(o.file, ": metadata 'report' is not valid JSON");
    }
    try {
      report = calib::FilterReport::from_json(j);
    } catch (const Error& e) {
      fail(o.file, ": metadata ", e.what());
    }
    if (static_cast<int>(report->layers.size()) != f.n_layers)
      fail(o.file, ": stored report has ", report->layers.size(), " layers, the filters ", f.n_layers);
  }
  std::optional<calib::FilterSimilarity> sim;
  if (!o.compare.empty()) {
    const calib::LoadedFilters other = load_any(o.compare, expect ? &*expect : nullptr, lo);
    sim = calib::cosine_similarity(f, other.filters);
    if (!report) report = calib::make_report(f, {}, 0, nullptr, &*sim);
    else report->set_reference(*sim);
  }

  if (o.json) {
    json j;
    j["file"] = o.file;
    j["shape"] = {f.n_layers, f.n_kv_heads, f.head_dim};
    j["dtype"] = lf.stored_dtype;
    j["foreign"] = lf.foreign;
    json md = json::object();
    for (const auto& [k, v] : stored.filters.metadata)
      if (k != "report") md[k] = v;
    j["metadata"] = md;
    if (expect) j["model_fingerprint_matches"] = !lf.fingerprint_missing;
    if (report) j["report"] = report->to_json();
    if (sim) {
      j["compare"] = o.compare;
      j["cosine_per_head"] = sim->per_head;
    }
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("file: %s\nshape: %d layers x %d KV heads x %d dims (%s)%s\n", o.file.c_str(), f.n_layers, f.n_kv_heads,
              f.head_dim, lf.stored_dtype.c_str(), lf.foreign ? ", not made by qf (converted on load)" : "");
  for (const auto& [k, v] : stored.filters.metadata)
    if (k != "report") std::printf("%s: %s\n", k.c_str(), v.c_str());
  if (expect)
    std::printf("model check: %s\n", lf.fingerprint_missing ? "shape matches; the file names no model"
                                                              : "fingerprint matches the model");
  if (report) {
    std::printf("\n%s", report->to_text().c_str());
    if (!report->has_queries) std::printf("(no stored calibration diagnostics: the file was not made by qf calibrate)\n");
  } else {
    std::printf("\nno stored calibration diagnostics (the file was not made by qf calibrate)\n");
  }
  if (sim) std::printf("cosine similarity to %s: mean %.4f, min %.4f over %zu KV heads\n", o.compare.c_str(), sim->mean,
                       *std::min_element(sim->per_head.begin(), sim->per_head.end()), sim->per_head.size());
  return 0;
}

int import_filters(const ImportOptions& o) {
  std::unique_ptr<Model> model = Model::load(o.model);
  const ModelConfig& c = model->config();
  const calib::FilterExpectation expect{c.n_layers, c.n_kv_heads, c.head_dim, c.fingerprint()};
  const calib::StoredFilters stored = calib::read_filters(o.input);
  calib::LoadedFilters lf = calib::load_filters(o.input, expect, foreign_options(o.layout, o.sign));
  calib::Filters f = std::move(lf.filters);
  // A foreign file's own metadata (e.g. {"format": "pt"}) is kept under source_*; ours describes the result.
  std::map<std::string, std::string> md;
  if (lf.foreign) {
    for (const auto& [k, v] : stored.filters.metadata) md["source_" + k] = v;
  } else {
    md = f.metadata;
  }
  if (auto it = f.metadata.find("converted_from"); it != f.metadata.end()) md["converted_from"] = it->second;
  md["model"] = c.name.empty() ? file_stem(o.model) : c.name;
  md["architecture"] = c.arch;
  md["fingerprint"] = c.fingerprint();
  md["imported_from"] = fs::path(o.input).filename().string();
  if (lf.foreign) md["corpus"] = "imported (published filters)";
  f.metadata = std::move(md);
  calib::write_filters(o.output, f);
  std::fprintf(stderr, "wrote %s (%d x %d x %d, for %s%s)\n", o.output.c_str(), f.n_layers, f.n_kv_heads, f.head_dim,
               c.fingerprint().c_str(),
               lf.foreign ? (", converted from " + o.layout + " / " + o.sign).c_str() : "");
  return 0;
}

// Our filters in the layout of the published checkpoints, for GPU engines (kvpress's QFilterPress).
int export_filters(const ExportOptions& o) {
  if (o.layout != "hf") fail("qf filters export: --layout must be hf");
  const calib::LoadedFilters lf = load_any(o.input, nullptr, {});  // refuses files not made by qf
  calib::export_hf(o.output_dir, lf.filters);
  std::fprintf(stderr, "wrote %s/{%s,%s} (%d x %d x %d, Hugging Face row order, sign keep_smallest_dot)\n",
               o.output_dir.c_str(), std::string(calib::kHfWeightsFile).c_str(), std::string(calib::kHfConfigFile).c_str(),
               lf.filters.n_layers, lf.filters.n_kv_heads, lf.filters.head_dim);
  return 0;
}

}  // namespace

void register_calibrate(CLI::App& app) {
  auto o = std::make_shared<CalibrateOptions>();
  CLI::App* cmd = app.add_subcommand("calibrate", "compute Q-Filters for a model (from text files, or text it samples itself)");
  // An exact f32 cache by default: calibration runs once per model, memory is no concern.
  o->model.cache_type_k = o->model.cache_type_v = "f32";
  add_model_options(cmd, o->model);
  cmd->add_option("-o,--output", o->output, "filter file to write (safetensors)");
  cmd->add_option("--text", o->text,
                  "calibration text: files or directories of .txt, each file one document (default: text sampled from "
                  "the model)");
  cmd->add_option("--max-year", o->max_year,
                  "leave out text files named YYYY_* after this year (default 1949: data/sotu from 2000 on is evaluation "
                  "text; 0 = no bound)");
  cmd->add_option("--docs", o->n_docs, "documents (default 20 with --text, 1 of sampled text)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--doc-len", o->doc_len, "tokens per document (default 2048; clipped to the context)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--samples", o->n_samples, "query positions drawn per layer")->check(CLI::PositiveNumber);
  cmd->add_option("--stats-rank", o->stats_rank,
                  "also store each query head's mean and top-N covariance factors before the rotary embedding "
                  "(policies qfilters_rope, ea_calibrated); 0 = filters only")
      ->check(CLI::Range(0, 256));
  cmd->add_option("-s,--seed", o->seed, "seed of the position draws, document choice and sampling");
  cmd->add_option("--orientation", o->orientation, "sign rule: mean (mean projection > 0) or majority (reference vote)")
      ->check(CLI::IsMember({"mean", "majority"}));
  cmd->add_option("--temp", o->temperature, "sampled text: temperature");
  cmd->add_option("--top-k", o->top_k, "sampled text: top-k cut (0 = off)");
  cmd->add_option("--top-p", o->top_p, "sampled text: nucleus cut (1 = off)");
  cmd->add_option("--segment-len", o->segment_len, "sampled text: a new seed prompt every N sampled tokens (0 = only at end of text; default 256)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--save-text", o->save_text, "sampled text: write the documents to this file");
  cmd->add_option("--compare", o->compare, "report the cosine similarity to another filter file")->check(CLI::ExistingFile);
  cmd->add_flag("--report", o->report, "print the per-layer diagnostics");
  cmd->add_flag("--json", o->json, "print the diagnostics as JSON");
  cmd->add_flag("--no-progress", o->no_progress, "no progress line on stderr");
  cmd->callback([o] { calibrate(*o); });
}

void register_filters(CLI::App& app) {
  auto o = std::make_shared<FiltersOptions>();
  CLI::App* cmd = app.add_subcommand("filters", "show a filter file's diagnostics, compare two, import published ones");
  cmd->add_option("file", o->file, "filter file (safetensors)")->check(CLI::ExistingFile);
  cmd->add_option("--compare", o->compare, "cosine similarity per layer to another filter file")->check(CLI::ExistingFile);
  cmd->add_option("-m,--model", o->model, "check the file against this GGUF model")->check(CLI::ExistingFile);
  cmd->add_option("--layout", o->layout, "row order of files not made by qf (published: hf)")->check(CLI::IsMember({"gguf", "hf"}));
  cmd->add_option("--sign", o->sign, "sign convention of files not made by qf (published: keep_smallest_dot)")
      ->check(CLI::IsMember({"keep_largest_dot", "keep_smallest_dot"}));
  cmd->add_flag("--json", o->json, "print JSON");

  auto io = std::make_shared<ImportOptions>();
  CLI::App* imp = cmd->add_subcommand("import", "convert published filters (e.g. huggingface.co/nthngdy) to this engine's form");
  imp->add_option("input", io->input, "filter file to convert")->required()->check(CLI::ExistingFile);
  imp->add_option("-o,--output", io->output, "file to write")->required();
  imp->add_option("-m,--model", io->model, "GGUF model the filters are for")->required()->check(CLI::ExistingFile);
  imp->add_option("--layout", io->layout, "row order of the input: hf (published) or gguf")
      ->required()->check(CLI::IsMember({"gguf", "hf"}));
  imp->add_option("--sign", io->sign, "sign convention of the input: keep_smallest_dot (published) or keep_largest_dot")
      ->required()->check(CLI::IsMember({"keep_largest_dot", "keep_smallest_dot"}));
  imp->callback([io] { import_filters(*io); });

  auto eo = std::make_shared<ExportOptions>();
  CLI::App* exp = cmd->add_subcommand("export", "write filters for GPU engines: the layout of the published "
                                                "nthngdy/q-filters checkpoints (kvpress QFilterPress)");
  exp->add_option("input", eo->input, "qf filter file")->required()->check(CLI::ExistingFile);
  exp->add_option("output_dir", eo->output_dir, "directory to write (model.safetensors, config.json)")->required();
  exp->add_option("--layout", eo->layout, "target layout: hf (Hugging Face checkpoints)")
      ->required()->check(CLI::IsMember({"hf"}));
  exp->callback([eo] { export_filters(*eo); });

  cmd->callback([o, cmd] {
    if (cmd->got_subcommand("import") || cmd->got_subcommand("export")) return;
    show_filters(*o);
  });
}

}  // namespace qf::cli
