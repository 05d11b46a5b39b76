// tpattn/attention/layer_support.hpp -- what every whole-layer operator does the same way:
// argument checks, a workspace planned ahead, and an all-or-nothing batched cache append.
#pragma once

#include <cmath>
#include <cstring>
#include <vector>

#include "tpattn/cache/kv_cache.hpp"
#include "tpattn/core/checked_size.hpp"
#include "tpattn/core/matrix.hpp"

namespace tpattn {
namespace detail {

// A float arena sized by the operator's plan; grows only when a call needs more than any call
// before it, so a steady-state decode step never allocates. A size that cannot be allocated is
// an Error naming `call` and the size (core/checked_size.hpp), and the arena stays as it was.
class Workspace {
 public:
  float* floats(const char* call, Index count) {
    if (static_cast<Index>(memory_.size()) < count)
      resize_or_fail(call, "workspace", memory_, count, "floats");
    return memory_.data();
  }
  Index capacity() const { return static_cast<Index>(memory_.size()); }

 private:
  std::vector<float> memory_;
};

inline void check_weight(const char* call, const char* name, const RowMatrix& weight, Index rows,
                         Index cols) {
  TPATTN_CHECK(weight.rows() == rows && weight.cols() == cols, call, name,
               to_text(rows) + " x " + to_text(cols),
               to_text(weight.rows()) + " x " + to_text(weight.cols()));
}

inline void check_positive(const char* call, const char* name, Index value) {
  TPATTN_CHECK(value >= 1, call, name, ">= 1", value);
}

inline void check_window(const char* call, Index window) {
  TPATTN_CHECK(window >= 0, call, "window", ">= 0 (0: no sliding window)", window);
}

// The cache holds this operator's record. A mismatch names the first field that differs, on
// both sides; either record may have any number of planes (an engine's cache may pass any).
inline void check_cache_record(const char* call, const KvCache& cache,
                               const CacheRecord& expected) {
  TPATTN_CHECK(
      cache.record() == expected, call, "cache",
      "a cache built with this operator's cache_record() (" +
          describe_difference(expected, cache.record()) + ")",
      "a cache with another record (" + describe_difference(cache.record(), expected) + ")");
}

// The always-on checks of a bare kernel's attend(): the view comes from a cache with the
// kernel's record and holds the n query tokens; the buffers exist.
// query_name: the query pointer's parameter name ("q", or "a_q" for TPA's factored queries).
inline void check_attend(const char* call, const CacheRecord& record, const SequenceView& view,
                         Index n, const void* query, const void* out, const void* workspace,
                         const char* query_name = "q") {
  TPATTN_CHECK(view.valid(), call, "view",
               "a view of a cache built with this kernel's cache_record()", "an empty view");
  TPATTN_CHECK(view.record() == record, call, "view",
               "a view of a cache built with this kernel's cache_record() (" +
                   describe_difference(record, view.record()) + ")",
               "a view with another record (" + describe_difference(view.record(), record) + ")");
  TPATTN_CHECK(n >= 1 && n <= view.length(), call, "n",
               "in [1, view.length() = " + to_text(view.length()) + "]", n);
  TPATTN_CHECK(query != nullptr, call, query_name, "non-null", "null");
  TPATTN_CHECK(out != nullptr, call, "out", "non-null", "null");
  TPATTN_CHECK(workspace != nullptr, call, "workspace", "non-null (workspace_floats() floats)",
               "null");
}

// seqs[b] is live and differs from seqs[0 .. b).
inline void check_live_and_distinct(const char* call, const KvCache& cache, const SequenceId* seqs,
                                    Index b) {
  TPATTN_CHECK(cache.contains(seqs[b]), call, "seqs", "live sequence ids",
               "seqs[" + to_text(b) + "] = " + to_text(seqs[b]));
  for (Index other = 0; other < b; ++other)
    TPATTN_CHECK(seqs[other] != seqs[b], call, "seqs", "distinct sequence ids",
                 "seqs[" + to_text(other) + "] == seqs[" + to_text(b) + "] == " + to_text(seqs[b]));
}

// seqs: [batch] distinct live sequences of `cache`, each with room for one more token.
inline void check_decode_batch(const char* call, const KvCache& cache, const SequenceId* seqs,
                               Index batch, const float* x, const float* y) {
  TPATTN_CHECK(batch >= 1, call, "batch", ">= 1", batch);
  TPATTN_CHECK(seqs != nullptr, call, "seqs", "non-null", "null");
  TPATTN_CHECK(x != nullptr, call, "x", "non-null", "null");
  TPATTN_CHECK(y != nullptr, call, "y", "non-null", "null");
  for (Index b = 0; b < batch; ++b) {
    check_live_and_distinct(call, cache, seqs, b);
    TPATTN_CHECK(cache.tokens_available(seqs[b]) >= 1, call, "cache",
                 "room for one more token in every sequence",
                 "no room for seqs[" + to_text(b) + "] = " + to_text(seqs[b]));
  }
}

inline void check_prefill(const char* call, const KvCache& cache, SequenceId seq, Index n,
                          const float* x, const float* y) {
  TPATTN_CHECK(cache.contains(seq), call, "seq", "a live sequence id", seq);
  TPATTN_CHECK(n >= 1, call, "n_tokens", ">= 1", n);
  TPATTN_CHECK(x != nullptr, call, "x", "non-null", "null");
  TPATTN_CHECK(y != nullptr, call, "y", "non-null", "null");
  TPATTN_CHECK(n <= cache.tokens_available(seq), call, "n_tokens",
               "<= " + to_text(cache.tokens_available(seq)) + " (room left for the sequence)", n);
}

// Appends new_tokens[b] tokens (one each if new_tokens is null) to each of seqs[0..batch):
// planes_of(b, PlaneInput* out) fills the record's planes for sequence b's rows. All or
// nothing: every sequence may have room on its own while a shared page pool runs dry midway
// through the batch; then the sequences already extended are cut back and the operator's call
// is named in the error. Any other exception from an engine's own cache (std::bad_alloc, its
// own error type) is rethrown as it is, after the same rollback.
template <class PlanesOf>
void append_each(const char* call, KvCache& cache, const SequenceId* seqs, const Index* new_tokens,
                 Index batch, PlanesOf&& planes_of) {
  const auto count_of = [&](Index b) { return new_tokens == nullptr ? 1 : new_tokens[b]; };
  PlaneInput planes[4];
  const Index plane_count = cache.record().plane_count();
  TPATTN_ASSERT(plane_count <= 4);
  Index done = 0;
  const auto roll_back = [&] {
    for (Index b = 0; b < done; ++b) cache.truncate(seqs[b], cache.length(seqs[b]) - count_of(b));
  };
  try {
    for (; done < batch; ++done) {
      planes_of(done, planes);
      cache.append(seqs[done], count_of(done), planes, plane_count);
    }
  } catch (const Error& error) {
    roll_back();
    fail(call, "cache",
         new_tokens == nullptr ? "room for one more token in every sequence of the batch"
                               : "room for every sequence's new tokens in the batch",
         "none left for seqs[" + to_text(done) + "] = " + to_text(seqs[done]) +
             " after the batch's earlier appends (" + error.what() + "); nothing was appended");
  } catch (...) {
    roll_back();
    throw;
  }
}

// seqs: [batch] distinct live sequences of `cache`; new_tokens: [batch], each >= 1 and within
// the room its sequence has left; x, y: [sum new_tokens, d_model].
inline void check_batch(const char* call, const KvCache& cache, const SequenceId* seqs,
                        const Index* new_tokens, Index batch, const float* x, const float* y) {
  TPATTN_CHECK(batch >= 1, call, "batch", ">= 1", batch);
  TPATTN_CHECK(seqs != nullptr, call, "seqs", "non-null", "null");
  TPATTN_CHECK(new_tokens != nullptr, call, "new_tokens", "non-null", "null");
  TPATTN_CHECK(x != nullptr, call, "x", "non-null", "null");
  TPATTN_CHECK(y != nullptr, call, "y", "non-null", "null");
  for (Index b = 0; b < batch; ++b) {
    check_live_and_distinct(call, cache, seqs, b);
    TPATTN_CHECK(new_tokens[b] >= 1, call, "new_tokens", ">= 1 for every sequence",
                 "new_tokens[" + to_text(b) + "] = " + to_text(new_tokens[b]));
    TPATTN_CHECK(new_tokens[b] <= cache.tokens_available(seqs[b]), call, "new_tokens",
                 "within the room each sequence has left",
                 "new_tokens[" + to_text(b) + "] = " + to_text(new_tokens[b]) + " > " +
                     to_text(cache.tokens_available(seqs[b])) + " for seqs[" + to_text(b) +
                     "] = " + to_text(seqs[b]));
  }
}

}  // namespace detail
}  // namespace tpattn
