// Tests for src/tensor: fp16/bf16 conversions, row dequantization, matmul on every weight type and
// SIMD target against scalar double-precision references, the float vector ops, and the pool.
//
// References here are written from the ggml format description, independently of the kernels:
// fp16 is decoded with ldexp, blocks are read byte by byte, and activations are quantized with
// the formula documented in kernels.h. Types added with the type table (Q5_0, Q5_1, IQ4_NL and
// the K-quants) are decoded by dequantize_row, which tests/python/test_quants.py proves
// bit-exact against gguf-py's independent numpy decoders.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "tensor/kernels.h"
#include "tensor/quant_blocks.h"
#include "tensor/threadpool.h"
#include "tensor/types.h"
#include "util/error.h"

namespace qf {
namespace {

// ---------------------------------------------------------------------------------------------
// Independent references

double ref_fp16(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, mant = h & 1023;
  double v;
  if (exp == 0) v = std::ldexp(static_cast<double>(mant), -24);
  else if (exp == 31) v = mant == 0 ? INFINITY : NAN;
  else v = std::ldexp(static_cast<double>(1024 + mant), exp - 25);
  return sign ? -v : v;
}

// Nearest fp16 (ties to even) of a finite float, found by binary search over the ordered
// positive half values instead of bit manipulation.
uint16_t ref_f32_to_fp16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7C00;  // 65504 + half an ulp (2^4) and up round to inf
  uint16_t lo = 0, hi = 0x7BFF;            // largest h with ref_fp16(h) <= a
  while (lo < hi) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
    if (ref_fp16(mid) <= a) lo = mid;
    else hi = static_cast<uint16_t>(mid - 1);
  }
  if (ref_fp16(lo) == a || lo == 0x7BFF) return sign | lo;  // 0x7BFF: a < 65520 rounds down
  const double dlo = a - ref_fp16(lo), dhi = ref_fp16(lo + 1) - a;
  uint16_t r = lo;
  if (dhi < dlo || (dhi == dlo && (lo & 1))) r = static_cast<uint16_t>(lo + 1);
  return sign | r;
}

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// Row r of w decoded to doubles, straight from the bytes.
std::vector<double> ref_row(const WeightView& w, int64_t r) {
  const size_t rb = row_bytes(w.type, w.cols);
  const uint8_t* p = w.data + r * rb;
  std::vector<double> out(w.cols);
  for (int64_t j = 0; j < w.cols; ++j) {
    const int64_t b = j / 32, i = j % 32;
    switch (w.type) {
      case GgmlType::F32: {
        float f;
        std::memcpy(&f, p + 4 * j, 4);
        out[j] = f;
        break;
      }
      case GgmlType::F16: out[j] = ref_fp16(rd16(p + 2 * j)); break;
      case GgmlType::BF16: {
        const uint32_t bits = static_cast<uint32_t>(rd16(p + 2 * j)) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        out[j] = f;
        break;
      }
      case GgmlType::Q8_0: {
        const uint8_t* blk = p + 34 * b;
        out[j] = ref_fp16(rd16(blk)) * static_cast<int8_t>(blk[2 + i]);
        break;
      }
      case GgmlType::Q4_0: {
        const uint8_t* blk = p + 18 * b;
        const int q = i < 16 ? (blk[2 + i] & 15) : (blk[2 + i - 16] >> 4);
        out[j] = ref_fp16(rd16(blk)) * (q - 8);
        break;
      }
      case GgmlType::Q4_1: {
        const uint8_t* blk = p + 20 * b;
        const int q = i < 16 ? (blk[4 + i] & 15) : (blk[4 + i - 16] >> 4);
        out[j] = ref_fp16(rd16(blk)) * q + ref_fp16(rd16(blk + 2));
        break;
      }
      default: {
        std::vector<float> f(w.cols);
        dequantize_row(w, r, f.data());
        return std::vector<double>(f.begin(), f.end());
      }
    }
  }
  return out;
}

// The activation quantization of kernels.h: per block of 32 for the 32-element types, per
// super-block of 256 (ggml's Q8_K) for the K-quants.
struct QuantRef {
  std::vector<int> q;
  std::vector<float> d;  // per block, fp16-rounded for blocks of 32
  int64_t block = 32;
};
QuantRef ref_quantize_k(const float* x, int64_t n) {
  QuantRef r;
  r.block = 256;
  r.q.resize(n);
  for (int64_t b = 0; b < n / 256; ++b) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 256; ++j)
      if (std::fabs(x[256 * b + j]) > amax) {
        amax = std::fabs(x[256 * b + j]);
        max = x[256 * b + j];
      }
    const float iscale = amax != 0.0f ? -127.0f / max : 0.0f;
    for (int j = 0; j < 256; ++j) {
      const float v = iscale * x[256 * b + j];  // rounded to float, then to nearest (ties even)
      r.q[256 * b + j] = std::min(127, static_cast<int>(std::nearbyint(v)));
    }
    r.d.push_back(amax != 0.0f ? 1.0f / iscale : 0.0f);
  }
  return r;
}
QuantRef ref_quantize(const float* x, int64_t n, ActFormat act) {
  if (act == ActFormat::kQ8K) return ref_quantize_k(x, n);
  QuantRef r;
  r.q.resize(n);
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * b + j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < 32; ++j) r.q[32 * b + j] = static_cast<int>(std::round(x[32 * b + j] * id));
    r.d.push_back(qf::fp16_to_f32(qf::f32_to_fp16(d)));  // the scale is kept in fp16, as ggml's q8 blocks
  }
  return r;
}

bool is_quant(GgmlType t) { return type_info(t).act == ActFormat::kQ8 || type_info(t).act == ActFormat::kQ8K; }

// Every weight type the table marks supported: the matmul and dequantize tests cover exactly these.
std::vector<GgmlType> supported_types() {
  std::vector<GgmlType> v;
  for (const TypeInfo& t : all_types())
    if (t.supported) v.push_back(t.type);
  return v;
}
const std::vector<GgmlType> kAllTypes = supported_types();

// Byte offsets of the fp16 scale fields in a block of each quantized type (d first, then the
// min / dmin where the type has one).
std::vector<size_t> half_fields(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_1: case GgmlType::Q5_1: case GgmlType::Q4_K: case GgmlType::Q5_K: return {0, 2};
    case GgmlType::Q2_K: return {80, 82};
    case GgmlType::Q3_K: return {108};
    case GgmlType::Q6_K: return {208};
    default: return {0};
  }
}

// ---------------------------------------------------------------------------------------------
// Random weights

// A random finite fp16 in about [-scale, scale], sometimes subnormal or zero.
uint16_t random_half(std::mt19937& rng, float scale) {
  std::uniform_int_distribution<int> pick(0, 19);
  const int k = pick(rng);
  if (k == 0) return static_cast<uint16_t>(std::uniform_int_distribution<int>(0, 1023)(rng));  // subnormal
  if (k == 1) return 0;
  return f32_to_fp16(std::uniform_real_distribution<float>(-scale, scale)(rng));
}

std::vector<uint8_t> random_weights(GgmlType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::vector<uint8_t> data(row_bytes(t, cols) * rows);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  auto put16 = [](uint8_t* p, uint16_t v) { p[0] = v & 0xFF; p[1] = v >> 8; };
  const size_t n = static_cast<size_t>(rows * cols);
  switch (t) {
    case GgmlType::F32:
      for (size_t i = 0; i < n; ++i) {
        const float f = uni(rng);
        std::memcpy(data.data() + 4 * i, &f, 4);
      }
      break;
    case GgmlType::F16:
      for (size_t i = 0; i < n; ++i) put16(data.data() + 2 * i, f32_to_fp16(uni(rng)));
      break;
    case GgmlType::BF16:
      for (size_t i = 0; i < n; ++i) put16(data.data() + 2 * i, f32_to_bf16(uni(rng)));
      break;
    default: {
      const TypeInfo& ti = type_info(t);
      // K-quant scales multiply d by up to 63 (127 for Q6_K): smaller d keeps weights O(1).
      const float dscale = ti.block_elems == 32 ? 0.05f : 0.002f;
      for (size_t b = 0; b < n / ti.block_elems; ++b) {
        uint8_t* p = data.data() + b * ti.block_bytes;
        for (size_t i = 0; i < ti.block_bytes; ++i) p[i] = static_cast<uint8_t>(byte(rng));  // qs: full range
        const auto fields = half_fields(t);
        put16(p + fields[0], random_half(rng, dscale));
        if (fields.size() > 1) put16(p + fields[1], random_half(rng, ti.block_elems == 32 ? 0.5f : 0.02f));
      }
    }
  }
  return data;
}

// Activations with the cases the quantizer must get right: an all-zero token, a zero block,
// exact .5 ties, and a wide dynamic range.
std::vector<float> random_activations(int64_t n_tok, int64_t cols, std::mt19937& rng) {
  std::vector<float> x(n_tok * cols);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : x) v = normal(rng);
  for (int64_t t = 0; t < n_tok; ++t) {
    float* xt = x.data() + t * cols;
    switch (t % 5) {
      case 1: std::fill(xt, xt + cols, 0.0f); break;
      case 2:
        for (int64_t j = 0; j < cols; ++j) xt[j] = (j % 32 == 0) ? 127.0f : static_cast<float>(j % 32) - 15.5f;
        break;  // d = 1: every other element is an exact tie
      case 3: std::fill(xt, xt + std::min<int64_t>(cols, 256), 0.0f); break;  // a zero (super-)block
      case 4:
        for (int64_t j = 0; j < cols; ++j) xt[j] *= std::ldexp(1.0f, static_cast<int>(j % 7) * 3 - 9);
        break;
      default: break;
    }
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Conversions

class SimdTargetsFp16 : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(force_simd_target("best")); }
};

TEST(Fp16, DecodeAllValuesExactly) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_f32(static_cast<uint16_t>(h));
    const double ref = ref_fp16(static_cast<uint16_t>(h));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << h;
    } else {
      ASSERT_EQ(static_cast<double>(f), ref) << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << h;  // also -0
    }
  }
}

TEST(Fp16, RoundTripAllValues) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = f32_to_fp16(fp16_to_f32(static_cast<uint16_t>(h)));
    const bool nan = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0;
    if (nan) {
      ASSERT_EQ(back & 0x7C00, 0x7C00) << h;
      ASSERT_NE(back & 0x3FF, 0) << h;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << h;
    } else {
      ASSERT_EQ(back, h) << h;
    }
  }
}

TEST(Fp16, EncodeRoundsToNearestEven) {
  // Every midpoint between neighbouring finite halves (exact ties), one float ulp either side,
  // and random floats over the whole range including subnormals and overflow.
  std::vector<float> cases;
  for (uint16_t h = 0; h < 0x7C00; ++h) {
    const double mid = (ref_fp16(h) + ref_fp16(static_cast<uint16_t>(h + 1))) / 2;  // exact in double
    const float m = static_cast<float>(mid);
    cases.push_back(m);
    cases.push_back(std::nextafter(m, 0.0f));
    cases.push_back(std::nextafter(m, INFINITY));
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits(0, 0x7F7FFFFF);
  for (int i = 0; i < 100000; ++i) {
    uint32_t b = bits(rng) % 0x47900000u;  // up to a bit past 65536
    float f;
    std::memcpy(&f, &b, 4);
    cases.push_back(f);
  }
  cases.push_back(65504.0f);
  cases.push_back(65519.99f);
  cases.push_back(65520.0f);
  cases.push_back(1e30f);
  cases.push_back(INFINITY);
  for (float f : cases) {
    ASSERT_EQ(f32_to_fp16(f), ref_f32_to_fp16(f)) << f;
    ASSERT_EQ(f32_to_fp16(-f), ref_f32_to_fp16(-f)) << -f;
  }
  EXPECT_TRUE(std::isnan(fp16_to_f32(f32_to_fp16(NAN))));
}

// The SIMD row conversion (KV cache stores) gives f32_to_fp16's bits on every target: every
// fp16 value, midpoints between neighbours and one float ulp either side, random floats of every
// exponent (subnormal results, overflow), infinities and NaNs with payloads, at offsets that
// leave scalar tails.
TEST_F(SimdTargetsFp16, RowMatchesScalarEveryTarget) {
  std::vector<float> x;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_f32(static_cast<uint16_t>(h));
    x.push_back(f);
    x.push_back(std::nextafter(f, 0.0f));
    x.push_back(std::nextafter(f, INFINITY));
    if ((h & 0x7C00) != 0x7C00 && (h & 0x7FFF) != 0x7BFF)
      x.push_back(static_cast<float>((ref_fp16(static_cast<uint16_t>(h)) + ref_fp16(static_cast<uint16_t>(h + 1))) / 2));
  }
  std::mt19937 rng(17);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t b = static_cast<uint32_t>(rng());
    float f;
    std::memcpy(&f, &b, 4);
    x.push_back(f);
  }
  for (uint32_t b : {0x7FC00000u, 0x7F800001u, 0xFFBFFFFFu, 0x7FFFE000u, 0x7F802000u})  // NaNs
    for (int i = 0; i < 3; ++i) {
      float f;
      std::memcpy(&f, &b, 4);
      x.push_back(f);
    }
  std::vector<uint16_t> want(x.size());
  for (size_t i = 0; i < x.size(); ++i) want[i] = f32_to_fp16(x[i]);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (size_t off : {size_t{0}, size_t{3}}) {
      std::vector<uint16_t> got(x.size() - off, 0xDEAD);
      f32_to_fp16_row(x.data() + off, got.size(), reinterpret_cast<uint8_t*>(got.data()));
      for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], want[i + off]) << target << " x=" << x[i + off] << " i=" << i;
    }
    std::vector<uint16_t> tail(5, 0xDEAD);  // shorter than a vector: all scalar, nothing past n
    f32_to_fp16_row(x.data(), 4, reinterpret_cast<uint8_t*>(tail.data()));
    EXPECT_EQ(tail[4], 0xDEAD) << target;
  }
}

TEST(Bf16, DecodeEncode) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    ASSERT_EQ(bits, h << 16);
    if (!std::isnan(f)) ASSERT_EQ(f32_to_bf16(f), h);
    else ASSERT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
  }
  // Ties go to even; just above a tie goes up.
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f), 0x3F80);           // 1 + half ulp: tie, even is 1.0
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3F81);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3F82);       // tie between 0x3F81 and 0x3F82
  EXPECT_EQ(f32_to_bf16(3.4e38f), 0x7F80);                  // rounds up to inf
}

// ---------------------------------------------------------------------------------------------
// dequantize_row

TEST(Dequantize, MatchesByteLevelDecoding) {
  std::mt19937 rng(1);
  for (GgmlType t : kAllTypes) {
    for (int64_t blocks : {1, 2, 18}) {
      const int64_t cols = blocks * std::max<int64_t>(32, type_info(t).block_elems);
      const int64_t rows = 5;
      const auto data = random_weights(t, rows, cols, rng);
      const WeightView w{t, cols, rows, data.data()};
      std::vector<float> out(cols);
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(w, r, out.data());
        const auto ref = ref_row(w, r);
        for (int64_t j = 0; j < cols; ++j) {
          // Q4_1 is d * q + m rounded once more in float; everything else is exact.
          const double tol = t == GgmlType::Q4_1 ? std::fabs(ref[j]) * 1e-7 + 1e-12 : 0.0;
          ASSERT_NEAR(out[j], ref[j], tol) << type_info(t).name << " row " << r << " col " << j;
        }
      }
    }
  }
}

TEST(Dequantize, RejectsBadInput) {
  std::vector<uint8_t> data(34 * 2);
  float out[64];
  const WeightView w{GgmlType::Q8_0, 64, 1, data.data()};
  EXPECT_THROW(dequantize_row(w, 1, out), Error);
  EXPECT_THROW(dequantize_row(w, -1, out), Error);
  EXPECT_THROW(dequantize_row(WeightView{GgmlType::IQ2_XXS, 256, 1, data.data()}, 0, out), Error);
  EXPECT_THROW(dequantize_row(WeightView{GgmlType::Q8_0, 48, 1, data.data()}, 0, out), Error);
  EXPECT_THROW(dequantize_row(WeightView{GgmlType::Q8_0, 64, 1, nullptr}, 0, out), Error);
  EXPECT_NO_THROW(dequantize_row(w, 0, out));
}

// ---------------------------------------------------------------------------------------------
// matmul

// Restores the best target when a test that forces targets ends, even on failure.
class SimdTargets : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(force_simd_target("best")); }
};

TEST_F(SimdTargets, NamesAndForcing) {
  const auto names = available_simd_targets();
  ASSERT_FALSE(names.empty());
  EXPECT_EQ(names.back(), "scalar");
  const std::string best = simd_target_name();
  const std::pair<const char*, const char*> expect[] = {
      {"avx512vnni", "AVX3_DL"}, {"avx512", "AVX3"}, {"avx2", "AVX2"}, {"scalar", "SCALAR"}};
  for (const auto& [name, hwy_name] : expect) {
    const bool available = std::find(names.begin(), names.end(), name) != names.end();
    EXPECT_EQ(force_simd_target(name), available) << name;
    if (!available) continue;
    if (std::string_view(name) == "scalar")  // the portable target: SCALAR (GCC) or EMU128 (clang)
      EXPECT_TRUE(simd_target_name() == "SCALAR" || simd_target_name() == "EMU128") << simd_target_name();
    else
      EXPECT_EQ(simd_target_name(), hwy_name) << name;
  }
  EXPECT_FALSE(force_simd_target("sse9"));
  ASSERT_TRUE(force_simd_target("best"));
  EXPECT_EQ(simd_target_name(), best);
  std::printf("SIMD targets here: best %s; available:", best.c_str());
  for (const auto& n : names) std::printf(" %s", n.c_str());
  std::printf("\n");
}

struct Shape {
  int64_t rows, cols, n_tok;
};

// The newer types with a min/dmin term round d*q and the min separately: count both.
void add_min_magnitudes(GgmlType t, const uint8_t* row, std::vector<double>& mag) {
  const TypeInfo& ti = type_info(t);
  auto each_block = [&](auto codec_tag) {
    using C = decltype(codec_tag);
    typename C::Decoded b;
    for (int64_t k = 0; k < static_cast<int64_t>(mag.size()) / C::kElems; ++k) {
      C::decode(row + k * C::kBytes, b);
      for (int j = 0; j < C::kElems; ++j) {
        if constexpr (C::kElems == 32) {
          mag[k * 32 + j] = std::fabs(b.d * b.q[j]) + std::fabs(b.m);
        } else {
          const int g = j / blocks::kGroup;
          mag[k * C::kElems + j] = std::fabs(static_cast<double>(b.d) * b.sc[g] * b.q[j]) + std::fabs(static_cast<double>(b.dmin) * b.mn[g]);
        }
      }
    }
  };
  if (ti.type == GgmlType::Q5_1) each_block(blocks::Codec<GgmlType::Q5_1>{});
  if (ti.type == GgmlType::Q2_K) each_block(blocks::Codec<GgmlType::Q2_K>{});
  if (ti.type == GgmlType::Q4_K) each_block(blocks::Codec<GgmlType::Q4_K>{});
  if (ti.type == GgmlType::Q5_K) each_block(blocks::Codec<GgmlType::Q5_K>{});
}

// Checks one matmul result against
//  (a) tight: double-precision dot products of the exactly decoded weights with the activations
//      quantized by the documented formula. Only float rounding separates the kernel from this:
//      |y - ref| <= 2e-5 * sum |terms| (terms counted before any cancellation, e.g. Q4_1's d*q
//      and m separately), i.e. about 300 float ulps of the magnitude that was accumulated.
//  (b) loose: double dot products with the unquantized activations. Rounding x to d*q moves each
//      element by at most d/2 (plus float error in x * (1/d)), so
//      |y - ref| <= sum_blocks 0.5005 * d * sum |w| + tight bound.
// Float weight types skip quantization; (b) then uses the tight bound only.
void check_matmul(const WeightView& w, const std::vector<float>& x, int64_t n_tok, const std::vector<float>& y,
                  const std::string& what) {
  const int64_t rows = w.rows, cols = w.cols;
  std::vector<std::vector<double>> wr(rows);
  for (int64_t r = 0; r < rows; ++r) wr[r] = ref_row(w, r);
  // Magnitudes of the separately rounded parts of each weight (see the tight bound above).
  std::vector<std::vector<double>> wmag(rows, std::vector<double>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = w.data + r * row_bytes(w.type, cols);
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t i = j % 32;
      wmag[r][j] = std::fabs(wr[r][j]);
      if (w.type == GgmlType::Q4_0) {  // d * q and -8 d
        const uint8_t* blk = p + 18 * (j / 32);
        const int q = i < 16 ? (blk[2 + i] & 15) : (blk[2 + i - 16] >> 4);
        wmag[r][j] = std::fabs(ref_fp16(rd16(blk))) * (q + 8);
      }
      if (w.type == GgmlType::Q4_1) {  // d * q and m
        const uint8_t* blk = p + 20 * (j / 32);
        const int q = i < 16 ? (blk[4 + i] & 15) : (blk[4 + i - 16] >> 4);
        wmag[r][j] = std::fabs(ref_fp16(rd16(blk))) * q + std::fabs(ref_fp16(rd16(blk + 2)));
      }
    }
    add_min_magnitudes(w.type, p, wmag[r]);
  }
  for (int64_t t = 0; t < n_tok; ++t) {
    const float* xt = x.data() + t * cols;
    QuantRef qr;
    if (is_quant(w.type)) qr = ref_quantize(xt, cols, type_info(w.type).act);
    for (int64_t r = 0; r < rows; ++r) {
      double tight = 0, mag = 0, loose = 0, slack = 0;
      for (int64_t j = 0; j < cols; ++j) {
        loose += wr[r][j] * xt[j];
        if (is_quant(w.type)) {
          const double dx = qr.d[j / qr.block];
          const double xq = dx * qr.q[j];
          tight += wr[r][j] * xq;
          mag += wmag[r][j] * std::fabs(xq);
          slack += 0.5005 * std::fabs(dx) * std::fabs(wr[r][j]);
        } else {
          tight += wr[r][j] * xt[j];
          mag += std::fabs(wr[r][j] * xt[j]);
        }
      }
      const double got = y[t * rows + r];
      const double tol = 2e-5 * mag + 1e-30;
      ASSERT_NEAR(got, tight, tol) << what << " tight, token " << t << " row " << r;
      ASSERT_NEAR(got, loose, tol + slack) << what << " loose, token " << t << " row " << r;
    }
  }
}

std::vector<Shape> shapes_for(GgmlType t) {
  if (type_info(t).block_elems == 256)
    return {{1, 256, 1}, {3, 512, 3}, {17, 768, 17}, {35, 256, 1}, {64, 1536, 17}, {13, 512, 64},
            {37, 1536, 3}, {33, 768, 1}, {193, 1536, 1}, {130, 256, 5}};
  std::vector<Shape> s = {
      {1, 32, 1},    {3, 64, 3},     {17, 96, 17},  {35, 160, 1},  {35, 224, 3},   {64, 576, 17},
      {13, 576, 64}, {37, 1536, 3},  {5, 1536, 64}, {130, 288, 5}, {33, 576, 1},   {193, 1536, 1},
      {19, 608, 16}, {6, 320, 11},  // token tiles of exactly 16 and of 9..15 (batched decode steps)
  };
  if (!is_quant(t)) {  // float rows need not be whole blocks
    s.push_back({7, 33, 3});
    s.push_back({9, 1, 2});
    s.push_back({5, 70, 17});
  }
  return s;
}

TEST_F(SimdTargets, MatmulAllTypesShapesThreadsTargets) {
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(42);  // same data for every target
    for (GgmlType t : kAllTypes) {
      for (const Shape& s : shapes_for(t)) {
        const auto data = random_weights(t, s.rows, s.cols, rng);
        const WeightView w{t, s.cols, s.rows, data.data()};
        const auto x = random_activations(s.n_tok, s.cols, rng);
        const std::string what = target + " " + std::string(type_info(t).name) + " " + std::to_string(s.rows) +
                                 "x" + std::to_string(s.cols) + " n_tok " + std::to_string(s.n_tok);
        for (TokenKind kind : {TokenKind::decode, TokenKind::prompt}) {
          const std::string how = what + (kind == TokenKind::prompt ? " prompt" : " decode");
          std::vector<float> first;
          for (ThreadPool& pool : pools) {
            std::vector<float> y(s.rows * s.n_tok, NAN);
            matmul(w, x.data(), s.n_tok, y.data(), pool, kind);
            if (first.empty()) {
              first = y;
              check_matmul(w, x, s.n_tok, y, how);
              if (HasFatalFailure()) return;
            } else {
              // Each output is computed by the same instructions whatever the split: bit-identical.
              ASSERT_EQ(0, std::memcmp(first.data(), y.data(), y.size() * sizeof(float)))
                  << how << " differs with " << pool.size() << " threads";
            }
          }
        }
      }
    }
  }
}

// The VNNI engine's batched tiles (1x16 and 4x4, chosen by CPU vendor): for every token count of a
// batched step and row counts with remainders, the same outputs bit for bit, and each token's
// outputs those of the same token alone (the single-token path), so a batched session decodes
// exactly as it would alone on any CPU.
TEST_F(SimdTargets, VnniBatchTilesGiveTheSameBits) {
  if (simd_target_name() != "AVX3_DL") GTEST_SKIP() << "no AVX-512 VNNI here";
  struct ResetTile {
    ~ResetTile() { force_vnni_batch_tile("default"); }
  } reset;
  EXPECT_FALSE(force_vnni_batch_tile("2x8"));
  ThreadPool pool(2);
  std::mt19937 rng(11);
  for (GgmlType t : {GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0}) {
    for (const int64_t rows : {int64_t(37), int64_t(64)}) {
      const int64_t cols = 288;
      const auto data = random_weights(t, rows, cols, rng);
      const WeightView w{t, cols, rows, data.data()};
      for (int64_t n_tok : {2, 3, 4, 5, 7, 8, 13, 16, 17}) {
        const std::string what = std::string(type_info(t).name) + " rows " + std::to_string(rows) + " n_tok " +
                                 std::to_string(n_tok);
        const auto x = random_activations(n_tok, cols, rng);
        std::vector<float> wide(rows * n_tok), square(rows * n_tok), alone(rows);
        ASSERT_TRUE(force_vnni_batch_tile("1x16"));
        EXPECT_EQ(vnni_batch_tile(), "1x16");
        matmul(w, x.data(), n_tok, wide.data(), pool, TokenKind::decode);
        ASSERT_TRUE(force_vnni_batch_tile("4x4"));
        EXPECT_EQ(vnni_batch_tile(), "4x4");
        matmul(w, x.data(), n_tok, square.data(), pool, TokenKind::decode);
        ASSERT_EQ(0, std::memcmp(wide.data(), square.data(), wide.size() * sizeof(float))) << what;
        for (int64_t tok = 0; tok < n_tok; ++tok) {
          matmul(w, x.data() + tok * cols, 1, alone.data(), pool, TokenKind::decode);
          ASSERT_EQ(0, std::memcmp(alone.data(), square.data() + tok * rows, rows * sizeof(float))) << what << " token " << tok;
        }
      }
    }
  }
}

// matmul_shared_input: matrices of one type and width reading one input give, bit for bit,
// what separate matmul calls give, whatever the threads, target and token kind, including row
// counts that are not a whole number of the engines' row groups (7, 5) and matrices of
// different types or widths (no sharing: one matmul each). Sizes that disagree are an error.
TEST_F(SimdTargets, SharedInputMatmulEqualsSeparateMatmuls) {
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  const GgmlType types[] = {GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16};
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(7);
    for (GgmlType t : types) {
      const int64_t cols = 256;
      for (const std::vector<int64_t>& rows : {std::vector<int64_t>{96, 32, 32}, {8, 7, 12}, {5, 64}}) {
        std::vector<std::vector<uint8_t>> data;
        std::vector<WeightView> ws;
        for (int64_t r : rows) data.push_back(random_weights(t, r, cols, rng));
        for (size_t i = 0; i < rows.size(); ++i) ws.push_back({t, cols, rows[i], data[i].data()});
        for (int64_t n_tok : {1, 3, 16}) {
          const auto x = random_activations(n_tok, cols, rng);
          for (TokenKind kind : {TokenKind::decode, TokenKind::prompt}) {
            for (ThreadPool& pool : pools) {
              std::vector<std::vector<float>> want(rows.size()), got(rows.size());
              std::vector<float*> out;
              for (size_t i = 0; i < rows.size(); ++i) {
                want[i].assign(rows[i] * n_tok, NAN);
                got[i].assign(rows[i] * n_tok, NAN);
                matmul(ws[i], x.data(), n_tok, want[i].data(), pool, kind);
                out.push_back(got[i].data());
              }
              matmul_shared_input(ws, x.data(), n_tok, out, pool, kind);
              for (size_t i = 0; i < rows.size(); ++i)
                ASSERT_EQ(0, std::memcmp(want[i].data(), got[i].data(), want[i].size() * sizeof(float)))
                    << target << " " << type_info(t).name << " matrix " << i << " of " << rows.size() << ", n_tok "
                    << n_tok << ", " << pool.size() << " threads";
            }
          }
        }
      }
    }
  }
  // Different widths or types: each matrix alone, same results.
  ThreadPool& pool = pools[1];
  std::mt19937 rng(8);
  const auto a = random_weights(GgmlType::Q4_1, 8, 64, rng), b = random_weights(GgmlType::Q8_0, 8, 64, rng);
  const std::vector<WeightView> mixed{{GgmlType::Q4_1, 64, 8, a.data()}, {GgmlType::Q8_0, 64, 8, b.data()}};
  const auto x = random_activations(2, 64, rng);
  std::vector<float> ya(16), yb(16), wa(16), wb(16);
  std::vector<float*> out{ya.data(), yb.data()};
  matmul_shared_input(mixed, x.data(), 2, out, pool);
  matmul(mixed[0], x.data(), 2, wa.data(), pool);
  matmul(mixed[1], x.data(), 2, wb.data(), pool);
  EXPECT_EQ(ya, wa);
  EXPECT_EQ(yb, wb);
  std::vector<float*> one{ya.data()};
  EXPECT_THROW(matmul_shared_input(mixed, x.data(), 2, one, pool), Error);
}

// The integer bounds of the SIMD engines (int16 pair sums of vpmaddubsw, int32 group sums,
// scale and offset ranges) at their extremes: every quant and scale byte set to one pattern
// (all ones: largest quants and scales; 0x80: Q6_K scale -128; ...) against activations that
// quantize to +-127 everywhere, including alternating signs. Decode and prefill, every target.
TEST_F(SimdTargets, MatmulExtremeBlocks) {
  ThreadPool pool(2);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (GgmlType t : kAllTypes) {
      if (!is_quant(t)) continue;
      const TypeInfo& ti = type_info(t);
      const int64_t rows = 6, cols = 2 * std::max<int64_t>(ti.block_elems, 128);
      for (uint8_t pattern : {0xFF, 0x80, 0x7F, 0x00, 0xAA, 0x55}) {
        std::vector<uint8_t> data(row_bytes(t, cols) * rows, pattern);
        for (size_t off = 0; off < data.size(); off += ti.block_bytes) {
          const auto fields = half_fields(t);
          const uint16_t d = f32_to_fp16(off % 3 ? 0.002f : -0.002f), m = f32_to_fp16(0.01f);
          std::memcpy(&data[off + fields[0]], &d, 2);
          if (fields.size() > 1) std::memcpy(&data[off + fields[1]], &m, 2);
        }
        const WeightView w{t, cols, rows, data.data()};
        for (int64_t n_tok : {1, 3}) {
          std::vector<float> x(n_tok * cols);
          for (int64_t j = 0; j < n_tok * cols; ++j) {
            const int64_t tok = j / cols;
            x[j] = tok == 0 ? 1.0f : tok == 1 ? -1.0f : (j % 2 ? 1.0f : -1.0f);
          }
          for (TokenKind kind : {TokenKind::decode, TokenKind::prompt}) {
            std::vector<float> y(rows * n_tok, NAN);
            matmul(w, x.data(), n_tok, y.data(), pool, kind);
            check_matmul(w, x, n_tok, y,
                         target + " extreme " + std::string(ti.name) + " pattern " + std::to_string(pattern) +
                             " n_tok " + std::to_string(n_tok) + (kind == TokenKind::prompt ? " prompt" : ""));
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

// Memory whose last byte is followed by an inaccessible page, so a kernel that reads even one
// byte past a weight matrix or an activation row crashes instead of silently using junk (ASan
// does not see masked or vector loads from intrinsics).
class GuardedBuffer {
 public:
  explicit GuardedBuffer(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    data_pages_ = (bytes + page - 1) / page * page;
    total_ = data_pages_ + page;
    base_ = static_cast<uint8_t*>(mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) throw std::runtime_error("mmap failed");
    if (mprotect(base_ + data_pages_, page, PROT_NONE) != 0) throw std::runtime_error("mprotect failed");
    begin_ = base_ + data_pages_ - bytes;
  }
  ~GuardedBuffer() { munmap(base_, total_); }
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  uint8_t* data() { return begin_; }

 private:
  uint8_t* base_;
  uint8_t* begin_;
  size_t data_pages_, total_;
};

TEST_F(SimdTargets, MatmulReadsNothingPastTheEnd) {
  ThreadPool pool(2);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(9);
    for (GgmlType t : kAllTypes) {
      // Block counts 1..9 cover every partial group of four; odd rows cover row tails.
      for (int64_t nb : {1, 2, 3, 4, 5, 6, 7, 9}) {
        for (int64_t n_tok : {1, 5}) {
          const int64_t rows = 7, cols = std::max<int64_t>(32, type_info(t).block_elems) * nb;
          const auto src = random_weights(t, rows, cols, rng);
          GuardedBuffer wbuf(src.size());
          std::memcpy(wbuf.data(), src.data(), src.size());
          const auto xs = random_activations(n_tok, cols, rng);
          GuardedBuffer xbuf(xs.size() * sizeof(float));
          std::memcpy(xbuf.data(), xs.data(), xs.size() * sizeof(float));
          const WeightView w{t, cols, rows, wbuf.data()};
          for (TokenKind kind : {TokenKind::decode, TokenKind::prompt}) {
            std::vector<float> y(rows * n_tok);
            matmul(w, reinterpret_cast<const float*>(xbuf.data()), n_tok, y.data(), pool, kind);
            check_matmul(w, xs, n_tok, y, target + " guarded " + std::string(type_info(t).name));
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

TEST_F(SimdTargets, NonFiniteActivationsAreSafe) {
  // Garbage in, garbage out, but no crash or UB (UBSan checks the float->int conversions).
  ThreadPool pool(2);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    std::mt19937 rng(11);
    for (GgmlType t : kAllTypes) {
      const int64_t rows = 5, cols = type_info(t).block_elems == 256 ? 512 : 96, n_tok = 3;
      const auto data = random_weights(t, rows, cols, rng);
      std::vector<float> x(n_tok * cols, 1.0f);
      x[3] = NAN;
      x[40] = INFINITY;
      x[cols + 7] = -INFINITY;
      x[2 * cols + 9] = 3e38f;
      x[2 * cols + 70] = 1e-45f;
      std::vector<float> y(rows * n_tok);
      matmul(WeightView{t, cols, rows, data.data()}, x.data(), n_tok, y.data(), pool);
      matmul(WeightView{t, cols, rows, data.data()}, x.data(), n_tok, y.data(), pool, TokenKind::prompt);
    }
  }
}

// The AMX prompt engine (TokenKind::prompt on CPUs with AMX): the reference check at shapes
// around its 16 x 16 tiles (partial token tiles, partial row panels, odd block counts), every
// thread count bit-identical, and each token's row independent of how many tokens share the
// product and of the token's place in its tile.
class AmxPrompt : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!amx_prompt_engine())
      GTEST_SKIP() << "AMX prompt engine not active here (no AMX-INT8, the OS refused the tile state, "
                      "QF_AMX=0 or a SIMD target below avx512vnni): nothing to test";
  }
};

const GgmlType kAmxTypes[] = {GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0,
                              GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::IQ4_NL};

TEST_F(AmxPrompt, MatchesReferenceAroundTileEdges) {
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  std::mt19937 rng(5);
  const Shape shapes[] = {{16, 64, 16}, {17, 32, 15}, {31, 96, 17}, {33, 160, 40}, {48, 640, 33},
                          {5, 2048, 7},  {64, 608, 1}, {15, 224, 31}, {100, 320, 64}};
  for (GgmlType t : kAmxTypes) {
    for (const Shape& s : shapes) {
      const auto data = random_weights(t, s.rows, s.cols, rng);
      const WeightView w{t, s.cols, s.rows, data.data()};
      const auto x = random_activations(s.n_tok, s.cols, rng);
      const std::string what = "amx " + std::string(type_info(t).name) + " " + std::to_string(s.rows) + "x" +
                               std::to_string(s.cols) + " n_tok " + std::to_string(s.n_tok);
      std::vector<float> first;
      for (ThreadPool& pool : pools) {
        std::vector<float> y(s.rows * s.n_tok, NAN);
        matmul(w, x.data(), s.n_tok, y.data(), pool, TokenKind::prompt);
        if (first.empty()) {
          first = y;
          check_matmul(w, x, s.n_tok, y, what);
          if (HasFatalFailure()) return;
        } else {
          ASSERT_EQ(0, std::memcmp(first.data(), y.data(), y.size() * sizeof(float)))
              << what << " differs with " << pool.size() << " threads";
        }
      }
    }
  }
}

TEST_F(AmxPrompt, TokenRowsIndependentOfTokenCountAndPlace) {
  ThreadPool pool(2);
  std::mt19937 rng(6);
  constexpr int64_t kTok = 40, rows = 37, cols = 352;  // 11 blocks: an odd count
  for (GgmlType t : kAmxTypes) {
    const auto data = random_weights(t, rows, cols, rng);
    const WeightView w{t, cols, rows, data.data()};
    const auto x = random_activations(kTok, cols, rng);
    std::vector<float> all(rows * kTok);
    matmul(w, x.data(), kTok, all.data(), pool, TokenKind::prompt);
    for (int64_t n = 1; n <= kTok; ++n) {
      for (int64_t first : {int64_t{0}, kTok - n, (kTok - n) / 2}) {  // the token's place in a tile moves
        std::vector<float> y(rows * n);
        matmul(w, x.data() + first * cols, n, y.data(), pool, TokenKind::prompt);
        ASSERT_EQ(0, std::memcmp(y.data(), all.data() + first * rows, y.size() * sizeof(float)))
            << type_info(t).name << ": tokens [" << first << ", " << first + n << ") differ from the same tokens among "
            << kTok;
      }
    }
  }
}

// Weights in the panel layout (to_panels): every token count, either kind and every thread
// count give each (row, token) the numbers the AMX engine gives the rows layout, bit for bit,
// so a session's decode steps are the same alone, batched or as a prompt; the VNNI path (up to 2
// tokens) and the tiles both run here. dequantize_row reads the panels back exactly.
TEST_F(AmxPrompt, PanelLayoutGivesTheTilesNumbers) {
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  std::mt19937 rng(15);
  const std::pair<int64_t, int64_t> shapes[] = {{16, 64}, {48, 96}, {64, 352}, {32, 608}, {144, 32}};
  for (GgmlType t : kAmxTypes) {
    for (const auto& [rows, cols] : shapes) {
      auto data = random_weights(t, rows, cols, rng);
      const WeightView natural{t, cols, rows, data.data()};
      std::vector<uint8_t> panel_bytes = data;
      WeightView panels{t, cols, rows, panel_bytes.data()};
      ASSERT_TRUE(panels_supported(panels));
      to_panels(panels, panel_bytes.data());
      ASSERT_EQ(panels.layout, WeightLayout::panels16);
      ASSERT_NE(0, std::memcmp(data.data(), panel_bytes.data(), data.size()));
      std::vector<float> want(cols), got(cols);
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(natural, r, want.data());
        dequantize_row(panels, r, got.data());
        ASSERT_EQ(0, std::memcmp(want.data(), got.data(), cols * sizeof(float))) << type_info(t).name << " row " << r;
      }
      constexpr int64_t kTok = 33;
      const auto x = random_activations(kTok, cols, rng);
      std::vector<float> all(rows * kTok);
      matmul(natural, x.data(), kTok, all.data(), pools[1], TokenKind::prompt);
      check_matmul(natural, x, kTok, all, "amx rows layout");
      if (HasFatalFailure()) return;
      for (int64_t n : {1, 2, 3, 4, 5, 6, 16, 17, 33}) {
        for (TokenKind kind : {TokenKind::decode, TokenKind::prompt}) {
          for (ThreadPool& pool : pools) {
            const int64_t first = (kTok - n) / 2;
            std::vector<float> y(rows * n, NAN);
            matmul(panels, x.data() + first * cols, n, y.data(), pool, kind);
            ASSERT_EQ(0, std::memcmp(y.data(), all.data() + first * rows, y.size() * sizeof(float)))
                << type_info(t).name << " " << rows << "x" << cols << ": " << n << " tokens, "
                << (kind == TokenKind::decode ? "decode" : "prompt") << ", " << pool.size()
                << " threads differ from the rows layout on the AMX engine";
          }
        }
      }
    }
  }
}

TEST_F(AmxPrompt, PanelsShareTheirInputBitForBit) {
  ThreadPool pool(2);
  std::mt19937 rng(16);
  constexpr int64_t cols = 576;
  for (GgmlType t : {GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0}) {
    std::vector<std::vector<uint8_t>> bytes;
    std::vector<WeightView> ws;
    for (int64_t rows : {48, 16, 192}) {
      bytes.push_back(random_weights(t, rows, cols, rng));
      ws.push_back(WeightView{t, cols, rows, bytes.back().data()});
    }
    for (size_t i = 0; i < ws.size(); ++i) to_panels(ws[i], bytes[i].data());
    for (int64_t n : {1, 3, 16}) {
      const auto x = random_activations(n, cols, rng);
      std::vector<std::vector<float>> shared(ws.size()), alone(ws.size());
      std::vector<float*> ys;
      for (size_t i = 0; i < ws.size(); ++i) {
        shared[i].assign(ws[i].rows * n, NAN);
        alone[i].assign(ws[i].rows * n, NAN);
        ys.push_back(shared[i].data());
        matmul(ws[i], x.data(), n, alone[i].data(), pool);
      }
      matmul_shared_input(ws, x.data(), n, ys, pool);
      for (size_t i = 0; i < ws.size(); ++i)
        ASSERT_EQ(0, std::memcmp(shared[i].data(), alone[i].data(), alone[i].size() * sizeof(float)))
            << type_info(t).name << " matrix " << i << ", " << n << " tokens";
    }
  }
}

TEST_F(AmxPrompt, PanelLayoutRefusesWhatItCannotHold) {
  std::mt19937 rng(17);
  auto odd = random_weights(GgmlType::Q4_1, 24, 64, rng);
  WeightView w{GgmlType::Q4_1, 64, 24, odd.data()};
  EXPECT_FALSE(panels_supported(w));  // 24 rows: not whole panels
  EXPECT_THROW(to_panels(w, odd.data()), Error);
  auto k = random_weights(GgmlType::Q4_K, 16, 256, rng);
  WeightView kw{GgmlType::Q4_K, 256, 16, k.data()};
  EXPECT_FALSE(panels_supported(kw));
  EXPECT_THROW(to_panels(kw, k.data()), Error);
  auto ok = random_weights(GgmlType::Q8_0, 16, 64, rng);
  WeightView p{GgmlType::Q8_0, 64, 16, ok.data()};
  to_panels(p, ok.data());
  EXPECT_FALSE(panels_supported(p));  // already converted
  EXPECT_THROW(to_panels(p, ok.data()), Error);
}

TEST(PanelLayout, OnlyWhereTheAmxEngineRuns) {
  std::mt19937 rng(18);
  auto bytes = random_weights(GgmlType::Q4_1, 16, 64, rng);
  const WeightView w{GgmlType::Q4_1, 64, 16, bytes.data()};
  EXPECT_EQ(panels_supported(w), amx_prompt_engine());
  ASSERT_TRUE(force_simd_target("avx2"));
  EXPECT_FALSE(panels_supported(w));
  ASSERT_TRUE(force_simd_target("best"));
}

// Capping the SIMD target below AVX3_DL turns the AMX engine off (prompt = decode there).
TEST_F(AmxPrompt, OffBelowAvx512Vnni) {
  ASSERT_TRUE(force_simd_target("avx512"));
  EXPECT_FALSE(amx_prompt_engine());
  ASSERT_TRUE(force_simd_target("best"));
  EXPECT_TRUE(amx_prompt_engine());
}

TEST(SimdEnv, AmxEnvironmentVariable) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        setenv("QF_AMX", "0", 1);
        std::fprintf(stderr, "amx=%d\n", static_cast<int>(amx_prompt_engine()));
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "amx=0");
  EXPECT_EXIT(
      {
        setenv("QF_AMX", "yes", 1);
        try {
          amx_prompt_engine();
        } catch (const Error& e) {
          std::fprintf(stderr, "%s\n", e.what());
          std::exit(3);
        }
        std::exit(0);
      },
      ::testing::ExitedWithCode(3), "QF_AMX=yes");
}

TEST(SimdEnv, EnvironmentVariableForcesTarget) {
  // Each statement runs in a fresh process, where the first kernel call reads QF_SIMD_TARGET.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        setenv("QF_SIMD_TARGET", "scalar", 1);
        std::fprintf(stderr, "target=%s\n", simd_target_name().c_str());
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "target=(SCALAR|EMU128)");
  EXPECT_EXIT(
      {
        setenv("QF_SIMD_TARGET", "bogus", 1);
        try {
          simd_target_name();
        } catch (const Error& e) {
          std::fprintf(stderr, "%s\n", e.what());
          std::exit(3);
        }
        std::exit(0);
      },
      ::testing::ExitedWithCode(3), "QF_SIMD_TARGET=bogus");
}

TEST(Matmul, RejectsBadInput) {
  ThreadPool pool(1);
  std::vector<uint8_t> data(34 * 4);
  std::vector<float> x(64), y(4);
  EXPECT_THROW(matmul(WeightView{GgmlType::IQ2_XXS, 256, 1, data.data()}, x.data(), 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_1, 64, 1, data.data()}, x.data(), 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_0, 48, 2, data.data()}, x.data(), 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_0, 0, 2, data.data()}, x.data(), 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_0, 64, -1, data.data()}, x.data(), 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_0, 64, 2, nullptr}, x.data(), 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{GgmlType::Q8_0, 64, 2, data.data()}, nullptr, 1, y.data(), pool), Error);
  EXPECT_THROW(matmul(WeightView{static_cast<GgmlType>(99), 64, 2, data.data()}, x.data(), 1, y.data(), pool), Error);
  // Empty products are no-ops, even with null buffers.
  EXPECT_NO_THROW(matmul(WeightView{GgmlType::Q8_0, 64, 2, data.data()}, nullptr, 0, nullptr, pool));
  EXPECT_NO_THROW(matmul(WeightView{GgmlType::Q8_0, 64, 0, nullptr}, nullptr, 3, nullptr, pool));
}

// ---------------------------------------------------------------------------------------------
// Float vector ops

TEST_F(SimdTargets, VectorOps) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (size_t n : {0, 1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 576, 1001}) {
      // Guard elements past n catch writes beyond the end.
      std::vector<float> a(n + 4), b(n + 4), y(n + 4);
      for (auto& v : a) v = normal(rng);
      for (auto& v : b) v = normal(rng);
      double ref = 0, mag = 0;
      for (size_t i = 0; i < n; ++i) {
        ref += static_cast<double>(a[i]) * b[i];
        mag += std::fabs(static_cast<double>(a[i]) * b[i]);
      }
      EXPECT_NEAR(dot_f32(a.data(), b.data(), n), ref, 1e-6 * mag + 1e-30) << target << " n " << n;

      y = b;
      axpy_f32(0.75f, a.data(), y.data(), n);
      for (size_t i = 0; i < n + 4; ++i) {
        const float want = i < n ? std::fma(0.75f, a[i], b[i]) : b[i];
        ASSERT_NEAR(y[i], want, 1e-6f * (std::fabs(want) + std::fabs(a[i]))) << target << " axpy n " << n << " i " << i;
      }
      y = b;
      scale_f32(y.data(), -1.5f, n);
      for (size_t i = 0; i < n + 4; ++i) ASSERT_EQ(y[i], i < n ? b[i] * -1.5f : b[i]) << target << " scale n " << n;
    }
  }
}

// project_rows_f32: every (row, vector) pair against a double dot product, within float rounding
// of its terms; block remainders (rows not a multiple of the lanes, dims not a multiple of the
// lanes) and the head dimensions compiled for (64, 128, 256) included, and nothing written outside
// the n_x runs of n_rows outputs.
TEST_F(SimdTargets, ProjectRowsAreTheDotProductsOfEveryPair) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (const auto& [rows, d, nx] : std::vector<std::tuple<size_t, size_t, size_t>>{
             {1, 64, 1}, {7, 64, 3}, {16, 64, 3}, {33, 64, 3}, {20, 128, 2}, {18, 256, 3}, {64, 8, 4}, {5, 33, 2},
             {17, 1, 2}, {40, 100, 1}}) {
      const size_t stride = rows + 3;
      std::vector<float> a(rows * d), x(nx * d), out(nx * stride, -7.0f);
      for (auto& v : a) v = normal(rng);
      for (auto& v : x) v = normal(rng);
      project_rows_f32(a.data(), rows, d, x.data(), nx, out.data(), stride);
      for (size_t g = 0; g < nx; ++g) {
        for (size_t j = 0; j < rows; ++j) {
          double dot = 0, magnitude = 0;
          for (size_t i = 0; i < d; ++i) {
            dot += static_cast<double>(a[j * d + i]) * x[g * d + i];
            magnitude += std::abs(static_cast<double>(a[j * d + i]) * x[g * d + i]);
          }
          ASSERT_NEAR(out[g * stride + j], dot, 1e-6 * magnitude + 1e-30) << target << " row " << j << " g " << g;
        }
        for (size_t j = rows; j < stride; ++j) ASSERT_EQ(out[g * stride + j], -7.0f) << target << " past row " << j;
      }
    }
  }
  EXPECT_THROW(project_rows_f32(nullptr, 4, 8, nullptr, 1, nullptr, 3), Error);  // stride below the rows
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels of the forward pass, against double-precision formulas

// 0.5 x (1 + tanh(u)) written as x / (1 + exp(-2u)): the same function, but 1 + tanh(u) cancels
// to 0 in double for u < -19 while the true value is still ~x exp(2u).
double ref_gelu_tanh(double x) {
  const double u = std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
  return x / (1.0 + std::exp(-2.0 * u));
}
double ref_silu(double x) { return x / (1.0 + std::exp(-x)); }

// Inputs covering the activations' regimes: around 0, the bend, the saturated tails, overflow of
// x^3 and exp, and n values that leave vector tails.
std::vector<float> activation_inputs(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const float special[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 0.5f, -0.5f, 5.0f, -5.0f, 10.0f, -10.0f, 30.0f, -30.0f,
                           88.0f, -88.0f, 1e6f, -1e6f, 3e13f, -3e13f, 3.4e38f, -3.4e38f};
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = i < std::size(special) ? special[i] : normal(rng);
  return x;
}

TEST_F(SimdTargets, ElementwiseKernelsMatchDoubleFormulas) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> pos(0.5f, 2.0f);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (size_t n : {0, 1, 5, 16, 17, 33, 256, 640, 1001}) {
      const std::vector<float> x = activation_inputs(n + 4, rng), up = activation_inputs(n + 4, rng);
      // Guard elements past n catch writes beyond the end.
      for (int act = 0; act < 2; ++act) {
        std::vector<float> y = x;
        if (act == 0) gelu_tanh_mul_f32(y.data(), up.data(), n);
        else silu_mul_f32(y.data(), up.data(), n);
        for (size_t i = 0; i < n + 4; ++i) {
          if (i >= n) {
            ASSERT_EQ(y[i], x[i]) << target << " wrote past n " << n;
            continue;
          }
          const double a = act == 0 ? ref_gelu_tanh(x[i]) : ref_silu(x[i]);
          const double want = a * up[i];
          if (!(std::fabs(want) <= FLT_MAX)) continue;  // the product itself overflows float
          // A few ulps of the value, or of x * up where the activation is a vanishing tail
          // (x << 0: exp of a float argument of up to 88 carries ~1e-5 relative error there,
          // still far below the scalar 1 + tanh(u) form, which cancels to 0).
          const double tol = 2e-6 * std::fabs(want) + 1e-7 * std::fabs(static_cast<double>(x[i]) * up[i]) + 1e-37;
          ASSERT_NEAR(y[i], want, tol) << target << (act ? " silu" : " gelu") << " x " << x[i] << " up " << up[i];
        }
      }
      // Soft-capping (Gemma 2's final logits), cap 30.
      std::vector<float> y = x;
      softcap_f32(y.data(), n, 30.0f);
      for (size_t i = 0; i < n + 4; ++i) {
        const double want = i < n ? 30.0 * std::tanh(x[i] / 30.0) : x[i];
        ASSERT_NEAR(y[i], want, 4e-6 * std::fabs(want) + 1e-37) << target << " softcap x " << x[i];
      }
      // RMS norm, into another buffer and in place.
      std::vector<float> w(n + 4), r(n + 4);
      for (auto& v : w) v = pos(rng);
      for (size_t i = 0; i < n + 4; ++i) r[i] = x[i] / (i < 20 ? 1e30f : 1.0f);  // no overflow in x^2
      double ss = 0;
      for (size_t i = 0; i < n; ++i) ss += static_cast<double>(r[i]) * r[i];
      const double inv = n ? 1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-6) : 0.0;
      std::vector<float> out(n + 4, -7.0f), inplace = r;
      rmsnorm_f32(out.data(), r.data(), w.data(), n, 1e-6f);
      rmsnorm_f32(inplace.data(), inplace.data(), w.data(), n, 1e-6f);
      for (size_t i = 0; i < n + 4; ++i) {
        if (i >= n) {
          ASSERT_EQ(out[i], -7.0f);
          ASSERT_EQ(inplace[i], r[i]);
          continue;
        }
        const double want = r[i] * inv * w[i];
        ASSERT_NEAR(out[i], want, 1e-6 * std::fabs(want) + 1e-30) << target << " rmsnorm n " << n << " i " << i;
        ASSERT_EQ(inplace[i], out[i]) << target << " in place";
      }
    }
    // NaN stays NaN (a corrupted activation must not turn into a plausible number).
    std::vector<float> nan{NAN, 1.0f, NAN}, one{1.0f, NAN, 1.0f};
    gelu_tanh_mul_f32(nan.data(), one.data(), 3);
    EXPECT_TRUE(std::isnan(nan[0]) && std::isnan(nan[1]) && std::isnan(nan[2])) << target;
  }
}

// argmax_f32 is std::max_element on every target: first of tied maxima, -0 and +0 tied, NaNs
// skipped except at index 0, infinities, and the maximum in the vector body or the tail.
TEST_F(SimdTargets, ArgmaxMatchesMaxElement) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> pick(0, 9);
  const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 3.0f, -3.0f};
  std::vector<std::vector<float>> cases;
  for (size_t n : {1, 2, 15, 16, 17, 31, 32, 33, 100, 262144 + 7}) {
    for (int variant = 0; variant < 6; ++variant) {
      std::vector<float> x(n);
      for (float& v : x) v = std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng);
      if (variant == 1) for (float& v : x) v = static_cast<float>(pick(rng) % 3);  // many ties
      if (variant == 2) for (float& v : x) if (pick(rng) < 4) v = specials[pick(rng) % std::size(specials)];
      if (variant == 3) x[0] = NAN;
      if (variant == 4) for (float& v : x) v = pick(rng) < 5 ? -0.0f : 0.0f;
      if (variant == 5) for (float& v : x) v = pick(rng) < 8 ? NAN : -INFINITY;
      cases.push_back(std::move(x));
    }
  }
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    EXPECT_EQ(argmax_f32(nullptr, 0), 0u);
    for (const std::vector<float>& x : cases) {
      const size_t want = static_cast<size_t>(std::max_element(x.begin(), x.end()) - x.begin());
      ASSERT_EQ(argmax_f32(x.data(), x.size()), want) << target << " n " << x.size();
    }
    for (size_t at : {size_t{0}, size_t{5}, size_t{16}, size_t{262143}}) {  // a unique max anywhere
      std::vector<float> x(262144, -1.0f);
      x[at] = 2.0f;
      ASSERT_EQ(argmax_f32(x.data(), x.size()), at) << target;
    }
  }
}

// The row conversion an f16 KV cache stores with equals the scalar f32_to_fp16 bit for bit on
// every target: halves' rounding boundaries, subnormals, overflow, infinities, NaN payloads.
TEST_F(SimdTargets, Fp16RowConversionMatchesScalar) {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x7F800000u, 0xFF800000u, 0x7FC00000u, 0xFFC00001u,
                                0x7F800001u, 0x7FBFFFFFu, 0xFFFFFFFFu, 0x477FE000u, 0x477FEFFFu, 0x477FF000u,
                                0x33000000u, 0x33000001u, 0x337FFFFFu, 0x38800000u, 0x387FFFFFu, 0x00000001u};
  for (uint32_t h = 0; h < 0x7C00u; h += 37) {  // around every 37th half: the value, its ties, +-1 ulp
    const uint32_t f = std::bit_cast<uint32_t>(fp16_to_f32(static_cast<uint16_t>(h)));
    for (uint32_t b : {f, f - 1, f + 1, f + 0x1000u, f + 0xFFFu, f + 0x1001u}) bits.push_back(b);
  }
  std::mt19937 rng(21);
  for (int i = 0; i < 200000; ++i) bits.push_back(static_cast<uint32_t>(rng()));
  std::vector<float> x(bits.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::bit_cast<float>(bits[i]);
  for (const std::string& target : available_simd_targets()) {
    ASSERT_TRUE(force_simd_target(target));
    for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{13}, size_t{256}, x.size()}) {
      std::vector<uint8_t> out(2 * n + 4, 0xA5);  // guard bytes catch writes past n
      f32_to_fp16_row(x.data(), n, out.data());
      for (size_t i = 0; i < n; ++i)
        ASSERT_EQ(rd16(out.data() + 2 * i), f32_to_fp16(x[i])) << target << " bits 0x" << std::hex << bits[i];
      for (size_t i = 2 * n; i < out.size(); ++i) ASSERT_EQ(out[i], 0xA5) << target << " wrote past n " << n;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Thread pool

TEST(ThreadPool, RunCoversEveryThreadOnceRepeatedly) {
  for (int n = 1; n <= 5; ++n) {
    ThreadPool pool(n);
    ASSERT_EQ(pool.size(), n);
    std::vector<std::atomic<int>> hits(n);
    const int reps = n <= 2 ? 2000 : 200;  // more threads than cores: a run may wait on the OS
    for (int rep = 0; rep < reps; ++rep) {
      pool.run([&](int i, int total) {
        EXPECT_EQ(total, n);
        hits[i].fetch_add(1, std::memory_order_relaxed);
      });
    }
    for (int i = 0; i < n; ++i) EXPECT_EQ(hits[i].load(), reps) << n << " threads, thread " << i;
  }
}

TEST(ThreadPool, ParallelForCoversEveryIndexOnce) {
  for (int n = 1; n <= 5; ++n) {
    ThreadPool pool(n);
    for (int64_t items : {0, 1, 2, 3, 4, 5, 7, 64, 1000, 4097}) {
      for (int64_t grain : {1, 3, 100}) {
        std::vector<std::atomic<int>> hits(items);
        pool.parallel_for(items, grain, [&](int64_t b, int64_t e) {
          EXPECT_LE(0, b);
          EXPECT_LT(b, e);
          EXPECT_LE(e, items);
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
        });
        for (int64_t i = 0; i < items; ++i) ASSERT_EQ(hits[i].load(), 1) << n << " threads, " << items << " items";
      }
    }
  }
}

TEST(ThreadPool, ExceptionOnCallingThreadWaitsForWorkers) {
  ThreadPool pool(3);
  std::atomic<int> finished{0};
  for (int rep = 0; rep < 20; ++rep) {
    EXPECT_THROW(pool.run([&](int i, int) {
      if (i == 0) throw Error("boom");
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      finished.fetch_add(1);
    }),
                 Error);
    EXPECT_EQ(finished.load(), 2 * (rep + 1));  // both workers were done before run() threw
  }
  std::atomic<int> calls{0};
  pool.run([&](int, int) { calls.fetch_add(1); });  // still usable
  EXPECT_EQ(calls.load(), 3);
}

TEST(ThreadPool, WakesSleepingWorkersAndShutsDown) {
  // Let the workers pass their spin phase and block, then wake them; then destroy idle pools.
  for (int n = 2; n <= 4; ++n) {
    ThreadPool pool(n);
    std::atomic<int> calls{0};
    for (int rep = 0; rep < 3; ++rep) {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      pool.run([&](int, int) { calls.fetch_add(1); });
    }
    EXPECT_EQ(calls.load(), 3 * n);
  }
  for (int rep = 0; rep < 20; ++rep) ThreadPool idle(3);  // destroyed right after start
}

}  // namespace
}  // namespace qf
