// tpattn/kernels/gemm.hpp -- matrix products that never touch the heap.
//
// Eigen packs GEMM operands into buffers on the stack up to EIGEN_STACK_ALLOCATION_LIMIT
// (128 KiB by default) and on the heap beyond it, which would make a decode step allocate. These
// products run Eigen's GEMM on panels of at most kPanel rows x kPanel columns x kDepth depth, so
// its packed blocks (at most 256 x 96 floats) always stay on the stack.
#pragma once

#include "tpattn/core/error.hpp"
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

// out[r][c] += sum_s a[s][r] b[s][c] for r < Rows, c < Packets x (packet size): the accumulators
// stay in registers over the whole depth k.
template <int Rows, int Packets>
inline void add_transposed_product_block(const float* a, Index a_stride, const float* b,
                                         Index b_stride, Index k, float* out, Index out_stride) {
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
      const Packet weight = Eigen::internal::pset1<Packet>(a[s * a_stride + r]);
      for (int p = 0; p < Packets; ++p)
        acc[r][p] = Eigen::internal::pmadd(weight, row[p], acc[r][p]);
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int p = 0; p < Packets; ++p) {
      float* target = out + r * out_stride + p * kSize;
      Eigen::internal::pstoreu(
          target, Eigen::internal::padd(Eigen::internal::ploadu<Packet>(target), acc[r][p]));
    }
}

// Rows [0, rows) with rows <= kRows, at one block of Packets packets of columns.
template <int kRows, int Packets>
inline void add_transposed_product_rows(Index rows, const float* a, Index a_stride, const float* b,
                                        Index b_stride, Index k, float* out, Index out_stride) {
  if constexpr (kRows > 0) {
    if (rows == kRows)
      add_transposed_product_block<kRows, Packets>(a, a_stride, b, b_stride, k, out, out_stride);
    else
      add_transposed_product_rows<kRows - 1, Packets>(rows, a, a_stride, b, b_stride, k, out,
                                                      out_stride);
  }
}

}  // namespace detail

// out: [m, n] += a^T b, for a: [k, m] and b: [k, n]; all row-major fp32 with the given row
// strides. For a small depth k and output that fits in registers a block at a time, where a GEMM's
// packing of both operands costs about as much as its arithmetic: TPA's value side
// (O += Z^T B_V, m = h, n = d_v, k = tile x R_V). Each block of kRows output rows and a few
// packets of columns is accumulated in registers over all of k, reading b once per row block.
inline void add_transposed_product(const float* a, Index a_stride, const float* b, Index b_stride,
                                   Index k, Index m, Index n, float* out, Index out_stride) {
  constexpr Index kSize = Eigen::internal::packet_traits<float>::size;
  constexpr int kRows = 6;
  constexpr int kPackets = kSize >= 16 ? 4 : 2;  // 6 x 4 (+ 4) of 32 zmm; 6 x 2 (+ 2) of 16 ymm
  Index column = 0;
  for (; column + kPackets * kSize <= n; column += kPackets * kSize)
    for (Index row = 0; row < m; row += kRows)
      detail::add_transposed_product_rows<kRows, kPackets>(
          m - row < kRows ? m - row : kRows, a + row, a_stride, b + column, b_stride, k,
          out + row * out_stride + column, out_stride);
  for (; column + kSize <= n; column += kSize)
    for (Index row = 0; row < m; row += kRows)
      detail::add_transposed_product_rows<kRows, 1>(m - row < kRows ? m - row : kRows, a + row,
                                                    a_stride, b + column, b_stride, k,
                                                    out + row * out_stride + column, out_stride);
  for (; column < n; ++column)  // fewer columns than a packet
    for (Index row = 0; row < m; ++row) {
      float sum = 0.0f;
      for (Index s = 0; s < k; ++s) sum += a[s * a_stride + row] * b[s * b_stride + column];
      out[row * out_stride + column] += sum;
    }
}

// y: [rows, out] = x: [rows, in] W^T for a row-major `out x in` weight (a bias-free linear layer).
inline void linear(const RowMatrix& weight, const float* x, Index rows, float* y) {
  multiply(map_matrix(x, rows, weight.cols()), weight.transpose(),
           map_matrix(y, rows, weight.rows()));
}

}  // namespace tpattn
