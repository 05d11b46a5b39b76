// A program that uses tpattn the way a consumer project would: through the tpattn::tpattn target
// only, with no include paths or flags of its own. Exits 0 when the cache behaves as documented.
#include <cstdio>
#include <tpattn/cache.hpp>
#include <vector>

int main() {
  // GQA record: 2 KV heads, head_dim 8, value_dim 8, fp32 -> 2 * (8 + 8) * 4 = 128 bytes a token.
  tpattn::ContiguousKvCache cache(tpattn::records::gqa(2, 8, 8), 2, 16);
  const tpattn::SequenceId seq = cache.add_sequence();

  std::vector<float> keys(2 * 8, 1.0f);
  std::vector<float> values(2 * 8, 2.0f);
  cache.append(seq, 1, {{keys.data(), 2, 8}, {values.data(), 2, 8}});

  const tpattn::Index expected = 2 * (8 + 8) * 4;
  if (cache.length(seq) != 1 || cache.bytes_used() != expected) {
    std::printf("tpattn consumer: FAILED (length %td, bytes_used %td, expected 1 and %td)\n",
                cache.length(seq), cache.bytes_used(), expected);
    return 1;
  }
  std::printf("tpattn consumer: ok (bytes_used %td)\n", cache.bytes_used());
  return 0;
}
