// tests/fuzz/cache_fuzzer.cpp -- libFuzzer target: the KV-cache API against a model of it.
//
// Each input builds one cache (ContiguousKvCache or PagedKvCache, random sizes) for one record
// (the five operators' records in f32 / bf16 / f16, the same with per-plane storage types, or a
// random record of 1-5 planes) and runs a series of calls on it, mirrored on a plain model: a
// std::map from sequence id to each plane's values, rounded to the plane's storage type by an
// independent round-to-nearest-even (below; not Eigen's conversion). After every call the model
// predicts length, tokens_available, bytes_used, sequence_count, free pages and the byte counts;
// a view compares every stored element bit for bit. Misuse (ids that are not live, appends that do
// not fit or are malformed, truncates out of range, too many sequences, bad records and sizes)
// must throw tpattn::Error naming the call and leave the cache as it was: every plane of every
// sequence byte for byte, lengths, room and counters, compared before and after.
//
// Any mismatch, any other exception, or no exception where one was due: abort(), which libFuzzer
// reports as a crash. Set TPATTN_FUZZ_TRACE=1 to print the calls of an input (to read a crash).
//
// Sizes stay small (<= 6 sequences, <= 24 pages of <= 9 tokens, <= 40 tokens per region) so that
// an input runs in about a millisecond, and values stay within +-100 (f16 overflows above 65504).
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "tpattn/cache.hpp"

namespace {

using tpattn::CacheRecord;
using tpattn::ContiguousKvCache;
using tpattn::Index;
using tpattn::KvCache;
using tpattn::PagedKvCache;
using tpattn::PlaneInput;
using tpattn::PlaneSpec;
using tpattn::SequenceId;
using tpattn::SequenceView;
using tpattn::StorageType;

// ---- failures ----------------------------------------------------------------------------------

[[noreturn]] void fail(int line, const std::string& what) {
  std::fprintf(stderr, "cache_fuzzer: check failed (cache_fuzzer.cpp:%d): %s\n", line,
               what.c_str());
  std::fflush(stderr);
  std::abort();
}

// The message is only built when the check fails.
#define FUZZ_REQUIRE(condition, message)                                          \
  do {                                                                            \
    if (!(condition)) fail(__LINE__, std::string(#condition) + ": " + (message)); \
  } while (false)

bool tracing() {
  static const bool on = [] {
    const char* value = std::getenv("TPATTN_FUZZ_TRACE");
    return value != nullptr && value[0] != '\0' && value[0] != '0';
  }();
  return on;
}

template <class... Args>
void trace(const char* format, Args... args) {
  if (tracing()) {
    std::fprintf(stderr, format, args...);
    std::fputc('\n', stderr);
  }
}

std::string text(Index value) { return std::to_string(value); }
std::string number(double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.9g", value);
  return buffer;
}

// ---- the storage types, independently of the library -------------------------------------------

Index element_size(StorageType type) { return type == StorageType::f32 ? 4 : 2; }

// fp32 -> storage -> value, round to nearest even, computed in double from the definition:
// the result is the nearest multiple of the storage's quantum at x's binade (its spacing), with
// ties to an even multiple. bf16: 8 significand bits, normal from 2^-126; f16: 11 bits, normal
// from 2^-14 (below that, subnormals with the fixed quantum 2^-24). Values here stay far below
// either type's overflow threshold.
double round_to_storage(StorageType type, float value) {
  if (type == StorageType::f32 || value == 0.0f) return value;
  const int significand_bits = type == StorageType::bf16 ? 8 : 11;
  const int min_normal_exponent = type == StorageType::bf16 ? -126 : -14;
  int exponent = 0;
  std::frexp(static_cast<double>(value), &exponent);  // value = m 2^exponent, 0.5 <= |m| < 1
  const int binade = std::max(exponent - 1, min_normal_exponent);
  const double quantum = std::ldexp(1.0, binade - (significand_bits - 1));
  const double rounded = std::nearbyint(static_cast<double>(value) / quantum) * quantum;
  return std::copysign(rounded, static_cast<double>(value));  // keeps -0 for a tiny negative
}

// A stored element back to its value, from the format's bits.
double stored_value(StorageType type, const std::byte* element) {
  switch (type) {
    case StorageType::f32: {
      float value;
      std::memcpy(&value, element, 4);
      return value;
    }
    case StorageType::bf16: {
      std::uint16_t bits;
      std::memcpy(&bits, element, 2);
      const std::uint32_t word = static_cast<std::uint32_t>(bits) << 16;
      float value;
      std::memcpy(&value, &word, 4);
      return value;
    }
    case StorageType::f16: {
      std::uint16_t bits;
      std::memcpy(&bits, element, 2);
      const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
      double magnitude;
      if (exponent == 0)
        magnitude = std::ldexp(static_cast<double>(mantissa), -24);
      else if (exponent == 31)
        magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                                  : std::numeric_limits<double>::quiet_NaN();
      else
        magnitude = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
      return sign ? -magnitude : magnitude;
    }
  }
  fail(__LINE__, "unknown storage type");
}

bool same_value(double a, double b) {
  return (a == b && std::signbit(a) == std::signbit(b)) || (std::isnan(a) && std::isnan(b));
}

// ---- fuzz input --------------------------------------------------------------------------------

StorageType pick_storage(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 2)) {
    case 0: return StorageType::f32;
    case 1: return StorageType::bf16;
    default: return StorageType::f16;
  }
}

// Values that sit on rounding edges of bf16 / f16, and ordinary ones; all within +-100.
const float kEdgeValues[] = {0.0f,
                             -0.0f,
                             1.0f,
                             -1.0f,
                             1.0f + 0x1p-8f,              // bf16 tie, rounds down to even
                             1.0f + 3 * 0x1p-8f,          // bf16 tie, rounds up to even
                             1.0f + 0x1p-11f,             // f16 tie
                             1.0f + 3 * 0x1p-11f,         // f16 tie, rounds up
                             1.0f + 0x1p-11f + 0x1p-20f,  // just above an f16 tie
                             -(1.0f + 0x1p-8f - 0x1p-23f),
                             0x1p-24f,             // smallest f16 subnormal
                             0x1p-25f,             // f16 tie between 0 and 2^-24
                             3 * 0x1p-25f,         // f16 tie between 2^-24 and 2^-23
                             0x1p-14f - 0x1p-25f,  // just below f16's smallest normal
                             6.1e-5f,
                             -6.1e-5f,
                             1e-30f,
                             1.17549435e-38f,
                             1e-40f,
                             -1e-42f,
                             99.99f,
                             -100.0f,
                             65.5f,
                             0.1f,
                             1.0f / 3.0f,
                             -2.5f,
                             31.999f,
                             0x1.fffffep-1f};

// The fp32 values of one append: n_tokens x every plane's elements.
class ValueSource {
 public:
  ValueSource(FuzzedDataProvider& in, std::uint32_t seed) : in_(in), rng_(seed) {}

  std::vector<float> values(Index count) {
    std::vector<float> out(static_cast<std::size_t>(count));
    const int mode = in_.ConsumeIntegralInRange<int>(0, 3);
    const double scales[] = {1e-3, 1.0, 30.0};
    const double scale = scales[in_.ConsumeIntegralInRange<int>(0, 2)];
    for (float& v : out) {
      switch (mode) {
        case 0:  // uniform in [-3 scale, 3 scale], clamped to +-100
          v = static_cast<float>(std::clamp(
              3.0 * scale * static_cast<double>(static_cast<std::int32_t>(rng_())) * 0x1p-31,
              -100.0, 100.0));
          break;
        case 1: v = kEdgeValues[rng_() % (sizeof(kEdgeValues) / sizeof(kEdgeValues[0]))]; break;
        case 2:  // straight from the input, in [-100, 100]
          v = static_cast<float>(in_.ConsumeIntegral<std::int16_t>()) / 327.67f;
          break;
        default:  // fine-grained around 1, where every storage rounds differently
          v = 1.0f + static_cast<float>(static_cast<std::int32_t>(rng_() % 8192) - 4096) * 0x1p-16f;
          break;
      }
    }
    return out;
  }

 private:
  FuzzedDataProvider& in_;
  std::mt19937 rng_;
};

// ---- records -----------------------------------------------------------------------------------

CacheRecord pick_record(FuzzedDataProvider& in, std::string& description) {
  const int kind = in.ConsumeIntegralInRange<int>(0, 4);
  const auto dim = [&](Index high) { return in.ConsumeIntegralInRange<Index>(1, high); };
  std::vector<PlaneSpec> planes;
  if (kind == 4) {  // any record: 1-5 planes of any shape and storage
    const int count = in.ConsumeIntegralInRange<int>(1, 5);
    for (int p = 0; p < count; ++p)
      planes.push_back({"p" + std::to_string(p), dim(4), dim(9), pick_storage(in)});
    description = "custom";
  } else {
    const StorageType storage = pick_storage(in);
    const int family = kind == 3 ? in.ConsumeIntegralInRange<int>(0, 2) : kind;
    CacheRecord base;
    if (family == 0) {
      base = tpattn::records::gqa(dim(4), dim(16), dim(16), storage);
      description = "gqa";
    } else if (family == 1) {
      base = tpattn::records::mla(dim(32), dim(16), storage);
      description = "mla";
    } else {
      const Index h = dim(6), dh = dim(16), dv = dim(16);
      base = tpattn::records::tpa(h, dh, dv, dim(4), dim(4), storage);
      description = "tpa";
    }
    planes = base.planes();
    if (kind == 3) {  // mixed storage types
      for (PlaneSpec& plane : planes) plane.storage = pick_storage(in);
      description += " mixed";
    } else {
      description += std::string(" ") + tpattn::name_of(storage);
    }
  }
  return CacheRecord(std::move(planes));
}

// A record that CacheRecord must refuse.
void check_bad_record(FuzzedDataProvider& in) {
  std::vector<PlaneSpec> planes = {{"a", 2, 3, StorageType::f32}, {"b", 1, 4, StorageType::bf16}};
  const int defect = in.ConsumeIntegralInRange<int>(0, 4);
  const Index bad_size =
      in.PickValueInArray<Index>({0, -1, std::numeric_limits<Index>::min(), -(Index(1) << 40)});
  switch (defect) {
    case 0: planes.clear(); break;
    case 1: planes[1].rows = bad_size; break;
    case 2: planes[0].cols = bad_size; break;
    case 3: planes[1].name = "a"; break;
    default:
      planes[in.ConsumeBool() ? 1 : 0].storage =
          static_cast<StorageType>(in.ConsumeIntegralInRange<int>(3, 255));
      break;
  }
  trace("bad record, defect %d", defect);
  try {
    CacheRecord record(std::move(planes));
  } catch (const tpattn::Error& error) {
    FUZZ_REQUIRE(error.call() == "CacheRecord", error.what());
    return;
  } catch (const std::exception& error) {
    fail(__LINE__, std::string("bad record: not a tpattn::Error: ") + error.what());
  }
  fail(__LINE__, "bad record " + std::to_string(defect) + " accepted");
}

// ---- the model ---------------------------------------------------------------------------------

struct Geometry {
  bool paged = false;
  Index max_sequences = 0;
  Index max_tokens = 0;   // contiguous: tokens per region
  Index page_tokens = 0;  // paged
  Index page_count = 0;
  Index cap = 0;  // paged max_tokens_per_sequence, 0 = none
};

struct ModelSequence {
  Index length = 0;
  std::vector<std::vector<double>> planes;  // per plane, [length, rows * cols], as stored
};

class Model {
 public:
  Model(const CacheRecord& record, const Geometry& geometry)
      : record_(record), geometry_(geometry) {}

  const Geometry& geometry() const { return geometry_; }
  const std::map<SequenceId, ModelSequence>& sequences() const { return sequences_; }
  bool live(SequenceId seq) const { return sequences_.count(seq) != 0; }
  Index length(SequenceId seq) const { return sequences_.at(seq).length; }
  Index count() const { return static_cast<Index>(sequences_.size()); }

  Index bytes_per_token() const {
    Index bytes = 0;
    for (const PlaneSpec& plane : record_.planes())
      bytes += plane.rows * plane.cols * element_size(plane.storage);
    return bytes;
  }
  Index tokens_held() const {
    Index tokens = 0;
    for (const auto& entry : sequences_) tokens += entry.second.length;
    return tokens;
  }
  Index block_tokens() const {
    return geometry_.paged ? geometry_.page_tokens : geometry_.max_tokens;
  }
  Index pages_of(Index length) const {
    return (length + geometry_.page_tokens - 1) / geometry_.page_tokens;
  }
  Index pages_held() const {
    Index pages = 0;
    for (const auto& entry : sequences_) pages += pages_of(entry.second.length);
    return pages;
  }
  Index free_pages() const { return geometry_.page_count - pages_held(); }

  // docs/cache.md: contiguous, max_tokens - length; paged, the room in the last page plus the
  // free pages, and at most the cap.
  Index tokens_available(SequenceId seq) const {
    const Index length = sequences_.at(seq).length;
    if (!geometry_.paged) return geometry_.max_tokens - length;
    const Index room =
        pages_of(length) * geometry_.page_tokens - length + free_pages() * geometry_.page_tokens;
    return geometry_.cap > 0 ? std::min(room, geometry_.cap - length) : room;
  }

  // Bytes of one block: each plane's start rounded up to its element size, the block to the
  // widest element (docs/cache.md, mixed records).
  Index block_bytes() const {
    Index offset = 0, widest = 1;
    for (const PlaneSpec& plane : record_.planes()) {
      const Index align = element_size(plane.storage);
      widest = std::max(widest, align);
      offset = (offset + align - 1) / align * align;
      offset += block_tokens() * plane.rows * plane.cols * align;
    }
    return (offset + widest - 1) / widest * widest;
  }
  Index bytes_reserved() const {
    return (geometry_.paged ? geometry_.page_count : geometry_.max_sequences) * block_bytes();
  }
  Index table_bytes() const {
    Index entries = 1;
    if (geometry_.paged)
      entries = geometry_.cap > 0 ? std::min(geometry_.page_count, pages_of(geometry_.cap))
                                  : geometry_.page_count;
    return geometry_.max_sequences * entries * 8;
  }

  void add(SequenceId seq) {
    ModelSequence s;
    s.planes.resize(static_cast<std::size_t>(record_.plane_count()));
    sequences_[seq] = std::move(s);
  }
  void append(SequenceId seq, Index n, const std::vector<std::vector<float>>& data) {
    ModelSequence& s = sequences_.at(seq);
    for (Index p = 0; p < record_.plane_count(); ++p) {
      const StorageType storage = record_.plane(p).storage;
      for (float value : data[static_cast<std::size_t>(p)])
        s.planes[static_cast<std::size_t>(p)].push_back(round_to_storage(storage, value));
    }
    s.length += n;
  }
  void truncate(SequenceId seq, Index new_length) {
    ModelSequence& s = sequences_.at(seq);
    for (Index p = 0; p < record_.plane_count(); ++p)
      s.planes[static_cast<std::size_t>(p)].resize(
          static_cast<std::size_t>(new_length * record_.plane(p).elements_per_token()));
    s.length = new_length;
  }
  void remove(SequenceId seq) { sequences_.erase(seq); }

 private:
  const CacheRecord& record_;
  Geometry geometry_;
  std::map<SequenceId, ModelSequence> sequences_;
};

// ---- the fuzzed session ------------------------------------------------------------------------

// The cache's observable state, byte for byte, to show that a failed call changed nothing.
struct Snapshot {
  std::map<SequenceId, std::vector<std::vector<std::byte>>> bytes;  // per plane, in token order
  std::map<SequenceId, Index> lengths, available;
  Index sequence_count = 0, bytes_used = 0, bytes_reserved = 0, free_pages = 0;

  bool operator==(const Snapshot& o) const {
    return bytes == o.bytes && lengths == o.lengths && available == o.available &&
           sequence_count == o.sequence_count && bytes_used == o.bytes_used &&
           bytes_reserved == o.bytes_reserved && free_pages == o.free_pages;
  }
};

class Session {
 public:
  Session(FuzzedDataProvider& in, const CacheRecord& record, const Geometry& geometry,
          std::string name)
      : in_(in),
        record_(record),
        model_(record, geometry),
        values_(in, in.ConsumeIntegral<std::uint32_t>()),
        name_(std::move(name)) {
    if (geometry.paged) {
      paged_ = std::make_unique<PagedKvCache>(record, geometry.page_tokens, geometry.page_count,
                                              geometry.max_sequences, geometry.cap);
      cache_ = paged_.get();
      const tpattn::CacheFootprint footprint = PagedKvCache::footprint(
          record, geometry.page_tokens, geometry.page_count, geometry.max_sequences, geometry.cap);
      FUZZ_REQUIRE(footprint.bytes_reserved == paged_->bytes_reserved() &&
                       footprint.table_bytes == paged_->table_bytes(),
                   "PagedKvCache::footprint differs from the cache");
      FUZZ_REQUIRE(paged_->page_tokens() == geometry.page_tokens &&
                       paged_->page_count() == geometry.page_count,
                   "page geometry");
      FUZZ_REQUIRE(
          paged_->page_bytes() == model_.block_bytes(),
          "page_bytes " + text(paged_->page_bytes()) + ", model " + text(model_.block_bytes()));
    } else {
      contiguous_ =
          std::make_unique<ContiguousKvCache>(record, geometry.max_sequences, geometry.max_tokens);
      cache_ = contiguous_.get();
      const tpattn::CacheFootprint footprint =
          ContiguousKvCache::footprint(record, geometry.max_sequences, geometry.max_tokens);
      FUZZ_REQUIRE(footprint.bytes_reserved == contiguous_->bytes_reserved() &&
                       footprint.table_bytes == contiguous_->table_bytes(),
                   "ContiguousKvCache::footprint differs from the cache");
      FUZZ_REQUIRE(contiguous_->max_tokens() == geometry.max_tokens, "max_tokens");
    }
    FUZZ_REQUIRE(cache_->record() == record, "record() is not the record the cache was built with");
    FUZZ_REQUIRE(cache_->max_sequences() == geometry.max_sequences, "max_sequences");
    FUZZ_REQUIRE(cache_->bytes_per_token() == model_.bytes_per_token(),
                 "bytes_per_token " + text(cache_->bytes_per_token()) + ", model " +
                     text(model_.bytes_per_token()));
    FUZZ_REQUIRE(cache_->bytes_reserved() == model_.bytes_reserved(),
                 "bytes_reserved " + text(cache_->bytes_reserved()) + ", model " +
                     text(model_.bytes_reserved()));
    FUZZ_REQUIRE(table_bytes() == model_.table_bytes(),
                 "table_bytes " + text(table_bytes()) + ", model " + text(model_.table_bytes()));
    check_counters();
  }

  void run(int max_calls) {
    for (int call = 0; call < max_calls && in_.remaining_bytes() > 0; ++call) {
      switch (in_.ConsumeIntegralInRange<int>(0, 13)) {
        case 0:
        case 1: add_sequence(); break;
        case 2:
        case 3:
        case 4: append(); break;
        case 5: append_too_many(); break;
        case 6: append_malformed(); break;
        case 7: truncate(); break;
        case 8: truncate_out_of_range(); break;
        case 9: remove_sequence(); break;
        case 10: not_live_id(); break;
        case 11: view(); break;
        case 12: fill(); break;
        default: check_saved_views(); break;
      }
      check_counters();
    }
    check_everything();
  }

 private:
  Index table_bytes() const { return paged_ ? paged_->table_bytes() : contiguous_->table_bytes(); }
  std::string call(const char* method) const { return name_ + "::" + method; }

  // A live sequence, or -1 if there is none.
  SequenceId pick_live() {
    if (model_.count() == 0) return -1;
    auto it = model_.sequences().begin();
    std::advance(it, in_.ConsumeIntegralInRange<Index>(0, model_.count() - 1));
    return it->first;
  }

  // ---- checks ----

  // Everything the model predicts without reading token data.
  void check_counters() const {
    FUZZ_REQUIRE(
        cache_->sequence_count() == model_.count(),
        "sequence_count " + text(cache_->sequence_count()) + ", model " + text(model_.count()));
    FUZZ_REQUIRE(cache_->bytes_used() == model_.tokens_held() * model_.bytes_per_token(),
                 "bytes_used " + text(cache_->bytes_used()) + ", model " +
                     text(model_.tokens_held()) + " tokens x " + text(model_.bytes_per_token()));
    FUZZ_REQUIRE(cache_->bytes_reserved() == model_.bytes_reserved(), "bytes_reserved changed");
    if (paged_) {
      FUZZ_REQUIRE(paged_->free_page_count() == model_.free_pages(),
                   "free_page_count " + text(paged_->free_page_count()) + ", model " +
                       text(model_.free_pages()));
      FUZZ_REQUIRE(paged_->bytes_in_pages() == model_.pages_held() * model_.block_bytes(),
                   "bytes_in_pages " + text(paged_->bytes_in_pages()));
    }
    for (const auto& [seq, s] : model_.sequences()) {
      FUZZ_REQUIRE(cache_->contains(seq), "live sequence " + text(seq) + " not contained");
      FUZZ_REQUIRE(
          cache_->length(seq) == s.length,
          "length(" + text(seq) + ") " + text(cache_->length(seq)) + ", model " + text(s.length));
      FUZZ_REQUIRE(cache_->tokens_available(seq) == model_.tokens_available(seq),
                   "tokens_available(" + text(seq) + ") " + text(cache_->tokens_available(seq)) +
                       ", model " + text(model_.tokens_available(seq)));
    }
  }

  // A view of `seq` against the model: its shape, every element bit for bit, plane alignment.
  void check_view(SequenceId seq, const SequenceView& view) const {
    const ModelSequence& s = model_.sequences().at(seq);
    const std::string where = "view(" + text(seq) + ")";
    FUZZ_REQUIRE(view.valid(), where + " not valid");
    FUZZ_REQUIRE(&view.record() == &cache_->record() || view.record() == record_,
                 where + ": another record");
    FUZZ_REQUIRE(view.length() == s.length,
                 where + " length " + text(view.length()) + ", model " + text(s.length));
    FUZZ_REQUIRE(view.block_tokens() == model_.block_tokens(),
                 where + " block_tokens " + text(view.block_tokens()));
    const Index blocks = (s.length + model_.block_tokens() - 1) / model_.block_tokens();
    FUZZ_REQUIRE(view.block_count() == blocks,
                 where + " block_count " + text(view.block_count()) + ", expected " + text(blocks));
    for (Index b = 0; b < blocks; ++b) {
      const Index tokens = std::min(model_.block_tokens(), s.length - b * model_.block_tokens());
      FUZZ_REQUIRE(view.tokens_in_block(b) == tokens, where + " tokens_in_block(" + text(b) + ")");
    }
    for (Index p = 0; p < record_.plane_count(); ++p) {
      const PlaneSpec& plane = record_.plane(p);
      const Index width = plane.rows * plane.cols, size = element_size(plane.storage);
      FUZZ_REQUIRE(view.elements_per_token(p) == width, where + " elements_per_token");
      const std::vector<double>& expected = s.planes[static_cast<std::size_t>(p)];
      for (Index b = 0; b < blocks; ++b) {
        const std::byte* base = block_of(view, p, b);
        FUZZ_REQUIRE(
            reinterpret_cast<std::uintptr_t>(base) % static_cast<std::uintptr_t>(size) == 0,
            where + " plane " + plane.name + " block " + text(b) + " misaligned");
        for (Index t = 0; t < view.tokens_in_block(b); ++t) {
          const Index token = b * model_.block_tokens() + t;
          for (Index e = 0; e < width; ++e) {
            const double got = stored_value(plane.storage, base + (t * width + e) * size);
            const double want = expected[static_cast<std::size_t>(token * width + e)];
            FUZZ_REQUIRE(same_value(got, want),
                         where + " plane " + plane.name + " (" + tpattn::name_of(plane.storage) +
                             ") token " + text(token) + " element " + text(e) + ": stored " +
                             number(got) + ", model " + number(want));
          }
        }
      }
    }
  }

  static const std::byte* block_of(const SequenceView& view, Index p, Index b) {
    switch (view.record().plane(p).storage) {
      case StorageType::f32:
        return reinterpret_cast<const std::byte*>(view.plane_block<float>(p, b));
      case StorageType::bf16:
        return reinterpret_cast<const std::byte*>(view.plane_block<Eigen::bfloat16>(p, b));
      case StorageType::f16:
        return reinterpret_cast<const std::byte*>(view.plane_block<Eigen::half>(p, b));
    }
    fail(__LINE__, "unknown storage type");
  }

  // Every sequence against the model, and no two sequences (or blocks) sharing bytes.
  void check_everything() {
    std::vector<std::pair<std::uintptr_t, std::uintptr_t>> ranges;
    for (const auto& entry : model_.sequences()) {
      const SequenceView view = cache_->view(entry.first);
      check_view(entry.first, view);
      for (Index p = 0; p < record_.plane_count(); ++p) {
        const Index bytes =
            record_.plane(p).rows * record_.plane(p).cols * element_size(record_.plane(p).storage);
        for (Index b = 0; b < view.block_count(); ++b) {
          const auto start = reinterpret_cast<std::uintptr_t>(block_of(view, p, b));
          ranges.emplace_back(start,
                              start + static_cast<std::uintptr_t>(view.tokens_in_block(b) * bytes));
        }
      }
    }
    std::sort(ranges.begin(), ranges.end());
    for (std::size_t k = 1; k < ranges.size(); ++k)
      FUZZ_REQUIRE(ranges[k].first >= ranges[k - 1].second,
                   "two planes or blocks of live tokens overlap in memory");
    check_saved_views();
  }

  // Views taken earlier stay valid while their sequence is unchanged (docs/cache.md), whatever
  // happens to the other sequences.
  void check_saved_views() {
    for (const auto& [seq, view] : saved_views_) check_view(seq, view);
  }

  Snapshot snapshot() const {
    Snapshot shot;
    shot.sequence_count = cache_->sequence_count();
    shot.bytes_used = cache_->bytes_used();
    shot.bytes_reserved = cache_->bytes_reserved();
    shot.free_pages = paged_ ? paged_->free_page_count() : 0;
    for (Index seq = 0; seq < cache_->max_sequences(); ++seq) {
      if (!cache_->contains(seq)) continue;
      shot.lengths[seq] = cache_->length(seq);
      shot.available[seq] = cache_->tokens_available(seq);
      const SequenceView view = cache_->view(seq);
      std::vector<std::vector<std::byte>>& planes = shot.bytes[seq];
      planes.resize(static_cast<std::size_t>(record_.plane_count()));
      for (Index p = 0; p < record_.plane_count(); ++p) {
        const Index bytes =
            record_.plane(p).rows * record_.plane(p).cols * element_size(record_.plane(p).storage);
        for (Index b = 0; b < view.block_count(); ++b) {
          const std::byte* base = block_of(view, p, b);
          planes[static_cast<std::size_t>(p)].insert(planes[static_cast<std::size_t>(p)].end(),
                                                     base, base + view.tokens_in_block(b) * bytes);
        }
      }
    }
    return shot;
  }

  // f must throw tpattn::Error from `expected_call` and change nothing.
  template <class F>
  void expect_error(const std::string& what, const std::string& expected_call, F&& f) {
    trace("  misuse: %s", what.c_str());
    const Snapshot before = snapshot();
    try {
      f();
    } catch (const tpattn::Error& error) {
      FUZZ_REQUIRE(error.call() == expected_call,
                   what + ": error names " + error.call() + ", expected " + expected_call);
      FUZZ_REQUIRE(std::string(error.what()).rfind("tpattn: " + expected_call + ": ", 0) == 0,
                   what + ": message " + error.what());
      FUZZ_REQUIRE(snapshot() == before, what + " threw but changed the cache");
      check_counters();
      return;
    } catch (const std::exception& error) {
      fail(__LINE__, what + ": threw something else than tpattn::Error: " + error.what());
    } catch (...) {
      fail(__LINE__, what + ": threw a non-std exception");
    }
    fail(__LINE__, what + ": no error");
  }

  // ---- calls ----

  void add_sequence() {
    if (model_.count() == cache_->max_sequences()) {
      expect_error("add_sequence beyond max_sequences", call("add_sequence"),
                   [&] { cache_->add_sequence(); });
      return;
    }
    const SequenceId seq = cache_->add_sequence();
    trace("add_sequence -> %ld", static_cast<long>(seq));
    FUZZ_REQUIRE(seq >= 0 && seq < cache_->max_sequences(), "id " + text(seq) + " not a slot");
    FUZZ_REQUIRE(!model_.live(seq), "id " + text(seq) + " handed out twice");
    FUZZ_REQUIRE(cache_->length(seq) == 0, "new sequence not empty");
    model_.add(seq);
    saved_views_.erase(seq);
  }

  // n_tokens tokens of fp32 data, one buffer per plane of exactly its size (ASan sees overruns).
  std::vector<std::vector<float>> make_data(Index n_tokens) {
    std::vector<std::vector<float>> data;
    for (const PlaneSpec& plane : record_.planes())
      data.push_back(values_.values(n_tokens * plane.rows * plane.cols));
    return data;
  }
  static std::vector<PlaneInput> inputs_of(const CacheRecord& record,
                                           const std::vector<std::vector<float>>& data) {
    std::vector<PlaneInput> planes;
    for (Index p = 0; p < record.plane_count(); ++p)
      planes.push_back(
          {data[static_cast<std::size_t>(p)].data(), record.plane(p).rows, record.plane(p).cols});
    return planes;
  }

  void append_tokens(SequenceId seq, Index n) {
    const std::vector<std::vector<float>> data = make_data(n);
    const std::vector<PlaneInput> planes = inputs_of(record_, data);
    trace("append(%ld, %ld)", static_cast<long>(seq), static_cast<long>(n));
    if (in_.ConsumeBool() && record_.plane_count() <= 5) {
      switch (record_.plane_count()) {  // the initializer_list overload
        case 1: cache_->append(seq, n, {planes[0]}); break;
        case 2: cache_->append(seq, n, {planes[0], planes[1]}); break;
        case 3: cache_->append(seq, n, {planes[0], planes[1], planes[2]}); break;
        case 4: cache_->append(seq, n, {planes[0], planes[1], planes[2], planes[3]}); break;
        default:
          cache_->append(seq, n, {planes[0], planes[1], planes[2], planes[3], planes[4]});
          break;
      }
    } else {
      cache_->append(seq, n, planes.data(), static_cast<Index>(planes.size()));
    }
    model_.append(seq, n, data);
    saved_views_.erase(seq);
  }

  void append() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index room = model_.tokens_available(seq);
    if (room == 0) return append_too_many();
    append_tokens(seq, in_.ConsumeIntegralInRange<Index>(1, std::min<Index>(room, 24)));
  }

  // Appends until the sequence (or the pool) is full.
  void fill() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index room = model_.tokens_available(seq);
    if (room > 0) append_tokens(seq, room);
    FUZZ_REQUIRE(cache_->tokens_available(seq) == 0, "room left after filling");
  }

  void append_too_many() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index n = model_.tokens_available(seq) + in_.ConsumeIntegralInRange<Index>(1, 9);
    const std::vector<std::vector<float>> data = make_data(n);
    const std::vector<PlaneInput> planes = inputs_of(record_, data);
    expect_error("append " + text(n) + " tokens to " + text(seq) + " (room " +
                     text(model_.tokens_available(seq)) + ")",
                 call("append"),
                 [&] { cache_->append(seq, n, planes.data(), static_cast<Index>(planes.size())); });
  }

  void append_malformed() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    Index n = in_.ConsumeIntegralInRange<Index>(1, 4);
    const std::vector<std::vector<float>> data = make_data(n);
    std::vector<PlaneInput> planes = inputs_of(record_, data);
    const Index plane = in_.ConsumeIntegralInRange<Index>(0, record_.plane_count() - 1);
    const int defect = in_.ConsumeIntegralInRange<int>(0, 6);
    std::string what = "append to " + text(seq) + " with ";
    Index count = static_cast<Index>(planes.size());
    const PlaneInput* pointer = planes.data();
    std::vector<PlaneInput> resized;
    switch (defect) {
      case 0:
        n = in_.PickValueInArray<Index>({0, -1, std::numeric_limits<Index>::min()});
        what += "n_tokens " + text(n);
        break;
      case 1: {  // one plane fewer or more; the array holds exactly `count` entries
        count += in_.ConsumeBool() || count == 1 ? 1 : -1;
        resized.assign(planes.begin(), planes.begin() + std::min<Index>(count, planes.size()));
        while (static_cast<Index>(resized.size()) < count) resized.push_back(planes.back());
        pointer = resized.data();
        what += "plane_count " + text(count);
        break;
      }
      case 2:
        pointer = nullptr;
        what += "planes null";
        break;
      case 3:
        planes[static_cast<std::size_t>(plane)].rows += in_.PickValueInArray<Index>({1, -1, 7});
        what += "bad rows in plane " + text(plane);
        break;
      case 4:
        planes[static_cast<std::size_t>(plane)].cols += in_.PickValueInArray<Index>({1, -1, 5});
        what += "bad cols in plane " + text(plane);
        break;
      case 5:  // rows and cols swapped: the same element count, another shape
        std::swap(planes[static_cast<std::size_t>(plane)].rows,
                  planes[static_cast<std::size_t>(plane)].cols);
        if (planes[static_cast<std::size_t>(plane)].rows ==
            planes[static_cast<std::size_t>(plane)].cols)
          planes[static_cast<std::size_t>(plane)].rows = 0;
        what += "rows and cols swapped in plane " + text(plane);
        break;
      default:
        planes[static_cast<std::size_t>(plane)].data = nullptr;
        what += "null data in plane " + text(plane);
        break;
    }
    expect_error(what, call("append"), [&] { cache_->append(seq, n, pointer, count); });
  }

  void truncate() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index new_length = in_.ConsumeIntegralInRange<Index>(0, model_.length(seq));
    trace("truncate(%ld, %ld)", static_cast<long>(seq), static_cast<long>(new_length));
    cache_->truncate(seq, new_length);
    model_.truncate(seq, new_length);
    saved_views_.erase(seq);
  }

  void truncate_out_of_range() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index length = model_.length(seq);
    const Index new_length = in_.PickValueInArray<Index>({length + 1, length + 1000, -1,
                                                          std::numeric_limits<Index>::min(),
                                                          std::numeric_limits<Index>::max()});
    expect_error("truncate(" + text(seq) + ", " + text(new_length) + ") of length " + text(length),
                 call("truncate"), [&] { cache_->truncate(seq, new_length); });
  }

  void remove_sequence() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    trace("remove_sequence(%ld)", static_cast<long>(seq));
    cache_->remove_sequence(seq);
    FUZZ_REQUIRE(!cache_->contains(seq), "removed sequence still contained");
    model_.remove(seq);
    saved_views_.erase(seq);
  }

  // Every call that takes an id, with one that is not live: removed, never added, out of range.
  void not_live_id() {
    std::vector<SequenceId> candidates = {-1,
                                          cache_->max_sequences(),
                                          cache_->max_sequences() + 1,
                                          std::numeric_limits<Index>::min(),
                                          std::numeric_limits<Index>::max(),
                                          Index(1) << 40};
    for (SequenceId seq = 0; seq < cache_->max_sequences(); ++seq)
      if (!model_.live(seq)) candidates.push_back(seq);
    const SequenceId seq =
        candidates[in_.ConsumeIntegralInRange<std::size_t>(0, candidates.size() - 1)];
    FUZZ_REQUIRE(!cache_->contains(seq), "contains(" + text(seq) + ") for a sequence not live");
    const std::string id = "(" + text(seq) + ") not live";
    switch (in_.ConsumeIntegralInRange<int>(0, 5)) {
      case 0:
        expect_error("remove_sequence" + id, call("remove_sequence"),
                     [&] { cache_->remove_sequence(seq); });
        break;
      case 1:
        expect_error("length" + id, call("length"), [&] { (void)cache_->length(seq); });
        break;
      case 2: {
        const std::vector<std::vector<float>> data = make_data(1);
        const std::vector<PlaneInput> planes = inputs_of(record_, data);
        expect_error("append" + id, call("append"), [&] {
          cache_->append(seq, 1, planes.data(), static_cast<Index>(planes.size()));
        });
        break;
      }
      case 3:
        expect_error("truncate" + id, call("truncate"), [&] { cache_->truncate(seq, 0); });
        break;
      case 4:
        expect_error("tokens_available" + id, call("tokens_available"),
                     [&] { (void)cache_->tokens_available(seq); });
        break;
      default: expect_error("view" + id, call("view"), [&] { (void)cache_->view(seq); }); break;
    }
  }

  void view() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    trace("view(%ld)", static_cast<long>(seq));
    const SequenceView view = cache_->view(seq);
    check_view(seq, view);
    saved_views_[seq] = view;
    // prefix(n): the same blocks, cut; out of range throws and leaves the view as it was.
    const Index length = view.length();
    const Index n = in_.ConsumeIntegralInRange<Index>(0, length);
    const SequenceView cut = view.prefix(n);
    FUZZ_REQUIRE(cut.length() == n && cut.block_tokens() == view.block_tokens(), "prefix shape");
    for (Index p = 0; p < record_.plane_count(); ++p)
      for (Index b = 0; b < cut.block_count(); ++b)
        FUZZ_REQUIRE(block_of(cut, p, b) == block_of(view, p, b), "prefix moved a block");
    const Index bad = in_.PickValueInArray<Index>({length + 1, -1});
    try {
      (void)view.prefix(bad);
      fail(__LINE__, "prefix(" + text(bad) + ") of a view of " + text(length) + " tokens");
    } catch (const tpattn::Error& error) {
      FUZZ_REQUIRE(error.call() == "SequenceView::prefix", error.what());
    }
    FUZZ_REQUIRE(view.length() == length, "prefix changed the view");
  }

  FuzzedDataProvider& in_;
  const CacheRecord& record_;
  Model model_;
  ValueSource values_;
  std::string name_;
  std::unique_ptr<PagedKvCache> paged_;
  std::unique_ptr<ContiguousKvCache> contiguous_;
  KvCache* cache_ = nullptr;
  std::map<SequenceId, SequenceView> saved_views_;
};

// Sizes the constructors (and footprint) must refuse.
void check_bad_sizes(FuzzedDataProvider& in, const CacheRecord& record) {
  const Index bad = in.PickValueInArray<Index>({0, -1, std::numeric_limits<Index>::min()});
  const bool paged = in.ConsumeBool();
  const int which = in.ConsumeIntegralInRange<int>(0, paged ? 3 : 1);
  Index sizes[4] = {4, 8, 2, 0};
  sizes[which] = which == 3 ? (bad == 0 ? -1 : bad) : bad;  // max_tokens_per_sequence 0 is valid
  const char* name = paged ? "PagedKvCache" : "ContiguousKvCache";
  trace("bad sizes for %s: argument %d = %ld", name, which, static_cast<long>(sizes[which]));
  for (int attempt = 0; attempt < 2; ++attempt) {
    try {
      if (paged && attempt == 0)
        PagedKvCache cache(record, sizes[0], sizes[1], sizes[2], sizes[3]);
      else if (paged)
        (void)PagedKvCache::footprint(record, sizes[0], sizes[1], sizes[2], sizes[3]);
      else if (attempt == 0)
        ContiguousKvCache cache(record, sizes[0], sizes[1]);
      else
        (void)ContiguousKvCache::footprint(record, sizes[0], sizes[1]);
    } catch (const tpattn::Error& error) {
      FUZZ_REQUIRE(error.call() == name, error.what());
      continue;
    } catch (const std::exception& error) {
      fail(__LINE__, std::string("bad sizes: not a tpattn::Error: ") + error.what());
    }
    fail(__LINE__, std::string(name) + (attempt == 0 ? " constructor" : "::footprint") +
                       " accepted argument " + std::to_string(which) + " = " + text(sizes[which]));
  }
}

void fuzz_one(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) check_bad_record(in);

  std::string description;
  const CacheRecord record = pick_record(in, description);
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) check_bad_sizes(in, record);

  Geometry geometry;
  geometry.paged = in.ConsumeBool();
  geometry.max_sequences = in.ConsumeIntegralInRange<Index>(1, 6);
  if (geometry.paged) {
    geometry.page_tokens = in.ConsumeIntegralInRange<Index>(1, 9);
    geometry.page_count = in.ConsumeIntegralInRange<Index>(1, 24);
    geometry.cap = in.ConsumeBool() ? in.ConsumeIntegralInRange<Index>(1, 60) : 0;
  } else {
    geometry.max_tokens = in.ConsumeIntegralInRange<Index>(1, 40);
  }
  const std::string name = geometry.paged ? "PagedKvCache" : "ContiguousKvCache";
  trace(
      "%s, record %s (%ld planes, %ld bytes per token), max_sequences %ld, max_tokens %ld, "
      "page_tokens %ld, page_count %ld, cap %ld",
      name.c_str(), description.c_str(), static_cast<long>(record.plane_count()),
      static_cast<long>(record.bytes_per_token()), static_cast<long>(geometry.max_sequences),
      static_cast<long>(geometry.max_tokens), static_cast<long>(geometry.page_tokens),
      static_cast<long>(geometry.page_count), static_cast<long>(geometry.cap));
  Session session(in, record, geometry, name);
  session.run(256);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    fuzz_one(data, size);
  } catch (const std::exception& error) {
    fail(__LINE__, std::string("unexpected exception: ") + error.what());
  } catch (...) {
    fail(__LINE__, "unexpected non-std exception");
  }
  return 0;
}
