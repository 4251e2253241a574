// SIMD kernels: matmul over GGUF weights and the float vector ops, compiled once per target by
// Highway (foreach_target re-includes this file) and dispatched at run time.
//
// Quantized weights are multiplied with activations quantized to int8 in the format their row of
// the type table names (kernels.h): blocks of 32 for the 32-element types, super-blocks of 256
// (ggml's Q8_K) for the K-quants. Engines, best first (TypedMatmul picks one per type and target):
//   amx     (matmul_amx.cpp, outside Highway) the 32-element types for TokenKind::prompt rows
//           when the CPU and OS allow AMX and the target is AVX3_DL; matmul() picks it.
//   vnni    every 32-element type (Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/IQ4_NL) on AVX3_DL when the CPU
//           reports AVX512-VNNI: four blocks per 512-bit register, one block per 128-bit lane,
//           weights unpacked with vpermt2b, vpdpbusd.
//   x256    the 32-element types on AVX2 / AVX3: one block per 256-bit register,
//           vpmaddubsw + vpmaddwd.
//   x512K   K-quants on AVX3 / AVX3_DL: 64 quants per vpmaddubsw, group scales by vpmaddwd
//           (vpdpwssd with AVX512-VNNI), scales unpacked with integer tricks once per super-block.
//   x256K   K-quants on AVX2: vpmaddubsw + vpmaddwd on 32 quants.
//   generic every quantized type on the other targets (the portable path): plain C++ over the
//           block codecs of tensor/quant_blocks.h (GenericEngine for 32-blocks, GenericKEngine
//           for K-quants), correct on any CPU.
// Each engine provides Quantize (activation layout) and Tile<type, R, T>: R weight rows against T
// tokens, all columns, so each weight block is unpacked once per T tokens (prefill) and rows
// stream once (decode, T = 1).
#include "tensor/simd_config.h"  // first: fixes the Highway target set

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string_view>

#include "tensor/kernels.h"
#include "tensor/kernels_internal.h"
#include "tensor/matmul_amx.h"
#include "tensor/quant_blocks.h"
#include "tensor/target_pragmas.h"
#include "util/error.h"

#ifndef QF_TENSOR_MATMUL_ONCE_
#define QF_TENSOR_MATMUL_ONCE_
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace qf::detail {

// Highway's AVX3_DL check covers the OS (XCR0 ZMM state) and VBMI etc.; VNNI is checked here so
// the vpdpbusd engine never runs on a CPU without it.
inline bool cpu_has_avx512vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return ((c >> 11) & 1u) != 0;
  }();
  return has;
#else
  return false;
#endif
}

// Whether the CPU is an AMD one (cpuid vendor "AuthenticAMD"): its 512-bit integer dot products
// issue as two 256-bit halves, which favours squarer VNNI tiles (VnniSquareEngine).
inline bool cpu_is_amd() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool amd = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "Auth" "enti" "cAMD"
  }();
  return amd;
#else
  return false;
#endif
}

// -1: the default tile of batched products (vnni_square_tiles()), 0: 1x16, 1: 4x4.
inline int& vnni_tile_forced() {
  static int forced = -1;
  return forced;
}
bool vnni_square_tiles();

constexpr int64_t kQKi = kQK;
// Prefill processes weights in row blocks of about this many bytes, so a block stays in L2
// while every token tile passes over it.
constexpr size_t kRowBlockBytes = 512 * 1024;
// Quantize activations on all threads once there are this many elements.
constexpr int64_t kParallelQuantElems = 32 * 1024;
// Give each thread at least this many rows of a matmul.
constexpr int64_t kMinRowsPerThread = 16;

inline size_t round_up64(size_t n) { return (n + 63) / 64 * 64; }

// Arguments of one Tile call: R rows starting at w, T tokens starting at act; results go to
// y[t * ystride + r].
struct TileArgs {
  const uint8_t* w;
  size_t wrb;  // bytes per weight row
  int64_t nb;  // blocks per row
  const uint8_t* act;
  size_t astride;  // bytes per token of quantized activations
  float* y;
  int64_t ystride;
};

}  // namespace qf::detail
#endif  // QF_TENSOR_MATMUL_ONCE_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/matmul.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#undef QF_X86_SIMD
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
#include <immintrin.h>
#define QF_X86_SIMD 1
#else
#define QF_X86_SIMD 0
#endif

HWY_BEFORE_NAMESPACE();
namespace qf {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using detail::kQKi;
using detail::TileArgs;

int64_t TargetBit() { return HWY_TARGET; }

// =============================================================================================
// Float vector ops

// Two accumulators over the vectors of a and b, then one sum of lanes.
HWY_INLINE float Dot(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, size_t n) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(d, a + i + N), hn::LoadU(d, b + i + N), s1);
  }
  if (i + N <= n) {
    s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
    i += N;
  }
  if (i < n) {
    const auto m = hn::FirstN(d, n - i);
    s1 = hn::MulAdd(hn::MaskedLoad(m, d, a + i), hn::MaskedLoad(m, d, b + i), s1);
  }
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1)));
}

float DotF32(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, size_t n) { return Dot(a, b, n); }

#if HWY_TARGET != HWY_SCALAR
// Lane r of the result: the sum of the lanes of v[r], for the N = lanes vectors v[0..N), which it
// clobbers. log2 N rounds of adjacent-lane pair sums, the lower source's in the lower half: a
// lane each in order after the last round, with N - 1 shuffle pairs instead of N reductions.
template <class D, class V, size_t N>
HWY_INLINE V SumLanesOfEach(D d, V (&v)[N]) {
  for (size_t n = N; n > 1; n /= 2)
    for (size_t i = 0; i < n / 2; ++i)
      v[i] = hn::Add(hn::ConcatEven(d, v[2 * i + 1], v[2 * i]), hn::ConcatOdd(d, v[2 * i + 1], v[2 * i]));
  return v[0];
}

// out[g * out_stride + j] = <rows[j], x[g]> for the first n_blocks * lanes rows: a block of lanes
// rows against one vector at a time, their dot products summed together by SumLanesOfEach and
// stored as one vector. kD: the row length when known at compile time (the rows' offsets then fit
// in the loads' displacements instead of spilling lanes pointers), 0 for d.
template <size_t kD>
void ProjectBlocks(const float* HWY_RESTRICT rows, size_t n_blocks, size_t d, const float* HWY_RESTRICT x, size_t n_x,
                   float* HWY_RESTRICT out, size_t out_stride) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  constexpr size_t N = HWY_LANES(float);
  static_assert((N & (N - 1)) == 0, "lanes must be a power of two");
  const size_t dd = kD ? kD : d;
  V acc[N];
  for (size_t b = 0; b < n_blocks; ++b) {
    const float* block = rows + b * N * dd;
    for (size_t g = 0; g < n_x; ++g) {
      const float* xg = x + g * dd;
      for (size_t r = 0; r < N; ++r) acc[r] = hn::Zero(df);
      size_t i = 0;
      for (; i + N <= dd; i += N) {
        const V xv = hn::LoadU(df, xg + i);
        for (size_t r = 0; r < N; ++r) acc[r] = hn::MulAdd(hn::LoadU(df, block + r * dd + i), xv, acc[r]);
      }
      if (i < dd) {
        const auto tail = hn::FirstN(df, dd - i);
        const V xv = hn::MaskedLoad(tail, df, xg + i);
        for (size_t r = 0; r < N; ++r) acc[r] = hn::MulAdd(hn::MaskedLoad(tail, df, block + r * dd + i), xv, acc[r]);
      }
      hn::StoreU(SumLanesOfEach(df, acc), df, out + g * out_stride + b * N);
    }
  }
}

#endif  // HWY_TARGET != HWY_SCALAR

// out[g * out_stride + j] = <rows[j], x[g]>: whole blocks of lanes rows by ProjectBlocks (the
// usual head dimensions compiled for), the remaining rows (all, without SIMD) one dot product at
// a time.
void ProjectRowsF32(const float* HWY_RESTRICT rows, size_t n_rows, size_t d, const float* HWY_RESTRICT x, size_t n_x,
                    float* HWY_RESTRICT out, size_t out_stride) {
  size_t done = 0;
#if HWY_TARGET != HWY_SCALAR
  constexpr size_t N = HWY_LANES(float);
  const size_t n_blocks = n_rows / N;
  switch (d) {
    case 64: ProjectBlocks<64>(rows, n_blocks, d, x, n_x, out, out_stride); break;
    case 128: ProjectBlocks<128>(rows, n_blocks, d, x, n_x, out, out_stride); break;
    case 256: ProjectBlocks<256>(rows, n_blocks, d, x, n_x, out, out_stride); break;
    default: ProjectBlocks<0>(rows, n_blocks, d, x, n_x, out, out_stride);
  }
  done = n_blocks * N;
#endif
  for (size_t j = done; j < n_rows; ++j)
    for (size_t g = 0; g < n_x; ++g) out[g * out_stride + j] = Dot(rows + j * d, x + g * d, d);
}

void AxpyF32(float a, const float* HWY_RESTRICT x, float* HWY_RESTRICT y, size_t n) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto va = hn::Set(d, a);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::MulAdd(va, hn::LoadU(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  if (i < n) {
    const auto m = hn::FirstN(d, n - i);
    hn::BlendedStore(hn::MulAdd(va, hn::MaskedLoad(m, d, x + i), hn::MaskedLoad(m, d, y + i)), m, d, y + i);
  }
}

void ScaleF32(float* HWY_RESTRICT y, float a, size_t n) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto va = hn::Set(d, a);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(va, hn::LoadU(d, y + i)), d, y + i);
  if (i < n) {
    const auto m = hn::FirstN(d, n - i);
    hn::BlendedStore(hn::Mul(va, hn::MaskedLoad(m, d, y + i)), m, d, y + i);
  }
}

// =============================================================================================
// Row splitting shared by all matmuls: contiguous row ranges, multiples of `align` except the
// last, at most one per pool thread.

template <class Fn>
void SplitRows(ThreadPool& pool, int64_t rows, int64_t align, const Fn& fn) {
  const int64_t chunks =
      std::clamp<int64_t>(rows / detail::kMinRowsPerThread, 1, static_cast<int64_t>(pool.size()));
  if (chunks == 1) {
    fn(int64_t{0}, rows);
    return;
  }
  struct Ctx {
    const Fn* fn;
    int64_t rows, align, chunks;
  } ctx{&fn, rows, align, chunks};
  const Ctx* c = &ctx;  // one pointer captured: std::function stores it without allocating
  pool.run([c](int i, int) {
    if (i >= c->chunks) return;
    const int64_t begin = c->rows * i / c->chunks / c->align * c->align;
    const int64_t end = i + 1 == c->chunks ? c->rows : c->rows * (i + 1) / c->chunks / c->align * c->align;
    if (begin < end) (*c->fn)(begin, end);
  });
}

// =============================================================================================
// F32 / F16 / BF16 weights: float dot products, weights converted on the fly.

template <GgmlType TY, class DF>
HWY_INLINE hn::Vec<DF> LoadWeights(DF df, const uint8_t* row, size_t i) {
  if constexpr (TY == GgmlType::F32) {
    return hn::LoadU(df, reinterpret_cast<const float*>(row) + i);
  } else if constexpr (TY == GgmlType::F16) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(row) + i));
  } else {
    const hn::Rebind<uint16_t, DF> d16;
    const hn::Rebind<uint32_t, DF> d32;
    const auto bits = hn::PromoteTo(d32, hn::LoadU(d16, reinterpret_cast<const uint16_t*>(row) + i));
    return hn::BitCast(df, hn::ShiftLeft<16>(bits));
  }
}

template <GgmlType TY>
HWY_INLINE float WeightAt(const uint8_t* row, size_t i) {
  if constexpr (TY == GgmlType::F32) {
    float f;
    std::memcpy(&f, row + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, row + 2 * i, 2);
    return TY == GgmlType::F16 ? fp16_to_f32(h) : bf16_to_f32(h);
  }
}

template <GgmlType TY, int R, int T>
HWY_NOINLINE void FloatTile(const uint8_t* w, size_t wrb, size_t cols, const float* x, float* y,
                            int64_t ystride) {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  using V = hn::Vec<decltype(df)>;
  V acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = hn::Zero(df);
  size_t i = 0;
  for (; i + N <= cols; i += N) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = LoadWeights<TY>(df, w + r * wrb, i);
    for (int t = 0; t < T; ++t) {
      const V xv = hn::LoadU(df, x + t * cols + i);
      for (int r = 0; r < R; ++r) acc[r][t] = hn::MulAdd(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float s = hn::GetLane(hn::SumOfLanes(df, acc[r][t]));
      for (size_t j = i; j < cols; ++j) s += WeightAt<TY>(w + r * wrb, j) * x[t * cols + j];
      y[t * ystride + r] = s;
    }
  }
}

template <GgmlType TY, int R, int T>
HWY_INLINE void FloatTileT(int nt, const uint8_t* w, size_t wrb, size_t cols, const float* x,
                           float* y, int64_t ystride) {
  if constexpr (T > 1) {
    if (nt < T) return FloatTileT<TY, R, T - 1>(nt, w, wrb, cols, x, y, ystride);
  }
  FloatTile<TY, R, T>(w, wrb, cols, x, y, ystride);
}

template <GgmlType TY>
void FloatMatmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool) {
  constexpr int kR = 2, kT = 4;
  const size_t cols = static_cast<size_t>(w.cols);
  const size_t wrb = row_bytes(w.type, w.cols);
  const int64_t rows = w.rows;
  // Row blocks that stay in L2 while all token tiles pass over them, as in QuantRows.
  const int64_t block_rows = std::max<int64_t>(kR, static_cast<int64_t>(detail::kRowBlockBytes / wrb) / kR * kR);
  SplitRows(pool, rows, kR, [&](int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; rb += block_rows) {
      const int64_t re = std::min(r1, rb + block_rows);
      for (int64_t t0 = 0; t0 < n_tok; t0 += kT) {
        const int nt = static_cast<int>(std::min<int64_t>(kT, n_tok - t0));
        const float* xt = x + t0 * w.cols;
        float* yt = y + t0 * rows;
        int64_t r = rb;
        for (; r + kR <= re; r += kR) FloatTileT<TY, kR, kT>(nt, w.data + r * wrb, wrb, cols, xt, yt + r, rows);
        for (; r < re; ++r) FloatTileT<TY, 1, kT>(nt, w.data + r * wrb, wrb, cols, xt, yt + r, rows);
      }
    }
  });
}

// =============================================================================================
// Activation quantization, natural layout (x256 and generic engines). Per token:
//   int8 qs[32 * nb] | float d[nb] | float s[nb], where s = d * sum(q) of the block.

inline size_t NatStride(int64_t nb) { return detail::natural_stride(nb); }

// round(v) with halves away from zero, as C's roundf, then clamped to the int8 range. NaN -> 0.
template <class D, class V>
HWY_INLINE V RoundHalfAway(D d, V v) {
  v = hn::IfThenElseZero(v == v, v);
  const V t = hn::Trunc(v);
  const V one = hn::CopySign(hn::Set(d, 1.0f), v);
  const V r = hn::Add(t, hn::IfThenElseZero(hn::Abs(hn::Sub(v, t)) >= hn::Set(d, 0.5f), one));
  return hn::Min(hn::Max(r, hn::Set(d, -127.0f)), hn::Set(d, 127.0f));
}

void QuantizeNat(const float* HWY_RESTRICT x, int64_t nb, uint8_t* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di;
  const hn::Rebind<int8_t, decltype(df)> d8;
  const size_t N = hn::Lanes(df);  // divides 32 on every target we build
  int8_t* qs = reinterpret_cast<int8_t*>(out);
  float* dd = reinterpret_cast<float*>(out + 32 * nb);
  float* ss = dd + nb;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQKi;
    auto vmax = hn::Zero(df);
    for (size_t j = 0; j < kQKi; j += N) vmax = hn::Max(vmax, hn::Abs(hn::LoadU(df, xb + j)));
    const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    const float d = amax / 127.0f;
    const auto id = hn::Set(df, d != 0.0f ? 1.0f / d : 0.0f);
    auto isum = hn::Zero(di);
    for (size_t j = 0; j < kQKi; j += N) {
      const auto qi = hn::ConvertTo(di, RoundHalfAway(df, hn::Mul(hn::LoadU(df, xb + j), id)));
      isum = hn::Add(isum, qi);
      hn::StoreU(hn::DemoteTo(d8, qi), d8, qs + b * kQKi + j);
    }
    // The scale is kept in fp16, like ggml's q8 blocks: llama.cpp's numbers, bit for bit.
    const float d16 = fp16_to_f32(f32_to_fp16(d));
    dd[b] = d16;
    ss[b] = d16 * static_cast<float>(hn::GetLane(hn::SumOfLanes(di, isum)));
  }
}

// =============================================================================================
// Activation quantization for K-quants (ggml's Q8_K), per token and super-block of 256:
//   int8 qs[256 * nb] | float d[nb] | int16 bsum[16 * nb] (sums of qs per 16)
// With m the element of largest magnitude (the first one on ties): iscale = -127 / m,
// q = min(127, round_half_even(iscale * x)), d = 1 / iscale; an all-zero block has d = 0.

inline size_t KStride(int64_t nb) { return detail::round_up64(static_cast<size_t>(nb) * (256 + 4 + 32)); }

// The signed element of largest magnitude of one super-block (the first on ties; NaN never
// wins, so a block of NaNs and zeros gives 0).
HWY_INLINE float LargestElement(const float* HWY_RESTRICT xb) {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  auto vmax = hn::Zero(df);
  for (size_t j = 0; j < blocks::kQK_K; j += N) {
    const auto a = hn::Abs(hn::LoadU(df, xb + j));
    vmax = hn::Max(vmax, hn::IfThenElseZero(hn::Eq(a, a), a));  // NaN -> 0
  }
  const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
  if (amax == 0.0f) return 0.0f;
  const auto target = hn::Set(df, amax);
  for (size_t j = 0; j < blocks::kQK_K; j += N) {
    const auto v = hn::LoadU(df, xb + j);
    const intptr_t at = hn::FindFirstTrue(df, hn::Eq(hn::Abs(v), target));
    if (at >= 0) return xb[j + static_cast<size_t>(at)];
  }
  return 0.0f;  // unreachable: amax is one of the |x|
}

void QuantizeK(const float* HWY_RESTRICT x, int64_t nb, uint8_t* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di;
  const hn::Rebind<int8_t, decltype(df)> d8;
  const size_t N = hn::Lanes(df);  // divides 16 on every target we build
  int8_t* qs = reinterpret_cast<int8_t*>(out);
  float* dd = reinterpret_cast<float*>(out + 256 * nb);
  int16_t* bsum = reinterpret_cast<int16_t*>(out + 260 * nb);
  const auto lo = hn::Set(df, -127.0f), hi = hn::Set(df, 127.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * blocks::kQK_K;
    int8_t* qb = qs + b * blocks::kQK_K;
    const float max = LargestElement(xb);
    const float iscale = max != 0.0f ? -127.0f / max : 0.0f;
    const auto vs = hn::Set(df, iscale);
    for (int g = 0; g < blocks::kQK_K / blocks::kGroup; ++g) {
      auto sum = hn::Zero(di);
      for (size_t j = g * blocks::kGroup; j < static_cast<size_t>(g + 1) * blocks::kGroup; j += N) {
        auto v = hn::Mul(vs, hn::LoadU(df, xb + j));
        v = hn::Min(hn::Max(hn::IfThenElseZero(hn::Eq(v, v), v), lo), hi);  // NaN (from inf or NaN) -> 0
        const auto q = hn::ConvertTo(di, hn::Round(v));  // ties to even, as ggml's nearest_int
        sum = hn::Add(sum, q);
        hn::StoreU(hn::DemoteTo(d8, q), d8, qb + j);
      }
      bsum[16 * b + g] = static_cast<int16_t>(hn::GetLane(hn::SumOfLanes(di, sum)));
    }
    dd[b] = max != 0.0f ? 1.0f / iscale : 0.0f;
  }
}

// =============================================================================================
// Generic engines: plain C++ over the block codecs (tensor/quant_blocks.h), correct on any CPU
// and for every quantized type; the compiler may vectorize the integer dot loops per target.

// 32-element blocks against the natural Q8 activation layout: w = d q + m, so
// dot = d dx sum(q x) + m s, with s = dx sum(x) from the activations.
struct GenericEngine {
  static constexpr int kR = 2, kT = 4, kRDecode = 2;
  static size_t Stride(int64_t nb) { return NatStride(nb); }
  static void Quantize(const float* x, int64_t nb, GgmlType, uint8_t* out) { QuantizeNat(x, nb, out); }

  template <GgmlType TY, int R, int T>
  static HWY_NOINLINE void Tile(const TileArgs& a) {
    using C = blocks::Codec<TY>;
    float acc[R][T] = {};
    blocks::Decoded32 wb[R];
    for (int64_t b = 0; b < a.nb; ++b) {
      for (int r = 0; r < R; ++r) C::decode(a.w + r * a.wrb + b * C::kBytes, wb[r]);
      for (int t = 0; t < T; ++t) {
        const uint8_t* at = a.act + t * a.astride;
        const int8_t* xq = reinterpret_cast<const int8_t*>(at) + b * kQK;
        const float* dx = reinterpret_cast<const float*>(at + 32 * a.nb);
        for (int r = 0; r < R; ++r) {
          int32_t s = 0;
          for (int j = 0; j < kQK; ++j) s += static_cast<int32_t>(wb[r].q[j]) * xq[j];
          acc[r][t] += wb[r].d * dx[b] * static_cast<float>(s);
          if constexpr (C::kHasMin) acc[r][t] += wb[r].m * dx[a.nb + b];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) a.y[t * a.ystride + r] = acc[r][t];
  }
};

// K-quant super-blocks against the Q8_K activation layout: w = d sc q - dmin mn per group of
// 16, so dot = d dx sum_g sc_g sum(q x) - dmin dx sum_g mn_g bsum_g, integers inside.
struct GenericKEngine {
  static constexpr int kR = 2, kT = 4, kRDecode = 2;
  static size_t Stride(int64_t nb) { return KStride(nb); }
  static void Quantize(const float* x, int64_t nb, GgmlType, uint8_t* out) { QuantizeK(x, nb, out); }

  template <GgmlType TY, int R, int T>
  static HWY_NOINLINE void Tile(const TileArgs& a) {
    using C = blocks::Codec<TY>;
    constexpr int kGroups = blocks::kQK_K / blocks::kGroup;
    float acc[R][T] = {};
    blocks::DecodedK wb[R];
    for (int64_t b = 0; b < a.nb; ++b) {
      for (int r = 0; r < R; ++r) C::decode(a.w + r * a.wrb + b * C::kBytes, wb[r]);
      for (int t = 0; t < T; ++t) {
        const uint8_t* at = a.act + t * a.astride;
        const int8_t* xq = reinterpret_cast<const int8_t*>(at) + b * blocks::kQK_K;
        const float dx = reinterpret_cast<const float*>(at + 256 * a.nb)[b];
        const int16_t* bsum = reinterpret_cast<const int16_t*>(at + 260 * a.nb) + kGroups * b;
        for (int r = 0; r < R; ++r) {
          int32_t isum = 0, msum = 0;
          for (int g = 0; g < kGroups; ++g) {
            int32_t s = 0;
            for (int j = 0; j < blocks::kGroup; ++j)
              s += static_cast<int32_t>(wb[r].q[g * blocks::kGroup + j]) * xq[g * blocks::kGroup + j];
            isum += wb[r].sc[g] * s;
            if constexpr (C::kHasMin) msum += wb[r].mn[g] * bsum[g];
          }
          acc[r][t] += wb[r].d * dx * static_cast<float>(isum);
          if constexpr (C::kHasMin) acc[r][t] -= wb[r].dmin * dx * static_cast<float>(msum);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) a.y[t * a.ystride + r] = acc[r][t];
  }
};

#if QF_X86_SIMD
// =============================================================================================
// x256 engine (AVX2, AVX3): natural layout, one block per __m256i.

struct X256Engine {
  static constexpr int kR = 2, kT = 4, kRDecode = 4;
  static constexpr size_t kDecodePrefetchBytes = detail::kWeightPrefetchBytes;
  static size_t Stride(int64_t nb) { return NatStride(nb); }
  static void Quantize(const float* x, int64_t nb, GgmlType, uint8_t* out) { QuantizeNat(x, nb, out); }

  static HWY_INLINE float Half(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
  }
  static HWY_INLINE float HSum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  template <GgmlType TY>
  static constexpr bool kSigned = TY == GgmlType::Q8_0 || TY == GgmlType::IQ4_NL;

  // Byte k of the result is 0x10 when bit k of the 32-bit little-endian qh is set (Q5 blocks).
  static HWY_INLINE __m256i FifthBits(const uint8_t* qh_bytes) {
    uint32_t qh;
    std::memcpy(&qh, qh_bytes, 4);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int>(qh)),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
  }

  // Elements 0..15 are the low nibbles, 16..31 the high ones: natural order.
  static HWY_INLINE __m256i Nibbles(const uint8_t* qs) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
  }

  // One block's 32 quants (unsigned, or signed for kSigned types) and the weight as
  // d * quant + mw.
  template <GgmlType TY>
  static HWY_INLINE void LoadBlock(const uint8_t* p, float d, __m256i& wv, float& mw) {
    if constexpr (TY == GgmlType::Q8_0) {
      wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
      mw = 0.0f;
    } else if constexpr (TY == GgmlType::IQ4_NL) {
      const __m256i grid = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks::kIq4nlValues)));
      wv = _mm256_shuffle_epi8(grid, Nibbles(p + 2));
      mw = 0.0f;
    } else if constexpr (TY == GgmlType::Q4_0) {
      wv = Nibbles(p + 2);
      mw = -8.0f * d;  // d * (q - 8) = d * q + (-8 d)
    } else if constexpr (TY == GgmlType::Q4_1) {
      wv = Nibbles(p + 4);
      mw = Half(p + 2);
    } else if constexpr (TY == GgmlType::Q5_0) {
      wv = _mm256_or_si256(Nibbles(p + 6), FifthBits(p + 2));
      mw = -16.0f * d;
    } else {
      static_assert(TY == GgmlType::Q5_1);
      wv = _mm256_or_si256(Nibbles(p + 8), FifthBits(p + 4));
      mw = Half(p + 2);
    }
  }

  template <GgmlType TY, int R, int T>
  static HWY_NOINLINE void Tile(const TileArgs& a) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 acc[R][T];
    float macc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) {
        acc[r][t] = _mm256_setzero_ps();
        macc[r][t] = 0.0f;
      }
    for (int64_t b = 0; b < a.nb; ++b) {
      __m256i wv[R], wabs[R];
      float dw[R], mw[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = a.w + r * a.wrb + b * blocks::Codec<TY>::kBytes;
        if constexpr (T == 1) _mm_prefetch(reinterpret_cast<const char*>(p + kDecodePrefetchBytes), _MM_HINT_T0);
        dw[r] = Half(p);
        LoadBlock<TY>(p, dw[r], wv[r], mw[r]);
        if constexpr (kSigned<TY>) wabs[r] = _mm256_abs_epi8(wv[r]);
      }
      for (int t = 0; t < T; ++t) {
        const uint8_t* at = a.act + t * a.astride;
        const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(at + b * kQK));
        const float* dx = reinterpret_cast<const float*>(at + 32 * a.nb);
        const float xd = dx[b], xs = dx[a.nb + b];
        for (int r = 0; r < R; ++r) {
          // vpmaddubsw multiplies unsigned by signed bytes. Q4/Q5 quants are unsigned already; for
          // Q8_0 / IQ4_NL move w's sign onto x (|w| <= 128, |x| <= 127: pair sums fit in int16).
          const __m256i p16 = kSigned<TY> ? _mm256_maddubs_epi16(wabs[r], _mm256_sign_epi8(xv, wv[r]))
                                          : _mm256_maddubs_epi16(wv[r], xv);
          const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones16));
          acc[r][t] = _mm256_fmadd_ps(f, _mm256_set1_ps(dw[r] * xd), acc[r][t]);
          if constexpr (!kSigned<TY>) macc[r][t] += mw[r] * xs;
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) a.y[t * a.ystride + r] = HSum(acc[r][t]) + macc[r][t];
  }
};

// =============================================================================================
// x256 K engine (AVX2, AVX3): K-quant super-blocks against the Q8_K activation layout. Each
// super-block is eight pieces of 32 quants, unpacked to unsigned bytes u = q + kOffset; with
// 16-element groups g, w = d sc_g q - dmin mn_g = d sc_g u - coef mn'_g where
//   types with mins:    mn' = mn,            coef = dmin
//   Q3_K, Q6_K:         mn' = kOffset * sc,  coef = d
// so dot = d dx sum_g sc_g sum(u x) - coef dx sum_g mn'_g bsum_g: vpmaddubsw (u <= 63, pair sums
// fit in int16), vpmaddwd by the group scales, and one vpmaddwd of bsums by mn' per block.

struct X256KEngine {
  static constexpr int kR = 2, kT = 4, kRDecode = 2;
  static constexpr size_t kDecodePrefetchBytes = detail::kWeightPrefetchBytes;
  static size_t Stride(int64_t nb) { return KStride(nb); }
  static void Quantize(const float* x, int64_t nb, GgmlType, uint8_t* out) { QuantizeK(x, nb, out); }

  struct Scales {
    alignas(32) int16_t sc[16];
    alignas(32) int16_t mn[16];
    float d, coef;
  };

  template <GgmlType TY>
  static HWY_INLINE void LoadScales(const uint8_t* p, Scales& s) {
    using C = blocks::Codec<TY>;
    int8_t sc[16], mn[16];
    C::scales(p, sc, mn);
    for (int g = 0; g < 16; ++g) {
      s.sc[g] = sc[g];
      s.mn[g] = static_cast<int16_t>(C::kHasMin ? mn[g] : C::kOffset * sc[g]);
    }
    constexpr size_t kDAt = TY == GgmlType::Q2_K ? 80 : TY == GgmlType::Q3_K ? 108 : TY == GgmlType::Q6_K ? 208 : 0;
    s.d = X256Engine::Half(p + kDAt);
    s.coef = C::kHasMin ? X256Engine::Half(p + kDAt + 2) : s.d;
  }

  static HWY_INLINE __m256i Load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // Bits [shift, shift + width) of every byte (16-bit shifts: the mask drops what crossed bytes).
  static HWY_INLINE __m256i Field(__m256i v, int shift, int mask) {
    return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(static_cast<char>(mask)));
  }

  // Unsigned quants of elements [32 * k, 32 * k + 32) of the super-block at p.
  template <GgmlType TY>
  static HWY_INLINE __m256i Piece(const uint8_t* p, int k) {
    if constexpr (TY == GgmlType::Q2_K) {
      return Field(Load32(p + 16 + 32 * (k / 4)), 2 * (k % 4), 3);
    } else if constexpr (TY == GgmlType::Q3_K) {
      const __m256i low = Field(Load32(p + 32 + 32 * (k / 4)), 2 * (k % 4), 3);
      return _mm256_or_si256(low, _mm256_slli_epi16(Field(Load32(p), k, 1), 2));
    } else if constexpr (TY == GgmlType::Q4_K) {
      return Field(Load32(p + 16 + 32 * (k / 2)), 4 * (k % 2), 0xF);
    } else if constexpr (TY == GgmlType::Q5_K) {
      const __m256i low = Field(Load32(p + 48 + 32 * (k / 2)), 4 * (k % 2), 0xF);
      return _mm256_or_si256(low, _mm256_slli_epi16(Field(Load32(p + 16), k, 1), 4));
    } else {
      static_assert(TY == GgmlType::Q6_K);
      const int half = k / 4, j = k % 4;
      const __m256i low = Field(Load32(p + 64 * half + 32 * (j % 2)), 4 * (j / 2), 0xF);
      return _mm256_or_si256(low, _mm256_slli_epi16(Field(Load32(p + 128 + 32 * half), 2 * j, 3), 4));
    }
  }

  template <GgmlType TY, int R, int T>
  static HWY_NOINLINE void Tile(const TileArgs& a) {
    using C = blocks::Codec<TY>;
    __m256 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.nb; ++b) {
      const uint8_t* blk[R];
      Scales s[R];
      for (int r = 0; r < R; ++r) {
        blk[r] = a.w + r * a.wrb + b * C::kBytes;
        if constexpr (T == 1)
          for (size_t off = 0; off < C::kBytes; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(blk[r] + kDecodePrefetchBytes + off), _MM_HINT_T0);
        LoadScales<TY>(blk[r], s[r]);
      }
      __m256i sumi[R][T];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) sumi[r][t] = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k) {
        __m256i wq[R], scv[R];
        for (int r = 0; r < R; ++r) {
          wq[r] = Piece<TY>(blk[r], k);
          scv[r] = _mm256_set_m128i(_mm_set1_epi16(s[r].sc[2 * k + 1]), _mm_set1_epi16(s[r].sc[2 * k]));
        }
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_load_si256(reinterpret_cast<const __m256i*>(a.act + t * a.astride + b * 256 + 32 * k));
          for (int r = 0; r < R; ++r)
            sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(_mm256_maddubs_epi16(wq[r], xv), scv[r]));
        }
      }
      for (int t = 0; t < T; ++t) {
        const uint8_t* at = a.act + t * a.astride;
        const float dx = reinterpret_cast<const float*>(at + 256 * a.nb)[b];
        const __m256i bsum = Load32(at + 260 * a.nb + 32 * b);
        for (int r = 0; r < R; ++r) {
          const __m256i m = _mm256_madd_epi16(bsum, _mm256_load_si256(reinterpret_cast<const __m256i*>(s[r].mn)));
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r][t]), _mm256_set1_ps(s[r].d * dx), acc[r][t]);
          acc[r][t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(s[r].coef * dx), acc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) a.y[t * a.ystride + r] = X256Engine::HSum(acc[r][t]);
  }
};
#endif  // QF_X86_SIMD

#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
// =============================================================================================
// x512 K engine (AVX3, AVX3_DL): K-quant super-blocks against the natural Q8_K layout, 64 quants
// per instruction. Per row and super-block the weights are unpacked once into four registers of
// unsigned quants u (elements 64k..64k+63, natural order, so activations load as they are) with
// a few whole-register shifts, masks and bit tests, and the 16 group scales are unpacked with
// integer tricks (no per-group scalar loop). Then per token and piece k:
//   vpmaddubsw u x -> 32 int16 pair sums; lane j belongs to group 4k + j / 8, whose scale one
//   vpermw spreads; vpdpwssd (AVX512-VNNI) or vpmaddwd + vpaddd accumulates sum sc_g sum(u x).
// The offset / min terms use the activations' sums per group (bsum), as the x256 K engine:
//   Q3_K, Q6_K:        u = q + kOffset, so isum -= kOffset sum_g sc_g bsum_g (integers);
//   Q2_K, Q4_K, Q5_K:  dot -= dmin dx sum_g mn_g bsum_g (one vpmaddwd on 16 groups).
// On AVX3_DL this code is compiled with AVX512-VNNI enabled; TypedMatmul runs it there only when
// the CPU reports VNNI.

#if HWY_TARGET == HWY_AVX3_DL
QF_EXTEND_HWY_TARGET("avx512vnni")
#define QF_X512K_VNNI 1
#else
#define QF_X512K_VNNI 0
#endif

namespace x512k {

struct ScaleIdx {
  alignas(64) uint16_t idx[4][32];  // lane j of piece k takes the scale of group 4k + j / 8
};
constexpr ScaleIdx MakeScaleIdx() {
  ScaleIdx s{};
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 32; ++j) s.idx[k][j] = static_cast<uint16_t>(4 * k + j / 8);
  return s;
}
alignas(64) constexpr ScaleIdx kScaleIdx = MakeScaleIdx();

// One super-block of one weight row, ready for every token.
struct SuperBlock {
  __m512i u[4];    // unsigned quants of elements 64k..64k+63
  __m512i scv[4];  // int16 group scale of each pair-sum lane of piece k
  __m256i sc;      // 16 group scales (int16)
  __m256i mn;      // 16 group mins (int16), types with mins
  float d, dmin;
};

HWY_INLINE float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}
HWY_INLINE uint32_t Word(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
// 32 bytes at p in both 256-bit halves.
HWY_INLINE __m512i Bcast32(const uint8_t* p) {
  return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// Bits [s, s + width) of every byte, s = lo in the lower 256 bits and hi in the upper (64-bit
// shifts: the byte mask drops what crossed from the neighbouring byte).
HWY_INLINE __m512i Field(__m512i v, int lo, int hi, int mask) {
  const __m512i shifts = _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo);
  return _mm512_and_si512(_mm512_srlv_epi64(v, shifts), _mm512_set1_epi8(static_cast<char>(mask)));
}
// Bytes whose bit lo (lower 256 bits) or bit hi (upper 256 bits) is set.
HWY_INLINE __mmask64 BitSet(__m512i v, int lo, int hi) {
  const auto blo = static_cast<int64_t>(0x0101010101010101ull << lo);
  const auto bhi = static_cast<int64_t>(0x0101010101010101ull << hi);
  return _mm512_test_epi8_mask(v, _mm512_set_epi64(bhi, bhi, bhi, bhi, blo, blo, blo, blo));
}
HWY_INLINE __m512i AddWhere(__m512i v, __mmask64 m, int add) {
  return _mm512_mask_add_epi8(v, m, v, _mm512_set1_epi8(static_cast<char>(add)));
}

// Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes (see blocks::unpack_scale_min_k4), each
// repeated for the two 16-element groups of its 32-element sub-block.
HWY_INLINE void ScalesK4(const uint8_t* s, __m256i& sc, __m256i& mn) {
  const uint32_t a0 = Word(s), a1 = Word(s + 4), a2 = Word(s + 8);
  const uint32_t sc_lo = a0 & 0x3F3F3F3Fu, mn_lo = a1 & 0x3F3F3F3Fu;
  const uint32_t sc_hi = (a2 & 0x0F0F0F0Fu) | (((a0 >> 6) & 0x03030303u) << 4);
  const uint32_t mn_hi = ((a2 >> 4) & 0x0F0F0F0Fu) | (((a1 >> 6) & 0x03030303u) << 4);
  const __m128i v = _mm_set_epi32(static_cast<int>(mn_hi), static_cast<int>(mn_lo), static_cast<int>(sc_hi),
                                  static_cast<int>(sc_lo));
  sc = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
  mn = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
}

// Q3_K: sixteen 6-bit scales stored + 32 (see blocks::Codec<Q3_K>::scales).
HWY_INLINE __m256i ScalesQ3(const uint8_t* s) {
  const uint32_t a0 = Word(s), a1 = Word(s + 4), a2 = Word(s + 8);
  const uint32_t m4 = 0x0F0F0F0Fu, m2 = 0x03030303u;
  const uint32_t g0 = (a0 & m4) | ((a2 & m2) << 4);
  const uint32_t g4 = (a1 & m4) | (((a2 >> 2) & m2) << 4);
  const uint32_t g8 = ((a0 >> 4) & m4) | (((a2 >> 4) & m2) << 4);
  const uint32_t g12 = ((a1 >> 4) & m4) | (((a2 >> 6) & m2) << 4);
  const __m128i v = _mm_set_epi32(static_cast<int>(g12), static_cast<int>(g8), static_cast<int>(g4),
                                  static_cast<int>(g0));
  return _mm256_cvtepi8_epi16(_mm_sub_epi8(v, _mm_set1_epi8(32)));
}

template <GgmlType TY>
HWY_INLINE void Unpack(const uint8_t* p, SuperBlock& s) {
  if constexpr (TY == GgmlType::Q2_K) {  // scales[16], qs[64], d, dmin
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    s.sc = _mm256_cvtepu8_epi16(_mm_and_si128(b, _mm_set1_epi8(0x0F)));
    s.mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F)));
    for (int k = 0; k < 4; ++k) s.u[k] = Field(Bcast32(p + 16 + 32 * (k / 2)), 4 * (k % 2), 4 * (k % 2) + 2, 3);
    s.d = Half(p + 80);
    s.dmin = Half(p + 82);
  } else if constexpr (TY == GgmlType::Q3_K) {  // hmask[32], qs[64], scales[12], d
    s.sc = ScalesQ3(p + 96);
    const __m512i hmask = Bcast32(p);
    for (int k = 0; k < 4; ++k) {
      const __m512i low = Field(Bcast32(p + 32 + 32 * (k / 2)), 4 * (k % 2), 4 * (k % 2) + 2, 3);
      s.u[k] = AddWhere(low, BitSet(hmask, 2 * k, 2 * k + 1), 4);
    }
    s.d = Half(p + 108);
  } else if constexpr (TY == GgmlType::Q4_K) {  // d, dmin, scales[12], qs[128]
    ScalesK4(p + 4, s.sc, s.mn);
    for (int k = 0; k < 4; ++k) s.u[k] = Field(Bcast32(p + 16 + 32 * k), 0, 4, 0xF);
    s.d = Half(p);
    s.dmin = Half(p + 2);
  } else if constexpr (TY == GgmlType::Q5_K) {  // d, dmin, scales[12], qh[32], qs[128]
    ScalesK4(p + 4, s.sc, s.mn);
    const __m512i qh = Bcast32(p + 16);
    for (int k = 0; k < 4; ++k)
      s.u[k] = AddWhere(Field(Bcast32(p + 48 + 32 * k), 0, 4, 0xF), BitSet(qh, 2 * k, 2 * k + 1), 16);
    s.d = Half(p);
    s.dmin = Half(p + 2);
  } else {
    static_assert(TY == GgmlType::Q6_K);  // ql[128], qh[64], scales[16], d
    s.sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
    const __m512i top = _mm512_set1_epi8(0x30);
    for (int h = 0; h < 2; ++h) {
      // Half h: low nibbles of ql[64h..] are its elements 0..63, high nibbles 64..127; the top
      // two bits of element j are field j / 32 of qh[32h + j % 32], moved to bits 4-5.
      const __m512i ql = _mm512_loadu_si512(p + 64 * h), qh = Bcast32(p + 128 + 32 * h);
      const __m512i up = _mm512_sllv_epi64(qh, _mm512_set_epi64(2, 2, 2, 2, 4, 4, 4, 4));
      s.u[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, _mm512_set1_epi8(0x0F)), _mm512_and_si512(up, top));
      s.u[2 * h + 1] = _mm512_or_si512(Field(ql, 4, 4, 0xF), Field(qh, 0, 2, 0x30));
    }
    s.d = Half(p + 208);
  }
  for (int k = 0; k < 4; ++k)
    s.scv[k] = _mm512_permutexvar_epi16(_mm512_load_si512(kScaleIdx.idx[k]), _mm512_castsi256_si512(s.sc));
}

// acc + (the super-block's dot product with one token's activations) in 16 float lanes.
template <GgmlType TY>
HWY_INLINE __m512 Dot(const SuperBlock& s, const uint8_t* xq, float dx, const uint8_t* bsum_at, __m512 acc) {
  using C = blocks::Codec<TY>;
  __m512i isum = _mm512_setzero_si512();
  for (int k = 0; k < 4; ++k) {
    const __m512i p16 = _mm512_maddubs_epi16(s.u[k], _mm512_load_si512(xq + 64 * k));
#if QF_X512K_VNNI
    isum = _mm512_dpwssd_epi32(isum, p16, s.scv[k]);
#else
    isum = _mm512_add_epi32(isum, _mm512_madd_epi16(p16, s.scv[k]));
#endif
  }
  const __m256i bsum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsum_at));
  if constexpr (C::kHasMin) {
    const __m256i m = _mm256_madd_epi16(bsum, s.mn);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(s.d * dx), acc);
    return _mm512_fnmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(m)), _mm512_set1_ps(s.dmin * dx), acc);
  } else {
    static_assert(C::kOffset == 4 || C::kOffset == 32);
    constexpr int kShift = C::kOffset == 4 ? 2 : 5;
    const __m256i m = _mm256_slli_epi32(_mm256_madd_epi16(bsum, s.sc), kShift);
    isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(m));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(s.d * dx), acc);
  }
}

}  // namespace x512k

struct X512KEngine {
  // Prefill: 2 rows x 8 tokens, one row's unpacked super-block live at a time (10 registers)
  // beside the 16 accumulators. Decode streams 4 rows at a time, sharing the activation loads.
  static constexpr int kR = 2, kT = 8, kRDecode = 4;
  static constexpr size_t kDecodePrefetchBytes = detail::kWeightPrefetchBytes;
  static size_t Stride(int64_t nb) { return KStride(nb); }
  static void Quantize(const float* x, int64_t nb, GgmlType, uint8_t* out) { QuantizeK(x, nb, out); }

  template <GgmlType TY, int R, int T>
  static HWY_NOINLINE void Tile(const TileArgs& a) {
    using C = blocks::Codec<TY>;
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    const size_t d_at = 256 * static_cast<size_t>(a.nb), bsum_at = 260 * static_cast<size_t>(a.nb);
    for (int64_t b = 0; b < a.nb; ++b) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = a.w + r * a.wrb + b * C::kBytes;
        if constexpr (T == 1)
          for (size_t off = 0; off < C::kBytes; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(blk + kDecodePrefetchBytes + off), _MM_HINT_T0);
        x512k::SuperBlock s;
        x512k::Unpack<TY>(blk, s);
        for (int t = 0; t < T; ++t) {
          const uint8_t* at = a.act + t * a.astride;
          const float dx = reinterpret_cast<const float*>(at + d_at)[b];
          acc[r][t] = x512k::Dot<TY>(s, at + 256 * b, dx, at + bsum_at + 32 * b, acc[r][t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) a.y[t * a.ystride + r] = _mm512_reduce_add_ps(acc[r][t]);
  }
};

#if HWY_TARGET == HWY_AVX3_DL
QF_END_HWY_EXTENSION
#endif
#undef QF_X512K_VNNI
#endif  // HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL

#if HWY_TARGET == HWY_AVX3_DL
// =============================================================================================
// vnni engine (AVX3_DL + AVX512-VNNI). Blocks are taken four at a time ("a group"); in every
// 512-bit register 128-bit lane k belongs to block k of the group.
//
// Activations, per token and group, 256 bytes:
//   lo[64]  int8: elements 0..15 of blocks 0..3 (16 bytes each)
//   hi[64]  int8: elements 16..31 of blocks 0..3
//   d[16]   float: each block's d, repeated in its 4 lanes
//   aux[16] 32-bit, for lane j of block k the sum of the 8 x bytes that int32 lane j of
//           vpdpbusd accumulates (psum), pre-scaled for the weight type:
//           Q4_1, Q5_1: float d * psum (the lanes of a block add up to s), so s * m is one FMA;
//           Q4_0: int -8 * psum  (nibbles are q = w + 8: sum q x - 8 sum x);
//           Q5_0: int -16 * psum (5-bit q = w + 16);
//           Q8_0, IQ4_NL: int -128 * psum (vpdpbusd needs unsigned weights: Q8_0 w ^ 0x80 =
//           w + 128; IQ4_NL looks its nibbles up in the grid + 128).
//           The int forms seed the vpdpbusd accumulator, so the offsets cost nothing per row.
// Groups past the last block are zero. Weights are read in place (ggml layout): a group is 4
// consecutive blocks, gathered into lanes with one or two vpermt2b; a Q5 block's fifth bits are
// gathered the same way (byte j / 8 of its qh in byte j of the lane) and tested per byte.

QF_EXTEND_HWY_TARGET("avx512vnni")

namespace vnni {

constexpr size_t kGroupBytes = 256;
constexpr size_t kPrefetchBytes = detail::kWeightPrefetchBytes;

struct Tables {
  alignas(64) uint8_t q41[64];   // Q4_1 qs bytes, from [p, p+64) | [p+16, p+80)
  alignas(64) uint8_t q40[64];   // Q4_0 qs bytes, from [p, p+64) | [p+8, p+72)
  alignas(64) uint8_t q80lo[64];  // Q8_0 elements 0..15, from [p, p+64) | [p+64, p+128)
  alignas(64) uint8_t q80hi[64];  // Q8_0 elements 16..31, from [p+8, p+72) | [p+72, p+136)
  alignas(64) uint16_t dm41[32];  // Q4_1 words: d of each block x4, then m of each block x4
  alignas(64) uint16_t d40[32];   // Q4_0 words: d x4 (upper half unused)
  alignas(64) uint16_t d80[32];   // Q8_0 words from [p, p+128): d x4
  alignas(64) uint8_t q50[64];    // Q5_0 qs bytes, from [p, p+64) | [p+24, p+88)
  alignas(64) uint8_t qh50[2][64];  // Q5_0 qh byte holding the fifth bit of element j (j + 16)
  alignas(64) uint16_t d50[32];   // Q5_0 words: d x4 (upper half unused)
  alignas(64) uint8_t q51[64];    // Q5_1 the same, from [p, p+64) | [p+32, p+96)
  alignas(64) uint8_t qh51[2][64];
  alignas(64) uint16_t dm51[32];  // Q5_1 words: d x4, then m x4
  alignas(16) uint8_t iq4nl[16];  // IQ4_NL grid + 128 (unsigned for vpdpbusd)
};

// Index of byte (or word) `o` of a group in the pair of registers [p, p+64) | [p+split, ...).
constexpr int InWindow(int o, int split) { return o < 64 ? o : 64 + o - split; }

constexpr Tables MakeTables() {
  Tables t{};
  for (int k = 0; k < 64; ++k) {
    const int blk = k / 16, i = k % 16;
    const int o41 = 20 * blk + 4 + i, o40 = 18 * blk + 2 + i;
    t.q41[k] = static_cast<uint8_t>(o41 < 64 ? o41 : 64 + o41 - 16);
    t.q40[k] = static_cast<uint8_t>(o40 < 64 ? o40 : 64 + o40 - 8);
    t.q80lo[k] = static_cast<uint8_t>(34 * blk + 2 + i);
    t.q80hi[k] = static_cast<uint8_t>(34 * blk + 18 + i - 8);
  }
  for (int j = 0; j < 16; ++j) {
    t.dm41[j] = static_cast<uint16_t>(10 * (j / 4));
    t.dm41[16 + j] = static_cast<uint16_t>(10 * (j / 4) + 1);
    t.d40[j] = static_cast<uint16_t>(9 * (j / 4));
    t.d80[j] = static_cast<uint16_t>(17 * (j / 4));
    t.d50[j] = static_cast<uint16_t>(InWindow(22 * (j / 4), 24) / 2);
    t.dm51[j] = static_cast<uint16_t>(InWindow(24 * (j / 4), 32) / 2);
    t.dm51[16 + j] = static_cast<uint16_t>(InWindow(24 * (j / 4) + 2, 32) / 2);
    t.iq4nl[j] = static_cast<uint8_t>(blocks::kIq4nlValues[j] + 128);
  }
  for (int k = 0; k < 64; ++k) {
    const int blk = k / 16, i = k % 16;
    t.q50[k] = static_cast<uint8_t>(InWindow(22 * blk + 6 + i, 24));
    t.q51[k] = static_cast<uint8_t>(InWindow(24 * blk + 8 + i, 32));
    for (int h = 0; h < 2; ++h) {
      t.qh50[h][k] = static_cast<uint8_t>(InWindow(22 * blk + 2 + 2 * h + i / 8, 24));
      t.qh51[h][k] = static_cast<uint8_t>(InWindow(24 * blk + 4 + 2 * h + i / 8, 32));
    }
  }
  return t;
}
alignas(64) constexpr Tables kTab = MakeTables();

HWY_INLINE __m512i Idx(const void* p) { return _mm512_load_si512(p); }

HWY_INLINE __mmask64 ByteMask(int64_t n) {
  return n <= 0 ? __mmask64{0} : n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
}

// 64 bytes at p; for the last, partial group only the `valid` bytes are read (masked loads do
// not fault), the rest are zero.
template <bool kTail>
HWY_INLINE __m512i Load64(const uint8_t* p, int64_t valid) {
  if constexpr (kTail) return _mm512_maskz_loadu_epi8(ByteMask(valid), p);
  return _mm512_loadu_si512(p);
}

struct WGroup {
  __m512i lo, hi;  // unsigned weight bytes for x lo / x hi
  __m512 d, m;     // per-lane block scale (and Q4_1 / Q5_1 min)
};

// Low and high nibbles of the gathered qs bytes q.
HWY_INLINE void SplitNibbles(__m512i q, WGroup& g) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  g.lo = _mm512_and_si512(q, low4);
  g.hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
}

// Adds 16 to the quants whose fifth bit is set; qh_lo / qh_hi index the qh bytes (Tables).
HWY_INLINE void AddFifthBits(__m512i a, __m512i b, const uint8_t* qh_lo, const uint8_t* qh_hi, WGroup& g) {
  const __m512i bit = _mm512_set1_epi64(static_cast<int64_t>(0x8040201008040201ull));  // byte j: 1 << j % 8
  const __m512i sixteen = _mm512_set1_epi8(16);
  const __mmask64 lo = _mm512_test_epi8_mask(_mm512_permutex2var_epi8(a, Idx(qh_lo), b), bit);
  const __mmask64 hi = _mm512_test_epi8_mask(_mm512_permutex2var_epi8(a, Idx(qh_hi), b), bit);
  g.lo = _mm512_mask_add_epi8(g.lo, lo, g.lo, sixteen);
  g.hi = _mm512_mask_add_epi8(g.hi, hi, g.hi, sixteen);
}

template <GgmlType TY, bool kTail>
HWY_INLINE WGroup LoadGroup(const uint8_t* p, int nblk) {
  WGroup g;
  if constexpr (TY == GgmlType::Q4_1) {
    const int64_t v = 20 * nblk;
    const __m512i a = Load64<kTail>(p, v), b = Load64<kTail>(p + 16, v - 16);
    const __m512i q = _mm512_permutex2var_epi8(a, Idx(kTab.q41), b);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    g.lo = _mm512_and_si512(q, low4);
    g.hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
    const __m512i dm = _mm512_permutexvar_epi16(Idx(kTab.dm41), a);
    g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
    g.m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
  } else if constexpr (TY == GgmlType::Q5_1) {
    const int64_t v = 24 * nblk;
    const __m512i a = Load64<kTail>(p, v), b = Load64<kTail>(p + 32, v - 32);
    SplitNibbles(_mm512_permutex2var_epi8(a, Idx(kTab.q51), b), g);
    AddFifthBits(a, b, kTab.qh51[0], kTab.qh51[1], g);
    const __m512i dm = _mm512_permutex2var_epi16(a, Idx(kTab.dm51), b);
    g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
    g.m = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
  } else if constexpr (TY == GgmlType::Q5_0) {
    const int64_t v = 22 * nblk;
    const __m512i a = Load64<kTail>(p, v), b = Load64<kTail>(p + 24, v - 24);
    SplitNibbles(_mm512_permutex2var_epi8(a, Idx(kTab.q50), b), g);
    AddFifthBits(a, b, kTab.qh50[0], kTab.qh50[1], g);
    g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(a, Idx(kTab.d50), b)));
    g.m = _mm512_setzero_ps();
  } else if constexpr (TY == GgmlType::IQ4_NL) {  // Q4_0's layout, nibbles index the grid
    const int64_t v = 18 * nblk;
    const __m512i a = Load64<kTail>(p, v), b = Load64<kTail>(p + 8, v - 8);
    SplitNibbles(_mm512_permutex2var_epi8(a, Idx(kTab.q40), b), g);
    const __m512i grid = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kTab.iq4nl)));
    g.lo = _mm512_shuffle_epi8(grid, g.lo);
    g.hi = _mm512_shuffle_epi8(grid, g.hi);
    g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(Idx(kTab.d40), a)));
    g.m = _mm512_setzero_ps();
  } else if constexpr (TY == GgmlType::Q4_0) {
    const int64_t v = 18 * nblk;
    const __m512i a = Load64<kTail>(p, v), b = Load64<kTail>(p + 8, v - 8);
    const __m512i q = _mm512_permutex2var_epi8(a, Idx(kTab.q40), b);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    g.lo = _mm512_and_si512(q, low4);
    g.hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
    g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(Idx(kTab.d40), a)));
    g.m = _mm512_setzero_ps();
  } else {
    static_assert(TY == GgmlType::Q8_0);
    const int64_t v = 34 * nblk;
    const __m512i a = Load64<kTail>(p, v), b = Load64<kTail>(p + 64, v - 64);
    const __m512i c = Load64<kTail>(p + 8, v - 8), e = Load64<kTail>(p + 72, v - 72);
    const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
    g.lo = _mm512_xor_si512(_mm512_permutex2var_epi8(a, Idx(kTab.q80lo), b), bias);
    g.hi = _mm512_xor_si512(_mm512_permutex2var_epi8(c, Idx(kTab.q80hi), e), bias);
    g.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(a, Idx(kTab.d80), b)));
    g.m = _mm512_setzero_ps();
  }
  return g;
}

template <GgmlType TY, int R, int T, bool kTail>
HWY_INLINE void Step(const uint8_t* w, size_t wrb, const uint8_t* act, size_t astride, int nblk,
                     __m512 (&acc)[R][T]) {
  WGroup g[R];
  for (int r = 0; r < R; ++r) {
    if constexpr (T == 1) {  // decode streams weights once: fetch well ahead of use
      for (size_t off = 0; off < 4 * blocks::Codec<TY>::kBytes; off += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * wrb + kPrefetchBytes + off), _MM_HINT_T0);
    }
    g[r] = LoadGroup<TY, kTail>(w + r * wrb, nblk);
  }
  for (int t = 0; t < T; ++t) {
    const uint8_t* at = act + t * astride;
    const __m512i xlo = _mm512_load_si512(at), xhi = _mm512_load_si512(at + 64);
    const __m512 xd = _mm512_load_ps(at + 128);
    for (int r = 0; r < R; ++r) {
      constexpr bool kHasMin = blocks::Codec<TY>::kHasMin;  // aux is float d * psum
      __m512i i = kHasMin ? _mm512_setzero_si512() : _mm512_load_si512(at + 192);
      i = _mm512_dpbusd_epi32(i, g[r].lo, xlo);
      i = _mm512_dpbusd_epi32(i, g[r].hi, xhi);
      acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(g[r].d, xd), acc[r][t]);
      if constexpr (kHasMin)
        acc[r][t] = _mm512_fmadd_ps(g[r].m, _mm512_load_ps(at + 192), acc[r][t]);
    }
  }
}

// y[t * ystride + r] = sum of the lanes of acc[r][t]. Reducing 4 or 16 vectors together shares
// the shuffles: each level halves the vectors and the lanes each one still has to add up.
template <int R, int T>
HWY_INLINE void StoreSums(const __m512 (&acc)[R][T], float* y, int64_t ystride) {
  constexpr int kN = R * T;
  if constexpr (kN < 4) {
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) y[t * ystride + r] = _mm512_reduce_add_ps(acc[r][t]);
  } else {
    constexpr int kPad = kN <= 4 ? 4 : 16;
    static_assert(kN <= 16, "tile too large for StoreSums");
    __m512 v[kPad];
    for (int i = 0; i < kPad; ++i) v[i] = i < kN ? acc[i / T][i % T] : _mm512_setzero_ps();
    // 1: 256-bit halves. s[k] = [v[2k] (8 partials) | v[2k+1] (8 partials)]
    __m512 s[kPad / 2];
    for (int k = 0; k < kPad / 2; ++k)
      s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    // 2: 128-bit lanes. u[m] lane j = 4 partials of v[4m + j]
    __m512 u[kPad / 4];
    for (int m = 0; m < kPad / 4; ++m)
      u[m] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0x88),
                           _mm512_shuffle_f32x4(s[2 * m], s[2 * m + 1], 0xDD));
    alignas(64) float out[16];
    if constexpr (kPad == 4) {
      // Within each lane: 4 partials -> 1. out[4j] = sum of v[j].
      __m512 h = _mm512_add_ps(u[0], _mm512_permute_ps(u[0], 0x4E));
      h = _mm512_add_ps(h, _mm512_permute_ps(h, 0xB1));
      _mm512_store_ps(out, h);
      for (int i = 0; i < kN; ++i) y[(i % T) * ystride + i / T] = out[4 * i];
    } else {
      // 3: w[n] lane j = [2 partials of v[8n + j] | 2 partials of v[8n + 4 + j]]
      __m512 w[2];
      for (int n = 0; n < 2; ++n)
        w[n] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * n], u[2 * n + 1], 0x44),
                             _mm512_shuffle_ps(u[2 * n], u[2 * n + 1], 0xEE));
      // 4: lane j = [v[j], v[4 + j], v[8 + j], v[12 + j]]
      _mm512_store_ps(out, _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD)));
      for (int i = 0; i < kN; ++i) y[(i % T) * ystride + i / T] = out[4 * (i % 4) + i / 4];
    }
  }
}

// Quantizes 16 floats (already multiplied by 1/d) to int8 with roundf semantics.
HWY_INLINE __m128i Quantize16(__m512 v) {
  v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
  const __m512 sign = _mm512_set1_ps(-0.0f);
  __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, _mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  t = _mm512_mask_add_ps(t, up, t, _mm512_or_ps(_mm512_and_ps(v, sign), _mm512_set1_ps(1.0f)));
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  return _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(t));
}

}  // namespace vnni

struct VnniEngine {
  // Tiles of 1 row x 16 tokens: 16 accumulators, each weight group unpacked once per 16 tokens
  // and the 16 sums reduced in one StoreSums tree. A batched step of 16 sessions is one tile
  // per row: 16% less CPU time than two 2x8 tiles over every matrix of SmolLM2 (BM_BatchedModel),
  // 9% less at 32 tokens; prefill (512 tokens) measured the same as 2x8 (3x6 too, 4x4 slower).
  // Decode streams 4 rows at a time.
  static constexpr int kR = 1, kT = 16, kRDecode = 4;
  static size_t Stride(int64_t nb) { return static_cast<size_t>((nb + 3) / 4) * vnni::kGroupBytes; }

  static void Quantize(const float* x, int64_t nb, GgmlType wt, uint8_t* out) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g = 0; g < (nb + 3) / 4; ++g) {
      uint8_t* rec = out + g * vnni::kGroupBytes;
      for (int k = 0; k < 4; ++k) {
        const int64_t b = 4 * g + k;
        __m128i q0 = _mm_setzero_si128(), q1 = _mm_setzero_si128();
        float d = 0.0f;
        if (b < nb) {
          const __m512 x0 = _mm512_loadu_ps(x + b * kQKi), x1 = _mm512_loadu_ps(x + b * kQKi + 16);
          const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
          d = amax / 127.0f;
          const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
          q0 = vnni::Quantize16(_mm512_mul_ps(x0, id));
          q1 = vnni::Quantize16(_mm512_mul_ps(x1, id));
        }
        _mm_store_si128(reinterpret_cast<__m128i*>(rec + 16 * k), q0);
        _mm_store_si128(reinterpret_cast<__m128i*>(rec + 64 + 16 * k), q1);
        // The scale is kept in fp16, like ggml's q8 blocks (see QuantizeNat); F16C rounds to
        // nearest even as fp16_to_f32(f32_to_fp16(d)) does, without the scalar bit twiddling.
        const float d16 = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_store_ps(reinterpret_cast<float*>(rec + 128 + 16 * k), _mm_set1_ps(d16));
      }
      const __m512i xlo = _mm512_load_si512(rec), xhi = _mm512_load_si512(rec + 64);
      const __m512i psum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xlo), ones, xhi);
      uint8_t* aux = rec + 192;
      if (wt == GgmlType::Q4_1 || wt == GgmlType::Q5_1) {
        _mm512_store_ps(aux, _mm512_mul_ps(_mm512_cvtepi32_ps(psum), _mm512_load_ps(rec + 128)));
      } else {
        const int shift = wt == GgmlType::Q4_0 ? 3 : wt == GgmlType::Q5_0 ? 4 : 7;  // Q8_0, IQ4_NL: 7
        _mm512_store_si512(aux, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_sll_epi32(psum, _mm_cvtsi32_si128(shift))));
      }
    }
  }

  template <GgmlType TY, int R, int T>
  static HWY_NOINLINE void Tile(const TileArgs& a) {
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    constexpr size_t kGroupW = 4 * blocks::Codec<TY>::kBytes;
    const int64_t nfull = a.nb / 4;
    for (int64_t g = 0; g < nfull; ++g)
      vnni::Step<TY, R, T, false>(a.w + g * kGroupW, a.wrb, a.act + g * vnni::kGroupBytes, a.astride, 4, acc);
    if (a.nb % 4 != 0)
      vnni::Step<TY, R, T, true>(a.w + nfull * kGroupW, a.wrb, a.act + nfull * vnni::kGroupBytes, a.astride,
                                 static_cast<int>(a.nb % 4), acc);
    vnni::StoreSums<R, T>(acc, a.y, a.ystride);
  }
};

// The same engine with tiles of 4 rows x 4 tokens, for products of at most kMaxTokens tokens
// where detail::vnni_square_tiles() (AMD by default). On an AMD EPYC (Zen, 2 cores) a batched
// step of 16 SmolLM2 sessions took 13% less time than with 1 x 16 tiles, and a 512-token
// prefill 4% more, hence the token limit. Every output sums the same products in the same
// order with either tile, so the results are the same bit for bit.
struct VnniSquareEngine : VnniEngine {
  static constexpr int kR = 4, kT = 4, kMaxTokens = 16;
};

QF_END_HWY_EXTENSION
#endif  // HWY_TARGET == HWY_AVX3_DL

// =============================================================================================
// Quantized matmul driver

// Runs Tile<TY, R, nt> for the runtime token count nt in [1, T].
template <class E, GgmlType TY, int R, int T>
HWY_INLINE void TileT(int nt, const TileArgs& a) {
  if constexpr (T > 1) {
    if (nt < T) return TileT<E, TY, R, T - 1>(nt, a);
  }
  E::template Tile<TY, R, T>(a);
}

template <class E, GgmlType TY>
void QuantRows(const WeightView& w, const uint8_t* act, size_t astride, int64_t n_tok, float* y,
               int64_t r0, int64_t r1) {
  const size_t wrb = row_bytes(w.type, w.cols);
  TileArgs a{nullptr, wrb, w.cols / blocks::Codec<TY>::kElems, act, astride, nullptr, w.rows};
  auto at = [&](int64_t r, int64_t t0) {
    a.w = w.data + r * wrb;
    a.act = act + t0 * astride;
    a.y = y + t0 * w.rows + r;
    return a;
  };
  if (n_tok == 1) {  // decode: stream each row once
    int64_t r = r0;
    for (; r + E::kRDecode <= r1; r += E::kRDecode) E::template Tile<TY, E::kRDecode, 1>(at(r, 0));
    for (; r < r1; ++r) E::template Tile<TY, 1, 1>(at(r, 0));
    return;
  }
  const int64_t block_rows = std::max<int64_t>(E::kR, static_cast<int64_t>(detail::kRowBlockBytes / wrb) / E::kR * E::kR);
  for (int64_t rb = r0; rb < r1; rb += block_rows) {
    const int64_t re = std::min(r1, rb + block_rows);
    for (int64_t t0 = 0; t0 < n_tok; t0 += E::kT) {
      const int nt = static_cast<int>(std::min<int64_t>(E::kT, n_tok - t0));
      int64_t r = rb;
      for (; r + E::kR <= re; r += E::kR) TileT<E, TY, E::kR, E::kT>(nt, at(r, t0));
      for (; r < re; ++r) TileT<E, TY, 1, E::kT>(nt, at(r, t0));
    }
  }
}

// Products of one or more matrices of one type and width with the same input (a layer's q, k
// and v; gate and up): the input is quantized once and one parallel region covers every
// matrix's rows, split as one matrix of all of them. Each row goes through the tile it would
// get alone as long as every matrix but the last has a whole number of row groups (align rows);
// otherwise each matrix gets its own region. Either way the results are those of separate
// products, bit for bit.
template <class E, GgmlType TY>
void QuantMatmul(std::span<const WeightView> ws, const float* x, int64_t n_tok, std::span<float* const> ys,
                 ThreadPool& pool) {
  const WeightView& w0 = ws[0];
  const int64_t nb = w0.cols / blocks::Codec<TY>::kElems;
  const size_t astride = E::Stride(nb);
  uint8_t* act = detail::scratch(astride * static_cast<size_t>(n_tok));
  const auto quantize = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) E::Quantize(x + t * w0.cols, nb, w0.type, act + t * astride);
  };
  if (n_tok * w0.cols >= detail::kParallelQuantElems && pool.size() > 1)
    pool.parallel_for(n_tok, 1, quantize);
  else
    quantize(0, n_tok);
  constexpr int64_t align = std::max(E::kR, E::kRDecode);
  int64_t total = 0;
  bool aligned = true;
  for (size_t i = 0; i < ws.size(); ++i) {
    total += ws[i].rows;
    aligned = aligned && (i + 1 == ws.size() || ws[i].rows % align == 0);
  }
  if (!aligned) {
    for (size_t i = 0; i < ws.size(); ++i)
      SplitRows(pool, ws[i].rows, align,
                [&](int64_t r0, int64_t r1) { QuantRows<E, TY>(ws[i], act, astride, n_tok, ys[i], r0, r1); });
    return;
  }
  SplitRows(pool, total, align, [&](int64_t r0, int64_t r1) {
    int64_t first = 0;  // matrix i holds rows [first, first + rows) of the stacked matrix
    for (size_t i = 0; i < ws.size(); first += ws[i].rows, ++i) {
      const int64_t lo = std::max(r0, first), hi = std::min(r1, first + ws[i].rows);
      if (lo < hi) QuantRows<E, TY>(ws[i], act, astride, n_tok, ys[i], lo - first, hi - first);
    }
  });
}

// The matmul of one weight type on this target: the hand-tuned engine where there is one, else
// the generic engine of the type's block shape.
template <GgmlType TY>
void TypedMatmul(std::span<const WeightView> w, const float* x, int64_t n_tok, std::span<float* const> y,
                 ThreadPool& pool) {
  if constexpr (TY == GgmlType::F32 || TY == GgmlType::F16 || TY == GgmlType::BF16) {
    for (size_t i = 0; i < w.size(); ++i) FloatMatmul<TY>(w[i], x, n_tok, y[i], pool);
  } else if constexpr (blocks::Codec<TY>::kElems == 32) {
#if HWY_TARGET == HWY_AVX3_DL
    if (detail::cpu_has_avx512vnni()) {
      if (n_tok <= VnniSquareEngine::kMaxTokens && detail::vnni_square_tiles())
        return QuantMatmul<VnniSquareEngine, TY>(w, x, n_tok, y, pool);
      return QuantMatmul<VnniEngine, TY>(w, x, n_tok, y, pool);
    }
#endif
#if QF_X86_SIMD
    QuantMatmul<X256Engine, TY>(w, x, n_tok, y, pool);
#else
    QuantMatmul<GenericEngine, TY>(w, x, n_tok, y, pool);
#endif
  } else {
#if HWY_TARGET == HWY_AVX3_DL
    // Compiled with VNNI on this target (vpdpwssd); a CPU without it takes the AVX2 engine.
    if (detail::cpu_has_avx512vnni()) return QuantMatmul<X512KEngine, TY>(w, x, n_tok, y, pool);
    QuantMatmul<X256KEngine, TY>(w, x, n_tok, y, pool);
#elif HWY_TARGET == HWY_AVX3
    QuantMatmul<X512KEngine, TY>(w, x, n_tok, y, pool);
#elif QF_X86_SIMD
    QuantMatmul<X256KEngine, TY>(w, x, n_tok, y, pool);
#else
    QuantMatmul<GenericKEngine, TY>(w, x, n_tok, y, pool);
#endif
  }
}

// Types with kernels; every supported row of the type table (types.cpp) must be listed here
// (MatmulAllTypesShapesThreadsTargets in tests/tensor_test.cpp runs them all).
template <GgmlType... Ts>
struct TypeList {};
using KernelTypes = TypeList<GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1,
                             GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::IQ4_NL, GgmlType::Q2_K,
                             GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K>;

using MatmulFn = void (*)(std::span<const WeightView>, const float*, int64_t, std::span<float* const>, ThreadPool&);

template <GgmlType... Ts>
MatmulFn KernelFor(GgmlType t, TypeList<Ts...>) {
  MatmulFn fn = nullptr;
  ((t == Ts ? (fn = &TypedMatmul<Ts>, true) : false) || ...);
  return fn;
}

// Matrices of one type and width with the same input (matmul_shared_input's checks done).
void MatmulImpl(const WeightView* w, size_t n, const float* x, int64_t n_tok, float* const* y, ThreadPool& pool) {
  const MatmulFn fn = KernelFor(w[0].type, KernelTypes{});
  if (fn == nullptr) fail("matmul: no kernel for weight type ", type_info(w[0].type).name);
  fn(std::span<const WeightView>(w, n), x, n_tok, std::span<float* const>(y, n), pool);
}

}  // namespace HWY_NAMESPACE
}  // namespace qf
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qf {

HWY_EXPORT(TargetBit);
HWY_EXPORT(DotF32);
HWY_EXPORT(ProjectRowsF32);
HWY_EXPORT(AxpyF32);
HWY_EXPORT(ScaleF32);
HWY_EXPORT(MatmulImpl);
HWY_EXPORT(QuantizeNat);

namespace {
void check_matmul(const WeightView& w, const float* x, int64_t n_tok, const float* y) {
  const TypeInfo& ti = type_info(w.type);
  if (!ti.supported) fail("matmul: weight type ", ti.name, " is not supported");
  if (w.cols <= 0 || w.rows < 0 || n_tok < 0)
    fail("matmul: bad shape ", w.rows, " x ", w.cols, " with ", n_tok, " tokens");
  row_bytes(w.type, w.cols);  // throws unless cols is a whole number of blocks
  if (w.rows > 0 && n_tok > 0 && (w.data == nullptr || x == nullptr || y == nullptr)) fail("matmul: null pointer");
  if (w.layout == WeightLayout::panels16 && !(detail::amx_available() && detail::amx_handles(w.type) && w.rows % 16 == 0))
    fail("matmul: a ", type_info(w.type).name, " matrix in the panel layout needs the AMX engine and a multiple of 16 rows");
}
}  // namespace

void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool, TokenKind kind) {
  detail::init_simd_once();
  check_matmul(w, x, n_tok, y);
  if (w.rows == 0 || n_tok == 0) return;
  if (w.layout == WeightLayout::panels16 || (kind == TokenKind::prompt && detail::amx_handles(w.type) && amx_prompt_engine()))
    return detail::amx_matmul({&w, 1}, x, n_tok, {&y, 1}, pool);
  HWY_DYNAMIC_DISPATCH(MatmulImpl)(&w, 1, x, n_tok, &y, pool);
}

void matmul_shared_input(std::span<const WeightView> ws, const float* x, int64_t n_tok, std::span<float* const> ys,
                         ThreadPool& pool, TokenKind kind) {
  detail::init_simd_once();
  if (ws.size() != ys.size()) fail("matmul_shared_input: ", ws.size(), " matrices but ", ys.size(), " outputs");
  for (size_t i = 0; i < ws.size(); ++i) {
    check_matmul(ws[i], x, n_tok, ys[i]);
    if (ws[i].type != ws[0].type || ws[i].cols != ws[0].cols || ws[i].layout != ws[0].layout || ws[i].rows == 0) {
      for (size_t j = 0; j < ws.size(); ++j) matmul(ws[j], x, n_tok, ys[j], pool, kind);  // nothing to share
      return;
    }
  }
  if (ws.empty() || n_tok == 0) return;
  if (ws[0].layout == WeightLayout::panels16 ||
      (kind == TokenKind::prompt && detail::amx_handles(ws[0].type) && amx_prompt_engine()))
    return detail::amx_matmul(ws, x, n_tok, ys, pool);
  HWY_DYNAMIC_DISPATCH(MatmulImpl)(ws.data(), ws.size(), x, n_tok, ys.data(), pool);
}

float dot_f32(const float* a, const float* b, size_t n) {
  detail::init_simd_once();
  return HWY_DYNAMIC_DISPATCH(DotF32)(a, b, n);
}

void project_rows_f32(const float* rows, size_t n_rows, size_t d, const float* x, size_t n_x, float* out,
                      size_t out_stride) {
  if (n_rows == 0 || n_x == 0) return;
  if (out_stride < n_rows) fail("project_rows_f32: output stride ", out_stride, " < ", n_rows, " rows");
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(ProjectRowsF32)(rows, n_rows, d, x, n_x, out, out_stride);
}

void axpy_f32(float a, const float* x, float* y, size_t n) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(AxpyF32)(a, x, y, n);
}

void scale_f32(float* y, float a, size_t n) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(ScaleF32)(y, a, n);
}

std::string simd_target_name() {
  detail::init_simd_once();
  return hwy::TargetName(HWY_DYNAMIC_DISPATCH(TargetBit)());
}

namespace detail {
void quantize_natural(const float* x, int64_t nb, uint8_t* out) { HWY_DYNAMIC_DISPATCH(QuantizeNat)(x, nb, out); }

bool vnni_square_tiles() {
  static const bool by_default = [] {
    const char* v = std::getenv("QF_VNNI_TILE");
    if (v == nullptr) return cpu_is_amd();
    if (std::string_view(v) == "4x4") return true;
    if (std::string_view(v) == "1x16") return false;
    fail("QF_VNNI_TILE=", std::string(v), " is not 1x16 or 4x4");
  }();
  const int forced = vnni_tile_forced();
  return forced < 0 ? by_default : forced == 1;
}
}  // namespace detail

std::string vnni_batch_tile() { return detail::vnni_square_tiles() ? "4x4" : "1x16"; }

bool force_vnni_batch_tile(std::string_view name) {
  if (name == "default") detail::vnni_tile_forced() = -1;
  else if (name == "1x16") detail::vnni_tile_forced() = 0;
  else if (name == "4x4") detail::vnni_tile_forced() = 1;
  else return false;
  return true;
}

bool amx_prompt_engine() {
  detail::init_simd_once();
  return HWY_DYNAMIC_DISPATCH(TargetBit)() == HWY_AVX3_DL && detail::amx_available();
}

bool panels_supported(const WeightView& w) {
  return w.layout == WeightLayout::rows && detail::amx_handles(w.type) && w.rows > 0 && w.rows % 16 == 0 &&
         w.cols > 0 && w.cols % 32 == 0 && amx_prompt_engine();
}

void to_panels(WeightView& w, uint8_t* data) {
  if (data == nullptr || data != w.data) fail("to_panels: data must be the weight's own bytes");
  if (!panels_supported(w))
    fail("to_panels: a ", w.rows, " x ", w.cols, " ", type_info(w.type).name, " matrix cannot take the panel layout here");
  detail::rows_to_panels(w.type, w.cols, w.rows, data);
  w.layout = WeightLayout::panels16;
}

std::string simd_description() { return simd_target_name() + (amx_prompt_engine() ? " + AMX prompt" : ""); }

}  // namespace qf
#endif  // HWY_ONCE
