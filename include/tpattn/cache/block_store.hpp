// tpattn/cache/block_store.hpp -- the memory behind both cache storages.
//
// A pool of equal blocks, each holding block_tokens tokens of every plane (plane-major inside the
// block, so a plane's rows are contiguous), plus a block table per sequence slot: one flat array
// of max_sequences x max_blocks_per_sequence block addresses, allocated with the pool, so adding
// a sequence allocates nothing either. A contiguous cache is this with one block of max_tokens
// per sequence; a paged cache with many small pages. plan() works out every size without
// allocating; the constructor allocates what it returns (and the caches' footprint() reports it).
//
// The record's planes may belong to several layers of a model (model_record.hpp): layer l owns
// planes [first_plane[l], first_plane[l + 1]) of every block and has a length of its own per
// sequence, so each layer appends and truncates on its own while all share one block table.
// Invariant: sequence s holds exactly ceil(furthest_s / block_tokens) blocks, where furthest_s
// is the longest of its layers: a block is taken when the first layer reaches it and given back
// when the last layer drops below it. With one layer, furthest_s is the sequence's length.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "tpattn/cache/kv_cache.hpp"

namespace tpattn {
namespace detail {

// a * b and a + b, or a tpattn::Error naming `call` when a cache's byte count would not fit in
// an Index: a size that wrapped around would allocate too little and later appends overrun it.
inline Index checked_product(const char* call, Index a, Index b) {
  Index result = 0;
  TPATTN_CHECK(!__builtin_mul_overflow(a, b, &result), call, "sizes",
               "a total byte count that fits in a 64-bit signed integer",
               to_text(a) + " x " + to_text(b) + " overflows");
  return result;
}
inline Index checked_add(const char* call, Index a, Index b) {
  Index result = 0;
  TPATTN_CHECK(!__builtin_add_overflow(a, b, &result), call, "sizes",
               "a total byte count that fits in a 64-bit signed integer",
               to_text(a) + " + " + to_text(b) + " overflows");
  return result;
}

// How a cache lays its tokens out in a BlockStore; each storage derives one from its own sizes.
// Sizes are >= 1 (checked by the cache).
struct BlockGeometry {
  Index block_tokens = 0;                            // tokens per block
  Index block_count = 0;                             // blocks in the pool
  Index max_sequences = 0;                           // sequence slots
  Index max_blocks_per_sequence = 0;                 // block-table entries per slot
  Index max_tokens_per_sequence = 0;                 // exact cap on one sequence's length
  const char* block_count_argument = "block_count";  // its name in the cache's errors
};

class BlockStore {
 public:
  // Frees memory from the aligned operator new used in the constructor.
  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t(kAlignment)); }
  };
  static constexpr std::size_t kAlignment = 64;

  // What a store allocates, in bytes.
  struct Sizes {
    Index block_bytes = 0;  // one block: block_tokens of every plane, padding included
    Index pool_bytes = 0;   // block_count x block_bytes: all token memory
    Index table_bytes = 0;  // max_sequences x max_blocks_per_sequence x 8: the block tables
  };

  // The sizes a store of `geometry` allocates, worked out without allocating: the constructor
  // runs exactly this before it allocates anything and then allocates what it returns, so a
  // cache's footprint() cannot drift from what its constructor reserves. Throws tpattn::Error
  // naming `call` for a record without planes, a byte count that overflows an Index, or more
  // sequence slots or blocks than a std::vector of their bookkeeping can hold (vector_limit).
  // layers: how many layers the record's planes belong to (>= 1, checked by ModelRecord).
  static Sizes plan(const char* call, const CacheRecord& record, const BlockGeometry& geometry,
                    Index layers = 1) {
    TPATTN_CHECK(record.plane_count() >= 1, call, "record", "at least one plane",
                 record.plane_count());
    // The slots' bookkeeping (24 bytes each) binds before their free list (8 bytes each), and
    // with one layer before their lengths (8 bytes per slot and layer).
    check_count<Sequence>(call, "max_sequences", geometry.max_sequences, "sequence slots");
    check_count<Index>(call, "max_sequences", checked_product(call, geometry.max_sequences, layers),
                       "lengths, one per sequence slot and layer");
    Sizes sizes;
    sizes.block_bytes = block_layout(call, record, geometry.block_tokens, nullptr);
    sizes.pool_bytes = checked_product(call, sizes.block_bytes, geometry.block_count);
    sizes.table_bytes = table_size(call, geometry.max_sequences, geometry.max_blocks_per_sequence);
    check_count<Index>(call, geometry.block_count_argument, geometry.block_count,
                       "blocks in the free-block list");
    return sizes;
  }

  // call: the cache's name for errors. A sequence holds at most geometry.max_blocks_per_sequence
  // blocks and geometry.max_tokens_per_sequence tokens (in each layer). layers, first_plane:
  // layer l owns the record's planes [first_plane[l], first_plane[l + 1]); first_plane may be
  // null for one layer. Plans first, so every check runs before anything is allocated, then
  // allocates the pool (usually the largest part) before the rest. An allocation the system
  // refuses for a size the plan accepted is a tpattn::Error giving the bytes asked for, and what
  // was allocated before it is freed.
  BlockStore(const char* call, const CacheRecord& record, const BlockGeometry& geometry,
             Index layers = 1, const Index* first_plane = nullptr)
      : BlockStore(call, record, geometry, layers, first_plane,
                   plan(call, record, geometry, layers)) {}

  // The layer argument of the operations below: every layer of the sequence at once.
  static constexpr Index kEveryLayer = -1;

  Index layers() const { return layers_; }
  Index first_plane(Index layer) const { return first_plane_[static_cast<std::size_t>(layer)]; }
  Index block_tokens() const { return block_tokens_; }
  Index block_count() const { return block_count_; }
  Index block_bytes() const { return block_bytes_; }
  Index free_block_count() const { return static_cast<Index>(free_blocks_.size()); }
  Index max_sequences() const { return static_cast<Index>(sequences_.size()); }
  Index sequence_count() const { return max_sequences() - static_cast<Index>(free_slots_.size()); }
  Index max_tokens_per_sequence() const { return max_tokens_per_sequence_; }

  // Tokens held by every sequence in `layer`, times the layer's bytes per token; kEveryLayer:
  // summed over the layers.
  Index bytes_held(Index layer) const {
    if (layer != kEveryLayer)
      return layer_tokens_[static_cast<std::size_t>(layer)] * layer_bytes(layer);
    Index bytes = 0;
    for (Index l = 0; l < layers_; ++l) bytes += bytes_held(l);
    return bytes;
  }
  // Bytes of a block that hold `layer`'s planes, padding included; they add up to block_bytes().
  Index layer_block_bytes(Index layer) const {
    const Index end = layer + 1 == layers_ ? block_bytes_ : plane_offset(first_plane(layer + 1));
    return end - plane_offset(first_plane(layer));
  }
  Index table_bytes() const { return static_cast<Index>(tables_.size() * sizeof(std::byte*)); }

  bool contains(SequenceId seq) const {
    return seq >= 0 && seq < max_sequences() && sequences_[static_cast<std::size_t>(seq)].live;
  }

  void check_sequence(const char* call, SequenceId seq) const {
    TPATTN_CHECK(contains(seq), call, "seq", "a live sequence id", seq);
  }

  SequenceId add_sequence(const char* call) {
    TPATTN_CHECK(!free_slots_.empty(), call, "sequence count",
                 "at most " + to_text(max_sequences()) + " live sequences", max_sequences() + 1);
    const SequenceId seq = free_slots_.back();
    Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    free_slots_.pop_back();
    s.live = true;  // its lengths are 0: never used, or cut to 0 by remove_sequence
    return seq;
  }

  void remove_sequence(SequenceId seq) {
    shrink(seq, kEveryLayer, 0);
    sequences_[static_cast<std::size_t>(seq)].live = false;
    free_slots_.push_back(seq);
  }

  // Tokens `seq` holds in `layer`; kEveryLayer: the tokens every layer holds (the shortest).
  Index length(SequenceId seq, Index layer) const {
    const Index* lengths = lengths_of(seq);
    if (layer != kEveryLayer) return lengths[layer];
    Index shortest = lengths[0];
    for (Index l = 1; l < layers_; ++l) shortest = std::min(shortest, lengths[l]);
    return shortest;
  }
  // The longest of the sequence's layers: what its blocks hold room for.
  Index furthest(SequenceId seq) const {
    return sequences_[static_cast<std::size_t>(seq)].furthest;
  }

  Index blocks_needed(Index tokens) const { return (tokens + block_tokens_ - 1) / block_tokens_; }

  // Tokens `layer` of `seq` could still take: room in the blocks the sequence holds past the
  // layer's length plus the free blocks it may claim. kEveryLayer: what every layer could take,
  // the room past the furthest layer.
  Index tokens_available(SequenceId seq, Index layer) const {
    const Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    const Index length = layer == kEveryLayer ? s.furthest : lengths_of(seq)[layer];
    const Index claimable = std::min(free_block_count(), max_blocks_per_sequence_ - s.blocks);
    const Index room = (s.blocks + claimable) * block_tokens_ - length;
    return std::min(room, max_tokens_per_sequence_ - length);
  }

  // Appends n_tokens to `layer` of `seq` from planes[0 ..) (the layer's planes, in order);
  // kEveryLayer: to every layer, which must hold the same length, from planes of every layer in
  // record order. Claims the blocks the new tokens reach first. Caller has validated everything;
  // this cannot fail.
  void append(const CacheRecord& record, SequenceId seq, Index layer, Index n_tokens,
              const PlaneInput* planes) {
    Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    Index* lengths = lengths_of(seq);
    std::byte** table = table_of(seq);
    const Index first_layer = layer == kEveryLayer ? 0 : layer;
    const Index end_layer = layer == kEveryLayer ? layers_ : layer + 1;
    const Index length = lengths[first_layer];
    const Index new_length = length + n_tokens;
    while (s.blocks < blocks_needed(new_length)) {
      table[s.blocks++] = block_address(free_blocks_.back());
      free_blocks_.pop_back();
    }
    const Index first = first_plane(first_layer);
    const Index end = first_plane(end_layer);
    Index written = 0;
    while (written < n_tokens) {
      const Index position = length + written;
      const Index block = position / block_tokens_;
      const Index row = position % block_tokens_;
      const Index run = std::min(n_tokens - written, block_tokens_ - row);
      for (Index p = first; p < end; ++p) {
        const PlaneSpec& plane = record.plane(p);
        const Index width = plane.elements_per_token();
        std::byte* rows = table[block] + plane_offset(p) + row * plane.bytes_per_token();
        store_as(plane.storage, planes[p - first].data + written * width, rows, run * width);
      }
      written += run;
    }
    for (Index l = first_layer; l < end_layer; ++l) {
      lengths[l] = new_length;
      layer_tokens_[static_cast<std::size_t>(l)] += n_tokens;
    }
    s.furthest = std::max(s.furthest, new_length);
  }

  // Cuts `layer` of `seq` (kEveryLayer: every layer) to new_length tokens, at most the length
  // of each layer cut, and gives back the blocks no layer reaches any more.
  void shrink(SequenceId seq, Index layer, Index new_length) {
    Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    Index* lengths = lengths_of(seq);
    const Index first_layer = layer == kEveryLayer ? 0 : layer;
    const Index end_layer = layer == kEveryLayer ? layers_ : layer + 1;
    for (Index l = first_layer; l < end_layer; ++l) {
      layer_tokens_[static_cast<std::size_t>(l)] -= lengths[l] - new_length;
      lengths[l] = new_length;
    }
    s.furthest = 0;
    for (Index l = 0; l < layers_; ++l) s.furthest = std::max(s.furthest, lengths[l]);
    std::byte* const* table = table_of(seq);
    const Index keep = blocks_needed(s.furthest);
    while (s.blocks > keep) free_blocks_.push_back(block_number(table[--s.blocks]));
  }

  // `layer` of `seq` (kEveryLayer: the planes of every layer, as long as every layer is), seen
  // through `record`: the layer's record, or with kEveryLayer the whole record.
  SequenceView view(const CacheRecord& record, SequenceId seq, Index layer) const {
    const Index first = first_plane(layer == kEveryLayer ? 0 : layer);
    return SequenceView(&record, table_of(seq), plane_offsets_.data() + first, block_tokens_,
                        length(seq, layer));
  }

 private:
  struct Sequence {
    bool live = false;
    Index furthest = 0;  // the longest of its layers' lengths
    Index blocks = 0;    // entries in use at the start of the slot's block table
  };

  // Allocates what `sizes`, the plan of `record`, `geometry` and `layers`, says.
  BlockStore(const char* call, const CacheRecord& record, const BlockGeometry& geometry,
             Index layers, const Index* first_plane, const Sizes& sizes)
      : layers_(layers),
        block_tokens_(geometry.block_tokens),
        block_count_(geometry.block_count),
        max_blocks_per_sequence_(geometry.max_blocks_per_sequence),
        max_tokens_per_sequence_(geometry.max_tokens_per_sequence),
        block_bytes_(sizes.block_bytes) {
    try {
      memory_.reset(static_cast<std::byte*>(::operator new(
          static_cast<std::size_t>(sizes.pool_bytes), std::align_val_t(kAlignment))));
      tables_.resize(static_cast<std::size_t>(sizes.table_bytes) / sizeof(std::byte*));
      sequences_.resize(static_cast<std::size_t>(geometry.max_sequences));
      lengths_.resize(static_cast<std::size_t>(geometry.max_sequences * layers));
      layer_tokens_.resize(static_cast<std::size_t>(layers));
      layer_bytes_.resize(static_cast<std::size_t>(layers));
      first_plane_.resize(static_cast<std::size_t>(layers + 1));
      plane_offsets_.resize(static_cast<std::size_t>(record.plane_count()));
      free_blocks_.reserve(static_cast<std::size_t>(block_count_));
      free_slots_.reserve(static_cast<std::size_t>(geometry.max_sequences));
    } catch (const std::bad_alloc&) {
      fail(call, "sizes", "memory the system can allocate",
           to_text(sizes.pool_bytes) + " bytes of token memory and " + to_text(sizes.table_bytes) +
               " bytes of block tables, refused");
    }
    block_layout("BlockStore", record, block_tokens_, plane_offsets_.data());  // planned: no throw
    for (Index l = 0; l <= layers; ++l)
      first_plane_[static_cast<std::size_t>(l)] =
          first_plane == nullptr ? (l == 0 ? 0 : record.plane_count()) : first_plane[l];
    for (Index l = 0; l < layers; ++l)
      for (Index p = first_plane_[static_cast<std::size_t>(l)];
           p < first_plane_[static_cast<std::size_t>(l + 1)]; ++p)
        layer_bytes_[static_cast<std::size_t>(l)] += record.plane(p).bytes_per_token();
    for (Index b = block_count_ - 1; b >= 0; --b) free_blocks_.push_back(b);
    for (Index s = geometry.max_sequences - 1; s >= 0; --s) free_slots_.push_back(s);
  }

  // The most elements of T a store's std::vector may be asked to hold: its max_size(), and no
  // more than PTRDIFF_MAX bytes (which bounds libstdc++'s max_size; other libraries may allow
  // more, and ::operator new could never give it). A count beyond it cannot be allocated, so it
  // is an Error naming the count, not a std::length_error or std::bad_alloc.
  template <class T>
  static Index vector_limit() {
    const Index bytes = std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T));
    const std::size_t elements = std::vector<T>().max_size();
    return elements < static_cast<std::size_t>(bytes) ? static_cast<Index>(elements) : bytes;
  }
  template <class T>
  static void check_count(const char* call, const char* argument, Index count, const char* what) {
    TPATTN_CHECK(count <= vector_limit<T>(), call, argument,
                 "a count whose bookkeeping fits in memory (at most " + to_text(vector_limit<T>()) +
                     " " + what + ")",
                 count);
  }

  Index* lengths_of(SequenceId seq) { return lengths_.data() + seq * layers_; }
  const Index* lengths_of(SequenceId seq) const { return lengths_.data() + seq * layers_; }
  Index plane_offset(Index p) const { return plane_offsets_[static_cast<std::size_t>(p)]; }
  Index layer_bytes(Index layer) const { return layer_bytes_[static_cast<std::size_t>(layer)]; }

  std::byte** table_of(SequenceId seq) { return tables_.data() + seq * max_blocks_per_sequence_; }
  const std::byte* const* table_of(SequenceId seq) const {
    return tables_.data() + seq * max_blocks_per_sequence_;
  }

  std::byte* block_address(Index block) const { return memory_.get() + block * block_bytes_; }
  Index block_number(const std::byte* address) const {
    return (address - memory_.get()) / block_bytes_;
  }

  // Bytes of one block of block_tokens tokens. Planes follow each other inside a block; an
  // offset is rounded up to its plane's element size so mixed-storage records stay aligned, and
  // the block to the widest element so every block starts aligned (records of one storage type
  // need no padding). Writes plane p's offset to plane_offsets[p] unless plane_offsets is null.
  static Index block_layout(const char* call, const CacheRecord& record, Index block_tokens,
                            Index* plane_offsets) {
    Index offset = 0;
    Index widest = 1;
    for (Index p = 0; p < record.plane_count(); ++p) {
      const PlaneSpec& plane = record.plane(p);
      const Index align = element_bytes(plane.storage);
      widest = std::max(widest, align);
      offset = checked_add(call, offset, align - 1) / align * align;
      if (plane_offsets != nullptr) plane_offsets[p] = offset;
      // A plane's bytes per token fit in an Index: CacheRecord's constructor checks that.
      offset =
          checked_add(call, offset, checked_product(call, block_tokens, plane.bytes_per_token()));
    }
    return checked_add(call, offset, widest - 1) / widest * widest;
  }

  // Bytes of the block tables: one address per block a sequence may hold, for every slot.
  static Index table_size(const char* call, Index max_sequences, Index max_blocks_per_sequence) {
    const Index entries = checked_product(call, max_sequences, max_blocks_per_sequence);
    // At most PTRDIFF_MAX bytes, so no more entries than vector_limit<std::byte*>().
    return checked_product(call, entries, Index(sizeof(std::byte*)));
  }

  Index layers_;
  Index block_tokens_;
  Index block_count_;
  Index max_blocks_per_sequence_;
  Index max_tokens_per_sequence_;
  Index block_bytes_ = 0;
  std::vector<Index> first_plane_;   // [layers + 1]: layer l's planes of the record
  std::vector<Index> layer_bytes_;   // [layers]: bytes per token of each layer's planes
  std::vector<Index> layer_tokens_;  // [layers]: tokens held in each layer, over all sequences
  std::vector<Index> lengths_;       // [max_sequences][layers]
  std::vector<Index> plane_offsets_;
  std::unique_ptr<std::byte, AlignedDelete> memory_;
  std::vector<Index> free_blocks_;
  std::vector<SequenceId> free_slots_;
  std::vector<Sequence> sequences_;
  std::vector<std::byte*> tables_;  // [max_sequences][max_blocks_per_sequence]
};

// Shared argument checks of append(); throws before anything changes.
inline void check_append(const char* call, const CacheRecord& record, Index n_tokens,
                         const PlaneInput* planes, Index plane_count) {
  TPATTN_CHECK(n_tokens >= 1, call, "n_tokens", ">= 1", n_tokens);
  TPATTN_CHECK(plane_count == record.plane_count(), call, "planes",
               to_text(record.plane_count()) + " planes (one per record plane)", plane_count);
  TPATTN_CHECK(planes != nullptr, call, "planes", "non-null", "null");
  for (Index p = 0; p < plane_count; ++p) {
    const PlaneSpec& spec = record.plane(p);
    TPATTN_CHECK(planes[p].rows == spec.rows && planes[p].cols == spec.cols, call,
                 ("planes[" + to_text(p) + "] (" + spec.name + ") shape").c_str(),
                 to_text(spec.rows) + " x " + to_text(spec.cols),
                 to_text(planes[p].rows) + " x " + to_text(planes[p].cols));
    TPATTN_CHECK(planes[p].data != nullptr, call,
                 ("planes[" + to_text(p) + "] (" + spec.name + ") data").c_str(), "non-null",
                 "null");
  }
}

}  // namespace detail
}  // namespace tpattn
