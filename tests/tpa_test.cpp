// tests/tpa_test.cpp -- Tensor Product Attention and TPA-KVonly against a double reference.
//
// The reference (support/tpa_reference.hpp) projects the factors in double, rotates the rows of
// B_Q and B_K, materialises Q, K, V and runs plain causal softmax attention; the library decodes
// from the cached factors and never forms K or V. What is checked, by docs/attention.md section:
//   §6 hand-checked cases      bare TpaKernel, both contraction orders
//   §6.1 / §6.8                layer decode, prefill, chunked prefill == reference, odd shapes,
//                              f32 / bf16 / f16 caches, contiguous and paged; orders agree
//   §3 cache contents          every token's A_K, B_K (rotated), A_V, B_V as the reference's
//   §6.2                       TPA set up as MHA / MQA / GQA == those operators
//   §6.5, §6.6, §6.7           RoPE offsets and write-vs-read rotation, gauge freedom, split+merge
//   §3 layout, §5 / §6.9       head-major A rows, cache sizes and bytes
//   and batched decode, misuse (errors that change nothing, the bare kernel's argument checks),
//   no allocation in steady decode.
//
// Errors are measured as max |actual - expected| / max |expected| over the whole output.
// clang-format off
#include "support/check_capture.hpp"  // first: before Eigen and any tpattn header
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support/allocation_counter.hpp"
#include "support/feeds.hpp"
#include "support/reference.hpp"
#include "support/storage_types.hpp"
#include "support/test_caches.hpp"
#include "support/tpa_reference.hpp"
#include "tpattn/tpattn.hpp"

namespace {

using tpattn::test::CacheKind;
using tpattn::test::expect_error_before_allocating;
using tpattn::test::Feed;
using tpattn::test::kAllCacheKinds;
using tpattn::test::kAllFeeds;
using tpattn::test::kFitsInIndex;
using tpattn::test::kPageTokens;
using tpattn::test::make_cache;
using tpattn::test::with_storage;

using tpattn::CacheRecord;
using tpattn::ContiguousKvCache;
using tpattn::Index;
using tpattn::KvCache;
using tpattn::PagedKvCache;
using tpattn::RopeConfig;
using tpattn::RopeDirection;
using tpattn::RopePairing;
using tpattn::RowMatrix;
using tpattn::SequenceId;
using tpattn::SequenceView;
using tpattn::StorageType;
using tpattn::TensorProductAttention;
using tpattn::TensorProductAttentionKvOnly;
using tpattn::TpaConfig;
using tpattn::TpaKernel;
using tpattn::TpaOrder;
using tpattn::TpaShape;
using tpattn::TpaWeights;
using tpattn_test::Tensor3;

// ---- tolerances ---------------------------------------------------------------------------------
//
// fp32 compute against double: the kernel's errors are fp32 roundings of dot products over d_h
// (<= 129) and R (<= 16) terms and of softmax sums over <= 300 keys; measured worst 8.6e-7, so
// 2e-5 leaves ~20x margin and is still ~1e3x below what a wrong index, scale or rotation gives.
constexpr double kFloatTolerance = 2e-5;
// Two fp32 computations of the same numbers in different orders (factor vs query order,
// batched vs single, paged vs contiguous, split + merge): measured worst 7.6e-7.
constexpr double kAgreementTolerance = 1e-5;

// bf16 / f16 caches against a reference that rounds the same cached factors through the same
// type. The kernel's fp32 projection can land on the other side of a rounding boundary from the
// double one for a few elements (one storage ulp of that element: ~2^-8 bf16, ~2^-11 f16), which
// moves the output a little. Measured worst: 5.6e-7 (bf16, no element flipped), 2.5e-5 (f16, a
// few flipped); a single bf16 flip is estimated at ~1e-4. Without the rounding in the reference the
// same cases are off by 1.2e-3..3.3e-3 (bf16) and 2.2e-4..7.8e-4 (f16), and storing by truncation
// instead of round-to-nearest is caught, so the bounds still see a wrong conversion.
double tolerance(StorageType storage) {
  switch (storage) {
    case StorageType::f32: return kFloatTolerance;
    case StorageType::bf16: return 5e-4;
    case StorageType::f16: return 1e-4;
  }
  return 0.0;
}

// bf16 / f16 caches against the exact (unrounded) double reference. Rounding to nearest moves
// each cached factor entry by <= u of itself (u = 2^-8 = 3.9e-3 bf16, 2^-11 = 4.9e-4 f16).
// K = (1/R_K) A_K^T B_K and V = (1/R_V) A_V^T B_V are sums of R products of two such entries, so
// each entry of K and V moves by <= 2u of its terms' magnitude, ~u of K's and V's scale with
// random signs. The scores q.k / sqrt(d_h) are O(1) (the weights make them ~ N(0, 1)), so they
// move by ~u absolute; the softmax turns that into a weight change p (ds - E_p ds) and the
// output sum_s p_s v_s moves by ~u of its scale through p and ~u through V; W_O, a random-sign
// average, does not amplify it. A few u, then: 1e-2 = 2.6u (bf16), 2e-3 = 4.1u (f16). Measured
// over the cases: 1.2e-3..3.3e-3 (bf16) and 2.2e-4..7.8e-4 (f16). The rounded-reference bounds
// above stay the sharp check.
double exact_reference_tolerance(StorageType storage) {
  switch (storage) {
    case StorageType::f32: return kFloatTolerance;
    case StorageType::bf16: return 1e-2;
    case StorageType::f16: return 2e-3;
  }
  return 0.0;
}

// Cached factor entries against the reference's own (in double): float storage holds the fp32
// projection, which differs from the double one by fp32 rounding of a d_model-long dot product and
// of the rotation (measured worst 2.6e-7 of the plane's scale); bf16 / f16 hold that rounded to
// nearest, <= u of the entry away, plus the same slack.
constexpr double kCachedFactorSlack = 1e-5;

// ---- small helpers ------------------------------------------------------------------------------

template <class Actual>
double relative_error(const Actual* actual, const double* expected, Index n) {
  const double scale = tpattn_test::max_abs(expected, n);
  return tpattn_test::max_abs_error(actual, expected, n) / (scale > 0.0 ? scale : 1.0);
}

// actual [rows, cols] (row-major floats) against expected (any Eigen double matrix).
double relative_error(const RowMatrix& actual, const Eigen::MatrixXd& expected) {
  EXPECT_EQ(actual.rows(), expected.rows());
  EXPECT_EQ(actual.cols(), expected.cols());
  const tpattn_test::RowMatrixD want = expected;
  return relative_error(actual.data(), want.data(), want.size());
}

double relative_difference(const RowMatrix& actual, const RowMatrix& expected) {
  return relative_error(actual, expected.cast<double>());
}

double relative_difference(const std::vector<float>& actual, const std::vector<float>& expected) {
  EXPECT_EQ(actual.size(), expected.size());
  const std::vector<double> want(expected.begin(), expected.end());
  return relative_error(actual.data(), want.data(), static_cast<Index>(want.size()));
}

RopeConfig rope(RopePairing pairing, RopeDirection direction, Index rotary_dim = 0) {
  RopeConfig config;
  config.pairing = pairing;
  config.direction = direction;
  config.rotary_dim = rotary_dim;
  return config;
}

RopeConfig no_rope() {
  RopeConfig config;
  config.enabled = false;
  return config;
}

constexpr RopePairing kHalf = RopePairing::half_split;
constexpr RopePairing kInterleaved = RopePairing::interleaved;
constexpr RopeDirection kStandard = RopeDirection::standard;
constexpr RopeDirection kReversed = RopeDirection::reversed;  // the public T6 code's rotation

RowMatrix random_inputs(Index tokens, Index d_model, std::uint32_t seed) {
  return tpattn_test::random_inputs(tokens, d_model, seed);
}

// Builds TensorProductAttentionKvOnly for rank_q == 0, TensorProductAttention otherwise, and
// hands it to body as the base class.
template <class Storage, class Body>
void with_layer(const TpaConfig& config, const TpaWeights& weights, Body&& body) {
  if (config.rank_q == 0) {
    TensorProductAttentionKvOnly<Storage> op(config, weights);
    body(static_cast<TensorProductAttention<Storage>&>(op));
  } else {
    TensorProductAttention<Storage> op(config, weights);
    body(op);
  }
}

// Feeds x [T, d_model] to `seq` (appending after what it holds) and returns y [T, d_model]; a
// chunked feed prefills `chunk` tokens at a time.
template <class Op>
RowMatrix run_layer(Op& op, KvCache& cache, SequenceId seq, const RowMatrix& x, Feed feed,
                    Index chunk) {
  const Index tokens = x.rows(), d = x.cols();
  RowMatrix y(tokens, d);
  y.setConstant(std::nanf(""));
  Index decode_from = tokens;  // tokens before this are prefilled in chunks of `step`
  Index step = tokens;
  switch (feed) {
    case Feed::decode: decode_from = 0; break;
    case Feed::prefill: break;
    case Feed::chunked: step = chunk; break;
    case Feed::prefill_then_decode: decode_from = tokens / 2; break;
  }
  for (Index first = 0; first < decode_from; first += step) {
    const Index n = std::min(step, decode_from - first);
    op.prefill(cache, seq, n, x.data() + first * d, y.data() + first * d);
  }
  for (Index t = decode_from; t < tokens; ++t)
    op.decode(cache, &seq, 1, x.data() + t * d, y.data() + t * d);
  return y;
}

// Everything observable about a cache: lengths, bytes, and the stored bits of every token.
struct CacheState {
  std::vector<Index> lengths;
  Index bytes_used = 0;
  std::vector<unsigned char> bytes;
  bool operator==(const CacheState& other) const {
    return lengths == other.lengths && bytes_used == other.bytes_used && bytes == other.bytes;
  }
};

const unsigned char* plane_bytes(const SequenceView& view, Index plane, Index block) {
  switch (view.record().plane(plane).storage) {
    case StorageType::f32:
      return reinterpret_cast<const unsigned char*>(view.plane_block<float>(plane, block));
    case StorageType::bf16:
      return reinterpret_cast<const unsigned char*>(
          view.plane_block<Eigen::bfloat16>(plane, block));
    case StorageType::f16:
      return reinterpret_cast<const unsigned char*>(view.plane_block<Eigen::half>(plane, block));
  }
  return nullptr;
}

CacheState state_of(const KvCache& cache, const std::vector<SequenceId>& seqs) {
  CacheState state;
  state.bytes_used = cache.bytes_used();
  for (SequenceId seq : seqs) {
    state.lengths.push_back(cache.length(seq));
    const SequenceView view = cache.view(seq);
    for (Index p = 0; p < view.record().plane_count(); ++p)
      for (Index b = 0; b < view.block_count(); ++b) {
        const unsigned char* start = plane_bytes(view, p, b);
        const Index count = view.tokens_in_block(b) * view.record().plane(p).bytes_per_token();
        state.bytes.insert(state.bytes.end(), start, start + count);
      }
  }
  return state;
}

// fn() must throw tpattn::Error from `call` about `argument`, its message containing each of
// `message_parts` too (e.g. the expected and the actual value).
template <class Fn>
void expect_error(Fn&& fn, const std::string& call, const std::string& argument,
                  const std::vector<std::string>& message_parts = {}) {
  try {
    fn();
    ADD_FAILURE() << "expected tpattn::Error from " << call << " about " << argument;
  } catch (const tpattn::Error& error) {
    EXPECT_EQ(error.call(), call) << error.what();
    EXPECT_EQ(error.argument(), argument) << error.what();
    EXPECT_NE(std::string(error.what()).find(argument), std::string::npos) << error.what();
    for (const std::string& part : message_parts)
      EXPECT_NE(std::string(error.what()).find(part), std::string::npos)
          << "\"" << part << "\" not in: " << error.what();
  }
}

// A plane of a cached sequence as doubles [tokens, rows, cols]: exactly what the kernel reads.
Tensor3 read_plane(const SequenceView& view, Index plane) {
  const tpattn::PlaneSpec& spec = view.record().plane(plane);
  const Index width = spec.rows * spec.cols;
  Tensor3 values(view.length(), spec.rows, spec.cols);
  with_storage(spec.storage, [&](auto tag) {
    using Storage = decltype(tag);
    for (Index t = 0; t < view.length(); ++t) {
      const Storage* row = view.plane_block<Storage>(plane, t / view.block_tokens()) +
                           (t % view.block_tokens()) * width;
      for (Index n = 0; n < width; ++n)
        values.row(t, 0)[n] = static_cast<double>(static_cast<float>(row[n]));
    }
  });
  return values;
}

// ---- §6.1 / §6.8: the layer against the reference, parameterised ------------------------------

struct LayerCase {
  std::string name;
  Index d_model, heads, head_dim, value_dim, rank_q, rank_k, rank_v;
  RopeConfig rope;
  StorageType storage;
  CacheKind cache;
  Index length;  // tokens in the sequence
  Index chunk;   // chunk size of the chunked prefill

  TpaConfig config() const {
    TpaConfig config;
    config.d_model = d_model;
    config.heads = heads;
    config.head_dim = head_dim;
    config.value_dim = value_dim;
    config.rank_q = rank_q;
    config.rank_k = rank_k;
    config.rank_v = rank_v;
    config.rope = rope;
    return config;
  }
};

std::string case_name(const ::testing::TestParamInfo<LayerCase>& info) { return info.param.name; }
void PrintTo(const LayerCase& c, std::ostream* out) { *out << c.name; }  // for failure messages

constexpr StorageType kF32 = StorageType::f32;
constexpr StorageType kBf16 = StorageType::bf16;
constexpr StorageType kF16 = StorageType::f16;
constexpr CacheKind kContiguous = CacheKind::contiguous;
constexpr CacheKind kPaged = CacheKind::paged;

// Lengths 1, 2, 17, 113 and the page size 16 +- 1; h 1..5, 17; d_h 8, 40, 64, 96, 128, 129 and
// d_v != d_h; R_Q 1, 2, 6, 16 (on both sides of h d_h / (h + d_h), so both automatic orders run);
// R_K, R_V in 1..3 with R_K != R_V; both pairings and directions, partial and no RoPE.
const std::vector<LayerCase> kTpaCases = {
    // {name, d_model, h, d_h, d_v, R_Q, R_K, R_V, rope, storage, cache, length, chunk}
    {"Len1_H1_D8_Rq1_Rk1_Rv1_Contiguous", 16, 1, 8, 8, 1, 1, 1, rope(kHalf, kStandard), kF32,
     kContiguous, 1, 1},
    {"Len2_H3_D8_Dv5_Rq2_Rk2_Rv1_Interleaved_Paged", 20, 3, 8, 5, 2, 2, 1,
     rope(kInterleaved, kStandard), kF32, kPaged, 2, 1},
    {"Len15_H3_D64_Rq6_Rk1_Rv3_Reversed_Paged", 32, 3, 64, 64, 6, 1, 3, rope(kHalf, kReversed),
     kF32, kPaged, 15, 4},
    {"Len16_H17_D8_Rq16_Rk3_Rv2_InterleavedReversed_Paged", 24, 17, 8, 8, 16, 3, 2,
     rope(kInterleaved, kReversed), kF32, kPaged, 16, 16},
    {"Len17_H17_D64_Dv32_Rq6_Rk2_Rv3_Rotary32_Paged", 40, 17, 64, 32, 6, 2, 3,
     rope(kHalf, kStandard, 32), kF32, kPaged, 17, 5},
    {"Len113_H3_D129_Dv64_Rq2_Rk3_Rv1_Rotary128Reversed_Contiguous", 48, 3, 129, 64, 2, 3, 1,
     rope(kHalf, kReversed, 128), kF32, kContiguous, 113, 17},
    {"Len113_H17_D64_Rq16_Rk2_Rv1_Interleaved_Paged", 32, 17, 64, 64, 16, 2, 1,
     rope(kInterleaved, kStandard), kF32, kPaged, 113, 15},
    {"Len33_H1_D129_Dv8_Rq6_Rk1_Rv2_NoRope_Paged", 16, 1, 129, 8, 6, 1, 2, no_rope(), kF32, kPaged,
     33, 16},
    {"Len32_H3_D8_Rq1_Rk2_Rv3_Rotary6InterleavedReversed_Contiguous", 12, 3, 8, 8, 1, 2, 3,
     rope(kInterleaved, kReversed, 6), kF32, kContiguous, 32, 9},
    {"Len113_H17_D129_Dv64_Rq16_Rk3_Rv2_Rotary128InterleavedReversed_Paged", 40, 17, 129, 64, 16, 3,
     2, rope(kInterleaved, kReversed, 128), kF32, kPaged, 113, 8},
    {"Len300_H3_D64_Rq2_Rk2_Rv1_Reversed_Paged", 24, 3, 64, 64, 2, 2, 1, rope(kHalf, kReversed),
     kF32, kPaged, 300, 33},
    // Contiguous caches give the kernel full tiles (128 tokens): sequences of two and a bit.
    {"Len300_H4_D32_Rq2_Rk2_Rv2_Reversed_Contiguous", 24, 4, 32, 32, 2, 2, 2,
     rope(kHalf, kReversed), kF32, kContiguous, 300, 70},
    {"Bf16_Len270_H3_D16_Dv24_Rq16_Rk1_Rv3_Interleaved_Contiguous", 16, 3, 16, 24, 16, 1, 3,
     rope(kInterleaved, kStandard), kBf16, kContiguous, 270, 128},
    // d_h 40, 96, 128 (common head sizes besides 64): short, with few heads, to stay fast.
    {"Len19_H3_D40_Dv24_Rq2_Rk2_Rv3_Reversed_Paged", 24, 3, 40, 24, 2, 2, 3, rope(kHalf, kReversed),
     kF32, kPaged, 19, 7},
    {"Len17_H2_D96_Rq6_Rk3_Rv2_Interleaved_Contiguous", 32, 2, 96, 96, 6, 3, 2,
     rope(kInterleaved, kStandard), kF32, kContiguous, 17, 5},
    {"Len33_H4_D128_Rq1_Rk2_Rv2_Rotary64Reversed_Paged", 32, 4, 128, 128, 1, 2, 2,
     rope(kHalf, kReversed, 64), kF32, kPaged, 33, 16},
    {"Len9_H5_D128_Dv40_Rq16_Rk1_Rv3_InterleavedReversed_Contiguous", 24, 5, 128, 40, 16, 1, 3,
     rope(kInterleaved, kReversed), kF32, kContiguous, 9, 4},
    {"Bf16_Len2_H1_D129_Dv8_Rq16_Rk1_Rv3_NoRope_Contiguous", 16, 1, 129, 8, 16, 1, 3, no_rope(),
     kBf16, kContiguous, 2, 1},
    {"Bf16_Len17_H3_D64_Rq6_Rk2_Rv3_Reversed_Paged", 32, 3, 64, 64, 6, 2, 3, rope(kHalf, kReversed),
     kBf16, kPaged, 17, 16},
    {"Bf16_Len113_H17_D8_Rq2_Rk1_Rv2_Interleaved_Contiguous", 24, 17, 8, 8, 2, 1, 2,
     rope(kInterleaved, kStandard), kBf16, kContiguous, 113, 17},
    {"F16_Len16_H3_D129_Dv8_Rq16_Rk3_Rv1_Rotary64Interleaved_Paged", 24, 3, 129, 8, 16, 3, 1,
     rope(kInterleaved, kStandard, 64), kF16, kPaged, 16, 15},
    {"F16_Len15_H17_D64_Dv32_Rq6_Rk3_Rv1_Interleaved_Paged", 32, 17, 64, 32, 6, 3, 1,
     rope(kInterleaved, kStandard), kF16, kPaged, 15, 4},
    {"F16_Len113_H1_D64_Rq1_Rk2_Rv3_Reversed_Paged", 16, 1, 64, 64, 1, 2, 3, rope(kHalf, kReversed),
     kF16, kPaged, 113, 17},
    {"Bf16_Len18_H2_D128_Rq2_Rk2_Rv2_Reversed_Paged", 24, 2, 128, 128, 2, 2, 2,
     rope(kHalf, kReversed), kBf16, kPaged, 18, 5},
    {"F16_Len17_H3_D96_Dv40_Rq6_Rk2_Rv1_Interleaved_Contiguous", 24, 3, 96, 40, 6, 2, 1,
     rope(kInterleaved, kStandard), kF16, kContiguous, 17, 16},
    {"F16_Len12_H2_D40_Rq16_Rk3_Rv2_Rotary16Reversed_Paged", 16, 2, 40, 40, 16, 3, 2,
     rope(kHalf, kReversed, 16), kF16, kPaged, 12, 5},
    // The paper's decode shapes (32 heads): the scores with the query side in SIMD lanes (R_Q 16
    // or 8 in the factor order, 32 heads in the query order), over more than one widened chunk of
    // B_K rows and more than one tile.
    {"Bf16_Len150_H32_D128_Rq16_Rk1_Rv1_Contiguous", 64, 32, 128, 128, 16, 1, 1,
     rope(kHalf, kStandard), kBf16, kContiguous, 150, 70},
    {"Len140_H32_D64_Rq8_Rk2_Rv2_Reversed_Paged", 48, 32, 64, 64, 8, 2, 2, rope(kHalf, kReversed),
     kF32, kPaged, 140, 33},
};

const std::vector<LayerCase> kKvOnlyCases = {
    {"Len1_H1_D8_Rk1_Rv1_Contiguous", 16, 1, 8, 8, 0, 1, 1, rope(kHalf, kStandard), kF32,
     kContiguous, 1, 1},
    {"Len17_H17_D64_Dv32_Rk2_Rv3_Reversed_Paged", 40, 17, 64, 32, 0, 2, 3, rope(kHalf, kReversed),
     kF32, kPaged, 17, 5},
    {"Len113_H3_D129_Rk3_Rv1_Rotary128_Contiguous", 48, 3, 129, 129, 0, 3, 1,
     rope(kHalf, kStandard, 128), kF32, kContiguous, 113, 17},
    {"Bf16_Len15_H3_D64_Rk1_Rv2_Interleaved_Paged", 32, 3, 64, 64, 0, 1, 2,
     rope(kInterleaved, kStandard), kBf16, kPaged, 15, 4},
    {"F16_Len113_H17_D8_Rk2_Rv1_InterleavedReversed_Paged", 24, 17, 8, 8, 0, 2, 1,
     rope(kInterleaved, kReversed), kF16, kPaged, 113, 16},
    {"Len17_H3_D40_Rk2_Rv2_Interleaved_Paged", 24, 3, 40, 40, 0, 2, 2,
     rope(kInterleaved, kStandard), kF32, kPaged, 17, 16},
    {"Bf16_Len16_H2_D96_Dv32_Rk1_Rv2_Reversed_Contiguous", 24, 2, 96, 32, 0, 1, 2,
     rope(kHalf, kReversed), kBf16, kContiguous, 16, 5},
    {"Len20_H4_D128_Rk3_Rv1_Reversed_Paged", 32, 4, 128, 128, 0, 3, 1, rope(kHalf, kReversed), kF32,
     kPaged, 20, 7},
    {"Len260_H2_D32_Rk2_Rv2_Contiguous", 16, 2, 32, 32, 0, 2, 2, rope(kHalf, kStandard), kF32,
     kContiguous, 260, 100},
};

class TpaLayer : public ::testing::TestWithParam<LayerCase> {};

TEST_P(TpaLayer, DecodePrefillAndChunkedPrefillEqualMaterialisedAttention) {
  const LayerCase& c = GetParam();
  const TpaConfig config = c.config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 1000);
  const RowMatrix x = random_inputs(c.length, c.d_model, 2000);
  tpattn_test::TpaReferenceOptions options;
  options.cache_storage = c.storage;
  const tpattn_test::TpaReference ref =
      tpattn_test::tpa_layer_reference(config, weights, x.cast<double>(), options);
  // bf16 / f16: also the reference that keeps the cached factors exact.
  const Eigen::MatrixXd exact =
      c.storage == kF32 ? ref.y
                        : tpattn_test::tpa_layer_reference(config, weights, x.cast<double>()).y;

  with_storage(c.storage, [&](auto tag) {
    using Storage = decltype(tag);
    with_layer<Storage>(config, weights, [&](TensorProductAttention<Storage>& op) {
      for (Feed feed : kAllFeeds) {
        const std::unique_ptr<KvCache> cache = make_cache(op.cache_record(), c.cache, 1, c.length);
        const SequenceId seq = cache->add_sequence();
        const RowMatrix y = run_layer(op, *cache, seq, x, feed, c.chunk);
        EXPECT_LE(relative_error(y, ref.y), tolerance(c.storage)) << name_of(feed);
        EXPECT_LE(relative_error(y, exact), exact_reference_tolerance(c.storage))
            << name_of(feed) << ", against the reference with exact cached factors";
        EXPECT_EQ(cache->length(seq), c.length) << name_of(feed);
      }
    });
  });
}

// §3 and §6.9 on the same shapes, after a chunked prefill of the whole sequence:
//  - the record holds R_K (h + d_h) + R_V (h + d_v) elements a token, bytes_used that times the
//    token count;
//  - the planes hold, for every token t, the reference's own factors: A_K and A_V rank-major
//    (R x h, row r = rank r of every head, although the weights are head-major), B_K rotated at
//    position t, B_V unrotated, none of them scaled by 1/R (the kernel applies 1/R_K to the scores
//    and 1/R_V to the output). Float storage within kCachedFactorSlack of each plane's scale,
//    bf16 / f16 within the rounding to nearest of the exact entry (u |entry|) plus that slack.
TEST_P(TpaLayer, CacheHoldsEveryTokensRankMajorAAndRotatedBKUnrotatedBV) {
  const LayerCase& c = GetParam();
  const TpaConfig config = c.config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 1000);
  const RowMatrix x = random_inputs(c.length, c.d_model, 2000);
  const tpattn_test::TpaReference ref =
      tpattn_test::tpa_layer_reference(config, weights, x.cast<double>());
  with_storage(c.storage, [&](auto tag) {
    using Storage = decltype(tag);
    with_layer<Storage>(config, weights, [&](TensorProductAttention<Storage>& op) {
      const Index h = c.heads, dh = c.head_dim, dv = c.value_dim;
      const Index elements = c.rank_k * (h + dh) + c.rank_v * (h + dv);
      EXPECT_EQ(op.cache_record().elements_per_token(), elements);
      EXPECT_EQ(op.cache_record().bytes_per_token(),
                elements * static_cast<Index>(sizeof(Storage)));
      const std::unique_ptr<KvCache> cache = make_cache(op.cache_record(), c.cache, 1, c.length);
      const SequenceId seq = cache->add_sequence();
      run_layer(op, *cache, seq, x, Feed::chunked, c.chunk);
      EXPECT_EQ(cache->bytes_used(), c.length * elements * static_cast<Index>(sizeof(Storage)));

      const SequenceView view = cache->view(seq);
      ASSERT_EQ(view.length(), c.length);
      ASSERT_EQ(view.record().plane_count(), 4);
      const double u = c.storage == kF32 ? 0.0 : tpattn_test::unit_roundoff(c.storage);
      const Tensor3* expected[] = {&ref.factors.a_k, &ref.factors.b_k, &ref.factors.a_v,
                                   &ref.factors.b_v};
      const char* names[] = {"A_K", "B_K (rotated)", "A_V", "B_V"};
      for (Index p = 0; p < 4; ++p) {
        const Tensor3& want = *expected[p];
        const Tensor3 cached = read_plane(view, p);
        ASSERT_EQ(cached.heads, want.heads) << names[p] << ": rows (the rank)";
        ASSERT_EQ(cached.width, want.width) << names[p] << ": columns";
        const double slack = kCachedFactorSlack * tpattn_test::max_abs(want);
        double worst_excess = -1.0;  // max over entries of |cached - want| - u |want|
        Index worst = 0;
        for (Index n = 0; n < want.size(); ++n) {
          const double w = want.data[static_cast<std::size_t>(n)];
          const double excess =
              std::abs(cached.data[static_cast<std::size_t>(n)] - w) - u * std::abs(w);
          if (excess > worst_excess) {
            worst_excess = excess;
            worst = n;
          }
        }
        const Index per_token = want.heads * want.width;
        EXPECT_LE(worst_excess, slack)
            << names[p] << " of token " << worst / per_token << ", rank "
            << worst % per_token / want.width << ", column " << worst % want.width << ": cached "
            << cached.data[static_cast<std::size_t>(worst)] << ", reference "
            << want.data[static_cast<std::size_t>(worst)];
      }
    });
  });
}

INSTANTIATE_TEST_SUITE_P(Tpa, TpaLayer, ::testing::ValuesIn(kTpaCases), case_name);
INSTANTIATE_TEST_SUITE_P(TpaKvOnly, TpaLayer, ::testing::ValuesIn(kKvOnlyCases), case_name);

// ---- contraction orders -------------------------------------------------------------------------

class TpaOrders : public ::testing::TestWithParam<LayerCase> {};

TEST_P(TpaOrders, FactorAndQueryOrdersGiveTheSameOutputs) {
  const LayerCase& c = GetParam();
  TpaConfig config = c.config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 1000);
  const RowMatrix x = random_inputs(c.length, c.d_model, 2000);
  with_storage(c.storage, [&](auto tag) {
    using Storage = decltype(tag);
    config.order = TpaOrder::factor;
    TensorProductAttention<Storage> factor(config, weights);
    config.order = TpaOrder::query;
    TensorProductAttention<Storage> query(config, weights);
    EXPECT_EQ(factor.order(), TpaOrder::factor);
    EXPECT_EQ(query.order(), TpaOrder::query);
    for (Feed feed : {Feed::decode, Feed::chunked}) {
      const std::unique_ptr<KvCache> cache =
          make_cache(factor.cache_record(), c.cache, 2, c.length);
      const SequenceId a = cache->add_sequence(), b = cache->add_sequence();
      const RowMatrix y_factor = run_layer(factor, *cache, a, x, feed, c.chunk);
      const RowMatrix y_query = run_layer(query, *cache, b, x, feed, c.chunk);
      EXPECT_LE(relative_difference(y_factor, y_query), kAgreementTolerance) << name_of(feed);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Tpa, TpaOrders, ::testing::ValuesIn(kTpaCases), case_name);

TpaConfig small_config(Index heads, Index head_dim, Index rank_q, Index rank_k = 2,
                       Index rank_v = 2) {
  TpaConfig config;
  config.d_model = 8;
  config.heads = heads;
  config.head_dim = head_dim;
  config.rank_q = rank_q;
  config.rank_k = rank_k;
  config.rank_v = rank_v;
  return config;
}

// The factor order costs R_Q (h + d_h) per cached token and rank, the query order h d_h: the
// factor order is picked while R_Q <= h d_h / (h + d_h) (ties go to the factor order).
TEST(Tpa, AutomaticOrderIsTheCheaperOneOnEachSideOfTheCrossover) {
  struct Expect {
    Index heads, head_dim, rank_q;
    TpaOrder order;
  };
  const Expect expectations[] = {
      {4, 8, 2, TpaOrder::factor},  // crossover 32 / 12 = 2.67
      {4, 8, 3, TpaOrder::query},
      {2, 2, 1, TpaOrder::factor},  // crossover exactly 1: a tie
      {2, 2, 2, TpaOrder::query},
      {32, 128, 25, TpaOrder::factor},  // crossover 4096 / 160 = 25.6
      {32, 128, 26, TpaOrder::query},
      {34, 64, 6, TpaOrder::factor},  // the paper's small model: crossover 22.2
      {17, 64, 16, TpaOrder::query},  // crossover 13.4
      {1, 129, 1, TpaOrder::query},   // crossover 0.99: R_Q = 1 already too many
  };
  for (const Expect& e : expectations) {
    TpaConfig config = small_config(e.heads, e.head_dim, e.rank_q);
    config.rope.enabled = false;  // d_h 129 has no whole-head RoPE
    const TpaShape shape{e.heads, e.head_dim, e.head_dim, e.rank_q, 2, 2};
    EXPECT_EQ(tpattn::cheaper_tpa_order(shape), e.order)
        << "h " << e.heads << " d_h " << e.head_dim << " R_Q " << e.rank_q;
    const TensorProductAttention<float> op(config, tpattn_test::random_tpa_weights(config, 1));
    EXPECT_EQ(op.order(), e.order)
        << "h " << e.heads << " d_h " << e.head_dim << " R_Q " << e.rank_q;
  }
  // TPA-KVonly has no query factors: always the query order.
  TpaConfig kv_only = small_config(4, 8, 0);
  EXPECT_EQ(tpattn::cheaper_tpa_order(TpaShape{4, 8, 8, 0, 2, 2}), TpaOrder::query);
  EXPECT_EQ(
      TensorProductAttentionKvOnly<float>(kv_only, tpattn_test::random_tpa_weights(kv_only, 1))
          .order(),
      TpaOrder::query);
}

// ---- §6 hand-checked cases through the bare kernel ----------------------------------------------

struct HandCase {
  Index rank;
  std::vector<float> a_q, b_q;            // [R, h], [R, d_h]
  std::vector<float> a_k, b_k, a_v, b_v;  // two tokens, [2, R, 2] each
  std::vector<float> expected;            // [h, d_v]
};

void expect_hand_case(const HandCase& c) {
  const TpaShape shape{2, 2, 2, c.rank, c.rank, c.rank};
  const TpaKernel<float> kernel(shape);
  ContiguousKvCache cache(kernel.cache_record(), 1, 2);
  const SequenceId seq = cache.add_sequence();
  cache.append(seq, 2,
               {{c.a_k.data(), c.rank, 2},
                {c.b_k.data(), c.rank, 2},
                {c.a_v.data(), c.rank, 2},
                {c.b_v.data(), c.rank, 2}});
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query, TpaOrder::automatic}) {
    std::vector<float> out(4, std::nanf(""));
    kernel.attend(c.a_q.data(), c.b_q.data(), 1, cache.view(seq), out.data(), nullptr,
                  workspace.data(), order);
    for (std::size_t n = 0; n < 4; ++n)
      EXPECT_NEAR(out[n], c.expected[n], 1e-6)
          << "order " << static_cast<int>(order) << ", head " << n / 2 << ", feature " << n % 2;
  }
}

TEST(TpaKernel, RankOneHandCheckedCaseGivesTheSpecOutput) {
  HandCase c;
  c.rank = 1;
  c.a_q = {1, 2};
  c.b_q = {1, 0};
  c.a_k = {1, 1, /**/ 2, -1};
  c.b_k = {1, 1, /**/ 0, 1};
  c.a_v = {1, 0, /**/ 1, 1};
  c.b_v = {2, 4, /**/ 1, -1};
  c.expected = {1.669762f, 2.348808f, 0.195570f, -0.195570f};
  expect_hand_case(c);
}

TEST(TpaKernel, RankTwoHandCheckedCaseGivesTheSpecOutput) {
  HandCase c;
  c.rank = 2;
  c.a_q = {1, 0, 0, 1};
  c.b_q = {1, 0, 0, 1};
  c.a_k = {1, 1, 1, -1, /**/ 2, 0, 0, 2};
  c.b_k = {1, 0, 0, 1, /**/ 1, 1, 1, -1};
  c.a_v = {1, 0, 0, 1, /**/ 1, 1, 0, 0};
  c.b_v = {1, 2, 3, 4, /**/ 2, 0, 0, 2};
  c.expected = {0.772040f, 0.455921f, 1.272040f, 1.088159f};
  expect_hand_case(c);
}

// ---- bare-kernel fixtures: random factors, rotated by the test ----------------------------------

// Factors of M cached tokens and one query token, fp32, B_K and B_Q not yet rotated.
struct KernelFactors {
  TpaShape shape;
  Index tokens;
  std::vector<float> a_q, b_q;            // [1, R_Q, h], [1, R_Q, d_h]
  std::vector<float> a_k, b_k, a_v, b_v;  // [M, R, ...]
};

KernelFactors random_factors(const TpaShape& shape, Index tokens, std::uint32_t seed) {
  tpattn_test::Random random(seed);
  const Index h = shape.heads, dh = shape.head_dim, dv = shape.value_dim;
  auto a_std = [](Index rank) { return std::sqrt(static_cast<double>(rank)); };
  KernelFactors f{shape, tokens, {}, {}, {}, {}, {}, {}};
  f.a_q = random.floats(shape.rank_q * h, a_std(shape.rank_q));
  f.b_q = random.floats(shape.rank_q * dh);
  f.a_k = random.floats(tokens * shape.rank_k * h, a_std(shape.rank_k));
  f.b_k = random.floats(tokens * shape.rank_k * dh);
  f.a_v = random.floats(tokens * shape.rank_v * h, a_std(shape.rank_v));
  f.b_v = random.floats(tokens * shape.rank_v * dv);
  return f;
}

// Rows of `rows` x width vectors, token t rotated at first_position + t (with the library's Rope:
// the engine-facing kernel takes rotated factors).
std::vector<float> rotated(std::vector<float> values, Index rows_per_token, Index width,
                           Index first_position, const tpattn::Rope& rope) {
  const Index tokens = static_cast<Index>(values.size()) / (rows_per_token * width);
  for (Index t = 0; t < tokens; ++t)
    rope.apply(values.data() + t * rows_per_token * width, rows_per_token, width,
               first_position + t);
  return values;
}

// Appends tokens [first, first + count) of f to seq, B_K rotated at position_offset + s.
void append_tokens(KvCache& cache, SequenceId seq, const KernelFactors& f, Index first, Index count,
                   const tpattn::Rope& rope, Index position_offset) {
  const TpaShape& s = f.shape;
  const Index h = s.heads, dh = s.head_dim, dv = s.value_dim;
  const std::vector<float> b_k(f.b_k.begin() + first * s.rank_k * dh,
                               f.b_k.begin() + (first + count) * s.rank_k * dh);
  const std::vector<float> b_k_rotated = rotated(b_k, s.rank_k, dh, position_offset + first, rope);
  cache.append(seq, count,
               {{f.a_k.data() + first * s.rank_k * h, s.rank_k, h},
                {b_k_rotated.data(), s.rank_k, dh},
                {f.a_v.data() + first * s.rank_v * h, s.rank_v, h},
                {f.b_v.data() + first * s.rank_v * dv, s.rank_v, dv}});
}

struct KernelResult {
  std::vector<float> out;  // [h, d_v]
  std::vector<float> lse;  // [h]
};

// One query token at position query_position against everything in `view`.
KernelResult attend_one(const TpaKernel<float>& kernel, const KernelFactors& f,
                        const SequenceView& view, Index query_position, const tpattn::Rope& rope,
                        TpaOrder order) {
  const TpaShape& s = f.shape;
  const std::vector<float> b_q = rotated(f.b_q, s.rank_q, s.head_dim, query_position, rope);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  KernelResult r{std::vector<float>(static_cast<std::size_t>(s.heads * s.value_dim)),
                 std::vector<float>(static_cast<std::size_t>(s.heads))};
  kernel.attend(f.a_q.data(), b_q.data(), 1, view, r.out.data(), r.lse.data(), workspace.data(),
                order);
  return r;
}

// The double reference of attend_one over tokens [0, M), the query at position M - 1.
tpattn_test::AttentionResult reference_one(const KernelFactors& f, const RopeConfig& rope) {
  const TpaShape& s = f.shape;
  const Index h = s.heads, dh = s.head_dim, dv = s.value_dim, m = f.tokens;
  Tensor3 a_q = Tensor3::from_floats(f.a_q.data(), 1, s.rank_q, h);
  Tensor3 b_q = Tensor3::from_floats(f.b_q.data(), 1, s.rank_q, dh);
  Tensor3 a_k = Tensor3::from_floats(f.a_k.data(), m, s.rank_k, h);
  Tensor3 b_k = Tensor3::from_floats(f.b_k.data(), m, s.rank_k, dh);
  Tensor3 a_v = Tensor3::from_floats(f.a_v.data(), m, s.rank_v, h);
  Tensor3 b_v = Tensor3::from_floats(f.b_v.data(), m, s.rank_v, dv);
  tpattn_test::rotate_rows(b_q, m - 1, rope);
  tpattn_test::rotate_rows(b_k, 0, rope);
  return tpattn_test::attention_reference(
      tpattn_test::materialise(a_q, b_q), tpattn_test::materialise(a_k, b_k),
      tpattn_test::materialise(a_v, b_v), 1.0 / std::sqrt(static_cast<double>(dh)));
}

double max_lse_difference(const std::vector<float>& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
  return worst;
}

// §6.1 "any block size": the bare kernel over caches with pages of 1, 3, 31, 32 and 33 tokens
// (around the kernel's 32-token tile) and a contiguous cache gives the reference's output and LSE.
TEST(TpaKernel, FactorDecodeEqualsMaterialisedAttentionForAnyPageSize) {
  const TpaShape shape{3, 16, 10, 4, 2, 3};
  const Index m = 77;
  const KernelFactors f = random_factors(shape, m, 7);
  const RopeConfig config = rope(kHalf, kReversed);
  const tpattn::Rope rotation(config, shape.head_dim);
  const tpattn_test::AttentionResult ref = reference_one(f, config);
  const TpaKernel<float> kernel(shape);
  for (Index page : {0, 1, 3, 31, 32, 33}) {  // 0: contiguous
    const std::unique_ptr<KvCache> cache =
        make_cache(kernel.cache_record(), page == 0 ? kContiguous : kPaged, 1, m, page);
    const SequenceId seq = cache->add_sequence();
    append_tokens(*cache, seq, f, 0, m, rotation, 0);
    for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
      const KernelResult r = attend_one(kernel, f, cache->view(seq), m - 1, rotation, order);
      EXPECT_LE(relative_error(r.out.data(), ref.out.data.data(), ref.out.size()), kFloatTolerance)
          << "page " << page << " order " << static_cast<int>(order);
      EXPECT_LE(max_lse_difference(r.lse, ref.lse), 1e-5) << "page " << page;
    }
  }
}

// ---- §6.7: split the keys, merge the partial (output, LSE) pairs -------------------------------

TEST(TpaKernel, MergingPartialResultsOverSplitKeysEqualsOnePass) {
  const TpaShape shape{3, 16, 10, 2, 2, 3};
  const Index m = 77, h = shape.heads, dv = shape.value_dim;
  const KernelFactors f = random_factors(shape, m, 8);
  const RopeConfig config = rope(kHalf, kStandard);
  const tpattn::Rope rotation(config, shape.head_dim);
  const TpaKernel<float> kernel(shape);
  const tpattn_test::AttentionResult ref = reference_one(f, config);

  const std::unique_ptr<KvCache> cache = make_cache(kernel.cache_record(), kPaged, 3, m);
  const SequenceId whole = cache->add_sequence();
  append_tokens(*cache, whole, f, 0, m, rotation, 0);
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
    const KernelResult one_pass = attend_one(kernel, f, cache->view(whole), m - 1, rotation, order);
    EXPECT_LE(relative_error(one_pass.out.data(), ref.out.data.data(), ref.out.size()),
              kFloatTolerance);
    EXPECT_LE(max_lse_difference(one_pass.lse, ref.lse), 1e-5);

    // Three parts: a prefix view of the whole sequence, then two caches holding the rest (their
    // B_K rotated at the tokens' true positions).
    for (const auto& [cut1, cut2] :
         std::vector<std::pair<Index, Index>>{{1, 2}, {16, 33}, {32, 64}, {40, 76}}) {
      KernelResult merged =
          attend_one(kernel, f, cache->view(whole).prefix(cut1), m - 1, rotation, order);
      for (const auto& [first, last] : {std::pair{cut1, cut2}, std::pair{cut2, m}}) {
        const SequenceId part = cache->add_sequence();
        append_tokens(*cache, part, f, first, last - first, rotation, 0);
        const KernelResult partial =
            attend_one(kernel, f, cache->view(part), m - 1, rotation, order);
        for (Index i = 0; i < h; ++i)
          tpattn::merge_partial(merged.out.data() + i * dv, merged.lse.data() + i,
                                partial.out.data() + i * dv, partial.lse[i], dv);
        cache->remove_sequence(part);
      }
      EXPECT_LE(relative_difference(merged.out, one_pass.out), kAgreementTolerance)
          << "cuts " << cut1 << ", " << cut2;
      EXPECT_LE(relative_difference(merged.lse, one_pass.lse), 5e-6)
          << "cuts " << cut1 << ", " << cut2;
    }

    // As many parts as keys: every key alone.
    KernelResult merged =
        attend_one(kernel, f, cache->view(whole).prefix(1), m - 1, rotation, order);
    const SequenceId single = cache->add_sequence();
    for (Index s = 1; s < m; ++s) {
      cache->truncate(single, 0);
      append_tokens(*cache, single, f, s, 1, rotation, 0);
      const KernelResult partial =
          attend_one(kernel, f, cache->view(single), m - 1, rotation, order);
      for (Index i = 0; i < h; ++i)
        tpattn::merge_partial(merged.out.data() + i * dv, merged.lse.data() + i,
                              partial.out.data() + i * dv, partial.lse[i], dv);
    }
    cache->remove_sequence(single);
    EXPECT_LE(relative_difference(merged.out, one_pass.out), kAgreementTolerance);
    EXPECT_LE(relative_difference(merged.lse, one_pass.lse), 5e-6);
  }
}

// ---- §6.5: RoPE ---------------------------------------------------------------------------------

// Scores depend on position differences only: rotating every B_K and B_Q by positions shifted by
// one constant leaves outputs and LSEs unchanged.
TEST(TpaKernel, AddingOneOffsetToEveryPositionLeavesOutputsUnchanged) {
  const TpaShape shape{3, 16, 8, 2, 3, 2};
  const Index m = 40;
  const KernelFactors f = random_factors(shape, m, 9);
  const TpaKernel<float> kernel(shape);
  for (const RopeConfig& config : {rope(kHalf, kStandard), rope(kHalf, kReversed),
                                   rope(kInterleaved, kStandard), rope(kHalf, kReversed, 8)}) {
    const tpattn::Rope rotation(config, shape.head_dim);
    ContiguousKvCache cache(kernel.cache_record(), 2, m);
    const SequenceId base = cache.add_sequence(), shifted = cache.add_sequence();
    append_tokens(cache, base, f, 0, m, rotation, 0);
    const KernelResult expected =
        attend_one(kernel, f, cache.view(base), m - 1, rotation, TpaOrder::automatic);
    for (Index offset : {1, 17, 1000, 12345}) {
      cache.truncate(shifted, 0);
      append_tokens(cache, shifted, f, 0, m, rotation, offset);
      const KernelResult r =
          attend_one(kernel, f, cache.view(shifted), m - 1 + offset, rotation, TpaOrder::automatic);
      EXPECT_LE(relative_difference(r.out, expected.out), kAgreementTolerance)
          << "offset " << offset;
      EXPECT_LE(relative_difference(r.lse, expected.lse), kAgreementTolerance)
          << "offset " << offset;
    }
    // Not vacuous: shifting only the keys changes the scores.
    cache.truncate(shifted, 0);
    append_tokens(cache, shifted, f, 0, m, rotation, 5);
    const KernelResult moved =
        attend_one(kernel, f, cache.view(shifted), m - 1, rotation, TpaOrder::automatic);
    EXPECT_GT(relative_difference(moved.out, expected.out), 1e-2);
  }
}

// RoPE is linear on the feature axis, so rotating the rows of B_K (and B_Q) before
// materialising equals rotating the materialised K (and Q) heads; the library, which rotates
// B_K at write time, matches both.
TEST(Tpa, RotatingBKAtWriteTimeEqualsRotatingKAtReadTime) {
  const LayerCase c = kTpaCases[4];  // h 17, d_h 64, rotary 32 of 64
  for (const RopeConfig& config : {c.rope, rope(kInterleaved, kReversed)}) {
    TpaConfig tpa = c.config();
    tpa.rope = config;
    const TpaWeights weights = tpattn_test::random_tpa_weights(tpa, 1000);
    const RowMatrix x = random_inputs(c.length, c.d_model, 2000);
    tpattn_test::TpaReferenceOptions at_write, at_read;
    at_read.rotate_after_materialising = true;
    const tpattn_test::TpaReference write =
        tpattn_test::tpa_layer_reference(tpa, weights, x.cast<double>(), at_write);
    const tpattn_test::TpaReference read =
        tpattn_test::tpa_layer_reference(tpa, weights, x.cast<double>(), at_read);
    EXPECT_LE(tpattn_test::max_abs_error(write.k.data.data(), read.k.data.data(), read.k.size()),
              1e-12 * tpattn_test::max_abs(read.k));
    EXPECT_LE(tpattn_test::max_abs_error(write.y.data(), read.y.data(), read.y.size()),
              1e-12 * tpattn_test::max_abs(read.y.data(), read.y.size()));

    TensorProductAttention<float> op(tpa, weights);
    ContiguousKvCache cache(op.cache_record(), 1, c.length);
    const SequenceId seq = cache.add_sequence();
    EXPECT_LE(relative_error(run_layer(op, cache, seq, x, Feed::chunked, c.chunk), read.y),
              kFloatTolerance);
  }
}

// ---- §6.6: gauge freedom -----------------------------------------------------------------------

// Multiplies A row r (of every head) by c and B row r by 1/c, through the weights.
void rescale_rank(RowMatrix& w_a, RowMatrix& w_b, Index heads, Index rank, Index width, Index r,
                  float c) {
  for (Index i = 0; i < heads; ++i) w_a.row(i * rank + r) *= c;  // head-major
  w_b.middleRows(r * width, width) /= c;                         // rank-major
}

enum class Factor { query, key, value };

void expect_gauge_invariance(Factor factor) {
  const LayerCase c = kTpaCases[2];  // h 3, d_h 64, R_Q 6, R_K 1, R_V 3
  TpaConfig config = c.config();
  config.rank_k = 2;  // two key ranks, so one can be rescaled against the other
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 1000);
  const RowMatrix x = random_inputs(c.length, c.d_model, 2000);
  TpaWeights rescaled = weights, one_sided = weights;
  const Index h = config.heads, r = 1;
  const float gauge = 3.0f;
  switch (factor) {
    case Factor::query:
      rescale_rank(rescaled.w_a_q, rescaled.w_b_q, h, config.rank_q, config.head_dim, r, gauge);
      one_sided.w_a_q *= gauge;
      break;
    case Factor::key:
      rescale_rank(rescaled.w_a_k, rescaled.w_b_k, h, config.rank_k, config.head_dim, r, gauge);
      one_sided.w_a_k *= gauge;
      break;
    case Factor::value:
      rescale_rank(rescaled.w_a_v, rescaled.w_b_v, h, config.rank_v, config.value_dim, r, gauge);
      one_sided.w_a_v *= gauge;
      break;
  }
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
    config.order = order;
    std::vector<RowMatrix> outputs;
    for (const TpaWeights* w : {&weights, static_cast<const TpaWeights*>(&rescaled),
                                static_cast<const TpaWeights*>(&one_sided)}) {
      TensorProductAttention<float> op(config, *w);
      ContiguousKvCache cache(op.cache_record(), 1, c.length);
      const SequenceId seq = cache.add_sequence();
      outputs.push_back(run_layer(op, cache, seq, x, Feed::prefill_then_decode, c.chunk));
    }
    EXPECT_LE(relative_difference(outputs[1], outputs[0]), kAgreementTolerance);
    EXPECT_GT(relative_difference(outputs[2], outputs[0]), 1e-2) << "the rescaling is a no-op";
  }
}

TEST(Tpa, ScalingAKRowByCAndBKRowByOneOverCLeavesOutputUnchanged) {
  expect_gauge_invariance(Factor::key);
}
TEST(Tpa, ScalingAVRowByCAndBVRowByOneOverCLeavesOutputUnchanged) {
  expect_gauge_invariance(Factor::value);
}
TEST(Tpa, ScalingAQRowByCAndBQRowByOneOverCLeavesOutputUnchanged) {
  expect_gauge_invariance(Factor::query);
}

// ---- §3: the T6 weight layout ------------------------------------------------------------------

TpaConfig layout_config() {
  TpaConfig config;
  config.d_model = 12;
  config.heads = 3;
  config.head_dim = 8;
  config.value_dim = 4;
  config.rank_q = 2;
  config.rank_k = 2;
  config.rank_v = 2;
  config.rope = rope(kHalf, kReversed);
  return config;
}

// Head-major A: row i R + r is head i, rank r. With only row 1 of W_AV non-zero (head 0, rank 1;
// a rank-major reading would make it head 1), only head 0 has non-zero values, so with W_O = I
// only head 0's output is non-zero.
TEST(Tpa, ARowIRPlusRBelongsToHeadIRankR) {
  TpaConfig config = layout_config();
  TpaWeights weights = tpattn_test::random_tpa_weights(config, 5);
  const Index h = config.heads, dv = config.value_dim;
  weights.w_o = RowMatrix::Identity(config.d_model, h * dv);  // d_model = h d_v: y = o
  const RowMatrix row = weights.w_a_v.row(1);
  weights.w_a_v.setZero();
  weights.w_a_v.row(1) = row;
  const RowMatrix x = random_inputs(9, config.d_model, 6);
  TensorProductAttention<float> op(config, weights);
  ContiguousKvCache cache(op.cache_record(), 1, 9);
  const SequenceId seq = cache.add_sequence();
  const RowMatrix y = run_layer(op, cache, seq, x, Feed::prefill_then_decode, 1);
  EXPECT_GT(y.leftCols(dv).cwiseAbs().maxCoeff(), 1e-2f) << "head 0";
  EXPECT_EQ(y.rightCols((h - 1) * dv).cwiseAbs().maxCoeff(), 0.0f) << "heads 1 and 2";
}

// Rank-major B: row r d + j is rank r, feature j. With only row 1 d_v + 2 of W_BV non-zero,
// every head's output is non-zero in feature 2 only.
TEST(Tpa, BRowRDPlusJBelongsToRankRFeatureJ) {
  TpaConfig config = layout_config();
  TpaWeights weights = tpattn_test::random_tpa_weights(config, 5);
  const Index h = config.heads, dv = config.value_dim;
  weights.w_o = RowMatrix::Identity(config.d_model, h * dv);
  const RowMatrix row = weights.w_b_v.row(1 * dv + 2);
  weights.w_b_v.setZero();
  weights.w_b_v.row(1 * dv + 2) = row;
  const RowMatrix x = random_inputs(9, config.d_model, 6);
  TensorProductAttention<float> op(config, weights);
  ContiguousKvCache cache(op.cache_record(), 1, 9);
  const SequenceId seq = cache.add_sequence();
  const RowMatrix y = run_layer(op, cache, seq, x, Feed::prefill_then_decode, 1);
  for (Index i = 0; i < h; ++i)
    for (Index j = 0; j < dv; ++j) {
      const float largest = y.col(i * dv + j).cwiseAbs().maxCoeff();
      if (j == 2)
        EXPECT_GT(largest, 1e-2f) << "head " << i << " feature " << j;
      else
        EXPECT_EQ(largest, 0.0f) << "head " << i << " feature " << j;
    }
}

// With every weight random, the layer matches the reference that reads A head-major and is far
// from one that reads it rank-major: the layout is honoured for A_Q, A_K and A_V together.
TEST(Tpa, LayerMatchesHeadMajorReadingOfANotRankMajor) {
  const TpaConfig config = layout_config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 5);
  const RowMatrix x = random_inputs(9, config.d_model, 6);
  tpattn_test::TpaReferenceOptions head_major, rank_major;
  rank_major.a_layout = tpattn_test::FactorLayout::rank_major;
  TensorProductAttention<float> op(config, weights);
  ContiguousKvCache cache(op.cache_record(), 1, 9);
  const SequenceId seq = cache.add_sequence();
  const RowMatrix y = run_layer(op, cache, seq, x, Feed::prefill, 1);
  EXPECT_LE(
      relative_error(
          y, tpattn_test::tpa_layer_reference(config, weights, x.cast<double>(), head_major).y),
      kFloatTolerance);
  EXPECT_GT(
      relative_error(
          y, tpattn_test::tpa_layer_reference(config, weights, x.cast<double>(), rank_major).y),
      0.1);
}

// ---- §6.2: TPA as MHA, MQA, GQA ----------------------------------------------------------------

// TPA weights that make the TPA layer compute exactly the GQA layer with weights `gqa`, for
// inputs whose last feature is 1 (A factors must be constant, and the maps have no bias):
//   query: R_Q = h, A_Q = h I (row i h + i of W_AQ picks the constant feature, times h),
//          B_Q row r = q of head r (W_BQ = W_Q), so Q_i = (1/h) h q_i = q_i;
//   keys/values: R = g, A = g (group mask): A[r][i] = g if head i reads KV head r, else 0;
//          B row r = k (v) of KV head r, so K_i = (1/g) g k_{g(i)}.
// MHA (g = h) gets A = h I; MQA (g = 1) gets A = all ones.
TpaWeights tpa_weights_from_gqa(const tpattn::GqaConfig& gqa, const tpattn::GqaWeights& w) {
  const Index d = gqa.d_model, h = gqa.heads, g = gqa.kv_heads, group = h / g;
  const Index constant = d - 1;
  TpaWeights t;
  t.w_a_q = RowMatrix::Zero(h * h, d);
  for (Index i = 0; i < h; ++i) t.w_a_q(i * h + i, constant) = static_cast<float>(h);
  t.w_b_q = w.w_q;
  t.w_a_k = RowMatrix::Zero(h * g, d);
  for (Index i = 0; i < h; ++i) t.w_a_k(i * g + i / group, constant) = static_cast<float>(g);
  t.w_a_v = t.w_a_k;
  t.w_b_k = w.w_k;
  t.w_b_v = w.w_v;
  t.w_o = w.w_o;
  return t;
}

template <class GqaLayer>
void expect_tpa_equals_gqa(Index heads, Index kv_heads, Index head_dim, Index value_dim,
                           const RopeConfig& rope_config) {
  tpattn::GqaConfig gqa;
  gqa.d_model = 24;
  gqa.heads = heads;
  gqa.kv_heads = kv_heads;
  gqa.head_dim = head_dim;
  gqa.value_dim = value_dim;
  gqa.rope = rope_config;
  const tpattn::GqaWeights gqa_weights = tpattn_test::random_gqa_weights(gqa, 21);
  RowMatrix x = random_inputs(37, gqa.d_model, 22);
  x.col(gqa.d_model - 1).setOnes();

  TpaConfig tpa;
  tpa.d_model = gqa.d_model;
  tpa.heads = heads;
  tpa.head_dim = head_dim;
  tpa.value_dim = value_dim;
  tpa.rank_q = heads;
  tpa.rank_k = kv_heads;
  tpa.rank_v = kv_heads;
  tpa.rope = rope_config;
  const TpaWeights tpa_weights = tpa_weights_from_gqa(gqa, gqa_weights);

  GqaLayer reference_layer(gqa, gqa_weights);
  PagedKvCache gqa_cache(reference_layer.cache_record(), kPageTokens, 3, 1);
  const SequenceId gqa_seq = gqa_cache.add_sequence();
  const RowMatrix expected =
      run_layer(reference_layer, gqa_cache, gqa_seq, x, Feed::prefill_then_decode, 1);
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
    tpa.order = order;
    TensorProductAttention<float> op(tpa, tpa_weights);
    PagedKvCache cache(op.cache_record(), kPageTokens, 3, 1);
    const SequenceId seq = cache.add_sequence();
    const RowMatrix y = run_layer(op, cache, seq, x, Feed::prefill_then_decode, 1);
    EXPECT_LE(relative_difference(y, expected), kAgreementTolerance)
        << "order " << static_cast<int>(order);
  }
}

TEST(Tpa, WithRankHAndScaledIdentityAEqualsMultiHeadAttention) {
  expect_tpa_equals_gqa<tpattn::MultiHeadAttention<float>>(4, 4, 16, 16, rope(kHalf, kReversed));
  expect_tpa_equals_gqa<tpattn::MultiHeadAttention<float>>(3, 3, 8, 6,
                                                           rope(kInterleaved, kStandard));
}

TEST(Tpa, WithRankOneAndAllOnesAEqualsMultiQueryAttention) {
  expect_tpa_equals_gqa<tpattn::MultiQueryAttention<float>>(4, 1, 16, 16, rope(kHalf, kReversed));
  expect_tpa_equals_gqa<tpattn::MultiQueryAttention<float>>(5, 1, 8, 12, rope(kHalf, kStandard));
}

TEST(Tpa, WithRankGAndScaledGroupMaskAEqualsGroupedQueryAttention) {
  expect_tpa_equals_gqa<tpattn::GroupedQueryAttention<float>>(6, 2, 16, 16, rope(kHalf, kReversed));
  expect_tpa_equals_gqa<tpattn::GroupedQueryAttention<float>>(6, 3, 8, 4,
                                                              rope(kInterleaved, kReversed, 4));
}

// ---- §5 / §6.9: cache sizes -------------------------------------------------------------------

Index tpa_elements(Index heads, Index head_dim, Index rank) {
  return TpaKernel<float>(TpaShape{heads, head_dim, head_dim, 0, rank, rank})
      .cache_record()
      .elements_per_token();
}

TEST(Tpa, CacheElementsPerTokenMatchTheSpecTable) {
  EXPECT_EQ(tpa_elements(32, 128, 1), 320);
  EXPECT_EQ(tpa_elements(32, 128, 2), 640);
  // The paper's models: d_h 64, R_K = R_V = 2, h = 34 / 47 / 61 / 78.
  EXPECT_EQ(tpa_elements(34, 64, 2), 392);
  EXPECT_EQ(tpa_elements(47, 64, 2), 444);
  EXPECT_EQ(tpa_elements(61, 64, 2), 500);
  EXPECT_EQ(tpa_elements(78, 64, 2), 568);
}

TEST(Tpa, CacheElementsPerTokenAreRkTimesHPlusDhPlusRvTimesHPlusDv) {
  for (Index h : {1, 3, 17})
    for (Index dh : {8, 129})
      for (Index dv : {5, 64})
        for (Index rk : {1, 3})
          for (Index rv : {1, 2}) {
            const TpaShape shape{h, dh, dv, 2, rk, rv};
            const Index elements = rk * (h + dh) + rv * (h + dv);
            EXPECT_EQ(TpaKernel<float>(shape).cache_record().elements_per_token(), elements);
            EXPECT_EQ(TpaKernel<float>(shape).cache_record().bytes_per_token(), 4 * elements);
            EXPECT_EQ(TpaKernel<Eigen::bfloat16>(shape).cache_record().bytes_per_token(),
                      2 * elements);
            EXPECT_EQ(TpaKernel<Eigen::half>(shape).cache_record().bytes_per_token(), 2 * elements);
          }
  // The layer's record is the kernel's, for TPA and TPA-KVonly alike.
  TpaConfig config = small_config(3, 8, 2, 3, 1);
  EXPECT_EQ(TensorProductAttention<float>(config, tpattn_test::random_tpa_weights(config, 1))
                .cache_record(),
            tpattn::records::tpa(3, 8, 8, 3, 1, StorageType::f32));
  config.rank_q = 0;
  EXPECT_EQ(
      TensorProductAttentionKvOnly<Eigen::half>(config, tpattn_test::random_tpa_weights(config, 1))
          .cache_record(),
      tpattn::records::tpa(3, 8, 8, 3, 1, StorageType::f16));
}

// Paged: bytes_used counts tokens exactly; the pages add the rounding of the last one.
TEST(Tpa, PagedCacheBytesAreTokensTimesRecordBytesPlusLastPageRounding) {
  const TpaConfig config = small_config(3, 8, 2, 2, 1);
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 1);
  const RowMatrix x = random_inputs(37, config.d_model, 2);
  TensorProductAttention<Eigen::bfloat16> op(config, weights);
  PagedKvCache cache(op.cache_record(), kPageTokens, 8, 2);
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  run_layer(op, cache, a, x, Feed::prefill_then_decode, 1);
  run_layer(op, cache, b, x.topRows(16), Feed::prefill, 1);
  const Index per_token = 2 * (2 * (3 + 8) + 1 * (3 + 8));
  EXPECT_EQ(cache.bytes_used(), (37 + 16) * per_token);
  EXPECT_EQ(cache.page_bytes(), kPageTokens * per_token);
  EXPECT_EQ(cache.bytes_in_pages(), (3 + 1) * kPageTokens * per_token);
}

// ---- batched decode ----------------------------------------------------------------------------

// Three sequences holding 1, 5 and 300 tokens decode four more tokens each, batched and alone, on
// contiguous and paged caches: all equal each other and the reference of each whole sequence.
TEST(Tpa, BatchedDecodeOverLengths1And5And300EqualsDecodingEachAlone) {
  TpaConfig config = small_config(5, 16, 3, 2, 3);
  config.d_model = 20;
  config.value_dim = 12;
  config.rope = rope(kHalf, kReversed);
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 31);
  const Index prompts[] = {1, 5, 300};
  const Index steps = 4, batch = 3, capacity = 300 + steps, d = config.d_model;
  std::vector<RowMatrix> inputs;
  for (Index b = 0; b < batch; ++b)
    inputs.push_back(random_inputs(prompts[b] + steps, d, 40 + static_cast<std::uint32_t>(b)));

  TensorProductAttention<float> op(config, weights);
  std::vector<std::vector<RowMatrix>> batched_outputs;  // per cache kind, per sequence
  for (CacheKind kind : kAllCacheKinds) {
    const std::unique_ptr<KvCache> batched = make_cache(op.cache_record(), kind, batch, capacity);
    const std::unique_ptr<KvCache> alone = make_cache(op.cache_record(), kind, batch, capacity);
    std::vector<SequenceId> seqs, solo;
    std::vector<RowMatrix> y_batched, y_alone;
    for (Index b = 0; b < batch; ++b) {
      seqs.push_back(batched->add_sequence());
      solo.push_back(alone->add_sequence());
      const RowMatrix prompt = inputs[b].topRows(prompts[b]);
      y_batched.push_back(RowMatrix(prompts[b] + steps, d));
      y_batched[b].topRows(prompts[b]) = run_layer(op, *batched, seqs[b], prompt, Feed::prefill, 1);
      y_alone.push_back(RowMatrix(prompts[b] + steps, d));
      y_alone[b].topRows(prompts[b]) = run_layer(op, *alone, solo[b], prompt, Feed::prefill, 1);
    }
    RowMatrix x_step(batch, d), y_step(batch, d);
    for (Index step = 0; step < steps; ++step) {
      for (Index b = 0; b < batch; ++b) x_step.row(b) = inputs[b].row(prompts[b] + step);
      op.decode(*batched, seqs.data(), batch, x_step.data(), y_step.data());
      for (Index b = 0; b < batch; ++b) {
        y_batched[b].row(prompts[b] + step) = y_step.row(b);
        op.decode(*alone, &solo[b], 1, x_step.row(b).data(),
                  y_alone[b].row(prompts[b] + step).data());
      }
    }
    for (Index b = 0; b < batch; ++b) {
      EXPECT_EQ(batched->length(seqs[b]), prompts[b] + steps);
      EXPECT_LE(relative_difference(y_batched[b], y_alone[b]), kAgreementTolerance)
          << "sequence of " << prompts[b];
      const tpattn_test::TpaReference ref =
          tpattn_test::tpa_layer_reference(config, weights, inputs[b].cast<double>());
      EXPECT_LE(relative_error(y_batched[b], ref.y), kFloatTolerance)
          << "sequence of " << prompts[b];
    }
    batched_outputs.push_back(y_batched);
  }
  for (Index b = 0; b < batch; ++b)
    EXPECT_LE(relative_difference(batched_outputs[0][b], batched_outputs[1][b]),
              kAgreementTolerance)
        << "contiguous vs paged, sequence of " << prompts[b];
}

// ---- misuse ------------------------------------------------------------------------------------

TpaConfig misuse_config() {
  TpaConfig config = small_config(3, 8, 2, 2, 1);
  config.value_dim = 4;
  return config;
}

// heads = head_dim = 2^32: h d_h overflows in the operators; in the bare kernel, its cache
// record (R_K h) and its workspace (8 query tokens x h rows x d_h). (RoPE is off: the test is
// about the products, and a 2^31-entry table is 16 GiB.)
TEST(Tpa, SizeProductsThatOverflowThrowBeforeAnyAllocation) {
  const Index big = Index{1} << 32;
  TpaConfig config = misuse_config();
  config.heads = big;
  config.head_dim = big;
  config.rope.enabled = false;
  expect_error_before_allocating([&] { TensorProductAttention<float> op(config, TpaWeights{}); },
                                 "TensorProductAttention", "heads x head_dim", kFitsInIndex,
                                 "4294967296 x 4294967296, which overflows");
  config.rank_q = 0;
  expect_error_before_allocating(
      [&] { TensorProductAttentionKvOnly<float> op(config, TpaWeights{}); },
      "TensorProductAttentionKvOnly", "heads x head_dim", kFitsInIndex,
      "4294967296 x 4294967296, which overflows");
  expect_error_before_allocating(
      [&] {
        TpaKernel<float> kernel(TpaShape{big, 1, 1, 1, big, 1});
      },
      "TpaKernel", "rank_k x heads", kFitsInIndex, "4294967296 x 4294967296, which overflows");
  expect_error_before_allocating(
      [&] {
        TpaKernel<float> kernel(TpaShape{big, big, big, 1, 1, 1});
      },
      "TpaKernel", "workspace_floats()", kFitsInIndex, "34359738368 x 4294967296, which overflows");
}

// An order that is none of automatic, factor, query is rejected where it is received: by the
// operator's constructor and by the bare kernel's attend() (before, it ran the factor order).
TEST(Tpa, OutOfRangeOrderThrowsNamingIt) {
  TpaConfig config = misuse_config();
  config.order = static_cast<TpaOrder>(99);
  const TpaWeights weights = tpattn_test::random_tpa_weights(misuse_config(), 1);
  expect_error_before_allocating(
      [&, w = weights]() mutable { TensorProductAttention<float> op(config, std::move(w)); },
      "TensorProductAttention", "order", "automatic, factor or query", "99");

  const TpaKernel<float> kernel(TpaShape{2, 2, 2, 1, 1, 1});
  ContiguousKvCache cache(kernel.cache_record(), 1, 1);
  const SequenceId seq = cache.add_sequence();
  const std::vector<float> factor = {1.0f, 0.5f};  // each plane: 1 x 2
  cache.append(
      seq, 1,
      {{factor.data(), 1, 2}, {factor.data(), 1, 2}, {factor.data(), 1, 2}, {factor.data(), 1, 2}});
  std::vector<float> out(4), workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  expect_error_before_allocating(
      [&] {
        kernel.attend(factor.data(), factor.data(), 1, cache.view(seq), out.data(), nullptr,
                      workspace.data(), static_cast<TpaOrder>(99));
      },
      "TpaKernel::attend", "order", "automatic, factor or query", "99");
}

// Every config, RoPE and weight-shape error is raised before the constructor allocates anything
// (before, w_a_q was already reordered into a new matrix when w_b_v was found wrong, and
// head_dim 2^40 failed on its 4 TiB RoPE table with std::bad_alloc).
TEST(Tpa, EveryConstructorCheckRunsBeforeItAllocates) {
  const TpaConfig good = misuse_config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(good, 2);
  const auto construct = [](TpaConfig config, TpaWeights w) {
    return [config, w]() mutable { TensorProductAttention<float> op(config, std::move(w)); };
  };
  TpaConfig config = good;
  config.heads = 0;
  expect_error_before_allocating(construct(config, weights), "TensorProductAttention", "heads",
                                 ">= 1", "0");
  TpaWeights wrong = weights;
  wrong.w_b_v = RowMatrix::Ones(5, 8);
  expect_error_before_allocating(construct(good, wrong), "TensorProductAttention", "w_b_v", "4 x 8",
                                 "5 x 8");
  config = good;
  config.head_dim = Index{1} << 40;
  expect_error_before_allocating(construct(config, weights), "TensorProductAttention", "w_b_q",
                                 "2199023255552 x 8", "16 x 8");
}

TEST(Tpa, InvalidConfigThrowsNamingOperatorAndArgument) {
  const TpaConfig valid = misuse_config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(valid, 1);
  struct Bad {
    const char* argument;
    std::function<void(TpaConfig&)> change;
  };
  const std::vector<Bad> cases = {
      {"d_model", [](TpaConfig& c) { c.d_model = 0; }},
      {"heads", [](TpaConfig& c) { c.heads = 0; }},
      {"head_dim", [](TpaConfig& c) { c.head_dim = 0; }},
      {"value_dim", [](TpaConfig& c) { c.value_dim = -1; }},
      {"rank_q", [](TpaConfig& c) { c.rank_q = -1; }},
      {"rank_k", [](TpaConfig& c) { c.rank_k = 0; }},
      {"rank_v", [](TpaConfig& c) { c.rank_v = 0; }},
      {"order",
       [](TpaConfig& c) {
         c.rank_q = 0;
         c.order = TpaOrder::factor;
       }},
      {"rope.rotary_dim", [](TpaConfig& c) { c.rope.rotary_dim = 5; }},
      {"rope.rotary_dim", [](TpaConfig& c) { c.rope.rotary_dim = 10; }},
      {"rope.rotary_dim", [](TpaConfig& c) { c.head_dim = 9; }},  // whole odd head
      {"rope.base", [](TpaConfig& c) { c.rope.base = 1.0; }},
  };
  for (const Bad& bad : cases) {
    TpaConfig config = valid;
    bad.change(config);
    expect_error([&] { TensorProductAttention<float> op(config, weights); },
                 "TensorProductAttention", bad.argument);
  }
  // TPA-KVonly: its query is not factorised.
  TpaConfig kv_only = valid;
  kv_only.rank_q = 2;
  expect_error([&] { TensorProductAttentionKvOnly<float> op(kv_only, weights); },
               "TensorProductAttentionKvOnly", "rank_q");
  kv_only.rank_q = 0;
  kv_only.order = TpaOrder::factor;
  expect_error([&] { TensorProductAttentionKvOnly<float> op(kv_only, weights); },
               "TensorProductAttentionKvOnly", "order");
  // The bare kernel checks its shape too.
  expect_error([] { TpaKernel<float> k(TpaShape{3, 8, 8, 2, 0, 1}); }, "TpaKernel", "rank_k");
  expect_error([] { TpaKernel<float> k(TpaShape{3, 8, 8, -1, 1, 1}); }, "TpaKernel", "rank_q");
  expect_error([] { TpaKernel<float> k(TpaShape{3, 0, 8, 2, 1, 1}); }, "TpaKernel", "head_dim");
  expect_error([] { TpaKernel<float> k(TpaShape{0, 8, 8, 2, 1, 1}); }, "TpaKernel", "heads");
  expect_error([] { TpaKernel<float> k(TpaShape{3, 8, 0, 2, 1, 1}); }, "TpaKernel", "value_dim");
  expect_error([] { TpaKernel<float> k(TpaShape{3, 8, 8, 2, 1, 0}); }, "TpaKernel", "rank_v");
}

TEST(Tpa, WrongWeightShapeThrowsNamingTheWeight) {
  const TpaConfig config = misuse_config();
  const TpaWeights valid = tpattn_test::random_tpa_weights(config, 1);
  using Member = RowMatrix TpaWeights::*;
  const std::pair<const char*, Member> members[] = {
      {"w_a_q", &TpaWeights::w_a_q}, {"w_b_q", &TpaWeights::w_b_q}, {"w_a_k", &TpaWeights::w_a_k},
      {"w_b_k", &TpaWeights::w_b_k}, {"w_a_v", &TpaWeights::w_a_v}, {"w_b_v", &TpaWeights::w_b_v},
      {"w_o", &TpaWeights::w_o}};
  for (const auto& [name, member] : members) {
    for (bool rows : {true, false}) {
      TpaWeights weights = valid;
      RowMatrix& w = weights.*member;
      w = RowMatrix::Ones(w.rows() + (rows ? 1 : 0), w.cols() + (rows ? 0 : 1));
      expect_error([&] { TensorProductAttention<float> op(config, weights); },
                   "TensorProductAttention", name);
    }
  }
  // A head-major A transposed by mistake ((R h) x d looks right only when R = h).
  TpaWeights swapped = valid;
  swapped.w_a_k = valid.w_a_k.transpose();
  expect_error([&] { TensorProductAttention<float> op(config, swapped); }, "TensorProductAttention",
               "w_a_k");

  TpaConfig kv_only = config;
  kv_only.rank_q = 0;
  TpaWeights kv_weights = tpattn_test::random_tpa_weights(kv_only, 1);
  kv_weights.w_q = RowMatrix::Ones(config.heads * config.head_dim + 1, config.d_model);
  expect_error([&] { TensorProductAttentionKvOnly<float> op(kv_only, kv_weights); },
               "TensorProductAttentionKvOnly", "w_q");
  kv_weights.w_q.resize(0, 0);  // forgotten
  expect_error([&] { TensorProductAttentionKvOnly<float> op(kv_only, kv_weights); },
               "TensorProductAttentionKvOnly", "w_q");
}

// Every misuse of decode and prefill throws naming the call and argument, and leaves the cache
// exactly as it was: lengths, bytes_used and every stored bit.
TEST(Tpa, DecodeAndPrefillMisuseThrowsAndLeavesTheCacheUnchanged) {
  const TpaConfig config = misuse_config();
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 1);
  TensorProductAttention<float> op(config, weights);
  const Index capacity = 20, d = config.d_model;
  ContiguousKvCache cache(op.cache_record(), 4, capacity);
  const SequenceId a = cache.add_sequence(), full = cache.add_sequence(),
                   empty = cache.add_sequence();
  const RowMatrix x = random_inputs(capacity + 1, d, 2);
  RowMatrix y(capacity + 1, d);
  op.prefill(cache, a, 5, x.data(), y.data());
  op.prefill(cache, full, capacity, x.data(), y.data());
  const std::vector<SequenceId> live = {a, full, empty};
  const CacheState before = state_of(cache, live);

  const std::string decode = "TensorProductAttention::decode";
  const std::string prefill = "TensorProductAttention::prefill";
  auto expect_unchanged = [&](const std::function<void()>& misuse, const std::string& call,
                              const std::string& argument) {
    expect_error(misuse, call, argument);
    EXPECT_TRUE(state_of(cache, live) == before) << call << " " << argument;
  };

  TpaConfig other_rank = config;
  other_rank.rank_k = 3;
  TensorProductAttention<float> other(other_rank, tpattn_test::random_tpa_weights(other_rank, 1));
  TensorProductAttention<Eigen::bfloat16> other_storage(config, weights);
  SequenceId pair[] = {a, empty};
  expect_unchanged([&] { other.decode(cache, pair, 2, x.data(), y.data()); }, decode, "cache");
  expect_unchanged([&] { other.prefill(cache, a, 2, x.data(), y.data()); }, prefill, "cache");
  expect_unchanged([&] { other_storage.decode(cache, pair, 2, x.data(), y.data()); }, decode,
                   "cache");
  expect_unchanged([&] { other_storage.prefill(cache, a, 2, x.data(), y.data()); }, prefill,
                   "cache");

  SequenceId unknown[] = {a, 3};  // slot 3 was never added
  expect_unchanged([&] { op.decode(cache, unknown, 2, x.data(), y.data()); }, decode, "seqs");
  SequenceId removed[] = {a, 99};
  expect_unchanged([&] { op.decode(cache, removed, 2, x.data(), y.data()); }, decode, "seqs");
  expect_unchanged([&] { op.prefill(cache, 3, 2, x.data(), y.data()); }, prefill, "seq");
  expect_unchanged([&] { op.prefill(cache, -1, 2, x.data(), y.data()); }, prefill, "seq");
  SequenceId duplicate[] = {a, empty, a};
  expect_unchanged([&] { op.decode(cache, duplicate, 3, x.data(), y.data()); }, decode, "seqs");
  SequenceId with_full[] = {a, full};
  expect_unchanged([&] { op.decode(cache, with_full, 2, x.data(), y.data()); }, decode, "cache");
  expect_unchanged([&] { op.decode(cache, pair, 0, x.data(), y.data()); }, decode, "batch");
  expect_unchanged([&] { op.decode(cache, nullptr, 1, x.data(), y.data()); }, decode, "seqs");
  expect_unchanged([&] { op.decode(cache, pair, 2, nullptr, y.data()); }, decode, "x");
  expect_unchanged([&] { op.decode(cache, pair, 2, x.data(), nullptr); }, decode, "y");
  expect_unchanged([&] { op.prefill(cache, a, capacity - 5 + 1, x.data(), y.data()); }, prefill,
                   "n_tokens");
  expect_unchanged([&] { op.prefill(cache, full, 1, x.data(), y.data()); }, prefill, "n_tokens");
  expect_unchanged([&] { op.prefill(cache, a, 0, x.data(), y.data()); }, prefill, "n_tokens");
  expect_unchanged([&] { op.prefill(cache, a, 2, nullptr, y.data()); }, prefill, "x");

  // TPA-KVonly names itself. (With the same R_K, R_V it would share this cache's record.)
  TpaConfig kv_config = config;
  kv_config.rank_q = 0;
  kv_config.rank_v = 2;
  TensorProductAttentionKvOnly<float> kv_only(kv_config,
                                              tpattn_test::random_tpa_weights(kv_config, 1));
  expect_unchanged([&] { kv_only.decode(cache, pair, 2, x.data(), y.data()); },
                   "TensorProductAttentionKvOnly::decode", "cache");
  expect_unchanged([&] { kv_only.prefill(cache, 3, 2, x.data(), y.data()); },
                   "TensorProductAttentionKvOnly::prefill", "cache");

  // The cache still works, and the op too, after all that.
  op.decode(cache, pair, 2, x.data(), y.data());
  EXPECT_EQ(cache.length(a), 6);
  EXPECT_EQ(cache.length(empty), 1);
}

// Every argument check of the bare kernel's two attend() overloads (factored queries a_q, b_q;
// materialised queries q) throws naming TpaKernel::attend and the argument, with what was
// expected and what came, and before writing anything: out and lse keep their sentinels.
TEST(TpaKernel, AttendRejectsEachBadArgumentNamingItAndWritesNothing) {
  const TpaShape shape{3, 8, 4, 2, 2, 1};
  const Index m = 4, h = shape.heads, dh = shape.head_dim, dv = shape.value_dim;
  const TpaKernel<float> kernel(shape);
  const TpaKernel<float> kv_only(TpaShape{h, dh, dv, 0, 2, 1});  // materialised queries only
  ASSERT_EQ(kv_only.cache_record(), kernel.cache_record());      // R_Q is not cached
  const RopeConfig rope_config = rope(kHalf, kStandard);
  const tpattn::Rope rotation(rope_config, dh);
  const KernelFactors f = random_factors(shape, m, 11);
  ContiguousKvCache cache(kernel.cache_record(), 1, m);
  const SequenceId seq = cache.add_sequence();
  append_tokens(cache, seq, f, 0, m, rotation, 0);
  const SequenceView view = cache.view(seq);
  // Views of caches the kernel did not make: R_K 3 instead of 2, and the same shape in bf16.
  const TpaShape other_shape{h, dh, dv, 2, 3, 1};
  ContiguousKvCache other_rank(TpaKernel<float>(other_shape).cache_record(), 1, m);
  const SequenceId other_seq = other_rank.add_sequence();
  append_tokens(other_rank, other_seq, random_factors(other_shape, m, 12), 0, m, rotation, 0);
  ContiguousKvCache bf16(TpaKernel<Eigen::bfloat16>(shape).cache_record(), 1, m);
  const SequenceId bf16_seq = bf16.add_sequence();
  append_tokens(bf16, bf16_seq, f, 0, m, rotation, 0);

  // Queries for up to m + 1 tokens, so n = m + 1 is refused by the check and not by a read.
  tpattn_test::Random random(13);
  const std::vector<float> a_q = random.floats((m + 1) * shape.rank_q * h);
  const std::vector<float> b_q = random.floats((m + 1) * shape.rank_q * dh);
  const std::vector<float> q = random.floats((m + 1) * h * dh);
  constexpr float kSentinel = 12345.0f;
  std::vector<float> out(static_cast<std::size_t>((m + 1) * h * dv), kSentinel);
  std::vector<float> lse(static_cast<std::size_t>((m + 1) * h), kSentinel);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  auto reset = [&] {
    std::fill(out.begin(), out.end(), kSentinel);
    std::fill(lse.begin(), lse.end(), kSentinel);
  };
  auto untouched = [&] {
    return std::all_of(out.begin(), out.end(), [&](float v) { return v == kSentinel; }) &&
           std::all_of(lse.begin(), lse.end(), [&](float v) { return v == kSentinel; });
  };

  const std::string call = "TpaKernel::attend";
  struct Bad {
    std::string what;  // for failure messages
    std::function<void()> attend;
    std::string argument;
    std::vector<std::string> message;  // expected and actual
  };
  auto factored = [&](const TpaKernel<float>& k, const float* aq, const float* bq, Index n,
                      const SequenceView& v, float* o, float* w) {
    return [&k, aq, bq, n, v, o, w, &lse] { k.attend(aq, bq, n, v, o, lse.data(), w); };
  };
  auto materialised = [&](const float* query, Index n, const SequenceView& v, float* o, float* w) {
    return [&kernel, query, n, v, o, w, &lse] { kernel.attend(query, n, v, o, lse.data(), w); };
  };
  const std::string view_expected = "a view of a cache built with this kernel's cache_record()";
  float* const o = out.data();
  float* const w = workspace.data();
  const std::vector<Bad> cases = {
      {"empty view",
       factored(kernel, a_q.data(), b_q.data(), 1, SequenceView(), o, w),
       "view",
       {view_expected, "got an empty view"}},
      {"view with R_K 3",
       factored(kernel, a_q.data(), b_q.data(), 1, other_rank.view(other_seq), o, w),
       "view",
       {view_expected, "got a view with another record"}},
      {"bf16 view",
       factored(kernel, a_q.data(), b_q.data(), 1, bf16.view(bf16_seq), o, w),
       "view",
       {"got a view with another record"}},
      {"n = 0",
       factored(kernel, a_q.data(), b_q.data(), 0, view, o, w),
       "n",
       {"expected in [1, view.length() = 4]", "got 0"}},
      {"n = -1", factored(kernel, a_q.data(), b_q.data(), -1, view, o, w), "n", {"got -1"}},
      {"n = m + 1",
       factored(kernel, a_q.data(), b_q.data(), m + 1, view, o, w),
       "n",
       {"expected in [1, view.length() = 4]", "got 5"}},
      {"null b_q",
       factored(kernel, a_q.data(), nullptr, 1, view, o, w),
       "b_q",
       {"expected non-null", "got null"}},
      {"null out",
       factored(kernel, a_q.data(), b_q.data(), 1, view, nullptr, w),
       "out",
       {"expected non-null", "got null"}},
      {"null workspace",
       factored(kernel, a_q.data(), b_q.data(), 1, view, o, nullptr),
       "workspace",
       {"expected non-null (workspace_floats() floats)", "got null"}},
      {"factored queries to a kernel with rank_q = 0",
       factored(kv_only, a_q.data(), b_q.data(), 1, view, o, w),
       "a_q, b_q",
       {"expected a kernel with rank_q >= 1", "got rank_q = 0"}},
      {"materialised: empty view",
       materialised(q.data(), 1, SequenceView(), o, w),
       "view",
       {view_expected, "got an empty view"}},
      {"materialised: view with R_K 3",
       materialised(q.data(), 1, other_rank.view(other_seq), o, w),
       "view",
       {"got a view with another record"}},
      {"materialised: n = 0",
       materialised(q.data(), 0, view, o, w),
       "n",
       {"expected in [1, view.length() = 4]", "got 0"}},
      {"materialised: n = m + 1", materialised(q.data(), m + 1, view, o, w), "n", {"got 5"}},
      {"materialised: null q",
       materialised(nullptr, 1, view, o, w),
       "q",
       {"expected non-null", "got null"}},
      {"materialised: null out",
       materialised(q.data(), 1, view, nullptr, w),
       "out",
       {"expected non-null", "got null"}},
      {"materialised: null workspace",
       materialised(q.data(), 1, view, o, nullptr),
       "workspace",
       {"got null"}},
  };
  for (const Bad& bad : cases) {
    SCOPED_TRACE(bad.what);
    reset();
    expect_error(bad.attend, call, bad.argument, bad.message);
    EXPECT_TRUE(untouched()) << "out or lse written";
  }
  reset();
  expect_error([&] { kernel.attend(nullptr, b_q.data(), 1, view, o, lse.data(), w); }, call, "a_q",
               {"expected non-null", "got null"});
  EXPECT_TRUE(untouched()) << "out or lse written for a null a_q";

  // Good arguments go through and write all n tokens' outputs (and LSEs; lse may be null).
  auto written = [](const std::vector<float>& values, Index count) {
    return std::none_of(values.begin(), values.begin() + count,
                        [](float v) { return v == kSentinel || std::isnan(v); });
  };
  EXPECT_NO_THROW(kernel.attend(a_q.data(), b_q.data(), m, view, o, lse.data(), w));
  EXPECT_TRUE(written(out, m * h * dv));
  EXPECT_TRUE(written(lse, m * h));
  reset();
  EXPECT_NO_THROW(kv_only.attend(q.data(), m, view, o, nullptr, w));
  EXPECT_TRUE(written(out, m * h * dv));
}

// A shared page pool that runs dry halfway through a batch: the append of a later sequence fails
// after an earlier one took the last page; the earlier one is cut back, so nothing changes.
TEST(Tpa, DecodeBatchThatRunsThePagePoolDryLeavesTheCacheUnchanged) {
  const TpaConfig config = misuse_config();
  TensorProductAttention<float> op(config, tpattn_test::random_tpa_weights(config, 1));
  const Index d = config.d_model;
  PagedKvCache cache(op.cache_record(), 4, 3, 2);  // 3 pages of 4 tokens
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  const RowMatrix x = random_inputs(8, d, 2);
  RowMatrix y(8, d);
  op.prefill(cache, a, 4, x.data(), y.data());  // one full page each, one page free
  op.prefill(cache, b, 4, x.data(), y.data());
  const std::vector<SequenceId> live = {a, b};
  const CacheState before = state_of(cache, live);
  SequenceId both[] = {a, b};
  // Each sequence alone has room (the one free page), so the operator's own checks pass; the
  // cache refuses b midway, the operator rolls a back and names itself.
  expect_error([&] { op.decode(cache, both, 2, x.data(), y.data()); },
               "TensorProductAttention::decode", "cache");
  EXPECT_TRUE(state_of(cache, live) == before);
  EXPECT_EQ(cache.free_page_count(), 1);
  op.decode(cache, both, 1, x.data(), y.data());  // a alone still fits
  EXPECT_EQ(cache.length(a), 5);
}

// ---- steady-state decode allocates nothing -----------------------------------------------------

// A small real layer (d_model 256, 8 heads of 64): its GEMMs are large enough for a hidden
// Eigen temporary to reach the heap. The order crosses over at R_Q = h d_h / (h + d_h) = 7.1.
TpaConfig allocation_config(Index rank_q) {
  TpaConfig config = small_config(8, 64, rank_q, 2, 3);
  config.d_model = 256;
  config.rope = rope(kHalf, kReversed);
  return config;
}

template <class Storage>
void expect_decode_allocates_nothing(Index rank_q, CacheKind kind) {
  ASSERT_TRUE(tpattn::test::AllocationCounter::installed());
  const TpaConfig config = allocation_config(rank_q);
  const Index batch = 3, steps = 40, d = config.d_model;
  const TpaWeights weights = tpattn_test::random_tpa_weights(config, 3);
  const RowMatrix x = random_inputs(batch, d, 4);
  RowMatrix y(batch, d);
  tpattn::test::HeapAllocations made;
  with_layer<Storage>(config, weights, [&](TensorProductAttention<Storage>& op) {
    const std::unique_ptr<KvCache> cache = make_cache(op.cache_record(), kind, batch, steps + 1);
    std::vector<SequenceId> seqs;
    for (Index b = 0; b < batch; ++b) seqs.push_back(cache->add_sequence());
    op.reserve(batch);
    op.decode(*cache, seqs.data(), batch, x.data(), y.data());  // warm-up
    for (Index step = 0; step < steps; ++step)  // crosses page boundaries and kernel tiles
      made += tpattn::test::count_heap_allocations(
          [&] { op.decode(*cache, seqs.data(), batch, x.data(), y.data()); });
  });
  EXPECT_EQ(made.by_new, 0u) << "rank_q " << rank_q;
  EXPECT_EQ(made.by_eigen, 0) << "Eigen's malloc, rank_q " << rank_q;
}

TEST(Tpa, SteadyStateDecodeAllocatesNothing) {
  expect_decode_allocates_nothing<float>(6, kContiguous);  // factor order
  expect_decode_allocates_nothing<float>(6, kPaged);
  expect_decode_allocates_nothing<Eigen::bfloat16>(6, kPaged);
  expect_decode_allocates_nothing<float>(16, kPaged);  // query order
  expect_decode_allocates_nothing<Eigen::half>(16, kContiguous);
}

TEST(TpaKvOnly, SteadyStateDecodeAllocatesNothing) {
  expect_decode_allocates_nothing<float>(0, kPaged);
  expect_decode_allocates_nothing<Eigen::bfloat16>(0, kContiguous);
}

// Both orders: chunks of 16 tokens after reserve(1, 16) onto a growing sequence.
void expect_chunked_prefill_allocates_nothing(Index rank_q) {
  ASSERT_TRUE(tpattn::test::AllocationCounter::installed());
  const TpaConfig config = allocation_config(rank_q);
  TensorProductAttention<float> op(config, tpattn_test::random_tpa_weights(config, 1));
  const Index chunk = 16, chunks = 4, d = config.d_model;
  PagedKvCache cache(op.cache_record(), kPageTokens, chunks + 1, 1);
  const SequenceId seq = cache.add_sequence();
  const RowMatrix x = random_inputs(chunk * chunks, d, 2);
  RowMatrix y(chunk * chunks, d);
  op.reserve(1, chunk);
  op.prefill(cache, seq, chunk, x.data(), y.data());  // warm-up
  const tpattn::test::HeapAllocations made = tpattn::test::count_heap_allocations([&] {
    for (Index c = 1; c < chunks; ++c)
      op.prefill(cache, seq, chunk, x.data() + c * chunk * d, y.data() + c * chunk * d);
  });
  EXPECT_EQ(made.by_new, 0u) << "rank_q " << rank_q;
  EXPECT_EQ(made.by_eigen, 0) << "Eigen's malloc, rank_q " << rank_q;
}

TEST(Tpa, ChunkedPrefillAfterReserveAllocatesNothing) {
  expect_chunked_prefill_allocates_nothing(6);
  expect_chunked_prefill_allocates_nothing(16);
}

}  // namespace
