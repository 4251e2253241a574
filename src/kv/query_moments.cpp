#include "kv/query_moments.h"

#include <cmath>
#include <numeric>

#include "util/error.h"

namespace qf::kv {

void RopeGeometry::rotate(int layer, double pos, float* v, int n_vectors, int head_dim) const {
  if (empty()) return;
  if (layer < 0 || static_cast<size_t>(layer) >= inv_freq.size()) fail("rope: layer ", layer, " out of range");
  const int half = n_rot / 2;
  const int stride = adjacent ? 2 : 1, second = adjacent ? 1 : half;
  for (int i = 0; i < half; ++i) {
    const double th = pos * inv_freq[layer][i], c = std::cos(th), s = std::sin(th);
    for (int h = 0; h < n_vectors; ++h) {
      float& x0 = v[static_cast<size_t>(h) * head_dim + stride * i];
      float& x1 = v[static_cast<size_t>(h) * head_dim + stride * i + second];
      const double a = x0, b = x1;
      x0 = static_cast<float>(a * c - b * s);
      x1 = static_cast<float>(a * s + b * c);
    }
  }
}

std::vector<double> RopeGeometry::mean_rotation(int layer, int64_t p0, int n, int head_dim) const {
  std::vector<double> r(static_cast<size_t>(head_dim) * head_dim, 0.0);
  for (int i = 0; i < head_dim; ++i) r[static_cast<size_t>(i) * head_dim + i] = 1.0;
  if (empty() || n < 1) return r;
  if (layer < 0 || static_cast<size_t>(layer) >= inv_freq.size()) fail("rope: layer ", layer, " out of range");
  const int half = n_rot / 2;
  const int stride = adjacent ? 2 : 1, second = adjacent ? 1 : half;
  for (int i = 0; i < half; ++i) {
    double c = 0, s = 0;
    for (int k = 0; k < n; ++k) {
      const double th = static_cast<double>(p0 + k) * inv_freq[layer][i];
      c += std::cos(th), s += std::sin(th);
    }
    c /= n, s /= n;
    const size_t a = stride * i, b = a + second;
    // The pair's block [[c, -s], [s, c]]: x0' = c x0 - s x1, x1' = s x0 + c x1 (as rotate()).
    r[a * head_dim + a] = c, r[a * head_dim + b] = -s;
    r[b * head_dim + a] = s, r[b * head_dim + b] = c;
  }
  return r;
}

std::vector<double> RopeGeometry::mean_pair_amplitudes(int layer, int n) const {
  if (empty() || n < 1) return {};
  if (layer < 0 || static_cast<size_t>(layer) >= inv_freq.size()) fail("rope: layer ", layer, " out of range");
  std::vector<double> amplitude(n_rot / 2);
  for (int i = 0; i < n_rot / 2; ++i) {
    const double w = inv_freq[layer][i], sh = std::sin(0.5 * w);
    amplitude[i] = std::abs(sh) < 1e-12 ? 1.0 : std::sin(0.5 * n * w) / (n * sh);
  }
  return amplitude;
}

RopeGeometry::PairMatrix RopeGeometry::mean_pair_rotation(int layer, int64_t p0, int n, int head_dim) const {
  return mean_pair_rotation(layer, p0, n, head_dim, mean_pair_amplitudes(layer, n));
}

RopeGeometry::PairMatrix RopeGeometry::mean_pair_rotation(int layer, int64_t p0, int n, int head_dim,
                                                          std::span<const double> amplitudes) const {
  PairMatrix m;
  m.partner.resize(head_dim);
  std::iota(m.partner.begin(), m.partner.end(), 0);
  m.diag.assign(head_dim, 1.0);
  m.off.assign(head_dim, 0.0);
  if (empty() || n < 1) return m;
  if (layer < 0 || static_cast<size_t>(layer) >= inv_freq.size()) fail("rope: layer ", layer, " out of range");
  const int half = n_rot / 2;
  if (amplitudes.size() != static_cast<size_t>(half)) fail("rope: ", amplitudes.size(), " amplitudes for ", half, " pairs");
  const int stride = adjacent ? 2 : 1, second = adjacent ? 1 : half;
  for (int i = 0; i < half; ++i) {
    // mean of exp(i (p0 + k) w), k < n = exp(i (p0 + (n-1)/2) w) * sin(n w/2) / (n sin(w/2)).
    const double w = inv_freq[layer][i];
    const double mid = (static_cast<double>(p0) + 0.5 * (n - 1)) * w;
    const double c = std::cos(mid) * amplitudes[i], s = std::sin(mid) * amplitudes[i];
    const int a = stride * i, b = a + second;
    m.partner[a] = b, m.partner[b] = a;
    m.diag[a] = c, m.diag[b] = c;
    m.off[a] = -s, m.off[b] = s;  // x0' = c x0 - s x1, x1' = s x0 + c x1
  }
  return m;
}

void QueryMoments::clear() {
  count = 0;
  std::fill(sum.begin(), sum.end(), 0.0);
  std::fill(outer.begin(), outer.end(), 0.0);
  std::fill(recent.begin(), recent.end(), 0.0);
}

void QueryMoments::add(const float* q, int nh, int d, int recent_horizon, bool moments) {
  if (n_heads == 0) {
    if (nh < 1 || d < 1) fail("query moments: bad shape ", nh, "x", d);
    n_heads = nh, head_dim = d;
  } else if (nh != n_heads || d != head_dim) {
    fail("query moments: ", nh, "x", d, " queries added to ", n_heads, "x", head_dim, " moments");
  }
  if (recent_horizon > 0) add_recent(q, recent_horizon);
  ++count;
  if (!moments) return;
  if (sum.empty()) {
    if (count > 1) fail("query moments: sums asked for after ", count - 1, " queries kept without them");
    sum.assign(static_cast<size_t>(nh) * d, 0.0);
    outer.assign(static_cast<size_t>(nh) * d * d, 0.0);
  }
  for (int h = 0; h < nh; ++h) {
    const float* x = q + static_cast<size_t>(h) * d;
    double* s = sum.data() + static_cast<size_t>(h) * d;
    double* o = outer.data() + static_cast<size_t>(h) * d * d;
    for (int i = 0; i < d; ++i) {
      s[i] += x[i];
      const double xi = x[i];
      double* row = o + static_cast<size_t>(i) * d;
      for (int j = i; j < d; ++j) row[j] += xi * x[j];
    }
  }
}

void QueryMoments::add_recent(const float* q, int horizon) {
  const int d = head_dim;
  if (recent.empty()) recent.assign(static_cast<size_t>(n_heads) * d, 0.0);
  const double decay = 1.0 - 1.0 / horizon;
  for (int h = 0; h < n_heads; ++h) {
    const float* x = q + static_cast<size_t>(h) * d;
    double* r = recent.data() + static_cast<size_t>(h) * d;
    double norm2 = 0;
    for (int i = 0; i < d; ++i) norm2 += static_cast<double>(x[i]) * x[i];
    const double inv = norm2 > 0 ? 1.0 / std::sqrt(norm2) : 0.0;  // a zero query adds nothing
    for (int i = 0; i < d; ++i) r[i] = decay * r[i] + x[i] * inv;
  }
}

void QueryMoments::mean_cov(int h, std::vector<double>& mean, std::vector<double>& cov) const {
  const int d = head_dim;
  mean.assign(d, 0.0);
  cov.assign(static_cast<size_t>(d) * d, 0.0);
  if (count == 0) return;
  if (h < 0 || h >= n_heads) fail("query moments: head ", h, " out of range");
  if (sum.empty()) fail("query moments: only the recent queries were kept, not the sums");
  const double inv = 1.0 / static_cast<double>(count);
  const double* s = sum.data() + static_cast<size_t>(h) * d;
  const double* o = outer.data() + static_cast<size_t>(h) * d * d;
  for (int i = 0; i < d; ++i) mean[i] = s[i] * inv;
  for (int i = 0; i < d; ++i)
    for (int j = i; j < d; ++j) {
      const double c = o[static_cast<size_t>(i) * d + j] * inv - mean[i] * mean[j];
      cov[static_cast<size_t>(i) * d + j] = cov[static_cast<size_t>(j) * d + i] = c;
    }
}

}  // namespace qf::kv
