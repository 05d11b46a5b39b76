// tpattn/cache/record.hpp -- what one token of a KV cache holds.
//
// A record is a list of named planes; each plane holds a (rows x cols) matrix per token, stored
// row-major in one storage type. The five operators' records (docs/attention.md §1-3):
//   MHA/GQA/MQA  K: g x d_h, V: g x d_v                 -> g (d_h + d_v) elements per token
//   MLA          latent: 1 x d_c, rope_key: 1 x d_R     -> d_c + d_R
//   TPA          A_K: R_K x h, B_K: R_K x d_h, A_V: R_V x h, B_V: R_V x d_v
//                                                       -> R_K (h + d_h) + R_V (h + d_v)
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {

// One plane's shape. The products below are safe for the planes of a CacheRecord, whose
// constructor checks that they fit in an Index; a lone PlaneSpec is not checked.
struct PlaneSpec {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  StorageType storage = StorageType::f32;

  Index elements_per_token() const { return rows * cols; }
  Index bytes_per_token() const { return rows * cols * element_bytes(storage); }
};

class CacheRecord {
 public:
  CacheRecord() = default;

  // planes: at least one, each with rows >= 1, cols >= 1, a StorageType value and a unique name;
  // every plane's rows x cols and rows x cols x element bytes, and the record's elements and
  // bytes per token, must fit in an Index (a 64-bit signed integer), so that no size computed
  // from the record wraps around.
  explicit CacheRecord(std::vector<PlaneSpec> planes) : CacheRecord(std::move(planes), false) {}

  Index plane_count() const { return static_cast<Index>(planes_.size()); }
  const PlaneSpec& plane(Index p) const { return planes_[static_cast<std::size_t>(p)]; }
  const std::vector<PlaneSpec>& planes() const { return planes_; }

  // Index of the plane called `name`; throws if there is none.
  Index plane_index(const std::string& name) const {
    for (std::size_t p = 0; p < planes_.size(); ++p)
      if (planes_[p].name == name) return static_cast<Index>(p);
    detail::fail("CacheRecord::plane_index", "name", "one of the record's planes", name);
  }

  Index elements_per_token() const {
    Index total = 0;
    for (const PlaneSpec& plane : planes_) total += plane.elements_per_token();
    return total;
  }
  Index bytes_per_token() const {
    Index total = 0;
    for (const PlaneSpec& plane : planes_) total += plane.bytes_per_token();
    return total;
  }

  friend bool operator==(const CacheRecord& a, const CacheRecord& b) {
    if (a.planes_.size() != b.planes_.size()) return false;
    for (std::size_t p = 0; p < a.planes_.size(); ++p) {
      const PlaneSpec& x = a.planes_[p];
      const PlaneSpec& y = b.planes_[p];
      if (x.name != y.name || x.rows != y.rows || x.cols != y.cols || x.storage != y.storage)
        return false;
    }
    return true;
  }
  friend bool operator!=(const CacheRecord& a, const CacheRecord& b) { return !(a == b); }

 private:
  friend class ModelRecord;

  // names_known_unique: the caller guarantees unique names (a ModelRecord's planes, prefixed by
  // their layer), so the check that compares every pair of names, quadratic in the plane count,
  // is skipped for models of many layers. Every other check runs.
  CacheRecord(std::vector<PlaneSpec> planes, bool names_known_unique) : planes_(std::move(planes)) {
    TPATTN_CHECK(!planes_.empty(), "CacheRecord", "planes", "at least one plane", 0);
    Index bytes = 0;  // per token, summed over the planes so far
    for (std::size_t p = 0; p < planes_.size(); ++p) {
      const PlaneSpec& plane = planes_[p];
      TPATTN_CHECK(plane.rows >= 1, "CacheRecord", "rows", "plane '" + plane.name + "' rows >= 1",
                   plane.rows);
      TPATTN_CHECK(plane.cols >= 1, "CacheRecord", "cols", "plane '" + plane.name + "' cols >= 1",
                   plane.cols);
      TPATTN_CHECK(plane.storage == StorageType::f32 || plane.storage == StorageType::bf16 ||
                       plane.storage == StorageType::f16,
                   "CacheRecord", "storage", "plane '" + plane.name + "' storage f32, bf16 or f16",
                   static_cast<int>(plane.storage));
      for (std::size_t other = 0; other < p && !names_known_unique; ++other)
        TPATTN_CHECK(planes_[other].name != plane.name, "CacheRecord", "name", "unique plane names",
                     plane.name);
      const Index size = element_bytes(plane.storage);
      Index plane_elements = 0;
      Index plane_bytes = 0;
      TPATTN_CHECK(
          !__builtin_mul_overflow(plane.rows, plane.cols, &plane_elements), "CacheRecord",
          "rows x cols",
          "plane '" + plane.name +
              "' rows x cols (elements per token) that fit in a 64-bit signed integer",
          detail::to_text(plane.rows) + " x " + detail::to_text(plane.cols) + " overflows");
      TPATTN_CHECK(!__builtin_mul_overflow(plane_elements, size, &plane_bytes), "CacheRecord",
                   "rows x cols",
                   "plane '" + plane.name +
                       "' rows x cols x element bytes (bytes per token) that fit in a 64-bit "
                       "signed integer",
                   detail::to_text(plane.rows) + " x " + detail::to_text(plane.cols) + " x " +
                       detail::to_text(size) + " overflows");
      // Each plane's elements are at most half its bytes, so once the bytes' sum fits, the
      // elements' sum (elements_per_token()) does too.
      Index bytes_sum = 0;
      TPATTN_CHECK(!__builtin_add_overflow(bytes, plane_bytes, &bytes_sum), "CacheRecord", "planes",
                   "bytes per token, summed over the planes, that fit in a 64-bit signed integer",
                   detail::to_text(bytes) + " + " + detail::to_text(plane_bytes) + " (plane '" +
                       plane.name + "') overflows");
      bytes = bytes_sum;
    }
  }

  std::vector<PlaneSpec> planes_;
};

namespace detail {

// Where `side` first differs from `other`, as `side` has it, for an error message that shows both
// sides: the plane count ("2 planes (K, V)"), else the first plane whose name ("plane 1 named
// 'V'"), rows, cols or storage ("plane 1 (V): storage bf16") differs. Empty for equal records.
// Reads only planes both records have, so either may have any number of planes, none included.
inline std::string describe_difference(const CacheRecord& side, const CacheRecord& other) {
  const Index count = side.plane_count();
  if (count != other.plane_count()) {
    std::string text = to_text(count) + (count == 1 ? " plane" : " planes");
    for (Index p = 0; p < count; ++p) text += (p == 0 ? " (" : ", ") + side.plane(p).name;
    return count == 0 ? text : text + ")";
  }
  for (Index p = 0; p < count; ++p) {
    const PlaneSpec& mine = side.plane(p);
    const PlaneSpec& theirs = other.plane(p);
    const std::string plane = "plane " + to_text(p);
    if (mine.name != theirs.name) return plane + " named '" + mine.name + "'";
    const std::string field = plane + " (" + mine.name + "): ";
    if (mine.rows != theirs.rows) return field + "rows " + to_text(mine.rows);
    if (mine.cols != theirs.cols) return field + "cols " + to_text(mine.cols);
    if (mine.storage != theirs.storage) return field + "storage " + name_of(mine.storage);
  }
  return std::string();
}

}  // namespace detail

// The records of the five operators. `storage` applies to every plane; build a CacheRecord by
// hand for a per-plane choice.
namespace records {

// MHA (g = h), GQA, MQA (g = 1): K: g x d_h, V: g x d_v.
inline CacheRecord gqa(Index kv_heads, Index head_dim, Index value_dim,
                       StorageType storage = StorageType::f32) {
  return CacheRecord({{"K", kv_heads, head_dim, storage}, {"V", kv_heads, value_dim, storage}});
}

// MLA: latent: 1 x d_c, rope_key: 1 x d_R.
inline CacheRecord mla(Index latent_dim, Index rope_dim, StorageType storage = StorageType::f32) {
  return CacheRecord({{"latent", 1, latent_dim, storage}, {"rope_key", 1, rope_dim, storage}});
}

// TPA and TPA-KVonly: A_K: R_K x h, B_K: R_K x d_h, A_V: R_V x h, B_V: R_V x d_v.
inline CacheRecord tpa(Index heads, Index head_dim, Index value_dim, Index rank_k, Index rank_v,
                       StorageType storage = StorageType::f32) {
  return CacheRecord({{"A_K", rank_k, heads, storage},
                      {"B_K", rank_k, head_dim, storage},
                      {"A_V", rank_v, heads, storage},
                      {"B_V", rank_v, value_dim, storage}});
}

}  // namespace records
}  // namespace tpattn
