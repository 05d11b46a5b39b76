// tests/mla_test.cpp -- MultiHeadLatentAttention and the bare MlaKernel against a plain
// double-precision reference (tests/support/mla_reference.hpp) that builds EXPLICIT per-head keys
// and values (docs/attention.md §2, §6.4), RoPE offsets and write- vs read-time rotation (§6.5),
// split-and-merge (§6.7), plus cache sizes (§5), misuse, and allocation.
//
// Tolerances (all relative to the largest reference entry, i.e. max|got - ref| / max|ref|):
//  - kLayerTolerance = 1e-5. The operator computes in fp32 (unit roundoff 6e-8). Its longest
//    dot products have d_model, d_c + d_R or h d_v terms (<= 768 here); random-sign rounding
//    errors grow like sqrt(terms), so each stage is off by ~1e-6 relative at worst, and the
//    scores (O(1), see random_mla_weights) carry that into the softmax weights unamplified.
//    Measured (g++ 12 -O2 -march=native, AVX-512): at most 7e-7 over every layer case. 1e-5
//    keeps a >10x margin while a wrong option (a dropped gain, the other RoPE pairing or
//    direction, the wrong scale) is off by > 1e-3 (100 tolerances), as the contrast checks below
//    show for every option.
//  - bfloat16 / half caches use the same 1e-5: the reference rounds its own cached latent (after
//    the norm) and rope key (after the rotation) through the storage type (round_like_cache),
//    so both sides attend over the same keys and values and only fp32 arithmetic differs. A value
//    within fp32 error of a rounding midpoint may round the other way in the operator; the
//    reference adopts the cache's rounding there (and only there, see round_like_cache). Without
//    that, 6 of the bf16/f16 cases would miss by up to 2.8e-5 from one-ulp flips alone.
//  - storage_tolerance = 2.5 u: the same bf16 / half outputs also against the EXACT reference,
//    whose cached values are not rounded (u = 2^-8 bf16, 2^-11 half: 9.8e-3 and 1.2e-3). The
//    cache holds c_s (1 + e) and kR_s (1 + e') entrywise, |e|, |e'| <= u, of random sign (rms
//    u / sqrt 3). Two paths reach y, both estimated, not worst-case bounds:
//    (a) values: y is linear in c_s (v_s = W_UV_i c_s, then W_O): moved by <= u relative;
//    (b) scores: score_s moves by d_s = scale (q^_i . (e c_s) + qR_i . (e' kR_s)), a random-sign
//    sum of the terms of the score itself, rms ~ u / sqrt 3 x rms(score) ~ 0.6 u, as the scores
//    are O(1) (random_mla_weights); the weights move by p_s (d_s - mean_p d), so o_i moves by
//    sum_s p_s (d_s - mean_p d)(v_s - o_i), at most max|d - mean d| ~ 1.5 u times the spread of
//    the values. Together <= 2.5 u. Measured over every layer case: 3.1e-3 (0.8 u) bf16, 3.7e-4
//    (0.75 u) half. A sanity bound, for gross errors: an f16 cache keeping only bf16's 8 bits
//    fails it in 44 of the 52 half cases (up to 3.1e-3), while a bf16 cache keeping 6 bits still
//    passes (9.5e-3); finer errors are round_like_cache's to catch. gqa_test uses 1e-2 / 2e-3.
//  - kKernelTolerance = 1e-5 for the bare kernel's latent output and its LSE (absolute on LSE
//    values of O(1) .. O(10), i.e. ~1e-6 relative): its inputs are read back from the cache
//    exactly, so only the fp32 score dot products (d_c + d_R <= 576 terms) and the online
//    softmax differ from the double reference. Measured: at most 9e-7 for both.
//  - §6.5 (offset invariance, rotating kR at write time == at read time) on the bare kernel:
//    kKernelTolerance (measured: 4.9e-7 on the latent output, 3.4e-7 on the LSE); through the
//    layer: kLayerTolerance (measured: 3.6e-7). The two double computations (write-time and
//    read-time rotation) agree to 1e-12.
//  - kMergeTolerance = 1e-6 (§6.7): merged partial results vs one pass over the same cached
//    values, two fp32 computations in different orders, compared as max|diff| / max(1, max|one
//    pass|): the latents are O(1) (N(0, 1)) and the merge forms convex combinations of the parts'
//    outputs, which are larger than the whole's (fewer keys averaged). Measured: 4.8e-7 (output,
//    ~8 ulps of O(1) values) and 8e-8 (LSE ~ 6, relative); the output margin is only ~2x: fp32
//    sums over 77 keys differ by that much when taken in another order.
// clang-format off
#include "support/check_capture.hpp"  // first: before Eigen and any tpattn header
// clang-format on

#include "tpattn/attention/mla.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support/allocation_counter.hpp"
#include "support/feeds.hpp"
#include "support/mla_reference.hpp"
#include "support/reference.hpp"
#include "support/storage_types.hpp"
#include "support/test_caches.hpp"
#include "tpattn/cache/contiguous_cache.hpp"
#include "tpattn/cache/paged_cache.hpp"
#include "tpattn/kernels/rope.hpp"
#include "tpattn/kernels/softmax_state.hpp"

namespace {

using tpattn::test::CacheKind;
using tpattn::test::expect_error_before_allocating;
using tpattn::test::Feed;
using tpattn::test::kAllCacheKinds;
using tpattn::test::kAllStorage;
using tpattn::test::kDecodePrefillChunked;
using tpattn::test::kFitsInIndex;
using tpattn::test::kPageTokens;
using tpattn::test::make_cache;
using tpattn::test::with_storage;

using tpattn::CacheRecord;
using tpattn::ContiguousKvCache;
using tpattn::Index;
using tpattn::KvCache;
using tpattn::MlaConfig;
using tpattn::MlaKernel;
using tpattn::MlaWeights;
using tpattn::MultiHeadLatentAttention;
using tpattn::PagedKvCache;
using tpattn::Rope;
using tpattn::RopeConfig;
using tpattn::RopeDirection;
using tpattn::RopePairing;
using tpattn::RowMatrix;
using tpattn::SequenceId;
using tpattn::SequenceView;
using tpattn::StorageType;
using tpattn_test::AttentionResult;
using tpattn_test::Tensor3;

constexpr double kLayerTolerance = 1e-5;
constexpr double kKernelTolerance = 1e-5;
constexpr double kMergeTolerance = 1e-6;
// A wrong option must miss the reference by this many tolerances for its contrast check to count.
constexpr double kContrastFactor = 100.0;
// fp32 error allowed on a cached value before its storage rounding, relative to the plane's
// largest value (see round_like_cache): the latent is a d_model-term dot product and an RMSNorm.
constexpr double kCachedValueSlack = 1e-5;

// Against the UNROUNDED double reference when the cache rounds c_s and kR_s: 2.5 u (see the
// header), i.e. 9.8e-3 for bf16 (u = 2^-8) and 1.2e-3 for half (u = 2^-11).
double storage_tolerance(StorageType storage) {
  if (storage == StorageType::f32) return kLayerTolerance;
  return 2.5 * tpattn_test::unit_roundoff(storage);
}

// ---- cached bytes -------------------------------------------------------------------------------

// Token t's bytes of plane `plane` in the view (whatever the plane's storage type).
const std::byte* token_bytes(const SequenceView& view, Index plane, Index t) {
  const Index block = t / view.block_tokens(), row = t % view.block_tokens();
  const Index offset = row * view.elements_per_token(plane);
  const std::byte* bytes = nullptr;
  with_storage(view.record().plane(plane).storage, [&](auto tag) {
    using S = decltype(tag);
    bytes = reinterpret_cast<const std::byte*>(view.plane_block<S>(plane, block) + offset);
  });
  return bytes;
}

// The cached values of one plane of a sequence, as doubles [L, 1, width]: exactly what the
// kernel reads back.
Tensor3 read_plane(const SequenceView& view, Index plane) {
  const Index width = view.elements_per_token(plane);
  Tensor3 values(view.length(), 1, width);
  with_storage(view.record().plane(plane).storage, [&](auto tag) {
    using S = decltype(tag);
    for (Index t = 0; t < view.length(); ++t) {
      const S* row = reinterpret_cast<const S*>(token_bytes(view, plane, t));
      for (Index c = 0; c < width; ++c) values.at(t, 0, c) = static_cast<float>(row[c]);
    }
  });
  return values;
}

// Everything misuse must leave alone: lengths, byte counts, free pages and every cached byte.
struct CacheSnapshot {
  std::vector<Index> lengths;
  Index bytes_used = 0;
  Index sequence_count = 0;
  Index free_pages = -1;
  std::vector<std::vector<std::byte>> data;  // per sequence, every token's planes

  bool operator==(const CacheSnapshot& other) const {
    return lengths == other.lengths && bytes_used == other.bytes_used &&
           sequence_count == other.sequence_count && free_pages == other.free_pages &&
           data == other.data;
  }
};

CacheSnapshot snapshot(const KvCache& cache, const std::vector<SequenceId>& seqs) {
  CacheSnapshot s;
  s.bytes_used = cache.bytes_used();
  s.sequence_count = cache.sequence_count();
  if (const auto* paged = dynamic_cast<const PagedKvCache*>(&cache))
    s.free_pages = paged->free_page_count();
  for (SequenceId seq : seqs) {
    s.lengths.push_back(cache.length(seq));
    const SequenceView view = cache.view(seq);
    std::vector<std::byte> bytes;
    for (Index t = 0; t < view.length(); ++t)
      for (Index p = 0; p < cache.record().plane_count(); ++p) {
        const std::byte* row = token_bytes(view, p, t);
        bytes.insert(bytes.end(), row, row + cache.record().plane(p).bytes_per_token());
      }
    s.data.push_back(std::move(bytes));
  }
  return s;
}

// ---- comparisons --------------------------------------------------------------------------------

// max|actual - expected| / max|expected|; NaN gives +inf.
double relative_error(const RowMatrix& actual, const Eigen::MatrixXd& expected) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return std::numeric_limits<double>::infinity();
  double worst = 0.0, scale = 0.0;
  for (Index r = 0; r < actual.rows(); ++r)
    for (Index c = 0; c < actual.cols(); ++c) {
      const double error = std::abs(static_cast<double>(actual(r, c)) - expected(r, c));
      if (std::isnan(error)) return std::numeric_limits<double>::infinity();
      worst = std::max(worst, error);
      scale = std::max(scale, std::abs(expected(r, c)));
    }
  return worst / std::max(scale, 1e-30);
}

Eigen::MatrixXd rows_of(const Eigen::MatrixXd& m, Index first, Index count) {
  return m.middleRows(first, count);
}

// Checks the cached latent and rope key of `seq` against the reference's (and rounds the
// reference like the cache, see round_like_cache), then the outputs y of the last y.rows() of the
// sequence's tokens against the explicit-K/V reference. x: the sequence's inputs from token 0.
::testing::AssertionResult matches_explicit_reference(const MlaConfig& config,
                                                      const MlaWeights& weights, const RowMatrix& x,
                                                      const RowMatrix& y, const KvCache& cache,
                                                      SequenceId seq, double tolerance,
                                                      double* error_out = nullptr) {
  const Eigen::MatrixXd xd = tpattn_test::to_double(x);
  tpattn_test::MlaProjections p = tpattn_test::mla_projections(config, weights, xd);
  const SequenceView view = cache.view(seq);
  if (view.length() != x.rows())
    return ::testing::AssertionFailure()
           << "cache holds " << view.length() << " tokens, inputs " << x.rows();
  const StorageType storage = cache.record().plane(0).storage;
  const auto round = [&](Tensor3& reference, Index plane, const char* name) {
    const double slack = kCachedValueSlack * tpattn_test::max_abs(reference);
    return tpattn_test::round_like_cache(storage, reference, read_plane(view, plane), slack, name);
  };
  const tpattn_test::RoundingReport latent = round(p.latent, 0, "latent");
  const tpattn_test::RoundingReport rope_key = round(p.rope_key, 1, "rope_key");
  if (latent.wrong_values + rope_key.wrong_values > 0)
    return ::testing::AssertionFailure()
           << "cached values are no rounding of the reference: " << latent.wrong_values
           << " latent, " << rope_key.wrong_values << " rope_key; " << latent.problem
           << rope_key.problem;

  const Index first = x.rows() - y.rows();
  const Eigen::MatrixXd expected =
      tpattn_test::mla_layer_reference(config, weights, rows_of(xd, first, y.rows()), p.latent,
                                       p.rope_key, tpattn_test::mla_scale(config));
  const double error = relative_error(y, expected);
  if (error_out != nullptr) *error_out = error;
  if (error <= tolerance)
    return ::testing::AssertionSuccess()
           << "relative error " << error
           << " (near-ties adopted: " << latent.near_ties + rope_key.near_ties << ")";
  return ::testing::AssertionFailure()
         << "relative error " << error << " > " << tolerance << " (" << y.rows() << " x "
         << y.cols() << " outputs; near-ties adopted: " << latent.near_ties + rope_key.near_ties
         << ")";
}

// ---- configs ------------------------------------------------------------------------------------

MlaConfig small_config() {
  MlaConfig c;
  c.d_model = 40;
  c.heads = 3;
  c.head_dim = 16;
  c.rope_dim = 8;
  c.value_dim = 16;
  c.kv_latent_dim = 32;
  c.q_latent_dim = 24;
  c.norm_eps = 1e-6f;
  c.rope.pairing = RopePairing::interleaved;  // DeepSeek
  return c;
}

// DeepSeek-V2's MLA widths (d_c 512, d_R 64, d_h 128; its d'_c is 1536), fewer heads, smaller
// d_model, interleaved RoPE.
MlaConfig deepseek_like_config() {
  MlaConfig c;
  c.d_model = 256;
  c.heads = 4;
  c.head_dim = 128;
  c.rope_dim = 64;
  c.value_dim = 128;
  c.kv_latent_dim = 512;
  c.q_latent_dim = 192;
  c.rope.pairing = RopePairing::interleaved;
  return c;
}

// The T6 paper's small MLA (d_c 256, d_R 32, d_h 64), its half-split reversed RoPE.
MlaConfig t6_small_config() {
  MlaConfig c;
  c.d_model = 192;
  c.heads = 6;
  c.head_dim = 64;
  c.rope_dim = 32;
  c.value_dim = 64;
  c.kv_latent_dim = 256;
  c.q_latent_dim = 96;
  c.rope.pairing = RopePairing::half_split;
  c.rope.direction = RopeDirection::reversed;
  return c;
}

// ---- running a sequence through the operator ----------------------------------------------------

struct Step {
  bool decode;  // decode() one token, else prefill() `tokens`
  Index tokens;
};

// decode: one decode() per token; prefill: one prefill() of everything; chunked: prefills of
// 5, 16, 1, 3, 17, 31, 2 tokens (across page and 16-query-block boundaries) mixed with decodes.
std::vector<Step> steps_for(Feed feed, Index length) {
  std::vector<Step> steps;
  if (feed == Feed::decode) {
    for (Index t = 0; t < length; ++t) steps.push_back({true, 1});
    return steps;
  }
  if (feed == Feed::prefill) return {{false, length}};
  if (feed != Feed::chunked) {
    ADD_FAILURE() << "steps_for does not run " << feed;
    return steps;
  }
  const Step pattern[] = {{false, 5}, {true, 1},   {false, 16}, {false, 1},  {true, 1},
                          {false, 3}, {false, 17}, {true, 1},   {false, 31}, {false, 2}};
  Index done = 0;
  for (std::size_t k = 0; done < length; k = (k + 1) % (sizeof(pattern) / sizeof(pattern[0]))) {
    Step step = pattern[k];
    step.tokens = std::min(step.tokens, length - done);
    steps.push_back(step);
    done += step.tokens;
  }
  return steps;
}

// Feeds rows [first, first + sum of steps) of x to `seq`; returns their outputs.
template <class S>
RowMatrix run_steps(MultiHeadLatentAttention<S>& op, KvCache& cache, SequenceId seq,
                    const RowMatrix& x, const std::vector<Step>& steps, Index first = 0) {
  Index total = 0;
  for (const Step& step : steps) total += step.tokens;
  RowMatrix y = RowMatrix::Constant(total, x.cols(), std::numeric_limits<float>::quiet_NaN());
  Index row = 0;
  for (const Step& step : steps) {
    if (step.decode)
      op.decode(cache, &seq, 1, x.row(first + row).data(), y.row(row).data());
    else
      op.prefill(cache, seq, step.tokens, x.row(first + row).data(), y.row(row).data());
    row += step.tokens;
  }
  return y;
}

// ---- §6.4: the absorbed layer equals explicit per-head keys and values --------------------------

struct LayerCase {
  std::string name;
  MlaConfig config;
  StorageType storage;
  Feed feed;
  CacheKind cache;
  Index length;
};

std::string case_name(const std::string& prefix, StorageType storage, Feed feed, CacheKind cache,
                      Index length) {
  return prefix + tpattn::name_of(storage) + "_" + name_of(feed) + "_" + name_of(cache) + "_T" +
         std::to_string(length);
}

void PrintTo(const LayerCase& c, std::ostream* out) { *out << c.name; }

class MlaLayer : public ::testing::TestWithParam<LayerCase> {};

TEST_P(MlaLayer, AbsorbedLayerEqualsExplicitPerHeadKeysAndValues) {
  const LayerCase& c = GetParam();
  with_storage(c.storage, [&](auto tag) {
    using S = decltype(tag);
    const MlaWeights weights = tpattn_test::random_mla_weights(c.config, 1000u + c.length);
    MultiHeadLatentAttention<S> op(c.config, weights);
    auto cache = make_cache(op.cache_record(), c.cache, 1, c.length);  // exactly full at the end
    const SequenceId seq = cache->add_sequence();
    const RowMatrix x = tpattn_test::random_inputs(c.length, c.config.d_model, 7u + c.length);
    const RowMatrix y = run_steps(op, *cache, seq, x, steps_for(c.feed, c.length));
    EXPECT_EQ(cache->length(seq), c.length);
    EXPECT_TRUE(matches_explicit_reference(c.config, weights, x, y, *cache, seq, kLayerTolerance));
    // And against the exact reference, whose cached values are not rounded at all: the cache's
    // own rounding of c_s and kR_s may move the outputs by a few u, no more.
    const Eigen::MatrixXd exact =
        tpattn_test::mla_layer_reference(c.config, weights, tpattn_test::to_double(x));
    EXPECT_LE(relative_error(y, exact), storage_tolerance(c.storage))
        << "vs the unrounded double reference, " << tpattn::name_of(c.storage) << " cache";
  });
}

std::vector<LayerCase> grid_cases() {
  std::vector<LayerCase> cases;
  for (StorageType storage : kAllStorage)
    for (Feed feed : kDecodePrefillChunked)
      for (CacheKind cache : kAllCacheKinds)
        for (Index length :
             {Index(1), Index(2), kPageTokens - 1, kPageTokens, kPageTokens + 1, Index(113)})
          cases.push_back({case_name("", storage, feed, cache, length), small_config(), storage,
                           feed, cache, length});
  return cases;
}

std::vector<LayerCase> head_cases() {
  std::vector<LayerCase> cases;
  for (Index heads : {1, 3, 17})
    for (StorageType storage : kAllStorage)
      for (Feed feed : {Feed::decode, Feed::chunked}) {
        MlaConfig config = small_config();
        config.heads = heads;
        cases.push_back(
            {case_name("H" + std::to_string(heads) + "_", storage, feed, CacheKind::paged, 33),
             config, storage, feed, CacheKind::paged, 33});
      }
  return cases;
}

std::vector<LayerCase> shape_cases() {
  std::vector<LayerCase> cases;
  for (StorageType storage : kAllStorage) {
    cases.push_back({case_name("DeepSeekLike_", storage, Feed::chunked, CacheKind::paged, 24),
                     deepseek_like_config(), storage, Feed::chunked, CacheKind::paged, 24});
    cases.push_back({case_name("T6Small_", storage, Feed::chunked, CacheKind::contiguous, 40),
                     t6_small_config(), storage, Feed::chunked, CacheKind::contiguous, 40});
  }
  MlaConfig t6_medium = t6_small_config();  // d_c 512, d_R 32: 544 cached elements per token
  t6_medium.kv_latent_dim = 512;
  cases.push_back({case_name("T6Medium_", StorageType::bf16, Feed::decode, CacheKind::paged, 18),
                   t6_medium, StorageType::bf16, Feed::decode, CacheKind::paged, 18});
  return cases;
}

// Head dims beyond 16, 64 and 128: the smallest useful one (8), widths that are no multiple of
// a SIMD register (40, 96 = 3 x 32) and an odd one (129), each with d_v != d_h, its own d_R and
// d_c, and its own RoPE and query options.
std::vector<LayerCase> head_dim_cases() {
  struct Dims {
    Index head_dim, value_dim, rope_dim, kv_latent_dim, q_latent_dim, heads, d_model;
    RopePairing pairing;
    RopeDirection direction;
    Index rotary_dim;  // 0 = all of d_R
  };
  const Dims dims[] = {
      {8, 12, 4, 16, 24, 3, 40, RopePairing::interleaved, RopeDirection::standard, 0},
      {40, 24, 8, 48, 32, 4, 64, RopePairing::half_split, RopeDirection::reversed, 0},
      {96, 64, 16, 128, 48, 2, 96, RopePairing::interleaved, RopeDirection::standard, 8},
      {129, 65, 32, 96, 0, 2, 80, RopePairing::half_split, RopeDirection::standard, 0},
  };
  std::vector<LayerCase> cases;
  for (const Dims& d : dims) {
    MlaConfig config;
    config.d_model = d.d_model;
    config.heads = d.heads;
    config.head_dim = d.head_dim;
    config.value_dim = d.value_dim;
    config.rope_dim = d.rope_dim;
    config.kv_latent_dim = d.kv_latent_dim;
    config.q_latent_dim = d.q_latent_dim;
    config.rope.pairing = d.pairing;
    config.rope.direction = d.direction;
    config.rope.rotary_dim = d.rotary_dim;
    const std::string prefix =
        "Dh" + std::to_string(d.head_dim) + "_Dv" + std::to_string(d.value_dim) + "_";
    for (StorageType storage : kAllStorage) {
      cases.push_back({case_name(prefix, storage, Feed::chunked, CacheKind::paged, 37), config,
                       storage, Feed::chunked, CacheKind::paged, 37});
      cases.push_back({case_name(prefix, storage, Feed::decode, CacheKind::contiguous, 17), config,
                       storage, Feed::decode, CacheKind::contiguous, 17});
    }
  }
  return cases;
}

std::string layer_case_name(const ::testing::TestParamInfo<LayerCase>& info) {
  return info.param.name;
}

INSTANTIATE_TEST_SUITE_P(Lengths, MlaLayer, ::testing::ValuesIn(grid_cases()), layer_case_name);
INSTANTIATE_TEST_SUITE_P(Heads, MlaLayer, ::testing::ValuesIn(head_cases()), layer_case_name);
INSTANTIATE_TEST_SUITE_P(Shapes, MlaLayer, ::testing::ValuesIn(shape_cases()), layer_case_name);
INSTANTIATE_TEST_SUITE_P(HeadDims, MlaLayer, ::testing::ValuesIn(head_dim_cases()),
                         layer_case_name);

// ---- options: each one honoured, and each one mattering ----------------------------------------

// A config option, and how to change it (in config and/or weights) for a contrast reference that
// the operator must NOT match: proof that the test would catch the option being ignored.
struct OptionCase {
  std::string name;
  MlaConfig config;
  std::function<void(MlaConfig&, MlaWeights&)> contrast;  // empty: no contrast
};

struct OptionParam {
  OptionCase option;
  StorageType storage;
};

void PrintTo(const OptionParam& p, std::ostream* out) { *out << p.option.name << " " << p.storage; }

class MlaOption : public ::testing::TestWithParam<OptionParam> {};

TEST_P(MlaOption, AbsorbedLayerHonoursTheOption) {
  const OptionCase& c = GetParam().option;
  const Index length = 37;  // crosses two pages and two 16-query blocks
  with_storage(GetParam().storage, [&](auto tag) {
    using S = decltype(tag);
    const MlaWeights weights = tpattn_test::random_mla_weights(c.config, 77u);
    MultiHeadLatentAttention<S> op(c.config, weights);
    auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, length);
    const SequenceId seq = cache->add_sequence();
    const RowMatrix x = tpattn_test::random_inputs(length, c.config.d_model, 78u);
    const RowMatrix y = run_steps(op, *cache, seq, x, steps_for(Feed::chunked, length));
    EXPECT_TRUE(matches_explicit_reference(c.config, weights, x, y, *cache, seq, kLayerTolerance));

    if (c.contrast) {
      MlaConfig other_config = c.config;
      MlaWeights other_weights = weights;
      c.contrast(other_config, other_weights);
      const Eigen::MatrixXd other =
          tpattn_test::mla_layer_reference(other_config, other_weights, tpattn_test::to_double(x));
      EXPECT_GT(relative_error(y, other), kContrastFactor * kLayerTolerance)
          << "the operator's output does not depend on this option";
    }
  });
}

std::vector<OptionCase> option_cases() {
  const MlaConfig base = small_config();
  std::vector<OptionCase> cases;
  const auto add = [&](std::string name, std::function<void(MlaConfig&)> change,
                       std::function<void(MlaConfig&, MlaWeights&)> contrast) {
    MlaConfig config = base;
    if (change) change(config);
    cases.push_back({std::move(name), config, std::move(contrast)});
  };
  const auto ones = [](tpattn::Vector& gain) { gain.setOnes(); };

  // Norms and gains.
  add("BothNormsQueryNormMatters", nullptr,
      [](MlaConfig& c, MlaWeights&) { c.normalize_q_latent = false; });
  add("BothNormsKvNormMatters", nullptr,
      [](MlaConfig& c, MlaWeights&) { c.normalize_kv_latent = false; });
  add("QueryGainMatters", nullptr, [ones](MlaConfig&, MlaWeights& w) { ones(w.q_norm); });
  add("KvGainMatters", nullptr, [ones](MlaConfig&, MlaWeights& w) { ones(w.kv_norm); });
  add(
      "NoQueryNorm", [](MlaConfig& c) { c.normalize_q_latent = false; },
      [](MlaConfig& c, MlaWeights&) { c.normalize_q_latent = true; });
  add(
      "NoKvNorm", [](MlaConfig& c) { c.normalize_kv_latent = false; },
      [](MlaConfig& c, MlaWeights&) { c.normalize_kv_latent = true; });
  add(
      "NoNorms",
      [](MlaConfig& c) {
        c.normalize_q_latent = false;
        c.normalize_kv_latent = false;
      },
      [](MlaConfig& c, MlaWeights&) { c.normalize_kv_latent = true; });
  add(
      "NormEpsFromConfig", [](MlaConfig& c) { c.norm_eps = 0.5f; },
      [](MlaConfig& c, MlaWeights&) { c.norm_eps = 1e-6f; });
  // Query compression off: w_uq maps x directly (and normalize_q_latent is moot).
  add(
      "NoQueryCompression", [](MlaConfig& c) { c.q_latent_dim = 0; }, nullptr);
  add(
      "NoQueryCompressionNoKvNorm",
      [](MlaConfig& c) {
        c.q_latent_dim = 0;
        c.normalize_kv_latent = false;
      },
      [](MlaConfig& c, MlaWeights&) { c.normalize_kv_latent = true; });
  // Value width.
  add(
      "ValueDimLargerThanHeadDim", [](MlaConfig& c) { c.value_dim = 24; }, nullptr);
  add(
      "ValueDimSmallerThanHeadDim", [](MlaConfig& c) { c.value_dim = 6; }, nullptr);
  add(
      "ValueDimZeroMeansHeadDim", [](MlaConfig& c) { c.value_dim = 0; }, nullptr);
  // RoPE pairing and direction: each of the four matches its own reference and not the others.
  const auto rope = [](RopePairing pairing, RopeDirection direction) {
    return [pairing, direction](MlaConfig& c) {
      c.rope.pairing = pairing;
      c.rope.direction = direction;
    };
  };
  const auto flip_pairing = [](MlaConfig& c, MlaWeights&) {
    c.rope.pairing = c.rope.pairing == RopePairing::interleaved ? RopePairing::half_split
                                                                : RopePairing::interleaved;
  };
  const auto flip_direction = [](MlaConfig& c, MlaWeights&) {
    c.rope.direction = c.rope.direction == RopeDirection::standard ? RopeDirection::reversed
                                                                   : RopeDirection::standard;
  };
  add("RopeInterleavedStandardDeepSeekPairingMatters",
      rope(RopePairing::interleaved, RopeDirection::standard), flip_pairing);
  add("RopeInterleavedStandardDeepSeekDirectionMatters",
      rope(RopePairing::interleaved, RopeDirection::standard), flip_direction);
  add("RopeHalfSplitReversedT6PairingMatters",
      rope(RopePairing::half_split, RopeDirection::reversed), flip_pairing);
  add("RopeHalfSplitReversedT6DirectionMatters",
      rope(RopePairing::half_split, RopeDirection::reversed), flip_direction);
  add("RopeHalfSplitStandard", rope(RopePairing::half_split, RopeDirection::standard),
      flip_direction);
  add("RopeInterleavedReversed", rope(RopePairing::interleaved, RopeDirection::reversed),
      flip_pairing);
  // Partial rotary over d_R (the rest of kR and qR passes through).
  const auto full_rotary = [](MlaConfig& c, MlaWeights&) { c.rope.rotary_dim = 0; };
  add(
      "PartialRotaryInterleaved", [](MlaConfig& c) { c.rope.rotary_dim = 4; }, full_rotary);
  add(
      "PartialRotaryHalfSplitReversed",
      [](MlaConfig& c) {
        c.rope.rotary_dim = 4;
        c.rope.pairing = RopePairing::half_split;
        c.rope.direction = RopeDirection::reversed;
      },
      full_rotary);
  add(
      "PartialRotaryOnePair", [](MlaConfig& c) { c.rope.rotary_dim = 2; }, full_rotary);
  add(
      "RotaryDimEqualToRopeDim", [](MlaConfig& c) { c.rope.rotary_dim = 8; }, nullptr);
  add(
      "RopeBaseFromConfig", [](MlaConfig& c) { c.rope.base = 50.0; },
      [](MlaConfig& c, MlaWeights&) { c.rope.base = 10000.0; });
  add(
      "RopeDisabled", [](MlaConfig& c) { c.rope.enabled = false; },
      [](MlaConfig& c, MlaWeights&) { c.rope.enabled = true; });
  return cases;
}

std::vector<OptionParam> option_params() {
  std::vector<OptionParam> params;
  for (StorageType storage : {StorageType::f32, StorageType::bf16})
    for (const OptionCase& option : option_cases()) params.push_back({option, storage});
  return params;
}

INSTANTIATE_TEST_SUITE_P(Options, MlaOption, ::testing::ValuesIn(option_params()),
                         [](const ::testing::TestParamInfo<OptionParam>& info) {
                           return info.param.option.name + "_" +
                                  tpattn::name_of(info.param.storage);
                         });

// ---- the scale ----------------------------------------------------------------------------------

// d_h + d_R = 16 but d_c + d_R = 72: a scale taken from the cached width would be 2.1x too small,
// flattening every softmax; the reference with that scale misses the output by far.
TEST(MlaScale, ScoresAreScaledByHeadDimPlusRopeDimNotByTheCachedWidth) {
  MlaConfig config = small_config();
  config.head_dim = 8;
  config.value_dim = 8;
  config.rope_dim = 8;
  config.kv_latent_dim = 64;
  const Index length = 29;
  const MlaWeights weights = tpattn_test::random_mla_weights(config, 5u);
  MultiHeadLatentAttention<float> op(config, weights);
  auto cache = make_cache(op.cache_record(), CacheKind::contiguous, 1, length);
  const SequenceId seq = cache->add_sequence();
  const RowMatrix x = tpattn_test::random_inputs(length, config.d_model, 6u);
  const RowMatrix y = run_steps(op, *cache, seq, x, steps_for(Feed::chunked, length));

  EXPECT_TRUE(matches_explicit_reference(config, weights, x, y, *cache, seq, kLayerTolerance));
  const Eigen::MatrixXd xd = tpattn_test::to_double(x);
  const tpattn_test::MlaProjections p = tpattn_test::mla_projections(config, weights, xd);
  const double cached_width_scale =
      1.0 / std::sqrt(static_cast<double>(config.kv_latent_dim + config.rope_dim));
  const Eigen::MatrixXd wrong = tpattn_test::mla_layer_reference(config, weights, xd, p.latent,
                                                                 p.rope_key, cached_width_scale);
  EXPECT_GT(relative_error(y, wrong), kContrastFactor * kLayerTolerance);
}

// ---- the bare kernel, in latent space -----------------------------------------------------------

struct KernelCase {
  std::string name;
  StorageType storage;
  CacheKind cache;
  Index heads;
  Index latent_dim;  // d_c
  Index rope_dim;    // d_R
  Index length;      // cached tokens L
  Index queries;     // n: the last n tokens query
};

void PrintTo(const KernelCase& c, std::ostream* out) { *out << c.name; }

class MlaKernelLatent : public ::testing::TestWithParam<KernelCase> {};

TEST_P(MlaKernelLatent, LatentOutputAndLseEqualLatentSpaceReference) {
  const KernelCase& c = GetParam();
  const Index dc = c.latent_dim, dr = c.rope_dim, h = c.heads;
  // An arbitrary scale: the kernel must use the one it is given.
  const float scale = 1.5f / std::sqrt(static_cast<float>(dc + dr));
  with_storage(c.storage, [&](auto tag) {
    using S = decltype(tag);
    const MlaKernel<S> kernel(h, dc, dr, scale);
    ASSERT_EQ(kernel.cache_record(), tpattn::records::mla(dc, dr, c.storage));
    // Two sequences filled in alternating chunks, so a paged sequence's pages are not adjacent.
    auto cache = make_cache(kernel.cache_record(), c.cache, 2, c.length);
    const SequenceId other = cache->add_sequence();
    const SequenceId seq = cache->add_sequence();
    tpattn_test::Random random(static_cast<std::uint32_t>(c.length * 31 + h));
    for (Index done = 0; done < c.length;) {
      const Index n = std::min<Index>(7, c.length - done);
      for (SequenceId s : {other, seq}) {
        const std::vector<float> latent = random.floats(n * dc);
        const std::vector<float> rope_key = random.floats(n * dr);
        cache->append(s, n, {{latent.data(), 1, dc}, {rope_key.data(), 1, dr}});
      }
      done += n;
    }
    const std::vector<float> q = random.floats(c.queries * h * (dc + dr));
    std::vector<float> out(static_cast<std::size_t>(c.queries * h * dc),
                           std::numeric_limits<float>::quiet_NaN());
    std::vector<float> lse(static_cast<std::size_t>(c.queries * h),
                           std::numeric_limits<float>::quiet_NaN());
    std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
    kernel.attend(q.data(), c.queries, cache->view(seq), out.data(), lse.data(), workspace.data());

    const SequenceView view = cache->view(seq);
    const AttentionResult expected = tpattn_test::mla_latent_reference(
        Tensor3::from_floats(q.data(), c.queries, h, dc + dr), read_plane(view, 0),
        read_plane(view, 1), static_cast<double>(scale));
    const double out_error =
        tpattn_test::max_abs_error(out.data(), expected.out.data.data(), expected.out.size()) /
        tpattn_test::max_abs(expected.out);
    EXPECT_LE(out_error, kKernelTolerance) << "latent output, relative";
    const double lse_error = tpattn_test::max_abs_error(lse.data(), expected.lse.data(),
                                                        static_cast<Index>(expected.lse.size()));
    EXPECT_LE(lse_error, kKernelTolerance) << "LSE (natural log), absolute";
  });
}

std::vector<KernelCase> kernel_cases() {
  struct Shape {
    const char* name;
    Index heads, dc, dr, length, queries;
  };
  const Shape shapes[] = {
      {"H1_L1_N1", 1, 32, 8, 1, 1},       {"H3_L2_N1", 3, 32, 8, 2, 1},
      {"H3_L17_N1", 3, 32, 8, 17, 1},     {"H17_L15_N15", 17, 32, 8, 15, 15},
      {"H3_L16_N16", 3, 32, 8, 16, 16},   {"H3_L113_N113", 3, 32, 8, 113, 113},
      {"H17_L65_N20", 17, 24, 8, 65, 20}, {"DeepSeek_H4_L40_N3", 4, 512, 64, 40, 3},
      {"T6_H2_L70_N1", 2, 256, 32, 70, 1}};
  std::vector<KernelCase> cases;
  for (StorageType storage : kAllStorage)
    for (CacheKind cache : kAllCacheKinds)
      for (const Shape& s : shapes)
        cases.push_back(
            {std::string(tpattn::name_of(storage)) + "_" + name_of(cache) + "_" + s.name, storage,
             cache, s.heads, s.dc, s.dr, s.length, s.queries});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, MlaKernelLatent, ::testing::ValuesIn(kernel_cases()),
                         [](const ::testing::TestParamInfo<KernelCase>& info) {
                           return info.param.name;
                         });

// ---- §6.5 RoPE and §6.7 split-and-merge, on the bare kernel ------------------------------------

// The kernel's inputs before RoPE: M cached tokens (latent c_s, rope key kR_s UNROTATED) and the
// absorbed queries of the last n of them (q^_i and UNROTATED qR_i per head). Latent entries are
// N(0, 1), rope entries N(0, 1.5^2), and scale = 1.5 / sqrt(d_c + 1.5^4 d_R): the scores are
// N(0, 1.5^2) and, at d_c 32 and d_R 16, the rope part carries ~70% of their variance, so a
// wrong rotation moves the outputs far.
struct LatentInputs {
  Index heads = 0, dc = 0, dr = 0, tokens = 0, queries = 0;
  float scale = 0.0f;
  std::vector<float> latent;    // [M, d_c]
  std::vector<float> rope_key;  // [M, d_R], unrotated
  std::vector<float> q_latent;  // [n, h, d_c]
  std::vector<float> q_rope;    // [n, h, d_R], unrotated
};

LatentInputs random_latent_inputs(Index heads, Index dc, Index dr, Index tokens, Index queries,
                                  std::uint32_t seed) {
  tpattn_test::Random random(seed);
  LatentInputs in;
  in.heads = heads;
  in.dc = dc;
  in.dr = dr;
  in.tokens = tokens;
  in.queries = queries;
  in.scale = 1.5f / std::sqrt(static_cast<float>(dc) + 5.0625f * static_cast<float>(dr));
  in.latent = random.floats(tokens * dc);
  in.rope_key = random.floats(tokens * dr, 1.5);
  in.q_latent = random.floats(queries * heads * dc);
  in.q_rope = random.floats(queries * heads * dr, 1.5);
  return in;
}

// Appends tokens [first, first + count) to `seq`, their rope keys rotated by the library at
// positions first + s + offset (as the layer writes them).
void append_latents(KvCache& cache, SequenceId seq, const LatentInputs& in, const Rope& rope,
                    Index first, Index count, Index offset) {
  std::vector<float> keys(in.rope_key.begin() + first * in.dr,
                          in.rope_key.begin() + (first + count) * in.dr);
  for (Index s = 0; s < count; ++s)
    rope.apply(keys.data() + s * in.dr, 1, in.dr, first + s + offset);
  cache.append(seq, count, {{in.latent.data() + first * in.dc, 1, in.dc}, {keys.data(), 1, in.dr}});
}

// Absorbed queries [n, h, d_c + d_R] = [q^_i | qR_i], query t (the token at M - n + t) with its
// qR rotated by the library at position M - n + t + offset.
std::vector<float> absorbed_queries(const LatentInputs& in, const Rope& rope, Index offset) {
  const Index h = in.heads, width = in.dc + in.dr;
  std::vector<float> q(static_cast<std::size_t>(in.queries * h * width));
  for (Index t = 0; t < in.queries; ++t) {
    for (Index i = 0; i < h; ++i) {
      std::copy_n(in.q_latent.begin() + (t * h + i) * in.dc, in.dc,
                  q.begin() + (t * h + i) * width);
      std::copy_n(in.q_rope.begin() + (t * h + i) * in.dr, in.dr,
                  q.begin() + (t * h + i) * width + in.dc);
    }
    rope.apply(q.data() + t * h * width + in.dc, h, width, in.tokens - in.queries + t + offset);
  }
  return q;
}

// The same queries and cached tokens in double, NOT rotated: q [n, h, d_c + d_R], keys
// [M, 1, d_c + d_R] = [c_s | kR_s], values [M, 1, d_c] = c_s.
struct UnrotatedLatents {
  Tensor3 q, keys, values;
};

UnrotatedLatents unrotated_latents(const LatentInputs& in) {
  const Index h = in.heads, dc = in.dc, dr = in.dr;
  UnrotatedLatents u{Tensor3(in.queries, h, dc + dr), Tensor3(in.tokens, 1, dc + dr),
                     Tensor3::from_floats(in.latent.data(), in.tokens, 1, dc)};
  for (Index t = 0; t < in.queries; ++t)
    for (Index i = 0; i < h; ++i) {
      for (Index c = 0; c < dc; ++c) u.q.at(t, i, c) = in.q_latent[(t * h + i) * dc + c];
      for (Index c = 0; c < dr; ++c) u.q.at(t, i, dc + c) = in.q_rope[(t * h + i) * dr + c];
    }
  for (Index s = 0; s < in.tokens; ++s) {
    for (Index c = 0; c < dc; ++c) u.keys.at(s, 0, c) = in.latent[s * dc + c];
    for (Index c = 0; c < dr; ++c) u.keys.at(s, 0, dc + c) = in.rope_key[s * dr + c];
  }
  return u;
}

// Causal attention in double with RoPE applied at READ time. q [Tq, h, w] and k [Tk, g, w] hold
// their rope parts (columns [rope_first, rope_first + rope_width)) UNROTATED; query t sits at
// position p = Tk - Tq + t (as in attention_reference) and meets key s as R(p - s) q . k. Each
// RoPE pair turns by position x a fixed frequency (the reversed direction by minus that), so
// R(p) q . R(s) k = q . R(s - p) k = R(p - s) q . k: rotating both at read time by their own
// positions, of which only the offset is left.
AttentionResult read_time_rope_attention(const Tensor3& q, const Tensor3& k, const Tensor3& v,
                                         Index rope_first, Index rope_width, const RopeConfig& rope,
                                         double scale) {
  const Index group = q.heads / k.heads;
  AttentionResult result{Tensor3(q.tokens, q.heads, v.width),
                         std::vector<double>(static_cast<std::size_t>(q.tokens * q.heads))};
  std::vector<double> query(static_cast<std::size_t>(q.width));
  std::vector<double> scores(static_cast<std::size_t>(k.tokens));
  for (Index t = 0; t < q.tokens; ++t) {
    const Index position = k.tokens - q.tokens + t;
    for (Index i = 0; i < q.heads; ++i) {
      const Index kv = i / group;
      double top = -std::numeric_limits<double>::infinity();
      for (Index s = 0; s <= position; ++s) {
        std::copy_n(q.row(t, i), q.width, query.begin());
        tpattn_test::rope_reference(query.data() + rope_first, rope_width,
                                    static_cast<double>(position - s), rope);
        double dot = 0.0;
        for (Index c = 0; c < q.width; ++c)
          dot += query[static_cast<std::size_t>(c)] * k.at(s, kv, c);
        scores[static_cast<std::size_t>(s)] = scale * dot;
        top = std::max(top, scale * dot);
      }
      double sum = 0.0;
      double* out = result.out.row(t, i);
      for (Index s = 0; s <= position; ++s) {
        const double weight = std::exp(scores[static_cast<std::size_t>(s)] - top);
        sum += weight;
        for (Index c = 0; c < v.width; ++c) out[c] += weight * v.at(s, kv, c);
      }
      for (Index c = 0; c < v.width; ++c) out[c] /= sum;
      result.lse[static_cast<std::size_t>(t * q.heads + i)] = top + std::log(sum);
    }
  }
  return result;
}

// The write-time double reference of the kernel: q and the keys rotated by rope_reference at
// their positions (+ offset), then mla_latent_reference.
AttentionResult write_time_latent_reference(const LatentInputs& in, const RopeConfig& rope,
                                            Index offset) {
  UnrotatedLatents u = unrotated_latents(in);
  Tensor3 rope_key(in.tokens, 1, in.dr);
  for (Index s = 0; s < in.tokens; ++s) {
    for (Index c = 0; c < in.dr; ++c) rope_key.at(s, 0, c) = u.keys.at(s, 0, in.dc + c);
    tpattn_test::rope_reference(rope_key.row(s, 0), in.dr, static_cast<double>(s + offset), rope);
  }
  for (Index t = 0; t < in.queries; ++t)
    for (Index i = 0; i < in.heads; ++i)
      tpattn_test::rope_reference(u.q.row(t, i) + in.dc, in.dr,
                                  static_cast<double>(in.tokens - in.queries + t + offset), rope);
  return tpattn_test::mla_latent_reference(u.q, u.values, rope_key, static_cast<double>(in.scale));
}

struct KernelRun {
  std::vector<float> out;  // [n, h, d_c]
  std::vector<float> lse;  // [n, h]
};

template <class S>
KernelRun attend_latent(const MlaKernel<S>& kernel, const LatentInputs& in,
                        const std::vector<float>& q, const SequenceView& view) {
  KernelRun r{std::vector<float>(static_cast<std::size_t>(in.queries * in.heads * in.dc),
                                 std::numeric_limits<float>::quiet_NaN()),
              std::vector<float>(static_cast<std::size_t>(in.queries * in.heads),
                                 std::numeric_limits<float>::quiet_NaN())};
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  kernel.attend(q.data(), in.queries, view, r.out.data(), r.lse.data(), workspace.data());
  return r;
}

// max|actual - expected| / max|expected| (NaN: +inf), and the same without the division.
double max_difference(const std::vector<float>& actual, const std::vector<double>& expected) {
  if (actual.size() != expected.size()) return std::numeric_limits<double>::infinity();
  return tpattn_test::max_abs_error(actual.data(), expected.data(),
                                    static_cast<Index>(expected.size()));
}
double max_difference(const std::vector<float>& actual, const std::vector<float>& expected) {
  return max_difference(actual, std::vector<double>(expected.begin(), expected.end()));
}
template <class Expected>
double relative_difference(const std::vector<float>& actual, const Expected& expected) {
  const std::vector<double> e(expected.begin(), expected.end());
  return max_difference(actual, e) / std::max(tpattn_test::max_abs(e), 1e-30);
}
// max|actual - expected| / max(1, max|expected|), for kMergeTolerance.
double scaled_difference(const std::vector<float>& actual, const std::vector<float>& expected) {
  const std::vector<double> e(expected.begin(), expected.end());
  return max_difference(actual, e) / std::max(tpattn_test::max_abs(e), 1.0);
}

// The four RoPE variants of §4 on d_R, the last one partial (rotary_dim `partial` of d_R).
std::vector<std::pair<std::string, RopeConfig>> rope_variants(Index partial) {
  const auto make = [](RopePairing pairing, RopeDirection direction, Index rotary) {
    RopeConfig c;
    c.pairing = pairing;
    c.direction = direction;
    c.rotary_dim = rotary;
    return c;
  };
  return {
      {"interleaved standard (DeepSeek)",
       make(RopePairing::interleaved, RopeDirection::standard, 0)},
      {"half-split reversed (T6)", make(RopePairing::half_split, RopeDirection::reversed, 0)},
      {"half-split standard", make(RopePairing::half_split, RopeDirection::standard, 0)},
      {"interleaved reversed, partial rotary " + std::to_string(partial),
       make(RopePairing::interleaved, RopeDirection::reversed, partial)},
  };
}

// §6.5: rotating every cached kR and every qR at positions shifted by one constant leaves the
// scores, so the latent outputs and the LSEs, unchanged: only position differences matter.
TEST(MlaKernelRope, AddingOneOffsetToEveryPositionLeavesOutputsAndLseUnchanged) {
  const Index h = 3, dc = 32, dr = 16, m = 40, n = 5;  // 5 causal queries, across 3 pages
  const LatentInputs in = random_latent_inputs(h, dc, dr, m, n, 51u);
  const MlaKernel<float> kernel(h, dc, dr, in.scale);
  for (const auto& [name, config] : rope_variants(8)) {
    SCOPED_TRACE(name);
    const Rope rope(config, dr);
    auto cache = make_cache(kernel.cache_record(), CacheKind::paged, 2, m);
    const SequenceId base = cache->add_sequence(), shifted = cache->add_sequence();
    append_latents(*cache, base, in, rope, 0, m, 0);
    const KernelRun expected =
        attend_latent(kernel, in, absorbed_queries(in, rope, 0), cache->view(base));
    const AttentionResult exact = write_time_latent_reference(in, config, 0);
    EXPECT_LE(relative_difference(expected.out, exact.out.data), kKernelTolerance);
    EXPECT_LE(max_difference(expected.lse, exact.lse), kKernelTolerance);
    for (Index offset : {1, 17, 1000, 12345, 1000003}) {
      SCOPED_TRACE("offset " + std::to_string(offset));
      cache->truncate(shifted, 0);
      append_latents(*cache, shifted, in, rope, 0, m, offset);
      const KernelRun r =
          attend_latent(kernel, in, absorbed_queries(in, rope, offset), cache->view(shifted));
      EXPECT_LE(relative_difference(r.out, expected.out), kKernelTolerance)
          << "latent output, relative";
      EXPECT_LE(max_difference(r.lse, expected.lse), kKernelTolerance) << "LSE, absolute";
    }
    // Not vacuous: shifting the keys alone changes the scores.
    cache->truncate(shifted, 0);
    append_latents(*cache, shifted, in, rope, 0, m, 5);
    const KernelRun moved =
        attend_latent(kernel, in, absorbed_queries(in, rope, 0), cache->view(shifted));
    EXPECT_GT(relative_difference(moved.out, expected.out), kContrastFactor * kKernelTolerance);
  }
}

// §6.5: the kernel over a cache holding kR rotated at WRITE time (by the library's Rope, at each
// token's position) equals attention that keeps kR unrotated and rotates at READ time
// (read_time_rope_attention, in double), for every query-key offset 0 .. 44.
TEST(MlaKernelRope, RotatingKrAtWriteTimeEqualsRotatingAtReadTime) {
  const Index h = 3, dc = 32, dr = 16, m = 45;
  const LatentInputs in = random_latent_inputs(h, dc, dr, m, m, 52u);  // every token queries
  const MlaKernel<float> kernel(h, dc, dr, in.scale);
  const UnrotatedLatents u = unrotated_latents(in);
  const double scale = static_cast<double>(in.scale);
  for (const auto& [name, config] : rope_variants(8)) {
    SCOPED_TRACE(name);
    const AttentionResult read =
        read_time_rope_attention(u.q, u.keys, u.values, dc, dr, config, scale);
    // In double the two orders agree to rounding.
    const AttentionResult write = write_time_latent_reference(in, config, 0);
    EXPECT_LE(
        tpattn_test::max_abs_error(write.out.data.data(), read.out.data.data(), read.out.size()),
        1e-12 * tpattn_test::max_abs(read.out));
    EXPECT_LE(tpattn_test::max_abs_error(write.lse.data(), read.lse.data(),
                                         static_cast<Index>(read.lse.size())),
              1e-12 * tpattn_test::max_abs(read.lse));

    const Rope rope(config, dr);
    auto cache = make_cache(kernel.cache_record(), CacheKind::paged, 1, m);
    const SequenceId seq = cache->add_sequence();
    append_latents(*cache, seq, in, rope, 0, m, 0);
    const KernelRun r = attend_latent(kernel, in, absorbed_queries(in, rope, 0), cache->view(seq));
    EXPECT_LE(relative_difference(r.out, read.out.data), kKernelTolerance)
        << "latent output, relative";
    EXPECT_LE(max_difference(r.lse, read.lse), kKernelTolerance) << "LSE, absolute";
    // Not vacuous: without any rotation the outputs are far off.
    RopeConfig none = config;
    none.enabled = false;
    const AttentionResult unrotated =
        read_time_rope_attention(u.q, u.keys, u.values, dc, dr, none, scale);
    EXPECT_GT(relative_difference(r.out, unrotated.out.data), kContrastFactor * kKernelTolerance);
  }
}

// §6.5 through the layer: MultiHeadLatentAttention rotates kR before caching it; the explicit
// per-head reference with kR and qR left unrotated by the projections and rotated at read time
// gives the same outputs.
TEST(MlaRope, LayerRotatingKrAtWriteTimeEqualsRotatingAtReadTime) {
  const Index length = 40;
  for (const auto& [name, rope] : rope_variants(4)) {
    SCOPED_TRACE(name);
    MlaConfig config = small_config();  // d_R 8
    config.rope = rope;
    const MlaWeights weights = tpattn_test::random_mla_weights(config, 53u);
    const RowMatrix x = tpattn_test::random_inputs(length, config.d_model, 54u);
    const Eigen::MatrixXd xd = tpattn_test::to_double(x);
    MlaConfig unrotated = config;
    unrotated.rope.enabled = false;
    const tpattn_test::MlaProjections p = tpattn_test::mla_projections(unrotated, weights, xd);
    const tpattn_test::MlaExplicitKeysValues kv =
        tpattn_test::mla_explicit_keys_values(config, weights, p.latent, p.rope_key);
    const Eigen::MatrixXd read_time = tpattn_test::mla_output(
        weights, read_time_rope_attention(p.q, kv.k, kv.v, config.head_dim, config.rope_dim,
                                          config.rope, tpattn_test::mla_scale(config))
                     .out);
    const Eigen::MatrixXd write_time = tpattn_test::mla_layer_reference(config, weights, xd);
    EXPECT_LE((read_time - write_time).cwiseAbs().maxCoeff(),
              1e-12 * write_time.cwiseAbs().maxCoeff());

    MultiHeadLatentAttention<float> op(config, weights);
    auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, length);
    const SequenceId seq = cache->add_sequence();
    const RowMatrix y = run_steps(op, *cache, seq, x, steps_for(Feed::chunked, length));
    EXPECT_LE(relative_error(y, read_time), kLayerTolerance);
    EXPECT_GT(relative_error(y, tpattn_test::mla_layer_reference(unrotated, weights, xd)),
              kContrastFactor * kLayerTolerance)
        << "the outputs do not depend on the rotation";
  }
}

// §6.7: the cached tokens of one sequence split into 2 or 3 parts (the first a prefix view of the
// whole sequence, the others sequences of their own holding the later tokens, kR rotated at the
// tokens' true positions); the kernel on each part, the (latent output, LSE) pairs merged with
// merge_partial, equal one pass over all tokens. The last token queries, seeing every key.
TEST(MlaKernelMerge, MergingPartialResultsOverSplitKeysEqualsOnePass) {
  const Index h = 4, dc = 64, dr = 16, m = 77;
  const LatentInputs in = random_latent_inputs(h, dc, dr, m, 1, 61u);
  const Rope rope(rope_variants(8)[0].second, dr);
  const std::vector<float> q = absorbed_queries(in, rope, 0);
  const std::vector<std::vector<Index>> splits = {{1},      {16},     {40},     {76},     {1, 2},
                                                  {15, 16}, {16, 33}, {32, 64}, {40, 76}, {5, 70}};
  for (StorageType storage : kAllStorage)
    for (CacheKind kind : kAllCacheKinds) {
      SCOPED_TRACE(std::string(tpattn::name_of(storage)) + " " + name_of(kind));
      with_storage(storage, [&](auto tag) {
        using S = decltype(tag);
        const MlaKernel<S> kernel(h, dc, dr, in.scale);
        auto cache = make_cache(kernel.cache_record(), kind, 3, m);
        const SequenceId whole = cache->add_sequence();
        append_latents(*cache, whole, in, rope, 0, m, 0);
        const KernelRun one_pass = attend_latent(kernel, in, q, cache->view(whole));
        const SequenceView view = cache->view(whole);
        const AttentionResult exact = tpattn_test::mla_latent_reference(
            Tensor3::from_floats(q.data(), 1, h, dc + dr), read_plane(view, 0), read_plane(view, 1),
            static_cast<double>(in.scale));
        EXPECT_LE(relative_difference(one_pass.out, exact.out.data), kKernelTolerance);
        EXPECT_LE(max_difference(one_pass.lse, exact.lse), kKernelTolerance);

        for (const std::vector<Index>& cuts : splits) {
          // (Views are fetched afresh: adding a sequence may move the cache's block tables.)
          std::vector<KernelRun> parts{
              attend_latent(kernel, in, q, cache->view(whole).prefix(cuts[0]))};
          for (std::size_t k = 0; k < cuts.size(); ++k) {
            const Index first = cuts[k], last = k + 1 < cuts.size() ? cuts[k + 1] : m;
            const SequenceId part = cache->add_sequence();
            append_latents(*cache, part, in, rope, first, last - first, 0);
            parts.push_back(attend_latent(kernel, in, q, cache->view(part)));
            cache->remove_sequence(part);
          }
          for (bool reverse : {false, true}) {
            std::string label = std::to_string(cuts.size() + 1) + " parts, cuts";
            for (Index cut : cuts) label += " " + std::to_string(cut);
            SCOPED_TRACE(label + (reverse ? ", merged last part first" : ""));
            std::vector<KernelRun> order = parts;
            if (reverse) std::reverse(order.begin(), order.end());
            KernelRun merged = order[0];
            for (std::size_t k = 1; k < order.size(); ++k)
              for (Index i = 0; i < h; ++i)
                tpattn::merge_partial(merged.out.data() + i * dc, merged.lse.data() + i,
                                      order[k].out.data() + i * dc, order[k].lse[i], dc);
            EXPECT_LE(scaled_difference(merged.out, one_pass.out), kMergeTolerance)
                << "latent output";
            EXPECT_LE(scaled_difference(merged.lse, one_pass.lse), kMergeTolerance) << "LSE";
          }
        }
      });
    }
}

// ---- batched decode -----------------------------------------------------------------------------

// Sequences of lengths 1, 5 and 300 take three decode steps, in one batch (seqs in a shuffled
// order) and one by one in a second cache of the same kind. Both must match each other (fp32
// level: the batch only changes how many rows each projection GEMM has) and the reference.
class MlaBatchedDecode : public ::testing::TestWithParam<std::tuple<StorageType, CacheKind>> {};

TEST_P(MlaBatchedDecode, BatchedDecodeEqualsDecodingEachSequenceAlone) {
  const StorageType storage = std::get<0>(GetParam());
  const CacheKind kind = std::get<1>(GetParam());
  const MlaConfig config = small_config();
  const Index lengths[] = {1, 5, 300};
  const Index steps = 3, batch = 3;
  with_storage(storage, [&](auto tag) {
    using S = decltype(tag);
    const MlaWeights weights = tpattn_test::random_mla_weights(config, 21u);
    MultiHeadLatentAttention<S> op(config, weights);
    auto batched = make_cache(op.cache_record(), kind, batch, 300 + steps);
    auto alone = make_cache(op.cache_record(), kind, batch, 300 + steps);
    std::vector<RowMatrix> x, y_batched, y_alone;
    std::vector<SequenceId> seqs_batched, seqs_alone;
    for (Index b = 0; b < batch; ++b) {
      const Index length = lengths[b];
      x.push_back(tpattn_test::random_inputs(length + steps, config.d_model,
                                             static_cast<std::uint32_t>(40 + b)));
      seqs_batched.push_back(batched->add_sequence());
      seqs_alone.push_back(alone->add_sequence());
      const std::vector<Step> prefill = steps_for(Feed::chunked, length);
      run_steps(op, *batched, seqs_batched.back(), x.back(), prefill);
      run_steps(op, *alone, seqs_alone.back(), x.back(), prefill);
      y_batched.emplace_back(steps, config.d_model);
      y_alone.emplace_back(steps, config.d_model);
    }
    const Index order[] = {2, 0, 1};  // batch rows in another order than the sequences
    for (Index step = 0; step < steps; ++step) {
      RowMatrix xb(batch, config.d_model), yb(batch, config.d_model);
      SequenceId ids[3];
      for (Index r = 0; r < batch; ++r) {
        const Index b = order[r];
        ids[r] = seqs_batched[static_cast<std::size_t>(b)];
        xb.row(r) = x[static_cast<std::size_t>(b)].row(lengths[b] + step);
      }
      op.decode(*batched, ids, batch, xb.data(), yb.data());
      for (Index r = 0; r < batch; ++r)
        y_batched[static_cast<std::size_t>(order[r])].row(step) = yb.row(r);
      for (Index b = 0; b < batch; ++b) {
        const std::size_t k = static_cast<std::size_t>(b);
        op.decode(*alone, &seqs_alone[k], 1, x[k].row(lengths[b] + step).data(),
                  y_alone[k].row(step).data());
      }
    }
    for (Index b = 0; b < batch; ++b) {
      const std::size_t k = static_cast<std::size_t>(b);
      SCOPED_TRACE("sequence of length " + std::to_string(lengths[b]));
      EXPECT_EQ(batched->length(seqs_batched[k]), lengths[b] + steps);
      EXPECT_LE(relative_error(y_batched[k], y_alone[k].cast<double>()), kLayerTolerance);
      EXPECT_TRUE(matches_explicit_reference(config, weights, x[k], y_batched[k], *batched,
                                             seqs_batched[k], kLayerTolerance));
      EXPECT_TRUE(matches_explicit_reference(config, weights, x[k], y_alone[k], *alone,
                                             seqs_alone[k], kLayerTolerance));
    }
  });
}

INSTANTIATE_TEST_SUITE_P(
    StorageAndCache, MlaBatchedDecode,
    ::testing::Combine(::testing::ValuesIn(kAllStorage), ::testing::ValuesIn(kAllCacheKinds)),
    [](const ::testing::TestParamInfo<std::tuple<StorageType, CacheKind>>& info) {
      return std::string(tpattn::name_of(std::get<0>(info.param))) + "_" +
             name_of(std::get<1>(info.param));
    });

// The same sequence through a contiguous and a paged cache: the tiles differ (pages cut them at
// 16 tokens), the numbers agree to fp32 level.
TEST(MlaCaches, ContiguousAndPagedCachesGiveTheSameOutputs) {
  const MlaConfig config = small_config();
  const Index length = 90;
  const MlaWeights weights = tpattn_test::random_mla_weights(config, 31u);
  MultiHeadLatentAttention<float> op(config, weights);
  const RowMatrix x = tpattn_test::random_inputs(length, config.d_model, 32u);
  RowMatrix y[2];
  for (CacheKind kind : kAllCacheKinds) {
    auto cache = make_cache(op.cache_record(), kind, 1, length);
    const SequenceId seq = cache->add_sequence();
    y[kind == CacheKind::paged] = run_steps(op, *cache, seq, x, steps_for(Feed::chunked, length));
  }
  EXPECT_LE(relative_error(y[1], y[0].cast<double>()), kLayerTolerance);
}

// ---- cache sizes (§5) ---------------------------------------------------------------------------

// One attention layer whose cache record has the given widths, small everywhere else.
MlaConfig config_with_cache(Index latent_dim, Index rope_dim) {
  MlaConfig c = small_config();
  c.kv_latent_dim = latent_dim;
  c.rope_dim = rope_dim;
  c.heads = 2;
  return c;
}

TEST(MlaCacheBytes, RecordHoldsLatentPlusRopeKeyElementsPerToken) {
  struct Case {
    Index latent_dim, rope_dim, elements;
  };
  // DeepSeek-V2 512 + 64; the TPA paper's MLA baselines 256 + 32 (small), 512 + 32 (medium+).
  const Case cases[] = {{512, 64, 576}, {256, 32, 288}, {512, 32, 544}};
  const Index element_bytes[] = {4, 2, 2};  // f32, bf16, f16
  for (const Case& c : cases)
    for (int s = 0; s < 3; ++s) {
      const StorageType storage = kAllStorage[s];
      SCOPED_TRACE(std::to_string(c.latent_dim) + " + " + std::to_string(c.rope_dim) + " " +
                   tpattn::name_of(storage));
      with_storage(storage, [&](auto tag) {
        using S = decltype(tag);
        const MlaConfig config = config_with_cache(c.latent_dim, c.rope_dim);
        const MultiHeadLatentAttention<S> op(config, tpattn_test::random_mla_weights(config, 3u));
        const CacheRecord& record = op.cache_record();
        ASSERT_EQ(record.plane_count(), 2);
        EXPECT_EQ(record.plane(0).name, "latent");
        EXPECT_EQ(record.plane(0).rows, 1);
        EXPECT_EQ(record.plane(0).cols, c.latent_dim);
        EXPECT_EQ(record.plane(1).name, "rope_key");
        EXPECT_EQ(record.plane(1).rows, 1);
        EXPECT_EQ(record.plane(1).cols, c.rope_dim);
        for (Index p = 0; p < 2; ++p) EXPECT_EQ(record.plane(p).storage, storage);
        EXPECT_EQ(record.elements_per_token(), c.elements);
        EXPECT_EQ(record.bytes_per_token(), c.elements * element_bytes[s]);
        EXPECT_EQ(record, op.kernel().cache_record());
        EXPECT_EQ(record, MlaKernel<S>(7, c.latent_dim, c.rope_dim, 0.1f).cache_record());
        EXPECT_EQ(record, tpattn::records::mla(c.latent_dim, c.rope_dim, storage));
      });
    }
}

TEST(MlaCacheBytes, BytesUsedIsTokensHeldTimesLatentPlusRopeKeyBytes) {
  const MlaConfig config = config_with_cache(256, 32);
  const Index element_bytes[] = {4, 2, 2};
  for (int s = 0; s < 3; ++s)
    for (CacheKind kind : kAllCacheKinds) {
      const StorageType storage = kAllStorage[s];
      SCOPED_TRACE(std::string(tpattn::name_of(storage)) + " " + name_of(kind));
      with_storage(storage, [&](auto tag) {
        using S = decltype(tag);
        MultiHeadLatentAttention<S> op(config, tpattn_test::random_mla_weights(config, 4u));
        auto cache = make_cache(op.cache_record(), kind, 2, 40);
        const SequenceId a = cache->add_sequence();
        const SequenceId b = cache->add_sequence();
        const Index bytes_per_token = 288 * element_bytes[s];
        EXPECT_EQ(cache->bytes_per_token(), bytes_per_token);
        EXPECT_EQ(cache->bytes_used(), 0);
        const RowMatrix x = tpattn_test::random_inputs(40, config.d_model, 5u);
        run_steps(op, *cache, a, x, steps_for(Feed::prefill, 17));
        EXPECT_EQ(cache->bytes_used(), 17 * bytes_per_token);
        run_steps(op, *cache, b, x, steps_for(Feed::decode, 3));
        EXPECT_EQ(cache->bytes_used(), 20 * bytes_per_token);
        run_steps(op, *cache, a, x, steps_for(Feed::chunked, 23), 17);
        EXPECT_EQ(cache->bytes_used(), 43 * bytes_per_token);
        if (const auto* paged = dynamic_cast<const PagedKvCache*>(cache.get())) {
          // Pages of 16 tokens: a holds 40 tokens in 3 pages, b 3 tokens in 1.
          EXPECT_EQ(paged->page_bytes(), kPageTokens * bytes_per_token);
          EXPECT_EQ(paged->bytes_in_pages(), 4 * kPageTokens * bytes_per_token);
        }
      });
    }
}

// ---- misuse -------------------------------------------------------------------------------------

// Runs f; success iff it throws tpattn::Error naming exactly `call` and `argument`.
template <class F>
::testing::AssertionResult throws_error(F&& f, const std::string& call,
                                        const std::string& argument) {
  try {
    f();
  } catch (const tpattn::Error& e) {
    if (e.call() == call && e.argument() == argument)
      return ::testing::AssertionSuccess() << e.what();
    return ::testing::AssertionFailure()
           << "expected " << call << " / " << argument << ", threw: " << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-tpattn exception: " << e.what();
  }
  return ::testing::AssertionFailure()
         << "did not throw (expected " << call << " / " << argument << ")";
}

constexpr const char* kOperator = "MultiHeadLatentAttention";
constexpr const char* kDecode = "MultiHeadLatentAttention::decode";
constexpr const char* kPrefill = "MultiHeadLatentAttention::prefill";

// value_dim != head_dim, so a weight sized with the wrong one of the two is caught.
MlaConfig misuse_config() {
  MlaConfig c = small_config();
  c.value_dim = 12;
  return c;
}

TEST(MlaMisuse, InvalidConfigThrowsNamingTheArgument) {
  const MlaConfig base = misuse_config();
  const MlaWeights weights = tpattn_test::random_mla_weights(base, 9u);
  struct Case {
    const char* argument;
    std::function<void(MlaConfig&)> change;
  };
  const Case cases[] = {
      {"d_model", [](MlaConfig& c) { c.d_model = 0; }},
      {"heads", [](MlaConfig& c) { c.heads = 0; }},
      {"heads", [](MlaConfig& c) { c.heads = -3; }},
      {"head_dim", [](MlaConfig& c) { c.head_dim = 0; }},
      {"rope_dim", [](MlaConfig& c) { c.rope_dim = 0; }},
      {"kv_latent_dim", [](MlaConfig& c) { c.kv_latent_dim = 0; }},
      {"value_dim", [](MlaConfig& c) { c.value_dim = -1; }},
      {"q_latent_dim", [](MlaConfig& c) { c.q_latent_dim = -1; }},
      {"norm_eps", [](MlaConfig& c) { c.norm_eps = 0.0f; }},
      {"norm_eps", [](MlaConfig& c) { c.norm_eps = -1e-6f; }},
      {"norm_eps", [](MlaConfig& c) { c.norm_eps = std::numeric_limits<float>::quiet_NaN(); }},
      {"rope.rotary_dim", [](MlaConfig& c) { c.rope.rotary_dim = 3; }},   // odd
      {"rope.rotary_dim", [](MlaConfig& c) { c.rope.rotary_dim = 10; }},  // > d_R = 8
      {"rope.rotary_dim", [](MlaConfig& c) { c.rope.rotary_dim = -2; }},
      {"rope.base", [](MlaConfig& c) { c.rope.base = 1.0; }},
  };
  for (const Case& c : cases) {
    MlaConfig config = base;
    c.change(config);
    SCOPED_TRACE(c.argument);
    EXPECT_TRUE(throws_error([&] { MultiHeadLatentAttention<float> op(config, weights); },
                             kOperator, c.argument));
  }
}

// heads = head_dim = 2^32: h (d_h + d_R) overflows; so does d_h + d_R itself near the top of
// Index, and the bare kernel's workspace (16 query tokens x h rows x (d_c + d_R)).
TEST(MlaMisuse, SizeProductsThatOverflowThrowBeforeAnyAllocation) {
  const Index big = Index{1} << 32;
  MlaConfig config = misuse_config();
  config.heads = big;
  config.head_dim = big;
  expect_error_before_allocating([&] { MultiHeadLatentAttention<float> op(config, MlaWeights{}); },
                                 kOperator, "heads x (head_dim + rope_dim)", kFitsInIndex,
                                 "4294967296 x 4294967304, which overflows");
  config = misuse_config();
  config.head_dim = std::numeric_limits<Index>::max() - 4;
  expect_error_before_allocating([&] { MultiHeadLatentAttention<float> op(config, MlaWeights{}); },
                                 kOperator, "head_dim + rope_dim", kFitsInIndex,
                                 "9223372036854775803 + 8, which overflows");
  expect_error_before_allocating([&] { MlaKernel<float> kernel(big, big, big, 0.1f); }, "MlaKernel",
                                 "workspace_floats()", kFitsInIndex,
                                 "68719476736 x 8589934592, which overflows");
}

// norm_eps and rope.base must be finite and positive (rope.base > 1); before, inf was accepted
// (an RMSNorm dividing by infinity, a RoPE of angle 0).
TEST(MlaMisuse, NonFiniteOrNonPositiveNormEpsOrRopeBaseThrows) {
  const MlaConfig base = misuse_config();
  const MlaWeights weights = tpattn_test::random_mla_weights(base, 10u);
  const auto construct = [&](const std::function<void(MlaConfig&)>& change) {
    MlaConfig config = base;
    change(config);
    return [config, w = weights]() mutable {
      MultiHeadLatentAttention<float> op(config, std::move(w));
    };
  };
  const float inf = std::numeric_limits<float>::infinity();
  const std::pair<float, const char*> epsilons[] = {
      {inf, "inf"},
      {std::numeric_limits<float>::quiet_NaN(), "nan"},
      {0.0f, "0"},
      {-1e-6f, "-1e-06"}};
  for (const auto& [eps, text] : epsilons) {
    SCOPED_TRACE(text);
    expect_error_before_allocating(construct([eps = eps](MlaConfig& c) { c.norm_eps = eps; }),
                                   kOperator, "norm_eps", "a finite value > 0", text);
  }
  expect_error_before_allocating(
      construct([](MlaConfig& c) { c.rope.base = std::numeric_limits<double>::infinity(); }),
      kOperator, "rope.base", "a finite value > 1", "inf");
  expect_error_before_allocating(
      construct([](MlaConfig& c) { c.rope.direction = static_cast<RopeDirection>(7); }), kOperator,
      "rope.direction", "standard or reversed", "7");
}

// Every config, RoPE, gain and weight-shape error is raised before the constructor allocates
// anything; rope_dim 2^40 fails on w_uq instead of on its 4 TiB RoPE table.
TEST(MlaMisuse, EveryConstructorCheckRunsBeforeItAllocates) {
  const MlaConfig good = misuse_config();
  const MlaWeights weights = tpattn_test::random_mla_weights(good, 11u);
  const auto construct = [](MlaConfig config, MlaWeights w) {
    return [config, w]() mutable { MultiHeadLatentAttention<float> op(config, std::move(w)); };
  };
  MlaConfig config = good;
  config.heads = 0;
  expect_error_before_allocating(construct(config, weights), kOperator, "heads", ">= 1", "0");
  MlaWeights wrong = weights;
  wrong.kv_norm = tpattn::Vector::Ones(31);
  expect_error_before_allocating(construct(good, wrong), kOperator, "kv_norm",
                                 "a gain of kv_latent_dim entries", "31");
  wrong = weights;
  wrong.w_o = RowMatrix::Zero(40, 35);
  expect_error_before_allocating(construct(good, wrong), kOperator, "w_o", "40 x 36", "40 x 35");
  config = good;
  config.rope_dim = Index{1} << 40;
  expect_error_before_allocating(construct(config, weights), kOperator, "w_uq",
                                 "3298534883376 x 24", "72 x 24");
}

TEST(MlaMisuse, BareKernelRejectsNonPositiveSizesAndABadScale) {
  EXPECT_TRUE(throws_error([] { MlaKernel<float> k(0, 512, 64, 0.1f); }, "MlaKernel", "heads"));
  EXPECT_TRUE(
      throws_error([] { MlaKernel<float> k(4, 0, 64, 0.1f); }, "MlaKernel", "kv_latent_dim"));
  EXPECT_TRUE(throws_error([] { MlaKernel<float> k(4, 512, -1, 0.1f); }, "MlaKernel", "rope_dim"));
  for (float scale : {0.0f, -0.1f, std::numeric_limits<float>::infinity(),
                      std::numeric_limits<float>::quiet_NaN()})
    EXPECT_TRUE(throws_error([&] { MlaKernel<float> k(4, 512, 64, scale); }, "MlaKernel", "scale"))
        << scale;
}

TEST(MlaMisuse, BareKernelAttendRejectsAForeignViewABadCountAndNullBuffers) {
  const Index h = 3, dc = 32, dr = 8;
  const MlaKernel<float> kernel(h, dc, dr, 0.25f);
  auto cache = make_cache(kernel.cache_record(), CacheKind::paged, 1, 20);
  auto foreign =
      make_cache(tpattn::records::mla(dc, dr, StorageType::bf16), CacheKind::paged, 1, 20);
  const SequenceId seq = cache->add_sequence();
  const SequenceId other = foreign->add_sequence();
  tpattn_test::Random random(24u);
  const std::vector<float> latent = random.floats(4 * dc), rope_key = random.floats(4 * dr);
  cache->append(seq, 4, {{latent.data(), 1, dc}, {rope_key.data(), 1, dr}});
  foreign->append(other, 4, {{latent.data(), 1, dc}, {rope_key.data(), 1, dr}});
  const std::vector<float> q = random.floats(5 * h * (dc + dr));
  std::vector<float> out(static_cast<std::size_t>(5 * h * dc));
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  const SequenceView view = cache->view(seq);
  const char* call = "MlaKernel::attend";
  const auto attend = [&](const float* query, Index n, const SequenceView& v, float* o, float* w) {
    kernel.attend(query, n, v, o, nullptr, w);
  };
  EXPECT_TRUE(
      throws_error([&] { attend(q.data(), 1, foreign->view(other), out.data(), workspace.data()); },
                   call, "view"));
  EXPECT_TRUE(throws_error(
      [&] { attend(q.data(), 1, SequenceView(), out.data(), workspace.data()); }, call, "view"));
  EXPECT_TRUE(
      throws_error([&] { attend(q.data(), 0, view, out.data(), workspace.data()); }, call, "n"));
  EXPECT_TRUE(
      throws_error([&] { attend(q.data(), 5, view, out.data(), workspace.data()); }, call, "n"));
  EXPECT_TRUE(
      throws_error([&] { attend(nullptr, 1, view, out.data(), workspace.data()); }, call, "q"));
  EXPECT_TRUE(
      throws_error([&] { attend(q.data(), 1, view, nullptr, workspace.data()); }, call, "out"));
  EXPECT_TRUE(
      throws_error([&] { attend(q.data(), 1, view, out.data(), nullptr); }, call, "workspace"));
  EXPECT_NO_THROW(attend(q.data(), 4, view, out.data(), workspace.data()));
}

TEST(MlaMisuse, EveryWeightShapeMismatchThrowsNamingTheWeight) {
  struct Case {
    const char* argument;
    bool compressed_query;  // false: q_latent_dim 0
    std::function<void(MlaWeights&, const MlaConfig&)> change;
  };
  const auto resize = [](RowMatrix& m, Index rows, Index cols) { m = RowMatrix::Zero(rows, cols); };
  const Case cases[] = {
      {"w_dq", true,
       [&](MlaWeights& w, const MlaConfig&) { resize(w.w_dq, w.w_dq.rows() + 1, w.w_dq.cols()); }},
      {"w_dq", true,
       [&](MlaWeights& w, const MlaConfig&) { resize(w.w_dq, w.w_dq.rows(), w.w_dq.cols() - 1); }},
      {"w_dq", true, [](MlaWeights& w, const MlaConfig&) { w.w_dq = RowMatrix(); }},
      {"q_norm", true,
       [](MlaWeights& w, const MlaConfig&) {
         w.q_norm = tpattn::Vector::Ones(w.q_norm.size() - 1);
       }},
      {"q_norm", true, [](MlaWeights& w, const MlaConfig&) { w.q_norm = tpattn::Vector(); }},
      // head rows [qC | qR] sized with d_v instead of d_h
      {"w_uq", true,
       [&](MlaWeights& w, const MlaConfig& c) {
         resize(w.w_uq, c.heads * (c.value_dim + c.rope_dim), c.q_latent_dim);
       }},
      {"w_uq", true,
       [&](MlaWeights& w, const MlaConfig& c) { resize(w.w_uq, w.w_uq.rows(), c.d_model); }},
      // without query compression w_uq must take x (d_model), not a latent
      {"w_uq", false,
       [&](MlaWeights& w, const MlaConfig& c) {
         resize(w.w_uq, w.w_uq.rows(), 24);
         (void)c;
       }},
      {"w_dkv", true,
       [&](MlaWeights& w, const MlaConfig& c) {
         resize(w.w_dkv, c.kv_latent_dim, c.d_model);
       }},  // no kR rows
      {"w_dkv", true,
       [&](MlaWeights& w, const MlaConfig& c) { resize(w.w_dkv, w.w_dkv.rows(), c.d_model + 1); }},
      {"kv_norm", true,
       [](MlaWeights& w, const MlaConfig& c) {
         w.kv_norm = tpattn::Vector::Ones(c.kv_latent_dim + c.rope_dim);
       }},
      {"kv_norm", false, [](MlaWeights& w, const MlaConfig&) { w.kv_norm = tpattn::Vector(); }},
      {"w_ukv", true,
       [&](MlaWeights& w, const MlaConfig& c) {
         resize(w.w_ukv, c.heads * 2 * c.head_dim, c.kv_latent_dim);
       }},
      {"w_ukv", true,
       [&](MlaWeights& w, const MlaConfig& c) {
         resize(w.w_ukv, w.w_ukv.rows(), c.kv_latent_dim + c.rope_dim);
       }},
      {"w_o", true,
       [&](MlaWeights& w, const MlaConfig& c) { resize(w.w_o, c.d_model, c.heads * c.head_dim); }},
      {"w_o", true,
       [&](MlaWeights& w, const MlaConfig& c) { resize(w.w_o, c.d_model + 1, w.w_o.cols()); }},
  };
  for (const Case& c : cases) {
    MlaConfig config = misuse_config();
    if (!c.compressed_query) config.q_latent_dim = 0;
    MlaWeights weights = tpattn_test::random_mla_weights(config, 10u);
    ASSERT_NO_THROW((MultiHeadLatentAttention<float>(config, weights)));
    c.change(weights, config);
    SCOPED_TRACE(c.argument);
    EXPECT_TRUE(throws_error([&] { MultiHeadLatentAttention<float> op(config, weights); },
                             kOperator, c.argument));
  }
  // Gains of switched-off norms are not looked at.
  MlaConfig no_norms = misuse_config();
  no_norms.normalize_q_latent = false;
  no_norms.normalize_kv_latent = false;
  MlaWeights weights = tpattn_test::random_mla_weights(no_norms, 11u);
  weights.q_norm = tpattn::Vector();
  weights.kv_norm = tpattn::Vector();
  EXPECT_NO_THROW((MultiHeadLatentAttention<float>(no_norms, weights)));
}

// A float operator with two sequences of 5 and 17 tokens in its cache, for the misuse tests.
struct MisuseFixture {
  MlaConfig config = misuse_config();
  MlaWeights weights = tpattn_test::random_mla_weights(config, 12u);
  MultiHeadLatentAttention<float> op{config, weights};
  RowMatrix x = tpattn_test::random_inputs(100, config.d_model, 13u);
  RowMatrix y = RowMatrix::Zero(100, config.d_model);
  std::unique_ptr<KvCache> cache;
  std::vector<SequenceId> seqs;

  MisuseFixture(CacheKind kind, Index capacity) {
    cache = make_cache(op.cache_record(), kind, 3, capacity);
    for (Index length : {5, 17}) {
      seqs.push_back(cache->add_sequence());
      run_steps(op, *cache, seqs.back(), x, steps_for(Feed::chunked, length));
    }
  }
  CacheSnapshot state() const { return snapshot(*cache, seqs); }
  // The cache and operator still work: one more token for every sequence, checked end to end.
  ::testing::AssertionResult still_works() {
    for (SequenceId seq : seqs) {
      const Index length = cache->length(seq);
      RowMatrix out(1, config.d_model);
      op.decode(*cache, &seq, 1, x.row(length).data(), out.data());
      // The sequence's inputs were x's first rows, token for token.
      RowMatrix inputs = x.topRows(length + 1);
      auto result =
          matches_explicit_reference(config, weights, inputs, out, *cache, seq, kLayerTolerance);
      if (!result) return result;
    }
    return ::testing::AssertionSuccess();
  }
};

TEST(MlaMisuse, WrongCacheRecordOrStorageThrowsAndLeavesTheCacheUnchanged) {
  const MlaConfig config = misuse_config();
  const Index dc = config.kv_latent_dim, dr = config.rope_dim;
  const CacheRecord wrong[] = {
      tpattn::records::mla(dc + 1, dr),
      tpattn::records::mla(dc, dr + 2),
      tpattn::records::mla(dr, dc),                     // widths swapped
      tpattn::records::mla(dc, dr, StorageType::bf16),  // float operator, bf16 cache
      tpattn::records::mla(dc, dr, StorageType::f16),
      tpattn::records::gqa(1, dc, dr),  // same widths, other planes
  };
  MultiHeadLatentAttention<float> op(config, tpattn_test::random_mla_weights(config, 14u));
  const RowMatrix x = tpattn_test::random_inputs(4, config.d_model, 15u);
  RowMatrix y(4, config.d_model);
  for (const CacheRecord& record : wrong) {
    for (CacheKind kind : kAllCacheKinds) {
      SCOPED_TRACE(std::string(name_of(kind)) + " cache of " +
                   std::to_string(record.elements_per_token()) + " elements, " +
                   tpattn::name_of(record.plane(0).storage));
      auto cache = make_cache(record, kind, 2, 20);
      const SequenceId seq = cache->add_sequence();
      // Two tokens of data, written directly.
      tpattn_test::Random random(16u);
      const std::vector<float> a = random.floats(2 * record.plane(0).elements_per_token());
      const std::vector<float> b = random.floats(2 * record.plane(1).elements_per_token());
      cache->append(seq, 2,
                    {{a.data(), record.plane(0).rows, record.plane(0).cols},
                     {b.data(), record.plane(1).rows, record.plane(1).cols}});
      const CacheSnapshot before = snapshot(*cache, {seq});
      EXPECT_TRUE(
          throws_error([&] { op.decode(*cache, &seq, 1, x.data(), y.data()); }, kDecode, "cache"));
      EXPECT_TRUE(
          throws_error([&] { op.prefill(*cache, seq, 3, x.data(), y.data()); }, kPrefill, "cache"));
      EXPECT_TRUE(snapshot(*cache, {seq}) == before);
    }
  }
  // And the other way round: a bf16 operator on a float cache.
  MultiHeadLatentAttention<Eigen::bfloat16> bf16_op(config,
                                                    tpattn_test::random_mla_weights(config, 14u));
  auto cache = make_cache(tpattn::records::mla(dc, dr), CacheKind::paged, 1, 20);
  const SequenceId seq = cache->add_sequence();
  EXPECT_TRUE(
      throws_error([&] { bf16_op.decode(*cache, &seq, 1, x.data(), y.data()); }, kDecode, "cache"));
  EXPECT_TRUE(throws_error([&] { bf16_op.prefill(*cache, seq, 2, x.data(), y.data()); }, kPrefill,
                           "cache"));
  EXPECT_EQ(cache->length(seq), 0);
  EXPECT_EQ(cache->bytes_used(), 0);
}

TEST(MlaMisuse, UnknownOrDuplicateSequencesAndBadArgumentsThrowAndLeaveTheCacheUnchanged) {
  for (CacheKind kind : kAllCacheKinds) {
    SCOPED_TRACE(name_of(kind));
    MisuseFixture f(kind, 40);
    // A removed sequence is unknown too.
    const SequenceId removed = f.cache->add_sequence();
    run_steps(f.op, *f.cache, removed, f.x, steps_for(Feed::prefill, 3));
    f.cache->remove_sequence(removed);
    const CacheSnapshot before = f.state();
    const SequenceId a = f.seqs[0], b = f.seqs[1];
    float* y = f.y.data();
    const float* x = f.x.data();

    const SequenceId unknown_first[] = {99, a};
    const SequenceId unknown_last[] = {a, b, removed};
    const SequenceId negative[] = {-1};
    const SequenceId duplicate[] = {a, b, a};
    const SequenceId same_twice[] = {b, b};
    EXPECT_TRUE(
        throws_error([&] { f.op.decode(*f.cache, unknown_first, 2, x, y); }, kDecode, "seqs"));
    EXPECT_TRUE(
        throws_error([&] { f.op.decode(*f.cache, unknown_last, 3, x, y); }, kDecode, "seqs"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, negative, 1, x, y); }, kDecode, "seqs"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, duplicate, 3, x, y); }, kDecode, "seqs"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, same_twice, 2, x, y); }, kDecode, "seqs"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, nullptr, 1, x, y); }, kDecode, "seqs"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, &a, 0, x, y); }, kDecode, "batch"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, &a, -1, x, y); }, kDecode, "batch"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, &a, 1, nullptr, y); }, kDecode, "x"));
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, &a, 1, x, nullptr); }, kDecode, "y"));

    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, 99, 2, x, y); }, kPrefill, "seq"));
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, removed, 2, x, y); }, kPrefill, "seq"));
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, a, 0, x, y); }, kPrefill, "n_tokens"));
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, a, -4, x, y); }, kPrefill, "n_tokens"));
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, a, 2, nullptr, y); }, kPrefill, "x"));
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, a, 2, x, nullptr); }, kPrefill, "y"));

    EXPECT_TRUE(f.state() == before);
    EXPECT_TRUE(f.still_works());
  }
}

TEST(MlaMisuse, PrefillBeyondCapacityThrowsAndLeavesTheCacheUnchanged) {
  for (CacheKind kind : kAllCacheKinds) {
    SCOPED_TRACE(name_of(kind));
    // Room for 3 sequences of 24 tokens: contiguous regions of 24; paged, 3 x 2 pages of 16.
    MisuseFixture f(kind, 24);
    const SequenceId a = f.seqs[0], b = f.seqs[1];  // 5 and 17 tokens
    const CacheSnapshot before = f.state();
    const Index room = f.cache->tokens_available(b);
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, b, room + 1, f.x.data(), f.y.data()); },
                             kPrefill, "n_tokens"));
    EXPECT_TRUE(throws_error(
        [&] {
          f.op.prefill(*f.cache, a, f.cache->tokens_available(a) + 1, f.x.data(), f.y.data());
        },
        kPrefill, "n_tokens"));
    EXPECT_TRUE(f.state() == before);
    EXPECT_TRUE(f.still_works());
  }
}

TEST(MlaMisuse, DecodeIntoAFullSequenceThrowsAndAppendsToNoSequence) {
  for (CacheKind kind : kAllCacheKinds) {
    SCOPED_TRACE(name_of(kind));
    MisuseFixture f(kind, 24);
    const SequenceId a = f.seqs[0], b = f.seqs[1];
    // Fill b to its last token: its region of 24, or every page left in the shared pool.
    run_steps(f.op, *f.cache, b, f.x, steps_for(Feed::prefill, f.cache->tokens_available(b)), 17);
    ASSERT_EQ(f.cache->tokens_available(b), 0);
    const CacheSnapshot before = f.state();
    const SequenceId both[] = {a, b};  // a first: it has room, b is checked after it
    RowMatrix y(2, f.config.d_model);
    RowMatrix x(2, f.config.d_model);
    EXPECT_TRUE(throws_error([&] { f.op.decode(*f.cache, both, 2, x.data(), y.data()); }, kDecode,
                             "cache"));
    EXPECT_TRUE(throws_error([&] { f.op.prefill(*f.cache, b, 1, x.data(), y.data()); }, kPrefill,
                             "n_tokens"));
    EXPECT_TRUE(f.state() == before);
  }
}

// A shared page pool with one free page, and two sequences that each need a new page: each alone
// has room, the batch has not. The first append succeeds, the second throws, and decode cuts the
// first back (layer_support.hpp: all or nothing). The error is the cache's own.
TEST(MlaMisuse, DecodeBatchThatRunsThePagePoolDryRollsBackEveryAppend) {
  const MlaConfig config = misuse_config();
  const MlaWeights weights = tpattn_test::random_mla_weights(config, 17u);
  MultiHeadLatentAttention<float> op(config, weights);
  PagedKvCache cache(op.cache_record(), kPageTokens, 3, 2);
  const RowMatrix x = tpattn_test::random_inputs(20, config.d_model, 18u);
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  run_steps(op, cache, a, x, steps_for(Feed::prefill, 16));
  run_steps(op, cache, b, x, steps_for(Feed::chunked, 16));
  ASSERT_EQ(cache.free_page_count(), 1);
  ASSERT_EQ(cache.tokens_available(a), 16);
  ASSERT_EQ(cache.tokens_available(b), 16);
  const CacheSnapshot before = snapshot(cache, {a, b});
  const SequenceId both[] = {a, b};
  RowMatrix xb(2, config.d_model), yb(2, config.d_model);
  xb.row(0) = x.row(16);
  xb.row(1) = x.row(16);
  EXPECT_TRUE(throws_error([&] { op.decode(cache, both, 2, xb.data(), yb.data()); },
                           "MultiHeadLatentAttention::decode", "cache"));
  EXPECT_TRUE(snapshot(cache, {a, b}) == before);
  // One at a time both still fit... until the pool is dry.
  RowMatrix y(1, config.d_model);
  op.decode(cache, &a, 1, x.row(16).data(), y.data());
  EXPECT_TRUE(
      matches_explicit_reference(config, weights, x.topRows(17), y, cache, a, kLayerTolerance));
  EXPECT_TRUE(
      throws_error([&] { op.decode(cache, &b, 1, x.row(16).data(), y.data()); }, kDecode, "cache"));
}

// ---- allocation ---------------------------------------------------------------------------------

class MlaAllocation : public ::testing::TestWithParam<std::tuple<StorageType, CacheKind>> {};

// At DeepSeek-V2's latent widths (d_c 512, d_R 64, d_h 128): the projections and the absorbed
// query's GEMMs are large enough for a hidden Eigen temporary to reach the heap.
TEST_P(MlaAllocation, SteadyStateDecodeAllocatesNothing) {
  ASSERT_TRUE(tpattn::test::AllocationCounter::installed());
  const StorageType storage = std::get<0>(GetParam());
  const CacheKind kind = std::get<1>(GetParam());
  const MlaConfig config = deepseek_like_config();
  with_storage(storage, [&](auto tag) {
    using S = decltype(tag);
    MultiHeadLatentAttention<S> op(config, tpattn_test::random_mla_weights(config, 19u));
    const Index batch = 3, steps = 24;
    auto cache = make_cache(op.cache_record(), kind, batch, 100);
    const RowMatrix x = tpattn_test::random_inputs(100, config.d_model, 20u);
    SequenceId seqs[3];
    const Index lengths[] = {3, 15, 60};  // decode crosses a page and the 64-token tile
    for (Index b = 0; b < batch; ++b) {
      seqs[b] = cache->add_sequence();
      run_steps(op, *cache, seqs[b], x, steps_for(Feed::prefill, lengths[b]));
    }
    op.reserve(batch);
    RowMatrix xb = x.topRows(batch), yb(batch, config.d_model);
    op.decode(*cache, seqs, batch, xb.data(), yb.data());  // warm-up
    tpattn::test::HeapAllocations made;
    for (Index step = 0; step < steps; ++step) {
      const Index rows = step % 4 == 3 ? 1 : batch;  // smaller batches fit the plan too
      made += tpattn::test::count_heap_allocations(
          [&] { op.decode(*cache, seqs + (batch - rows), rows, xb.data(), yb.data()); });
    }
    EXPECT_EQ(made.by_new, 0u);
    EXPECT_EQ(made.by_eigen, 0) << "Eigen's malloc";
    EXPECT_EQ(cache->length(seqs[2]), 60 + 1 + steps);
    EXPECT_TRUE(yb.allFinite());
  });
}

INSTANTIATE_TEST_SUITE_P(
    StorageAndCache, MlaAllocation,
    ::testing::Combine(::testing::ValuesIn(kAllStorage), ::testing::ValuesIn(kAllCacheKinds)),
    [](const ::testing::TestParamInfo<std::tuple<StorageType, CacheKind>>& info) {
      return std::string(tpattn::name_of(std::get<0>(info.param))) + "_" +
             name_of(std::get<1>(info.param));
    });

TEST(MlaAllocation, PrefillWithinReservedTokensAllocatesNothing) {
  ASSERT_TRUE(tpattn::test::AllocationCounter::installed());
  const MlaConfig config = deepseek_like_config();
  MultiHeadLatentAttention<float> op(config, tpattn_test::random_mla_weights(config, 22u));
  auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, 80);
  const SequenceId seq = cache->add_sequence();
  const RowMatrix x = tpattn_test::random_inputs(80, config.d_model, 23u);
  RowMatrix y(80, config.d_model);
  op.reserve(1, 20);
  const tpattn::test::HeapAllocations made = tpattn::test::count_heap_allocations([&] {
    for (Index first = 0; first < 80; first += 20)
      op.prefill(*cache, seq, 20, x.row(first).data(), y.row(first).data());
  });
  EXPECT_EQ(made.by_new, 0u);
  EXPECT_EQ(made.by_eigen, 0) << "Eigen's malloc";
  EXPECT_EQ(cache->length(seq), 80);
}

}  // namespace
