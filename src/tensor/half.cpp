// fp16 / bf16 <-> f32, scalar and exact (declared in tensor/kernels.h). A file of its own, free of
// Highway, so the parsers' fuzz build (clang, fuzz/) can link the weight-type table without the
// SIMD kernels.
#include <cstdint>
#include <cstring>

#include "tensor/kernels.h"

namespace qf {

namespace {

float fp16_to_f32_compute(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in float.
    const float mag = static_cast<float>(mant) * 0x1p-24f;
    std::memcpy(&bits, &mag, sizeof bits);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf, or NaN keeping its payload
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Fp16Table {
  float v[65536];
  Fp16Table() {
    for (uint32_t h = 0; h < 65536; ++h) v[h] = fp16_to_f32_compute(static_cast<uint16_t>(h));
  }
};

const Fp16Table& fp16_table() {
  static const Fp16Table table;
  return table;
}

}  // namespace

float fp16_to_f32(uint16_t h) { return fp16_table().v[h]; }

uint16_t f32_to_fp16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) {
    // NaN: keep the top payload bits and force the quiet bit so it cannot become inf.
    return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));
  }
  if (abs >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 2^16: inf
  const uint32_t e = abs >> 23;  // biased float exponent
  if (e >= 113) {
    // Normal half. Rounding may carry into the exponent, up to inf (0x7C00): both correct.
    uint32_t h = ((e - 112) << 10) | ((abs >> 13) & 0x3FFu);
    const uint32_t rem = abs & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  // Subnormal half (value < 2^-14): the result is round(value * 2^24).
  if (e < 102) return sign;  // value < 2^-25: rounds to zero (2^-25 itself ties to even 0)
  const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - e;  // 14..24
  uint32_t m = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (m & 1u))) ++m;  // may reach 0x400, the smallest normal
  return static_cast<uint16_t>(sign | m);
}

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest even; overflow carries to inf
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace qf
