# Warning flags for tpattn's own targets (tests, benchmarks, examples, header checks).
#
# These never reach users: tpattn::tpattn carries no compile options. Only targets built inside
# this project call tpattn_internal_target().

# The flags, for targets created by CMake itself (see the header verification in the top-level
# CMakeLists.txt), which cannot be passed to a function.
set(TPATTN_INTERNAL_WARNINGS -Wall -Wextra -Wpedantic -Werror)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC reports false maybe-uninitialized warnings inside Eigen's packet code once it is inlined
  # into our functions (with -march=native on AVX-512 machines); keep them visible, not fatal.
  list(APPEND TPATTN_INTERNAL_WARNINGS -Wno-error=maybe-uninitialized)
  if(CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    # GCC 12's own avx512fintrin.h (the `__Y = __Y` idiom of the _mm512_undefined_* intrinsics)
    # also trips -Wuninitialized at -O1 and above, on plain Eigen code as much as on ours.
    list(APPEND TPATTN_INTERNAL_WARNINGS -Wno-error=uninitialized)
  endif()
endif()

function(tpattn_internal_target target)
  target_compile_options(${target} PRIVATE ${TPATTN_INTERNAL_WARNINGS})
endfunction()
