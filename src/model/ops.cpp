#include "model/ops.h"

#include <cmath>

#include "tensor/kernels.h"

namespace qf::ops {

void rmsnorm_rows(float* out, const float* x, const float* w, size_t n_rows, int n, float eps) {
  for (size_t r = 0; r < n_rows; ++r) rmsnorm_f32(out + r * n, x + r * n, w, static_cast<size_t>(n), eps);
}

void add_bias_rows(float* x, const float* b, size_t n_rows, int n) {
  for (size_t r = 0; r < n_rows; ++r)
    for (int i = 0; i < n; ++i) x[r * n + i] += b[i];
}

void add(float* x, const float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] += y[i];
}

void scale(float* x, size_t n, float s) {
  for (size_t i = 0; i < n; ++i) x[i] *= s;
}

void gated_activation(float* gate, const float* up, size_t n, Activation act) {
  if (act == Activation::silu) silu_mul_f32(gate, up, n);
  else gelu_tanh_mul_f32(gate, up, n);
}

void softcap(float* x, size_t n, float cap) { softcap_f32(x, n, cap); }

Rotary::Rotary(const ModelConfig& c, const float* freq_factors)
    : pairing_(c.rope_pairing), n_rot_(c.n_rot), head_dim_(c.head_dim) {
  for (const LayerConfig& l : c.layers) {
    // pair i turns by pos * base^(-2i/n_rot) / factor_i / scale
    std::vector<double> inv(n_rot_ / 2);
    for (int i = 0; i < n_rot_ / 2; ++i) {
      double f = std::pow(static_cast<double>(l.rope_base), -2.0 * i / n_rot_);
      if (freq_factors) f /= freq_factors[i];
      inv[i] = f / l.rope_scale;
    }
    size_t s = 0;
    while (s < settings_.size() && settings_[s].inv_freq != inv) ++s;
    if (s == settings_.size()) settings_.push_back({std::move(inv), {}, {}});
    layer_setting_.push_back(static_cast<int>(s));
  }
}

void Rotary::prepare(const int* pos, int n) {
  const int half = n_rot_ / 2;
  for (Setting& s : settings_) {
    s.cos.resize(static_cast<size_t>(n) * half);
    s.sin.resize(static_cast<size_t>(n) * half);
    for (int t = 0; t < n; ++t)
      for (int i = 0; i < half; ++i) {
        const double theta = static_cast<double>(pos[t]) * s.inv_freq[i];
        s.cos[static_cast<size_t>(t) * half + i] = static_cast<float>(std::cos(theta));
        s.sin[static_cast<size_t>(t) * half + i] = static_cast<float>(std::sin(theta));
      }
  }
}

void Rotary::rotate_rows(const float* cs, const float* sn, float* v, int n_vecs) const {
  const int half = n_rot_ / 2;
  // Element offsets of pair i's two members.
  const int stride = pairing_ == RopePairing::adjacent ? 2 : 1;
  const int second = pairing_ == RopePairing::adjacent ? 1 : half;
  for (int h = 0; h < n_vecs; ++h) {
    float* p = v + static_cast<size_t>(h) * head_dim_;
    for (int i = 0; i < half; ++i) {
      float& x0 = p[stride * i];
      float& x1 = p[stride * i + second];
      const float a = x0, b = x1;
      x0 = a * cs[i] - b * sn[i];
      x1 = a * sn[i] + b * cs[i];
    }
  }
}

void Rotary::apply(int layer, float* v, int n, int n_vecs) const {
  const Setting& s = settings_[layer_setting_[layer]];
  const size_t half = n_rot_ / 2;
  for (int t = 0; t < n; ++t)
    rotate_rows(&s.cos[t * half], &s.sin[t * half], v + static_cast<size_t>(t) * n_vecs * head_dim_, n_vecs);
}

void Rotary::rotate_by(int layer, float* v, int n_vecs, int delta) const {
  const Setting& s = settings_[layer_setting_[layer]];
  const int half = n_rot_ / 2;
  std::vector<float> cs(half), sn(half);
  for (int i = 0; i < half; ++i) {
    const double theta = static_cast<double>(delta) * s.inv_freq[i];
    cs[i] = static_cast<float>(std::cos(theta));
    sn[i] = static_cast<float>(std::sin(theta));
  }
  rotate_rows(cs.data(), sn.data(), v, n_vecs);
}

}  // namespace qf::ops
