// Query statistics for attention-free policies that predict the attention of future queries from
// the queries the model has produced so far (Expected Attention, kvpress ExpectedAttentionPress):
// per layer and query head, running sums of the queries before the rotary embedding and of their
// outer products, and the rotary geometry that carries them to future positions.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace qf::kv {

// Queries at positions below this are left out of the moments (kvpress n_sink: the first tokens'
// queries are outliers), and the keys there are always kept by the policies that use them.
constexpr int kQueryMomentSinks = 4;

// How the model rotates a head_dim vector at a position: pair i (radians inv_freq[i] per position)
// is (2i, 2i+1) with adjacent pairing, else (i, i + n_rot/2); dimensions from n_rot on are not
// rotated. An empty geometry (no layers) means no rotary embedding.
struct RopeGeometry {
  int n_rot = 0;
  bool adjacent = true;
  std::vector<std::vector<double>> inv_freq;  // [layer][n_rot / 2]

  bool empty() const { return inv_freq.empty(); }
  // Rotates v (head_dim values) by the angles of position `pos` (a negative pos undoes it).
  void rotate(int layer, double pos, float* v) const { rotate(layer, pos, v, 1, 0); }
  // The same for n_vectors vectors of head_dim values back to back (one token's heads), each
  // angle's cosine and sine computed once for all of them.
  void rotate(int layer, double pos, float* v, int n_vectors, int head_dim) const;
  // Mean over positions p0 .. p0 + n - 1 of the rotation matrices, head_dim x head_dim row-major
  // (identity where nothing rotates).
  std::vector<double> mean_rotation(int layer, int64_t p0, int n, int head_dim) const;

  // The same mean rotation in its sparse form: (R x)_i = diag[i] x_i + off[i] x_partner[i] (a
  // dimension that does not rotate is its own partner with off 0), from a closed-form sum over
  // the positions, so moving moments costs O(head_dim^2) and no per-position trigonometry.
  struct PairMatrix {
    std::vector<int> partner;
    std::vector<double> diag, off;
  };
  PairMatrix mean_pair_rotation(int layer, int64_t p0, int n, int head_dim) const;
  // The same, with the pairs' amplitudes sin(n w / 2) / (n sin(w / 2)) given: they depend on the
  // layer and n only, so a caller that moves filters every decode step computes them once.
  std::vector<double> mean_pair_amplitudes(int layer, int n) const;
  PairMatrix mean_pair_rotation(int layer, int64_t p0, int n, int head_dim, std::span<const double> amplitudes) const;
};

// One layer's query moments (all query heads), in double: sums, not yet divided.
struct QueryMoments {
  int n_heads = 0, head_dim = 0;
  int64_t count = 0;           // queries added (per head)
  std::vector<double> sum;     // [n_heads][head_dim]
  std::vector<double> outer;   // [n_heads][head_dim][head_dim], upper triangle filled (i <= j)
  // Recent queries (AttentionStats::query_recent = H > 0): per head, the exponentially decayed sum
  // of the unit-length queries, recent = (1 - 1/H) recent + q / ||q||. Only its direction is used
  // (adaptive filters), so it is not normalised by the weights' sum. Empty when H is 0.
  std::vector<double> recent;  // [n_heads][head_dim]

  void clear();
  // Adds one token's queries, q[n_heads][head_dim] before the rotary embedding: to the sums when
  // `moments` (else sum and outer stay empty: qfilters_adaptive needs only the recent queries, and
  // the outer products cost head_dim^2 / 2 per query head); recent_horizon H > 0 also updates
  // `recent` (1 - 1/H per token). The first call sets the shape; a later call with another shape,
  // or asking for the sums after calls that did not keep them, throws qf::Error.
  void add(const float* q, int n_heads, int head_dim, int recent_horizon = 0, bool moments = true);
  // Mean and covariance (the biased estimate, divided by count as kvpress) of query head h;
  // zeros when no query was added. cov is head_dim x head_dim, full.
  void mean_cov(int h, std::vector<double>& mean, std::vector<double>& cov) const;

 private:
  void add_recent(const float* q, int horizon);
};

}  // namespace qf::kv
