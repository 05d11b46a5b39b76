// tpattn/attention/layer.hpp -- the steps every whole-layer operator takes, written once.
//
// decode (one new token for each sequence of a batch) and prefill (n tokens of one sequence,
// causal, after whatever it holds) both run:
//   check -> plan workspace -> project -> RoPE at each token's position -> append to the cache
//   (all or nothing) -> attention over the sequence's view -> output projection.
// The operator (Derived) supplies the math of each step, privately, befriending this base:
//   struct Buffers;                                   pointers into the planned workspace
//   Index floats_per_row() const;                     workspace floats per token row
//   Index kernel_floats() const;                      workspace floats of its kernel
//   Buffers carve(float* memory, Index rows) const;
//   void project(const float* x, Index rows, const Buffers&) const;
//   void rotate(const Buffers&, Index row, Index count, Index position) const;
//   void cache_planes(const Buffers&, Index row, PlaneInput* planes) const;  // record order
//   void attend(const Buffers&, Index row, Index count, const SequenceView&) const;
//   void output(const Buffers&, Index rows, float* y) const;
// and the public cache_record(). Its constructor runs every check, size products included,
// before it allocates anything (the base's call names too); here the workspace of rows token
// rows, rows * floats_per_row() + kernel_floats(), is checked before it is allocated.
#pragma once

#include <string>

#include "tpattn/attention/layer_support.hpp"

namespace tpattn {
namespace detail {

template <class Derived>
class AttentionLayer {
 public:
  // Plans the workspace for decode batches up to max_batch and prefills up to max_tokens, so
  // that no later call of that size allocates. Both must be >= 1; a workspace whose size does
  // not fit in Index or cannot be allocated is an Error naming it, and nothing changes.
  void reserve(Index max_batch, Index max_tokens = 1) {
    const char* call = reserve_call_.c_str();
    TPATTN_CHECK(max_batch >= 1, call, "max_batch", ">= 1", max_batch);
    TPATTN_CHECK(max_tokens >= 1, call, "max_tokens", ">= 1", max_tokens);
    workspace_floats_for(call, max_batch > max_tokens ? max_batch : max_tokens);
  }

  // One decode step for a batch of sequences of any lengths: x: [batch, d_model], row b the new
  // token of seqs[b]; y: [batch, d_model]. Appends each token to its sequence. All or nothing:
  // on error the cache is as it was.
  void decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y) {
    const char* call = decode_call_.c_str();
    check_cache_record(call, cache, self().cache_record());
    check_decode_batch(call, cache, seqs, batch, x, y);
    const auto buffers = self().carve(workspace_floats_for(call, batch), batch);
    self().project(x, batch, buffers);
    for (Index b = 0; b < batch; ++b) self().rotate(buffers, b, 1, cache.length(seqs[b]));
    append_one_token_each(call, cache, seqs, batch, [&](Index b, PlaneInput* planes) {
      self().cache_planes(buffers, b, planes);
    });
    for (Index b = 0; b < batch; ++b) self().attend(buffers, b, 1, cache.view(seqs[b]));
    self().output(buffers, batch, y);
  }

  // Causal prefill of the next n tokens of `seq`, after whatever it already holds (chunked
  // prefill is a series of calls). x: [n, d_model]; y: [n, d_model]. On error nothing changes.
  void prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y) {
    const char* call = prefill_call_.c_str();
    check_cache_record(call, cache, self().cache_record());
    check_prefill(call, cache, seq, n, x, y);
    const auto buffers = self().carve(workspace_floats_for(call, n), n);
    self().project(x, n, buffers);
    self().rotate(buffers, 0, n, cache.length(seq));
    PlaneInput planes[4];
    self().cache_planes(buffers, 0, planes);
    cache.append(seq, n, planes, cache.record().plane_count());
    self().attend(buffers, 0, n, cache.view(seq));
    self().output(buffers, n, y);
  }

 protected:
  explicit AttentionLayer(const char* name)
      : decode_call_(std::string(name) + "::decode"),
        prefill_call_(std::string(name) + "::prefill"),
        reserve_call_(std::string(name) + "::reserve") {}

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }

  // rows token rows and the kernel's workspace: rows * floats_per_row() + kernel_floats().
  float* workspace_floats_for(const char* call, Index rows) {
    const Index floats =
        checked_sum(call, "workspace floats",
                    checked_product(call, "workspace floats", rows, self().floats_per_row()),
                    self().kernel_floats());
    return workspace_.floats(call, floats);
  }

  std::string decode_call_;  // built once, so checks never build strings on the happy path
  std::string prefill_call_;
  std::string reserve_call_;
  Workspace workspace_;
};

}  // namespace detail
}  // namespace tpattn
