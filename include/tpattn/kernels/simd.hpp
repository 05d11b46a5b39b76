// tpattn/kernels/simd.hpp -- the fp32 SIMD register the decode kernels compute in, loaded straight
// from any cache storage type.
//
// One register type per build, chosen at compile time from the target the user compiles for:
//   AVX-512 (F, BW, VL): 16 lanes;  AVX2 + FMA: 8 lanes;  SSE2: 4 lanes;  otherwise a scalar lane
// (also when TPATTN_SIMD_FORCE_SCALAR is defined).
// Loads widen in registers as the values are used, never through a scratch copy: bfloat16 is the
// top half of a float (zero-extend, shift left by 16), half goes through the F16C / AVX-512
// conversion instruction (SSE2 builds without F16C convert lane by lane). Every widening is
// exact. Partial loads (the last n < kLanes columns of a row) read only those n elements and fill
// the other lanes with zeros; partial stores write only n.
#pragma once

#include <cstdint>
#include <cstring>

#include "tpattn/core/eigen.hpp"
#include "tpattn/core/storage_type.hpp"

// Fully unrolls a loop over registers, so that an array of registers indexed by its counter
// lives in registers (GCC keeps a partly unrolled one in memory, storing every FMA's result).
#if defined(__clang__)
#define TPATTN_PRAGMA(x) _Pragma(#x)
#define TPATTN_UNROLL TPATTN_PRAGMA(unroll)
#elif defined(__GNUC__)
#define TPATTN_PRAGMA(x) _Pragma(#x)
#define TPATTN_UNROLL TPATTN_PRAGMA(GCC unroll 64)
#else
#define TPATTN_UNROLL
#endif

namespace tpattn {
namespace simd {

#if defined(TPATTN_SIMD_FORCE_SCALAR)  // the portable path, whatever the target (tests use it)
#define TPATTN_SIMD_SCALAR 1
using Register = float;
inline constexpr Index kLanes = 1;
inline constexpr Index kRegisters = 16;
inline constexpr const char* kName = "scalar";
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TPATTN_SIMD_AVX512 1
using Register = __m512;
inline constexpr Index kLanes = 16;
inline constexpr Index kRegisters = 32;
inline constexpr const char* kName = "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__)
#define TPATTN_SIMD_AVX2 1
using Register = __m256;
inline constexpr Index kLanes = 8;
inline constexpr Index kRegisters = 16;
inline constexpr const char* kName = "AVX2";
#elif defined(__SSE2__)
#define TPATTN_SIMD_SSE2 1
using Register = __m128;
inline constexpr Index kLanes = 4;
inline constexpr Index kRegisters = 16;
inline constexpr const char* kName = "SSE2";
#else
#define TPATTN_SIMD_SCALAR 1
using Register = float;
inline constexpr Index kLanes = 1;
inline constexpr Index kRegisters = 16;
inline constexpr const char* kName = "scalar";
#endif

namespace detail {
// Lanes [0, n) of a register from n floats of any storage type, the rest 0: the portable partial
// load (a stack copy; used at row ends only).
template <class Storage>
Register load_through_copy(const Storage* p, Index n);
}  // namespace detail

#if defined(TPATTN_SIMD_AVX512)
TPATTN_IGNORE_UNDEFINED_INTRINSICS_BEGIN  // core/eigen.hpp: GCC's _mm512_undefined_* idiom
inline Register zero() { return _mm512_setzero_ps(); }
inline Register broadcast(float x) { return _mm512_set1_ps(x); }
inline Register fma(Register a, Register b, Register c) { return _mm512_fmadd_ps(a, b, c); }
inline Register add(Register a, Register b) { return _mm512_add_ps(a, b); }
inline Register mul(Register a, Register b) { return _mm512_mul_ps(a, b); }
inline float sum(Register a) { return _mm512_reduce_add_ps(a); }
inline void store(float* p, Register a) { _mm512_storeu_ps(p, a); }
inline void store(float* p, Register a, Index n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), a);
}
inline Register load(const float* p) { return _mm512_loadu_ps(p); }
inline Register load(const float* p, Index n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
inline Register widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Register load(const Eigen::bfloat16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Register load(const Eigen::bfloat16* p, Index n) {
  return widen_bf16(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p));
}
inline Register load(const Eigen::half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Register load(const Eigen::half* p, Index n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p));
}
// bfloat16 in pairs: 2 kLanes elements from one load, lane i of `even` holding element 2i and
// of `odd` element 2i + 1 (a shift and a mask, where two widening loads take two zero-extensions
// and two shifts). Callers keep their fp32 operands in the same even / odd order.
#define TPATTN_SIMD_BF16_PAIRS 1
inline void load_pairs(const Eigen::bfloat16* p, Register& even, Register& odd) {
  const __m512i bits = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(-65536)));  // 0xFFFF0000
}
// Columns [0, 2 kLanes) in order from the even and odd halves of load_pairs: first and second
// register.
inline void interleave_pairs(Register even, Register odd, Register& first, Register& second) {
  const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high =
      _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  first = _mm512_permutex2var_ps(even, low, odd);
  second = _mm512_permutex2var_ps(even, high, odd);
}
TPATTN_IGNORE_UNDEFINED_INTRINSICS_END
#elif defined(TPATTN_SIMD_AVX2)
inline Register zero() { return _mm256_setzero_ps(); }
inline Register broadcast(float x) { return _mm256_set1_ps(x); }
inline Register fma(Register a, Register b, Register c) { return _mm256_fmadd_ps(a, b, c); }
inline Register add(Register a, Register b) { return _mm256_add_ps(a, b); }
inline Register mul(Register a, Register b) { return _mm256_mul_ps(a, b); }
inline float sum(Register a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void store(float* p, Register a) { _mm256_storeu_ps(p, a); }
inline void store(float* p, Register a, Index n) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  std::memcpy(p, lanes, static_cast<std::size_t>(n) * sizeof(float));
}
inline Register load(const float* p) { return _mm256_loadu_ps(p); }
inline Register load(const Eigen::bfloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Register load(const Eigen::half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  return detail::load_through_copy(p, kLanes);
#endif
}
template <class Storage>
Register load(const Storage* p, Index n) {
  return detail::load_through_copy(p, n);
}
#elif defined(TPATTN_SIMD_SSE2)
inline Register zero() { return _mm_setzero_ps(); }
inline Register broadcast(float x) { return _mm_set1_ps(x); }
inline Register fma(Register a, Register b, Register c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
inline Register add(Register a, Register b) { return _mm_add_ps(a, b); }
inline Register mul(Register a, Register b) { return _mm_mul_ps(a, b); }
inline float sum(Register a) {
  const __m128 s = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline void store(float* p, Register a) { _mm_storeu_ps(p, a); }
inline void store(float* p, Register a, Index n) {
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, a);
  std::memcpy(p, lanes, static_cast<std::size_t>(n) * sizeof(float));
}
inline Register load(const float* p) { return _mm_loadu_ps(p); }
inline Register load(const Eigen::bfloat16* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}
inline Register load(const Eigen::half* p) {
#if defined(__F16C__)
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  return detail::load_through_copy(p, kLanes);
#endif
}
template <class Storage>
Register load(const Storage* p, Index n) {
  return detail::load_through_copy(p, n);
}
#else
inline Register zero() { return 0.0f; }
inline Register broadcast(float x) { return x; }
inline Register fma(Register a, Register b, Register c) { return a * b + c; }
inline Register add(Register a, Register b) { return a + b; }
inline Register mul(Register a, Register b) { return a * b; }
inline float sum(Register a) { return a; }
inline void store(float* p, Register a) { *p = a; }
inline void store(float* p, Register a, Index) { *p = a; }
inline Register load(const float* p) { return *p; }
inline Register load(const Eigen::bfloat16* p) { return static_cast<float>(*p); }
inline Register load(const Eigen::half* p) { return static_cast<float>(*p); }
template <class Storage>
Register load(const Storage* p, Index) {
  return load(p);
}
#endif

namespace detail {
template <class Storage>
Register load_through_copy(const Storage* p, Index n) {
  alignas(64) float lanes[kLanes] = {};
  StorageTraits<Storage>::to_float(p, lanes, n);
  return load(static_cast<const float*>(lanes));
}
}  // namespace detail

// s[r * s_stride + u] = the sum of a[u R + r]'s lanes (accumulate: +=), r < R, u < T, with
// s_stride >= T (each row of s holds its T sums): the dot products of a register block of R
// rows x T cached rows. On AVX-512 the R T <= 16 sums come
// out of one transpose-and-add tree (45 shuffles and adds for 16 registers, where 16 separate
// sums take 128, one register's sum being a chain of 4 shuffles and 4 adds), its inputs placed
// so that each row's T sums leave in adjacent lanes: one masked store per row, where a scalar
// store per sum took 2-3 instructions (an extract and a store) for each of the 16.
TPATTN_IGNORE_UNDEFINED_INTRINSICS_BEGIN  // core/eigen.hpp: GCC's _mm512_undefined_* idiom
template <int R, int T>
__attribute__((always_inline)) inline void sum_into(const Register (&a)[T * R], float* s,
                                                    Index s_stride, bool accumulate) {
#if defined(TPATTN_SIMD_AVX512)
  if constexpr (T * R > 1 && T * R <= 16) {
    // The tree leaves the sum of v[4 m + L] in lane 4 L + m; lane r T + u must get row r's
    // token u, so v[4 (e % 4) + e / 4] = a[u R + r] for e = r T + u.
    Register v[16];
    TPATTN_UNROLL
    for (int i = 0; i < 16; ++i) v[i] = zero();
    TPATTN_UNROLL
    for (int r = 0; r < R; ++r) TPATTN_UNROLL
    for (int u = 0; u < T; ++u) {
      const int e = r * T + u;
      v[4 * (e % 4) + e / 4] = a[u * R + r];
    }
    // Halving the lanes per source at each level: after level L, 16 >> L registers hold
    // 2^L sources each. Register k of a level pairs registers 2k and 2k + 1 of the one before.
    Register b[8], c[4], d[2];
    TPATTN_UNROLL
    for (int k = 0; k < 8; ++k)  // 256-bit halves: [v_2k: 8 sums | v_2k+1: 8 sums]
      b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    TPATTN_UNROLL
    for (int k = 0; k < 4; ++k)  // 128-bit lane L of c_k: v_{4k + L}, 4 sums
      c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
    TPATTN_UNROLL
    for (int k = 0; k < 2; ++k)  // lane L of d_k: [v_{8k + L}: 2 sums, v_{8k + 4 + L}: 2 sums]
      d[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0x44),
                           _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], 0xEE));
    // lane 4 L + m: the sum of v_{4 m + L}
    const Register e =
        _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
    TPATTN_UNROLL
    for (int r = 0; r < R; ++r) {
      // Lanes [r T, r T + T) to s + r s_stride: a masked store whose lane r T lands there.
      float* row = s + r * s_stride - r * T;
      const __mmask16 lanes = static_cast<__mmask16>(((1u << T) - 1u) << (r * T));
      _mm512_mask_storeu_ps(row, lanes,
                            accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, row), e) : e);
    }
    return;
  }
#endif
  TPATTN_UNROLL
  for (int r = 0; r < R; ++r) TPATTN_UNROLL
  for (int u = 0; u < T; ++u) {
    float& out = s[r * s_stride + u];
    out = accumulate ? out + sum(a[u * R + r]) : sum(a[u * R + r]);
  }
}
TPATTN_IGNORE_UNDEFINED_INTRINSICS_END

// One prefetch of the line holding p, to L1 (Level 3) or L2 (Level 2). On x86 with GCC or
// Clang an asm statement, since GCC 12 at -O2 and above with NDEBUG deletes __builtin_prefetch
// from the dense scorer's loops as dead code (tests/codegen/ checks the instructions are there).
template <int Level>
inline void prefetch_line(const char* p) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (Level == 3)
    __asm__ volatile("prefetcht0 %0" : : "m"(*p));
  else
    __asm__ volatile("prefetcht1 %0" : : "m"(*p));
#elif defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, Level);
#else
  (void)p;
#endif
}

// Asks for the cache lines of [p, p + bytes) to be brought into L1 ahead of use (a hint: never
// faults, never changes a value).
inline void prefetch(const void* p, Index bytes) {
  const char* first = static_cast<const char*>(p);
  for (Index offset = 0; offset < bytes; offset += 64) prefetch_line<3>(first + offset);
}

// The same, to L2 only: for data needed later than the next few thousand cycles.
inline void prefetch_to_l2(const void* p, Index bytes) {
  const char* first = static_cast<const char*>(p);
  for (Index offset = 0; offset < bytes; offset += 64) prefetch_line<2>(first + offset);
}

// Prefetches to L2 of a few ranges, issued a few lines per step() so that they spread through
// the arithmetic between steps: a core has few fill buffers (Intel gives 16 for its recent cores),
// and a burst of line prefetches beyond them stalls it until lines arrive, where the same
// prefetches a few at a time between register blocks overlap the FMAs.
class SpreadPrefetch {
 public:
  static constexpr int kMaxRanges = 4;

  // Adds [p, p + bytes) (ranges past kMaxRanges are dropped: a hint, never needed).
  void add(const void* p, Index bytes) {
    if (bytes <= 0 || count_ == kMaxRanges) return;
    ranges_[count_++] = {static_cast<const char*>(p), bytes};
    lines_ += (bytes + 63) / 64;
  }
  Index lines() const { return lines_; }
  Index issued() const { return issued_; }
  // Spreads the lines left over `steps` calls of step() (at least one line per step).
  void spread_over(Index steps) {
    const Index left = lines_ - issued_;
    per_step_ = steps > 0 ? (left + steps - 1) / steps : left;
    if (per_step_ < 1) per_step_ = 1;
  }
  void step() { issue(per_step_); }
  // The lines not issued yet.
  void finish() { issue(lines_ - issued_); }

 private:
  struct Range {
    const char* first = nullptr;
    Index bytes = 0;
  };
  void issue(Index n) {
    for (; n > 0 && range_ < count_; --n) {
      prefetch_line<2>(ranges_[range_].first + offset_);
      ++issued_;
      offset_ += 64;
      if (offset_ >= ranges_[range_].bytes) {
        ++range_;
        offset_ = 0;
      }
    }
  }
  Range ranges_[kMaxRanges];
  int count_ = 0;
  int range_ = 0;
  Index offset_ = 0;
  Index lines_ = 0;
  Index issued_ = 0;
  Index per_step_ = 1;
};

// Tells the compiler that `a` changed, so it keeps a loaded operand in its register: left alone,
// GCC folds the load into every FMA that uses it (one load per use), and a block of 4 query rows
// x 4 keys then loads 20 registers per 16 FMAs instead of 8.
inline void keep_in_register(Register& a) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(TPATTN_SIMD_SCALAR)
  __asm__("" : "+v"(a));
#else
  (void)a;
#endif
}

// Lanes [0, n) from p, n in [1, kLanes]; a whole register when n == kLanes.
template <class Storage>
Register load_first(const Storage* p, Index n) {
  return n == kLanes ? load(p) : load(p, n);
}
// Lanes [0, n) of a to p.
inline void store_first(float* p, Register a, Index n) {
  if (n == kLanes)
    store(p, a);
  else
    store(p, a, n);
}

}  // namespace simd
}  // namespace tpattn
