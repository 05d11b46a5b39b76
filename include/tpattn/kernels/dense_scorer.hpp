// tpattn/kernels/dense_scorer.hpp -- softmax attention over cached keys and values: the scoring
// policy of the dense operators, which the driver (kernels/attention_driver.hpp) runs per work
// item.
//
// One scorer serves MHA, GQA, MQA and absorbed MLA (docs/attention.md §1-2):
//   - g KV heads; query head i reads KV head floor(i / (h / g)) (contiguous groups);
//   - a key is the concatenation of one or two segments of cached planes (GQA: the K plane;
//     absorbed MLA: latent then rope_key), head j's segment at columns [j w, (j + 1) w);
//   - a value is a segment of a plane, possibly the key's own plane (MLA: V = the latent).
// Query token t of a call sees the cached tokens of a KeyRange (kernels/cache_tiles.hpp): causal
// up to itself (decode: one token sees the whole sequence; prefill: the new tokens are already
// cached), optionally only a sliding window of them, optionally only one work item's share.
// The work is blocked: each group's queries meet one tile of cached tokens at a time through a
// GEMM, and an online-softmax state carries max, sum and output across tiles. No score matrix
// over the whole context is ever formed.
#pragma once

#include <limits>
#include <type_traits>

#include "tpattn/kernels/attention_driver.hpp"
#include "tpattn/kernels/cache_tiles.hpp"
#include "tpattn/kernels/gemm.hpp"
#include "tpattn/kernels/softmax_state.hpp"

namespace tpattn {

// Where keys and values of each KV head sit in a cached token.
struct KeyValueLayout {
  struct Segment {
    Index plane = -1;  // record plane
    Index width = 0;   // columns per KV head; head j starts at column j * width
  };
  Index kv_heads = 1;
  Segment key[2];  // key[1].width == 0 when the key has one segment
  Segment value;

  Index key_width() const { return key[0].width + key[1].width; }
  Index key_segments() const { return key[1].width > 0 ? 2 : 1; }
};

template <class Storage>
class DenseScorer {
 public:
  static constexpr Index kTileTokens = 64;   // cached tokens per tile
  static constexpr Index kQueryTokens = 16;  // query tokens per pass (bounds the workspace)
  // With several KV heads and up to this many query rows per KV head (decode: MHA 1, GQA h / g),
  // a tile is scored token by token across all KV heads (score_token_major) rather than by one
  // small product per KV head. Measured (bench/attention_bench, d_h 64, 8192 tokens): MHA f32
  // 5049 -> 2300 us per layer, GQA (g 2, 6 rows) 1541 -> 1277; with one KV head (MQA, MLA: one
  // stream already) it lost 2x, so those keep the products.
  static constexpr Index kTokenMajorRows = 8;

  DenseScorer() = default;
  // heads: query heads, a multiple of layout.kv_heads. scale: multiplies q . k. Throws Error
  // naming `call` if a workspace size does not fit in Index.
  DenseScorer(const KeyValueLayout& layout, Index heads, float scale,
              const char* call = "DenseScorer")
      : layout_(layout), heads_(heads), group_(heads / layout.kv_heads), scale_(scale) {
    plan_workspace(call);
  }

  const KeyValueLayout& layout() const { return layout_; }
  Index heads() const { return heads_; }
  float scale() const { return scale_; }

  // Workspace floats one run() needs, whatever its number of query tokens.
  Index workspace_floats() const { return workspace_floats_; }

  // q:   [query_tokens, heads, key_width], already rotated;
  // out: [query_tokens, heads, value_width];  lse: [query_tokens, heads] or null (natural log).
  // What AttentionPlan::make needs to cut a batch for this scorer with a sliding `window`.
  PlanShape plan_shape(Index window) const {
    return {heads_, layout_.value.width, workspace_floats_, kQueryTokens, window};
  }

  // The batched run of the dense kernels (GqaKernel::run, MlaKernel::run; `call` names the
  // caller): q: [plan.query_tokens(), heads, key_width], sequence b's new tokens from row
  // plan.token_offset(b); out: [plan.query_tokens(), heads, value_width]; lse:
  // [plan.query_tokens(), heads] or null. Checks as run_plan does, and q non-null, before any work.
  void run_batch(const char* call, const AttentionPlan& plan, const CacheRecord& record,
                 const SequenceView* views, Index batch, const float* q, float* out, float* lse,
                 float* workspace, Executor* executor, Index window) const {
    TPATTN_CHECK(q != nullptr, call, "q", "non-null", "null");
    const Index stride = heads_ * layout_.key_width();
    run_plan(
        call, plan, plan_shape(window), record, views, batch, out, lse, workspace, executor,
        [&](Index token, Index count, const SequenceView& view, const KeyRange& range, float* o,
            float* l, float* ws) { run(q + token * stride, count, view, range, o, l, ws); });
  }

  // Query token t attends to the cached tokens [range.lower(t), range.horizon(t)), which must lie
  // in the view. A row that sees none gives out 0 and lse -inf. workspace: workspace_floats().
  void run(const float* q, Index query_tokens, const SequenceView& view, const KeyRange& range,
           float* out, float* lse, float* workspace) const {
    for (Index first = 0; first < query_tokens; first += kQueryTokens) {
      const Index count = query_tokens - first < kQueryTokens ? query_tokens - first : kQueryTokens;
      run_chunk(q + first * heads_ * layout_.key_width(), count, view, range.from_token(first),
                out + first * heads_ * layout_.value.width,
                lse == nullptr ? nullptr : lse + first * heads_, workspace);
    }
  }

 private:
  // `count` query tokens against the cache, one tile of cached tokens at a time, every KV head
  // on a tile before the next tile: a tile's tokens are read from memory once, while they are
  // in cache, whatever the number of KV heads (head-by-head passes over the whole context would
  // read each token's rows g times at a stride of a whole token, defeating the prefetchers).
  // State rows are grouped by KV head: row (j count + t) group + i is query token t, head
  // j group + i.
  void run_chunk(const float* q, Index count, const SequenceView& view, const KeyRange& range,
                 float* out, float* lse, float* workspace) const {
    const Index key_width = layout_.key_width();
    const Index value_width = layout_.value.width;
    const Index rows = count * group_;  // state rows of one KV head

    WorkspaceCarver carve(workspace);  // same order as workspace_floats()
    float* queries = carve.take(kQueryTokens * heads_ * key_width);
    float* scores = carve.take(score_floats_);  // row stride kTileTokens
    float* key_scratch = carve.take(key_scratch_floats_);
    float* value_scratch = carve.take(value_scratch_floats_);
    float* max = carve.take(kQueryTokens * heads_);
    float* sum = carve.take(kQueryTokens * heads_);
    float* acc = carve.take(kQueryTokens * heads_ * value_width);
    const auto state_of = [&](Index j) {
      return SoftmaxState(max + j * rows, sum + j * rows, acc + j * rows * value_width, rows,
                          value_width);
    };

    // Gather each KV head's query rows, pre-scaled, so one GEMM per tile scores them all.
    for (Index j = 0; j < layout_.kv_heads; ++j) {
      MatrixMap group_queries = map_matrix(queries + j * rows * key_width, rows, key_width);
      for (Index t = 0; t < count; ++t)
        group_queries.middleRows(t * group_, group_) =
            map_matrix(q + (t * heads_ + j * group_) * key_width, group_, key_width) * scale_;
      state_of(j).reset();
    }

    if (token_major(rows)) {
      for_each_tile(view, range, count, kTileTokens, [&](const CacheTile& tile) {
        // Scores of KV head j: rows [j rows, (j + 1) rows) of a [kv_heads rows, tile] matrix.
        score_token_major(view, tile, queries, rows, scores, key_scratch);
        for (Index j = 0; j < layout_.kv_heads; ++j) {
          MatrixMap head_scores =
              map_matrix(scores + j * rows * kTileTokens, rows, tile.tokens, kTileTokens);
          mask_hidden(head_scores, tile, range);
          state_of(j).absorb_scores(head_scores);
        }
        add_values_token_major(view, tile, range, count, scores, rows, acc, value_scratch);
      });
    } else {
      for_each_tile(view, range, count, kTileTokens, [&](const CacheTile& tile) {
        MatrixMap tile_scores = map_matrix(scores, rows, tile.tokens, kTileTokens);
        for (Index j = 0; j < layout_.kv_heads; ++j) {
          const ConstMatrixMap group_queries = map_matrix(
              static_cast<const float*>(queries) + j * rows * key_width, rows, key_width);
          Index column = 0;
          for (Index s = 0; s < layout_.key_segments(); ++s) {
            const KeyValueLayout::Segment& segment = layout_.key[s];
            const ConstMatrixMap keys =
                read_tile<Storage>(view, segment.plane, tile, j * segment.width, segment.width,
                                   key_scratch + column * kTileTokens);
            multiply(group_queries.middleCols(column, segment.width), keys.transpose(), tile_scores,
                     /*accumulate=*/s > 0);
            column += segment.width;
          }
          mask_hidden(tile_scores, tile, range);
          SoftmaxState state = state_of(j);
          state.absorb_scores(tile_scores);
          const ConstMatrixMap values = read_tile<Storage>(
              view, layout_.value.plane, tile, j * value_width, value_width, value_scratch);
          if (tile.seen_by_all(range, count)) {
            multiply(tile_scores, values, state.acc(), /*accumulate=*/true);
          } else {
            // Each query token's rows take only the values it sees: a masked weight is 0, and
            // 0 x (NaN or inf in a hidden value) would still poison the row.
            for (Index t = 0; t < count; ++t) {
              const Index from = tile.hidden_before(range.lower(t));
              const Index seen = tile.seen_by(range.horizon(t));
              if (seen > from)
                multiply(tile_scores.block(t * group_, from, group_, seen - from),
                         values.middleRows(from, seen - from),
                         state.acc().middleRows(t * group_, group_), /*accumulate=*/true);
            }
          }
        }
      });
    }

    for (Index j = 0; j < layout_.kv_heads; ++j) {
      const SoftmaxState state = state_of(j);
      for (Index t = 0; t < count; ++t)
        state.finish(t * group_, group_, out + (t * heads_ + j * group_) * value_width, value_width,
                     lse == nullptr ? nullptr : lse + t * heads_ + j * group_);
    }
  }

  bool token_major(Index rows) const { return layout_.kv_heads > 1 && rows <= kTokenMajorRows; }

  // The workspace's pieces, every size checked once here (run() then carves the same sizes, or
  // parts of them, unchecked):
  //   scores: one KV head's query rows x a tile (per-head products), or every KV head's
  //           kTokenMajorRows rows x a tile (token-major);
  //   key / value scratch: a tile of one KV head's key (value), or one token's keys (values) of
  //           all KV heads, widened to fp32.
  void plan_workspace(const char* call) {
    const char* argument = "workspace_floats()";
    const auto product = [&](Index a, Index b) {
      return detail::checked_product(call, argument, a, b);
    };
    const auto larger = [](Index a, Index b) { return a > b ? a : b; };
    const Index kv_heads = layout_.kv_heads;
    const Index key_width =
        detail::checked_sum(call, argument, layout_.key[0].width, layout_.key[1].width);
    const Index value_width = layout_.value.width;
    const Index rows = product(kQueryTokens, heads_);
    const Index queries = product(rows, key_width);
    // Each size in order, so the first that overflows is the one reported.
    const Index per_head_scores = product(product(kQueryTokens, group_), kTileTokens);
    const Index token_major_scores = product(product(kv_heads, kTokenMajorRows), kTileTokens);
    score_floats_ = larger(per_head_scores, token_major_scores);
    const Index token_keys = product(kv_heads, key_width);
    key_scratch_floats_ = larger(token_keys, product(kTileTokens, key_width));
    const Index token_values = product(kv_heads, value_width);
    value_scratch_floats_ = larger(token_values, product(kTileTokens, value_width));
    workspace_floats_ = WorkspaceCarver::floats_for(
        call, argument,
        {queries, score_floats_, key_scratch_floats_, value_scratch_floats_, rows, rows,
         product(rows, value_width)});
  }

  // Token t's plane row (all KV heads), fp32: the cache itself for float storage, else widened
  // into scratch.
  const float* token_row(const SequenceView& view, Index plane, const CacheTile& tile, Index t,
                         float* scratch) const {
    const Index width = view.elements_per_token(plane);
    const Storage* row = view.plane_block<Storage>(plane, tile.block) + (tile.row + t) * width;
    if constexpr (std::is_same_v<Storage, float>) {
      return row;
    } else {
      StorageTraits<Storage>::to_float(row, scratch, width);
      return scratch;
    }
  }

  // scores[(j rows + r) kTileTokens + t] = q_{j, r} . k_{t, j} for every token t of the tile,
  // KV head j and state row r < rows. Each token's key row (all KV heads, contiguous in the cache)
  // is read once, in memory order, so a tile streams through like one array; scoring KV head by
  // KV head would read the same rows as g interleaved strided streams.
  void score_token_major(const SequenceView& view, const CacheTile& tile, const float* queries,
                         Index rows, float* scores, float* scratch) const {
    const Index g = layout_.kv_heads, key_width = layout_.key_width();
    for (Index t = 0; t < tile.tokens; ++t) {
      Index column = 0;
      for (Index s = 0; s < layout_.key_segments(); ++s) {
        const KeyValueLayout::Segment& segment = layout_.key[s];
        // keys: [g, width], KV head j's segment of token t.
        const ConstMatrixMap keys = map_matrix(token_row(view, segment.plane, tile, t, scratch), g,
                                               segment.width, segment.width);
        for (Index r = 0; r < rows; ++r) {
          // Row r of every KV head's queries, and where its scores go.
          const ConstMatrixMap q_r =
              map_matrix(queries + r * key_width + column, g, segment.width, rows * key_width);
          Eigen::Map<Eigen::VectorXf, Eigen::Unaligned, Eigen::InnerStride<>> out(
              scores + r * kTileTokens + t, g, Eigen::InnerStride<>(rows * kTileTokens));
          if (s == 0)
            out.noalias() = q_r.cwiseProduct(keys).rowwise().sum();
          else
            out.noalias() += q_r.cwiseProduct(keys).rowwise().sum();
        }
        column += segment.width;
      }
    }
  }

  // acc row (j rows + r) += weights[(j rows + r) kTileTokens + t] v_{t, j}, token by token.
  void add_values_token_major(const SequenceView& view, const CacheTile& tile,
                              const KeyRange& range, Index count, const float* weights, Index rows,
                              float* acc, float* scratch) const {
    const Index g = layout_.kv_heads, width = layout_.value.width;
    for (Index t = 0; t < tile.tokens; ++t) {
      // values: [g, width], KV head j's value of token t at columns [j width, (j + 1) width).
      const ConstMatrixMap values =
          map_matrix(token_row(view, layout_.value.plane, tile, t, scratch), g, width);
      // Only the query tokens that see this token take its value: a masked weight is 0, and
      // 0 x NaN is NaN. Those are a run of query tokens [first, last), as lower() and horizon()
      // never decrease.
      const Index position = tile.first + t;
      Index first = 0, last = count;
      while (first < count && range.horizon(first) <= position) ++first;
      while (last > first && range.lower(last - 1) > position) --last;
      for (Index r = first * group_; r < last * group_; ++r) {
        MatrixMap acc_r = map_matrix(acc + r * width, g, width, rows * width);
        const Eigen::Map<const Eigen::VectorXf, Eigen::Unaligned, Eigen::InnerStride<>> p(
            weights + r * kTileTokens + t, g, Eigen::InnerStride<>(rows * kTileTokens));
        acc_r.array() += values.array().colwise() * p.array();
      }
    }
  }

  // Rows t * group + i see the tile's columns [hidden_before(lower(t)), seen_by(horizon(t)))
  // only; the others become -inf.
  void mask_hidden(MatrixMap scores, const CacheTile& tile, const KeyRange& range) const {
    const Index count = scores.rows() / group_;
    if (tile.seen_by_all(range, count)) return;
    for (Index t = 0; t < count; ++t) {
      const Index from = tile.hidden_before(range.lower(t));
      const Index seen = tile.seen_by(range.horizon(t));
      if (from > 0)
        scores.block(t * group_, 0, group_, from)
            .setConstant(-std::numeric_limits<float>::infinity());
      if (seen < tile.tokens)
        scores.block(t * group_, seen, group_, tile.tokens - seen)
            .setConstant(-std::numeric_limits<float>::infinity());
    }
  }

  KeyValueLayout layout_;
  Index heads_ = 0;
  Index group_ = 1;
  float scale_ = 1.0f;
  Index score_floats_ = 0;
  Index key_scratch_floats_ = 0;
  Index value_scratch_floats_ = 0;
  Index workspace_floats_ = 0;
};

}  // namespace tpattn
