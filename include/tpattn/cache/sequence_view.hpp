// tpattn/cache/sequence_view.hpp -- how kernels see the tokens of one cached sequence.
//
// Kernels never see the storage policy, only this view: the sequence's tokens in blocks of
// block_tokens() tokens (a page of a paged cache, the whole region of a contiguous one). Within
// block b, plane p is a row-major array [tokens_in_block(b), rows * cols] in the plane's storage
// type: token t of the block starts at plane_block<T>(p, b) + t * elements_per_token(p).
// A view is cheap to copy, owns nothing, and is valid until the sequence is next changed.
#pragma once

#include <cstddef>

#include "tpattn/cache/record.hpp"

namespace tpattn {

class SequenceView {
 public:
  SequenceView() = default;

  // blocks: [block_count()] base addresses; plane_offsets: [record.plane_count()] byte offsets of
  // each plane inside a block. Both arrays are owned by the cache.
  SequenceView(const CacheRecord* record, const std::byte* const* blocks,
               const Index* plane_offsets, Index block_tokens, Index length)
      : record_(record),
        blocks_(blocks),
        plane_offsets_(plane_offsets),
        block_tokens_(block_tokens),
        length_(length) {}

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
  const CacheRecord* record_ = nullptr;
  const std::byte* const* blocks_ = nullptr;
  const Index* plane_offsets_ = nullptr;
  Index block_tokens_ = 1;
  Index length_ = 0;
};

}  // namespace tpattn
