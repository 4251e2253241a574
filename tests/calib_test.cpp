// Calibration math, filter files and the report. Data are synthetic with a known answer; the
// file format is also checked against the Python `safetensors` package when it is installed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "calib/filter_file.h"
#include "calib/filters.h"
#include "calib/report.h"
#include "test_paths.h"
#include "util/error.h"

namespace qf::calib {
namespace {

using Rng = std::mt19937_64;

Eigen::VectorXd random_unit(int d, Rng& rng) {
  std::normal_distribution<double> n;
  Eigen::VectorXd v(d);
  for (int i = 0; i < d; ++i) v[i] = n(rng);
  return v.normalized();
}

Eigen::MatrixXd random_orthonormal(int rows, int cols, Rng& rng) {
  std::normal_distribution<double> n;
  Eigen::MatrixXd a(rows, cols);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) a(i, j) = n(rng);
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(a);
  return qr.householderQ() * Eigen::MatrixXd::Identity(rows, cols);
}

double cosine(const Eigen::VectorXf& a, const Eigen::VectorXd& b) {
  const Eigen::VectorXd x = a.cast<double>();
  return x.dot(b) / (x.norm() * b.norm());
}

enum class Noise { kIsotropic, kAnisotropic };

// n samples x = a_i * sign * u + noise, a_i ~ N(3, 1): a planted mean direction sign * u.
std::vector<float> planted(int n, int d, const Eigen::VectorXd& u, double sign, Noise noise, Rng& rng) {
  std::normal_distribution<double> g;
  Eigen::MatrixXd mix = Eigen::MatrixXd::Identity(d, d);
  if (noise == Noise::kAnisotropic) {
    // Random rotation times standard deviations spread geometrically over 0.1 .. 1.5.
    Eigen::VectorXd sd(d);
    for (int i = 0; i < d; ++i) sd[i] = 0.1 * std::pow(15.0, double(i) / (d - 1));
    mix = random_orthonormal(d, d, rng) * sd.asDiagonal();
  }
  std::vector<float> x(size_t(n) * d);
  Eigen::VectorXd z(d);
  for (int i = 0; i < n; ++i) {
    const double a = 3.0 + g(rng);
    for (int j = 0; j < d; ++j) z[j] = g(rng);
    const Eigen::VectorXd row = a * sign * u + mix * z;
    for (int j = 0; j < d; ++j) x[size_t(i) * d + j] = float(row[j]);
  }
  return x;
}

// ---- dominant_direction -------------------------------------------------------------------------

TEST(DominantDirection, MatchesJacobiSvdOfTheSamples) {
  Rng rng(1);
  const int n = 500, d = 16;
  std::vector<float> x = planted(n, d, random_unit(d, rng), 1.0, Noise::kAnisotropic, rng);
  OrientationReport rep;
  const Eigen::VectorXf v = dominant_direction(x.data(), n, d, &rep);

  Eigen::MatrixXd X(n, d);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) X(i, j) = x[size_t(i) * d + j];
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(X, Eigen::ComputeThinV);
  const Eigen::VectorXd s = svd.singularValues();
  EXPECT_GT(std::abs(cosine(v, svd.matrixV().col(0))), 1 - 1e-7);
  EXPECT_NEAR(v.norm(), 1.0, 1e-6);
  EXPECT_NEAR(rep.sigma1_sq / (s[0] * s[0]), 1.0, 1e-10);
  EXPECT_NEAR(rep.sigma2_sq / (s[1] * s[1]), 1.0, 1e-10);
  EXPECT_NEAR(rep.total_energy / s.squaredNorm(), 1.0, 1e-10);
  EXPECT_NEAR(rep.energy_share, s[0] * s[0] / s.squaredNorm(), 1e-10);
  EXPECT_EQ(rep.n_samples, n);

  // The same samples read in place from a wider buffer (one head of [n][n_head][d]).
  std::vector<float> wide(size_t(n) * 3 * d, 1e6f);
  for (int i = 0; i < n; ++i) std::copy_n(&x[size_t(i) * d], d, &wide[size_t(i) * 3 * d + d]);
  const Eigen::VectorXf w = dominant_direction(wide.data() + d, n, d, 3 * d, nullptr);
  EXPECT_LT((w - v).norm(), 1e-6);
}

TEST(DominantDirection, RecoversPlantedDirectionWithItsSign) {
  Rng rng(2);
  const int n = 3000, d = 64;
  for (Noise noise : {Noise::kIsotropic, Noise::kAnisotropic}) {
    for (double sign : {1.0, -1.0}) {
      for (OrientationRule rule : {OrientationRule::kMeanProjection, OrientationRule::kMajorityVote}) {
        SCOPED_TRACE(testing::Message() << "noise " << int(noise) << " sign " << sign << " rule " << to_string(rule));
        const Eigen::VectorXd u = random_unit(d, rng);
        const std::vector<float> x = planted(n, d, u, sign, noise, rng);
        OrientationReport rep;
        const Eigen::VectorXf v = dominant_direction(x.data(), n, d, &rep, rule);
        EXPECT_GT(cosine(v, sign * u), 0.99);
        EXPECT_TRUE(rep.rules_agree);
        EXPECT_EQ(rep.sign_mean, rep.sign_majority);
        EXPECT_GT(rep.mean_projection, 2.5);
        EXPECT_GT(rep.n_positive, 0.9 * n);  // a_i + noise along u is N(3, <= 1.8)
      }
    }
  }
}

TEST(DominantDirection, DetectsOrientationRuleDisagreement) {
  // Along e0: 7 samples at -1, 3 at +10. Mean projection +2.3 but most samples are negative.
  std::vector<float> x;
  for (int i = 0; i < 7; ++i) x.insert(x.end(), {-1.0f, 0.01f * float(i % 2 ? 1 : -1)});
  for (int i = 0; i < 3; ++i) x.insert(x.end(), {10.0f, 0.0f});
  OrientationReport by_mean, by_vote;
  const Eigen::VectorXf vm = dominant_direction(x.data(), 10, 2, &by_mean, OrientationRule::kMeanProjection);
  const Eigen::VectorXf vv = dominant_direction(x.data(), 10, 2, &by_vote, OrientationRule::kMajorityVote);
  EXPECT_FALSE(by_mean.rules_agree);
  EXPECT_FALSE(by_vote.rules_agree);
  EXPECT_EQ(by_mean.sign_mean, -by_mean.sign_majority);
  EXPECT_GT(vm[0], 0.999f);   // the mean rule points to the large positive tail
  EXPECT_LT(vv[0], -0.999f);  // the vote follows the majority
  EXPECT_NEAR(by_mean.mean_projection, 2.3, 1e-3);
  EXPECT_EQ(by_mean.n_positive, 3);
  EXPECT_EQ(by_mean.n_negative, 7);
  EXPECT_NEAR(by_vote.mean_projection, -2.3, 1e-3);
  EXPECT_EQ(by_vote.n_positive, 7);
}

TEST(DominantDirection, SymmetricDataFallsBackDeterministically) {
  const std::vector<float> x = {1, 0.5f, -1, -0.5f};  // +-x: both rules tie
  OrientationReport rep;
  const Eigen::VectorXf v = dominant_direction(x.data(), 2, 2, &rep);
  EXPECT_EQ(rep.sign_mean, 0);
  EXPECT_EQ(rep.sign_majority, 0);
  EXPECT_FALSE(rep.rules_agree);
  EXPECT_GT(v[0], 0.0f);  // largest component made positive
  EXPECT_NEAR(std::abs(v[0]), 2 / std::sqrt(5.0f), 1e-6f);
}

TEST(DominantDirection, EnergyShareOfAKnownSpectrum) {
  Rng rng(3);
  const int n = 200, d = 8;
  const std::vector<double> s = {5, 3, 2, 1, 1, 0.5, 0.2, 0.1};
  const Eigen::MatrixXd U = random_orthonormal(n, d, rng), V = random_orthonormal(d, d, rng);
  const Eigen::VectorXd sv = Eigen::Map<const Eigen::VectorXd>(s.data(), d);
  const Eigen::MatrixXd X = U * sv.asDiagonal() * V.transpose();
  std::vector<float> x(size_t(n) * d);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) x[size_t(i) * d + j] = float(X(i, j));
  OrientationReport rep;
  const Eigen::VectorXf v = dominant_direction(x.data(), n, d, &rep);
  EXPECT_NEAR(rep.energy_share, 25.0 / 40.3, 1e-5);
  EXPECT_NEAR(rep.sigma1_sq, 25.0, 1e-4);
  EXPECT_NEAR(rep.sigma2_sq, 9.0, 1e-4);
  EXPECT_NEAR(rep.total_energy, 40.3, 1e-4);
  EXPECT_GT(std::abs(cosine(v, V.col(0))), 1 - 1e-9);
}

TEST(DominantDirection, RejectsBadInput) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> zeros(8, 0.0f), with_nan = {1, 2, nan, 4};
  EXPECT_THROW(dominant_direction(zeros.data(), 0, 4, nullptr), Error);
  EXPECT_THROW(dominant_direction(zeros.data(), 2, 0, nullptr), Error);
  EXPECT_THROW(dominant_direction(zeros.data(), 2, 4, nullptr), Error);  // all zero
  EXPECT_THROW(dominant_direction(with_nan.data(), 1, 4, nullptr), Error);
  EXPECT_THROW(dominant_direction(zeros.data(), 2, 4, 3, nullptr), Error);  // stride < dim
  EXPECT_THROW(dominant_direction(nullptr, 2, 4, nullptr), Error);
}

// ---- per-layer assembly -------------------------------------------------------------------------

TEST(LayerFilters, AveragesOrientedHeadsWithinEachKvGroup) {
  // 4 query heads, 2 KV heads: heads {0,1} -> kv 0 and {2,3} -> kv 1. Rank-one data per head,
  // so each direction is exact. Odd heads have negative coefficients: their oriented direction is
  // -u[h], which the average must use.
  Rng rng(4);
  const int n = 64, n_head = 4, n_kv = 2, d = 8;
  std::vector<Eigen::VectorXd> u;
  for (int h = 0; h < n_head; ++h) u.push_back(random_unit(d, rng));
  std::uniform_real_distribution<double> a(1.0, 2.0);
  std::vector<float> q(size_t(n) * n_head * d);
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < n_head; ++h) {
      const double c = a(rng) * (h % 2 ? -1.0 : 1.0);
      for (int j = 0; j < d; ++j) q[(size_t(i) * n_head + h) * d + j] = float(c * u[h][j]);
    }
  std::vector<float> out(n_kv * d, 123.0f);
  const std::vector<OrientationReport> reps = layer_filters(q.data(), n, n_head, n_kv, d, out.data());
  ASSERT_EQ(reps.size(), size_t(n_head));
  for (int g = 0; g < n_kv; ++g)
    for (int j = 0; j < d; ++j) EXPECT_NEAR(out[g * d + j], 0.5 * (u[2 * g][j] - u[2 * g + 1][j]), 1e-5) << g << "," << j;
  for (const OrientationReport& r : reps) EXPECT_NEAR(r.energy_share, 1.0, 1e-9);

  EXPECT_THROW(layer_filters(q.data(), n, 4, 3, d, out.data()), Error);  // 4 % 3 != 0
}

TEST(Calibrator, FillsLayersOnceAndKeepsReports) {
  Rng rng(5);
  const int L = 3, n_head = 2, n_kv = 1, d = 8, n = 200;
  Calibrator cal(L, n_head, n_kv, d);
  std::vector<Eigen::VectorXd> planted_u;
  for (int l = 0; l < L; ++l) {
    EXPECT_FALSE(cal.complete());
    const Eigen::VectorXd u = random_unit(d, rng);
    std::vector<float> q(size_t(n) * n_head * d);
    const std::vector<float> x = planted(n * n_head, d, u, 1.0, Noise::kIsotropic, rng);  // both heads share u
    std::copy(x.begin(), x.end(), q.begin());
    cal.add_layer(l, q.data(), n);
    planted_u.push_back(u);
  }
  EXPECT_TRUE(cal.complete());
  EXPECT_EQ(cal.head_reports().size(), size_t(L * n_head));
  for (int l = 0; l < L; ++l) {
    const Eigen::Map<const Eigen::VectorXf> f(cal.filters().at(l, 0), d);
    EXPECT_GT(cosine(f, planted_u[l]), 0.98);
    EXPECT_EQ(cal.head_reports()[l * n_head + 1].n_samples, n);
  }
  std::vector<float> q(size_t(n) * n_head * d, 1.0f);
  EXPECT_THROW(cal.add_layer(0, q.data(), n), Error);   // twice
  EXPECT_THROW(cal.add_layer(L, q.data(), n), Error);   // out of range
  EXPECT_THROW(Calibrator(2, 9, 2, 64), Error);         // 9 % 2 != 0
}

// ---- files --------------------------------------------------------------------------------------

float pattern_value(int l, int h, int d) { return float(((l * 37 + h * 11 + d * 5) % 64) - 32) / 16.0f; }

Filters pattern_filters(int L = 3, int KV = 2, int D = 8) {
  Filters f(L, KV, D);
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < KV; ++h)
      for (int d = 0; d < D; ++d) f.at(l, h)[d] = pattern_value(l, h, d);
  return f;
}

const std::string kFingerprint = "llama:L3:H4:KV2:D8:E32:V100";

Filters calibrated_pattern() {
  Filters f = pattern_filters();
  CalibrationInfo info;
  info.model_name = "tiny";
  info.architecture = "llama";
  info.fingerprint = kFingerprint;
  info.corpus = "unit test";
  info.n_docs = 19;
  info.doc_len = 2048;
  info.n_samples = 3000;
  info.seed = 42;
  set_calibration_metadata(f, info);
  return f;
}

std::vector<uint8_t> make_file(const std::string& header, const std::vector<uint8_t>& data, uint64_t n = UINT64_MAX) {
  if (n == UINT64_MAX) n = header.size();
  std::vector<uint8_t> out(8 + header.size() + data.size());
  std::memcpy(out.data(), &n, 8);
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + std::ptrdiff_t(header.size()));
  return out;
}

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

std::string tensor_header(const std::string& dtype, const std::string& shape, const std::string& offsets,
                          const std::string& extra = "") {
  return R"({"__metadata__":{"format":"qfilters"},"q_filters":{"dtype":")" + dtype + R"(","shape":)" + shape +
         R"(,"data_offsets":)" + offsets + "}" + extra + "}";
}

// One line, a qf::Error, and nothing else (not a std::bad_alloc, not a json exception, no crash).
void expect_error(const std::vector<uint8_t>& bytes, const std::string& what) {
  SCOPED_TRACE(what);
  try {
    parse_filters(bytes, "hostile.safetensors");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_NE(msg.find("hostile.safetensors"), std::string::npos) << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

std::string temp_dir() {
  const auto dir = std::filesystem::temp_directory_path() / ("qf_calib_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return dir.string();
}

// Removes temp_dir() after the last test.
class TempDirCleanup : public testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(temp_dir(), ec);
  }
};
[[maybe_unused]] testing::Environment* const kCleanup = testing::AddGlobalTestEnvironment(new TempDirCleanup);

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(FilterFile, FingerprintFormat) {
  EXPECT_EQ(model_fingerprint("llama", 30, 9, 3, 64, 576, 49152), "llama:L30:H9:KV3:D64:E576:V49152");
}

TEST(FilterFile, RoundTripIsBitExactAndKeepsMetadata) {
  const Filters f = calibrated_pattern();
  const std::vector<uint8_t> bytes = serialize_filters(f);

  // Container checked independently of the reader: length prefix, aligned JSON header, raw data.
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  ASSERT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + f.size() * 4);
  const nlohmann::json h = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(n));
  EXPECT_EQ(h["q_filters"]["dtype"], "F32");
  EXPECT_EQ(h["q_filters"]["shape"], nlohmann::json::array({3, 2, 8}));
  EXPECT_EQ(h["q_filters"]["data_offsets"], nlohmann::json::array({0, 192}));
  EXPECT_EQ(h["__metadata__"]["sign_convention"], "keep_largest_dot");
  EXPECT_EQ(std::memcmp(bytes.data() + 8 + n, f.data.data(), f.size() * 4), 0);

  const StoredFilters s = parse_filters(bytes);
  EXPECT_EQ(s.dtype, "F32");
  EXPECT_EQ(s.filters.n_layers, 3);
  EXPECT_EQ(s.filters.n_kv_heads, 2);
  EXPECT_EQ(s.filters.head_dim, 8);
  EXPECT_EQ(std::memcmp(s.filters.data.data(), f.data.data(), f.size() * 4), 0);
  EXPECT_EQ(s.filters.metadata, f.metadata);
  for (const char* k : {"format", "model", "architecture", "fingerprint", "corpus", "n_docs", "doc_len", "n_samples",
                        "seed", "tool_version", "sign_convention", "layout", "orientation"})
    EXPECT_TRUE(s.filters.metadata.count(k)) << k;
  EXPECT_EQ(s.filters.metadata.at("tool_version"), QF_VERSION);
  EXPECT_EQ(serialize_filters(s.filters), bytes);

  const std::string path = temp_dir() + "/roundtrip.safetensors";
  write_filters(path, f);
  EXPECT_EQ(read_all(path), bytes);
  const StoredFilters r = read_filters(path);
  EXPECT_EQ(r.filters.data, f.data);
  EXPECT_EQ(r.filters.metadata, f.metadata);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(FilterFile, WriterRejectsInconsistentFilters) {
  Filters f = pattern_filters();
  f.data.pop_back();
  EXPECT_THROW(serialize_filters(f), Error);
  Filters g = pattern_filters();
  g.data[5] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(serialize_filters(g), Error);
  Filters h = pattern_filters();
  h.metadata["bad"] = "\xff\xfe";  // not UTF-8: JSON cannot carry it
  EXPECT_THROW(serialize_filters(h), Error);
  EXPECT_THROW(write_filters(temp_dir() + "/no/such/dir/x.safetensors", pattern_filters()), Error);
}

TEST(FilterFile, EveryTruncationIsAnError) {
  const std::vector<uint8_t> bytes = serialize_filters(calibrated_pattern());
  for (size_t k = 0; k < bytes.size(); ++k) {
    const std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + std::ptrdiff_t(k));
    expect_error(cut, "truncated at " + std::to_string(k));
  }
  // Through the file reader as well (it seeks instead of reading everything).
  const std::string path = temp_dir() + "/truncated.safetensors";
  for (size_t k = 0; k < bytes.size(); k += 7) {
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(k));
    }
    EXPECT_THROW(read_filters(path), Error) << k;
  }
  EXPECT_THROW(read_filters(temp_dir() + "/missing.safetensors"), Error);
  EXPECT_THROW(read_filters(temp_dir()), Error);  // a directory
}

TEST(FilterFile, HostileHeadersAreOneLineErrors) {
  const std::vector<uint8_t> data = f32_bytes(std::vector<float>(48, 0.5f));  // 3x2x8
  const std::string good = tensor_header("F32", "[3,2,8]", "[0,192]");
  ASSERT_NO_THROW(parse_filters(make_file(good, data)));

  expect_error(make_file(good, data, UINT64_MAX - 1), "header length 2^64-2");
  expect_error(make_file(good, data, uint64_t(1) << 40), "header length 2^40");
  expect_error(make_file(good, data, good.size() + data.size() + 1), "header length just past the end");
  expect_error(make_file(good, data, 0), "header length 0");
  expect_error(make_file("{\"q_filters\": [", data), "unterminated JSON");
  expect_error(make_file("not json at all", data), "not JSON");
  expect_error(make_file(std::string("{\"a\":1}\0\0", 9), data), "NUL bytes in header");
  expect_error(make_file("\xff\xfe{}", data), "binary garbage");
  expect_error(make_file("[1,2,3]", data), "root is an array");
  expect_error(make_file(std::string("{\"x\":") + std::string(100000, '[') + std::string(100000, ']') + "}", data),
               "deeply nested");
  expect_error(make_file(R"({"__metadata__":[],"q_filters":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]}})", data),
               "metadata not an object");
  expect_error(make_file(R"({"__metadata__":{"a":1},"q_filters":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]}})", data),
               "metadata value not a string");
  expect_error(make_file(R"({"other":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]}})", data), "tensor missing");
  expect_error(make_file(R"({"q_filters":7})", data), "tensor not an object");
  expect_error(make_file(tensor_header("F64", "[3,2,4]", "[0,192]"), data), "dtype F64");
  expect_error(make_file(tensor_header("I32", "[3,2,8]", "[0,192]"), data), "dtype I32");
  expect_error(make_file(R"({"q_filters":{"shape":[3,2,8],"data_offsets":[0,192]}})", data), "dtype missing");
  expect_error(make_file(R"({"q_filters":{"dtype":4,"shape":[3,2,8],"data_offsets":[0,192]}})", data), "dtype not a string");
  expect_error(make_file(tensor_header("F32", "[6,8]", "[0,192]"), data), "rank 2");
  expect_error(make_file(tensor_header("F32", "[3,2,8,1]", "[0,192]"), data), "rank 4");
  expect_error(make_file(tensor_header("F32", "[3,-2,8]", "[0,192]"), data), "negative dim");
  expect_error(make_file(tensor_header("F32", "[3,0,8]", "[0,0]"), data), "zero dim");
  expect_error(make_file(tensor_header("F32", "[3,2.5,8]", "[0,192]"), data), "fractional dim");
  expect_error(make_file(tensor_header("F32", "[3,2,9]", "[0,192]"), data), "shape disagrees with the byte count");
  expect_error(make_file(tensor_header("F32", "[1048576,1048576,1048576]", "[0,192]"), data), "element count overflow");
  expect_error(make_file(tensor_header("F32", "[99999999999999999999,1,1]", "[0,192]"), data), "dim beyond u64");
  expect_error(make_file(tensor_header("F32", "\"3x2x8\"", "[0,192]"), data), "shape not an array");
  expect_error(make_file(tensor_header("F32", "[3,2,8]", "[0,1000000000]"), data), "data beyond the file");
  expect_error(make_file(tensor_header("F32", "[3,2,8]", "[192,0]"), data), "begin > end");
  expect_error(make_file(tensor_header("F32", "[3,2,8]", "[-8,184]"), data), "negative offset");
  expect_error(make_file(tensor_header("F32", "[3,2,8]", "[0,192,0]"), data), "three offsets");
  expect_error(make_file(tensor_header("F32", "[3,2,8]", "[8,200]"), data), "data shifted past the end");
  expect_error(make_file(tensor_header("F32", "[3,2,8]", "[0.0,192]"), data), "offset as float");
  expect_error(make_file(R"({"q_filters":{"dtype":"F32","shape":[3,2,8]}})", data), "offsets missing");

  std::vector<float> bad(48, 0.5f);
  bad[17] = std::numeric_limits<float>::quiet_NaN();
  expect_error(make_file(good, f32_bytes(bad)), "NaN value");
  bad[17] = -std::numeric_limits<float>::infinity();
  expect_error(make_file(good, f32_bytes(bad)), "infinite value");
  const std::vector<uint8_t> f16_inf = {0x00, 0x7C, 0x00, 0x3C};  // +inf, 1.0
  expect_error(make_file(tensor_header("F16", "[1,1,2]", "[0,4]"), f16_inf), "F16 infinity");
}

TEST(FilterFile, WidensF16AndBf16Exactly) {
  // F16: 1, -2.5, 2^-14 (smallest normal), 2^-24 (smallest subnormal), 65504 (largest), -0.
  const std::vector<uint16_t> h = {0x3C00, 0xC100, 0x0400, 0x0001, 0x7BFF, 0x8000};
  const std::vector<float> hv = {1.0f, -2.5f, std::ldexp(1.0f, -14), std::ldexp(1.0f, -24), 65504.0f, -0.0f};
  // BF16: 1, -2.5, 2^-126, 3.3895314e38 (largest), 0.
  const std::vector<uint16_t> b = {0x3F80, 0xC020, 0x0080, 0x7F7F, 0x0000, 0x4000};
  const std::vector<float> bv = {1.0f, -2.5f, std::ldexp(1.0f, -126), 3.3895313892515355e38f, 0.0f, 2.0f};
  for (const auto& [dtype, raw, want] : {std::tuple{"F16", h, hv}, std::tuple{"BF16", b, bv}}) {
    std::vector<uint8_t> data(raw.size() * 2);
    std::memcpy(data.data(), raw.data(), data.size());
    const StoredFilters s = parse_filters(make_file(tensor_header(dtype, "[1,2,3]", "[0,12]"), data));
    EXPECT_EQ(s.dtype, dtype);
    ASSERT_EQ(s.filters.data.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(s.filters.data[i], want[i]) << dtype << " " << i;
      EXPECT_EQ(std::signbit(s.filters.data[i]), std::signbit(want[i])) << dtype << " " << i;
    }
  }
}

TEST(FilterFile, LoadChecksShapeAndFingerprint) {
  const std::vector<uint8_t> bytes = serialize_filters(calibrated_pattern());
  const LoadedFilters ok = load_filters(bytes, "f", {3, 2, 8, kFingerprint});
  EXPECT_FALSE(ok.fingerprint_missing);
  EXPECT_FALSE(ok.foreign);
  EXPECT_EQ(ok.filters.data, pattern_filters().data);
  EXPECT_NO_THROW(load_filters(bytes, "f", {3, 2, 8, ""}));  // fingerprint not checked

  EXPECT_THROW(load_filters(bytes, "f", {4, 2, 8, kFingerprint}), Error);
  EXPECT_THROW(load_filters(bytes, "f", {3, 1, 8, kFingerprint}), Error);
  EXPECT_THROW(load_filters(bytes, "f", {3, 2, 16, kFingerprint}), Error);
  try {
    load_filters(bytes, "f.safetensors", {3, 2, 8, "llama:L30:H9:KV3:D64:E576:V49152"});
    ADD_FAILURE() << "fingerprint mismatch accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("llama:L30:H9:KV3:D64:E576:V49152"), std::string::npos) << e.what();
  }

  Filters no_fp = calibrated_pattern();
  no_fp.metadata.erase("fingerprint");
  const LoadedFilters warned = load_filters(serialize_filters(no_fp), "f", {3, 2, 8, kFingerprint});
  EXPECT_TRUE(warned.fingerprint_missing);
  // Shape is checked even without a fingerprint.
  EXPECT_THROW(load_filters(serialize_filters(no_fp), "f", {3, 2, 4, kFingerprint}), Error);

  // Our files carry layout and sign; a contradicting request is an error, an agreeing one is fine.
  EXPECT_THROW(load_filters(bytes, "f", {3, 2, 8, ""}, {FilterLayout::kHf, std::nullopt}), Error);
  EXPECT_THROW(load_filters(bytes, "f", {3, 2, 8, ""}, {std::nullopt, SignConvention::kKeepSmallestDot}), Error);
  EXPECT_NO_THROW(load_filters(bytes, "f", {3, 2, 8, ""}, {FilterLayout::kGguf, SignConvention::kKeepLargestDot}));
  EXPECT_THROW(load_filters(bytes, "f", {0, 2, 8, ""}), Error);

  const std::string path = temp_dir() + "/load.safetensors";
  write_filters(path, calibrated_pattern());
  EXPECT_EQ(load_filters(path, {3, 2, 8, kFingerprint}).filters.data, pattern_filters().data);
}

TEST(FilterFile, ForeignFilesNeedAnExplicitConvention) {
  const std::vector<uint8_t> data = f32_bytes(pattern_filters().data);
  const auto foreign = make_file(R"({"__metadata__":{"format":"pt"},"q_filters":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]}})", data);
  EXPECT_THROW(load_filters(foreign, "f", {3, 2, 8, ""}), Error);
  EXPECT_THROW(load_filters(foreign, "f", {3, 2, 8, ""}, {FilterLayout::kHf, std::nullopt}), Error);
  EXPECT_THROW(load_filters(foreign, "f", {3, 2, 8, ""}, {std::nullopt, SignConvention::kKeepSmallestDot}), Error);
  const LoadedFilters l =
      load_filters(foreign, "f", {3, 2, 8, kFingerprint}, {FilterLayout::kGguf, SignConvention::kKeepLargestDot});
  EXPECT_TRUE(l.foreign);
  EXPECT_TRUE(l.fingerprint_missing);
  EXPECT_EQ(l.filters.data, pattern_filters().data);
  EXPECT_EQ(l.filters.metadata.at("sign_convention"), "keep_largest_dot");

  const auto bad_sign = make_file(R"({"__metadata__":{"format":"qfilters","layout":"gguf","sign_convention":"up"},"q_filters":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]}})", data);
  EXPECT_THROW(load_filters(bad_sign, "f", {3, 2, 8, ""}), Error);
  const auto no_layout = make_file(R"({"__metadata__":{"format":"qfilters","sign_convention":"keep_largest_dot"},"q_filters":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]}})", data);
  EXPECT_THROW(load_filters(no_layout, "f", {3, 2, 8, ""}), Error);
}

TEST(FilterConventions, ParseAndPrint) {
  EXPECT_EQ(parse_sign_convention("keep-smallest-dot"), SignConvention::kKeepSmallestDot);
  EXPECT_EQ(parse_sign_convention(to_string(SignConvention::kKeepLargestDot)), SignConvention::kKeepLargestDot);
  EXPECT_EQ(parse_filter_layout("hf"), FilterLayout::kHf);
  EXPECT_EQ(parse_orientation_rule("majority"), OrientationRule::kMajorityVote);
  EXPECT_THROW(parse_sign_convention("largest"), Error);
  EXPECT_THROW(parse_filter_layout("HF"), Error);
  EXPECT_THROW(parse_orientation_rule("median"), Error);
  std::vector<float> out(3);
  const std::vector<float> odd = {1, 2, 3};
  EXPECT_THROW(hf_to_gguf_head(odd.data(), out.data(), 3), Error);
}

// llama.cpp's converter, written the way it is there (reshape (2, d/2), swap axes, flatten),
// independently of hf_to_gguf_head's index formula.
std::vector<float> permute_like_convert(const float* hf, int d) {
  std::vector<float> out;
  for (int i = 0; i < d / 2; ++i)
    for (int j = 0; j < 2; ++j) out.push_back(hf[j * (d / 2) + i]);
  return out;
}

std::vector<int> ranking(const std::vector<float>& scores) {
  std::vector<int> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  return idx;
}

TEST(FilterConventions, ImportingReferenceFiltersKeepsTheReferenceRanking) {
  Rng rng(6);
  std::normal_distribution<float> g;
  const int L = 2, KV = 2, d = 8, n_keys = 40;
  Filters hf(L, KV, d);  // the reference's oriented v1 per head, HF row order
  for (float& x : hf.data) x = g(rng);
  Filters published = hf;  // what the reference stores: -v1
  for (float& x : published.data) x = -x;
  const std::vector<uint8_t> file =
      make_file(R"({"__metadata__":{"format":"pt"},"q_filters":{"dtype":"F32","shape":[2,2,8],"data_offsets":[0,128]}})",
                f32_bytes(published.data));
  const LoadedFilters ours = load_filters(file, "published", {L, KV, d, ""}, {FilterLayout::kHf, SignConvention::kKeepSmallestDot});
  EXPECT_EQ(ours.filters.metadata.at("converted_from"), "hf/keep_smallest_dot");

  for (int l = 0; l < L; ++l)
    for (int h = 0; h < KV; ++h) {
      SCOPED_TRACE(testing::Message() << "layer " << l << " head " << h);
      // Import must equal the GGUF permutation of the positively oriented reference filter.
      EXPECT_EQ(std::vector<float>(ours.filters.at(l, h), ours.filters.at(l, h) + d), permute_like_convert(hf.at(l, h), d));

      std::vector<float> ref_scores, our_scores, unpermuted, unnegated;
      for (int k = 0; k < n_keys; ++k) {
        std::vector<float> key_hf(d);
        for (float& x : key_hf) x = g(rng);
        const std::vector<float> key_gguf = permute_like_convert(key_hf.data(), d);
        float ref = 0, our = 0, nop = 0, nneg = 0;
        for (int j = 0; j < d; ++j) {
          ref -= key_hf[j] * published.at(l, h)[j];  // kvpress: scores = -(q_filter * keys).sum(-1)
          our += key_gguf[j] * ours.filters.at(l, h)[j];
          nop += key_gguf[j] * hf.at(l, h)[j];               // forgot the permutation
          nneg += key_gguf[j] * -ours.filters.at(l, h)[j];   // forgot the sign
        }
        ref_scores.push_back(ref);
        our_scores.push_back(our);
        unpermuted.push_back(nop);
        unnegated.push_back(nneg);
        EXPECT_NEAR(our, ref, 1e-5f);
      }
      EXPECT_EQ(ranking(our_scores), ranking(ref_scores));
      // The test can fail: either mistake changes the ranking.
      EXPECT_NE(ranking(unpermuted), ranking(ref_scores));
      EXPECT_NE(ranking(unnegated), ranking(ref_scores));
    }

  // Identity conversion leaves data alone.
  EXPECT_EQ(to_canonical(hf, FilterLayout::kGguf, SignConvention::kKeepLargestDot).data, hf.data);
}

// ---- report -------------------------------------------------------------------------------------

TEST(Report, CosineSimilarity) {
  const Filters a = pattern_filters();
  Filters neg = a, zero = a, other(2, 2, 8);
  for (float& x : neg.data) x = -x;
  std::fill(zero.at(1, 0), zero.at(1, 0) + 8, 0.0f);
  const FilterSimilarity same = cosine_similarity(a, a);
  EXPECT_NEAR(same.mean, 1.0, 1e-12);
  const FilterSimilarity opp = cosine_similarity(a, neg);
  EXPECT_NEAR(opp.mean, -1.0, 1e-12);
  EXPECT_NEAR(opp.per_layer[2], -1.0, 1e-12);
  const FilterSimilarity z = cosine_similarity(a, zero);
  EXPECT_EQ(z.per_head[2], 0.0);  // (layer 1, kv 0)
  EXPECT_NEAR(z.per_layer[1], 0.5, 1e-12);
  EXPECT_NEAR(z.mean, 5.0 / 6.0, 1e-12);
  // Orthogonal heads.
  Filters e0(1, 1, 4), e1(1, 1, 4);
  e0.data[0] = 1;
  e1.data[1] = 2;
  EXPECT_EQ(cosine_similarity(e0, e1).mean, 0.0);
  EXPECT_THROW(cosine_similarity(a, other), Error);
}

TEST(Report, CountsAgainstKeysDisagreementsAndEnergy) {
  Rng rng(7);
  const int L = 2, n_head = 2, n_kv = 2, d = 8, n = 300;
  Calibrator cal(L, n_head, n_kv, d);
  for (int l = 0; l < L; ++l) {
    std::vector<float> q(size_t(n) * n_head * d);
    for (int h = 0; h < n_head; ++h) {
      const std::vector<float> x = planted(n, d, random_unit(d, rng), 1.0, Noise::kIsotropic, rng);
      for (int i = 0; i < n; ++i) std::copy_n(&x[size_t(i) * d], d, &q[(size_t(i) * n_head + h) * d]);
    }
    cal.add_layer(l, q.data(), n);
  }
  // Keys of layer 0: kv head 0 along -f (the K-norm regime), kv head 1 along +f. No keys for layer 1.
  KeyMeans keys(L, n_kv, d);
  std::vector<float> k(size_t(10) * n_kv * d);
  for (int i = 0; i < 10; ++i)
    for (int j = 0; j < d; ++j) {
      k[(size_t(i) * n_kv + 0) * d + j] = -2.0f * cal.filters().at(0, 0)[j];
      k[(size_t(i) * n_kv + 1) * d + j] = 3.0f * cal.filters().at(0, 1)[j];
    }
  keys.add(0, k.data(), 10);
  EXPECT_EQ(keys.count(0), 10);
  EXPECT_TRUE(std::isnan(keys.mean_dot(1, 0, cal.filters().at(1, 0))));

  const FilterSimilarity sim = cosine_similarity(cal.filters(), cal.filters());
  const FilterReport r = make_report(cal.filters(), cal.head_reports(), n_head, &keys, &sim);
  ASSERT_EQ(r.layers.size(), size_t(L));
  double share = 0;
  for (const OrientationReport& o : cal.head_reports()) share += o.energy_share;
  EXPECT_NEAR(r.energy_share_mean, share / (L * n_head), 1e-12);
  EXPECT_GT(r.energy_share_mean, 0.5);
  EXPECT_EQ(r.orientation_disagreements, 0);
  EXPECT_TRUE(r.layers[0].keys_counted);
  EXPECT_EQ(r.layers[0].keys_against, 1);
  EXPECT_FALSE(r.layers[1].keys_counted);
  EXPECT_EQ(r.keys_against, 1);
  EXPECT_EQ(r.n_kv_heads, 2);
  EXPECT_NEAR(r.similarity_mean, 1.0, 1e-12);

  const std::string text = r.to_text();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), L + 2);
  EXPECT_NE(text.find("1/2"), std::string::npos) << text;
  const nlohmann::json j = r.to_json();
  EXPECT_EQ(j["summary"]["keys_against"], 1);
  EXPECT_EQ(j["layers"][0]["keys_against"], 1);
  EXPECT_FALSE(j["layers"][1].contains("keys_against"));
  EXPECT_NEAR(j["summary"]["energy_share_mean"].get<double>(), r.energy_share_mean, 1e-12);

  // A report on a loaded file alone (no queries, no keys) still prints.
  const FilterReport bare = make_report(cal.filters(), {}, 0);
  EXPECT_FALSE(bare.has_queries);
  EXPECT_TRUE(bare.to_json()["summary"].is_null() || bare.to_json()["summary"].empty());
  EXPECT_THROW(make_report(cal.filters(), std::span(cal.head_reports()).first(3), n_head), Error);
}

// ---- Python cross-check -------------------------------------------------------------------------

// ---- query statistics (query_stats version 1) -----------------------------------------------------

// With every factor kept (rank = head_dim) the factors' squared norms sum to the trace of the
// covariance, the mean squared distance of the samples from their mean: query_spread is that over
// ||mean||^2, averaged over a layer's query heads, checked against the samples directly.
TEST(QueryStats, SpreadIsTheQueriesVarianceOverTheirSquaredMean) {
  const int L = 2, nh = 3, d = 5, n = 200;
  Rng rng(12);
  Filters f(L, 1, d);
  f.n_query_heads = nh;
  f.stats_rank = d;
  f.query_mean.resize(size_t(L) * nh * d);
  f.query_factors.resize(size_t(L) * nh * d * d);
  std::normal_distribution<double> nd;
  std::vector<double> want(L, 0.0);
  for (int l = 0; l < L; ++l) {
    for (int h = 0; h < nh; ++h) {
      std::vector<float> x(size_t(n) * d);
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) x[size_t(i) * d + j] = float(1.0 + h + (l + 1) * (j + 1) * 0.3 * nd(rng));
      const size_t at = size_t(l) * nh + h;
      query_moments(x.data(), n, d, d, d, f.query_mean.data() + at * d, f.query_factors.data() + at * d * d);
      std::vector<double> mu(d, 0.0);
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) mu[j] += x[size_t(i) * d + j] / double(n);
      double m2 = 0, var = 0;
      for (int j = 0; j < d; ++j) m2 += mu[j] * mu[j];
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) var += (x[size_t(i) * d + j] - mu[j]) * (x[size_t(i) * d + j] - mu[j]) / n;
      want[l] += var / m2 / nh;
    }
  }
  const std::vector<float> got = query_spread(f);
  ASSERT_EQ(got.size(), size_t(L));
  for (int l = 0; l < L; ++l) EXPECT_NEAR(got[l], want[l], 1e-4 * want[l]) << "layer " << l;
  EXPECT_GT(query_spread(f)[1], query_spread(f)[0]);  // layer 1's queries were made to vary more
  std::fill(f.query_mean.begin(), f.query_mean.begin() + d, 0.0f);
  EXPECT_THROW(query_spread(f), Error);  // a zero mean query
  EXPECT_THROW(query_spread(Filters(L, 1, d)), Error);  // no statistics
}

TEST(QueryStats, MeanAndFactorsAreTheSampleMomentsEigenpairs) {
  const int n = 500, d = 6, stride = 10, rank = 3;
  Rng rng(8);
  const Eigen::VectorXd u = random_unit(d, rng);
  const std::vector<float> x = planted(n, d, u, 1.0, Noise::kAnisotropic, rng);
  std::vector<float> rows(size_t(n) * stride, 99.0f);  // padding the function must not read
  for (int i = 0; i < n; ++i) std::copy(x.begin() + i * d, x.begin() + (i + 1) * d, rows.begin() + i * stride);
  std::vector<float> mean(d), factors(size_t(rank) * d);
  query_moments(rows.data(), n, d, stride, rank, mean.data(), factors.data());

  Eigen::MatrixXd X(n, d);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < d; ++j) X(i, j) = x[size_t(i) * d + j];
  const Eigen::VectorXd mu = X.colwise().mean();
  const Eigen::MatrixXd C = X.rowwise() - mu.transpose();
  const Eigen::MatrixXd cov = C.transpose() * C / n;  // biased, as kvpress
  for (int j = 0; j < d; ++j) EXPECT_NEAR(mean[j], mu[j], 1e-5);
  // Singular values of the centred samples: sigma_r^2 / n are the covariance's eigenvalues.
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(C, Eigen::ComputeThinV);
  double previous = 1e300;
  for (int r = 0; r < rank; ++r) {
    const Eigen::VectorXd f = Eigen::Map<const Eigen::VectorXf>(factors.data() + r * d, d).cast<double>();
    const double lambda = f.squaredNorm();
    EXPECT_NEAR(lambda, svd.singularValues()[r] * svd.singularValues()[r] / n, 1e-4 * lambda) << r;
    EXPECT_NEAR(std::abs(f.normalized().dot(svd.matrixV().col(r))), 1.0, 1e-4) << r;
    EXPECT_LE((cov * f - lambda * f).norm(), 1e-4 * lambda) << r;
    EXPECT_LE(lambda, previous);
    previous = lambda;
  }
  EXPECT_THROW(query_moments(rows.data(), 0, d, stride, rank, mean.data(), factors.data()), Error);
  EXPECT_THROW(query_moments(rows.data(), n, d, stride, d + 1, mean.data(), factors.data()), Error);
  rows[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(query_moments(rows.data(), n, d, stride, rank, mean.data(), factors.data()), Error);
}

// calibrated_pattern() plus query statistics of 4 query heads and rank 2.
Filters pattern_with_stats() {
  Filters f = calibrated_pattern();
  f.n_query_heads = 4;
  f.stats_rank = 2;
  f.query_mean.resize(size_t(3) * 4 * 8);
  f.query_factors.resize(f.query_mean.size() * 2);
  for (size_t i = 0; i < f.query_mean.size(); ++i) f.query_mean[i] = float(int(i % 13) - 6) / 4.0f;
  for (size_t i = 0; i < f.query_factors.size(); ++i) f.query_factors[i] = float(int(i % 7) - 3) / 8.0f;
  return f;
}

TEST(QueryStats, FileRoundTripAndOlderFilesStillLoad) {
  const Filters f = pattern_with_stats();
  const std::vector<uint8_t> bytes = serialize_filters(f);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  ASSERT_EQ(bytes.size(), 8 + n + (f.size() + f.query_mean.size() + f.query_factors.size()) * 4);
  const nlohmann::json h = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(n));
  EXPECT_EQ(h["__metadata__"]["query_stats_version"], "1");
  EXPECT_EQ(h["query_mean"]["shape"], nlohmann::json::array({3, 4, 8}));
  EXPECT_EQ(h["query_cov_factors"]["shape"], nlohmann::json::array({3, 4, 2, 8}));
  EXPECT_EQ(h["query_mean"]["data_offsets"], nlohmann::json::array({192, 192 + 384}));

  const LoadedFilters l = load_filters(bytes, "f", {3, 2, 8, kFingerprint});
  EXPECT_EQ(l.filters.data, f.data);
  EXPECT_EQ(l.filters.n_query_heads, 4);
  EXPECT_EQ(l.filters.stats_rank, 2);
  EXPECT_EQ(l.filters.query_mean, f.query_mean);
  EXPECT_EQ(l.filters.query_factors, f.query_factors);
  const std::string path = temp_dir() + "/stats.safetensors";
  write_filters(path, f);
  EXPECT_EQ(read_filters(path).filters.query_factors, f.query_factors);  // the seeking reader
  EXPECT_EQ(serialize_filters(parse_filters(bytes).filters), bytes);

  // A file without them (every file written before) loads as before, with no statistics.
  const LoadedFilters old = load_filters(serialize_filters(calibrated_pattern()), "f", {3, 2, 8, kFingerprint});
  EXPECT_FALSE(old.filters.has_query_stats());
  // Exported to the published layout, they are dropped (that format holds the filters only).
  EXPECT_FALSE(from_canonical(f, FilterLayout::kHf, SignConvention::kKeepSmallestDot).has_query_stats());
  // Every truncation is still an error.
  for (size_t k = 0; k < bytes.size(); k += 5)
    expect_error(std::vector<uint8_t>(bytes.begin(), bytes.begin() + std::ptrdiff_t(k)), "cut at " + std::to_string(k));
}

TEST(QueryStats, BadStatisticsAreOneLineErrors) {
  const std::vector<uint8_t> data = f32_bytes(std::vector<float>(48 + 96 + 96, 0.5f));
  const std::string mean = R"(,"query_mean":{"dtype":"F32","shape":[3,4,8],"data_offsets":[192,576]})";
  const std::string factors = R"(,"query_cov_factors":{"dtype":"F32","shape":[3,4,1,8],"data_offsets":[576,960]})";
  auto header = [](const std::string& version, const std::string& tensors) {
    return R"({"__metadata__":{"format":"qfilters")" + version +
           R"(},"q_filters":{"dtype":"F32","shape":[3,2,8],"data_offsets":[0,192]})" + tensors + "}";
  };
  const std::string v1 = R"(,"query_stats_version":"1")";
  ASSERT_NO_THROW(parse_filters(make_file(header(v1, mean + factors), data)));
  expect_error(make_file(header("", mean + factors), data), "tensors without the version");
  expect_error(make_file(header(R"(,"query_stats_version":"2")", mean + factors), data), "unknown version");
  expect_error(make_file(header(v1, mean), data), "factors missing");
  expect_error(make_file(header(v1, factors), data), "mean missing");
  std::string bad = mean;
  bad.replace(bad.find("[3,4,8]"), 7, "[3,3,8]");  // 3 query heads for 2 KV heads
  expect_error(make_file(header(v1, bad + factors), data), "query heads not a multiple");
  bad = factors;
  bad.replace(bad.find("[3,4,1,8]"), 9, "[3,4,9,8]");  // rank above head_dim, and the bytes do not match
  expect_error(make_file(header(v1, mean + bad), data), "rank");
  bad = factors;
  bad.replace(bad.find("[576,960]"), 9, "[576,961]");
  expect_error(make_file(header(v1, mean + bad), data), "offsets");
  std::vector<uint8_t> nan = data;
  const float q = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan.data() + 600, &q, 4);
  expect_error(make_file(header(v1, mean + factors), nan), "non-finite factor");

  Filters f = pattern_with_stats();
  f.query_factors.pop_back();
  EXPECT_THROW(serialize_filters(f), Error);
}

TEST(PythonCrossCheck, SafetensorsPackageReadsOursAndWeReadItsFiles) {
  if (std::system("python3 -c 'import numpy, safetensors' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 with numpy and safetensors not available";
  const std::string script = test::source_dir() + "/tests/python/check_filters.py";
  const std::string dir = temp_dir() + "/py";
  std::filesystem::create_directories(dir);

  const std::string ours = dir + "/ours.safetensors";
  write_filters(ours, calibrated_pattern());
  EXPECT_EQ(std::system(("python3 '" + script + "' verify '" + ours + "'").c_str()), 0);

  ASSERT_EQ(std::system(("python3 '" + script + "' write '" + dir + "' > /dev/null").c_str()), 0);
  const std::vector<float> want = pattern_filters().data;
  for (const char* name : {"ours_f32", "ours_f16"}) {
    const LoadedFilters l = load_filters(dir + "/" + name + ".safetensors", {3, 2, 8, kFingerprint});
    EXPECT_EQ(l.filters.data, want) << name;
    EXPECT_FALSE(l.foreign);
  }
  const std::string published = dir + "/published.safetensors";
  EXPECT_THROW(load_filters(published, {3, 2, 8, kFingerprint}), Error);  // convention must be explicit
  const LoadedFilters p = load_filters(published, {3, 2, 8, kFingerprint}, {FilterLayout::kHf, SignConvention::kKeepSmallestDot});
  EXPECT_TRUE(p.foreign);
  EXPECT_TRUE(p.fingerprint_missing);
  EXPECT_EQ(p.filters.data, want);
}

}  // namespace
}  // namespace qf::calib
