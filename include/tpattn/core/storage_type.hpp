// tpattn/core/storage_type.hpp -- the table of cache storage types.
//
// A cache stores float, Eigen::bfloat16 or Eigen::half; all compute is fp32. Each storage type
// says here how it converts to and from fp32, so kernels never change when a type is added.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>

#include "tpattn/core/eigen.hpp"
#include "tpattn/core/error.hpp"

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

inline std::ostream& operator<<(std::ostream& out, StorageType type) {
  return out << name_of(type);
}

// The storage type spelled as name_of() gives it: "f32", "bf16" or "f16"; anything else is an
// Error naming `call` and `argument`.
inline StorageType parse_storage_type(std::string_view text,
                                      const char* call = "parse_storage_type",
                                      const char* argument = "storage") {
  for (StorageType type : {StorageType::f32, StorageType::bf16, StorageType::f16})
    if (text == name_of(type)) return type;
  detail::fail(call, argument, "f32, bf16 or f16", "'" + std::string(text) + "'");
}

inline constexpr Index element_bytes(StorageType type) { return type == StorageType::f32 ? 4 : 2; }

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

// Widening to fp32 is on the decode path (every cached element, every step), so it gets the
// fastest exact form: bfloat16 is the top half of a float (a shift, which vectorises); half uses
// the F16C / AVX-512 conversion instructions when the build targets them. Both are exact.
// Narrowing (append) uses Eigen's round-to-nearest-even.
template <>
struct StorageTraits<Eigen::bfloat16> {
  static constexpr StorageType type = StorageType::bf16;
  static void to_float(const Eigen::bfloat16* in, float* out, Index n) {
    const std::uint16_t* bits = reinterpret_cast<const std::uint16_t*>(in);
    for (Index i = 0; i < n; ++i) {
      const std::uint32_t word = static_cast<std::uint32_t>(bits[i]) << 16;
      std::memcpy(out + i, &word, sizeof(float));
    }
  }
  static void from_float(const float* in, Eigen::bfloat16* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = Eigen::bfloat16(in[i]);
  }
};

template <>
struct StorageTraits<Eigen::half> {
  static constexpr StorageType type = StorageType::f16;
  static void to_float(const Eigen::half* in, float* out, Index n) {
    Index i = 0;
#if defined(__AVX512F__)
    TPATTN_IGNORE_UNDEFINED_INTRINSICS_BEGIN  // core/eigen.hpp: GCC's _mm512_undefined_* idiom
    const std::uint16_t* bits = reinterpret_cast<const std::uint16_t*>(in);
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(
          out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + i))));
    TPATTN_IGNORE_UNDEFINED_INTRINSICS_END
#elif defined(__F16C__)
    const std::uint16_t* bits = reinterpret_cast<const std::uint16_t*>(in);
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(
          out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + i))));
#endif
    for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
  }
  static void from_float(const float* in, Eigen::half* out, Index n) {
    for (Index i = 0; i < n; ++i) out[i] = Eigen::half(in[i]);
  }
};

template <class T>
inline constexpr StorageType storage_type_of = StorageTraits<T>::type;

template <class T>
inline constexpr bool is_storage_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, Eigen::bfloat16> ||
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
