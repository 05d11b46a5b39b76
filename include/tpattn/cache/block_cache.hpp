// tpattn/cache/block_cache.hpp -- the KvCache interface over a BlockStore, shared by both
// storages: argument checks that leave the cache as it was, then the store's operation.
// ContiguousKvCache and PagedKvCache only choose the block geometry and describe their room.
#pragma once

#include <string>
#include <utility>

#include "tpattn/cache/block_store.hpp"

namespace tpattn {

// The bytes a cache of given sizes would reserve, from a cache's static footprint(): what
// bytes_reserved() and table_bytes() of the cache built with those sizes return. Worked out
// without allocating, so a pool can be sized to a memory budget before it is built.
struct CacheFootprint {
  Index bytes_reserved = 0;  // token memory: the pool of blocks, padding included
  Index table_bytes = 0;     // the block tables, 8 bytes per entry

  // bytes_reserved + table_bytes; throws tpattn::Error if the sum overflows an Index.
  Index total() const {
    return detail::checked_add("CacheFootprint::total", bytes_reserved, table_bytes);
  }
};

namespace detail {

class BlockCache : public KvCache {
 public:
  SequenceId add_sequence() override { return store_.add_sequence(calls_.add_sequence.c_str()); }
  void remove_sequence(SequenceId seq) override {
    store_.check_sequence(calls_.remove_sequence.c_str(), seq);
    store_.remove_sequence(seq);
  }
  bool contains(SequenceId seq) const override { return store_.contains(seq); }
  Index sequence_count() const override { return store_.sequence_count(); }
  Index max_sequences() const override { return store_.max_sequences(); }

  Index length(SequenceId seq) const override {
    store_.check_sequence(calls_.length.c_str(), seq);
    return store_.length(seq);
  }

  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    const char* call = calls_.append.c_str();
    store_.check_sequence(call, seq);
    check_append(call, record(), n_tokens, planes, plane_count);
    TPATTN_CHECK(n_tokens <= store_.tokens_available(seq), call, "n_tokens",
                 "<= " + to_text(store_.tokens_available(seq)) + " (" + describe_room(seq) + ")",
                 n_tokens);
    store_.append(record(), seq, n_tokens, planes);
  }
  using KvCache::append;

  void truncate(SequenceId seq, Index new_length) override {
    const char* call = calls_.truncate.c_str();
    store_.check_sequence(call, seq);
    TPATTN_CHECK(new_length >= 0 && new_length <= store_.length(seq), call, "new_length",
                 "in [0, " + to_text(store_.length(seq)) + "]", new_length);
    store_.shrink(seq, new_length);
  }

  Index tokens_available(SequenceId seq) const override {
    store_.check_sequence(calls_.tokens_available.c_str(), seq);
    return store_.tokens_available(seq);
  }

  SequenceView view(SequenceId seq) const override {
    store_.check_sequence(calls_.view.c_str(), seq);
    return store_.view(record(), seq);
  }

  Index bytes_used() const override { return store_.tokens_held() * bytes_per_token(); }
  Index bytes_reserved() const override { return store_.block_count() * store_.block_bytes(); }
  // The block tables, outside bytes_reserved(): one address per block a sequence may hold, for
  // every sequence slot, allocated at construction.
  Index table_bytes() const { return store_.table_bytes(); }

 protected:
  // name: the storage's class name, for errors. The rest as BlockStore's constructor.
  // The store comes first: its plan checks every size before this cache allocates anything.
  BlockCache(const char* name, CacheRecord record, const BlockGeometry& geometry)
      : KvCache(std::move(record)), store_(name, this->record(), geometry), calls_(name) {}

  // What the constructor with these arguments would reserve, from the same BlockStore::plan and
  // with the same errors, allocating nothing. The storage checks its own sizes first.
  static CacheFootprint footprint_of(const char* name, const CacheRecord& record,
                                     const BlockGeometry& geometry) {
    const BlockStore::Sizes sizes = BlockStore::plan(name, record, geometry);
    return {sizes.pool_bytes, sizes.table_bytes};
  }

  // Where the room of `seq` comes from, for the message of an append that does not fit.
  virtual std::string describe_room(SequenceId seq) const = 0;

  const BlockStore& store() const { return store_; }

 private:
  // Built once, so a check on the happy path never builds a string.
  struct CallNames {
    explicit CallNames(const std::string& name)
        : add_sequence(name + "::add_sequence"),
          remove_sequence(name + "::remove_sequence"),
          length(name + "::length"),
          append(name + "::append"),
          truncate(name + "::truncate"),
          tokens_available(name + "::tokens_available"),
          view(name + "::view") {}
    std::string add_sequence, remove_sequence, length, append, truncate, tokens_available, view;
  };

  BlockStore store_;  // before calls_: see the constructor
  CallNames calls_;
};

}  // namespace detail
}  // namespace tpattn
