// GGML weight types as GGUF stores them: one traits row per type (ids, block sizes, the
// activation format its kernels pair with, row dequantization) and the original block layouts.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

namespace qf {

// Values are the on-disk ids of ggml's type enum (ggml.h); only some are supported.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35, MXFP4 = 39,
};

// How matmul feeds activations to a weight type's kernels.
enum class ActFormat : uint8_t {
  kNone,   // not a weight type qf runs
  kFloat,  // F32 / F16 / BF16: float dot products
  kQ8,     // int8 blocks of 32, fp16-rounded float scale and scaled sum (ggml's Q8_0 / Q8_1)
  kQ8K,    // int8 super-blocks of 256, float scale and sums per 16 (ggml's Q8_K)
};

// Decodes n elements (a whole number of blocks) starting at a block boundary.
using DequantizeFn = void (*)(const uint8_t* src, int64_t n, float* out);

struct TypeInfo {
  GgmlType type{};
  std::string_view name;
  int64_t block_elems = 0;   // elements per block (1 for plain types, 0 for unknown ids)
  size_t block_bytes = 0;    // bytes per block
  ActFormat act = ActFormat::kNone;
  DequantizeFn dequantize = nullptr;  // null for types qf cannot decode
  bool supported = false;    // usable as a weight by this engine (matmul and dequantize_row)
};

// The row for any id; unknown ids get name "unknown", block_elems 0 and supported = false.
const TypeInfo& type_info(GgmlType t);
const TypeInfo& type_info(uint32_t raw_id);

// Every known type's row, in id order (supported or not).
std::span<const TypeInfo> all_types();

// Bytes taken by a row of n elements; n must be a multiple of block_elems.
size_t row_bytes(GgmlType t, int64_t n);

// Block layouts of the original 32-element types (identical to ggml's, little-endian, no
// padding); the other types are described in tensor/quant_blocks.h.
constexpr int kQK = 32;  // elements per block of Q4_0, Q4_1, Q8_0, Q8_1
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };              // w = d * (q - 8)
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[kQK / 2]; };           // w = d * q + m
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };                   // w = d * q
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34);
// In Q4 blocks, qs[j] & 0xF is element j and qs[j] >> 4 is element j + 16. d, m are IEEE fp16.

}  // namespace qf
