// bench/support/memory_budget.hpp -- how long a context, or how many sequences, the KV caches of
// a model of L layers fit in a memory budget, by the paged cache's own byte accounting
// (PagedKvCache::footprint: token pages and block tables), not by a formula of our own.
#pragma once

#include <algorithm>

#include "tpattn/tpattn.hpp"

namespace tpattn_bench {

using tpattn::Index;

struct BudgetModel {
  Index layers = 32;          // one paged cache per layer, as the operators are used today
  double budget_bytes = 0.0;  // for the caches of all layers together
  Index page_tokens = 16;
};

// Bytes the L layers' paged caches reserve for `sequences` sequences of `tokens` tokens each,
// with a pool of exactly the pages they need; `capped` sets max_tokens_per_sequence = tokens
// (smaller block tables).
inline double model_cache_bytes(const tpattn::CacheRecord& record, const BudgetModel& model,
                                Index sequences, Index tokens, bool capped) {
  const Index page = model.page_tokens;
  const Index pages = std::max<Index>(sequences * ((tokens + page - 1) / page), 1);
  const tpattn::CacheFootprint footprint =
      tpattn::PagedKvCache::footprint(record, page, pages, sequences, capped ? tokens : 0);
  return static_cast<double>(model.layers) * static_cast<double>(footprint.total());
}

// The largest n in [0, limit] with fits(n); fits must be true up to some n, then false.
template <class Fits>
Index largest_fitting(Index limit, Fits fits) {
  Index lo = 0, hi = limit;
  while (lo < hi) {
    const Index mid = lo + (hi - lo + 1) / 2;
    if (fits(mid))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// The longest context one sequence can hold in every layer within the budget.
inline Index longest_context(const tpattn::CacheRecord& record, const BudgetModel& model) {
  const double per_token = static_cast<double>(model.layers * record.bytes_per_token());
  return largest_fitting(static_cast<Index>(model.budget_bytes / per_token), [&](Index tokens) {
    return tokens == 0 || model_cache_bytes(record, model, 1, tokens, false) <= model.budget_bytes;
  });
}

// The most sequences of `context` tokens the budget holds in every layer.
inline Index largest_batch(const tpattn::CacheRecord& record, const BudgetModel& model,
                           Index context) {
  const double per_sequence =
      static_cast<double>(model.layers * record.bytes_per_token() * context);
  return largest_fitting(static_cast<Index>(model.budget_bytes / per_sequence), [&](Index batch) {
    return batch == 0 ||
           model_cache_bytes(record, model, batch, context, true) <= model.budget_bytes;
  });
}

}  // namespace tpattn_bench
