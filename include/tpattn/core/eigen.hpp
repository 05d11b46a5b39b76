// tpattn/core/eigen.hpp -- the one place tpattn includes Eigen (Core and the ThreadPool module)
// and the x86 intrinsics, inside a diagnostic region that keeps GCC's false uninitialized-value
// warnings out of builds that use -Wall -Werror.
//
// GCC's <avx512fintrin.h> writes _mm512_undefined_ps() and its kin as `__m512 __Y = __Y;
// return __Y;`, a deliberately indeterminate register that most AVX-512 intrinsics pass as the
// merge source of an all-ones mask, so no lane of it ever reaches a result. Once such an
// intrinsic is inlined (-O1 and up, -march with AVX-512), GCC 12 reports `__Y` as
// -Wuninitialized / -Wmaybe-uninitialized, and since Eigen's packet code and GEMM kernels are
// templates that inline them, the warning lands on any code that uses Eigen. GCC decides
// whether to report a warning in inlined code by the pragmas in force where each function of the
// inline chain is written, so ignoring the two warnings over these includes silences them for
// Eigen's and the intrinsics' own code (when this is where they are first included; see the
// macros below for tpattn's own code) and nowhere else.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <Eigen/Core>
#include <unsupported/Eigen/CXX11/ThreadPool>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The same region around tpattn's own calls of those intrinsics (simd.hpp, storage_type.hpp),
// for a translation unit that included Eigen or <immintrin.h> before tpattn, where the
// intrinsics' code lies outside the region above: GCC then goes by the pragmas where the
// calling function is written.
#if defined(__GNUC__) && !defined(__clang__)
#define TPATTN_IGNORE_UNDEFINED_INTRINSICS_BEGIN                                       \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define TPATTN_IGNORE_UNDEFINED_INTRINSICS_END _Pragma("GCC diagnostic pop")
#else
#define TPATTN_IGNORE_UNDEFINED_INTRINSICS_BEGIN
#define TPATTN_IGNORE_UNDEFINED_INTRINSICS_END
#endif
