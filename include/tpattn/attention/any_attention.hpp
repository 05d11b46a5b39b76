// tpattn/attention/any_attention.hpp -- any whole-layer operator behind one virtual interface.
//
// The layers share their steps at compile time (detail::AttentionLayer, attention/layer.hpp), so
// the class is fixed when the runner is compiled. AnyAttention offers the same calls (reserve,
// decode, prefill, forward, cache_record) behind virtual functions, so a runner that reads the
// mechanism from a config file holds a std::unique_ptr<AnyAttention> per layer
// (make_attention, attention/attention_spec.hpp). AttentionOf<Layer> implements it over one layer
// class by forwarding each call unchanged: outputs, cache contents and errors are the layer's own,
// and each call adds one virtual dispatch and no allocation to what the layer costs.
#pragma once

#include <utility>

#include "tpattn/attention/attention_family.hpp"
#include "tpattn/attention/gqa.hpp"
#include "tpattn/attention/mla.hpp"
#include "tpattn/attention/tpa.hpp"
#include "tpattn/cache/kv_cache.hpp"
#include "tpattn/core/executor.hpp"
#include "tpattn/kernels/attention_plan.hpp"

namespace tpattn {

class AnyAttention {
 public:
  virtual ~AnyAttention() = default;
  AnyAttention(const AnyAttention&) = delete;
  AnyAttention& operator=(const AnyAttention&) = delete;

  virtual AttentionFamily family() const = 0;
  // The storage type of every plane of cache_record(); compute is always fp32.
  virtual StorageType storage() const = 0;
  // The layer class, as its errors name it: "MultiHeadAttention", "TensorProductAttention", ...
  virtual const char* name() const = 0;
  // Features per token of x and y.
  virtual Index d_model() const = 0;
  // Build the cache from this (cache/kv_cache.hpp).
  virtual const CacheRecord& cache_record() const = 0;
  // The bare kernel's sliding window (0: none) and what AttentionPlan::make needs to cut a batch
  // for it (kernels/attention_plan.hpp).
  virtual Index window() const = 0;
  virtual PlanShape plan_shape() const = 0;

  // The calls of detail::AttentionLayer (attention/layer.hpp), with the same shapes, checks,
  // errors (named after the layer, e.g. MultiHeadAttention::decode) and all-or-nothing
  // guarantee. Public and non-virtual so that the default arguments are those of this one
  // declaration; each forwards to a private virtual. positions: the RoPE position of each new
  // token, each >= 0, for engines that evict or shift tokens; they only rotate q and k (which
  // cached tokens a query sees is decided by cache order).

  // Plans the workspace so that no later call of up to max_batch sequences and max_tokens new
  // tokens in all, on up to `threads` threads, allocates. All >= 1.
  void reserve(Index max_batch, Index max_tokens = 1, Index threads = 1) {
    do_reserve(max_batch, max_tokens, threads);
  }

  // One decode step. seqs: [batch] distinct live sequences; x: [batch, d_model], row b the new
  // token of seqs[b]; y: [batch, d_model]. positions: [batch] RoPE positions, or null: each
  // sequence's cached length. executor: runs the attention's work items (null: this thread).
  void decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y,
              Executor* executor = nullptr, const Index* positions = nullptr) {
    do_decode(cache, seqs, batch, x, y, executor, positions);
  }

  // Causal prefill of the next n tokens of `seq`, after what it holds. x: [n, d_model];
  // y: [n, d_model]; positions: [n] RoPE positions, or null: from the cached length on.
  void prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y,
               Executor* executor = nullptr, const Index* positions = nullptr) {
    do_prefill(cache, seq, n, x, y, executor, positions);
  }

  // One continuous-batching step: new_tokens: [batch], each >= 1, for the distinct sequences
  // seqs: [batch]. x: [sum new_tokens, d_model], sequence b's rows after those of seqs[0 .. b);
  // y: the same shape; positions: [sum new_tokens] in the rows' order, or null: from each
  // sequence's cached length on.
  void forward(KvCache& cache, const SequenceId* seqs, const Index* new_tokens, Index batch,
               const float* x, float* y, Executor* executor = nullptr,
               const Index* positions = nullptr) {
    do_forward(cache, seqs, new_tokens, batch, x, y, executor, positions);
  }

 protected:
  AnyAttention() = default;

 private:
  virtual void do_reserve(Index max_batch, Index max_tokens, Index threads) = 0;
  virtual void do_decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x,
                         float* y, Executor* executor, const Index* positions) = 0;
  virtual void do_prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y,
                          Executor* executor, const Index* positions) = 0;
  virtual void do_forward(KvCache& cache, const SequenceId* seqs, const Index* new_tokens,
                          Index batch, const float* x, float* y, Executor* executor,
                          const Index* positions) = 0;
};

namespace detail {

// The family and class name of each whole-layer class.
template <class Layer>
struct LayerFamily;

template <class S>
struct LayerFamily<MultiHeadAttention<S>> {
  static constexpr AttentionFamily family = AttentionFamily::mha;
  static constexpr const char* name = "MultiHeadAttention";
};
template <class S>
struct LayerFamily<MultiQueryAttention<S>> {
  static constexpr AttentionFamily family = AttentionFamily::mqa;
  static constexpr const char* name = "MultiQueryAttention";
};
template <class S>
struct LayerFamily<GroupedQueryAttention<S>> {
  static constexpr AttentionFamily family = AttentionFamily::gqa;
  static constexpr const char* name = "GroupedQueryAttention";
};
template <class S>
struct LayerFamily<MultiHeadLatentAttention<S>> {
  static constexpr AttentionFamily family = AttentionFamily::mla;
  static constexpr const char* name = "MultiHeadLatentAttention";
};
template <class S>
struct LayerFamily<TensorProductAttention<S>> {
  static constexpr AttentionFamily family = AttentionFamily::tpa;
  static constexpr const char* name = "TensorProductAttention";
};
template <class S>
struct LayerFamily<TensorProductAttentionKvOnly<S>> {
  static constexpr AttentionFamily family = AttentionFamily::tpa_kvonly;
  static constexpr const char* name = "TensorProductAttentionKvOnly";
};

}  // namespace detail

// AnyAttention over the layer class Layer (any of the six, any storage type), which it owns.
// Built with the layer's own constructor arguments: AttentionOf<MultiHeadAttention<float>>
// attention(config, weights). A TensorProductAttention built with rank_q = 0 reports family tpa;
// make_attention refuses that spec and builds TensorProductAttentionKvOnly instead.
template <class Layer>
class AttentionOf final : public AnyAttention {
 public:
  using layer_type = Layer;

  template <class... Arguments>
  explicit AttentionOf(Arguments&&... arguments) : layer_(std::forward<Arguments>(arguments)...) {}

  Layer& layer() { return layer_; }
  const Layer& layer() const { return layer_; }

  AttentionFamily family() const override { return detail::LayerFamily<Layer>::family; }
  StorageType storage() const override { return storage_type_of<typename Layer::storage_type>; }
  const char* name() const override { return detail::LayerFamily<Layer>::name; }
  Index d_model() const override { return layer_.config().d_model; }
  const CacheRecord& cache_record() const override { return layer_.cache_record(); }
  Index window() const override { return layer_.kernel().window(); }
  PlanShape plan_shape() const override { return layer_.kernel().plan_shape(); }

 private:
  void do_reserve(Index max_batch, Index max_tokens, Index threads) override {
    layer_.reserve(max_batch, max_tokens, threads);
  }
  void do_decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y,
                 Executor* executor, const Index* positions) override {
    layer_.decode(cache, seqs, batch, x, y, executor, positions);
  }
  void do_prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y,
                  Executor* executor, const Index* positions) override {
    layer_.prefill(cache, seq, n, x, y, executor, positions);
  }
  void do_forward(KvCache& cache, const SequenceId* seqs, const Index* new_tokens, Index batch,
                  const float* x, float* y, Executor* executor, const Index* positions) override {
    layer_.forward(cache, seqs, new_tokens, batch, x, y, executor, positions);
  }

  Layer layer_;
};

}  // namespace tpattn
