// tests/gqa_test.cpp -- MHA / GQA / MQA and the shared kernels (RoPE, online softmax, the
// attention core) against the double-precision reference of support/reference.hpp.
//
// Tolerances. Every bound is max|actual - reference| <= tol * max(1, max|reference|): the values
// here are O(1) (weights ~ N(0, 1/fan_in), inputs ~ N(0, 1)), so this is a relative bound on the
// output's scale.
//  - fp32 compute, tol 1e-5 (2e-5 beyond 128 tokens): an output is a few chained fp32 reductions
//    (d_model-long projections, d_h-long dot products, a softmax sum over T <= 320 tokens, an
//    h*d_v-long output projection). With unit roundoff u = 6e-8 and random-sign terms the error
//    grows like sqrt(n) u, i.e. ~1e-6 here (measured: 1e-7 .. 1e-6); 1e-5 leaves a 10x margin,
//    while a real defect (a wrong position, a dropped or extra token, a wrong head mapping)
//    moves outputs by 1e-2 or more.
//  - bf16 / half cache storage: the reference reads the keys and values back from the cache and
//    keeps the fp32 bound above, and separately checks that each cached element is the reference's
//    own k / v within the storage's rounding (u = 2^-8 bf16, 2^-11 half, plus the fp32 slack).
//    As a sanity bound the output is also compared with the unrounded reference at 1e-2 (bf16)
//    and 2e-3 (half): the rounding of K and V moves outputs by about u.
//  - two library paths that only sum in another order (prefill vs decode, contiguous vs paged,
//    batched vs alone, split-and-merge vs one pass): 1e-6.
// clang-format off
#include "support/check_capture.hpp"  // first: before Eigen and any tpattn header
// clang-format on

#include "tpattn/attention/gqa.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "support/allocation_counter.hpp"
#include "support/feeds.hpp"
#include "support/reference.hpp"
#include "support/storage_types.hpp"
#include "support/test_caches.hpp"
#include "tpattn/cache.hpp"
#include "tpattn/kernels/rope.hpp"
#include "tpattn/kernels/softmax_state.hpp"

namespace tpattn::test {
namespace {

namespace ref = ::tpattn_test;

using Bf16 = Eigen::bfloat16;
using Half = Eigen::half;

constexpr double kFp32Tolerance = 1e-5;
constexpr double kLongFp32Tolerance = 2e-5;  // beyond 128 tokens
constexpr double kSameMathTolerance = 1e-6;  // two library paths that sum in another order

double fp32_tolerance(Index tokens) { return tokens > 128 ? kLongFp32Tolerance : kFp32Tolerance; }

// Against the unrounded reference, when the cache rounds K and V (see the header comment).
double storage_tolerance(StorageType storage, Index tokens) {
  switch (storage) {
    case StorageType::f32: return fp32_tolerance(tokens);
    case StorageType::bf16: return 1e-2;
    case StorageType::f16: return 2e-3;
  }
  return 0.0;
}

// ---- caches -------------------------------------------------------------------------------------

// Calls visit(t, const S* row) for each token of plane `plane` of the view, S its storage type.
template <class Visit>
void for_each_cached_row(const SequenceView& view, Index plane, Visit&& visit) {
  with_storage(view.record().plane(plane).storage, [&](auto tag) {
    using S = decltype(tag);
    const Index width = view.elements_per_token(plane);
    for (Index t = 0; t < view.length(); ++t) {
      const S* row =
          view.plane_block<S>(plane, t / view.block_tokens()) + (t % view.block_tokens()) * width;
      visit(t, row);
    }
  });
}

// A plane of a cached sequence as doubles [tokens, rows, cols]: what the kernels read.
ref::Tensor3 read_plane(const SequenceView& view, Index plane) {
  const PlaneSpec& spec = view.record().plane(plane);
  ref::Tensor3 tensor(view.length(), spec.rows, spec.cols);
  for_each_cached_row(view, plane, [&](Index t, const auto* row) {
    for (Index c = 0; c < spec.rows * spec.cols; ++c)
      tensor.row(t, 0)[c] = static_cast<double>(static_cast<float>(row[c]));
  });
  return tensor;
}

// Every byte of every plane of a sequence, in token order.
std::vector<unsigned char> sequence_bytes(const KvCache& cache, SequenceId seq) {
  std::vector<unsigned char> bytes;
  const SequenceView view = cache.view(seq);
  for (Index p = 0; p < cache.record().plane_count(); ++p)
    for_each_cached_row(view, p, [&](Index, const auto* row) {
      const auto* first = reinterpret_cast<const unsigned char*>(row);
      bytes.insert(bytes.end(), first, first + view.elements_per_token(p) * sizeof(*row));
    });
  return bytes;
}

// What a failed call must not change.
struct CacheSnapshot {
  Index bytes_used = 0;
  Index sequence_count = 0;
  Index free_pages = -1;  // paged caches only
  std::vector<Index> lengths;
  std::vector<Index> available;
  std::vector<std::vector<unsigned char>> bytes;
};

CacheSnapshot snapshot(const KvCache& cache, const std::vector<SequenceId>& seqs) {
  CacheSnapshot s;
  s.bytes_used = cache.bytes_used();
  s.sequence_count = cache.sequence_count();
  if (const auto* paged = dynamic_cast<const PagedKvCache*>(&cache))
    s.free_pages = paged->free_page_count();
  for (SequenceId seq : seqs) {
    s.lengths.push_back(cache.length(seq));
    s.available.push_back(cache.tokens_available(seq));
    s.bytes.push_back(sequence_bytes(cache, seq));
  }
  return s;
}

void expect_same(const CacheSnapshot& before, const CacheSnapshot& after) {
  EXPECT_EQ(before.bytes_used, after.bytes_used);
  EXPECT_EQ(before.sequence_count, after.sequence_count);
  EXPECT_EQ(before.free_pages, after.free_pages);
  EXPECT_EQ(before.lengths, after.lengths);
  EXPECT_EQ(before.available, after.available);
  EXPECT_TRUE(before.bytes == after.bytes) << "cached data changed";
}

// The argument named by the tpattn::Error that f() throws, or a marker when it throws none.
std::string thrown_argument(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& error) {
    return error.argument();
  } catch (...) {
    return "<not a tpattn::Error>";
  }
  return "<nothing thrown>";
}

// "<call> <argument>" of the tpattn::Error that f() throws, or a marker when it throws none.
std::string thrown_call_and_argument(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& error) {
    return error.call() + " " + error.argument();
  } catch (...) {
    return "<not a tpattn::Error>";
  }
  return "<nothing thrown>";
}

// ---- running a layer ----------------------------------------------------------------------------

GqaConfig gqa_config(Index d_model, Index heads, Index kv_heads, Index head_dim,
                     Index value_dim = 0) {
  GqaConfig config;
  config.d_model = d_model;
  config.heads = heads;
  config.kv_heads = kv_heads;
  config.head_dim = head_dim;
  config.value_dim = value_dim;
  return config;
}

// Prefill tokens [first, first + sum(chunks)) of x, one prefill() call per chunk, into rows of y.
template <class S>
void prefill_chunks(GroupedQueryAttention<S>& op, KvCache& cache, SequenceId seq,
                    const RowMatrix& x, RowMatrix& y, Index first,
                    const std::vector<Index>& chunks) {
  for (Index n : chunks) {
    op.prefill(cache, seq, n, x.row(first).data(), y.row(first).data());
    first += n;
  }
}

// Tokens [first, first + count) of x, one decode() step each (batch of one).
template <class S>
void decode_tokens(GroupedQueryAttention<S>& op, KvCache& cache, SequenceId seq, const RowMatrix& x,
                   RowMatrix& y, Index first, Index count) {
  for (Index t = first; t < first + count; ++t)
    op.decode(cache, &seq, 1, x.row(t).data(), y.row(t).data());
}

// The whole of x through a fresh sequence of `cache`, fed one of three ways (kDecodePrefillChunked;
// the chunks are of `chunk` tokens).
template <class S>
RowMatrix run_sequence(GroupedQueryAttention<S>& op, KvCache& cache, SequenceId seq,
                       const RowMatrix& x, Feed feed, Index chunk = 7) {
  RowMatrix y = RowMatrix::Constant(x.rows(), x.cols(), std::numeric_limits<float>::quiet_NaN());
  switch (feed) {
    case Feed::prefill: prefill_chunks(op, cache, seq, x, y, 0, {x.rows()}); break;
    case Feed::decode: decode_tokens(op, cache, seq, x, y, 0, x.rows()); break;
    case Feed::chunked: {
      std::vector<Index> chunks;
      for (Index done = 0; done < x.rows(); done += chunk)
        chunks.push_back(std::min(chunk, x.rows() - done));
      prefill_chunks(op, cache, seq, x, y, 0, chunks);
      break;
    }
    case Feed::prefill_then_decode: ADD_FAILURE() << "run_sequence does not run " << feed; break;
  }
  return y;
}

double max_abs_error(const RowMatrix& actual, const Eigen::MatrixXd& expected) {
  if (!actual.allFinite()) return std::numeric_limits<double>::infinity();
  return (actual.cast<double>() - expected).cwiseAbs().maxCoeff();
}
double scale_of(const Eigen::MatrixXd& expected) {
  return std::max(1.0, expected.cwiseAbs().maxCoeff());
}

// The exact reference of one sequence: its projections and outputs, computed once per test.
struct ExactLayer {
  ref::Projections p;
  Eigen::MatrixXd y;
};
ExactLayer exact_layer(const GqaConfig& config, const GqaWeights& weights, const RowMatrix& x) {
  ExactLayer exact{ref::gqa_projections(config, weights, x.cast<double>()), {}};
  exact.y = ref::gqa_output(
      weights,
      ref::attention_reference(exact.p.q, exact.p.k, exact.p.v, ref::gqa_scale(config)).out);
  return exact;
}

// y (the layer's outputs for the whole sequence x, cached in `seq`) against the reference:
//  1. y vs the exact double layer, at the storage's tolerance;
//  2. each cached k, v element vs the reference's (rotated) k, v within the storage's rounding;
//  3. y vs the double layer that reads those cached K, V back, at the fp32 tolerance.
void expect_layer_matches_reference(const GqaConfig& config, const GqaWeights& weights,
                                    const RowMatrix& x, const RowMatrix& y, const KvCache& cache,
                                    SequenceId seq, const ExactLayer& reference) {
  const StorageType storage = cache.record().plane(0).storage;
  const Eigen::MatrixXd xd = x.cast<double>();
  const ref::Projections& p = reference.p;
  const Eigen::MatrixXd& exact = reference.y;
  EXPECT_LE(max_abs_error(y, exact), storage_tolerance(storage, x.rows()) * scale_of(exact))
      << "vs the exact double reference, storage " << storage;

  const SequenceView view = cache.view(seq);
  ASSERT_EQ(view.length(), x.rows());
  const ref::Tensor3 k = read_plane(view, 0);
  const ref::Tensor3 v = read_plane(view, 1);
  const double u = ref::unit_roundoff(storage);
  for (const auto& [cached, exact_plane, name] :
       {std::make_tuple(&k, &p.k, "K"), std::make_tuple(&v, &p.v, "V")}) {
    const double slack = 1e-5 * std::max(1.0, ref::max_abs(*exact_plane));
    double worst_excess = 0.0;  // how far beyond the rounding bound, at most
    for (Index n = 0; n < cached->size(); ++n) {
      const double r = exact_plane->data[static_cast<std::size_t>(n)];
      const double c = cached->data[static_cast<std::size_t>(n)];
      worst_excess = std::max(worst_excess, std::abs(c - r) - u * std::abs(r));
    }
    EXPECT_LE(worst_excess, slack)
        << "cached " << name << " is not the reference's rounded to " << storage;
  }

  const Eigen::MatrixXd with_cached = ref::gqa_layer_reference(config, weights, xd, k, v);
  EXPECT_LE(max_abs_error(y, with_cached), fp32_tolerance(x.rows()) * scale_of(with_cached))
      << "vs the double reference over the cached K, V, storage " << storage;
}
void expect_layer_matches_reference(const GqaConfig& config, const GqaWeights& weights,
                                    const RowMatrix& x, const RowMatrix& y, const KvCache& cache,
                                    SequenceId seq) {
  expect_layer_matches_reference(config, weights, x, y, cache, seq,
                                 exact_layer(config, weights, x));
}

// ---- the layer in each storage type -------------------------------------------------------------

struct StorageNames {
  template <class S>
  static std::string GetName(int) {
    return tpattn::name_of(storage_type_of<S>);
  }
};

template <class S>
class GqaLayer : public ::testing::Test {};
using AllStorages = ::testing::Types<float, Bf16, Half>;
TYPED_TEST_SUITE(GqaLayer, AllStorages, StorageNames);

TYPED_TEST(GqaLayer, DecodeMatchesDoubleReference) {
  const GqaConfig config = gqa_config(64, 8, 2, 32);
  const GqaWeights weights = ref::random_gqa_weights(config, 11);
  const RowMatrix x = ref::random_inputs(70, config.d_model, 12);  // crosses a 64-token tile
  GroupedQueryAttention<TypeParam> op(config, weights);
  auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, 80);
  const SequenceId seq = cache->add_sequence();
  const RowMatrix y = run_sequence(op, *cache, seq, x, Feed::decode);
  expect_layer_matches_reference(config, weights, x, y, *cache, seq);
}

TYPED_TEST(GqaLayer, PrefillMatchesDoubleReference) {
  const GqaConfig config = gqa_config(64, 8, 2, 32);
  const GqaWeights weights = ref::random_gqa_weights(config, 21);
  const RowMatrix x = ref::random_inputs(200, config.d_model, 22);
  GroupedQueryAttention<TypeParam> op(config, weights);
  auto cache = make_cache(op.cache_record(), CacheKind::contiguous, 1, 200);
  const SequenceId seq = cache->add_sequence();
  const RowMatrix y = run_sequence(op, *cache, seq, x, Feed::prefill);
  expect_layer_matches_reference(config, weights, x, y, *cache, seq);
}

TYPED_TEST(GqaLayer, ChunkedPrefillMatchesDoubleReference) {
  const GqaConfig config = gqa_config(64, 8, 2, 32);
  const GqaWeights weights = ref::random_gqa_weights(config, 31);
  const RowMatrix x = ref::random_inputs(100, config.d_model, 32);
  GroupedQueryAttention<TypeParam> op(config, weights);
  auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, 100, 15);
  const SequenceId seq = cache->add_sequence();
  RowMatrix y(x.rows(), x.cols());
  prefill_chunks(op, *cache, seq, x, y, 0, {5, 1, 11, 30, 23, 1, 29});
  expect_layer_matches_reference(config, weights, x, y, *cache, seq);
}

TYPED_TEST(GqaLayer, PrefillThenDecodeMatchesDoubleReference) {
  GqaConfig config = gqa_config(48, 6, 3, 40, 24);
  config.rope.pairing = RopePairing::interleaved;
  const GqaWeights weights = ref::random_gqa_weights(config, 41);
  const RowMatrix x = ref::random_inputs(70, config.d_model, 42);
  GroupedQueryAttention<TypeParam> op(config, weights);
  auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, 70, 17);
  const SequenceId seq = cache->add_sequence();
  RowMatrix y(x.rows(), x.cols());
  prefill_chunks(op, *cache, seq, x, y, 0, {40});
  decode_tokens(op, *cache, seq, x, y, 40, 30);
  expect_layer_matches_reference(config, weights, x, y, *cache, seq);
}

// The bare kernel, given the K and V it finds in the cache: its outputs and natural-log LSE
// against the reference over the same values rounded through the storage type.
TYPED_TEST(GqaLayer, KernelOutAndLseMatchReferenceOverTheCachedValues) {
  const Index h = 6, g = 2, d_k = 40, d_v = 24, length = 150;
  const GqaKernel<TypeParam> kernel(h, g, d_k, d_v);
  ref::Random random(51);
  const std::vector<float> k = random.floats(length * g * d_k);
  const std::vector<float> v = random.floats(length * g * d_v);
  const ref::Tensor3 k_ref =
      ref::Tensor3::from_floats(ref::round_through<TypeParam>(k).data(), length, g, d_k);
  const ref::Tensor3 v_ref =
      ref::Tensor3::from_floats(ref::round_through<TypeParam>(v).data(), length, g, d_v);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));

  for (CacheKind kind : kAllCacheKinds) {
    auto cache = make_cache(kernel.cache_record(), kind, 1, length);
    const SequenceId seq = cache->add_sequence();
    cache->append(seq, length, {{k.data(), g, d_k}, {v.data(), g, d_v}});
    // (visible length, query tokens): decode and causal blocks, across tiles and query chunks.
    for (const auto& [visible, n] : std::vector<std::pair<Index, Index>>{
             {150, 1}, {150, 21}, {100, 1}, {100, 17}, {1, 1}, {65, 65}, {64, 16}}) {
      SCOPED_TRACE(std::string(name_of(kind)) + " visible " + std::to_string(visible) +
                   " queries " + std::to_string(n));
      const std::vector<float> q = random.floats(n * h * d_k);
      std::vector<float> out(static_cast<std::size_t>(n * h * d_v));
      std::vector<float> lse(static_cast<std::size_t>(n * h));
      kernel.attend(q.data(), n, cache->view(seq).prefix(visible), out.data(), lse.data(),
                    workspace.data());
      const ref::AttentionResult expected = ref::attention_reference(
          ref::Tensor3::from_floats(q.data(), n, h, d_k), k_ref.slice(0, visible),
          v_ref.slice(0, visible), 1.0 / std::sqrt(static_cast<double>(d_k)));
      EXPECT_LE(ref::max_abs_error(out.data(), expected.out.data.data(), expected.out.size()),
                kFp32Tolerance * std::max(1.0, ref::max_abs(expected.out)));
      EXPECT_LE(ref::max_abs_error(lse.data(), expected.lse.data(), n * h),
                kFp32Tolerance * std::max(1.0, ref::max_abs(expected.lse)));
    }
  }
}

// §6.3: MHA and MQA are GQA with g = h and g = 1, bit for bit.
struct Transcript {
  std::vector<float> outputs;
  std::vector<unsigned char> cached;
};

// Two sequences: prefills, single decodes and batched decodes, all outputs and the cache kept.
template <class S>
Transcript transcript(GroupedQueryAttention<S>& op, const RowMatrix& x) {
  auto cache = make_cache(op.cache_record(), CacheKind::paged, 2, 40);
  const SequenceId a = cache->add_sequence();
  const SequenceId b = cache->add_sequence();
  RowMatrix y(x.rows(), x.cols());
  op.prefill(*cache, a, 13, x.row(0).data(), y.row(0).data());
  op.prefill(*cache, b, 3, x.row(13).data(), y.row(13).data());
  op.decode(*cache, &a, 1, x.row(16).data(), y.row(16).data());
  const SequenceId both[] = {b, a};
  for (Index step = 0; step < 4; ++step)
    op.decode(*cache, both, 2, x.row(17 + 2 * step).data(), y.row(17 + 2 * step).data());
  return {std::vector<float>(y.data(), y.data() + 25 * x.cols()), [&] {
            std::vector<unsigned char> bytes = sequence_bytes(*cache, a);
            const std::vector<unsigned char> more = sequence_bytes(*cache, b);
            bytes.insert(bytes.end(), more.begin(), more.end());
            return bytes;
          }()};
}

void expect_bit_for_bit(const Transcript& a, const Transcript& b) {
  ASSERT_EQ(a.outputs.size(), b.outputs.size());
  Index differing = 0;
  for (std::size_t n = 0; n < a.outputs.size(); ++n)
    differing += std::memcmp(&a.outputs[n], &b.outputs[n], sizeof(float)) != 0;
  EXPECT_EQ(differing, 0) << "outputs differ";
  EXPECT_TRUE(a.cached == b.cached) << "cached bytes differ";
}

// Each operator allocates its workspace at its first call. The instances compared below are kept
// alive together, with paddings of different sizes between them, so their workspaces sit at
// different heap addresses, as separate instances of a real program do; the identity must hold
// for every one of them. (GqaKernel.ResultDoesNotDependOnTheWorkspaceAddress pins the cause
// down without relying on the heap's layout.)
template <class Op>
void expect_instances_bit_for_bit(const Transcript& expected, const GqaConfig& config,
                                  const GqaWeights& weights, const RowMatrix& x) {
  std::vector<std::unique_ptr<Op>> instances;
  std::vector<std::unique_ptr<char[]>> paddings;  // live blocks of 8, 24, 40, ... bytes in between
  for (std::size_t instance = 0; instance < 6; ++instance) {
    SCOPED_TRACE("instance " + std::to_string(instance));
    paddings.emplace_back(new char[16 * instance + 8]);
    instances.push_back(std::make_unique<Op>(config, weights));
    expect_bit_for_bit(expected, transcript(*instances.back(), x));
  }
}

TYPED_TEST(GqaLayer, KvHeadsEqualToHeadsIsMultiHeadAttentionBitForBit) {
  GqaConfig config = gqa_config(48, 6, 6, 16);
  const GqaWeights weights = ref::random_gqa_weights(config, 61);
  const RowMatrix x = ref::random_inputs(25, config.d_model, 62);
  GroupedQueryAttention<TypeParam> gqa(config, weights);
  const Transcript expected = transcript(gqa, x);
  expect_instances_bit_for_bit<MultiHeadAttention<TypeParam>>(expected, config, weights, x);
  config.kv_heads = 0;  // MHA fills it in
  MultiHeadAttention<TypeParam> mha(config, weights);
  EXPECT_TRUE(gqa.cache_record() == mha.cache_record());
  expect_instances_bit_for_bit<MultiHeadAttention<TypeParam>>(expected, config, weights, x);
}

TYPED_TEST(GqaLayer, OneKvHeadIsMultiQueryAttentionBitForBit) {
  GqaConfig config = gqa_config(48, 6, 1, 16);
  const GqaWeights weights = ref::random_gqa_weights(config, 71);
  const RowMatrix x = ref::random_inputs(25, config.d_model, 72);
  GroupedQueryAttention<TypeParam> gqa(config, weights);
  const Transcript expected = transcript(gqa, x);
  expect_instances_bit_for_bit<MultiQueryAttention<TypeParam>>(expected, config, weights, x);
  config.kv_heads = 0;  // MQA fills it in
  MultiQueryAttention<TypeParam> mqa(config, weights);
  EXPECT_TRUE(gqa.cache_record() == mqa.cache_record());
  expect_instances_bit_for_bit<MultiQueryAttention<TypeParam>>(expected, config, weights, x);
}

// Two instances of one operator, kept alive together, agree bit for bit.
TYPED_TEST(GqaLayer, TwoInstancesOfOneOperatorAgreeBitForBit) {
  const GqaConfig config = gqa_config(48, 6, 2, 16);
  const GqaWeights weights = ref::random_gqa_weights(config, 73);
  const RowMatrix x = ref::random_inputs(25, config.d_model, 74);
  GroupedQueryAttention<TypeParam> first(config, weights);
  expect_instances_bit_for_bit<GroupedQueryAttention<TypeParam>>(transcript(first, x), config,
                                                                 weights, x);
}

// ---- odd sizes ----------------------------------------------------------------------------------

struct OddCase {
  const char* name;
  Index tokens;
  Index d_model;
  Index heads;
  Index kv_heads;
  Index head_dim;
  Index value_dim;   // 0: head_dim
  Index rotary_dim;  // 0: the whole head; -1: RoPE off
  RopePairing pairing;
  CacheKind cache;
  Index page_tokens;
  StorageType storage;
};

class GqaOddSizes : public ::testing::TestWithParam<OddCase> {};

// Each case through prefill, token-by-token decode and prefill in chunks of 7, each on a fresh
// cache of its kind, against the reference.
TEST_P(GqaOddSizes, EveryModeMatchesDoubleReference) {
  const OddCase& c = GetParam();
  GqaConfig config = gqa_config(c.d_model, c.heads, c.kv_heads, c.head_dim, c.value_dim);
  config.rope.enabled = c.rotary_dim >= 0;
  config.rope.rotary_dim = c.rotary_dim > 0 ? c.rotary_dim : 0;
  config.rope.pairing = c.pairing;
  const GqaWeights weights = ref::random_gqa_weights(config, 81);
  const RowMatrix x = ref::random_inputs(c.tokens, c.d_model, 82);
  const ExactLayer exact = exact_layer(config, weights, x);
  with_storage(c.storage, [&](auto tag) {
    using S = decltype(tag);
    GroupedQueryAttention<S> op(config, weights);
    for (Feed feed : kDecodePrefillChunked) {
      SCOPED_TRACE(name_of(feed));
      auto cache = make_cache(op.cache_record(), c.cache, 1, c.tokens, c.page_tokens);
      const SequenceId seq = cache->add_sequence();
      const RowMatrix y = run_sequence(op, *cache, seq, x, feed);
      expect_layer_matches_reference(config, weights, x, y, *cache, seq, exact);
    }
  });
}

// Group ratios 1, 2, 3, 4, 5, 7, 8, 17; heads 1, 3, 17; head dims 8, 40, 64, 96, 128, 129;
// d_v != d_h; lengths 1, 2, 15, 16, 17, 33, 65, 70, 113 around pages of 3, 15, 16 and 17
// tokens, the attention core's 16-query chunks and 64-token tiles; every storage type and both
// RoPE pairings.
constexpr RopePairing kSplit = RopePairing::half_split;
constexpr RopePairing kPairs = RopePairing::interleaved;
constexpr CacheKind kFlat = CacheKind::contiguous;
constexpr CacheKind kPaged = CacheKind::paged;
constexpr StorageType kF32 = StorageType::f32;
constexpr StorageType kBf16 = StorageType::bf16;
constexpr StorageType kF16 = StorageType::f16;

// clang-format off
const OddCase kOddCases[] = {
  // name                          T   d   h   g  d_h d_v  rot pairing cache  page storage
  {"T1_H1_G1_Dh8",                 1, 16,  1,  1,   8,  0,   0, kSplit, kFlat,   0, kF32},
  {"T2_H3_G1_Dh40",                2, 24,  3,  1,  40,  0,   0, kPairs, kPaged, 16, kF32},
  {"T17_H17_G17_Dh64_Bf16",       17, 40, 17, 17,  64,  0,   0, kSplit, kPaged, 16, kBf16},
  {"T113_H8_G4_Dh128_Page15",    113, 64,  8,  4, 128,  0,   0, kSplit, kPaged, 15, kF32},
  {"T113_H16_G4_Dh96_Half",      113, 32, 16,  4,  96,  0,   0, kPairs, kPaged, 17, kF16},
  {"T17_H10_G2_Dh129_Rot128",     17, 33, 10,  2, 129,  0, 128, kSplit, kFlat,   0, kF32},
  {"T33_H7_G1_Dh64_Bf16",         33, 48,  7,  1,  64,  0,   0, kPairs, kFlat,   0, kBf16},
  {"T16_H8_G1_Dh40_Dv24",         16, 40,  8,  1,  40, 24,   0, kSplit, kPaged, 16, kF32},
  {"T15_H4_G2_Dh40_Dv24",         15, 40,  4,  2,  40, 24,   0, kPairs, kPaged, 16, kF32},
  {"T17_H6_G2_Dh64_Rot16_Half",   17, 40,  6,  2,  64,  0,  16, kSplit, kPaged, 16, kF16},
  {"T65_H12_G3_Dh8",              65, 24, 12,  3,   8,  0,   0, kSplit, kPaged, 16, kF32},
  {"T31_H3_G3_Dh129_NoRope",      31, 20,  3,  3, 129,  0,  -1, kSplit, kFlat,   0, kF32},
  {"T33_H17_G1_Dh24_Dv40_Half",   33, 36, 17,  1,  24, 40,   0, kPairs, kPaged, 17, kF16},
  {"T48_H10_G5_Dh40_Dv24_Bf16",   48, 40, 10,  5,  40, 24,   0, kPairs, kPaged, 15, kBf16},
  // pages shorter than the scorer's 8-token runs: a run, and its prefetch, span 3 pages
  {"T70_H8_G4_Dh40_Page3_Bf16",   70, 32,  8,  4,  40,  0,   0, kSplit, kPaged,  3, kBf16},
};
// clang-format on

INSTANTIATE_TEST_SUITE_P(Cases, GqaOddSizes, ::testing::ValuesIn(kOddCases),
                         [](const ::testing::TestParamInfo<OddCase>& info) {
                           return std::string(info.param.name);
                         });

// ---- RoPE (§4, §6.5) ----------------------------------------------------------------------------

using RopeCase = std::tuple<RopePairing, RopeDirection, Index>;  // pairing, direction, rotary_dim

RopeConfig rope_config(const RopeCase& c) {
  RopeConfig rope;
  rope.pairing = std::get<0>(c);
  rope.direction = std::get<1>(c);
  rope.rotary_dim = std::get<2>(c);
  return rope;
}

class GqaRope : public ::testing::TestWithParam<RopeCase> {
 protected:
  static constexpr Index kHeadDim = 64;
};

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double sum = 0.0;
  for (std::size_t c = 0; c < a.size(); ++c) sum += a[c] * b[c];
  return sum;
}
double norm(const std::vector<double>& a) { return std::sqrt(dot(a, a)); }

// The library's Rope on one float vector, returned as doubles.
std::vector<double> rotated(const Rope& rope, std::vector<float> x, Index position) {
  rope.apply(x.data(), 1, static_cast<Index>(x.size()), position);
  return std::vector<double>(x.begin(), x.end());
}
std::vector<double> rotated(const RopeConfig& config, std::vector<double> x, double position) {
  ref::rope_reference(x.data(), static_cast<Index>(x.size()), position, config);
  return x;
}

TEST_P(GqaRope, LibraryRopeMatchesDoubleReference) {
  const RopeConfig config = rope_config(GetParam());
  const Rope rope(config, kHeadDim);
  const Index count = 3, stride = kHeadDim + 6;  // padding between vectors must stay untouched
  ref::Random random(91);
  for (Index position : {0, 1, 2, 17, 255, 4096, 1000003}) {
    SCOPED_TRACE("position " + std::to_string(position));
    const std::vector<float> x = random.floats(count * stride);
    std::vector<float> y = x;
    rope.apply(y.data(), count, stride, position);
    const Index rotary = ref::rotary_width(config, kHeadDim);
    for (Index v = 0; v < count; ++v) {
      std::vector<double> expected(x.begin() + v * stride, x.begin() + v * stride + kHeadDim);
      ref::rope_reference(expected.data(), kHeadDim, static_cast<double>(position), config);
      const double bound = 1e-6 * std::max(1.0, ref::max_abs(expected));  // a few fp32 ulps
      EXPECT_LE(ref::max_abs_error(y.data() + v * stride, expected.data(), kHeadDim), bound);
      for (Index c = rotary; c < stride; ++c)  // pass-through features and padding, exactly
        EXPECT_EQ(y[static_cast<std::size_t>(v * stride + c)],
                  x[static_cast<std::size_t>(v * stride + c)]);
    }
  }
}

// §6.5: one offset added to every position leaves every score unchanged.
TEST_P(GqaRope, AddingOneOffsetToEveryPositionLeavesScoresUnchanged) {
  const RopeConfig config = rope_config(GetParam());
  const Rope rope(config, kHeadDim);
  ref::Random random(92);
  const std::vector<float> q = random.floats(kHeadDim, 1.0 / 8.0);  // |q| ~ 1
  const std::vector<float> k = random.floats(kHeadDim, 1.0 / 8.0);
  const std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end());
  const double scale = norm(qd) * norm(kd);
  for (const auto& [p, s] :
       std::vector<std::pair<Index, Index>>{{0, 0}, {5, 2}, {100, 37}, {1000, 0}, {4095, 4000}}) {
    const double base_score = dot(rotated(rope, q, p), rotated(rope, k, s));
    const double base_exact = dot(rotated(config, qd, double(p)), rotated(config, kd, double(s)));
    for (Index offset : {1, 77, 4096, 100000}) {
      SCOPED_TRACE("p " + std::to_string(p) + " s " + std::to_string(s) + " offset " +
                   std::to_string(offset));
      EXPECT_NEAR(dot(rotated(rope, q, p + offset), rotated(rope, k, s + offset)), base_score,
                  1e-5 * scale);
      EXPECT_NEAR(
          dot(rotated(config, qd, double(p + offset)), rotated(config, kd, double(s + offset))),
          base_exact, 1e-12 * scale);
    }
  }
}

// §6.5: rotating K when it is written (R(s) k, cached) gives the scores of rotating at read
// time, where only the relative offset matters: q_p . k_s -> (R(p - s) q) . k with k unrotated.
TEST_P(GqaRope, RotatingKeysAtWriteTimeEqualsRotatingAtReadTime) {
  const RopeConfig config = rope_config(GetParam());
  const Rope rope(config, kHeadDim);
  ref::Random random(93);
  const std::vector<float> q = random.floats(kHeadDim, 1.0 / 8.0);
  const std::vector<float> k = random.floats(kHeadDim, 1.0 / 8.0);
  const std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end());
  const double scale = norm(qd) * norm(kd);
  for (const auto& [p, s] :
       std::vector<std::pair<Index, Index>>{{0, 0}, {1, 0}, {9, 4}, {300, 299}, {4096, 17}}) {
    SCOPED_TRACE("p " + std::to_string(p) + " s " + std::to_string(s));
    EXPECT_NEAR(dot(rotated(rope, q, p), rotated(rope, k, s)), dot(rotated(rope, q, p - s), kd),
                1e-5 * scale);
    EXPECT_NEAR(dot(rotated(config, qd, double(p)), rotated(config, kd, double(s))),
                dot(rotated(config, qd, double(p - s)), kd), 1e-12 * scale);
  }

  // The same through a whole layer: the library (keys rotated before caching) against attention
  // that keeps keys unrotated and rotates each query by its offset to each key.
  GqaConfig layer = gqa_config(32, 4, 2, kHeadDim);
  layer.rope = config;
  const GqaWeights weights = ref::random_gqa_weights(layer, 94);
  const RowMatrix x = ref::random_inputs(40, layer.d_model, 95);
  GqaConfig unrotated = layer;
  unrotated.rope.enabled = false;
  const ref::Projections p = ref::gqa_projections(unrotated, weights, x.cast<double>());
  ref::Tensor3 o(x.rows(), layer.heads, kHeadDim);
  const Index group = layer.heads / layer.kv_heads;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index i = 0; i < layer.heads; ++i) {
      std::vector<double> scores;
      for (Index s = 0; s <= t; ++s) {
        std::vector<double> query(p.q.row(t, i), p.q.row(t, i) + kHeadDim);
        ref::rope_reference(query.data(), kHeadDim, double(t - s), config);
        scores.push_back(dot(query, std::vector<double>(p.k.row(s, i / group),
                                                        p.k.row(s, i / group) + kHeadDim)) *
                         ref::gqa_scale(layer));
      }
      const double top = *std::max_element(scores.begin(), scores.end());
      double sum = 0.0;
      for (double& score : scores) sum += (score = std::exp(score - top));
      for (Index s = 0; s <= t; ++s)
        for (Index c = 0; c < kHeadDim; ++c)
          o.at(t, i, c) += scores[static_cast<std::size_t>(s)] / sum * p.v.at(s, i / group, c);
    }
  const Eigen::MatrixXd read_time = ref::gqa_output(weights, o);
  const Eigen::MatrixXd write_time = ref::gqa_layer_reference(layer, weights, x.cast<double>());
  EXPECT_LE((read_time - write_time).cwiseAbs().maxCoeff(), 1e-12 * scale_of(write_time));

  GroupedQueryAttention<float> op(layer, weights);
  auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, x.rows());
  const SequenceId seq = cache->add_sequence();
  const RowMatrix y = run_sequence(op, *cache, seq, x, Feed::decode);
  EXPECT_LE(max_abs_error(y, read_time), kFp32Tolerance * scale_of(read_time));
}

TEST_P(GqaRope, LayerMatchesDoubleReference) {
  GqaConfig config = gqa_config(32, 4, 2, kHeadDim);
  config.rope = rope_config(GetParam());
  const GqaWeights weights = ref::random_gqa_weights(config, 96);
  const RowMatrix x = ref::random_inputs(40, config.d_model, 97);
  GroupedQueryAttention<float> op(config, weights);
  const ExactLayer exact = exact_layer(config, weights, x);
  for (Feed feed : kDecodePrefillChunked) {
    SCOPED_TRACE(name_of(feed));
    auto cache = make_cache(op.cache_record(), CacheKind::contiguous, 1, x.rows());
    const SequenceId seq = cache->add_sequence();
    const RowMatrix y = run_sequence(op, *cache, seq, x, feed);
    expect_layer_matches_reference(config, weights, x, y, *cache, seq, exact);
  }
  // And the reference itself: the layer does not change when every position moves by one offset.
  const Eigen::MatrixXd at_zero = ref::gqa_layer_reference(config, weights, x.cast<double>(), 0);
  const Eigen::MatrixXd shifted = ref::gqa_layer_reference(config, weights, x.cast<double>(), 5000);
  EXPECT_LE((at_zero - shifted).cwiseAbs().maxCoeff(), 1e-10 * scale_of(at_zero));
}

INSTANTIATE_TEST_SUITE_P(
    AllConventions, GqaRope,
    ::testing::Combine(::testing::Values(RopePairing::half_split, RopePairing::interleaved),
                       ::testing::Values(RopeDirection::standard, RopeDirection::reversed),
                       ::testing::Values(Index{0}, Index{16})),
    [](const ::testing::TestParamInfo<RopeCase>& info) {
      const RopeCase& c = info.param;
      return std::string(std::get<0>(c) == RopePairing::half_split ? "HalfSplit" : "Interleaved") +
             (std::get<1>(c) == RopeDirection::standard ? "_Standard" : "_Reversed") +
             (std::get<2>(c) == 0 ? "_Full" : "_Partial" + std::to_string(std::get<2>(c)));
    });

// The spec's conventions by hand, for both the reference and the library: a unit vector at
// position 1 turns by 1 radian in pair 0 (theta_0 = 1), towards its partner feature.
TEST(Rope, PairingAndDirectionFollowTheSpecByHand) {
  const double c1 = std::cos(1.0), s1 = std::sin(1.0);
  struct Expectation {
    RopePairing pairing;
    RopeDirection direction;
    Index partner;  // of feature 0
    double sign;    // of sin at the partner
  };
  for (const Expectation& e :
       {Expectation{RopePairing::half_split, RopeDirection::standard, 2, 1},
        Expectation{RopePairing::half_split, RopeDirection::reversed, 2, -1},
        Expectation{RopePairing::interleaved, RopeDirection::standard, 1, 1},
        Expectation{RopePairing::interleaved, RopeDirection::reversed, 1, -1}}) {
    RopeConfig config;
    config.pairing = e.pairing;
    config.direction = e.direction;
    std::vector<double> expected(4, 0.0);
    expected[0] = c1;
    expected[static_cast<std::size_t>(e.partner)] = e.sign * s1;
    const std::vector<double> by_reference = rotated(config, {1, 0, 0, 0}, 1.0);
    const std::vector<double> by_library = rotated(Rope(config, 4), {1, 0, 0, 0}, 1);
    for (std::size_t c = 0; c < 4; ++c) {
      EXPECT_NEAR(by_reference[c], expected[c], 1e-15);
      EXPECT_NEAR(by_library[c], expected[c], 1e-7);
    }
    // Pair 1 turns by base^(-2/4) = 0.01 rad: feature 1 (half-split) or 2 (interleaved) with
    // its partner 3.
    const Index first = e.pairing == RopePairing::half_split ? 1 : 2;
    std::vector<double> unit(4, 0.0);
    unit[static_cast<std::size_t>(first)] = 1.0;
    const std::vector<double> turned = rotated(config, unit, 1.0);
    EXPECT_NEAR(turned[static_cast<std::size_t>(first)], std::cos(0.01), 1e-15);
    EXPECT_NEAR(turned[3], e.sign * std::sin(0.01), 1e-15);
  }
}

TEST(Rope, DisabledIsTheIdentity) {
  RopeConfig config;
  config.enabled = false;
  config.rotary_dim = 7;  // ignored when disabled
  const Rope rope(config, 9);
  ref::Random random(98);
  const std::vector<float> x = random.floats(3 * 9);
  std::vector<float> y = x;
  rope.apply(y.data(), 3, 9, 12345);
  EXPECT_TRUE(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0);
  std::vector<double> xd(x.begin(), x.begin() + 9);
  EXPECT_EQ(rotated(config, xd, 12345.0), xd);
}

// ---- online softmax and merging (§6.7) ----------------------------------------------------------

// Softmax of scores [rows, n] (entries -inf are masked) over values [n, width], in double.
struct SoftmaxReference {
  std::vector<double> out;  // [rows, width]
  std::vector<double> lse;  // [rows]
};
SoftmaxReference softmax_reference(const RowMatrix& scores, const RowMatrix& values) {
  const Index rows = scores.rows(), width = values.cols();
  SoftmaxReference r{std::vector<double>(static_cast<std::size_t>(rows * width), 0.0),
                     std::vector<double>(static_cast<std::size_t>(rows), 0.0)};
  for (Index i = 0; i < rows; ++i) {
    double top = -std::numeric_limits<double>::infinity();
    for (Index s = 0; s < scores.cols(); ++s) top = std::max(top, double(scores(i, s)));
    double sum = 0.0;
    for (Index s = 0; s < scores.cols(); ++s) {
      const double weight = std::exp(double(scores(i, s)) - top);
      sum += weight;
      for (Index c = 0; c < width; ++c)
        r.out[static_cast<std::size_t>(i * width + c)] += weight * values(s, c);
    }
    for (Index c = 0; c < width; ++c) r.out[static_cast<std::size_t>(i * width + c)] /= sum;
    r.lse[static_cast<std::size_t>(i)] = top + std::log(sum);
  }
  return r;
}

// A SoftmaxState with its own memory.
struct OwnedState {
  std::vector<float> memory;
  SoftmaxState state;
  OwnedState(Index rows, Index width)
      : memory(static_cast<std::size_t>(SoftmaxState::floats_needed(rows, width))),
        state(memory.data(), memory.data() + rows, memory.data() + 2 * rows, rows, width) {
    state.reset();
  }
  // Keys [first, first + n): absorb their scores, then add weights x values.
  void absorb(const RowMatrix& scores, const RowMatrix& values, Index first, Index n) {
    RowMatrix block = scores.middleCols(first, n);
    state.absorb_scores(map_matrix(block.data(), block.rows(), block.cols()));
    state.acc().noalias() += block * values.middleRows(first, n);
  }
};

void expect_matches(const std::vector<float>& out, const std::vector<float>& lse,
                    const SoftmaxReference& expected, double tolerance) {
  EXPECT_LE(ref::max_abs_error(out.data(), expected.out.data(), static_cast<Index>(out.size())),
            tolerance * std::max(1.0, ref::max_abs(expected.out)));
  EXPECT_LE(ref::max_abs_error(lse.data(), expected.lse.data(), static_cast<Index>(lse.size())),
            tolerance * std::max(1.0, ref::max_abs(expected.lse)));
}

TEST(SoftmaxState, AbsorbingKeysInBlocksEqualsOneSoftmax) {
  const Index rows = 5, n = 150, width = 24;
  ref::Random random(101);
  RowMatrix scores = random.matrix(rows, n, 2.0);
  const RowMatrix values = random.matrix(n, width);
  const float minus_infinity = -std::numeric_limits<float>::infinity();
  scores.block(0, 0, 1, 10).setConstant(minus_infinity);    // row 0 sees nothing in block 1
  scores.block(4, 100, 1, 50).setConstant(minus_infinity);  // row 4: a causal-style cut
  OwnedState owned(rows, width);
  Index first = 0;
  for (Index block : {1, 7, 64, 78}) {
    owned.absorb(scores, values, first, block);
    first += block;
  }
  std::vector<float> out(static_cast<std::size_t>(rows * width)),
      lse(static_cast<std::size_t>(rows));
  owned.state.finish(out.data(), width, lse.data());
  expect_matches(out, lse, softmax_reference(scores, values), kSameMathTolerance);
}

TEST(SoftmaxState, MergingStatesOverDisjointKeysEqualsOneSoftmax) {
  const Index rows = 4, n = 150, width = 16;
  ref::Random random(102);
  RowMatrix scores = random.matrix(rows, n, 3.0);
  scores.block(1, 60, 1, 90).setConstant(-std::numeric_limits<float>::infinity());
  const RowMatrix values = random.matrix(n, width);
  OwnedState left(rows, width), right(rows, width), empty(rows, width);
  left.absorb(scores, values, 0, 60);
  right.absorb(scores, values, 60, 90);  // row 1 sees no key in this part
  left.state.merge(right.state);
  left.state.merge(empty.state);  // a state over no keys is neutral
  std::vector<float> out(static_cast<std::size_t>(rows * width)),
      lse(static_cast<std::size_t>(rows));
  left.state.finish(out.data(), width, lse.data());
  expect_matches(out, lse, softmax_reference(scores, values), kSameMathTolerance);
}

TEST(SoftmaxState, HugeScoresAreAbsorbedWithoutOverflow) {
  const Index rows = 3, n = 100, width = 8;
  ref::Random random(103);
  RowMatrix scores = random.matrix(rows, n, 2.0);
  scores.array() += 1e4f;  // exp(1e4) overflows fp32; the running maximum is subtracted first
  ASSERT_TRUE(std::isinf(std::exp(scores(0, 0))));
  const RowMatrix values = random.matrix(n, width);
  OwnedState owned(rows, width);
  owned.absorb(scores, values, 0, 30);
  owned.absorb(scores, values, 30, 70);
  std::vector<float> out(static_cast<std::size_t>(rows * width)),
      lse(static_cast<std::size_t>(rows));
  owned.state.finish(out.data(), width, lse.data());
  expect_matches(out, lse, softmax_reference(scores, values), kSameMathTolerance);
}

TEST(SoftmaxState, RowThatSawNoKeyGivesZeroOutputAndMinusInfinityLse) {
  OwnedState owned(2, 3);
  RowMatrix scores(2, 4);
  scores << 1, 2, 3, 4, -INFINITY, -INFINITY, -INFINITY, -INFINITY;
  const RowMatrix values = RowMatrix::Ones(4, 3);
  owned.absorb(scores, values, 0, 4);
  std::vector<float> out(6, 1.0f), lse(2);
  owned.state.finish(out.data(), 3, lse.data());
  EXPECT_FLOAT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_EQ(out[5], 0.0f);
  EXPECT_EQ(lse[1], -std::numeric_limits<float>::infinity());
}

// Keys of one sequence split over several sequences of the cache; one decode query attends to
// each part through the bare kernel; the (out, lse) pairs merge with merge_partial.
struct SplitAttention {
  std::vector<float> one_pass_out, one_pass_lse, merged_out, merged_lse;
};

SplitAttention split_and_merge(const std::vector<float>& q, const std::vector<float>& k,
                               const std::vector<float>& v, Index h, Index g, Index d_k, Index d_v,
                               const std::vector<Index>& parts, bool reverse_merge) {
  Index length = 0;
  for (Index part : parts) length += part;
  const GqaKernel<float> kernel(h, g, d_k, d_v);
  ContiguousKvCache cache(kernel.cache_record(), static_cast<Index>(parts.size()) + 1, length);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  const SequenceId all = cache.add_sequence();
  cache.append(all, length, {{k.data(), g, d_k}, {v.data(), g, d_v}});
  SplitAttention r;
  r.one_pass_out.resize(static_cast<std::size_t>(h * d_v));
  r.one_pass_lse.resize(static_cast<std::size_t>(h));
  kernel.attend(q.data(), 1, cache.view(all), r.one_pass_out.data(), r.one_pass_lse.data(),
                workspace.data());

  std::vector<std::vector<float>> outs, lses;
  Index first = 0;
  for (Index part : parts) {
    const SequenceId seq = cache.add_sequence();
    cache.append(seq, part,
                 {{k.data() + first * g * d_k, g, d_k}, {v.data() + first * g * d_v, g, d_v}});
    outs.emplace_back(static_cast<std::size_t>(h * d_v));
    lses.emplace_back(static_cast<std::size_t>(h));
    kernel.attend(q.data(), 1, cache.view(seq), outs.back().data(), lses.back().data(),
                  workspace.data());
    first += part;
  }
  if (reverse_merge) {
    std::reverse(outs.begin(), outs.end());
    std::reverse(lses.begin(), lses.end());
  }
  r.merged_out = outs[0];
  r.merged_lse = lses[0];
  for (std::size_t p = 1; p < outs.size(); ++p)
    for (Index i = 0; i < h; ++i)
      merge_partial(r.merged_out.data() + i * d_v, &r.merged_lse[static_cast<std::size_t>(i)],
                    outs[p].data() + i * d_v, lses[p][static_cast<std::size_t>(i)], d_v);
  return r;
}

void expect_close(const std::vector<float>& actual, const std::vector<float>& expected,
                  double tolerance) {
  const std::vector<double> e(expected.begin(), expected.end());
  EXPECT_LE(ref::max_abs_error(actual.data(), e.data(), static_cast<Index>(e.size())),
            tolerance * std::max(1.0, ref::max_abs(e)));
}

TEST(MergePartial, SplittingTheKeysAndMergingEqualsOnePass) {
  const Index h = 4, g = 2, d_k = 32, d_v = 16, length = 150;
  ref::Random random(111);
  const std::vector<float> q = random.floats(h * d_k, 2.0);  // scores ~ N(0, 4)
  const std::vector<float> k = random.floats(length * g * d_k);
  const std::vector<float> v = random.floats(length * g * d_v);
  for (bool reverse : {false, true}) {
    SCOPED_TRACE(reverse ? "merged last part first" : "merged in order");
    const SplitAttention r = split_and_merge(q, k, v, h, g, d_k, d_v, {1, 37, 64, 48}, reverse);
    expect_close(r.merged_out, r.one_pass_out, kSameMathTolerance);
    expect_close(r.merged_lse, r.one_pass_lse, kSameMathTolerance);
    const ref::AttentionResult expected = ref::attention_reference(
        ref::Tensor3::from_floats(q.data(), 1, h, d_k),
        ref::Tensor3::from_floats(k.data(), length, g, d_k),
        ref::Tensor3::from_floats(v.data(), length, g, d_v), 1.0 / std::sqrt(double(d_k)));
    EXPECT_LE(ref::max_abs_error(r.merged_out.data(), expected.out.data.data(), h * d_v),
              kFp32Tolerance * std::max(1.0, ref::max_abs(expected.out)));
    EXPECT_LE(ref::max_abs_error(r.merged_lse.data(), expected.lse.data(), h),
              kFp32Tolerance * std::max(1.0, ref::max_abs(expected.lse)));
  }
}

// Scores near 1e4 (exp(1e4) = inf in fp32). The scores are exact in fp32 by construction: the
// scaled query is [10000, +-1, 0, ...] (d_k = 64, scale 1/8 is exact) and key s is [1, m_s / 8,
// 0, ...] with integer m_s in [-16, 16], so score = 10000 +- m_s / 8 needs 17 significant bits.
// One pass is then as exact as with small scores. A merged result inherits the fp32 rounding of
// each part's LSE near 1e4 (half an ulp, 2^-11): the merge weights exp(lse_p - max) are off by up
// to 2 * 2^-11 relative, which moves the merged output by that times |out_a - out_b| <= 2 max|v|,
// i.e. <= 2^-9 max|v|. The bound is 2^-8 max|v| (measured: 9e-5). The maximum-LSE subtraction
// keeps everything finite.
TEST(MergePartial, HugeScoresMergeWithoutOverflow) {
  const Index h = 4, g = 2, d_k = 64, d_v = 16, length = 120;
  ref::Random random(112);
  std::vector<float> q(static_cast<std::size_t>(h * d_k), 0.0f);
  for (Index i = 0; i < h; ++i) {
    q[static_cast<std::size_t>(i * d_k)] = 80000.0f;
    q[static_cast<std::size_t>(i * d_k + 1)] = i % 2 == 0 ? 8.0f : -8.0f;
  }
  std::vector<float> k(static_cast<std::size_t>(length * g * d_k), 0.0f);
  for (Index s = 0; s < length * g; ++s) {
    k[static_cast<std::size_t>(s * d_k)] = 1.0f;
    k[static_cast<std::size_t>(s * d_k + 1)] = static_cast<float>(random.integer(-16, 16)) / 8.0f;
  }
  const std::vector<float> v = random.floats(length * g * d_v);
  ASSERT_TRUE(std::isinf(std::exp(10000.0f)));

  const SplitAttention r = split_and_merge(q, k, v, h, g, d_k, d_v, {50, 1, 69}, false);
  const ref::AttentionResult expected =
      ref::attention_reference(ref::Tensor3::from_floats(q.data(), 1, h, d_k),
                               ref::Tensor3::from_floats(k.data(), length, g, d_k),
                               ref::Tensor3::from_floats(v.data(), length, g, d_v), 0.125);
  for (const std::vector<float>* out : {&r.one_pass_out, &r.merged_out})
    for (float value : *out) ASSERT_TRUE(std::isfinite(value));
  EXPECT_LE(ref::max_abs_error(r.one_pass_out.data(), expected.out.data.data(), h * d_v),
            kFp32Tolerance * std::max(1.0, ref::max_abs(expected.out)));
  const double max_v = ref::max_abs(std::vector<double>(v.begin(), v.end()));
  EXPECT_LE(ref::max_abs_error(r.merged_out.data(), expected.out.data.data(), h * d_v),
            std::ldexp(1.0, -8) * max_v);
  for (const std::vector<float>* lse : {&r.one_pass_lse, &r.merged_lse})  // |lse| ~ 1e4
    EXPECT_LE(ref::max_abs_error(lse->data(), expected.lse.data(), h),
              1e-6 * ref::max_abs(expected.lse));
}

TEST(MergePartial, AnEmptyPartIsNeutral) {
  std::vector<float> out = {1.5f, -2.0f};
  float lse = 3.25f;
  const std::vector<float> nothing = {7.0f, 7.0f};
  merge_partial(out.data(), &lse, nothing.data(), -std::numeric_limits<float>::infinity(), 2);
  EXPECT_EQ(out, (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(lse, 3.25f);

  std::vector<float> empty = {0.0f, 0.0f};
  float empty_lse = -std::numeric_limits<float>::infinity();
  merge_partial(empty.data(), &empty_lse, out.data(), lse, 2);
  EXPECT_EQ(empty, out);
  EXPECT_EQ(empty_lse, lse);
}

// A prefix view is the cache as an earlier decode step saw it: attending to prefix(L) with the
// query of token L-1 gives row L-1 of the causal prefill.
TEST(GqaKernel, PrefixViewGivesTheCausalRowOfAPrefill) {
  const Index h = 4, g = 1, d_k = 16, d_v = 16, length = 40;
  const GqaKernel<float> kernel(h, g, d_k, d_v);
  ref::Random random(121);
  const std::vector<float> q = random.floats(length * h * d_k);
  const std::vector<float> k = random.floats(length * g * d_k);
  const std::vector<float> v = random.floats(length * g * d_v);
  PagedKvCache cache(kernel.cache_record(), 16, 3, 1);
  const SequenceId seq = cache.add_sequence();
  cache.append(seq, length, {{k.data(), g, d_k}, {v.data(), g, d_v}});
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  std::vector<float> all(static_cast<std::size_t>(length * h * d_v));
  kernel.attend(q.data(), length, cache.view(seq), all.data(), nullptr, workspace.data());
  for (Index visible : {1, 2, 16, 17, 33, 40}) {
    std::vector<float> one(static_cast<std::size_t>(h * d_v));
    kernel.attend(q.data() + (visible - 1) * h * d_k, 1, cache.view(seq).prefix(visible),
                  one.data(), nullptr, workspace.data());
    const std::vector<float> row(all.begin() + (visible - 1) * h * d_v,
                                 all.begin() + visible * h * d_v);
    expect_close(one, row, kSameMathTolerance);
  }
}

// The same call with the same inputs gives the same bits wherever the caller's workspace sits:
// otherwise two operator instances (whose workspaces land at different heap addresses) disagree
// in the last bits, and §6.3's bit-for-bit identities fail depending on the heap's layout.
TEST(GqaKernel, ResultDoesNotDependOnTheWorkspaceAddress) {
  const Index h = 6, g = 2, d_k = 16, d_v = 16, length = 37;
  const GqaKernel<float> kernel(h, g, d_k, d_v);
  ref::Random random(122);
  const std::vector<float> q = random.floats(5 * h * d_k);
  const std::vector<float> k = random.floats(length * g * d_k);
  const std::vector<float> v = random.floats(length * g * d_v);
  PagedKvCache cache(kernel.cache_record(), 16, 3, 1);
  const SequenceId seq = cache.add_sequence();
  cache.append(seq, length, {{k.data(), g, d_k}, {v.data(), g, d_v}});
  std::vector<float> memory(static_cast<std::size_t>(kernel.workspace_floats() + 16));
  for (Index n : {1, 5}) {
    std::vector<float> first_out, first_lse;
    for (Index offset = 0; offset < 16; ++offset) {  // every 4-byte step of a 64-byte line
      std::vector<float> out(static_cast<std::size_t>(n * h * d_v)),
          lse(static_cast<std::size_t>(n * h));
      kernel.attend(q.data(), n, cache.view(seq), out.data(), lse.data(), memory.data() + offset);
      if (offset == 0) {
        first_out = out;
        first_lse = lse;
        continue;
      }
      EXPECT_TRUE(std::memcmp(out.data(), first_out.data(), out.size() * sizeof(float)) == 0 &&
                  std::memcmp(lse.data(), first_lse.data(), lse.size() * sizeof(float)) == 0)
          << n << " query tokens: the workspace moved by " << offset
          << " floats changes the result";
    }
  }
}

// ---- prefill == decode == chunks (§6.8), batching -----------------------------------------------

TEST(GqaEquivalence, PrefillDecodeStepsAndChunksAgreeOnBothCacheStorages) {
  const GqaConfig config = gqa_config(48, 6, 3, 32);
  const GqaWeights weights = ref::random_gqa_weights(config, 131);
  const RowMatrix x = ref::random_inputs(47, config.d_model, 132);
  GroupedQueryAttention<float> op(config, weights);
  std::vector<std::pair<std::string, RowMatrix>> results;
  for (CacheKind kind : kAllCacheKinds) {
    auto run = [&](const std::string& plan,
                   const std::function<void(KvCache&, SequenceId, RowMatrix&)>& f) {
      auto cache = make_cache(op.cache_record(), kind, 1, x.rows());
      const SequenceId seq = cache->add_sequence();
      RowMatrix y =
          RowMatrix::Constant(x.rows(), x.cols(), std::numeric_limits<float>::quiet_NaN());
      f(*cache, seq, y);
      results.emplace_back(std::string(name_of(kind)) + " " + plan, y);
    };
    run("prefill 47",
        [&](KvCache& c, SequenceId s, RowMatrix& y) { prefill_chunks(op, c, s, x, y, 0, {47}); });
    run("47 decode steps",
        [&](KvCache& c, SequenceId s, RowMatrix& y) { decode_tokens(op, c, s, x, y, 0, 47); });
    run("chunks 5+1+11+30", [&](KvCache& c, SequenceId s, RowMatrix& y) {
      prefill_chunks(op, c, s, x, y, 0, {5, 1, 11, 30});
    });
    run("5, decode, 11, 30", [&](KvCache& c, SequenceId s, RowMatrix& y) {
      prefill_chunks(op, c, s, x, y, 0, {5});
      decode_tokens(op, c, s, x, y, 5, 1);
      prefill_chunks(op, c, s, x, y, 6, {11, 30});
    });
  }
  const Eigen::MatrixXd first = results.front().second.cast<double>();
  for (const auto& [name, y] : results)
    EXPECT_LE(max_abs_error(y, first), kSameMathTolerance * scale_of(first))
        << name << " vs " << results.front().first;
  const Eigen::MatrixXd expected = ref::gqa_layer_reference(config, weights, x.cast<double>());
  EXPECT_LE(max_abs_error(results.front().second, expected), kFp32Tolerance * scale_of(expected));
}

TEST(GqaBatchedDecode, OneBatchedCallEqualsDecodingEachSequenceAlone) {
  const GqaConfig config = gqa_config(64, 8, 2, 32);
  const GqaWeights weights = ref::random_gqa_weights(config, 141);
  const Index lengths[] = {1, 5, 300};
  const Index steps = 20;  // every sequence crosses a page end (16, 16, 304) on the way
  std::vector<RowMatrix> x;
  for (Index s = 0; s < 3; ++s)
    x.push_back(ref::random_inputs(lengths[s] + steps, config.d_model,
                                   142 + static_cast<std::uint32_t>(s)));
  GroupedQueryAttention<float> op(config, weights);
  auto batched = make_cache(op.cache_record(), CacheKind::paged, 3, 320);
  auto alone = make_cache(op.cache_record(), CacheKind::paged, 3, 320);
  std::vector<SequenceId> seqs;
  std::vector<RowMatrix> y_batched, y_alone;
  for (Index s = 0; s < 3; ++s) {
    seqs.push_back(batched->add_sequence());
    ASSERT_EQ(alone->add_sequence(), seqs.back());
    y_batched.emplace_back(x[s].rows(), x[s].cols());
    y_alone.emplace_back(x[s].rows(), x[s].cols());
    prefill_chunks(op, *batched, seqs[s], x[s], y_batched[s], 0, {lengths[s]});
    prefill_chunks(op, *alone, seqs[s], x[s], y_alone[s], 0, {lengths[s]});
  }
  for (Index step = 0; step < steps; ++step) {
    // Alternate the batch order: a sequence's row in the batch must not matter.
    const std::vector<Index> order =
        step % 2 == 0 ? std::vector<Index>{0, 1, 2} : std::vector<Index>{2, 0, 1};
    RowMatrix x_step(3, config.d_model), y_step(3, config.d_model);
    SequenceId batch[3];
    for (Index b = 0; b < 3; ++b) {
      const Index s = order[static_cast<std::size_t>(b)];
      batch[b] = seqs[static_cast<std::size_t>(s)];
      x_step.row(b) = x[s].row(lengths[s] + step);
    }
    op.decode(*batched, batch, 3, x_step.data(), y_step.data());
    for (Index b = 0; b < 3; ++b) {
      const Index s = order[static_cast<std::size_t>(b)];
      y_batched[s].row(lengths[s] + step) = y_step.row(b);
      decode_tokens(op, *alone, seqs[static_cast<std::size_t>(s)], x[s], y_alone[s],
                    lengths[s] + step, 1);
    }
  }
  for (Index s = 0; s < 3; ++s) {
    SCOPED_TRACE("sequence of length " + std::to_string(lengths[s]));
    const RowMatrix decoded_alone = y_alone[s].bottomRows(steps);
    const RowMatrix decoded_batched = y_batched[s].bottomRows(steps);
    EXPECT_LE(max_abs_error(decoded_batched, decoded_alone.cast<double>()),
              kSameMathTolerance * scale_of(decoded_alone.cast<double>()));
    expect_layer_matches_reference(config, weights, x[s], y_batched[s], *batched,
                                   seqs[static_cast<std::size_t>(s)]);
  }
}

// ---- misuse: tpattn::Error, and nothing changes -------------------------------------------------

TEST(GqaMisuse, InvalidConfigsThrowNamingTheOperatorAndArgument) {
  const GqaConfig good = gqa_config(32, 4, 2, 16);
  const GqaWeights weights = ref::random_gqa_weights(good, 151);
  auto gqa_throws = [&](const std::function<void(GqaConfig&)>& change) {
    GqaConfig config = good;
    change(config);
    return thrown_call_and_argument([&] { GroupedQueryAttention<float> op(config, weights); });
  };
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.kv_heads = 3; }),
            "GroupedQueryAttention kv_heads");  // 4 % 3 != 0
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.kv_heads = 8; }),
            "GroupedQueryAttention kv_heads");  // more than heads
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.d_model = 0; }), "GroupedQueryAttention d_model");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.heads = 0; }), "GroupedQueryAttention heads");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.kv_heads = 0; }), "GroupedQueryAttention kv_heads");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.head_dim = 0; }), "GroupedQueryAttention head_dim");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.value_dim = -1; }), "GroupedQueryAttention value_dim");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.rope.rotary_dim = 7; }),
            "GroupedQueryAttention rope.rotary_dim");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.rope.rotary_dim = 18; }),
            "GroupedQueryAttention rope.rotary_dim");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.rope.rotary_dim = -2; }),
            "GroupedQueryAttention rope.rotary_dim");
  EXPECT_EQ(gqa_throws([](GqaConfig& c) { c.rope.base = 1.0; }), "GroupedQueryAttention rope.base");
  // A whole-head rotation of an odd head is an odd rotary dim.
  EXPECT_EQ(thrown_call_and_argument([&] {
              GqaConfig config = gqa_config(32, 4, 2, 15);
              GroupedQueryAttention<float> op(config, ref::random_gqa_weights(config, 152));
            }),
            "GroupedQueryAttention rope.rotary_dim");
  EXPECT_EQ(thrown_call_and_argument([&] {
              GqaConfig config = good;
              MultiHeadAttention<float> op(config, weights);  // kv_heads 2 != heads 4
            }),
            "MultiHeadAttention kv_heads");
  EXPECT_EQ(thrown_call_and_argument([&] { MultiQueryAttention<float> op(good, weights); }),
            "MultiQueryAttention kv_heads");
  EXPECT_EQ(thrown_call_and_argument([] { GqaKernel<float> kernel(6, 4, 16, 16); }),
            "GqaKernel kv_heads");
  EXPECT_EQ(thrown_call_and_argument([] { GqaKernel<float> kernel(4, 2, 0, 16); }),
            "GqaKernel head_dim");
  EXPECT_EQ(thrown_call_and_argument([] { GqaKernel<float> kernel(4, 2, 16, 0); }),
            "GqaKernel value_dim");
}

TEST(GqaMisuse, WeightShapeMismatchThrowsNamingTheOperatorAndWeight) {
  const GqaConfig config = gqa_config(40, 4, 2, 16, 8);  // no weight is square
  const GqaWeights good = ref::random_gqa_weights(config, 153);
  for (const char* name : {"w_q", "w_k", "w_v", "w_o"}) {
    GqaWeights bad = good;
    RowMatrix& w = name[2] == 'q'   ? bad.w_q
                   : name[2] == 'k' ? bad.w_k
                   : name[2] == 'v' ? bad.w_v
                                    : bad.w_o;
    w = RowMatrix::Zero(w.rows(), w.cols() + 1);
    EXPECT_EQ(thrown_call_and_argument([&] { GroupedQueryAttention<float> op(config, bad); }),
              std::string("GroupedQueryAttention ") + name);
    w = RowMatrix::Zero(w.cols() - 1, w.rows());  // transposed
    EXPECT_EQ(thrown_call_and_argument([&] { GroupedQueryAttention<float> op(config, bad); }),
              std::string("GroupedQueryAttention ") + name);
  }
  // w_v and w_o sized for value_dim = head_dim while value_dim is 8.
  EXPECT_EQ(thrown_call_and_argument([&] {
              GroupedQueryAttention<float> op(config,
                                              ref::random_gqa_weights(gqa_config(40, 4, 2, 16), 1));
            }),
            "GroupedQueryAttention w_v");
}

// heads = kv_heads = head_dim = 2^32: h d_h is 2^64, which wrapped to 0, so weights of 0 rows
// were accepted. (RoPE is off: the test is about the products, and a 2^31-entry table is 16 GiB.)
TEST(GqaMisuse, SizeProductsThatOverflowThrowBeforeAnyAllocation) {
  const Index big = Index{1} << 32;
  GqaConfig config = gqa_config(1, big, big, big);
  config.rope.enabled = false;
  GqaWeights weights;  // the shapes the wrapped products asked for
  weights.w_q = weights.w_k = weights.w_v = RowMatrix(0, 1);
  weights.w_o = RowMatrix(1, 0);
  expect_error_before_allocating(
      [&] { GroupedQueryAttention<float> op(config, std::move(weights)); }, "GroupedQueryAttention",
      "heads x head_dim", kFitsInIndex, "4294967296 x 4294967296, which overflows");
  config.kv_heads = 1;
  expect_error_before_allocating([&] { MultiQueryAttention<float> op(config, GqaWeights{}); },
                                 "MultiQueryAttention", "heads x head_dim", kFitsInIndex,
                                 "4294967296 x 4294967296, which overflows");
  // The bare kernel: its cache record, then its workspace (16 query tokens x h rows x d_h).
  expect_error_before_allocating([&] { GqaKernel<float> kernel(big, big, big, big); }, "GqaKernel",
                                 "kv_heads x head_dim", kFitsInIndex,
                                 "4294967296 x 4294967296, which overflows");
  expect_error_before_allocating([&] { GqaKernel<float> kernel(big, 1, Index{1} << 28, 1); },
                                 "GqaKernel", "workspace_floats()", kFitsInIndex,
                                 "68719476736 x 268435456, which overflows");
}

// Sizes whose products fit but which no memory holds (head_dim 2^40: a 4 TiB RoPE table) fail
// on the weight shapes, before the RoPE table or anything else is allocated.
TEST(GqaMisuse, HugeButRepresentableSizesThrowBeforeAnyAllocation) {
  const Index huge = Index{1} << 40;
  expect_error_before_allocating(
      [&] { GroupedQueryAttention<float> op(gqa_config(1, 1, 1, huge), GqaWeights{}); },
      "GroupedQueryAttention", "w_q", "1099511627776 x 1", "0 x 0");
  GqaWeights small = ref::random_gqa_weights(gqa_config(8, 2, 1, 4), 154);
  expect_error_before_allocating(
      [&] { GroupedQueryAttention<float> op(gqa_config(8, 2, 1, 4, huge), std::move(small)); },
      "GroupedQueryAttention", "w_v", "1099511627776 x 8", "4 x 8");
  // A bare Rope whose table (rotary_dim / 2 doubles) is more than PTRDIFF_MAX bytes.
  expect_error_before_allocating(
      [] { Rope rope(RopeConfig{}, Index{1} << 62); }, "Rope", "rope table",
      "at most 1152921504606846975 doubles (PTRDIFF_MAX bytes)", "2305843009213693952 doubles");
}

// Every config, RoPE and weight-shape error is raised before the constructor allocates anything
// (the call names, the cache record, the RoPE table, the weights' copies).
TEST(GqaMisuse, EveryConstructorCheckRunsBeforeItAllocates) {
  const GqaConfig good = gqa_config(40, 4, 2, 16, 8);
  const GqaWeights weights = ref::random_gqa_weights(good, 155);
  const auto construct = [&](GqaConfig config, GqaWeights w) {
    return [config, w]() mutable { GroupedQueryAttention<float> op(config, std::move(w)); };
  };
  GqaConfig config = good;
  config.heads = 0;
  expect_error_before_allocating(construct(config, weights), "GroupedQueryAttention", "heads",
                                 ">= 1", "0");
  config = good;
  config.rope.rotary_dim = 7;
  expect_error_before_allocating(construct(config, weights), "GroupedQueryAttention",
                                 "rope.rotary_dim", "an even number", "7");
  GqaWeights wrong = weights;
  wrong.w_o = RowMatrix::Zero(40, 33);
  expect_error_before_allocating(construct(good, wrong), "GroupedQueryAttention", "w_o", "40 x 32",
                                 "40 x 33");
  expect_error_before_allocating(
      [&, w = weights]() mutable { MultiHeadAttention<float> op(good, std::move(w)); },
      "MultiHeadAttention", "kv_heads", "heads = 4 (or 0)", "2");
  expect_error_before_allocating([] { GqaKernel<float> kernel(6, 4, 16, 16); }, "GqaKernel",
                                 "kv_heads", "a divisor of heads = 6", "4");
}

// RoPE enums out of range and a base that is not a finite number > 1 are rejected, naming the
// field (before, pairing 99 rotated as interleaved and base inf as no rotation at all).
TEST(GqaMisuse, OutOfRangeRopeFieldsThrowNamingTheField) {
  const GqaConfig good = gqa_config(32, 4, 2, 16);
  const GqaWeights weights = ref::random_gqa_weights(good, 156);
  const auto with_rope = [&](const std::function<void(RopeConfig&)>& change) {
    GqaConfig config = good;
    change(config.rope);
    return
        [config, w = weights]() mutable { GroupedQueryAttention<float> op(config, std::move(w)); };
  };
  expect_error_before_allocating(
      with_rope([](RopeConfig& r) { r.pairing = static_cast<RopePairing>(99); }),
      "GroupedQueryAttention", "rope.pairing", "half_split or interleaved", "99");
  expect_error_before_allocating(
      with_rope([](RopeConfig& r) { r.direction = static_cast<RopeDirection>(2); }),
      "GroupedQueryAttention", "rope.direction", "standard or reversed", "2");
  const double inf = std::numeric_limits<double>::infinity();
  const std::pair<double, const char*> bases[] = {{inf, "inf"},
                                                  {std::numeric_limits<double>::quiet_NaN(), "nan"},
                                                  {1.0, "1"},
                                                  {0.0, "0"},
                                                  {-10000.0, "-10000"}};
  for (const auto& [base, text] : bases) {
    SCOPED_TRACE(text);
    expect_error_before_allocating(with_rope([base = base](RopeConfig& r) { r.base = base; }),
                                   "GroupedQueryAttention", "rope.base", "a finite value > 1",
                                   text);
  }
  RopeConfig bare;
  bare.pairing = static_cast<RopePairing>(99);
  expect_error_before_allocating([&] { Rope rope(bare, 8); }, "Rope", "rope.pairing",
                                 "half_split or interleaved", "99");
  // Disabled RoPE reads no other field.
  GqaConfig disabled = good;
  disabled.rope.enabled = false;
  disabled.rope.pairing = static_cast<RopePairing>(99);
  disabled.rope.base = inf;
  EXPECT_EQ(thrown_error(with_rope([&](RopeConfig& r) { r = disabled.rope; })).kind,
            "<nothing thrown>");
}

// reserve(max_batch, max_tokens): both >= 1, and a workspace (rows x floats per row + the
// kernel's) whose size fits in Index, is at most PTRDIFF_MAX bytes and can be allocated.
TEST(GqaMisuse, ReserveRejectsNonPositiveAndUnallocatableSizes) {
  const GqaConfig config = gqa_config(8, 2, 1, 4);  // 24 workspace floats per row: q, k, v, o
  GroupedQueryAttention<float> op(config, ref::random_gqa_weights(config, 157));
  // The driver's workspace for one thread: the kernel's task workspace and split slots.
  const Index kernel = AttentionPlan::workspace_bound(op.kernel().plan_shape(), 1, "");
  const std::string call = "GroupedQueryAttention::reserve";
  expect_error_before_allocating([&] { op.reserve(-1); }, call, "max_batch", ">= 1", "-1");
  expect_error_before_allocating([&] { op.reserve(0, 4); }, call, "max_batch", ">= 1", "0");
  expect_error_before_allocating([&] { op.reserve(1, -1); }, call, "max_tokens", ">= 1", "-1");
  expect_error_before_allocating([&] { op.reserve(Index{1} << 61); }, call, "workspace floats",
                                 kFitsInIndex, "2305843009213693952 x 24, which overflows");
  // Fits in Index, but is more than PTRDIFF_MAX bytes.
  const Index over = (Index{1} << 58) * 24 + kernel;
  expect_error_before_allocating([&] { op.reserve(1, Index{1} << 58); }, call, "workspace",
                                 "at most 2305843009213693951 floats (PTRDIFF_MAX bytes)",
                                 std::to_string(over) + " floats");
  // Representable, but beyond any address space (96 PiB): the allocation fails.
  const Index refused = (Index{1} << 50) * 24 + kernel;
  expect_error_before_allocating([&] { op.reserve(Index{1} << 50); }, call, "workspace",
                                 "an allocation of " + std::to_string(refused) + " floats (" +
                                     std::to_string(refused * 4) + " bytes) that succeeds",
                                 "std::bad_alloc");
  // The operator is unchanged and still plans and runs.
  op.reserve(2, 3);
  ContiguousKvCache cache(op.cache_record(), 1, 4);
  const SequenceId seq = cache.add_sequence();
  const RowMatrix x = ref::random_inputs(3, config.d_model, 158);
  RowMatrix y(3, config.d_model);
  op.prefill(cache, seq, 3, x.data(), y.data());
  EXPECT_TRUE(y.allFinite());
}

TEST(GqaMisuse, BareKernelAttendRejectsBadArgumentsNamingThem) {
  const Index h = 4, g = 2, d_k = 16, d_v = 8;
  const GqaKernel<float> kernel(h, g, d_k, d_v);
  ContiguousKvCache cache(kernel.cache_record(), 1, 8);
  ContiguousKvCache other(records::gqa(g, d_k, d_k), 1, 8);  // d_v 16: another record
  const SequenceId seq = cache.add_sequence();
  const SequenceId foreign = other.add_sequence();
  const std::vector<float> k(static_cast<std::size_t>(4 * g * d_k), 0.5f);
  const std::vector<float> v(static_cast<std::size_t>(4 * g * d_k), 0.25f);
  cache.append(seq, 4, {{k.data(), g, d_k}, {v.data(), g, d_v}});
  other.append(foreign, 4, {{k.data(), g, d_k}, {v.data(), g, d_k}});
  std::vector<float> q(static_cast<std::size_t>(5 * h * d_k), 1.0f);
  std::vector<float> out(static_cast<std::size_t>(5 * h * d_k)), lse(5 * h);
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  auto attend = [&](Index n, const SequenceView& view, const float* query, float* output,
                    float* memory) {
    return thrown_argument([&] { kernel.attend(query, n, view, output, lse.data(), memory); });
  };
  const SequenceView view = cache.view(seq);
  EXPECT_EQ(attend(1, view, q.data(), out.data(), workspace.data()), "<nothing thrown>");
  EXPECT_EQ(attend(1, other.view(foreign), q.data(), out.data(), workspace.data()), "view");
  EXPECT_EQ(attend(1, SequenceView(), q.data(), out.data(), workspace.data()), "view");
  EXPECT_EQ(attend(0, view, q.data(), out.data(), workspace.data()), "n");
  EXPECT_EQ(attend(5, view, q.data(), out.data(), workspace.data()), "n");  // only 4 cached
  EXPECT_EQ(attend(1, view, nullptr, out.data(), workspace.data()), "q");
  EXPECT_EQ(attend(1, view, q.data(), nullptr, workspace.data()), "out");
  EXPECT_EQ(attend(1, view, q.data(), out.data(), nullptr), "workspace");
}

class GqaMisuseOnACache : public ::testing::Test {
 protected:
  GqaMisuseOnACache()
      : config_(gqa_config(32, 4, 2, 16)),
        weights_(ref::random_gqa_weights(config_, 161)),
        op_(config_, weights_),
        x_(ref::random_inputs(64, config_.d_model, 162)),
        y_(64, config_.d_model),
        cache_(op_.cache_record(), 16, 6, 4) {
    a_ = cache_.add_sequence();
    b_ = cache_.add_sequence();
    removed_ = cache_.add_sequence();
    cache_.remove_sequence(removed_);
    op_.prefill(cache_, a_, 20, x_.data(), y_.data());  // 2 pages
    op_.prefill(cache_, b_, 16, x_.data(), y_.data());  // 1 full page; 3 pages left free
  }

  CacheSnapshot snap() const { return snapshot(cache_, {a_, b_}); }

  // f throws a tpattn::Error naming `argument` and leaves the cache as it was.
  void expect_rejected(const std::function<void()>& f, const std::string& argument) {
    const CacheSnapshot before = snap();
    EXPECT_EQ(thrown_argument(f), argument);
    expect_same(before, snap());
  }

  // The operator still works afterwards: one more token of a_ matches the reference.
  void expect_still_works() {
    RowMatrix x = x_.topRows(21);
    RowMatrix y(21, config_.d_model);
    op_.decode(cache_, &a_, 1, x.row(20).data(), y.row(20).data());
    const Eigen::MatrixXd expected = ref::gqa_layer_reference(config_, weights_, x.cast<double>());
    EXPECT_LE(max_abs_error(y.bottomRows(1), expected.bottomRows(1)),
              kFp32Tolerance * scale_of(expected));
  }

  GqaConfig config_;
  GqaWeights weights_;
  GroupedQueryAttention<float> op_;
  RowMatrix x_, y_;
  PagedKvCache cache_;
  SequenceId a_ = -1, b_ = -1, removed_ = -1;
};

TEST_F(GqaMisuseOnACache, DecodeOfAnUnknownSequenceThrowsAndChangesNothing) {
  for (SequenceId unknown : {SequenceId{-1}, removed_, SequenceId{3}, SequenceId{99}}) {
    const SequenceId batch[] = {a_, unknown};
    expect_rejected([&] { op_.decode(cache_, batch, 2, x_.data(), y_.data()); }, "seqs");
    expect_rejected([&] { op_.prefill(cache_, unknown, 1, x_.data(), y_.data()); }, "seq");
  }
  expect_still_works();
}

TEST_F(GqaMisuseOnACache, DecodeWithADuplicateSequenceThrowsAndChangesNothing) {
  const SequenceId batch[] = {a_, b_, a_};
  expect_rejected([&] { op_.decode(cache_, batch, 3, x_.data(), y_.data()); }, "seqs");
  expect_still_works();
}

TEST_F(GqaMisuseOnACache, NullPointersThrowAndChangeNothing) {
  expect_rejected([&] { op_.decode(cache_, &a_, 1, nullptr, y_.data()); }, "x");
  expect_rejected([&] { op_.decode(cache_, &a_, 1, x_.data(), nullptr); }, "y");
  expect_rejected([&] { op_.decode(cache_, nullptr, 1, x_.data(), y_.data()); }, "seqs");
  expect_rejected([&] { op_.prefill(cache_, a_, 2, nullptr, y_.data()); }, "x");
  expect_rejected([&] { op_.prefill(cache_, a_, 2, x_.data(), nullptr); }, "y");
  expect_still_works();
}

TEST_F(GqaMisuseOnACache, EmptyBatchOrPrefillThrowsAndChangesNothing) {
  expect_rejected([&] { op_.decode(cache_, &a_, 0, x_.data(), y_.data()); }, "batch");
  expect_rejected([&] { op_.decode(cache_, &a_, -1, x_.data(), y_.data()); }, "batch");
  expect_rejected([&] { op_.prefill(cache_, a_, 0, x_.data(), y_.data()); }, "n_tokens");
  expect_rejected([&] { op_.prefill(cache_, a_, -3, x_.data(), y_.data()); }, "n_tokens");
  expect_still_works();
}

TEST_F(GqaMisuseOnACache, PrefillBeyondCapacityThrowsAndChangesNothing) {
  // a_ has 12 free tokens in its page and 3 free pages: 60 fit, 61 do not.
  ASSERT_EQ(cache_.tokens_available(a_), 60);
  RowMatrix x = ref::random_inputs(61, config_.d_model, 163), y(61, config_.d_model);
  expect_rejected([&] { op_.prefill(cache_, a_, 61, x.data(), y.data()); }, "n_tokens");
  expect_still_works();

  ContiguousKvCache contiguous(op_.cache_record(), 1, 24);
  const SequenceId seq = contiguous.add_sequence();
  op_.prefill(contiguous, seq, 20, x.data(), y.data());
  const CacheSnapshot before = snapshot(contiguous, {seq});
  EXPECT_EQ(thrown_argument([&] { op_.prefill(contiguous, seq, 5, x.data(), y.data()); }),
            "n_tokens");
  op_.prefill(contiguous, seq, 4, x.data(), y.data());  // exactly full
  EXPECT_EQ(thrown_argument([&] { op_.decode(contiguous, &seq, 1, x.data(), y.data()); }), "cache");
  EXPECT_EQ(contiguous.length(seq), 24);
  contiguous.truncate(seq, 20);
  expect_same(before, snapshot(contiguous, {seq}));
}

TEST_F(GqaMisuseOnACache, CacheOfAnotherRecordOrStorageThrowsAndChangesNothing) {
  std::vector<std::unique_ptr<KvCache>> wrong;
  wrong.push_back(
      std::make_unique<PagedKvCache>(records::gqa(2, 16, 16, StorageType::bf16), 16, 4, 2));
  wrong.push_back(
      std::make_unique<PagedKvCache>(records::gqa(2, 16, 16, StorageType::f16), 16, 4, 2));
  wrong.push_back(std::make_unique<ContiguousKvCache>(records::gqa(4, 16, 16), 2, 64));  // g = h
  wrong.push_back(std::make_unique<ContiguousKvCache>(records::gqa(2, 16, 8), 2, 64));   // d_v
  wrong.push_back(std::make_unique<ContiguousKvCache>(records::gqa(2, 32, 16), 2, 64));  // d_h
  wrong.push_back(std::make_unique<ContiguousKvCache>(records::mla(32, 32), 2, 64));  // 64 wide too
  for (auto& cache : wrong) {
    const SequenceId seq = cache->add_sequence();
    const CacheSnapshot before = snapshot(*cache, {seq});
    EXPECT_EQ(thrown_argument([&] { op_.decode(*cache, &seq, 1, x_.data(), y_.data()); }), "cache");
    EXPECT_EQ(thrown_argument([&] { op_.prefill(*cache, seq, 3, x_.data(), y_.data()); }), "cache");
    expect_same(before, snapshot(*cache, {seq}));
  }
  // And a bf16 operator on this float cache.
  GroupedQueryAttention<Bf16> bf16_op(config_, weights_);
  expect_rejected([&] { bf16_op.decode(cache_, &a_, 1, x_.data(), y_.data()); }, "cache");
  expect_rejected([&] { bf16_op.prefill(cache_, a_, 1, x_.data(), y_.data()); }, "cache");
  expect_still_works();
}

// A batched decode that runs the shared page pool dry midway: the first sequences take pages,
// a later one finds none. The step throws and every sequence is as it was (rolled back).
// An engine's own cache: a ContiguousKvCache whose append throws the engine's own exception (not a
// tpattn::Error) once `appends_left` appends have gone through.
class EngineCacheThatFailsMidway final : public KvCache {
 public:
  EngineCacheThatFailsMidway(const CacheRecord& record, Index appends_left)
      : KvCache(record), inner_(record, 4, 32), appends_left_(appends_left) {}

  SequenceId add_sequence() override { return inner_.add_sequence(); }
  void remove_sequence(SequenceId seq) override { inner_.remove_sequence(seq); }
  bool contains(SequenceId seq) const override { return inner_.contains(seq); }
  Index sequence_count() const override { return inner_.sequence_count(); }
  Index max_sequences() const override { return inner_.max_sequences(); }
  Index length(SequenceId seq) const override { return inner_.length(seq); }
  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    if (appends_left_-- == 0) throw std::runtime_error("engine: out of host memory");
    inner_.append(seq, n_tokens, planes, plane_count);
  }
  using KvCache::append;
  void truncate(SequenceId seq, Index new_length) override { inner_.truncate(seq, new_length); }
  Index tokens_available(SequenceId seq) const override { return inner_.tokens_available(seq); }
  SequenceView view(SequenceId seq) const override { return inner_.view(seq); }
  Index bytes_used() const override { return inner_.bytes_used(); }
  Index bytes_reserved() const override { return inner_.bytes_reserved(); }

  void set_appends_left(Index appends) { appends_left_ = appends; }

 private:
  ContiguousKvCache inner_;
  Index appends_left_;
};

TEST(GqaMisuse, BatchedDecodeRollsBackWhenAnEngineCacheThrowsItsOwnException) {
  const GqaConfig config = gqa_config(32, 4, 2, 16);
  GroupedQueryAttention<float> op(config, ref::random_gqa_weights(config, 175));
  EngineCacheThatFailsMidway cache(op.cache_record(), 1000);
  std::vector<SequenceId> seqs;
  const RowMatrix x = ref::random_inputs(5, config.d_model, 176);
  RowMatrix y(5, config.d_model);
  for (Index s = 0; s < 3; ++s) {
    seqs.push_back(cache.add_sequence());
    op.prefill(cache, seqs.back(), 2 + s, x.data(), y.data());
  }
  for (Index fail_at : {0, 1, 2}) {  // the first, second or third sequence's append throws
    cache.set_appends_left(fail_at);
    const CacheSnapshot before = snapshot(cache, seqs);
    std::string message;
    try {
      op.decode(cache, seqs.data(), 3, x.data(), y.data());
    } catch (const std::runtime_error& error) {
      message = error.what();
    }
    EXPECT_EQ(message, "engine: out of host memory") << "fail_at " << fail_at;
    expect_same(before, snapshot(cache, seqs));
  }
  cache.set_appends_left(1000);
  op.decode(cache, seqs.data(), 3, x.data(), y.data());  // and the cache still works
  EXPECT_EQ(cache.length(seqs[2]), 5);
}

TEST(GqaMisuse, BatchedDecodeThatRunsThePoolDryRollsBackEverySequence) {
  const GqaConfig config = gqa_config(32, 4, 2, 16);
  const GqaWeights weights = ref::random_gqa_weights(config, 171);
  GroupedQueryAttention<float> op(config, weights);
  PagedKvCache cache(op.cache_record(), 16, 5, 4);
  std::vector<RowMatrix> x, y;
  const Index lengths[] = {16, 32, 7};  // full page, full pages, room in its page
  std::vector<SequenceId> seqs;
  for (Index s = 0; s < 3; ++s) {
    x.push_back(
        ref::random_inputs(lengths[s] + 1, config.d_model, 172 + static_cast<std::uint32_t>(s)));
    y.emplace_back(lengths[s] + 1, config.d_model);
    seqs.push_back(cache.add_sequence());
    prefill_chunks(op, cache, seqs.back(), x[s], y[s], 0, {lengths[s]});
  }
  ASSERT_EQ(cache.free_page_count(), 1);  // 1 + 2 + 1 of 5 pages held
  for (Index s = 0; s < 3; ++s)
    ASSERT_GE(cache.tokens_available(seqs[static_cast<std::size_t>(s)]), 1);

  RowMatrix x_step(3, config.d_model), y_step(3, config.d_model);
  for (const std::vector<Index>& order :
       {std::vector<Index>{2, 0, 1}, std::vector<Index>{1, 0}, std::vector<Index>{0, 2, 1}}) {
    SequenceId batch[3];
    for (std::size_t b = 0; b < order.size(); ++b) {
      batch[b] = seqs[static_cast<std::size_t>(order[b])];
      x_step.row(static_cast<Index>(b)) = x[order[b]].row(lengths[order[b]]);
    }
    const CacheSnapshot before = snapshot(cache, seqs);
    EXPECT_EQ(thrown_argument([&] {
                op.decode(cache, batch, static_cast<Index>(order.size()), x_step.data(),
                          y_step.data());
              }),
              "cache");
    expect_same(before, snapshot(cache, seqs));
  }

  // With a page freed (seqs[2] cut to nothing), the same step succeeds with the reference's
  // answers.
  cache.truncate(seqs[2], 0);
  ASSERT_EQ(cache.free_page_count(), 2);
  const SequenceId two[] = {seqs[0], seqs[1]};
  x_step.row(0) = x[0].row(lengths[0]);
  x_step.row(1) = x[1].row(lengths[1]);
  op.decode(cache, two, 2, x_step.data(), y_step.data());
  for (Index s = 0; s < 2; ++s) {
    y[s].row(lengths[s]) = y_step.row(s);
    expect_layer_matches_reference(config, weights, x[s], y[s], cache,
                                   seqs[static_cast<std::size_t>(s)]);
  }
}

// ---- cache bytes (docs/attention.md §5, §6.9)
// -----------------------------------------------------------------

// The spec's tables through the operators themselves: their records, and a cache built from them
// after a prefill, hold g (d_h + d_v) elements per token, times the element size.
template <class Op>
void expect_cache_bytes(Index heads, Index kv_heads, Index head_dim, Index elements) {
  using S = typename Op::storage_type;
  SCOPED_TRACE(testing::Message() << "h " << heads << ", g " << kv_heads << ", d_h " << head_dim
                                  << ", " << storage_type_of<S>);
  const GqaConfig config = gqa_config(8, heads, kv_heads, head_dim);  // d_model plays no part
  Op op(config, ref::random_gqa_weights(config, 191));
  const Index bytes = elements * element_bytes(storage_type_of<S>);
  const CacheRecord& record = op.cache_record();
  ASSERT_EQ(record.plane_count(), 2);
  EXPECT_EQ(record.plane(0).name, "K");
  EXPECT_EQ(record.plane(1).name, "V");
  EXPECT_EQ(record.elements_per_token(), elements);
  EXPECT_EQ(record.bytes_per_token(), bytes);
  PagedKvCache cache(record, 16, 2, 1);
  const SequenceId seq = cache.add_sequence();
  const RowMatrix x = ref::random_inputs(17, config.d_model, 192);
  RowMatrix y(17, config.d_model);
  op.prefill(cache, seq, 17, x.data(), y.data());
  EXPECT_EQ(cache.bytes_used(), 17 * bytes);
  EXPECT_EQ(cache.bytes_in_pages(), 32 * bytes);  // two pages of 16
}

template <class S>
void expect_spec_cache_bytes() {
  // h 32, d_h = d_v = 128.
  expect_cache_bytes<MultiHeadAttention<S>>(32, 32, 128, 8192);
  expect_cache_bytes<GroupedQueryAttention<S>>(32, 8, 128, 2048);
  expect_cache_bytes<MultiQueryAttention<S>>(32, 1, 128, 256);
  // The paper's models, d_h 64: MHA at h 12 / 16 / 20 / 25 and GQA with 2 KV heads (2 x 128
  // elements whatever h; XL's 25 query heads cannot form 2 groups, so it is checked at the rest).
  const Index heads[] = {12, 16, 20, 25};
  const Index mha[] = {1536, 2048, 2560, 3200};
  for (int size = 0; size < 4; ++size) {
    expect_cache_bytes<MultiHeadAttention<S>>(heads[size], heads[size], 64, mha[size]);
    if (heads[size] % 2 == 0) expect_cache_bytes<GroupedQueryAttention<S>>(heads[size], 2, 64, 256);
  }
}

TEST(GqaCacheBytes, OperatorsHoldTheSpecTablesElementsPerToken) {
  expect_spec_cache_bytes<float>();
  expect_spec_cache_bytes<Bf16>();
  expect_spec_cache_bytes<Half>();
}

// ---- allocation ---------------------------------------------------------------------------------

// Sizes of a small real layer (d_model 256, 8 heads of 64, 2 KV heads): the projections' GEMMs
// are large enough for Eigen's packing buffers to leave the stack.
GqaConfig allocation_config() { return gqa_config(256, 8, 2, 64); }

// Three sequences of lengths 5, 16, 40 on a paged cache; the decode steps run past page ends.
template <class S>
struct DecodeSetup {
  GqaConfig config = allocation_config();
  GqaWeights weights = ref::random_gqa_weights(config, 181);
  GroupedQueryAttention<S> op{config, weights};
  PagedKvCache cache{op.cache_record(), 16, 32, 4};
  std::vector<SequenceId> seqs;
  RowMatrix x = ref::random_inputs(3, config.d_model, 183);
  RowMatrix y = RowMatrix::Zero(3, config.d_model);

  DecodeSetup() {
    for (Index length : {5, 16, 40}) {
      seqs.push_back(cache.add_sequence());
      const RowMatrix prompt = ref::random_inputs(length, config.d_model, 182);
      RowMatrix out(length, config.d_model);
      op.prefill(cache, seqs.back(), length, prompt.data(), out.data());
    }
  }
};

// After a warm-up step and reserve(batch), `steps` decode steps of `batch` sequences.
template <class S>
void expect_steady_state_decode_allocates_nothing(Index batch) {
  ASSERT_TRUE(AllocationCounter::installed());
  DecodeSetup<S> setup;
  setup.op.decode(setup.cache, setup.seqs.data(), batch, setup.x.data(), setup.y.data());
  setup.op.reserve(batch);
  HeapAllocations total;
  for (int step = 0; step < 17; ++step) {  // 17 steps cross a page end in every sequence
    const HeapAllocations one = count_heap_allocations([&] {
      setup.op.decode(setup.cache, setup.seqs.data(), batch, setup.x.data(), setup.y.data());
    });
    total += one;
  }
  EXPECT_EQ(total.by_new, 0u) << "operator new over 17 steps, " << storage_type_of<S>;
  EXPECT_EQ(total.by_eigen, 0) << "Eigen's malloc over 17 steps, " << storage_type_of<S>;
}

TEST(GqaAllocation, SteadyStateSingleSequenceDecodeAllocatesNothing) {
  expect_steady_state_decode_allocates_nothing<float>(1);
  expect_steady_state_decode_allocates_nothing<Bf16>(1);
}

TEST(GqaAllocation, SteadyStateBatchedDecodeAllocatesNothing) {
  expect_steady_state_decode_allocates_nothing<float>(3);
  expect_steady_state_decode_allocates_nothing<Bf16>(3);
}

// reserve(max_batch, max_tokens) promises that no later call of that size allocates: a fresh
// operator, reserved, then prefills of max_tokens and a decode of max_batch, with no warm-up.
template <class S>
void expect_reserved_calls_allocate_nothing() {
  ASSERT_TRUE(AllocationCounter::installed());
  const GqaConfig config = allocation_config();
  const GqaWeights weights = ref::random_gqa_weights(config, 184);
  GroupedQueryAttention<S> op(config, weights);
  PagedKvCache cache(op.cache_record(), 16, 32, 4);
  const SequenceId seqs[] = {cache.add_sequence(), cache.add_sequence(), cache.add_sequence()};
  const RowMatrix x = ref::random_inputs(64, config.d_model, 185);
  RowMatrix y(64, config.d_model);
  op.reserve(3, 64);
  const HeapAllocations prefill = count_heap_allocations([&] {
    for (SequenceId seq : seqs) op.prefill(cache, seq, 64, x.data(), y.data());
  });
  const HeapAllocations decode =
      count_heap_allocations([&] { op.decode(cache, seqs, 3, x.data(), y.data()); });
  EXPECT_EQ(prefill.by_new, 0u);
  EXPECT_EQ(prefill.by_eigen, 0) << "Eigen's malloc in prefill";
  EXPECT_EQ(decode.by_new, 0u);
  EXPECT_EQ(decode.by_eigen, 0) << "Eigen's malloc in decode";
}

TEST(GqaAllocation, ReservedPrefillAndDecodeAllocateNothing) {
  expect_reserved_calls_allocate_nothing<float>();
  expect_reserved_calls_allocate_nothing<Half>();
}

// The Eigen hook itself works: a dynamic matrix's storage comes from Eigen's malloc, unseen by
// operator new.
TEST(GqaAllocation, EigenHeapCounterSeesEigenAllocations) {
  float sum = 0.0f;
  const HeapAllocations matrix = count_heap_allocations([&] {
    const RowMatrix m = RowMatrix::Ones(30, 30);
    sum = m.sum();
  });
  EXPECT_EQ(sum, 900.0f);
  EXPECT_EQ(matrix.by_eigen, 1);
  EXPECT_EQ(matrix.by_new, 0u);
}

}  // namespace
}  // namespace tpattn::test
