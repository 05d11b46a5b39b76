// tests/support/check_capture.hpp -- whether a failed check ran before anything was allocated.
//
// Include it FIRST in a test file, before any tpattn header: it hooks Eigen's malloc (through
// heap_counter.hpp) and defines core/error.hpp's TPATTN_CHECK to note the heap allocations made
// so far when a check fails, before the message is built. thrown_error(f) then says what f()
// threw and what it had allocated by then, so a test can tell that a constructor ran every check
// before it allocated anything.
#pragma once

// clang-format off
#include "support/heap_counter.hpp"  // first: it hooks Eigen's malloc before Eigen is seen
// clang-format on

namespace tpattn::test {
inline HeapAllocations allocations_at_failed_check;
inline void note_failed_check() {
  allocations_at_failed_check = {allocation_detail::allocation_count.load(),
                                 eigen_heap_allocations.load()};
}
}  // namespace tpattn::test
#define TPATTN_CHECK(condition, call, argument, expected, actual) \
  do {                                                            \
    if (!(condition)) {                                           \
      ::tpattn::test::note_failed_check();                        \
      ::tpattn::detail::fail(call, argument, expected, actual);   \
    }                                                             \
  } while (false)

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>

#include "tpattn/core/error.hpp"

namespace tpattn::test {

// What f() throws: its kind ("tpattn::Error", or what() of another exception, or that it threw
// nothing); for a tpattn::Error its call, argument and what(), and the heap allocations f() made
// before the check that failed.
struct Thrown {
  std::string kind;
  std::string call, argument, message;
  HeapAllocations before_check;
};

inline Thrown thrown_error(const std::function<void()>& f) {
  Thrown thrown{"<nothing thrown>", "", "", "", {}};
  allocations_at_failed_check = {};
  const std::uint64_t new_start = allocation_detail::allocation_count.load();
  const EigenHeapCounter eigen;  // Eigen's mallocs are counted (and still made) while it lives
  const int eigen_start = eigen_heap_allocations.load();
  try {
    f();
  } catch (const Error& error) {
    thrown = {"tpattn::Error",
              error.call(),
              error.argument(),
              error.what(),
              {allocations_at_failed_check.by_new - new_start,
               allocations_at_failed_check.by_eigen - eigen_start}};
  } catch (const std::exception& error) {
    thrown.kind = std::string("another exception: ") + error.what();
  }
  return thrown;
}

// f() throws a tpattn::Error whose message is exactly "tpattn: <call>: <argument>: expected
// <expected>, got <actual>", from a check that ran before f() allocated anything.
inline void expect_error_before_allocating(const std::function<void()>& f, const std::string& call,
                                           const std::string& argument, const std::string& expected,
                                           const std::string& actual) {
  const Thrown thrown = thrown_error(f);
  EXPECT_EQ(thrown.kind, "tpattn::Error");
  EXPECT_EQ(thrown.call, call);
  EXPECT_EQ(thrown.argument, argument);
  EXPECT_EQ(thrown.message,
            "tpattn: " + call + ": " + argument + ": expected " + expected + ", got " + actual);
  EXPECT_EQ(thrown.before_check.by_new, 0u) << "operator new before the failing check";
  EXPECT_EQ(thrown.before_check.by_eigen, 0) << "Eigen's malloc before the failing check";
}

// The expected part of the Error for a size product or sum that overflows Index.
inline const std::string kFitsInIndex = "a size that fits in Index (at most 9223372036854775807)";

}  // namespace tpattn::test
