// tpattn/cache/contiguous_cache.hpp -- one preallocated region per sequence.
//
// Memory: max_sequences x max_tokens x bytes_per_token, allocated once at construction.
// A sequence's view is a single block of max_tokens tokens. footprint() gives the bytes a cache
// of given sizes would reserve, without building it.
//
// Built from a ModelRecord of L layers, a sequence's region holds max_tokens tokens of every
// layer; layer(l) is layer l's cache (block_cache.hpp).
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
                           checked(std::move(record), max_sequences, max_tokens),
                           geometry(max_sequences, max_tokens)) {}
  // A model's cache: each region holds max_tokens tokens of each of model.layer_count() layers,
  // and layer(l) is layer l's cache.
  ContiguousKvCache(ModelRecord model, Index max_sequences, Index max_tokens)
      : detail::BlockCache("ContiguousKvCache",
                           checked(std::move(model), max_sequences, max_tokens),
                           geometry(max_sequences, max_tokens)) {}

  // What the cache built with these arguments would reserve, without building it or allocating
  // anything: {bytes_reserved(), table_bytes()} of that cache, in bytes. Same checks and errors
  // as the constructor; a size whose byte count overflows an Index throws instead of wrapping.
  static CacheFootprint footprint(const CacheRecord& record, Index max_sequences,
                                  Index max_tokens) {
    check_sizes(max_sequences, max_tokens);
    return footprint_of("ContiguousKvCache", record, geometry(max_sequences, max_tokens));
  }
  // What the model's cache built with these arguments would reserve, as above.
  static CacheFootprint footprint(const ModelRecord& model, Index max_sequences, Index max_tokens) {
    check_sizes(max_sequences, max_tokens);
    return footprint_of("ContiguousKvCache", model.combined(), geometry(max_sequences, max_tokens),
                        model.layer_count());
  }

  Index max_tokens() const { return store().block_tokens(); }

 private:
  std::string describe_room(SequenceId, Index) const override {
    return "room left in the sequence's region of " + detail::to_text(max_tokens()) + " tokens";
  }

  static void check_sizes(Index max_sequences, Index max_tokens) {
    TPATTN_CHECK(max_sequences >= 1, "ContiguousKvCache", "max_sequences", ">= 1", max_sequences);
    TPATTN_CHECK(max_tokens >= 1, "ContiguousKvCache", "max_tokens", ">= 1", max_tokens);
  }
  template <class Record>  // CacheRecord or ModelRecord
  static Record checked(Record record, Index max_sequences, Index max_tokens) {
    check_sizes(max_sequences, max_tokens);
    return record;
  }

  // One block of max_tokens per sequence slot, so a table of one entry each.
  static detail::BlockGeometry geometry(Index max_sequences, Index max_tokens) {
    return {max_tokens, max_sequences, max_sequences, 1, max_tokens, "max_sequences"};
  }
};

}  // namespace tpattn
