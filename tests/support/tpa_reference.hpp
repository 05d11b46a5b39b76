// tests/support/tpa_reference.hpp -- TPA and TPA-KVonly in double, straight from the weights.
//
// Written from docs/attention.md §3 and independent of the library's TPA code: the factors are
// projected in double, Q, K and V are materialised (never decoded from factors), and the
// attention is support/reference.hpp's attention_reference(). Only the plain config and weight
// structs are borrowed from the library.
//
//   tpa_factors()          the six factors of every token, [T, R, h] and [T, R, width]
//   materialise()          (1/R) A^T B per token: [T, R, h] x [T, R, w] -> [T, h, w]
//   tpa_layer_reference()  the whole TPA / TPA-KVonly layer x [T, d] -> y [T, d]
//
// Weight layout, as the public T6 code stores it: the A outputs head-major (row i R + r is head
// i, rank r), the B outputs rank-major (row r w + j is rank r, feature j).
#pragma once

#include <cmath>

#include "support/reference.hpp"
#include "tpattn/attention/tpa.hpp"  // TpaConfig, TpaWeights: plain structs only

namespace tpattn_test {

inline tpattn::TpaConfig resolved(tpattn::TpaConfig config) {
  if (config.value_dim == 0) config.value_dim = config.head_dim;
  return config;
}

// How the rows of an A weight are read. head_major is the T6 layout; rank_major (row r h + i)
// is a deliberate misreading, so a test can show that the layout matters.
enum class FactorLayout { head_major, rank_major };

using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A = W_A x per token, as [T, R, h]: A[t][r][i] = (W_A x_t)[i R + r] (head-major).
inline Tensor3 a_factor(const tpattn::RowMatrix& weight, const Eigen::MatrixXd& x, Index heads,
                        Index rank, FactorLayout layout = FactorLayout::head_major) {
  require(weight.rows() == heads * rank && weight.cols() == x.cols(), "a_factor: weight shape");
  const RowMatrixD y = x * weight.cast<double>().transpose();
  Tensor3 a(x.rows(), rank, heads);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index r = 0; r < rank; ++r)
      for (Index i = 0; i < heads; ++i)
        a.at(t, r, i) = y(t, layout == FactorLayout::head_major ? i * rank + r : r * heads + i);
  return a;
}

// B = W_B x per token, as [T, R, width]: B[t][r][j] = (W_B x_t)[r width + j] (rank-major).
inline Tensor3 b_factor(const tpattn::RowMatrix& weight, const Eigen::MatrixXd& x, Index rank,
                        Index width) {
  require(weight.rows() == rank * width && weight.cols() == x.cols(), "b_factor: weight shape");
  const RowMatrixD y = x * weight.cast<double>().transpose();
  Tensor3 b(x.rows(), rank, width);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index n = 0; n < rank * width; ++n)
      b.data[static_cast<std::size_t>(t * rank * width + n)] = y(t, n);
  return b;
}

// M[t][i][j] = (1/R) sum_r A[t][r][i] B[t][r][j]: a [T, R, h], b [T, R, w] -> [T, h, w].
inline Tensor3 materialise(const Tensor3& a, const Tensor3& b) {
  require(a.tokens == b.tokens && a.heads == b.heads, "materialise: factor shapes");
  const Index rank = a.heads, heads = a.width, width = b.width;
  Tensor3 m(a.tokens, heads, width);
  for (Index t = 0; t < a.tokens; ++t)
    for (Index i = 0; i < heads; ++i)
      for (Index j = 0; j < width; ++j) {
        double sum = 0.0;
        for (Index r = 0; r < rank; ++r) sum += a.at(t, r, i) * b.at(t, r, j);
        m.at(t, i, j) = sum / static_cast<double>(rank);
      }
  return m;
}

// Rows of every token of x ([T, rows, width]) rotated; token t at position first_position + t.
inline void rotate_rows(Tensor3& x, Index first_position, const tpattn::RopeConfig& rope) {
  rope_reference(x, first_position, rope);
}

struct TpaFactors {
  Tensor3 a_q, b_q;  // [T, R_Q, h], [T, R_Q, d_h] (rotated)   TPA
  Tensor3 q;         // [T, h, d_h] (rotated)                   TPA-KVonly
  Tensor3 a_k, b_k;  // [T, R_K, h], [T, R_K, d_h] (rotated)
  Tensor3 a_v, b_v;  // [T, R_V, h], [T, R_V, d_v]
};

struct TpaReferenceOptions {
  // The cached factors A_K, B_K (after rotation), A_V, B_V are rounded through this type, as
  // the cache stores them; queries stay exact. f32 leaves everything in double.
  tpattn::StorageType cache_storage = tpattn::StorageType::f32;
  // Rotate the materialised Q and K per head instead of the rows of B_Q and B_K. RoPE is linear
  // on the feature axis, so both give the same attention (docs §6.5).
  bool rotate_after_materialising = false;
  FactorLayout a_layout = FactorLayout::head_major;
};

struct TpaReference {
  TpaFactors factors;         // as cached (rotated, rounded)
  Tensor3 q, k, v;            // materialised: [T, h, d_h], [T, h, d_h], [T, h, d_v]
  AttentionResult attention;  // o [T, h, d_v], lse [T, h]
  Eigen::MatrixXd y;          // [T, d_model]
};

// The layer over a whole sequence x [T, d_model] from position 0: y row t is token t's output.
// rank_q == 0 is TPA-KVonly (q = W_Q x, head-major rows i d_h + j).
inline TpaReference tpa_layer_reference(const tpattn::TpaConfig& raw,
                                        const tpattn::TpaWeights& weights, const Eigen::MatrixXd& x,
                                        const TpaReferenceOptions& options = {}) {
  const tpattn::TpaConfig config = resolved(raw);
  const Index h = config.heads, dh = config.head_dim, dv = config.value_dim;
  require(x.cols() == config.d_model, "tpa_layer_reference: x width");
  require(!options.rotate_after_materialising || options.cache_storage == tpattn::StorageType::f32,
          "tpa_layer_reference: rotate_after_materialising needs exact (f32) factors");
  const bool rotate_rows_now = !options.rotate_after_materialising;

  TpaReference ref;
  TpaFactors& f = ref.factors;
  if (config.rank_q == 0) {
    f.q = b_factor(weights.w_q, x, h, dh);  // [T, h, d_h]: the same row-major split
    ref.q = f.q;
  } else {
    f.a_q = a_factor(weights.w_a_q, x, h, config.rank_q, options.a_layout);
    f.b_q = b_factor(weights.w_b_q, x, config.rank_q, dh);
    if (rotate_rows_now) rotate_rows(f.b_q, 0, config.rope);
    ref.q = materialise(f.a_q, f.b_q);
  }
  f.a_k = a_factor(weights.w_a_k, x, h, config.rank_k, options.a_layout);
  f.b_k = b_factor(weights.w_b_k, x, config.rank_k, dh);
  f.a_v = a_factor(weights.w_a_v, x, h, config.rank_v, options.a_layout);
  f.b_v = b_factor(weights.w_b_v, x, config.rank_v, dv);
  if (rotate_rows_now) rotate_rows(f.b_k, 0, config.rope);
  if (options.cache_storage != tpattn::StorageType::f32)
    for (Tensor3* cached : {&f.a_k, &f.b_k, &f.a_v, &f.b_v})
      round_through(options.cache_storage, *cached);

  ref.k = materialise(f.a_k, f.b_k);
  ref.v = materialise(f.a_v, f.b_v);
  if (options.rotate_after_materialising) {
    if (config.rank_q == 0) {
      // KV-only queries are not factors: rotate q and k alike, which is the same thing.
      ref.q = f.q;
    }
    rope_reference(ref.q, 0, config.rope);
    rope_reference(ref.k, 0, config.rope);
  } else if (config.rank_q == 0) {
    rope_reference(ref.q, 0, config.rope);
    f.q = ref.q;
  }
  ref.attention =
      attention_reference(ref.q, ref.k, ref.v, 1.0 / std::sqrt(static_cast<double>(dh)));

  Eigen::MatrixXd flat(x.rows(), h * dv);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index n = 0; n < h * dv; ++n) flat(t, n) = ref.attention.out.row(t, 0)[n];
  ref.y = flat * weights.w_o.cast<double>().transpose();
  return ref;
}

// Weights for the spec's shapes, scaled so that every factor entry of an input x ~ N(0, 1) is
// ~ N(0, 1) for B and ~ N(0, R) for A: then each entry of Q, K, V = (1/R) A^T B is ~ N(0, 1),
// the scores q.k / sqrt(d_h) are ~ N(0, 1) whatever the ranks, and the softmax is neither
// one-hot nor uniform.
inline tpattn::TpaWeights random_tpa_weights(const tpattn::TpaConfig& raw, std::uint32_t seed) {
  const tpattn::TpaConfig config = resolved(raw);
  Random random(seed);
  const Index d = config.d_model, h = config.heads, dh = config.head_dim, dv = config.value_dim;
  const double unit = 1.0 / std::sqrt(static_cast<double>(d));
  auto a_scale = [&](Index rank) { return unit * std::sqrt(static_cast<double>(rank)); };
  tpattn::TpaWeights w;
  if (config.rank_q == 0) {
    w.w_q = random.matrix(h * dh, d, unit);
  } else {
    w.w_a_q = random.matrix(h * config.rank_q, d, a_scale(config.rank_q));
    w.w_b_q = random.matrix(config.rank_q * dh, d, unit);
  }
  w.w_a_k = random.matrix(h * config.rank_k, d, a_scale(config.rank_k));
  w.w_b_k = random.matrix(config.rank_k * dh, d, unit);
  w.w_a_v = random.matrix(h * config.rank_v, d, a_scale(config.rank_v));
  w.w_b_v = random.matrix(config.rank_v * dv, d, unit);
  w.w_o = random.matrix(d, h * dv, 1.0 / std::sqrt(static_cast<double>(h * dv)));
  return w;
}

}  // namespace tpattn_test
