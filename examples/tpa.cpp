// examples/tpa.cpp -- Tensor Product Attention: the whole layer, then the bare kernel.
//
// 1. TensorProductAttention<float> with the paper's small-model shapes (h 34, d_h 64, R_Q 6,
//    R_K = R_V 2) and the public T6 code's RoPE (half-split, reversed rotation): prefill and
//    decode with both contraction orders, which must give the same outputs.
// 2. TpaKernel for an engine that owns its projections: append factors to a cache, attend with
//    log-sum-exp, and compare with softmax attention over materialised Q, K and V.
// Exits 1 if a comparison fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "tpattn/tpattn.hpp"

using tpattn::Index;
using tpattn::RowMatrix;
using tpattn::TpaOrder;

namespace {

RowMatrix random_weight(Index rows, Index cols) {
  return RowMatrix::Random(rows, cols) * (1.0f / std::sqrt(static_cast<float>(cols)));
}

const char* name_of(TpaOrder order) {
  return order == TpaOrder::factor ? "factor (FlashTPA)" : "query (materialised q)";
}

bool whole_layer() {
  tpattn::TpaConfig config;
  config.d_model = 768;
  config.heads = 34;
  config.head_dim = 64;
  config.rank_q = 6;
  config.rank_k = config.rank_v = 2;
  config.rope.pairing = tpattn::RopePairing::half_split;
  config.rope.direction = tpattn::RopeDirection::reversed;
  const Index d = config.d_model, h = config.heads, dh = config.head_dim;
  tpattn::TpaWeights weights;  // as the T6 checkpoints store them: A head-major, B rank-major
  weights.w_a_q = random_weight(h * config.rank_q, d);
  weights.w_b_q = random_weight(config.rank_q * dh, d);
  weights.w_a_k = random_weight(h * config.rank_k, d);
  weights.w_b_k = random_weight(config.rank_k * dh, d);
  weights.w_a_v = random_weight(h * config.rank_v, d);
  weights.w_b_v = random_weight(config.rank_v * dh, d);
  weights.w_o = random_weight(d, h * dh);
  tpattn::TensorProductAttention<float> op(config, weights);  // order: automatic
  config.order = TpaOrder::query;
  tpattn::TensorProductAttention<float> other(config, weights);

  // Both operators share one cache: their records are the same. One sequence each.
  tpattn::PagedKvCache cache(op.cache_record(), /*page_tokens=*/16, /*page_count=*/4, 2);
  const tpattn::SequenceId seq = cache.add_sequence(), seq_other = cache.add_sequence();
  const Index prompt = 16, total = 20;
  const RowMatrix x = RowMatrix::Random(total, d);
  RowMatrix y(total, d), y_other(total, d);
  op.prefill(cache, seq, prompt, x.data(), y.data());
  other.prefill(cache, seq_other, prompt, x.data(), y_other.data());
  for (Index t = prompt; t < total; ++t) {
    op.decode(cache, &seq, 1, x.row(t).data(), y.row(t).data());
    other.decode(cache, &seq_other, 1, x.row(t).data(), y_other.row(t).data());
  }
  const float scale = y.cwiseAbs().maxCoeff(), difference = (y - y_other).cwiseAbs().maxCoeff();
  std::printf("TPA h %td, d_h %td, R_Q 6, R_K = R_V = 2: automatic order picks %s\n", h, dh,
              name_of(op.order()));
  std::printf("  %td elements = %td bytes per token; 2 x %td tokens: bytes_used %td\n",
              cache.record().elements_per_token(), cache.bytes_per_token(), cache.length(seq),
              cache.bytes_used());
  std::printf("  %s order differs by %.2e (max |y| %.3f)\n", name_of(other.order()), difference,
              scale);
  return difference <= 1e-4f * scale;
}

bool bare_kernel() {
  const Index h = 4, dh = 8, dv = 8, rq = 3, rk = 2, rv = 2, tokens = 9;
  const tpattn::TpaKernel<float> kernel(tpattn::TpaShape{h, dh, dv, rq, rk, rv});
  tpattn::PagedKvCache cache(kernel.cache_record(), /*page_tokens=*/4, /*page_count=*/4, 1);
  const tpattn::SequenceId seq = cache.add_sequence();
  const tpattn::Rope rope(tpattn::RopeConfig{}, dh);

  // The engine's factors of 9 tokens, R rows per token; the last token is also the query.
  // B_K and B_Q rows are rotated at their token's position before use.
  RowMatrix a_k = RowMatrix::Random(tokens * rk, h), b_k = RowMatrix::Random(tokens * rk, dh);
  RowMatrix a_v = RowMatrix::Random(tokens * rv, h), b_v = RowMatrix::Random(tokens * rv, dv);
  RowMatrix a_q = RowMatrix::Random(rq, h), b_q = RowMatrix::Random(rq, dh);
  for (Index s = 0; s < tokens; ++s) rope.apply(b_k.row(s * rk).data(), rk, dh, s);
  rope.apply(b_q.data(), rq, dh, tokens - 1);
  cache.append(
      seq, tokens,
      {{a_k.data(), rk, h}, {b_k.data(), rk, dh}, {a_v.data(), rv, h}, {b_v.data(), rv, dv}});

  // Reference: Q = A_Q^T B_Q / R_Q, K_s = A_K^T B_K / R_K, V_s = A_V^T B_V / R_V.
  const RowMatrix q = a_q.transpose() * b_q / static_cast<float>(rq);
  RowMatrix scores(h, tokens), expected = RowMatrix::Zero(h, dv);
  for (Index s = 0; s < tokens; ++s) {
    const RowMatrix k = a_k.middleRows(s * rk, rk).transpose() * b_k.middleRows(s * rk, rk);
    scores.col(s) = q.cwiseProduct(k).rowwise().sum() / (rk * std::sqrt(static_cast<float>(dh)));
  }
  const Eigen::VectorXf top = scores.rowwise().maxCoeff();
  const RowMatrix p = (scores.colwise() - top).array().exp().matrix();
  const Eigen::VectorXf sums = p.rowwise().sum();
  for (Index s = 0; s < tokens; ++s) {
    const RowMatrix v = a_v.middleRows(s * rv, rv).transpose() * b_v.middleRows(s * rv, rv) /
                        static_cast<float>(rv);
    expected += (p.col(s).array() / sums.array()).matrix().asDiagonal() * v;
  }
  const Eigen::VectorXf expected_lse = top.array() + sums.array().log();

  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  RowMatrix out(h, dv);  // [n = 1, h, d_v]
  Eigen::VectorXf lse(h);
  bool ok = true;
  for (TpaOrder order : {TpaOrder::factor, TpaOrder::query}) {
    kernel.attend(a_q.data(), b_q.data(), /*n=*/1, cache.view(seq), out.data(), lse.data(),
                  workspace.data(), order);
    const float error = std::max((out - expected).cwiseAbs().maxCoeff(),
                                 (lse - expected_lse).cwiseAbs().maxCoeff());
    std::printf(
        "TpaKernel, %td tokens in pages of 4, %s order: out, lse within %.1e of reference\n",
        tokens, name_of(order), error);
    ok &= error <= 1e-5f;
  }
  return ok;
}

}  // namespace

int main() {
  const bool layer_ok = whole_layer();
  const bool kernel_ok = bare_kernel();
  if (!layer_ok || !kernel_ok) std::printf("FAILED\n");
  return layer_ok && kernel_ok ? 0 : 1;
}
