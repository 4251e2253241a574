// Scalar half of the kernels: exact fp16/bf16 conversions, row dequantization, the per-thread
// activation scratch buffer and the QF_SIMD_TARGET override. The SIMD kernels are in matmul.cpp.
#include "tensor/simd_config.h"  // first: fixes the Highway target set

#include <hwy/targets.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "tensor/kernels.h"
#include "tensor/kernels_internal.h"
#include "util/error.h"

namespace qf {

// ---------------------------------------------------------------------------------------------
// fp16 / bf16

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

// ---------------------------------------------------------------------------------------------
// Row dequantization (not on the hot path: used for embedding lookups and tests).

void dequantize_row(const WeightView& w, int64_t row, float* out) {
  const TypeInfo& ti = type_info(w.type);
  if (!ti.supported) fail("dequantize_row: tensor type ", ti.name, " is not supported");
  if (w.data == nullptr || out == nullptr) fail("dequantize_row: null pointer");
  if (w.cols <= 0 || row < 0 || row >= w.rows)
    fail("dequantize_row: row ", row, " out of range for a ", w.rows, " x ", w.cols, " tensor");
  const size_t rb = row_bytes(w.type, w.cols);  // also checks cols % block size
  ti.dequantize(w.data + static_cast<size_t>(row) * rb, w.cols, out);
}

// ---------------------------------------------------------------------------------------------
// Scratch buffer

namespace detail {

uint8_t* scratch(size_t bytes) {
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<uint8_t[], Free> buf;
  thread_local size_t cap = 0;
  if (bytes > cap) {
    const size_t want = std::max<size_t>(bytes + bytes / 2, 4096);
    const size_t rounded = (want + 63) / 64 * 64;  // aligned_alloc needs a multiple of 64
    buf.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
    if (!buf) {
      cap = 0;
      fail("out of memory allocating ", rounded, " bytes of activation scratch");
    }
    cap = rounded;
  }
  return buf.get();
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// SIMD target override

namespace {

struct TargetName {
  const char* name;
  int64_t target;
};
// Best first. Highway numbers better targets with lower bits.
constexpr TargetName kTargets[] = {
    {"avx512vnni", HWY_AVX3_DL}, {"avx512", HWY_AVX3}, {"avx2", HWY_AVX2}, {"scalar", HWY_SCALAR}};

// What the CPU and OS support, read before any override is installed.
int64_t real_targets() {
  static const int64_t targets = [] {
    hwy::SetSupportedTargetsForTest(0);
    return hwy::SupportedTargets();
  }();
  return targets;
}

}  // namespace

bool force_simd_target(std::string_view name) {
  const int64_t real = real_targets();
  if (name == "best") {
    hwy::SetSupportedTargetsForTest(0);
    return true;
  }
  for (const TargetName& t : kTargets) {
    if (name != t.name) continue;
    if (t.target != HWY_SCALAR && (real & t.target) == 0) return false;
    // Everything no better than the cap (higher bits); SCALAR is always the last resort.
    hwy::SetSupportedTargetsForTest((real & ~(t.target - 1)) | HWY_SCALAR);
    return true;
  }
  return false;
}

std::vector<std::string> available_simd_targets() {
  const int64_t real = real_targets();
  std::vector<std::string> names;
  for (const TargetName& t : kTargets)
    if (t.target == HWY_SCALAR || (real & t.target) != 0) names.emplace_back(t.name);
  return names;
}

namespace detail {

void init_simd_once() {
  static const bool done = [] {
    real_targets();  // snapshot before any override
    const char* env = std::getenv("QF_SIMD_TARGET");
    if (env != nullptr && *env != '\0' && !force_simd_target(env))
      fail("QF_SIMD_TARGET=", std::string(env),
           " is unknown or not supported here (use best, avx512vnni, avx512, avx2 or scalar)");
    return true;
  }();
  (void)done;
}

}  // namespace detail
}  // namespace qf
