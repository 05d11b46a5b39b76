// tests/support/allocation_counter.hpp -- how many heap allocations a scope made.
//
//   tpattn::test::AllocationCounter counter;
//   cache.append(...);                        // code that must not allocate
//   EXPECT_EQ(counter.allocations(), 0u);
//
// The counts come from the replacement operator new/delete in support/counting_new.hpp, which
// exactly one translation unit of each test executable must include (the replacement functions
// cannot be inline, so a second copy is a link error). This header itself may be included
// anywhere. Without counting_new.hpp, installed() is false and every count stays 0, so a test
// that relies on the counter should first ASSERT_TRUE(AllocationCounter::installed()).
//
// Counts are process-wide (all threads), so worker threads that allocate are caught too. Keep
// gtest assertions out of a counted scope: a failing EXPECT allocates its message.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tpattn::test {

namespace allocation_detail {
// Constant-initialised, so they are ready before any dynamic initialiser allocates.
inline std::atomic<std::uint64_t> allocation_count{0};
inline std::atomic<std::uint64_t> allocated_bytes{0};
inline std::atomic<bool> counting_installed{false};

inline void note_allocation(std::size_t bytes) noexcept {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
  allocated_bytes.fetch_add(bytes, std::memory_order_relaxed);
}
}  // namespace allocation_detail

// Allocations (every form of operator new, including nothrow and aligned) since construction.
class AllocationCounter {
 public:
  AllocationCounter() noexcept
      : start_count_(allocation_detail::allocation_count.load(std::memory_order_relaxed)),
        start_bytes_(allocation_detail::allocated_bytes.load(std::memory_order_relaxed)) {}

  AllocationCounter(const AllocationCounter&) = delete;
  AllocationCounter& operator=(const AllocationCounter&) = delete;

  std::uint64_t allocations() const noexcept {
    return allocation_detail::allocation_count.load(std::memory_order_relaxed) - start_count_;
  }
  std::uint64_t bytes() const noexcept {
    return allocation_detail::allocated_bytes.load(std::memory_order_relaxed) - start_bytes_;
  }

  // True when support/counting_new.hpp is linked into this executable.
  static bool installed() noexcept {
    return allocation_detail::counting_installed.load(std::memory_order_relaxed);
  }

 private:
  std::uint64_t start_count_;
  std::uint64_t start_bytes_;
};

}  // namespace tpattn::test
