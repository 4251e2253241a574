// SIMD fused attention for one GQA group (see attention_kernel.h). Compiled for every Highway
// target (foreach_target re-includes this file) and dispatched at run time like the matmuls.
#include "tensor/simd_config.h"  // first: fixes the Highway target set

#include <algorithm>
#include <cmath>
#include <cstring>
#include <atomic>
#include <vector>
#include <type_traits>

#include "tensor/attention_kernel.h"
#include "tensor/kernels.h"
#include "tensor/kernels_internal.h"
#include "util/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/attention_kernel.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/aligned_allocator.h>
#include <hwy/cache_control.h>
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace qf {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int kTile = 64;  // keys per online-softmax step
constexpr int kMaxQ = 4;   // query heads processed together (each key row is loaded once for all)

// ---------------------------------------------------------------------------------------------
// KV storage types to floats. Each value is what a scalar dequantization gives (d * q in float
// for the quantized blocks), so every target and every kernel sees the same keys and values.

void HalvesToF32(GgmlType type, const uint8_t* HWY_RESTRICT src, size_t n, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const size_t N = hn::Lanes(df);
  size_t i = 0;
  if (type == GgmlType::F16) {
    const hn::Rebind<hwy::float16_t, decltype(df)> dh;
    const auto* h = reinterpret_cast<const hwy::float16_t*>(src);
    for (; i + N <= n; i += N) hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, h + i)), df, out + i);
  } else {  // bf16: the high half of an f32
    const hn::Rebind<uint16_t, decltype(df)> d16;
    const hn::Rebind<uint32_t, decltype(df)> d32;
    const auto* h = reinterpret_cast<const uint16_t*>(src);
    for (; i + N <= n; i += N)
      hn::StoreU(hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(d32, hn::LoadU(d16, h + i)))), df, out + i);
  }
  for (; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, src + 2 * i, 2);
    out[i] = type == GgmlType::F16 ? fp16_to_f32(b) : bf16_to_f32(b);
  }
}

// The fp16 at p as a float: one hardware conversion where the target has one (F16C on x86),
// instead of fp16_to_f32's out-of-line lookup in a 256 KiB table, which a step streaming many
// sessions' blocks keeps evicting from the caches. Exact either way, so the same bits.
HWY_INLINE float HalfToF32(const uint8_t* p) {
  const hn::CappedTag<float, 1> d1;
  const hn::Rebind<hwy::float16_t, decltype(d1)> dh1;
  return hn::GetLane(hn::PromoteTo(d1, hn::LoadU(dh1, reinterpret_cast<const hwy::float16_t*>(p))));
}

// n_blocks consecutive q8_0 blocks (34 bytes: fp16 scale, 32 int8) to 32 floats each.
void Q8_0ToF32(const uint8_t* HWY_RESTRICT src, size_t n_blocks, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<int8_t, decltype(df)> d8;
  const hn::Rebind<int32_t, decltype(df)> di;
  const int N = static_cast<int>(hn::Lanes(df));  // divides 32 on every target
  for (size_t b = 0; b < n_blocks; ++b, src += sizeof(BlockQ8_0), out += kQK) {
    const auto scale = hn::Set(df, HalfToF32(src));
    const auto* qs = reinterpret_cast<const int8_t*>(src + 2);
    for (int i = 0; i < kQK; i += N)
      hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, qs + i))), scale), df, out + i);
  }
}

// n_blocks consecutive q4_0 blocks (18 bytes: fp16 scale, 16 bytes of nibbles) to 32 floats
// each: byte j holds element j in its low nibble and element j + 16 in its high one, offset 8.
void Q4_0ToF32(const uint8_t* HWY_RESTRICT src, size_t n_blocks, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<uint8_t, decltype(df)> d8;
  const hn::Rebind<int32_t, decltype(df)> di;
  const int N = static_cast<int>(hn::Lanes(df));
  const auto low = hn::Set(di, 15), eight = hn::Set(di, 8);
  for (size_t b = 0; b < n_blocks; ++b, src += sizeof(BlockQ4_0), out += kQK) {
    const auto scale = hn::Set(df, HalfToF32(src));
    const uint8_t* qs = src + 2;
    for (int i = 0; i < kQK / 2; i += N) {
      const auto q = hn::PromoteTo(di, hn::LoadU(d8, qs + i));
      hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::Sub(hn::And(q, low), eight)), scale), df, out + i);
      hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::Sub(hn::ShiftRight<4>(q), eight)), scale), df, out + kQK / 2 + i);
    }
  }
}

// n rows of d values, contiguous (rows are whole blocks), to n * d floats.
void DequantizeRows(GgmlType type, const uint8_t* HWY_RESTRICT src, int n, int d, float* HWY_RESTRICT out) {
  const size_t values = static_cast<size_t>(n) * d;
  switch (type) {
    case GgmlType::F32: std::memcpy(out, src, values * sizeof(float)); break;
    case GgmlType::F16: case GgmlType::BF16: HalvesToF32(type, src, values, out); break;
    case GgmlType::Q8_0: Q8_0ToF32(src, values / kQK, out); break;
    case GgmlType::Q4_0: Q4_0ToF32(src, values / kQK, out); break;
    default: break;  // callers check the types (check_kv_rows) before any kernel runs
  }
}

// Rows [j0, j0 + m) as floats: in place for F32, else converted into buf (m * d floats).
HWY_INLINE const float* RowsAsF32(const KvRows& rows, int j0, int m, int d, float* HWY_RESTRICT buf) {
  const uint8_t* p = rows.data + static_cast<size_t>(j0) * rows.row_bytes;
  if (rows.type == GgmlType::F32) return reinterpret_cast<const float*>(p);
  DequantizeRows(rows.type, p, m, d, buf);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Row readers: one stored row's values as float vectors straight from the storage type, for the
// decode kernel (AttentionGroup). A decode step reads each key and value once per GQA group, so
// converting a tile into scratch first only adds a store and a reload per value; reading f16 in
// registers halves the bytes the step streams from memory and costs one widening per vector.
// Each reader gives exactly DequantizeRows' floats (the widening is exact), so the decode
// kernel's result on a stored type is the one it gives on the rows converted to f32, bit for bit.
//   Load(df, row, x): values [x, x + Lanes) for x a multiple of Lanes, x + Lanes <= d.
//   At(row, x): one value (the scalar tail of rows whose length is not a multiple of Lanes).

HWY_INLINE float HalfAt(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_f32(h);
}

struct ReadF32 {
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D df, const uint8_t* HWY_RESTRICT row, int x) {
    return hn::LoadU(df, reinterpret_cast<const float*>(row) + x);
  }
  static HWY_INLINE float At(const uint8_t* row, int x) { return reinterpret_cast<const float*>(row)[x]; }
};

struct ReadF16 {
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D df, const uint8_t* HWY_RESTRICT row, int x) {
    const hn::Rebind<hwy::float16_t, D> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(row) + x));
  }
  static HWY_INLINE float At(const uint8_t* row, int x) { return HalfAt(row + 2 * static_cast<size_t>(x)); }
};

struct ReadBF16 {  // the high half of an f32
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D df, const uint8_t* HWY_RESTRICT row, int x) {
    const hn::Rebind<uint16_t, D> d16;
    const hn::Rebind<uint32_t, D> d32;
    const auto h = hn::LoadU(d16, reinterpret_cast<const uint16_t*>(row) + x);
    return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(d32, h)));
  }
  static HWY_INLINE float At(const uint8_t* row, int x) {
    uint16_t b;
    std::memcpy(&b, row + 2 * static_cast<size_t>(x), 2);
    return bf16_to_f32(b);
  }
};

// The block of a quantized row that holds value x.
template <class Block>
HWY_INLINE const uint8_t* BlockOf(const uint8_t* row, int x) {
  return row + static_cast<size_t>(x / kQK) * sizeof(Block);
}

// q8_0 rows (34-byte blocks: fp16 scale, 32 int8): d * q, the product Q8_0ToF32 forms. A
// vector never straddles two blocks (the lanes divide 32), and its block's scale is converted
// once per vector (F16C), which the compiler shares between a block's vectors.
struct ReadQ8_0 {
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D df, const uint8_t* HWY_RESTRICT row, int x) {
    const hn::Rebind<int8_t, D> d8;
    const hn::Rebind<int32_t, D> di;
    const uint8_t* blk = BlockOf<BlockQ8_0>(row, x);
    const auto q = hn::PromoteTo(di, hn::LoadU(d8, reinterpret_cast<const int8_t*>(blk + 2) + x % kQK));
    return hn::Mul(hn::ConvertTo(df, q), hn::Set(df, HalfToF32(blk)));
  }
  static HWY_INLINE float At(const uint8_t* row, int x) {
    const uint8_t* blk = BlockOf<BlockQ8_0>(row, x);
    return static_cast<float>(reinterpret_cast<const int8_t*>(blk + 2)[x % kQK]) * HalfToF32(blk);
  }
};

// q4_0 rows (18-byte blocks: fp16 scale, 16 bytes whose low nibble is element j and high nibble
// element j + 16, offset by 8): d * (q - 8), as Q4_0ToF32 forms it.
struct ReadQ4_0 {
  template <class D>
  static HWY_INLINE hn::Vec<D> Load(D df, const uint8_t* HWY_RESTRICT row, int x) {
    const hn::Rebind<uint8_t, D> d8;
    const hn::Rebind<int32_t, D> di;
    const uint8_t* blk = BlockOf<BlockQ4_0>(row, x);
    const int e = x % kQK;  // a vector lies in one half (lanes <= 16)
    const auto bytes = hn::PromoteTo(di, hn::LoadU(d8, blk + 2 + e % (kQK / 2)));
    const auto q = e < kQK / 2 ? hn::And(bytes, hn::Set(di, 15)) : hn::ShiftRight<4>(bytes);
    return hn::Mul(hn::ConvertTo(df, hn::Sub(q, hn::Set(di, 8))), hn::Set(df, HalfToF32(blk)));
  }
  static HWY_INLINE float At(const uint8_t* row, int x) {
    const uint8_t* blk = BlockOf<BlockQ4_0>(row, x);
    const int e = x % kQK;
    const int byte = blk[2 + e % (kQK / 2)];
    return static_cast<float>((e < kQK / 2 ? byte & 15 : byte >> 4) - 8) * HalfToF32(blk);
  }
};

// f(reader) with the reader of the rows' type.
template <class F>
HWY_INLINE void WithReader(GgmlType type, const F& f) {
  switch (type) {
    case GgmlType::F16: f(ReadF16()); break;
    case GgmlType::Q8_0: f(ReadQ8_0()); break;
    case GgmlType::Q4_0: f(ReadQ4_0()); break;
    case GgmlType::BF16: f(ReadBF16()); break;
    default: f(ReadF32()); break;
  }
}

// Rows [j0, j0 + m) as the decode kernel reads them: in place, every type widened in registers
// by its reader (converting a tile into scratch first only added a store and a reload per value:
// measured, BM_DecodeTypes and BM_BatchedStep).
HWY_INLINE KvRows RowsFrom(const KvRows& rows, int j0) {
  return {rows.type, rows.data + static_cast<size_t>(j0) * rows.row_bytes, rows.row_bytes};
}

// ---------------------------------------------------------------------------------------------
// Tiled kernel for blocks of tokens.
//
// The block's query rows are transposed once into qt[x][row] (scaled), so the scores of a key
// against a vector of rows are broadcast-FMAs: pt[j][rows] = sum_x k_j[x] * qt[x][rows]. Keys are
// read in place, never transposed; the online softmax then runs down the key axis with rows in
// the lanes (no horizontal reductions), and out[row] += p[row][j] v_j keeps a tile of output
// rows in registers while streaming the tile's values.

constexpr int kKeyTile = 64;  // keys per online-softmax step
constexpr size_t kMaxLanes = 16;  // floats in the widest vector (AVX-512)
// Register tiles: kKeyStep keys x up to 4 row vectors of score accumulators, and kRowTile rows x
// 4 vectors of output accumulators, plus the loaded operands, must fit the register file
// (32 vectors on AVX-512, 16 on AVX2 and the others).
#if HWY_TARGET <= HWY_AVX3
constexpr int kKeyStep = 4;
constexpr int kRowTile = 4;
#else
constexpr int kKeyStep = 2;
constexpr int kRowTile = 2;
#endif

// pt[jj][0, NV * N) = sum_x k[jj][x] * qt[x][0, NV * N) for jj in [0, J), qt and pt with row
// strides ldq and ldp. Each score is one FMA chain over x in order from zero, whatever J and NV
// are: the statistics pass (ColumnSums) relies on getting the very same scores.
template <int J, int NV, class D>
HWY_INLINE void ScoreTile(D df, const float* HWY_RESTRICT qt, size_t ldq, const float* HWY_RESTRICT k, int d,
                          float* HWY_RESTRICT pt, size_t ldp) {
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  V a[J][NV];
  for (int jj = 0; jj < J; ++jj)
    for (int i = 0; i < NV; ++i) a[jj][i] = hn::Zero(df);
  for (int x = 0; x < d; ++x) {
    V qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = hn::Load(df, qt + x * ldq + i * N);
    for (int jj = 0; jj < J; ++jj) {
      const V b = hn::Set(df, k[static_cast<size_t>(jj) * d + x]);
      for (int i = 0; i < NV; ++i) a[jj][i] = hn::MulAdd(b, qv[i], a[jj][i]);
    }
  }
  for (int jj = 0; jj < J; ++jj)
    for (int i = 0; i < NV; ++i) hn::Store(a[jj][i], df, pt + jj * ldp + i * N);
}

template <int NV, class D>
HWY_INLINE void ScoreColumns(D df, const float* HWY_RESTRICT qt, size_t ldq, const float* HWY_RESTRICT k, int d,
                             int m, float* HWY_RESTRICT pt, size_t ldp) {
  int j = 0;
  for (; j + kKeyStep <= m; j += kKeyStep)
    ScoreTile<kKeyStep, NV>(df, qt, ldq, k + static_cast<size_t>(j) * d, d, pt + j * ldp, ldp);
  for (; j < m; ++j) ScoreTile<1, NV>(df, qt, ldq, k + static_cast<size_t>(j) * d, d, pt + j * ldp, ldp);
}

// A stored row a tile of keys ahead, requested into the caches while this tile is computed: a
// batched step streams every session's keys and values from memory, and the hardware
// prefetchers stop at each 4 KiB page (32 f16 rows of 64). Prefetches never fault, so rows
// past the end of the cache are harmless (the address is computed as an integer, no pointer
// past the end is formed).
HWY_INLINE void PrefetchTileAhead(const uint8_t* row, size_t row_bytes) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(row) + kTile * row_bytes;
  for (size_t b = 0; b < row_bytes; b += 64) hwy::Prefetch(reinterpret_cast<const uint8_t*>(ahead + b));
}

// o[r][x0, x0 + NV * N) = corr[r] * o[r][...] + sum_{j < m} p(j, r) v_j[...] for r in [0, R),
// with the weights p(j, r) = pt[j * ld + r * rs] and value row j stored at v + j * row_bytes
// and read by VR.
template <int R, int NV, class VR, class D>
HWY_INLINE void AccumulateRows(D df, float* HWY_RESTRICT o, int d, const float* HWY_RESTRICT pt, size_t ld, size_t rs,
                               const float* HWY_RESTRICT corr, const uint8_t* HWY_RESTRICT v, size_t row_bytes, int m,
                               int x0) {
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  V a[R][NV];
  for (int r = 0; r < R; ++r) {
    const V c = hn::Set(df, corr[r]);
    for (int i = 0; i < NV; ++i) a[r][i] = hn::Mul(hn::LoadU(df, o + r * d + x0 + i * N), c);
  }
  const uint8_t* HWY_RESTRICT vj = v;
  for (int j = 0; j < m; ++j, vj += row_bytes) {
    if (x0 == 0) PrefetchTileAhead(vj, row_bytes);
    V vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = VR::Load(df, vj, x0 + i * N);
    for (int r = 0; r < R; ++r) {
      const V b = hn::Set(df, pt[j * ld + r * rs]);
      for (int i = 0; i < NV; ++i) a[r][i] = hn::MulAdd(b, vv[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) hn::StoreU(a[r][i], df, o + r * d + x0 + i * N);
}

template <int R, class VR, class D>
HWY_INLINE void AccumulateAllColumns(D df, float* HWY_RESTRICT o, int d, const float* HWY_RESTRICT pt, size_t ld,
                                     size_t rs, const float* HWY_RESTRICT corr, const uint8_t* HWY_RESTRICT v, size_t row_bytes,
                                     int m) {
  const int N = static_cast<int>(hn::Lanes(df));
  const int d_vec = d / N * N;
  int x0 = 0;
  for (; x0 + 4 * N <= d_vec; x0 += 4 * N) AccumulateRows<R, 4, VR>(df, o, d, pt, ld, rs, corr, v, row_bytes, m, x0);
  for (; x0 < d_vec; x0 += N) AccumulateRows<R, 1, VR>(df, o, d, pt, ld, rs, corr, v, row_bytes, m, x0);
  for (int r = 0; r < R; ++r)  // scalar tail when d is not a multiple of the lanes
    for (int x = d_vec; x < d; ++x) {
      float acc = o[r * d + x] * corr[r];
      for (int j = 0; j < m; ++j) acc = std::fma(pt[j * ld + r * rs], VR::At(v + static_cast<size_t>(j) * row_bytes, x), acc);
      o[r * d + x] = acc;
    }
}

template <int Max, class F>
HWY_INLINE void ForTiles(int n, const F& f) {
  int i = 0;
  for (; i + Max <= n; i += Max) f(i, std::integral_constant<int, Max>());
  switch (n - i) {
    case 1: f(i, std::integral_constant<int, 1>()); break;
    case 2: if constexpr (Max > 2) f(i, std::integral_constant<int, 2>()); break;
    case 3: if constexpr (Max > 3) f(i, std::integral_constant<int, 3>()); break;
    default: break;
  }
}

// Per-key dot products, with the horizontal sums shared between keys. For K consecutive keys
// (K a power of two, at most the lanes N) and NQ query rows, out[i] holds in lanes
// [k * N / K, (k + 1) * N / K) partial sums of <q_i, key k> that add up to the whole product:
// one key is a vector FMA chain over x; two halves of K keys combine by adding their vectors'
// even and odd lanes (ConcatEven + ConcatOdd), which halves each key's lanes. At K = N lane k is
// key k's dot product, and the N keys cost N - 1 combines per row instead of N full lane sums.
// The order of the additions depends only on d and the target, never on the key type (each
// reader gives the f32 rows' values), so a stored type gives its f32 rows' bits.
template <int K, int NQ, class KR, class D>
HWY_INLINE void KeyBlockSums(D df, const float* const* HWY_RESTRICT qs, const uint8_t* HWY_RESTRICT row,
                             size_t row_bytes, int d_vec, hn::Vec<D>* HWY_RESTRICT out) {
  if constexpr (K == 1) {
    const int N = static_cast<int>(hn::Lanes(df));
    PrefetchTileAhead(row, row_bytes);
    for (int i = 0; i < NQ; ++i) out[i] = hn::Zero(df);
    for (int x = 0; x < d_vec; x += N) {
      const auto k = KR::Load(df, row, x);
      for (int i = 0; i < NQ; ++i) out[i] = hn::MulAdd(hn::LoadU(df, qs[i] + x), k, out[i]);
    }
  } else {
#if HWY_TARGET != HWY_SCALAR  // one lane: only K == 1
    hn::Vec<D> lo[NQ], hi[NQ];
    KeyBlockSums<K / 2, NQ, KR>(df, qs, row, row_bytes, d_vec, lo);
    KeyBlockSums<K / 2, NQ, KR>(df, qs, row + (K / 2) * row_bytes, row_bytes, d_vec, hi);
    for (int i = 0; i < NQ; ++i) out[i] = hn::Add(hn::ConcatEven(df, hi[i], lo[i]), hn::ConcatOdd(df, hi[i], lo[i]));
#endif
  }
}

// Scores of keys [j0, j0 + m) against NQ query rows: s[i][j] = scale * <q_i, k_j0+j>. Each key
// vector is read (and widened, per KR) once for all the rows. Keys go a block of N at a time
// (KeyBlockSums: one vector of N dot products per row); the last m % N keys, and every key on
// the one-lane target, take a lane sum each. Heads whose size is not a multiple of the lanes
// add their scalar tail to each dot product after the vector part.
template <int NQ, class KR, class D>
HWY_INLINE void GroupScores(D df, const float* const* qs, const KvRows& kr, int j0, int m, int d, float scale,
                            float (*s)[kTile]) {
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  const int d_vec = d / N * N;
  const uint8_t* row = kr.data + static_cast<size_t>(j0) * kr.row_bytes;
  // An explicit fma in the scalar tails: left to the compiler, contraction could differ between
  // the readers' instantiations, and a type would no longer give its f32 rows' bits.
  const auto add_tail = [&](int i, const uint8_t* key, float dot) {
    for (int x = d_vec; x < d; ++x) dot = std::fma(qs[i][x], KR::At(key, x), dot);
    return dot;
  };
  int j = 0;
#if HWY_TARGET != HWY_SCALAR
  constexpr int kBlock = static_cast<int>(hn::MaxLanes(D()));
  static_assert(kTile % kBlock == 0, "score blocks must tile the key tile (aligned stores)");
  const V vscale = hn::Set(df, scale);
  for (; j + kBlock <= m; j += kBlock, row += kBlock * kr.row_bytes) {
    V dots[NQ];
    KeyBlockSums<kBlock, NQ, KR>(df, qs, row, kr.row_bytes, d_vec, dots);
    for (int i = 0; i < NQ; ++i) {
      if (d_vec < d) {
        hn::Store(dots[i], df, &s[i][j]);
        for (int k = 0; k < kBlock; ++k) s[i][j + k] = add_tail(i, row + k * kr.row_bytes, s[i][j + k]);
        dots[i] = hn::Load(df, &s[i][j]);
      }
      hn::Store(hn::Mul(dots[i], vscale), df, &s[i][j]);
    }
  }
#endif
  for (; j < m; ++j, row += kr.row_bytes) {
    V acc[NQ];
    KeyBlockSums<1, NQ, KR>(df, qs, row, kr.row_bytes, d_vec, acc);
    for (int i = 0; i < NQ; ++i) s[i][j] = add_tail(i, row, hn::GetLane(hn::SumOfLanes(df, acc[i]))) * scale;
  }
}

// One token's GQA group (see attention_group_f32) against keys [j_begin, j_end). Per tile of
// keys: one dot product per key and query row (keys read in place by their type's reader, GroupScores),
// the row maxima (exact in any order) and sums (lane-wise over the tile's vectors of weights),
// and the weighted values with the output rows held in registers across the tile
// (AccumulateAllColumns, values read the same way, weights straight from the score rows).
void AttentionGroup(const float* HWY_RESTRICT q, int n_q, const KvRows* kr, const KvRows* vr, int j_begin,
                    int j_end, int d, float scale, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  const int d_vec = d / N * N;  // SIMD part of each row; the rest (if any) is scalar
  HWY_ALIGN float s[kMaxQ][kTile];  // scores, then softmax weights

  for (int q0 = 0; q0 < n_q; q0 += kMaxQ) {
    const int nq = std::min(kMaxQ, n_q - q0);
    const float* qs[kMaxQ];
    float* o = out + static_cast<size_t>(q0) * d;  // nq rows of d
    float run_max[kMaxQ], run_sum[kMaxQ], corr[kMaxQ];
    for (int i = 0; i < nq; ++i) {
      qs[i] = q + static_cast<size_t>(q0 + i) * d;
      run_max[i] = -INFINITY;
      run_sum[i] = 0.0f;
    }
    std::fill(o, o + static_cast<size_t>(nq) * d, 0.0f);
    for (int j0 = j_begin; j0 < j_end; j0 += kTile) {
      const int m = std::min(kTile, j_end - j0);
      const KvRows kt = RowsFrom(*kr, j0);
      WithReader(kt.type, [&](auto reader) {
        ForTiles<kMaxQ>(nq, [&](int, auto rows) {
          GroupScores<decltype(rows)::value, decltype(reader)>(df, qs, kt, 0, m, d, scale, s);
        });
      });
      // Online softmax: rescale what was accumulated when the running maximum grows.
      const V floor = hn::Set(df, -87.0f);  // exp underflows to ~0 below; keeps Exp in range
      for (int i = 0; i < nq; ++i) {
        int j = 0;
        V vmax = hn::Set(df, -INFINITY);
        for (; j + N <= m; j += N) vmax = hn::Max(vmax, hn::Load(df, &s[i][j]));
        float tile_max = hn::GetLane(hn::MaxOfLanes(df, vmax));
        for (; j < m; ++j) tile_max = std::max(tile_max, s[i][j]);
        corr[i] = 1.0f;
        if (tile_max > run_max[i]) {
          corr[i] = std::exp(run_max[i] - tile_max);  // 0 on the first tile
          run_sum[i] *= corr[i];
          run_max[i] = tile_max;
        }
        const auto vrun = hn::Set(df, run_max[i]);
        V vsum = hn::Zero(df);  // the tile's weights summed lane-wise, then the lanes, then the tail
        j = 0;
        for (; j + N <= m; j += N) {
          const V p = hn::CallExp(df, hn::Max(hn::Sub(hn::Load(df, &s[i][j]), vrun), floor));
          hn::Store(p, df, &s[i][j]);
          vsum = hn::Add(vsum, p);
        }
        float tile_sum = hn::GetLane(hn::SumOfLanes(df, vsum));
        for (; j < m; ++j) tile_sum += (s[i][j] = std::exp(s[i][j] - run_max[i]));
        run_sum[i] += tile_sum;
      }
      // Weighted values: o[i] = corr[i] * o[i] + sum_j p[i][j] v_j.
      const KvRows vt = RowsFrom(*vr, j0);
      WithReader(vt.type, [&](auto reader) {
        ForTiles<kRowTile>(nq, [&](int r, auto nr) {
          AccumulateAllColumns<decltype(nr)::value, decltype(reader)>(df, o + static_cast<size_t>(r) * d, d, s[r], 1,
                                                                       kTile, corr + r, vt.data, vt.row_bytes, m);
        });
      });
    }
    for (int i = 0; i < nq; ++i) {
      if (run_sum[i] <= 0.0f) continue;
      float* oi = o + static_cast<size_t>(i) * d;
      const auto inv = hn::Set(df, 1.0f / run_sum[i]);
      for (int x = 0; x < d_vec; x += N) hn::StoreU(hn::Mul(hn::LoadU(df, oi + x), inv), df, oi + x);
      for (int x = d_vec; x < d; ++x) oi[x] /= run_sum[i];
    }
  }
}

// Whether key j is in each lane's row's visible slots [first, cnt) (in float, exact to 2^24).
template <class D>
HWY_INLINE auto Seen(D df, int j, hn::Vec<D> first, hn::Vec<D> cnt) {
  const auto jv = hn::Set(df, static_cast<float>(j));
  return hn::And(hn::Lt(jv, cnt), hn::Le(first, jv));
}

// Online softmax down the key axis over one tile of scores pt[j][row] (keys [j0, j0 + m)), a
// vector of rows at a time for row vectors [v_lo, v_hi): rescale what was accumulated when a
// row's running maximum grows (corr), overwrite the scores with exp(s - max) (0 for keys a row
// must not see: first[row], cnt[row] bound its visible slots, in float) and add them to run_sum.
// A row's state depends only on its own scores and visible slots.
template <class D>
HWY_INLINE void SoftmaxStep(D df, float* HWY_RESTRICT pt, size_t ld, int j0, int m, int v_lo, int v_hi,
                            const float* HWY_RESTRICT first, const float* HWY_RESTRICT cnt,
                            float* HWY_RESTRICT run_max, float* HWY_RESTRICT run_sum, float* HWY_RESTRICT corr) {
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  const V floor = hn::Set(df, -87.0f);  // exp underflows to ~0 below; keeps Exp in range
  const V neg_inf = hn::Set(df, -INFINITY);
  for (int i = v_lo; i < v_hi; ++i) {
    const size_t c = static_cast<size_t>(i) * N;
    const V vcnt = hn::Load(df, cnt + c), vfirst = hn::Load(df, first + c);
    V vmax = neg_inf;
    for (int j = 0; j < m; ++j) {
      const auto seen = Seen(df, j0 + j, vfirst, vcnt);
      vmax = hn::Max(vmax, hn::IfThenElse(seen, hn::Load(df, pt + j * ld + c), neg_inf));
    }
    const V old_max = hn::Load(df, run_max + c);
    const V new_max = hn::Max(old_max, vmax);
    // Rows that have seen no key yet keep max -inf (and zero sums): no rescaling.
    const auto none = hn::Eq(new_max, neg_inf);
    const V vc = hn::IfThenElse(none, hn::Set(df, 1.0f),
                                hn::CallExp(df, hn::Max(hn::Sub(hn::IfThenElse(none, new_max, old_max), new_max), floor)));
    V vsum = hn::Zero(df);
    for (int j = 0; j < m; ++j) {
      const auto seen = Seen(df, j0 + j, vfirst, vcnt);
      const V e = hn::CallExp(df, hn::Max(hn::Sub(hn::Load(df, pt + j * ld + c), new_max), floor));
      const V p = hn::IfThenElseZero(seen, e);
      hn::Store(p, df, pt + j * ld + c);
      vsum = hn::Add(vsum, p);
    }
    hn::Store(new_max, df, run_max + c);
    hn::Store(vc, df, corr + c);
    hn::Store(hn::MulAdd(hn::Load(df, run_sum + c), vc, vsum), df, run_sum + c);
  }
}

// Floats of each scratch region, padded to whole 64-byte lines.
inline size_t Pad16(size_t n) { return (n + 15) / 16 * 16; }

// v == nullptr: softmax state only (no weighted values, out unused). row_max / row_sum (both or
// neither): each row's final running maximum and sum, at [t * stat_stride + i] for row i of
// token t; they depend only on the row's query and the keys it sees.
void AttentionBlock(const float* HWY_RESTRICT q, size_t q_stride, int n_tok, int n_q, const KvRows* k,
                    const KvRows* v, const int* HWY_RESTRICT visible, const int* HWY_RESTRICT first, int d,
                    float scale, float* HWY_RESTRICT out, size_t out_stride, float* HWY_RESTRICT row_max,
                    float* HWY_RESTRICT row_sum, size_t stat_stride, uint8_t* scratch) {
  const hn::ScalableTag<float> df;
  const int N = static_cast<int>(hn::Lanes(df));
  const int rows = n_tok * n_q;
  if (rows <= 0) return;
  const size_t ld = Pad16(static_cast<size_t>(rows));  // a whole number of vectors on every target

  // Scratch (sized by block_scratch_bytes): transposed queries, scores/weights, output
  // accumulators, per-row visible count and softmax state, first visible slot, and a tile of
  // keys and one of values converted to floats.
  float* qt = reinterpret_cast<float*>(scratch);
  float* pt = qt + static_cast<size_t>(d) * ld;
  float* o = pt + kKeyTile * ld;
  float* cnt = o + Pad16(static_cast<size_t>(rows) * d);
  float* run_max = cnt + ld;
  float* run_sum = run_max + ld;
  float* corr = run_sum + ld;
  float* lo = corr + ld;
  float* kbuf = lo + ld;
  float* vbuf = kbuf + static_cast<size_t>(kKeyTile) * d;
  const size_t row_f32 = static_cast<size_t>(d) * sizeof(float);  // a converted value row

  const auto first_of = [&](int t) { return first != nullptr ? first[t] : 0; };
  // Tiles start at multiples of kKeyTile from slot 0 whatever the window, so a row's arithmetic
  // is the same in every block and call (the statistics pass relies on it).
  int n_max = 0, j_min = INT32_MAX;
  for (int t = 0; t < n_tok; ++t)
    if (visible[t] > first_of(t)) n_max = std::max(n_max, visible[t]), j_min = std::min(j_min, first_of(t));
  for (size_t r = 0; r < ld; ++r) {
    const bool real = r < static_cast<size_t>(rows);
    const float* qr = real ? q + (r / n_q) * q_stride + (r % n_q) * d : nullptr;
    for (int x = 0; x < d; ++x) qt[x * ld + r] = real ? qr[x] * scale : 0.0f;
    // Counts are exact in float up to 2^24 keys.
    cnt[r] = real ? static_cast<float>(visible[r / n_q]) : 0.0f;
    lo[r] = real ? static_cast<float>(first_of(static_cast<int>(r / n_q))) : 0.0f;
    run_max[r] = -INFINITY;
    run_sum[r] = 0.0f;
    corr[r] = 1.0f;
  }
  if (v != nullptr) std::fill(o, o + static_cast<size_t>(rows) * d, 0.0f);

  for (int j0 = n_max > 0 ? j_min / kKeyTile * kKeyTile : 0; j0 < n_max; j0 += kKeyTile) {
    // Rows that see any key of this tile: [r_lo, r_hi). With causal counts that is a suffix of
    // the block; rows inside it that see none get zero weights and keep their state.
    int r_lo = rows, r_hi = 0, n_hi = 0;
    for (int t = 0; t < n_tok; ++t)
      if (visible[t] > j0 && first_of(t) < j0 + kKeyTile && visible[t] > first_of(t))
        r_lo = std::min(r_lo, t * n_q), r_hi = (t + 1) * n_q, n_hi = std::max(n_hi, visible[t]);
    if (r_lo >= r_hi) continue;  // a sliding window can skip a tile for the whole block
    const int m = std::min(kKeyTile, n_hi - j0);  // keys any active row sees
    const int v_lo = r_lo / N, v_hi = (r_hi + N - 1) / N;  // row vectors

    const float* kt = RowsAsF32(*k, j0, m, d, kbuf);
    ForTiles<4>(v_hi - v_lo, [&](int i, auto nv) {
      const size_t c = static_cast<size_t>(v_lo + i) * N;
      ScoreColumns<decltype(nv)::value>(df, qt + c, ld, kt, d, m, pt + c, ld);
    });

    SoftmaxStep(df, pt, ld, j0, m, v_lo, v_hi, lo, cnt, run_max, run_sum, corr);

    if (v == nullptr) continue;
    const float* vt = RowsAsF32(*v, j0, m, d, vbuf);
    ForTiles<kRowTile>(r_hi - r_lo, [&](int i, auto nr) {
      const int r = r_lo + i;
      AccumulateAllColumns<decltype(nr)::value, ReadF32>(df, o + static_cast<size_t>(r) * d, d, pt + r, ld, 1, corr + r,
                                                         reinterpret_cast<const uint8_t*>(vt), row_f32, m);
    });
  }

  if (row_max != nullptr)
    for (int r = 0; r < rows; ++r) {
      row_max[(r / n_q) * stat_stride + r % n_q] = run_max[r];
      row_sum[(r / n_q) * stat_stride + r % n_q] = run_sum[r];
    }
  if (v == nullptr) return;
  for (int r = 0; r < rows; ++r) {
    float* dst = out + (r / n_q) * out_stride + static_cast<size_t>(r % n_q) * d;
    const float* src = o + static_cast<size_t>(r) * d;
    const float inv = run_sum[r] > 0.0f ? 1.0f / run_sum[r] : 0.0f;
    for (int x = 0; x < d; ++x) dst[x] = src[x] * inv;
  }
}

// ---------------------------------------------------------------------------------------------
// Attention statistics, pass 2: one KV head's stat rows against one tile of keys [j0, j0 + m).
//
// Row r (a query head of a token, rows in token order) gives key j the weight
//   c[r][j] = exp(max(s[r][j] - rmax[r], -87)) * rw[r]   (0 for keys it does not see),
// with s the same FMA-chain score as AttentionBlock computes, rmax the row's final maximum there
// and rw = share / row sum. Each key's column sums then add c[r][j] one row at a time in row
// order, starting from their current value, so a sum does not depend on how the rows are split
// into calls or tiles: rows [0, sum_rows) add to sum, rows [last_lo, rows) to last (both over
// keys [0, m) of the tile; either may be null). Scores are computed with rows in the lanes, like
// AttentionBlock, from queries transposed once per call (qt[x][row], scaled, ldq floats a row);
// the per-key additions are scalar, each key's sum a chain of its own.

// acc[j] += pt[j][r] for r in [r0, r1), in that order, for j in [0, m).
inline void AddRows(float* HWY_RESTRICT acc, const float* HWY_RESTRICT pt, size_t ldp, int m, int r0, int r1) {
  if (r0 >= r1) return;
  int j = 0;
  for (; j + 4 <= m; j += 4) {  // four independent chains hide the add latency
    const float* p0 = pt + j * ldp;
    float a0 = acc[j], a1 = acc[j + 1], a2 = acc[j + 2], a3 = acc[j + 3];
    for (int r = r0; r < r1; ++r) {
      a0 += p0[r];
      a1 += p0[ldp + r];
      a2 += p0[2 * ldp + r];
      a3 += p0[3 * ldp + r];
    }
    acc[j] = a0, acc[j + 1] = a1, acc[j + 2] = a2, acc[j + 3] = a3;
  }
  for (; j < m; ++j) {
    float a = acc[j];
    for (int r = r0; r < r1; ++r) a += pt[j * ldp + r];
    acc[j] = a;
  }
}

// pt[j][0, N) (scores of keys j0 + j, j < m, for one vector of rows) becomes the rows' weights
// exp(max(s - rmax, -87)) * rw, 0 for keys a row does not see (rfirst, rvis: its visible slots
// [first, count) in float).
template <class D>
HWY_INLINE void Weights(D df, float* HWY_RESTRICT pt, size_t ldp, int j0, int m, const float* HWY_RESTRICT rmax,
                        const float* HWY_RESTRICT rw, const float* HWY_RESTRICT rfirst,
                        const float* HWY_RESTRICT rvis) {
  using V = decltype(hn::Zero(df));
  const V floor = hn::Set(df, -87.0f);  // as SoftmaxStep
  const V vm = hn::Load(df, rmax), vw = hn::Load(df, rw), vcnt = hn::Load(df, rvis), vfirst = hn::Load(df, rfirst);
  for (int j = 0; j < m; ++j) {
    float* pj = pt + j * ldp;
    const auto seen = Seen(df, j0 + j, vfirst, vcnt);
    const V e = hn::CallExp(df, hn::Max(hn::Sub(hn::Load(df, pj), vm), floor));
    hn::Store(hn::Mul(hn::IfThenElseZero(seen, e), vw), df, pj);
  }
}

// pt: scratch of kKeyTile * (4 * Lanes + d) floats (scores, then the tile's keys as floats).
void ColumnSums(const float* HWY_RESTRICT qt, size_t ldq, int rows, const float* HWY_RESTRICT rmax,
                const float* HWY_RESTRICT rw, const float* HWY_RESTRICT rfirst, const float* HWY_RESTRICT rvis,
                int sum_rows, int last_lo, const KvRows* k, int d, int j0, int m, float* HWY_RESTRICT sum,
                float* HWY_RESTRICT last, float* HWY_RESTRICT pt) {
  const hn::ScalableTag<float> df;
  const int N = static_cast<int>(hn::Lanes(df));
  const size_t ldp = 4 * static_cast<size_t>(N);
  if (sum == nullptr) sum_rows = 0;
  if (last == nullptr) last_lo = rows;
  // Rows that see a key of the tile and add somewhere.
  int r_lo = rows, r_hi = 0;
  const float tile_lo = static_cast<float>(j0), tile_hi = static_cast<float>(j0 + m);
  for (int r = 0; r < rows; ++r)
    if (rvis[r] > tile_lo && rfirst[r] < tile_hi && (r < sum_rows || r >= last_lo))
      r_lo = std::min(r_lo, r), r_hi = r + 1;
  if (r_lo >= r_hi || m <= 0) return;
  const float* kt = RowsAsF32(*k, j0, m, d, pt + static_cast<size_t>(kKeyTile) * ldp);

  HWY_ALIGN float acc_sum[kKeyTile], acc_last[kKeyTile];
  if (sum != nullptr) std::copy(sum, sum + m, acc_sum);
  if (last != nullptr) std::copy(last, last + m, acc_last);
  const int v_lo = r_lo / N, v_hi = (r_hi + N - 1) / N;
  for (int c0 = v_lo; c0 < v_hi; c0 += 4) {
    const int nv = std::min(4, v_hi - c0);
    const float* qc = qt + static_cast<size_t>(c0) * N;
    switch (nv) {
      case 1: ScoreColumns<1>(df, qc, ldq, kt, d, m, pt, ldp); break;
      case 2: ScoreColumns<2>(df, qc, ldq, kt, d, m, pt, ldp); break;
      case 3: ScoreColumns<3>(df, qc, ldq, kt, d, m, pt, ldp); break;
      default: ScoreColumns<4>(df, qc, ldq, kt, d, m, pt, ldp); break;
    }
    for (int i = 0; i < nv; ++i) {
      const size_t c = static_cast<size_t>(c0 + i) * N;
      Weights(df, pt + static_cast<size_t>(i) * N, ldp, j0, m, rmax + c, rw + c, rfirst + c, rvis + c);
    }
    const int base = c0 * N;
    const int lo = std::max(r_lo, base), hi = std::min(r_hi, base + nv * N);
    if (sum != nullptr) AddRows(acc_sum, pt, ldp, m, lo - base, std::min(hi, sum_rows) - base);
    if (last != nullptr) AddRows(acc_last, pt, ldp, m, std::max(lo, last_lo) - base, hi - base);
  }
  if (sum != nullptr) std::copy(acc_sum, acc_sum + m, sum);
  if (last != nullptr) std::copy(acc_last, acc_last + m, last);
}

// Both passes for a few rows (a decode step: one token's group), one KV head, all its keys: the
// scores are computed once and kept (scores[j][row], ldq floats a key), the running maximum and
// sum follow AttentionBlock's online softmax step for step (so they are its values bit for bit),
// then the weights and column sums are exactly ColumnSums'. Avoids a second score pass, which
// for one vector of rows costs as much as the first, and most second exponentials: where a
// tile's running maximum already was the final one, its exp(s - max) are the weights' (kept in
// probs). n: keys any row sees; sum / last cover [0, n). work: (2 n + ceil(n / kKeyTile) + 4) ldq
// + kKeyTile d floats (the last part holds a tile of keys as floats).

void SmallColumnSums(const float* HWY_RESTRICT qt, size_t ldq, int rows, float share,
                     const float* HWY_RESTRICT rfirst, const float* HWY_RESTRICT rvis, int n, int sum_rows,
                     int last_lo, const KvRows* k, int d, float* HWY_RESTRICT sum, float* HWY_RESTRICT last,
                     float* HWY_RESTRICT work) {
  const hn::ScalableTag<float> df;
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  if (sum == nullptr) sum_rows = 0;
  if (last == nullptr) last_lo = rows;
  const int nv = (rows + N - 1) / N;
  float* scores = work;
  float* probs = scores + static_cast<size_t>(n) * ldq;
  float* tile_max = probs + static_cast<size_t>(n) * ldq;  // running maximum after each tile
  float* run_max = tile_max + static_cast<size_t>((n + kKeyTile - 1) / kKeyTile) * ldq;
  float* run_sum = run_max + ldq;
  float* corr = run_sum + ldq;
  float* rw = corr + ldq;
  float* kbuf = rw + ldq;
  for (size_t r = 0; r < ldq; ++r) run_max[r] = -INFINITY, run_sum[r] = 0.0f, corr[r] = 1.0f;
  // Tiles before every row's first visible slot (a sliding window) are skipped; the rest start
  // at multiples of kKeyTile, as in AttentionBlock.
  float lowest = static_cast<float>(n);
  for (int r = 0; r < rows; ++r) lowest = std::min(lowest, rfirst[r]);
  const int j_start = static_cast<int>(lowest) / kKeyTile * kKeyTile;
  for (int j0 = j_start; j0 < n; j0 += kKeyTile) {
    const int m = std::min(kKeyTile, n - j0);
    float* st = scores + static_cast<size_t>(j0) * ldq;
    float* pt = probs + static_cast<size_t>(j0) * ldq;
    const float* kt = RowsAsF32(*k, j0, m, d, kbuf);
    ForTiles<4>(nv, [&](int i, auto nvt) {
      const size_t c = static_cast<size_t>(i) * N;
      ScoreColumns<decltype(nvt)::value>(df, qt + c, ldq, kt, d, m, st + c, ldq);
    });
    std::copy(st, st + static_cast<size_t>(m) * ldq, pt);
    SoftmaxStep(df, pt, ldq, j0, m, 0, nv, rfirst, rvis, run_max, run_sum, corr);
    std::copy(run_max, run_max + ldq, tile_max + static_cast<size_t>(j0 / kKeyTile) * ldq);
  }
  // As the driver: a row that sees no key adds nothing.
  for (int r = 0; r < rows; ++r) rw[r] = rvis[r] > 0.0f && run_sum[r] > 0.0f ? share / run_sum[r] : 0.0f;
  for (size_t r = rows; r < ldq; ++r) rw[r] = 0.0f;
  HWY_ALIGN float acc[kKeyTile];
  for (int j0 = j_start; j0 < n; j0 += kKeyTile) {
    const int m = std::min(kKeyTile, n - j0);
    float* st = scores + static_cast<size_t>(j0) * ldq;
    const float* pt = probs + static_cast<size_t>(j0) * ldq;
    const float* tm = tile_max + static_cast<size_t>(j0 / kKeyTile) * ldq;
    for (int i = 0; i < nv; ++i) {
      const size_t c = static_cast<size_t>(i) * N;
      const V vcnt = hn::Load(df, rvis + c), vm = hn::Load(df, run_max + c), vfirst = hn::Load(df, rfirst + c);
      // Lanes that see none of the tile weigh 0 either way; rows that see no key are among them.
      const auto unseen = hn::Or(hn::Le(vcnt, hn::Set(df, static_cast<float>(j0))),
                                 hn::Ge(vfirst, hn::Set(df, static_cast<float>(j0 + m))));
      const auto kept = hn::Or(hn::Eq(hn::Load(df, tm + c), vm), unseen);
      if (hn::AllTrue(df, kept)) {
        const V vw = hn::Load(df, rw + c);
        for (int j = 0; j < m; ++j) hn::Store(hn::Mul(hn::Load(df, pt + j * ldq + c), vw), df, st + j * ldq + c);
      } else {
        HWY_ALIGN float rmax[kMaxLanes];
        for (int l = 0; l < N; ++l) rmax[l] = rvis[c + l] > 0.0f ? run_max[c + l] : 0.0f;
        Weights(df, st + c, ldq, j0, m, rmax, rw + c, rfirst + c, rvis + c);
      }
    }
    // Rows of a tile that do not see it add exact zeros: no need to skip them.
    if (sum != nullptr && sum_rows > 0) {
      std::copy(sum + j0, sum + j0 + m, acc);
      AddRows(acc, st, ldq, m, 0, sum_rows);
      std::copy(acc, acc + m, sum + j0);
    }
    if (last != nullptr && last_lo < rows) {
      std::copy(last + j0, last + j0 + m, acc);
      AddRows(acc, st, ldq, m, last_lo, rows);
      std::copy(acc, acc + m, last + j0);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace qf
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qf {
HWY_EXPORT(AttentionGroup);
HWY_EXPORT(AttentionBlock);
HWY_EXPORT(ColumnSums);
HWY_EXPORT(SmallColumnSums);
HWY_EXPORT(DequantizeRows);

namespace {

// Query rows per tiled block: enough to amortise transposing each key tile (d * 64 moves) over
// many rows, few enough that a 256-token chunk still splits into a few dozen work items.
constexpr int kBlockRows = 96;
// Below this many tokens per call the per-token kernel wins: a block of a few rows cannot pay
// for transposing the keys. Measured with bench/attention_bench.cpp.
constexpr int kMinTiledTokens = 2;
constexpr int kKeyTileOnce = 64;  // = kKeyTile of the SIMD code: keys per statistics work item
constexpr size_t kMaxLanes = 16;  // AVX-512 floats; bounds the statistics scratch

size_t block_scratch_bytes(int rows, int d) {
  const auto pad = [](size_t n) { return (n + 15) / 16 * 16; };
  const size_t ld = pad(static_cast<size_t>(rows));
  const size_t tiles = 2 * static_cast<size_t>(kKeyTileOnce) * d;  // a key tile and a value tile as floats
  return (static_cast<size_t>(d) * ld + 64 * ld + pad(static_cast<size_t>(rows) * d) + 5 * ld + tiles) * sizeof(float);
}

void check_dim(int d) {
  if (d <= 0 || d > kAttentionMaxDim) fail("attention: head_dim ", d, " is not in [1, ", kAttentionMaxDim, "]");
}

void check_layer(int n_heads, const AttentionKv* kv, int n_kv, int d) {
  check_dim(d);
  if (n_kv <= 0 || n_heads % n_kv != 0) fail("attention: ", n_heads, " query heads do not group over ", n_kv, " KV heads");
  for (int g = 0; g < n_kv; ++g) {
    check_kv_rows(kv[g].k, d);
    check_kv_rows(kv[g].v, d);
  }
}

int first_slot(const AttentionKv& h, int t) { return h.first != nullptr ? h.first[t] : 0; }

// Every token's visible slots must be a range [first, visible) of non-negative slots.
void check_slots(const AttentionKv* kv, int n_kv, int n_tok) {
  for (int g = 0; g < n_kv; ++g)
    for (int t = 0; t < n_tok; ++t)
      if (kv[g].visible[t] < 0 || first_slot(kv[g], t) < 0 || first_slot(kv[g], t) > kv[g].visible[t])
        fail("attention: token ", t, " sees slots [", first_slot(kv[g], t), ", ", kv[g].visible[t], ")");
}

// Work items taken costliest first from a shared counter: fn(item, thread) for every item, each
// exactly once, on at most `n_threads` threads. The caller's results must not depend on which
// thread runs an item.
template <class Item, class F>
void run_costliest_first(std::vector<Item>& items, int n_threads, ThreadPool& pool, const F& fn) {
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::atomic<size_t> next{0};
  pool.run([&](int thread, int) {
    if (thread >= n_threads) return;
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items.size();) fn(items[i], thread);
  });
}

// The tiled kernel over a whole layer. out == nullptr: softmax state only. row_max / row_sum
// (both or neither, [n_tok][n_heads]): each row's final running maximum and sum.
void tiled_layer(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                 float* out, float* row_max, float* row_sum, ThreadPool& pool) {
  const int group = n_heads / n_kv;
  const size_t tok_stride = static_cast<size_t>(n_heads) * d;
  // One work item = (block of consecutive tokens, KV head). The blocks are fixed by the shapes
  // alone, and each row's result does not depend on its block, so the output is the same for
  // any pool size. Items differ in cost (causal: later tokens see more keys), so threads take
  // them costliest first from a shared counter rather than in static chunks.
  const int block_tok = std::max(1, kBlockRows / group);
  const int n_blocks = (n_tok + block_tok - 1) / block_tok;
  struct Item {
    int64_t cost;
    int block, head;
  };
  std::vector<Item> items;
  items.reserve(static_cast<size_t>(n_blocks) * n_kv);
  for (int b = 0; b < n_blocks; ++b)
    for (int g = 0; g < n_kv; ++g) {
      const int t0 = b * block_tok, t1 = std::min(n_tok, t0 + block_tok);
      int64_t keys = 0;
      for (int t = t0; t < t1; ++t) keys = std::max<int64_t>(keys, kv[g].visible[t] - first_slot(kv[g], t));
      items.push_back({keys * (t1 - t0), b, g});
    }

  // Scratch for every thread, allocated here so that workers never throw.
  const size_t bytes = (block_scratch_bytes(block_tok * group, d) + 63) / 64 * 64;
  const int n_threads = std::min<int>(pool.size(), static_cast<int>(items.size()));
  auto scratch = hwy::AllocateAligned<uint8_t>(bytes * n_threads);
  if (!scratch) fail("attention: out of memory allocating ", bytes * n_threads, " bytes of scratch");
  run_costliest_first(items, n_threads, pool, [&](const Item& it, int thread) {
    const int t0 = it.block * block_tok, nt = std::min(n_tok - t0, block_tok);
    const size_t off = t0 * tok_stride + static_cast<size_t>(it.head) * group * d;
    const size_t stat_off = static_cast<size_t>(t0) * n_heads + static_cast<size_t>(it.head) * group;
    const AttentionKv& h = kv[it.head];
    HWY_DYNAMIC_DISPATCH(AttentionBlock)(q + off, tok_stride, nt, group, &h.k, out ? &h.v : nullptr,
                                         h.visible + t0, h.first ? h.first + t0 : nullptr, d, scale,
                                         out ? out + off : nullptr, tok_stride,
                                         row_max ? row_max + stat_off : nullptr, row_sum ? row_sum + stat_off : nullptr,
                                         n_heads, scratch.get() + bytes * static_cast<size_t>(thread));
  });
}

}  // namespace

bool is_kv_type(GgmlType t) {
  switch (t) {
    case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16: case GgmlType::Q8_0: case GgmlType::Q4_0: return true;
    default: return false;
  }
}

void check_kv_rows(const KvRows& rows, int d) {
  if (!is_kv_type(rows.type))
    fail("attention: keys/values of type ", type_info(rows.type).name, " are not supported (f32, f16, bf16, q8_0, q4_0)");
  if (rows.row_bytes != row_bytes(rows.type, d))  // row_bytes throws when d is not whole blocks
    fail("attention: ", type_info(rows.type).name, " rows of ", d, " values take ", row_bytes(rows.type, d),
         " bytes, not ", rows.row_bytes);
}

void dequantize_kv_rows(const KvRows& rows, int j0, int n, int d, float* out) {
  check_kv_rows(rows, d);
  if (n <= 0) return;
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(DequantizeRows)(rows.type, rows.data + static_cast<size_t>(j0) * rows.row_bytes, n, d, out);
}

void attention_group_f32(const float* q, int n_q, const float* k, const float* v, int n, int d, float scale,
                         float* out) {
  check_dim(d);
  detail::init_simd_once();
  const KvRows kr = f32_rows(k, d), vr = f32_rows(v, d);
  HWY_DYNAMIC_DISPATCH(AttentionGroup)(q, n_q, &kr, &vr, 0, n, d, scale, out);
}

void attention_block_f32(const float* q, size_t q_stride, int n_tok, int n_q, const float* k, const float* v,
                         const int* visible, int d, float scale, float* out, size_t out_stride) {
  check_dim(d);
  if (n_tok <= 0 || n_q <= 0) return;
  detail::init_simd_once();
  const KvRows kr = f32_rows(k, d), vr = f32_rows(v, d);
  uint8_t* scratch = detail::scratch(block_scratch_bytes(n_tok * n_q, d));
  HWY_DYNAMIC_DISPATCH(AttentionBlock)(q, q_stride, n_tok, n_q, &kr, &vr, visible, nullptr, d, scale, out, out_stride,
                                       nullptr, nullptr, 0, scratch);
}

void attention_f32(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                   float* out, ThreadPool& pool) {
  check_layer(n_heads, kv, n_kv, d);
  if (n_tok <= 0) return;
  check_slots(kv, n_kv, n_tok);
  detail::init_simd_once();
  const int group = n_heads / n_kv;
  const size_t tok_stride = static_cast<size_t>(n_heads) * d;

  if (n_tok < kMinTiledTokens) {
    // One work item = one token's GQA group: its query heads are contiguous in q and out.
    const int64_t items = static_cast<int64_t>(n_tok) * n_kv;
    pool.parallel_for(items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int t = static_cast<int>(i / n_kv), g = static_cast<int>(i % n_kv);
        const size_t off = t * tok_stride + static_cast<size_t>(g) * group * d;
        HWY_DYNAMIC_DISPATCH(AttentionGroup)(q + off, group, &kv[g].k, &kv[g].v, first_slot(kv[g], t), kv[g].visible[t],
                                             d, scale, out + off);
      }
    });
    return;
  }
  tiled_layer(q, n_tok, n_heads, kv, n_kv, d, scale, out, nullptr, nullptr, pool);
}

void attention_f32_many(const AttentionCall* calls, int n_calls, ThreadPool& pool) {
  struct Item {
    int64_t cost;
    int call, head;
  };
  std::vector<Item> items;
  for (int c = 0; c < n_calls; ++c) {
    const AttentionCall& a = calls[c];
    check_layer(a.n_heads, a.kv, a.n_kv, a.d);
    if (a.n_tok <= 0) continue;
    check_slots(a.kv, a.n_kv, a.n_tok);
    if (a.n_tok >= kMinTiledTokens) continue;
    for (int g = 0; g < a.n_kv; ++g)
      items.push_back({std::max<int64_t>(1, a.kv[g].visible[0] - first_slot(a.kv[g], 0)), c, g});
  }
  detail::init_simd_once();
  for (int c = 0; c < n_calls; ++c) {
    const AttentionCall& a = calls[c];
    if (a.n_tok >= kMinTiledTokens) tiled_layer(a.q, a.n_tok, a.n_heads, a.kv, a.n_kv, a.d, a.scale, a.out, nullptr, nullptr, pool);
  }
  if (items.empty()) return;
  // The per-token kernel on each item, as attention_f32 runs it for one token.
  const int n_threads = std::min<int>(pool.size(), static_cast<int>(items.size()));
  run_costliest_first(items, n_threads, pool, [&](const Item& it, int) {
    const AttentionCall& a = calls[it.call];
    const AttentionKv& h = a.kv[it.head];
    const int group = a.n_heads / a.n_kv;
    const size_t off = static_cast<size_t>(it.head) * group * a.d;
    HWY_DYNAMIC_DISPATCH(AttentionGroup)(a.q + off, group, &h.k, &h.v, first_slot(h, 0), h.visible[0], a.d, a.scale,
                                         a.out + off);
  });
}

void attention_stats_f32(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                         const uint8_t* counted, const AttentionColumns* cols, float* out, ThreadPool& pool) {
  check_layer(n_heads, kv, n_kv, d);
  if (n_tok <= 0) return;
  bool any_sum = false, any_last = false;
  for (int g = 0; g < n_kv; ++g) {
    const AttentionColumns& c = cols[g];
    if (c.n_keys < 0) fail("attention statistics: negative key count");
    for (int t = 0; t < n_tok; ++t)
      if (kv[g].visible[t] < 0 || kv[g].visible[t] > c.n_keys || first_slot(kv[g], t) < 0 ||
          first_slot(kv[g], t) > kv[g].visible[t])
        fail("attention statistics: token ", t, " sees slots [", first_slot(kv[g], t), ", ", kv[g].visible[t],
             ") of ", c.n_keys);
    any_sum |= c.sum != nullptr || c.cnt != nullptr;
    any_last |= c.last != nullptr;
  }
  detail::init_simd_once();
  const int group = n_heads / n_kv;

  // The statistics rows, in token order: the counted tokens', then the last token's if it is
  // wanted and not counted.
  std::vector<int> toks;
  for (int t = 0; t < n_tok; ++t)
    if (any_sum && (counted == nullptr || counted[t] != 0)) toks.push_back(t);
  const int sum_rows = static_cast<int>(toks.size()) * group;
  const int n_sum_tok = static_cast<int>(toks.size());
  if (any_last && (toks.empty() || toks.back() != n_tok - 1)) toks.push_back(n_tok - 1);
  const int rows = static_cast<int>(toks.size()) * group;
  const int last_lo = any_last ? rows - group : rows;
  // A few rows whose maximum and sum the output kernel does not give anyway (a decode step, or
  // statistics alone): both passes in one, per KV head, keeping the scores.
  const bool small = rows == 0 || ((out == nullptr || n_tok < kMinTiledTokens) && rows <= static_cast<int>(kMaxLanes));

  // Pass 1: each row's softmax maximum and sum, from the tiled kernel (which also gives the
  // output when there is one). For a single token the output comes from the per-token kernel,
  // as attention_f32 does, and the statistics from the tiled kernel's arithmetic all the same:
  // rows get the same maximum and sum however a sequence is split into calls.
  const size_t n_rows = static_cast<size_t>(n_tok) * n_heads;
  std::vector<float> row_max, row_sum;
  if (!small) row_max.resize(n_rows), row_sum.resize(n_rows);
  float* rm = small ? nullptr : row_max.data();
  float* rs = small ? nullptr : row_sum.data();
  if (out != nullptr && n_tok >= kMinTiledTokens) {
    tiled_layer(q, n_tok, n_heads, kv, n_kv, d, scale, out, rm, rs, pool);
  } else {
    if (out != nullptr) attention_f32(q, n_tok, n_heads, kv, n_kv, d, scale, out, pool);
    if (!small) tiled_layer(q, n_tok, n_heads, kv, n_kv, d, scale, nullptr, rm, rs, pool);
  }
  for (int g = 0; g < n_kv; ++g)
    if (cols[g].last != nullptr) std::fill(cols[g].last, cols[g].last + cols[g].n_keys, 0.0f);
  if (rows == 0) return;

  // Per KV head: the rows' queries transposed and scaled, as AttentionBlock holds them, and each
  // row's maximum, weight share / sum, visible count and first visible slot (in float, as there).
  const size_t ldq = (static_cast<size_t>(rows) + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
  const size_t per_head = (static_cast<size_t>(d) + 4) * ldq;
  auto buf = hwy::AllocateAligned<float>(per_head * n_kv);
  if (!buf) fail("attention statistics: out of memory allocating ", per_head * n_kv * sizeof(float), " bytes");
  std::fill(buf.get(), buf.get() + per_head * n_kv, 0.0f);
  const float share = 1.0f / static_cast<float>(group);  // statistics average the group's query heads
  std::vector<int> max_vis(n_kv, 0);
  for (int g = 0; g < n_kv; ++g) {
    float* qt = buf.get() + per_head * g;
    float* rmax = qt + static_cast<size_t>(d) * ldq;
    float* rw = rmax + ldq;
    float* rvis = rw + ldq;
    float* rfirst = rvis + ldq;
    for (int r = 0; r < rows; ++r) {
      const int t = toks[r / group], h = g * group + r % group;
      const float* qr = q + (static_cast<size_t>(t) * n_heads + h) * d;
      for (int x = 0; x < d; ++x) qt[x * ldq + r] = qr[x] * scale;
      const int vis = kv[g].visible[t], first = first_slot(kv[g], t);
      rvis[r] = static_cast<float>(vis);
      rfirst[r] = static_cast<float>(first);
      max_vis[g] = std::max(max_vis[g], vis);
      if (small) continue;
      // A row that sees no key has sum 0 and maximum -inf: it adds nothing (all keys masked).
      const size_t i = static_cast<size_t>(t) * n_heads + h;
      rmax[r] = vis > first ? row_max[i] : 0.0f;
      rw[r] = vis > first && row_sum[i] > 0.0f ? share / row_sum[i] : 0.0f;
    }
  }
  const auto count = [&](int g, int j0, int j1) {  // attn_cnt of keys [j0, j1)
    if (cols[g].cnt == nullptr) return;
    for (int ti = 0; ti < n_sum_tok; ++ti) {
      const int lo = std::max(first_slot(kv[g], toks[ti]), j0), hi = std::min(kv[g].visible[toks[ti]], j1);
      for (int j = lo; j < hi; ++j) ++cols[g].cnt[j];
    }
  };

  // Pass 2: one work item = (KV head, tile of keys), or a whole KV head for the small case; it
  // owns its keys' sums and adds the rows in order, so the sums are the same for any pool size
  // and any split of a sequence into calls.
  struct Item {
    int64_t cost;
    int head, j0;
  };
  std::vector<Item> items;
  for (int g = 0; g < n_kv; ++g) {
    if (small) {
      if (max_vis[g] > 0) items.push_back({max_vis[g], g, 0});
      continue;
    }
    const float* rvis = buf.get() + per_head * g + (static_cast<size_t>(d) + 2) * ldq;
    const float* rfirst = rvis + ldq;
    for (int j0 = 0; j0 < max_vis[g]; j0 += kKeyTileOnce) {
      const int m = std::min(kKeyTileOnce, max_vis[g] - j0);
      int64_t seen = 0;
      for (int r = 0; r < rows; ++r) seen += rvis[r] > static_cast<float>(j0) && rfirst[r] < static_cast<float>(j0 + m);
      if (seen > 0) items.push_back({seen * m, g, j0});
    }
  }
  if (items.empty()) return;
  const int n_threads = std::min<int>(pool.size(), static_cast<int>(items.size()));
  const size_t max_n = static_cast<size_t>(*std::max_element(max_vis.begin(), max_vis.end()));
  const size_t tile_floats = static_cast<size_t>(kKeyTileOnce) * d;  // a tile of keys as floats
  const size_t scratch_floats =
      (small ? (2 * max_n + (max_n + kKeyTileOnce - 1) / kKeyTileOnce + 4) * ldq : kKeyTileOnce * 4 * kMaxLanes) +
      tile_floats;
  auto scratch = hwy::AllocateAligned<float>(scratch_floats * n_threads);
  if (!scratch) fail("attention statistics: out of memory allocating scratch");
  run_costliest_first(items, n_threads, pool, [&](const Item& it, int thread) {
    const int g = it.head, j0 = it.j0;
    const AttentionColumns& c = cols[g];
    const float* qt = buf.get() + per_head * g;
    const float* rmax = qt + static_cast<size_t>(d) * ldq;
    const float* rvis = rmax + 2 * ldq;
    const float* rfirst = rvis + ldq;
    float* mine = scratch.get() + scratch_floats * thread;
    if (small) {
      const int n = max_vis[g];
      HWY_DYNAMIC_DISPATCH(SmallColumnSums)(qt, ldq, rows, share, rfirst, rvis, n, sum_rows, last_lo, &kv[g].k, d,
                                            c.sum, c.last, mine);
      count(g, 0, n);
      return;
    }
    const int m = std::min(kKeyTileOnce, max_vis[g] - j0);
    HWY_DYNAMIC_DISPATCH(ColumnSums)(qt, ldq, rows, rmax, rmax + ldq, rfirst, rvis, sum_rows, last_lo, &kv[g].k, d,
                                     j0, m, c.sum ? c.sum + j0 : nullptr, c.last ? c.last + j0 : nullptr, mine);
    count(g, j0, j0 + m);
  });
}

}  // namespace qf
#endif
