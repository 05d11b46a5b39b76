// examples/compare_all.cpp -- the KV-cache cost of every operator at one model size.
//
// The paper's small model, d_model 768: MHA (h 12, d_h 64), GQA (2 KV heads), MQA, MLA
// (d_c 256, d_R 32), TPA (h 34, d_h 64, R_Q 6, R_K = R_V 2) and TPA-KVonly. Each operator,
// with float and with bfloat16 storage, decodes a few tokens for two sequences on its own paged
// cache; the table shows the cache elements and bytes per token. Exits 1 if a number differs
// from the spec's table (docs/attention.md §5), if bytes_used is not tokens x bytes per token,
// or if the bfloat16 cache changes the outputs by more than bfloat16 rounding can.
#include <cmath>
#include <cstdio>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;

namespace {

constexpr Index kModel = 768, kPrompt = 8, kSteps = 3;

RowMatrix random_weight(Index rows, Index cols) {
  return RowMatrix::Random(rows, cols) * (1.0f / std::sqrt(static_cast<float>(cols)));
}

// Prefills two prompts (kPrompt and kPrompt - 3 tokens), decodes kSteps tokens for both in one
// batch; returns the last outputs [2, d_model]. *exact: bytes_used == tokens x bytes_per_token.
template <class Operator>
RowMatrix decode_a_few(Operator& op, const RowMatrix& x, Index* bytes_per_token, bool* exact) {
  tpattn::PagedKvCache cache(op.cache_record(), /*page_tokens=*/16, /*page_count=*/4, 2);
  const tpattn::SequenceId seqs[2] = {cache.add_sequence(), cache.add_sequence()};
  RowMatrix y(kPrompt, kModel);
  op.prefill(cache, seqs[0], kPrompt, x.data(), y.data());
  op.prefill(cache, seqs[1], kPrompt - 3, x.data(), y.data());
  for (Index step = 0; step < kSteps; ++step)
    op.decode(cache, seqs, 2, x.row(kPrompt + 2 * step).data(), y.data());
  *bytes_per_token = cache.bytes_per_token();
  *exact = cache.bytes_used() == (2 * kPrompt - 3 + 2 * kSteps) * cache.bytes_per_token();
  return y.topRows(2);
}

// One table row: Operator<float> and Operator<bfloat16> from the same config and weights.
template <template <class> class Operator, class Config, class Weights>
bool compare(const char* name, const char* shape, Index spec_elements, const Config& config,
             const Weights& weights, const RowMatrix& x) {
  Operator<float> f32(config, weights);
  Operator<Eigen::bfloat16> bf16(config, weights);
  Index f32_bytes = 0, bf16_bytes = 0;
  bool f32_exact = false, bf16_exact = false;
  const RowMatrix y = decode_a_few(f32, x, &f32_bytes, &f32_exact);
  const RowMatrix y_bf16 = decode_a_few(bf16, x, &bf16_bytes, &bf16_exact);
  const Index elements = f32.cache_record().elements_per_token();
  const float bf16_error = (y - y_bf16).cwiseAbs().maxCoeff() / y.cwiseAbs().maxCoeff();
  const bool ok = elements == spec_elements && f32_bytes == 4 * spec_elements &&
                  bf16_bytes == 2 * spec_elements && f32_exact && bf16_exact && bf16_error < 5e-2f;
  std::printf("%-10s  %-27s  %8td  %5td  %9td  %10td  %10.1e  %s\n", name, shape, elements,
              spec_elements, f32_bytes, bf16_bytes, bf16_error, ok ? "ok" : "MISMATCH");
  return ok;
}

tpattn::GqaConfig gqa_config(Index kv_heads) {
  tpattn::GqaConfig config;
  config.d_model = kModel;
  config.heads = 12;
  config.kv_heads = kv_heads;
  config.head_dim = 64;
  return config;
}

tpattn::GqaWeights gqa_weights(Index kv_heads) {
  return {random_weight(12 * 64, kModel), random_weight(kv_heads * 64, kModel),
          random_weight(kv_heads * 64, kModel), random_weight(kModel, 12 * 64)};
}

}  // namespace

int main() {
  using namespace tpattn;
  const RowMatrix x = RowMatrix::Random(kPrompt + 2 * kSteps, kModel);  // token inputs

  MlaConfig mla;
  mla.d_model = kModel;
  mla.heads = 12;
  mla.head_dim = 64;
  mla.rope_dim = 32;
  mla.kv_latent_dim = 256;  // no query compression: w_uq maps x_t directly
  MlaWeights mla_weights;
  mla_weights.w_uq = random_weight(12 * (64 + 32), kModel);
  mla_weights.w_dkv = random_weight(256 + 32, kModel);
  mla_weights.kv_norm = Vector::Ones(256);
  mla_weights.w_ukv = random_weight(12 * (64 + 64), 256);
  mla_weights.w_o = random_weight(kModel, 12 * 64);

  TpaConfig tpa;
  tpa.d_model = kModel;
  tpa.heads = 34;
  tpa.head_dim = 64;
  tpa.rank_q = 6;
  tpa.rank_k = tpa.rank_v = 2;
  tpa.rope.direction = RopeDirection::reversed;  // the T6 code's rotation (half-split pairing)
  TpaWeights tpa_weights;
  tpa_weights.w_a_q = random_weight(34 * 6, kModel);
  tpa_weights.w_b_q = random_weight(6 * 64, kModel);
  tpa_weights.w_q = random_weight(34 * 64, kModel);  // used by TPA-KVonly only
  tpa_weights.w_a_k = random_weight(34 * 2, kModel);
  tpa_weights.w_b_k = random_weight(2 * 64, kModel);
  tpa_weights.w_a_v = random_weight(34 * 2, kModel);
  tpa_weights.w_b_v = random_weight(2 * 64, kModel);
  tpa_weights.w_o = random_weight(kModel, 34 * 64);
  TpaConfig kv_only = tpa;
  kv_only.rank_q = 0;

  std::printf("d_model %td; each operator decoded %td tokens for 2 sequences\n", kModel, kSteps);
  std::printf("%-10s  %-27s  %8s  %5s  %9s  %10s  %10s\n", "operator", "shape", "elements", "spec",
              "f32 bytes", "bf16 bytes", "bf16 error");
  bool ok =
      compare<MultiHeadAttention>("MHA", "h 12, d_h 64", 1536, gqa_config(12), gqa_weights(12), x);
  ok &= compare<GroupedQueryAttention>("GQA", "h 12, g 2, d_h 64", 256, gqa_config(2),
                                       gqa_weights(2), x);
  ok &= compare<MultiQueryAttention>("MQA", "h 12, g 1, d_h 64", 128, gqa_config(1), gqa_weights(1),
                                     x);  // §1: g (d_h + d_v)
  ok &= compare<MultiHeadLatentAttention>("MLA", "h 12, d_c 256, d_R 32", 288, mla, mla_weights, x);
  ok &= compare<TensorProductAttention>("TPA", "h 34, d_h 64, R 6/2/2", 392, tpa, tpa_weights, x);
  ok &= compare<TensorProductAttentionKvOnly>("TPA-KVonly", "h 34, d_h 64, R_K = R_V = 2", 392,
                                              kv_only, tpa_weights, x);
  std::printf(
      "spec: docs/attention.md §5 (MQA and TPA-KVonly from the §1 and §3 formulas)\n"
      "bf16 error: max |y_bf16 - y_f32| / max |y_f32| over the last decode step\n");
  if (!ok) std::printf("FAILED: a row differs from the spec\n");
  return ok ? 0 : 1;
}
