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
#include <limits>

#include "tpattn/cache/record.hpp"
#include "tpattn/kernels/cache_tiles.hpp"
#include "tpattn/kernels/gemm.hpp"
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

  void run_chunk(const float* a_q, const float* b_q, const float* q, Index count,
                 const SequenceView& view, const KeyRange& range, float* out, float* lse,
                 float* workspace, TpaOrder order) const {
    const Index h = shape_.heads, dh = shape_.head_dim, dv = shape_.value_dim;
    const Index rk = shape_.rank_k, rv = shape_.rank_v, rq = shape_.rank_q;
    const float score_scale = 1.0f / (static_cast<float>(rk) * std::sqrt(static_cast<float>(dh)));

    // The products that form W write whole packets of columns, so W and the operands it is formed
    // from (q^T, A_Q) have their h columns padded to hp with zeros.
    const Index hp = padded_heads();
    WorkspaceCarver carve(workspace);                            // same order as workspace_floats()
    float* query = carve.take(kQueryTokens * h * dh);            // [count, h, d_h]  (scaled)
    float* query_t = carve.take(kQueryTokens * dh * hp);         // [count, d_h, hp]  q^T
    float* factor_a = carve.take(kQueryTokens * rq * hp);        // [count, R_Q, hp]  (scaled)
    float* factor_b = carve.take(kQueryTokens * rq * dh);        // [count, R_Q, d_h]
    float* tile_ak = carve.take(kTileTokens * rk * h);           // [tile R_K, h]
    float* tile_bk = carve.take(kTileTokens * rk * dh);          // [tile R_K, d_h]
    float* tile_av = carve.take(kTileTokens * rv * h);           // [tile R_V, h]
    float* tile_bv = carve.take(kTileTokens * rv * dv);          // [tile R_V, d_v]
    float* products = carve.take(kTileTokens * rk * rq);         // P: [tile R_K, R_Q]
    float* weights_w = carve.take(kTileTokens * rk * hp);        // W: [tile R_K, hp]
    float* logits_t = carve.take(kTileTokens * h);               // L^T: [tile, h]
    float* values_z = carve.take(kTileTokens * rv * h);          // Z: [tile R_V, h]
    float* scores = carve.take(kQueryTokens * h * kTileTokens);  // [count h, tile], stride tile
    const Index rows = count * h;  // row t * h + i: query token t, head i
    float* max = carve.take(kQueryTokens * h);
    float* sum = carve.take(kQueryTokens * h);
    float* acc = carve.take(kQueryTokens * h * dv);
    SoftmaxState state(max, sum, acc, rows, dv);
    state.reset();

    // Fold every constant of the score into the query side, once per step.
    if (order == TpaOrder::query) {
      MatrixMap queries = map_matrix(query, count * h, dh);
      if (q != nullptr) {
        queries = map_matrix(q, count * h, dh) * score_scale;
      } else {
        // q_t = A_Q^T B_Q / R_Q, the scale applied to A_Q first: a product with a scaled operand
        // would make Eigen evaluate the operand into a heap temporary.
        map_matrix(factor_a, count * rq, h, hp) =
            map_matrix(a_q, count * rq, h) * (score_scale / static_cast<float>(rq));
        for (Index t = 0; t < count; ++t)
          multiply(map_matrix(factor_a + t * rq * hp, rq, h, hp).transpose(),
                   map_matrix(b_q + t * rq * dh, rq, dh), queries.middleRows(t * h, h));
      }
      MatrixMap transposed = map_matrix(query_t, count * dh, hp);
      transposed.rightCols(hp - h).setZero();
      for (Index t = 0; t < count; ++t)
        transposed.block(t * dh, 0, dh, h) = queries.middleRows(t * h, h).transpose();
    } else {
      map_matrix(factor_a, count * rq, hp).rightCols(hp - h).setZero();
      map_matrix(factor_a, count * rq, h, hp) =
          map_matrix(a_q, count * rq, h) * (score_scale / static_cast<float>(rq));
      map_matrix(factor_b, count * rq, dh) = map_matrix(b_q, count * rq, dh);
    }

    for_each_tile(view, range, count, kTileTokens, [&](const CacheTile& tile) {
      const Index n = tile.tokens;
      const ConstMatrixMap a_k =
          read_tile_rows(view, planes_.a_k, tile, rk * h, tile_ak, n * rk, h);
      const ConstMatrixMap b_k =
          read_tile_rows(view, planes_.b_k, tile, rk * dh, tile_bk, n * rk, dh);
      MatrixMap tile_scores = map_matrix(scores, rows, n, kTileTokens);
      const ConstMatrixMap w = map_matrix(static_cast<const float*>(weights_w), n * rk, hp);
      MatrixMap logits = map_matrix(logits_t, n, h);
      for (Index t = 0; t < count; ++t) {
        if (order == TpaOrder::query) {  // W = B_K q^T
          small_product(b_k.data(), dh, 1, query_t + t * dh * hp, hp, dh, n * rk, hp, weights_w, hp,
                        /*accumulate=*/false);
        } else {  // W = (B_K B_Q^T) A_Q
          MatrixMap p = map_matrix(products, n * rk, rq);
          multiply(b_k, map_matrix(factor_b + t * rq * dh, rq, dh).transpose(), p);
          small_product(products, rq, 1, factor_a + t * rq * hp, hp, rq, n * rk, hp, weights_w, hp,
                        /*accumulate=*/false);
        }
        // L[s][i] = sum_u A_K[s][u][i] W[s][u][i], one rank u of every token at a time (its
        // rows are R_K rows apart in both tiles).
        logits = rank_rows(a_k.data(), 0, n, rk, h)
                     .cwiseProduct(rank_rows(w.data(), 0, n, rk, hp).leftCols(h));
        for (Index u = 1; u < rk; ++u)
          logits += rank_rows(a_k.data(), u, n, rk, h)
                        .cwiseProduct(rank_rows(w.data(), u, n, rk, hp).leftCols(h));
        tile_scores.middleRows(t * h, h) = logits.transpose();
        // Query token t sees the tile's columns [from, seen) only.
        const Index from = tile.hidden_before(range.lower(t));
        const Index seen = tile.seen_by(range.horizon(t));
        if (from > 0)
          tile_scores.block(t * h, 0, h, from).setConstant(-std::numeric_limits<float>::infinity());
        if (seen < n)
          tile_scores.block(t * h, seen, h, n - seen)
              .setConstant(-std::numeric_limits<float>::infinity());
      }
      state.absorb_scores(tile_scores);

      const ConstMatrixMap a_v =
          read_tile_rows(view, planes_.a_v, tile, rv * h, tile_av, n * rv, h);
      const ConstMatrixMap b_v =
          read_tile_rows(view, planes_.b_v, tile, rv * dv, tile_bv, n * rv, dv);
      MatrixMap z = map_matrix(values_z, n * rv, h);
      for (Index t = 0; t < count; ++t) {
        // Only the tokens query token t sees, columns [from, seen): a masked weight is 0, and
        // 0 x (NaN or inf in a hidden value) would still poison its output.
        const Index from = tile.hidden_before(range.lower(t));
        const Index seen = tile.seen_by(range.horizon(t)) - from;
        if (seen <= 0) continue;
        // Z[s][v][i] = p[i][s] A_V[s][v][i];  O_t += Z^T B_V
        MatrixMap seen_weights = map_matrix(logits_t, seen, h);  // p^T of query token t
        seen_weights = tile_scores.block(t * h, from, h, seen).transpose();
        const float* a_v_seen = a_v.data() + from * rv * h;
        for (Index v = 0; v < rv; ++v)
          rank_rows(values_z, v, seen, rv, h) =
              rank_rows(a_v_seen, v, seen, rv, h).cwiseProduct(seen_weights);
        small_product(z.data(), 1, h, b_v.data() + from * rv * dv, dv, seen * rv, h, dv,
                      state.acc().data() + t * h * dv, dv, /*accumulate=*/true);
      }
    });

    state.finish(0, rows, out, dv, lse, 1.0f / static_cast<float>(rv));
  }

  // Rank r's rows of a tile's [tokens R, cols] factor: [tokens, cols], R rows apart.
  static ConstMatrixMap rank_rows(const float* tile, Index r, Index tokens, Index ranks,
                                  Index cols) {
    return map_matrix(tile + r * cols, tokens, cols, ranks * cols);
  }
  static MatrixMap rank_rows(float* tile, Index r, Index tokens, Index ranks, Index cols) {
    return map_matrix(tile + r * cols, tokens, cols, ranks * cols);
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
    const Index hp = detail::checked_sum(call, argument, h, kPacketFloats - 1) / kPacketFloats *
                     kPacketFloats;  // padded_heads()
    // The list is evaluated in order, so the first size that overflows is the one reported.
    return WorkspaceCarver::floats_for(
        call, argument,
        {product(rows, dh), product(kQueryTokens, dh, hp),              // q, q^T
         product(kQueryTokens, rq, hp), product(kQueryTokens, rq, dh),  // scaled A_Q, B_Q
         product(kTileTokens, rk, h), product(kTileTokens, rk, dh),     // A_K, B_K tile
         product(kTileTokens, rv, h), product(kTileTokens, rv, dv),     // A_V, B_V tile
         product(kTileTokens, rk, rq), product(kTileTokens, rk, hp),    // P, W
         product(kTileTokens, h), product(kTileTokens, rv, h),          // L^T, Z
         product(rows, kTileTokens), rows, rows, product(rows, dv)});   // scores, state
  }

  // h rounded up to whole SIMD packets.
  static constexpr Index kPacketFloats = Eigen::internal::packet_traits<float>::size;
  Index padded_heads() const {
    return (shape_.heads + kPacketFloats - 1) / kPacketFloats * kPacketFloats;
  }

  // A tile's rows of a whole plane as an fp32 [rows, cols] matrix (R rows per token).
  ConstMatrixMap read_tile_rows(const SequenceView& view, Index plane, const CacheTile& tile,
                                Index width, float* scratch, Index rows, Index cols) const {
    const ConstMatrixMap flat = read_tile<Storage>(view, plane, tile, 0, width, scratch);
    return map_matrix(flat.data(), rows, cols, cols);
  }

  TpaShape shape_;
  Planes planes_;
  Index workspace_floats_ = 0;
};

}  // namespace tpattn
