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
