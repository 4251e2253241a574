// Block codecs: how each quantized weight type's block decodes to small integers and scales.
// One `Codec<type>` per quantized type; row dequantization (kernels.cpp) and the portable matmul
// engines (matmul.cpp) are both written once over these, so a new type is a new codec plus its
// row in types.cpp.
//
// Two decoded shapes cover every supported type (layouts as ggml's, little-endian):
//   Decoded32  (32-element blocks)      w[i] = d * q[i] + m          (m = 0 unless kHasMin)
//   DecodedK   (256-element super-block) w[i] = (d * sc[g]) * q[i] - (dmin * mn[g]),  g = i / 16
// The float expressions are the ones gguf-py's numpy dequantizers evaluate, in the same order,
// so dequantization is bit-exact with gguf.quants (tests/python/test_quants.py).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "tensor/types.h"

namespace qf {

float fp16_to_f32(uint16_t h);  // kernels.h

namespace blocks {

constexpr int kQK_K = 256;  // elements per K-quant super-block
constexpr int kGroup = 16;   // elements per scale group in DecodedK

inline uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline float half_at(const uint8_t* p) { return fp16_to_f32(rd16(p)); }

struct Decoded32 {
  int8_t q[32];
  float d, m;
};

struct DecodedK {
  int8_t q[kQK_K];
  int8_t sc[kQK_K / kGroup];  // per 16 elements (32-element sub-blocks repeat theirs twice)
  int8_t mn[kQK_K / kGroup];  // subtracted mins, 0 for types without
  float d, dmin;
};

template <GgmlType>
struct Codec;

// ---- 32-element blocks (paired with the 8-bit activation blocks of 32) ----------------------

// Element j < 16 is the low nibble of qs[j], element j + 16 its high nibble.
inline void unpack_nibbles(const uint8_t* qs, int8_t* q, int offset) {
  for (int j = 0; j < 16; ++j) {
    q[j] = static_cast<int8_t>((qs[j] & 0xF) + offset);
    q[j + 16] = static_cast<int8_t>((qs[j] >> 4) + offset);
  }
}

// Q5: bit j of the 32-bit qh is the fifth bit of element j.
inline void add_fifth_bits(const uint8_t* qh_bytes, int8_t* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(q[j] + static_cast<int>(((qh >> j) & 1u) << 4));
}

template <>
struct Codec<GgmlType::Q4_0> {  // d, qs[16]: w = d * (nibble - 8)
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 18;
  static constexpr bool kHasMin = false;
  using Decoded = Decoded32;
  static void decode(const uint8_t* p, Decoded32& o) {
    o.d = half_at(p);
    o.m = 0.0f;
    unpack_nibbles(p + 2, o.q, -8);
  }
};

template <>
struct Codec<GgmlType::Q4_1> {  // d, m, qs[16]: w = d * nibble + m
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 20;
  static constexpr bool kHasMin = true;
  using Decoded = Decoded32;
  static void decode(const uint8_t* p, Decoded32& o) {
    o.d = half_at(p);
    o.m = half_at(p + 2);
    unpack_nibbles(p + 4, o.q, 0);
  }
};

template <>
struct Codec<GgmlType::Q5_0> {  // d, qh[4], qs[16]: w = d * (5-bit q - 16)
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 22;
  static constexpr bool kHasMin = false;
  using Decoded = Decoded32;
  static void decode(const uint8_t* p, Decoded32& o) {
    o.d = half_at(p);
    o.m = 0.0f;
    unpack_nibbles(p + 6, o.q, 0);
    add_fifth_bits(p + 2, o.q);
    for (int8_t& q : o.q) q = static_cast<int8_t>(q - 16);
  }
};

template <>
struct Codec<GgmlType::Q5_1> {  // d, m, qh[4], qs[16]: w = d * 5-bit q + m
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 24;
  static constexpr bool kHasMin = true;
  using Decoded = Decoded32;
  static void decode(const uint8_t* p, Decoded32& o) {
    o.d = half_at(p);
    o.m = half_at(p + 2);
    unpack_nibbles(p + 8, o.q, 0);
    add_fifth_bits(p + 4, o.q);
  }
};

template <>
struct Codec<GgmlType::Q8_0> {  // d, qs[32]: w = d * q
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 34;
  static constexpr bool kHasMin = false;
  using Decoded = Decoded32;
  static void decode(const uint8_t* p, Decoded32& o) {
    o.d = half_at(p);
    o.m = 0.0f;
    std::memcpy(o.q, p + 2, 32);
  }
};

// IQ4_NL's non-linear 4-bit grid (a format constant of ggml's IQ4_NL).
inline constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

template <>
struct Codec<GgmlType::IQ4_NL> {  // d, qs[16]: w = d * grid[nibble]
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 18;
  static constexpr bool kHasMin = false;
  using Decoded = Decoded32;
  static void decode(const uint8_t* p, Decoded32& o) {
    o.d = half_at(p);
    o.m = 0.0f;
    for (int j = 0; j < 16; ++j) {
      o.q[j] = kIq4nlValues[p[2 + j] & 0xF];
      o.q[j + 16] = kIq4nlValues[p[2 + j] >> 4];
    }
  }
};

// ---- K-quants: 256-element super-blocks (paired with the 8-bit activation super-blocks) -----
// Each K codec also exposes scales() (the 16 group scales and mins alone, for SIMD engines that
// unpack the quants themselves) and kOffset: its quants are stored as q + kOffset >= 0.

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes. Sub-block j < 4 keeps its low 6
// bits in bytes j (scale) and j + 4 (min); j >= 4 keeps the low 4 in byte j + 4 and the top 2 in
// the spare top bits of bytes j - 4 (scale) and j (min).
inline void unpack_scale_min_k4(const uint8_t* s, int8_t* sc16, int8_t* mn16) {
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    if (j < 4) {
      sc = s[j] & 63;
      mn = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    sc16[2 * j] = sc16[2 * j + 1] = static_cast<int8_t>(sc);
    mn16[2 * j] = mn16[2 * j + 1] = static_cast<int8_t>(mn);
  }
}

template <>
struct Codec<GgmlType::Q2_K> {  // scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin
  static constexpr int kElems = kQK_K;
  static constexpr size_t kBytes = 84;
  static constexpr bool kHasMin = true;
  static constexpr int kOffset = 0;
  using Decoded = DecodedK;
  static void scales(const uint8_t* p, int8_t* sc, int8_t* mn) {
    for (int g = 0; g < 16; ++g) {
      sc[g] = static_cast<int8_t>(p[g] & 0xF);
      mn[g] = static_cast<int8_t>(p[g] >> 4);
    }
  }
  static void decode(const uint8_t* p, DecodedK& o) {
    scales(p, o.sc, o.mn);
    // Each 128-element half uses 32 bytes; element i of it is 2-bit field i / 32 of byte i % 32.
    for (int i = 0; i < kQK_K; ++i) {
      const int half = i / 128, k = i % 128;
      o.q[i] = static_cast<int8_t>((p[16 + 32 * half + k % 32] >> (2 * (k / 32))) & 3);
    }
    o.d = half_at(p + 80);
    o.dmin = half_at(p + 82);
  }
};

template <>
struct Codec<GgmlType::Q3_K> {  // hmask[32], qs[64], scales[12] (16 x 6-bit, offset 32), d
  static constexpr int kElems = kQK_K;
  static constexpr size_t kBytes = 110;
  static constexpr bool kHasMin = false;
  static constexpr int kOffset = 4;
  using Decoded = DecodedK;
  // Scale g: low 4 bits in byte g % 8 (low nibble for g < 8), top 2 bits in byte 8 + g % 4 at
  // bit 2 * (g / 4); stored + 32.
  static void scales(const uint8_t* p, int8_t* sc, int8_t* mn) {
    const uint8_t* s = p + 96;
    for (int g = 0; g < 16; ++g) {
      const int lo = (g < 8 ? s[g] : s[g - 8] >> 4) & 0xF;
      const int hi = (s[8 + g % 4] >> (2 * (g / 4))) & 3;
      sc[g] = static_cast<int8_t>((lo | (hi << 4)) - 32);
      mn[g] = 0;
    }
  }
  static void decode(const uint8_t* p, DecodedK& o) {
    const uint8_t* hmask = p;
    const uint8_t* qs = p + 32;
    scales(p, o.sc, o.mn);
    // Low 2 bits as in Q2_K; a clear bit i / 32 of hmask[i % 32] subtracts 4.
    for (int i = 0; i < kQK_K; ++i) {
      const int half = i / 128, k = i % 128;
      const int low = (qs[32 * half + k % 32] >> (2 * (k / 32))) & 3;
      const int high_clear = ((hmask[i % 32] >> (i / 32)) & 1) ^ 1;
      o.q[i] = static_cast<int8_t>(low - 4 * high_clear);
    }
    o.d = half_at(p + 108);
    o.dmin = 0.0f;
  }
};

template <>
struct Codec<GgmlType::Q4_K> {  // d, dmin, scales[12], qs[128]
  static constexpr int kElems = kQK_K;
  static constexpr size_t kBytes = 144;
  static constexpr bool kHasMin = true;
  static constexpr int kOffset = 0;
  using Decoded = DecodedK;
  static void scales(const uint8_t* p, int8_t* sc, int8_t* mn) { unpack_scale_min_k4(p + 4, sc, mn); }
  static void decode(const uint8_t* p, DecodedK& o) {
    o.d = half_at(p);
    o.dmin = half_at(p + 2);
    scales(p, o.sc, o.mn);
    // 64-element chunk c uses 32 bytes: low nibbles are its first 32 elements, high the rest.
    const uint8_t* qs = p + 16;
    for (int i = 0; i < kQK_K; ++i) {
      const int c = i / 64, k = i % 64;
      o.q[i] = static_cast<int8_t>((qs[32 * c + k % 32] >> (4 * (k / 32))) & 0xF);
    }
  }
};

template <>
struct Codec<GgmlType::Q5_K> {  // d, dmin, scales[12], qh[32], qs[128]
  static constexpr int kElems = kQK_K;
  static constexpr size_t kBytes = 176;
  static constexpr bool kHasMin = true;
  static constexpr int kOffset = 0;
  using Decoded = DecodedK;
  static void scales(const uint8_t* p, int8_t* sc, int8_t* mn) { unpack_scale_min_k4(p + 4, sc, mn); }
  static void decode(const uint8_t* p, DecodedK& o) {
    o.d = half_at(p);
    o.dmin = half_at(p + 2);
    scales(p, o.sc, o.mn);
    const uint8_t* qh = p + 16;
    const uint8_t* qs = p + 48;
    // Low 4 bits as in Q4_K; the fifth is bit i / 32 of qh[i % 32].
    for (int i = 0; i < kQK_K; ++i) {
      const int c = i / 64, k = i % 64;
      const int low = (qs[32 * c + k % 32] >> (4 * (k / 32))) & 0xF;
      o.q[i] = static_cast<int8_t>(low | (((qh[i % 32] >> (i / 32)) & 1) << 4));
    }
  }
};

template <>
struct Codec<GgmlType::Q6_K> {  // ql[128], qh[64], scales[16] (int8), d: w = d * sc * (q - 32)
  static constexpr int kElems = kQK_K;
  static constexpr size_t kBytes = 210;
  static constexpr bool kHasMin = false;
  static constexpr int kOffset = 32;
  using Decoded = DecodedK;
  static void scales(const uint8_t* p, int8_t* sc, int8_t* mn) {
    for (int g = 0; g < 16; ++g) {
      sc[g] = static_cast<int8_t>(p[192 + g]);
      mn[g] = 0;
    }
  }
  static void decode(const uint8_t* p, DecodedK& o) {
    const uint8_t* ql = p;
    const uint8_t* qh = p + 128;
    scales(p, o.sc, o.mn);
    // Each 128-element half uses 64 ql bytes (low nibbles: elements 0..63, high: 64..127) and
    // 32 qh bytes (element k's top 2 bits are field k / 32 of qh[k % 32]).
    for (int i = 0; i < kQK_K; ++i) {
      const int half = i / 128, k = i % 128;
      const int low = (ql[64 * half + k % 64] >> (4 * (k / 64))) & 0xF;
      const int high = (qh[32 * half + k % 32] >> (2 * (k / 32))) & 3;
      o.q[i] = static_cast<int8_t>((low | (high << 4)) - 32);
    }
    o.d = half_at(p + 208);
    o.dmin = 0.0f;
  }
};

// ---- Dequantization over decoded blocks ------------------------------------------------------

template <GgmlType TY>
void dequantize_blocks(const uint8_t* p, int64_t n, float* out) {
  using C = Codec<TY>;
  typename C::Decoded b;
  for (int64_t blk = 0; blk < n / C::kElems; ++blk, p += C::kBytes, out += C::kElems) {
    C::decode(p, b);
    if constexpr (C::kElems == 32) {
      for (int j = 0; j < 32; ++j) out[j] = C::kHasMin ? b.d * static_cast<float>(b.q[j]) + b.m : b.d * static_cast<float>(b.q[j]);
    } else {
      for (int j = 0; j < kQK_K; ++j) {
        const float dl = b.d * static_cast<float>(b.sc[j / kGroup]);
        const float q = static_cast<float>(b.q[j]);
        out[j] = C::kHasMin ? dl * q - b.dmin * static_cast<float>(b.mn[j / kGroup]) : dl * q;
      }
    }
  }
}

}  // namespace blocks
}  // namespace qf
