// tpattn/kernels/rope.hpp -- rotary position embedding, one implementation for every operator.
//
// Features are rotated in pairs by angle position * theta_j, theta_j = base^(-2j / rotary_dim),
// j in [0, rotary_dim / 2). Only the first rotary_dim features rotate (partial RoPE); the rest
// pass through. Pairing (docs/attention.md §4):
//   half_split  (GPT-NeoX, the TPA training code): feature j pairs with j + rotary_dim / 2;
//   interleaved (GPT-J, Llama, DeepSeek):           features 2j and 2j + 1 pair.
// Direction, for a pair (x1, x2):
//   standard: y1 = x1 cos - x2 sin,  y2 = x1 sin + x2 cos;
//   reversed: y1 = x1 cos + x2 sin,  y2 = -x1 sin + x2 cos   (the public T6 code's rotation).
// Table precision (RopeConfig::table):
//   fp32 (default): each angle is position * theta_j in double, its cos and sin rounded once to
//                   fp32, so long contexts keep their precision;
//   bf16:           the public T6 code's recipe, reproduced step by step: theta_j in fp32,
//                   angle = float(position) * theta_j in fp32, cos and sin of that angle in fp32,
//                   then rounded to bf16 (nearest even). The rotation itself is fp32 either way.
//                   Use it to reproduce modules trained with that code; its error (~4e-3
//                   relative) is the table's, not tpattn's.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "tpattn/core/checked_size.hpp"
#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {

enum class RopePairing : std::uint8_t { half_split, interleaved };
enum class RopeDirection : std::uint8_t { standard, reversed };
enum class RopeTable : std::uint8_t { fp32, bf16 };

struct RopeConfig {
  bool enabled = true;
  Index rotary_dim = 0;  // 0 = the whole head; otherwise even and <= the head width
  double base = 10000.0;
  RopePairing pairing = RopePairing::half_split;
  RopeDirection direction = RopeDirection::standard;
  RopeTable table = RopeTable::fp32;  // precision of the cos / sin table (see above)
};

class Rope {
 public:
  Rope() = default;

  // head_dim: width of the vectors this Rope rotates. `call` names the operator for errors.
  Rope(const RopeConfig& config, Index head_dim, const char* call = "Rope")
      : config_(validated(config, head_dim, call)), head_dim_(head_dim) {
    if (!config_.enabled) return;
    const Index pairs = config_.rotary_dim / 2;
    detail::resize_or_fail(call, "rope table", inverse_frequency_, pairs, "doubles");
    for (Index j = 0; j < pairs; ++j) {
      double& theta = inverse_frequency_[static_cast<std::size_t>(j)];
      if (config_.table == RopeTable::fp32) {
        theta = std::pow(config_.base,
                         -2.0 * static_cast<double>(j) / static_cast<double>(config_.rotary_dim));
      } else {
        // 1 / base^(float(2j) / float(rotary_dim)), every step rounded to fp32.
        const float exponent = static_cast<float>(2 * j) / static_cast<float>(config_.rotary_dim);
        const float power = static_cast<float>(
            std::pow(static_cast<double>(static_cast<float>(config_.base)), exponent));
        theta = 1.0f / power;
      }
    }
  }

  // Every check of the constructor, allocating nothing; returns the config with rotary_dim
  // resolved (0 -> head_dim). A disabled config is returned as it is: no other field is read.
  static RopeConfig validated(RopeConfig config, Index head_dim, const char* call = "Rope") {
    if (!config.enabled) return config;
    TPATTN_CHECK(
        config.pairing == RopePairing::half_split || config.pairing == RopePairing::interleaved,
        call, "rope.pairing", "half_split or interleaved", static_cast<int>(config.pairing));
    TPATTN_CHECK(
        config.direction == RopeDirection::standard || config.direction == RopeDirection::reversed,
        call, "rope.direction", "standard or reversed", static_cast<int>(config.direction));
    TPATTN_CHECK(config.table == RopeTable::fp32 || config.table == RopeTable::bf16, call,
                 "rope.table", "fp32 or bf16", static_cast<int>(config.table));
    if (config.rotary_dim == 0) config.rotary_dim = head_dim;
    TPATTN_CHECK(config.rotary_dim > 0 && config.rotary_dim <= head_dim, call, "rope.rotary_dim",
                 "in [1, " + detail::to_text(head_dim) + "]", config.rotary_dim);
    TPATTN_CHECK(config.rotary_dim % 2 == 0, call, "rope.rotary_dim", "an even number",
                 config.rotary_dim);
    TPATTN_CHECK(std::isfinite(config.base) && config.base > 1.0, call, "rope.base",
                 "a finite value > 1", config.base);
    return config;
  }

  const RopeConfig& config() const { return config_; }
  bool enabled() const { return config_.enabled; }
  Index head_dim() const { return head_dim_; }

  // `count` vectors of a row-major [count, stride] array; the first head_dim() of each rotate.
  struct Vectors {
    float* data;
    Index count;
    Index stride;
  };

  // Rotates every group of vectors at one position (e.g. a token's q and k), computing each
  // pair's cos and sin once for all of them.
  void apply(Index position, std::initializer_list<Vectors> groups) const {
    if (!config_.enabled) return;
    const Index pairs = config_.rotary_dim / 2;
    // Pair j's partner offsets: half-split (j, j + pairs), interleaved (2j, 2j + 1).
    const bool half = config_.pairing == RopePairing::half_split;
    const float sign = config_.direction == RopeDirection::standard ? 1.0f : -1.0f;
    for (Index j = 0; j < pairs; ++j) {
      const auto [cosine, sine] = cos_sin(position, j);
      const float c = cosine;
      const float s = sign * sine;
      const Index first = half ? j : 2 * j;
      const Index second = half ? j + pairs : 2 * j + 1;
      for (const Vectors& group : groups) {
        for (Index v = 0; v < group.count; ++v) {
          float* x = group.data + v * group.stride;
          const float x1 = x[first];
          const float x2 = x[second];
          x[first] = x1 * c - x2 * s;
          x[second] = x1 * s + x2 * c;
        }
      }
    }
  }

  // Rotates `count` vectors at one position. vectors: [count, stride].
  void apply(float* vectors, Index count, Index stride, Index position) const {
    apply(position, {Vectors{vectors, count, stride}});
  }

 private:
  struct CosSin {
    float cos, sin;
  };

  // Pair j's cos and sin at `position`, in the configured table precision.
  CosSin cos_sin(Index position, Index j) const {
    const double theta = inverse_frequency_[static_cast<std::size_t>(j)];
    if (config_.table == RopeTable::fp32) {
      const double angle = static_cast<double>(position) * theta;
      return {static_cast<float>(std::cos(angle)), static_cast<float>(std::sin(angle))};
    }
    const float angle = static_cast<float>(position) * static_cast<float>(theta);
    const auto to_bf16 = [](double v) {
      return static_cast<float>(Eigen::bfloat16(static_cast<float>(v)));
    };
    return {to_bf16(std::cos(static_cast<double>(angle))),
            to_bf16(std::sin(static_cast<double>(angle)))};
  }

  RopeConfig config_;
  Index head_dim_ = 0;
  std::vector<double> inverse_frequency_;
};

}  // namespace tpattn
