// tpattn/kernels/softmax_state.hpp -- the online-softmax state and how two states merge.
//
// For each query row r over the keys seen so far:
//   max[r] = max_s score[r][s],  sum[r] = sum_s exp(score[r][s] - max[r]),
//   acc[r] = sum_s exp(score[r][s] - max[r]) v_s            (unnormalised output, [width])
// so that out[r] = acc[r] / sum[r] and lse[r] = max[r] + log(sum[r]) (natural log).
// The state lives in workspace memory owned by the caller; it never allocates.
#pragma once

#include <cmath>
#include <limits>

#include "tpattn/core/error.hpp"
#include "tpattn/core/matrix.hpp"

namespace tpattn {

class SoftmaxState {
 public:
  // max, sum: [rows]; acc: [rows, width]. All fp32, caller-owned.
  SoftmaxState(float* max, float* sum, float* acc, Index rows, Index width)
      : max_(max), sum_(sum), acc_(acc), rows_(rows), width_(width) {}

  static Index floats_needed(Index rows, Index width) { return rows * (width + 2); }

  Index rows() const { return rows_; }
  Index width() const { return width_; }
  MatrixMap acc() { return map_matrix(acc_, rows_, width_); }
  float max(Index r) const { return max_[r]; }
  float sum(Index r) const { return sum_[r]; }

  void reset() {
    for (Index r = 0; r < rows_; ++r) {
      max_[r] = -std::numeric_limits<float>::infinity();
      sum_[r] = 0.0f;
    }
    acc().setZero();
  }

  // These two inline Eigen's vectorised max, exp and sum, whose AVX-512 packets go through GCC's
  // _mm512_undefined_* idiom (core/eigen.hpp); the region covers them when Eigen was included
  // before tpattn.
  TPATTN_IGNORE_UNDEFINED_INTRINSICS_BEGIN
  // Takes a block of scores [rows, n] (masked entries = -inf) and turns it, in place, into the
  // weights exp(score - new_max), after rescaling sum and acc to the new maximum. The caller then
  // adds weights x values to acc(): this split lets TPA add its factored values its own way.
  // A NaN score (from a NaN or an infinity in the query, the cache or the weights) makes its
  // row's maximum, sum and output NaN for good, whichever block and position it comes in: a
  // plain maximum could drop it, and a block whose maximum lost to NaN would read as masked.
  void absorb_scores(MatrixMap scores) {
    for (Index r = 0; r < rows_; ++r) {
      auto row = scores.row(r).array();
      const float block_max = row.template maxCoeff<Eigen::PropagateNaN>();
      const float new_max = block_max > max_[r] || std::isnan(block_max) ? block_max : max_[r];
      if (new_max == -std::numeric_limits<float>::infinity()) {
        row.setZero();  // every key of this row is masked so far
        continue;
      }
      const float rescale = std::exp(max_[r] - new_max);  // exp(-inf) = 0 on the first block
      row = (row - new_max).exp();
      sum_[r] = sum_[r] * rescale + row.sum();
      if (rescale != 1.0f) acc().row(r) *= rescale;
      max_[r] = new_max;
    }
  }

  // The same for rows [first, first + k) from scores laid out the other way: scores_t [n, k],
  // column c the n scores of row first + c (TPA forms them token by token, and the dense
  // scorer's column path with the rows in SIMD lanes). scratch: 2 k floats.
  void absorb_columns(MatrixMap scores_t, Index first, float* scratch) {
    const Index n = scores_t.rows(), k = scores_t.cols();
    constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
    // Whole rows of scores_t at a time (k rows of the state in SIMD lanes); a NaN maximum stays
    // NaN, as in absorb_scores.
    Eigen::Map<Eigen::ArrayXf> max(max_ + first, k), sum(sum_ + first, k);
    Eigen::Map<Eigen::ArrayXf> new_max(scratch, k), rescale(scratch + k, k);
    new_max = max;
    // A plain loop, which vectorises: Eigen 3.4.0's coefficient-wise max may drop a NaN.
    for (Index s = 0; s < n; ++s) {
      const float* row = scores_t.row(s).data();
      for (Index c = 0; c < k; ++c) {
        const float x = row[c];
        if (x > scratch[c] || x != x) scratch[c] = x;
      }
    }
    rescale = (max - new_max).exp();  // exp(-inf) = 0 on the first block
    for (Index c = 0; c < k; ++c) {
      if (new_max[c] == kMinusInfinity) continue;  // every key of this row is masked so far
      sum[c] *= rescale[c];
      if (rescale[c] != 1.0f) acc().row(first + c) *= rescale[c];
    }
    // The block's own sums start from 0 and join the running sums once, as in absorb_scores:
    // one rounding addition per block, not per key, over a long context.
    Eigen::Map<Eigen::ArrayXf> block_sum(scratch + k, k);  // rescale is spent
    block_sum.setZero();
    for (Index s = 0; s < n; ++s) {
      auto row = scores_t.row(s).transpose().array();
      row = (row - new_max).exp();
      block_sum += row;
    }
    for (Index c = 0; c < k; ++c) {
      if (new_max[c] == kMinusInfinity) {
        scores_t.col(c).setZero();
        continue;
      }
      sum[c] += block_sum[c];
      max[c] = new_max[c];
    }
  }
  TPATTN_IGNORE_UNDEFINED_INTRINSICS_END

  // Folds another state over a disjoint set of keys into this one (split-K / split-KV decode).
  // A NaN maximum on either side wins, so a NaN seen by one part reaches the output.
  void merge(const SoftmaxState& other) {
    TPATTN_ASSERT(other.rows_ == rows_ && other.width_ == width_);
    for (Index r = 0; r < rows_; ++r) {
      const float theirs_max = other.max_[r];
      const float new_max = theirs_max > max_[r] || std::isnan(theirs_max) ? theirs_max : max_[r];
      if (new_max == -std::numeric_limits<float>::infinity()) continue;
      const float mine = std::exp(max_[r] - new_max);
      const float theirs = std::exp(theirs_max - new_max);
      sum_[r] = sum_[r] * mine + other.sum_[r] * theirs;
      for (Index c = 0; c < width_; ++c)
        acc_[r * width_ + c] = acc_[r * width_ + c] * mine + other.acc_[r * width_ + c] * theirs;
      max_[r] = new_max;
    }
  }

  // Rows [first, first + count): row first + k goes to out + k * out_stride, [width] =
  // acc / sum * out_scale; lse + k (optional) = max + log(sum). A row that saw no key gives
  // out 0 and lse -inf.
  void finish(Index first, Index count, float* out, Index out_stride, float* lse,
              float out_scale = 1.0f) const {
    for (Index k = 0; k < count; ++k) {
      const Index r = first + k;
      // sum 0: the row saw no key (out 0); sum NaN: it saw a NaN score (out NaN).
      const float inverse = sum_[r] > 0.0f || std::isnan(sum_[r]) ? out_scale / sum_[r] : 0.0f;
      for (Index c = 0; c < width_; ++c) out[k * out_stride + c] = acc_[r * width_ + c] * inverse;
      if (lse != nullptr) lse[k] = max_[r] + std::log(sum_[r]);
    }
  }
  void finish(float* out, Index out_stride, float* lse, float out_scale = 1.0f) const {
    finish(0, rows_, out, out_stride, lse, out_scale);
  }

 private:
  float* max_;
  float* sum_;
  float* acc_;
  Index rows_;
  Index width_;
};

// Merges normalised partial results over disjoint key sets: (out_a, lse_a) and (out_b, lse_b)
// for one query row of `width` values, into (out_a, lse_a). The maximum LSE is subtracted
// before exponentiating, so large scores cannot overflow.
inline void merge_partial(float* out_a, float* lse_a, const float* out_b, float lse_b,
                          Index width) {
  const float top = *lse_a > lse_b ? *lse_a : lse_b;
  if (top == -std::numeric_limits<float>::infinity()) return;
  const float weight_a = std::exp(*lse_a - top);
  const float weight_b = std::exp(lse_b - top);
  const float total = weight_a + weight_b;
  for (Index c = 0; c < width; ++c) out_a[c] = (out_a[c] * weight_a + out_b[c] * weight_b) / total;
  *lse_a = top + std::log(total);
}

}  // namespace tpattn
