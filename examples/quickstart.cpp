// examples/quickstart.cpp -- the shortest path: a TPA layer, a paged cache, prefill, decode.
//
// Random weights stand in for a checkpoint's (same row-major `out x in` layout, docs/operators.md).
// The cache stores bfloat16; all compute is fp32. Exits 1 if the cache holds the wrong count.
#include <cmath>
#include <cstdio>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;

static RowMatrix weight(Index rows, Index cols) {  // scaled so outputs stay near unit size
  return RowMatrix::Random(rows, cols) / std::sqrt(static_cast<float>(cols));
}

int main() {
  tpattn::TpaConfig config;
  config.d_model = 256;
  config.heads = 8;      // h
  config.head_dim = 32;  // d_h (and d_v)
  config.rank_q = 4;     // R_Q
  config.rank_k = 2;     // R_K
  config.rank_v = 2;     // R_V
  const Index d = config.d_model, h = config.heads, dh = config.head_dim;
  tpattn::TpaWeights w;  // A maps head-major, B maps rank-major, as the T6 code stores them
  w.w_a_q = weight(h * config.rank_q, d);
  w.w_b_q = weight(config.rank_q * dh, d);
  w.w_a_k = weight(h * config.rank_k, d);
  w.w_b_k = weight(config.rank_k * dh, d);
  w.w_a_v = weight(h * config.rank_v, d);
  w.w_b_v = weight(config.rank_v * dh, d);
  w.w_o = weight(d, h * dh);
  tpattn::TensorProductAttention<Eigen::bfloat16> attention(config, w);

  // 8 pages of 16 tokens, for at most 1 sequence: room for the 40 + 32 tokens below.
  tpattn::PagedKvCache cache(attention.cache_record(), /*page_tokens=*/16, /*page_count=*/8,
                             /*max_sequences=*/1);
  const tpattn::SequenceId seq = cache.add_sequence();
  attention.reserve(/*max_batch=*/1);  // so the decode steps below allocate nothing

  const Index prompt = 40, steps = 32;
  const RowMatrix x = RowMatrix::Random(prompt, d);  // the prompt's hidden states [n, d_model]
  RowMatrix y(prompt, d), out(1, d);
  attention.prefill(cache, seq, prompt, x.data(), y.data());
  RowMatrix next = y.bottomRows(1).array().tanh().matrix();  // stand-in: the rest of the model
  for (Index step = 0; step < steps; ++step) {
    attention.decode(cache, &seq, /*batch=*/1, next.data(), out.data());
    next = out.array().tanh().matrix();
  }

  std::printf("TPA h %td, d_h %td, R_Q %td, R_K %td, R_V %td, bf16 cache\n", h, dh, config.rank_q,
              config.rank_k, config.rank_v);
  std::printf("%td tokens: %td bytes used, %td bytes per token (%td reserved)\n", cache.length(seq),
              cache.bytes_used(), cache.bytes_per_token(), cache.bytes_reserved());
  return cache.bytes_used() == (prompt + steps) * cache.bytes_per_token() ? 0 : 1;
}
