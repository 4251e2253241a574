#include "test_paths.h"

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace qf::test {

std::string source_dir() { return QF_SOURCE_DIR; }

static std::string must_exist(const std::string& path, const char* hint) {
  if (!std::filesystem::exists(path)) throw std::runtime_error(path + " is missing: " + hint);
  return path;
}

std::string fixture(const std::string& name) {
  return must_exist(source_dir() + "/tests/fixtures/" + name, "run python3 tests/python/make_fixtures.py");
}

std::string smollm2_path() {
  return must_exist(source_dir() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf", "run scripts/fetch_model.sh");
}

std::string golden(const std::string& name) {
  return must_exist(source_dir() + "/tests/golden/" + name, "golden files are committed; see scripts/ref/");
}

std::string qf_binary() {
  if (const char* p = std::getenv("QF_QF_BIN")) return p;
  return std::string(QF_BINARY_DIR) + "/qf";
}

}  // namespace qf::test
