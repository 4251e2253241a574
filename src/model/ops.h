// The forward pass's element-wise operations on rows of floats, named as the models describe
// them. Matrix products live in tensor/ (matmul), attention in kv/.
#pragma once
#include <cstddef>
#include <vector>

#include "model/config.h"

namespace qf::ops {

// out[r] = x[r] / rms(x[r]) * w for n_rows rows of n floats (out may alias x).
void rmsnorm_rows(float* out, const float* x, const float* w, size_t n_rows, int n, float eps);

// x[r] += b for n_rows rows of n floats.
void add_bias_rows(float* x, const float* b, size_t n_rows, int n);

// x[i] += y[i].
void add(float* x, const float* y, size_t n);

// x[i] *= s.
void scale(float* x, size_t n, float s);

// gate[i] = act(gate[i]) * up[i].
void gated_activation(float* gate, const float* up, size_t n, Activation act);

// x[i] = cap * tanh(x[i] / cap).
void softcap(float* x, size_t n, float cap);

// Rotary embedding tables for the distinct (base, scale) settings of a model's layers; the
// cos/sin rows of a chunk of positions are computed once per setting and shared by its layers.
class Rotary {
 public:
  // freq_factors (may be null): n_rot / 2 divisors of the frequencies (Llama 3.1's rope_freqs).
  Rotary(const ModelConfig& c, const float* freq_factors);

  // Tables for positions pos[0, n).
  void prepare(const int* pos, int n);
  // Rotates n_vecs vectors of head_dim floats per token, tokens [0, n) of the last prepare(),
  // as layer `layer` does.
  void apply(int layer, float* v, int n, int n_vecs) const;
  // Rotates n_vecs vectors of head_dim floats, already rotated for some position p, to p + delta
  // as layer `layer` does (rotations compose): the context shift moves cached keys back this way.
  void rotate_by(int layer, float* v, int n_vecs, int delta) const;

  // Radians per position of each rotated pair of `layer`, and the pairing (for policies that move
  // query statistics to other positions, kv::RopeGeometry).
  const std::vector<double>& inv_freq(int layer) const { return settings_[layer_setting_[layer]].inv_freq; }
  bool adjacent_pairs() const { return pairing_ == RopePairing::adjacent; }
  int n_rot() const { return n_rot_; }

 private:
  struct Setting {
    std::vector<double> inv_freq;   // [n_rot / 2]
    std::vector<float> cos, sin;    // [token][n_rot / 2]
  };
  // Rotates n_vecs consecutive head vectors by the angles whose cos/sin are cs/sn [n_rot / 2].
  void rotate_rows(const float* cs, const float* sn, float* v, int n_vecs) const;

  RopePairing pairing_;
  int n_rot_, head_dim_;
  std::vector<Setting> settings_;
  std::vector<int> layer_setting_;
};

}  // namespace qf::ops
