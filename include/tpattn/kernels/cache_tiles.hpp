// tpattn/kernels/cache_tiles.hpp -- walking a cached sequence in tiles of tokens, read as fp32.
//
// Kernels visit the first `limit` tokens of a SequenceView in tiles of at most `tile_tokens`
// tokens that never straddle a block (page), and read a tile's plane rows as fp32: float storage
// is mapped in place, bfloat16/half rows are converted into a small scratch tile.
#pragma once

#include <type_traits>

#include "tpattn/cache/sequence_view.hpp"
#include "tpattn/core/matrix.hpp"

namespace tpattn {

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
};

// Calls visit(CacheTile) for consecutive tiles covering tokens [0, limit) of `view`.
template <class Visit>
void for_each_tile(const SequenceView& view, Index limit, Index tile_tokens, Visit&& visit) {
  TPATTN_ASSERT(limit <= view.length());
  Index position = 0;
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
