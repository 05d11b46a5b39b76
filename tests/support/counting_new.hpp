// tests/support/counting_new.hpp -- replacement global operator new/delete that count.
//
// Include this in EXACTLY ONE translation unit of a test executable (usually the *_test.cpp that
// uses AllocationCounter). Replacement allocation functions must not be inline ([replacement.
// functions]), so they are defined here as ordinary functions: including this header in two TUs
// of one executable is a multiple-definition link error, and including it in none leaves
// AllocationCounter::installed() false.
//
// Every replaceable form is provided (plain, array, nothrow, aligned, sized delete), so no
// allocation escapes the count whichever form the library or the standard library picks.
// Memory comes from malloc / aligned_alloc and goes back with free.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#include "support/allocation_counter.hpp"

namespace tpattn::test::allocation_detail {

// Marks the counter as live before main() runs.
[[maybe_unused]] inline const bool counting_new_registered = [] {
  counting_installed.store(true, std::memory_order_relaxed);
  return true;
}();

// One attempt; nullptr on failure. Zero-byte requests get a unique non-null block.
inline void* try_allocate(std::size_t bytes, std::size_t alignment) noexcept {
  const std::size_t size = bytes == 0 ? 1 : bytes;
  void* memory = nullptr;
  if (alignment <= alignof(std::max_align_t)) {
    memory = std::malloc(size);
  } else {
    // aligned_alloc wants the size to be a multiple of the alignment.
    const std::size_t rounded = (size + alignment - 1) / alignment * alignment;
    memory = std::aligned_alloc(alignment, rounded);
  }
  if (memory != nullptr) note_allocation(bytes);
  return memory;
}

// The throwing forms: retry through the new-handler, then throw bad_alloc, as the standard says.
inline void* allocate(std::size_t bytes, std::size_t alignment) {
  for (;;) {
    if (void* memory = try_allocate(bytes, alignment)) return memory;
    std::new_handler handler = std::get_new_handler();
    if (handler == nullptr) throw std::bad_alloc();
    handler();
  }
}

inline void* allocate_nothrow(std::size_t bytes, std::size_t alignment) noexcept {
  try {
    return allocate(bytes, alignment);
  } catch (...) {
    return nullptr;
  }
}

}  // namespace tpattn::test::allocation_detail

// ---- plain ----
void* operator new(std::size_t bytes) {
  return tpattn::test::allocation_detail::allocate(bytes, alignof(std::max_align_t));
}
void* operator new[](std::size_t bytes) {
  return tpattn::test::allocation_detail::allocate(bytes, alignof(std::max_align_t));
}
void* operator new(std::size_t bytes, const std::nothrow_t&) noexcept {
  return tpattn::test::allocation_detail::allocate_nothrow(bytes, alignof(std::max_align_t));
}
void* operator new[](std::size_t bytes, const std::nothrow_t&) noexcept {
  return tpattn::test::allocation_detail::allocate_nothrow(bytes, alignof(std::max_align_t));
}

void operator delete(void* memory) noexcept { std::free(memory); }
void operator delete[](void* memory) noexcept { std::free(memory); }
void operator delete(void* memory, const std::nothrow_t&) noexcept { std::free(memory); }
void operator delete[](void* memory, const std::nothrow_t&) noexcept { std::free(memory); }
void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t) noexcept { std::free(memory); }

// ---- aligned (C++17) ----
void* operator new(std::size_t bytes, std::align_val_t alignment) {
  return tpattn::test::allocation_detail::allocate(bytes, static_cast<std::size_t>(alignment));
}
void* operator new[](std::size_t bytes, std::align_val_t alignment) {
  return tpattn::test::allocation_detail::allocate(bytes, static_cast<std::size_t>(alignment));
}
void* operator new(std::size_t bytes, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return tpattn::test::allocation_detail::allocate_nothrow(bytes,
                                                           static_cast<std::size_t>(alignment));
}
void* operator new[](std::size_t bytes, std::align_val_t alignment,
                     const std::nothrow_t&) noexcept {
  return tpattn::test::allocation_detail::allocate_nothrow(bytes,
                                                           static_cast<std::size_t>(alignment));
}

void operator delete(void* memory, std::align_val_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::align_val_t) noexcept { std::free(memory); }
void operator delete(void* memory, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(memory);
}
void operator delete[](void* memory, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(memory);
}
void operator delete(void* memory, std::size_t, std::align_val_t) noexcept { std::free(memory); }
void operator delete[](void* memory, std::size_t, std::align_val_t) noexcept { std::free(memory); }
