// tpattn/core/checked_size.hpp -- size arithmetic that throws tpattn::Error instead of
// overflowing, and allocations whose size is checked before they are attempted.
//
// Every product or sum of sizes in a constructor, a plan or reserve() goes through these, so a
// config such as heads = head_dim = 2^32 is an Error naming the size, never a wrapped value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {
namespace detail {

inline std::string size_limit_text() {
  return "a size that fits in Index (at most " + to_text(std::numeric_limits<Index>::max()) + ")";
}

// a * b, or Error(call, argument) when it does not fit in Index. argument names the size,
// e.g. "heads x head_dim".
inline Index checked_product(const char* call, const char* argument, Index a, Index b) {
  Index result = 0;
  TPATTN_CHECK(!__builtin_mul_overflow(a, b, &result), call, argument, size_limit_text(),
               to_text(a) + " x " + to_text(b) + ", which overflows");
  return result;
}

// a + b (+ more...), or Error(call, argument) when a partial sum does not fit in Index.
inline Index checked_sum(const char* call, const char* argument, Index a, Index b) {
  Index result = 0;
  TPATTN_CHECK(!__builtin_add_overflow(a, b, &result), call, argument, size_limit_text(),
               to_text(a) + " + " + to_text(b) + ", which overflows");
  return result;
}
template <class... More>
Index checked_sum(const char* call, const char* argument, Index a, Index b, Index c, More... more) {
  return checked_sum(call, argument, checked_sum(call, argument, a, b), c, more...);
}

// Resizes `vector` to `count` elements, all checks first: a count over PTRDIFF_MAX bytes (or the
// vector's max_size()) is an Error naming it, without trying; an allocation the system refuses
// (std::bad_alloc) is an Error naming its size. unit names the elements ("floats").
template <class T>
void resize_or_fail(const char* call, const char* argument, std::vector<T>& vector, Index count,
                    const char* unit) {
  constexpr Index byte_limit = std::numeric_limits<std::ptrdiff_t>::max() / Index{sizeof(T)};
  const Index limit = static_cast<std::size_t>(byte_limit) < vector.max_size()
                          ? byte_limit
                          : static_cast<Index>(vector.max_size());
  TPATTN_CHECK(count >= 0 && count <= limit, call, argument,
               "at most " + to_text(limit) + " " + unit + " (PTRDIFF_MAX bytes)",
               to_text(count) + " " + unit);
  bool allocated = true;
  try {
    vector.resize(static_cast<std::size_t>(count));
  } catch (const std::bad_alloc&) {
    allocated = false;
  }
  TPATTN_CHECK(allocated, call, argument,
               "an allocation of " + to_text(count) + " " + unit + " (" +
                   to_text(count * Index{sizeof(T)}) + " bytes) that succeeds",
               "std::bad_alloc");
}

}  // namespace detail
}  // namespace tpattn
