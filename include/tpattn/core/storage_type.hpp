// tpattn/core/storage_type.hpp -- the table of cache storage types.
//
// A cache stores float, Eigen::bfloat16 or Eigen::half; all compute is fp32. Each storage type
// says here how it converts to and from fp32, so kernels never change when a type is added.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <type_traits>

namespace tpattn {

using Index = std::ptrdiff_t;

enum class StorageType : std::uint8_t { f32, bf16, f16 };

inline const char* name_of(StorageType type) {
  switch (type) {
    case StorageType::f32: return "f32";
    case StorageType::bf16: return "bf16";
    case StorageType::f16: return "f16";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& out, StorageType type) { return out << name_of(type); }

inline constexpr Index element_bytes(StorageType type) {
  return type == StorageType::f32 ? 4 : 2;
}

// StorageTraits<T>: the storage type tag of T, and conversion of contiguous runs to/from fp32.
template <class T>
struct StorageTraits;

template <>
struct StorageTraits<float> {
  static constexpr StorageType type = StorageType::f32;
  static void to_float(const float* in, float* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = in[i];
  }
  static void from_float(const float* in, float* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = in[i];
  }
};

// Eigen's bfloat16/half conversions round to nearest even; the loops vectorise at -O2 and above.
template <>
struct StorageTraits<Eigen::bfloat16> {
  static constexpr StorageType type = StorageType::bf16;
  static void to_float(const Eigen::bfloat16* in, float* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
  }
  static void from_float(const float* in, Eigen::bfloat16* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = Eigen::bfloat16(in[i]);
  }
};

template <>
struct StorageTraits<Eigen::half> {
  static constexpr StorageType type = StorageType::f16;
  static void to_float(const Eigen::half* in, float* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = static_cast<float>(in[i]);
  }
  static void from_float(const float* in, Eigen::half* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = Eigen::half(in[i]);
  }
};

template <class T>
inline constexpr StorageType storage_type_of = StorageTraits<T>::type;

template <class T>
inline constexpr bool is_storage_type_v = std::is_same_v<T, float> ||
                                          std::is_same_v<T, Eigen::bfloat16> ||
                                          std::is_same_v<T, Eigen::half>;

// Converts n fp32 values into storage of the given runtime type at `out`.
inline void store_as(StorageType type, const float* in, void* out, Index n) {
  switch (type) {
    case StorageType::f32:
      StorageTraits<float>::from_float(in, static_cast<float*>(out), n);
      return;
    case StorageType::bf16:
      StorageTraits<Eigen::bfloat16>::from_float(in, static_cast<Eigen::bfloat16*>(out), n);
      return;
    case StorageType::f16:
      StorageTraits<Eigen::half>::from_float(in, static_cast<Eigen::half*>(out), n);
      return;
  }
}

}  // namespace tpattn
