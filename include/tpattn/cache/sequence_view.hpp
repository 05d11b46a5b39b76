// tpattn/cache/sequence_view.hpp -- how kernels see the tokens of one cached sequence.
//
// Kernels never see the storage policy, only this view: the sequence's tokens in blocks of
// block_tokens() tokens (a page of a paged cache, the whole region of a contiguous one). Within
// block b, plane p is a row-major array [tokens_in_block(b), rows * cols] in the plane's storage
// type: token t of the block starts at plane_block<T>(p, b) + t * elements_per_token(p).
//
// Where block b of plane p lives is the cache's business. tpattn's caches keep every plane of a
// block together: one block table shared by all planes, each plane at its own byte offset inside
// a block. An engine that keeps each plane in a pool of its own (K pages and V pages apart, as
// vLLM and FlashInfer do) gives one PlaneTable per plane instead: that plane's block addresses,
// in its own order, and its offset inside each of them.
//
// A view is cheap to copy, owns nothing (the tables are the cache's), and is valid until the
// sequence is next changed.
#pragma once

#include <cstddef>
#include <string>

#include "tpattn/cache/record.hpp"

namespace tpattn {

// One plane's blocks, for a cache that keeps each plane in its own pool: block b of the plane
// starts at blocks[b] + offset. blocks: [block_count()] base addresses, owned by the cache.
struct PlaneTable {
  const std::byte* const* blocks = nullptr;
  Index offset = 0;  // bytes from a block's base address to the plane's first row
};

class SequenceView {
 public:
  SequenceView() = default;

  // One block table shared by every plane. blocks: [block_count()] base addresses;
  // plane_offsets: [record->plane_count()] byte offsets of each plane inside a block. Both
  // arrays are owned by the cache; they may be null for an empty sequence (length 0).
  SequenceView(const CacheRecord* record, const std::byte* const* blocks,
               const Index* plane_offsets, Index block_tokens, Index length)
      : record_(record),
        blocks_(blocks),
        plane_offsets_(plane_offsets),
        block_tokens_(block_tokens),
        length_(length) {
    check_sizes(record, block_tokens, length);
    TPATTN_CHECK(length == 0 || (blocks != nullptr && plane_offsets != nullptr), "SequenceView",
                 "blocks, plane_offsets",
                 "non-null for a sequence of " + detail::to_text(length) + " tokens", "null");
  }

  // One block table per plane. planes: [record->plane_count()] tables, plane p's block b at
  // planes[p].blocks[b] + planes[p].offset. The array and the block arrays are owned by the
  // cache; they may be null for an empty sequence (length 0).
  SequenceView(const CacheRecord* record, const PlaneTable* planes, Index block_tokens,
               Index length)
      : record_(record), planes_(planes), block_tokens_(block_tokens), length_(length) {
    check_sizes(record, block_tokens, length);
    if (length == 0) return;
    TPATTN_CHECK(planes != nullptr, "SequenceView", "planes",
                 "one table per plane for a sequence of " + detail::to_text(length) + " tokens",
                 "null");
    for (Index p = 0; p < record->plane_count(); ++p)
      TPATTN_CHECK(planes[p].blocks != nullptr, "SequenceView",
                   ("planes[" + detail::to_text(p) + "].blocks").c_str(),
                   "the block addresses of plane '" + record->plane(p).name + "'", "null");
  }

  // False for a default-constructed view, which belongs to no cache.
  bool valid() const { return record_ != nullptr; }
  const CacheRecord& record() const { return *record_; }
  Index length() const { return length_; }
  Index block_tokens() const { return block_tokens_; }
  Index block_count() const { return (length_ + block_tokens_ - 1) / block_tokens_; }
  Index tokens_in_block(Index b) const {
    const Index rest = length_ - b * block_tokens_;
    return rest < block_tokens_ ? rest : block_tokens_;
  }
  Index elements_per_token(Index plane) const { return record_->plane(plane).elements_per_token(); }

  // Rows of plane `plane` in block `b`. T must be the plane's storage type.
  template <class T>
  const T* plane_block(Index plane, Index b) const {
    TPATTN_ASSERT(storage_type_of<T> == record_->plane(plane).storage);
    TPATTN_ASSERT(b >= 0 && b < block_count());
    if (planes_ != nullptr) {
      const PlaneTable& table = planes_[plane];
      return reinterpret_cast<const T*>(table.blocks[b] + table.offset);
    }
    return reinterpret_cast<const T*>(blocks_[b] + plane_offsets_[plane]);
  }

  // The same sequence cut to its first `length` tokens (causal attention of earlier queries).
  SequenceView prefix(Index length) const {
    TPATTN_CHECK(length >= 0 && length <= length_, "SequenceView::prefix", "length",
                 "in [0, " + detail::to_text(length_) + "]", length);
    SequenceView cut = *this;
    cut.length_ = length;
    return cut;
  }

 private:
  static void check_sizes(const CacheRecord* record, Index block_tokens, Index length) {
    TPATTN_CHECK(record != nullptr, "SequenceView", "record", "the cache's record", "null");
    TPATTN_CHECK(block_tokens >= 1, "SequenceView", "block_tokens", ">= 1", block_tokens);
    TPATTN_CHECK(length >= 0, "SequenceView", "length", ">= 0", length);
  }

  const CacheRecord* record_ = nullptr;
  const PlaneTable* planes_ = nullptr;        // one table per plane, or null: blocks_ for all
  const std::byte* const* blocks_ = nullptr;  // the table shared by every plane
  const Index* plane_offsets_ = nullptr;      // [plane_count] offsets into blocks_'s blocks
  Index block_tokens_ = 1;
  Index length_ = 0;
};

}  // namespace tpattn
