#include "util/hash.h"

#include <array>

namespace qf {

namespace {

// Remainder of every byte value divided by the polynomial, bit-reflected (one step per byte).
constexpr std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t r = b;
    for (int bit = 0; bit < 8; ++bit) r = (r & 1u) ? (r >> 1) ^ 0xEDB88320u : r >> 1;
    table[b] = r;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrcTable = make_crc_table();

}  // namespace

uint32_t crc32(std::span<const uint8_t> data, uint32_t crc) {
  crc = ~crc;
  for (uint8_t byte : data) crc = kCrcTable[(crc ^ byte) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

void Fnv1a64::add(std::span<const uint8_t> bytes) {
  for (uint8_t b : bytes) {
    h_ ^= b;
    h_ *= 0x100000001b3ull;
  }
}

void Fnv1a64::add(std::string_view s) {
  add_u64(s.size());  // length first: ("ab", "c") and ("a", "bc") must differ
  add(std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
}

void Fnv1a64::add_u64(uint64_t v) {
  uint8_t le[8];
  for (int i = 0; i < 8; ++i) le[i] = static_cast<uint8_t>(v >> (8 * i));
  add(std::span<const uint8_t>(le, 8));
}

}  // namespace qf
