// bench/support/model_configs.hpp -- the named model configurations the benchmark compares, and
// each operator's cost model (multiply-adds per cached token, weights per layer).
//
// A configuration is a set of operators at one model scale, as the TPA paper compares them:
//   t6-small, t6-medium  the paper's trained models (d_h 64; more heads for TPA at matched
//                        parameters)
//   paper-d128, -d64     the paper's decode comparison: 32 query heads, d_h 128 or 64
//   deepseek-v2-lite     MLA at DeepSeek-V2-Lite's shape
// docs/benchmarks.md lists every shape.
#pragma once

#include <string>
#include <vector>

#include "tpattn/tpattn.hpp"

namespace tpattn_bench {

using tpattn::Index;

enum class Family { gqa, mla, tpa };

// One operator at one shape. GQA family: heads, kv_heads, head_dim, value_dim. MLA: heads,
// head_dim (the non-rotary part, for the score scale), value_dim, kv_latent (d_c), rope_dim
// (d_R). TPA: heads, head_dim, value_dim, rank_q (0 = TPA-KVonly), rank_k, rank_v.
struct OperatorSpec {
  std::string name;
  Family family = Family::gqa;
  Index d_model = 0;
  Index heads = 0;
  Index head_dim = 0;
  Index value_dim = 0;
  Index kv_heads = 0;
  Index kv_latent = 0;
  Index rope_dim = 0;
  Index rank_q = 0;
  Index rank_k = 0;
  Index rank_v = 0;

  tpattn::TpaShape tpa_shape() const {
    return {heads, head_dim, value_dim, rank_q, rank_k, rank_v};
  }

  tpattn::CacheRecord record(tpattn::StorageType storage) const {
    switch (family) {
      case Family::gqa: return tpattn::records::gqa(kv_heads, head_dim, value_dim, storage);
      case Family::mla: return tpattn::records::mla(kv_latent, rope_dim, storage);
      case Family::tpa:
        return tpattn::records::tpa(heads, head_dim, value_dim, rank_k, rank_v, storage);
    }
    return {};
  }

  // Multiply-adds of the bare kernel per (query token, cached token) pair, in the contraction
  // order the kernel runs (docs/attention.md §3 for TPA).
  double macs_per_pair() const {
    const double h = static_cast<double>(heads), dh = static_cast<double>(head_dim);
    const double dv = static_cast<double>(value_dim);
    switch (family) {
      case Family::gqa: return h * (dh + dv);
      case Family::mla: return h * (2.0 * static_cast<double>(kv_latent) + rope_dim);
      case Family::tpa: {
        const double rq = static_cast<double>(rank_q), rk = static_cast<double>(rank_k);
        const double rv = static_cast<double>(rank_v);
        const bool factor = tpattn::cheaper_tpa_order(tpa_shape()) == tpattn::TpaOrder::factor;
        const double scores = factor ? rk * (rq * dh + rq * h + h) : rk * (h * dh + h);
        return scores + rv * h * (dv + 1.0);
      }
    }
    return 0.0;
  }

  // Multiply-adds of the bare kernel per query token that do not depend on the cache: TPA in
  // the query order first forms q = A_Q^T B_Q / R_Q.
  double macs_per_query() const {
    if (family != Family::tpa || rank_q == 0) return 0.0;
    const bool factor = tpattn::cheaper_tpa_order(tpa_shape()) == tpattn::TpaOrder::factor;
    return factor ? 0.0 : static_cast<double>(rank_q * heads * head_dim);
  }

  // Floats of the bare kernel's query and output per query token.
  Index query_floats() const {
    switch (family) {
      case Family::gqa: return heads * head_dim;
      case Family::mla: return heads * (kv_latent + rope_dim);
      case Family::tpa: return rank_q == 0 ? heads * head_dim : rank_q * (heads + head_dim);
    }
    return 0;
  }
  Index out_floats() const { return heads * (family == Family::mla ? kv_latent : value_dim); }

  // Weight elements of the whole layer; each is one multiply-add per token (MLA's w_ukv too: its
  // key half absorbs the query, its value half expands the latent output).
  Index weight_elements() const {
    const Index d = d_model, h = heads;
    switch (family) {
      case Family::gqa:
        return d * (h * head_dim + kv_heads * (head_dim + value_dim)) + h * value_dim * d;
      case Family::mla:
        return d * h * (head_dim + rope_dim) + d * (kv_latent + rope_dim) +
               kv_latent * h * (head_dim + value_dim) + h * value_dim * d;
      case Family::tpa: {
        const Index query = rank_q == 0 ? h * head_dim : rank_q * (h + head_dim);
        return d * (query + rank_k * (h + head_dim) + rank_v * (h + value_dim)) + h * value_dim * d;
      }
    }
    return 0;
  }
};

struct ModelConfig {
  std::string name;
  std::string description;
  std::vector<OperatorSpec> operators;
};

namespace detail {
inline OperatorSpec gqa(std::string name, Index d_model, Index heads, Index kv_heads, Index dh) {
  OperatorSpec s;
  s.name = std::move(name);
  s.family = Family::gqa;
  s.d_model = d_model;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = dh;
  s.value_dim = dh;
  return s;
}
inline OperatorSpec mla(Index d_model, Index heads, Index dh, Index kv_latent, Index rope_dim) {
  OperatorSpec s;
  s.name = "MLA";
  s.family = Family::mla;
  s.d_model = d_model;
  s.heads = heads;
  s.head_dim = dh;
  s.value_dim = dh;
  s.kv_latent = kv_latent;
  s.rope_dim = rope_dim;
  return s;
}
inline OperatorSpec tpa(std::string name, Index d_model, Index heads, Index dh, Index rank_q,
                        Index rank_k, Index rank_v) {
  OperatorSpec s;
  s.name = std::move(name);
  s.family = Family::tpa;
  s.d_model = d_model;
  s.heads = heads;
  s.head_dim = dh;
  s.value_dim = dh;
  s.rank_q = rank_q;
  s.rank_k = rank_k;
  s.rank_v = rank_v;
  return s;
}

// The TPA paper's decode comparison at 32 query heads and head dim dh.
inline ModelConfig paper(Index dh) {
  const Index d = 32 * dh;
  return {"paper-d" + std::to_string(dh),
          "TPA paper decode comparison: 32 query heads, d_h " + std::to_string(dh) + ", d_model " +
              std::to_string(d),
          {gqa("MHA", d, 32, 32, dh), gqa("GQA-8", d, 32, 8, dh), gqa("GQA-4", d, 32, 4, dh),
           gqa("MQA", d, 32, 1, dh), mla(d, 32, dh, 512, 64),
           tpa("TPA-16-1-1", d, 32, dh, 16, 1, 1), tpa("TPA-8-2-2", d, 32, dh, 8, 2, 2)}};
}
}  // namespace detail

inline const std::vector<ModelConfig>& model_configs() {
  using namespace detail;
  static const std::vector<ModelConfig> configs = {
      {"t6-small",
       "TPA paper small models: d_model 768, d_h 64",
       {gqa("MHA", 768, 12, 12, 64), gqa("GQA", 768, 12, 2, 64), gqa("MQA", 768, 12, 1, 64),
        mla(768, 12, 64, 256, 32), tpa("TPA", 768, 34, 64, 6, 2, 2),
        tpa("TPA-KVonly", 768, 34, 64, 0, 2, 2)}},
      {"t6-medium",
       "TPA paper medium models: d_model 1024, d_h 64",
       {gqa("MHA", 1024, 16, 16, 64), gqa("GQA", 1024, 30, 2, 64), gqa("MQA", 1024, 31, 1, 64),
        mla(1024, 23, 64, 512, 32), tpa("TPA", 1024, 47, 64, 6, 2, 2),
        tpa("TPA-KVonly", 1024, 29, 64, 0, 2, 2)}},
      paper(128),
      paper(64),
      {"deepseek-v2-lite",
       "DeepSeek-V2-Lite attention: d_model 2048, 16 heads, d_c 512, d_R 64, nope 128, v 128",
       {mla(2048, 16, 128, 512, 64)}},
  };
  return configs;
}

}  // namespace tpattn_bench
