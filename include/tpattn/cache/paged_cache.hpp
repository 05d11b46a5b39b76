// tpattn/cache/paged_cache.hpp -- a pool of fixed-size pages shared by all sequences.
//
// Memory: page_count x page_tokens x bytes_per_token, allocated once at construction. Each
// sequence holds ceil(length / page_tokens) pages in its page table; truncate and remove return
// pages to the pool. bytes_used() counts tokens exactly; bytes_in_pages() adds the rounding of
// each sequence's last, partly filled page. footprint() gives the bytes a cache of given sizes
// would reserve, without building it.
//
// Built from a ModelRecord of L layers, a page holds page_tokens tokens of every layer, and one
// page table per sequence serves them all; layer(l) is layer l's cache (block_cache.hpp).
#pragma once

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "tpattn/cache/block_cache.hpp"

namespace tpattn {

class PagedKvCache final : public detail::BlockCache {
 public:
  // page_tokens >= 1 tokens per page, page_count >= 1 pages, max_sequences >= 1.
  // max_tokens_per_sequence (0 = no cap but the pool) caps one sequence's length exactly and
  // sizes each slot's page table: min(page_count, ceil(max_tokens_per_sequence / page_tokens))
  // entries, or page_count without a cap (table_bytes() = max_sequences x that x 8 bytes,
  // allocated here).
  PagedKvCache(CacheRecord record, Index page_tokens, Index page_count, Index max_sequences,
               Index max_tokens_per_sequence = 0)
      : detail::BlockCache(
            "PagedKvCache",
            checked(std::move(record), page_tokens, page_count, max_sequences,
                    max_tokens_per_sequence),
            geometry(page_tokens, page_count, max_sequences, max_tokens_per_sequence)) {}

  // A model's cache: every page holds page_tokens tokens of each of model.layer_count() layers
  // (page_bytes() is the sum of the layers' shares), and layer(l) is layer l's cache. The other
  // arguments as above; max_tokens_per_sequence caps each layer.
  PagedKvCache(ModelRecord model, Index page_tokens, Index page_count, Index max_sequences,
               Index max_tokens_per_sequence = 0)
      : detail::BlockCache(
            "PagedKvCache",
            checked(std::move(model), page_tokens, page_count, max_sequences,
                    max_tokens_per_sequence),
            geometry(page_tokens, page_count, max_sequences, max_tokens_per_sequence)) {}

  // What the cache built with these arguments would reserve, without building it or allocating
  // anything: {bytes_reserved(), table_bytes()} of that cache, in bytes. Same checks and errors
  // as the constructor; a size whose byte count overflows an Index throws instead of wrapping.
  // For sizing a pool to a memory budget (docs/cache.md).
  static CacheFootprint footprint(const CacheRecord& record, Index page_tokens, Index page_count,
                                  Index max_sequences, Index max_tokens_per_sequence = 0) {
    check_sizes(page_tokens, page_count, max_sequences, max_tokens_per_sequence);
    return footprint_of("PagedKvCache", record,
                        geometry(page_tokens, page_count, max_sequences, max_tokens_per_sequence));
  }
  // What the model's cache built with these arguments would reserve, as above.
  static CacheFootprint footprint(const ModelRecord& model, Index page_tokens, Index page_count,
                                  Index max_sequences, Index max_tokens_per_sequence = 0) {
    check_sizes(page_tokens, page_count, max_sequences, max_tokens_per_sequence);
    return footprint_of("PagedKvCache", model.combined(),
                        geometry(page_tokens, page_count, max_sequences, max_tokens_per_sequence),
                        model.layer_count());
  }

  Index page_tokens() const { return store().block_tokens(); }
  Index page_count() const { return store().block_count(); }
  Index free_page_count() const { return store().free_block_count(); }
  Index page_bytes() const { return store().block_bytes(); }
  // Pages held by sequences x page_bytes(): bytes_used() plus the unfilled tail of last pages.
  Index bytes_in_pages() const { return (page_count() - free_page_count()) * page_bytes(); }

 private:
  std::string describe_room(SequenceId seq, Index layer) const override {
    const Index cap = store().max_tokens_per_sequence();
    const Index length = layer == kEveryLayer ? store().furthest(seq) : store().length(seq, layer);
    if (length + store().tokens_available(seq, layer) == cap)
      return "max_tokens_per_sequence = " + detail::to_text(cap) + " caps the sequence";
    // A layer behind the others also has the room its sequence's pages hold past its tokens.
    const char* held = layer_count() == 1 ? "room in the sequence's last page"
                                          : "room in the sequence's pages past the layer's tokens";
    return std::string(held) +
           " plus the free pages it may take: " + detail::to_text(free_page_count()) +
           " free pages of " + detail::to_text(page_tokens()) + " tokens";
  }

  static void check_sizes(Index page_tokens, Index page_count, Index max_sequences,
                          Index max_tokens_per_sequence) {
    TPATTN_CHECK(page_tokens >= 1, "PagedKvCache", "page_tokens", ">= 1", page_tokens);
    TPATTN_CHECK(page_count >= 1, "PagedKvCache", "page_count", ">= 1", page_count);
    TPATTN_CHECK(max_sequences >= 1, "PagedKvCache", "max_sequences", ">= 1", max_sequences);
    TPATTN_CHECK(max_tokens_per_sequence >= 0, "PagedKvCache", "max_tokens_per_sequence",
                 ">= 0 (0 = the whole pool)", max_tokens_per_sequence);
  }
  template <class Record>  // CacheRecord or ModelRecord
  static Record checked(Record record, Index page_tokens, Index page_count, Index max_sequences,
                        Index max_tokens_per_sequence) {
    check_sizes(page_tokens, page_count, max_sequences, max_tokens_per_sequence);
    return record;
  }

  // The store's geometry: pages as blocks, page tables of pages_per_sequence entries, the cap or
  // none. Safe for any arguments, like pages_per_sequence().
  static detail::BlockGeometry geometry(Index page_tokens, Index page_count, Index max_sequences,
                                        Index max_tokens_per_sequence) {
    return {
        page_tokens,
        page_count,
        max_sequences,
        pages_per_sequence(page_tokens, page_count, max_tokens_per_sequence),
        max_tokens_per_sequence == 0 ? std::numeric_limits<Index>::max() : max_tokens_per_sequence,
        "page_count"};
  }

  // Page-table entries a sequence may need: the whole pool, or enough for its token cap. Safe
  // for any arguments, since it may be evaluated before checked() throws on bad ones.
  static Index pages_per_sequence(Index page_tokens, Index page_count, Index max_tokens) {
    if (max_tokens <= 0 || page_tokens <= 0) return page_count;
    return std::min(page_count, max_tokens / page_tokens + (max_tokens % page_tokens != 0));
  }
};

}  // namespace tpattn
