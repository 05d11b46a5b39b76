// tests/register_blocks_test.cpp -- the register-blocked products of the decode kernels
// (kernels/register_blocks.hpp) against plain double loops, for every block shape they have:
// 1 to 9 query rows (every register block and a remainder), cached rows that fill no block,
// widths around and between the register widths of every instruction set (1, 7, 15, 16, 17, 40,
// 96, 129), strides wider than the rows, and all three storage types.
//
// CMake builds this file once per instruction set the kernels have a path for (AVX-512 or
// whatever -march=native gives, AVX2, SSE2, scalar): TPATTN_EXPECT_SIMD names the path the build
// must have taken, so a flag that failed to select it fails the test instead of testing another.
#include "tpattn/kernels/register_blocks.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace tpattn::test {
namespace {

constexpr float kSentinel = -12345.0f;

// Values as stored: rounded to the storage type, read back exactly.
template <class Storage>
std::vector<Storage> stored(const std::vector<float>& values) {
  std::vector<Storage> out(values.size());
  StorageTraits<Storage>::from_float(values.data(), out.data(), static_cast<Index>(values.size()));
  return out;
}
template <class Storage>
double as_double(const Storage& x) {
  float f = 0.0f;
  StorageTraits<Storage>::to_float(&x, &f, 1);
  return f;
}

std::vector<float> random_values(std::size_t n, unsigned seed) {
  std::mt19937 engine(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = unit(engine);
  return v;
}

const Index kWidths[] = {1, 7, 15, 16, 17, 32, 40, 64, 96, 129};
const Index kTokens[] = {1, 2, 3, 5, 8, 9, 17};

// Paired: score_paired_rows, from a copy of the query rows in the paired column order (the
// reference reads the rows as they were).
template <class QStorage, class Storage, bool Paired = false>
void check_scores() {
  for (Index rows = 1; rows <= 9; ++rows)
    for (Index tokens : kTokens)
      for (Index width : kWidths)
        for (bool accumulate : {false, true}) {
          SCOPED_TRACE("rows " + std::to_string(rows) + ", tokens " + std::to_string(tokens) +
                       ", width " + std::to_string(width) + (accumulate ? ", accumulate" : ""));
          const Index q_stride = width + 3, k_stride = width + 5, s_stride = tokens + 2;
          const std::vector<QStorage> q = stored<QStorage>(random_values(rows * q_stride, 1));
          const std::vector<Storage> k = stored<Storage>(random_values(tokens * k_stride, 2));
          std::vector<float> s = random_values(rows * s_stride, 3);
          for (Index r = 0; r < rows; ++r)
            for (Index u = tokens; u < s_stride; ++u) s[r * s_stride + u] = kSentinel;
          const std::vector<float> before = s;
          if constexpr (Paired) {
            std::vector<float> paired = q, scratch(width);
            for (Index r = 0; r < rows; ++r)
              blocks::to_paired_columns(paired.data() + r * q_stride, width, scratch.data());
            blocks::score_paired_rows(paired.data(), q_stride, rows, k.data(), k_stride, tokens,
                                      width, s.data(), s_stride, accumulate);
          } else {
            blocks::score_rows(q.data(), q_stride, rows, k.data(), k_stride, tokens, width,
                               s.data(), s_stride, accumulate);
          }
          for (Index r = 0; r < rows; ++r)
            for (Index u = 0; u < s_stride; ++u) {
              const float got = s[r * s_stride + u];
              if (u >= tokens) {
                ASSERT_EQ(got, kSentinel) << "wrote past the tokens at row " << r;
                continue;
              }
              double dot = accumulate ? before[r * s_stride + u] : 0.0;
              double magnitude = std::abs(dot);
              for (Index c = 0; c < width; ++c) {
                const double term = as_double(q[r * q_stride + c]) * as_double(k[u * k_stride + c]);
                dot += term;
                magnitude += std::abs(term);
              }
              // fp32: about u per addition of the magnitude, a tree or a chain of width terms.
              ASSERT_NEAR(got, dot, 1e-6 * (width + 2) * magnitude + 1e-30)
                  << "row " << r << ", token " << u;
            }
        }
}

// score_columns: the query rows transposed, in lanes, row registers 1 to 5 (every block of
// kColumnRegisters and a remainder), against double dot products; the stores stay inside the
// padded rows of each token and leave the tokens after the last alone.
void check_column_scores() {
  for (Index registers = 1; registers <= 5; ++registers)
    for (Index tokens : kTokens)
      for (Index width : kWidths)
        for (bool accumulate : {false, true}) {
          SCOPED_TRACE("row registers " + std::to_string(registers) + ", tokens " +
                       std::to_string(tokens) + ", width " + std::to_string(width) +
                       (accumulate ? ", accumulate" : ""));
          const Index rows = registers * simd::kLanes;
          const Index q_stride = rows + 2 * simd::kLanes, k_stride = width + 5;
          const Index s_stride = rows + simd::kLanes;
          const std::vector<float> qt = random_values(width * q_stride, 4);
          const std::vector<float> k = random_values(tokens * k_stride, 5);
          std::vector<float> s = random_values((tokens + 1) * s_stride, 6);
          for (Index u = 0; u <= tokens; ++u)
            for (Index r = u < tokens ? rows : 0; r < s_stride; ++r)
              s[u * s_stride + r] = kSentinel;
          const std::vector<float> before = s;
          blocks::score_columns(qt.data(), q_stride, registers, k.data(), k_stride, tokens, width,
                                s.data(), s_stride, accumulate);
          for (Index u = 0; u <= tokens; ++u)
            for (Index r = 0; r < s_stride; ++r) {
              const float got = s[u * s_stride + r];
              if (u == tokens || r >= rows) {
                ASSERT_EQ(got, kSentinel)
                    << "wrote outside the rows at token " << u << ", row " << r;
                continue;
              }
              double dot = accumulate ? before[u * s_stride + r] : 0.0;
              double magnitude = std::abs(dot);
              for (Index c = 0; c < width; ++c) {
                const double term = double(qt[c * q_stride + r]) * double(k[u * k_stride + c]);
                dot += term;
                magnitude += std::abs(term);
              }
              ASSERT_NEAR(got, dot, 1e-6 * (width + 2) * magnitude + 1e-30)
                  << "row " << r << ", token " << u;
            }
        }
}

template <class Storage>
void check_values() {
  for (Index rows = 1; rows <= 9; ++rows)
    for (Index tokens : kTokens)
      for (Index width : kWidths)
        for (bool transposed : {false, true}) {
          SCOPED_TRACE("rows " + std::to_string(rows) + ", tokens " + std::to_string(tokens) +
                       ", width " + std::to_string(width) +
                       (transposed ? ", weights [tokens, rows]" : ""));
          // Weight (r, u) at w[r w_stride + u w_step]: row-major [rows, tokens + 2], or the
          // transpose, [tokens, rows + 1].
          const Index w_stride = transposed ? 1 : tokens + 2, w_step = transposed ? rows + 1 : 1;
          const Index v_stride = width + 5, a_stride = width + 3;
          const std::vector<float> w = random_values((rows + 1) * (tokens + 2), 4);
          const std::vector<Storage> v = stored<Storage>(random_values(tokens * v_stride, 5));
          std::vector<float> acc = random_values(rows * a_stride, 6);
          for (Index r = 0; r < rows; ++r)
            for (Index c = width; c < a_stride; ++c) acc[r * a_stride + c] = kSentinel;
          const std::vector<float> before = acc;
          blocks::accumulate_rows(w.data(), w_stride, w_step, rows, v.data(), v_stride, tokens,
                                  width, acc.data(), a_stride);
          for (Index r = 0; r < rows; ++r)
            for (Index c = 0; c < a_stride; ++c) {
              const float got = acc[r * a_stride + c];
              if (c >= width) {
                ASSERT_EQ(got, kSentinel) << "wrote past the width at row " << r;
                continue;
              }
              double sum = before[r * a_stride + c], magnitude = std::abs(sum);
              for (Index u = 0; u < tokens; ++u) {
                const double term =
                    double(w[r * w_stride + u * w_step]) * as_double(v[u * v_stride + c]);
                sum += term;
                magnitude += std::abs(term);
              }
              ASSERT_NEAR(got, sum, 1e-6 * (tokens + 2) * magnitude + 1e-30)
                  << "row " << r << ", column " << c;
            }
        }
}

bool simd_path_runs_here() {
#if defined(TPATTN_SIMD_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#elif defined(TPATTN_SIMD_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

class RegisterBlocks : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!simd_path_runs_here()) GTEST_SKIP() << simd::kName << " is not available on this CPU";
  }
};

TEST_F(RegisterBlocks, TheBuildTookTheInstructionSetItWasBuiltFor) {
#if defined(TPATTN_EXPECT_SIMD)
  EXPECT_STREQ(simd::kName, TPATTN_EXPECT_SIMD);
#endif
  std::printf("[ simd ] %s, %ld lanes\n", simd::kName, static_cast<long>(simd::kLanes));
}

TEST_F(RegisterBlocks, ScoresEqualTheDoubleDotProductsForF32) { check_scores<float, float>(); }
TEST_F(RegisterBlocks, ScoresEqualTheDoubleDotProductsForBf16) {
  check_scores<float, Eigen::bfloat16>();
  check_scores<Eigen::bfloat16, float>();  // TPA: cached B_K rows against fp32 queries
}
TEST_F(RegisterBlocks, PairedScoresEqualTheDoubleDotProductsForBf16) {
  check_scores<float, Eigen::bfloat16, /*Paired=*/true>();
}
TEST_F(RegisterBlocks, ScoresEqualTheDoubleDotProductsForF16) {
  check_scores<float, Eigen::half>();
  check_scores<Eigen::half, float>();
}
TEST_F(RegisterBlocks, ColumnScoresEqualTheDoubleDotProducts) { check_column_scores(); }
TEST_F(RegisterBlocks, ValueSumsEqualTheDoubleSumsForF32) { check_values<float>(); }
TEST_F(RegisterBlocks, ValueSumsEqualTheDoubleSumsForBf16) { check_values<Eigen::bfloat16>(); }
TEST_F(RegisterBlocks, ValueSumsEqualTheDoubleSumsForF16) { check_values<Eigen::half>(); }

// Each of the R T <= 16 sums of one reduction tree lands in its own row and column, and nothing
// else is written (AVX-512 transposes 16 registers at once and stores each row's sums with one
// masked store; a wrong lane map would swap two sums, a wrong mask clobber a neighbour).
template <int R, int T>
void check_sum_into(bool accumulate) {
  constexpr Index kStride = T + 3;
  simd::Register a[T * R];
  double expected[R][T];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < T; ++u) {
      alignas(64) float lanes[simd::kLanes];
      expected[r][u] = accumulate ? 0.5 * (r * T + u) : 0.0;
      for (Index l = 0; l < simd::kLanes; ++l) {
        lanes[l] = static_cast<float>((r * T + u + 1) * 100 + l);
        expected[r][u] += lanes[l];
      }
      a[u * R + r] = simd::load(static_cast<const float*>(lanes));
    }
  constexpr float kUntouched = -7.0f;
  float s[R * kStride];
  for (float& x : s) x = kUntouched;
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < T; ++u) s[r * kStride + u] = accumulate ? 0.5f * (r * T + u) : kUntouched;
  simd::sum_into<R, T>(a, s, kStride, accumulate);
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < T; ++u)
      EXPECT_EQ(s[r * kStride + u], expected[r][u])
          << "row " << r << " token " << u << " of " << R << "x" << T;
    for (Index u = T; u < kStride; ++u)
      EXPECT_EQ(s[r * kStride + u], kUntouched) << "padding " << u << " of row " << r;
  }
}

template <int R, int T>
void check_sum_into() {
  check_sum_into<R, T>(false);
  check_sum_into<R, T>(true);
}

TEST_F(RegisterBlocks, SumIntoGivesEveryRegistersOwnSum) {
  check_sum_into<1, 1>();
  check_sum_into<1, 8>();
  check_sum_into<2, 8>();
  check_sum_into<3, 5>();
  check_sum_into<4, 4>();
  check_sum_into<8, 2>();
  check_sum_into<5, 3>();
  check_sum_into<16, 1>();
  check_sum_into<8, 3>();  // more than 16 sums: one sum each
}

// Two fp32 evaluations of sums of `terms` products, the same up to contractions into FMAs:
// element i within the bound of the double references above, (terms + 2) 1e-6 of the sum of
// the |products| (magnitude[i]).
void expect_same_up_to_rounding(const std::vector<float>& got, const std::vector<float>& want,
                                const std::vector<double>& magnitude, Index terms) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 1e-6 * (terms + 2) * magnitude[i] + 1e-30) << "element " << i;
}

// An action between register blocks (a caller's prefetches) changes no result beyond rounding
// (the scalar build's compiler may contract a multiply and an add into an FMA in one copy of
// the loop and not in the other) and runs once after every whole block: score_columns after each
// block of block_tokens(rows) tokens of each group of kColumnRegisters row registers,
// accumulate_rows after each group of block_tokens(R) registers of columns of each block of R rows.
TEST_F(RegisterBlocks, ActionsBetweenBlocksRunOncePerBlockAndChangeNothing) {
  const Index tokens = 37, width = 3 * simd::kLanes * 2 + 5;
  for (Index registers = 1; registers <= 3; ++registers) {
    SCOPED_TRACE("row registers " + std::to_string(registers));
    const Index rows = registers * simd::kLanes;
    const std::vector<float> qt = random_values(width * rows, 4);
    const std::vector<float> k = random_values(tokens * width, 5);
    std::vector<float> plain(tokens * rows), with_action(tokens * rows);
    blocks::score_columns(qt.data(), rows, registers, k.data(), width, tokens, width, plain.data(),
                          rows);
    Index calls = 0;
    blocks::score_columns(qt.data(), rows, registers, k.data(), width, tokens, width,
                          with_action.data(), rows, false, [&calls] { ++calls; });
    std::vector<double> magnitude(tokens * rows, 0.0);
    for (Index u = 0; u < tokens; ++u)
      for (Index r = 0; r < rows; ++r)
        for (Index c = 0; c < width; ++c)
          magnitude[u * rows + r] += std::abs(double(qt[c * rows + r]) * double(k[u * width + c]));
    expect_same_up_to_rounding(with_action, plain, magnitude, width);
    Index blocks_expected = 0;
    for (Index m = 0; m < registers; m += blocks::kColumnRegisters) {
      const Index group =
          registers - m < blocks::kColumnRegisters ? registers - m : blocks::kColumnRegisters;
      blocks_expected += tokens / blocks::block_tokens(group);
    }
    EXPECT_EQ(calls, blocks_expected);
  }
  for (Index rows = 1; rows <= 9; ++rows) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    const std::vector<float> w = random_values(rows * tokens, 6);
    const std::vector<float> v = random_values(tokens * width, 7);
    std::vector<float> plain = random_values(rows * width, 8), with_action = plain;
    std::vector<double> magnitude(rows * width, 0.0);
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < width; ++c) {
        magnitude[r * width + c] = std::abs(double(plain[r * width + c]));
        for (Index u = 0; u < tokens; ++u)
          magnitude[r * width + c] +=
              std::abs(double(w[r * tokens + u]) * double(v[u * width + c]));
      }
    blocks::accumulate_rows(w.data(), tokens, 1, rows, v.data(), width, tokens, width, plain.data(),
                            width);
    Index calls = 0;
    blocks::accumulate_rows(w.data(), tokens, 1, rows, v.data(), width, tokens, width,
                            with_action.data(), width, [&calls] { ++calls; });
    expect_same_up_to_rounding(with_action, plain, magnitude, tokens);
    Index blocks_expected = 0;
    for (Index r = 0; r < rows; r += blocks::kValueRows) {
      const Index block = rows - r < blocks::kValueRows ? rows - r : blocks::kValueRows;
      blocks_expected += width / (blocks::block_tokens(block) * simd::kLanes);
    }
    EXPECT_EQ(calls, blocks_expected);
  }
}

// SpreadPrefetch issues each line of its ranges once: per_step lines per step() as spread_over
// planned, the rest at finish(), nothing after; ranges past kMaxRanges and empty ones add none.
TEST(SpreadPrefetch, IssuesEveryLineOfItsRangesOnce) {
  std::vector<char> memory(10000);
  simd::SpreadPrefetch prefetch;
  prefetch.add(memory.data(), 640);          // 10 lines
  prefetch.add(memory.data() + 1000, 65);    // 2 lines (a partial last one)
  prefetch.add(memory.data() + 2000, 0);     // none
  prefetch.add(memory.data() + 3000, 3000);  // 47 lines
  prefetch.add(memory.data() + 7000, 64);    // 1 line
  prefetch.add(memory.data() + 8000, 640);   // past kMaxRanges (4): dropped
  EXPECT_EQ(prefetch.lines(), 10 + 2 + 47 + 1);
  prefetch.spread_over(7);  // 60 lines: 9 a step
  for (int step = 1; step <= 3; ++step) {
    prefetch.step();
    EXPECT_EQ(prefetch.issued(), 9 * step);
  }
  prefetch.spread_over(0);  // the 33 left in one step
  prefetch.step();
  EXPECT_EQ(prefetch.issued(), 60);
  prefetch.step();
  prefetch.finish();
  EXPECT_EQ(prefetch.issued(), 60);
}

}  // namespace
}  // namespace tpattn::test
