// util: memory in 2 MiB pages (the weights' copy and the KV caches live there).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <utility>

#include "util/error.h"
#include "util/huge_pages.h"

namespace qf {
namespace {

bool thp_offered() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string setting;
  std::getline(f, setting);
  return !setting.empty() && setting.find("[never]") == std::string::npos;
}

TEST(HugePageBuffer, LargeBuffersAreZeroedAlignedAndInHugePagesWhereOffered) {
  constexpr size_t kBytes = 5 * (size_t{1} << 20) + 123;
  HugePageBuffer b(kBytes);
  ASSERT_NE(b.data(), nullptr);
  EXPECT_EQ(b.size(), kBytes);
  EXPECT_GE(b.mapped_bytes(), kBytes);
  EXPECT_EQ(huge_pages_on_request(), thp_offered());
  EXPECT_EQ(b.in_huge_pages(), thp_offered());
  if (b.in_huge_pages()) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % HugePageBuffer::kHugePage, 0u);
    EXPECT_EQ(b.mapped_bytes() % HugePageBuffer::kHugePage, 0u);
  }
  EXPECT_TRUE(std::all_of(b.data(), b.data() + kBytes, [](uint8_t x) { return x == 0; }));
  std::fill(b.data(), b.data() + kBytes, uint8_t{7});  // all of it is writable
  EXPECT_EQ(b.data()[kBytes - 1], 7);
}

TEST(HugePageBuffer, SmallBuffersTakeOrdinaryPagesUnlessAsked) {
  HugePageBuffer small(1000);
  ASSERT_NE(small.data(), nullptr);
  EXPECT_FALSE(small.in_huge_pages());
  EXPECT_EQ(small.data()[999], 0);
  HugePageBuffer forced(1000, /*min_huge_bytes=*/0);
  EXPECT_EQ(forced.in_huge_pages(), thp_offered());
  HugePageBuffer none(0);
  EXPECT_EQ(none.data(), nullptr);
  EXPECT_EQ(none.size(), 0u);
}

TEST(HugePageBuffer, MovesOwnership) {
  HugePageBuffer a(3 << 20);
  uint8_t* p = a.data();
  p[5] = 42;
  HugePageBuffer b(std::move(a));
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(b.data(), p);
  HugePageBuffer c(100);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.data()[5], 42);
  EXPECT_EQ(c.size(), size_t{3} << 20);
}

TEST(HugePageBuffer, PoisonChecksItsRange) {
  HugePageBuffer b(4096);
  EXPECT_NO_THROW(b.poison(b.data() + 4000, 96));
  EXPECT_THROW(b.poison(b.data() + 4000, 97), Error);
  EXPECT_THROW(b.poison(b.data() - 1, 1), Error);
}

}  // namespace
}  // namespace qf
