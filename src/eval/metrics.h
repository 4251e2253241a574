// The numbers the evaluations report, kept free of any model so they can be tested on their own.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qf::eval {

// -log softmax(logits)[target], computed in double with the max subtracted. Throws qf::Error
// when target is outside the logits.
double token_nll(std::span<const float> logits, int32_t target);

// exp(mean NLL); NaN for an empty span.
double perplexity(std::span<const double> nll);

// (ppl_policy - ppl_full) / (ppl_streaming - ppl_full): 0 = as good as the full cache, 1 = as bad
// as StreamingLLM. NaN when the denominator is zero or any input is not finite.
double gap_ratio(double ppl_policy, double ppl_full, double ppl_streaming);

// 1-based ranks, ties share the mean of the ranks they span (what Spearman needs). +-inf rank
// like any other value; NaN throws qf::Error.
std::vector<double> average_ranks(std::span<const double> x);

// Spearman rank correlation (Pearson correlation of the average ranks). NaN when fewer than two
// values or when either side is constant. Throws qf::Error on different lengths.
double spearman(std::span<const double> a, std::span<const double> b);

// Maximal runs of digits in `text`; a single ',' or '.' or space between two digits is taken as a
// thousands separator and dropped ("7,341,952" -> "7341952"), so the model is not penalised for
// formatting the number.
std::vector<std::string> digit_runs(std::string_view text);
// Exact match: some digit run of `answer` equals `number`.
bool answer_matches(std::string_view answer, std::string_view number);

// Partial credit: the longest run of leading digits of `number` that some digit run of `answer`
// starts with, as a share of number's length (" 716." for 7162423 scores 3/7; the exact number 1).
double leading_digits_credit(std::string_view answer, std::string_view number);

// Percentile-bootstrap confidence interval of a statistic over `n_units` independent units
// (documents, prompts): `n_resamples` resamples of n_units indices drawn with replacement from a
// fixed seed, `statistic` evaluated on each; resamples where it is NaN are skipped. {NaN, NaN}
// when fewer than half are finite or n_units < 1.
struct Interval {
  double lo, hi;
};
Interval bootstrap_ci(int n_units, const std::function<double(std::span<const int>)>& statistic,
                      int n_resamples = 2000, double level = 0.95, uint64_t seed = 20250301);

// Mean and quantiles of a sample (copies; NaN for an empty one).
double mean(std::span<const double> x);
double median(std::span<const double> x);

}  // namespace qf::eval
