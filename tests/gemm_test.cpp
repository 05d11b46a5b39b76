// tests/gemm_test.cpp -- the heap-free products of kernels/gemm.hpp against a double reference.
//
// Tolerance: each output is a k-term fp32 sum (k <= 300) added to a starting value; with unit
// roundoff u = 6e-8 its error is at most about k u times the sum of |terms| (worst case), so
// |got - expected| <= 2e-5 x (sum_s |a b| + |start|) is a bound with margin, while a dropped,
// doubled or misplaced term moves an output by a whole term (checked below: terms are O(1)).
#include "tpattn/kernels/gemm.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace tpattn::test {
namespace {

constexpr double kRelativeTolerance = 2e-5;
constexpr float kUntouched = -12345.0f;  // fills the stride padding, which must stay as it is

struct Strided {
  Index rows, cols, stride;
  std::vector<float> data;
  Strided(Index r, Index c, Index s, std::mt19937& rng) : rows(r), cols(c), stride(s) {
    data.assign(static_cast<std::size_t>(r * s), kUntouched);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (Index i = 0; i < r; ++i)
      for (Index j = 0; j < c; ++j) at(i, j) = uniform(rng);
  }
  float& at(Index i, Index j) { return data[static_cast<std::size_t>(i * stride + j)]; }
  float at(Index i, Index j) const { return data[static_cast<std::size_t>(i * stride + j)]; }
};

// The largest |got - expected| / (sum_s |A(i, s) b(s, j)| + |start|) over the [m, n] entries,
// expected = (accumulate ? start : 0) + sum_s A(i, s) b(s, j) in double.
template <class LeftAt>
double worst_relative_error(const Strided& got, const Strided& start, bool accumulate,
                            const LeftAt& a_at, const Strided& b, Index m, Index n, Index k) {
  double worst = 0.0;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      double expected = accumulate ? start.at(i, j) : 0.0;
      double magnitude = std::fabs(expected);
      for (Index s = 0; s < k; ++s) {
        expected += static_cast<double>(a_at(i, s)) * b.at(s, j);
        magnitude += std::fabs(static_cast<double>(a_at(i, s)) * b.at(s, j));
      }
      worst =
          std::max(worst, std::fabs(got.at(i, j) - expected) / (magnitude > 0.0 ? magnitude : 1.0));
    }
  return worst;
}

// out (+)= A b in double, A: [m, k] read from a [k, m] array (transposed) or a [m, k] one, and
// the bound of each entry's rounding; the stride padding of out must stay untouched.
void expect_small_product(Index k, Index m, Index n, bool transposed, bool accumulate,
                          std::uint32_t seed) {
  std::mt19937 rng(seed);
  const Strided a = transposed ? Strided(k, m, m + 3, rng) : Strided(m, k, k + 3, rng);
  const Strided b(k, n, n + 5, rng);
  Strided out(m, n, n + 2, rng);
  const Strided start = out;
  const auto a_at = [&](Index r, Index s) { return transposed ? a.at(s, r) : a.at(r, s); };
  if (transposed)
    small_product(a.data.data(), 1, a.stride, b.data.data(), b.stride, k, m, n, out.data.data(),
                  out.stride, accumulate);
  else
    small_product(a.data.data(), a.stride, 1, b.data.data(), b.stride, k, m, n, out.data.data(),
                  out.stride, accumulate);
  const double worst = worst_relative_error(out, start, accumulate, a_at, b, m, n, k);
  EXPECT_LE(worst, kRelativeTolerance)
      << "k " << k << ", m " << m << ", n " << n << (transposed ? ", transposed" : "")
      << (accumulate ? ", accumulate" : "");
  for (Index i = 0; i < m; ++i)
    for (Index j = n; j < out.stride; ++j)
      EXPECT_EQ(out.at(i, j), kUntouched) << "padding written at " << i << ", " << j;
}

// Every shape class of the blocking: rows below, at and above the row block (6), columns below
// one packet, at 1-4 packets and with a scalar tail, depth 0 and 1 to hundreds; both
// orientations of the left operand; overwrite and accumulate.
TEST(SmallProduct, MatchesDoubleReferenceForOddShapesAndStrides) {
  std::uint32_t seed = 1;
  for (Index k : {0, 1, 2, 7, 64, 300})
    for (Index m : {1, 3, 5, 6, 7, 12, 13, 34})
      for (Index n : {1, 5, 8, 15, 16, 17, 31, 33, 48, 64, 65, 100})
        for (bool transposed : {false, true})
          for (bool accumulate : {false, true})
            expect_small_product(k, m, n, transposed, accumulate, seed++);
}

// The TPA shapes at the paper's small model (h 34, d_h = d_v 64, tiles of 128 tokens, R 2, R_Q 6):
// O += Z^T B_V, and the scores' W = B_K q^T and W = P A_Q with h padded to 48.
TEST(SmallProduct, TpaShapes) {
  expect_small_product(256, 34, 64, /*transposed=*/true, /*accumulate=*/true, 77);
  expect_small_product(64, 256, 48, /*transposed=*/false, /*accumulate=*/false, 78);
  expect_small_product(6, 256, 48, /*transposed=*/false, /*accumulate=*/false, 79);
}

TEST(SmallProduct, ADroppedTermIsSeen) {
  // Two terms of size 1 onto 0.5: 2.5, not 1.5; without accumulate: 2.
  const std::vector<float> a = {1.0f, 1.0f}, b = {1.0f, 1.0f};
  float out = 0.5f;
  small_product(a.data(), 1, 1, b.data(), 1, 2, 1, 1, &out, 1, /*accumulate=*/true);
  EXPECT_EQ(out, 2.5f);
  small_product(a.data(), 1, 1, b.data(), 1, 2, 1, 1, &out, 1, /*accumulate=*/false);
  EXPECT_EQ(out, 2.0f);
}

TEST(Multiply, MatchesDoubleReferenceAcrossPanelEdges) {
  std::mt19937 rng(5);
  for (Index m : {1, 63, 64, 65, 130})
    for (Index k : {0, 1, 255, 256, 257})
      for (Index n : {1, 64, 65}) {
        const Strided a(m, k, k + 1, rng), b(k, n, n + 2, rng);
        Strided c(m, n, n + 3, rng);
        const Strided start = c;
        for (bool accumulate : {false, true}) {
          c = start;
          multiply(map_matrix(a.data.data(), m, k, a.stride),
                   map_matrix(b.data.data(), k, n, b.stride),
                   map_matrix(c.data.data(), m, n, c.stride), accumulate);
          const auto a_at = [&](Index i, Index s) { return a.at(i, s); };
          const double worst = worst_relative_error(c, start, accumulate, a_at, b, m, n, k);
          EXPECT_LE(worst, kRelativeTolerance)
              << "m " << m << ", k " << k << ", n " << n << ", accumulate " << accumulate;
        }
      }
}

}  // namespace
}  // namespace tpattn::test
