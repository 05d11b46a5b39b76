// tpattn/cache/kv_cache.hpp -- the KV-cache interface every operator shares.
//
// A cache holds many sequences of tokens, each token one CacheRecord (a set of named planes).
// Two storages implement it (contiguous_cache.hpp, paged_cache.hpp); an engine may implement it
// too and run tests/cache_conformance.hpp against its own cache.
//
// Guarantees of every implementation:
//  - every misuse throws tpattn::Error naming the call, the argument, expected and actual, and
//    leaves the cache exactly as it was;
//  - append(), length(), view() and truncate() allocate nothing once the cache is built;
//  - bytes_used() == (tokens held) x bytes_per_token(), exactly (a model's cache, whose layers
//    may hold different lengths during a forward pass, sums this over its layers:
//    block_cache.hpp).
#pragma once

#include <cstddef>
#include <initializer_list>

#include "tpattn/cache/record.hpp"
#include "tpattn/cache/sequence_view.hpp"

namespace tpattn {

using SequenceId = Index;

// One plane's new rows for append(): data is [n_tokens, rows, cols], row-major, contiguous fp32.
// rows and cols must equal the record's; they are passed so a mismatch is caught, not guessed.
struct PlaneInput {
  const float* data = nullptr;
  Index rows = 0;
  Index cols = 0;
};

class KvCache {
 public:
  virtual ~KvCache() = default;

  const CacheRecord& record() const { return record_; }
  Index bytes_per_token() const { return record_.bytes_per_token(); }

  // A new, empty sequence. Throws when the cache holds max_sequences() already.
  virtual SequenceId add_sequence() = 0;
  // Drops a sequence; its memory returns to the cache for reuse.
  virtual void remove_sequence(SequenceId seq) = 0;
  virtual bool contains(SequenceId seq) const = 0;
  virtual Index sequence_count() const = 0;
  virtual Index max_sequences() const = 0;

  virtual Index length(SequenceId seq) const = 0;
  // Appends n_tokens >= 1 tokens to `seq`, all planes at once (planes in record order).
  virtual void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
                      Index plane_count) = 0;
  void append(SequenceId seq, Index n_tokens, std::initializer_list<PlaneInput> planes) {
    append(seq, n_tokens, planes.begin(), static_cast<Index>(planes.size()));
  }
  // Cuts `seq` to its first new_length tokens (0 <= new_length <= length), e.g. to roll back
  // rejected speculative tokens.
  virtual void truncate(SequenceId seq, Index new_length) = 0;
  // Tokens that can still be appended to `seq` if nothing else is appended first.
  virtual Index tokens_available(SequenceId seq) const = 0;

  virtual SequenceView view(SequenceId seq) const = 0;

  // Tokens held by all sequences x bytes_per_token(): exactly the spec's per-token formula.
  virtual Index bytes_used() const = 0;
  // Token memory the cache holds in total, used or not.
  virtual Index bytes_reserved() const = 0;

 protected:
  explicit KvCache(CacheRecord record) : record_(std::move(record)) {}
  KvCache(const KvCache&) = default;
  KvCache& operator=(const KvCache&) = default;

 private:
  CacheRecord record_;
};

}  // namespace tpattn
