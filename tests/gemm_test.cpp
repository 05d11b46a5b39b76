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

// out += a^T b in double, and the bound of each entry's rounding.
void expect_transposed_product(Index k, Index m, Index n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const Strided a(k, m, m + 3, rng), b(k, n, n + 5, rng);
  Strided out(m, n, n + 2, rng);
  const Strided start = out;
  add_transposed_product(a.data.data(), a.stride, b.data.data(), b.stride, k, m, n, out.data.data(),
                         out.stride);
  double worst = 0.0;
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      double expected = start.at(i, j), magnitude = std::fabs(start.at(i, j));
      for (Index s = 0; s < k; ++s) {
        expected += static_cast<double>(a.at(s, i)) * b.at(s, j);
        magnitude += std::fabs(static_cast<double>(a.at(s, i)) * b.at(s, j));
      }
      const double error = std::fabs(out.at(i, j) - expected);
      worst = std::max(worst, error / (magnitude > 0.0 ? magnitude : 1.0));
    }
  EXPECT_LE(worst, kRelativeTolerance) << "k " << k << ", m " << m << ", n " << n;
  for (Index i = 0; i < m; ++i)
    for (Index j = n; j < out.stride; ++j)
      EXPECT_EQ(out.at(i, j), kUntouched) << "padding written at " << i << ", " << j;
}

// Every shape class of the blocking: rows below, at and above the row block (6), columns below
// one packet, at packet multiples and with a scalar tail, depth 0 and 1 to hundreds.
TEST(AddTransposedProduct, MatchesDoubleReferenceForOddShapesAndStrides) {
  std::uint32_t seed = 1;
  for (Index k : {0, 1, 2, 7, 64, 300})
    for (Index m : {1, 3, 5, 6, 7, 12, 13, 34})
      for (Index n : {1, 5, 8, 15, 16, 17, 31, 33, 64, 65, 100})
        expect_transposed_product(k, m, n, seed++);
}

// The TPA value side at the paper's small model: h 34, d_v 64, a tile of 128 tokens x R_V 2.
TEST(AddTransposedProduct, TpaValueShapeAccumulatesOntoTheState) {
  expect_transposed_product(256, 34, 64, 77);
}

TEST(AddTransposedProduct, ADroppedTermIsSeen) {
  // One term of size 1: out = 1 x 1 + 1 x 1 must be 2 above its start, not 1.
  const std::vector<float> a = {1.0f, 1.0f}, b = {1.0f, 1.0f};
  float out = 0.5f;
  add_transposed_product(a.data(), 1, b.data(), 1, 2, 1, 1, &out, 1);
  EXPECT_EQ(out, 2.5f);
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
          double worst = 0.0;
          for (Index i = 0; i < m; ++i)
            for (Index j = 0; j < n; ++j) {
              double expected = accumulate ? start.at(i, j) : 0.0;
              double magnitude = std::fabs(expected);
              for (Index s = 0; s < k; ++s) {
                expected += static_cast<double>(a.at(i, s)) * b.at(s, j);
                magnitude += std::fabs(static_cast<double>(a.at(i, s)) * b.at(s, j));
              }
              worst = std::max(
                  worst, std::fabs(c.at(i, j) - expected) / (magnitude > 0.0 ? magnitude : 1.0));
            }
          EXPECT_LE(worst, kRelativeTolerance)
              << "m " << m << ", k " << k << ", n " << n << ", accumulate " << accumulate;
        }
      }
}

}  // namespace
}  // namespace tpattn::test
