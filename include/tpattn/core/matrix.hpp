// tpattn/core/matrix.hpp -- the fp32 matrix types and maps every kernel uses.
//
// All tensors are row-major: the last dimension is contiguous. Weights are `out x in`.
#pragma once

#include <Eigen/Core>

#include "tpattn/core/storage_type.hpp"

namespace tpattn {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::Matrix<float, Eigen::Dynamic, 1>;

// A row-major view over memory the caller owns, with an explicit row stride (in elements).
using MatrixMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMatrixMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

inline MatrixMap map_matrix(float* data, Index rows, Index cols, Index row_stride) {
  return MatrixMap(data, rows, cols, Eigen::OuterStride<>(row_stride));
}
inline MatrixMap map_matrix(float* data, Index rows, Index cols) {
  return map_matrix(data, rows, cols, cols);
}
inline ConstMatrixMap map_matrix(const float* data, Index rows, Index cols, Index row_stride) {
  return ConstMatrixMap(data, rows, cols, Eigen::OuterStride<>(row_stride));
}
inline ConstMatrixMap map_matrix(const float* data, Index rows, Index cols) {
  return map_matrix(data, rows, cols, cols);
}

}  // namespace tpattn
