// tpattn/kernels/register_blocks.hpp -- the two inner products of attention over cached rows,
// register-blocked, reading the cache in its storage type (kernels/simd.hpp).
//
//   score_rows:       s[r][u]  = q_r . k_u                    (R query rows x n cached rows)
//   score_columns:    s[u][r]  = q_r . k_u, rows in lanes     (many query rows: no lane sums)
//   accumulate_rows:  acc_r   += sum_u w[r][u] v_u            (R output rows, n cached rows)
//
// Both load each cached element once per block of query rows and reuse it from a register for
// every row of the block; query rows (or weights) and accumulators stay in registers across a
// block of cached rows, so the fp32 accumulator of the value update is read and written once per
// block, not once per cached row. Cached rows are given by a base pointer and a stride in
// elements: any plane of any cache page, any KV head's columns of it.
#pragma once

#include <type_traits>

#include "tpattn/core/storage_type.hpp"
#include "tpattn/kernels/simd.hpp"

namespace tpattn {
namespace blocks {

// Registers that hold accumulators; the rest hold the operands of one step.
inline constexpr Index kAccumulators = simd::kRegisters / 2;
// Query rows per block. Measured in cache (32 rows x 64 cached rows of 128, AVX-512): scoring
// fp32 keys with fp32 queries ran 1.5x faster in blocks of 8 rows x 2 keys than 4 x 4, bf16
// keys 1.2x slower (each widened key register then serves 8 FMAs, but 8 query loads per 2 keys
// cost more than the widening saved); the value update ran 2.2x faster (fp32) and 1.05x (bf16)
// in blocks of 8 rows x 2 registers of columns than 4 x 4. With 16 registers (AVX2, SSE2) 8
// rows would spill, so blocks stay at 4 there.
inline constexpr int kWideRows = simd::kRegisters >= 32 ? 8 : 4;
template <class QStorage, class Storage>
inline constexpr int kScoreRows =
    std::is_same_v<QStorage, float>&& std::is_same_v<Storage, float> ? kWideRows : 4;
inline constexpr int kValueRows = kWideRows;
inline constexpr Index kMaxBlockTokens = 8;

// What score_columns and accumulate_rows run after each register block by default: nothing.
// A caller may pass its own action instead, e.g. a few software prefetches of a later tile, so
// that those spread through the arithmetic (SpreadPrefetch, simd.hpp).
struct NoAction {
  void operator()() const {}
};

// Cached rows per block for R query rows: as many as the accumulators allow.
constexpr Index block_tokens(Index rows) {
  const Index tokens = kAccumulators / rows;
  return tokens < 1 ? 1 : tokens > kMaxBlockTokens ? kMaxBlockTokens : tokens;
}

// bfloat16 cache rows are read in pairs of registers where the build has simd::load_pairs: one
// load of 2 kLanes elements gives their even and odd columns. A value update puts the columns
// back in order once per block; a score needs its query rows in the paired column order
// (to_paired_columns), as score_paired_rows takes them.
#if defined(TPATTN_SIMD_BF16_PAIRS)
inline constexpr Index kPairColumns = 2 * simd::kLanes;
#else
inline constexpr Index kPairColumns = 0;  // no paired loads in this build
#endif
template <class Storage>
inline constexpr bool kPairedLoads = kPairColumns > 0 && std::is_same_v<Storage, Eigen::bfloat16>;

// row[0, width) to the paired column order, in place (scratch: width floats): within each whole
// chunk of kPairColumns columns, the even columns, then the odd ones; the columns after the last
// whole chunk stay where they are. Without paired loads, nothing changes.
inline void to_paired_columns(float* row, Index width, float* scratch) {
  if constexpr (kPairColumns > 0) {
    const Index half = kPairColumns / 2;
    for (Index c = 0; c + kPairColumns <= width; c += kPairColumns) {
      for (Index i = 0; i < kPairColumns; ++i) scratch[i] = row[c + i];
      for (Index i = 0; i < half; ++i) {
        row[c + i] = scratch[2 * i];
        row[c + half + i] = scratch[2 * i + 1];
      }
    }
  } else {
    (void)row, (void)width, (void)scratch;
  }
}

namespace detail {

// s[r * s_stride + u] (+)= q[r * q_stride + 0 .. width) . k[u * k_stride + 0 .. width).
// Paired: q in the paired column order, k bfloat16 read by simd::load_pairs (whole chunks; the
// columns after them as in the plain order).
template <int R, int T, bool Paired = false, class QStorage, class Storage>
void score_block(const QStorage* q, Index q_stride, const Storage* k, Index k_stride, Index width,
                 float* s, Index s_stride, bool accumulate) {
  simd::Register acc[T * R];  // acc[u R + r]
  TPATTN_UNROLL
  for (int i = 0; i < T * R; ++i) acc[i] = simd::zero();
  Index c = 0;
#if defined(TPATTN_SIMD_BF16_PAIRS)
  if constexpr (Paired) {
    for (; c + kPairColumns <= width; c += kPairColumns) {
      simd::Register even[R], odd[R];
      TPATTN_UNROLL
      for (int r = 0; r < R; ++r) {
        even[r] = simd::load(q + r * q_stride + c);
        odd[r] = simd::load(q + r * q_stride + c + simd::kLanes);
        simd::keep_in_register(even[r]);
        simd::keep_in_register(odd[r]);
      }
      TPATTN_UNROLL
      for (int u = 0; u < T; ++u) {
        simd::Register key_even, key_odd;
        simd::load_pairs(k + u * k_stride + c, key_even, key_odd);
        TPATTN_UNROLL
        for (int r = 0; r < R; ++r)
          acc[u * R + r] = simd::fma(odd[r], key_odd, simd::fma(even[r], key_even, acc[u * R + r]));
      }
    }
  }
#endif
  // One loop for whole registers and the partial last one: a lambda or helper taking the
  // accumulators by reference would make GCC keep them in memory.
  for (; c < width; c += simd::kLanes) {
    const Index lanes = width - c < simd::kLanes ? width - c : simd::kLanes;
    simd::Register qv[R];
    TPATTN_UNROLL
    for (int r = 0; r < R; ++r) {
      qv[r] = simd::load_first(q + r * q_stride + c, lanes);
      simd::keep_in_register(qv[r]);
    }
    TPATTN_UNROLL
    for (int u = 0; u < T; ++u) {
      const simd::Register kv = simd::load_first(k + u * k_stride + c, lanes);
      TPATTN_UNROLL
      for (int r = 0; r < R; ++r) acc[u * R + r] = simd::fma(qv[r], kv, acc[u * R + r]);
    }
  }
  simd::sum_into<R, T>(acc, s, s_stride, accumulate);
}

template <int R, bool Paired, class QStorage, class Storage>
void score_rows_of(const QStorage* q, Index q_stride, const Storage* k, Index k_stride,
                   Index tokens, Index width, float* s, Index s_stride, bool accumulate) {
  constexpr int T = static_cast<int>(block_tokens(R));
  Index u = 0;
  for (; u + T <= tokens; u += T)
    score_block<R, T, Paired>(q, q_stride, k + u * k_stride, k_stride, width, s + u, s_stride,
                              accumulate);
  for (; u < tokens; ++u)
    score_block<R, 1, Paired>(q, q_stride, k + u * k_stride, k_stride, width, s + u, s_stride,
                              accumulate);
}

// acc[r * a_stride + c] += sum_u w[r * w_stride + u] v[u * v_stride + c], c in [column, column +
// C lanes), the last register partial (`lanes` of kLanes) when Partial.
template <int R, int C, bool Partial, class Storage>
void accumulate_block(const float* w, Index w_stride, Index w_step, const Storage* v,
                      Index v_stride, Index tokens, float* acc, Index a_stride, Index column,
                      Index lanes) {
  const auto width_of = [&](int c) { return Partial && c == C - 1 ? lanes : simd::kLanes; };
  // The block's own sum starts from 0 and joins acc once at the end: an element's accumulator
  // then takes one addition per block instead of one per cached row (a rounding error of
  // u sqrt(blocks + tokens) rather than u sqrt(rows) over a long context).
  simd::Register sum[R][C];
  TPATTN_UNROLL
  for (int r = 0; r < R; ++r) TPATTN_UNROLL
  for (int c = 0; c < C; ++c) sum[r][c] = simd::zero();
  // Whole pairs of registers from paired loads (bfloat16): vv[2p], vv[2p + 1] and sum[r][2p],
  // sum[r][2p + 1] then hold the even and odd columns of the pair's 2 kLanes.
  [[maybe_unused]] constexpr bool kPaired = kPairedLoads<Storage> && !Partial && C % 2 == 0;
  for (Index u = 0; u < tokens; ++u) {
    simd::Register vv[C];
#if defined(TPATTN_SIMD_BF16_PAIRS)
    if constexpr (kPaired) {
      TPATTN_UNROLL
      for (int c = 0; c < C; c += 2)
        simd::load_pairs(v + u * v_stride + column + c * simd::kLanes, vv[c], vv[c + 1]);
    } else
#endif
    {
      TPATTN_UNROLL
      for (int c = 0; c < C; ++c)
        vv[c] = simd::load_first(v + u * v_stride + column + c * simd::kLanes, width_of(c));
      // Each value register serves R FMAs: loaded once (GCC would fold the load of an fp32
      // value into every FMA that uses it, R loads instead of one).
      if constexpr (R > 1) {
        TPATTN_UNROLL
        for (int c = 0; c < C; ++c) simd::keep_in_register(vv[c]);
      }
    }
    TPATTN_UNROLL
    for (int r = 0; r < R; ++r) {
      const simd::Register weight = simd::broadcast(w[r * w_stride + u * w_step]);
      TPATTN_UNROLL
      for (int c = 0; c < C; ++c) sum[r][c] = simd::fma(weight, vv[c], sum[r][c]);
    }
  }
#if defined(TPATTN_SIMD_BF16_PAIRS)
  if constexpr (kPaired) {
    TPATTN_UNROLL
    for (int r = 0; r < R; ++r) TPATTN_UNROLL
    for (int c = 0; c < C; c += 2)
      simd::interleave_pairs(sum[r][c], sum[r][c + 1], sum[r][c], sum[r][c + 1]);
  }
#endif
  TPATTN_UNROLL
  for (int r = 0; r < R; ++r) TPATTN_UNROLL
  for (int c = 0; c < C; ++c) {
    float* out = acc + r * a_stride + column + c * simd::kLanes;
    const simd::Register total = simd::add(simd::load_first(out, width_of(c)), sum[r][c]);
    if (Partial && c == C - 1)
      simd::store(out, total, lanes);
    else
      simd::store(out, total);
  }
}

template <int R, class Storage, class Between>
void accumulate_rows_of(const float* w, Index w_stride, Index w_step, const Storage* v,
                        Index v_stride, Index tokens, Index width, float* acc, Index a_stride,
                        const Between& between) {
  constexpr int C = static_cast<int>(block_tokens(R));  // registers of columns per row
  constexpr Index kGroup = C * simd::kLanes;
  Index column = 0;
  for (; column + kGroup <= width; column += kGroup) {
    accumulate_block<R, C, false>(w, w_stride, w_step, v, v_stride, tokens, acc, a_stride, column,
                                  simd::kLanes);
    between();
  }
  for (; column + simd::kLanes <= width; column += simd::kLanes)
    accumulate_block<R, 1, false>(w, w_stride, w_step, v, v_stride, tokens, acc, a_stride, column,
                                  simd::kLanes);
  if (column < width)
    accumulate_block<R, 1, true>(w, w_stride, w_step, v, v_stride, tokens, acc, a_stride, column,
                                 width - column);
}

}  // namespace detail

namespace detail {

// s[u * s_stride + m kLanes + lane] = sum_c qt[c * q_stride + m kLanes + lane] k[u * k_stride + c]
// for m < M, u < T: M registers of query rows (rows in lanes), T cached rows, each key element
// broadcast once and used by M FMAs. No horizontal sum anywhere.
template <int M, int T>
void score_column_block(const float* qt, Index q_stride, const float* k, Index k_stride,
                        Index width, float* s, Index s_stride, bool accumulate) {
  simd::Register acc[T * M];  // acc[u M + m]
  TPATTN_UNROLL
  for (int i = 0; i < T * M; ++i) acc[i] = simd::zero();
  for (Index c = 0; c < width; ++c) {
    simd::Register qv[M];
    TPATTN_UNROLL
    for (int m = 0; m < M; ++m) qv[m] = simd::load(qt + c * q_stride + m * simd::kLanes);
    TPATTN_UNROLL
    for (int u = 0; u < T; ++u) {
      const simd::Register key = simd::broadcast(k[u * k_stride + c]);
      TPATTN_UNROLL
      for (int m = 0; m < M; ++m) acc[u * M + m] = simd::fma(qv[m], key, acc[u * M + m]);
    }
  }
  TPATTN_UNROLL
  for (int u = 0; u < T; ++u) TPATTN_UNROLL
  for (int m = 0; m < M; ++m) {
    float* out = s + u * s_stride + m * simd::kLanes;
    simd::store(out, accumulate ? simd::add(simd::load(out), acc[u * M + m]) : acc[u * M + m]);
  }
}

template <int M, class Between>
void score_columns_of(const float* qt, Index q_stride, const float* k, Index k_stride, Index tokens,
                      Index width, float* s, Index s_stride, bool accumulate,
                      const Between& between) {
  constexpr int T = static_cast<int>(block_tokens(M));
  Index u = 0;
  for (; u + T <= tokens; u += T) {
    score_column_block<M, T>(qt, q_stride, k + u * k_stride, k_stride, width, s + u * s_stride,
                             s_stride, accumulate);
    between();
  }
  for (; u < tokens; ++u)
    score_column_block<M, 1>(qt, q_stride, k + u * k_stride, k_stride, width, s + u * s_stride,
                             s_stride, accumulate);
}

}  // namespace detail

namespace detail {
// Calls run(std::integral_constant<int, n>()) for a runtime n in [1, Max].
template <int Max, class Run>
void with_rows(Index n, Run&& run) {
  if constexpr (Max > 1) {
    if (n < Max) return with_rows<Max - 1>(n, run);
  }
  run(std::integral_constant<int, Max>());
}
}  // namespace detail

namespace detail {
// Every query row in register blocks of kScoreRows (the last block smaller).
template <bool Paired, class QStorage, class Storage>
void score_row_blocks(const QStorage* q, Index q_stride, Index rows, const Storage* k,
                      Index k_stride, Index tokens, Index width, float* s, Index s_stride,
                      bool accumulate) {
  constexpr int kRows = kScoreRows<QStorage, Storage>;
  for (Index r = 0; r < rows; r += kRows) {
    const QStorage* q_r = q + r * q_stride;
    float* s_r = s + r * s_stride;
    with_rows<kRows>(rows - r, [&](auto block) {
      score_rows_of<decltype(block)::value, Paired>(q_r, q_stride, k, k_stride, tokens, width, s_r,
                                                    s_stride, accumulate);
    });
  }
}
}  // namespace detail

// s[r * s_stride + u] = q_r . k_u (accumulate: +=) for r < rows, u < tokens, where
// q_r = q + r * q_stride and k_u = k + u * k_stride, each `width` elements, both of any storage
// type. s_stride >= tokens.
template <class QStorage, class Storage>
void score_rows(const QStorage* q, Index q_stride, Index rows, const Storage* k, Index k_stride,
                Index tokens, Index width, float* s, Index s_stride, bool accumulate = false) {
  detail::score_row_blocks<false>(q, q_stride, rows, k, k_stride, tokens, width, s, s_stride,
                                  accumulate);
}

// score_rows for bfloat16 cached rows with the query rows in the paired column order
// (to_paired_columns: each row's columns [0, width) as one range), read by paired loads. In a
// build without them, the order is the plain one and this is score_rows.
inline void score_paired_rows(const float* q, Index q_stride, Index rows, const Eigen::bfloat16* k,
                              Index k_stride, Index tokens, Index width, float* s, Index s_stride,
                              bool accumulate = false) {
  detail::score_row_blocks<kPairColumns != 0>(q, q_stride, rows, k, k_stride, tokens, width, s,
                                              s_stride, accumulate);
}

// Query rows in SIMD lanes, for many rows against the same cached rows (MQA, MLA, the rows of
// a prefill): s[u * s_stride + r] (+)= q_r . k_u for r < row_registers * kLanes, u < tokens, where
// q_r[c] = qt[c * q_stride + r] (the queries transposed, rows padded to whole registers: a
// padded row scores what its padding gives) and k_u = k + u * k_stride, fp32. Each key element
// is broadcast once per block of rows and no lane sum is formed, where score_rows spends a sum
// tree per register block.
inline constexpr int kColumnRegisters = simd::kRegisters >= 32 ? 2 : 1;  // row registers a block
// between: run after each whole register block (NoAction).
template <class Between = NoAction>
void score_columns(const float* qt, Index q_stride, Index row_registers, const float* k,
                   Index k_stride, Index tokens, Index width, float* s, Index s_stride,
                   bool accumulate = false, const Between& between = Between()) {
  for (Index m = 0; m < row_registers; m += kColumnRegisters) {
    const float* qt_m = qt + m * simd::kLanes;
    float* s_m = s + m * simd::kLanes;
    detail::with_rows<kColumnRegisters>(row_registers - m, [&](auto block) {
      detail::score_columns_of<decltype(block)::value>(qt_m, q_stride, k, k_stride, tokens, width,
                                                       s_m, s_stride, accumulate, between);
    });
  }
}

// acc_r += sum_u w[r * w_stride + u * w_step] v_u for r < rows (acc_r = acc + r * a_stride,
// `width` floats), u < tokens, v_u = v + u * v_stride in any storage type. The weights are any
// strided [rows, tokens] view (w_step 1: row-major; w_stride 1: its transpose).
// BlockRows: rows per register block (at most kValueRows). between: run after each block of
// whole registers of columns (NoAction).
template <int BlockRows = kValueRows, class Storage, class Between = NoAction>
void accumulate_rows(const float* w, Index w_stride, Index w_step, Index rows, const Storage* v,
                     Index v_stride, Index tokens, Index width, float* acc, Index a_stride,
                     const Between& between = Between()) {
  static_assert(BlockRows >= 1 && BlockRows <= kValueRows, "BlockRows: 1 to kValueRows");
  for (Index r = 0; r < rows; r += BlockRows) {
    const float* w_r = w + r * w_stride;
    float* acc_r = acc + r * a_stride;
    detail::with_rows<BlockRows>(rows - r, [&](auto block) {
      detail::accumulate_rows_of<decltype(block)::value>(w_r, w_stride, w_step, v, v_stride, tokens,
                                                         width, acc_r, a_stride, between);
    });
  }
}

}  // namespace blocks
}  // namespace tpattn
