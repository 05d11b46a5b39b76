// tpattn/attention/tpa.hpp -- Tensor Product Attention (Zhang et al., 2025) and TPA-KVonly.
//
// Per new token x_t, six contextual factors, each a bias-free linear map of x_t
// (docs/attention.md §3):
//   A_Q = W_AQ x_t (R_Q x h)   B_Q = W_BQ x_t (R_Q x d_h)
//   A_K = W_AK x_t (R_K x h)   B_K = W_BK x_t (R_K x d_h)
//   A_V = W_AV x_t (R_V x h)   B_V = W_BV x_t (R_V x d_v)
//   Q_t = A_Q^T B_Q / R_Q,  K_t = A_K^T B_K / R_K,  V_t = A_V^T B_V / R_V     (h x d_h, h x d_v)
// RoPE acts on the feature axis only: on the rows of B_Q and B_K, never on A or B_V; B_K is
// rotated once, when it is written to the cache. Attention is then causal softmax attention
// over Q, K, V with scale 1 / sqrt(d_h), followed by y_t = W_O [o_1 .. o_h].
// The cache keeps the factors A_K, B_K, A_V, B_V: R_K (h + d_h) + R_V (h + d_v) elements per
// token, and decode reads them directly (kernels/tpa_scorer.hpp), never forming K or V.
// TPA-KVonly: the query is a plain q_t = W_Q x_t (h x d_h); K and V are factorised as above.
#pragma once

#include <cmath>
#include <utility>

#include "tpattn/attention/layer.hpp"
#include "tpattn/attention/layer_support.hpp"
#include "tpattn/cache/record.hpp"
#include "tpattn/core/checked_size.hpp"
#include "tpattn/kernels/attention_driver.hpp"
#include "tpattn/kernels/gemm.hpp"
#include "tpattn/kernels/rope.hpp"
#include "tpattn/kernels/tpa_scorer.hpp"

namespace tpattn {

struct TpaConfig {
  Index d_model = 0;
  Index heads = 0;      // h
  Index head_dim = 0;   // d_h
  Index value_dim = 0;  // d_v; 0 means d_h
  Index rank_q = 0;     // R_Q; 0 = TPA-KVonly (query from w_q)
  Index rank_k = 0;     // R_K
  Index rank_v = 0;     // R_V
  RopeConfig rope;      // on B_Q and B_K rows (the public T6 code: half-split, reversed)
  TpaOrder order = TpaOrder::automatic;  // decode contraction order (both give the same numbers)
  Index window = 0;  // sliding window: each token sees the last `window` tokens; 0: all
};

// Weights, row-major `out x in`, exactly as the public T6 code (model/T6.py, CPLinear) stores
// them: the A outputs head-major ([head][rank], row i R + r), the B outputs rank-major
// ([rank][feature], row r d + j). The constructor reorders the A rows to rank-major once, so
// a projection lands directly in the cached R x h layout.
struct TpaWeights {
  RowMatrix w_a_q;  // (h R_Q) x d_model      (TPA)
  RowMatrix w_b_q;  // (R_Q d_h) x d_model    (TPA)
  RowMatrix w_q;    // (h d_h) x d_model      (TPA-KVonly)
  RowMatrix w_a_k;  // (h R_K) x d_model
  RowMatrix w_b_k;  // (R_K d_h) x d_model
  RowMatrix w_a_v;  // (h R_V) x d_model
  RowMatrix w_b_v;  // (R_V d_v) x d_model
  RowMatrix w_o;    // d_model x (h d_v)
};

// The bare kernel: attention from cached factors, for engines that own their projections.
template <class Storage = float>
class TpaKernel {
 public:
  TpaKernel() = default;
  // shape.rank_q = 0 for a kernel that only takes materialised queries (TPA-KVonly).
  // window: each query token sees only the last `window` tokens up to itself; 0: all of them.
  explicit TpaKernel(const TpaShape& shape, Index window = 0, const char* call = "TpaKernel")
      : record_(checked_record(shape, window, call)),
        scorer_(shape, call, TpaScorer<Storage>::Planes::of(record_)),
        window_(window) {}

  const TpaShape& shape() const { return scorer_.shape(); }
  const CacheRecord& cache_record() const { return record_; }
  Index window() const { return window_; }
  Index workspace_floats() const { return scorer_.workspace_floats(); }

  // Factored queries for the last n tokens of `view`: a_q: [n, R_Q, h], b_q: [n, R_Q, d_h]
  // (rotated). out: [n, h, d_v]; lse: [n, h] or null. Causal.
  void attend(const float* a_q, const float* b_q, Index n, const SequenceView& view, float* out,
              float* lse, float* workspace, TpaOrder order = TpaOrder::automatic) const {
    detail::check_attend("TpaKernel::attend", record_, view, n, a_q, out, workspace, "a_q");
    TPATTN_CHECK(shape().rank_q > 0, "TpaKernel::attend", "a_q, b_q",
                 "a kernel with rank_q >= 1 (this one takes materialised queries only)",
                 "rank_q = 0");
    TPATTN_CHECK(b_q != nullptr, "TpaKernel::attend", "b_q", "non-null", "null");
    check_order("TpaKernel::attend", order);
    scorer_.run(a_q, b_q, n, view, KeyRange{view.length() - n + 1, window_}, out, lse, workspace,
                order);
  }

  // Materialised queries q: [n, h, d_h] (rotated), e.g. TPA-KVonly.
  void attend(const float* q, Index n, const SequenceView& view, float* out, float* lse,
              float* workspace) const {
    detail::check_attend("TpaKernel::attend", record_, view, n, q, out, workspace);
    scorer_.run(q, n, view, KeyRange{view.length() - n + 1, window_}, out, lse, workspace);
  }

  // What AttentionPlan::make needs to cut a batch for this kernel.
  PlanShape plan_shape() const {
    return {shape().heads, shape().value_dim, scorer_.workspace_floats(),
            TpaScorer<Storage>::kQueryTokens, window_};
  }

  // A batch of sequences, any mix of decode tokens and prompt chunks (a continuous-batching
  // step), cut by `plan` (made with plan_shape() for these lengths and new tokens) and run on
  // `executor` (null: the calling thread). views: [batch], the sequences with their new tokens
  // already cached; factored queries a_q: [plan.query_tokens(), R_Q, h], b_q:
  // [plan.query_tokens(), R_Q, d_h], sequence b's new tokens from row plan.token_offset(b);
  // out: [plan.query_tokens(), h, d_v]; lse: [plan.query_tokens(), h] or null; workspace:
  // plan.workspace_floats() floats. Any mismatch between plan and views is an Error before any
  // work starts.
  void run(const AttentionPlan& plan, const SequenceView* views, Index batch, const float* a_q,
           const float* b_q, float* out, float* lse, float* workspace, Executor* executor = nullptr,
           TpaOrder order = TpaOrder::automatic) const {
    const char* call = "TpaKernel::run";
    TPATTN_CHECK(shape().rank_q > 0, call, "a_q, b_q",
                 "a kernel with rank_q >= 1 (this one takes materialised queries only)",
                 "rank_q = 0");
    TPATTN_CHECK(a_q != nullptr, call, "a_q", "non-null", "null");
    TPATTN_CHECK(b_q != nullptr, call, "b_q", "non-null", "null");
    check_order(call, order);
    const Index a_stride = shape().rank_q * shape().heads;
    const Index b_stride = shape().rank_q * shape().head_dim;
    run_plan(call, plan, plan_shape(), record_, views, batch, out, lse, workspace, executor,
             [&](Index token, Index count, const SequenceView& view, const KeyRange& range,
                 float* o, float* l, float* ws) {
               scorer_.run(a_q + token * a_stride, b_q + token * b_stride, count, view, range, o, l,
                           ws, order);
             });
  }

  // The same with materialised queries q: [plan.query_tokens(), h, d_h] (TPA-KVonly).
  void run(const AttentionPlan& plan, const SequenceView* views, Index batch, const float* q,
           float* out, float* lse, float* workspace, Executor* executor = nullptr) const {
    const char* call = "TpaKernel::run";
    TPATTN_CHECK(q != nullptr, call, "q", "non-null", "null");
    const Index stride = shape().heads * shape().head_dim;
    run_plan(call, plan, plan_shape(), record_, views, batch, out, lse, workspace, executor,
             [&](Index token, Index count, const SequenceView& view, const KeyRange& range,
                 float* o, float* l,
                 float* ws) { scorer_.run(q + token * stride, count, view, range, o, l, ws); });
  }

 private:
  template <class>
  friend class TensorProductAttention;

  static void check_order(const char* call, TpaOrder order) {
    TPATTN_CHECK(
        order == TpaOrder::automatic || order == TpaOrder::factor || order == TpaOrder::query, call,
        "order", "automatic, factor or query", static_cast<int>(order));
  }

  // Every check, then the record: nothing is allocated before the checks pass.
  static CacheRecord checked_record(const TpaShape& shape, Index window, const char* call) {
    checked_scorer(shape, window, call);
    return records::tpa(shape.heads, shape.head_dim, shape.value_dim, shape.rank_k, shape.rank_v,
                        storage_type_of<Storage>);
  }

  // Every check of the constructor, allocating nothing: shapes, size products and the scorer's
  // workspace.
  static TpaScorer<Storage> checked_scorer(const TpaShape& shape, Index window, const char* call) {
    detail::check_window(call, window);
    detail::check_positive(call, "heads", shape.heads);
    detail::check_positive(call, "head_dim", shape.head_dim);
    detail::check_positive(call, "value_dim", shape.value_dim);
    TPATTN_CHECK(shape.rank_q >= 0, call, "rank_q", ">= 0 (0 = KV-only)", shape.rank_q);
    detail::check_positive(call, "rank_k", shape.rank_k);
    detail::check_positive(call, "rank_v", shape.rank_v);
    // The record's bytes per token: R_K (h + d_h) + R_V (h + d_v) elements.
    const char* bytes = "cache bytes per token";
    const Index a_k = detail::checked_product(call, "rank_k x heads", shape.rank_k, shape.heads);
    const Index b_k =
        detail::checked_product(call, "rank_k x head_dim", shape.rank_k, shape.head_dim);
    const Index a_v = detail::checked_product(call, "rank_v x heads", shape.rank_v, shape.heads);
    const Index b_v =
        detail::checked_product(call, "rank_v x value_dim", shape.rank_v, shape.value_dim);
    detail::checked_product(call, bytes, detail::checked_sum(call, bytes, a_k, b_k, a_v, b_v),
                            element_bytes(storage_type_of<Storage>));
    return TpaScorer<Storage>(shape, call);
  }

  CacheRecord record_;
  TpaScorer<Storage> scorer_;
  Index window_ = 0;
};

template <class Storage = float>
class TensorProductAttention : public detail::AttentionLayer<TensorProductAttention<Storage>> {
 public:
  using storage_type = Storage;

  // Runs every check before it allocates anything.
  TensorProductAttention(TpaConfig config, TpaWeights weights,
                         const char* name = "TensorProductAttention")
      : TensorProductAttention(checked(std::move(config), weights, name), std::move(weights),
                               name) {}

  const TpaConfig& config() const { return config_; }
  bool kv_only() const { return config_.rank_q == 0; }
  const TpaKernel<Storage>& kernel() const { return kernel_; }
  const CacheRecord& cache_record() const { return kernel_.cache_record(); }
  // The contraction order decode uses (automatic resolved by cost).
  TpaOrder order() const {
    if (kv_only()) return TpaOrder::query;
    return config_.order == TpaOrder::automatic ? cheaper_tpa_order(kernel_.shape())
                                                : config_.order;
  }

  // decode(cache, seqs, batch, x, y), prefill(cache, seq, n, x, y), reserve(max_batch,
  // max_tokens): see attention/layer.hpp.

 private:
  friend class detail::AttentionLayer<TensorProductAttention>;

  struct Buffers {
    float* a_q;  // [rows, R_Q h]   (rank-major)      TPA
    float* b_q;  // [rows, R_Q d_h]                   TPA
    float* q;    // [rows, h d_h]                     KV-only
    float* a_k;  // [rows, R_K h]
    float* b_k;  // [rows, R_K d_h]
    float* a_v;  // [rows, R_V h]
    float* b_v;  // [rows, R_V d_v]
    float* o;    // [rows, h d_v]
    float* kernel;
  };

  // A config that passed every check, and the workspace floats per token row it needs.
  struct Checked {
    TpaConfig config;
    Index floats_per_row;
  };

  TensorProductAttention(Checked checked, TpaWeights&& weights, const char* name)
      : detail::AttentionLayer<TensorProductAttention>(name),
        config_(std::move(checked.config)),
        floats_per_row_(checked.floats_per_row),
        weights_(std::move(weights)),
        kernel_(shape_of(config_), config_.window, name),
        rope_(config_.rope, config_.head_dim, name) {
    const Index h = config_.heads;
    if (!kv_only()) weights_.w_a_q = head_major_to_rank_major(weights_.w_a_q, h, config_.rank_q);
    weights_.w_a_k = head_major_to_rank_major(weights_.w_a_k, h, config_.rank_k);
    weights_.w_a_v = head_major_to_rank_major(weights_.w_a_v, h, config_.rank_v);
  }

  static TpaShape shape_of(const TpaConfig& config) {
    return {config.heads,  config.head_dim, config.value_dim,
            config.rank_q, config.rank_k,   config.rank_v};
  }

  // Every check of the constructor, allocating nothing: the config, each size product, the
  // kernel's sizes, RoPE, the weight shapes (only the query weights of the variant in use).
  static Checked checked(TpaConfig config, const TpaWeights& weights, const char* name) {
    detail::check_positive(name, "d_model", config.d_model);
    detail::check_positive(name, "heads", config.heads);
    detail::check_positive(name, "head_dim", config.head_dim);
    if (config.value_dim == 0) config.value_dim = config.head_dim;
    detail::check_positive(name, "value_dim", config.value_dim);
    TPATTN_CHECK(config.rank_q >= 0, name, "rank_q", ">= 0 (0 = TPA-KVonly)", config.rank_q);
    detail::check_positive(name, "rank_k", config.rank_k);
    detail::check_positive(name, "rank_v", config.rank_v);
    TpaKernel<Storage>::check_order(name, config.order);
    TPATTN_CHECK(config.rank_q > 0 || config.order != TpaOrder::factor, name, "order",
                 "query or automatic for TPA-KVonly (it has no query factors)", "factor");

    using detail::checked_product;
    const Index d = config.d_model, h = config.heads, dh = config.head_dim;
    const Index dv = config.value_dim, rq = config.rank_q, rk = config.rank_k;
    const Index rv = config.rank_v;
    const Index q = checked_product(name, "heads x head_dim", h, dh);
    const Index a_q = checked_product(name, "heads x rank_q", h, rq);
    const Index b_q = checked_product(name, "rank_q x head_dim", rq, dh);
    const Index a_k = checked_product(name, "heads x rank_k", h, rk);
    const Index b_k = checked_product(name, "rank_k x head_dim", rk, dh);
    const Index a_v = checked_product(name, "heads x rank_v", h, rv);
    const Index b_v = checked_product(name, "rank_v x value_dim", rv, dv);
    const Index o = checked_product(name, "heads x value_dim", h, dv);
    TpaKernel<Storage>::checked_scorer(shape_of(config), config.window, name);
    Rope::validated(config.rope, dh, name);

    if (rq == 0) {
      detail::check_weight(name, "w_q", weights.w_q, q, d);
    } else {
      detail::check_weight(name, "w_a_q", weights.w_a_q, a_q, d);
      detail::check_weight(name, "w_b_q", weights.w_b_q, b_q, d);
    }
    detail::check_weight(name, "w_a_k", weights.w_a_k, a_k, d);
    detail::check_weight(name, "w_b_k", weights.w_b_k, b_k, d);
    detail::check_weight(name, "w_a_v", weights.w_a_v, a_v, d);
    detail::check_weight(name, "w_b_v", weights.w_b_v, b_v, d);
    detail::check_weight(name, "w_o", weights.w_o, d, o);
    // The buffers of carve(): a_q, b_q (TPA) or q (KV-only), a_k, b_k, a_v, b_v, o.
    const Index floats_per_row = detail::checked_sum(name, "workspace floats", rq == 0 ? q : a_q,
                                                     rq == 0 ? 0 : b_q, a_k, b_k, a_v, b_v, o);
    return {std::move(config), floats_per_row};
  }

  // Row i R + r (head-major) -> row r h + i (rank-major).
  static RowMatrix head_major_to_rank_major(const RowMatrix& weight, Index heads, Index rank) {
    RowMatrix reordered(weight.rows(), weight.cols());
    for (Index i = 0; i < heads; ++i)
      for (Index r = 0; r < rank; ++r) reordered.row(r * heads + i) = weight.row(i * rank + r);
    return reordered;
  }

  Index floats_per_row() const { return floats_per_row_; }
  Buffers carve(float* memory, Index rows) const {
    const Index h = config_.heads, dh = config_.head_dim, dv = config_.value_dim;
    const Index rq = config_.rank_q, rk = config_.rank_k, rv = config_.rank_v;
    Buffers b;
    float* next = memory;
    auto take = [&](Index width) {
      float* start = next;
      next += rows * width;
      return start;
    };
    b.a_q = take(rq * h);
    b.b_q = take(rq * dh);
    b.q = take(kv_only() ? h * dh : 0);
    b.a_k = take(rk * h);
    b.b_k = take(rk * dh);
    b.a_v = take(rv * h);
    b.b_v = take(rv * dv);
    b.o = take(h * dv);
    b.kernel = next;
    return b;
  }

  // The six factors A_Q = W_AQ x, B_Q = W_BQ x, ..., B_V = W_BV x (KV-only: q = W_Q x).
  void project(const float* x, Index rows, const Buffers& b, Executor* executor) const {
    auto apply = [&](const RowMatrix& weight, float* out) {
      linear(weight, x, rows, out, executor);
    };
    if (kv_only()) {
      apply(weights_.w_q, b.q);
    } else {
      apply(weights_.w_a_q, b.a_q);
      apply(weights_.w_b_q, b.b_q);
    }
    apply(weights_.w_a_k, b.a_k);
    apply(weights_.w_b_k, b.b_k);
    apply(weights_.w_a_v, b.a_v);
    apply(weights_.w_b_v, b.b_v);
  }

  // RoPE on the rows of B_Q (or q, KV-only) and B_K; rows [first, first + count) from `position`.
  void rotate(const Buffers& b, Index first, Index count, Index position) const {
    const Index h = config_.heads, dh = config_.head_dim;
    for (Index t = 0; t < count; ++t) {
      const Index row = first + t;
      const Rope::Vectors query =
          kv_only() ? Rope::Vectors{b.q + row * h * dh, h, dh}
                    : Rope::Vectors{b.b_q + row * config_.rank_q * dh, config_.rank_q, dh};
      rope_.apply(position + t, {query, {b.b_k + row * config_.rank_k * dh, config_.rank_k, dh}});
    }
  }

  // Cached: A_K (R_K x h), B_K (R_K x d_h, rotated), A_V (R_V x h), B_V (R_V x d_v).
  void cache_planes(const Buffers& b, Index row, PlaneInput* planes) const {
    const Index h = config_.heads, dh = config_.head_dim, dv = config_.value_dim;
    const Index rk = config_.rank_k, rv = config_.rank_v;
    planes[0] = {b.a_k + row * rk * h, rk, h};
    planes[1] = {b.b_k + row * rk * dh, rk, dh};
    planes[2] = {b.a_v + row * rv * h, rv, h};
    planes[3] = {b.b_v + row * rv * dv, rv, dv};
  }

  // Attention from the cached factors for every new token of the batch.
  void attend(const Buffers& b, const AttentionPlan& plan, const SequenceView* views,
              Executor* executor) const {
    if (kv_only())
      kernel_.run(plan, views, plan.batch(), b.q, b.o, nullptr, b.kernel, executor);
    else
      kernel_.run(plan, views, plan.batch(), b.a_q, b.b_q, b.o, nullptr, b.kernel, executor,
                  order());
  }

  // y = W_O [o_1 .. o_h]
  void output(const Buffers& b, Index rows, float* y, Executor* executor) const {
    linear(weights_.w_o, b.o, rows, y, executor);
  }

  TpaConfig config_;
  Index floats_per_row_;
  TpaWeights weights_;  // A rows reordered to rank-major
  TpaKernel<Storage> kernel_;
  Rope rope_;
};

// TPA-KVonly: a plain query W_Q x_t; config.rank_q must be 0.
template <class Storage = float>
class TensorProductAttentionKvOnly : public TensorProductAttention<Storage> {
 public:
  TensorProductAttentionKvOnly(TpaConfig config, TpaWeights weights)
      : TensorProductAttention<Storage>(without_query_rank(config), std::move(weights),
                                        "TensorProductAttentionKvOnly") {}

 private:
  static TpaConfig without_query_rank(TpaConfig config) {
    TPATTN_CHECK(config.rank_q == 0, "TensorProductAttentionKvOnly", "rank_q",
                 "0 (the query is not factorised)", config.rank_q);
    return config;
  }
};

}  // namespace tpattn
