// Test tool: runs `qf eval fidelity`'s computation (eval::run_fidelity) on a model over random
// tokens and writes what tests/python/test_fidelity_numpy.py recomputes with the numpy reference:
// the tokens, the random filters, the queries and keys the forward pass hands its QK hook (what
// calibration collects), each layer's fidelity target and the Spearman cells of knorm, qfilters
// and streaming. On the gemma3 fixture this checks the per-layer score scale and sliding windows.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "eval/engine.h"
#include "eval/fidelity.h"
#include "eval/results.h"
#include "model/model.h"
#include "model/session.h"
#include "util/error.h"

namespace {

using nlohmann::json;

json nullable(double x) { return std::isfinite(x) ? json(x) : json(nullptr); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: eval_fidelity_dump MODEL N_TOKENS OUT.json\n");
    return 2;
  }
  try {
    const std::string out_path = argv[3];
    const int T = std::atoi(argv[2]);
    auto model = qf::Model::load(argv[1]);
    const qf::ModelConfig& c = model->config();

    std::mt19937 rng(42);
    std::vector<float> filters(static_cast<size_t>(c.n_layers) * c.n_kv_heads * c.head_dim);
    for (float& x : filters) x = std::normal_distribution<float>()(rng);
    std::vector<int32_t> tokens(T);
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % c.n_vocab);

    qf::eval::EvalContext ctx;
    ctx.model = model.get();
    ctx.n_threads = 2;
    ctx.progress = false;
    ctx.policy_options.filters = filters;
    const std::vector<std::string> policies{"knorm", "qfilters", "streaming"};
    qf::eval::FidelitySettings st;
    st.n_tokens = T;
    st.n_docs = 1;
    const std::vector<qf::eval::TokenDoc> docs{{"random", tokens}};
    qf::eval::CellLog log(out_path + ".jsonl", st.to_json(), /*resume=*/false);
    qf::eval::run_fidelity(ctx, docs, st, policies, log);
    const qf::eval::FidelitySummary sum = qf::eval::summarize_fidelity(ctx, log, docs, st, policies);
    std::filesystem::remove(out_path + ".jsonl");

    // The hook's queries and keys, and the target computed from them.
    json q = json::array(), k = json::array(), target = json::array();
    auto s = qf::eval::new_session(ctx, T, "none", {});
    s->set_qk_hook([&](int layer, const float* qs, const float* ks, const int32_t*, int n) {
      if (n != T) qf::fail("expected one chunk");
      q.push_back(std::vector<float>(qs, qs + static_cast<size_t>(n) * c.n_heads * c.head_dim));
      k.push_back(std::vector<float>(ks, ks + static_cast<size_t>(n) * c.n_kv_heads * c.head_dim));
      json per_head = json::array();
      for (const auto& row : qf::eval::mean_received_attention(qs, ks, T, c.n_heads, c.n_kv_heads, c.head_dim,
                                                              c.attention(layer), s->pool())) {
        json r = json::array();
        for (double v : row) r.push_back(nullable(v));
        per_head.push_back(r);
      }
      target.push_back(per_head);
    });
    s->eval(tokens);

    json out = {{"tokens", tokens},         {"filters", filters}, {"q", q},
                {"k", k},                   {"target", target},   {"spearman", log.get("random")["spearman"]},
                {"summary", sum.json}};
    std::ofstream(out_path) << out.dump();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "eval_fidelity_dump: %s\n", e.what());
    return 1;
  }
}
