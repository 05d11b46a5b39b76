// bench/support/operators.hpp -- builds any operator of model_configs.hpp behind one small
// interface, as a bare kernel or as a whole layer with random weights, for one storage type.
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <random>

#include "support/model_configs.hpp"
#include "tpattn/tpattn.hpp"

namespace tpattn_bench {

// The bare kernel's batched run: plan_shape for AttentionPlan::make, then run(plan, views,
// query, out, workspace, executor) for the plan's sequences, one query token each.
struct BareKernel {
  tpattn::PlanShape plan_shape;
  // query: plan.query_tokens() x OperatorSpec::query_floats() floats (TPA: every token's A_Q
  // [R_Q, h] first, then every token's B_Q [R_Q, d_h]); out: plan.query_tokens() x out_floats().
  std::function<void(const tpattn::AttentionPlan&, const tpattn::SequenceView* views,
                     const float* query, float* out, float* workspace, tpattn::Executor*)>
      run;
};

template <class Storage>
BareKernel make_bare_kernel(const OperatorSpec& spec) {
  using tpattn::AttentionPlan, tpattn::Executor, tpattn::SequenceView;
  BareKernel k;
  if (spec.family == Family::gqa) {
    auto kernel = std::make_shared<tpattn::GqaKernel<Storage>>(spec.heads, spec.kv_heads,
                                                               spec.head_dim, spec.value_dim);
    k.plan_shape = kernel->plan_shape();
    k.run = [kernel](const AttentionPlan& plan, const SequenceView* views, const float* q,
                     float* out, float* ws, Executor* executor) {
      kernel->run(plan, views, plan.batch(), q, out, nullptr, ws, executor);
    };
  } else if (spec.family == Family::mla) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(spec.head_dim + spec.rope_dim));
    auto kernel = std::make_shared<tpattn::MlaKernel<Storage>>(spec.heads, spec.kv_latent,
                                                               spec.rope_dim, scale);
    k.plan_shape = kernel->plan_shape();
    k.run = [kernel](const AttentionPlan& plan, const SequenceView* views, const float* q,
                     float* out, float* ws, Executor* executor) {
      kernel->run(plan, views, plan.batch(), q, out, nullptr, ws, executor);
    };
  } else {
    auto kernel = std::make_shared<tpattn::TpaKernel<Storage>>(spec.tpa_shape());
    k.plan_shape = kernel->plan_shape();
    const Index a_q_floats = spec.rank_q * spec.heads;
    if (spec.rank_q == 0) {
      k.run = [kernel](const AttentionPlan& plan, const SequenceView* views, const float* q,
                       float* out, float* ws, Executor* executor) {
        kernel->run(plan, views, plan.batch(), q, out, nullptr, ws, executor);
      };
    } else {
      k.run = [kernel, a_q_floats](const AttentionPlan& plan, const SequenceView* views,
                                   const float* q, float* out, float* ws, Executor* executor) {
        kernel->run(plan, views, plan.batch(), q, q + plan.query_tokens() * a_q_floats, out,
                    nullptr, ws, executor);
      };
    }
  }
  return k;
}

// A whole layer: hidden states in and out, [rows, d_model].
struct Layer {
  std::function<void(tpattn::KvCache&, const tpattn::SequenceId*, tpattn::Index batch,
                     const float* x, float* y, tpattn::Executor*)>
      decode;
  std::function<void(tpattn::KvCache&, tpattn::SequenceId, tpattn::Index n, const float* x,
                     float* y, tpattn::Executor*)>
      prefill;
  std::function<void(tpattn::Index max_batch, tpattn::Index max_tokens, tpattn::Index threads)>
      reserve;
};

namespace detail {
// Uniform weights of variance 1 / in, so activations keep their scale through the layer.
inline tpattn::RowMatrix random_weight(Index rows, Index cols, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const float scale = std::sqrt(3.0f / static_cast<float>(cols));
  tpattn::RowMatrix w(rows, cols);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = scale * uniform(rng);
  return w;
}

template <class Op>
Layer wrap(std::shared_ptr<Op> op) {
  Layer layer;
  layer.decode = [op](tpattn::KvCache& cache, const tpattn::SequenceId* seqs, Index batch,
                      const float* x, float* y, tpattn::Executor* executor) {
    op->decode(cache, seqs, batch, x, y, executor);
  };
  layer.prefill = [op](tpattn::KvCache& cache, tpattn::SequenceId seq, Index n, const float* x,
                       float* y,
                       tpattn::Executor* executor) { op->prefill(cache, seq, n, x, y, executor); };
  layer.reserve = [op](Index max_batch, Index max_tokens, Index threads) {
    op->reserve(max_batch, max_tokens, threads);
  };
  return layer;
}
}  // namespace detail

template <class Storage>
Layer make_layer(const OperatorSpec& spec, std::mt19937& rng) {
  using detail::random_weight;
  const Index d = spec.d_model, h = spec.heads, dh = spec.head_dim, dv = spec.value_dim;
  if (spec.family == Family::gqa) {
    tpattn::GqaConfig config;
    config.d_model = d;
    config.heads = h;
    config.kv_heads = spec.kv_heads;
    config.head_dim = dh;
    config.value_dim = dv;
    tpattn::GqaWeights w;
    w.w_q = random_weight(h * dh, d, rng);
    w.w_k = random_weight(spec.kv_heads * dh, d, rng);
    w.w_v = random_weight(spec.kv_heads * dv, d, rng);
    w.w_o = random_weight(d, h * dv, rng);
    return detail::wrap(
        std::make_shared<tpattn::GroupedQueryAttention<Storage>>(config, std::move(w)));
  }
  if (spec.family == Family::mla) {
    tpattn::MlaConfig config;
    config.d_model = d;
    config.heads = h;
    config.head_dim = dh;
    config.rope_dim = spec.rope_dim;
    config.value_dim = dv;
    config.kv_latent_dim = spec.kv_latent;
    config.q_latent_dim = 0;  // the query straight from x_t, as DeepSeek-V2-Lite
    tpattn::MlaWeights w;
    w.w_uq = random_weight(h * (dh + spec.rope_dim), d, rng);
    w.w_dkv = random_weight(spec.kv_latent + spec.rope_dim, d, rng);
    w.kv_norm = tpattn::Vector::Ones(spec.kv_latent);
    w.w_ukv = random_weight(h * (dh + dv), spec.kv_latent, rng);
    w.w_o = random_weight(d, h * dv, rng);
    return detail::wrap(
        std::make_shared<tpattn::MultiHeadLatentAttention<Storage>>(config, std::move(w)));
  }
  tpattn::TpaConfig config;
  config.d_model = d;
  config.heads = h;
  config.head_dim = dh;
  config.value_dim = dv;
  config.rank_q = spec.rank_q;
  config.rank_k = spec.rank_k;
  config.rank_v = spec.rank_v;
  tpattn::TpaWeights w;
  if (spec.rank_q == 0) {
    w.w_q = random_weight(h * dh, d, rng);
  } else {
    w.w_a_q = random_weight(h * spec.rank_q, d, rng);
    w.w_b_q = random_weight(spec.rank_q * dh, d, rng);
  }
  w.w_a_k = random_weight(h * spec.rank_k, d, rng);
  w.w_b_k = random_weight(spec.rank_k * dh, d, rng);
  w.w_a_v = random_weight(h * spec.rank_v, d, rng);
  w.w_b_v = random_weight(spec.rank_v * dv, d, rng);
  w.w_o = random_weight(d, h * dv, rng);
  if (spec.rank_q == 0)
    return detail::wrap(
        std::make_shared<tpattn::TensorProductAttentionKvOnly<Storage>>(config, std::move(w)));
  return detail::wrap(
      std::make_shared<tpattn::TensorProductAttention<Storage>>(config, std::move(w)));
}

}  // namespace tpattn_bench
