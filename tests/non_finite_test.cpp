// tests/non_finite_test.cpp -- what the kernels do with NaN and infinity (docs/contracts.md,
// "Non-finite values"): a NaN or an infinity that reaches a score makes the output of the query
// rows that see it NaN, wherever the token sits (first token, inside a tile, on a tile edge, the
// last token) and whatever the operator; rows that never see it are unaffected. A NaN in a value
// makes every row that weights it NaN. A score of -inf counts as a masked key.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tpattn/tpattn.hpp"

namespace tpattn::test {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Positions around both kernels' tiles (64 tokens for the attention core, 128 for TPA's).
const Index kPositions[] = {0, 1, 63, 64, 65, 127, 128, 199};
constexpr Index kTokens = 200;

bool all_nan(const std::vector<float>& values, Index first, Index count) {
  for (Index i = first; i < first + count; ++i)
    if (!std::isnan(values[static_cast<std::size_t>(i)])) return false;
  return true;
}
bool all_finite(const std::vector<float>& values, Index first, Index count) {
  for (Index i = first; i < first + count; ++i)
    if (!std::isfinite(values[static_cast<std::size_t>(i)])) return false;
  return true;
}

// Token t's rows hold t + 1 (keys scaled small, so scores stay moderate).
std::vector<float> ramp(Index tokens, Index width, float scale) {
  std::vector<float> values(static_cast<std::size_t>(tokens * width));
  for (Index t = 0; t < tokens; ++t)
    for (Index c = 0; c < width; ++c)
      values[static_cast<std::size_t>(t * width + c)] = scale * static_cast<float>(t + 1);
  return values;
}

// The case: one head, one KV head, d 4, 100 tokens of value t + 1, a NaN in one key.
TEST(NonFinite, NanInAnyKeyMakesTheOutputNanWhereverItSits) {
  for (Index position : {0, 1, 50, 63, 64, 99}) {
    GqaKernel<float> kernel(1, 1, 4, 4);
    ContiguousKvCache cache(kernel.cache_record(), 1, 100);
    const SequenceId seq = cache.add_sequence();
    std::vector<float> k = ramp(100, 4, 0.01f), v = ramp(100, 4, 1.0f);
    k[static_cast<std::size_t>(position * 4 + 2)] = kNaN;
    cache.append(seq, 100, {{k.data(), 1, 4}, {v.data(), 1, 4}});
    std::vector<float> q(4, 1.0f), out(4), lse(1),
        workspace(static_cast<std::size_t>(kernel.workspace_floats()));
    kernel.attend(q.data(), 1, cache.view(seq), out.data(), lse.data(), workspace.data());
    EXPECT_TRUE(all_nan(out, 0, 4)) << "NaN at token " << position << " gave " << out[0];
    EXPECT_TRUE(std::isnan(lse[0])) << position;
  }
}

TEST(NonFinite, NanInAValueMakesTheOutputNan) {
  GqaKernel<float> kernel(1, 1, 4, 4);
  ContiguousKvCache cache(kernel.cache_record(), 1, 100);
  const SequenceId seq = cache.add_sequence();
  std::vector<float> k = ramp(100, 4, 0.01f), v = ramp(100, 4, 1.0f);
  v[70 * 4 + 1] = kNaN;
  cache.append(seq, 100, {{k.data(), 1, 4}, {v.data(), 1, 4}});
  std::vector<float> q(4, 1.0f), out(4),
      workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  kernel.attend(q.data(), 1, cache.view(seq), out.data(), nullptr, workspace.data());
  EXPECT_TRUE(std::isnan(out[1]));
}

// Several KV heads: only the query heads that read the poisoned KV head turn NaN, the others
// equal a clean run. Covers MHA (token-major path, 1 row per KV head), GQA (2 and 4 rows per
// KV head) and MQA (one KV head: everything NaN).
TEST(NonFinite, NanReachesOnlyTheHeadsThatReadIt) {
  struct Shape {
    Index h, g;
  };
  const Index d = 8;
  for (Shape shape : {Shape{4, 4}, Shape{8, 2}, Shape{8, 4}, Shape{6, 1}}) {
    for (Index position : kPositions) {
      GqaKernel<float> kernel(shape.h, shape.g, d, d);
      ContiguousKvCache cache(kernel.cache_record(), 2, kTokens);
      const SequenceId clean = cache.add_sequence(), poisoned = cache.add_sequence();
      std::vector<float> k(static_cast<std::size_t>(kTokens * shape.g * d));
      std::vector<float> v(k.size());
      for (std::size_t i = 0; i < k.size(); ++i) {
        k[i] = 0.1f * std::sin(0.37f * static_cast<float>(i));
        v[i] = std::cos(0.11f * static_cast<float>(i));
      }
      cache.append(clean, kTokens, {{k.data(), shape.g, d}, {v.data(), shape.g, d}});
      const Index poisoned_head = shape.g - 1;
      k[static_cast<std::size_t>((position * shape.g + poisoned_head) * d + 3)] = kNaN;
      cache.append(poisoned, kTokens, {{k.data(), shape.g, d}, {v.data(), shape.g, d}});

      std::vector<float> q(static_cast<std::size_t>(shape.h * d), 0.5f);
      std::vector<float> out_clean(q.size()), out_poisoned(q.size());
      std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
      kernel.attend(q.data(), 1, cache.view(clean), out_clean.data(), nullptr, workspace.data());
      kernel.attend(q.data(), 1, cache.view(poisoned), out_poisoned.data(), nullptr,
                    workspace.data());
      const Index group = shape.h / shape.g;
      for (Index i = 0; i < shape.h; ++i) {
        if (i / group == poisoned_head) {
          EXPECT_TRUE(all_nan(out_poisoned, i * d, d))
              << "h " << shape.h << " g " << shape.g << " token " << position << " head " << i;
        } else {
          for (Index c = 0; c < d; ++c)
            EXPECT_EQ(out_poisoned[static_cast<std::size_t>(i * d + c)],
                      out_clean[static_cast<std::size_t>(i * d + c)])
                << "h " << shape.h << " g " << shape.g << " token " << position << " head " << i;
        }
      }
    }
  }
}

TEST(NonFinite, NanOrInfinityInTheQueryMakesItsHeadNan) {
  GqaKernel<float> kernel(2, 2, 4, 4);
  ContiguousKvCache cache(kernel.cache_record(), 1, 10);
  const SequenceId seq = cache.add_sequence();
  std::vector<float> k = ramp(10, 8, 0.01f), v = ramp(10, 8, 1.0f);
  cache.append(seq, 10, {{k.data(), 2, 4}, {v.data(), 2, 4}});
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats())), out(8);
  for (float bad : {kNaN, kInf}) {
    std::vector<float> q(8, 1.0f);
    q[5] = bad;  // head 1
    kernel.attend(q.data(), 1, cache.view(seq), out.data(), nullptr, workspace.data());
    EXPECT_TRUE(all_finite(out, 0, 4)) << bad;
    EXPECT_TRUE(all_nan(out, 4, 4)) << bad;
  }
}

// -inf scores are what masking writes; a key whose score is -inf for a finite query is a key the
// row cannot attend to, and the others still count.
TEST(NonFinite, MinusInfinityScoreCountsAsAMaskedKey) {
  GqaKernel<float> kernel(1, 1, 2, 2);
  ContiguousKvCache cache(kernel.cache_record(), 1, 3);
  const SequenceId seq = cache.add_sequence();
  const std::vector<float> k = {1.0f, 0.0f, -kInf, 0.0f, 1.0f, 0.0f};
  const std::vector<float> v = {2.0f, 4.0f, 100.0f, 100.0f, 4.0f, 8.0f};
  cache.append(seq, 3, {{k.data(), 1, 2}, {v.data(), 1, 2}});
  std::vector<float> q = {1.0f, 0.0f}, out(2),
                     workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  kernel.attend(q.data(), 1, cache.view(seq), out.data(), nullptr, workspace.data());
  EXPECT_FLOAT_EQ(out[0], 3.0f);  // the mean of tokens 0 and 2, which score alike
  EXPECT_FLOAT_EQ(out[1], 6.0f);
}

TEST(NonFinite, NanInTheLatentMakesAbsorbedMlaNan) {
  const Index h = 3, dc = 16, dr = 8;
  for (Index position : kPositions) {
    MlaKernel<float> kernel(h, dc, dr, 0.2f);
    ContiguousKvCache cache(kernel.cache_record(), 1, kTokens);
    const SequenceId seq = cache.add_sequence();
    std::vector<float> latent(static_cast<std::size_t>(kTokens * dc)),
        rope(static_cast<std::size_t>(kTokens * dr));
    for (std::size_t i = 0; i < latent.size(); ++i)
      latent[i] = std::sin(0.3f * static_cast<float>(i));
    for (std::size_t i = 0; i < rope.size(); ++i) rope[i] = std::cos(0.2f * static_cast<float>(i));
    rope[static_cast<std::size_t>(position * dr)] = kNaN;
    cache.append(seq, kTokens, {{latent.data(), 1, dc}, {rope.data(), 1, dr}});
    std::vector<float> q(static_cast<std::size_t>(h * (dc + dr)), 0.25f),
        out(static_cast<std::size_t>(h * dc));
    std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
    kernel.attend(q.data(), 1, cache.view(seq), out.data(), nullptr, workspace.data());
    EXPECT_TRUE(all_nan(out, 0, h * dc)) << "token " << position;
  }
}

// TPA: a NaN in A_K at head i poisons head i only; in B_K or B_V, every head.
TEST(NonFinite, NanInTpaFactorsReachesTheHeadsItFeeds) {
  const Index h = 4, dh = 8, rq = 2, rk = 2, rv = 2;
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
    for (Index position : kPositions) {
      for (int plane = 0; plane < 3; ++plane) {  // A_K (head 1), B_K, B_V
        TpaKernel<float> kernel(TpaShape{h, dh, dh, rq, rk, rv});
        ContiguousKvCache cache(kernel.cache_record(), 1, kTokens);
        const SequenceId seq = cache.add_sequence();
        auto filled = [](Index n, float step) {
          std::vector<float> x(static_cast<std::size_t>(n));
          for (Index i = 0; i < n; ++i)
            x[static_cast<std::size_t>(i)] = std::sin(step * static_cast<float>(i));
          return x;
        };
        std::vector<float> a_k = filled(kTokens * rk * h, 0.3f),
                           b_k = filled(kTokens * rk * dh, 0.7f);
        std::vector<float> a_v = filled(kTokens * rv * h, 0.5f),
                           b_v = filled(kTokens * rv * dh, 0.9f);
        if (plane == 0)
          a_k[static_cast<std::size_t>(position * rk * h + 1)] = kNaN;  // rank 0, head 1
        if (plane == 1) b_k[static_cast<std::size_t>(position * rk * dh + 5)] = kNaN;
        if (plane == 2) b_v[static_cast<std::size_t>(position * rv * dh + 2)] = kNaN;
        cache.append(
            seq, kTokens,
            {{a_k.data(), rk, h}, {b_k.data(), rk, dh}, {a_v.data(), rv, h}, {b_v.data(), rv, dh}});
        const std::vector<float> a_q = filled(rq * h, 0.4f), b_q = filled(rq * dh, 0.6f);
        std::vector<float> out(static_cast<std::size_t>(h * dh));
        std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
        kernel.attend(a_q.data(), b_q.data(), 1, cache.view(seq), out.data(), nullptr,
                      workspace.data(), order);
        for (Index i = 0; i < h; ++i) {
          if (plane == 0 && i != 1) {
            EXPECT_TRUE(all_finite(out, i * dh, dh)) << "A_K, token " << position << " head " << i;
          } else if (plane == 2) {
            EXPECT_TRUE(std::isnan(out[static_cast<std::size_t>(i * dh + 2)]))
                << "B_V, token " << position << " head " << i;
          } else {
            EXPECT_TRUE(all_nan(out, i * dh, dh))
                << "plane " << plane << ", token " << position << " head " << i;
          }
        }
      }
    }
  }
}

// A NaN weight reaches the output of every layer family rather than being dropped with the tile
// its scores fell in.
TEST(NonFinite, NanWeightMakesTheLayersOutputNan) {
  const Index d = 16, n = 70;
  std::vector<float> x(static_cast<std::size_t>(n * d)), y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.1f * static_cast<float>(i));
  auto weight = [](Index rows, Index cols) {
    RowMatrix w(rows, cols);
    for (Index i = 0; i < w.size(); ++i)
      w.data()[i] = 0.2f * std::cos(0.05f * static_cast<float>(i));
    return w;
  };
  GqaConfig config;
  config.d_model = d;
  config.heads = 2;
  config.kv_heads = 1;
  config.head_dim = 8;
  GqaWeights weights{weight(16, d), weight(8, d), weight(8, d), weight(d, 16)};
  weights.w_k(3, 2) = kNaN;
  GroupedQueryAttention<float> layer(config, weights);
  ContiguousKvCache cache(layer.cache_record(), 1, n + 1);
  const SequenceId seq = cache.add_sequence();
  layer.prefill(cache, seq, n, x.data(), y.data());
  EXPECT_TRUE(all_nan(y, 0, n * d));
  layer.decode(cache, &seq, 1, x.data(), y.data());
  EXPECT_TRUE(all_nan(y, 0, d));
}

// Causal prefill: query token q sees tokens before q + 1 only, so a NaN or infinity in token p's
// key or value reaches the outputs of tokens p.. and never those of earlier tokens, whatever
// tile p falls in. Covers the attention core's per-head products (MQA, GQA 4 rows per KV head),
// its token-major path (MHA), absorbed MLA and TPA in both orders.
TEST(NonFinite, InACausalPrefillNonFiniteValuesReachOnlyTheTokensThatSeeThem) {
  const Index n = 140;
  auto filled = [](Index count, float step) {
    std::vector<float> x(static_cast<std::size_t>(count));
    for (Index i = 0; i < count; ++i)
      x[static_cast<std::size_t>(i)] = std::sin(step * static_cast<float>(i));
    return x;
  };
  auto check = [&](const std::vector<float>& out, Index width, Index position, const char* what) {
    for (Index t = 0; t < n; ++t) {
      if (t < position)
        EXPECT_TRUE(all_finite(out, t * width, width))
            << what << ": token " << t << " of NaN at " << position;
      else
        EXPECT_FALSE(all_finite(out, t * width, width))
            << what << ": token " << t << " of NaN at " << position;
    }
  };
  for (Index position : {1, 5, 63, 64, 100, 130}) {
    for (float bad : {kNaN, kInf}) {
      struct Shape {
        Index h, g;
      };
      for (Shape shape : {Shape{4, 4}, Shape{8, 2}, Shape{4, 1}}) {
        const Index d = 8;
        GqaKernel<float> kernel(shape.h, shape.g, d, d);
        ContiguousKvCache cache(kernel.cache_record(), 1, n);
        const SequenceId seq = cache.add_sequence();
        std::vector<float> k = filled(n * shape.g * d, 0.3f), v = filled(n * shape.g * d, 0.7f);
        for (Index j = 0; j < shape.g; ++j)
          v[static_cast<std::size_t>((position * shape.g + j) * d + 1)] = bad;
        cache.append(seq, n, {{k.data(), shape.g, d}, {v.data(), shape.g, d}});
        const std::vector<float> q = filled(n * shape.h * d, 0.2f);
        std::vector<float> out(q.size()),
            workspace(static_cast<std::size_t>(kernel.workspace_floats()));
        kernel.attend(q.data(), n, cache.view(seq), out.data(), nullptr, workspace.data());
        check(out, shape.h * d, position,
              shape.g == shape.h ? "MHA"
              : shape.g == 1     ? "MQA"
                                 : "GQA");
      }
      {
        const Index h = 3, dc = 16, dr = 8;
        MlaKernel<float> kernel(h, dc, dr, 0.2f);
        ContiguousKvCache cache(kernel.cache_record(), 1, n);
        const SequenceId seq = cache.add_sequence();
        std::vector<float> latent = filled(n * dc, 0.3f), rope = filled(n * dr, 0.2f);
        latent[static_cast<std::size_t>(position * dc + 4)] = bad;
        cache.append(seq, n, {{latent.data(), 1, dc}, {rope.data(), 1, dr}});
        const std::vector<float> q = filled(n * h * (dc + dr), 0.1f);
        std::vector<float> out(static_cast<std::size_t>(n * h * dc));
        std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
        kernel.attend(q.data(), n, cache.view(seq), out.data(), nullptr, workspace.data());
        check(out, h * dc, position, "MLA");
      }
      for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
        const Index h = 4, dh = 8, rq = 2, rk = 2, rv = 2;
        TpaKernel<float> kernel(TpaShape{h, dh, dh, rq, rk, rv});
        ContiguousKvCache cache(kernel.cache_record(), 1, n);
        const SequenceId seq = cache.add_sequence();
        std::vector<float> a_k = filled(n * rk * h, 0.3f), b_k = filled(n * rk * dh, 0.7f);
        std::vector<float> a_v = filled(n * rv * h, 0.5f), b_v = filled(n * rv * dh, 0.9f);
        b_v[static_cast<std::size_t>(position * rv * dh + 3)] = bad;
        cache.append(
            seq, n,
            {{a_k.data(), rk, h}, {b_k.data(), rk, dh}, {a_v.data(), rv, h}, {b_v.data(), rv, dh}});
        const std::vector<float> a_q = filled(n * rq * h, 0.4f), b_q = filled(n * rq * dh, 0.6f);
        std::vector<float> out(static_cast<std::size_t>(n * h * dh));
        std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
        kernel.attend(a_q.data(), b_q.data(), n, cache.view(seq), out.data(), nullptr,
                      workspace.data(), order);
        check(out, h * dh, position, order == TpaOrder::factor ? "TPA factor" : "TPA query");
      }
    }
  }
}

TEST(NonFinite, MergingAStateThatSawNanGivesNan) {
  const float nan_lse = kNaN;
  std::vector<float> a = {1.0f, 2.0f}, b = {3.0f, kNaN};
  float lse_a = 0.5f;
  merge_partial(a.data(), &lse_a, b.data(), nan_lse, 2);
  EXPECT_TRUE(std::isnan(a[0]) && std::isnan(a[1]) && std::isnan(lse_a));

  // A state over no keys (max -inf) merged with one that saw a NaN.
  float max_a = -kInf, sum_a = 0.0f, acc_a[2] = {0.0f, 0.0f};
  float max_b = kNaN, sum_b = kNaN, acc_b[2] = {kNaN, kNaN};
  SoftmaxState empty(&max_a, &sum_a, acc_a, 1, 2);
  const SoftmaxState poisoned(&max_b, &sum_b, acc_b, 1, 2);
  empty.merge(poisoned);
  float out[2], lse;
  empty.finish(out, 2, &lse);
  EXPECT_TRUE(std::isnan(out[0]) && std::isnan(out[1]) && std::isnan(lse));
}

}  // namespace
}  // namespace tpattn::test
