// SIMD element-wise kernels of the forward pass (gated activations, RMS norm, soft-capping),
// compiled once per target by Highway (foreach_target re-includes this file) and dispatched at
// run time like the matmuls. std::tanh / std::exp per element cost more than the matmuls around
// them in Gemma 3's prefill (n_ff = 2048 GELUs per token and layer), hence vectors here.
#include "tensor/simd_config.h"  // first: fixes the Highway target set

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "tensor/kernels.h"
#include "tensor/kernels_internal.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/elementwise.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

HWY_BEFORE_NAMESPACE();
namespace qf {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// x * sigmoid(z) = x * (1 / (1 + exp(-z))). exp's argument is capped at 104, the top of
// Highway's range, where exp is already inf: sigmoid is then exactly 0 and so is the result
// (x * 0, also for the largest floats, where x / (1 + exp(-z)) would not be); a NaN x stays NaN.
template <class D, class V>
HWY_INLINE V TimesSigmoid(D d, V x, V z) {
  const V one = hn::Set(d, 1.0f);
  const V e = hn::Exp(d, hn::Min(hn::Neg(z), hn::Set(d, 104.0f)));
  return hn::Mul(x, hn::Div(one, hn::Add(one, e)));
}

// GELU, tanh form: 0.5 x (1 + tanh(u)) with u = sqrt(2 / pi) (x + 0.044715 x^3), which equals
// x * sigmoid(2 u): one exp instead of a tanh.
template <class D, class V>
HWY_INLINE V GeluTanh(D d, V x) {
  constexpr float k2SqrtTwoOverPi = 2.0f * 0.7978845608028654f;
  const V x2 = hn::Mul(x, x);
  const V z = hn::Mul(x, hn::MulAdd(hn::Set(d, k2SqrtTwoOverPi * 0.044715f), x2, hn::Set(d, k2SqrtTwoOverPi)));
  return TimesSigmoid(d, x, z);
}

template <class D, class V>
HWY_INLINE V Silu(D d, V x) {
  return TimesSigmoid(d, x, x);
}

// gate[i] = act(gate[i]) * up[i] for the activation Act(d, v).
template <class Act>
HWY_INLINE void GatedRows(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, size_t n, const Act& act) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(act(d, hn::LoadU(d, gate + i)), hn::LoadU(d, up + i)), d, gate + i);
  if (i < n) {
    const auto m = hn::FirstN(d, n - i);
    const auto v = hn::Mul(act(d, hn::MaskedLoad(m, d, gate + i)), hn::MaskedLoad(m, d, up + i));
    hn::BlendedStore(v, m, d, gate + i);
  }
}

void GeluTanhMulF32(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, size_t n) {
  GatedRows(gate, up, n, [](auto d, auto v) { return GeluTanh(d, v); });
}

void SiluMulF32(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, size_t n) {
  GatedRows(gate, up, n, [](auto d, auto v) { return Silu(d, v); });
}

void SoftcapF32(float* HWY_RESTRICT x, size_t n, float cap) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto c = hn::Set(d, cap), inv = hn::Set(d, 1.0f / cap);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(c, hn::Tanh(d, hn::Mul(hn::LoadU(d, x + i), inv))), d, x + i);
  if (i < n) {
    const auto m = hn::FirstN(d, n - i);
    hn::BlendedStore(hn::Mul(c, hn::Tanh(d, hn::Mul(hn::MaskedLoad(m, d, x + i), inv))), m, d, x + i);
  }
}

// Sum of x[i]^2 in double (each square exact), as the scalar code did: norms of rows of a few
// hundred to a few thousand values keep full float precision.
double SumSquares(const float* HWY_RESTRICT x, size_t n) {
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;  // as many floats as dd has doubles
  const size_t N = hn::Lanes(dd);
  auto s0 = hn::Zero(dd), s1 = hn::Zero(dd);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto a = hn::PromoteTo(dd, hn::LoadU(df, x + i)), b = hn::PromoteTo(dd, hn::LoadU(df, x + i + N));
    s0 = hn::MulAdd(a, a, s0);
    s1 = hn::MulAdd(b, b, s1);
  }
  double s = hn::GetLane(hn::SumOfLanes(dd, hn::Add(s0, s1)));
  for (; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

void RmsNormF32(float* out, const float* x, const float* HWY_RESTRICT w, size_t n, float eps) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const float inv = 1.0f / std::sqrt(static_cast<float>(SumSquares(x, n) / static_cast<double>(n)) + eps);
  const auto vinv = hn::Set(d, inv);
  size_t i = 0;
  // x * inv * w in this order, as the scalar code rounds it.
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, x + i), vinv), hn::LoadU(d, w + i)), d, out + i);
  for (; i < n; ++i) out[i] = x[i] * inv * w[i];
}

// x[0, n) to fp16 bits, exactly as f32_to_fp16 rounds each (nearest even, NaN stays a quiet
// NaN with the top payload bits, overflow to inf): the x86 targets' DemoteTo is vcvtps2ph, which
// is that IEEE conversion; the portable target calls f32_to_fp16 itself. Each decode step stores
// every session's new keys and values (one element at a time it was 2% of Gemma 3's prefill).
void F32ToFp16Row(const float* HWY_RESTRICT x, size_t n, uint8_t* HWY_RESTRICT out) {
  size_t i = 0;
#if HWY_TARGET != HWY_SCALAR && HWY_TARGET != HWY_EMU128 && !defined(HWY_DISABLE_F16C)
  const hn::ScalableTag<float> d;
  const hn::Rebind<hwy::float16_t, decltype(d)> dh;
  const size_t N = hn::Lanes(d);
  auto* h = reinterpret_cast<hwy::float16_t*>(out);
  for (; i + N <= n; i += N) hn::StoreU(hn::DemoteTo(dh, hn::LoadU(d, x + i)), dh, h + i);
#endif
  for (; i < n; ++i) {
    const uint16_t h16 = f32_to_fp16(x[i]);
    std::memcpy(out + 2 * i, &h16, 2);
  }
}

// Index of the first maximum, as std::max_element with operator< finds it: NaNs never win
// (they compare false) except at index 0, which nothing then beats; -0 and +0 tie. One pass
// for the largest non-NaN value, one for its first index: greedy decoding runs this over
// Gemma 3's 262,144 logits per token, 2% of decode one element at a time.
size_t ArgmaxF32(const float* HWY_RESTRICT x, size_t n) {
  if (n == 0 || std::isnan(x[0])) return 0;
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto ninf = hn::Set(d, -HUGE_VALF);
  auto m0 = ninf, m1 = ninf;
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto a = hn::LoadU(d, x + i), b = hn::LoadU(d, x + i + N);
    m0 = hn::Max(m0, hn::IfThenElse(hn::Eq(a, a), a, ninf));
    m1 = hn::Max(m1, hn::IfThenElse(hn::Eq(b, b), b, ninf));
  }
  float best = hn::GetLane(hn::MaxOfLanes(d, hn::Max(m0, m1)));
  for (; i < n; ++i)
    if (x[i] > best) best = x[i];
  const auto target = hn::Set(d, best);
  i = 0;
  for (; i + N <= n; i += N) {
    const intptr_t k = hn::FindFirstTrue(d, hn::Eq(hn::LoadU(d, x + i), target));
    if (k >= 0) return i + static_cast<size_t>(k);
  }
  for (; i < n; ++i)
    if (x[i] == best) return i;
  return 0;  // unreachable: best is one of the values
}

}  // namespace HWY_NAMESPACE
}  // namespace qf
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qf {

HWY_EXPORT(GeluTanhMulF32);
HWY_EXPORT(SiluMulF32);
HWY_EXPORT(SoftcapF32);
HWY_EXPORT(RmsNormF32);
HWY_EXPORT(F32ToFp16Row);
HWY_EXPORT(ArgmaxF32);

void gelu_tanh_mul_f32(float* gate, const float* up, size_t n) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(GeluTanhMulF32)(gate, up, n);
}

void silu_mul_f32(float* gate, const float* up, size_t n) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(SiluMulF32)(gate, up, n);
}

void softcap_f32(float* x, size_t n, float cap) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(SoftcapF32)(x, n, cap);
}

void rmsnorm_f32(float* out, const float* x, const float* w, size_t n, float eps) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(RmsNormF32)(out, x, w, n, eps);
}

void f32_to_fp16_row(const float* x, size_t n, uint8_t* out) {
  detail::init_simd_once();
  HWY_DYNAMIC_DISPATCH(F32ToFp16Row)(x, n, out);
}

size_t argmax_f32(const float* x, size_t n) {
  detail::init_simd_once();
  return HWY_DYNAMIC_DISPATCH(ArgmaxF32)(x, n);
}

}  // namespace qf
#endif  // HWY_ONCE
