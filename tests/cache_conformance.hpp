// tests/cache_conformance.hpp -- what every tpattn::KvCache must do, as a typed GoogleTest suite.
//
// The suite speaks only through the public KvCache interface and SequenceView, so it holds for
// any storage policy: tpattn's contiguous and paged caches, or an engine's own cache. To run it on
// a cache, give it a factory type:
//
//   struct MyCacheFactory {
//     using Storage = Eigen::bfloat16;          // float, Eigen::bfloat16 or Eigen::half:
//                                               // the storage of every plane the suite makes
//     static constexpr tpattn::Index block_tokens = 16;  // optional: the page size, so the
//                                               // suite aims its odd sizes at page edges
//     // A cache in which each of max_sequences sequences can hold capacity_tokens_per_sequence
//     // tokens at the same time. Invalid sizes (or an empty record) must throw tpattn::Error.
//     static std::unique_ptr<tpattn::KvCache> make(const tpattn::CacheRecord& record,
//                                                   tpattn::Index max_sequences,
//                                                   tpattn::Index capacity_tokens_per_sequence);
//   };
//
//   #include "support/counting_new.hpp"      // in exactly one TU of the executable
//   #include "cache_conformance.hpp"
//   namespace tpattn::test {                 // the suite's namespace, as gtest requires
//   INSTANTIATE_TYPED_TEST_SUITE_P(Mine, KvCacheConformance, ::testing::Types<MyCacheFactory>);
//   }
//
// What is checked (kv_cache.hpp states the guarantees):
//  - tokens read back through view() equal the appended fp32 input converted to the storage type,
//    bit for bit, for odd counts around the block size, one or many appends, many sequences;
//  - views are well formed (full blocks but the last, aligned rows) and stay valid while other
//    sequences change; prefix() cuts correctly;
//  - truncate keeps the head and gives back room; remove gives back room and a new sequence can
//    use all of it again;
//  - bytes_used() == tokens held x bytes_per_token(), for the spec's records (docs §5);
//  - every misuse throws tpattn::Error whose message names the call, the argument, the expected
//    value and the actual one, each in its own part of "tpattn: <call>: <argument>: expected
//    <expected>, got <actual>" and in tpattn's words (see Misuse), and leaves the cache exactly as
//    it was (lengths, room, bytes and every stored bit);
//  - append, view, length and truncate make no heap allocation once sequences are added.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/allocation_counter.hpp"
#include "tpattn/cache/kv_cache.hpp"

namespace tpattn::test {

// ---- values ------------------------------------------------------------------------------------

// What a plane of storage `type` must give back for the fp32 input x: x converted to that type.
inline float stored_value(StorageType type, float x) {
  switch (type) {
    case StorageType::f32: return x;
    case StorageType::bf16: return static_cast<float>(Eigen::bfloat16(x));
    case StorageType::f16: return static_cast<float>(Eigen::half(x));
  }
  return x;
}

// Exact comparison: bit patterns, so 0.0 and -0.0 differ.
inline bool same_bits(float a, float b) {
  std::uint32_t x = 0;
  std::uint32_t y = 0;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  return x == y;
}

// The tokens of one sequence in fp32, per plane: [plane][token * elements_per_token + element].
using PlaneData = std::vector<std::vector<float>>;

inline Index tokens_in(const CacheRecord& record, const PlaneData& data) {
  return data.empty() ? 0
                      : static_cast<Index>(data[0].size()) / record.plane(0).elements_per_token();
}

// n random tokens of every plane of a record, as fp32 input to append().
class TokenBatch {
 public:
  TokenBatch(const CacheRecord& record, Index n_tokens, std::mt19937& rng)
      : record_(record),
        n_tokens_(n_tokens),
        data_(static_cast<std::size_t>(record.plane_count())),
        inputs_(static_cast<std::size_t>(record.plane_count())) {
    // Not representable in bf16/f16, so the storage conversion is exercised.
    std::uniform_real_distribution<float> value(-4.0f, 4.0f);
    for (Index p = 0; p < record.plane_count(); ++p) {
      std::vector<float>& plane = data_[static_cast<std::size_t>(p)];
      plane.resize(static_cast<std::size_t>(n_tokens * record.plane(p).elements_per_token()));
      for (float& v : plane) v = value(rng);
    }
  }

  Index size() const { return n_tokens_; }
  Index plane_count() const { return record_.plane_count(); }
  const std::vector<float>& plane(Index p) const { return data_[static_cast<std::size_t>(p)]; }

  // append() arguments for the tokens from `first` on. Writes a preallocated array: no allocation.
  const PlaneInput* inputs(Index first = 0) {
    for (Index p = 0; p < record_.plane_count(); ++p) {
      const PlaneSpec& spec = record_.plane(p);
      inputs_[static_cast<std::size_t>(p)] = {
          data_[static_cast<std::size_t>(p)].data() + first * spec.elements_per_token(), spec.rows,
          spec.cols};
    }
    return inputs_.data();
  }

 private:
  CacheRecord record_;
  Index n_tokens_;
  std::vector<std::vector<float>> data_;
  std::vector<PlaneInput> inputs_;
};

// ---- the model: what each sequence must hold -------------------------------------------------

class ReferenceCache {
 public:
  explicit ReferenceCache(CacheRecord record) : record_(std::move(record)) {}

  const CacheRecord& record() const { return record_; }

  void add(SequenceId seq) {
    sequences_[seq] = PlaneData(static_cast<std::size_t>(record_.plane_count()));
  }
  void remove(SequenceId seq) { sequences_.erase(seq); }

  // Tokens [first, first + n) of the batch, converted to each plane's storage type.
  void append(SequenceId seq, const TokenBatch& batch, Index first, Index n) {
    PlaneData& data = sequences_.at(seq);
    for (Index p = 0; p < record_.plane_count(); ++p) {
      const Index width = record_.plane(p).elements_per_token();
      const StorageType storage = record_.plane(p).storage;
      const std::vector<float>& input = batch.plane(p);
      for (Index i = first * width; i < (first + n) * width; ++i)
        data[static_cast<std::size_t>(p)].push_back(
            stored_value(storage, input[static_cast<std::size_t>(i)]));
    }
  }

  void truncate(SequenceId seq, Index length) {
    PlaneData& data = sequences_.at(seq);
    for (Index p = 0; p < record_.plane_count(); ++p)
      data[static_cast<std::size_t>(p)].resize(
          static_cast<std::size_t>(length * record_.plane(p).elements_per_token()));
  }

  Index length(SequenceId seq) const { return tokens_in(record_, sequences_.at(seq)); }
  const PlaneData& data(SequenceId seq) const { return sequences_.at(seq); }
  const std::map<SequenceId, PlaneData>& sequences() const { return sequences_; }
  std::vector<SequenceId> ids() const {
    std::vector<SequenceId> ids;
    for (const auto& entry : sequences_) ids.push_back(entry.first);
    return ids;
  }
  Index tokens() const {
    Index total = 0;
    for (const auto& entry : sequences_) total += tokens_in(record_, entry.second);
    return total;
  }

 private:
  CacheRecord record_;
  std::map<SequenceId, PlaneData> sequences_;
};

// ---- reading a view --------------------------------------------------------------------------

namespace detail {

// Copies n elements of storage type T starting at `rows` into `out` as fp32. memcpy, so a
// misaligned plane is reported by the alignment check instead of being undefined behaviour here.
template <class T>
void read_elements(const T* rows, Index n, std::vector<float>& out) {
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(rows);
  for (Index i = 0; i < n; ++i) {
    T value;
    std::memcpy(static_cast<void*>(&value), bytes + i * static_cast<Index>(sizeof(T)), sizeof(T));
    out.push_back(static_cast<float>(value));
  }
}

template <class T>
::testing::AssertionResult read_plane_block(const SequenceView& view, Index p, Index b,
                                            std::vector<float>& out) {
  const T* rows = view.plane_block<T>(p, b);
  if (rows == nullptr)
    return ::testing::AssertionFailure() << "plane_block(" << p << ", " << b << ") is null";
  if (reinterpret_cast<std::uintptr_t>(rows) % alignof(T) != 0)
    return ::testing::AssertionFailure()
           << "plane_block(" << p << ", " << b << ") of plane '" << view.record().plane(p).name
           << "' (" << view.record().plane(p).storage << ") is at address "
           << static_cast<const void*>(rows) << ", not aligned to " << alignof(T) << " bytes";
  read_elements(rows, view.tokens_in_block(b) * view.elements_per_token(p), out);
  return ::testing::AssertionSuccess();
}

}  // namespace detail

// Checks that the view is well formed for `record` and reads all its tokens into *out.
inline ::testing::AssertionResult read_view(const SequenceView& view, const CacheRecord& record,
                                            PlaneData* out) {
  if (!(view.record() == record))
    return ::testing::AssertionFailure() << "view.record() is not the cache's record";
  const Index length = view.length();
  const Index block_tokens = view.block_tokens();
  if (length < 0) return ::testing::AssertionFailure() << "view length " << length;
  if (block_tokens < 1) return ::testing::AssertionFailure() << "block_tokens " << block_tokens;
  const Index blocks = (length + block_tokens - 1) / block_tokens;
  if (view.block_count() != blocks)
    return ::testing::AssertionFailure() << "block_count() " << view.block_count() << " for "
                                         << length << " tokens in blocks of " << block_tokens;
  for (Index p = 0; p < record.plane_count(); ++p)
    if (view.elements_per_token(p) != record.plane(p).elements_per_token())
      return ::testing::AssertionFailure()
             << "elements_per_token(" << p << ") " << view.elements_per_token(p);

  out->assign(static_cast<std::size_t>(record.plane_count()), {});
  Index seen = 0;
  for (Index b = 0; b < blocks; ++b) {
    const Index n = view.tokens_in_block(b);
    const bool last = b + 1 == blocks;
    if (n < 1 || n > block_tokens || (!last && n != block_tokens))
      return ::testing::AssertionFailure() << "tokens_in_block(" << b << ") = " << n << " of "
                                           << blocks << " blocks of " << block_tokens;
    for (Index p = 0; p < record.plane_count(); ++p) {
      std::vector<float>& plane = (*out)[static_cast<std::size_t>(p)];
      ::testing::AssertionResult read = ::testing::AssertionSuccess();
      switch (record.plane(p).storage) {
        case StorageType::f32: read = detail::read_plane_block<float>(view, p, b, plane); break;
        case StorageType::bf16:
          read = detail::read_plane_block<Eigen::bfloat16>(view, p, b, plane);
          break;
        case StorageType::f16:
          read = detail::read_plane_block<Eigen::half>(view, p, b, plane);
          break;
      }
      if (!read) return read;
    }
    seen += n;
  }
  if (seen != length)
    return ::testing::AssertionFailure() << "blocks hold " << seen << " tokens, length " << length;
  return ::testing::AssertionSuccess();
}

namespace detail {
template <class T>
float sum_of_rows(const SequenceView& view, Index p, Index b) {
  const T* rows = view.plane_block<T>(p, b);
  const Index n = view.tokens_in_block(b) * view.elements_per_token(p);
  float sum = 0.0f;
  for (Index i = 0; i < n; ++i) sum += static_cast<float>(rows[i]);
  return sum;
}
}  // namespace detail

// Reads every element of a view the way a kernel does (plain loads, no copies, no allocation).
inline float sum_of_view(const SequenceView& view) {
  float sum = 0.0f;
  for (Index b = 0; b < view.block_count(); ++b)
    for (Index p = 0; p < view.record().plane_count(); ++p) {
      switch (view.record().plane(p).storage) {
        case StorageType::f32: sum += detail::sum_of_rows<float>(view, p, b); break;
        case StorageType::bf16: sum += detail::sum_of_rows<Eigen::bfloat16>(view, p, b); break;
        case StorageType::f16: sum += detail::sum_of_rows<Eigen::half>(view, p, b); break;
      }
    }
  return sum;
}

// Same tokens, bit for bit; names the first difference.
inline ::testing::AssertionResult same_tokens(const CacheRecord& record, const PlaneData& expected,
                                              const PlaneData& actual) {
  if (expected.size() != actual.size())
    return ::testing::AssertionFailure()
           << actual.size() << " planes, expected " << expected.size();
  for (Index p = 0; p < record.plane_count(); ++p) {
    const std::vector<float>& want = expected[static_cast<std::size_t>(p)];
    const std::vector<float>& got = actual[static_cast<std::size_t>(p)];
    const Index width = record.plane(p).elements_per_token();
    if (want.size() != got.size())
      return ::testing::AssertionFailure()
             << "plane '" << record.plane(p).name << "' holds " << got.size() / width
             << " tokens, expected " << want.size() / width;
    for (std::size_t i = 0; i < want.size(); ++i)
      if (!same_bits(want[i], got[i]))
        return ::testing::AssertionFailure()
               << "plane '" << record.plane(p).name << "' token " << static_cast<Index>(i) / width
               << " element " << static_cast<Index>(i) % width << ": got " << got[i]
               << ", expected " << want[i];
  }
  return ::testing::AssertionSuccess();
}

// `seq` is live in the cache and holds exactly the model's tokens.
inline ::testing::AssertionResult holds(const KvCache& cache, const ReferenceCache& model,
                                        SequenceId seq) {
  if (!cache.contains(seq)) return ::testing::AssertionFailure() << "sequence " << seq << " gone";
  if (cache.length(seq) != model.length(seq))
    return ::testing::AssertionFailure() << "sequence " << seq << ": length " << cache.length(seq)
                                         << ", expected " << model.length(seq);
  PlaneData got;
  const SequenceView view = cache.view(seq);
  if (view.length() != model.length(seq))
    return ::testing::AssertionFailure() << "sequence " << seq << ": view length " << view.length()
                                         << ", expected " << model.length(seq);
  ::testing::AssertionResult read = read_view(view, cache.record(), &got);
  if (!read) return read << " (sequence " << seq << ")";
  ::testing::AssertionResult same = same_tokens(cache.record(), model.data(seq), got);
  if (!same) return same << " (sequence " << seq << ")";
  return ::testing::AssertionSuccess();
}

// Every sequence of the model holds its tokens, and the cache counts them exactly.
inline ::testing::AssertionResult holds_all(const KvCache& cache, const ReferenceCache& model) {
  const Index sequences = static_cast<Index>(model.sequences().size());
  if (cache.sequence_count() != sequences)
    return ::testing::AssertionFailure()
           << "sequence_count() " << cache.sequence_count() << ", expected " << sequences;
  if (cache.bytes_used() != model.tokens() * cache.bytes_per_token())
    return ::testing::AssertionFailure()
           << "bytes_used() " << cache.bytes_used() << " for " << model.tokens() << " tokens of "
           << cache.bytes_per_token() << " bytes";
  for (const auto& entry : model.sequences()) {
    ::testing::AssertionResult held = holds(cache, model, entry.first);
    if (!held) return held;
  }
  return ::testing::AssertionSuccess();
}

// ---- misuse ------------------------------------------------------------------------------------

// Everything observable about a cache, to show a rejected call changed nothing.
struct CacheSnapshot {
  struct Sequence {
    Index length = 0;
    Index tokens_available = 0;
    PlaneData data;
  };
  Index sequence_count = 0;
  Index max_sequences = 0;
  Index bytes_used = 0;
  Index bytes_reserved = 0;
  std::map<SequenceId, Sequence> sequences;
};

inline CacheSnapshot snapshot(const KvCache& cache, const std::vector<SequenceId>& live) {
  CacheSnapshot shot;
  shot.sequence_count = cache.sequence_count();
  shot.max_sequences = cache.max_sequences();
  shot.bytes_used = cache.bytes_used();
  shot.bytes_reserved = cache.bytes_reserved();
  for (SequenceId seq : live) {
    CacheSnapshot::Sequence& s = shot.sequences[seq];
    s.length = cache.length(seq);
    s.tokens_available = cache.tokens_available(seq);
    const ::testing::AssertionResult read = read_view(cache.view(seq), cache.record(), &s.data);
    EXPECT_TRUE(read) << "while taking a snapshot of sequence " << seq;
  }
  return shot;
}

inline ::testing::AssertionResult unchanged(const CacheRecord& record, const CacheSnapshot& before,
                                            const CacheSnapshot& after) {
  if (before.sequence_count != after.sequence_count)
    return ::testing::AssertionFailure()
           << "sequence_count " << before.sequence_count << " -> " << after.sequence_count;
  if (before.max_sequences != after.max_sequences)
    return ::testing::AssertionFailure()
           << "max_sequences " << before.max_sequences << " -> " << after.max_sequences;
  if (before.bytes_used != after.bytes_used)
    return ::testing::AssertionFailure()
           << "bytes_used " << before.bytes_used << " -> " << after.bytes_used;
  if (before.bytes_reserved != after.bytes_reserved)
    return ::testing::AssertionFailure()
           << "bytes_reserved " << before.bytes_reserved << " -> " << after.bytes_reserved;
  for (const auto& entry : before.sequences) {
    const CacheSnapshot::Sequence& was = entry.second;
    const CacheSnapshot::Sequence& now = after.sequences.at(entry.first);
    if (was.length != now.length)
      return ::testing::AssertionFailure()
             << "sequence " << entry.first << " length " << was.length << " -> " << now.length;
    if (was.tokens_available != now.tokens_available)
      return ::testing::AssertionFailure()
             << "sequence " << entry.first << " tokens_available " << was.tokens_available << " -> "
             << now.tokens_available;
    ::testing::AssertionResult same = same_tokens(record, was.data, now.data);
    if (!same) return same << " (sequence " << entry.first << " changed)";
  }
  return ::testing::AssertionSuccess();
}

// What a rejected call's tpattn::Error must say. Its message reads
// "tpattn: <call>: <argument>: expected <expected>, got <actual>" (core/error.hpp); each part is
// compared on its own, so a value quoted in the wrong part, or a part left out, fails. A field left
// empty is one the test cannot know (a factory's constructor name, say): that part must still be
// there, not empty.
struct Misuse {
  std::string call;      // the call; "append" also matches a qualified "PagedKvCache::append"
  std::string argument;  // exactly
  std::string expected;  // exactly, or followed by a gloss in parentheses: "<= 5 (room left ...)"
  std::string actual;    // exactly
};

// The four parts of a tpattn::Error's message, or a failure if it is not in that form.
struct ErrorParts {
  std::string call, argument, expected, actual;
};
inline ::testing::AssertionResult split_message(const tpattn::Error& error, ErrorParts* parts) {
  const std::string what = error.what();
  const std::string head = "tpattn: " + error.call() + ": " + error.argument() + ": expected ";
  if (what.compare(0, head.size(), head) != 0)
    return ::testing::AssertionFailure()
           << "message \"" << what << "\" does not start with \"" << head << "\"";
  // The first ", got ": the expected part is the library's words, the actual part may be a
  // caller's string.
  const std::string got = ", got ";
  const std::string::size_type at = what.find(got, head.size());
  if (at == std::string::npos)
    return ::testing::AssertionFailure() << "message \"" << what << "\" has no \"" << got << "\"";
  parts->call = error.call();
  parts->argument = error.argument();
  parts->expected = what.substr(head.size(), at - head.size());
  parts->actual = what.substr(at + got.size());
  return ::testing::AssertionSuccess();
}

inline bool part_matches(const std::string& part, const std::string& wanted) {
  return wanted.empty() ? !part.empty() : part == wanted;
}
inline bool call_matches(const std::string& call, const std::string& wanted) {
  if (wanted.empty() || call == wanted) return !call.empty();
  const std::string tail = "::" + wanted;
  return call.size() > tail.size() &&
         call.compare(call.size() - tail.size(), tail.size(), tail) == 0;
}
inline bool expected_matches(const std::string& expected, const std::string& wanted) {
  if (wanted.empty() || expected == wanted) return !expected.empty();
  const std::string open = wanted + " (";
  return expected.size() > open.size() + 1 && expected.compare(0, open.size(), open) == 0 &&
         expected.back() == ')';
}

// `call` throws tpattn::Error whose call, argument, expected and actual parts are `misuse`'s.
inline ::testing::AssertionResult throws_error(const std::function<void()>& call,
                                               const Misuse& misuse) {
  try {
    call();
  } catch (const tpattn::Error& error) {
    ErrorParts parts;
    ::testing::AssertionResult split = split_message(error, &parts);
    if (!split) return split;
    const auto mismatch = [&](const char* part, const std::string& seen,
                              const std::string& wanted) {
      return ::testing::AssertionFailure()
             << "message \"" << error.what() << "\": " << part << " is \"" << seen << "\", want "
             << (wanted.empty() ? std::string("any non-empty text") : "\"" + wanted + "\"");
    };
    if (!call_matches(parts.call, misuse.call)) return mismatch("call", parts.call, misuse.call);
    if (!part_matches(parts.argument, misuse.argument))
      return mismatch("argument", parts.argument, misuse.argument);
    if (!expected_matches(parts.expected, misuse.expected))
      return mismatch("expected", parts.expected, misuse.expected);
    if (!part_matches(parts.actual, misuse.actual))
      return mismatch("actual", parts.actual, misuse.actual);
    return ::testing::AssertionSuccess();
  } catch (const std::exception& other) {
    return ::testing::AssertionFailure() << "threw another exception: " << other.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw something that is not a std::exception";
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// `call` is rejected with tpattn::Error saying `misuse`, and the cache (its live sequences `live`
// included) is exactly as before.
inline ::testing::AssertionResult rejects(const KvCache& cache, const std::vector<SequenceId>& live,
                                          const std::function<void()>& call, const Misuse& misuse) {
  const CacheSnapshot before = snapshot(cache, live);
  ::testing::AssertionResult thrown = throws_error(call, misuse);
  if (!thrown) return thrown;
  return unchanged(cache.record(), before, snapshot(cache, live));
}

// ---- records -----------------------------------------------------------------------------------

struct NamedRecord {
  std::string name;
  CacheRecord record;
  Index elements_per_token;  // the spec's number
};

// docs/attention.md §5: h = 32, d_h = d_v = 128, and the paper's models (d_h = 64, R = 2).
inline std::vector<NamedRecord> spec_records(StorageType s) {
  return {
      {"MHA h32", records::gqa(32, 128, 128, s), 8192},
      {"GQA g8", records::gqa(8, 128, 128, s), 2048},
      {"MQA", records::gqa(1, 128, 128, s), 256},
      {"MLA 512+64", records::mla(512, 64, s), 576},
      {"TPA R1", records::tpa(32, 128, 128, 1, 1, s), 320},
      {"TPA R2", records::tpa(32, 128, 128, 2, 2, s), 640},
      {"small MHA", records::gqa(12, 64, 64, s), 1536},
      {"small GQA", records::gqa(2, 64, 64, s), 256},
      {"small MLA", records::mla(256, 32, s), 288},
      {"small TPA", records::tpa(34, 64, 64, 2, 2, s), 392},
      {"medium MHA", records::gqa(16, 64, 64, s), 2048},
      {"medium GQA", records::gqa(2, 64, 64, s), 256},
      {"medium MLA", records::mla(512, 32, s), 544},
      {"medium TPA", records::tpa(47, 64, 64, 2, 2, s), 444},
      {"large MHA", records::gqa(20, 64, 64, s), 2560},
      {"large GQA", records::gqa(2, 64, 64, s), 256},
      {"large MLA", records::mla(512, 32, s), 544},
      {"large TPA", records::tpa(61, 64, 64, 2, 2, s), 500},
      {"XL MHA", records::gqa(25, 64, 64, s), 3200},
      {"XL GQA", records::gqa(2, 64, 64, s), 256},
      {"XL MLA", records::mla(512, 32, s), 544},
      {"XL TPA", records::tpa(78, 64, 64, 2, 2, s), 568},
  };
}

// Small records with odd plane shapes, every operator's layout.
inline std::vector<NamedRecord> odd_records(StorageType s) {
  return {
      {"GQA 3x5 / 3x7", records::gqa(3, 5, 7, s), 36},
      {"MLA 11+3", records::mla(11, 3, s), 14},
      {"TPA h5 d6/3 R2/1", records::tpa(5, 6, 3, 2, 1, s), 30},
      {"one element", CacheRecord({{"x", 1, 1, s}}), 1},
  };
}

// ---- the suite ---------------------------------------------------------------------------------

// Factory::block_tokens if the factory gives one, else 16.
template <class Factory, class = void>
struct block_tokens_hint : std::integral_constant<Index, 16> {};
template <class Factory>
struct block_tokens_hint<Factory, std::void_t<decltype(Factory::block_tokens)>>
    : std::integral_constant<Index, Factory::block_tokens> {};

using CacheMaker = std::unique_ptr<KvCache> (*)(const CacheRecord& record, Index max_sequences,
                                                Index capacity_tokens_per_sequence);

// The checks themselves, one member function per test. Not a template: they are compiled once,
// however many caches the suite is instantiated on; the typed fixture only supplies the factory.
class CacheConformanceChecks : public ::testing::Test {
 protected:
  CacheConformanceChecks(CacheMaker make, StorageType storage, Index block)
      : make_(make), storage_(storage), block_(block) {}

  std::unique_ptr<KvCache> make(const CacheRecord& record, Index max_sequences,
                                Index capacity) const {
    std::unique_ptr<KvCache> cache = make_(record, max_sequences, capacity);
    EXPECT_NE(cache, nullptr);
    return cache;
  }

  // The main small record: planes of different widths (K 3x5, V 3x7).
  CacheRecord small_record() const { return records::gqa(3, 5, 7, storage_); }

  // 1, 17, 113 and the block size -1, 0, +1 (and twice the block + 1), without repeats.
  std::vector<Index> odd_counts() const {
    std::vector<Index> counts = {1, 17, block_ - 1, block_, block_ + 1, 2 * block_ + 1, 113};
    counts.erase(std::remove_if(counts.begin(), counts.end(), [](Index n) { return n < 1; }),
                 counts.end());
    std::sort(counts.begin(), counts.end());
    counts.erase(std::unique(counts.begin(), counts.end()), counts.end());
    return counts;
  }

  Index random_in(Index low, Index high) {  // inclusive
    return std::uniform_int_distribution<Index>(low, high)(rng_);
  }

  // Appends n fresh random tokens to seq, in the cache and the model.
  void append_random(KvCache& cache, ReferenceCache& model, SequenceId seq, Index n) {
    TokenBatch batch(cache.record(), n, rng_);
    cache.append(seq, n, batch.inputs(), batch.plane_count());
    model.append(seq, batch, 0, n);
  }

  // ---- bookkeeping -----------------------------------------------------------------------------

  void new_sequences_are_empty_live_and_counted() {
    const CacheRecord record = small_record();
    auto cache = make(record, 4, 20);
    EXPECT_TRUE(cache->record() == record);
    EXPECT_EQ(cache->max_sequences(), 4);
    EXPECT_EQ(cache->sequence_count(), 0);
    EXPECT_EQ(cache->bytes_used(), 0);

    std::vector<SequenceId> ids;
    for (Index i = 0; i < 4; ++i) {
      const SequenceId seq = cache->add_sequence();
      EXPECT_TRUE(cache->contains(seq));
      EXPECT_EQ(std::count(ids.begin(), ids.end(), seq), 0) << "id " << seq << " handed out twice";
      ids.push_back(seq);
      EXPECT_EQ(cache->sequence_count(), i + 1);
      EXPECT_EQ(cache->length(seq), 0);
      EXPECT_GE(cache->tokens_available(seq), 20);
      const SequenceView view = cache->view(seq);
      EXPECT_EQ(view.length(), 0);
      EXPECT_EQ(view.block_count(), 0);
    }
    EXPECT_EQ(cache->bytes_used(), 0);
    cache->remove_sequence(ids[1]);
    EXPECT_FALSE(cache->contains(ids[1]));
    EXPECT_EQ(cache->sequence_count(), 3);
    for (SequenceId seq : {ids[0], ids[2], ids[3]}) EXPECT_TRUE(cache->contains(seq));
  }

  void bytes_used_is_tokens_times_spec_bytes_per_token() {
    const Index element = element_bytes(storage_);
    for (const NamedRecord& spec : spec_records(storage_)) {
      SCOPED_TRACE(spec.name);
      EXPECT_EQ(spec.record.elements_per_token(), spec.elements_per_token);
      EXPECT_EQ(spec.record.bytes_per_token(), spec.elements_per_token * element);

      auto cache = make(spec.record, 2, 5);
      EXPECT_EQ(cache->bytes_per_token(), spec.elements_per_token * element);
      EXPECT_GE(cache->bytes_reserved(), 2 * 5 * cache->bytes_per_token());
      ReferenceCache model(spec.record);
      const SequenceId a = cache->add_sequence();
      const SequenceId b = cache->add_sequence();
      model.add(a);
      model.add(b);
      append_random(*cache, model, a, 3);
      EXPECT_EQ(cache->bytes_used(), 3 * spec.elements_per_token * element);
      append_random(*cache, model, b, 5);
      append_random(*cache, model, a, 2);
      EXPECT_EQ(cache->bytes_used(), 10 * spec.elements_per_token * element);
      cache->truncate(a, 1);
      model.truncate(a, 1);
      EXPECT_EQ(cache->bytes_used(), 6 * spec.elements_per_token * element);
      EXPECT_TRUE(holds_all(*cache, model));
      cache->remove_sequence(b);
      model.remove(b);
      EXPECT_EQ(cache->bytes_used(), 1 * spec.elements_per_token * element);
    }
  }

  // ---- round trips -----------------------------------------------------------------------------

  void round_trips_odd_counts_in_one_or_many_appends() {
    for (const NamedRecord& named : odd_records(storage_)) {
      for (Index count : odd_counts()) {
        SCOPED_TRACE(named.name + ", " + std::to_string(count) + " tokens");
        // Three sequences filled to the requested capacity at the same time.
        auto cache = make(named.record, 3, count);
        ReferenceCache model(named.record);
        const SequenceId whole = cache->add_sequence();
        const SequenceId chunks = cache->add_sequence();
        const SequenceId singles = cache->add_sequence();
        for (SequenceId seq : {whole, chunks, singles}) model.add(seq);

        append_random(*cache, model, whole, count);  // one call
        ASSERT_TRUE(holds(*cache, model, whole));

        while (model.length(chunks) < count) {  // random sizes, often across block edges
          const Index n = random_in(1, std::min(count - model.length(chunks), 2 * block_ + 1));
          append_random(*cache, model, chunks, n);
          ASSERT_TRUE(holds(*cache, model, chunks)) << "after appending " << n;
        }
        while (model.length(singles) < count)  // decode: one token at a time
          append_random(*cache, model, singles, 1);
        ASSERT_TRUE(holds_all(*cache, model));
      }
    }
  }

  void prefix_of_a_view_is_its_first_tokens() {
    const CacheRecord record = small_record();
    const Index block = block_;
    const Index length = 2 * block + 5;
    auto cache = make(record, 1, length);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    model.add(seq);
    append_random(*cache, model, seq, length);
    const SequenceView view = cache->view(seq);
    for (Index cut : {Index(0), Index(1), block - 1, block, block + 1, length - 1, length}) {
      if (cut < 0) continue;
      SCOPED_TRACE("prefix " + std::to_string(cut));
      const SequenceView prefix = view.prefix(cut);
      EXPECT_EQ(prefix.length(), cut);
      PlaneData got;
      ASSERT_TRUE(read_view(prefix, record, &got));
      PlaneData want = model.data(seq);
      for (Index p = 0; p < record.plane_count(); ++p)
        want[static_cast<std::size_t>(p)].resize(
            static_cast<std::size_t>(cut * record.plane(p).elements_per_token()));
      EXPECT_TRUE(same_tokens(record, want, got));
    }
  }

  void interleaved_sequences_each_keep_their_own_tokens() {
    const CacheRecord record = small_record();
    const Index capacity = 113;
    auto cache = make(record, 6, capacity);
    ReferenceCache model(record);
    std::vector<SequenceId> seqs;
    for (int i = 0; i < 5; ++i) {
      seqs.push_back(cache->add_sequence());
      model.add(seqs.back());
    }
    for (int step = 0; step < 150; ++step) {
      const std::size_t pick = static_cast<std::size_t>(random_in(0, 4));
      const SequenceId seq = seqs[pick];
      const SequenceId other = seqs[(pick + 1) % seqs.size()];
      // A view of another sequence stays valid while this one changes.
      const SequenceView other_view = cache->view(other);
      const Index room = capacity - model.length(seq);
      if (room == 0 || step % 13 == 12) {
        const Index keep = random_in(0, model.length(seq));
        cache->truncate(seq, keep);
        model.truncate(seq, keep);
      } else {
        append_random(*cache, model, seq, random_in(1, std::min(room, 2 * block_ + 1)));
      }
      PlaneData seen;
      ASSERT_TRUE(read_view(other_view, record, &seen)) << "step " << step;
      ASSERT_TRUE(same_tokens(record, model.data(other), seen))
          << "step " << step << ": view of sequence " << other << " taken before changing " << seq;
      if (step % 10 == 0) {
        ASSERT_TRUE(holds_all(*cache, model)) << "step " << step;
      }
    }
    ASSERT_TRUE(holds_all(*cache, model));
  }

  void every_sequence_fills_to_capacity_at_once() {
    const CacheRecord record = small_record();
    const Index capacity = 3 * block_ + 2;
    auto cache = make(record, 4, capacity);
    ReferenceCache model(record);
    std::vector<SequenceId> seqs;
    for (int i = 0; i < 4; ++i) {
      seqs.push_back(cache->add_sequence());
      model.add(seqs.back());
    }
    // Round robin, so no sequence can grab room meant for another.
    for (Index filled = 0; filled < capacity;) {
      const Index n = std::min(capacity - filled, random_in(1, block_ + 1));
      for (SequenceId seq : seqs) {
        ASSERT_GE(cache->tokens_available(seq), capacity - filled) << "sequence " << seq;
        append_random(*cache, model, seq, n);
      }
      filled += n;
    }
    EXPECT_TRUE(holds_all(*cache, model));
    EXPECT_EQ(cache->bytes_used(), 4 * capacity * cache->bytes_per_token());
    EXPECT_GE(cache->bytes_reserved(), cache->bytes_used());
  }

  // ---- truncate --------------------------------------------------------------------------------

  void truncate_keeps_the_head_and_append_replaces_the_tail() {
    const CacheRecord record = small_record();
    const Index block = block_;
    const Index length = std::max<Index>(80, 3 * block + 3);
    auto cache = make(record, 2, length);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId bystander = cache->add_sequence();
    model.add(seq);
    model.add(bystander);
    append_random(*cache, model, bystander, length / 2);
    append_random(*cache, model, seq, length);
    for (Index cut : {length - 1, block + 1, block, block - 1, Index(1), length / 2, Index(0),
                      2 * block, length}) {
      if (cut < 0 || cut > length) continue;
      SCOPED_TRACE("cut at " + std::to_string(cut));
      cache->truncate(seq, cut);
      model.truncate(seq, cut);
      ASSERT_EQ(cache->length(seq), cut);
      ASSERT_TRUE(holds_all(*cache, model));
      // New tokens in place of the cut ones, in two appends.
      const Index refill = length - cut;
      if (refill > 0) {
        const Index first = random_in(1, refill);
        append_random(*cache, model, seq, first);
        if (refill > first) append_random(*cache, model, seq, refill - first);
      }
      ASSERT_TRUE(holds_all(*cache, model));
    }
  }

  void truncate_to_the_same_length_changes_nothing() {
    const CacheRecord record = small_record();
    auto cache = make(record, 3, 40);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId other = cache->add_sequence();
    model.add(seq);
    model.add(other);
    append_random(*cache, model, seq, std::min<Index>(40, 2 * block_ + 1));
    append_random(*cache, model, other, 7);
    const CacheSnapshot before = snapshot(*cache, {seq, other});
    cache->truncate(seq, model.length(seq));
    EXPECT_TRUE(unchanged(record, before, snapshot(*cache, {seq, other})));
    const SequenceId empty = cache->add_sequence();  // truncating an empty sequence to 0
    cache->truncate(empty, 0);
    EXPECT_EQ(cache->length(empty), 0);
    cache->remove_sequence(empty);
    EXPECT_TRUE(unchanged(record, before, snapshot(*cache, {seq, other})));
  }

  void truncate_to_zero_empties_the_sequence_for_reuse() {
    const CacheRecord record = small_record();
    const Index capacity = 2 * block_ + 3;
    auto cache = make(record, 2, capacity);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId other = cache->add_sequence();
    model.add(seq);
    model.add(other);
    const Index fresh_room = cache->tokens_available(seq);
    append_random(*cache, model, other, 5);
    append_random(*cache, model, seq, capacity);
    cache->truncate(seq, 0);
    model.truncate(seq, 0);
    EXPECT_EQ(cache->length(seq), 0);
    EXPECT_EQ(cache->view(seq).length(), 0);
    EXPECT_EQ(cache->view(seq).block_count(), 0);
    EXPECT_EQ(cache->bytes_used(), 5 * cache->bytes_per_token());
    EXPECT_GE(cache->tokens_available(seq), capacity);
    EXPECT_TRUE(holds_all(*cache, model));
    append_random(*cache, model, seq, capacity);  // the whole capacity again
    EXPECT_TRUE(holds_all(*cache, model));
    cache->remove_sequence(other);
    model.remove(other);
    cache->truncate(seq, 0);
    model.truncate(seq, 0);
    EXPECT_EQ(cache->tokens_available(seq), fresh_room) << "room not given back by truncate";
    EXPECT_EQ(cache->bytes_used(), 0);
  }

  // For a sequence alone in the cache, length + tokens_available is constant: appending takes room,
  // truncating gives exactly that room back.
  void truncate_gives_back_the_room_it_frees() {
    const CacheRecord record = small_record();
    auto cache = make(record, 1, 3 * block_ + 4);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    model.add(seq);
    const Index total = cache->tokens_available(seq);
    ASSERT_GE(total, 3 * block_ + 4);
    for (int step = 0; step < 40; ++step) {
      const Index length = model.length(seq);
      if (step % 3 == 2) {
        const Index keep = random_in(0, length);
        cache->truncate(seq, keep);
        model.truncate(seq, keep);
      } else if (length < total) {
        append_random(*cache, model, seq, random_in(1, std::min(total - length, block_ + 2)));
      }
      ASSERT_EQ(cache->length(seq) + cache->tokens_available(seq), total) << "step " << step;
    }
    EXPECT_TRUE(holds_all(*cache, model));
  }

  // ---- remove ----------------------------------------------------------------------------------

  void removed_sequence_memory_serves_a_new_sequence() {
    const CacheRecord record = small_record();
    const Index capacity = 2 * block_ + 1;
    const Index max_sequences = 3;
    auto cache = make(record, max_sequences, capacity);
    const Index reserved = cache->bytes_reserved();
    ReferenceCache model(record);
    for (Index i = 0; i < max_sequences; ++i) {
      const SequenceId seq = cache->add_sequence();
      model.add(seq);
      append_random(*cache, model, seq, capacity);
    }
    ASSERT_TRUE(holds_all(*cache, model));
    // Remove and re-add many times over: a leak of room would show within a few cycles.
    for (int cycle = 0; cycle < 4 * max_sequences; ++cycle) {
      const std::vector<SequenceId> ids = model.ids();
      const SequenceId victim = ids[static_cast<std::size_t>(random_in(0, max_sequences - 1))];
      cache->remove_sequence(victim);
      model.remove(victim);
      EXPECT_FALSE(cache->contains(victim));
      EXPECT_EQ(cache->sequence_count(), max_sequences - 1);
      EXPECT_EQ(cache->bytes_used(), (max_sequences - 1) * capacity * cache->bytes_per_token());
      const SequenceId seq = cache->add_sequence();
      model.add(seq);
      EXPECT_EQ(cache->length(seq), 0);
      ASSERT_GE(cache->tokens_available(seq), capacity) << "cycle " << cycle;
      append_random(*cache, model, seq, capacity);
      ASSERT_TRUE(holds_all(*cache, model)) << "cycle " << cycle;
      EXPECT_EQ(cache->bytes_reserved(), reserved);
    }
  }

  void remove_gives_back_all_the_room_of_a_lone_sequence() {
    const CacheRecord record = small_record();
    auto cache = make(record, 2, 2 * block_ + 3);
    ReferenceCache model(record);
    SequenceId seq = cache->add_sequence();
    model.add(seq);
    const Index room = cache->tokens_available(seq);
    for (int cycle = 0; cycle < 5; ++cycle) {
      append_random(*cache, model, seq, room);  // everything it may take
      EXPECT_EQ(cache->tokens_available(seq), 0);
      ASSERT_TRUE(holds_all(*cache, model));
      cache->remove_sequence(seq);
      model.remove(seq);
      EXPECT_EQ(cache->sequence_count(), 0);
      EXPECT_EQ(cache->bytes_used(), 0);
      seq = cache->add_sequence();
      model.add(seq);
      ASSERT_EQ(cache->tokens_available(seq), room) << "cycle " << cycle;
    }
  }

  // ---- misuse ----------------------------------------------------------------------------------

  void unknown_sequence_is_rejected_by_every_operation() {
    const CacheRecord record = small_record();
    auto cache = make(record, 4, 30);
    ReferenceCache model(record);
    for (int i = 0; i < 3; ++i) {
      const SequenceId seq = cache->add_sequence();
      model.add(seq);
      append_random(*cache, model, seq, 5 + 3 * i);
    }
    const SequenceId removed = model.ids().back();
    cache->remove_sequence(removed);
    model.remove(removed);
    SequenceId never_added = 0;
    while (cache->contains(never_added) || never_added == removed) ++never_added;
    const std::vector<SequenceId> live = model.ids();

    TokenBatch batch(record, 1, rng_);
    for (SequenceId seq :
         {removed, never_added, SequenceId(-1), SequenceId(-987654321), SequenceId(987654321),
          std::numeric_limits<SequenceId>::max(), std::numeric_limits<SequenceId>::min()}) {
      SCOPED_TRACE("sequence id " + std::to_string(seq));
      const std::string id = std::to_string(seq);
      const std::string live_id = "a live sequence id";
      EXPECT_FALSE(cache->contains(seq));
      KvCache& c = *cache;
      EXPECT_TRUE(rejects(c, live, [&] { (void)c.length(seq); }, {"length", "seq", live_id, id}));
      EXPECT_TRUE(rejects(c, live, [&] { (void)c.tokens_available(seq); },
                          {"tokens_available", "seq", live_id, id}));
      EXPECT_TRUE(rejects(c, live, [&] { (void)c.view(seq); }, {"view", "seq", live_id, id}));
      EXPECT_TRUE(rejects(c, live, [&] { c.append(seq, 1, batch.inputs(), batch.plane_count()); },
                          {"append", "seq", live_id, id}));
      EXPECT_TRUE(rejects(c, live, [&] { c.truncate(seq, 0); }, {"truncate", "seq", live_id, id}));
      EXPECT_TRUE(rejects(c, live, [&] { c.remove_sequence(seq); },
                          {"remove_sequence", "seq", live_id, id}));
    }
    EXPECT_TRUE(holds_all(*cache, model));
  }

  void add_sequence_beyond_max_sequences_is_rejected() {
    const CacheRecord record = small_record();
    auto cache = make(record, 3, 10);
    ReferenceCache model(record);
    for (int i = 0; i < 3; ++i) {
      const SequenceId seq = cache->add_sequence();
      model.add(seq);
      append_random(*cache, model, seq, 2 + i);
    }
    KvCache& c = *cache;
    // The count the call would make, against the cache's maximum.
    const Misuse full{"add_sequence", "sequence count", "at most 3 live sequences", "4"};
    EXPECT_TRUE(rejects(
        c, model.ids(), [&] { (void)c.add_sequence(); }, full));
    EXPECT_TRUE(rejects(
        c, model.ids(), [&] { (void)c.add_sequence(); }, full));
    EXPECT_TRUE(holds_all(*cache, model));
    // Room for exactly one more after a removal.
    const SequenceId gone = model.ids().front();
    cache->remove_sequence(gone);
    model.remove(gone);
    const SequenceId seq = cache->add_sequence();
    model.add(seq);
    EXPECT_TRUE(rejects(
        c, model.ids(), [&] { (void)c.add_sequence(); }, full));
    EXPECT_TRUE(holds_all(*cache, model));
  }

  void append_with_wrong_planes_is_rejected() {
    const CacheRecord record = records::tpa(5, 6, 3, 2, 1, storage_);
    const Index planes = record.plane_count();
    auto cache = make(record, 2, 40);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId other = cache->add_sequence();
    model.add(seq);
    model.add(other);
    append_random(*cache, model, seq, std::min<Index>(30, block_ + 1));
    append_random(*cache, model, other, 3);
    const std::vector<SequenceId> live = model.ids();
    KvCache& c = *cache;

    // Inputs big enough for any shape tried below, so a cache that reads before it checks shows
    // up as a changed cache rather than a crash.
    const Index n = 2;
    std::vector<float> big(static_cast<std::size_t>(n * 9000 * 8), 0.5f);
    std::vector<PlaneInput> good(static_cast<std::size_t>(planes + 1));
    for (Index p = 0; p < planes; ++p)
      good[static_cast<std::size_t>(p)] = {big.data(), record.plane(p).rows, record.plane(p).cols};
    good[static_cast<std::size_t>(planes)] = {big.data(), 1, 1};

    const auto shape = [](Index rows, Index cols) {
      return std::to_string(rows) + " x " + std::to_string(cols);
    };
    // Plane p's argument, named by its place and the record's name for it.
    const auto plane_argument = [&](Index p, const std::string& what) {
      return "planes[" + std::to_string(p) + "] (" + record.plane(p).name + ") " + what;
    };

    for (Index count : {Index(0), planes - 1, planes + 1, Index(-1)}) {
      SCOPED_TRACE("plane count " + std::to_string(count));
      EXPECT_TRUE(
          rejects(c, live, [&] { c.append(seq, n, good.data(), count); },
                  {"append", "planes", std::to_string(planes) + " planes", std::to_string(count)}));
    }
    EXPECT_TRUE(rejects(c, live, [&] { c.append(seq, n, nullptr, planes); },
                        {"append", "planes", "non-null", "null"}));
    for (Index p = 0; p < planes; ++p) {
      SCOPED_TRACE("plane " + record.plane(p).name);
      const Index rows = record.plane(p).rows;
      const Index cols = record.plane(p).cols;
      std::vector<PlaneInput> bad = good;
      PlaneInput& plane = bad[static_cast<std::size_t>(p)];
      plane.rows = 9001 + p;  // distinctive values, so the message must quote them
      EXPECT_TRUE(rejects(
          c, live, [&] { c.append(seq, n, bad.data(), planes); },
          {"append", plane_argument(p, "shape"), shape(rows, cols), shape(9001 + p, cols)}));
      plane = good[static_cast<std::size_t>(p)];
      plane.cols = 7001 + p;
      EXPECT_TRUE(rejects(
          c, live, [&] { c.append(seq, n, bad.data(), planes); },
          {"append", plane_argument(p, "shape"), shape(rows, cols), shape(rows, 7001 + p)}));
      plane = good[static_cast<std::size_t>(p)];
      plane.rows = 0;
      EXPECT_TRUE(
          rejects(c, live, [&] { c.append(seq, n, bad.data(), planes); },
                  {"append", plane_argument(p, "shape"), shape(rows, cols), shape(0, cols)}));
      plane = good[static_cast<std::size_t>(p)];
      plane.data = nullptr;
      EXPECT_TRUE(rejects(c, live, [&] { c.append(seq, n, bad.data(), planes); },
                          {"append", plane_argument(p, "data"), "non-null", "null"}));
    }
    // Planes in a different order: every shape differs from the record's, so the first plane is
    // refused, quoting the last plane's shape.
    std::vector<PlaneInput> reversed(good.begin(), good.begin() + planes);
    std::reverse(reversed.begin(), reversed.end());
    const PlaneSpec& first = record.plane(0);
    const PlaneSpec& last = record.plane(planes - 1);
    ASSERT_NE(shape(first.rows, first.cols), shape(last.rows, last.cols));
    EXPECT_TRUE(rejects(c, live, [&] { c.append(seq, n, reversed.data(), planes); },
                        {"append", plane_argument(0, "shape"), shape(first.rows, first.cols),
                         shape(last.rows, last.cols)}));
    EXPECT_TRUE(holds_all(*cache, model));
  }

  void append_of_no_or_negative_tokens_is_rejected() {
    const CacheRecord record = small_record();
    auto cache = make(record, 2, 20);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId empty = cache->add_sequence();
    model.add(seq);
    model.add(empty);
    append_random(*cache, model, seq, 4);
    TokenBatch batch(record, 4, rng_);
    KvCache& c = *cache;
    for (SequenceId target : {seq, empty}) {
      for (Index n : {Index(0), Index(-1), Index(-12345), std::numeric_limits<Index>::min()}) {
        SCOPED_TRACE("n_tokens " + std::to_string(n));
        EXPECT_TRUE(rejects(c, model.ids(),
                            [&] { c.append(target, n, batch.inputs(), batch.plane_count()); },
                            {"append", "n_tokens", ">= 1", std::to_string(n)}));
      }
    }
    EXPECT_TRUE(holds_all(*cache, model));
  }

  // A partial fit must write nothing: not the tokens that would fit, not a claimed block.
  void append_beyond_the_room_is_rejected_without_writing_anything() {
    const CacheRecord record = small_record();
    const Index capacity = 2 * block_ + 3;
    auto cache = make(record, 2, capacity);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId other = cache->add_sequence();
    model.add(seq);
    model.add(other);
    append_random(*cache, model, other, 3);
    KvCache& c = *cache;

    // The largest batch that could ever be needed below.
    TokenBatch batch(record, cache->tokens_available(seq) + 2, rng_);
    // The bound quoted is the room tokens_available() reports; how the room arises (a region,
    // free pages) is the cache's own gloss.
    const auto too_many = [&](SequenceId target, Index n) {
      SCOPED_TRACE("length " + std::to_string(model.length(target)) + ", appending " +
                   std::to_string(n));
      const std::string room = "<= " + std::to_string(c.tokens_available(target));
      EXPECT_TRUE(rejects(c, model.ids(),
                          [&] { c.append(target, n, batch.inputs(), batch.plane_count()); },
                          {"append", "n_tokens", room, std::to_string(n)}));
    };
    too_many(seq, cache->tokens_available(seq) + 1);  // empty sequence
    too_many(seq, std::numeric_limits<Index>::max());
    append_random(*cache, model, seq, std::max<Index>(1, block_ - 1));
    too_many(seq, cache->tokens_available(seq) + 1);  // partly filled last block
    append_random(*cache, model, seq, 2);
    too_many(seq, cache->tokens_available(seq) + 1);
    too_many(seq, std::numeric_limits<Index>::max());
    EXPECT_TRUE(holds_all(*cache, model));

    // Exactly the room fits; then not one more token.
    const Index room = cache->tokens_available(seq);
    ASSERT_GE(room, 1);
    append_random(*cache, model, seq, room);
    EXPECT_EQ(cache->tokens_available(seq), 0);
    too_many(seq, 1);
    EXPECT_TRUE(holds_all(*cache, model));
  }

  void truncate_outside_the_sequence_is_rejected() {
    const CacheRecord record = small_record();
    auto cache = make(record, 2, 30);
    ReferenceCache model(record);
    const SequenceId seq = cache->add_sequence();
    const SequenceId empty = cache->add_sequence();
    model.add(seq);
    model.add(empty);
    append_random(*cache, model, seq, 17);
    KvCache& c = *cache;
    for (SequenceId target : {seq, empty}) {
      const Index length = model.length(target);
      for (Index bad : {length + 1, Index(987654), Index(-1), Index(-4242),
                        std::numeric_limits<Index>::max(), std::numeric_limits<Index>::min()}) {
        SCOPED_TRACE("truncate to " + std::to_string(bad) + " of " + std::to_string(length));
        EXPECT_TRUE(rejects(c, model.ids(), [&] { c.truncate(target, bad); },
                            {"truncate", "new_length", "in [0, " + std::to_string(length) + "]",
                             std::to_string(bad)}));
      }
    }
    EXPECT_TRUE(holds_all(*cache, model));
  }

  // Which constructor argument a bad size reaches is the factory's choice, so only the message's
  // form is checked: a call, an argument, an expected and an actual part.
  void make_rejects_non_positive_sizes() {
    const CacheRecord record = small_record();
    for (Index max_sequences : {Index(0), Index(-1)})
      EXPECT_TRUE(throws_error([&] { (void)make_(record, max_sequences, 8); }, Misuse{}))
          << "max_sequences " << max_sequences;
    for (Index capacity : {Index(0), Index(-5)})
      EXPECT_TRUE(throws_error([&] { (void)make_(record, 2, capacity); }, Misuse{}))
          << "capacity " << capacity;
  }

  // A default-constructed CacheRecord has no planes, which CacheRecord's own constructor forbids:
  // a cache must not accept it either.
  void make_rejects_a_record_without_planes() {
    EXPECT_TRUE(throws_error([&] { (void)make_(CacheRecord(), 2, 8); },
                             {"", "record", "at least one plane", "0"}));
  }

  // ---- allocation ------------------------------------------------------------------------------

  void sequence_changes_appends_and_views_do_not_allocate() {
    ASSERT_TRUE(AllocationCounter::installed())
        << "include support/counting_new.hpp in exactly one TU of this test executable";
    const CacheRecord record = small_record();
    const Index block = block_;
    const Index capacity = 4 * block + 3;
    auto cache = make(record, 3, capacity);
    const SequenceId a = cache->add_sequence();
    const SequenceId b = cache->add_sequence();
    TokenBatch batch(record, capacity, rng_);
    const PlaneInput* input = batch.inputs();  // tokens from 0
    const Index planes = batch.plane_count();

    // Reads every element through the view, as a kernel would.
    const auto touch = [&](SequenceId seq) {
      return sum_of_view(cache->view(seq)) + static_cast<float>(cache->length(seq));
    };

    float sink = 0.0f;
    std::uint64_t allocations = 0;
    {
      const AllocationCounter counter;
      for (Index t = 0; t < block + 2; ++t) {  // decode into a fresh sequence, across a block edge
        cache->append(a, 1, input, planes);
        sink += touch(a);
      }
      cache->append(b, 2 * block + 1, input, planes);  // prefill across blocks
      sink += touch(b);
      cache->truncate(a, 1);
      cache->truncate(b, block);
      cache->append(a, block + 1, input, planes);
      cache->truncate(b, 0);
      cache->append(b, 1, input, planes);
      cache->truncate(b, 1);
      sink += touch(a) + touch(b);
      sink += static_cast<float>(cache->tokens_available(a) + cache->bytes_used() +
                                 cache->sequence_count() + (cache->contains(b) ? 1 : 0));
      allocations = counter.allocations();
    }
    EXPECT_EQ(allocations, 0u) << "heap allocations in append/view/length/truncate";
    EXPECT_TRUE(std::isfinite(sink));
    EXPECT_EQ(cache->length(a), block + 2);
    EXPECT_EQ(cache->length(b), 1);

    // Removing a sequence, adding one into its slot and into a slot never used before, and
    // appending to them allocate nothing either.
    SequenceId c = -1, d = -1;
    {
      const AllocationCounter counter;
      cache->remove_sequence(a);
      c = cache->add_sequence();
      d = cache->add_sequence();  // the third slot, first use
      cache->append(d, 1, input, planes);
      cache->append(c, 2 * block + 1, input, planes);
      sink += touch(c);
      cache->truncate(c, block - 1 > 0 ? block - 1 : 0);
      cache->append(c, 2, input, planes);
      allocations = counter.allocations();
    }
    EXPECT_EQ(allocations, 0u) << "heap allocations in remove/add_sequence or appending after";
    EXPECT_EQ(cache->length(d), 1);
    EXPECT_TRUE(std::isfinite(sink));
  }

  CacheMaker make_;
  StorageType storage_;
  Index block_;
  std::mt19937 rng_{0x7a77e57u};
};

template <class Factory>
class KvCacheConformance : public CacheConformanceChecks {
 protected:
  static_assert(is_storage_type_v<typename Factory::Storage>,
                "Factory::Storage: float, Eigen::bfloat16 or Eigen::half");
  static_assert(block_tokens_hint<Factory>::value >= 1, "Factory::block_tokens >= 1");

  KvCacheConformance()
      : CacheConformanceChecks(&Factory::make, storage_type_of<typename Factory::Storage>,
                               block_tokens_hint<Factory>::value) {}
};

TYPED_TEST_SUITE_P(KvCacheConformance);

TYPED_TEST_P(KvCacheConformance, NewSequencesAreEmptyLiveAndCounted) {
  this->new_sequences_are_empty_live_and_counted();
}
TYPED_TEST_P(KvCacheConformance, BytesUsedIsTokensTimesSpecBytesPerToken) {
  this->bytes_used_is_tokens_times_spec_bytes_per_token();
}
TYPED_TEST_P(KvCacheConformance, RoundTripsOddCountsInOneOrManyAppends) {
  this->round_trips_odd_counts_in_one_or_many_appends();
}
TYPED_TEST_P(KvCacheConformance, PrefixOfAViewIsItsFirstTokens) {
  this->prefix_of_a_view_is_its_first_tokens();
}
TYPED_TEST_P(KvCacheConformance, InterleavedSequencesEachKeepTheirOwnTokens) {
  this->interleaved_sequences_each_keep_their_own_tokens();
}
TYPED_TEST_P(KvCacheConformance, EverySequenceFillsToCapacityAtOnce) {
  this->every_sequence_fills_to_capacity_at_once();
}
TYPED_TEST_P(KvCacheConformance, TruncateKeepsTheHeadAndAppendReplacesTheTail) {
  this->truncate_keeps_the_head_and_append_replaces_the_tail();
}
TYPED_TEST_P(KvCacheConformance, TruncateToTheSameLengthChangesNothing) {
  this->truncate_to_the_same_length_changes_nothing();
}
TYPED_TEST_P(KvCacheConformance, TruncateToZeroEmptiesTheSequenceForReuse) {
  this->truncate_to_zero_empties_the_sequence_for_reuse();
}
TYPED_TEST_P(KvCacheConformance, TruncateGivesBackTheRoomItFrees) {
  this->truncate_gives_back_the_room_it_frees();
}
TYPED_TEST_P(KvCacheConformance, RemovedSequenceMemoryServesANewSequence) {
  this->removed_sequence_memory_serves_a_new_sequence();
}
TYPED_TEST_P(KvCacheConformance, RemoveGivesBackAllTheRoomOfALoneSequence) {
  this->remove_gives_back_all_the_room_of_a_lone_sequence();
}
TYPED_TEST_P(KvCacheConformance, UnknownSequenceIsRejectedByEveryOperation) {
  this->unknown_sequence_is_rejected_by_every_operation();
}
TYPED_TEST_P(KvCacheConformance, AddSequenceBeyondMaxSequencesIsRejected) {
  this->add_sequence_beyond_max_sequences_is_rejected();
}
TYPED_TEST_P(KvCacheConformance, AppendWithWrongPlanesIsRejected) {
  this->append_with_wrong_planes_is_rejected();
}
TYPED_TEST_P(KvCacheConformance, AppendOfNoOrNegativeTokensIsRejected) {
  this->append_of_no_or_negative_tokens_is_rejected();
}
TYPED_TEST_P(KvCacheConformance, AppendBeyondTheRoomIsRejectedWithoutWritingAnything) {
  this->append_beyond_the_room_is_rejected_without_writing_anything();
}
TYPED_TEST_P(KvCacheConformance, TruncateOutsideTheSequenceIsRejected) {
  this->truncate_outside_the_sequence_is_rejected();
}
TYPED_TEST_P(KvCacheConformance, MakeRejectsNonPositiveSizes) {
  this->make_rejects_non_positive_sizes();
}
TYPED_TEST_P(KvCacheConformance, MakeRejectsARecordWithoutPlanes) {
  this->make_rejects_a_record_without_planes();
}
TYPED_TEST_P(KvCacheConformance, SequenceChangesAppendsAndViewsDoNotAllocate) {
  this->sequence_changes_appends_and_views_do_not_allocate();
}

REGISTER_TYPED_TEST_SUITE_P(
    KvCacheConformance, NewSequencesAreEmptyLiveAndCounted, BytesUsedIsTokensTimesSpecBytesPerToken,
    RoundTripsOddCountsInOneOrManyAppends, PrefixOfAViewIsItsFirstTokens,
    InterleavedSequencesEachKeepTheirOwnTokens, EverySequenceFillsToCapacityAtOnce,
    TruncateKeepsTheHeadAndAppendReplacesTheTail, TruncateToTheSameLengthChangesNothing,
    TruncateToZeroEmptiesTheSequenceForReuse, TruncateGivesBackTheRoomItFrees,
    RemovedSequenceMemoryServesANewSequence, RemoveGivesBackAllTheRoomOfALoneSequence,
    UnknownSequenceIsRejectedByEveryOperation, AddSequenceBeyondMaxSequencesIsRejected,
    AppendWithWrongPlanesIsRejected, AppendOfNoOrNegativeTokensIsRejected,
    AppendBeyondTheRoomIsRejectedWithoutWritingAnything, TruncateOutsideTheSequenceIsRejected,
    MakeRejectsNonPositiveSizes, MakeRejectsARecordWithoutPlanes,
    SequenceChangesAppendsAndViewsDoNotAllocate);

}  // namespace tpattn::test
