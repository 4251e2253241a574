// Test tool: prints the logits of every position of a token list as JSON ([T][n_vocab]), for
// ad-hoc comparisons with tests/python/reference.py.
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "model/model.h"
#include "model/session.h"
#include "util/error.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: dump_logits MODEL.gguf 1,2,3\n");
    return 2;
  }
  try {
    auto m = qf::Model::load(argv[1]);
    std::vector<int32_t> tokens;
    std::stringstream ss(argv[2]);
    for (std::string t; std::getline(ss, t, ',');) tokens.push_back(std::stoi(t));
    qf::SessionOptions so;
    so.n_threads = 1;
    qf::Session s(*m, std::move(so));
    auto l = s.eval(tokens, true);
    const int V = m->config().n_vocab;
    nlohmann::json out = nlohmann::json::array();
    for (size_t i = 0; i < tokens.size(); ++i) out.push_back(std::vector<float>(l.begin() + i * V, l.begin() + (i + 1) * V));
    std::printf("%s\n", out.dump().c_str());
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
