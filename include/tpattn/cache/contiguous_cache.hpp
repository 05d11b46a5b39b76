// tpattn/cache/contiguous_cache.hpp -- one preallocated region per sequence.
//
// Memory: max_sequences x max_tokens x bytes_per_token, allocated once at construction.
// A sequence's view is a single block of max_tokens tokens.
#pragma once

#include "tpattn/cache/block_store.hpp"

namespace tpattn {

class ContiguousKvCache final : public KvCache {
 public:
  // max_sequences >= 1 regions of max_tokens >= 1 tokens each.
  ContiguousKvCache(CacheRecord record, Index max_sequences, Index max_tokens)
      : KvCache(checked(std::move(record), max_sequences, max_tokens)),
        store_("ContiguousKvCache", this->record(), max_tokens, max_sequences, max_sequences, 1,
               max_tokens) {}

  Index max_tokens() const { return store_.block_tokens(); }

  SequenceId add_sequence() override { return store_.add_sequence("ContiguousKvCache::add_sequence"); }
  void remove_sequence(SequenceId seq) override {
    store_.check_sequence("ContiguousKvCache::remove_sequence", seq);
    store_.remove_sequence(seq);
  }
  bool contains(SequenceId seq) const override { return store_.contains(seq); }
  Index sequence_count() const override { return store_.sequence_count(); }
  Index max_sequences() const override { return store_.max_sequences(); }

  Index length(SequenceId seq) const override {
    store_.check_sequence("ContiguousKvCache::length", seq);
    return store_.length(seq);
  }

  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    static constexpr const char* call = "ContiguousKvCache::append";
    store_.check_sequence(call, seq);
    detail::check_append(call, record(), n_tokens, planes, plane_count);
    TPATTN_CHECK(n_tokens <= store_.tokens_available(seq), call, "n_tokens",
                 "<= " + detail::to_text(store_.tokens_available(seq)) +
                     " (room left in the sequence's region of " +
                     detail::to_text(max_tokens()) + " tokens)",
                 n_tokens);
    store_.append(record(), seq, n_tokens, planes);
  }
  using KvCache::append;

  void truncate(SequenceId seq, Index new_length) override {
    static constexpr const char* call = "ContiguousKvCache::truncate";
    store_.check_sequence(call, seq);
    TPATTN_CHECK(new_length >= 0 && new_length <= store_.length(seq), call, "new_length",
                 "in [0, " + detail::to_text(store_.length(seq)) + "]", new_length);
    store_.shrink(seq, new_length);
  }

  Index tokens_available(SequenceId seq) const override {
    store_.check_sequence("ContiguousKvCache::tokens_available", seq);
    return store_.tokens_available(seq);
  }

  SequenceView view(SequenceId seq) const override {
    store_.check_sequence("ContiguousKvCache::view", seq);
    return store_.view(record(), seq);
  }

  Index bytes_used() const override { return store_.tokens_held() * bytes_per_token(); }
  Index bytes_reserved() const override { return store_.block_count() * store_.block_bytes(); }

 private:
  static CacheRecord checked(CacheRecord record, Index max_sequences, Index max_tokens) {
    TPATTN_CHECK(max_sequences >= 1, "ContiguousKvCache", "max_sequences", ">= 1", max_sequences);
    TPATTN_CHECK(max_tokens >= 1, "ContiguousKvCache", "max_tokens", ">= 1", max_tokens);
    return record;
  }

  detail::BlockStore store_;
};

}  // namespace tpattn
