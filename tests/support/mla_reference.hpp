// tests/support/mla_reference.hpp -- a double-precision reference for MLA (docs/attention.md §2).
//
// Written from the spec alone: it never calls tpattn::Rope, rms_norm, DenseScorer or a cache.
// It computes MLA the long way, with EXPLICIT per-head keys and values (§6.4), in the layout of
// DeepSeek-V2 and the public T6 MLA baseline:
//
//   query:  c'_t = RMSNorm_gain(W_DQ x_t) (optional norm; without compression c'_t = x_t)
//           [qC_i (d_h) | qR_i (d_R)] = W_UQ c'_t per head i;  qR_i <- RoPE
//   KV:     [c_t (d_c) | kR_t (d_R)] = W_DKV x_t;  c_t <- RMSNorm_gain(c_t) (optional, eps from
//           the config);  kR_t <- RoPE                                      (c_t, kR_t cached)
//   keys:   K_{s,i} = [W_UK_i c_s (d_h) | kR_s (d_R)],  values V_{s,i} = W_UV_i c_s (d_v),
//           [W_UK_i; W_UV_i] = rows [i (d_h + d_v), (i + 1) (d_h + d_v)) of W_UKV
//   attend: o_i = softmax_causal([qC_i | qR_i] . K_{s,i} / sqrt(d_h + d_R)) V_{s,i}
//   output: y_t = W_O [o_1 .. o_h]
//
// plus the latent-space attention of the bare absorbed kernel (MQA over [c | kR] with value c).
// The generic pieces (Tensor3, RoPE, causal attention with LSE, Random) come from reference.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "support/reference.hpp"
#include "tpattn/attention/mla.hpp"  // MlaConfig, MlaWeights: plain structs only

namespace tpattn_test {

// The config as the operator resolves it: value_dim 0 -> head_dim; no query norm without a query
// latent.
inline tpattn::MlaConfig resolved(tpattn::MlaConfig config) {
  if (config.value_dim == 0) config.value_dim = config.head_dim;
  if (config.q_latent_dim == 0) config.normalize_q_latent = false;
  return config;
}

// The model's softmax scale: 1 / sqrt(d_h + d_R) (§2), never the cached width d_c + d_R.
inline double mla_scale(const tpattn::MlaConfig& config) {
  return 1.0 / std::sqrt(static_cast<double>(config.head_dim + config.rope_dim));
}

// Random weights, every matrix ~ N(0, 1/fan_in) so each projection of an O(1) input is O(1), and
// scores (d_h + d_R terms of O(1) products, times the scale) are O(1): softmax neither one-hot
// nor uniform. Gains are drawn in [0.5, 1.5] (non-unit, so a dropped gain is caught) and are
// always filled, even when the config switches a norm off, so a test can flip a norm on in the
// reference alone.
inline tpattn::MlaWeights random_mla_weights(const tpattn::MlaConfig& raw, std::uint32_t seed) {
  const tpattn::MlaConfig config = resolved(raw);
  Random random(seed);
  const Index d = config.d_model, h = config.heads, dh = config.head_dim;
  const Index dr = config.rope_dim, dv = config.value_dim, dc = config.kv_latent_dim;
  const Index dq = config.q_latent_dim;
  const auto fan = [](Index in) { return 1.0 / std::sqrt(static_cast<double>(in)); };
  const auto gain = [&random](Index n) {
    tpattn::Vector g(n);
    for (Index k = 0; k < n; ++k) g[k] = static_cast<float>(random.uniform(0.5, 1.5));
    return g;
  };
  tpattn::MlaWeights w;
  if (dq > 0) {
    w.w_dq = random.matrix(dq, d, fan(d));
    w.q_norm = gain(dq);
  }
  w.w_uq = random.matrix(h * (dh + dr), dq > 0 ? dq : d, fan(dq > 0 ? dq : d));
  w.w_dkv = random.matrix(dc + dr, d, fan(d));
  w.kv_norm = gain(dc);
  w.w_ukv = random.matrix(h * (dh + dv), dc, fan(dc));
  w.w_o = random.matrix(d, h * dv, fan(h * dv));
  return w;
}

// RMSNorm with gain on each row's first `width` entries: x / sqrt(mean(x^2) + eps) * gain.
inline void rms_norm_reference(Eigen::MatrixXd& rows, Index width, const tpattn::Vector& gain,
                               double eps) {
  require(gain.size() == width, "rms_norm_reference: gain size");
  for (Index r = 0; r < rows.rows(); ++r) {
    double mean_square = 0.0;
    for (Index c = 0; c < width; ++c) mean_square += rows(r, c) * rows(r, c);
    mean_square /= static_cast<double>(width);
    const double inverse_rms = 1.0 / std::sqrt(mean_square + eps);
    for (Index c = 0; c < width; ++c)
      rows(r, c) = rows(r, c) * inverse_rms * static_cast<double>(gain[c]);
  }
}

struct MlaProjections {
  Tensor3 q;         // [T, h, d_h + d_R]: [qC_i | qR_i], qR_i rotated
  Tensor3 latent;    // [T, 1, d_c]: c_t, normalised when the config says so
  Tensor3 rope_key;  // [T, 1, d_R]: kR_t, rotated
};

// x [T, d_model], token t at position first_position + t.
inline MlaProjections mla_projections(const tpattn::MlaConfig& raw,
                                      const tpattn::MlaWeights& weights, const Eigen::MatrixXd& x,
                                      Index first_position = 0) {
  const tpattn::MlaConfig config = resolved(raw);
  const Index tokens = x.rows(), h = config.heads, dh = config.head_dim, dr = config.rope_dim;
  const Index dc = config.kv_latent_dim;
  require(x.cols() == config.d_model, "mla_projections: x width");
  const double eps = static_cast<double>(config.norm_eps);

  Eigen::MatrixXd query_in = x;
  if (config.q_latent_dim > 0) {
    query_in = x * to_double(weights.w_dq).transpose();
    if (config.normalize_q_latent)
      rms_norm_reference(query_in, config.q_latent_dim, weights.q_norm, eps);
  }
  const Eigen::MatrixXd q = query_in * to_double(weights.w_uq).transpose();  // [T, h (dh + dr)]
  Eigen::MatrixXd kv = x * to_double(weights.w_dkv).transpose();             // [T, dc + dr]
  if (config.normalize_kv_latent) rms_norm_reference(kv, dc, weights.kv_norm, eps);

  MlaProjections p{Tensor3(tokens, h, dh + dr), Tensor3(tokens, 1, dc), Tensor3(tokens, 1, dr)};
  for (Index t = 0; t < tokens; ++t) {
    const double position = static_cast<double>(first_position + t);
    for (Index i = 0; i < h; ++i) {
      for (Index c = 0; c < dh + dr; ++c) p.q.at(t, i, c) = q(t, i * (dh + dr) + c);
      rope_reference(p.q.row(t, i) + dh, dr, position, config.rope);
    }
    for (Index c = 0; c < dc; ++c) p.latent.at(t, 0, c) = kv(t, c);
    for (Index c = 0; c < dr; ++c) p.rope_key.at(t, 0, c) = kv(t, dc + c);
    rope_reference(p.rope_key.row(t, 0), dr, position, config.rope);
  }
  return p;
}

// Explicit per-head keys [T, h, d_h + d_R] = [W_UK_i c_s | kR_s] and values [T, h, d_v] = W_UV_i
// c_s.
struct MlaExplicitKeysValues {
  Tensor3 k;
  Tensor3 v;
};

inline MlaExplicitKeysValues mla_explicit_keys_values(const tpattn::MlaConfig& raw,
                                                      const tpattn::MlaWeights& weights,
                                                      const Tensor3& latent,
                                                      const Tensor3& rope_key) {
  const tpattn::MlaConfig config = resolved(raw);
  const Index tokens = latent.tokens, h = config.heads, dh = config.head_dim;
  const Index dr = config.rope_dim, dv = config.value_dim, dc = config.kv_latent_dim;
  require(latent.width == dc && rope_key.width == dr && rope_key.tokens == tokens,
          "mla_explicit_keys_values: latent / rope_key shapes");
  const Eigen::MatrixXd w_ukv = to_double(weights.w_ukv);
  MlaExplicitKeysValues kv{Tensor3(tokens, h, dh + dr), Tensor3(tokens, h, dv)};
  for (Index s = 0; s < tokens; ++s) {
    const Eigen::Map<const Eigen::VectorXd> c(latent.row(s, 0), dc);
    for (Index i = 0; i < h; ++i) {
      const Index base = i * (dh + dv);
      const Eigen::VectorXd k_nope = w_ukv.middleRows(base, dh) * c;
      const Eigen::VectorXd value = w_ukv.middleRows(base + dh, dv) * c;
      for (Index e = 0; e < dh; ++e) kv.k.at(s, i, e) = k_nope[e];
      for (Index e = 0; e < dr; ++e) kv.k.at(s, i, dh + e) = rope_key.at(s, 0, e);
      for (Index e = 0; e < dv; ++e) kv.v.at(s, i, e) = value[e];
    }
  }
  return kv;
}

// y [T, d_model] = [o_1 .. o_h] W_O^T for o [T, h, d_v].
inline Eigen::MatrixXd mla_output(const tpattn::MlaWeights& weights, const Tensor3& o) {
  Eigen::MatrixXd flat(o.tokens, o.heads * o.width);
  for (Index t = 0; t < o.tokens; ++t)
    for (Index n = 0; n < o.heads * o.width; ++n) flat(t, n) = o.row(t, 0)[n];
  return flat * to_double(weights.w_o).transpose();
}

// The layer for the last x.rows() tokens of a sequence whose cached latents and rope keys (all
// latent.tokens of them, these tokens included) are given, e.g. rounded through a storage type.
// scale: mla_scale(config) unless a test wants to show what a wrong scale would give.
inline Eigen::MatrixXd mla_layer_reference(const tpattn::MlaConfig& config,
                                           const tpattn::MlaWeights& weights,
                                           const Eigen::MatrixXd& x, const Tensor3& latent,
                                           const Tensor3& rope_key, double scale) {
  const Index first_position = latent.tokens - x.rows();
  require(first_position >= 0, "mla_layer_reference: more queries than cached tokens");
  const MlaProjections p = mla_projections(config, weights, x, first_position);
  const MlaExplicitKeysValues kv = mla_explicit_keys_values(config, weights, latent, rope_key);
  return mla_output(weights, attention_reference(p.q, kv.k, kv.v, scale).out);
}

// The whole layer over a sequence x [T, d_model] from position 0, all in double.
inline Eigen::MatrixXd mla_layer_reference(const tpattn::MlaConfig& config,
                                           const tpattn::MlaWeights& weights,
                                           const Eigen::MatrixXd& x) {
  const MlaProjections p = mla_projections(config, weights, x);
  return mla_layer_reference(config, weights, x, p.latent, p.rope_key, mla_scale(config));
}

// The bare absorbed kernel in latent space: absorbed queries [n, h, d_c + d_R] = [q^_i | qR_i]
// for the last n of the L cached tokens (latent [L, 1, d_c], rope_key [L, 1, d_R]); keys are
// [c_s | kR_s] (one KV head), values c_s. Returns out [n, h, d_c] and the natural-log LSE of
// scale * q . k over the visible keys.
inline AttentionResult mla_latent_reference(const Tensor3& absorbed_q, const Tensor3& latent,
                                            const Tensor3& rope_key, double scale) {
  const Index tokens = latent.tokens, dc = latent.width, dr = rope_key.width;
  require(absorbed_q.width == dc + dr, "mla_latent_reference: query width");
  Tensor3 keys(tokens, 1, dc + dr);
  for (Index s = 0; s < tokens; ++s) {
    for (Index c = 0; c < dc; ++c) keys.at(s, 0, c) = latent.at(s, 0, c);
    for (Index c = 0; c < dr; ++c) keys.at(s, 0, dc + c) = rope_key.at(s, 0, c);
  }
  return attention_reference(absorbed_q, keys, latent, scale);
}

// ---- the reference's own rounding through the cache's storage type ---------------------------

// Rounds the reference's cached values (latent after its norm, rope key after its rotation)
// through `type`, as the cache does, so the explicit reference sees the same keys and values as
// the absorbed operator and the comparison stays at fp32 level.
//
// The operator rounds its fp32 value, the reference its double value; the two differ by ~1e-7
// relative, so when a value sits within that distance of a rounding midpoint the two may round
// to neighbouring storage values. Such a near-tie is not an error: where the cache holds the other
// neighbour and |cached - exact| <= u |exact| + slack (u the storage's unit roundoff, slack the
// fp32 error allowed for computing the value), the reference adopts the cache's rounding. Any
// other difference is a wrong cached value, reported in `problem` (first few) and counted.
struct RoundingReport {
  Index near_ties = 0;     // values where the cache's rounding was adopted
  Index wrong_values = 0;  // values that are no rounding of the reference value
  std::string problem;
};

inline RoundingReport round_like_cache(tpattn::StorageType type, Tensor3& reference,
                                       const Tensor3& cached, double slack,
                                       const char* plane_name) {
  require(reference.size() == cached.size(), "round_like_cache: shapes differ");
  const double u = unit_roundoff(type);
  RoundingReport report;
  for (Index n = 0; n < reference.size(); ++n) {
    const double exact = reference.data[static_cast<std::size_t>(n)];
    const double stored = cached.data[static_cast<std::size_t>(n)];
    const double rounded = type == tpattn::StorageType::f32 ? exact : round_through(type, exact);
    if (type != tpattn::StorageType::f32 && rounded == stored) {
      reference.data[static_cast<std::size_t>(n)] = rounded;
      continue;
    }
    if (std::abs(stored - exact) <= u * std::abs(exact) + slack) {
      // fp32 storage keeps the exact double (an fp32-level difference); narrower storage takes
      // the cache's rounding of a near-tie.
      if (type != tpattn::StorageType::f32) {
        reference.data[static_cast<std::size_t>(n)] = stored;
        ++report.near_ties;
      }
      continue;
    }
    if (++report.wrong_values <= 3)
      report.problem += std::string(plane_name) + "[" + std::to_string(n) + "]: cached " +
                        std::to_string(stored) + ", reference " + std::to_string(exact) + "; ";
  }
  return report;
}

}  // namespace tpattn_test
