// tpattn/core/matrix.hpp -- the fp32 matrix types and maps every kernel uses.
//
// All tensors are row-major: the last dimension is contiguous. Weights are `out x in`.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "tpattn/core/checked_size.hpp"
#include "tpattn/core/eigen.hpp"
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

// Kernels carve their workspace into 64-byte aligned pieces. Eigen vectorises a row from its
// first aligned element, so without this the low bits of a result (exp, sums) would depend on
// where the caller's buffer happens to land.
constexpr Index kWorkspaceAlignFloats = 16;
inline constexpr Index aligned_floats(Index count) {
  return (count + kWorkspaceAlignFloats - 1) / kWorkspaceAlignFloats * kWorkspaceAlignFloats;
}
inline float* align_workspace(float* workspace) {
  const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(workspace);
  const std::uintptr_t bytes = kWorkspaceAlignFloats * sizeof(float);
  return reinterpret_cast<float*>((address + bytes - 1) / bytes * bytes);
}

// Hands out consecutive aligned pieces of a workspace.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(float* workspace) : next_(align_workspace(workspace)) {}
  float* take(Index count) {
    float* piece = next_;
    next_ += aligned_floats(count);
    return piece;
  }
  // Floats a workspace needs for pieces of these sizes, including the initial alignment slack;
  // Error(call, argument) if the total does not fit in Index.
  static Index floats_for(const char* call, const char* argument,
                          std::initializer_list<Index> counts) {
    Index total = kWorkspaceAlignFloats;
    for (const Index count : counts) {
      const Index aligned = detail::checked_sum(call, argument, count, kWorkspaceAlignFloats - 1) /
                            kWorkspaceAlignFloats * kWorkspaceAlignFloats;  // aligned_floats()
      total = detail::checked_sum(call, argument, total, aligned);
    }
    return total;
  }

 private:
  float* next_;
};

}  // namespace tpattn
