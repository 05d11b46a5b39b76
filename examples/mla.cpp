// examples/mla.cpp -- multi-head latent attention with a bfloat16 cache.
//
// DeepSeek-V2's layout at a small size: query compression with RMSNorm, the KV latent RMSNorm'd
// before caching, a decoupled rotary key shared by all heads, interleaved RoPE. The cache holds
// one latent and one rope key per token. The same 20-token prompt goes into three sequences:
// one prefill, two chunks, and 20 decode steps; all three must give the same outputs. Exits 1
// if they differ or the cache size is not d_c + d_R bfloat16 values per token.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;

namespace {

RowMatrix random_weight(Index rows, Index cols) {
  return RowMatrix::Random(rows, cols) * (1.0f / std::sqrt(static_cast<float>(cols)));
}

tpattn::Vector random_gain(Index n) {
  return tpattn::Vector::Ones(n) + 0.1f * tpattn::Vector::Random(n);
}

float max_difference(const RowMatrix& a, const RowMatrix& b) {
  return (a - b).cwiseAbs().maxCoeff();
}

}  // namespace

int main() {
  tpattn::MlaConfig config;
  config.d_model = 512;
  config.heads = 8;
  config.head_dim = 64;        // d_h: the non-rotary part of a query/key head
  config.rope_dim = 32;        // d_R: the decoupled rotary key
  config.value_dim = 64;       // d_v
  config.kv_latent_dim = 128;  // d_c: cached
  config.q_latent_dim = 384;   // d'_c: query compression
  config.normalize_q_latent = true;
  config.normalize_kv_latent = true;
  config.rope.pairing = tpattn::RopePairing::interleaved;  // as DeepSeek's own code
  const Index d = config.d_model, h = config.heads, dc = config.kv_latent_dim;

  tpattn::MlaWeights weights;
  weights.w_dq = random_weight(config.q_latent_dim, d);
  weights.q_norm = random_gain(config.q_latent_dim);
  weights.w_uq = random_weight(h * (config.head_dim + config.rope_dim), config.q_latent_dim);
  weights.w_dkv = random_weight(dc + config.rope_dim, d);
  weights.kv_norm = random_gain(dc);
  weights.w_ukv = random_weight(h * (config.head_dim + config.value_dim), dc);
  weights.w_o = random_weight(d, h * config.value_dim);
  tpattn::MultiHeadLatentAttention<Eigen::bfloat16> op(config, weights);

  // Three sequences of up to 64 tokens, each its own preallocated region.
  tpattn::ContiguousKvCache cache(op.cache_record(), /*max_sequences=*/3, /*max_tokens=*/64);
  const Index prompt = 20;
  op.reserve(/*max_batch=*/3, /*max_tokens=*/prompt);
  const RowMatrix x = RowMatrix::Random(prompt, d);  // [tokens, d_model], row-major
  RowMatrix whole(prompt, d), chunked(prompt, d), stepped(prompt, d);

  const tpattn::SequenceId seqs[3] = {cache.add_sequence(), cache.add_sequence(),
                                      cache.add_sequence()};
  op.prefill(cache, seqs[0], prompt, x.data(), whole.data());
  op.prefill(cache, seqs[1], 7, x.data(), chunked.data());  // chunked prefill: 7, then 13
  op.prefill(cache, seqs[1], prompt - 7, x.row(7).data(), chunked.row(7).data());
  for (Index t = 0; t < prompt; ++t)
    op.decode(cache, &seqs[2], 1, x.row(t).data(), stepped.row(t).data());

  // Then decode four more tokens for all three sequences in one batch: same token, same output.
  RowMatrix next(3, d), y(3, d);
  float batch_difference = 0.0f;
  for (int step = 0; step < 4; ++step) {
    const RowMatrix token = RowMatrix::Random(1, d);
    next.rowwise() = token.row(0);
    op.decode(cache, seqs, 3, next.data(), y.data());
    for (Index b = 1; b < 3; ++b)
      batch_difference = std::max(batch_difference, (y.row(b) - y.row(0)).cwiseAbs().maxCoeff());
  }

  const tpattn::CacheRecord& record = cache.record();
  std::printf("MLA h %td, d_h %td, d_R %td, d_c %td, d'_c %td, bfloat16 cache\n", h,
              config.head_dim, config.rope_dim, dc, config.q_latent_dim);
  std::printf("  per token: %s %td + %s %td = %td elements = %td bytes (fp32 would be %td)\n",
              record.plane(0).name.c_str(), record.plane(0).elements_per_token(),
              record.plane(1).name.c_str(), record.plane(1).elements_per_token(),
              record.elements_per_token(), cache.bytes_per_token(),
              4 * record.elements_per_token());
  std::printf("  3 sequences of %td tokens: bytes_used %td of %td reserved\n",
              cache.length(seqs[0]), cache.bytes_used(), cache.bytes_reserved());
  const float scale = whole.cwiseAbs().maxCoeff();
  std::printf("  max |y| %.4f; differences: chunked %.2e, step by step %.2e, batch rows %.2e\n",
              scale, max_difference(whole, chunked), max_difference(whole, stepped),
              batch_difference);

  bool ok = cache.bytes_per_token() == (dc + config.rope_dim) * 2;
  ok &= cache.bytes_used() == 3 * (prompt + 4) * cache.bytes_per_token();
  // The paths round the projections in fp32 differently, so a cached bf16 value may land one
  // bf16 step apart; that moves the outputs by ~1e-5, far below this bound.
  const float tolerance = 1e-3f * scale;
  ok &= max_difference(whole, chunked) <= tolerance && max_difference(whole, stepped) <= tolerance;
  ok &= batch_difference <= tolerance;
  if (!ok) std::printf("FAILED\n");
  return ok ? 0 : 1;
}
