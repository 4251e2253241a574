#include "calib/filters.h"

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <limits>

#include "util/error.h"

namespace qf::calib {

std::string_view to_string(OrientationRule r) {
  return r == OrientationRule::kMeanProjection ? "mean" : "majority";
}

OrientationRule parse_orientation_rule(std::string_view s) {
  if (s == "mean") return OrientationRule::kMeanProjection;
  if (s == "majority") return OrientationRule::kMajorityVote;
  fail("unknown orientation rule '", s, "' (expected mean or majority)");
}

Eigen::VectorXf dominant_direction(const float* samples, int n_samples, int dim, OrientationReport* rep,
                                   OrientationRule rule) {
  return dominant_direction(samples, n_samples, dim, dim, rep, rule);
}

// Why the Gram matrix and not an SVD of X: X is tall (n ~ 3000 samples x d = 64) and only v1 and
// the singular values are needed. v1 is the top eigenvector of G = X^T X and sigma_i^2 are G's
// eigenvalues, so one streaming pass builds G (n d^2 / 2 flops, memory d^2 instead of n d) and a
// d x d symmetric eigensolver does the rest. Forming G squares the condition number, which is
// why it is accumulated in double: the error on v1 is ~1e-16 * sigma1^2 / (sigma1^2 - sigma2^2),
// far below float precision unless the top two singular values coincide to ~8 digits, and then no
// method defines v1 (the report carries sigma2_sq so such a head can be spotted). The tests check
// the result against Eigen's JacobiSVD of X.
Eigen::VectorXf dominant_direction(const float* samples, int n_samples, int dim, std::ptrdiff_t row_stride,
                                   OrientationReport* rep, OrientationRule rule) {
  if (n_samples <= 0) fail("calibration: no query samples (n_samples = ", n_samples, ")");
  if (dim <= 0) fail("calibration: head dimension must be positive, got ", dim);
  if (row_stride < dim) fail("calibration: row stride ", row_stride, " is smaller than the dimension ", dim);
  if (samples == nullptr) fail("calibration: null sample buffer");

  auto row = [&](int i) { return samples + static_cast<std::ptrdiff_t>(i) * row_stride; };

  constexpr int kBlock = 256;
  Eigen::MatrixXd gram = Eigen::MatrixXd::Zero(dim, dim);
  Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> block(std::min(kBlock, n_samples), dim);
  for (int r0 = 0; r0 < n_samples; r0 += kBlock) {
    const int rows = std::min(kBlock, n_samples - r0);
    for (int r = 0; r < rows; ++r) {
      const float* x = row(r0 + r);
      for (int c = 0; c < dim; ++c) {
        if (!std::isfinite(x[c])) fail("calibration: sample ", r0 + r, " has a non-finite value at index ", c);
        block(r, c) = x[c];
      }
    }
    gram.selfadjointView<Eigen::Lower>().rankUpdate(block.topRows(rows).transpose());
  }
  const double total = gram.trace();  // only the diagonal and lower triangle are filled
  if (!(total > 0)) fail("calibration: all ", n_samples, " query samples are zero");

  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);  // reads the lower triangle
  if (eig.info() != Eigen::Success) fail("calibration: eigensolver did not converge (dim ", dim, ")");
  Eigen::VectorXd v = eig.eigenvectors().col(dim - 1);  // eigenvalues are sorted ascending
  v.normalize();

  double sum = 0;
  int pos = 0, neg = 0;
  for (int i = 0; i < n_samples; ++i) {
    const float* x = row(i);
    double p = 0;
    for (int c = 0; c < dim; ++c) p += double(x[c]) * v[c];
    sum += p;
    pos += p > 0;
    neg += p < 0;
  }
  const int sign_mean = (sum > 0) - (sum < 0);
  const int sign_majority = (pos > neg) - (pos < neg);
  int sign = rule == OrientationRule::kMeanProjection ? sign_mean : sign_majority;
  if (sign == 0) sign = rule == OrientationRule::kMeanProjection ? sign_majority : sign_mean;
  if (sign == 0) {
    // Both rules undecided (symmetric data): any sign is as good; pick a deterministic one.
    Eigen::Index imax = 0;
    v.cwiseAbs().maxCoeff(&imax);
    sign = v[imax] >= 0 ? 1 : -1;
  }

  if (rep) {
    *rep = OrientationReport{};
    rep->n_samples = n_samples;
    rep->sigma1_sq = std::max(0.0, eig.eigenvalues()[dim - 1]);
    rep->sigma2_sq = dim > 1 ? std::max(0.0, eig.eigenvalues()[dim - 2]) : 0.0;
    rep->total_energy = total;
    rep->energy_share = std::min(1.0, rep->sigma1_sq / total);
    rep->mean_projection = sign * sum / n_samples;
    rep->n_positive = sign > 0 ? pos : neg;
    rep->n_negative = sign > 0 ? neg : pos;
    rep->sign_mean = sign_mean;
    rep->sign_majority = sign_majority;
    rep->rules_agree = sign_mean != 0 && sign_mean == sign_majority;
  }
  return (double(sign) * v).cast<float>();
}

Filters::Filters(int n_layers_, int n_kv_heads_, int head_dim_)
    : n_layers(n_layers_), n_kv_heads(n_kv_heads_), head_dim(head_dim_) {
  if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0)
    fail("filters: invalid shape ", n_layers, "x", n_kv_heads, "x", head_dim);
  data.assign(size_t(n_layers) * size_t(n_kv_heads) * size_t(head_dim), 0.0f);
}

size_t Filters::offset(int layer, int kv_head) const {
  if (layer < 0 || layer >= n_layers || kv_head < 0 || kv_head >= n_kv_heads)
    fail("filters: head (", layer, ", ", kv_head, ") out of range ", n_layers, "x", n_kv_heads);
  return (size_t(layer) * size_t(n_kv_heads) + size_t(kv_head)) * size_t(head_dim);
}

static void check_heads(int n_head, int n_head_kv, int head_dim) {
  if (n_head <= 0 || n_head_kv <= 0 || head_dim <= 0)
    fail("calibration: invalid head shape n_head=", n_head, " n_head_kv=", n_head_kv, " head_dim=", head_dim);
  if (n_head % n_head_kv != 0)
    fail("calibration: n_head (", n_head, ") is not a multiple of n_head_kv (", n_head_kv, ")");
}

std::vector<OrientationReport> layer_filters(const float* queries, int n_samples, int n_head, int n_head_kv,
                                             int head_dim, float* out, OrientationRule rule) {
  check_heads(n_head, n_head_kv, head_dim);
  if (out == nullptr) fail("calibration: null output buffer");
  const int group = n_head / n_head_kv;
  const std::ptrdiff_t stride = std::ptrdiff_t(n_head) * head_dim;
  std::vector<OrientationReport> reps(n_head);
  std::fill(out, out + std::ptrdiff_t(n_head_kv) * head_dim, 0.0f);
  for (int h = 0; h < n_head; ++h) {
    const float* q = queries == nullptr ? nullptr : queries + std::ptrdiff_t(h) * head_dim;
    const Eigen::VectorXf v = dominant_direction(q, n_samples, head_dim, stride, &reps[h], rule);
    float* f = out + std::ptrdiff_t(h / group) * head_dim;
    for (int d = 0; d < head_dim; ++d) f[d] += v[d] / float(group);
  }
  return reps;
}

Calibrator::Calibrator(int n_layers, int n_head, int n_head_kv, int head_dim, OrientationRule rule)
    : n_head_(n_head), n_head_kv_(n_head_kv), rule_(rule), filters_(n_layers, n_head_kv, head_dim) {
  check_heads(n_head, n_head_kv, head_dim);
  reports_.resize(size_t(n_layers) * n_head);
  done_.assign(n_layers, false);
}

void Calibrator::add_layer(int layer, const float* queries, int n_samples) {
  if (layer < 0 || layer >= filters_.n_layers)
    fail("calibration: layer ", layer, " out of range 0..", filters_.n_layers - 1);
  if (done_[layer]) fail("calibration: layer ", layer, " was already added");
  std::vector<OrientationReport> reps =
      layer_filters(queries, n_samples, n_head_, n_head_kv_, filters_.head_dim, filters_.at(layer, 0), rule_);
  std::copy(reps.begin(), reps.end(), reports_.begin() + std::ptrdiff_t(layer) * n_head_);
  done_[layer] = true;
}

void query_moments(const float* samples, int n_samples, int dim, std::ptrdiff_t row_stride, int rank, float* mean,
                   float* factors) {
  if (n_samples <= 0) fail("calibration: no query samples (n_samples = ", n_samples, ")");
  if (dim <= 0 || row_stride < dim) fail("calibration: invalid dimension ", dim, " or row stride ", row_stride);
  if (rank < 0 || rank > dim) fail("calibration: covariance rank ", rank, " is outside 0..", dim);
  if (samples == nullptr || mean == nullptr || (rank > 0 && factors == nullptr)) fail("calibration: null buffer");
  Eigen::VectorXd sum = Eigen::VectorXd::Zero(dim);
  Eigen::MatrixXd outer = Eigen::MatrixXd::Zero(dim, dim);
  for (int i = 0; i < n_samples; ++i) {
    const Eigen::Map<const Eigen::VectorXf> x(samples + std::ptrdiff_t(i) * row_stride, dim);
    if (!x.allFinite()) fail("calibration: non-finite query sample in row ", i);
    const Eigen::VectorXd xd = x.cast<double>();
    sum += xd;
    outer.selfadjointView<Eigen::Lower>().rankUpdate(xd);
  }
  const Eigen::VectorXd mu = sum / n_samples;
  // The biased covariance (divided by n), as kvpress's Expected Attention.
  const Eigen::MatrixXd cov = Eigen::MatrixXd(outer.selfadjointView<Eigen::Lower>()) / n_samples - mu * mu.transpose();
  for (int d = 0; d < dim; ++d) mean[d] = static_cast<float>(mu[d]);
  if (rank == 0) return;
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(cov);
  if (eig.info() != Eigen::Success) fail("calibration: the query covariance eigensolver did not converge");
  for (int r = 0; r < rank; ++r) {
    const int col = dim - 1 - r;  // eigenvalues ascend
    const double scale = std::sqrt(std::max(0.0, eig.eigenvalues()[col]));
    for (int d = 0; d < dim; ++d) factors[std::ptrdiff_t(r) * dim + d] = static_cast<float>(scale * eig.eigenvectors()(d, col));
  }
}

std::vector<float> query_spread(const Filters& f) {
  if (!f.has_query_stats() || f.stats_rank < 1) fail("the filter file has no query statistics with covariance factors (qf calibrate --stats-rank N)");
  const int d = f.head_dim, nh = f.n_query_heads, rank = f.stats_rank;
  std::vector<float> spread(f.n_layers);
  for (int l = 0; l < f.n_layers; ++l) {
    double sum = 0;
    for (int h = 0; h < nh; ++h) {
      const float* mu = f.query_mean.data() + (static_cast<size_t>(l) * nh + h) * d;
      const float* u = f.query_factors.data() + (static_cast<size_t>(l) * nh + h) * rank * d;
      double m2 = 0, var = 0;
      for (int i = 0; i < d; ++i) m2 += static_cast<double>(mu[i]) * mu[i];
      for (int i = 0; i < rank * d; ++i) var += static_cast<double>(u[i]) * u[i];
      if (!(m2 > 0)) fail("query spread: layer ", l, " head ", h, " has a zero mean query");
      sum += var / m2;
    }
    spread[l] = static_cast<float>(sum / nh);
  }
  return spread;
}

void Calibrator::add_query_stats(int layer, const float* queries, int n_samples, int rank) {
  Filters& f = filters_;
  if (layer < 0 || layer >= f.n_layers) fail("calibration: layer ", layer, " out of range 0..", f.n_layers - 1);
  if (rank < 1 || rank > f.head_dim) fail("calibration: covariance rank ", rank, " is outside 1..", f.head_dim);
  if (!f.has_query_stats()) {
    f.n_query_heads = n_head_;
    f.stats_rank = rank;
    f.query_mean.assign(size_t(f.n_layers) * n_head_ * f.head_dim, std::numeric_limits<float>::quiet_NaN());
    f.query_factors.assign(size_t(f.n_layers) * n_head_ * rank * f.head_dim, 0.0f);
  } else if (rank != f.stats_rank) {
    fail("calibration: query statistics of rank ", rank, " after rank ", f.stats_rank);
  }
  const size_t d = size_t(f.head_dim);
  float* mean = f.query_mean.data() + size_t(layer) * n_head_ * d;
  if (!std::isnan(mean[0])) fail("calibration: query statistics of layer ", layer, " were already added");
  for (int h = 0; h < n_head_; ++h)
    query_moments(queries + size_t(h) * d, n_samples, f.head_dim, std::ptrdiff_t(n_head_) * f.head_dim, rank,
                  mean + size_t(h) * d, f.query_factors.data() + (size_t(layer) * n_head_ + h) * rank * d);
}

bool Calibrator::complete() const { return std::all_of(done_.begin(), done_.end(), [](bool b) { return b; }); }

std::string_view to_string(FilterLayout l) { return l == FilterLayout::kGguf ? "gguf" : "hf"; }

std::string_view to_string(SignConvention s) {
  return s == SignConvention::kKeepLargestDot ? "keep_largest_dot" : "keep_smallest_dot";
}

FilterLayout parse_filter_layout(std::string_view s) {
  if (s == "gguf") return FilterLayout::kGguf;
  if (s == "hf") return FilterLayout::kHf;
  fail("unknown filter layout '", s, "' (expected gguf or hf)");
}

SignConvention parse_sign_convention(std::string_view s) {
  std::string t(s);
  std::replace(t.begin(), t.end(), '-', '_');
  if (t == "keep_largest_dot") return SignConvention::kKeepLargestDot;
  if (t == "keep_smallest_dot") return SignConvention::kKeepSmallestDot;
  fail("unknown filter sign convention '", s, "' (expected keep_largest_dot or keep_smallest_dot)");
}

void hf_to_gguf_head(const float* hf, float* gguf, int head_dim) {
  if (head_dim <= 0 || head_dim % 2 != 0) fail("filters: HF layout needs an even head_dim, got ", head_dim);
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    gguf[2 * i] = hf[i];
    gguf[2 * i + 1] = hf[i + half];
  }
}

void gguf_to_hf_head(const float* gguf, float* hf, int head_dim) {
  if (head_dim <= 0 || head_dim % 2 != 0) fail("filters: HF layout needs an even head_dim, got ", head_dim);
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    hf[i] = gguf[2 * i];
    hf[i + half] = gguf[2 * i + 1];
  }
}

static void drop_query_stats(Filters& f) {
  f.n_query_heads = f.stats_rank = 0;
  f.query_mean.clear();
  f.query_factors.clear();
}

Filters to_canonical(const Filters& in, FilterLayout layout, SignConvention sign) {
  if (in.data.size() != size_t(in.n_layers) * size_t(in.n_kv_heads) * size_t(in.head_dim) || in.data.empty())
    fail("filters: data size ", in.data.size(), " does not match shape ", in.n_layers, "x", in.n_kv_heads, "x",
         in.head_dim);
  Filters out = in;
  const float s = sign == SignConvention::kKeepSmallestDot ? -1.0f : 1.0f;
  std::vector<float> tmp(in.head_dim);
  for (int l = 0; l < in.n_layers; ++l) {
    for (int h = 0; h < in.n_kv_heads; ++h) {
      const float* src = in.at(l, h);
      for (int d = 0; d < in.head_dim; ++d) tmp[d] = s * src[d];
      if (layout == FilterLayout::kHf) hf_to_gguf_head(tmp.data(), out.at(l, h), in.head_dim);
      else std::copy(tmp.begin(), tmp.end(), out.at(l, h));
    }
  }
  if (layout != FilterLayout::kGguf || sign != SignConvention::kKeepLargestDot)
    out.metadata["converted_from"] = std::string(to_string(layout)) + "/" + std::string(to_string(sign));
  out.metadata["layout"] = to_string(FilterLayout::kGguf);
  out.metadata["sign_convention"] = to_string(SignConvention::kKeepLargestDot);
  if (layout != FilterLayout::kGguf) drop_query_stats(out);  // only our (gguf-order) files carry them
  return out;
}

Filters from_canonical(const Filters& canonical, FilterLayout layout, SignConvention sign) {
  const Filters& in = canonical;
  if (in.data.size() != size_t(in.n_layers) * size_t(in.n_kv_heads) * size_t(in.head_dim) || in.data.empty())
    fail("filters: data size ", in.data.size(), " does not match shape ", in.n_layers, "x", in.n_kv_heads, "x",
         in.head_dim);
  Filters out = in;
  const float s = sign == SignConvention::kKeepSmallestDot ? -1.0f : 1.0f;
  for (int l = 0; l < in.n_layers; ++l) {
    for (int h = 0; h < in.n_kv_heads; ++h) {
      float* dst = out.at(l, h);
      if (layout == FilterLayout::kHf) gguf_to_hf_head(in.at(l, h), dst, in.head_dim);
      for (int d = 0; d < in.head_dim; ++d) dst[d] *= s;
    }
  }
  if (layout != FilterLayout::kGguf) drop_query_stats(out);  // published files hold the filters only
  return out;
}

}  // namespace qf::calib
