// tpattn/cache/paged_cache.hpp -- a pool of fixed-size pages shared by all sequences.
//
// Memory: page_count x page_tokens x bytes_per_token, allocated once at construction. Each
// sequence holds ceil(length / page_tokens) pages in its page table; truncate and remove return
// pages to the pool. bytes_used() counts tokens exactly; bytes_in_pages() adds the rounding of
// each sequence's last, partly filled page.
#pragma once

#include "tpattn/cache/block_store.hpp"

namespace tpattn {

class PagedKvCache final : public KvCache {
 public:
  // page_tokens >= 1 tokens per page, page_count >= 1 pages, max_sequences >= 1.
  // max_tokens_per_sequence (0 = no cap but the pool) caps one sequence's length exactly; each
  // sequence's page table is reserved for that many tokens when it is added, so appends never
  // allocate.
  PagedKvCache(CacheRecord record, Index page_tokens, Index page_count, Index max_sequences,
               Index max_tokens_per_sequence = 0)
      : KvCache(checked(std::move(record), page_tokens, page_count, max_sequences,
                        max_tokens_per_sequence)),
        store_("PagedKvCache", this->record(), page_tokens, page_count, max_sequences,
               pages_per_sequence(page_tokens, page_count, max_tokens_per_sequence),
               max_tokens_per_sequence == 0 ? std::numeric_limits<Index>::max()
                                            : max_tokens_per_sequence) {}

  Index page_tokens() const { return store_.block_tokens(); }
  Index page_count() const { return store_.block_count(); }
  Index free_page_count() const { return store_.free_block_count(); }
  Index page_bytes() const { return store_.block_bytes(); }

  SequenceId add_sequence() override { return store_.add_sequence("PagedKvCache::add_sequence"); }
  void remove_sequence(SequenceId seq) override {
    store_.check_sequence("PagedKvCache::remove_sequence", seq);
    store_.remove_sequence(seq);
  }
  bool contains(SequenceId seq) const override { return store_.contains(seq); }
  Index sequence_count() const override { return store_.sequence_count(); }
  Index max_sequences() const override { return store_.max_sequences(); }

  Index length(SequenceId seq) const override {
    store_.check_sequence("PagedKvCache::length", seq);
    return store_.length(seq);
  }

  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    static constexpr const char* call = "PagedKvCache::append";
    store_.check_sequence(call, seq);
    detail::check_append(call, record(), n_tokens, planes, plane_count);
    TPATTN_CHECK(n_tokens <= store_.tokens_available(seq), call, "n_tokens",
                 "<= " + detail::to_text(store_.tokens_available(seq)) +
                     " (room in the sequence's last page plus the free pages it may take: " +
                     detail::to_text(free_page_count()) + " free pages of " +
                     detail::to_text(page_tokens()) + " tokens)",
                 n_tokens);
    store_.append(record(), seq, n_tokens, planes);
  }
  using KvCache::append;

  void truncate(SequenceId seq, Index new_length) override {
    static constexpr const char* call = "PagedKvCache::truncate";
    store_.check_sequence(call, seq);
    TPATTN_CHECK(new_length >= 0 && new_length <= store_.length(seq), call, "new_length",
                 "in [0, " + detail::to_text(store_.length(seq)) + "]", new_length);
    store_.shrink(seq, new_length);
  }

  Index tokens_available(SequenceId seq) const override {
    store_.check_sequence("PagedKvCache::tokens_available", seq);
    return store_.tokens_available(seq);
  }

  SequenceView view(SequenceId seq) const override {
    store_.check_sequence("PagedKvCache::view", seq);
    return store_.view(record(), seq);
  }

  Index bytes_used() const override { return store_.tokens_held() * bytes_per_token(); }
  Index bytes_reserved() const override { return page_count() * page_bytes(); }
  // Pages held by sequences x page_bytes(): bytes_used() plus the unfilled tail of last pages.
  Index bytes_in_pages() const { return (page_count() - free_page_count()) * page_bytes(); }

 private:
  static CacheRecord checked(CacheRecord record, Index page_tokens, Index page_count,
                             Index max_sequences, Index max_tokens_per_sequence) {
    TPATTN_CHECK(page_tokens >= 1, "PagedKvCache", "page_tokens", ">= 1", page_tokens);
    TPATTN_CHECK(page_count >= 1, "PagedKvCache", "page_count", ">= 1", page_count);
    TPATTN_CHECK(max_sequences >= 1, "PagedKvCache", "max_sequences", ">= 1", max_sequences);
    TPATTN_CHECK(max_tokens_per_sequence >= 0, "PagedKvCache", "max_tokens_per_sequence",
                 ">= 0 (0 = the whole pool)", max_tokens_per_sequence);
    return record;
  }

  // Page-table entries a sequence may need: the whole pool, or enough for its token cap.
  static Index pages_per_sequence(Index page_tokens, Index page_count, Index max_tokens) {
    if (max_tokens == 0) return page_count;
    return std::min(page_count, max_tokens / page_tokens + (max_tokens % page_tokens != 0));
  }

  detail::BlockStore store_;
};

}  // namespace tpattn
