// Test tool: runs a model with a compressed KV cache over random tokens and records, for every
// (layer, KV head, position), the step after which the token was evicted, plus the logits of the
// last positions. tests/python/test_eviction_trace.py recomputes those logits with an
// independent numpy forward pass that masks exactly the evicted keys, which checks that
// positions and rotary phases stay right after thousands of evictions.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "kv/compressor.h"
#include "model/model.h"
#include "model/session.h"
#include "util/error.h"

int main(int argc, char** argv) {
  if (argc != 9 && argc != 11) {
    std::fprintf(stderr, "usage: kv_trace MODEL POLICY BUDGET WINDOW EVERY CHUNK N_TOKENS OUT.json [CTK CTV]\n");
    return 2;
  }
  try {
    const std::string model_path = argv[1], policy = argv[2], out_path = argv[8];
    const int budget = std::atoi(argv[3]), window = std::atoi(argv[4]), every = std::atoi(argv[5]);
    const int chunk = std::atoi(argv[6]), n_tokens = std::atoi(argv[7]);
    auto model = qf::Model::load(model_path);
    const auto& c = model->config();

    std::mt19937 rng(42);
    std::vector<float> filters(static_cast<size_t>(c.n_layers) * c.n_kv_heads * c.head_dim);
    for (float& x : filters) x = std::normal_distribution<float>()(rng);
    qf::kv::PolicyOptions po;
    po.filters = filters;
    po.seed = 7;
    qf::kv::CompressionConfig cc;
    cc.budget = budget;
    cc.window = window;
    cc.evict_every = every;
    qf::SessionOptions so;
    so.n_ctx = n_tokens;
    so.n_threads = 2;
    so.n_batch = chunk;
    if (argc == 11) so.kv_types = {qf::kv::parse_kv_type(argv[9]), qf::kv::parse_kv_type(argv[10])};
    so.compressor = std::make_unique<qf::kv::Compressor>(qf::kv::make_policy(policy, po), po, cc);
    qf::Session s(*model, std::move(so));

    std::vector<int32_t> tokens(n_tokens), step_start(n_tokens);
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % c.n_vocab);
    // evicted_at[l][h][pos]: n_past after the step whose compression dropped it; -1 = kept.
    std::vector<std::vector<std::vector<int>>> evicted_at(
        c.n_layers, std::vector<std::vector<int>>(c.n_kv_heads, std::vector<int>(n_tokens, -1)));
    std::vector<std::vector<std::vector<char>>> present = {};
    const int n_last = 16;
    nlohmann::json logits = nlohmann::json::array();
    for (int start = 0; start < n_tokens; start += chunk) {
      const int m = std::min(chunk, n_tokens - start);
      for (int i = 0; i < m; ++i) step_start[start + i] = start;
      auto out = s.eval(std::span<const int32_t>(tokens.data() + start, m), /*all_logits=*/true);
      for (int i = 0; i < m; ++i)
        if (start + i >= n_tokens - n_last)
          logits.push_back(std::vector<float>(out.begin() + static_cast<size_t>(i) * c.n_vocab,
                                              out.begin() + static_cast<size_t>(i + 1) * c.n_vocab));
      // Tokens seen so far that are no longer cached were evicted by this step's compression.
      for (int l = 0; l < c.n_layers; ++l)
        for (int h = 0; h < c.n_kv_heads; ++h) {
          std::vector<char> held(start + m, 0);
          const auto& hc = s.cache().head(l, h);
          for (int j = 0; j < hc.n; ++j) held.at(hc.pos[j]) = 1;
          for (int p = 0; p < start + m; ++p)
            if (!held[p] && evicted_at[l][h][p] < 0) evicted_at[l][h][p] = start + m;
        }
    }
    const auto& st = s.compressor()->stats();
    nlohmann::json j;
    j["tokens"] = tokens;
    j["step_start"] = step_start;
    j["evicted_at"] = evicted_at;
    j["last_logits"] = logits;
    j["evicted"] = st.evicted;
    j["max_held"] = s.cache().capacity(c.n_layers - 1);
    std::ofstream(out_path) << j.dump();
    std::fprintf(stderr, "kv_trace: %s, %lld slots evicted over %d tokens\n", policy.c_str(),
                 static_cast<long long>(st.evicted), n_tokens);
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
