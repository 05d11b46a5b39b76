// tests/cache_test.cpp -- tpattn's two cache storages: the conformance suite on each, plus what
// only one storage promises (its memory formula, page accounting, its constructor's checks),
// footprint(), which must report what the constructor reserves, and how an operator or a kernel
// refuses a cache (an engine's own included) whose record is not its own. Also an engine's cache
// with a pool and a block table per plane (engine_cache.hpp): the suite on it, and kernels
// reading its views as they read a PagedKvCache.
#include "tpattn/cache.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cache_conformance.hpp"
#include "engine_cache.hpp"
#include "support/counting_new.hpp"  // this executable's one copy of the counting operator new
#include "tpattn/attention/gqa.hpp"
#include "tpattn/attention/tpa.hpp"

namespace tpattn::test {
namespace {

// ---- the suite on both storages ----------------------------------------------------------------

template <class T>
struct ContiguousFactory {
  using Storage = T;
  static std::unique_ptr<KvCache> make(const CacheRecord& record, Index max_sequences,
                                       Index capacity) {
    return std::make_unique<ContiguousKvCache>(record, max_sequences, capacity);
  }
};

// Enough pages for every sequence to reach `capacity` at once; all of them shared by all.
// Capped: each sequence is also capped at `capacity` tokens (page tables sized to match).
template <class T, Index PageTokens, bool Capped = false>
struct PagedFactory {
  using Storage = T;
  static constexpr Index block_tokens = PageTokens;
  static std::unique_ptr<KvCache> make(const CacheRecord& record, Index max_sequences,
                                       Index capacity) {
    const Index pages_per_sequence = capacity > 0 ? (capacity + PageTokens - 1) / PageTokens : 0;
    return std::make_unique<PagedKvCache>(record, PageTokens, max_sequences * pages_per_sequence,
                                          max_sequences, Capped ? capacity : 0);
  }
};
template <class T, Index PageTokens>
using CappedPagedFactory = PagedFactory<T, PageTokens, true>;

struct StorageName {
  template <class Factory>
  static std::string GetName(int) {
    return name_of(storage_type_of<typename Factory::Storage>);
  }
};

template <template <class> class Factory>
using ForEachStorage =
    ::testing::Types<Factory<float>, Factory<Eigen::bfloat16>, Factory<Eigen::half>>;
template <class T>
using Paged16 = PagedFactory<T, 16>;
template <class T>
using Paged7 = PagedFactory<T, 7>;
template <class T>
using Paged1 = PagedFactory<T, 1>;

using CappedPaged16Types = ::testing::Types<CappedPagedFactory<Eigen::bfloat16, 16>>;

// An engine's cache with a pool per plane (engine_cache.hpp), sized as PagedFactory sizes its
// pool: every pool has enough pages for every sequence to reach `capacity` at once.
template <class T, Index PageTokens>
struct SplitPoolFactory {
  using Storage = T;
  static constexpr Index block_tokens = PageTokens;
  static std::unique_ptr<KvCache> make(const CacheRecord& record, Index max_sequences,
                                       Index capacity) {
    const Index pages_per_sequence = capacity > 0 ? (capacity + PageTokens - 1) / PageTokens : 0;
    return std::make_unique<SplitPoolCache>(record, PageTokens, max_sequences * pages_per_sequence,
                                            max_sequences);
  }
};
template <class T>
using SplitPool5 = SplitPoolFactory<T, 5>;
template <class T>
using SplitPool16 = SplitPoolFactory<T, 16>;

}  // namespace

INSTANTIATE_TYPED_TEST_SUITE_P(Contiguous, KvCacheConformance, ForEachStorage<ContiguousFactory>,
                               StorageName);
INSTANTIATE_TYPED_TEST_SUITE_P(Paged16, KvCacheConformance, ForEachStorage<Paged16>, StorageName);
INSTANTIATE_TYPED_TEST_SUITE_P(Paged7, KvCacheConformance, ForEachStorage<Paged7>, StorageName);
INSTANTIATE_TYPED_TEST_SUITE_P(Paged1, KvCacheConformance, ForEachStorage<Paged1>, StorageName);
INSTANTIATE_TYPED_TEST_SUITE_P(CappedPaged16, KvCacheConformance, CappedPaged16Types, StorageName);
INSTANTIATE_TYPED_TEST_SUITE_P(SplitPool5, KvCacheConformance, ForEachStorage<SplitPool5>,
                               StorageName);
INSTANTIATE_TYPED_TEST_SUITE_P(SplitPool16, KvCacheConformance, ForEachStorage<SplitPool16>,
                               StorageName);

namespace {

const StorageType kAllStorage[] = {StorageType::f32, StorageType::bf16, StorageType::f16};

std::vector<SequenceId> live_ids(const ReferenceCache& model) { return model.ids(); }

// ---- records -------------------------------------------------------------------------------

TEST(CacheRecord, SpecRecordsHaveTheSpecSizesInEveryStorageType) {
  for (StorageType storage : kAllStorage) {
    for (const NamedRecord& spec : spec_records(storage)) {
      SCOPED_TRACE(spec.name + " " + name_of(storage));
      EXPECT_EQ(spec.record.elements_per_token(), spec.elements_per_token);
      EXPECT_EQ(spec.record.bytes_per_token(), spec.elements_per_token * element_bytes(storage));
    }
  }
  EXPECT_EQ(element_bytes(StorageType::f32), 4);
  EXPECT_EQ(element_bytes(StorageType::bf16), 2);
  EXPECT_EQ(element_bytes(StorageType::f16), 2);
}

TEST(CacheRecord, OperatorRecordsNameTheirPlanes) {
  const CacheRecord tpa = records::tpa(5, 6, 3, 2, 1);
  ASSERT_EQ(tpa.plane_count(), 4);
  EXPECT_EQ(tpa.plane_index("A_K"), 0);
  EXPECT_EQ(tpa.plane_index("B_K"), 1);
  EXPECT_EQ(tpa.plane_index("A_V"), 2);
  EXPECT_EQ(tpa.plane_index("B_V"), 3);
  EXPECT_EQ(tpa.plane(0).rows, 2);
  EXPECT_EQ(tpa.plane(0).cols, 5);
  EXPECT_EQ(tpa.plane(3).rows, 1);
  EXPECT_EQ(tpa.plane(3).cols, 3);
  const CacheRecord mla = records::mla(11, 3);
  EXPECT_EQ(mla.plane_index("latent"), 0);
  EXPECT_EQ(mla.plane_index("rope_key"), 1);
  const CacheRecord gqa = records::gqa(3, 5, 7);
  EXPECT_EQ(gqa.plane_index("K"), 0);
  EXPECT_EQ(gqa.plane_index("V"), 1);
  EXPECT_TRUE(
      throws_error([&] { (void)gqa.plane_index("Q"); },
                   {"CacheRecord::plane_index", "name", "one of the record's planes", "Q"}));
}

TEST(CacheRecord, PlanesOfDifferentStorageTypesCountTheirOwnBytes) {
  const CacheRecord record({{"scale", 1, 1, StorageType::f16},
                            {"K", 2, 3, StorageType::f32},
                            {"V", 3, 3, StorageType::bf16},
                            {"W", 1, 5, StorageType::f32}});
  EXPECT_EQ(record.elements_per_token(), 1 + 6 + 9 + 5);
  EXPECT_EQ(record.bytes_per_token(), 1 * 2 + 6 * 4 + 9 * 2 + 5 * 4);
}

TEST(CacheRecord, RejectsNoPlanesEmptyPlanesAndDuplicateNames) {
  EXPECT_TRUE(throws_error([] { CacheRecord record(std::vector<PlaneSpec>{}); },
                           {"CacheRecord", "planes", "at least one plane", "0"}));
  EXPECT_TRUE(throws_error(
      [] {
        CacheRecord record({{"K", 0, 4, StorageType::f32}});
      },
      {"CacheRecord", "rows", "plane 'K' rows >= 1", "0"}));
  EXPECT_TRUE(throws_error(
      [] {
        CacheRecord record({{"K", -2, 4, StorageType::f32}});
      },
      {"CacheRecord", "rows", "plane 'K' rows >= 1", "-2"}));
  EXPECT_TRUE(throws_error(
      [] {
        CacheRecord record({{"K", 1, 4, StorageType::f32}, {"V", 1, 0, StorageType::f32}});
      },
      {"CacheRecord", "cols", "plane 'V' cols >= 1", "0"}));
  EXPECT_TRUE(throws_error(
      [] {
        CacheRecord record({{"K", 1, -3, StorageType::f32}});
      },
      {"CacheRecord", "cols", "plane 'K' cols >= 1", "-3"}));
  EXPECT_TRUE(throws_error(
      [] {
        CacheRecord record({{"K", 1, 4, StorageType::f32},
                            {"V", 1, 4, StorageType::f32},
                            {"K", 2, 2, StorageType::bf16}});
      },
      {"CacheRecord", "name", "unique plane names", "K"}));
  // gqa's kv_heads are plane K's rows; mla's rope_dim is plane rope_key's cols.
  EXPECT_TRUE(throws_error([] { (void)records::gqa(0, 128, 128); },
                           {"CacheRecord", "rows", "plane 'K' rows >= 1", "0"}));
  EXPECT_TRUE(throws_error([] { (void)records::mla(512, 0); },
                           {"CacheRecord", "cols", "plane 'rope_key' cols >= 1", "0"}));
}

// ---- records with planes of different storage types, in both storages ---------------------------

// f16, f32, bf16, f32 planes with odd byte counts: a plane that follows an odd number of 2-byte
// elements must still start where its own type may be read.
CacheRecord mixed_record() {
  return CacheRecord({{"scale", 1, 1, StorageType::f16},
                      {"K", 2, 3, StorageType::f32},
                      {"V", 3, 3, StorageType::bf16},
                      {"W", 1, 5, StorageType::f32}});
}

void round_trip_mixed(KvCache& cache, std::mt19937& rng) {
  ReferenceCache model(cache.record());
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  model.add(a);
  model.add(b);
  for (Index n : {Index(1), Index(6), Index(7), Index(8), Index(17), Index(3)}) {
    for (SequenceId seq : {a, b}) {
      TokenBatch batch(cache.record(), n, rng);
      cache.append(seq, n, batch.inputs(), batch.plane_count());
      model.append(seq, batch, 0, n);
    }
  }
  EXPECT_EQ(cache.bytes_per_token(), 64);
  EXPECT_EQ(cache.bytes_used(), 2 * 42 * 64);
  EXPECT_TRUE(holds_all(cache, model));
  cache.truncate(a, 9);
  model.truncate(a, 9);
  TokenBatch batch(cache.record(), 5, rng);
  cache.append(a, 5, batch.inputs(), batch.plane_count());
  model.append(a, batch, 0, 5);
  EXPECT_TRUE(holds_all(cache, model));
}

TEST(CacheRecord, RejectsAStorageValueOutsideTheEnum) {
  EXPECT_TRUE(throws_error(
      [] {
        CacheRecord record(
            {{"K", 1, 4, StorageType::f32}, {"V", 1, 4, static_cast<StorageType>(9)}});
      },
      {"CacheRecord", "storage", "plane 'V' storage f32, bf16 or f16", "9"}));
}

// rows x cols, x element bytes, and their sums over the planes must fit in an Index: a product
// that wrapped around would make bytes_per_token() small or negative, and a cache sized from it
// too small for the tokens it then accepts.
TEST(CacheRecord, RejectsPlanesWhoseSizesOverflowAnIndex) {
  const Index p30 = Index(1) << 30, p31 = Index(1) << 31, p32 = Index(1) << 32;
  const std::string bytes_fit =
      "plane 'K' rows x cols x element bytes (bytes per token) that fit in a 64-bit signed integer";
  // The record: 2^62 elements fit, 2^64 bytes do not.
  EXPECT_TRUE(throws_error(
      [&] {
        CacheRecord record({{"K", p31, p31, StorageType::f32}});
      },
      {"CacheRecord", "rows x cols", bytes_fit,
       std::to_string(p31) + " x " + std::to_string(p31) + " x 4 overflows"}));
  EXPECT_TRUE(throws_error(
      [&] {
        CacheRecord record({{"K", p31, p31, StorageType::bf16}});  // 2^63 bytes
      },
      {"CacheRecord", "rows x cols", bytes_fit,
       std::to_string(p31) + " x " + std::to_string(p31) + " x 2 overflows"}));
  EXPECT_TRUE(throws_error(
      [&] {
        CacheRecord record({{"V", 1, 2, StorageType::f32}, {"K", p32, p32, StorageType::bf16}});
      },
      {"CacheRecord", "rows x cols",
       "plane 'K' rows x cols (elements per token) that fit in a 64-bit signed integer",
       std::to_string(p32) + " x " + std::to_string(p32) + " overflows"}));
  // Each plane fits (2^62 bytes); the record's bytes per token do not.
  EXPECT_TRUE(throws_error(
      [&] {
        CacheRecord record({{"K", p30, p30, StorageType::f32}, {"V", p30, p30, StorageType::f32}});
      },
      {"CacheRecord", "planes",
       "bytes per token, summed over the planes, that fit in a 64-bit signed integer",
       std::to_string(Index(1) << 62) + " + " + std::to_string(Index(1) << 62) +
           " (plane 'V') overflows"}));
}

TEST(CacheRecord, AcceptsTheLargestPlanesWhoseBytesFitAnIndex) {
  const Index p31 = Index(1) << 31;
  const CacheRecord one({{"K", p31, p31 / 2, StorageType::bf16}});  // 2^62 bytes per token
  EXPECT_EQ(one.elements_per_token(), Index(1) << 61);
  EXPECT_EQ(one.bytes_per_token(), Index(1) << 62);
  // 2^63 - 4 bytes of K and 2 of V: 2 bytes short of the largest Index.
  const Index p61 = Index(1) << 61;
  const CacheRecord two({{"K", 1, p61 - 1, StorageType::f32}, {"V", 1, 1, StorageType::bf16}});
  EXPECT_EQ(two.elements_per_token(), p61);
  EXPECT_EQ(two.bytes_per_token(), std::numeric_limits<Index>::max() - 1);
}

// A record too big for any cache (2^62 bytes per token) but valid: a cache over it must throw
// tpattn::Error for its byte count, not size itself from a wrapped product and overrun it.
TEST(CacheRecord, ACacheOverAHugeButValidRecordIsRefusedNotOverrun) {
  const CacheRecord huge({{"K", Index(1) << 31, Index(1) << 30, StorageType::bf16}});
  const std::string fits = "a total byte count that fits in a 64-bit signed integer";
  const std::string p62 = std::to_string(Index(1) << 62);
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(huge, 1, 2); },
                           {"ContiguousKvCache", "sizes", fits, "2 x " + p62 + " overflows"}));
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(huge, 2, 1); },
                           {"ContiguousKvCache", "sizes", fits, p62 + " x 2 overflows"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(huge, 1, 2, 1); },
                           {"PagedKvCache", "sizes", fits, p62 + " x 2 overflows"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(huge, 4, 1, 1); },
                           {"PagedKvCache", "sizes", fits, "4 x " + p62 + " overflows"}));
}

TEST(MixedStorageRecord, RoundTripsThroughAContiguousCache) {
  std::mt19937 rng(11);
  ContiguousKvCache cache(mixed_record(), 2, 51);  // odd: plane K follows 51 f16 values
  round_trip_mixed(cache, rng);
}

TEST(MixedStorageRecord, RoundTripsThroughPagedCaches) {
  for (Index page : {1, 7, 16}) {
    SCOPED_TRACE("page_tokens " + std::to_string(page));
    std::mt19937 rng(static_cast<unsigned>(page));
    PagedKvCache cache(mixed_record(), page, 2 * ((50 + page - 1) / page), 2);
    round_trip_mixed(cache, rng);
  }
}

// ---- ContiguousKvCache -------------------------------------------------------------------------

TEST(ContiguousKvCache, ReservesMaxSequencesTimesMaxTokensTimesBytesPerToken) {
  for (StorageType storage : kAllStorage) {
    for (const NamedRecord& spec : spec_records(storage)) {
      SCOPED_TRACE(spec.name + " " + name_of(storage));
      const ContiguousKvCache cache(spec.record, 3, 7);
      EXPECT_EQ(cache.max_tokens(), 7);
      EXPECT_EQ(cache.max_sequences(), 3);
      EXPECT_EQ(cache.bytes_reserved(), 3 * 7 * spec.elements_per_token * element_bytes(storage));
    }
  }
}

TEST(ContiguousKvCache, EachSequenceIsOneBlockOfMaxTokens) {
  std::mt19937 rng(3);
  const CacheRecord record = records::gqa(2, 3, 5, StorageType::bf16);
  ContiguousKvCache cache(record, 3, 45);
  ReferenceCache model(record);
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  model.add(a);
  model.add(b);
  for (Index n : {Index(1), Index(20), Index(24)}) {
    TokenBatch batch(record, n, rng);
    cache.append(a, n, batch.inputs(), batch.plane_count());
    model.append(a, batch, 0, n);
    const SequenceView view = cache.view(a);
    EXPECT_EQ(view.block_tokens(), 45);
    EXPECT_EQ(view.block_count(), 1);
    EXPECT_EQ(view.tokens_in_block(0), model.length(a));
    // The room left is the rest of the sequence's own region, whatever the others hold.
    EXPECT_EQ(cache.tokens_available(a), 45 - model.length(a));
    EXPECT_EQ(cache.tokens_available(b), 45);
  }
  EXPECT_TRUE(holds_all(cache, model));
}

TEST(ContiguousKvCache, RejectsNonPositiveSizes) {
  const CacheRecord record = records::mla(8, 4);
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(record, 0, 16); },
                           {"ContiguousKvCache", "max_sequences", ">= 1", "0"}));
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(record, -3, 16); },
                           {"ContiguousKvCache", "max_sequences", ">= 1", "-3"}));
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(record, 2, 0); },
                           {"ContiguousKvCache", "max_tokens", ">= 1", "0"}));
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(record, 2, -16); },
                           {"ContiguousKvCache", "max_tokens", ">= 1", "-16"}));
}

// max_sequences x max_tokens x bytes_per_token does not fit in Index: the cache must refuse, not
// wrap around to a small allocation that later appends would overrun.
TEST(ContiguousKvCache, RejectsSizesWhoseBytesOverflow) {
  const CacheRecord record = records::gqa(1, 1, 1);  // 8 bytes per token
  const std::string fits = "a total byte count that fits in a 64-bit signed integer";
  // The first product to overflow: a block's tokens x the first plane's (K's) 4 bytes per token.
  const Index tokens = Index(1) << 61;
  EXPECT_TRUE(throws_error(
      [&] { ContiguousKvCache cache(record, 4, tokens); },
      {"ContiguousKvCache", "sizes", fits, std::to_string(tokens) + " x 4 overflows"}));
  const Index sequences = std::numeric_limits<Index>::max() / 2;
  EXPECT_TRUE(
      throws_error([&] { ContiguousKvCache cache(record, sequences, 4); },
                   {"ContiguousKvCache", "max_sequences",
                    "a count whose bookkeeping fits in memory", std::to_string(sequences)}));
}

// ---- PagedKvCache ------------------------------------------------------------------------------

TEST(PagedKvCache, ReservesPageCountTimesPageTokensTimesBytesPerToken) {
  for (StorageType storage : kAllStorage) {
    for (const NamedRecord& spec : spec_records(storage)) {
      SCOPED_TRACE(spec.name + " " + name_of(storage));
      const PagedKvCache cache(spec.record, 16, 5, 3);
      const Index bytes = spec.elements_per_token * element_bytes(storage);
      EXPECT_EQ(cache.page_tokens(), 16);
      EXPECT_EQ(cache.page_count(), 5);
      EXPECT_EQ(cache.free_page_count(), 5);
      EXPECT_EQ(cache.page_bytes(), 16 * bytes);
      EXPECT_EQ(cache.bytes_reserved(), 5 * 16 * bytes);
      EXPECT_EQ(cache.bytes_in_pages(), 0);
    }
  }
}

TEST(PagedKvCache, ATokenThatStartsAPageTakesAPage) {
  std::mt19937 rng(5);
  const CacheRecord record = records::gqa(2, 4, 4);  // 64 bytes per token
  PagedKvCache cache(record, 16, 10, 3);
  const Index page = 16 * 64;
  ReferenceCache model(record);
  const SequenceId a = cache.add_sequence();
  model.add(a);
  const auto append = [&](SequenceId seq, Index n) {
    TokenBatch batch(record, n, rng);
    cache.append(seq, n, batch.inputs(), batch.plane_count());
    model.append(seq, batch, 0, n);
  };
  EXPECT_EQ(cache.free_page_count(), 10);  // an empty sequence holds no page
  append(a, 1);
  EXPECT_EQ(cache.free_page_count(), 9);
  EXPECT_EQ(cache.bytes_used(), 64);
  EXPECT_EQ(cache.bytes_in_pages(), page);  // rounded up to the page
  append(a, 14);                            // 15 = page - 1
  EXPECT_EQ(cache.free_page_count(), 9);
  append(a, 1);  // 16 = page
  EXPECT_EQ(cache.free_page_count(), 9);
  EXPECT_EQ(cache.bytes_in_pages(), cache.bytes_used());  // a full page wastes nothing
  append(a, 1);                                           // 17 = page + 1
  EXPECT_EQ(cache.free_page_count(), 8);
  EXPECT_EQ(cache.bytes_used(), 17 * 64);
  EXPECT_EQ(cache.bytes_in_pages(), 2 * page);
  EXPECT_EQ(cache.tokens_available(a), 15 + 8 * 16);
  const SequenceId b = cache.add_sequence();
  model.add(b);
  append(b, 33);  // three pages in one append
  EXPECT_EQ(cache.free_page_count(), 5);
  EXPECT_EQ(cache.bytes_in_pages(), 5 * page);
  EXPECT_EQ(cache.view(b).block_tokens(), 16);
  EXPECT_EQ(cache.view(b).block_count(), 3);
  EXPECT_EQ(cache.view(b).tokens_in_block(2), 1);
  EXPECT_TRUE(holds_all(cache, model));
}

TEST(PagedKvCache, TruncateAndRemoveReturnPagesToThePool) {
  std::mt19937 rng(6);
  const CacheRecord record = records::mla(6, 2, StorageType::f16);
  PagedKvCache cache(record, 16, 10, 3);
  ReferenceCache model(record);
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  model.add(a);
  model.add(b);
  TokenBatch batch(record, 40, rng);
  cache.append(a, 40, batch.inputs(), batch.plane_count());  // 3 pages
  model.append(a, batch, 0, 40);
  cache.append(b, 33, batch.inputs(), batch.plane_count());  // 3 pages
  model.append(b, batch, 0, 33);
  EXPECT_EQ(cache.free_page_count(), 4);
  cache.truncate(a, 33);  // still 3 pages
  EXPECT_EQ(cache.free_page_count(), 4);
  cache.truncate(a, 32);  // exactly 2 pages
  EXPECT_EQ(cache.free_page_count(), 5);
  cache.truncate(a, 17);
  EXPECT_EQ(cache.free_page_count(), 5);
  cache.truncate(a, 16);
  EXPECT_EQ(cache.free_page_count(), 6);
  cache.truncate(a, 0);
  EXPECT_EQ(cache.free_page_count(), 7);
  model.truncate(a, 0);
  EXPECT_EQ(cache.bytes_in_pages(), 3 * cache.page_bytes());
  cache.remove_sequence(b);
  model.remove(b);
  EXPECT_EQ(cache.free_page_count(), 10);
  EXPECT_EQ(cache.bytes_in_pages(), 0);
  EXPECT_EQ(cache.bytes_used(), 0);
  EXPECT_EQ(cache.tokens_available(a), 160);
  EXPECT_TRUE(holds_all(cache, model));
}

// Random appends, truncations and removals on several page sizes: the pool's counters always
// follow from the sequences' lengths.
TEST(PagedKvCache, PageCountersFollowFromLengths) {
  for (Index page : {1, 7, 16}) {
    for (StorageType storage : kAllStorage) {
      SCOPED_TRACE("page_tokens " + std::to_string(page) + " " + name_of(storage));
      std::mt19937 rng(static_cast<unsigned>(page * 10 + static_cast<int>(storage)));
      const CacheRecord record = records::tpa(3, 4, 5, 2, 1, storage);
      const Index page_count = 120 / page + 3;
      PagedKvCache cache(record, page, page_count, 4);
      ReferenceCache model(record);
      const auto pick = [&](Index low, Index high) {
        return std::uniform_int_distribution<Index>(low, high)(rng);
      };
      for (int step = 0; step < 120; ++step) {
        const std::vector<SequenceId> ids = live_ids(model);
        const Index action = pick(0, 9);
        if (ids.empty() || (action == 0 && static_cast<Index>(ids.size()) < 4)) {
          model.add(cache.add_sequence());
        } else {
          const SequenceId seq = ids[static_cast<std::size_t>(pick(0, Index(ids.size()) - 1))];
          if (action == 1) {
            cache.remove_sequence(seq);
            model.remove(seq);
          } else if (action <= 3) {
            const Index keep = pick(0, model.length(seq));
            cache.truncate(seq, keep);
            model.truncate(seq, keep);
          } else if (cache.tokens_available(seq) > 0) {
            const Index n = pick(1, std::min<Index>(cache.tokens_available(seq), 2 * page + 1));
            TokenBatch batch(record, n, rng);
            cache.append(seq, n, batch.inputs(), batch.plane_count());
            model.append(seq, batch, 0, n);
          }
        }
        Index pages_held = 0;
        Index tokens = 0;
        for (SequenceId seq : live_ids(model)) {
          pages_held += (model.length(seq) + page - 1) / page;
          tokens += model.length(seq);
        }
        ASSERT_EQ(cache.free_page_count(), page_count - pages_held) << "step " << step;
        ASSERT_EQ(cache.bytes_in_pages(), pages_held * cache.page_bytes()) << "step " << step;
        ASSERT_EQ(cache.bytes_used(), tokens * cache.bytes_per_token()) << "step " << step;
        for (SequenceId seq : live_ids(model)) {
          const Index length = model.length(seq);
          const Index tail = (length + page - 1) / page * page - length;  // room in last page
          ASSERT_EQ(cache.tokens_available(seq), tail + cache.free_page_count() * page)
              << "step " << step << ", sequence " << seq;
        }
      }
      EXPECT_TRUE(holds_all(cache, model));
    }
  }
}

TEST(PagedKvCache, SequencesShareThePoolUntilItRunsOut) {
  std::mt19937 rng(8);
  const CacheRecord record = records::mla(5, 3, StorageType::bf16);
  PagedKvCache cache(record, 8, 6, 3);
  ReferenceCache model(record);
  const auto append = [&](SequenceId seq, Index n) {
    TokenBatch batch(record, n, rng);
    cache.append(seq, n, batch.inputs(), batch.plane_count());
    model.append(seq, batch, 0, n);
  };
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  model.add(a);
  model.add(b);
  append(a, 35);  // 5 pages, 5 tokens of room left in the last one
  EXPECT_EQ(cache.free_page_count(), 1);
  EXPECT_EQ(cache.tokens_available(a), 5 + 8);
  EXPECT_EQ(cache.tokens_available(b), 8);

  TokenBatch big(record, 64, rng);
  const auto rejected = [&](SequenceId seq, Index n) {
    SCOPED_TRACE("appending " + std::to_string(n) + " to sequence " + std::to_string(seq));
    const Index free_pages = cache.free_page_count();
    const std::string room = "<= " + std::to_string(cache.tokens_available(seq));
    EXPECT_TRUE(rejects(cache, live_ids(model),
                        [&] { cache.append(seq, n, big.inputs(), big.plane_count()); },
                        {"PagedKvCache::append", "n_tokens", room, std::to_string(n)}));
    EXPECT_EQ(cache.free_page_count(), free_pages) << "a rejected append claimed pages";
  };
  rejected(b, 9);   // 8 would fit: nothing may be written
  rejected(a, 14);  // 13 would fit
  append(b, 8);     // the last free page
  EXPECT_EQ(cache.free_page_count(), 0);
  EXPECT_EQ(cache.tokens_available(a), 5);
  EXPECT_EQ(cache.tokens_available(b), 0);
  const SequenceId c = cache.add_sequence();
  model.add(c);
  EXPECT_EQ(cache.tokens_available(c), 0);
  rejected(c, 1);
  rejected(b, 1);
  append(a, 5);  // the rest of a's last page needs no new page
  rejected(a, 1);
  EXPECT_TRUE(holds_all(cache, model));

  cache.remove_sequence(a);  // its 5 pages go back to the pool, for anyone
  model.remove(a);
  EXPECT_EQ(cache.free_page_count(), 5);
  EXPECT_EQ(cache.tokens_available(c), 40);
  append(c, 40);
  EXPECT_EQ(cache.free_page_count(), 0);
  EXPECT_TRUE(holds_all(cache, model));
}

TEST(PagedKvCache, RejectsNonPositiveSizes) {
  const CacheRecord record = records::mla(8, 4);
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(record, 0, 4, 2); },
                           {"PagedKvCache", "page_tokens", ">= 1", "0"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(record, -16, 4, 2); },
                           {"PagedKvCache", "page_tokens", ">= 1", "-16"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(record, 16, 0, 2); },
                           {"PagedKvCache", "page_count", ">= 1", "0"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(record, 16, -4, 2); },
                           {"PagedKvCache", "page_count", ">= 1", "-4"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(record, 16, 4, 0); },
                           {"PagedKvCache", "max_sequences", ">= 1", "0"}));
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(record, 16, 4, -2); },
                           {"PagedKvCache", "max_sequences", ">= 1", "-2"}));
}

// max_tokens_per_sequence caps a sequence's length at exactly that many tokens, page edge or not.
TEST(PagedKvCache, MaxTokensPerSequenceCapsEachSequence) {
  std::mt19937 rng(9);
  const CacheRecord record = records::gqa(1, 4, 4, StorageType::f16);
  const auto check = [&](Index cap) {
    PagedKvCache cache(record, 8, 100, 2, cap);
    ReferenceCache model(record);
    const SequenceId a = cache.add_sequence();
    const SequenceId b = cache.add_sequence();
    model.add(a);
    model.add(b);
    ASSERT_EQ(cache.tokens_available(a), cap);
    TokenBatch batch(record, cap + 1, rng);
    ASSERT_TRUE(rejects(cache, live_ids(model),
                        [&] { cache.append(a, cap + 1, batch.inputs(), batch.plane_count()); },
                        {"PagedKvCache::append", "n_tokens", "<= " + std::to_string(cap),
                         std::to_string(cap + 1)}));
    cache.append(a, cap, batch.inputs(), batch.plane_count());
    model.append(a, batch, 0, cap);
    EXPECT_EQ(cache.tokens_available(a), 0);
    EXPECT_EQ(cache.tokens_available(b), cap);  // the pool has plenty; the cap binds
    EXPECT_TRUE(rejects(cache, live_ids(model),
                        [&] { cache.append(a, 1, batch.inputs(), batch.plane_count()); },
                        {"PagedKvCache::append", "n_tokens", "<= 0", "1"}));
    EXPECT_TRUE(holds_all(cache, model));
  };
  for (Index cap : {16, 20, 1, 23}) {
    SCOPED_TRACE("max_tokens_per_sequence " + std::to_string(cap));
    check(cap);
  }
}

// Block tables: one address per block a sequence may hold, for every slot, made at construction.
TEST(BlockTables, TableBytesCountOneAddressPerBlockASequenceMayHoldInEverySlot) {
  const CacheRecord record = records::gqa(2, 8, 8);
  EXPECT_EQ(ContiguousKvCache(record, 3, 100).table_bytes(), 3 * 1 * 8);
  EXPECT_EQ(PagedKvCache(record, 16, 100, 4).table_bytes(), 4 * 100 * 8);    // the whole pool
  EXPECT_EQ(PagedKvCache(record, 16, 100, 4, 40).table_bytes(), 4 * 3 * 8);  // ceil(40 / 16)
  EXPECT_EQ(PagedKvCache(record, 16, 100, 4, 48).table_bytes(), 4 * 3 * 8);  // 48 / 16
  EXPECT_EQ(PagedKvCache(record, 16, 2, 4, 4000).table_bytes(), 4 * 2 * 8);  // pool < cap
}

TEST(PagedKvCache, AnAppendBeyondTheCapSaysTheCapBinds) {
  const CacheRecord record = records::mla(8, 4);
  PagedKvCache cache(record, 8, 100, 1, 10);
  const SequenceId seq = cache.add_sequence();
  std::mt19937 rng(3);
  TokenBatch batch(record, 11, rng);
  try {
    cache.append(seq, 11, batch.inputs(), batch.plane_count());
    ADD_FAILURE() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("max_tokens_per_sequence = 10 caps the sequence"),
              std::string::npos)
        << error.what();
  }
  EXPECT_EQ(cache.length(seq), 0);
}

TEST(PagedKvCache, RejectsANegativeMaxTokensPerSequence) {
  EXPECT_TRUE(throws_error([] { PagedKvCache cache(records::mla(8, 4), 16, 4, 2, -1); },
                           {"PagedKvCache", "max_tokens_per_sequence", ">= 0", "-1"}));
}

TEST(PagedKvCache, RejectsSizesWhoseBytesOverflow) {
  const CacheRecord record = records::gqa(1, 1, 1);  // 8 bytes per token
  // The first product to overflow: a page's tokens x the first plane's (K's) 4 bytes per token.
  const Index tokens = Index(1) << 61;
  EXPECT_TRUE(throws_error(
      [&] { PagedKvCache cache(record, tokens, 4, 1); },
      {"PagedKvCache", "sizes", "a total byte count that fits in a 64-bit signed integer",
       std::to_string(tokens) + " x 4 overflows"}));
}

// ---- footprint() -------------------------------------------------------------------------------

// Records of every operator's layout, small and spec-sized, in every storage type, plus two mixed
// records: mixed_record() pads plane starts, mixed_tail_record() the end of a block.
CacheRecord mixed_tail_record() {
  return CacheRecord({{"K", 1, 3, StorageType::f32}, {"s", 1, 1, StorageType::bf16}});
}
std::vector<NamedRecord> footprint_records() {
  std::vector<NamedRecord> all;
  for (StorageType s : kAllStorage) {
    const std::string name = std::string(" ") + name_of(s);
    all.push_back({"GQA 3x5/3x7" + name, records::gqa(3, 5, 7, s), 36});
    all.push_back({"GQA g8" + name, records::gqa(8, 128, 128, s), 2048});
    all.push_back({"MLA 11+3" + name, records::mla(11, 3, s), 14});
    all.push_back({"MLA 512+64" + name, records::mla(512, 64, s), 576});
    all.push_back({"TPA h5 d6/3 R2/1" + name, records::tpa(5, 6, 3, 2, 1, s), 30});
    all.push_back({"TPA R2" + name, records::tpa(32, 128, 128, 2, 2, s), 640});
  }
  all.push_back({"mixed", mixed_record(), 21});
  all.push_back({"mixed tail", mixed_tail_record(), 4});
  return all;
}

// The what() of the tpattn::Error `call` throws; a test failure if it throws none.
std::string error_text(const std::function<void()>& call) {
  try {
    call();
  } catch (const Error& error) {
    return error.what();
  }
  ADD_FAILURE() << "no tpattn::Error thrown";
  return "(no error)";
}

TEST(CacheFootprint, EqualsWhatTheBuiltPagedCacheReports) {
  for (const NamedRecord& spec : footprint_records()) {
    for (Index page : {1, 7, 16, 64}) {
      for (Index pages : {1, 5, 33}) {
        for (Index sequences : {1, 3, 8}) {
          // No cap; one token; a page; a cap off the page edge; several pages; more than the pool.
          for (Index cap : {Index(0), Index(1), page, 2 * page + 3, 5 * page, Index(1000)}) {
            SCOPED_TRACE(spec.name + ", page_tokens " + std::to_string(page) + ", page_count " +
                         std::to_string(pages) + ", max_sequences " + std::to_string(sequences) +
                         ", max_tokens_per_sequence " + std::to_string(cap));
            const CacheFootprint planned =
                PagedKvCache::footprint(spec.record, page, pages, sequences, cap);
            const PagedKvCache cache(spec.record, page, pages, sequences, cap);
            EXPECT_EQ(planned.bytes_reserved, cache.bytes_reserved());
            EXPECT_EQ(planned.table_bytes, cache.table_bytes());
            EXPECT_EQ(planned.total(), cache.bytes_reserved() + cache.table_bytes());
            if (::testing::Test::HasFailure()) return;
          }
        }
      }
    }
  }
}

TEST(CacheFootprint, EqualsWhatTheBuiltContiguousCacheReports) {
  for (const NamedRecord& spec : footprint_records()) {
    for (Index sequences : {1, 3, 8}) {
      for (Index tokens : {1, 7, 16, 51, 64, 1000}) {
        SCOPED_TRACE(spec.name + ", max_sequences " + std::to_string(sequences) + ", max_tokens " +
                     std::to_string(tokens));
        const CacheFootprint planned = ContiguousKvCache::footprint(spec.record, sequences, tokens);
        const ContiguousKvCache cache(spec.record, sequences, tokens);
        EXPECT_EQ(planned.bytes_reserved, cache.bytes_reserved());
        EXPECT_EQ(planned.table_bytes, cache.table_bytes());
        EXPECT_EQ(planned.total(), cache.bytes_reserved() + cache.table_bytes());
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

// Worked out by hand, so a footprint that forgot the padding (or a cache that lost it) fails even
// where the two agree. mixed_record(), 64 bytes per token: scale f16 x 1, K f32 x 6, V bf16 x 9,
// W f32 x 5. In a block of 7 tokens: scale [0, 14), K [16, 184), V [184, 310), W [312, 452).
TEST(CacheFootprint, CountsThePaddingOfMixedStorageRecords) {
  const CacheRecord mixed = mixed_record();
  EXPECT_EQ(PagedKvCache::footprint(mixed, 7, 3, 2).bytes_reserved, 3 * 452);  // not 3 x 7 x 64
  EXPECT_EQ(PagedKvCache(mixed, 7, 3, 2).page_bytes(), 452);
  // One token: scale [0, 2), K [4, 28), V [28, 46), W [48, 68).
  EXPECT_EQ(PagedKvCache::footprint(mixed, 1, 5, 2).bytes_reserved, 5 * 68);
  // An even token count leaves no gap: 16 x 64.
  EXPECT_EQ(PagedKvCache::footprint(mixed, 16, 5, 2).bytes_reserved, 5 * 1024);
  // 51 tokens: scale [0, 102), K [104, 1328), V [1328, 2246), W [2248, 3268).
  EXPECT_EQ(ContiguousKvCache::footprint(mixed, 2, 51).bytes_reserved, 2 * 3268);
  // mixed_tail_record(), 14 bytes per token: the block ends on a 2-byte plane and is rounded up
  // to 4 so the next block's f32 plane starts aligned: 1 token takes 16 bytes, 7 take 100.
  const CacheRecord tail = mixed_tail_record();
  EXPECT_EQ(PagedKvCache::footprint(tail, 1, 10, 1).bytes_reserved, 10 * 16);
  EXPECT_EQ(PagedKvCache::footprint(tail, 7, 10, 1).bytes_reserved, 10 * 100);
  EXPECT_EQ(ContiguousKvCache::footprint(tail, 3, 7).bytes_reserved, 3 * 100);
}

// entries per slot = min(page_count, ceil(cap / page_tokens)), or page_count without a cap: the
// worked example of docs/cache.md.
TEST(CacheFootprint, TableBytesFollowTheCapAndThePool) {
  const CacheRecord record = records::gqa(2, 8, 8);
  EXPECT_EQ(PagedKvCache::footprint(record, 16, 100, 4).table_bytes, 4 * 100 * 8);
  EXPECT_EQ(PagedKvCache::footprint(record, 16, 100, 4, 40).table_bytes, 4 * 3 * 8);
  EXPECT_EQ(PagedKvCache::footprint(record, 16, 100, 4, 48).table_bytes, 4 * 3 * 8);
  EXPECT_EQ(PagedKvCache::footprint(record, 16, 2, 4, 4000).table_bytes, 4 * 2 * 8);
  EXPECT_EQ(ContiguousKvCache::footprint(record, 3, 100).table_bytes, 3 * 1 * 8);
}

// Whatever the constructor refuses, footprint() refuses with the same message, in the same order
// of checks: the storage's own sizes, then the store's (record, slots, byte counts).
TEST(CacheFootprint, RejectsWhatTheConstructorRejectsWithTheSameError) {
  const CacheRecord record = records::mla(8, 4);
  const CacheRecord tiny = records::gqa(1, 1, 1);  // 8 bytes per token
  const CacheRecord huge_plane({{"K", Index(1) << 31, Index(1) << 30, StorageType::bf16}});
  const Index half = std::numeric_limits<Index>::max() / 2;
  struct Paged {
    const CacheRecord* record;
    Index page_tokens, page_count, max_sequences, cap;
  };
  const CacheRecord empty;
  const Paged paged[] = {
      {&record, 0, 4, 2, 0},
      {&record, -16, 4, 2, 0},
      {&record, 16, 0, 2, 0},
      {&record, 16, -4, 2, 0},
      {&record, 16, 4, 0, 0},
      {&record, 16, 4, -2, 0},
      {&record, 16, 4, 2, -1},
      {&record, 0, 0, 0, -1},  // the first check wins
      {&empty, 16, 4, 2, 0},
      {&record, 16, 4, half, 0},
      {&tiny, Index(1) << 61, 4, 1, 0},  // a page's bytes
      {&tiny, 1, Index(1) << 62, 1, 0},  // the pool's bytes
      {&tiny, 1, Index(1) << 59, 2, 0},  // the tables' bytes
      {&huge_plane, 2, 1, 1, 0},         // a page of a record of 2^62 bytes per token
  };
  for (const Paged& c : paged) {
    SCOPED_TRACE("PagedKvCache(" + std::to_string(c.record->plane_count()) + " planes, " +
                 std::to_string(c.page_tokens) + ", " + std::to_string(c.page_count) + ", " +
                 std::to_string(c.max_sequences) + ", " + std::to_string(c.cap) + ")");
    const std::string built = error_text([&] {
      PagedKvCache cache(*c.record, c.page_tokens, c.page_count, c.max_sequences, c.cap);
    });
    const std::string planned = error_text([&] {
      (void)PagedKvCache::footprint(*c.record, c.page_tokens, c.page_count, c.max_sequences, c.cap);
    });
    EXPECT_EQ(planned, built);
  }
  struct Contiguous {
    const CacheRecord* record;
    Index max_sequences, max_tokens;
  };
  const Contiguous contiguous[] = {
      {&record, 0, 16},
      {&record, -3, 16},
      {&record, 2, 0},
      {&record, 2, -16},
      {&record, -1, -1},
      {&empty, 2, 16},
      {&record, half, 4},
      {&tiny, 4, Index(1) << 61},   // a region's bytes
      {&tiny, Index(1) << 57, 16},  // the pool's bytes
      {&huge_plane, 1, 2},
  };
  for (const Contiguous& c : contiguous) {
    SCOPED_TRACE("ContiguousKvCache(" + std::to_string(c.record->plane_count()) + " planes, " +
                 std::to_string(c.max_sequences) + ", " + std::to_string(c.max_tokens) + ")");
    const std::string built =
        error_text([&] { ContiguousKvCache cache(*c.record, c.max_sequences, c.max_tokens); });
    const std::string planned = error_text(
        [&] { (void)ContiguousKvCache::footprint(*c.record, c.max_sequences, c.max_tokens); });
    EXPECT_EQ(planned, built);
  }
}

// A footprint too large for memory is still reported exactly, as long as it fits in an Index;
// one whose byte count does not fit throws rather than wrapping to a small number.
TEST(CacheFootprint, ASizeWhoseBytesOverflowAnIndexThrowsInsteadOfWrapping) {
  const CacheRecord tiny = records::gqa(1, 1, 1);  // 8 bytes per token
  const std::string fits = "a total byte count that fits in a 64-bit signed integer";
  const Index p59 = Index(1) << 59;
  const Index p62 = Index(1) << 62;
  EXPECT_TRUE(
      throws_error([&] { (void)PagedKvCache::footprint(tiny, 1, p62, 1); },
                   {"PagedKvCache", "sizes", fits, "8 x " + std::to_string(p62) + " overflows"}));
  EXPECT_TRUE(
      throws_error([&] { (void)PagedKvCache::footprint(tiny, 1, p59, 2); },
                   {"PagedKvCache", "sizes", fits, std::to_string(2 * p59) + " x 8 overflows"}));
  EXPECT_TRUE(throws_error([&] { (void)ContiguousKvCache::footprint(tiny, Index(1) << 57, 16); },
                           {"ContiguousKvCache", "sizes", fits,
                            "128 x " + std::to_string(Index(1) << 57) + " overflows"}));
  // A record of 2^62 bytes per token (the most a record may hold is 2^63 - 1): two tokens overflow.
  const CacheRecord huge_plane({{"K", Index(1) << 31, Index(1) << 30, StorageType::bf16}});
  EXPECT_TRUE(
      throws_error([&] { (void)PagedKvCache::footprint(huge_plane, 2, 1, 1); },
                   {"PagedKvCache", "sizes", fits, "2 x " + std::to_string(p62) + " overflows"}));

  // 2^59 pages of 8 bytes with page tables capped at 16 tokens: 2^62 + 256 bytes, exactly.
  const CacheFootprint big = PagedKvCache::footprint(tiny, 1, p59, 2, 16);
  EXPECT_EQ(big.bytes_reserved, p62);
  EXPECT_EQ(big.table_bytes, 2 * 16 * 8);
  EXPECT_EQ(big.total(), p62 + 256);
  // Without the cap each part fits (2^62 bytes of pages, 2^62 of tables) but their sum does not.
  const CacheFootprint both = PagedKvCache::footprint(tiny, 1, p59, 1);
  EXPECT_EQ(both.bytes_reserved, p62);
  EXPECT_EQ(both.table_bytes, p62);
  EXPECT_TRUE(throws_error([&] { (void)both.total(); },
                           {"CacheFootprint::total", "sizes", fits,
                            std::to_string(p62) + " + " + std::to_string(p62) + " overflows"}));
}

// ---- every check before any allocation ------------------------------------------------------

// The allocations `call` makes before it throws tpattn::Error (a test failure if it throws none).
std::uint64_t allocations_until_error(const std::function<void()>& call) {
  std::uint64_t allocations = 0;
  {
    const AllocationCounter counter;
    try {
      call();
      ADD_FAILURE() << "no tpattn::Error thrown";
    } catch (const Error&) {
    }
    allocations = counter.allocations();
  }
  return allocations;
}

// A rejected constructor allocates only what footprint() allocates for the same rejection: the
// error's message. No bookkeeping (call names, plane offsets, sequence slots, tables) may come
// first, so a size too large fails as an Error before anything could fail as std::bad_alloc.
TEST(CacheConstruction, EveryCheckRunsBeforeAnyAllocation) {
  ASSERT_TRUE(AllocationCounter::installed());
  const CacheRecord tiny = records::gqa(1, 1, 1);  // 8 bytes per token
  const Index p61 = Index(1) << 61;
  struct Paged {
    std::string what;
    CacheRecord record;
    Index page_tokens, page_count, max_sequences, cap;
  };
  const Paged paged[] = {
      {"a page size", tiny, 0, 4, 1, 0},
      {"a record without planes", CacheRecord(), 4, 4, 1, 0},
      {"a page's bytes", tiny, p61, 4, 1, 0},
      {"the tables' bytes", tiny, 1, Index(1) << 59, 2, 0},
      {"the free-page list", CacheRecord({{"K", 1, 1, StorageType::bf16}}), 1, Index(1) << 61, 1,
       1},
  };
  for (const Paged& c : paged) {
    SCOPED_TRACE("PagedKvCache: " + c.what);
    CacheRecord moved = c.record;  // the caller's copy, made before counting
    const std::uint64_t built = allocations_until_error([&] {
      PagedKvCache cache(std::move(moved), c.page_tokens, c.page_count, c.max_sequences, c.cap);
    });
    const std::uint64_t planned = allocations_until_error([&] {
      (void)PagedKvCache::footprint(c.record, c.page_tokens, c.page_count, c.max_sequences, c.cap);
    });
    EXPECT_EQ(built, planned);
  }
  struct Contiguous {
    std::string what;
    CacheRecord record;
    Index max_sequences, max_tokens;
  };
  const Contiguous contiguous[] = {
      {"a size", tiny, 0, 4},
      {"a record without planes", CacheRecord(), 1, 4},
      {"a region's bytes", tiny, 1, p61},
      {"the sequence slots", tiny, std::numeric_limits<Index>::max() / 2, 1},
  };
  for (const Contiguous& c : contiguous) {
    SCOPED_TRACE("ContiguousKvCache: " + c.what);
    CacheRecord moved = c.record;
    const std::uint64_t built = allocations_until_error(
        [&] { ContiguousKvCache cache(std::move(moved), c.max_sequences, c.max_tokens); });
    const std::uint64_t planned = allocations_until_error(
        [&] { (void)ContiguousKvCache::footprint(c.record, c.max_sequences, c.max_tokens); });
    EXPECT_EQ(built, planned);
  }
}

// 2^61 pages of one 2-byte token: 2^62 bytes of pages is an Index, but the list of free pages
// (one Index each) holds more entries than a std::vector can (PTRDIFF_MAX / 8 = 2^60 - 1). That
// is an Error naming page_count, from the constructor and footprint() alike, before anything is
// allocated, not a std::bad_alloc (or std::length_error) from inside the constructor.
TEST(PagedKvCache, APoolWhoseBookkeepingNoVectorCanHoldIsAnError) {
  const CacheRecord two_bytes({{"K", 1, 1, StorageType::bf16}});
  const Index pages = Index(1) << 61;
  const Misuse misuse{"PagedKvCache", "page_count",
                      "a count whose bookkeeping fits in memory (at most " +
                          std::to_string(std::numeric_limits<Index>::max() / 8) +
                          " blocks in the free-block list)",
                      std::to_string(pages)};
  EXPECT_TRUE(throws_error([&] { PagedKvCache cache(two_bytes, 1, pages, 1, 1); }, misuse));
  EXPECT_TRUE(
      throws_error([&] { (void)PagedKvCache::footprint(two_bytes, 1, pages, 1, 1); }, misuse));
}

// A slot's bookkeeping is 24 bytes (its length, its block count, whether it is live), so at most
// PTRDIFF_MAX / 24 slots; the message names that limit.
TEST(ContiguousKvCache, SequenceSlotsBeyondWhatAVectorCanHoldAreAnError) {
  const Index limit = std::numeric_limits<Index>::max() / 24;
  const CacheRecord tiny = records::gqa(1, 1, 1);
  EXPECT_TRUE(throws_error([&] { ContiguousKvCache cache(tiny, limit + 1, 1); },
                           {"ContiguousKvCache", "max_sequences",
                            "a count whose bookkeeping fits in memory (at most " +
                                std::to_string(limit) + " sequence slots)",
                            std::to_string(limit + 1)}));
}

TEST(CacheFootprint, AllocatesNothing) {
  ASSERT_TRUE(AllocationCounter::installed());
  const CacheRecord gqa = records::gqa(8, 128, 128, StorageType::bf16);
  const CacheRecord mixed = mixed_record();
  Index sum = 0;
  std::uint64_t allocations = 1;
  {
    const AllocationCounter counter;
    sum += PagedKvCache::footprint(gqa, 16, 1 << 20, 64).total();
    sum += PagedKvCache::footprint(mixed, 7, 1 << 20, 64, 1000).total();
    sum += ContiguousKvCache::footprint(gqa, 8, 4096).total();
    sum += ContiguousKvCache::footprint(mixed, 8, 51).total();
    allocations = counter.allocations();
  }
  EXPECT_EQ(allocations, 0u);
  EXPECT_GT(sum, 0);
}

// docs/cache.md's example: the most 16-token pages that fit a 1 GiB budget, tables included,
// for GQA g8 d128 in bf16 (4096 bytes per token) and 8 sequences of at most 4096 tokens.
TEST(CacheFootprint, PlansAPagedPoolForAMemoryBudget) {
  const CacheRecord record = records::gqa(8, 128, 128, StorageType::bf16);
  const Index budget = Index(1) << 30;
  const Index page_bytes = PagedKvCache::footprint(record, 16, 1, 8, 4096).bytes_reserved;
  EXPECT_EQ(page_bytes, 16 * 4096);
  Index pages = budget / page_bytes;  // the pages alone
  while (PagedKvCache::footprint(record, 16, pages, 8, 4096).total() > budget) --pages;
  EXPECT_EQ(pages, 16383);  // 16384 pages leave no room for 8 x 256 x 8 bytes of page tables
  EXPECT_EQ(PagedKvCache::footprint(record, 16, pages, 8, 4096).total(),
            16383 * 65536 + 8 * 256 * 8);
}

// ---- an operator or a kernel given a cache of another record -------------------------------

// An engine's own cache that holds no tokens, only a record: KvCache lets a subclass pass any
// record, a default-constructed one without planes included. Sequence 0 is live and empty.
class RecordOnlyCache final : public KvCache {
 public:
  explicit RecordOnlyCache(CacheRecord record) : KvCache(std::move(record)) {}
  SequenceId add_sequence() override { return 0; }
  void remove_sequence(SequenceId) override {}
  bool contains(SequenceId seq) const override { return seq == 0; }
  Index sequence_count() const override { return 1; }
  Index max_sequences() const override { return 1; }
  Index length(SequenceId) const override { return 0; }
  void append(SequenceId, Index n_tokens, const PlaneInput*, Index) override {
    tpattn::detail::fail("RecordOnlyCache::append", "n_tokens", "<= 0", n_tokens);
  }
  using KvCache::append;
  void truncate(SequenceId, Index) override {}
  Index tokens_available(SequenceId) const override { return 0; }
  SequenceView view(SequenceId) const override {
    return SequenceView(&record(), nullptr, nullptr, 1, 0);
  }
  Index bytes_used() const override { return 0; }
  Index bytes_reserved() const override { return 0; }
};

// GQA with h 2, g 1, d_h = d_v 8 in f32: record K: 1 x 8, V: 1 x 8.
GroupedQueryAttention<float> small_gqa() {
  GqaConfig config;
  config.d_model = 16;
  config.heads = 2;
  config.kv_heads = 1;
  config.head_dim = 8;
  GqaWeights weights;
  weights.w_q = RowMatrix::Constant(16, 16, 0.1f);
  weights.w_k = RowMatrix::Constant(8, 16, 0.1f);
  weights.w_v = RowMatrix::Constant(8, 16, 0.1f);
  weights.w_o = RowMatrix::Constant(16, 16, 0.1f);
  return GroupedQueryAttention<float>(config, weights);
}

// What decode, prefill and a bare kernel's attend must say about a cache (or a view of one) of
// `record`: the first field that differs, as the operator has it and as the cache has it.
void expect_record_mismatch(const CacheRecord& record, const std::string& operator_side,
                            const std::string& cache_side) {
  GroupedQueryAttention<float> op = small_gqa();
  RecordOnlyCache cache(record);
  const SequenceId seq = 0;
  const std::vector<float> x(16, 0.5f);
  std::vector<float> y(16, 0.0f);
  const std::string expected =
      "a cache built with this operator's cache_record() (" + operator_side + ")";
  const std::string actual = "a cache with another record (" + cache_side + ")";
  EXPECT_TRUE(throws_error([&] { op.decode(cache, &seq, 1, x.data(), y.data()); },
                           {"GroupedQueryAttention::decode", "cache", expected, actual}));
  EXPECT_TRUE(throws_error([&] { op.prefill(cache, seq, 1, x.data(), y.data()); },
                           {"GroupedQueryAttention::prefill", "cache", expected, actual}));
  const GqaKernel<float> kernel(2, 1, 8, 8);
  std::vector<float> q(16, 0.5f), out(16),
      workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  EXPECT_TRUE(throws_error(
      [&] { kernel.attend(q.data(), 1, cache.view(seq), out.data(), nullptr, workspace.data()); },
      {"GqaKernel::attend", "view",
       "a view of a cache built with this kernel's cache_record() (" + operator_side + ")",
       "a view with another record (" + cache_side + ")"}));
}

// The operators used to describe both records by elements per token and plane 0's storage, so
// an engine's cache without planes was read out of bounds (a crash instead of an Error).
TEST(RecordMismatch, ACacheWithoutPlanesIsAnErrorNotACrash) {
  SCOPED_TRACE("a cache of CacheRecord()");
  expect_record_mismatch(CacheRecord(), "2 planes (K, V)", "0 planes");
}

// A kernel without a record (default-constructed) is the other side that may have no planes.
TEST(RecordMismatch, AKernelWithoutPlanesIsAnErrorNotACrash) {
  const GqaKernel<float> empty;
  ContiguousKvCache cache(records::gqa(1, 8, 8), 1, 4);
  const SequenceId seq = cache.add_sequence();
  std::vector<float> q(16, 0.5f), out(16), workspace(64);
  EXPECT_TRUE(throws_error(
      [&] { empty.attend(q.data(), 1, cache.view(seq), out.data(), nullptr, workspace.data()); },
      {"GqaKernel::attend", "view",
       "a view of a cache built with this kernel's cache_record() (0 planes)",
       "a view with another record (2 planes (K, V))"}));
}

// "expected 16 elements per token, storage f32, got a cache with 16 elements per token, storage
// f32" said nothing: each kind of difference is named, with both sides.
TEST(RecordMismatch, TheMessageNamesTheFirstFieldThatDiffers) {
  const StorageType f32 = StorageType::f32;
  const StorageType bf16 = StorageType::bf16;
  {
    SCOPED_TRACE("plane count, fewer");
    expect_record_mismatch(CacheRecord({{"K", 1, 8, f32}}), "2 planes (K, V)", "1 plane (K)");
  }
  {
    SCOPED_TRACE("plane count, more");
    expect_record_mismatch(records::tpa(2, 8, 8, 1, 1), "2 planes (K, V)",
                           "4 planes (A_K, B_K, A_V, B_V)");
  }
  {
    SCOPED_TRACE("name");
    expect_record_mismatch(CacheRecord({{"K", 1, 8, f32}, {"W", 1, 8, f32}}), "plane 1 named 'V'",
                           "plane 1 named 'W'");
  }
  {
    SCOPED_TRACE("planes in another order");
    expect_record_mismatch(CacheRecord({{"V", 1, 8, f32}, {"K", 1, 8, f32}}), "plane 0 named 'K'",
                           "plane 0 named 'V'");
  }
  {
    SCOPED_TRACE("rows");
    expect_record_mismatch(records::gqa(2, 8, 8), "plane 0 (K): rows 1", "plane 0 (K): rows 2");
  }
  {
    SCOPED_TRACE("cols");
    expect_record_mismatch(records::gqa(1, 8, 4), "plane 1 (V): cols 8", "plane 1 (V): cols 4");
  }
  {
    SCOPED_TRACE("same shape, another storage");
    expect_record_mismatch(records::gqa(1, 8, 8, bf16), "plane 0 (K): storage f32",
                           "plane 0 (K): storage bf16");
  }
  {
    SCOPED_TRACE("storage of a later plane");
    expect_record_mismatch(CacheRecord({{"K", 1, 8, f32}, {"V", 1, 8, bf16}}),
                           "plane 1 (V): storage f32", "plane 1 (V): storage bf16");
  }
}

// ---- the range of bf16 and f16, as docs/cache.md states it ----------------------------------

// The values one token's single plane of `storage` gives back through a view.
std::vector<float> stored(StorageType storage, const std::vector<float>& values) {
  const Index n = static_cast<Index>(values.size());
  ContiguousKvCache cache(CacheRecord({{"x", 1, n, storage}}), 1, 1);
  const SequenceId seq = cache.add_sequence();
  cache.append(seq, 1, {{values.data(), 1, n}});
  std::vector<float> out;
  const SequenceView view = cache.view(seq);
  if (storage == StorageType::f16)
    detail::read_elements(view.plane_block<Eigen::half>(0, 0), n, out);
  if (storage == StorageType::bf16)
    detail::read_elements(view.plane_block<Eigen::bfloat16>(0, 0), n, out);
  return out;
}

TEST(StorageRange, F16OverflowsToInfinityAndBf16KeepsEightSignificantBits) {
  const float inf = std::numeric_limits<float>::infinity();
  const float tiny = std::ldexp(1.0f, -24);  // f16's smallest subnormal
  const std::vector<float> f16 =
      stored(StorageType::f16, {65504.0f, 65519.0f, 65520.0f, -70000.0f, tiny, tiny / 2});
  EXPECT_EQ(f16, (std::vector<float>{65504.0f, 65504.0f, inf, -inf, tiny, 0.0f}));
  const std::vector<float> bf16 = stored(StorageType::bf16, {70000.0f, 257.0f, 1e38f, 70000.0f});
  EXPECT_EQ(bf16[0], 70144.0f);
  EXPECT_EQ(bf16[1], 256.0f);
  EXPECT_TRUE(std::isfinite(bf16[2]));
}

// One query row of GqaKernel<half> (h = g = 1, d 4) over f16 keys and values of `tokens` tokens.
std::vector<float> attend_f16(const std::vector<float>& k, const std::vector<float>& v,
                              const std::vector<float>& q, Index tokens) {
  ContiguousKvCache cache(records::gqa(1, 4, 4, StorageType::f16), 1, tokens);
  const SequenceId seq = cache.add_sequence();
  cache.append(seq, tokens, {{k.data(), 1, 4}, {v.data(), 1, 4}});
  const GqaKernel<Eigen::half> kernel(1, 1, 4, 4);
  std::vector<float> out(5), workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  kernel.attend(q.data(), 1, cache.view(seq), out.data(), out.data() + 4, workspace.data());
  return out;  // the row's 4 outputs, then its lse
}

// An f16 key element beyond 65504 is stored as an infinity. A score of +inf or NaN makes the
// row's output and lse NaN; a score of -inf counts as a masked key; an infinite value makes its
// output column infinite for a row that weights the token above 0.
TEST(StorageRange, InfiniteF16KeysAndValuesReachTheOutputAsDocsCacheMdSays) {
  const std::vector<float> k = {1, 1, 1, 1, 0.5f, 0.5f, 0.5f, 0.5f, 0.2f, 0.1f, 0, 0};
  const std::vector<float> v = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  const std::vector<float> q = {1, 1, 1, 1};
  const auto all_nan = [](const std::vector<float>& out) {
    return std::all_of(out.begin(), out.end(), [](float x) { return std::isnan(x); });
  };
  std::vector<float> plus_inf = k;
  plus_inf[0] = 70000;  // score +inf
  EXPECT_TRUE(all_nan(attend_f16(plus_inf, v, q, 3)));
  std::vector<float> nan_score = k;
  nan_score[0] = 70000;
  nan_score[1] = -70000;  // +inf - inf: score NaN
  EXPECT_TRUE(all_nan(attend_f16(nan_score, v, q, 3)));
  std::vector<float> zero_query = q;
  zero_query[0] = 0;  // 0 x inf: score NaN
  EXPECT_TRUE(all_nan(attend_f16(plus_inf, v, zero_query, 3)));

  std::vector<float> minus_inf = k;
  minus_inf[0] = -70000;  // score -inf: as if token 0 were not there
  const std::vector<float> masked = attend_f16(minus_inf, v, q, 3);
  const std::vector<float> without =
      attend_f16({k.begin() + 4, k.end()}, {v.begin() + 4, v.end()}, q, 2);
  for (std::size_t i = 0; i < 5; ++i) EXPECT_NEAR(masked[i], without[i], 1e-6f) << i;

  std::vector<float> inf_value = v;
  inf_value[0] = 70000;  // token 0's first value column: +inf, weighted above 0
  const std::vector<float> out = attend_f16(k, inf_value, q, 3);
  EXPECT_EQ(out[0], std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isfinite(out[1]) && std::isfinite(out[2]) && std::isfinite(out[3]));
}

// ---- the allocation counter itself ----------------------------------------------------------

void* volatile escape = nullptr;  // keeps the compiler from eliding new/delete pairs

TEST(AllocationCounter, CountsEveryFormOfOperatorNew) {
  ASSERT_TRUE(AllocationCounter::installed());
  struct alignas(128) Wide {
    unsigned char bytes[256];
  };
  std::uint64_t counts[8] = {};
  std::uint64_t bytes = 0;
  {
    const AllocationCounter counter;
    int* one = new int(7);
    escape = one;
    counts[0] = counter.allocations();
    int* many = new int[5];
    escape = many;
    counts[1] = counter.allocations();
    int* quiet = new (std::nothrow) int(3);
    escape = quiet;
    counts[2] = counter.allocations();
    Wide* wide = new Wide;
    escape = wide;
    counts[3] = counter.allocations();
    Wide* wides = new Wide[2];
    escape = wides;
    counts[4] = counter.allocations();
    void* raw = ::operator new(100, std::align_val_t(64), std::nothrow);
    escape = raw;
    counts[5] = counter.allocations();
    bytes = counter.bytes();
    delete one;
    delete[] many;
    delete quiet;
    delete wide;
    delete[] wides;
    ::operator delete(raw, std::align_val_t(64));
    counts[6] = counter.allocations();  // deleting allocates nothing
  }
  for (int i = 0; i < 6; ++i) EXPECT_EQ(counts[i], static_cast<std::uint64_t>(i + 1));
  EXPECT_EQ(counts[6], 6u);
  EXPECT_GE(bytes, sizeof(int) * 7 + sizeof(Wide) * 3 + 100);

  std::uint64_t none = 1;
  {
    const AllocationCounter counter;
    none = counter.allocations();
  }
  EXPECT_EQ(none, 0u);
  std::uint64_t growth = 0;
  {
    const AllocationCounter counter;
    std::vector<double> values;
    for (int i = 0; i < 100; ++i) values.push_back(i);
    escape = values.data();
    growth = counter.allocations();
  }
  EXPECT_GE(growth, 1u);
}

// prefix() hands kernels a causal cut of a sequence; a cut outside [0, length] is refused.
TEST(SequenceView, PrefixRejectsALengthOutsideTheSequence) {
  PagedKvCache cache(records::gqa(1, 4, 4), 4, 4, 1);
  const SequenceId seq = cache.add_sequence();
  const std::vector<float> rows(6 * 4, 1.0f);
  cache.append(seq, 6, {{rows.data(), 1, 4}, {rows.data(), 1, 4}});
  const SequenceView view = cache.view(seq);
  EXPECT_EQ(view.prefix(0).length(), 0);
  EXPECT_EQ(view.prefix(5).length(), 5);
  EXPECT_EQ(view.prefix(5).block_count(), 2);
  EXPECT_EQ(view.prefix(6).length(), 6);
  for (const Index bad : {Index(-1), Index(7)})
    EXPECT_TRUE(throws_error([&] { (void)view.prefix(bad); },
                             {"SequenceView::prefix", "length", "in [0, 6]", std::to_string(bad)}));
}

// ---- an engine's cache: a pool and a block table per plane ------------------------------------

// The view of a SplitPoolCache points every plane into its own pool, at its own pages: K's
// blocks of a sequence are not at V's page numbers, and no plane is read through another's table.
TEST(SplitPoolCache, KeepsEachPlaneInItsOwnPoolWithItsOwnBlockTable) {
  std::mt19937 rng(21);
  const CacheRecord record = records::gqa(2, 3, 5);
  SplitPoolCache cache(record, 4, 12, 3);
  ReferenceCache model(record);
  std::vector<SequenceId> seqs;
  for (int i = 0; i < 3; ++i) {
    seqs.push_back(cache.add_sequence());
    model.add(seqs.back());
  }
  for (Index n : {3, 6, 2, 5}) {  // in turns, so each sequence's pages are scattered
    for (SequenceId seq : seqs) {
      TokenBatch batch(record, n, rng);
      cache.append(seq, n, batch.inputs(), batch.plane_count());
      model.append(seq, batch, 0, n);
    }
  }
  EXPECT_TRUE(holds_all(cache, model));
  EXPECT_EQ(cache.pages_in_use(0), 3 * 4);
  EXPECT_EQ(cache.pages_in_use(1), 3 * 4);
  Index same_page_numbers = 0;
  for (SequenceId seq : seqs) {
    const SequenceView view = cache.view(seq);
    ASSERT_EQ(view.block_count(), 4);
    for (Index b = 0; b < view.block_count(); ++b) {
      for (Index p = 0; p < 2; ++p) {
        const auto* rows = reinterpret_cast<const std::byte*>(view.plane_block<float>(p, b));
        EXPECT_EQ(rows, cache.page_of(seq, p, b) + SplitPoolCache::kHeaderBytes);
        EXPECT_TRUE(rows >= cache.pool_begin(p) && rows < cache.pool_end(p))
            << "plane " << p << " block " << b << " outside its pool";
      }
      same_page_numbers += cache.page_number(seq, 0, b) == cache.page_number(seq, 1, b);
    }
  }
  EXPECT_EQ(same_page_numbers, 0) << "K and V pages handed out in the same order";
}

// The same tokens in a PagedKvCache and a SplitPoolCache: sequences of `lengths` tokens,
// appended in turns of 1 to 5 tokens so that every sequence's pages are scattered in each pool.
struct TwinCaches {
  std::unique_ptr<PagedKvCache> paged;
  std::unique_ptr<SplitPoolCache> split;
  std::vector<std::pair<SequenceId, SequenceId>> seqs;  // {id in paged, id in split}
};

TwinCaches twin_caches(const CacheRecord& record, Index paged_page, Index split_page,
                       const std::vector<Index>& lengths, std::mt19937& rng) {
  const Index count = static_cast<Index>(lengths.size());
  Index total = 0;
  for (Index length : lengths) total += length;
  TwinCaches twins;
  twins.paged =
      std::make_unique<PagedKvCache>(record, paged_page, total / paged_page + count, count);
  twins.split =
      std::make_unique<SplitPoolCache>(record, split_page, total / split_page + count, count);
  for (Index i = 0; i < count; ++i)
    twins.seqs.emplace_back(twins.paged->add_sequence(), twins.split->add_sequence());
  for (bool more = true; more;) {
    more = false;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      const Index rest = lengths[i] - twins.paged->length(twins.seqs[i].first);
      if (rest == 0) continue;
      const Index n = std::min(rest, std::uniform_int_distribution<Index>(1, 5)(rng));
      TokenBatch batch(record, n, rng);
      twins.paged->append(twins.seqs[i].first, n, batch.inputs(), batch.plane_count());
      twins.split->append(twins.seqs[i].second, n, batch.inputs(), batch.plane_count());
      more = true;
    }
  }
  return twins;
}

std::vector<float> random_floats(Index n, std::mt19937& rng) {
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::vector<float> out(static_cast<std::size_t>(n));
  for (float& x : out) x = value(rng);
  return out;
}

// attend(view, n, queries, out, lse) runs a kernel for the last n tokens of `view`, with
// `query_floats` floats of query per token (from `queries`), writing out: [n, out_floats] and
// lse: [n, heads]. For each sequence and several n (decode, a short and a long prefill), the
// outputs over the paged view and the split view must agree: bit for bit when both caches have
// pages of one size (the kernel then meets the same tiles), else to `tolerance`.
template <class Attend>
void expect_same_attention(const TwinCaches& twins, Index query_floats, Index out_floats,
                           Index heads, float tolerance, std::mt19937& rng, Attend attend) {
  for (const auto& ids : twins.seqs) {
    const SequenceView paged = twins.paged->view(ids.first);
    const SequenceView split = twins.split->view(ids.second);
    ASSERT_EQ(paged.length(), split.length());
    const Index length = paged.length();
    for (Index n : {Index(1), Index(2), Index(7), length}) {
      if (n > length) continue;
      SCOPED_TRACE("sequence of " + std::to_string(length) + " tokens, last " + std::to_string(n));
      const std::vector<float> q = random_floats(n * query_floats, rng);
      std::vector<float> out_paged(static_cast<std::size_t>(n * out_floats), -7.0f);
      std::vector<float> out_split = out_paged;
      std::vector<float> lse_paged(static_cast<std::size_t>(n * heads), -7.0f);
      std::vector<float> lse_split = lse_paged;
      attend(paged, n, q.data(), out_paged.data(), lse_paged.data());
      attend(split, n, q.data(), out_split.data(), lse_split.data());
      for (std::size_t i = 0; i < out_paged.size(); ++i) {
        ASSERT_TRUE(std::isfinite(out_paged[i])) << "out[" << i << "]";
        if (tolerance == 0.0f) {
          ASSERT_TRUE(same_bits(out_paged[i], out_split[i]))
              << "out[" << i << "]: paged " << out_paged[i] << ", split " << out_split[i];
        } else {
          ASSERT_NEAR(out_paged[i], out_split[i], tolerance) << "out[" << i << "]";
        }
      }
      for (std::size_t i = 0; i < lse_paged.size(); ++i) {
        if (tolerance == 0.0f) {
          ASSERT_TRUE(same_bits(lse_paged[i], lse_split[i]))
              << "lse[" << i << "]: paged " << lse_paged[i] << ", split " << lse_split[i];
        } else {
          ASSERT_NEAR(lse_paged[i], lse_split[i], tolerance) << "lse[" << i << "]";
        }
      }
    }
  }
}

template <class Storage>
void gqa_reads_split_pools_as_paged(Index paged_page, Index split_page, float tolerance) {
  std::mt19937 rng(31);
  const Index h = 4, g = 2, d = 8, dv = 6;
  const GqaKernel<Storage> kernel(h, g, d, dv);
  const TwinCaches twins =
      twin_caches(kernel.cache_record(), paged_page, split_page, {1, 13, 50}, rng);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  expect_same_attention(twins, h * d, h * dv, h, tolerance, rng,
                        [&](const SequenceView& view, Index n, const float* q, float* out,
                            float* lse) { kernel.attend(q, n, view, out, lse, workspace.data()); });
}

TEST(EngineCacheView, GqaKernelReadsAPoolPerPlaneAsItReadsAPagedCache) {
  {
    SCOPED_TRACE("f32, pages of 5 in both");
    gqa_reads_split_pools_as_paged<float>(5, 5, 0.0f);
  }
  {
    SCOPED_TRACE("bf16, pages of 16 in both");
    gqa_reads_split_pools_as_paged<Eigen::bfloat16>(16, 16, 0.0f);
  }
  {
    SCOPED_TRACE("f16, pages of 16 and of 3: other tiles, another summation order");
    gqa_reads_split_pools_as_paged<Eigen::half>(16, 3, 1e-5f);
  }
}

template <class Storage>
void tpa_reads_split_pools_as_paged(Index paged_page, Index split_page, float tolerance) {
  std::mt19937 rng(41);
  TpaShape shape;
  shape.heads = 5;
  shape.head_dim = 8;
  shape.value_dim = 6;
  shape.rank_q = 2;
  shape.rank_k = 2;
  shape.rank_v = 1;
  const TpaKernel<Storage> kernel(shape);
  const TwinCaches twins =
      twin_caches(kernel.cache_record(), paged_page, split_page, {2, 17, 40}, rng);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  const Index a_floats = shape.rank_q * shape.heads;
  const Index b_floats = shape.rank_q * shape.head_dim;
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
    SCOPED_TRACE(order == TpaOrder::factor ? "factored queries, factor order"
                                           : "factored queries, query order");
    // The factored queries of one token side by side: a_q, then b_q, split below.
    expect_same_attention(
        twins, a_floats + b_floats, shape.heads * shape.value_dim, shape.heads, tolerance, rng,
        [&](const SequenceView& view, Index n, const float* q, float* out, float* lse) {
          std::vector<float> a_q, b_q;
          for (Index t = 0; t < n; ++t) {
            const float* token = q + t * (a_floats + b_floats);
            a_q.insert(a_q.end(), token, token + a_floats);
            b_q.insert(b_q.end(), token + a_floats, token + a_floats + b_floats);
          }
          kernel.attend(a_q.data(), b_q.data(), n, view, out, lse, workspace.data(), order);
        });
  }
  SCOPED_TRACE("materialised queries");
  expect_same_attention(twins, shape.heads * shape.head_dim, shape.heads * shape.value_dim,
                        shape.heads, tolerance, rng,
                        [&](const SequenceView& view, Index n, const float* q, float* out,
                            float* lse) { kernel.attend(q, n, view, out, lse, workspace.data()); });
}

TEST(EngineCacheView, TpaKernelReadsAPoolPerPlaneAsItReadsAPagedCache) {
  {
    SCOPED_TRACE("f32, pages of 7 in both");
    tpa_reads_split_pools_as_paged<float>(7, 7, 0.0f);
  }
  {
    SCOPED_TRACE("bf16, pages of 4 in both");
    tpa_reads_split_pools_as_paged<Eigen::bfloat16>(4, 4, 0.0f);
  }
  {
    SCOPED_TRACE("f32, pages of 16 and of 5");
    tpa_reads_split_pools_as_paged<float>(16, 5, 1e-5f);
  }
}

// The shared-table constructor is the per-plane one with every plane on one table: the same
// addresses, block by block.
TEST(SequenceView, ASharedTableIsOneTablePerPlaneWithTheSameBlocks) {
  const CacheRecord record = records::gqa(1, 2, 3);  // K: 2 floats, V: 3 floats per token
  std::vector<float> memory(4 * 20);
  const std::byte* base = reinterpret_cast<const std::byte*>(memory.data());
  // Blocks of 4 tokens: K rows at byte 0, V rows at byte 32 of each 80-byte block, in the order
  // 2, 0, 3.
  const std::byte* blocks[] = {base + 2 * 80, base, base + 3 * 80};
  const Index offsets[] = {0, 32};
  const PlaneTable tables[] = {{blocks, 0}, {blocks, 32}};
  const SequenceView shared(&record, blocks, offsets, 4, 10);
  const SequenceView per_plane(&record, tables, 4, 10);
  ASSERT_EQ(per_plane.block_count(), 3);
  EXPECT_EQ(per_plane.tokens_in_block(2), 2);
  for (Index b = 0; b < 3; ++b)
    for (Index p = 0; p < 2; ++p)
      EXPECT_EQ(per_plane.plane_block<float>(p, b), shared.plane_block<float>(p, b));
  EXPECT_EQ(per_plane.plane_block<float>(1, 1), memory.data() + 8);
  EXPECT_EQ(per_plane.prefix(4).block_count(), 1);
  EXPECT_EQ(per_plane.prefix(4).plane_block<float>(1, 0), memory.data() + 2 * 20 + 8);
}

// A view of tokens needs somewhere to read them from; an empty one does not.
TEST(SequenceView, ConstructorsRejectMissingTablesAndBadSizes) {
  const CacheRecord record = records::gqa(1, 2, 3);
  std::vector<float> memory(40);
  const std::byte* block = reinterpret_cast<const std::byte*>(memory.data());
  const std::byte* const blocks[] = {block};
  const Index offsets[] = {0, 32};
  const PlaneTable tables[] = {{blocks, 0}, {nullptr, 32}};
  EXPECT_TRUE(throws_error(
      [&] { SequenceView view(&record, tables, 4, 3); },
      {"SequenceView", "planes[1].blocks", "the block addresses of plane 'V'", "null"}));
  EXPECT_TRUE(throws_error(
      [&] { SequenceView view(&record, nullptr, 4, 3); },
      {"SequenceView", "planes", "one table per plane for a sequence of 3 tokens", "null"}));
  EXPECT_TRUE(throws_error(
      [&] { SequenceView view(&record, blocks, nullptr, 4, 3); },
      {"SequenceView", "blocks, plane_offsets", "non-null for a sequence of 3 tokens", "null"}));
  EXPECT_TRUE(throws_error([&] { SequenceView view(nullptr, tables, 4, 0); },
                           {"SequenceView", "record", "the cache's record", "null"}));
  EXPECT_TRUE(throws_error([&] { SequenceView view(&record, tables, 0, 3); },
                           {"SequenceView", "block_tokens", ">= 1", "0"}));
  EXPECT_TRUE(throws_error([&] { SequenceView view(&record, blocks, offsets, 4, -1); },
                           {"SequenceView", "length", ">= 0", "-1"}));
  // An empty sequence needs no tables.
  EXPECT_EQ(SequenceView(&record, nullptr, 4, 0).block_count(), 0);
  EXPECT_EQ(SequenceView(&record, nullptr, nullptr, 4, 0).block_count(), 0);
}

}  // namespace
}  // namespace tpattn::test
