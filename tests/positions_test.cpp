// Explicit RoPE positions on the whole-layer calls, and the bf16 RoPE table of the public T6 code.
//
// Positions: a layer given each new token's position must rotate q and k there and nowhere else:
//  - GQA against the double reference with those positions (gaps and repeats included);
//  - every family: the default positions given explicitly give bit-identical results, and one
//    offset added to every position leaves the outputs unchanged (RoPE scores depend only on
//    the distance);
//  - a negative position is an Error naming `positions`, and the cache is left as it was.
// Table: RopeTable::bf16 against a reference that follows the T6 recipe step by step, with its
// own round-to-nearest-even to bf16.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "support/mla_reference.hpp"
#include "support/reference.hpp"
#include "support/test_caches.hpp"
#include "support/tpa_reference.hpp"
#include "tpattn/tpattn.hpp"

namespace {

using namespace tpattn;
using tpattn::test::CacheKind;
using tpattn::test::make_cache;
namespace ref = tpattn_test;

// ---- the bf16 table
// ------------------------------------------------------------------------------

// Round-to-nearest-even of a finite float to bf16, by its bits.
float bf16_nearest_even(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  const std::uint32_t lower = bits & 0xFFFFu;
  std::uint32_t upper = bits >> 16;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u) != 0)) ++upper;
  bits = upper << 16;
  std::memcpy(&value, &bits, sizeof bits);
  return value;
}

// The T6 code's table entry: theta = 1 / base^(float(2j) / float(dim)) in fp32, angle =
// float(position) * theta in fp32, cos / sin in fp32, then bf16.
struct TableEntry {
  double cos, sin;
};
TableEntry t6_table_entry(Index position, Index j, Index dim, double base) {
  const float exponent = static_cast<float>(2 * j) / static_cast<float>(dim);
  const float theta = 1.0f / static_cast<float>(std::pow(base, static_cast<double>(exponent)));
  const float angle = static_cast<float>(position) * theta;
  return {bf16_nearest_even(static_cast<float>(std::cos(static_cast<double>(angle)))),
          bf16_nearest_even(static_cast<float>(std::sin(static_cast<double>(angle))))};
}

// The rotation with that table, reversed half-split as the T6 code rotates, in double.
void t6_rope_reference(double* x, Index dim, Index position, double base) {
  const Index pairs = dim / 2;
  for (Index j = 0; j < pairs; ++j) {
    const TableEntry e = t6_table_entry(position, j, dim, base);
    const double x1 = x[j], x2 = x[j + pairs];
    x[j] = x1 * e.cos + x2 * e.sin;
    x[j + pairs] = -x1 * e.sin + x2 * e.cos;
  }
}

RopeConfig t6_rope() {
  RopeConfig rope;
  rope.direction = RopeDirection::reversed;
  rope.table = RopeTable::bf16;
  return rope;
}

TEST(RopeTable, Bf16TableIsTheT6RecipeRoundedToBf16) {
  const Index dim = 128;
  const Rope rope(t6_rope(), dim);
  // A unit vector in feature j reads the table back: (x1, x2) = (1, 0) -> (cos, -sin).
  for (Index position : {0, 1, 2, 3, 100, 1023, 4095, 65535, 1000003}) {
    for (Index j = 0; j < dim / 2; ++j) {
      std::vector<float> x(static_cast<std::size_t>(dim), 0.0f);
      x[static_cast<std::size_t>(j)] = 1.0f;
      rope.apply(x.data(), 1, dim, position);
      const TableEntry e = t6_table_entry(position, j, dim, 10000.0);
      ASSERT_EQ(x[static_cast<std::size_t>(j)], static_cast<float>(e.cos))
          << "position " << position << " pair " << j;
      ASSERT_EQ(x[static_cast<std::size_t>(j + dim / 2)], static_cast<float>(-e.sin))
          << "position " << position << " pair " << j;
    }
  }
}

TEST(RopeTable, Bf16TableOfAngleOneIsCosOneRoundedTo8Bits) {
  // Position 1, pair 0: theta = 1, cos(1) = 0.540302..., whose nearest bf16 (8 significant bits)
  // is 138 / 256 = 0.5390625; sin(1) = 0.841470... rounds to 215 / 256 = 0.83984375.
  const Rope rope(t6_rope(), 64);
  std::vector<float> x(64, 0.0f);
  x[0] = 1.0f;
  rope.apply(x.data(), 1, 64, 1);
  EXPECT_EQ(x[0], 0.5390625f);
  EXPECT_EQ(x[32], -0.83984375f);
}

TEST(RopeTable, Fp32TableDiffersFromBf16TableByTheBf16Rounding) {
  RopeConfig fp32 = t6_rope();
  fp32.table = RopeTable::fp32;
  const Rope exact(fp32, 128), rounded(t6_rope(), 128);
  ref::Random random(7);
  double worst = 0.0;
  for (Index position : {1, 17, 500, 4000}) {
    const std::vector<float> x = random.floats(128, 1.0);
    std::vector<float> a = x, b = x;
    exact.apply(a.data(), 1, 128, position);
    rounded.apply(b.data(), 1, 128, position);
    for (std::size_t c = 0; c < a.size(); ++c)
      worst = std::max(worst, std::abs(double(a[c]) - double(b[c])));
  }
  // bf16 keeps 8 significant bits: cos and sin each move by up to 2^-9 relative.
  EXPECT_GT(worst, 1e-4);
  EXPECT_LT(worst, 2.0 * std::ldexp(1.0, -8));
}

TEST(RopeTable, UnknownTableIsRejected) {
  RopeConfig rope;
  rope.table = static_cast<RopeTable>(7);
  try {
    Rope(rope, 64, "GroupedQueryAttention");
    FAIL() << "accepted an unknown table";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "rope.table");
  }
}

// ---- positions on the GQA layer against the reference
// --------------------------------------------

GqaConfig small_gqa(const RopeConfig& rope) {
  GqaConfig config;
  config.d_model = 48;
  config.heads = 4;
  config.kv_heads = 2;
  config.head_dim = 16;
  config.rope = rope;
  return config;
}

// The double reference of a GQA layer over x whose token t sits at positions[t]; table bf16 uses
// the T6 recipe (half-split, reversed only, as that code rotates).
Eigen::MatrixXd gqa_reference_at(const GqaConfig& config, const GqaWeights& weights,
                                 const RowMatrix& x, const std::vector<Index>& positions) {
  GqaConfig plain = config;
  plain.rope.enabled = false;
  ref::Projections p = ref::gqa_projections(plain, weights, x.cast<double>());
  for (Index t = 0; t < x.rows(); ++t) {
    for (ref::Tensor3* tensor : {&p.q, &p.k}) {
      for (Index i = 0; i < tensor->heads; ++i) {
        double* row = tensor->row(t, i);
        const Index position = positions[static_cast<std::size_t>(t)];
        if (config.rope.table == RopeTable::bf16)
          t6_rope_reference(row, tensor->width, position, config.rope.base);
        else
          ref::rope_reference(row, tensor->width, static_cast<double>(position), config.rope);
      }
    }
  }
  return ref::gqa_output(weights,
                         ref::attention_reference(p.q, p.k, p.v, ref::gqa_scale(config)).out);
}

// Prefill of the first `prompt` rows of x at their positions, then decode of the rest one by one.
RowMatrix run_gqa(GroupedQueryAttention<float>& op, const RowMatrix& x, Index prompt,
                  const std::vector<Index>* positions) {
  const auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, x.rows());
  const SequenceId seq = cache->add_sequence();
  RowMatrix y(x.rows(), x.cols());
  const Index* p = positions == nullptr ? nullptr : positions->data();
  op.prefill(*cache, seq, prompt, x.data(), y.data(), nullptr, p);
  for (Index t = prompt; t < x.rows(); ++t)
    op.decode(*cache, &seq, 1, x.row(t).data(), y.row(t).data(), nullptr,
              p == nullptr ? nullptr : p + t);
  return y;
}

double max_abs_difference(const RowMatrix& a, const Eigen::MatrixXd& b) {
  return (a.cast<double>() - b).cwiseAbs().maxCoeff();
}

TEST(ExplicitPositions, GqaRotatesEachTokenAtItsGivenPosition) {
  for (const RopeTable table : {RopeTable::fp32, RopeTable::bf16}) {
    RopeConfig rope;
    rope.direction = RopeDirection::reversed;
    rope.table = table;
    const GqaConfig config = small_gqa(rope);
    const GqaWeights weights = ref::random_gqa_weights(config, 11);
    GroupedQueryAttention<float> op(config, weights);
    const RowMatrix x = ref::random_inputs(9, config.d_model, 12);
    // Gaps (evicted tokens), a repeat and a jump: an engine's shifted positions.
    const std::vector<Index> positions = {0, 1, 5, 6, 6, 9, 40, 41, 1000};
    const RowMatrix y = run_gqa(op, x, 4, &positions);
    const Eigen::MatrixXd expected = gqa_reference_at(config, weights, x, positions);
    const double scale = std::max(1.0, expected.cwiseAbs().maxCoeff());
    EXPECT_LE(max_abs_difference(y, expected), 1e-5 * scale) << "table " << static_cast<int>(table);
    // And the positions matter: the default ones give another answer.
    const Eigen::MatrixXd at_default =
        gqa_reference_at(config, weights, x, {0, 1, 2, 3, 4, 5, 6, 7, 8});
    EXPECT_GT(max_abs_difference(y, at_default), 1e-3 * scale);
  }
}

TEST(ExplicitPositions, ForwardTakesOnePositionPerRowOfTheBatch) {
  const GqaConfig config = small_gqa(RopeConfig{});
  const GqaWeights weights = ref::random_gqa_weights(config, 21);
  GroupedQueryAttention<float> op(config, weights);
  const RowMatrix xa = ref::random_inputs(3, config.d_model, 22);
  const RowMatrix xb = ref::random_inputs(2, config.d_model, 23);
  const std::vector<Index> pa = {10, 11, 30}, pb = {7, 3};
  const auto cache = make_cache(op.cache_record(), CacheKind::contiguous, 2, 4);
  const SequenceId seqs[2] = {cache->add_sequence(), cache->add_sequence()};
  const Index new_tokens[2] = {3, 2};
  RowMatrix x(5, config.d_model), y(5, config.d_model);
  x << xa, xb;
  const Index positions[5] = {pa[0], pa[1], pa[2], pb[0], pb[1]};
  op.forward(*cache, seqs, new_tokens, 2, x.data(), y.data(), nullptr, positions);
  const Eigen::MatrixXd ea = gqa_reference_at(config, weights, xa, pa);
  const Eigen::MatrixXd eb = gqa_reference_at(config, weights, xb, pb);
  EXPECT_LE(max_abs_difference(y.topRows(3), ea), 1e-5 * std::max(1.0, ea.cwiseAbs().maxCoeff()));
  EXPECT_LE(max_abs_difference(y.bottomRows(2), eb),
            1e-5 * std::max(1.0, eb.cwiseAbs().maxCoeff()));
}

// ---- every family: identities
// ---------------------------------------------------------------------

template <class Op>
RowMatrix run_layer(Op& op, const RowMatrix& x, Index prompt, const Index* positions) {
  const auto cache = make_cache(op.cache_record(), CacheKind::contiguous, 1, x.rows());
  const SequenceId seq = cache->add_sequence();
  RowMatrix y(x.rows(), x.cols());
  op.prefill(*cache, seq, prompt, x.data(), y.data(), nullptr, positions);
  for (Index t = prompt; t < x.rows(); ++t)
    op.decode(*cache, &seq, 1, x.row(t).data(), y.row(t).data(), nullptr,
              positions == nullptr ? nullptr : positions + t);
  return y;
}

template <class Op>
void expect_position_identities(Op& op, Index d_model) {
  const Index tokens = 7, prompt = 3;
  const RowMatrix x = ref::random_inputs(tokens, d_model, 31);
  const RowMatrix by_default = run_layer(op, x, prompt, nullptr);
  std::vector<Index> positions(static_cast<std::size_t>(tokens));
  for (Index t = 0; t < tokens; ++t) positions[static_cast<std::size_t>(t)] = t;
  const RowMatrix given = run_layer(op, x, prompt, positions.data());
  EXPECT_EQ(given, by_default) << "the default positions, given, must change nothing";
  for (Index& p : positions) p += 1234;
  const RowMatrix shifted = run_layer(op, x, prompt, positions.data());
  const double scale = std::max(1.0, double(by_default.cwiseAbs().maxCoeff()));
  EXPECT_LE(double((shifted - by_default).cwiseAbs().maxCoeff()), 2e-5 * scale)
      << "one offset on every position must leave the outputs unchanged";
  positions[static_cast<std::size_t>(tokens - 1)] += 50;  // one token moved away
  const RowMatrix moved = run_layer(op, x, prompt, positions.data());
  EXPECT_GT(double((moved - by_default).row(tokens - 1).cwiseAbs().maxCoeff()), 1e-4 * scale);
  EXPECT_LE(double((moved - by_default).topRows(tokens - 1).cwiseAbs().maxCoeff()), 2e-5 * scale)
      << "moving the last token must not change the earlier outputs";
}

TEST(ExplicitPositions, GqaIdentities) {
  const GqaConfig config = small_gqa(RopeConfig{});
  GroupedQueryAttention<float> op(config, ref::random_gqa_weights(config, 41));
  expect_position_identities(op, config.d_model);
}

TEST(ExplicitPositions, TpaIdentities) {
  for (const Index rank_q : {Index{3}, Index{0}}) {
    TpaConfig config;
    config.d_model = 40;
    config.heads = 4;
    config.head_dim = 16;
    config.rank_q = rank_q;
    config.rank_k = 2;
    config.rank_v = 2;
    config.rope.direction = RopeDirection::reversed;
    TensorProductAttention<float> op(config, ref::random_tpa_weights(config, 42));
    expect_position_identities(op, config.d_model);
  }
}

TEST(ExplicitPositions, MlaIdentities) {
  MlaConfig config;
  config.d_model = 40;
  config.heads = 4;
  config.head_dim = 16;
  config.rope_dim = 8;
  config.kv_latent_dim = 24;
  config.q_latent_dim = 20;
  config.rope.pairing = RopePairing::interleaved;
  MultiHeadLatentAttention<float> op(config, ref::random_mla_weights(config, 43));
  expect_position_identities(op, config.d_model);
}

// ---- bad positions
// ---------------------------------------------------------------------------------

TEST(ExplicitPositions, NegativePositionIsRejectedAndTheCacheIsUnchanged) {
  const GqaConfig config = small_gqa(RopeConfig{});
  GroupedQueryAttention<float> op(config, ref::random_gqa_weights(config, 51));
  const auto cache = make_cache(op.cache_record(), CacheKind::paged, 1, 8);
  SequenceId seq = cache->add_sequence();
  const RowMatrix x = ref::random_inputs(3, config.d_model, 52);
  RowMatrix y(3, config.d_model);
  op.prefill(*cache, seq, 2, x.data(), y.data());
  const Index bad[3] = {4, -1, 6};
  const auto expect_rejected = [&](auto&& call, const char* name, const char* actual) {
    try {
      call();
      ADD_FAILURE() << name << " accepted a negative position";
    } catch (const Error& e) {
      EXPECT_EQ(e.argument(), "positions") << name;
      EXPECT_NE(std::string(e.what()).find(actual), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
    EXPECT_EQ(cache->length(seq), 2) << name << " changed the cache";
  };
  expect_rejected([&] { op.decode(*cache, &seq, 1, x.data(), y.data(), nullptr, bad + 1); },
                  "GroupedQueryAttention::decode", "positions[0] = -1");
  expect_rejected([&] { op.prefill(*cache, seq, 3, x.data(), y.data(), nullptr, bad); },
                  "GroupedQueryAttention::prefill", "positions[1] = -1");
  const Index three = 3;
  expect_rejected([&] { op.forward(*cache, &seq, &three, 1, x.data(), y.data(), nullptr, bad); },
                  "GroupedQueryAttention::forward", "positions[1] = -1");
}

}  // namespace
