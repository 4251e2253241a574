#include "calib/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace qf::calib {

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
}

KeyMeans::KeyMeans(int n_layers, int n_kv_heads, int head_dim)
    : n_layers_(n_layers), n_kv_heads_(n_kv_heads), head_dim_(head_dim) {
  if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0)
    fail("key statistics: invalid shape ", n_layers, "x", n_kv_heads, "x", head_dim);
  sum_.assign(size_t(n_layers) * n_kv_heads * head_dim, 0.0);
  count_.assign(n_layers, 0);
}

void KeyMeans::add(int layer, const float* keys, int n_samples) {
  if (layer < 0 || layer >= n_layers_) fail("key statistics: layer ", layer, " out of range 0..", n_layers_ - 1);
  if (n_samples < 0 || (n_samples > 0 && keys == nullptr)) fail("key statistics: bad key buffer");
  const size_t row = size_t(n_kv_heads_) * head_dim_;
  double* s = sum_.data() + size_t(layer) * row;
  for (int i = 0; i < n_samples; ++i) {
    const float* k = keys + size_t(i) * row;
    for (size_t j = 0; j < row; ++j) {
      if (!std::isfinite(k[j])) fail("key statistics: key sample ", i, " of layer ", layer, " is not finite");
      s[j] += k[j];
    }
  }
  count_[layer] += n_samples;
}

int64_t KeyMeans::count(int layer) const {
  if (layer < 0 || layer >= n_layers_) fail("key statistics: layer ", layer, " out of range 0..", n_layers_ - 1);
  return count_[layer];
}

double KeyMeans::mean_dot(int layer, int kv_head, const float* f) const {
  if (kv_head < 0 || kv_head >= n_kv_heads_) fail("key statistics: kv head ", kv_head, " out of range");
  const int64_t n = count(layer);
  if (n == 0) return kNaN;
  const double* s = sum_.data() + (size_t(layer) * n_kv_heads_ + kv_head) * head_dim_;
  double dot = 0;
  for (int d = 0; d < head_dim_; ++d) dot += s[d] * f[d];
  return dot / double(n);
}

FilterSimilarity cosine_similarity(const Filters& a, const Filters& b) {
  if (a.n_layers != b.n_layers || a.n_kv_heads != b.n_kv_heads || a.head_dim != b.head_dim)
    fail("filter similarity: shapes differ (", a.n_layers, "x", a.n_kv_heads, "x", a.head_dim, " vs ", b.n_layers, "x",
         b.n_kv_heads, "x", b.head_dim, ")");
  const size_t expected = size_t(a.n_layers) * a.n_kv_heads * a.head_dim;
  if (a.data.size() != expected || b.data.size() != expected || expected == 0)
    fail("filter similarity: data size does not match the shape");
  FilterSimilarity s;
  s.n_layers = a.n_layers;
  s.n_kv_heads = a.n_kv_heads;
  s.per_head.resize(size_t(a.n_layers) * a.n_kv_heads);
  s.per_layer.resize(a.n_layers);
  double total = 0;
  for (int l = 0; l < a.n_layers; ++l) {
    double layer_sum = 0;
    for (int h = 0; h < a.n_kv_heads; ++h) {
      const float* x = a.at(l, h);
      const float* y = b.at(l, h);
      double xy = 0, xx = 0, yy = 0;
      for (int d = 0; d < a.head_dim; ++d) {
        xy += double(x[d]) * y[d];
        xx += double(x[d]) * x[d];
        yy += double(y[d]) * y[d];
      }
      // A zero filter has no direction; 0 ("unrelated") keeps the means finite.
      const double c = (xx > 0 && yy > 0) ? std::clamp(xy / std::sqrt(xx * yy), -1.0, 1.0) : 0.0;
      s.per_head[size_t(l) * a.n_kv_heads + h] = c;
      layer_sum += c;
    }
    s.per_layer[l] = layer_sum / a.n_kv_heads;
    total += layer_sum;
  }
  s.mean = total / double(s.per_head.size());
  return s;
}

FilterReport make_report(const Filters& f, std::span<const OrientationReport> heads, int n_head, const KeyMeans* keys,
                         const FilterSimilarity* reference) {
  if (f.n_layers <= 0 || f.data.size() != size_t(f.n_layers) * f.n_kv_heads * f.head_dim)
    fail("filter report: filters are empty or inconsistent");
  FilterReport r;
  r.has_queries = !heads.empty();
  r.has_keys = keys != nullptr;
  r.has_reference = reference != nullptr;
  if (r.has_queries && (n_head <= 0 || heads.size() != size_t(f.n_layers) * n_head))
    fail("filter report: ", heads.size(), " head reports for ", f.n_layers, " layers x ", n_head, " heads");
  if (keys && (keys->n_layers() != f.n_layers || keys->n_kv_heads() != f.n_kv_heads || keys->head_dim() != f.head_dim))
    fail("filter report: key statistics shape differs from the filters");
  if (reference && (reference->n_layers != f.n_layers || reference->n_kv_heads != f.n_kv_heads))
    fail("filter report: similarity shape differs from the filters");

  double energy_total = 0;
  int key_layers = 0;
  for (int l = 0; l < f.n_layers; ++l) {
    LayerReport lr;
    lr.layer = l;
    lr.energy_share_mean = lr.energy_share_min = kNaN;
    if (r.has_queries) {
      lr.n_heads = n_head;
      double sum = 0, mn = 1;
      for (int h = 0; h < n_head; ++h) {
        const OrientationReport& o = heads[size_t(l) * n_head + h];
        sum += o.energy_share;
        mn = std::min(mn, o.energy_share);
        lr.orientation_disagreements += !o.rules_agree;
      }
      lr.energy_share_mean = sum / n_head;
      lr.energy_share_min = mn;
      energy_total += sum;
      r.n_heads += n_head;
      r.orientation_disagreements += lr.orientation_disagreements;
    }
    lr.mean_key_dot = kNaN;
    if (keys && keys->count(l) > 0) {
      lr.keys_counted = true;
      lr.n_kv_heads = f.n_kv_heads;
      double sum = 0;
      for (int h = 0; h < f.n_kv_heads; ++h) {
        const double m = keys->mean_dot(l, h, f.at(l, h));
        lr.keys_against += m < 0;
        sum += m;
      }
      lr.mean_key_dot = sum / f.n_kv_heads;
      r.keys_against += lr.keys_against;
      r.n_kv_heads += f.n_kv_heads;
      ++key_layers;
    }
    lr.similarity = reference ? reference->per_layer[l] : kNaN;
    r.layers.push_back(lr);
  }
  r.energy_share_mean = r.has_queries ? energy_total / r.n_heads : kNaN;
  r.similarity_mean = reference ? reference->mean : kNaN;
  if (keys && key_layers == 0) r.has_keys = false;
  return r;
}

namespace {

std::string num(double v, const char* fmt = "%.4f") {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

std::string frac(int a, int b, bool have) { return have ? std::to_string(a) + "/" + std::to_string(b) : "-"; }

std::string row(const std::string& c0, const std::string& c1, const std::string& c2, const std::string& c3,
                const std::string& c4, const std::string& c5, const std::string& c6) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%5s %12s %11s %16s %13s %13s %8s\n", c0.c_str(), c1.c_str(), c2.c_str(), c3.c_str(),
                c4.c_str(), c5.c_str(), c6.c_str());
  return buf;
}

}  // namespace

std::string FilterReport::to_text() const {
  std::string s = row("layer", "energy_mean", "energy_min", "orient_disagree", "keys_against", "mean_key_dot", "cos_ref");
  for (const LayerReport& l : layers)
    s += row(std::to_string(l.layer), num(l.energy_share_mean), num(l.energy_share_min),
             frac(l.orientation_disagreements, l.n_heads, has_queries), frac(l.keys_against, l.n_kv_heads, l.keys_counted),
             num(l.mean_key_dot, "%.4g"), num(l.similarity));
  s += row("all", num(energy_share_mean), "-", frac(orientation_disagreements, n_heads, has_queries),
           frac(keys_against, n_kv_heads, has_keys), "-", num(similarity_mean));
  return s;
}

nlohmann::json FilterReport::to_json() const {
  auto val = [](double v) { return std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v); };
  nlohmann::json ls = nlohmann::json::array();
  for (const LayerReport& l : layers) {
    nlohmann::json j;
    j["layer"] = l.layer;
    if (has_queries) {
      j["energy_share_mean"] = val(l.energy_share_mean);
      j["energy_share_min"] = val(l.energy_share_min);
      j["orientation_disagreements"] = l.orientation_disagreements;
      j["n_heads"] = l.n_heads;
    }
    if (l.keys_counted) {
      j["keys_against"] = l.keys_against;
      j["n_kv_heads"] = l.n_kv_heads;
      j["mean_key_dot"] = val(l.mean_key_dot);
    }
    if (has_reference) j["cosine_to_reference"] = val(l.similarity);
    ls.push_back(std::move(j));
  }
  nlohmann::json sum;
  if (has_queries) {
    sum["energy_share_mean"] = val(energy_share_mean);
    sum["orientation_disagreements"] = orientation_disagreements;
    sum["n_heads"] = n_heads;
  }
  if (has_keys) {
    sum["keys_against"] = keys_against;
    sum["n_kv_heads"] = n_kv_heads;
  }
  if (has_reference) sum["cosine_to_reference"] = val(similarity_mean);
  return nlohmann::json{{"layers", std::move(ls)}, {"summary", std::move(sum)}};
}

FilterReport FilterReport::from_json(const nlohmann::json& j) {
  using nlohmann::json;
  auto obj = [](const json& v, const char* what) -> const json& {
    if (!v.is_object()) fail("filter report: ", what, " is not a JSON object");
    return v;
  };
  // null stands for NaN (to_json writes NaN as null).
  auto real = [](const json& o, const char* key) {
    const auto it = o.find(key);
    if (it == o.end() || it->is_null()) return kNaN;
    if (!it->is_number()) fail("filter report: '", key, "' is not a number");
    return it->get<double>();
  };
  auto count = [](const json& o, const char* key, int max) {
    const auto it = o.find(key);
    if (it == o.end() || !it->is_number_integer()) fail("filter report: '", key, "' is missing or not an integer");
    const int64_t v = it->get<int64_t>();
    if (v < 0 || v > max) fail("filter report: '", key, "' = ", v, " is out of range 0..", max);
    return static_cast<int>(v);
  };
  constexpr int kMax = 1 << 24;
  obj(j, "the report");
  const auto ls = j.find("layers");
  const auto sm = j.find("summary");
  if (ls == j.end() || !ls->is_array() || sm == j.end()) fail("filter report: needs 'layers' (array) and 'summary'");
  const json& sum = obj(*sm, "'summary'");
  FilterReport r;
  r.has_queries = sum.contains("energy_share_mean");
  r.has_keys = sum.contains("keys_against");
  r.has_reference = sum.contains("cosine_to_reference");
  r.energy_share_mean = r.has_queries ? real(sum, "energy_share_mean") : kNaN;
  if (r.has_queries) {
    r.n_heads = count(sum, "n_heads", kMax);
    r.orientation_disagreements = count(sum, "orientation_disagreements", r.n_heads);
  }
  if (r.has_keys) {
    r.n_kv_heads = count(sum, "n_kv_heads", kMax);
    r.keys_against = count(sum, "keys_against", r.n_kv_heads);
  }
  r.similarity_mean = r.has_reference ? real(sum, "cosine_to_reference") : kNaN;
  for (const json& lj : *ls) {
    obj(lj, "a layer entry");
    LayerReport l;
    l.layer = count(lj, "layer", kMax);
    l.energy_share_mean = l.energy_share_min = l.mean_key_dot = l.similarity = kNaN;
    if (r.has_queries) {
      l.n_heads = count(lj, "n_heads", kMax);
      l.orientation_disagreements = count(lj, "orientation_disagreements", l.n_heads);
      l.energy_share_mean = real(lj, "energy_share_mean");
      l.energy_share_min = real(lj, "energy_share_min");
    }
    if (lj.contains("keys_against")) {
      l.keys_counted = true;
      l.n_kv_heads = count(lj, "n_kv_heads", kMax);
      l.keys_against = count(lj, "keys_against", l.n_kv_heads);
      l.mean_key_dot = real(lj, "mean_key_dot");
    }
    if (r.has_reference) l.similarity = real(lj, "cosine_to_reference");
    r.layers.push_back(l);
  }
  return r;
}

void FilterReport::set_reference(const FilterSimilarity& s) {
  if (s.n_layers != static_cast<int>(layers.size()))
    fail("filter report: a comparison of ", s.n_layers, " layers for a report of ", layers.size());
  for (size_t l = 0; l < layers.size(); ++l) layers[l].similarity = s.per_layer[l];
  similarity_mean = s.mean;
  has_reference = true;
}

}  // namespace qf::calib
