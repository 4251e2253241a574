#include "eval/metrics.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "util/error.h"

namespace qf::eval {

namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
bool is_digit(char c) { return c >= '0' && c <= '9'; }
}  // namespace

double token_nll(std::span<const float> logits, int32_t target) {
  if (target < 0 || static_cast<size_t>(target) >= logits.size())
    fail("token_nll: target ", target, " outside ", logits.size(), " logits");
  double mx = -std::numeric_limits<double>::infinity();
  for (float l : logits) mx = std::max(mx, static_cast<double>(l));
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - mx);
  return std::log(sum) + mx - static_cast<double>(logits[target]);
}

double perplexity(std::span<const double> nll) {
  if (nll.empty()) return kNaN;
  return std::exp(std::accumulate(nll.begin(), nll.end(), 0.0) / static_cast<double>(nll.size()));
}

double gap_ratio(double ppl_policy, double ppl_full, double ppl_streaming) {
  if (ppl_policy == ppl_full && std::isfinite(ppl_full)) return 0.0;  // also when streaming == full
  const double den = ppl_streaming - ppl_full;
  if (!std::isfinite(ppl_policy) || !std::isfinite(ppl_full) || !std::isfinite(ppl_streaming) || den == 0.0)
    return kNaN;
  return (ppl_policy - ppl_full) / den;
}

std::vector<double> average_ranks(std::span<const double> x) {
  const size_t n = x.size();
  for (double v : x)
    if (std::isnan(v)) fail("average_ranks: NaN value");
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return x[a] < x[b]; });
  std::vector<double> r(n);
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    while (j < n && x[order[j]] == x[order[i]]) ++j;
    const double rank = 0.5 * static_cast<double>(i + 1 + j);  // mean of ranks i+1 .. j
    for (size_t k = i; k < j; ++k) r[order[k]] = rank;
    i = j;
  }
  return r;
}

double spearman(std::span<const double> a, std::span<const double> b) {
  if (a.size() != b.size()) fail("spearman: ", a.size(), " vs ", b.size(), " values");
  const size_t n = a.size();
  if (n < 2) return kNaN;
  const std::vector<double> ra = average_ranks(a), rb = average_ranks(b);
  const double m = 0.5 * static_cast<double>(n + 1);  // mean rank, ties included
  double sab = 0, saa = 0, sbb = 0;
  for (size_t i = 0; i < n; ++i) {
    const double da = ra[i] - m, db = rb[i] - m;
    sab += da * db;
    saa += da * da;
    sbb += db * db;
  }
  if (saa == 0 || sbb == 0) return kNaN;
  return sab / std::sqrt(saa * sbb);
}

std::vector<std::string> digit_runs(std::string_view s) {
  std::vector<std::string> runs;
  std::string cur;
  for (size_t i = 0; i < s.size(); ++i) {
    if (is_digit(s[i])) {
      cur += s[i];
    } else if (!cur.empty() && (s[i] == ',' || s[i] == '.' || s[i] == ' ') && i + 1 < s.size() && is_digit(s[i + 1])) {
      // separator between digits: the run continues
    } else if (!cur.empty()) {
      runs.push_back(std::move(cur));
      cur.clear();
    }
  }
  if (!cur.empty()) runs.push_back(std::move(cur));
  return runs;
}

bool answer_matches(std::string_view answer, std::string_view number) {
  if (number.empty()) return false;
  for (const std::string& r : digit_runs(answer))
    if (r == number) return true;
  return false;
}

double leading_digits_credit(std::string_view answer, std::string_view number) {
  if (number.empty()) return 0.0;
  size_t best = 0;
  for (const std::string& r : digit_runs(answer)) {
    size_t k = 0;
    while (k < r.size() && k < number.size() && r[k] == number[k]) ++k;
    best = std::max(best, k);
  }
  return static_cast<double>(best) / static_cast<double>(number.size());
}

Interval bootstrap_ci(int n_units, const std::function<double(std::span<const int>)>& statistic, int n_resamples,
                      double level, uint64_t seed) {
  if (n_resamples < 1) fail("bootstrap: n_resamples must be >= 1");
  if (!(level > 0 && level < 1)) fail("bootstrap: level must be in (0, 1)");
  if (n_units < 1) return {kNaN, kNaN};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(0, n_units - 1);
  std::vector<int> idx(n_units);
  std::vector<double> stats;
  stats.reserve(n_resamples);
  for (int r = 0; r < n_resamples; ++r) {
    for (int& i : idx) i = pick(rng);
    const double v = statistic(idx);
    if (std::isfinite(v)) stats.push_back(v);
  }
  if (stats.size() * 2 < static_cast<size_t>(n_resamples)) return {kNaN, kNaN};
  std::sort(stats.begin(), stats.end());
  // Nearest-rank percentiles of the resampled statistic.
  auto at = [&](double q) {
    const double pos = q * static_cast<double>(stats.size() - 1);
    return stats[static_cast<size_t>(std::lround(pos))];
  };
  const double tail = 0.5 * (1.0 - level);
  return {at(tail), at(1.0 - tail)};
}

double mean(std::span<const double> x) {
  if (x.empty()) return kNaN;
  return std::accumulate(x.begin(), x.end(), 0.0) / static_cast<double>(x.size());
}

double median(std::span<const double> x) {
  if (x.empty()) return kNaN;
  std::vector<double> v(x.begin(), x.end());
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace qf::eval
