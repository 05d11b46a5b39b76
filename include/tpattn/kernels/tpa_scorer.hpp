// tpattn/kernels/tpa_scorer.hpp -- attention straight from cached TPA factors (docs/attention.md
// §3): the scoring policy of TPA, which the driver (kernels/attention_driver.hpp) runs per work
// item.
//
// Cached per token s: A_K[s] (R_K x h), B_K[s] (R_K x d_h, rotated), A_V[s] (R_V x h),
// B_V[s] (R_V x d_v). K and V are never materialised. For query head i of one query token:
//   score[i][s] = c * sum_u A_K[s][u][i] * W[s][u][i],     c = 1 / (R_K sqrt(d_h))
// where W[s][u][i] = q_i . B_K[s][u] is formed in one of two orders, equal up to rounding
// (multiply-adds per cached token for the scores, the A_K reduction's R_K h included):
//   factor order (FlashTPA):  W[s] = (B_K[s] B_Q^T) A_Q / R_Q      R_K (R_Q d_h + R_Q h + h)
//   query order:              W[s] = B_K[s] q^T,  q = A_Q^T B_Q / R_Q     R_K (h d_h + h)
// and the output, with p = online softmax of the scores over s,
//   O[i] = (1 / R_V) sum_s sum_v p[i][s] A_V[s][v][i] B_V[s][v].
// The factor order is cheaper exactly when R_Q < h d_h / (h + d_h); TPA-KVonly has a plain q and
// always uses the query order.
#pragma once

#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "tpattn/cache/record.hpp"
#include "tpattn/kernels/cache_tiles.hpp"
#include "tpattn/kernels/gemm.hpp"
#include "tpattn/kernels/register_blocks.hpp"
#include "tpattn/kernels/softmax_state.hpp"

namespace tpattn {

struct TpaShape {
  Index heads = 0;      // h
  Index head_dim = 0;   // d_h
  Index value_dim = 0;  // d_v
  Index rank_q = 0;     // R_Q; 0 for TPA-KVonly (the query comes materialised)
  Index rank_k = 0;     // R_K
  Index rank_v = 0;     // R_V
};

enum class TpaOrder : std::uint8_t { automatic, factor, query };

// The contraction order with fewer multiply-adds per cached token (ties: factor order). For a
// shape a TpaScorer accepted, both costs are parts of its checked workspace, so they fit in Index.
inline TpaOrder cheaper_tpa_order(const TpaShape& shape) {
  if (shape.rank_q == 0) return TpaOrder::query;
  const Index factor = shape.rank_q * (shape.head_dim + shape.heads);
  const Index query = shape.heads * shape.head_dim;
  return factor <= query ? TpaOrder::factor : TpaOrder::query;
}

template <class Storage>
class TpaScorer {
 public:
  static constexpr Index kTileTokens = 128;
  static constexpr Index kQueryTokens = 8;
  // Heads per register block of the value update O += Z^T B_V read in place from the cache
  // (fewer than kColumnMinRows heads; more widen B_V first, below). 16-bit B_V: 4, as blocks of 8
  // ran 3-7% slower (d_h 128 and 64, 16k tokens, every TPA row; again 1.04-1.07x slower on a
  // Zen 4 core). fp32 B_V: blocks::kValueRows (8 with 32 registers), 1.06-1.08x faster than 4
  // at d_h 128 and 0.99-1.02x at d_h 64 on that Zen 4 core (32 heads, 16k tokens, 1 thread, min
  // of 2 alternated runs).
  static constexpr int kValueRows = std::is_same_v<Storage, float> ? blocks::kValueRows : 4;
  // Query-side rows (R_Q in the factor order, h in the query order) from which the scores run
  // with those rows in SIMD lanes (blocks::score_columns: no lane sums), over B_K widened to
  // fp32 kWidenRows cached rows at a time (16 KiB at d_h 128, so the copy stays in L1), provided
  // they fill a register (R_Q 8 would leave half of an AVX-512 register idle: up to 1.08x slower
  // than score_rows); fewer rows read B_K in its storage type with score_rows. With at least
  // kColumnMinRows heads, B_V is widened (copied, for f32) the same way and the value update
  // runs on fp32 rows in L1. Measured on an AVX-512 Xeon (32 heads, 16k tokens, 1 thread, min of 2
  // alternated runs) against score_rows and the value update on the cache: bf16 (16,1,1) 1.08x
  // faster at d_h 128, 1.15x at d_h 64; (8,2,2) 1.02-1.05x; f32 within the spread (0.98-1.03x). The
  // query rows are padded to multiples of kRowPadding (the widest register) so the workspace does
  // not depend on the instruction set.
  static constexpr Index kColumnMinRows = 8;
  static constexpr Index kWidenRows = 32;
  static constexpr Index kRowPadding = 16;

  // Which record planes hold A_K, B_K, A_V and B_V (from the record's names: Planes::of).
  struct Planes {
    Index a_k = -1, b_k = -1, a_v = -1, b_v = -1;
    static Planes of(const CacheRecord& record) {
      return {record.plane_index("A_K"), record.plane_index("B_K"), record.plane_index("A_V"),
              record.plane_index("B_V")};
    }
  };

  TpaScorer() = default;
  // Throws Error naming `call` if a workspace size does not fit in Index. planes: unset when
  // the scorer is built only to check sizes.
  explicit TpaScorer(const TpaShape& shape, const char* call = "TpaScorer", Planes planes = {})
      : shape_(shape), planes_(planes), workspace_floats_(planned_workspace_floats(call)) {}

  const TpaShape& shape() const { return shape_; }

  Index workspace_floats() const { return workspace_floats_; }

  // Factored query (TPA). a_q: [query_tokens, R_Q, h], b_q: [query_tokens, R_Q, d_h] (rotated).
  // out: [query_tokens, h, d_v]; lse: [query_tokens, h] or null. Query token t sees the cached
  // tokens [range.lower(t), range.horizon(t)) (kernels/cache_tiles.hpp); a row that sees none
  // gives out 0 and lse -inf. order: automatic picks cheaper_tpa_order().
  void run(const float* a_q, const float* b_q, Index query_tokens, const SequenceView& view,
           const KeyRange& range, float* out, float* lse, float* workspace,
           TpaOrder order = TpaOrder::automatic) const {
    if (order == TpaOrder::automatic) order = cheaper_tpa_order(shape_);
    run_impl(a_q, b_q, nullptr, query_tokens, view, range, out, lse, workspace, order);
  }

  // Materialised query (TPA-KVonly, or an engine that formed q itself). q: [query_tokens, h, d_h].
  void run(const float* q, Index query_tokens, const SequenceView& view, const KeyRange& range,
           float* out, float* lse, float* workspace) const {
    run_impl(nullptr, nullptr, q, query_tokens, view, range, out, lse, workspace, TpaOrder::query);
  }

 private:
  void run_impl(const float* a_q, const float* b_q, const float* q, Index query_tokens,
                const SequenceView& view, const KeyRange& range, float* out, float* lse,
                float* workspace, TpaOrder order) const {
    const Index h = shape_.heads, dh = shape_.head_dim, dv = shape_.value_dim;
    const Index rq = shape_.rank_q;
    for (Index first = 0; first < query_tokens; first += kQueryTokens) {
      const Index count = query_tokens - first < kQueryTokens ? query_tokens - first : kQueryTokens;
      run_chunk(a_q == nullptr ? nullptr : a_q + first * rq * h,
                b_q == nullptr ? nullptr : b_q + first * rq * dh,
                q == nullptr ? nullptr : q + first * h * dh, count, view, range.from_token(first),
                out + first * h * dv, lse == nullptr ? nullptr : lse + first * h, workspace, order);
    }
  }

  // Per tile of n cached tokens and per query token, every product a register-blocked one
  // (kernels/register_blocks.hpp):
  //   query order:   W = B_K q^T                    [n R_K, h]
  //   factor order:  P = B_K B_Q^T [n R_K, R_Q];  W = P A_Q       (accumulate_rows for P A_Q)
  //     (W or P: score_columns, the query side's rows in lanes, over B_K widened to fp32 in
  //     chunks, when the query side has a register of rows; else score_rows on the cache)
  //   L[s] = sum_u A_K[s][u] * W[s R_K + u]         [n, h]       (elementwise, over i)
  //   Z[s R_V + v] = p^T[s] * A_V[s][v]             [n R_V, h]   (p^T: the softmax weights)
  //   O += Z^T B_V                                  [h, d_v]     (accumulate_rows, Z read
  //                                                               transposed in place; B_V widened
  //                                                               (copied for f32) in chunks when
  //                                                               h >= kColumnMinRows)
  // The A_K and A_V reductions run over contiguous rows of h, as the cache stores them.
  void run_chunk(const float* a_q, const float* b_q, const float* q, Index count,
                 const SequenceView& view, const KeyRange& range, float* out, float* lse,
                 float* workspace, TpaOrder order) const {
    const Index h = shape_.heads, dh = shape_.head_dim, dv = shape_.value_dim;
    const Index rk = shape_.rank_k, rv = shape_.rank_v, rq = shape_.rank_q;
    const float score_scale = 1.0f / (static_cast<float>(rk) * std::sqrt(static_cast<float>(dh)));

    WorkspaceCarver carve(workspace);  // same order as workspace_floats()
    const Index hp = padded(h), rqp = padded(rq);
    float* query = carve.take(kQueryTokens * h * dh);      // [count, h, d_h]  (scaled)
    float* factor_a = carve.take(kQueryTokens * rq * h);   // [count, R_Q, h]  (scaled)
    float* factor_b = carve.take(kQueryTokens * rq * dh);  // [count, R_Q, d_h]
    float* products = carve.take(kTileTokens * rk * rqp);  // P: [tile R_K, R_Q], row stride rqp
    float* weights_w = carve.take(kTileTokens * rk * hp);  // W: [tile R_K, h], row stride hp
    float* logits = carve.take(kTileTokens * h);           // L, then p^T: [tile, h]
    float* values_z = carve.take(kTileTokens * rv * h);    // Z: [tile R_V, h]
    float* softmax_scratch = carve.take(2 * h);
    const Index rows = count * h;  // row t * h + i: query token t, head i
    float* max = carve.take(kQueryTokens * h);
    float* sum = carve.take(kQueryTokens * h);
    float* acc = carve.take(kQueryTokens * h * dv);
    float* queries_t = carve.take(kQueryTokens * dh * (hp > rqp ? hp : rqp));  // [count, d_h, pad]
    float* rows_f32 = carve.take(kWidenRows * (dh > dv ? dh : dv));
    SoftmaxState state(max, sum, acc, rows, dv);
    state.reset();

    // Fold every constant of the score into the query side, once per step. The scale goes on
    // A_Q first: a product with a scaled operand would make Eigen evaluate it into a heap
    // temporary.
    if (q != nullptr) {
      map_matrix(query, count * h, dh) = map_matrix(q, count * h, dh) * score_scale;
    } else {
      map_matrix(factor_a, count * rq, h) =
          map_matrix(a_q, count * rq, h) * (score_scale / static_cast<float>(rq));
      if (order == TpaOrder::query) {  // q_t = A_Q^T B_Q / R_Q
        for (Index t = 0; t < count; ++t)
          multiply(map_matrix(static_cast<const float*>(factor_a) + t * rq * h, rq, h).transpose(),
                   map_matrix(b_q + t * rq * dh, rq, dh), map_matrix(query + t * h * dh, h, dh));
      } else {
        map_matrix(factor_b, count * rq, dh) = map_matrix(b_q, count * rq, dh);
      }
    }
    // The query side of the scores: q (query order) or B_Q (factor order), rows of query token t
    // from side_rows + t * side_count * d_h; transposed and padded for the column path.
    const float* side_rows = order == TpaOrder::query ? query : factor_b;
    const Index side_count = order == TpaOrder::query ? h : rq;
    const Index side_padded = order == TpaOrder::query ? hp : rqp;
    float* side_scores = order == TpaOrder::query ? weights_w : products;  // row stride side_padded
    const bool columns = side_count >= kColumnMinRows && side_count >= simd::kLanes;
    // B_V widened (or copied) too, where enough heads share each element.
    const bool widen_values = h >= kColumnMinRows;
    if (columns) {
      for (Index t = 0; t < count; ++t) {
        MatrixMap transposed = map_matrix(queries_t + t * dh * side_padded, dh, side_padded);
        transposed.leftCols(side_count) =
            map_matrix(side_rows + t * side_count * dh, side_count, dh).transpose();
        transposed.rightCols(side_padded - side_count).setZero();
      }
    }

    // Software prefetch to L2 of the next tile, every plane, a few lines after each register
    // block of this tile's scores and value update (simd::SpreadPrefetch). Measured at the
    // paper's shapes (32 heads, 16k and 64k tokens, 1 thread, min of 2 alternated runs, AVX-512
    // Xeon) against the schedule before it (a tile's A_V and B_V
    // when it starts, the next tile's A_K and B_K after its softmax, one line per 4 KiB page
    // each, the L2 streamer the rest): 1.06-1.21x faster in every TPA row (d_h 128 and 64, bf16
    // and f32; (16,1,1) bf16 d_h 128, 16k tokens: 2881 -> 2468 us). Every line of those two halves
    // at once (1.08-1.16x faster than no software prefetch on an earlier AVX-512 Xeon) stalled this
    // one on its fill buffers (a sixth of the kernel's samples), 1.02-1.14x slower than one line
    // per page.
    const Index last_token =
        range.horizon(count - 1) < view.length() ? range.horizon(count - 1) : view.length();
    const auto next_tile_ranges = [&](const CacheTile& tile, simd::SpreadPrefetch& out) {
      const Index from = tile.first + tile.tokens;
      if (from >= last_token) return;
      const Index block = from / view.block_tokens(), row = from % view.block_tokens();
      Index tokens = kTileTokens;
      if (tokens > last_token - from) tokens = last_token - from;
      if (tokens > view.block_tokens() - row) tokens = view.block_tokens() - row;
      for (Index plane : {planes_.a_k, planes_.b_k, planes_.a_v, planes_.b_v}) {
        const Index width = view.elements_per_token(plane);
        out.add(view.plane_block<Storage>(plane, block) + row * width,
                tokens * width * static_cast<Index>(sizeof(Storage)));
      }
    };
    // The register blocks of a whole tile for one query token, about: the scores' blocks of
    // tokens for each group of row registers, and the value update's blocks of heads times
    // blocks of columns, per widened chunk when B_V is widened.
    const Index tile_blocks = [&] {
      const Index score_groups =
          (side_padded / simd::kLanes + blocks::kColumnRegisters - 1) / blocks::kColumnRegisters;
      const Index score =
          columns ? kTileTokens * rk / blocks::block_tokens(blocks::kColumnRegisters) * score_groups
                  : 0;
      const int value_rows = widen_values ? blocks::kValueRows : kValueRows;
      const Index chunks = widen_values ? (kTileTokens * rv + kWidenRows - 1) / kWidenRows : 1;
      const Index value = chunks * ((h + value_rows - 1) / value_rows) *
                          (dv / (blocks::block_tokens(value_rows) * simd::kLanes));
      return score + value;
    }();
    for_each_tile(view, range, count, kTileTokens, [&](const CacheTile& tile) {
      simd::SpreadPrefetch next_tile;
      next_tile_ranges(tile, next_tile);
      next_tile.spread_over(count * tile_blocks);
      const auto between_blocks = [&next_tile] { next_tile.step(); };
      const Storage* a_k = tile_rows(view, planes_.a_k, tile);  // [n R_K, h]
      const Storage* b_k = tile_rows(view, planes_.b_k, tile);  // [n R_K, d_h]
      const Storage* a_v = tile_rows(view, planes_.a_v, tile);  // [n R_V, h]
      const Storage* b_v = tile_rows(view, planes_.b_v, tile);  // [n R_V, d_v]
      for (Index t = 0; t < count; ++t) {
        // Query token t sees the tile's tokens [from, seen) only.
        const Index from = tile.hidden_before(range.lower(t));
        const Index seen = tile.seen_by(range.horizon(t));
        if (seen <= from) continue;
        const Index n = seen - from;
        const Index keys = n * rk;  // rows of B_K from row from R_K
        const Storage* b_k_seen = b_k + from * rk * dh;
        // The query side against the seen rows of B_K: W (query order) or P (factor order).
        if (columns) {
          const float* side_t = queries_t + t * dh * side_padded;
          for (Index first = 0; first < keys; first += kWidenRows) {
            const Index widened = keys - first < kWidenRows ? keys - first : kWidenRows;
            const float* key_rows = widened_rows(b_k_seen + first * dh, widened * dh, rows_f32);
            blocks::score_columns(side_t, side_padded, side_padded / simd::kLanes, key_rows, dh,
                                  widened, dh, side_scores + first * side_padded, side_padded,
                                  /*accumulate=*/false, between_blocks);
          }
        } else {
          blocks::score_rows(b_k_seen, dh, keys, side_rows + t * side_count * dh, dh, side_count,
                             dh, side_scores, side_padded);
        }
        if (order == TpaOrder::factor) {  // W = P A_Q
          map_matrix(weights_w, keys, h, hp).setZero();
          blocks::accumulate_rows(static_cast<const float*>(products), rqp, 1, keys,
                                  static_cast<const float*>(factor_a) + t * rq * h, h, rq, h,
                                  weights_w, hp);
        }
        // L[s] = sum_u A_K[s][u] * W[s R_K + u]; the softmax turns L into p^T in place.
        for (Index s = 0; s < n; ++s)
          reduce_ranks(a_k + (from + s) * rk * h, weights_w + s * rk * hp, hp, rk, h,
                       logits + s * h);
        state.absorb_columns(map_matrix(logits, n, h), t * h, softmax_scratch);
        // Z[s R_V + v] = p^T[s] * A_V[s][v];  O_t[i] += sum_{s v} Z[s R_V + v][i] B_V[s R_V + v],
        // Z read in place as [h, n R_V]. Only the tokens t sees: a masked weight is 0, and
        // 0 x (NaN or inf in a hidden value) would still poison its output.
        for (Index s = 0; s < n; ++s)
          scale_ranks(a_v + (from + s) * rv * h, logits + s * h, rv, h, values_z + s * rv * h);
        // Blocks of kValueRows heads; Z is read transposed (h apart).
        float* acc_t = state.acc().data() + t * h * dv;
        const Storage* b_v_seen = b_v + from * rv * dv;
        if (widen_values) {
          for (Index first = 0; first < n * rv; first += kWidenRows) {
            const Index widened = n * rv - first < kWidenRows ? n * rv - first : kWidenRows;
            blocks::accumulate_rows(static_cast<const float*>(values_z) + first * h, 1, h, h,
                                    widened_rows(b_v_seen + first * dv, widened * dv, rows_f32), dv,
                                    widened, dv, acc_t, dv, between_blocks);
          }
        } else {
          blocks::accumulate_rows<kValueRows>(static_cast<const float*>(values_z), 1, h, h,
                                              b_v_seen, dv, n * rv, dv, acc_t, dv, between_blocks);
        }
      }
      next_tile.finish();
    });

    state.finish(0, rows, out, dv, lse, 1.0f / static_cast<float>(rv));
  }

  // The tile's rows of a plane, in the cache (a plane's tokens are contiguous within a block).
  const Storage* tile_rows(const SequenceView& view, Index plane, const CacheTile& tile) const {
    return view.plane_block<Storage>(plane, tile.block) + tile.row * view.elements_per_token(plane);
  }

  // n rounded up to a multiple of kRowPadding.
  static Index padded(Index n) { return (n + kRowPadding - 1) / kRowPadding * kRowPadding; }

  // `elements` cached elements as fp32 in scratch (widened, or copied for float storage: rows
  // read again and again from L1 rather than from wherever the prefetch left them; (8,2,2) f32
  // 1.08-1.12x faster at d_h 128 and 64, (16,1,1) f32 within the spread).
  static const float* widened_rows(const Storage* rows, Index elements, float* scratch) {
    StorageTraits<Storage>::to_float(rows, scratch, elements);
    return scratch;
  }

  // out[i] = sum_{u < ranks} a[u h + i] w[u w_stride + i], i < h: one token's A_K reduction.
  static void reduce_ranks(const Storage* a, const float* w, Index w_stride, Index ranks, Index h,
                           float* out) {
    for (Index i = 0; i < h; i += simd::kLanes) {
      const Index lanes = h - i < simd::kLanes ? h - i : simd::kLanes;
      simd::Register total = simd::zero();
      for (Index u = 0; u < ranks; ++u)
        total = simd::fma(simd::load_first(a + u * h + i, lanes),
                          simd::load_first(w + u * w_stride + i, lanes), total);
      simd::store_first(out + i, total, lanes);
    }
  }

  // out[u h + i] = p[i] a[u h + i], u < ranks, i < h: one token's weights times its A_V.
  static void scale_ranks(const Storage* a, const float* p, Index ranks, Index h, float* out) {
    for (Index i = 0; i < h; i += simd::kLanes) {
      const Index lanes = h - i < simd::kLanes ? h - i : simd::kLanes;
      const simd::Register weight = simd::load_first(p + i, lanes);
      for (Index u = 0; u < ranks; ++u)
        simd::store_first(out + u * h + i,
                          simd::mul(weight, simd::load_first(a + u * h + i, lanes)), lanes);
    }
  }

  // Every size of the workspace, checked once here; run() then carves the same sizes unchecked.
  Index planned_workspace_floats(const char* call) const {
    const char* argument = "workspace_floats()";
    const auto product = [&](Index a, Index b, Index c = 1) {
      return detail::checked_product(call, argument, detail::checked_product(call, argument, a, b),
                                     c);
    };
    const Index h = shape_.heads, dh = shape_.head_dim, dv = shape_.value_dim;
    const Index rk = shape_.rank_k, rv = shape_.rank_v, rq = shape_.rank_q;
    const Index rows = product(kQueryTokens, h);
    const auto padded_checked = [&](Index n) {
      return detail::checked_sum(call, argument, n, kRowPadding - 1) / kRowPadding * kRowPadding;
    };
    const Index hp = padded_checked(h), rqp = padded_checked(rq);
    // The list is evaluated in order, so the first size that overflows is the one reported.
    return WorkspaceCarver::floats_for(
        call, argument,
        {product(rows, dh), product(kQueryTokens, rq, h),              // q, A_Q
         product(kQueryTokens, rq, dh),                                // B_Q
         product(kTileTokens, rk, rqp), product(kTileTokens, rk, hp),  // P, W
         product(kTileTokens, h), product(kTileTokens, rv, h),         // L, Z
         product(2, h), rows, rows, product(rows, dv),                 // softmax scratch, state
         product(kQueryTokens, dh, hp > rqp ? hp : rqp),               // transposed query side
         product(kWidenRows, dh > dv ? dh : dv)});                     // widened B_K, B_V
  }

  TpaShape shape_;
  Planes planes_;
  Index workspace_floats_ = 0;
};

}  // namespace tpattn
