// AMX int8 engine for prompt processing: the 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, IQ4_NL) with Intel AMX tiles (Sapphire Rapids and later).
//
// Activations are quantized per token and block of 32 by the natural-layout quantizer the other
// engines use (detail::quantize_natural, kernels.h's formula):
// int8 q, the fp16-rounded scale dx and sx = dx * sum(q), in the natural layout
//   int8 qs[32 * nb] | float dx[nb] | float sx[nb]   (per token, stride a multiple of 64),
// so 16 consecutive tokens' bytes of one block are an A tile (16 rows x 32 bytes).
// Weights are unpacked per panel of 16 rows, once per matmul, into signed int8 in the B tile
// layout (8 rows of 16 columns x 4 bytes: B[k/4][4n + k%4] = q[n][k]) with each row's block
// scale dw (and min mw for Q4_1 / Q5_1); the panel stays in L1 while every 16-token tile of the
// prompt passes over it. Per block one tdpbssd gives the 16 x 16 integer dot products C[t][n]
// (exact), and the epilogue, with weight rows in the 16 float lanes, forms
//   float(C[t]) * (dw * dx[t])  (+ mw * sx[t])
// and adds blocks b, b + 1 together before adding them to acc[t], pair after pair in block order.
// So a (row, token) result depends only on that row and token: not on how many tokens share the
// matmul, the token's place in its tile or the thread count. Profiles put the time in the tile
// loads, products and stores (about 95 cycles per block and 16 x 16 tile at 512 tokens), not in
// the AVX-512 epilogue; more tiles in flight (2 x 2 blocking, as llama.cpp's AMX kernels do) is
// the next step.
//
// AMX needs the OS to grant the tile state (arch_prctl ARCH_REQ_XCOMP_PERM) before the first
// tile instruction, else the process gets SIGILL: amx_available() asks once per process and
// checks XCR0 afterwards. Each worker loads the tile configuration at the start of its share of
// a matmul and releases the tiles at the end, so nothing else on the thread can be disturbed
// and an idle thread holds no tile state.
#include "tensor/matmul_amx.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string_view>
#include <vector>

#include "tensor/kernels_internal.h"
#include "util/error.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define QF_AMX_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "tensor/quant_blocks.h"
#include "tensor/target_pragmas.h"
#else
#define QF_AMX_BUILD 0
#endif

namespace qf::detail {

#if QF_AMX_BUILD
namespace {

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

// CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8); then the tile data permission, after
// which XCR0 must enable XTILECFG (bit 17) and XTILEDATA (bit 18).
bool cpu_and_os_allow_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (((d >> 24) & 1u) == 0 || ((d >> 25) & 1u) == 0) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || ((c >> 27) & 1u) == 0) return false;  // OSXSAVE: xgetbv works
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 3u) == 3u;
}

bool enabled_by_env() {
  const char* v = std::getenv("QF_AMX");
  if (v == nullptr || *v == '\0' || std::string_view(v) == "1") return true;
  if (std::string_view(v) == "0") return false;
  fail("QF_AMX=", std::string(v), " is not 0 (off) or 1 (on where the CPU has AMX)");
}

}  // namespace

bool amx_available() {
  static const bool ok = enabled_by_env() && cpu_and_os_allow_amx();
  return ok;
}

QF_PUSH_TARGET("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,f16c,fma")
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_* placeholders here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {

constexpr int kTile = 16;  // tokens per A tile, weight rows per panel
// Up to this many tokens, panel-layout weights go through VNNI instead of the tiles, which do
// 16 tokens' products for about the price of one but pay for storing each unpacked block and
// its 16 x 16 products. kernels_bench BM_BatchedModel (SmolLM2's matrices, Q4_1, 1 thread, ms
// per step, medians of 3) at 2 / 3 / 4 tokens: VNNI 12.4 / 13.8 / 14.6, tiles 12.8 / 13.7 / 13.6.
constexpr int kVnniMaxTokens = 2;
template <GgmlType TY>
constexpr size_t kPanelHead = panel_head_bytes(TY);
// B tile of one block: 8 rows of 64 bytes, then the panel rows' scales and mins.
struct alignas(64) PanelBlock {
  int8_t b[8][64];
  float dw[16];
  float mw[16];
};
static_assert(sizeof(PanelBlock) == 640);

// palette 1; tmm0, tmm1: C (16 x 16 int32); tmm2, tmm3: A (16 tokens x 32 bytes);
// tmm4, tmm5: B (8 x 64 bytes). Two of each, so two blocks are in flight.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 32, 32, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 8, 8};
};
const TileConfig kTileConfig{};

// ---------------------------------------------------------------------------------------------
// Where a block's 16 lanes come from. Lane n of `at(off)` holds bytes [off, off + 4) of block b
// of the panel's row n, for every offset unpack_block reads.

// Natural layout (rows as GGUF stores them): gathers, one row per lane; lanes past the matrix's
// last row are masked off (zero weights, zero scales).
struct Gather {
  const uint8_t* blk;  // block b of the panel's first row
  __m512i idx;         // n * row bytes
  __mmask16 rows;
  __m512i at(size_t off) const {
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, idx, blk + off, 1);
  }
};

// Panel layout (kernels.h WeightLayout::panels16; kernels_internal.h): the same bytes, already
// side by side, block b's quants at b * kBody and its 16 heads after all the quants. Loads of
// the quants are whole cache lines.
template <GgmlType TY>
struct PanelLoad {
  static constexpr size_t kHead = kPanelHead<TY>;
  static constexpr size_t kBody = kTile * (blocks::Codec<TY>::kBytes - kHead);
  const uint8_t* body;  // block b's quants
  const uint8_t* head;  // block b's heads
  PanelLoad(const uint8_t* panel, int64_t nb, int64_t b)
      : body(panel + static_cast<size_t>(b) * kBody),
        head(panel + static_cast<size_t>(nb) * kBody + static_cast<size_t>(b) * kTile * kHead) {}
  // Decode streams the weights once: fetch the quants and the heads ahead of use.
  void prefetch() const {
    for (size_t off = 0; off < kBody; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(body + kWeightPrefetchBytes + off), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(head + 8 * kTile * kHead), _MM_HINT_T0);
  }
  __m512i at(size_t off) const {
    if (off == 0) {
      if constexpr (kHead == 2)  // d only: 16 halfs, widened to the dwords a gather would give
        return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(head)));
      else
        return _mm512_loadu_si512(head);
    }
    return _mm512_loadu_si512(body + 16 * (off - kHead));
  }
};

// One block of 16 rows as the B tile wants it: b[j] lane n = elements 4j..4j+3 of row n, signed
// int8 (Q4_1 and Q5_1 quants are 0..15 and 0..31, so also valid unsigned bytes); dw, mw the rows'
// block scales and mins (0 for types without).
struct Unpacked {
  __m512i b[8];
  __m512 dw, mw;
};

// Bits 4j..4j+3 of each dword of qh, bit c moved to bit 4 of byte c (the fifth bit of element
// 4j + c). The multiply places bit c of the nibble at bit 8c; the four shifted copies do not overlap.
inline __m512i fifth_bits(__m512i qh, int j) {
  const __m512i nib = _mm512_and_si512(_mm512_srli_epi32(qh, 4 * j), _mm512_set1_epi32(0xF));
  const __m512i spread = _mm512_and_si512(_mm512_mullo_epi32(nib, _mm512_set1_epi32(0x00204081)), _mm512_set1_epi32(0x01010101));
  return _mm512_slli_epi32(spread, 4);
}

// Nibble types: B rows j (elements 4j..4j+3, low nibbles of qs bytes 4j..) and j + 4 (elements
// 16 + 4j.., high nibbles), each lane's four bytes from one row.
template <GgmlType TY, class Src>
inline Unpacked unpack_block(const Src& g) {
  Unpacked u;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i head = g.at(0);  // d (and m) half words
  u.dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
  if constexpr (blocks::Codec<TY>::kHasMin)
    u.mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
  else
    u.mw = _mm512_setzero_ps();
  if constexpr (TY == GgmlType::Q8_0) {  // d, qs[32]
    for (int j = 0; j < 8; ++j) u.b[j] = g.at(2 + 4 * j);
  } else if constexpr (TY == GgmlType::Q4_0 || TY == GgmlType::Q4_1 || TY == GgmlType::IQ4_NL) {
    constexpr size_t kQs = TY == GgmlType::Q4_1 ? 4 : 2;  // Q4_1: d, m, qs[16]; else d, qs[16]
    for (int j = 0; j < 4; ++j) {
      const __m512i v = g.at(kQs + 4 * j);
      __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      if constexpr (TY == GgmlType::Q4_0) {
        lo = _mm512_sub_epi8(lo, _mm512_set1_epi8(8));
        hi = _mm512_sub_epi8(hi, _mm512_set1_epi8(8));
      } else if constexpr (TY == GgmlType::IQ4_NL) {
        const __m512i grid = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks::kIq4nlValues)));
        lo = _mm512_shuffle_epi8(grid, lo);
        hi = _mm512_shuffle_epi8(grid, hi);
      }
      u.b[j] = lo;
      u.b[j + 4] = hi;
    }
  } else {
    static_assert(TY == GgmlType::Q5_0 || TY == GgmlType::Q5_1);
    constexpr size_t kQh = TY == GgmlType::Q5_1 ? 4 : 2;  // Q5_1: d, m, qh[4], qs[16]; Q5_0: d, qh[4], qs[16]
    constexpr int kOffset = TY == GgmlType::Q5_0 ? 16 : 0;
    const __m512i qh = g.at(kQh);
    for (int j = 0; j < 4; ++j) {
      const __m512i v = g.at(kQh + 4 + 4 * j);
      const __m512i lo = _mm512_or_si512(_mm512_and_si512(v, low4), fifth_bits(qh, j));
      const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4), fifth_bits(qh, j + 4));
      u.b[j] = _mm512_sub_epi8(lo, _mm512_set1_epi8(kOffset));
      u.b[j + 4] = _mm512_sub_epi8(hi, _mm512_set1_epi8(kOffset));
    }
  }
  return u;
}

// Block b of a panel-layout panel, unpacked; its stream fetched ahead (without the prefetch
// `qf bench` decoded SmolLM2 at 175-180 tok/s instead of 222 on 2 threads).
template <GgmlType TY>
inline Unpacked read_panel_block(const uint8_t* panel, int64_t nb, int64_t b) {
  const PanelLoad<TY> src(panel, nb, b);
  src.prefetch();
  return unpack_block<TY>(src);
}

inline void store_block(const Unpacked& u, PanelBlock& out) {
  for (int j = 0; j < 8; ++j) _mm512_store_si512(out.b[j], u.b[j]);
  _mm512_store_ps(out.dw, u.dw);
  _mm512_store_ps(out.mw, u.mw);
}

// Unpacks panel [r0, r0 + 16) (nrows of them real) of w into PanelBlocks.
template <GgmlType TY>
void unpack_panel(const WeightView& w, size_t wrb, int64_t r0, int nrows, int64_t nb, PanelBlock* panel) {
  if (w.layout == WeightLayout::panels16) {
    const uint8_t* base = w.data + static_cast<size_t>(r0) * wrb;
    for (int64_t b = 0; b < nb; ++b) store_block(read_panel_block<TY>(base, nb, b), panel[b]);
    return;
  }
  Gather g;
  g.idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                             _mm512_set1_epi32(static_cast<int>(wrb)));
  g.rows = static_cast<__mmask16>((1u << nrows) - 1u);
  for (int64_t b = 0; b < nb; ++b) {
    g.blk = w.data + static_cast<size_t>(r0) * wrb + static_cast<size_t>(b) * blocks::Codec<TY>::kBytes;
    store_block(unpack_block<TY>(g), panel[b]);
  }
}

// ---------------------------------------------------------------------------------------------
// The float epilogue, written once for both engines below so that they round identically: with
// weight rows in the 16 lanes, c the exact integer products of a block and fx_t token t's
// scales (dx[nb] then sx[nb]),
//   pair_term  = float(c0) * (dw0 * dx[b]) (+ mw0 * sx[b]) + float(c1) * (dw1 * dx[b+1]) (+ ...)
// added to the accumulator pair after pair in block order (blocks summed in pairs first halves
// the accumulator's chain of roundings), and an odd last block added alone.

template <bool kHasMin>
inline __m512 pair_term(__m512i c0, __m512i c1, __m512 dw0, __m512 mw0, __m512 dw1, __m512 mw1, const float* fx_t,
                        int64_t nb, int64_t b) {
  __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(c0), _mm512_mul_ps(dw0, _mm512_set1_ps(fx_t[b])));
  if constexpr (kHasMin) v = _mm512_fmadd_ps(mw0, _mm512_set1_ps(fx_t[nb + b]), v);
  v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c1), _mm512_mul_ps(dw1, _mm512_set1_ps(fx_t[b + 1])), v);
  if constexpr (kHasMin) v = _mm512_fmadd_ps(mw1, _mm512_set1_ps(fx_t[nb + b + 1]), v);
  return v;
}

template <bool kHasMin>
inline __m512 add_last_block(__m512 acc, __m512i c, __m512 dw, __m512 mw, const float* fx_t, int64_t nb, int64_t b) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(dw, _mm512_set1_ps(fx_t[b])), acc);
  if constexpr (kHasMin) acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(fx_t[nb + b]), acc);
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Few tokens on panel-layout weights (decode): VNNI with the weight rows in the lanes. For each
// block, lane n of b[j] holds row n's elements 4j..4j+3 and the token's four bytes are broadcast,
// so eight vpdpbusd give the block's 16 exact integer products, the same integers as the AMX
// tile, and the shared epilogue makes the results those of the AMX engine bit for bit. vpdpbusd
// multiplies unsigned by signed bytes: signed weights are biased by 128 and 128 * sum(q) of the
// token's block (isum) subtracted again.

template <GgmlType TY, int NT>
inline void block_products_vnni(const Unpacked& u, const uint8_t* act, size_t astride, const int32_t* isum, int64_t nb,
                                int64_t b, __m512i (&c)[NT]) {
  constexpr bool kSigned = !blocks::Codec<TY>::kHasMin;
  __m512i bu[8];
  for (int j = 0; j < 8; ++j) bu[j] = kSigned ? _mm512_xor_si512(u.b[j], _mm512_set1_epi8(static_cast<char>(0x80))) : u.b[j];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    const uint8_t* xq = act + t * astride + 32 * b;
    int32_t xd[8];
    std::memcpy(xd, xq, 32);
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();  // two chains of four
    for (int j = 0; j < 4; ++j) {
      lo = _mm512_dpbusd_epi32(lo, bu[j], _mm512_set1_epi32(xd[j]));
      hi = _mm512_dpbusd_epi32(hi, bu[j + 4], _mm512_set1_epi32(xd[j + 4]));
    }
    c[t] = _mm512_add_epi32(lo, hi);
    if constexpr (kSigned) c[t] = _mm512_sub_epi32(c[t], _mm512_set1_epi32(128 * isum[t * nb + b]));
  }
}

// NT tokens against panels [p0, p1) of panel-layout w.
template <GgmlType TY, int NT>
void vnni_panels(const WeightView& w, const uint8_t* act, size_t astride, const int32_t* isum, float* y, int64_t p0,
                 int64_t p1) {
  constexpr bool kHasMin = blocks::Codec<TY>::kHasMin;
  const int64_t nb = w.cols / 32;
  const size_t panel_bytes = static_cast<size_t>(nb) * kTile * blocks::Codec<TY>::kBytes;
  const float* fx[NT];
  for (int t = 0; t < NT; ++t) fx[t] = reinterpret_cast<const float*>(act + t * astride + 32 * nb);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* base = w.data + static_cast<size_t>(p) * panel_bytes;
    const auto block = [&](int64_t b) { return read_panel_block<TY>(base, nb, b); };
    __m512 acc[NT];
    for (__m512& a : acc) a = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
      const Unpacked u0 = block(b);
      __m512i c0[NT];
      block_products_vnni<TY, NT>(u0, act, astride, isum, nb, b, c0);
      const Unpacked u1 = block(b + 1);
      __m512i c1[NT];
      block_products_vnni<TY, NT>(u1, act, astride, isum, nb, b + 1, c1);
      for (int t = 0; t < NT; ++t)
        acc[t] = _mm512_add_ps(acc[t], pair_term<kHasMin>(c0[t], c1[t], u0.dw, u0.mw, u1.dw, u1.mw, fx[t], nb, b));
    }
    if (b < nb) {
      const Unpacked u = block(b);
      __m512i c[NT];
      block_products_vnni<TY, NT>(u, act, astride, isum, nb, b, c);
      for (int t = 0; t < NT; ++t) acc[t] = add_last_block<kHasMin>(acc[t], c[t], u.dw, u.mw, fx[t], nb, b);
    }
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + t * w.rows + p * kTile, acc[t]);
  }
}

template <GgmlType TY, int NT = kVnniMaxTokens>
void vnni_panels_n(int nt, const WeightView& w, const uint8_t* act, size_t astride, const int32_t* isum, float* y,
                   int64_t p0, int64_t p1) {
  if constexpr (NT > 1) {
    if (nt < NT) return vnni_panels_n<TY, NT - 1>(nt, w, act, astride, isum, y, p0, p1);
  }
  vnni_panels<TY, NT>(w, act, astride, isum, y, p0, p1);
}

// ---------------------------------------------------------------------------------------------
// Tiles

// The products of one block for 16 tokens, C[t][n] = sum_k A[t][k] B[k][n], stored to c (16 x 16
// int32). The tile registers are loaded and stored again per block: tiles are not renamed, so a
// second set (tmm1/3/5) lets the next block's loads start while this one's product runs.
template <int kSet>
inline void block_product(const uint8_t* a, long astride, const PanelBlock& p, int32_t* c) {
  if constexpr (kSet == 0) {
    _tile_loadd(2, a, astride);
    _tile_loadd(4, p.b, 64);
    _tile_zero(0);
    _tile_dpbssd(0, 2, 4);
    _tile_stored(0, c, 64);
  } else {
    _tile_loadd(3, a, astride);
    _tile_loadd(5, p.b, 64);
    _tile_zero(1);
    _tile_dpbssd(1, 3, 5);
    _tile_stored(1, c, 64);
  }
}

// acc[t] += (term of block b) + (term of block b + 1): blocks summed in pairs before they reach
// the accumulator, which halves its chain of roundings (the VNNI engine's lanes and final tree
// are about as short).
template <bool kHasMin, int NT>
inline void pair_epilogue(const int32_t* c0, const int32_t* c1, const PanelBlock& p0, const PanelBlock& p1,
                          const float* fx, size_t fstride, int64_t nb, int64_t b, __m512 (&acc)[kTile]) {
  const __m512 dw0 = _mm512_load_ps(p0.dw), dw1 = _mm512_load_ps(p1.dw);
  const __m512 mw0 = _mm512_load_ps(p0.mw), mw1 = _mm512_load_ps(p1.mw);
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t)
    acc[t] = _mm512_add_ps(acc[t], pair_term<kHasMin>(_mm512_load_si512(c0 + 16 * t), _mm512_load_si512(c1 + 16 * t), dw0,
                                                      mw0, dw1, mw1, fx + t * fstride, nb, b));
}

// NT tokens (of a 16-token A tile whose rows past NT are padding) against one panel: y rows
// [r0, r0 + 16) masked to `rows`; fetch(b) gives block b unpacked (a PanelBlock that stays
// valid until fetch(b + 4)). Software-pipelined: the next pair of blocks is fetched and its
// products computed and stored before the epilogue of this pair reads its stored products, so
// the loads do not wait on the tile stores just issued, and a fetch that unpacks from memory
// overlaps the epilogue before it.
template <bool kHasMin, int NT, class Fetch>
void tile(const uint8_t* act, size_t astride, int64_t nb, const Fetch& fetch, float* y, int64_t ystride,
          __mmask16 rows) {
  __m512 acc[kTile];
#pragma GCC unroll 16
  for (__m512& a : acc) a = _mm512_setzero_ps();
  alignas(64) int32_t c[2][2][kTile * kTile];  // [pair parity][block of the pair]
  const PanelBlock* blk[2][2];                  // the same, their unpacked weights
  // dx of token t, block b at fx[t * fstride + b]; sx nb floats further.
  const auto* fx = reinterpret_cast<const float*>(act + 32 * nb);
  const size_t fstride = astride / sizeof(float);
  const long stride = static_cast<long>(astride);
  const int64_t pairs = nb / 2;
  auto products = [&](int64_t k) {
    blk[k & 1][0] = &fetch(2 * k);
    blk[k & 1][1] = &fetch(2 * k + 1);
    block_product<0>(act + 64 * k, stride, *blk[k & 1][0], c[k & 1][0]);
    block_product<1>(act + 64 * k + 32, stride, *blk[k & 1][1], c[k & 1][1]);
  };
  if (pairs > 0) products(0);
  for (int64_t k = 0; k < pairs; ++k) {
    if (k + 1 < pairs) products(k + 1);
    pair_epilogue<kHasMin, NT>(c[k & 1][0], c[k & 1][1], *blk[k & 1][0], *blk[k & 1][1], fx, fstride, nb, 2 * k, acc);
  }
  if (nb % 2 != 0) {
    const int64_t b = nb - 1;
    const PanelBlock& last = fetch(b);
    block_product<0>(act + 32 * b, stride, last, c[0][0]);
    const __m512 dw = _mm512_load_ps(last.dw), mw = _mm512_load_ps(last.mw);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t)
      acc[t] = add_last_block<kHasMin>(acc[t], _mm512_load_si512(c[0][0] + 16 * t), dw, mw, fx + t * fstride, nb, b);
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(y + t * ystride, rows, acc[t]);
}

template <bool kHasMin, int NT = kTile, class Fetch>
void tile_n(int nt, const uint8_t* act, size_t astride, int64_t nb, const Fetch& fetch, float* y, int64_t ystride,
            __mmask16 rows) {
  if constexpr (NT > 1) {
    if (nt < NT) return tile_n<kHasMin, NT - 1>(nt, act, astride, nb, fetch, y, ystride, rows);
  }
  tile<kHasMin, NT>(act, astride, nb, fetch, y, ystride, rows);
}

// Owned by each thread: one panel of unpacked weights.
PanelBlock* panel_buffer(int64_t nb) {
  struct Free {
    void operator()(PanelBlock* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<PanelBlock, Free> buf;
  thread_local int64_t cap = 0;
  if (nb > cap) {
    buf.reset(static_cast<PanelBlock*>(std::aligned_alloc(64, static_cast<size_t>(nb) * sizeof(PanelBlock))));
    if (!buf) {
      cap = 0;
      fail("out of memory allocating the AMX weight panel");
    }
    cap = nb;
  }
  return buf.get();
}

// Panels [p0, p1) of 16 rows of w against every token, on AMX tiles (the tile configuration
// loaded by the caller). Several token tiles share one unpacking of the panel; a single one
// (a batched decode step) unpacks each block from the panel layout just before its products, so
// reading the weights overlaps the epilogue of the blocks before.
template <GgmlType TY>
void tile_panels(const WeightView& w, const uint8_t* act, size_t astride, int64_t n_tok, float* y, int64_t p0,
                 int64_t p1) {
  constexpr bool kHasMin = blocks::Codec<TY>::kHasMin;
  const int64_t nb = w.cols / 32;
  const size_t wrb = row_bytes(w.type, w.cols);
  if (w.layout == WeightLayout::panels16 && n_tok <= kTile) {
    alignas(64) PanelBlock ring[4];
    const auto rows = static_cast<__mmask16>(0xFFFF);
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* base = w.data + static_cast<size_t>(p) * kTile * wrb;
      const auto fetch = [&](int64_t b) -> const PanelBlock& {
        PanelBlock& out = ring[b & 3];
        store_block(read_panel_block<TY>(base, nb, b), out);
        __asm__ volatile("" ::: "memory");  // the tile loads' asm does not tell the compiler it reads the block
        return out;
      };
      tile_n<kHasMin>(static_cast<int>(n_tok), act, astride, nb, fetch, y + p * kTile, w.rows, rows);
    }
    return;
  }
  PanelBlock* panel = panel_buffer(nb);
  const auto fetch = [panel](int64_t b) -> const PanelBlock& { return panel[b]; };
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t r0 = p * kTile;
    const int nrows = static_cast<int>(std::min<int64_t>(kTile, w.rows - r0));
    unpack_panel<TY>(w, wrb, r0, nrows, nb, panel);
    __asm__ volatile("" ::: "memory");  // the tile loads' asm does not tell the compiler it reads the panel
    const auto rows = static_cast<__mmask16>((1u << nrows) - 1u);
    for (int64_t t0 = 0; t0 < n_tok; t0 += kTile) {
      const int nt = static_cast<int>(std::min<int64_t>(kTile, n_tok - t0));
      tile_n<kHasMin>(nt, act + t0 * astride, astride, nb, fetch, y + t0 * w.rows + r0, w.rows, rows);
    }
  }
}

// Few tokens on panel-layout weights go to VNNI, everything else to the tiles.
bool vnni_takes(const WeightView& w, int64_t n_tok) {
  return w.layout == WeightLayout::panels16 && n_tok <= kVnniMaxTokens;
}

// Panels [q0, q1) of the matrices stacked (matrix i's panels after those of matrices 0..i-1).
template <GgmlType TY>
void run_panels(std::span<const WeightView> ws, std::span<float* const> ys, const uint8_t* act, size_t astride,
                const int32_t* isum, int64_t n_tok, int64_t q0, int64_t q1) {
  bool tiles = false;
  int64_t first = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    const int64_t panels = (ws[i].rows + kTile - 1) / kTile;
    const int64_t lo = std::max(q0, first) - first, hi = std::min(q1, first + panels) - first;
    first += panels;
    if (lo >= hi) continue;
    if (vnni_takes(ws[i], n_tok)) {
      vnni_panels_n<TY>(static_cast<int>(n_tok), ws[i], act, astride, isum, ys[i], lo, hi);
      continue;
    }
    if (!tiles) _tile_loadconfig(&kTileConfig);
    tiles = true;
    tile_panels<TY>(ws[i], act, astride, n_tok, ys[i], lo, hi);
  }
  if (tiles) _tile_release();
}

// isum[t * nb + b] = sum of token t's int8 quants in block b.
void block_sums(const uint8_t* act, size_t astride, int64_t n_tok, int64_t nb, int32_t* isum) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act + t * astride + 32 * b));
      const __m256i s = _mm256_sad_epu8(_mm256_xor_si256(q, bias), _mm256_setzero_si256());  // sums of q + 128
      const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      isum[t * nb + b] = static_cast<int32_t>(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1)) - 32 * 128;
    }
}

template <GgmlType TY>
void amx_matmul_typed(std::span<const WeightView> ws, const float* x, int64_t n_tok, std::span<float* const> ys,
                      ThreadPool& pool) {
  const int64_t cols = ws[0].cols;
  // Gather offsets are int32: 15 rows of the matrix must fit.
  if (row_bytes(ws[0].type, cols) > static_cast<size_t>(INT32_MAX / kTile)) fail("matmul: rows too long for the AMX engine");
  const int64_t nb = cols / 32;
  const size_t astride = natural_stride(nb);
  bool any_tiles = false, any_vnni = false;
  int64_t panels = 0;
  for (const WeightView& w : ws) {
    (vnni_takes(w, n_tok) ? any_vnni : any_tiles) = true;
    panels += (w.rows + kTile - 1) / kTile;
  }
  const int64_t padded = any_tiles ? (n_tok + kTile - 1) / kTile * kTile : n_tok;
  uint8_t* act = scratch(astride * static_cast<size_t>(padded));
  // Padding tokens fill the last A tile: zeros (scales 0), never stored.
  std::memset(act + astride * static_cast<size_t>(n_tok), 0, astride * static_cast<size_t>(padded - n_tok));
  const auto quantize = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) quantize_natural(x + t * cols, nb, act + t * astride);
  };
  if (n_tok * cols >= 32 * 1024 && pool.size() > 1)
    pool.parallel_for(n_tok, 1, quantize);
  else
    quantize(0, n_tok);
  // The caller's buffer (a thread_local name inside the workers' lambda would be theirs).
  thread_local std::vector<int32_t> isum_buffer;
  const int32_t* isum = nullptr;
  if (any_vnni && !blocks::Codec<TY>::kHasMin) {
    isum_buffer.resize(static_cast<size_t>(n_tok * nb));
    block_sums(act, astride, n_tok, nb, isum_buffer.data());
    isum = isum_buffer.data();
  }
  const int64_t chunks = std::clamp<int64_t>(panels, 1, pool.size());
  if (chunks == 1) return run_panels<TY>(ws, ys, act, astride, isum, n_tok, 0, panels);
  pool.run([&](int i, int) {
    if (i >= chunks) return;
    run_panels<TY>(ws, ys, act, astride, isum, n_tok, panels * i / chunks, panels * (i + 1) / chunks);
  });
}

}  // namespace

#pragma GCC diagnostic pop
QF_POP_TARGET

bool amx_handles(GgmlType t) {
  return t == GgmlType::Q4_0 || t == GgmlType::Q4_1 || t == GgmlType::Q5_0 || t == GgmlType::Q5_1 ||
         t == GgmlType::Q8_0 || t == GgmlType::IQ4_NL;
}

void amx_matmul(std::span<const WeightView> ws, const float* x, int64_t n_tok, std::span<float* const> ys,
                ThreadPool& pool) {
  switch (ws[0].type) {
    case GgmlType::Q4_0: return amx_matmul_typed<GgmlType::Q4_0>(ws, x, n_tok, ys, pool);
    case GgmlType::Q4_1: return amx_matmul_typed<GgmlType::Q4_1>(ws, x, n_tok, ys, pool);
    case GgmlType::Q5_0: return amx_matmul_typed<GgmlType::Q5_0>(ws, x, n_tok, ys, pool);
    case GgmlType::Q5_1: return amx_matmul_typed<GgmlType::Q5_1>(ws, x, n_tok, ys, pool);
    case GgmlType::Q8_0: return amx_matmul_typed<GgmlType::Q8_0>(ws, x, n_tok, ys, pool);
    case GgmlType::IQ4_NL: return amx_matmul_typed<GgmlType::IQ4_NL>(ws, x, n_tok, ys, pool);
    default: fail("matmul: the AMX engine has no kernel for ", type_info(ws[0].type).name);
  }
}

#else  // !QF_AMX_BUILD

bool amx_available() { return false; }
bool amx_handles(GgmlType) { return false; }
void amx_matmul(std::span<const WeightView>, const float*, int64_t, std::span<float* const>, ThreadPool&) {
  fail("matmul: the AMX engine is not built for this platform");
}

#endif  // QF_AMX_BUILD

}  // namespace qf::detail
