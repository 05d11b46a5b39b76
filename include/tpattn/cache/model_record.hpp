// tpattn/cache/model_record.hpp -- what one token holds in every layer of a model.
//
// A model of L layers caches one CacheRecord per layer, usually the same record L times. A cache
// built from a ModelRecord (paged_cache.hpp, contiguous_cache.hpp) keeps every layer of a token
// in the same block: one sequence id and one block table serve all layers, and cache.layer(l) is
// the KvCache that layer l's operator is given (docs/cache.md, "A model's cache").
//
// The cache's own record is combined(): every layer's planes, layer after layer, plane `name` of
// layer l named "layer<l>.<name>":
//   combined planes [first_plane(l), first_plane(l + 1)) = layer(l)'s planes, in order
//   combined().bytes_per_token() = sum over layers of layer(l).bytes_per_token()
// With one layer, combined() is that layer's record as it is, so a one-layer model's cache is
// exactly the cache of its record.
#pragma once

#include <cstddef>
#include <limits>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "tpattn/cache/record.hpp"

namespace tpattn {
namespace detail {
class BlockCache;
}  // namespace detail

class ModelRecord {
 public:
  // `layers` >= 1 layers, each holding `record` (at least one plane). The model's plane count
  // (layers x planes) and bytes per token (layers x record.bytes_per_token()) must fit in an
  // Index; both are checked before anything is allocated.
  ModelRecord(CacheRecord record, Index layers) {
    const char* call = "ModelRecord";
    TPATTN_CHECK(record.plane_count() >= 1, call, "record", "at least one plane",
                 record.plane_count());
    TPATTN_CHECK(layers >= 1, call, "layers", ">= 1", layers);
    Index bytes = 0;
    TPATTN_CHECK(
        !__builtin_mul_overflow(layers, record.bytes_per_token(), &bytes), call, "layers",
        "a layer count whose bytes per token (layers x " +
            detail::to_text(record.bytes_per_token()) + ") fit in a 64-bit signed integer",
        detail::to_text(layers) + " x " + detail::to_text(record.bytes_per_token()) + " overflows");
    // A plane holds at least 2 bytes per token, so layers x plane_count fits as well.
    const Index planes = layers * record.plane_count();
    const Index most = std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(PlaneSpec));
    TPATTN_CHECK(
        planes <= most, call, "layers",
        "a model of at most " + detail::to_text(most) + " planes in all",
        detail::to_text(layers) + " layers x " + detail::to_text(record.plane_count()) + " planes");
    try {
      if (layers == 1) {
        combined_ = record;
      } else {
        std::vector<PlaneSpec> all;
        all.reserve(static_cast<std::size_t>(planes));
        for (Index l = 0; l < layers; ++l)
          for (const PlaneSpec& plane : record.planes())
            all.push_back({prefixed(l, plane.name), plane.rows, plane.cols, plane.storage});
        combined_ = CacheRecord(std::move(all), true);
      }
      first_plane_.reserve(static_cast<std::size_t>(layers + 1));
      for (Index l = 0; l <= layers; ++l) first_plane_.push_back(l * record.plane_count());
      layers_.assign(static_cast<std::size_t>(layers), record);
    } catch (const std::bad_alloc&) {
      detail::fail(call, "layers", "memory the system can allocate",
                   detail::to_text(layers) + " layers of " + detail::to_text(record.plane_count()) +
                       " planes, refused");
    }
  }

  // One record per layer, which may differ (say a model whose layers have different head
  // counts): at least one layer, each record with at least one plane; the model's bytes per
  // token must fit in an Index.
  explicit ModelRecord(std::vector<CacheRecord> layers) : layers_(std::move(layers)) {
    const char* call = "ModelRecord";
    TPATTN_CHECK(!layers_.empty(), call, "layers", "at least one layer", 0);
    Index bytes = 0;
    Index planes = 0;
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const CacheRecord& layer = layers_[l];
      TPATTN_CHECK(layer.plane_count() >= 1, call, "record",
                   "at least one plane (in layers[" + detail::to_text(l) + "])",
                   layer.plane_count());
      TPATTN_CHECK(!__builtin_add_overflow(bytes, layer.bytes_per_token(), &bytes), call, "layers",
                   "bytes per token, summed over the layers, that fit in a 64-bit signed integer",
                   "a sum that overflows at layers[" + detail::to_text(l) + "]");
      planes += layer.plane_count();  // each plane holds >= 2 bytes, so this fits too
    }
    if (layers_.size() == 1) {
      combined_ = layers_.front();
    } else {
      std::vector<PlaneSpec> all;
      all.reserve(static_cast<std::size_t>(planes));
      for (std::size_t l = 0; l < layers_.size(); ++l)
        for (const PlaneSpec& plane : layers_[l].planes())
          all.push_back(
              {prefixed(static_cast<Index>(l), plane.name), plane.rows, plane.cols, plane.storage});
      combined_ = CacheRecord(std::move(all), true);
    }
    first_plane_.push_back(0);
    for (const CacheRecord& layer : layers_)
      first_plane_.push_back(first_plane_.back() + layer.plane_count());
  }

  Index layer_count() const { return static_cast<Index>(layers_.size()); }
  // Layer l's record, l in [0, layer_count()).
  const CacheRecord& layer(Index l) const {
    TPATTN_CHECK(l >= 0 && l < layer_count(), "ModelRecord::layer", "l",
                 "in [0, " + detail::to_text(layer_count()) + ")", l);
    return layers_[static_cast<std::size_t>(l)];
  }
  // Every layer's planes, layer after layer (see the top of this file).
  const CacheRecord& combined() const { return combined_; }
  // Index in combined() of layer l's first plane, l in [0, layer_count()]; first_plane(L) is
  // combined().plane_count().
  Index first_plane(Index l) const { return first_plane_[static_cast<std::size_t>(l)]; }
  Index bytes_per_token() const { return combined_.bytes_per_token(); }

 private:
  friend class detail::BlockCache;  // moves the records into the cache and its layers

  // "layer<l>.<name>": unique across layers, since a layer's own names are unique and the
  // first '.' ends the layer number.
  static std::string prefixed(Index l, const std::string& name) {
    return "layer" + detail::to_text(l) + "." + name;
  }

  std::vector<CacheRecord> layers_;
  std::vector<Index> first_plane_;  // [layer_count() + 1]
  CacheRecord combined_;
};

}  // namespace tpattn
