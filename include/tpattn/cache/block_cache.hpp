// tpattn/cache/block_cache.hpp -- the KvCache interface over a BlockStore, shared by both
// storages: argument checks that leave the cache as it was, then the store's operation.
// ContiguousKvCache and PagedKvCache only choose the block geometry and describe their room.
//
// A cache of a model (model_record.hpp) has L layers in every block. The cache itself is the
// model: its record is the layers' planes together, its sequences are every layer's, and
//   length(seq)           = the tokens every layer holds (the shortest layer)
//   append(seq, ...)      = the same tokens to every layer (planes of all layers), all in step
//   truncate(seq, n)      = every layer cut to n <= length(seq)
//   tokens_available(seq) = what every layer can still take
//   view(seq)             = every layer's planes, length(seq) tokens
//   bytes_used()          = sum over layers of (tokens the layer holds) x its bytes per token.
// layer(l) is the KvCache of layer l alone: its record is the layer's, and its length, append,
// truncate, tokens_available, view and bytes_used are the layer's; its add_sequence and
// remove_sequence are the model's (a sequence is live in every layer or in none).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tpattn/cache/block_store.hpp"
#include "tpattn/cache/model_record.hpp"

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
  ~BlockCache() override;
  // Its layers point into it, so a cache stays where it was built.
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  SequenceId add_sequence() override { return store_.add_sequence(calls_.add_sequence.c_str()); }
  void remove_sequence(SequenceId seq) override { remove(calls_, seq); }
  bool contains(SequenceId seq) const override { return store_.contains(seq); }
  Index sequence_count() const override { return store_.sequence_count(); }
  Index max_sequences() const override { return store_.max_sequences(); }

  Index length(SequenceId seq) const override { return length_of(calls_, seq, kEveryLayer); }
  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    append_to(calls_, record(), seq, kEveryLayer, n_tokens, planes, plane_count);
  }
  using KvCache::append;
  void truncate(SequenceId seq, Index new_length) override {
    truncate_to(calls_, seq, kEveryLayer, new_length);
  }
  Index tokens_available(SequenceId seq) const override {
    return room_of(calls_, seq, kEveryLayer);
  }
  SequenceView view(SequenceId seq) const override {
    return view_of(calls_, record(), seq, kEveryLayer);
  }

  Index bytes_used() const override { return store_.bytes_held(kEveryLayer); }
  Index bytes_reserved() const override { return store_.block_count() * store_.block_bytes(); }
  // The block tables, outside bytes_reserved(): one address per block a sequence may hold, for
  // every sequence slot, allocated at construction. One table serves every layer.
  Index table_bytes() const { return store_.table_bytes(); }

  // The model's layers (1 for a cache built from a CacheRecord).
  Index layer_count() const { return store_.layers(); }
  // Layer l's cache, l in [0, layer_count()), owned by this cache: what layer l's operator is
  // given. With one layer, the cache itself.
  KvCache& layer(Index l);
  const KvCache& layer(Index l) const;

 protected:
  static constexpr Index kEveryLayer = BlockStore::kEveryLayer;

  // name: the storage's class name, for errors. The rest as BlockStore's constructor.
  // The store comes first: its plan checks every size before this cache allocates anything.
  BlockCache(const char* name, CacheRecord record, const BlockGeometry& geometry)
      : KvCache(std::move(record)), store_(name, this->record(), geometry), calls_(name) {}
  // A model's cache: the record is model.combined(), and one layer cache per layer if there are
  // several. Defined below, where a layer's class is complete.
  BlockCache(const char* name, ModelRecord&& model, const BlockGeometry& geometry);

  // What the constructor with these arguments would reserve, from the same BlockStore::plan and
  // with the same errors, allocating nothing. The storage checks its own sizes first.
  static CacheFootprint footprint_of(const char* name, const CacheRecord& record,
                                     const BlockGeometry& geometry, Index layers = 1) {
    const BlockStore::Sizes sizes = BlockStore::plan(name, record, geometry, layers);
    return {sizes.pool_bytes, sizes.table_bytes};
  }

  // Where the room of `layer` of `seq` (kEveryLayer: of every layer) comes from, for the message
  // of an append that does not fit.
  virtual std::string describe_room(SequenceId seq, Index layer) const = 0;

  const BlockStore& store() const { return store_; }

 private:
  class Layer;

  // Built once, so a check on the happy path never builds a string.
  struct CallNames {
    explicit CallNames(const std::string& name)
        : add_sequence(name + "::add_sequence"),
          remove_sequence(name + "::remove_sequence"),
          length(name + "::length"),
          append(name + "::append"),
          truncate(name + "::truncate"),
          tokens_available(name + "::tokens_available"),
          view(name + "::view"),
          layer(name + "::layer") {}
    std::string add_sequence, remove_sequence, length, append, truncate, tokens_available, view,
        layer;
  };

  // The operations, for the model (layer = kEveryLayer) or one layer, with the caller's names.
  void remove(const CallNames& calls, SequenceId seq) {
    store_.check_sequence(calls.remove_sequence.c_str(), seq);
    store_.remove_sequence(seq);
  }

  Index length_of(const CallNames& calls, SequenceId seq, Index layer) const {
    store_.check_sequence(calls.length.c_str(), seq);
    return store_.length(seq, layer);
  }

  // `record` is what the caller's record() says: the layer's, or the model's.
  void append_to(const CallNames& calls, const CacheRecord& record, SequenceId seq, Index layer,
                 Index n_tokens, const PlaneInput* planes, Index plane_count) {
    const char* call = calls.append.c_str();
    store_.check_sequence(call, seq);
    check_append(call, record, n_tokens, planes, plane_count);
    // Appending to every layer at once continues every layer at the same position.
    TPATTN_CHECK(layer != kEveryLayer || store_.length(seq, layer) == store_.furthest(seq), call,
                 "seq",
                 "every layer holding the same tokens (append to the model between forward "
                 "passes, or to each layer's cache during one)",
                 "layers holding " + to_text(store_.length(seq, layer)) + " to " +
                     to_text(store_.furthest(seq)) + " tokens");
    TPATTN_CHECK(n_tokens <= store_.tokens_available(seq, layer), call, "n_tokens",
                 "<= " + to_text(store_.tokens_available(seq, layer)) + " (" +
                     describe_room(seq, layer) + ")",
                 n_tokens);
    store_.append(this->record(), seq, layer, n_tokens, planes);
  }

  void truncate_to(const CallNames& calls, SequenceId seq, Index layer, Index new_length) {
    const char* call = calls.truncate.c_str();
    store_.check_sequence(call, seq);
    TPATTN_CHECK(new_length >= 0 && new_length <= store_.length(seq, layer), call, "new_length",
                 "in [0, " + to_text(store_.length(seq, layer)) + "]", new_length);
    store_.shrink(seq, layer, new_length);
  }

  Index room_of(const CallNames& calls, SequenceId seq, Index layer) const {
    store_.check_sequence(calls.tokens_available.c_str(), seq);
    return store_.tokens_available(seq, layer);
  }

  SequenceView view_of(const CallNames& calls, const CacheRecord& record, SequenceId seq,
                       Index layer) const {
    store_.check_sequence(calls.view.c_str(), seq);
    return store_.view(record, seq, layer);
  }

  void check_layer(Index l) const {
    TPATTN_CHECK(l >= 0 && l < layer_count(), calls_.layer.c_str(), "l",
                 "in [0, " + to_text(layer_count()) + ") (the cache's layers)", l);
  }

  BlockStore store_;  // before calls_: see the constructor
  CallNames calls_;
  std::vector<std::unique_ptr<Layer>> layers_;  // empty with one layer: layer(0) is the cache
};

// Layer l of a model's cache: the model's operations restricted to the layer's planes and
// length, under the call names "<storage>[layer l]::<call>".
class BlockCache::Layer final : public KvCache {
 public:
  Layer(BlockCache& model, Index layer, CacheRecord record, const std::string& name)
      : KvCache(std::move(record)), model_(model), layer_(layer), calls_(name) {}

  SequenceId add_sequence() override {
    return model_.store_.add_sequence(calls_.add_sequence.c_str());
  }
  void remove_sequence(SequenceId seq) override { model_.remove(calls_, seq); }
  bool contains(SequenceId seq) const override { return model_.store_.contains(seq); }
  Index sequence_count() const override { return model_.store_.sequence_count(); }
  Index max_sequences() const override { return model_.store_.max_sequences(); }

  Index length(SequenceId seq) const override { return model_.length_of(calls_, seq, layer_); }
  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    model_.append_to(calls_, record(), seq, layer_, n_tokens, planes, plane_count);
  }
  using KvCache::append;
  void truncate(SequenceId seq, Index new_length) override {
    model_.truncate_to(calls_, seq, layer_, new_length);
  }
  Index tokens_available(SequenceId seq) const override {
    return model_.room_of(calls_, seq, layer_);
  }
  SequenceView view(SequenceId seq) const override {
    return model_.view_of(calls_, record(), seq, layer_);
  }

  // The layer's tokens x its bytes per token; its share of every block.
  Index bytes_used() const override { return model_.store_.bytes_held(layer_); }
  Index bytes_reserved() const override {
    return model_.store_.block_count() * model_.store_.layer_block_bytes(layer_);
  }

 private:
  BlockCache& model_;
  Index layer_;
  CallNames calls_;
};

inline BlockCache::BlockCache(const char* name, ModelRecord&& model, const BlockGeometry& geometry)
    : KvCache(std::move(model.combined_)),
      store_(name, this->record(), geometry, model.layer_count(), model.first_plane_.data()),
      calls_(name) {
  const Index layers = model.layer_count();
  if (layers == 1) return;
  layers_.reserve(static_cast<std::size_t>(layers));
  for (Index l = 0; l < layers; ++l)
    layers_.push_back(std::make_unique<Layer>(*this, l,
                                              std::move(model.layers_[static_cast<std::size_t>(l)]),
                                              std::string(name) + "[layer " + to_text(l) + "]"));
}

inline BlockCache::~BlockCache() = default;

inline KvCache& BlockCache::layer(Index l) {
  check_layer(l);
  if (layers_.empty()) return *this;
  return *layers_[static_cast<std::size_t>(l)];
}
inline const KvCache& BlockCache::layer(Index l) const {
  check_layer(l);
  if (layers_.empty()) return *this;
  return *layers_[static_cast<std::size_t>(l)];
}

}  // namespace detail
}  // namespace tpattn
