// What an engine author compiles with -Wall -Wextra -Wpedantic -Werror: every public header in one
// translation unit, and every operator run (prefill, decode, forward) with every cache storage
// type on both cache storages, so that every kernel template is instantiated and inlined into
// this file's functions (where GCC's flow-based warnings are reported). Exits 0 when each
// operator's outputs are finite and its paged cache gives the contiguous cache's outputs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tpattn/io/npy.hpp>
#include <tpattn/io/npy_header.hpp>
#include <tpattn/tpattn.hpp>
#include <vector>

using tpattn::Index;
using tpattn::RowMatrix;

namespace {

// d_model 96 and head widths of 40 and 24: whole registers and a partial one at each row end.
constexpr Index kModel = 96, kPrompt = 37, kSteps = 3;

RowMatrix weight(Index rows, Index cols) {
  return RowMatrix::Random(rows, cols) / std::sqrt(static_cast<float>(cols));
}

// Two sequences: prompts of kPrompt and kPrompt - 12 tokens (the first on two threads), kSteps
// batched decode steps, then one forward step mixing a decode token and a 2-token chunk.
// Returns the forward step's outputs [3, d_model].
template <class Operator>
RowMatrix run(Operator& op, tpattn::KvCache& cache, tpattn::Executor& pool, const RowMatrix& x) {
  const tpattn::SequenceId seqs[2] = {cache.add_sequence(), cache.add_sequence()};
  RowMatrix y(kPrompt, kModel);
  op.prefill(cache, seqs[0], kPrompt, x.data(), y.data(), &pool);
  op.prefill(cache, seqs[1], kPrompt - 12, x.data(), y.data());
  op.reserve(/*max_batch=*/2, /*max_tokens=*/3, /*threads=*/2);
  for (Index step = 0; step < kSteps; ++step)
    op.decode(cache, seqs, 2, x.row(kPrompt + 2 * step).data(), y.data(), &pool);
  const Index new_tokens[2] = {1, 2};
  op.forward(cache, seqs, new_tokens, 2, x.data(), y.data(), &pool);
  return y.topRows(3);
}

// Operator<Storage> on a contiguous and on a paged cache: both finite and equal to rounding.
template <class Operator>
bool check(const char* name, const char* storage, Operator& op, tpattn::Executor& pool,
           const RowMatrix& x) {
  tpattn::ContiguousKvCache contiguous(op.cache_record(), /*max_sequences=*/2,
                                       /*max_tokens=*/64);
  tpattn::PagedKvCache paged(op.cache_record(), /*page_tokens=*/16, /*page_count=*/8,
                             /*max_sequences=*/2);
  const RowMatrix a = run(op, contiguous, pool, x);
  const RowMatrix b = run(op, paged, pool, x);
  const float difference = (a - b).cwiseAbs().maxCoeff();
  const bool ok = a.allFinite() && b.allFinite() && difference <= 1e-4f * a.cwiseAbs().maxCoeff();
  std::printf("%-10s %-5s contiguous vs paged: max difference %.1e  %s\n", name, storage,
              static_cast<double>(difference), ok ? "ok" : "FAILED");
  return ok;
}

template <template <class> class Operator, class Config, class Weights>
bool check_storages(const char* name, const Config& config, const Weights& weights,
                    tpattn::Executor& pool, const RowMatrix& x) {
  Operator<float> f32(config, weights);
  Operator<Eigen::bfloat16> bf16(config, weights);
  Operator<Eigen::half> f16(config, weights);
  bool ok = check(name, "f32", f32, pool, x);
  ok &= check(name, "bf16", bf16, pool, x);
  ok &= check(name, "f16", f16, pool, x);
  return ok;
}

tpattn::GqaConfig gqa_config(Index kv_heads) {
  tpattn::GqaConfig config;
  config.d_model = kModel;
  config.heads = 4;
  config.kv_heads = kv_heads;
  config.head_dim = 40;
  return config;
}

tpattn::GqaWeights gqa_weights(Index kv_heads) {
  return {weight(4 * 40, kModel), weight(kv_heads * 40, kModel), weight(kv_heads * 40, kModel),
          weight(kModel, 4 * 40)};
}

// The .npy reader and writer: one array there and back.
bool check_npy(const RowMatrix& x) {
  const std::string path = "tpattn_consumer_warnings.npy";
  tpattn::write_npy(path, {x.rows(), x.cols()}, x.data());
  const tpattn::NpyArray read = tpattn::read_npy(path);
  tpattn::expect_shape(read, {x.rows(), x.cols()}, "x");
  const bool ok = std::equal(read.data.begin(), read.data.end(), x.data());
  std::printf("npy round trip: %s\n", ok ? "ok" : "FAILED");
  return ok;
}

}  // namespace

int main() {
  using namespace tpattn;
  const RowMatrix x = RowMatrix::Random(kPrompt + 2 * kSteps, kModel);
  ThreadPool pool(2);

  MlaConfig mla;
  mla.d_model = kModel;
  mla.heads = 4;
  mla.head_dim = 24;
  mla.rope_dim = 16;
  mla.kv_latent_dim = 40;
  mla.q_latent_dim = 32;
  mla.rope.pairing = RopePairing::interleaved;
  MlaWeights mla_weights;
  mla_weights.w_dq = weight(32, kModel);
  mla_weights.q_norm = Vector::Ones(32);
  mla_weights.w_uq = weight(4 * (24 + 16), 32);
  mla_weights.w_dkv = weight(40 + 16, kModel);
  mla_weights.kv_norm = Vector::Ones(40);
  mla_weights.w_ukv = weight(4 * (24 + 24), 40);
  mla_weights.w_o = weight(kModel, 4 * 24);

  TpaConfig tpa;
  tpa.d_model = kModel;
  tpa.heads = 6;
  tpa.head_dim = 40;
  tpa.rank_q = 3;
  tpa.rank_k = tpa.rank_v = 2;
  tpa.rope.direction = RopeDirection::reversed;
  TpaWeights tpa_weights;
  tpa_weights.w_a_q = weight(6 * 3, kModel);
  tpa_weights.w_b_q = weight(3 * 40, kModel);
  tpa_weights.w_q = weight(6 * 40, kModel);
  tpa_weights.w_a_k = weight(6 * 2, kModel);
  tpa_weights.w_b_k = weight(2 * 40, kModel);
  tpa_weights.w_a_v = weight(6 * 2, kModel);
  tpa_weights.w_b_v = weight(2 * 40, kModel);
  tpa_weights.w_o = weight(kModel, 6 * 40);
  TpaConfig tpa_kv_only = tpa;
  tpa_kv_only.rank_q = 0;

  bool ok = check_storages<MultiHeadAttention>("MHA", gqa_config(4), gqa_weights(4), pool, x);
  ok &= check_storages<GroupedQueryAttention>("GQA", gqa_config(2), gqa_weights(2), pool, x);
  ok &= check_storages<MultiQueryAttention>("MQA", gqa_config(1), gqa_weights(1), pool, x);
  ok &= check_storages<MultiHeadLatentAttention>("MLA", mla, mla_weights, pool, x);
  ok &= check_storages<TensorProductAttention>("TPA", tpa, tpa_weights, pool, x);
  ok &=
      check_storages<TensorProductAttentionKvOnly>("TPA-KVonly", tpa_kv_only, tpa_weights, pool, x);
  ok &= check_npy(x);
  std::printf("tpattn warnings consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
