// Where tests find their inputs: fixtures written by tests/python/make_fixtures.py, the real
// model fetched by scripts/fetch_model.sh, golden files from llama.cpp, and the qf binary.
#pragma once
#include <string>

namespace qf::test {

std::string source_dir();
// tests/fixtures/<name>; fails the calling test (throws) with a hint when missing.
std::string fixture(const std::string& name);
// models/SmolLM2-135M-Instruct.Q4_1.gguf; throws with a hint when missing.
std::string smollm2_path();
// tests/golden/<name>
std::string golden(const std::string& name);
// Path of the built qf executable.
std::string qf_binary();

}  // namespace qf::test
