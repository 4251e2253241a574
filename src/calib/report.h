// Diagnostics of a filter set: how much query energy the filter direction carries, whether the two
// orientation rules agreed, whether keys point against the filter (the K-norm regime), and how
// close two filter sets are (corpora, rules, published vs ours).
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <span>
#include <string>
#include <vector>

#include "calib/filters.h"

namespace qf::calib {

// Per (layer, KV head) running mean of key samples. mean <k, f> = <mean k, f> by linearity, so
// keys can be streamed in before the filters exist.
class KeyMeans {
 public:
  KeyMeans(int n_layers, int n_kv_heads, int head_dim);
  // keys: [n_samples][n_kv_heads][head_dim] of one layer, post-RoPE as cached. May repeat per layer.
  void add(int layer, const float* keys, int n_samples);
  int64_t count(int layer) const;
  // Mean of <k, f> over the keys added for (layer, kv_head); NaN when none were added.
  double mean_dot(int layer, int kv_head, const float* f) const;
  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }

 private:
  int n_layers_, n_kv_heads_, head_dim_;
  std::vector<double> sum_;     // [l][kvh][d]
  std::vector<int64_t> count_;  // [l]
};

struct FilterSimilarity {
  int n_layers = 0, n_kv_heads = 0;
  std::vector<double> per_head;   // [l][kvh] cosine; 0 where either vector is zero
  std::vector<double> per_layer;  // mean over the layer's KV heads
  double mean = 0;                // mean over all heads
};
// Throws qf::Error on different shapes.
FilterSimilarity cosine_similarity(const Filters& a, const Filters& b);

struct LayerReport {
  int layer = 0;
  // From the query heads' OrientationReports (NaN / 0 when none were given).
  int n_heads = 0;
  double energy_share_mean = 0, energy_share_min = 0;
  int orientation_disagreements = 0;  // heads where the mean and majority rules differ (or one is a tie)
  // From key samples (keys_counted false when none): KV heads whose keys point against the filter.
  bool keys_counted = false;
  int n_kv_heads = 0;
  int keys_against = 0;               // KV heads with mean <k, f> < 0
  double mean_key_dot = 0;            // mean over KV heads of mean <k, f>
  double similarity = 0;              // mean cosine to a reference set (NaN when none)
};

struct FilterReport {
  std::vector<LayerReport> layers;
  bool has_queries = false, has_keys = false, has_reference = false;
  // Totals over all layers.
  double energy_share_mean = 0;
  int orientation_disagreements = 0, n_heads = 0;
  int keys_against = 0, n_kv_heads = 0;
  double similarity_mean = 0;

  std::string to_text() const;      // one header line, one line per layer, one "all" line
  nlohmann::json to_json() const;   // {"layers": [...], "summary": {...}}; NaN becomes null
  // Inverse of to_json (qf calibrate stores the report in the filter file's metadata). Throws
  // qf::Error on anything to_json would not have written.
  static FilterReport from_json(const nlohmann::json& j);
  // Fills the cos_ref column from a comparison (replacing any stored one). Throws on a shape mismatch.
  void set_reference(const FilterSimilarity& s);
};

// heads: [n_layers][n_head] (Calibrator::head_reports()) or empty; keys, reference optional.
FilterReport make_report(const Filters& f, std::span<const OrientationReport> heads, int n_head,
                         const KeyMeans* keys = nullptr, const FilterSimilarity* reference = nullptr);

}  // namespace qf::calib
