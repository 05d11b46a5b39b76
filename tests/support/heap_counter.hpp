// tests/support/heap_counter.hpp -- every heap allocation a scope makes: operator new AND Eigen's.
//
//   #include "support/heap_counter.hpp"   // FIRST include of the test file, before any Eigen
//   const HeapAllocations made = count_heap_allocations([&] { op.decode(...); });
//   EXPECT_EQ(made.by_new, 0u);
//   EXPECT_EQ(made.by_eigen, 0);
//
// Eigen allocates its temporaries (a GEMM's packing buffers above 128 KiB, the operand of a
// product it cannot see through) with std::malloc, which the counting operator new of
// counting_new.hpp cannot see. Eigen's own hook, EIGEN_RUNTIME_NO_MALLOC, reports each such
// allocation through eigen_assert while set_is_malloc_allowed(false) is in force: this header's
// eigen_assert counts those reports and keeps every other Eigen assertion fatal. Both macros must
// be defined before Eigen is first included, hence "first include". It also brings the counting
// operator new, so include it in exactly one translation unit of an executable (every test
// executable here is one file).
#pragma once

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "support/counting_new.hpp"

namespace tpattn::test {
inline std::atomic<int> eigen_heap_allocations{0};

inline void eigen_assertion_failed(const char* condition, const char* file, int line) {
  if (std::strstr(condition, "heap allocation is forbidden") != nullptr) {
    eigen_heap_allocations.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  std::fprintf(stderr, "%s:%d: Eigen assertion failed: %s\n", file, line, condition);
  std::abort();
}
}  // namespace tpattn::test

#ifdef EIGEN_CORE_H
#error "support/heap_counter.hpp must be included before Eigen"
#endif
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(condition)       \
  ((condition) ? static_cast<void>(0) \
               : ::tpattn::test::eigen_assertion_failed(#condition, __FILE__, __LINE__))

#include <cstdint>

#include "support/allocation_counter.hpp"
#include "tpattn/core/eigen.hpp"  // Eigen, first seen here (after the two macros)

namespace tpattn::test {

// Heap allocations by Eigen (std::malloc) from construction to allocations(). Keep gtest
// assertions out of the counted scope: a failing EXPECT allocates its message.
class EigenHeapCounter {
 public:
  EigenHeapCounter() : start_(eigen_heap_allocations.load()) {
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~EigenHeapCounter() { Eigen::internal::set_is_malloc_allowed(true); }
  EigenHeapCounter(const EigenHeapCounter&) = delete;
  EigenHeapCounter& operator=(const EigenHeapCounter&) = delete;
  int allocations() const { return eigen_heap_allocations.load() - start_; }

 private:
  int start_;
};

// Allocations by operator new and by Eigen.
struct HeapAllocations {
  std::uint64_t by_new = 0;
  int by_eigen = 0;

  HeapAllocations& operator+=(const HeapAllocations& other) {
    by_new += other.by_new;
    by_eigen += other.by_eigen;
    return *this;
  }
};

// What f() allocated on the heap.
template <class F>
HeapAllocations count_heap_allocations(F&& f) {
  const AllocationCounter counter;
  const EigenHeapCounter eigen;
  f();
  return {counter.allocations(), eigen.allocations()};
}

}  // namespace tpattn::test
