// GGML weight types as GGUF stores them: ids, block sizes and block layouts.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace qf {

// Values are the on-disk ids of ggml's type enum (ggml.h); only some are supported.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
};

struct TypeInfo {
  std::string_view name;
  int64_t block_elems;   // elements per block (1 for plain types)
  size_t block_bytes;    // bytes per block
  bool supported;        // usable as a weight by this engine
};

// Info for any id; unknown ids get name "unknown" and supported = false.
TypeInfo type_info(GgmlType t);
TypeInfo type_info(uint32_t raw_id);

// Bytes taken by a row of n elements; n must be a multiple of block_elems.
size_t row_bytes(GgmlType t, int64_t n);

// Block layouts (identical to ggml's, little-endian, no padding).
constexpr int kQK = 32;  // elements per block of Q4_0, Q4_1, Q8_0, Q8_1
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };              // w = d * (q - 8)
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[kQK / 2]; };           // w = d * q + m
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };                   // w = d * q
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34);
// In Q4 blocks, qs[j] & 0xF is element j and qs[j] >> 4 is element j + 16. d, m are IEEE fp16.

}  // namespace qf
