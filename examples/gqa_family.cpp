// examples/gqa_family.cpp -- MHA, GQA and MQA: one operator class, one paged cache.
//
// For each of the three, with random weights: prefill two prompts of different lengths into a
// PagedKvCache built from op.cache_record(), decode a few tokens for both sequences in one
// batch, then decode a speculative token and roll it back with truncate(). Exits 1 if the
// rollback does not restore the cache exactly or the byte accounting is off.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;

namespace {

constexpr Index kModel = 256, kHeads = 8, kHeadDim = 32;

RowMatrix random_weight(Index rows, Index cols) {
  return RowMatrix::Random(rows, cols) * (1.0f / std::sqrt(static_cast<float>(cols)));
}

std::vector<float> random_tokens(Index n) {
  const RowMatrix x = RowMatrix::Random(n, kModel);
  return std::vector<float>(x.data(), x.data() + x.size());
}

bool check(bool ok, const char* what) {
  if (!ok) std::printf("  FAILED: %s\n", what);
  return ok;
}

template <class Operator>
bool run(const char* name, Index kv_heads) {
  tpattn::GqaConfig config;
  config.d_model = kModel;
  config.heads = kHeads;
  config.kv_heads = kv_heads;
  config.head_dim = kHeadDim;  // value_dim 0: d_v = d_h; rope: half-split over the whole head
  tpattn::GqaWeights weights{
      random_weight(kHeads * kHeadDim, kModel), random_weight(kv_heads * kHeadDim, kModel),
      random_weight(kv_heads * kHeadDim, kModel), random_weight(kModel, kHeads * kHeadDim)};
  Operator op(config, weights);

  // 8 pages of 16 tokens shared by at most 2 sequences; no allocation once built.
  tpattn::PagedKvCache cache(op.cache_record(), /*page_tokens=*/16, /*page_count=*/8,
                             /*max_sequences=*/2);
  const Index prompt_a = 23, prompt_b = 9;
  op.reserve(/*max_batch=*/2, /*max_tokens=*/prompt_a);  // decode below allocates nothing

  const tpattn::SequenceId seqs[2] = {cache.add_sequence(), cache.add_sequence()};
  std::vector<float> y(static_cast<std::size_t>(prompt_a * kModel));
  op.prefill(cache, seqs[0], prompt_a, random_tokens(prompt_a).data(), y.data());
  op.prefill(cache, seqs[1], prompt_b, random_tokens(prompt_b).data(), y.data());
  const Index steps = 3;
  for (Index step = 0; step < steps; ++step)  // x, y: [2, d_model], row b for seqs[b]
    op.decode(cache, seqs, 2, random_tokens(2).data(), y.data());

  std::printf("%s (h %td, g %td): %td elements = %td bytes per token\n", name, kHeads,
              op.config().kv_heads, cache.record().elements_per_token(), cache.bytes_per_token());
  std::printf(
      "  lengths %td and %td: bytes_used %td, bytes_in_pages %td (%td of %td pages), "
      "bytes_reserved %td\n",
      cache.length(seqs[0]), cache.length(seqs[1]), cache.bytes_used(), cache.bytes_in_pages(),
      cache.page_count() - cache.free_page_count(), cache.page_count(), cache.bytes_reserved());
  bool ok = check(cache.bytes_used() == (prompt_a + prompt_b + 2 * steps) * cache.bytes_per_token(),
                  "bytes_used == tokens x bytes_per_token");
  const Index pages_held = (prompt_a + steps + 15) / 16 + (prompt_b + steps + 15) / 16;
  ok &= check(cache.bytes_in_pages() == pages_held * cache.page_bytes(),
              "bytes_in_pages == pages held x page_bytes (each last page rounded up)");

  // Speculative decoding: a draft token is decoded, rejected and rolled back with truncate().
  // The accepted token must then give the same output bits as if no draft had been made.
  const auto roll_back = [&] {
    for (tpattn::SequenceId seq : seqs) cache.truncate(seq, cache.length(seq) - 1);
  };
  const std::vector<float> draft = random_tokens(2), accepted = random_tokens(2);
  std::vector<float> y_reference(2 * kModel), y_accepted(2 * kModel);
  op.decode(cache, seqs, 2, accepted.data(), y_reference.data());  // reference: no draft
  roll_back();
  const Index used = cache.bytes_used(), free_pages = cache.free_page_count();
  op.decode(cache, seqs, 2, draft.data(), y.data());
  const Index used_with_draft = cache.bytes_used();
  roll_back();
  const Index used_after = cache.bytes_used();
  ok &= check(used_after == used && cache.free_page_count() == free_pages,
              "truncate restores bytes_used and the free pages");
  op.decode(cache, seqs, 2, accepted.data(), y_accepted.data());
  ok &= check(std::memcmp(y_reference.data(), y_accepted.data(), 2 * kModel * sizeof(float)) == 0,
              "after the rollback the accepted token gives the reference output");
  std::printf(
      "  draft token: bytes_used %td -> %td, rolled back to %td; accepted token: "
      "lengths %td and %td\n",
      used, used_with_draft, used_after, cache.length(seqs[0]), cache.length(seqs[1]));
  return ok;
}

}  // namespace

int main() {
  bool ok = run<tpattn::MultiHeadAttention<float>>("MHA", kHeads);
  ok &= run<tpattn::GroupedQueryAttention<float>>("GQA", 2);
  ok &= run<tpattn::MultiQueryAttention<float>>("MQA", 1);
  return ok ? 0 : 1;
}
