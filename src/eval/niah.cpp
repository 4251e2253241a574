#include "eval/niah.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <sstream>

#include "eval/metrics.h"
#include "eval/needle.h"
#include "eval/progress.h"
#include "util/error.h"

namespace qf::eval {

using nlohmann::json;

namespace {

constexpr const char* kInstruction =
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n\n";
constexpr const char* kQuestion = "What is the special magic number mentioned in the provided text?";
constexpr const char* kAnswerPrefix = "The special magic number mentioned in the provided text is";
constexpr double kBatchedTokenCost = 0.1;  // ETA weight of a prefilled token vs a decoding step

bool ends_sentence(const std::string& bytes) {
  if (bytes.empty()) return false;
  if (bytes.find('\n') != std::string::npos) return true;
  const char c = bytes.back();
  return c == '.' || c == '!' || c == '?';
}

// One (prompt, policy, compression, skip) answer. The full cache ("none") is skip-independent: 0.
std::string cell_key(int length, int depth_index, uint64_t seed, int digits, const std::string& policy, int compression,
                     int skip) {
  return std::to_string(length) + "|" + std::to_string(depth_index) + "|s" + std::to_string(seed) + "|d" +
         std::to_string(digits) + "|" + policy + "|x" + std::to_string(compression) + "|k" + std::to_string(skip);
}

}  // namespace

json NiahSettings::to_json() const {
  return {{"lengths", lengths}, {"n_depths", n_depths}, {"compressions", compressions}, {"skip_layers", skip_layers},
          {"digits", digits},   {"max_new", answer_tokens()}, {"seeds", seeds},          {"chat", chat}};
}

int NiahSettings::answer_tokens() const {
  if (max_new > 0) return max_new;
  return (digits.empty() ? 7 : *std::max_element(digits.begin(), digits.end())) + 8;
}

void NiahSettings::validate() const {
  if (lengths.empty()) fail("niah: give at least one length");
  for (int l : lengths)
    if (l < 64) fail("niah: length ", l, " is too short (>= 64 tokens)");
  if (n_depths < 1) fail("niah: --depths must be >= 1");
  for (int x : compressions)
    if (x < 2) fail("niah: compressions must be >= 2 (the uncompressed cache is the policy 'none')");
  if (digits.empty()) fail("niah: give at least one --digits");
  for (int d : digits)
    if (d < 1 || d > 18) fail("niah: --digits must be in [1, 18] (got ", d, ")");
  if (skip_layers.empty()) fail("niah: give at least one --skip-layers");
  for (int k : skip_layers)
    if (k < 0) fail("niah: --skip-layers must be >= 0 (got ", k, ")");
  if (seeds.empty()) fail("niah: give at least one --seed");
  if (max_new < 0) fail("niah: --max-new must be >= 0");
  if (chat < -1 || chat > 1) fail("niah: chat must be -1, 0 or 1");
}

std::vector<double> NiahSettings::depths() const {
  std::vector<double> d;
  if (n_depths == 1) return {50.0};
  for (int i = 0; i < n_depths; ++i) d.push_back(100.0 * i / (n_depths - 1));
  return d;
}

bool is_chatml(const Tokenizer& tok) {
  return tok.chat_template().find("<|im_start|>") != std::string::npos && tok.find("<|im_start|>") &&
         tok.find("<|im_end|>");
}

std::string chatml_default_system(const Tokenizer& tok) {
  // The default system turn, when the template spells one out literally (SmolLM2 does).
  const std::string& t = tok.chat_template();
  const std::string open = "<|im_start|>system\n";
  const size_t a = t.find(open);
  if (a == std::string::npos) return {};
  const size_t b = t.find("<|im_end|>", a);
  if (b == std::string::npos) return {};
  std::string s = t.substr(a + open.size(), b - a - open.size());
  // A jinja expression instead of literal text means no usable default.
  if (s.find("{{") != std::string::npos || s.find("{%") != std::string::npos || s.find('\'') != std::string::npos)
    return {};
  return s;
}

NeedleBuilder::NeedleBuilder(const Tokenizer& tok, const std::string& haystack, bool chat, int max_length)
    : tok_(tok), chat_(chat) {
  if (chat_ && !is_chatml(tok)) fail("niah: the model has no ChatML chat template (use --no-chat)");
  // Tokenize only what the longest prompt can use (SOTU text is ~4.5 bytes per token).
  size_t cut = std::min(haystack.size(), static_cast<size_t>(max_length) * 10 + 1024);
  while (cut < haystack.size() && haystack[cut] != ' ' && haystack[cut] != '\n') ++cut;
  hay_ = tok.encode(std::string_view(haystack).substr(0, cut), false, false);
  boundary_.assign(hay_.size() + 1, 0);
  boundary_[0] = 1;
  for (size_t i = 1; i <= hay_.size(); ++i) boundary_[i] = ends_sentence(tok.token_bytes(hay_[i - 1]));

  std::string prefix, question;
  if (chat_) {
    const std::string sys = chatml_default_system(tok);
    if (!sys.empty()) prefix = "<|im_start|>system\n" + sys + "<|im_end|>\n";
    prefix += std::string("<|im_start|>user\n") + kInstruction;
    question = std::string("\n\n") + kQuestion + "<|im_end|>\n<|im_start|>assistant\n" + kAnswerPrefix;
  } else {
    prefix = kInstruction;
    question = std::string("\n\nQuestion: ") + kQuestion + "\nAnswer: " + kAnswerPrefix;
  }
  prefix_ = tok.encode(prefix, true, true);
  question_ = tok.encode(question, false, true);
}

NeedlePrompt NeedleBuilder::build(int length, double depth, const std::string& number) const {
  const std::vector<int32_t> needle = tok_.encode(" The special magic number is " + number + ".", false, false);
  const int fixed = static_cast<int>(prefix_.size() + needle.size() + question_.size());
  const int n_hay = length - fixed;
  if (n_hay < 16) fail("niah: length ", length, " leaves no room for a haystack (the frame takes ", fixed, " tokens)");
  if (n_hay > static_cast<int>(hay_.size()))
    fail("niah: the haystack text holds ", hay_.size(), " tokens, ", n_hay, " needed (give more text)");
  const int target = static_cast<int>(std::lround(std::clamp(depth, 0.0, 100.0) / 100.0 * n_hay));
  int at = target;
  while (at > 0 && !boundary_[at]) --at;

  NeedlePrompt p;
  p.number = number;
  p.context = prefix_;
  p.context.insert(p.context.end(), hay_.begin(), hay_.begin() + at);
  p.needle_at = static_cast<int>(p.context.size());
  for (size_t i = 0; i < needle.size(); ++i)
    if (tok_.token_bytes(needle[i]).find_first_of("0123456789") != std::string::npos)
      p.number_at.push_back(p.needle_at + static_cast<int>(i));
  p.context.insert(p.context.end(), needle.begin(), needle.end());
  p.context.insert(p.context.end(), hay_.begin() + at, hay_.begin() + n_hay);
  p.question = question_;
  p.depth_actual = 100.0 * at / n_hay;
  return p;
}

std::string needle_number(uint64_t seed, int length, int depth_index, int digits) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(length),
                    static_cast<uint32_t>(depth_index), 0x6e696168u};
  std::mt19937_64 rng(seq);
  std::string s(1, static_cast<char>('1' + rng() % 9));
  while (static_cast<int>(s.size()) < digits) s += static_cast<char>('0' + rng() % 10);
  return s;
}

bool answer_complete(const std::string& text) {
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  size_t i = 0;
  while (i < text.size() && !digit(text[i])) {
    if (text[i] == '\n' && text.find_first_not_of(" \t\r\n") < i) return true;
    ++i;
  }
  if (i == text.size()) return false;
  while (i < text.size()) {
    if (digit(text[i])) ++i;
    else if ((text[i] == ',' || text[i] == '.' || text[i] == ' ') && i + 1 < text.size() && digit(text[i + 1])) ++i;
    else if ((text[i] == ',' || text[i] == '.' || text[i] == ' ') && i + 1 == text.size()) return false;  // may go on
    else return true;
  }
  return false;
}

std::vector<int> effective_lengths(const NiahSettings& st, int n_ctx_train) {
  const int cap = n_ctx_train - st.answer_tokens();
  std::vector<int> out;
  for (int l : st.lengths) {
    const int e = std::min(l, cap);
    if (std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
  }
  return out;
}

void run_niah(const EvalContext& ctx, const Tokenizer& tok, const std::string& haystack, const NiahSettings& st,
              const std::vector<std::string>& policies, CellLog& log) {
  st.validate();
  for (const auto& p : policies) check_policy(ctx, p);
  const int n_ctx_train = ctx.model->config().n_ctx_train;
  const std::vector<int> lengths = effective_lengths(st, n_ctx_train);
  for (size_t i = 0; i < lengths.size(); ++i)
    if (i < st.lengths.size() && lengths[i] != st.lengths[i] && ctx.progress)
      std::fprintf(stderr, "niah: length %d exceeds the model's context (%d) with the answer; using %d\n", st.lengths[i],
                   n_ctx_train, lengths[i]);
  const bool chat = st.chat == 1 || (st.chat == -1 && is_chatml(tok));
  const int max_len = *std::max_element(lengths.begin(), lengths.end());
  const int max_new = st.answer_tokens();
  NeedleBuilder builder(tok, haystack, chat, max_len);
  const std::vector<double> depths = st.depths();

  struct Cell {
    std::string policy;
    int compression, skip;
  };
  std::vector<Cell> cells;
  for (const auto& p : policies) {
    if (p == "none") cells.push_back({p, 1, 0});
    else
      for (int k : st.skip_layers)
        for (int x : st.compressions) cells.push_back({p, x, k});
  }
  struct Prompt {
    int length, depth_index, digits;
    uint64_t seed;
  };
  std::vector<Prompt> prompts;
  for (int D : st.digits)
    for (uint64_t seed : st.seeds)
      for (int L : lengths)
        for (size_t di = 0; di < depths.size(); ++di) prompts.push_back({L, static_cast<int>(di), D, seed});
  auto key = [](const Prompt& pr, const Cell& c) {
    return cell_key(pr.length, pr.depth_index, pr.seed, pr.digits, c.policy, c.compression, c.skip);
  };

  Progress bar("niah", 0, ctx.progress);
  for (const Prompt& pr : prompts) {
    bool any = false;
    for (const Cell& c : cells) {
      const double u = 40 * kBatchedTokenCost + max_new;
      bar.add_total(u);
      if (log.has(key(pr, c))) bar.skip(u);
      else any = true;
    }
    bar.add_total(pr.length * kBatchedTokenCost);
    if (!any) bar.skip(pr.length * kBatchedTokenCost);
  }

  NeedleRunner runner(ctx, max_len + max_new + 1, policies);
  auto eog = [&](int32_t t) { return tok.is_eog(t); };
  auto done = [&](const std::vector<int32_t>& a) { return answer_complete(tok.decode(a, false)); };
  for (const Prompt& pr : prompts) {
    std::vector<Cell> todo;
    for (const Cell& c : cells)
      if (!log.has(key(pr, c))) todo.push_back(c);
    if (todo.empty()) continue;
    const double depth = depths[pr.depth_index];
    // Seed 42 with 7 digits draws the numbers of the single-seed protocol (results comparable).
    const std::string number = needle_number(pr.seed, pr.length, pr.depth_index, pr.digits);
    const NeedlePrompt prompt = builder.build(pr.length, depth, number);
    char where[96];
    std::snprintf(where, sizeof where, "L=%d depth=%.0f%% seed=%llu digits=%d", pr.length, depth,
                  static_cast<unsigned long long>(pr.seed), pr.digits);
    const auto t_pre = std::chrono::steady_clock::now();
    runner.prefill(prompt.context);
    const double pre_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_pre).count();
    bar.advance(pr.length * kBatchedTokenCost, where);
    for (const Cell& c : todo) {
      const auto t0 = std::chrono::steady_clock::now();
      const NeedleRunner::Answer a =
          runner.answer(c.policy, c.compression, c.skip, prompt.question, max_new, eog, done, prompt.number_at);
      const std::string text = tok.decode(a.tokens, false);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      log.add(key(pr, c), {{"length", pr.length},
                           {"depth", round_to(depth, 3)},
                           {"depth_index", pr.depth_index},
                           {"depth_actual", round_to(prompt.depth_actual, 3)},
                           {"context_tokens", prompt.context.size()},
                           {"prompt_tokens", prompt.context.size() + prompt.question.size()},
                           {"policy", c.policy},
                           {"compression", c.compression},
                           {"skip_layers", c.skip},
                           {"seed", pr.seed},
                           {"digits", pr.digits},
                           {"number", number},
                           {"answer", text},
                           {"correct", answer_matches(text, number)},
                           {"partial", round_to(leading_digits_credit(text, number), 4)},
                           {"kept_per_head", round_to(a.kept_per_head, 2)},
                           {"number_kept", json_number(a.watched_kept, 4)},
                           {"seconds", round_to(secs + pre_s / todo.size(), 3)}});
      bar.advance(40 * kBatchedTokenCost + max_new, std::string(where) + " " + c.policy + " x" + std::to_string(c.compression));
    }
  }
  bar.finish();
}

namespace {

// The answers of one (digits, skip, policy, compression) group over a set of prompts.
struct Answers {
  std::vector<double> correct, partial, kept;  // per prompt (kept: those that report it)
  void add(const json& cell) {
    correct.push_back(cell.value("correct", false) ? 1.0 : 0.0);
    partial.push_back(cell.value("partial", NAN));
    const auto it = cell.find("number_kept");
    if (it != cell.end() && it->is_number()) kept.push_back(it->get<double>());
  }
  int n() const { return static_cast<int>(correct.size()); }
};

double mean_of(const std::vector<double>& v, std::span<const int> ix) {
  double s = 0;
  for (int i : ix) s += v[i];
  return ix.empty() ? NAN : s / static_cast<double>(ix.size());
}

json interval_json(const std::vector<double>& v) {
  const Interval ci = bootstrap_ci(static_cast<int>(v.size()), [&](std::span<const int> ix) { return mean_of(v, ix); });
  return {json_number(ci.lo, 4), json_number(ci.hi, 4)};
}

}  // namespace

NiahSummary summarize_niah(const CellLog& log, const NiahSettings& st, const std::vector<std::string>& policies,
                           int n_ctx_train) {
  const std::vector<int> lengths = effective_lengths(st, n_ctx_train);
  const std::vector<double> depths = st.depths();
  json rows = json::array(), grid = json::array();
  std::ostringstream csv, gcsv;
  csv << "digits,skip_layers,policy,compression,length,accuracy,accuracy_lo,accuracy_hi,partial,partial_lo,partial_hi,n,"
         "number_kept\n";
  gcsv << "digits,skip_layers,policy,compression,length,depth,accuracy,partial,n\n";
  auto num = [](double x) { return std::isfinite(x) ? std::to_string(x) : std::string(); };
  auto line = [&](int D, int k, const std::string& p, int x, const std::string& len, const Answers& a) {
    const Interval acc = bootstrap_ci(a.n(), [&](std::span<const int> ix) { return mean_of(a.correct, ix); });
    const Interval part = bootstrap_ci(a.n(), [&](std::span<const int> ix) { return mean_of(a.partial, ix); });
    csv << D << ',' << k << ',' << p << ',' << x << ',' << len << ',' << num(eval::mean(a.correct)) << ',' << num(acc.lo)
        << ',' << num(acc.hi) << ',' << num(eval::mean(a.partial)) << ',' << num(part.lo) << ',' << num(part.hi) << ','
        << a.n() << ',' << num(eval::mean(a.kept)) << '\n';
  };
  for (int D : st.digits)
    for (const auto& p : policies) {
      const std::vector<int> skips = p == "none" ? std::vector<int>{0} : st.skip_layers;
      const std::vector<int> xs = p == "none" ? std::vector<int>{1} : st.compressions;
      for (int k : skips)
        for (int x : xs) {
          Answers all;
          json per_len = json::object();
          for (int L : lengths) {
            Answers at_l;
            for (size_t di = 0; di < depths.size(); ++di) {
              Answers at_d;
              for (uint64_t seed : st.seeds) {
                const std::string key = cell_key(L, static_cast<int>(di), seed, D, p, x, k);
                if (!log.has(key)) continue;
                const json& cell = log.get(key);
                at_d.add(cell), at_l.add(cell), all.add(cell);
              }
              if (!at_d.n()) continue;
              grid.push_back({{"digits", D}, {"skip_layers", k}, {"policy", p}, {"compression", x}, {"length", L},
                              {"depth", round_to(depths[di], 3)}, {"correct", eval::mean(at_d.correct) == 1.0},
                              {"accuracy", json_number(eval::mean(at_d.correct), 4)},
                              {"partial", json_number(eval::mean(at_d.partial), 4)}, {"n", at_d.n()}});
              gcsv << D << ',' << k << ',' << p << ',' << x << ',' << L << ',' << round_to(depths[di], 3) << ','
                   << num(eval::mean(at_d.correct)) << ',' << num(eval::mean(at_d.partial)) << ',' << at_d.n() << '\n';
            }
            if (at_l.n()) {
              per_len[std::to_string(L)] = json_number(eval::mean(at_l.correct), 4);
              line(D, k, p, x, std::to_string(L), at_l);
            }
          }
          if (!all.n()) continue;
          rows.push_back({{"digits", D},
                          {"skip_layers", k},
                          {"policy", p},
                          {"compression", x},
                          {"accuracy", json_number(eval::mean(all.correct), 4)},
                          {"accuracy_ci", interval_json(all.correct)},
                          {"partial", json_number(eval::mean(all.partial), 4)},
                          {"partial_ci", interval_json(all.partial)},
                          {"n", all.n()},
                          {"number_kept", json_number(eval::mean(all.kept), 4)},
                          {"by_length", per_len}});
          line(D, k, p, x, "all", all);
        }
    }
  NiahSummary s;
  s.json = {{"evaluation", "niah"}, {"settings", st.to_json()}, {"policies", policies}, {"lengths", lengths},
            {"depths", depths},     {"results", rows},            {"grid", grid}};
  s.csv = csv.str();
  s.grid_csv = gcsv.str();
  return s;
}

}  // namespace qf::eval
