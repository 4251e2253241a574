#include "eval/fidelity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>

#include "eval/metrics.h"
#include "eval/progress.h"
#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::eval {

using nlohmann::json;

json FidelitySettings::to_json() const { return {{"n_tokens", n_tokens}, {"n_docs", n_docs}}; }

void FidelitySettings::validate() const {
  if (n_tokens < 3) fail("fidelity: --tokens must be >= 3");
  if (n_docs < 1) fail("fidelity: --docs must be >= 1");
}

std::vector<std::vector<double>> mean_received_attention(const float* q, const float* k, int T, int n_heads,
                                                         int n_kv_heads, int head_dim, LayerAttention att,
                                                         ThreadPool& pool) {
  if (T < 1 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || head_dim <= 0 || att.window < 0)
    fail("mean_received_attention: invalid shape");
  const int group = n_heads / n_kv_heads, d = head_dim, W = att.window;
  // The oldest key query i sees, and how many later queries see key j.
  auto first_key = [&](int i) { return W > 0 ? std::max(0, i - W + 1) : 0; };
  auto n_later = [&](int j) { return (W > 0 ? std::min(T - 1, j + W - 1) : T - 1) - j; };
  // received[h][j]: attention query head h gives key j, summed over the queries i > j. One query
  // head per work item, so no two threads write the same row.
  std::vector<std::vector<double>> received(n_heads, std::vector<double>(T, 0.0));
  pool.parallel_for(n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(T);
    for (int64_t h = begin; h < end; ++h) {
      const int kvh = static_cast<int>(h) / group;
      std::vector<double>& row = received[h];
      for (int i = 1; i < T; ++i) {
        const float* qi = q + (static_cast<size_t>(i) * n_heads + h) * d;
        const int j0 = first_key(i);
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = j0; j <= i; ++j) {
          p[j] = dot_f32(qi, k + (static_cast<size_t>(j) * n_kv_heads + kvh) * d, d) * att.scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int j = j0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
        const double inv = 1.0 / sum;
        for (int j = j0; j < i; ++j) row[j] += p[j] * inv;  // key i itself is not "later"
      }
    }
  });
  std::vector<std::vector<double>> avg(n_kv_heads, std::vector<double>(T, std::numeric_limits<double>::quiet_NaN()));
  for (int kvh = 0; kvh < n_kv_heads; ++kvh)
    for (int j = 0; j < T; ++j) {
      if (n_later(j) <= 0) continue;
      double s = 0;
      for (int g = 0; g < group; ++g) s += received[kvh * group + g][j];
      avg[kvh][j] = s / group / static_cast<double>(n_later(j));
    }
  return avg;
}

std::vector<int> policy_layers(const ModelConfig& c) {
  std::vector<int> out;
  for (int l = 0; l < c.n_layers; ++l)
    if (!c.attention(l).window) out.push_back(l);
  return out;
}

bool fidelity_is_circular(const EvalContext& ctx, const std::string& policy) {
  // Query moments gathered over the whole document include the later queries whose attention
  // is the target: partly circular too.
  return policy != "none" && (is_attention_policy(ctx, policy) || (policy_needs(ctx, policy).query_moments ||
                                                                        policy_needs(ctx, policy).query_recent > 0));
}

namespace {

std::vector<std::string> scored_policies(const EvalContext& ctx, const std::vector<std::string>& policies) {
  std::vector<std::string> out;
  for (const auto& p : policies)
    if (p != "none") {
      check_policy(ctx, p);
      out.push_back(p);
    }
  // snapkv last: its statistics overwrite attn_sum, which h2o reads.
  std::stable_partition(out.begin(), out.end(), [](const std::string& p) { return p != "snapkv"; });
  return out;
}

}  // namespace

void run_fidelity(const EvalContext& ctx, const std::vector<TokenDoc>& docs, const FidelitySettings& st,
                  const std::vector<std::string>& policies, CellLog& log) {
  st.validate();
  const std::vector<std::string> pols = scored_policies(ctx, policies);
  const ModelConfig& c = ctx.model->config();
  const int T = st.n_tokens, L = c.n_layers, KV = c.n_kv_heads;
  Progress bar("fidelity", static_cast<double>(docs.size()), ctx.progress);
  for (const TokenDoc& d : docs) {
    if (log.has(d.name)) {
      bar.skip(1);
      continue;
    }
    if (static_cast<int>(d.tokens.size()) != T) fail("fidelity: document ", d.name, " is not ", T, " tokens long");
    const auto t0 = std::chrono::steady_clock::now();
    // One chunk, so the hook sees every query and key of a layer at once.
    EvalContext one = ctx;
    one.n_batch = T;
    auto s = new_session(one, T, "none", {}, union_needs(ctx, pols));
    std::vector<std::vector<std::vector<double>>> target(L);  // [layer][kvh][j]
    QueryTail tail(c, std::max(1, ctx.policy_options.snapkv_window));
    Session& sess = *s;
    s->set_qk_hook([&](int layer, const float* q, const float* k, const int32_t* pos, int n_tok) {
      if (n_tok != T) fail("fidelity: expected one chunk of ", T, " tokens, got ", n_tok);
      target[layer] = mean_received_attention(q, k, T, c.n_heads, KV, c.head_dim, c.attention(layer), sess.pool());
      tail.add(layer, q, pos, n_tok);
      bar.advance(0.5 / L, d.name + " layer " + std::to_string(layer));
    });
    s->eval(d.tokens);
    s->set_qk_hook(nullptr);

    json spear = json::object();
    std::vector<std::vector<float>> scores;
    std::vector<double> a, b;
    for (const std::string& p : pols) {
      if (p == "snapkv") tail.fill_window_attention(s->cache(), s->pool());
      auto policy = kv::make_policy(p, ctx.policy_options);
      json per_layer = json::array();
      for (int l = 0; l < L; ++l) {
        policy->score_layer(s->cache(), l, scores);
        json row = json::array();
        for (int h = 0; h < KV; ++h) {
          if (static_cast<int>(scores[h].size()) != T) fail("fidelity: policy ", p, " scored ", scores[h].size(), " keys");
          // Keys some later query sees (all but the last one, unless a window is 1).
          a.clear();
          b.clear();
          for (int j = 0; j < T; ++j)
            if (std::isfinite(target[l][h][j])) a.push_back(scores[h][j]), b.push_back(target[l][h][j]);
          row.push_back(json_number(spearman(a, b), 5));
        }
        per_layer.push_back(row);
      }
      spear[p] = per_layer;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    log.add(d.name, {{"doc", d.name}, {"n_tokens", T}, {"spearman", spear}, {"seconds", round_to(secs, 2)}});
    bar.advance(0.5, d.name);
  }
  bar.finish();
}

FidelitySummary summarize_fidelity(const EvalContext& ctx, const CellLog& log, const std::vector<TokenDoc>& docs,
                                   const FidelitySettings& st, const std::vector<std::string>& policies) {
  const ModelConfig& c = ctx.model->config();
  const int L = c.n_layers, KV = c.n_kv_heads;
  std::vector<std::string> pols;
  for (const auto& p : policies)
    if (p != "none") pols.push_back(p);
  std::vector<std::string> used;
  for (const TokenDoc& d : docs)
    if (log.has(d.name)) used.push_back(d.name);

  // Per policy: per head the mean over documents (NaN values, e.g. constant scores, skipped).
  std::map<std::string, std::vector<double>> head_mean;
  for (const auto& p : pols) {
    std::vector<double> m(static_cast<size_t>(L) * KV, std::numeric_limits<double>::quiet_NaN());
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < KV; ++h) {
        double s = 0;
        int n = 0;
        for (const auto& name : used) {
          const json& cell = log.get(name);
          if (!cell["spearman"].contains(p)) continue;
          const json& v = cell["spearman"][p][l][h];
          if (v.is_number()) s += v.get<double>(), ++n;
        }
        if (n > 0) m[static_cast<size_t>(l) * KV + h] = s / n;
      }
    head_mean[p] = std::move(m);
  }

  // Headline statistics over the layers policies act on; per-layer means cover every layer.
  const std::vector<int> scored = policy_layers(c);
  std::vector<bool> in_summary(L, false);
  for (int l : scored) in_summary[l] = true;

  json rows = json::array();
  std::ostringstream csv, hcsv;
  csv.precision(5);
  hcsv.precision(5);
  csv << "policy,mean_spearman,median_spearman,min_spearman,max_spearman,n_heads,circular\n";
  hcsv << "policy,layer,kv_head,spearman\n";
  for (const auto& p : pols) {
    std::vector<double> vals;
    json per_layer = json::array();
    for (int l = 0; l < L; ++l) {
      std::vector<double> lv;
      for (int h = 0; h < KV; ++h) {
        const double v = head_mean[p][static_cast<size_t>(l) * KV + h];
        hcsv << p << ',' << l << ',' << h << ',' << (std::isfinite(v) ? std::to_string(v) : "") << '\n';
        if (!std::isfinite(v)) continue;
        lv.push_back(v);
        if (in_summary[l]) vals.push_back(v);
      }
      per_layer.push_back(json_number(mean(lv), 5));
    }
    const bool circ = fidelity_is_circular(ctx, p);
    const double mn = vals.empty() ? NAN : *std::min_element(vals.begin(), vals.end());
    const double mx = vals.empty() ? NAN : *std::max_element(vals.begin(), vals.end());
    rows.push_back({{"policy", p},
                    {"mean_spearman", json_number(mean(vals), 5)},
                    {"median_spearman", json_number(median(vals), 5)},
                    {"min_spearman", json_number(mn, 5)},
                    {"max_spearman", json_number(mx, 5)},
                    {"n_heads", vals.size()},
                    {"circular", circ},
                    {"per_layer_mean", per_layer}});
    auto num = [](double x) { return std::isfinite(x) ? std::to_string(x) : std::string(); };
    csv << p << ',' << num(mean(vals)) << ',' << num(median(vals)) << ',' << num(mn) << ',' << num(mx) << ','
        << vals.size() << ',' << (circ ? "true" : "false") << '\n';
  }

  json out = {{"evaluation", "fidelity"}, {"settings", st.to_json()}, {"policies", pols}, {"docs", used},
              {"results", rows}};
  if (static_cast<int>(scored.size()) < L) out["summary_layers"] = scored;  // the others are sliding-window layers
  // Head-by-head duel of the two score-only, attention-free estimators.
  if (head_mean.count("qfilters") && head_mean.count("knorm")) {
    int wins = 0, n = 0;
    for (size_t i = 0; i < head_mean["qfilters"].size(); ++i) {
      if (!in_summary[i / KV]) continue;
      const double a = head_mean["qfilters"][i], b = head_mean["knorm"][i];
      if (!std::isfinite(a) || !std::isfinite(b)) continue;
      ++n;
      wins += a > b;
    }
    out["qfilters_beats_knorm"] = {{"heads", n}, {"wins", wins}, {"share", json_number(n ? double(wins) / n : NAN, 4)}};
  }
  FidelitySummary fs;
  fs.json = std::move(out);
  fs.csv = csv.str();
  fs.heads_csv = hcsv.str();
  return fs;
}

}  // namespace qf::eval
