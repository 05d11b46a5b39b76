// tpattn/cache/contiguous_cache.hpp -- one preallocated region per sequence.
//
// Memory: max_sequences x max_tokens x bytes_per_token, allocated once at construction.
// A sequence's view is a single block of max_tokens tokens.
#pragma once

#include <string>
#include <utility>

#include "tpattn/cache/block_cache.hpp"

namespace tpattn {

class ContiguousKvCache final : public detail::BlockCache {
 public:
  // max_sequences >= 1 regions of max_tokens >= 1 tokens each.
  ContiguousKvCache(CacheRecord record, Index max_sequences, Index max_tokens)
      : detail::BlockCache("ContiguousKvCache",
                           checked(std::move(record), max_sequences, max_tokens), max_tokens,
                           max_sequences, max_sequences, 1, max_tokens) {}

  Index max_tokens() const { return store().block_tokens(); }

 private:
  std::string describe_room(SequenceId) const override {
    return "room left in the sequence's region of " + detail::to_text(max_tokens()) + " tokens";
  }

  static CacheRecord checked(CacheRecord record, Index max_sequences, Index max_tokens) {
    TPATTN_CHECK(max_sequences >= 1, "ContiguousKvCache", "max_sequences", ">= 1", max_sequences);
    TPATTN_CHECK(max_tokens >= 1, "ContiguousKvCache", "max_tokens", ">= 1", max_tokens);
    return record;
  }
};

}  // namespace tpattn
