// Random: uniform scores from a seeded generator; the floor any policy should beat.
#include <random>
#include <sstream>

#include "kv/policies/policies.h"
#include "util/error.h"

namespace qf::kv::policies {

namespace {
class Random final : public Policy {
 public:
  explicit Random(uint64_t seed) : rng_(seed) {}
  std::string_view name() const override { return "random"; }
  void score_head(const Cache& cache, int layer, int kv_head, std::span<float> scores) override {
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (float& s : scores) s = u(rng_);
  }
  // The generator's state in the standard library's text form (fixed by the C++ standard).
  std::string save_state() const override {
    std::ostringstream os;
    os << rng_;
    return os.str();
  }
  void load_state(std::string_view state) override {
    std::istringstream is{std::string(state)};
    std::mt19937_64 rng;
    is >> rng;
    if (is.fail() || (is >> std::ws, !is.eof())) fail("random policy: the saved generator state is not valid");
    rng_ = rng;
  }

 private:
  std::mt19937_64 rng_;
};
}  // namespace

std::unique_ptr<Policy> make_random(const PolicyOptions& o) { return std::make_unique<Random>(o.seed); }

}  // namespace qf::kv::policies
