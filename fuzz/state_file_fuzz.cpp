// libFuzzer harness: the session state file reader (kv/state_file.h) on arbitrary bytes. Any
// input must either decode or throw qf::Error; one that decodes must be canonical: encoding the
// decoded state gives back exactly the input (so every byte of a valid file is accounted for).
// The checksum would stop almost every mutation at the door, so each input is also tried with
// its checksum recomputed, which lets the fuzzer reach the body's parser.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "kv/state_file.h"
#include "util/error.h"
#include "util/hash.h"

namespace {

void decode_and_check(std::span<const uint8_t> bytes) {
  try {
    const qf::kv::SessionState s = qf::kv::decode_state(bytes, "<fuzz>");
    const std::vector<uint8_t> again = qf::kv::encode_state(s);
    if (again.size() != bytes.size() || std::memcmp(again.data(), bytes.data(), bytes.size()) != 0) std::abort();
  } catch (const qf::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  decode_and_check(std::span<const uint8_t>(data, size));
  if (size >= qf::kv::kStatePrefixBytes) {
    std::vector<uint8_t> fixed(data, data + size);
    const uint64_t body = size - qf::kv::kStatePrefixBytes;
    const uint32_t crc = qf::crc32(std::span<const uint8_t>(fixed).subspan(qf::kv::kStatePrefixBytes));
    std::memcpy(fixed.data() + 16, &body, 8);
    std::memcpy(fixed.data() + 24, &crc, 4);
    decode_and_check(fixed);
  }
  return 0;
}
