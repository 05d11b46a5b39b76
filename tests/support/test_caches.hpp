// tests/support/test_caches.hpp -- the two library caches a test runs a layer or kernel on.
//
//   for (CacheKind kind : kAllCacheKinds) {
//     SCOPED_TRACE(name_of(kind));
//     auto cache = make_cache(op.cache_record(), kind, sequences, tokens);  // pages of kPageTokens
//     ...
//   }
//
// make_cache() sizes a cache so that each of `sequences` sequences can hold `tokens` tokens at
// once, exactly: a ContiguousKvCache of `sequences` regions of `tokens`, or a PagedKvCache of
// ceil(tokens / page_tokens) pages per sequence in one pool shared by all of them. name_of() (and
// operator<<, for gtest's messages) give "Contiguous" / "Paged", which parameterised tests put in
// their names.
#pragma once

#include <memory>
#include <ostream>

#include "tpattn/cache/contiguous_cache.hpp"
#include "tpattn/cache/paged_cache.hpp"

namespace tpattn::test {

enum class CacheKind { contiguous, paged };

inline constexpr CacheKind kAllCacheKinds[] = {CacheKind::contiguous, CacheKind::paged};

inline const char* name_of(CacheKind kind) {
  return kind == CacheKind::contiguous ? "Contiguous" : "Paged";
}

inline std::ostream& operator<<(std::ostream& out, CacheKind kind) { return out << name_of(kind); }

// The tests' usual page: make_cache's unless told otherwise.
inline constexpr Index kPageTokens = 16;

// Room for `sequences` sequences of `tokens` tokens each (page_tokens is unused when contiguous).
inline std::unique_ptr<KvCache> make_cache(const CacheRecord& record, CacheKind kind,
                                           Index sequences, Index tokens,
                                           Index page_tokens = kPageTokens) {
  if (kind == CacheKind::contiguous)
    return std::make_unique<ContiguousKvCache>(record, sequences, tokens);
  const Index pages = sequences * ((tokens + page_tokens - 1) / page_tokens);
  return std::make_unique<PagedKvCache>(record, page_tokens, pages, sequences);
}

}  // namespace tpattn::test
