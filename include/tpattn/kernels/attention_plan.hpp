// tpattn/kernels/attention_plan.hpp -- how one batched attention call is cut into work items.
//
// A batch is a list of sequences, each with `length` cached tokens of which the last
// `new_tokens` are the call's queries (decode: 1; a prompt chunk: n; both may be mixed in one
// continuous-batching step). Query token t of sequence b sees the cached tokens
// [lower, horizon) of a KeyRange with visible = length - new_tokens + 1 (kernels/cache_tiles.hpp).
//
// The plan cuts that work so `threads` tasks get fair shares:
//   1. each sequence's query tokens into chunks (whole multiples of the scorer's query block),
//      of about `target` key visits each, where target = total visits / (threads x 8);
//   2. a chunk still costlier than target (a long decode) into key ranges of equal size, whole
//      multiples of kSplitAlign tokens: split-KV, as flash-decoding does. Each split writes a
//      partial (out, lse) that run() merges by log-sum-exp after all items are done.
// With one thread nothing is cut: one item per sequence, exactly the unsplit kernel.
// Items are ordered costliest first, and tasks take the next item as they finish one, so a
// ragged batch still balances.
//
// A plan depends only on the lengths, the new tokens, the thread count and the scorer's shape,
// so one plan serves every layer of a model's step. Making one allocates only when it needs more
// room than any plan made with this object before (reserve() plans ahead).
#pragma once

#include <algorithm>
#include <vector>

#include "tpattn/core/checked_size.hpp"
#include "tpattn/core/error.hpp"
#include "tpattn/core/matrix.hpp"

namespace tpattn {

// What a plan needs to know of the scorer that will run it; run() refuses a plan made for
// another shape.
struct PlanShape {
  Index rows_per_token = 0;  // query rows per query token (the query heads h)
  Index value_width = 0;     // output floats per row (d_v, or the latent width for MLA)
  Index task_floats = 0;     // workspace floats one task needs (the scorer's workspace)
  Index query_block = 1;     // query tokens the scorer takes per pass; chunks are multiples
  Index window = 0;          // sliding window (0: causal over the whole sequence)

  friend bool operator==(const PlanShape& a, const PlanShape& b) {
    return a.rows_per_token == b.rows_per_token && a.value_width == b.value_width &&
           a.task_floats == b.task_floats && a.query_block == b.query_block && a.window == b.window;
  }
  friend bool operator!=(const PlanShape& a, const PlanShape& b) { return !(a == b); }
};

// The keys a run of query tokens sees: the first sees [lower, visible), the last up to `last`.
struct ChunkKeys {
  Index visible = 0;  // KeyRange::visible of the run's first query token
  Index lower = 0;    // the first key any of them sees
  Index last = 0;     // one past the last key any of them sees
};

// One piece of work: query tokens [query_first, query_first + query_count) of sequence
// `sequence` against its cached tokens [key_begin, key_end).
struct WorkItem {
  Index sequence = 0;
  Index query_first = 0;
  Index query_count = 0;
  Index key_begin = 0;
  Index key_end = 0;
  Index partial = -1;  // -1: writes the output itself; else float offset of its partial slot
  double cost = 0;     // key visits (query tokens x keys each sees), for ordering
};

// Consecutive query tokens of a sequence whose key range was split: `splits` partial slots of
// slot_floats() floats each, from float offset `partial`, merged into one result.
struct SplitChunk {
  Index sequence = 0;
  Index query_first = 0;
  Index query_count = 0;
  Index splits = 0;
  Index partial = 0;
};

class AttentionPlan {
 public:
  static constexpr Index kItemsPerThread = 8;    // items per thread to balance ragged work
  static constexpr Index kSplitAlign = 128;      // key ranges start at multiples of this
  static constexpr double kMinItemVisits = 512;  // fewer key visits are not worth a handoff

  // lengths: [batch] cached tokens of each sequence, its new tokens included; new_tokens: [batch]
  // query tokens of each (the last ones of the sequence), or null for one each (decode).
  // threads >= 1: tasks the work is cut for. Throws Error naming `call` on bad input, and leaves
  // the plan as it was.
  void make(const PlanShape& shape, const Index* lengths, const Index* new_tokens, Index batch,
            Index threads, const char* call = "AttentionPlan::make") {
    check_input(call, shape, lengths, new_tokens, batch, threads);
    const auto count_of = [&](Index b) { return new_tokens == nullptr ? 1 : new_tokens[b]; };

    // Room first, so that a refused allocation leaves the plan as it was.
    const Index chunk_bound = chunks_bound(shape, new_tokens, batch);
    grow(call, lengths_, batch);
    grow(call, new_tokens_, batch);
    grow(call, token_offsets_, batch);
    grow(call, items_,
         detail::checked_sum(
             call, "work items", chunk_bound,
             detail::checked_product(call, "work items", threads, 2 * kItemsPerThread + 1)));
    grow(call, chunks_, chunk_bound);

    shape_ = shape;
    batch_ = batch;
    threads_ = threads;
    lengths_.assign(lengths, lengths + batch);
    new_tokens_.clear();
    token_offsets_.clear();
    Index tokens = 0;
    double total = 0;
    for (Index b = 0; b < batch; ++b) {
      new_tokens_.push_back(count_of(b));
      token_offsets_.push_back(tokens);
      tokens += count_of(b);
      total += visits(b, 0, count_of(b));
    }
    query_tokens_ = tokens;

    const double target =
        threads == 1
            ? total + 1
            : std::max(total / static_cast<double>(threads * kItemsPerThread), kMinItemVisits);
    items_.clear();
    chunks_.clear();
    partial_floats_ = 0;
    for (Index b = 0; b < batch; ++b) cut_sequence(b, target);
    std::sort(items_.begin(), items_.end(), [](const WorkItem& a, const WorkItem& b) {
      if (a.cost != b.cost) return a.cost > b.cost;
      if (a.sequence != b.sequence) return a.sequence < b.sequence;
      if (a.query_first != b.query_first) return a.query_first < b.query_first;
      return a.key_begin < b.key_begin;
    });
    tasks_ = std::min<Index>(threads, static_cast<Index>(items_.size()));
    task_stride_ = aligned_floats(shape.task_floats);
    workspace_floats_ = detail::checked_sum(
        call, "workspace floats", kWorkspaceAlignFloats,
        detail::checked_product(call, "workspace floats", tasks_, task_stride_), partial_floats_);
  }

  // Makes room for plans of up to max_batch sequences with max_tokens new tokens in all, on
  // `threads` threads, so that making them later allocates nothing.
  void reserve(Index max_batch, Index max_tokens, Index threads,
               const char* call = "AttentionPlan::reserve") {
    TPATTN_CHECK(max_batch >= 1, call, "max_batch", ">= 1", max_batch);
    TPATTN_CHECK(max_tokens >= 1, call, "max_tokens", ">= 1", max_tokens);
    TPATTN_CHECK(threads >= 1, call, "threads", ">= 1", threads);
    // Every sequence's chunks: at most one per new token, and one per sequence.
    const Index chunks = detail::checked_sum(call, "work items", max_batch, max_tokens);
    grow(call, lengths_, max_batch);
    grow(call, new_tokens_, max_batch);
    grow(call, token_offsets_, max_batch);
    grow(call, items_,
         detail::checked_sum(
             call, "work items", chunks,
             detail::checked_product(call, "work items", threads, 2 * kItemsPerThread + 1)));
    grow(call, chunks_, chunks);
  }

  // The most workspace any plan for `shape` on `threads` threads needs, whatever the batch:
  // split chunks cost more than the target each, so there are at most threads x
  // kItemsPerThread of them, each of one query block, with at most that many splits in all
  // beyond one per chunk.
  static Index workspace_bound(const PlanShape& shape, Index threads, const char* call) {
    const char* argument = "workspace floats";
    const auto product = [&](Index a, Index b) {
      return detail::checked_product(call, argument, a, b);
    };
    const Index slot =
        aligned_floats(product(product(shape.query_block, shape.rows_per_token),
                               detail::checked_sum(call, argument, shape.value_width, 1)));
    const Index slots =
        detail::checked_sum(call, argument, product(threads, 2 * kItemsPerThread), 1);
    return detail::checked_sum(call, argument, kWorkspaceAlignFloats,
                               product(threads, aligned_floats(shape.task_floats)),
                               product(slots, slot));
  }

  bool empty() const { return batch_ == 0; }
  const PlanShape& shape() const { return shape_; }
  Index batch() const { return batch_; }
  Index threads() const { return threads_; }
  Index length(Index b) const { return lengths_[b]; }
  Index new_tokens(Index b) const { return new_tokens_[b]; }
  // Row of sequence b's first query token in the batch's concatenated queries and outputs.
  Index token_offset(Index b) const { return token_offsets_[b]; }
  Index query_tokens() const { return query_tokens_; }  // all sequences' new tokens

  // Tasks run() starts (<= threads), its work items and split chunks.
  Index tasks() const { return tasks_; }
  const std::vector<WorkItem>& items() const { return items_; }
  const std::vector<SplitChunk>& split_chunks() const { return chunks_; }

  // Workspace of run(): tasks() task workspaces, then the partial slots.
  Index workspace_floats() const { return workspace_floats_; }
  Index task_stride() const { return task_stride_; }
  Index partial_offset() const { return tasks_ * task_stride_; }
  Index slot_floats(Index query_count) const {
    return aligned_floats(query_count * shape_.rows_per_token * (shape_.value_width + 1));
  }

  // The keys query tokens [first, first + count) of sequence b's new tokens see.
  ChunkKeys key_bounds(Index b, Index first, Index count) const {
    const Index visible = lengths_[b] - new_tokens_[b] + 1 + first;
    const Index last = visible + count - 1;  // horizon of the last query token
    const Index lower =
        shape_.window > 0 && visible - shape_.window > 0 ? visible - shape_.window : 0;
    return {visible, lower, last};
  }

 private:
  // The keys of query tokens [first, first + count) of sequence b: visits and bounds.
  double visits(Index b, Index first, Index count) const {
    const ChunkKeys k = key_bounds(b, first, count);
    double sum = 0;
    for (Index t = 0; t < count; ++t) {
      const Index horizon = k.visible + t;
      const Index lower =
          shape_.window > 0 && horizon - shape_.window > 0 ? horizon - shape_.window : 0;
      sum += static_cast<double>(horizon - lower);
    }
    return sum;
  }

  void cut_sequence(Index b, double target) {
    const Index n = new_tokens_[b];
    const Index block = shape_.query_block;
    Index first = 0;
    while (first < n) {
      // Grow the chunk block by block while it stays within target (at least one block).
      Index count = std::min(block, n - first);
      double cost = visits(b, first, count);
      while (first + count < n) {
        const Index more = std::min(block, n - first - count);
        const double extra = visits(b, first + count, more);
        if (cost + extra > target) break;
        count += more;
        cost += extra;
      }
      cut_chunk(b, first, count, cost, target);
      first += count;
    }
  }

  void cut_chunk(Index b, Index first, Index count, double cost, double target) {
    const ChunkKeys k = key_bounds(b, first, count);
    const Index span = k.last - k.lower;  // tokens any query token of the chunk sees
    Index splits = cost > target ? static_cast<Index>(cost / target + 0.999) : 1;
    splits = std::min(splits, span / kSplitAlign);
    if (splits <= 1) {
      items_.push_back({b, first, count, 0, lengths_[b], -1, cost});
      return;
    }
    // Equal ranges, their inner bounds rounded to multiples of kSplitAlign.
    SplitChunk chunk{b, first, count, splits, partial_floats_};
    chunks_.push_back(chunk);
    Index begin = k.lower;
    for (Index s = 0; s < splits; ++s) {
      Index end = s + 1 == splits ? lengths_[b]
                                  : (k.lower + span * (s + 1) / splits) / kSplitAlign * kSplitAlign;
      if (end <= begin) end = begin;  // an empty range still writes its (empty) partial
      items_.push_back({b, first, count, begin, end, partial_floats_,
                        cost * static_cast<double>(end - begin) / static_cast<double>(span)});
      partial_floats_ += slot_floats(count);
      begin = end;
    }
  }

  static Index chunks_bound(const PlanShape& shape, const Index* new_tokens, Index batch) {
    Index chunks = 0;
    for (Index b = 0; b < batch; ++b) {
      const Index n = new_tokens == nullptr ? 1 : new_tokens[b];
      chunks += (n + shape.query_block - 1) / shape.query_block;
    }
    return chunks;
  }

  static void check_input(const char* call, const PlanShape& shape, const Index* lengths,
                          const Index* new_tokens, Index batch, Index threads) {
    TPATTN_CHECK(shape.rows_per_token >= 1 && shape.value_width >= 1 && shape.query_block >= 1 &&
                     shape.task_floats >= 0 && shape.window >= 0,
                 call, "shape", "a scorer's plan_shape()", "an empty or negative shape");
    TPATTN_CHECK(batch >= 1, call, "batch", ">= 1", batch);
    TPATTN_CHECK(threads >= 1, call, "threads", ">= 1", threads);
    TPATTN_CHECK(lengths != nullptr, call, "lengths", "non-null", "null");
    for (Index b = 0; b < batch; ++b) {
      const Index n = new_tokens == nullptr ? 1 : new_tokens[b];
      TPATTN_CHECK(n >= 1, call, "new_tokens", ">= 1 for every sequence",
                   "new_tokens[" + detail::to_text(b) + "] = " + detail::to_text(n));
      TPATTN_CHECK(lengths[b] >= n, call, "lengths",
                   ">= new_tokens for every sequence (the new tokens are cached)",
                   "lengths[" + detail::to_text(b) + "] = " + detail::to_text(lengths[b]) +
                       " < new_tokens = " + detail::to_text(n));
    }
  }

  template <class T>
  static void grow(const char* call, std::vector<T>& v, Index count) {
    if (static_cast<Index>(v.capacity()) >= count) return;
    try {
      v.reserve(static_cast<std::size_t>(count));
    } catch (const std::exception&) {
      detail::fail(call, "plan", "room for " + detail::to_text(count) + " entries",
                   "an allocation the system refused");
    }
  }

  PlanShape shape_;
  Index batch_ = 0;
  Index threads_ = 0;
  Index tasks_ = 0;
  Index query_tokens_ = 0;
  Index task_stride_ = 0;
  Index partial_floats_ = 0;
  Index workspace_floats_ = 0;
  std::vector<Index> lengths_;
  std::vector<Index> new_tokens_;
  std::vector<Index> token_offsets_;
  std::vector<WorkItem> items_;
  std::vector<SplitChunk> chunks_;
};

}  // namespace tpattn
