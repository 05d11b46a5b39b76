// examples/runtime_choice.cpp -- the attention mechanism chosen by a config file, not by the code.
//
//   runtime_choice              the embedded config below
//   runtime_choice layer.conf   a `key = value` file (keys: docs/operators.md, "Choosing the
//                               operator at run time")
//
// parse_attention_spec reads the text, make_attention builds the operator the family names as a
// std::unique_ptr<AnyAttention>; the rest of the program never names a layer class. Random
// weights of the shapes the config asks for stand in for a checkpoint's. Prints the operator and
// its cache bytes; exits 2 on a config error (the message says which key), 1 if the cache holds
// the wrong number of bytes.
#include <cmath>
#include <cstdio>
#include <exception>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;

namespace {

const char* const kDefaultConfig = R"(# TPA with the T6 code's RoPE, a bf16 cache
family = tpa
storage = bf16
d_model = 256
heads = 8
head_dim = 32
rank_q = 4
rank_k = 2
rank_v = 2
rope.direction = reversed
)";

RowMatrix weight(Index rows, Index cols) {  // scaled so outputs stay near unit size
  return RowMatrix::Random(rows, cols) / std::sqrt(static_cast<float>(cols));
}

// Weights of the shapes docs/operators.md gives for the spec's family.
tpattn::AttentionWeights random_weights(const tpattn::AttentionSpec& spec) {
  using namespace tpattn;
  if (const auto* c = std::get_if<GqaConfig>(&spec.config)) {
    const Index d = c->d_model, h = c->heads, dh = c->head_dim;
    const Index dv = c->value_dim > 0 ? c->value_dim : dh;
    const Index g = spec.family == AttentionFamily::mha   ? h
                    : spec.family == AttentionFamily::mqa ? 1
                                                          : c->kv_heads;
    return GqaWeights{weight(h * dh, d), weight(g * dh, d), weight(g * dv, d), weight(d, h * dv)};
  }
  if (const auto* c = std::get_if<MlaConfig>(&spec.config)) {
    const Index d = c->d_model, h = c->heads, dh = c->head_dim, dr = c->rope_dim;
    const Index dv = c->value_dim > 0 ? c->value_dim : dh, dc = c->kv_latent_dim;
    const Index dq = c->q_latent_dim;
    MlaWeights w;
    if (dq > 0) w.w_dq = weight(dq, d);
    w.q_norm = Vector::Ones(dq);
    w.w_uq = weight(h * (dh + dr), dq > 0 ? dq : d);
    w.w_dkv = weight(dc + dr, d);
    w.kv_norm = Vector::Ones(dc);
    w.w_ukv = weight(h * (dh + dv), dc);
    w.w_o = weight(d, h * dv);
    return w;
  }
  const auto& c = std::get<TpaConfig>(spec.config);
  const Index d = c.d_model, h = c.heads, dh = c.head_dim;
  const Index dv = c.value_dim > 0 ? c.value_dim : dh;
  TpaWeights w;
  if (c.rank_q > 0) {
    w.w_a_q = weight(h * c.rank_q, d);
    w.w_b_q = weight(c.rank_q * dh, d);
  } else {
    w.w_q = weight(h * dh, d);
  }
  w.w_a_k = weight(h * c.rank_k, d);
  w.w_b_k = weight(c.rank_k * dh, d);
  w.w_a_v = weight(h * c.rank_v, d);
  w.w_b_v = weight(c.rank_v * dv, d);
  w.w_o = weight(d, h * dv);
  return w;
}

}  // namespace

int main(int argc, char** argv) {
  std::string text = kDefaultConfig;
  if (argc > 1) {
    std::ifstream file(argv[1]);
    if (!file) {
      std::fprintf(stderr, "runtime_choice: cannot read '%s'\n", argv[1]);
      return 2;
    }
    std::ostringstream contents;
    contents << file.rdbuf();
    text = contents.str();
  }

  std::unique_ptr<tpattn::AnyAttention> attention;
  try {
    const tpattn::AttentionSpec spec = tpattn::parse_attention_spec(text);
    attention = tpattn::make_attention(spec, random_weights(spec));
  } catch (const std::exception& error) {  // a tpattn::Error, or no memory for the weights
    std::fprintf(stderr, "%s\n", error.what());
    return 2;
  }

  tpattn::PagedKvCache cache(attention->cache_record(), /*page_tokens=*/16, /*page_count=*/8,
                             /*max_sequences=*/1);
  const tpattn::SequenceId seq = cache.add_sequence();
  const Index d = attention->d_model(), prompt = 40, steps = 24;
  attention->reserve(/*max_batch=*/1, /*max_tokens=*/prompt);  // no call below allocates
  const RowMatrix x = RowMatrix::Random(prompt, d);            // [prompt, d_model]
  RowMatrix y(prompt, d);
  attention->prefill(cache, seq, prompt, x.data(), y.data());
  RowMatrix next = y.bottomRows(1).array().tanh().matrix();  // stand-in: the rest of the model
  for (Index step = 0; step < steps; ++step) {
    attention->decode(cache, &seq, /*batch=*/1, next.data(), y.data());
    next = y.topRows(1).array().tanh().matrix();
  }

  std::printf("%s (%s), %s cache, d_model %td\n", name_of(attention->family()), attention->name(),
              name_of(attention->storage()), d);
  std::printf("%td tokens: %td bytes used, %td bytes per token\n", cache.length(seq),
              cache.bytes_used(), cache.bytes_per_token());
  return cache.bytes_used() == (prompt + steps) * cache.bytes_per_token() ? 0 : 1;
}
