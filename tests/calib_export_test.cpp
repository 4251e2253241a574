// Export of filters for GPU engines (calib::from_canonical, calib::export_hf): the exact inverse of
// the import of published filters (to_canonical / load_filters with hf + keep_smallest_dot).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "calib/filter_file.h"
#include "calib/filters.h"
#include "util/error.h"

namespace qf::calib {
namespace {

namespace fs = std::filesystem;

Filters random_filters(int layers, int heads, int dim) {
  Filters f(layers, heads, dim);
  std::mt19937 rng(7);
  std::normal_distribution<float> n;
  for (float& x : f.data) x = n(rng);
  return f;
}

TEST(FilterExport, FromCanonicalInvertsToCanonical) {
  const Filters f = random_filters(3, 2, 8);
  for (FilterLayout l : {FilterLayout::kGguf, FilterLayout::kHf})
    for (SignConvention s : {SignConvention::kKeepLargestDot, SignConvention::kKeepSmallestDot})
      EXPECT_EQ(to_canonical(from_canonical(f, l, s), l, s).data, f.data);
}

TEST(FilterExport, HfLayoutAndSign) {
  const Filters f = random_filters(1, 1, 4);  // gguf rows (a0 b0 a1 b1): pairs (0,1), (2,3)
  const Filters hf = from_canonical(f, FilterLayout::kHf, SignConvention::kKeepSmallestDot);
  const std::vector<float> want = {-f.data[0], -f.data[2], -f.data[1], -f.data[3]};
  EXPECT_EQ(hf.data, want);
}

TEST(FilterExport, DirectoryRoundTrip) {
  const fs::path dir = fs::temp_directory_path() / ("qf_export_test_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  const Filters f = random_filters(3, 2, 8);
  export_hf(dir.string(), f);
  const FilterExpectation expect{3, 2, 8, ""};
  const LoadedFilters back = load_filters((dir / kHfWeightsFile).string(), expect,
                                          {FilterLayout::kHf, SignConvention::kKeepSmallestDot});
  EXPECT_TRUE(back.foreign);
  EXPECT_EQ(back.filters.data, f.data);
  std::ifstream in(dir / kHfConfigFile);
  const nlohmann::json config = nlohmann::json::parse(in);
  EXPECT_EQ(config, (nlohmann::json{{"num_layers", 3}, {"num_kv_heads", 2}, {"kv_head_dim", 8}}));
  fs::remove_all(dir);
}

TEST(FilterExport, UnwritableDirectoryIsAnError) {
  const fs::path file = fs::temp_directory_path() / ("qf_export_test_file_" + std::to_string(::getpid()));
  std::ofstream(file) << "x";
  EXPECT_THROW(export_hf((file / "sub").string(), random_filters(1, 1, 4)), Error);
  fs::remove(file);
}

TEST(FilterExport, OddHeadDimIsAnError) {
  EXPECT_THROW(from_canonical(random_filters(1, 1, 3), FilterLayout::kHf, SignConvention::kKeepSmallestDot), Error);
}

}  // namespace
}  // namespace qf::calib
