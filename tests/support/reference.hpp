// tests/support/reference.hpp -- a plain double-precision reference for the attention tests.
//
// Written from docs/attention.md alone and independent of the library's kernels: nothing here
// calls tpattn::Rope, DenseScorer, SoftmaxState or a cache. It only borrows the library's plain
// config and weight structs so that a test hands the same numbers to both sides.
//
//   rope_reference()          RoPE of §4: half-split / interleaved, standard / reversed, partial
//   attention_reference()     causal softmax attention of §1 over materialised Q, K, V, with LSE
//   gqa_layer_reference()     the whole MHA/GQA/MQA layer x [T, d] -> y [T, d]
//
// MLA and TPA tests build their own Q, K, V (as Tensor3) and call attention_reference().
// Header-only; every function is inline. Everything is double; float only at the boundary.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "tpattn/attention/gqa.hpp"  // GqaConfig, GqaWeights, RopeConfig: plain structs only

namespace tpattn_test {

using Index = std::ptrdiff_t;

inline void require(bool condition, const char* what) {
  if (!condition) throw std::invalid_argument(std::string("tpattn_test reference: ") + what);
}

// ---- tensors ------------------------------------------------------------------------------------

// [tokens, heads, width] doubles, row-major (width contiguous): the layout of the library's
// [T, h, d] buffers, so a float buffer converts element for element.
struct Tensor3 {
  Index tokens = 0;
  Index heads = 0;
  Index width = 0;
  std::vector<double> data;

  Tensor3() = default;
  Tensor3(Index tokens_, Index heads_, Index width_)
      : tokens(tokens_),
        heads(heads_),
        width(width_),
        data(static_cast<std::size_t>(tokens_ * heads_ * width_), 0.0) {}

  Index size() const { return tokens * heads * width; }
  double& at(Index t, Index i, Index c) { return data[offset(t, i, c)]; }
  double at(Index t, Index i, Index c) const { return data[offset(t, i, c)]; }
  double* row(Index t, Index i) { return data.data() + offset(t, i, 0); }
  const double* row(Index t, Index i) const { return data.data() + offset(t, i, 0); }

  // Tokens [first, first + count) as a new tensor.
  Tensor3 slice(Index first, Index count) const {
    require(first >= 0 && count >= 0 && first + count <= tokens, "Tensor3::slice out of range");
    Tensor3 part(count, heads, width);
    std::copy(data.begin() + static_cast<std::ptrdiff_t>(offset(first, 0, 0)),
              data.begin() + static_cast<std::ptrdiff_t>(offset(first + count, 0, 0)),
              part.data.begin());
    return part;
  }

  static Tensor3 from_floats(const float* values, Index tokens, Index heads, Index width) {
    Tensor3 tensor(tokens, heads, width);
    for (Index n = 0; n < tensor.size(); ++n) tensor.data[static_cast<std::size_t>(n)] = values[n];
    return tensor;
  }
  std::vector<float> to_floats() const {
    return std::vector<float>(data.begin(), data.end());  // rounds to nearest
  }

 private:
  std::size_t offset(Index t, Index i, Index c) const {
    return static_cast<std::size_t>((t * heads + i) * width + c);
  }
};

// ---- comparisons --------------------------------------------------------------------------------

inline double max_abs(const double* values, Index n) {
  double top = 0.0;
  for (Index k = 0; k < n; ++k) top = std::max(top, std::abs(values[k]));
  return top;
}
inline double max_abs(const std::vector<double>& values) {
  return max_abs(values.data(), static_cast<Index>(values.size()));
}
inline double max_abs(const Tensor3& tensor) { return max_abs(tensor.data); }

// max_k |actual[k] - expected[k]|; NaN anywhere gives +inf, so a NaN never passes a bound.
template <class Actual>
double max_abs_error(const Actual* actual, const double* expected, Index n) {
  double worst = 0.0;
  for (Index k = 0; k < n; ++k) {
    const double error = std::abs(static_cast<double>(actual[k]) - expected[k]);
    if (std::isnan(error)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, error);
  }
  return worst;
}

// ---- random data with a fixed seed --------------------------------------------------------------

// std::mt19937's output sequence is fixed by the standard; the distributions of <random> are not,
// so the normal deviates are drawn here (Box-Muller) and every platform sees the same numbers.
class Random {
 public:
  explicit Random(std::uint32_t seed) : engine_(seed) {}

  // Uniform in (0, 1), never 0 or 1.
  double uniform() { return (static_cast<double>(engine_()) + 0.5) / 4294967296.0; }
  double uniform(double low, double high) { return low + (high - low) * uniform(); }
  // Uniform integer in [low, high].
  std::int64_t integer(std::int64_t low, std::int64_t high) {
    return low + static_cast<std::int64_t>(uniform() * static_cast<double>(high - low + 1));
  }
  double normal(double stddev = 1.0) {
    if (has_spare_) {
      has_spare_ = false;
      return spare_ * stddev;
    }
    const double radius = std::sqrt(-2.0 * std::log(uniform()));
    const double angle = 2.0 * 3.14159265358979323846 * uniform();
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle) * stddev;
  }

  std::vector<float> floats(Index n, double stddev = 1.0) {
    std::vector<float> values(static_cast<std::size_t>(n));
    for (float& value : values) value = static_cast<float>(normal(stddev));
    return values;
  }
  tpattn::RowMatrix matrix(Index rows, Index cols, double stddev = 1.0) {
    tpattn::RowMatrix m(rows, cols);
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) m(r, c) = static_cast<float>(normal(stddev));
    return m;
  }

 private:
  std::mt19937 engine_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// The config with value_dim 0 resolved to head_dim, as the operator resolves it.
inline tpattn::GqaConfig resolved(tpattn::GqaConfig config) {
  if (config.value_dim == 0) config.value_dim = config.head_dim;
  return config;
}

// Weights ~ N(0, 1/fan_in): with inputs ~ N(0, 1) every q, k, v entry is ~ N(0, 1), so scores
// q.k / sqrt(d_h) are ~ N(0, 1) and the softmax is neither one-hot nor uniform.
inline tpattn::GqaWeights random_gqa_weights(const tpattn::GqaConfig& raw, std::uint32_t seed) {
  const tpattn::GqaConfig config = resolved(raw);
  Random random(seed);
  const Index d = config.d_model, h = config.heads, g = config.kv_heads;
  const double in_scale = 1.0 / std::sqrt(static_cast<double>(d));
  tpattn::GqaWeights weights;
  weights.w_q = random.matrix(h * config.head_dim, d, in_scale);
  weights.w_k = random.matrix(g * config.head_dim, d, in_scale);
  weights.w_v = random.matrix(g * config.value_dim, d, in_scale);
  weights.w_o = random.matrix(d, h * config.value_dim,
                              1.0 / std::sqrt(static_cast<double>(h * config.value_dim)));
  return weights;
}

// Layer inputs x [tokens, d_model] ~ N(0, 1), as a normed hidden state roughly is.
inline tpattn::RowMatrix random_inputs(Index tokens, Index d_model, std::uint32_t seed) {
  Random random(seed);
  return random.matrix(tokens, d_model, 1.0);
}

// ---- storage rounding ---------------------------------------------------------------------------

// A value as the cache gives it back: fp32 -> Storage (round to nearest even) -> fp32.
template <class Storage>
float round_through(float value) {
  return static_cast<float>(Storage(value));
}
template <class Storage>
std::vector<float> round_through(std::vector<float> values) {
  for (float& value : values) value = round_through<Storage>(value);
  return values;
}

// The same by runtime type; doubles are first rounded to fp32, as the library computes in fp32.
inline double round_through(tpattn::StorageType type, double value) {
  const float single = static_cast<float>(value);
  switch (type) {
    case tpattn::StorageType::f32: return single;
    case tpattn::StorageType::bf16: return round_through<Eigen::bfloat16>(single);
    case tpattn::StorageType::f16: return round_through<Eigen::half>(single);
  }
  return single;
}
inline void round_through(tpattn::StorageType type, Tensor3& tensor) {
  for (double& value : tensor.data) value = round_through(type, value);
}

// Unit roundoff u of a storage type: rounding to nearest changes a normal value x by <= u |x|.
// (2^-24 for fp32's 24-bit significand, 2^-8 for bfloat16's 8 bits, 2^-11 for half's 11 bits.)
inline double unit_roundoff(tpattn::StorageType type) {
  switch (type) {
    case tpattn::StorageType::f32: return std::ldexp(1.0, -24);
    case tpattn::StorageType::bf16: return std::ldexp(1.0, -8);
    case tpattn::StorageType::f16: return std::ldexp(1.0, -11);
  }
  return 0.0;
}

// ---- RoPE (§4) ----------------------------------------------------------------------------------

inline Index rotary_width(const tpattn::RopeConfig& rope, Index head_dim) {
  return rope.rotary_dim == 0 ? head_dim : rope.rotary_dim;
}

// Rotates x[0, head_dim) in place for (possibly fractional or negative) position `position`.
// Pair j in [0, r/2), r = rotary width, turns by position * base^(-2j / r):
//   half_split pairs (j, j + r/2), interleaved pairs (2j, 2j + 1);
//   standard:  y1 = x1 cos - x2 sin,  y2 = x1 sin + x2 cos;
//   reversed:  y1 = x1 cos + x2 sin,  y2 = -x1 sin + x2 cos.
// Features [r, head_dim) pass through.
inline void rope_reference(double* x, Index head_dim, double position,
                           const tpattn::RopeConfig& rope) {
  if (!rope.enabled) return;
  const Index r = rotary_width(rope, head_dim);
  require(r > 0 && r % 2 == 0 && r <= head_dim, "rope_reference: rotary width");
  const Index pairs = r / 2;
  const bool half_split = rope.pairing == tpattn::RopePairing::half_split;
  const bool standard = rope.direction == tpattn::RopeDirection::standard;
  for (Index j = 0; j < pairs; ++j) {
    const double theta =
        std::pow(rope.base, -2.0 * static_cast<double>(j) / static_cast<double>(r));
    const double angle = position * theta;
    const double c = std::cos(angle);
    const double s = std::sin(angle);
    const Index a = half_split ? j : 2 * j;
    const Index b = half_split ? j + pairs : 2 * j + 1;
    const double x1 = x[a];
    const double x2 = x[b];
    if (standard) {
      x[a] = x1 * c - x2 * s;
      x[b] = x1 * s + x2 * c;
    } else {
      x[a] = x1 * c + x2 * s;
      x[b] = -x1 * s + x2 * c;
    }
  }
}

// Token t of `x` sits at position first_position + t; every head of it rotates.
inline void rope_reference(Tensor3& x, Index first_position, const tpattn::RopeConfig& rope) {
  for (Index t = 0; t < x.tokens; ++t)
    for (Index i = 0; i < x.heads; ++i)
      rope_reference(x.row(t, i), x.width, static_cast<double>(first_position + t), rope);
}

// ---- causal attention (§1) ----------------------------------------------------------------------

struct AttentionResult {
  Tensor3 out;              // [Tq, h, d_v]
  std::vector<double> lse;  // [Tq, h], natural log of sum_s exp(scale q . k_s)
  double lse_at(Index t, Index i) const { return lse[static_cast<std::size_t>(t * out.heads + i)]; }
};

// q [Tq, h, d_k], k [Tk, g, d_k], v [Tk, g, d_v], Tq <= Tk: the queries are the last Tq tokens, so
// query t sits at position Tk - Tq + t and sees keys [0, Tk - Tq + t]. Head i reads KV head
// i / (h / g). Softmax over scale * q . k with the maximum subtracted (exact in double).
inline AttentionResult attention_reference(const Tensor3& q, const Tensor3& k, const Tensor3& v,
                                           double scale) {
  require(q.width == k.width, "attention_reference: q and k widths differ");
  require(k.tokens == v.tokens && k.heads == v.heads, "attention_reference: k and v differ");
  require(k.heads >= 1 && q.heads % k.heads == 0, "attention_reference: h not a multiple of g");
  require(q.tokens <= k.tokens, "attention_reference: more queries than keys");
  const Index group = q.heads / k.heads;
  AttentionResult result{Tensor3(q.tokens, q.heads, v.width),
                         std::vector<double>(static_cast<std::size_t>(q.tokens * q.heads))};
  std::vector<double> scores(static_cast<std::size_t>(k.tokens));
  for (Index t = 0; t < q.tokens; ++t) {
    const Index visible = k.tokens - q.tokens + t + 1;
    for (Index i = 0; i < q.heads; ++i) {
      const Index kv = i / group;
      const double* query = q.row(t, i);
      double top = -std::numeric_limits<double>::infinity();
      for (Index s = 0; s < visible; ++s) {
        const double* key = k.row(s, kv);
        double dot = 0.0;
        for (Index c = 0; c < q.width; ++c) dot += query[c] * key[c];
        scores[static_cast<std::size_t>(s)] = scale * dot;
        top = std::max(top, scale * dot);
      }
      double sum = 0.0;
      double* out = result.out.row(t, i);
      for (Index s = 0; s < visible; ++s) {
        const double weight = std::exp(scores[static_cast<std::size_t>(s)] - top);
        const double* value = v.row(s, kv);
        sum += weight;
        for (Index c = 0; c < v.width; ++c) out[c] += weight * value[c];
      }
      for (Index c = 0; c < v.width; ++c) out[c] /= sum;
      result.lse[static_cast<std::size_t>(t * q.heads + i)] = top + std::log(sum);
    }
  }
  return result;
}

// ---- the MHA / GQA / MQA layer (§1) -------------------------------------------------------------

inline Eigen::MatrixXd to_double(const tpattn::RowMatrix& m) { return m.cast<double>(); }

inline double gqa_scale(const tpattn::GqaConfig& config) {
  return 1.0 / std::sqrt(static_cast<double>(config.head_dim));
}

struct Projections {
  Tensor3 q;  // [T, h, d_h], rotated
  Tensor3 k;  // [T, g, d_h], rotated
  Tensor3 v;  // [T, g, d_v]
};

// x [T, d_model], token t at position first_position + t: q = W_Q x, k = W_K x, v = W_V x, then
// RoPE on q and k.
inline Projections gqa_projections(const tpattn::GqaConfig& raw, const tpattn::GqaWeights& weights,
                                   const Eigen::MatrixXd& x, Index first_position = 0) {
  const tpattn::GqaConfig config = resolved(raw);
  const Index tokens = x.rows(), h = config.heads, g = config.kv_heads;
  const Index d_h = config.head_dim, d_v = config.value_dim;
  require(x.cols() == config.d_model, "gqa_projections: x width");
  // Row-major copies so a token's heads are contiguous, like Tensor3.
  using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const RowMatrixD q = x * to_double(weights.w_q).transpose();
  const RowMatrixD k = x * to_double(weights.w_k).transpose();
  const RowMatrixD v = x * to_double(weights.w_v).transpose();
  Projections p{Tensor3(tokens, h, d_h), Tensor3(tokens, g, d_h), Tensor3(tokens, g, d_v)};
  std::copy(q.data(), q.data() + q.size(), p.q.data.begin());
  std::copy(k.data(), k.data() + k.size(), p.k.data.begin());
  std::copy(v.data(), v.data() + v.size(), p.v.data.begin());
  rope_reference(p.q, first_position, config.rope);
  rope_reference(p.k, first_position, config.rope);
  return p;
}

// y [T, d_model] = [o_1 .. o_h] W_O^T for o [T, h, d_v].
inline Eigen::MatrixXd gqa_output(const tpattn::GqaWeights& weights, const Tensor3& o) {
  Eigen::MatrixXd flat(o.tokens, o.heads * o.width);
  for (Index t = 0; t < o.tokens; ++t)
    for (Index n = 0; n < o.heads * o.width; ++n) flat(t, n) = o.row(t, 0)[n];
  return flat * to_double(weights.w_o).transpose();
}

// The whole layer over a sequence x [T, d_model] whose first token sits at first_position:
// y [T, d_model], row t the output of token t (causal).
inline Eigen::MatrixXd gqa_layer_reference(const tpattn::GqaConfig& config,
                                           const tpattn::GqaWeights& weights,
                                           const Eigen::MatrixXd& x, Index first_position = 0) {
  const Projections p = gqa_projections(config, weights, x, first_position);
  return gqa_output(weights, attention_reference(p.q, p.k, p.v, gqa_scale(config)).out);
}

// The same with the keys and values given (e.g. read back from a cache, in its storage's
// rounding): the queries come from x, which holds the last x.rows() of the k.tokens tokens.
inline Eigen::MatrixXd gqa_layer_reference(const tpattn::GqaConfig& config,
                                           const tpattn::GqaWeights& weights,
                                           const Eigen::MatrixXd& x, const Tensor3& k,
                                           const Tensor3& v) {
  const Index first_position = k.tokens - x.rows();
  const Projections p = gqa_projections(config, weights, x, first_position);
  return gqa_output(weights, attention_reference(p.q, k, v, gqa_scale(config)).out);
}

}  // namespace tpattn_test
