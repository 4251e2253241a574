// Q-Filters calibration math: the dominant direction of each query head's (uncentered) samples,
// its orientation, the GQA average, and conversion of filters computed on Hugging Face
// checkpoints by the reference code into this engine's canonical form.
//
// Canonical form (what every qf::calib::Filters holds in memory): data[l][kvh][d] in GGUF row
// order (rotary pairs adjacent), oriented so that a HIGHER <k, f> means KEEP the key. This is the
// layout the kv "qfilters" policy scores with. Conversions happen only at load time.
#pragma once
#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qf::calib {

// How the sign of a query head's direction is chosen so that its queries project positively.
enum class OrientationRule {
  // Sign of mean_i <x_i, v>. The scoring argument needs kappa = E<Q, u> > 0 (E_Q<Q,K> ~ kappa <K,u>),
  // and this is exactly that condition, so it is the default. Falls back to the vote on a tie.
  kMeanProjection,
  // The reference code's rule: majority vote over the signs of the first left singular vector's
  // entries (u1 = X v / sigma1, so the signs of X v). Falls back to the mean on a tie.
  kMajorityVote,
};
std::string_view to_string(OrientationRule r);
OrientationRule parse_orientation_rule(std::string_view s);  // "mean" | "majority"

// What dominant_direction() saw; one per query head in a calibration.
struct OrientationReport {
  int n_samples = 0;
  double sigma1_sq = 0;        // largest eigenvalue of X^T X (= sigma_1^2 of X)
  double sigma2_sq = 0;        // second largest (0 when dim == 1)
  double total_energy = 0;     // ||X||_F^2 = sum_i sigma_i^2
  double energy_share = 0;     // sigma1_sq / total_energy: share of query energy on the direction
  double mean_projection = 0;  // mean_i <x_i, v> for the returned (oriented) v
  int n_positive = 0;          // samples with <x_i, v> > 0 for the returned v
  int n_negative = 0;          // samples with <x_i, v> < 0 for the returned v
  int sign_mean = 0;           // sign each rule would apply to the raw eigenvector: +1, -1, 0 = tie
  int sign_majority = 0;
  bool rules_agree = true;     // both rules decided and chose the same sign
};

// First right singular vector of the row-major (n_samples x dim) matrix X, NOT centered, as a unit
// vector oriented by `rule`. Rows are `row_stride` floats apart (>= dim), so one head's slice of a
// [n][n_head][head_dim] buffer can be read in place. Throws qf::Error on empty input, non-finite
// samples or all-zero samples. `rep` may be null.
Eigen::VectorXf dominant_direction(const float* samples, int n_samples, int dim, OrientationReport* rep,
                                   OrientationRule rule = OrientationRule::kMeanProjection);
Eigen::VectorXf dominant_direction(const float* samples, int n_samples, int dim, std::ptrdiff_t row_stride,
                                   OrientationReport* rep, OrientationRule rule = OrientationRule::kMeanProjection);

// Filters for every layer and KV head, canonical form (see top of file).
struct Filters {
  int n_layers = 0, n_kv_heads = 0, head_dim = 0;
  std::vector<float> data;                         // [l][kvh][d]
  std::map<std::string, std::string> metadata;     // written to the safetensors __metadata__

  // Optional query statistics before the rotary embedding (filter files of query_stats version 1;
  // absent from older files): per layer and QUERY head, the mean query and the covariance's top
  // `stats_rank` eigenvectors scaled by the square roots of their eigenvalues, so that
  // Sigma ~= sum_r u_r u_r^T. GGUF row order, like the filters; not affected by the sign convention.
  int n_query_heads = 0, stats_rank = 0;
  std::vector<float> query_mean;     // [l][h][d]
  std::vector<float> query_factors;  // [l][h][r][d]
  bool has_query_stats() const { return !query_mean.empty(); }

  Filters() = default;
  Filters(int n_layers, int n_kv_heads, int head_dim);  // zero-filled; throws on non-positive dims
  size_t size() const { return data.size(); }
  float* at(int layer, int kv_head) { return data.data() + offset(layer, kv_head); }
  const float* at(int layer, int kv_head) const { return data.data() + offset(layer, kv_head); }
  std::span<const float> head(int layer, int kv_head) const { return {at(layer, kv_head), size_t(head_dim)}; }

 private:
  size_t offset(int layer, int kv_head) const;
};

// One layer: queries as [n_samples][n_head][head_dim]. Query head h belongs to KV head
// h / (n_head / n_head_kv) (llama.cpp / HF grouping). The oriented unit directions of a group are
// averaged without renormalisation (a positive scale never changes a ranking within a head) and
// written to out[n_head_kv][head_dim]. Returns one report per query head.
std::vector<OrientationReport> layer_filters(const float* queries, int n_samples, int n_head, int n_head_kv,
                                             int head_dim, float* out,
                                             OrientationRule rule = OrientationRule::kMeanProjection);

// Accumulates a whole calibration layer by layer; the query-collection hook feeds it all samples of
// a layer at once (the direction needs them together) and `qf calibrate` writes filters() out.
class Calibrator {
 public:
  Calibrator(int n_layers, int n_head, int n_head_kv, int head_dim,
             OrientationRule rule = OrientationRule::kMeanProjection);
  // queries: [n_samples][n_head][head_dim] post-RoPE. Each layer exactly once.
  void add_layer(int layer, const float* queries, int n_samples);
  bool complete() const;  // every layer added
  int n_head() const { return n_head_; }
  const Filters& filters() const { return filters_; }
  Filters& filters() { return filters_; }
  // [n_layers][n_head], row-major; entries of layers not yet added are default-constructed.
  const std::vector<OrientationReport>& head_reports() const { return reports_; }
  // queries: [n_samples][n_head][head_dim] BEFORE the rotary embedding. Stores the layer's mean
  // and top-`rank` covariance factors (Filters::query_mean / query_factors). Each layer at most
  // once; all layers must use the same rank.
  void add_query_stats(int layer, const float* queries, int n_samples, int rank);

 private:
  int n_head_, n_head_kv_;
  OrientationRule rule_;
  Filters filters_;
  std::vector<OrientationReport> reports_;
  std::vector<bool> done_;
};

// Mean and top-`rank` covariance factors (sqrt(lambda_i) e_i, largest first, covariance divided by
// n) of n_samples rows of `dim` floats, `row_stride` apart; computed in double. Throws qf::Error
// on empty input, non-finite samples or rank outside 0..dim.
void query_moments(const float* samples, int n_samples, int dim, std::ptrdiff_t row_stride, int rank, float* mean,
                   float* factors);

// Per layer, how much its queries vary around their mean: the mean over its query heads of
// sum_r ||u_r||^2 / ||mu||^2 (the variance the stored factors capture over the squared mean). The
// per-layer budgets `qf eval --layer-weights spread` are proportional to it: a layer whose queries
// keep changing is the one a fixed selection of keys serves worst. Throws qf::Error without query
// statistics (or factors), or for a zero mean query.
std::vector<float> query_spread(const Filters& f);

// ---- Converting filters from other sources -------------------------------------------------------

// Row order inside each head. kHf: rotary pairs are (i, i + d/2) as in Hugging Face checkpoints;
// kGguf: llama.cpp's converter permuted Q/K rows so the pairs are (2i, 2i+1).
enum class FilterLayout { kGguf, kHf };
// What a stored filter means. kKeepLargestDot (ours): keep keys with the largest <k, f>.
// kKeepSmallestDot: the reference code stores -v1 and scores with -<k, f>, so published files
// (huggingface.co/nthngdy, kvpress QFilterPress) keep keys with the SMALLEST <k, f>.
enum class SignConvention { kKeepLargestDot, kKeepSmallestDot };

std::string_view to_string(FilterLayout l);       // "gguf" | "hf"
std::string_view to_string(SignConvention s);     // "keep_largest_dot" | "keep_smallest_dot"
FilterLayout parse_filter_layout(std::string_view s);        // throws qf::Error on anything else
SignConvention parse_sign_convention(std::string_view s);    // also accepts '-' for '_'

// One head: gguf[2i] = hf[i], gguf[2i+1] = hf[i + d/2]. head_dim must be even. in != out.
void hf_to_gguf_head(const float* hf, float* gguf, int head_dim);

// The inverse: gguf[2i] -> hf[i], gguf[2i+1] -> hf[i + d/2]. head_dim must be even. in != out.
void gguf_to_hf_head(const float* gguf, float* hf, int head_dim);

// Returns `in` converted to canonical form (GGUF order, keep largest dot); metadata is copied and
// its sign_convention / layout entries updated, plus "converted_from" when anything changed.
Filters to_canonical(const Filters& in, FilterLayout layout, SignConvention sign);
// The inverse of to_canonical: canonical filters written in `layout` row order with `sign`'s
// meaning, so that to_canonical(from_canonical(f, l, s), l, s) == f. Metadata is copied as is.
Filters from_canonical(const Filters& canonical, FilterLayout layout, SignConvention sign);

}  // namespace qf::calib
