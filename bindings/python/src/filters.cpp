// qfilters.Filters and qfilters.calibrate: Q-Filters computed by the engine's calibration, read
// and written as qf's filter files, compared, and exported for GPU engines (kvpress).
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "calib/collect.h"
#include "calib/filter_file.h"
#include "calib/filters.h"
#include "calib/recipe.h"
#include "calib/report.h"
#include "common.h"
#include "eval/progress.h"
#include "sample/sampler.h"
#include "util/error.h"

namespace qf::py {

namespace {

using FloatArray = nb::ndarray<nb::numpy, float>;

// Filters in canonical form plus the file they were last read from or written to (sessions load
// filters by path).
struct PyFilters {
  calib::Filters f;
  std::optional<std::string> path;
};

calib::LoadOptions load_options(const std::optional<std::string>& layout, const std::optional<std::string>& sign) {
  calib::LoadOptions lo;
  if (layout) lo.layout = calib::parse_filter_layout(*layout);
  if (sign) lo.sign = calib::parse_sign_convention(*sign);
  return lo;
}

PyFilters load(const std::string& path, const std::optional<std::string>& layout, const std::optional<std::string>& sign) {
  const calib::StoredFilters stored = calib::read_filters(path);
  const calib::Filters& s = stored.filters;
  const calib::FilterExpectation expect{s.n_layers, s.n_kv_heads, s.head_dim, ""};
  calib::LoadedFilters lf = calib::load_filters(path, expect, load_options(layout, sign));
  PyFilters out{std::move(lf.filters), std::nullopt};
  if (!lf.foreign) out.path = path;  // a foreign file needs its layout and sign each time it is read
  return out;
}

FloatArray to_numpy(const PyFilters& self) {
  const calib::Filters& f = self.f;
  float* buf = new float[f.data.size()];
  std::memcpy(buf, f.data.data(), f.data.size() * sizeof(float));
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<float*>(p); });
  const size_t shape[3] = {size_t(f.n_layers), size_t(f.n_kv_heads), size_t(f.head_dim)};
  return FloatArray(buf, 3, shape, owner);
}

PyFilters from_numpy(nb::ndarray<const float, nb::ndim<3>, nb::c_contig, nb::device::cpu> a,
                     const std::map<std::string, std::string>& metadata) {
  calib::Filters f(static_cast<int>(a.shape(0)), static_cast<int>(a.shape(1)), static_cast<int>(a.shape(2)));
  std::memcpy(f.data.data(), a.data(), f.data.size() * sizeof(float));
  f.metadata = metadata;
  return {std::move(f), std::nullopt};
}

nb::dict compare(const PyFilters& a, const PyFilters& b) {
  const calib::FilterSimilarity sim = calib::cosine_similarity(a.f, b.f);
  nb::dict d;
  d["mean"] = sim.mean;
  d["min"] = sim.per_head.empty() ? 0.0 : *std::min_element(sim.per_head.begin(), sim.per_head.end());
  d["per_layer"] = sim.per_layer;
  d["per_head"] = sim.per_head;
  return d;
}

// Documents from texts: each text is a document cut to doc_len tokens; when there are fewer texts
// than n_docs, the second doc_len pieces of long texts make up the number, then the third, ...
std::vector<std::vector<int32_t>> text_documents(const Tokenizer& tok, const std::vector<std::string>& texts,
                                                 int n_docs, int doc_len) {
  std::vector<std::vector<int32_t>> tokens;
  for (const std::string& t : texts) tokens.push_back(tok.encode(t, /*add_special=*/true, /*parse_special=*/false));
  return calib::cut_documents(tokens, n_docs, doc_len);
}

// Progress on stderr and Ctrl-C between chunks (the callback runs on the calling thread).
calib::ProgressFn progress_fn(eval::Progress& bar) {
  return [&bar, last = int64_t{0}](int64_t done, int64_t) mutable {
    bar.advance(static_cast<double>(done - last), std::to_string(done) + " tokens");
    last = done;
    check_interrupt_nogil();
  };
}

calib::CalibrationRun run_on_text(Session& session, const std::vector<std::vector<int32_t>>& docs,
                                  const calib::CollectOptions& co, bool progress) {
  int64_t n_tok = 0;
  for (const auto& d : docs) n_tok += static_cast<int64_t>(d.size());
  eval::Progress bar("calibrate", static_cast<double>(n_tok), progress);
  calib::CalibrationRun run = calib::calibrate_documents(session, docs, co, progress_fn(bar));
  bar.finish();
  return run;
}

calib::CalibrationRun run_on_samples(Session& session, const ModelConfig& c, const Tokenizer& tok, int n_docs,
                                     int doc_len, const calib::CollectOptions& co, bool progress) {
  std::vector<std::vector<int32_t>> prompts;
  for (const char* p : calib::kSeedPrompts) prompts.push_back(tok.encode(p, false, false));
  calib::SynthesisOptions gen;
  gen.n_docs = n_docs;
  gen.doc_len = doc_len;
  gen.segment_len = calib::kSampledSegment;
  gen.separator = tok.encode("\n\n", false, false);
  if (tok.add_bos() && tok.bos() >= 0) gen.doc_prefix = {tok.bos()};
  SamplerOptions so;  // the calibration recipe of qf calibrate: temperature 1, top-p 0.95
  so.temperature = 1.0f;
  so.top_k = 0;
  so.top_p = 0.95f;
  so.min_p = 0.0f;
  so.seed = calib::stream_seed(co.seed, 0x73616d706c65ull);
  Sampler sampler(so);
  calib::QueryCollector col(c, calib::SamplePlan(std::vector<int>(n_docs, doc_len), c.n_layers, co.n_samples, co.seed));
  eval::Progress bar("sample+collect", static_cast<double>(n_docs) * doc_len, progress);
  calib::synthesize_documents(session, prompts, tok.eog_ids(), gen,
                              [&](std::span<const float> l) { return sampler.sample(l); }, &col, progress_fn(bar));
  bar.finish();
  calib::CalibrationRun run{calib::Calibrator(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, co.rule),
                            col.key_means(), col.plan().n_samples(), col.plan().n_tokens()};
  col.finish(run.calibrator);
  return run;
}

PyFilters calibrate(PyModel& m, const std::optional<std::vector<std::string>>& texts, int n_docs, int doc_len,
                    int samples, uint64_t seed, bool progress, const std::string& orientation) {
  if (samples <= 0) fail("samples must be positive");
  if (n_docs < 0 || doc_len < 0) fail("n_docs and doc_len must be >= 0 (0 = the default)");
  const ModelConfig& c = m.engine.model().config();
  const bool from_text = texts.has_value();
  n_docs = n_docs > 0 ? n_docs : (from_text ? calib::kTextDocs : calib::kSampledDocs);
  doc_len = std::min(doc_len > 0 ? doc_len : (from_text ? calib::kTextDocLen : calib::kSampledDocLen), m.engine.n_ctx());
  if (doc_len < 2) fail("doc_len must be at least 2");
  calib::CollectOptions co;
  co.n_samples = samples;
  co.seed = seed;
  co.rule = calib::parse_orientation_rule(orientation);

  nb::gil_scoped_release nogil;
  std::lock_guard lock(m.compute);
  SessionOptions so;
  so.n_ctx = doc_len;  // the cache never holds more than one document
  so.pool = &m.engine.pool();
  so.n_batch = m.engine.options().n_batch;
  Session session(m.engine.model(), std::move(so));
  std::vector<std::vector<int32_t>> docs;
  if (from_text) docs = text_documents(m.tokenizer, *texts, n_docs, doc_len);
  calib::CalibrationRun run = from_text ? run_on_text(session, docs, co, progress)
                                        : run_on_samples(session, c, m.tokenizer, n_docs, doc_len, co, progress);

  calib::Filters filters = run.calibrator.filters();
  calib::CalibrationInfo info;
  info.model_name = c.name.empty() ? std::filesystem::path(m.path).stem().string() : c.name;
  info.architecture = c.arch;
  info.fingerprint = c.fingerprint();
  info.corpus = from_text ? "python: " + std::to_string(texts->size()) + " texts" : "sampled from the model";
  info.n_docs = from_text ? static_cast<int>(docs.size()) : n_docs;
  info.doc_len = doc_len;
  info.n_samples = run.n_samples;
  info.seed = seed;
  info.orientation = std::string(calib::to_string(co.rule));
  calib::set_calibration_metadata(filters, info);
  filters.metadata["n_tokens"] = std::to_string(run.n_tokens);
  filters.metadata["text_source"] = from_text ? "python" : "model";
  const calib::FilterReport report = calib::make_report(filters, run.calibrator.head_reports(), c.n_heads, &run.keys);
  filters.metadata["report"] = report.to_json().dump();
  return {std::move(filters), std::nullopt};
}

}  // namespace

void bind_filters(nb::module_& m) {
  nb::class_<PyFilters>(m, "Filters")
      .def_static("load", &load, nb::arg("path"), nb::arg("layout").none() = nb::none(),
                  nb::arg("sign").none() = nb::none())
      .def_static("from_numpy", &from_numpy, nb::arg("array"), nb::arg("metadata") = std::map<std::string, std::string>{})
      .def("save",
           [](PyFilters& self, const std::string& path) {
             calib::write_filters(path, self.f);
             self.path = path;
           },
           nb::arg("path"))
      .def("export_hf", [](const PyFilters& self, const std::string& dir) { calib::export_hf(dir, self.f); },
           nb::arg("directory"))
      .def("compare", &compare, nb::arg("other"))
      .def("to_numpy", &to_numpy)
      .def_prop_ro("shape", [](const PyFilters& self) {
        return nb::make_tuple(self.f.n_layers, self.f.n_kv_heads, self.f.head_dim);
      })
      .def_prop_ro("metadata", [](const PyFilters& self) { return self.f.metadata; })
      .def_prop_ro("path", [](const PyFilters& self) { return self.path; });

  m.def("calibrate", &calibrate, nb::arg("model"), nb::arg("texts").none(), nb::arg("n_docs"), nb::arg("doc_len"),
        nb::arg("samples"), nb::arg("seed"), nb::arg("progress"), nb::arg("orientation"));
}

}  // namespace qf::py
