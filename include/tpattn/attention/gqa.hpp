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
#include <string>
#include <utility>

#include "tpattn/kernels/gemm.hpp"
#include "tpattn/attention/layer_support.hpp"
#include "tpattn/cache/record.hpp"
#include "tpattn/kernels/attention_core.hpp"
#include "tpattn/kernels/rope.hpp"

namespace tpattn {

struct GqaConfig {
  Index d_model = 0;
  Index heads = 0;      // h
  Index kv_heads = 0;   // g, divides h
  Index head_dim = 0;   // d_h
  Index value_dim = 0;  // d_v; 0 means d_h
  RopeConfig rope;      // on q and k (rotary_dim <= d_h)
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
  // heads: h, a multiple of kv_heads (g); head_dim: d_h; value_dim: d_v.
  GqaKernel(Index heads, Index kv_heads, Index head_dim, Index value_dim,
            const char* call = "GqaKernel") {
    detail::check_positive(call, "heads", heads);
    detail::check_positive(call, "kv_heads", kv_heads);
    detail::check_positive(call, "head_dim", head_dim);
    detail::check_positive(call, "value_dim", value_dim);
    TPATTN_CHECK(heads % kv_heads == 0, call, "kv_heads",
                 "a divisor of heads = " + detail::to_text(heads), kv_heads);
    KeyValueLayout layout;
    layout.kv_heads = kv_heads;
    layout.key[0] = {0, head_dim};  // plane K
    layout.value = {1, value_dim};  // plane V
    core_ = AttentionCore<Storage>(layout, heads,
                                   1.0f / std::sqrt(static_cast<float>(head_dim)));
    record_ = records::gqa(kv_heads, head_dim, value_dim, storage_type_of<Storage>);
  }

  const CacheRecord& cache_record() const { return record_; }
  Index workspace_floats() const { return core_.workspace_floats(); }

  // q: [n, h, d_h] for the last n tokens of `view` (already cached, already rotated);
  // out: [n, h, d_v]; lse: [n, h] or null. Causal: query token t sees tokens up to itself.
  // n = 1 is a decode step. workspace: workspace_floats() floats.
  void attend(const float* q, Index n, const SequenceView& view, float* out, float* lse,
              float* workspace) const {
    detail::check_attend("GqaKernel::attend", record_, view, n, q, out, workspace);
    core_.run(q, n, view, view.length() - n + 1, out, lse, workspace);
  }

 private:
  AttentionCore<Storage> core_;
  CacheRecord record_;
};

template <class Storage = float>
class GroupedQueryAttention {
 public:
  using storage_type = Storage;

  GroupedQueryAttention(GqaConfig config, GqaWeights weights,
                        const char* name = "GroupedQueryAttention")
      : config_(validated(std::move(config), name)),
        weights_(std::move(weights)),
        decode_call_(std::string(name) + "::decode"),
        prefill_call_(std::string(name) + "::prefill"),
        kernel_(config_.heads, config_.kv_heads, config_.head_dim, config_.value_dim, name),
        rope_(config_.rope, config_.head_dim, name) {
    const Index d = config_.d_model, h = config_.heads, g = config_.kv_heads;
    detail::check_weight(name, "w_q", weights_.w_q, h * config_.head_dim, d);
    detail::check_weight(name, "w_k", weights_.w_k, g * config_.head_dim, d);
    detail::check_weight(name, "w_v", weights_.w_v, g * config_.value_dim, d);
    detail::check_weight(name, "w_o", weights_.w_o, d, h * config_.value_dim);
  }

  const GqaConfig& config() const { return config_; }
  const GqaWeights& weights() const { return weights_; }
  const GqaKernel<Storage>& kernel() const { return kernel_; }
  const CacheRecord& cache_record() const { return kernel_.cache_record(); }

  // Plans the workspace for decode batches up to max_batch and prefills up to max_tokens, so
  // that no later call of that size allocates.
  void reserve(Index max_batch, Index max_tokens = 1) {
    workspace_.floats(workspace_floats(max_batch > max_tokens ? max_batch : max_tokens));
  }

  // One decode step for a batch of sequences of any lengths.
  // x: [batch, d_model], row b the new token of seqs[b]; y: [batch, d_model].
  // Appends each token's k, v to the cache. On error nothing changes.
  void decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y) {
    const char* call = decode_call_.c_str();
    detail::check_cache_record(call, cache, cache_record());
    detail::check_decode_batch(call, cache, seqs, batch, x, y);
    Buffers buffers = plan(batch);
    project(x, batch, buffers);
    for (Index b = 0; b < batch; ++b) rotate(buffers, b, 1, cache.length(seqs[b]));
    detail::append_one_token_each(call, cache, seqs, batch, [&](Index b, PlaneInput* planes) {
      planes[0] = {buffers.k + b * k_width(), config_.kv_heads, config_.head_dim};
      planes[1] = {buffers.v + b * v_width(), config_.kv_heads, config_.value_dim};
    });
    for (Index b = 0; b < batch; ++b)
      kernel_.attend(buffers.q + b * q_width(), 1, cache.view(seqs[b]),
                     buffers.o + b * o_width(), nullptr, buffers.kernel);
    output(buffers, batch, y);
  }

  // Causal prefill of the next n tokens of `seq`, after whatever it already holds (so chunked
  // prefill is a sequence of calls). x: [n, d_model]; y: [n, d_model].
  void prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y) {
    const char* call = prefill_call_.c_str();
    detail::check_cache_record(call, cache, cache_record());
    detail::check_prefill(call, cache, seq, n, x, y);
    Buffers buffers = plan(n);
    project(x, n, buffers);
    rotate(buffers, 0, n, cache.length(seq));
    cache.append(seq, n,
                 {{buffers.k, config_.kv_heads, config_.head_dim},
                  {buffers.v, config_.kv_heads, config_.value_dim}});
    kernel_.attend(buffers.q, n, cache.view(seq), buffers.o, nullptr, buffers.kernel);
    output(buffers, n, y);
  }

 private:
  struct Buffers {
    float* q;       // [rows, h d_h]
    float* k;       // [rows, g d_h]
    float* v;       // [rows, g d_v]
    float* o;       // [rows, h d_v]
    float* kernel;  // kernel workspace
  };

  static GqaConfig validated(GqaConfig config, const char* name) {
    detail::check_positive(name, "d_model", config.d_model);
    detail::check_positive(name, "heads", config.heads);
    detail::check_positive(name, "kv_heads", config.kv_heads);
    detail::check_positive(name, "head_dim", config.head_dim);
    if (config.value_dim == 0) config.value_dim = config.head_dim;
    detail::check_positive(name, "value_dim", config.value_dim);
    return config;
  }

  Index q_width() const { return config_.heads * config_.head_dim; }
  Index k_width() const { return config_.kv_heads * config_.head_dim; }
  Index v_width() const { return config_.kv_heads * config_.value_dim; }
  Index o_width() const { return config_.heads * config_.value_dim; }

  Index workspace_floats(Index rows) const {
    return rows * (q_width() + k_width() + v_width() + o_width()) + kernel_.workspace_floats();
  }

  Buffers plan(Index rows) {
    float* memory = workspace_.floats(workspace_floats(rows));
    Buffers buffers;
    buffers.q = memory;
    buffers.k = buffers.q + rows * q_width();
    buffers.v = buffers.k + rows * k_width();
    buffers.o = buffers.v + rows * v_width();
    buffers.kernel = buffers.o + rows * o_width();
    return buffers;
  }

  void project(const float* x, Index rows, const Buffers& buffers) const {
    linear(weights_.w_q, x, rows, buffers.q);
    linear(weights_.w_k, x, rows, buffers.k);
    linear(weights_.w_v, x, rows, buffers.v);
  }

  // Rows [first, first + count) hold consecutive tokens starting at `position`.
  void rotate(const Buffers& buffers, Index first, Index count, Index position) const {
    for (Index t = 0; t < count; ++t) {
      rope_.apply(buffers.q + (first + t) * q_width(), config_.heads, config_.head_dim,
                  position + t);
      rope_.apply(buffers.k + (first + t) * k_width(), config_.kv_heads, config_.head_dim,
                  position + t);
    }
  }

  void output(const Buffers& buffers, Index rows, float* y) const {
    linear(weights_.w_o, buffers.o, rows, y);
  }

  GqaConfig config_;
  GqaWeights weights_;
  std::string decode_call_;  // built once: error paths must not allocate on the happy path
  std::string prefill_call_;
  GqaKernel<Storage> kernel_;
  Rope rope_;
  detail::Workspace workspace_;
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
