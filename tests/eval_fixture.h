// What the evaluation tests share: a temporary directory, and an EvalContext on a tiny fixture
// model with random filters (tests/python/make_fixtures.py writes the fixtures).
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "eval/engine.h"
#include "model/model.h"
#include "test_paths.h"

namespace qf::eval::test {

// A fresh directory, unique per process and instance (tests run in parallel), removed at the end.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() /
           ("qf_eval_" + std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}()));
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

class FixtureModel : public ::testing::Test {
 protected:
  // Loads tests/fixtures/<fixture> into ctx_ with Gaussian filters drawn from filter_seed.
  void load(const std::string& fixture, int n_threads, uint32_t filter_seed) {
    model_ = Model::load(qf::test::fixture(fixture));
    const ModelConfig& c = model_->config();
    ctx_.model = model_.get();
    ctx_.n_threads = n_threads;
    ctx_.n_batch = 32;
    ctx_.progress = false;
    std::mt19937 rng(filter_seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    filters_.resize(static_cast<size_t>(c.n_layers) * c.n_kv_heads * c.head_dim);
    for (auto& f : filters_) f = nd(rng);
    ctx_.policy_options.filters = filters_;
  }
  // n random token ids of the model's vocabulary.
  std::vector<int32_t> tokens(int n, uint32_t seed) const {
    std::mt19937 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % model_->config().n_vocab);
    return t;
  }

  std::unique_ptr<Model> model_;
  EvalContext ctx_;
  std::vector<float> filters_;
};

}  // namespace qf::eval::test
