// tests/engine_cache.hpp -- an engine's own KvCache, laid out as vLLM and FlashInfer lay theirs:
// every plane in a pool of its own (K pages in one allocation, V pages in another), each pool
// with its own free list and its own block table per sequence. Its views are SequenceViews of
// PlaneTables, one per plane, so tpattn's kernels read the engine's memory where it is.
//
// Written as an engine would, from kv_cache.hpp's contract alone: it shares no code with
// tpattn's storages (no BlockStore, no detail:: checks), only TPATTN_CHECK for its errors and
// store_as for the conversion to the storage type.
//
// Layout, for plane p (bytes_per_token_p bytes per token):
//   pool_p: page_count pages of page_bytes_p = kHeaderBytes + page_tokens x bytes_per_token_p
//           (rounded up to 16), each page starting with kHeaderBytes of engine metadata (filled
//           with a marker, never read by tpattn), so the plane's rows start at a non-zero offset;
//   free_p: the pages of pool_p not in use. Each pool hands its pages out in its own order
//           (plane 0 from the front, plane 1 from the back, the others shuffled), so the blocks
//           of one sequence sit at different page numbers in different planes;
//   table_p[seq]: [page_count] page addresses, the sequence's blocks of plane p in order.
// A sequence's block b takes one page from every pool when it is first needed and gives them
// back when the sequence drops below it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "tpattn/cache/kv_cache.hpp"

namespace tpattn::test {

class SplitPoolCache final : public KvCache {
 public:
  static constexpr Index kHeaderBytes = 48;

  // page_tokens >= 1 tokens per page; page_count >= 1 pages in every plane's pool;
  // max_sequences >= 1.
  SplitPoolCache(CacheRecord record, Index page_tokens, Index page_count, Index max_sequences)
      : KvCache(checked(std::move(record), page_tokens, page_count, max_sequences)),
        page_tokens_(page_tokens),
        page_count_(page_count),
        sequences_(static_cast<std::size_t>(max_sequences)),
        planes_(static_cast<std::size_t>(this->record().plane_count())),
        tables_(static_cast<std::size_t>(max_sequences * this->record().plane_count())) {
    const Index plane_count = this->record().plane_count();
    for (Index p = 0; p < plane_count; ++p) {
      Pool& pool = planes_[static_cast<std::size_t>(p)];
      const Index rows = page_tokens * this->record().plane(p).bytes_per_token();
      pool.page_bytes = (kHeaderBytes + rows + 15) / 16 * 16;
      pool.memory.assign(static_cast<std::size_t>(page_count * pool.page_bytes), std::byte{0xEE});
      for (Index page = 0; page < page_count; ++page) pool.free.push_back(page);
      if (p == 0) std::reverse(pool.free.begin(), pool.free.end());  // pops 0, 1, 2, ...
      if (p >= 2) std::shuffle(pool.free.begin(), pool.free.end(), std::mt19937(unsigned(p)));
      pool.table.assign(static_cast<std::size_t>(max_sequences * page_count), nullptr);
      for (Index seq = 0; seq < max_sequences; ++seq)
        tables_[static_cast<std::size_t>(seq * plane_count + p)] = {
            pool.table.data() + seq * page_count, kHeaderBytes};
    }
    for (Index seq = max_sequences - 1; seq >= 0; --seq) free_slots_.push_back(seq);
  }

  SequenceId add_sequence() override {
    TPATTN_CHECK(!free_slots_.empty(), "SplitPoolCache::add_sequence", "sequence count",
                 "at most " + std::to_string(max_sequences()) + " live sequences",
                 max_sequences() + 1);
    const SequenceId seq = free_slots_.back();
    free_slots_.pop_back();
    sequences_[static_cast<std::size_t>(seq)] = {true, 0, 0};
    return seq;
  }
  void remove_sequence(SequenceId seq) override {
    check_live("SplitPoolCache::remove_sequence", seq);
    give_back(seq, 0);
    sequence(seq).live = false;
    free_slots_.push_back(seq);
  }
  bool contains(SequenceId seq) const override {
    return seq >= 0 && seq < max_sequences() && sequences_[static_cast<std::size_t>(seq)].live;
  }
  Index sequence_count() const override {
    return max_sequences() - static_cast<Index>(free_slots_.size());
  }
  Index max_sequences() const override { return static_cast<Index>(sequences_.size()); }

  Index length(SequenceId seq) const override {
    check_live("SplitPoolCache::length", seq);
    return sequence(seq).length;
  }

  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    const char* call = "SplitPoolCache::append";
    check_live(call, seq);
    check_input(call, n_tokens, planes, plane_count);
    TPATTN_CHECK(n_tokens <= room(seq), call, "n_tokens",
                 "<= " + std::to_string(room(seq)) + " (room in the last page plus " +
                     std::to_string(free_pages()) + " free pages of every pool)",
                 n_tokens);
    Sequence& s = sequence(seq);
    const Index length = s.length + n_tokens;
    for (; s.pages * page_tokens_ < length; ++s.pages)  // one new page from every pool
      for (Index p = 0; p < record().plane_count(); ++p) {
        Pool& pool = planes_[static_cast<std::size_t>(p)];
        table(pool, seq)[s.pages] = pool.memory.data() + pool.free.back() * pool.page_bytes;
        pool.free.pop_back();
      }
    for (Index t = 0; t < n_tokens; ++t) {
      const Index position = s.length + t;
      for (Index p = 0; p < record().plane_count(); ++p) {
        const PlaneSpec& plane = record().plane(p);
        Pool& pool = planes_[static_cast<std::size_t>(p)];
        std::byte* page = table(pool, seq)[position / page_tokens_];
        std::byte* row = page + kHeaderBytes + position % page_tokens_ * plane.bytes_per_token();
        store_as(plane.storage, planes[p].data + t * plane.elements_per_token(), row,
                 plane.elements_per_token());
      }
    }
    s.length = length;
    tokens_ += n_tokens;
  }
  using KvCache::append;

  void truncate(SequenceId seq, Index new_length) override {
    const char* call = "SplitPoolCache::truncate";
    check_live(call, seq);
    TPATTN_CHECK(new_length >= 0 && new_length <= sequence(seq).length, call, "new_length",
                 "in [0, " + std::to_string(sequence(seq).length) + "]", new_length);
    give_back(seq, new_length);
  }

  Index tokens_available(SequenceId seq) const override {
    check_live("SplitPoolCache::tokens_available", seq);
    return room(seq);
  }

  SequenceView view(SequenceId seq) const override {
    check_live("SplitPoolCache::view", seq);
    return SequenceView(&record(), tables_.data() + seq * record().plane_count(), page_tokens_,
                        sequence(seq).length);
  }

  Index bytes_used() const override { return tokens_ * bytes_per_token(); }
  Index bytes_reserved() const override {
    Index bytes = 0;
    for (const Pool& pool : planes_) bytes += static_cast<Index>(pool.memory.size());
    return bytes;
  }

  // Pages of plane p's pool that sequences hold, and plane p's page address of block b of seq:
  // for tests that show the pools are apart and handed out in different orders.
  Index pages_in_use(Index p) const {
    return page_count_ - static_cast<Index>(planes_[static_cast<std::size_t>(p)].free.size());
  }
  const std::byte* page_of(SequenceId seq, Index p, Index b) const {
    const Pool& pool = planes_[static_cast<std::size_t>(p)];
    return pool.table[static_cast<std::size_t>(seq * page_count_ + b)];
  }
  Index page_number(SequenceId seq, Index p, Index b) const {
    const Pool& pool = planes_[static_cast<std::size_t>(p)];
    return (page_of(seq, p, b) - pool.memory.data()) / pool.page_bytes;
  }
  const std::byte* pool_begin(Index p) const {
    return planes_[static_cast<std::size_t>(p)].memory.data();
  }
  const std::byte* pool_end(Index p) const {
    const Pool& pool = planes_[static_cast<std::size_t>(p)];
    return pool.memory.data() + pool.memory.size();
  }

 private:
  struct Sequence {
    bool live = false;
    Index length = 0;
    Index pages = 0;  // pages held in every pool
  };
  struct Pool {
    Index page_bytes = 0;
    std::vector<std::byte> memory;  // [page_count][page_bytes]: a separate allocation per plane
    std::vector<Index> free;        // page numbers, popped from the back
    std::vector<std::byte*> table;  // [max_sequences][page_count]
  };

  static CacheRecord checked(CacheRecord record, Index page_tokens, Index page_count,
                             Index max_sequences) {
    TPATTN_CHECK(record.plane_count() >= 1, "SplitPoolCache", "record", "at least one plane",
                 record.plane_count());
    TPATTN_CHECK(page_tokens >= 1, "SplitPoolCache", "page_tokens", ">= 1", page_tokens);
    TPATTN_CHECK(page_count >= 1, "SplitPoolCache", "page_count", ">= 1", page_count);
    TPATTN_CHECK(max_sequences >= 1, "SplitPoolCache", "max_sequences", ">= 1", max_sequences);
    return record;
  }

  Sequence& sequence(SequenceId seq) { return sequences_[static_cast<std::size_t>(seq)]; }
  const Sequence& sequence(SequenceId seq) const {
    return sequences_[static_cast<std::size_t>(seq)];
  }
  std::byte** table(Pool& pool, SequenceId seq) { return pool.table.data() + seq * page_count_; }

  void check_live(const char* call, SequenceId seq) const {
    TPATTN_CHECK(contains(seq), call, "seq", "a live sequence id", seq);
  }

  void check_input(const char* call, Index n_tokens, const PlaneInput* planes,
                   Index plane_count) const {
    TPATTN_CHECK(n_tokens >= 1, call, "n_tokens", ">= 1", n_tokens);
    TPATTN_CHECK(plane_count == record().plane_count(), call, "planes",
                 std::to_string(record().plane_count()) + " planes (one per record plane)",
                 plane_count);
    TPATTN_CHECK(planes != nullptr, call, "planes", "non-null", "null");
    for (Index p = 0; p < plane_count; ++p) {
      const PlaneSpec& spec = record().plane(p);
      // The argument's name is built only for the error: append allocates nothing otherwise.
      const auto argument = [&](const char* what) {
        return "planes[" + std::to_string(p) + "] (" + spec.name + ") " + what;
      };
      if (planes[p].rows != spec.rows || planes[p].cols != spec.cols)
        throw Error(call, argument("shape"),
                    std::to_string(spec.rows) + " x " + std::to_string(spec.cols),
                    std::to_string(planes[p].rows) + " x " + std::to_string(planes[p].cols));
      if (planes[p].data == nullptr) throw Error(call, argument("data"), "non-null", "null");
    }
  }

  Index free_pages() const { return static_cast<Index>(planes_.front().free.size()); }
  Index room(SequenceId seq) const {
    const Sequence& s = sequence(seq);
    return s.pages * page_tokens_ - s.length + free_pages() * page_tokens_;
  }

  // Cuts seq to new_length tokens; pages past the last one it needs go back to every pool.
  void give_back(SequenceId seq, Index new_length) {
    Sequence& s = sequence(seq);
    const Index keep = (new_length + page_tokens_ - 1) / page_tokens_;
    for (; s.pages > keep; --s.pages)
      for (Index p = 0; p < record().plane_count(); ++p) {
        Pool& pool = planes_[static_cast<std::size_t>(p)];
        pool.free.push_back((table(pool, seq)[s.pages - 1] - pool.memory.data()) / pool.page_bytes);
      }
    tokens_ -= s.length - new_length;
    s.length = new_length;
  }

  Index page_tokens_;
  Index page_count_;
  Index tokens_ = 0;
  std::vector<Sequence> sequences_;
  std::vector<SequenceId> free_slots_;
  std::vector<Pool> planes_;
  std::vector<PlaneTable> tables_;  // [max_sequences][plane_count]: what view() hands out
};

}  // namespace tpattn::test
