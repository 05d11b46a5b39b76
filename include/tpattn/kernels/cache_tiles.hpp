// tpattn/kernels/cache_tiles.hpp -- walking a cached sequence in tiles of tokens, read as fp32.
//
// Kernels visit a range of a SequenceView's tokens in tiles of at most `tile_tokens` tokens that
// never straddle a block (page), and read a tile's plane rows as fp32: float storage is mapped in
// place, bfloat16/half rows are converted into a small scratch tile. Which tokens each query token
// sees is a KeyRange: causal, optionally a sliding window, optionally one work item's share.
#pragma once

#include <limits>
#include <type_traits>

#include "tpattn/cache/sequence_view.hpp"
#include "tpattn/core/matrix.hpp"

namespace tpattn {

// The cached tokens query token t of a call (t = 0 .. count - 1) sees: [lower(t), horizon(t)).
//   causal:          the tokens before visible + t (decode: visible = length, t = 0);
//   sliding window:  window > 0 keeps only the last `window` of them (Mistral-style; 0: all);
//   work share:      none before `begin` nor from `end` on (split-KV: one work item's range).
// lower(t) and horizon(t) never decrease with t.
struct KeyRange {
  Index visible = 0;
  Index window = 0;
  Index begin = 0;
  Index end = std::numeric_limits<Index>::max();

  Index horizon(Index t) const { return visible + t < end ? visible + t : end; }
  Index lower(Index t) const {
    const Index from = window > 0 ? visible + t - window : 0;
    return from > begin ? from : begin;
  }
  // The same range for the query tokens from `first` on (their t counted from 0 again).
  KeyRange from_token(Index first) const {
    KeyRange shifted = *this;
    shifted.visible += first;
    return shifted;
  }
};

struct CacheTile {
  Index block;   // block of the view
  Index row;     // first token inside the block
  Index tokens;  // tokens in the tile
  Index first;   // position of the tile's first token in the sequence

  // How many leading tokens of the tile a query token sees that sees the tokens before
  // `horizon` (causal attention: query token t of a call sees those before visible + t). The
  // rest are masked: their scores are -inf and their values must not be touched.
  Index seen_by(Index horizon) const {
    const Index seen = horizon - first;
    return seen < 0 ? 0 : seen > tokens ? tokens : seen;
  }
  // The tile's columns query token t sees: [hidden_before(range.lower(t)), seen_by(horizon)).
  Index hidden_before(Index lower) const { return seen_by(lower); }
  // True if every query token 0 .. count - 1 of `range` sees every token of the tile.
  bool seen_by_all(const KeyRange& range, Index count) const {
    return first >= range.lower(count - 1) && first + tokens <= range.horizon(0);
  }
};

// Calls visit(CacheTile) for consecutive tiles covering tokens [begin, limit) of `view`.
template <class Visit>
void for_each_tile(const SequenceView& view, Index begin, Index limit, Index tile_tokens,
                   Visit&& visit) {
  TPATTN_ASSERT(limit <= view.length());
  Index position = begin;
  while (position < limit) {
    const Index block = position / view.block_tokens();
    const Index row = position % view.block_tokens();
    const Index in_block = view.block_tokens() - row;
    Index tokens = limit - position;
    if (tokens > in_block) tokens = in_block;
    if (tokens > tile_tokens) tokens = tile_tokens;
    visit(CacheTile{block, row, tokens, position});
    position += tokens;
  }
}

// The tiles holding every token some query token 0 .. count - 1 of `range` sees.
template <class Visit>
void for_each_tile(const SequenceView& view, const KeyRange& range, Index count, Index tile_tokens,
                   Visit&& visit) {
  const Index last = range.horizon(count - 1);
  for_each_tile(view, range.lower(0), last < view.length() ? last : view.length(), tile_tokens,
                visit);
}

// The fp32 rows [tile.tokens, width] of columns [column, column + width) of `plane` in the tile.
// For float storage the result maps the cache itself; otherwise the rows are converted into
// `scratch` ([tile.tokens, width] floats).
template <class Storage>
ConstMatrixMap read_tile(const SequenceView& view, Index plane, const CacheTile& tile, Index column,
                         Index width, float* scratch) {
  const Index stride = view.elements_per_token(plane);
  const Storage* rows = view.plane_block<Storage>(plane, tile.block) + tile.row * stride + column;
  if constexpr (std::is_same_v<Storage, float>) {
    return map_matrix(rows, tile.tokens, width, stride);
  } else {
    for (Index t = 0; t < tile.tokens; ++t)
      StorageTraits<Storage>::to_float(rows + t * stride, scratch + t * width, width);
    return map_matrix(static_cast<const float*>(scratch), tile.tokens, width, width);
  }
}

}  // namespace tpattn
