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
#include "tensor/kernels_internal.h"
#include "util/error.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/attention_kernel.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/aligned_allocator.h>
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace qf {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int kTile = 64;  // keys per online-softmax step
constexpr int kMaxQ = 4;   // query heads processed together (each key row is loaded once for all)

void AttentionGroup(const float* HWY_RESTRICT q, int n_q, const float* HWY_RESTRICT k, const float* HWY_RESTRICT v,
                    int n, int d, float scale, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const int N = static_cast<int>(hn::Lanes(df));
  const int d_vec = d / N * N;  // SIMD part of each row; the rest (if any) is scalar
  HWY_ALIGN float s[kMaxQ][kTile];

  for (int q0 = 0; q0 < n_q; q0 += kMaxQ) {
    const int nq = std::min(kMaxQ, n_q - q0);
    const float* qs[kMaxQ];
    float* os[kMaxQ];
    float run_max[kMaxQ], run_sum[kMaxQ];
    for (int i = 0; i < nq; ++i) {
      qs[i] = q + static_cast<size_t>(q0 + i) * d;
      os[i] = out + static_cast<size_t>(q0 + i) * d;
      std::fill(os[i], os[i] + d, 0.0f);
      run_max[i] = -INFINITY;
      run_sum[i] = 0.0f;
    }
    for (int j0 = 0; j0 < n; j0 += kTile) {
      const int m = std::min(kTile, n - j0);
      // Scores of the tile.
      for (int j = 0; j < m; ++j) {
        const float* kj = k + static_cast<size_t>(j0 + j) * d;
        for (int i = 0; i < nq; ++i) {
          auto acc = hn::Zero(df);
          for (int x = 0; x < d_vec; x += N) acc = hn::MulAdd(hn::LoadU(df, qs[i] + x), hn::LoadU(df, kj + x), acc);
          float dot = hn::GetLane(hn::SumOfLanes(df, acc));
          for (int x = d_vec; x < d; ++x) dot += qs[i][x] * kj[x];
          s[i][j] = dot * scale;
        }
      }
      // Online softmax: rescale what was accumulated when the running maximum grows.
      for (int i = 0; i < nq; ++i) {
        float tile_max = -INFINITY;
        for (int j = 0; j < m; ++j) tile_max = std::max(tile_max, s[i][j]);
        if (tile_max > run_max[i]) {
          const float corr = std::exp(run_max[i] - tile_max);  // 0 on the first tile
          run_sum[i] *= corr;
          const auto vc = hn::Set(df, corr);
          for (int x = 0; x < d_vec; x += N) hn::StoreU(hn::Mul(hn::LoadU(df, os[i] + x), vc), df, os[i] + x);
          for (int x = d_vec; x < d; ++x) os[i][x] *= corr;
          run_max[i] = tile_max;
        }
        const auto vmax = hn::Set(df, run_max[i]);
        const auto floor = hn::Set(df, -87.0f);  // exp underflows to ~0 below; keeps Exp in range
        int j = 0;
        for (; j + N <= m; j += N)
          hn::Store(hn::CallExp(df, hn::Max(hn::Sub(hn::Load(df, &s[i][j]), vmax), floor)), df, &s[i][j]);
        for (; j < m; ++j) s[i][j] = std::exp(s[i][j] - run_max[i]);
        float tile_sum = 0.0f;
        for (int jj = 0; jj < m; ++jj) tile_sum += s[i][jj];
        run_sum[i] += tile_sum;
      }
      // Weighted values.
      for (int j = 0; j < m; ++j) {
        const float* vj = v + static_cast<size_t>(j0 + j) * d;
        for (int x = 0; x < d_vec; x += N) {
          const auto vv = hn::LoadU(df, vj + x);
          for (int i = 0; i < nq; ++i)
            hn::StoreU(hn::MulAdd(hn::Set(df, s[i][j]), vv, hn::LoadU(df, os[i] + x)), df, os[i] + x);
        }
        for (int x = d_vec; x < d; ++x)
          for (int i = 0; i < nq; ++i) os[i][x] += s[i][j] * vj[x];
      }
    }
    for (int i = 0; i < nq; ++i) {
      if (run_sum[i] <= 0.0f) continue;
      const auto inv = hn::Set(df, 1.0f / run_sum[i]);
      for (int x = 0; x < d_vec; x += N) hn::StoreU(hn::Mul(hn::LoadU(df, os[i] + x), inv), df, os[i] + x);
      for (int x = d_vec; x < d; ++x) os[i][x] /= run_sum[i];
    }
  }
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

// pt[jj][0, NV * N) = sum_x k[jj][x] * qt[x][0, NV * N) for jj in [0, J).
template <int J, int NV, class D>
HWY_INLINE void ScoreTile(D df, const float* HWY_RESTRICT qt, size_t ld, const float* HWY_RESTRICT k, int d,
                          float* HWY_RESTRICT pt) {
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  V a[J][NV];
  for (int jj = 0; jj < J; ++jj)
    for (int i = 0; i < NV; ++i) a[jj][i] = hn::Zero(df);
  for (int x = 0; x < d; ++x) {
    V qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = hn::Load(df, qt + x * ld + i * N);
    for (int jj = 0; jj < J; ++jj) {
      const V b = hn::Set(df, k[static_cast<size_t>(jj) * d + x]);
      for (int i = 0; i < NV; ++i) a[jj][i] = hn::MulAdd(b, qv[i], a[jj][i]);
    }
  }
  for (int jj = 0; jj < J; ++jj)
    for (int i = 0; i < NV; ++i) hn::Store(a[jj][i], df, pt + jj * ld + i * N);
}

template <int NV, class D>
HWY_INLINE void ScoreColumns(D df, const float* HWY_RESTRICT qt, size_t ld, const float* HWY_RESTRICT k, int d, int m,
                             float* HWY_RESTRICT pt) {
  int j = 0;
  for (; j + kKeyStep <= m; j += kKeyStep)
    ScoreTile<kKeyStep, NV>(df, qt, ld, k + static_cast<size_t>(j) * d, d, pt + j * ld);
  for (; j < m; ++j) ScoreTile<1, NV>(df, qt, ld, k + static_cast<size_t>(j) * d, d, pt + j * ld);
}

// o[r][x0, x0 + NV * N) = corr[r] * o[r][...] + sum_{j < m} pt[j][r] v_j[...] for r in [0, R).
template <int R, int NV, class D>
HWY_INLINE void AccumulateRows(D df, float* HWY_RESTRICT o, int d, const float* HWY_RESTRICT pt, size_t ld,
                               const float* HWY_RESTRICT corr, const float* HWY_RESTRICT v, int m, int x0) {
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  V a[R][NV];
  for (int r = 0; r < R; ++r) {
    const V c = hn::Set(df, corr[r]);
    for (int i = 0; i < NV; ++i) a[r][i] = hn::Mul(hn::LoadU(df, o + r * d + x0 + i * N), c);
  }
  const float* HWY_RESTRICT vj = v + x0;
  for (int j = 0; j < m; ++j, vj += d) {
    V vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = hn::LoadU(df, vj + i * N);
    for (int r = 0; r < R; ++r) {
      const V b = hn::Set(df, pt[j * ld + r]);
      for (int i = 0; i < NV; ++i) a[r][i] = hn::MulAdd(b, vv[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) hn::StoreU(a[r][i], df, o + r * d + x0 + i * N);
}

template <int R, class D>
HWY_INLINE void AccumulateAllColumns(D df, float* HWY_RESTRICT o, int d, const float* HWY_RESTRICT pt, size_t ld,
                                     const float* HWY_RESTRICT corr, const float* HWY_RESTRICT v, int m) {
  const int N = static_cast<int>(hn::Lanes(df));
  const int d_vec = d / N * N;
  int x0 = 0;
  for (; x0 + 4 * N <= d_vec; x0 += 4 * N) AccumulateRows<R, 4>(df, o, d, pt, ld, corr, v, m, x0);
  for (; x0 < d_vec; x0 += N) AccumulateRows<R, 1>(df, o, d, pt, ld, corr, v, m, x0);
  for (int r = 0; r < R; ++r)  // scalar tail when d is not a multiple of the lanes
    for (int x = d_vec; x < d; ++x) {
      float acc = o[r * d + x] * corr[r];
      for (int j = 0; j < m; ++j) acc += pt[j * ld + r] * v[static_cast<size_t>(j) * d + x];
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

// Floats of each scratch region, padded to whole 64-byte lines.
inline size_t Pad16(size_t n) { return (n + 15) / 16 * 16; }

void AttentionBlock(const float* HWY_RESTRICT q, size_t q_stride, int n_tok, int n_q, const float* HWY_RESTRICT k,
                    const float* HWY_RESTRICT v, const int* HWY_RESTRICT visible, int d, float scale,
                    float* HWY_RESTRICT out, size_t out_stride, uint8_t* scratch) {
  const hn::ScalableTag<float> df;
  using V = decltype(hn::Zero(df));
  const int N = static_cast<int>(hn::Lanes(df));
  const int rows = n_tok * n_q;
  if (rows <= 0) return;
  const size_t ld = Pad16(static_cast<size_t>(rows));  // a whole number of vectors on every target

  // Scratch (sized by block_scratch_bytes): transposed queries, scores/weights, output
  // accumulators, per-row visible count and softmax state.
  float* qt = reinterpret_cast<float*>(scratch);
  float* pt = qt + static_cast<size_t>(d) * ld;
  float* o = pt + kKeyTile * ld;
  float* cnt = o + Pad16(static_cast<size_t>(rows) * d);
  float* run_max = cnt + ld;
  float* run_sum = run_max + ld;
  float* corr = run_sum + ld;

  int n_max = 0;
  for (int t = 0; t < n_tok; ++t) n_max = std::max(n_max, visible[t]);
  for (size_t r = 0; r < ld; ++r) {
    const bool real = r < static_cast<size_t>(rows);
    const float* qr = real ? q + (r / n_q) * q_stride + (r % n_q) * d : nullptr;
    for (int x = 0; x < d; ++x) qt[x * ld + r] = real ? qr[x] * scale : 0.0f;
    // Counts are exact in float up to 2^24 keys.
    cnt[r] = real ? static_cast<float>(visible[r / n_q]) : 0.0f;
    run_max[r] = -INFINITY;
    run_sum[r] = 0.0f;
    corr[r] = 1.0f;
  }
  std::fill(o, o + static_cast<size_t>(rows) * d, 0.0f);

  const V floor = hn::Set(df, -87.0f);  // exp underflows to ~0 below; keeps Exp in range
  const V neg_inf = hn::Set(df, -INFINITY);
  for (int j0 = 0; j0 < n_max; j0 += kKeyTile) {
    // Rows that see any key of this tile: [r_lo, r_hi). With causal counts that is a suffix of
    // the block; rows inside it that see none get zero weights and keep their state.
    int r_lo = rows, r_hi = 0, n_hi = 0;
    for (int t = 0; t < n_tok; ++t)
      if (visible[t] > j0) r_lo = std::min(r_lo, t * n_q), r_hi = (t + 1) * n_q, n_hi = std::max(n_hi, visible[t]);
    const int m = std::min(kKeyTile, n_hi - j0);  // keys any active row sees
    const int v_lo = r_lo / N, v_hi = (r_hi + N - 1) / N;  // row vectors

    ForTiles<4>(v_hi - v_lo, [&](int i, auto nv) {
      const size_t c = static_cast<size_t>(v_lo + i) * N;
      ScoreColumns<decltype(nv)::value>(df, qt + c, ld, k + static_cast<size_t>(j0) * d, d, m, pt + c);
    });

    // Online softmax down the key axis, a vector of rows at a time: rescale what was
    // accumulated when a row's running maximum grows; keys a row must not see weigh 0.
    for (int i = v_lo; i < v_hi; ++i) {
      const size_t c = static_cast<size_t>(i) * N;
      const V vcnt = hn::Load(df, cnt + c);
      V vmax = neg_inf;
      for (int j = 0; j < m; ++j) {
        const auto seen = hn::Lt(hn::Set(df, static_cast<float>(j0 + j)), vcnt);
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
        const auto seen = hn::Lt(hn::Set(df, static_cast<float>(j0 + j)), vcnt);
        const V e = hn::CallExp(df, hn::Max(hn::Sub(hn::Load(df, pt + j * ld + c), new_max), floor));
        const V p = hn::IfThenElseZero(seen, e);
        hn::Store(p, df, pt + j * ld + c);
        vsum = hn::Add(vsum, p);
      }
      hn::Store(new_max, df, run_max + c);
      hn::Store(vc, df, corr + c);
      hn::Store(hn::MulAdd(hn::Load(df, run_sum + c), vc, vsum), df, run_sum + c);
    }

    const float* vt = v + static_cast<size_t>(j0) * d;
    ForTiles<kRowTile>(r_hi - r_lo, [&](int i, auto nr) {
      const int r = r_lo + i;
      AccumulateAllColumns<decltype(nr)::value>(df, o + static_cast<size_t>(r) * d, d, pt + r, ld, corr + r, vt, m);
    });
  }

  for (int r = 0; r < rows; ++r) {
    float* dst = out + (r / n_q) * out_stride + static_cast<size_t>(r % n_q) * d;
    const float* src = o + static_cast<size_t>(r) * d;
    const float inv = run_sum[r] > 0.0f ? 1.0f / run_sum[r] : 0.0f;
    for (int x = 0; x < d; ++x) dst[x] = src[x] * inv;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace qf
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qf {
HWY_EXPORT(AttentionGroup);
HWY_EXPORT(AttentionBlock);

namespace {

// Query rows per tiled block: enough to amortise transposing each key tile (d * 64 moves) over
// many rows, few enough that a 256-token chunk still splits into a few dozen work items.
constexpr int kBlockRows = 96;
// Below this many tokens per call the per-token kernel wins: a block of a few rows cannot pay
// for transposing the keys. Measured with bench/attention_bench.cpp.
constexpr int kMinTiledTokens = 2;

size_t block_scratch_bytes(int rows, int d) {
  const auto pad = [](size_t n) { return (n + 15) / 16 * 16; };
  const size_t ld = pad(static_cast<size_t>(rows));
  return (static_cast<size_t>(d) * ld + 64 * ld + pad(static_cast<size_t>(rows) * d) + 4 * ld) * sizeof(float);
}

void check_dim(int d) {
  if (d <= 0 || d > kAttentionMaxDim) fail("attention: head_dim ", d, " is not in [1, ", kAttentionMaxDim, "]");
}

}  // namespace

void attention_group_f32(const float* q, int n_q, const float* k, const float* v, int n, int d, float scale,
                         float* out) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(AttentionGroup)(q, n_q, k, v, n, d, scale, out);
}

void attention_block_f32(const float* q, size_t q_stride, int n_tok, int n_q, const float* k, const float* v,
                         const int* visible, int d, float scale, float* out, size_t out_stride) {
  check_dim(d);
  if (n_tok <= 0 || n_q <= 0) return;
  detail::init_simd_once();
  uint8_t* scratch = detail::scratch(block_scratch_bytes(n_tok * n_q, d));
  HWY_DYNAMIC_DISPATCH(AttentionBlock)(q, q_stride, n_tok, n_q, k, v, visible, d, scale, out, out_stride, scratch);
}

void attention_f32(const float* q, int n_tok, int n_heads, const AttentionKv* kv, int n_kv, int d, float scale,
                   float* out, ThreadPool& pool) {
  check_dim(d);
  if (n_kv <= 0 || n_heads % n_kv != 0) fail("attention: ", n_heads, " query heads do not group over ", n_kv, " KV heads");
  if (n_tok <= 0) return;
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
        attention_group_f32(q + off, group, kv[g].k, kv[g].v, kv[g].visible[t], d, scale, out + off);
      }
    });
    return;
  }

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
      for (int t = t0; t < t1; ++t) keys = std::max<int64_t>(keys, kv[g].visible[t]);
      items.push_back({keys * (t1 - t0), b, g});
    }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  // Scratch for every thread, allocated here so that workers never throw.
  const size_t bytes = (block_scratch_bytes(block_tok * group, d) + 63) / 64 * 64;
  const int n_threads = std::min<int>(pool.size(), static_cast<int>(items.size()));
  auto scratch = hwy::AllocateAligned<uint8_t>(bytes * n_threads);
  if (!scratch) fail("attention: out of memory allocating ", bytes * n_threads, " bytes of scratch");
  std::atomic<size_t> next{0};
  pool.run([&](int thread, int) {
    if (thread >= n_threads) return;
    uint8_t* mine = scratch.get() + bytes * thread;
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items.size();) {
      const Item& it = items[i];
      const int t0 = it.block * block_tok, nt = std::min(n_tok - t0, block_tok);
      const size_t off = t0 * tok_stride + static_cast<size_t>(it.head) * group * d;
      const AttentionKv& h = kv[it.head];
      HWY_DYNAMIC_DISPATCH(AttentionBlock)(q + off, tok_stride, nt, group, h.k, h.v, h.visible + t0, d, scale, out + off, tok_stride, mine);
    }
  });
}
}  // namespace qf
#endif
