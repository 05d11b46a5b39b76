// tpattn/core/error.hpp -- the one exception type and the argument checks that raise it.
//
// Every public entry point validates its arguments before it changes anything, so a thrown
// tpattn::Error always leaves caches and operators exactly as they were.
#pragma once

#include <cassert>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace tpattn {

// Thrown for every misuse: bad config, bad shape, unknown sequence, capacity exhausted.
// what() reads "tpattn: <call>: <argument>: expected <expected>, got <actual>".
class Error : public std::invalid_argument {
 public:
  Error(const std::string& call, const std::string& argument, const std::string& expected,
        const std::string& actual)
      : std::invalid_argument("tpattn: " + call + ": " + argument + ": expected " + expected +
                              ", got " + actual),
        call_(call),
        argument_(argument) {}

  const std::string& call() const noexcept { return call_; }
  const std::string& argument() const noexcept { return argument_; }

 private:
  std::string call_;
  std::string argument_;
};

namespace detail {

template <class T>
std::string to_text(const T& value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// Out of line and cold so the happy path of a check is one compare and a not-taken branch.
template <class Actual>
[[noreturn]] __attribute__((noinline, cold)) void fail(const char* call, const char* argument,
                                                       const std::string& expected,
                                                       const Actual& actual) {
  throw Error(call, argument, expected, to_text(actual));
}

}  // namespace detail

// Always-on check at the public boundary. `expected` is a description, `actual` the value seen.
// Users may redefine TPATTN_CHECK before including tpattn (e.g. to abort instead of throwing).
#ifndef TPATTN_CHECK
#define TPATTN_CHECK(condition, call, argument, expected, actual)               \
  do {                                                                          \
    if (!(condition)) ::tpattn::detail::fail(call, argument, expected, actual); \
  } while (false)
#endif

// Cheap internal invariant, debug builds only.
#ifndef TPATTN_ASSERT
#ifdef NDEBUG
#define TPATTN_ASSERT(condition) ((void)0)
#else
#define TPATTN_ASSERT(condition) assert(condition)
#endif
#endif

}  // namespace tpattn
