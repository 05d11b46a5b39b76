// tpattn/kernels/rms_norm.hpp -- RMSNorm with gain, as MLA applies to its latents.
//   y = x / sqrt(mean(x^2) + eps) * gain
#pragma once

#include <cmath>

#include "tpattn/core/matrix.hpp"

namespace tpattn {

// rows: [count, stride], the first `width` entries of each row normalised in place; gain: [width].
inline void rms_norm(float* rows, Index count, Index width, Index stride, const float* gain,
                     float eps) {
  for (Index r = 0; r < count; ++r) {
    Eigen::Map<Eigen::ArrayXf> x(rows + r * stride, width);
    const float inverse_rms = 1.0f / std::sqrt(x.square().mean() + eps);
    x *= Eigen::Map<const Eigen::ArrayXf>(gain, width) * inverse_rms;
  }
}

}  // namespace tpattn
