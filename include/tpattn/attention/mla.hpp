// tpattn/attention/mla.hpp -- multi-head latent attention (DeepSeek-V2), decoded with absorbed
// weights on the same kernel as MQA.
//
// Per new token x_t (docs/attention.md §2):
//   c'_t = RMSNorm(W_DQ x_t)        (d'_c; optional: without it the query comes from x_t)
//   [qC_i | qR_i] = W_UQ c'_t        per head i: qC_i (d_h), qR_i (d_R) <- RoPE
//   [c_t | kR_t] = W_DKV x_t;  c_t <- RMSNorm(c_t) (optional);  kR_t <- RoPE      cached
//   score_i(s) = (qC_i . W_UK_i c_s + qR_i . kR_s) / sqrt(d_h + d_R)
//   o_i = W_UV_i sum_s p_i(s) c_s;   y_t = W_O [o_1 .. o_h]
// Absorbed: q^_i = W_UK_i^T qC_i (d_c), so score_i(s) = ([q^_i | qR_i] . [c_s | kR_s]) * scale:
// MQA with one KV head of key width d_c + d_R whose value is the latent c_s itself.
// Cache record: latent: d_c, rope_key: d_R  -> d_c + d_R elements per token.
#pragma once

#include <cmath>
#include <utility>

#include "tpattn/attention/layer.hpp"
#include "tpattn/attention/layer_support.hpp"
#include "tpattn/cache/record.hpp"
#include "tpattn/core/checked_size.hpp"
#include "tpattn/kernels/attention_driver.hpp"
#include "tpattn/kernels/dense_scorer.hpp"
#include "tpattn/kernels/gemm.hpp"
#include "tpattn/kernels/rms_norm.hpp"
#include "tpattn/kernels/rope.hpp"

namespace tpattn {

struct MlaConfig {
  Index d_model = 0;
  Index heads = 0;          // h
  Index head_dim = 0;       // d_h: the non-rotary ("nope") part of each query/key head
  Index rope_dim = 0;       // d_R: the decoupled rotary part, one key per token for all heads
  Index value_dim = 0;      // d_v; 0 means d_h
  Index kv_latent_dim = 0;  // d_c
  Index q_latent_dim = 0;   // d'_c; 0 = no query compression (w_uq then maps x_t directly)
  bool normalize_q_latent = true;   // RMSNorm with gain on c'_t; ignored if q_latent_dim is 0
  bool normalize_kv_latent = true;  // RMSNorm with gain on c_t before caching
  float norm_eps = 1e-6f;
  RopeConfig rope;   // on qR and kR (rotary_dim <= d_R). DeepSeek pairs interleaved.
  Index window = 0;  // sliding window: each token sees the last `window` tokens; 0: all
};

// Weights, row-major `out x in`, in the layout of DeepSeek-V2 and the public T6 MLA baseline
// (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj):
struct MlaWeights {
  RowMatrix w_dq;   // d'_c x d_model                        (only if q_latent_dim > 0)
  Vector q_norm;    // d'_c gain                             (only if normalize_q_latent)
  RowMatrix w_uq;   // (h (d_h + d_R)) x d'_c (or x d_model); head i rows: [qC (d_h) | qR (d_R)]
  RowMatrix w_dkv;  // (d_c + d_R) x d_model; rows [c (d_c) | kR (d_R)]
  Vector kv_norm;   // d_c gain                              (only if normalize_kv_latent)
  RowMatrix w_ukv;  // (h (d_h + d_v)) x d_c; head i rows: [W_UK_i (d_h) | W_UV_i (d_v)]
  RowMatrix w_o;    // d_model x (h d_v)
};

// The bare absorbed kernel: MQA over [latent | rope_key] with the latent as value.
template <class Storage = float>
class MlaKernel {
 public:
  MlaKernel() = default;
  // scale: 1 / sqrt(d_h + d_R) of the model (never derived from the cached width). window:
  // each query token sees only the last `window` tokens up to itself; 0: all of them.
  MlaKernel(Index heads, Index kv_latent_dim, Index rope_dim, float scale, Index window = 0,
            const char* call = "MlaKernel")
      : record_(checked_record(heads, kv_latent_dim, rope_dim, scale, window, call)),
        scorer_(layout_of(record_, kv_latent_dim, rope_dim), heads, scale, call),
        window_(window) {}

  const CacheRecord& cache_record() const { return record_; }
  Index window() const { return window_; }
  Index workspace_floats() const { return scorer_.workspace_floats(); }

  // q: [n, h, d_c + d_R] absorbed queries [q^_i | qR_i] (qR rotated) for the last n tokens of
  // `view`; out: [n, h, d_c] latent outputs sum_s p_i(s) c_s; lse: [n, h] or null. Causal.
  void attend(const float* q, Index n, const SequenceView& view, float* out, float* lse,
              float* workspace) const {
    detail::check_attend("MlaKernel::attend", record_, view, n, q, out, workspace);
    scorer_.run(q, n, view, KeyRange{view.length() - n + 1, window_}, out, lse, workspace);
  }

  // What AttentionPlan::make needs to cut a batch for this kernel.
  PlanShape plan_shape() const { return scorer_.plan_shape(window_); }

  // A batch of sequences, any mix of decode tokens and prompt chunks (a continuous-batching
  // step), cut by `plan` (made with plan_shape() for these lengths and new tokens) and run on
  // `executor` (null: the calling thread). views: [batch], the sequences with their new tokens
  // already cached; q: [plan.query_tokens(), h, d_c + d_R], sequence b's new tokens from row
  // plan.token_offset(b); out: [plan.query_tokens(), h, d_c]; lse: [plan.query_tokens(), h] or
  // null; workspace: plan.workspace_floats() floats. Any mismatch between plan and views is an
  // Error before any work starts.
  void run(const AttentionPlan& plan, const SequenceView* views, Index batch, const float* q,
           float* out, float* lse, float* workspace, Executor* executor = nullptr) const {
    scorer_.run_batch("MlaKernel::run", plan, record_, views, batch, q, out, lse, workspace,
                      executor, window_);
  }

 private:
  template <class>
  friend class MultiHeadLatentAttention;

  // The key [latent | rope_key] and the value (the latent again) in the record's planes.
  static KeyValueLayout layout_of(const CacheRecord& record, Index kv_latent_dim, Index rope_dim) {
    KeyValueLayout layout;
    layout.kv_heads = 1;
    layout.key[0] = {record.plane_index("latent"), kv_latent_dim};
    layout.key[1] = {record.plane_index("rope_key"), rope_dim};
    layout.value = {record.plane_index("latent"), kv_latent_dim};
    return layout;
  }

  // Every check, then the record: nothing is allocated before the checks pass.
  static CacheRecord checked_record(Index heads, Index kv_latent_dim, Index rope_dim, float scale,
                                    Index window, const char* call) {
    checked_scorer(heads, kv_latent_dim, rope_dim, scale, window, call);
    return records::mla(kv_latent_dim, rope_dim, storage_type_of<Storage>);
  }

  // Every check of the constructor, allocating nothing: shapes, size products and the scorer's
  // workspace (whose size does not depend on which planes hold the key and value).
  static DenseScorer<Storage> checked_scorer(Index heads, Index kv_latent_dim, Index rope_dim,
                                             float scale, Index window, const char* call) {
    detail::check_window(call, window);
    detail::check_positive(call, "heads", heads);
    detail::check_positive(call, "kv_latent_dim", kv_latent_dim);
    detail::check_positive(call, "rope_dim", rope_dim);
    TPATTN_CHECK(std::isfinite(scale) && scale > 0.0f, call, "scale",
                 "a finite value > 0 (1 / sqrt(d_h + d_R))", scale);
    // The record's bytes per token: d_c + d_R elements.
    detail::checked_product(
        call, "cache bytes per token",
        detail::checked_sum(call, "kv_latent_dim + rope_dim", kv_latent_dim, rope_dim),
        element_bytes(storage_type_of<Storage>));
    KeyValueLayout sizes;  // planes unset: only the widths matter here
    sizes.kv_heads = 1;
    sizes.key[0].width = kv_latent_dim;
    sizes.key[1].width = rope_dim;
    sizes.value.width = kv_latent_dim;
    return DenseScorer<Storage>(sizes, heads, scale, call);
  }

  CacheRecord record_;
  DenseScorer<Storage> scorer_;
  Index window_ = 0;
};

template <class Storage = float>
class MultiHeadLatentAttention : public detail::AttentionLayer<MultiHeadLatentAttention<Storage>> {
 public:
  using storage_type = Storage;

  // Runs every check before it allocates anything.
  MultiHeadLatentAttention(MlaConfig config, MlaWeights weights,
                           const char* name = "MultiHeadLatentAttention")
      : MultiHeadLatentAttention(checked(std::move(config), weights, name), std::move(weights),
                                 name) {}

  const MlaConfig& config() const { return config_; }
  const MlaWeights& weights() const { return weights_; }
  const MlaKernel<Storage>& kernel() const { return kernel_; }
  const CacheRecord& cache_record() const { return kernel_.cache_record(); }

  // decode(cache, seqs, batch, x, y), prefill(cache, seq, n, x, y), reserve(max_batch,
  // max_tokens): see attention/layer.hpp.

 private:
  friend class detail::AttentionLayer<MultiHeadLatentAttention>;

  struct Buffers {
    float* q_latent;    // [rows, d'_c]
    float* q;           // [rows, h, d_h + d_R]   [qC | qR] per head
    float* kv;          // [rows, d_c + d_R]      [c | kR]
    float* latent;      // [rows, d_c]            cached plane `latent`
    float* rope_key;    // [rows, d_R]            cached plane `rope_key`
    float* absorbed;    // [rows, h, d_c + d_R]   [W_UK_i^T qC_i | qR_i]
    float* latent_out;  // [rows, h, d_c]
    float* o;           // [rows, h, d_v]
    float* kernel;      // the kernel's workspace
  };

  // A config that passed every check, and the workspace floats per token row it needs.
  struct Checked {
    MlaConfig config;
    Index floats_per_row;
  };

  MultiHeadLatentAttention(Checked checked, MlaWeights&& weights, const char* name)
      : detail::AttentionLayer<MultiHeadLatentAttention>(name),
        config_(std::move(checked.config)),
        floats_per_row_(checked.floats_per_row),
        weights_(std::move(weights)),
        kernel_(config_.heads, config_.kv_latent_dim, config_.rope_dim, scale_of(config_),
                config_.window, name),
        rope_(config_.rope, config_.rope_dim, name) {}

  static float scale_of(const MlaConfig& config) {
    return 1.0f / std::sqrt(static_cast<float>(config.head_dim + config.rope_dim));
  }

  // Every check of the constructor, allocating nothing: the config, each size product, the
  // kernel's sizes, RoPE, the weight shapes and gains.
  static Checked checked(MlaConfig config, const MlaWeights& weights, const char* name) {
    detail::check_positive(name, "d_model", config.d_model);
    detail::check_positive(name, "heads", config.heads);
    detail::check_positive(name, "head_dim", config.head_dim);
    detail::check_positive(name, "rope_dim", config.rope_dim);
    detail::check_positive(name, "kv_latent_dim", config.kv_latent_dim);
    if (config.value_dim == 0) config.value_dim = config.head_dim;
    detail::check_positive(name, "value_dim", config.value_dim);
    TPATTN_CHECK(config.q_latent_dim >= 0, name, "q_latent_dim", ">= 0 (0 = no compression)",
                 config.q_latent_dim);
    if (config.q_latent_dim == 0) config.normalize_q_latent = false;  // no latent to normalise
    TPATTN_CHECK(std::isfinite(config.norm_eps) && config.norm_eps > 0.0f, name, "norm_eps",
                 "a finite value > 0", config.norm_eps);

    using detail::checked_product;
    using detail::checked_sum;
    const Index d = config.d_model, h = config.heads, dh = config.head_dim;
    const Index dr = config.rope_dim, dv = config.value_dim, dc = config.kv_latent_dim;
    const Index query = checked_sum(name, "head_dim + rope_dim", dh, dr);
    const Index kv = checked_sum(name, "kv_latent_dim + rope_dim", dc, dr);
    const Index q_rows = checked_product(name, "heads x (head_dim + rope_dim)", h, query);
    const Index ukv_rows = checked_product(name, "heads x (head_dim + value_dim)", h,
                                           checked_sum(name, "head_dim + value_dim", dh, dv));
    const Index o = checked_product(name, "heads x value_dim", h, dv);
    const Index absorbed = checked_product(name, "heads x (kv_latent_dim + rope_dim)", h, kv);
    const Index latent_out = checked_product(name, "heads x kv_latent_dim", h, dc);
    MlaKernel<Storage>::checked_scorer(h, dc, dr, scale_of(config), config.window, name);
    Rope::validated(config.rope, dr, name);

    const Index query_in = config.q_latent_dim > 0 ? config.q_latent_dim : d;
    if (config.q_latent_dim > 0) {
      detail::check_weight(name, "w_dq", weights.w_dq, config.q_latent_dim, d);
      if (config.normalize_q_latent)
        TPATTN_CHECK(weights.q_norm.size() == config.q_latent_dim, name, "q_norm",
                     "a gain of q_latent_dim entries", weights.q_norm.size());
    }
    detail::check_weight(name, "w_uq", weights.w_uq, q_rows, query_in);
    detail::check_weight(name, "w_dkv", weights.w_dkv, kv, d);
    if (config.normalize_kv_latent)
      TPATTN_CHECK(weights.kv_norm.size() == dc, name, "kv_norm", "a gain of kv_latent_dim entries",
                   weights.kv_norm.size());
    detail::check_weight(name, "w_ukv", weights.w_ukv, ukv_rows, dc);
    detail::check_weight(name, "w_o", weights.w_o, d, o);
    // The buffers of carve(): q_latent, q, kv, latent + rope_key, absorbed, latent_out, o.
    const Index floats_per_row = checked_sum(name, "workspace floats", config.q_latent_dim, q_rows,
                                             kv, kv, absorbed, latent_out, o);
    return {std::move(config), floats_per_row};
  }

  Index query_width() const { return config_.head_dim + config_.rope_dim; }
  Index kv_width() const { return config_.kv_latent_dim + config_.rope_dim; }
  Index absorbed_width() const { return config_.kv_latent_dim + config_.rope_dim; }

  Index floats_per_row() const { return floats_per_row_; }
  Buffers carve(float* memory, Index rows) const {
    const Index h = config_.heads;
    Buffers b;
    b.q_latent = memory;
    b.q = b.q_latent + rows * config_.q_latent_dim;
    b.kv = b.q + rows * h * query_width();
    b.latent = b.kv + rows * kv_width();
    b.rope_key = b.latent + rows * config_.kv_latent_dim;
    b.absorbed = b.rope_key + rows * config_.rope_dim;
    b.latent_out = b.absorbed + rows * h * absorbed_width();
    b.o = b.latent_out + rows * h * config_.kv_latent_dim;
    b.kernel = b.o + rows * h * config_.value_dim;
    return b;
  }

  // c'_t = RMSNorm(W_DQ x) (optional); [qC | qR] = W_UQ c'_t;  [c | kR] = W_DKV x;
  // c <- RMSNorm(c) (optional); then the absorbed query [W_UK_i^T qC_i | qR_i] per head.
  void project(const float* x, Index rows, const Buffers& b, Executor* executor) const {
    const Index h = config_.heads, dh = config_.head_dim, dc = config_.kv_latent_dim;
    const Index dr = config_.rope_dim;
    if (config_.q_latent_dim > 0) {
      linear(weights_.w_dq, x, rows, b.q_latent, executor);
      if (config_.normalize_q_latent)
        rms_norm(b.q_latent, rows, config_.q_latent_dim, config_.q_latent_dim,
                 weights_.q_norm.data(), config_.norm_eps);
      linear(weights_.w_uq, b.q_latent, rows, b.q, executor);
    } else {
      linear(weights_.w_uq, x, rows, b.q, executor);
    }
    linear(weights_.w_dkv, x, rows, b.kv, executor);
    if (config_.normalize_kv_latent)
      rms_norm(b.kv, rows, dc, kv_width(), weights_.kv_norm.data(), config_.norm_eps);
    const ConstMatrixMap kv = map_matrix(static_cast<const float*>(b.kv), rows, kv_width());
    map_matrix(b.latent, rows, dc) = kv.leftCols(dc);
    map_matrix(b.rope_key, rows, dr) = kv.rightCols(dr);

    const Index head_rows = dh + config_.value_dim;  // rows of w_ukv per head: [W_UK_i | W_UV_i]
    parallel_ranges(executor, h, 1, [&](Index first, Index end) {
      for (Index i = first; i < end; ++i) {
        const float* q_head = b.q + i * query_width();
        MatrixMap absorbed = map_matrix(b.absorbed + i * absorbed_width(), rows, absorbed_width(),
                                        h * absorbed_width());
        multiply(map_matrix(q_head, rows, dh, h * query_width()),
                 weights_.w_ukv.middleRows(i * head_rows, dh), absorbed.leftCols(dc));
        absorbed.rightCols(dr) = map_matrix(q_head + dh, rows, dr, h * query_width());
      }
    });
  }

  // RoPE on every head's qR (inside the absorbed query) and on kR.
  void rotate(const Buffers& b, Index row, Index count, Index position) const {
    const Index dc = config_.kv_latent_dim, dr = config_.rope_dim;
    for (Index t = 0; t < count; ++t) {
      rope_.apply(position + t, {{b.absorbed + (row + t) * config_.heads * absorbed_width() + dc,
                                  config_.heads, absorbed_width()},
                                 {b.rope_key + (row + t) * dr, 1, dr}});
    }
  }

  // Cached: latent c (d_c), rope_key kR (d_R).
  void cache_planes(const Buffers& b, Index row, PlaneInput* planes) const {
    planes[0] = {b.latent + row * config_.kv_latent_dim, 1, config_.kv_latent_dim};
    planes[1] = {b.rope_key + row * config_.rope_dim, 1, config_.rope_dim};
  }

  // Latent outputs sum_s p_i(s) c_s, on the MQA kernel.
  void attend(const Buffers& b, const AttentionPlan& plan, const SequenceView* views,
              Executor* executor) const {
    kernel_.run(plan, views, plan.batch(), b.absorbed, b.latent_out, nullptr, b.kernel, executor);
  }

  // o_i = W_UV_i latent_out_i per head, then y = W_O [o_1 .. o_h].
  void output(const Buffers& b, Index rows, float* y, Executor* executor) const {
    const Index h = config_.heads, dh = config_.head_dim, dv = config_.value_dim;
    const Index dc = config_.kv_latent_dim;
    parallel_ranges(executor, h, 1, [&](Index first, Index end) {
      for (Index i = first; i < end; ++i)
        multiply(map_matrix(static_cast<const float*>(b.latent_out) + i * dc, rows, dc, h * dc),
                 weights_.w_ukv.middleRows(i * (dh + dv) + dh, dv).transpose(),
                 map_matrix(b.o + i * dv, rows, dv, h * dv));
    });
    linear(weights_.w_o, b.o, rows, y, executor);
  }

  MlaConfig config_;
  Index floats_per_row_;
  MlaWeights weights_;
  MlaKernel<Storage> kernel_;
  Rope rope_;
};

}  // namespace tpattn
