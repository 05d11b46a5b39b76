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
// The work is blocked: each KV head's query rows meet one tile of cached tokens at a time through
// register-blocked products that read the cache in its storage type (kernels/register_blocks.hpp:
// every cached key and value is loaded once per block of query rows), and an online-softmax
// state carries max, sum and output across tiles. No score matrix over the whole context is ever
// formed.
#pragma once

#include <limits>
#include <type_traits>

#include "tpattn/kernels/attention_driver.hpp"
#include "tpattn/kernels/cache_tiles.hpp"
#include "tpattn/kernels/register_blocks.hpp"
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
  static constexpr Index kTileTokens = 64;   // cached tokens per softmax step
  static constexpr Index kQueryTokens = 16;  // query tokens per pass (bounds the workspace)
  // With several KV heads, a tile is walked in runs of this many tokens, every KV head of a run
  // before the next run, so the cache is read as a few parallel streams in memory order; a KV
  // head by KV head walk over a whole tile would jump a whole token row (8 KiB for 32 bf16
  // heads of 128) between reads, one page per read, which the prefetchers do not follow.
  static constexpr Index kStreamTokens = 8;
  // With several KV heads, KV head j of the run a prefetch distance ahead, in the same plane, is
  // prefetched to L2 while KV head j of this run is scored (or takes its values): a core doing
  // several FMAs per cached element keeps too few reads in flight for the hardware prefetchers
  // alone. The distance is kPrefetchBytes of cached tokens (every plane the scorer reads, every
  // KV head), in whole runs, at least one run and at most a tile: 16 tokens for MHA with 32 bf16
  // heads of 128, a whole tile for GQA-8. Measured on a Zen 4 core (AVX-512, 1 MiB L2; 32 heads,
  // 16k tokens, 1 thread, min of 2 alternated runs), against the L1 prefetch of one run ahead
  // (MHA, 16-bit caches) or two (GQA) it replaces:
  //   d_h 128: MHA bf16 1.32x faster, f32 1.27x (which had no prefetch); GQA-8 bf16 1.38x,
  //   f32 1.35x; GQA-4 bf16 1.29x, f32 1.56x; d_h 64: 1.06x (MHA bf16) to 1.52x (GQA-4 f32).
  //   Distances of 128 KiB to 512 KiB: GQA within 5% of 256 KiB, MHA within the run-to-run spread
  //   (up to 15%); the L1 prefetch of one run added to it ran 0.98-1.29x slower (11 of 12 rows), as
  //   a run of all KV heads (64 KiB for MHA bf16) overflows a 32 KiB L1. (On a Zen 5 core, 48 KiB
  //   L1, the L1 prefetch of one run had made MHA bf16 1.32x faster than none and L2 at the same
  //   distance 1.22x.)
  static constexpr Index kPrefetchBytes = Index{256} * 1024;
  // A KV head with at least this many state rows (MQA and MLA decode, most prefills) scores its
  // tiles with the rows in SIMD lanes (blocks::score_columns) from an fp32 copy of the tile's
  // keys and values, made once and shared by every row; fewer rows (MHA, small GQA groups) read
  // the cache in its storage type, as the copy would cost more than the rows reuse it.
  static constexpr Index kColumnMinRows = 16;
  // Query rows of the transposed queries and scores are padded to a multiple of this (the widest
  // register), so the workspace does not depend on the instruction set.
  static constexpr Index kRowPadding = 16;

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
  // in cache, whatever the number of KV heads. State rows are grouped by KV head: row
  // (j count + t) group + i is query token t, head j group + i.
  void run_chunk(const float* q, Index count, const SequenceView& view, const KeyRange& range,
                 float* out, float* lse, float* workspace) const {
    const Index key_width = layout_.key_width();
    const Index value_width = layout_.value.width;
    const Index rows = count * group_;  // state rows of one KV head

    WorkspaceCarver carve(workspace);  // same order as workspace_floats()
    float* queries = carve.take(kQueryTokens * heads_ * key_width);
    float* scores = carve.take(kQueryTokens * heads_ * kTileTokens);  // row stride kTileTokens
    float* max = carve.take(kQueryTokens * heads_);
    float* sum = carve.take(kQueryTokens * heads_);
    float* acc = carve.take(kQueryTokens * heads_ * value_width);
    const bool columns = rows >= kColumnMinRows;
    const Index padded_rows = (rows + kRowPadding - 1) / kRowPadding * kRowPadding;
    float* queries_t = carve.take(layout_.kv_heads * column_rows_ * key_width);
    float* keys_f32 = carve.take(kTileTokens * key_width);
    float* values_f32 = carve.take(kTileTokens * value_width);
    float* scores_t = carve.take(kTileTokens * column_rows_);
    float* softmax_scratch = carve.take(2 * column_rows_);
    const auto state_of = [&](Index j) {
      return SoftmaxState(max + j * rows, sum + j * rows, acc + j * rows * value_width, rows,
                          value_width);
    };

    // Gather each KV head's query rows, pre-scaled: KV head j's rows are one [rows, key_width]
    // block, so one register block of rows reads each cached key once.
    for (Index j = 0; j < layout_.kv_heads; ++j) {
      MatrixMap group_queries = map_matrix(queries + j * rows * key_width, rows, key_width);
      for (Index t = 0; t < count; ++t)
        group_queries.middleRows(t * group_, group_) =
            map_matrix(q + (t * heads_ + j * group_) * key_width, group_, key_width) * scale_;
      state_of(j).reset();
      // The same rows transposed, [key_width, padded_rows], padding 0, for the column path.
      if (columns) {
        MatrixMap transposed =
            map_matrix(queries_t + j * padded_rows * key_width, key_width, padded_rows);
        transposed.leftCols(rows) = group_queries.transpose();
        transposed.rightCols(padded_rows - rows).setZero();
      }
      // The row path reads bfloat16 keys in pairs: its query rows in the paired column order,
      // each key segment a range of its own.
      if constexpr (blocks::kPairedLoads<Storage>) {
        for (Index r = 0; r < rows; ++r) {
          Index column = 0;
          for (Index part = 0; part < layout_.key_segments(); ++part) {
            blocks::to_paired_columns(queries + (j * rows + r) * key_width + column,
                                      layout_.key[part].width, keys_f32);
            column += layout_.key[part].width;
          }
        }
      }
    }

    // Scores of KV head j: rows [j rows, (j + 1) rows) of a [kv_heads rows, tile] matrix.
    const auto head_scores = [&](Index j, Index tokens) {
      return map_matrix(scores + j * rows * kTileTokens, rows, tokens, kTileTokens);
    };
    const Index stream = layout_.kv_heads > 1 ? kStreamTokens : kTileTokens;
    const Index last =
        range.horizon(count - 1) < view.length() ? range.horizon(count - 1) : view.length();
    const bool prefetch_runs = layout_.kv_heads > 1;
    const Index prefetch_distance = prefetch_runs ? prefetch_tokens(view, stream) : 0;
    // KV head j's columns of `tokens` tokens from `position` (keys or values), to L2. The addresses
    // are formed once per block the run touches, not per token: the block lookup per token (a
    // division and a few dependent loads of the view's tables) made GQA-8's step 1.02-1.09x
    // slower (32 heads, d_h 128 and 64, 16k tokens, bf16 and f32, 1 thread, AVX-512; 1.06-1.19x
    // with the bf16 cache in L3).
    const auto prefetch_head = [&](Index position, Index tokens, bool keys, Index j) {
      const Index to = position + tokens < last ? position + tokens : last;
      const auto fetch = [&](const KeyValueLayout::Segment& segment) {
        const Index width = view.elements_per_token(segment.plane);
        const Index bytes = segment.width * static_cast<Index>(sizeof(Storage));
        for (Index p = position; p < to;) {
          const Index block = p / view.block_tokens(), row = p % view.block_tokens();
          const Index in_block =
              to - p < view.block_tokens() - row ? to - p : view.block_tokens() - row;
          const Storage* first =
              view.plane_block<Storage>(segment.plane, block) + row * width + j * segment.width;
          for (Index u = 0; u < in_block; ++u) simd::prefetch_to_l2(first + u * width, bytes);
          p += in_block;
        }
      };
      if (keys) {
        for (Index part = 0; part < layout_.key_segments(); ++part) fetch(layout_.key[part]);
      } else if (layout_.value.plane != layout_.key[0].plane) {
        fetch(layout_.value);
      }
    };
    for_each_tile(view, range, count, kTileTokens, [&](const CacheTile& tile) {
      if (columns && tile.seen_by_all(range, count)) {
        // One KV head: the next tile to L2, spread through this tile's register blocks
        // (next_tile_ranges). Several (MHA and GQA prefill): KV head j + 1's keys
        // and values of this tile (or KV head 0's of the next) while KV head j is attended;
        // the next tile of every KV head (1 MiB for MHA with 32 bf16 heads of 64) would
        // overflow L2. Measured on a Zen 4 core (paper-d64 prefill of 2048 tokens, 1 thread, min
        // of 4 alternated runs): MHA 1.04x, GQA-8 1.02x faster than the whole next tile.
        simd::SpreadPrefetch next_tile;
        if (layout_.kv_heads == 1) next_tile_ranges(view, tile, kTileTokens, last, next_tile);
        for (Index j = 0; j < layout_.kv_heads; ++j) {
          if (layout_.kv_heads > 1) {
            const Index next = j + 1 < layout_.kv_heads ? j + 1 : 0;
            const Index from = j + 1 < layout_.kv_heads ? tile.first : tile.first + tile.tokens;
            prefetch_head(from, kTileTokens, /*keys=*/true, next);
            prefetch_head(from, kTileTokens, /*keys=*/false, next);
          }
          attend_columns(view, tile, j, rows, padded_rows, queries_t + j * padded_rows * key_width,
                         keys_f32, values_f32, scores_t, softmax_scratch, state_of(j), next_tile);
        }
        next_tile.finish();
        return;
      }
      if (tile.seen_by_all(range, count)) {
        for (Index u = 0; u < tile.tokens; u += stream) {
          const Index run = tile.tokens - u < stream ? tile.tokens - u : stream;
          for (Index j = 0; j < layout_.kv_heads; ++j) {
            if (prefetch_runs)
              prefetch_head(tile.first + u + prefetch_distance, stream, /*keys=*/true, j);
            score_keys(view, tile, j, rows, 0, rows, u, run, queries, scores);
          }
        }
      } else {
        // Each query token's rows score only the tokens it sees, [from, seen); the rest are -inf.
        for (Index j = 0; j < layout_.kv_heads; ++j) {
          MatrixMap all = head_scores(j, tile.tokens);
          for (Index t = 0; t < count; ++t) {
            const Index from = tile.hidden_before(range.lower(t));
            const Index seen = tile.seen_by(range.horizon(t));
            all.middleRows(t * group_, group_).setConstant(-std::numeric_limits<float>::infinity());
            if (seen > from)
              score_keys(view, tile, j, rows, t * group_, group_, from, seen - from, queries,
                         scores);
          }
        }
      }
      for (Index j = 0; j < layout_.kv_heads; ++j)
        state_of(j).absorb_scores(head_scores(j, tile.tokens));
      if (tile.seen_by_all(range, count)) {
        for (Index u = 0; u < tile.tokens; u += stream) {
          const Index run = tile.tokens - u < stream ? tile.tokens - u : stream;
          for (Index j = 0; j < layout_.kv_heads; ++j) {
            if (prefetch_runs)
              prefetch_head(tile.first + u + prefetch_distance, stream, /*keys=*/false, j);
            add_values(view, tile, j, rows, 0, rows, u, run, scores, acc);
          }
        }
      } else {
        // Only the query tokens that see a token take its value: a masked weight is 0, and
        // 0 x (NaN or inf in a hidden value) would still poison the row.
        for (Index j = 0; j < layout_.kv_heads; ++j)
          for (Index t = 0; t < count; ++t) {
            const Index from = tile.hidden_before(range.lower(t));
            const Index seen = tile.seen_by(range.horizon(t));
            if (seen > from)
              add_values(view, tile, j, rows, t * group_, group_, from, seen - from, scores, acc);
          }
      }
    });

    for (Index j = 0; j < layout_.kv_heads; ++j) {
      const SoftmaxState state = state_of(j);
      for (Index t = 0; t < count; ++t)
        state.finish(t * group_, group_, out + (t * heads_ + j * group_) * value_width, value_width,
                     lse == nullptr ? nullptr : lse + t * heads_ + j * group_);
    }
  }

  // KV head j's `rows` state rows attend to a tile every one of them sees, rows in SIMD lanes:
  // the tile's keys (each segment) and values in fp32 (the cache itself for float storage, else a
  // copy widened once for all rows), scores_t = K Q^T [tile.tokens, padded_rows] from the
  // transposed queries, the softmax over its columns, then acc += P V with P read transposed.
  // `prefetch` (the next tile, or nothing) goes out a few lines after each register block.
  void attend_columns(const SequenceView& view, const CacheTile& tile, Index j, Index rows,
                      Index padded_rows, const float* queries_t, float* keys_f32, float* values_f32,
                      float* scores_t, float* softmax_scratch, SoftmaxState state,
                      simd::SpreadPrefetch& prefetch) const {
    const Index value_width = layout_.value.width;
    const Index registers = padded_rows / simd::kLanes;
    // The register blocks below, about: each key segment's blocks of tokens for each group of
    // row registers, then the value update's blocks of rows times blocks of columns.
    const Index score_blocks =
        layout_.key_segments() *
        ((registers + blocks::kColumnRegisters - 1) / blocks::kColumnRegisters) *
        (tile.tokens / blocks::block_tokens(blocks::kColumnRegisters));
    const Index value_blocks =
        (rows + blocks::kValueRows - 1) / blocks::kValueRows *
        (value_width / (blocks::block_tokens(blocks::kValueRows) * simd::kLanes));
    prefetch.spread_over(score_blocks + value_blocks);
    const auto between_blocks = [&prefetch] { prefetch.step(); };
    const float* value_rows = nullptr;  // [tile.tokens, value_width], row stride value_stride
    Index value_stride = 0;
    Index column = 0;
    for (Index part = 0; part < layout_.key_segments(); ++part) {
      const KeyValueLayout::Segment& segment = layout_.key[part];
      const ConstMatrixMap keys =
          read_tile<Storage>(view, segment.plane, tile, j * segment.width, segment.width,
                             keys_f32 + column * kTileTokens);
      blocks::score_columns(queries_t + column * padded_rows, padded_rows, registers, keys.data(),
                            keys.outerStride(), tile.tokens, segment.width, scores_t, padded_rows,
                            /*accumulate=*/part > 0, between_blocks);
      // MLA: the value is the first columns of the key's first segment, already in fp32.
      if (part == 0 && layout_.value.plane == segment.plane && value_width <= segment.width &&
          (layout_.kv_heads == 1 || value_width == segment.width)) {
        value_rows = keys.data();
        value_stride = keys.outerStride();
      }
      column += segment.width;
    }
    state.absorb_columns(map_matrix(scores_t, tile.tokens, rows, padded_rows), 0, softmax_scratch);
    if (value_rows == nullptr) {
      const ConstMatrixMap values = read_tile<Storage>(view, layout_.value.plane, tile,
                                                       j * value_width, value_width, values_f32);
      value_rows = values.data();
      value_stride = values.outerStride();
    }
    blocks::accumulate_rows(static_cast<const float*>(scores_t), 1, padded_rows, rows, value_rows,
                            value_stride, tile.tokens, value_width, state.acc().data(), value_width,
                            between_blocks);
  }

  // The prefetch distance in tokens: kPrefetchBytes of the planes a tile reads, in whole runs of
  // `stream` tokens, from one run to one tile.
  Index prefetch_tokens(const SequenceView& view, Index stream) const {
    Index bytes_per_token = 0;
    for_each_plane([&](Index plane) {
      bytes_per_token += view.elements_per_token(plane) * static_cast<Index>(sizeof(Storage));
    });
    const Index runs = kPrefetchBytes / (bytes_per_token > 0 ? bytes_per_token : 1) / stream;
    const Index tokens = (runs < 1 ? 1 : runs) * stream;
    return tokens < kTileTokens ? tokens : kTileTokens;
  }

  // The planes a tile reads: the key's segments, and the value's unless it is the key's own.
  template <class Visit>
  void for_each_plane(Visit&& visit) const {
    for (Index part = 0; part < layout_.key_segments(); ++part) visit(layout_.key[part].plane);
    if (layout_.value.plane != layout_.key[0].plane && layout_.value.plane != layout_.key[1].plane)
      visit(layout_.value.plane);
  }

  // The tile after `tile` (at most `tokens` tokens, within its block and before `last`), every
  // plane it reads, as ranges of `out`, which the column path prefetches to L2 a few lines after
  // each of its register blocks. Measured on an AVX-512 Xeon (32
  // heads, 16k tokens, 1 thread, min of 2 alternated runs) against the whole next tile at once,
  // one line per 4 KiB page: MQA decode 1.08-1.10x faster in bf16, 1.10-1.20x in f32; MLA 1.04x
  // and 1.20-1.21x (d_h 128 and 64); prefill of 2048 tokens 0.99-1.04x. The whole next tile
  // line by line had been 1.02-1.08x slower than one line per page: the burst outran the fill
  // buffers.
  void next_tile_ranges(const SequenceView& view, const CacheTile& tile, Index tokens, Index last,
                        simd::SpreadPrefetch& out) const {
    const Index from = tile.first + tile.tokens;
    if (from >= last) return;
    const Index block = from / view.block_tokens(), row = from % view.block_tokens();
    if (tokens > last - from) tokens = last - from;
    if (tokens > view.block_tokens() - row) tokens = view.block_tokens() - row;
    for_each_plane([&](Index plane) {
      const Index width = view.elements_per_token(plane);
      out.add(view.plane_block<Storage>(plane, block) + row * width,
              tokens * width * static_cast<Index>(sizeof(Storage)));
    });
  }

  // Row `row` of a tile's plane, KV head j's segment of `width` columns.
  static const Storage* plane_row(const SequenceView& view, Index plane, const CacheTile& tile,
                                  Index row, Index j, Index width) {
    return view.plane_block<Storage>(plane, tile.block) +
           (tile.row + row) * view.elements_per_token(plane) + j * width;
  }

  // KV head j's state rows [first_row, first_row + rows) (of head_rows) score the tile's tokens
  // [first, first + tokens): scores[(j head_rows + r) kTileTokens + u] = q_{j, r} . k_{u, j},
  // the key's segments added in turn.
  void score_keys(const SequenceView& view, const CacheTile& tile, Index j, Index head_rows,
                  Index first_row, Index rows, Index first, Index tokens, const float* queries,
                  float* scores) const {
    const Index key_width = layout_.key_width();
    const float* q = queries + (j * head_rows + first_row) * key_width;
    float* s = scores + (j * head_rows + first_row) * kTileTokens + first;
    Index column = 0;
    for (Index part = 0; part < layout_.key_segments(); ++part) {
      const KeyValueLayout::Segment& segment = layout_.key[part];
      const Storage* keys = plane_row(view, segment.plane, tile, first, j, segment.width);
      if constexpr (blocks::kPairedLoads<Storage>)
        blocks::score_paired_rows(q + column, key_width, rows, keys,
                                  view.elements_per_token(segment.plane), tokens, segment.width, s,
                                  kTileTokens, /*accumulate=*/part > 0);
      else
        blocks::score_rows(q + column, key_width, rows, keys,
                           view.elements_per_token(segment.plane), tokens, segment.width, s,
                           kTileTokens, /*accumulate=*/part > 0);
      column += segment.width;
    }
  }

  // The same rows take the values of those tokens: acc_{j, r} += sum_u p_{j, r, u} v_{u, j}.
  void add_values(const SequenceView& view, const CacheTile& tile, Index j, Index head_rows,
                  Index first_row, Index rows, Index first, Index tokens, const float* weights,
                  float* acc) const {
    const Index width = layout_.value.width;
    blocks::accumulate_rows(weights + (j * head_rows + first_row) * kTileTokens + first,
                            kTileTokens, 1, rows,
                            plane_row(view, layout_.value.plane, tile, first, j, width),
                            view.elements_per_token(layout_.value.plane), tokens, width,
                            acc + (j * head_rows + first_row) * width, width);
  }

  // The workspace's pieces, every size checked once here (run() then carves the same sizes, or
  // parts of them, unchecked): the gathered queries, every KV head's scores of a tile, and the
  // softmax state.
  void plan_workspace(const char* call) {
    const char* argument = "workspace_floats()";
    const auto product = [&](Index a, Index b) {
      return detail::checked_product(call, argument, a, b);
    };
    const Index key_width =
        detail::checked_sum(call, argument, layout_.key[0].width, layout_.key[1].width);
    const Index rows = product(kQueryTokens, heads_);
    // Each size in order, so the first that overflows is the one reported.
    const Index queries = product(rows, key_width);
    const Index scores = product(rows, kTileTokens);
    const Index acc = product(rows, layout_.value.width);
    // The column path's pieces: one KV head's rows padded, times every KV head for the queries.
    column_rows_ =
        detail::checked_sum(call, argument, product(kQueryTokens, group_), kRowPadding - 1) /
        kRowPadding * kRowPadding;
    const Index queries_t = product(product(layout_.kv_heads, column_rows_), key_width);
    workspace_floats_ = WorkspaceCarver::floats_for(
        call, argument,
        {queries, scores, rows, rows, acc, queries_t, product(kTileTokens, key_width),
         product(kTileTokens, layout_.value.width), product(kTileTokens, column_rows_),
         product(2, column_rows_)});
  }

  KeyValueLayout layout_;
  Index heads_ = 0;
  Index group_ = 1;
  float scale_ = 1.0f;
  Index workspace_floats_ = 0;
  Index column_rows_ = 0;  // state rows of one KV head for kQueryTokens tokens, padded
};

}  // namespace tpattn
