// tpattn/kernels/attention_driver.hpp -- runs a plan's work items on an executor and merges the
// split ones: the one batched path every operator's attention takes.
//
// The scorer (DenseScorer for dense keys and values, TpaScorer for TPA's factors) is the policy:
// given a run of query tokens, a view and a KeyRange, it writes (out, lse). The driver owns what
// is the same for all of them: cutting the batch (AttentionPlan), handing items to tasks, one
// workspace per task, the log-sum-exp merge of split key ranges, and errors.
#pragma once

#include <atomic>
#include <cstring>
#include <exception>

#include "tpattn/cache/sequence_view.hpp"
#include "tpattn/core/executor.hpp"
#include "tpattn/kernels/attention_plan.hpp"
#include "tpattn/kernels/cache_tiles.hpp"
#include "tpattn/kernels/softmax_state.hpp"

namespace tpattn {
namespace detail {

inline std::string describe_shape(const PlanShape& s) {
  return "rows_per_token " + to_text(s.rows_per_token) + ", value_width " + to_text(s.value_width) +
         ", task_floats " + to_text(s.task_floats) + ", query_block " + to_text(s.query_block) +
         ", window " + to_text(s.window);
}

// The plan was made for this scorer and these sequences: checked before any work starts.
inline void check_plan(const char* call, const AttentionPlan& plan, const PlanShape& shape,
                       const CacheRecord& record, const SequenceView* views, Index batch) {
  TPATTN_CHECK(!plan.empty(), call, "plan", "a plan made with AttentionPlan::make",
               "an empty plan");
  TPATTN_CHECK(plan.shape() == shape, call, "plan",
               "a plan for this operator's shape (" + describe_shape(shape) + ")",
               "a plan for another shape (" + describe_shape(plan.shape()) + ")");
  TPATTN_CHECK(plan.batch() == batch, call, "plan",
               "a plan for a batch of " + to_text(batch) + " sequences",
               "a plan for " + to_text(plan.batch()));
  TPATTN_CHECK(views != nullptr, call, "views", "non-null", "null");
  for (Index b = 0; b < batch; ++b) {
    TPATTN_CHECK(views[b].valid(), call, "views", "a view of a live sequence for every entry",
                 "views[" + to_text(b) + "] is empty");
    TPATTN_CHECK(views[b].record() == record, call, "views",
                 "views of a cache built with this operator's cache_record() (" +
                     describe_difference(record, views[b].record()) + ")",
                 "views[" + to_text(b) + "] has another record (" +
                     describe_difference(views[b].record(), record) + ")");
    TPATTN_CHECK(views[b].length() == plan.length(b), call, "plan",
                 "a plan for these lengths (views[" + to_text(b) +
                     "].length() = " + to_text(views[b].length()) + ")",
                 "a plan made for length " + to_text(plan.length(b)) + " there");
  }
}

}  // namespace detail

// Runs every work item of `plan`, tasks on `executor` (null: one after another on the calling
// thread), then merges the split chunks' partial results by log-sum-exp (natural log).
//   views:     [batch], batch == plan.batch(); views[b] holds sequence b, plan.length(b) tokens,
//              in a cache with `record`;
//   out:       [plan.query_tokens(), rows_per_token, value_width], sequences in batch order;
//   lse:       [plan.query_tokens(), rows_per_token] or null;
//   workspace: plan.workspace_floats() floats;
//   attend(token, count, view, range, out, lse, task_workspace): the scorer on query tokens
//              [token, token + count) of the batch (concatenated), writing count token rows.
// Every check runs before any work. An exception from a work item stops the tasks taking new
// items and is rethrown here, on the calling thread, once every task has returned.
template <class Attend>
void run_plan(const char* call, const AttentionPlan& plan, const PlanShape& shape,
              const CacheRecord& record, const SequenceView* views, Index batch, float* out,
              float* lse, float* workspace, Executor* executor, const Attend& attend) {
  detail::check_plan(call, plan, shape, record, views, batch);
  TPATTN_CHECK(out != nullptr, call, "out", "non-null", "null");
  TPATTN_CHECK(workspace != nullptr, call, "workspace", "non-null (plan.workspace_floats() floats)",
               "null");
  const Index rows = shape.rows_per_token, width = shape.value_width;
  float* base = align_workspace(workspace);
  float* partials = base + plan.partial_offset();
  const WorkItem* items = plan.items().data();
  const Index item_count = static_cast<Index>(plan.items().size());

  std::atomic<Index> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  auto task = [&](Index t) {
    float* task_workspace = base + t * plan.task_stride();
    try {
      for (;;) {
        const Index k = next.fetch_add(1, std::memory_order_relaxed);
        if (k >= item_count || failed.load(std::memory_order_relaxed)) break;
        const WorkItem& item = items[k];
        const Index token = plan.token_offset(item.sequence) + item.query_first;
        KeyRange range;
        range.visible =
            plan.length(item.sequence) - plan.new_tokens(item.sequence) + 1 + item.query_first;
        range.window = shape.window;
        range.begin = item.key_begin;
        range.end = item.key_end;
        if (item.partial < 0) {
          attend(token, item.query_count, views[item.sequence], range, out + token * rows * width,
                 lse == nullptr ? nullptr : lse + token * rows, task_workspace);
        } else {
          float* slot = partials + item.partial;
          attend(token, item.query_count, views[item.sequence], range, slot,
                 slot + item.query_count * rows * width, task_workspace);
        }
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  run_tasks(plan.tasks() > 1 ? executor : nullptr, plan.tasks(), TaskRef(task));
  if (error) std::rethrow_exception(error);

  // Each split chunk: fold slots 1.. into slot 0, then copy slot 0 to the output.
  for (const SplitChunk& chunk : plan.split_chunks()) {
    const Index chunk_rows = chunk.query_count * rows;
    const Index slot_floats = plan.slot_floats(chunk.query_count);
    float* first_out = partials + chunk.partial;
    float* first_lse = first_out + chunk_rows * width;
    for (Index s = 1; s < chunk.splits; ++s) {
      const float* other_out = first_out + s * slot_floats;
      const float* other_lse = other_out + chunk_rows * width;
      for (Index r = 0; r < chunk_rows; ++r)
        merge_partial(first_out + r * width, first_lse + r, other_out + r * width, other_lse[r],
                      width);
    }
    const Index token = plan.token_offset(chunk.sequence) + chunk.query_first;
    std::memcpy(out + token * rows * width, first_out,
                static_cast<std::size_t>(chunk_rows * width) * sizeof(float));
    if (lse != nullptr)
      std::memcpy(lse + token * rows, first_lse,
                  static_cast<std::size_t>(chunk_rows) * sizeof(float));
  }
}

}  // namespace tpattn
