// SIMD fused attention for one GQA group (see attention_kernel.h). Compiled for every Highway
// target (foreach_target re-includes this file) and dispatched at run time like the matmuls.
#include "tensor/simd_config.h"  // first: fixes the Highway target set

#include <algorithm>
#include <cmath>
#include <cstring>

#include "tensor/attention_kernel.h"
#include "tensor/kernels_internal.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/attention_kernel.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
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

}  // namespace HWY_NAMESPACE
}  // namespace qf
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qf {
HWY_EXPORT(AttentionGroup);

void attention_group_f32(const float* q, int n_q, const float* k, const float* v, int n, int d, float scale,
                         float* out) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(AttentionGroup)(q, n_q, k, v, n, d, scale, out);
}
}  // namespace qf
#endif
