// tpattn/attention/layer.hpp -- the steps every whole-layer operator takes, written once.
//
// forward (a batch of sequences, each with its own number of new tokens: a continuous-batching
// step), decode (one new token each) and prefill (n tokens of one sequence, causal, after
// whatever it holds) all run:
//   check -> plan the work (kernels/attention_plan.hpp) and the workspace -> project -> RoPE at
//   each token's position -> append to the cache (all or nothing) -> attention of the whole
//   batch through the driver, on the caller's executor -> output projection.
// The operator (Derived) supplies the math of each step, privately, befriending this base:
//   struct Buffers;                                   pointers into the planned workspace
//   Index floats_per_row() const;                     workspace floats per token row
//   Buffers carve(float* memory, Index rows) const;   the kernel's part last, from b.kernel
//   void project(const float* x, Index rows, const Buffers&, Executor*) const;
//   void rotate(const Buffers&, Index row, Index count, Index position) const;
//   void cache_planes(const Buffers&, Index row, PlaneInput* planes) const;  // record order
//   void attend(const Buffers&, const AttentionPlan&, const SequenceView*, Executor*) const;
//   void output(const Buffers&, Index rows, float* y, Executor*) const;
// and the public cache_record() and kernel() (whose plan_shape() the plan is made for). Its
// constructor runs every check, size products included, before it allocates anything (the
// base's call names too); here the workspace is checked before it is allocated.
//
// Thread safety: one call at a time per operator object (the workspace and plan are its own);
// the executor runs the attention's work items, which only read the cache and write disjoint
// outputs. Distinct operator objects may run concurrently on distinct sequences of one cache
// only if the cache's own append and truncate are not called concurrently (see docs/contracts.md).
#pragma once

#include <exception>
#include <string>
#include <vector>

#include "tpattn/attention/layer_support.hpp"
#include "tpattn/core/executor.hpp"
#include "tpattn/kernels/attention_plan.hpp"

namespace tpattn {
namespace detail {

template <class Derived>
class AttentionLayer {
 public:
  // Plans the workspace for batches up to max_batch sequences and up to max_tokens new tokens
  // in all (decode: max_tokens = max_batch; a prefill of n: n), on `threads` threads, so that
  // no later call within those sizes allocates. All must be >= 1; a workspace whose size does
  // not fit in Index or cannot be allocated is an Error naming it, and nothing changes.
  void reserve(Index max_batch, Index max_tokens = 1, Index threads = 1) {
    const char* call = reserve_call_.c_str();
    TPATTN_CHECK(max_batch >= 1, call, "max_batch", ">= 1", max_batch);
    TPATTN_CHECK(max_tokens >= 1, call, "max_tokens", ">= 1", max_tokens);
    TPATTN_CHECK(threads >= 1, call, "threads", ">= 1", threads);
    const Index rows = max_batch > max_tokens ? max_batch : max_tokens;
    workspace_floats_for(
        call, rows, AttentionPlan::workspace_bound(self().kernel().plan_shape(), threads, call));
    plan_.reserve(max_batch, rows, threads, call);
    grow_batch(call, max_batch);
  }

  // Every call below takes `positions`, the RoPE position of each new token, for engines that
  // evict or shift tokens: [rows] (one per row of x), each >= 0. Null: a token's position is its
  // index in its sequence (the cache length before it). Positions only rotate q and k; which
  // cached tokens a query sees is always decided by cache order (causal, then the window).

  // One decode step for a batch of sequences of any lengths: x: [batch, d_model], row b the new
  // token of seqs[b]; y: [batch, d_model]; positions: [batch] or null. Appends each token to its
  // sequence. executor: runs the attention's work items (null: the calling thread). All or
  // nothing: on error the cache is as it was.
  void decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y,
              Executor* executor = nullptr, const Index* positions = nullptr) {
    const char* call = decode_call_.c_str();
    check_cache_record(call, cache, self().cache_record());
    check_decode_batch(call, cache, seqs, batch, x, y);
    check_positions(call, positions, batch);
    run(call, cache, seqs, nullptr, batch, x, y, executor, positions);
  }

  // Causal prefill of the next n tokens of `seq`, after whatever it already holds (chunked
  // prefill is a series of calls). x: [n, d_model]; y: [n, d_model]; positions: [n] or null.
  // On error nothing changes.
  void prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y,
               Executor* executor = nullptr, const Index* positions = nullptr) {
    const char* call = prefill_call_.c_str();
    check_cache_record(call, cache, self().cache_record());
    check_prefill(call, cache, seq, n, x, y);
    check_positions(call, positions, n);
    run(call, cache, &seq, &n, 1, x, y, executor, positions);
  }

  // One continuous-batching step: new_tokens[b] >= 1 new tokens for each distinct sequence
  // seqs[b] (decode tokens and prompt chunks mixed). x: [sum new_tokens, d_model], sequence b's
  // rows after those of seqs[0 .. b); y: the same shape; positions: [sum new_tokens] or null.
  // All or nothing.
  void forward(KvCache& cache, const SequenceId* seqs, const Index* new_tokens, Index batch,
               const float* x, float* y, Executor* executor = nullptr,
               const Index* positions = nullptr) {
    const char* call = forward_call_.c_str();
    check_cache_record(call, cache, self().cache_record());
    check_batch(call, cache, seqs, new_tokens, batch, x, y);
    if (positions != nullptr) {
      Index rows = 0;
      for (Index b = 0; b < batch; ++b) rows += new_tokens[b];  // checked by check_batch
      check_positions(call, positions, rows);
    }
    run(call, cache, seqs, new_tokens, batch, x, y, executor, positions);
  }

 protected:
  explicit AttentionLayer(const char* name)
      : decode_call_(std::string(name) + "::decode"),
        prefill_call_(std::string(name) + "::prefill"),
        forward_call_(std::string(name) + "::forward"),
        reserve_call_(std::string(name) + "::reserve") {}

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  // positions: [rows] or null; each must be >= 0.
  static void check_positions(const char* call, const Index* positions, Index rows) {
    if (positions == nullptr) return;
    for (Index r = 0; r < rows; ++r) {
      if (positions[r] < 0)
        fail(call, "positions", ">= 0 for every new token",
             "positions[" + to_text(r) + "] = " + to_text(positions[r]));
    }
  }

  // The steps, after the call's own checks. new_tokens null: one each; positions null: each
  // token at its index in its sequence.
  void run(const char* call, KvCache& cache, const SequenceId* seqs, const Index* new_tokens,
           Index batch, const float* x, float* y, Executor* executor, const Index* positions) {
    const auto count_of = [&](Index b) { return new_tokens == nullptr ? 1 : new_tokens[b]; };
    grow_batch(call, batch);
    Index rows = 0;
    for (Index b = 0; b < batch; ++b) {
      lengths_[b] = cache.length(seqs[b]) + count_of(b);  // after the append
      rows += count_of(b);
    }
    const Index threads = executor == nullptr ? 1 : executor->concurrency();
    plan_.make(self().kernel().plan_shape(), lengths_.data(), new_tokens, batch, threads, call);
    const auto buffers =
        self().carve(workspace_floats_for(call, rows, plan_.workspace_floats()), rows);
    try {
      self().project(x, rows, buffers, executor);
    } catch (...) {
      rethrow_as_error(call);  // an engine's executor failed; nothing was appended yet
    }
    for (Index b = 0; b < batch; ++b) {
      const Index row = plan_.token_offset(b);
      if (positions == nullptr) {
        self().rotate(buffers, row, count_of(b), lengths_[b] - count_of(b));
      } else {
        for (Index t = 0; t < count_of(b); ++t)
          self().rotate(buffers, row + t, 1, positions[row + t]);
      }
    }
    append_each(call, cache, seqs, new_tokens, batch, [&](Index b, PlaneInput* planes) {
      self().cache_planes(buffers, plan_.token_offset(b), planes);
    });
    try {
      for (Index b = 0; b < batch; ++b) views_[b] = cache.view(seqs[b]);
      self().attend(buffers, plan_, views_.data(), executor);
      self().output(buffers, rows, y, executor);
    } catch (...) {
      // A failed work item or task (an engine's executor or view) leaves the cache as it was.
      for (Index b = 0; b < batch; ++b) cache.truncate(seqs[b], lengths_[b] - count_of(b));
      rethrow_as_error(call);
    }
  }

  static void rethrow_as_error(const char* call) {
    try {
      throw;
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      fail(call, "executor", "every attention work item to complete",
           std::string("a work item failed (") + e.what() + "); nothing was appended");
    } catch (...) {
      fail(call, "executor", "every attention work item to complete",
           "a work item failed with a non-standard exception; nothing was appended");
    }
  }

  // Room for a batch of `batch` sequences' lengths and views.
  void grow_batch(const char* call, Index batch) {
    if (static_cast<Index>(lengths_.size()) >= batch) return;
    resize_or_fail(call, "batch", lengths_, batch, "lengths");
    resize_or_fail(call, "batch", views_, batch, "views");
  }

  // rows token rows, then the kernel's workspace: rows * floats_per_row() + kernel_floats.
  float* workspace_floats_for(const char* call, Index rows, Index kernel_floats) {
    const Index floats = checked_sum(
        call, "workspace floats",
        checked_product(call, "workspace floats", rows, self().floats_per_row()), kernel_floats);
    return workspace_.floats(call, floats);
  }

  std::string decode_call_;  // built once, so checks never build strings on the happy path
  std::string prefill_call_;
  std::string forward_call_;
  std::string reserve_call_;
  Workspace workspace_;
  AttentionPlan plan_;
  std::vector<Index> lengths_;
  std::vector<SequenceView> views_;
};

}  // namespace detail
}  // namespace tpattn
