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
