// Hashes for file integrity and identity checks (not for security).
#pragma once
#include <cstdint>
#include <span>
#include <string_view>

namespace qf {

// CRC-32 as zlib, PNG and gzip compute it (reflected polynomial 0xEDB88320, initial and final
// XOR 0xFFFFFFFF): crc32("123456789") = 0xCBF43926. `crc` continues an earlier call's result.
uint32_t crc32(std::span<const uint8_t> data, uint32_t crc = 0);

// 64-bit FNV-1a, fed piece by piece: identity of a model or a filter set, not a checksum.
class Fnv1a64 {
 public:
  void add(std::span<const uint8_t> bytes);
  void add(std::string_view s);
  // Fixed-width little-endian encoding, so a value hashes the same on every machine.
  void add_u64(uint64_t v);
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

}  // namespace qf
