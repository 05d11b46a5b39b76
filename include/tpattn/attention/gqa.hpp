// tpattn/attention/gqa.hpp -- grouped-query attention; MHA (g = h) and MQA (g = 1) are this.
//
// Per new token x_t (d_model), docs/attention.md §1:
//   q_t = W_Q x_t (h x d_h),  k_t = W_K x_t (g x d_h),  v_t = W_V x_t (g x d_v)
//   q_t, k_t <- RoPE(position t);  cache <- (k_t, v_t)
//   o_i = softmax(q_i K_{g(i)}^T / sqrt(d_h)) V_{g(i)},  g(i) = floor(i / (h / g))
//   y_t = W_O [o_1 .. o_h]
// Cache record: K: g x d_h, V: g x d_v.
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
#include "tpattn/kernels/rope.hpp"

namespace tpattn {

struct GqaConfig {
  Index d_model = 0;
  Index heads = 0;      // h
  Index kv_heads = 0;   // g, divides h
  Index head_dim = 0;   // d_h
  Index value_dim = 0;  // d_v; 0 means d_h
  RopeConfig rope;      // on q and k (rotary_dim <= d_h)
  Index window = 0;     // sliding window: each token sees the last `window` tokens; 0: all
};

// Weights: row-major `out x in`, as nn.Linear.weight in the public PyTorch code (llama-mha.py,
// llama-gqa.py): output rows are head-major, head i's features at rows [i d, (i + 1) d).
struct GqaWeights {
  RowMatrix w_q;  // (h d_h) x d_model
  RowMatrix w_k;  // (g d_h) x d_model
  RowMatrix w_v;  // (g d_v) x d_model
  RowMatrix w_o;  // d_model x (h d_v)
};

// The bare kernel, for engines that own their projections and RoPE.
template <class Storage = float>
class GqaKernel {
 public:
  GqaKernel() = default;
  // heads: h, a multiple of kv_heads (g); head_dim: d_h; value_dim: d_v. window: each query
  // token sees only the last `window` tokens up to itself (sliding window); 0: all of them.
  GqaKernel(Index heads, Index kv_heads, Index head_dim, Index value_dim, Index window = 0,
            const char* call = "GqaKernel")
      : record_(checked_record(heads, kv_heads, head_dim, value_dim, window, call)),
        scorer_(layout_of(record_, kv_heads, head_dim, value_dim), heads, scale_of(head_dim), call),
        window_(window) {}

  const CacheRecord& cache_record() const { return record_; }
  Index window() const { return window_; }
  Index workspace_floats() const { return scorer_.workspace_floats(); }

  // One sequence on the calling thread. q: [n, h, d_h] for the last n tokens of `view` (already
  // cached, already rotated); out: [n, h, d_v]; lse: [n, h] or null. Causal: query token t sees
  // tokens up to itself (the last window() of them if set). n = 1 is a decode step.
  // workspace: workspace_floats() floats.
  void attend(const float* q, Index n, const SequenceView& view, float* out, float* lse,
              float* workspace) const {
    detail::check_attend("GqaKernel::attend", record_, view, n, q, out, workspace);
    scorer_.run(q, n, view, KeyRange{view.length() - n + 1, window_}, out, lse, workspace);
  }

  // What AttentionPlan::make needs to cut a batch for this kernel.
  PlanShape plan_shape() const { return scorer_.plan_shape(window_); }

  // A batch of sequences, any mix of decode tokens and prompt chunks (a continuous-batching
  // step), cut by `plan` (made with plan_shape() for these lengths and new tokens) and run on
  // `executor` (null: the calling thread). views: [batch], the sequences with their new tokens
  // already cached; q: [plan.query_tokens(), h, d_h], sequence b's new tokens from row
  // plan.token_offset(b); out: [plan.query_tokens(), h, d_v]; lse: [plan.query_tokens(), h] or
  // null; workspace: plan.workspace_floats() floats. Any mismatch between plan and views is an
  // Error before any work starts.
  void run(const AttentionPlan& plan, const SequenceView* views, Index batch, const float* q,
           float* out, float* lse, float* workspace, Executor* executor = nullptr) const {
    scorer_.run_batch("GqaKernel::run", plan, record_, views, batch, q, out, lse, workspace,
                      executor, window_);
  }

 private:
  template <class>
  friend class GroupedQueryAttention;

  // Where each KV head's key and value sit in the record's planes K and V.
  static KeyValueLayout layout_of(const CacheRecord& record, Index kv_heads, Index head_dim,
                                  Index value_dim) {
    KeyValueLayout layout;
    layout.kv_heads = kv_heads;
    layout.key[0] = {record.plane_index("K"), head_dim};
    layout.value = {record.plane_index("V"), value_dim};
    return layout;
  }
  static float scale_of(Index head_dim) { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

  // Every check, then the record: nothing is allocated before the checks pass.
  static CacheRecord checked_record(Index heads, Index kv_heads, Index head_dim, Index value_dim,
                                    Index window, const char* call) {
    checked_scorer(heads, kv_heads, head_dim, value_dim, window, call);
    return records::gqa(kv_heads, head_dim, value_dim, storage_type_of<Storage>);
  }

  // Every check of the constructor, allocating nothing: shapes, size products and the scorer's
  // workspace (whose size does not depend on which planes hold K and V).
  static DenseScorer<Storage> checked_scorer(Index heads, Index kv_heads, Index head_dim,
                                             Index value_dim, Index window, const char* call) {
    detail::check_window(call, window);
    detail::check_positive(call, "heads", heads);
    detail::check_positive(call, "kv_heads", kv_heads);
    detail::check_positive(call, "head_dim", head_dim);
    detail::check_positive(call, "value_dim", value_dim);
    TPATTN_CHECK(heads % kv_heads == 0, call, "kv_heads",
                 "a divisor of heads = " + detail::to_text(heads), kv_heads);
    // The record's bytes per token: g (d_h + d_v) elements.
    const Index k = detail::checked_product(call, "kv_heads x head_dim", kv_heads, head_dim);
    const Index v = detail::checked_product(call, "kv_heads x value_dim", kv_heads, value_dim);
    detail::checked_product(call, "cache bytes per token",
                            detail::checked_sum(call, "cache bytes per token", k, v),
                            element_bytes(storage_type_of<Storage>));
    KeyValueLayout sizes;  // planes unset: only the widths matter here
    sizes.kv_heads = kv_heads;
    sizes.key[0].width = head_dim;
    sizes.value.width = value_dim;
    return DenseScorer<Storage>(sizes, heads, scale_of(head_dim), call);
  }

  CacheRecord record_;
  DenseScorer<Storage> scorer_;
  Index window_ = 0;
};

template <class Storage = float>
class GroupedQueryAttention : public detail::AttentionLayer<GroupedQueryAttention<Storage>> {
 public:
  using storage_type = Storage;

  // Runs every check before it allocates anything.
  GroupedQueryAttention(GqaConfig config, GqaWeights weights,
                        const char* name = "GroupedQueryAttention")
      : GroupedQueryAttention(checked(std::move(config), weights, name), std::move(weights), name) {
  }

  const GqaConfig& config() const { return config_; }
  const GqaWeights& weights() const { return weights_; }
  const GqaKernel<Storage>& kernel() const { return kernel_; }
  const CacheRecord& cache_record() const { return kernel_.cache_record(); }

  // decode(cache, seqs, batch, x, y), prefill(cache, seq, n, x, y), reserve(max_batch,
  // max_tokens): see attention/layer.hpp.

 private:
  friend class detail::AttentionLayer<GroupedQueryAttention>;

  struct Buffers {
    float* q;       // [rows, h, d_h]
    float* k;       // [rows, g, d_h]
    float* v;       // [rows, g, d_v]
    float* o;       // [rows, h, d_v]
    float* kernel;  // the kernel's workspace
  };

  // A config that passed every check, and the workspace floats per token row it needs.
  struct Checked {
    GqaConfig config;
    Index floats_per_row;
  };

  GroupedQueryAttention(Checked checked, GqaWeights&& weights, const char* name)
      : detail::AttentionLayer<GroupedQueryAttention>(name),
        config_(std::move(checked.config)),
        floats_per_row_(checked.floats_per_row),
        weights_(std::move(weights)),
        kernel_(config_.heads, config_.kv_heads, config_.head_dim, config_.value_dim,
                config_.window, name),
        rope_(config_.rope, config_.head_dim, name) {}

  // Every check of the constructor, allocating nothing: the config, each size product, the
  // kernel's sizes, RoPE, the weight shapes.
  static Checked checked(GqaConfig config, const GqaWeights& weights, const char* name) {
    detail::check_positive(name, "d_model", config.d_model);
    detail::check_positive(name, "heads", config.heads);
    detail::check_positive(name, "kv_heads", config.kv_heads);
    detail::check_positive(name, "head_dim", config.head_dim);
    if (config.value_dim == 0) config.value_dim = config.head_dim;
    detail::check_positive(name, "value_dim", config.value_dim);
    const Index d = config.d_model, h = config.heads, g = config.kv_heads;
    const Index q = detail::checked_product(name, "heads x head_dim", h, config.head_dim);
    const Index k = detail::checked_product(name, "kv_heads x head_dim", g, config.head_dim);
    const Index v = detail::checked_product(name, "kv_heads x value_dim", g, config.value_dim);
    const Index o = detail::checked_product(name, "heads x value_dim", h, config.value_dim);
    GqaKernel<Storage>::checked_scorer(h, g, config.head_dim, config.value_dim, config.window,
                                       name);
    Rope::validated(config.rope, config.head_dim, name);
    detail::check_weight(name, "w_q", weights.w_q, q, d);
    detail::check_weight(name, "w_k", weights.w_k, k, d);
    detail::check_weight(name, "w_v", weights.w_v, v, d);
    detail::check_weight(name, "w_o", weights.w_o, d, o);
    return {std::move(config), detail::checked_sum(name, "workspace floats", q, k, v, o)};
  }

  Index q_width() const { return config_.heads * config_.head_dim; }
  Index k_width() const { return config_.kv_heads * config_.head_dim; }
  Index v_width() const { return config_.kv_heads * config_.value_dim; }
  Index o_width() const { return config_.heads * config_.value_dim; }

  Index floats_per_row() const { return floats_per_row_; }  // q, k, v, o
  Buffers carve(float* memory, Index rows) const {
    Buffers b;
    b.q = memory;
    b.k = b.q + rows * q_width();
    b.v = b.k + rows * k_width();
    b.o = b.v + rows * v_width();
    b.kernel = b.o + rows * o_width();
    return b;
  }

  // q = W_Q x, k = W_K x, v = W_V x
  void project(const float* x, Index rows, const Buffers& b, Executor* executor) const {
    linear(weights_.w_q, x, rows, b.q, executor);
    linear(weights_.w_k, x, rows, b.k, executor);
    linear(weights_.w_v, x, rows, b.v, executor);
  }

  // RoPE on q and k (never v); rows [row, row + count) are tokens at position, position + 1, ...
  void rotate(const Buffers& b, Index row, Index count, Index position) const {
    for (Index t = 0; t < count; ++t) {
      rope_.apply(position + t,
                  {{b.q + (row + t) * q_width(), config_.heads, config_.head_dim},
                   {b.k + (row + t) * k_width(), config_.kv_heads, config_.head_dim}});
    }
  }

  // Cached: K (g x d_h), V (g x d_v).
  void cache_planes(const Buffers& b, Index row, PlaneInput* planes) const {
    planes[0] = {b.k + row * k_width(), config_.kv_heads, config_.head_dim};
    planes[1] = {b.v + row * v_width(), config_.kv_heads, config_.value_dim};
  }

  // o_i = softmax(q_i K_g(i)^T / sqrt(d_h)) V_g(i) for every new token of the batch.
  void attend(const Buffers& b, const AttentionPlan& plan, const SequenceView* views,
              Executor* executor) const {
    kernel_.run(plan, views, plan.batch(), b.q, b.o, nullptr, b.kernel, executor);
  }

  // y = W_O [o_1 .. o_h]
  void output(const Buffers& b, Index rows, float* y, Executor* executor) const {
    linear(weights_.w_o, b.o, rows, y, executor);
  }

  GqaConfig config_;
  Index floats_per_row_;
  GqaWeights weights_;
  GqaKernel<Storage> kernel_;
  Rope rope_;
};

// MHA: GQA with g = h. kv_heads may be left 0; anything else than h is an error.
template <class Storage = float>
class MultiHeadAttention : public GroupedQueryAttention<Storage> {
 public:
  MultiHeadAttention(GqaConfig config, GqaWeights weights)
      : GroupedQueryAttention<Storage>(with_kv_heads(config, config.heads), std::move(weights),
                                       "MultiHeadAttention") {}

 private:
  static GqaConfig with_kv_heads(GqaConfig config, Index kv_heads) {
    if (config.kv_heads == 0) config.kv_heads = kv_heads;
    TPATTN_CHECK(config.kv_heads == kv_heads, "MultiHeadAttention", "kv_heads",
                 "heads = " + detail::to_text(kv_heads) + " (or 0)", config.kv_heads);
    return config;
  }
};

// MQA: GQA with g = 1. kv_heads may be left 0; anything else than 1 is an error.
template <class Storage = float>
class MultiQueryAttention : public GroupedQueryAttention<Storage> {
 public:
  MultiQueryAttention(GqaConfig config, GqaWeights weights)
      : GroupedQueryAttention<Storage>(with_one_kv_head(config), std::move(weights),
                                       "MultiQueryAttention") {}

 private:
  static GqaConfig with_one_kv_head(GqaConfig config) {
    if (config.kv_heads == 0) config.kv_heads = 1;
    TPATTN_CHECK(config.kv_heads == 1, "MultiQueryAttention", "kv_heads", "1 (or 0)",
                 config.kv_heads);
    return config;
  }
};

}  // namespace tpattn
