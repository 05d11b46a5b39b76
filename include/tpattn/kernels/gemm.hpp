// tpattn/kernels/gemm.hpp -- matrix products that never touch the heap.
//
// Eigen packs GEMM operands into buffers on the stack up to EIGEN_STACK_ALLOCATION_LIMIT
// (128 KiB by default) and on the heap beyond it, which would make a decode step allocate. These
// products run Eigen's GEMM on panels of at most kPanel rows x kPanel columns x kDepth depth, so
// its packed blocks (at most 256 x 96 floats) always stay on the stack.
#pragma once

#include <type_traits>

#include "tpattn/core/error.hpp"
#include "tpattn/core/executor.hpp"
#include "tpattn/core/matrix.hpp"

namespace tpattn {

// c = a * b (accumulate: c += a * b). a: [m, k], b: [k, n], c: [m, n]; Eigen maps over fp32
// storage, or blocks and transposes of them. Nothing else: Eigen evaluates any other operand
// (a scaled map, a sum) into a heap temporary, so scale an operand into a workspace first.
template <class Lhs, class Rhs, class Out>
void multiply(const Lhs& a, const Rhs& b, Out&& c, bool accumulate = false) {
  constexpr Index kPanel = 64, kDepth = 256;
  const Index m = a.rows(), k = a.cols(), n = b.cols();
  TPATTN_ASSERT(b.rows() == k && c.rows() == m && c.cols() == n);
  if (k == 0) {
    if (!accumulate) c.setZero();
    return;
  }
  for (Index row = 0; row < m; row += kPanel) {
    const Index rows = m - row < kPanel ? m - row : kPanel;
    for (Index col = 0; col < n; col += kPanel) {
      const Index cols = n - col < kPanel ? n - col : kPanel;
      auto out = c.block(row, col, rows, cols);
      for (Index depth = 0; depth < k; depth += kDepth) {
        const Index inner = k - depth < kDepth ? k - depth : kDepth;
        if (depth == 0 && !accumulate)
          out.noalias() = a.block(row, depth, rows, inner) * b.block(depth, col, inner, cols);
        else
          out.noalias() += a.block(row, depth, rows, inner) * b.block(depth, col, inner, cols);
      }
    }
  }
}

namespace detail {

// Strides of a small product's left operand: A(r, s) = a[r * row + s * depth], so that A can be
// a row-major array (row = its row stride, depth = 1) or the transpose of one (row = 1).
struct LeftStrides {
  Index row;
  Index depth;
};

// out[r][c] (+)= sum_s A(r, s) b[s][c] for r < Rows, c < Packets x (packet size): the
// accumulators stay in registers over the whole depth k.
template <int Rows, int Packets>
inline void small_product_block(const float* a, LeftStrides as, const float* b, Index b_stride,
                                Index k, float* out, Index out_stride, bool accumulate) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr Index kSize = Eigen::internal::packet_traits<float>::size;
  Packet acc[Rows][Packets];
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Packets; ++p) acc[r][p] = Eigen::internal::pset1<Packet>(0.0f);
  for (Index s = 0; s < k; ++s) {
    Packet row[Packets];
    for (int p = 0; p < Packets; ++p)
      row[p] = Eigen::internal::ploadu<Packet>(b + s * b_stride + p * kSize);
    for (int r = 0; r < Rows; ++r) {
      const Packet weight = Eigen::internal::pset1<Packet>(a[r * as.row + s * as.depth]);
      for (int p = 0; p < Packets; ++p)
        acc[r][p] = Eigen::internal::pmadd(weight, row[p], acc[r][p]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Packets; ++p) {
      float* target = out + r * out_stride + p * kSize;
      Eigen::internal::pstoreu(
          target, accumulate
                      ? Eigen::internal::padd(Eigen::internal::ploadu<Packet>(target), acc[r][p])
                      : acc[r][p]);
    }
}

// All m rows, kRows at a time, at one block of Packets packets of columns.
template <int kRows, int Packets>
inline void small_product_columns(const float* a, LeftStrides as, const float* b, Index b_stride,
                                  Index k, Index m, float* out, Index out_stride, bool accumulate) {
  Index row = 0;
  for (; row + kRows <= m; row += kRows)
    small_product_block<kRows, Packets>(a + row * as.row, as, b, b_stride, k,
                                        out + row * out_stride, out_stride, accumulate);
  const auto rest = [&](auto rows) {
    small_product_block<decltype(rows)::value, Packets>(
        a + row * as.row, as, b, b_stride, k, out + row * out_stride, out_stride, accumulate);
  };
  static_assert(kRows == 6, "the switch below covers 1 .. kRows - 1 rows");
  switch (m - row) {
    case 1: rest(std::integral_constant<int, 1>()); break;
    case 2: rest(std::integral_constant<int, 2>()); break;
    case 3: rest(std::integral_constant<int, 3>()); break;
    case 4: rest(std::integral_constant<int, 4>()); break;
    case 5: rest(std::integral_constant<int, 5>()); break;
    default: break;
  }
}

}  // namespace detail

// out: [m, n] = A B (accumulate: out += A B) for a small left operand A: [m, k] with
// A(r, s) = a[r * a_row_stride + s * a_depth_stride] (a row-major array, or with the strides
// swapped the transpose of one), and b: [k, n], out: [m, n] row-major with the given row strides.
// For the shapes of the TPA kernel (k a few to a few hundred, n = h or d_v), where a GEMM's packing
// of both operands costs about as much as its arithmetic: blocks of 6 output rows by up to 4
// packets of columns accumulate in registers over the whole depth, reading b once per row block.
// Columns past the last whole packet are summed one by one, so pad n to a packet multiple where
// that tail matters.
inline void small_product(const float* a, Index a_row_stride, Index a_depth_stride, const float* b,
                          Index b_stride, Index k, Index m, Index n, float* out, Index out_stride,
                          bool accumulate) {
  constexpr Index kSize = Eigen::internal::packet_traits<float>::size;
  constexpr int kRows = 6;
  const detail::LeftStrides as{a_row_stride, a_depth_stride};
  // 6 x 4 accumulators (+ 4) of 32 zmm registers; 6 x 2 (+ 2) of 16 ymm or xmm.
  constexpr int kPackets = kSize >= 16 ? 4 : 2;
  Index column = 0;
  for (; column + kPackets * kSize <= n; column += kPackets * kSize)
    detail::small_product_columns<kRows, kPackets>(a, as, b + column, b_stride, k, m, out + column,
                                                   out_stride, accumulate);
  const Index packets = (n - column) / kSize;  // < kPackets
  if (packets == 3)
    detail::small_product_columns<kRows, 3>(a, as, b + column, b_stride, k, m, out + column,
                                            out_stride, accumulate);
  else if (packets == 2)
    detail::small_product_columns<kRows, 2>(a, as, b + column, b_stride, k, m, out + column,
                                            out_stride, accumulate);
  else if (packets == 1)
    detail::small_product_columns<kRows, 1>(a, as, b + column, b_stride, k, m, out + column,
                                            out_stride, accumulate);
  column += packets * kSize;
  for (; column < n; ++column)  // fewer columns than a packet
    for (Index row = 0; row < m; ++row) {
      float sum = 0.0f;
      for (Index s = 0; s < k; ++s)
        sum += a[row * a_row_stride + s * a_depth_stride] * b[s * b_stride + column];
      float& target = out[row * out_stride + column];
      target = accumulate ? target + sum : sum;
    }
}

// y: [rows, out] = x: [rows, in] W^T for a row-major `out x in` weight (a bias-free linear layer).
// With an executor, the output features are shared among its threads (a decode step's
// projections read the weights once: the threads' shares of the bandwidth add up).
inline void linear(const RowMatrix& weight, const float* x, Index rows, float* y,
                   Executor* executor = nullptr) {
  constexpr Index kFeatureGrain = 64;
  const ConstMatrixMap input = map_matrix(x, rows, weight.cols());
  MatrixMap output = map_matrix(y, rows, weight.rows());
  parallel_ranges(executor, weight.rows(), kFeatureGrain, [&](Index begin, Index end) {
    multiply(input, weight.middleRows(begin, end - begin).transpose(),
             output.middleCols(begin, end - begin));
  });
}

}  // namespace tpattn
