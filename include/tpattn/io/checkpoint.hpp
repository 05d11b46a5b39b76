// tpattn/io/checkpoint.hpp -- attention layers of the public TPA code's checkpoints
// (github.com/tensorgi/TPA, model/T6.py, T6_kvonly.py, llama-mha.py, llama-gqa.py, llama-mla.py),
// loaded from a directory of <state-dict key>.npy files (io/npy_directory.hpp).
//
// presets::* give the config of each module with the code's conventions (RoPE half-split,
// rotated the reversed way, a bf16 cos/sin table; MLA's latent RMSNorms with eps 1e-6);
// load_attention(directory, prefix, config) reads the weights of one layer, keys under `prefix`
// (e.g. "transformer.h.3.attn."), into the operator's weight struct, whose layouts are the
// code's own (docs/checkpoints.md). What the operators cannot compute is refused: a subln
// weight (using_groupnorm = True) or any other key under the prefix that no preset reads.
#pragma once

#include <string>
#include <vector>

#include "tpattn/attention/gqa.hpp"
#include "tpattn/attention/mla.hpp"
#include "tpattn/attention/tpa.hpp"
#include "tpattn/core/checked_size.hpp"
#include "tpattn/core/error.hpp"
#include "tpattn/core/matrix.hpp"
#include "tpattn/io/npy_directory.hpp"
#include "tpattn/kernels/rope.hpp"

namespace tpattn {
namespace presets {

// The RoPE of every module of the public code (class Rotary, apply_rotary_emb): features j and
// j + d/2 pair (half-split), y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos (reversed), base 10000,
// the whole head rotated, cos/sin computed in fp32 and rounded to bfloat16.
inline RopeConfig t6_rope() {
  RopeConfig rope;
  rope.pairing = RopePairing::half_split;
  rope.direction = RopeDirection::reversed;
  rope.base = 10000.0;
  rope.rotary_dim = 0;
  rope.table = RopeTable::bf16;
  return rope;
}

// T6.py (TPA): CPLinear with n_head = heads, head_dim, q_rank = R_Q and rank = R_K = R_V;
// d_v = d_h. Shapes: d_model = n_embd.
inline TpaConfig t6(Index d_model, Index heads, Index head_dim, Index q_rank, Index rank) {
  TpaConfig config;
  config.d_model = d_model;
  config.heads = heads;
  config.head_dim = head_dim;
  config.value_dim = head_dim;
  config.rank_q = q_rank;
  config.rank_k = rank;
  config.rank_v = rank;
  config.rope = t6_rope();
  return config;
}

// T6_kvonly.py (TPA-KVonly): a plain query c_q, K and V of CP rank `rank`; d_v = d_h.
inline TpaConfig t6_kvonly(Index d_model, Index heads, Index head_dim, Index rank) {
  return t6(d_model, heads, head_dim, 0, rank);
}

// llama-mha.py: n_head = heads, head_dim = d_model / heads (the module ignores config.head_dim).
// Throws tpattn::Error (call "presets::llama_mha") unless heads >= 1 divides d_model.
inline GqaConfig llama_mha(Index d_model, Index heads) {
  const char* call = "presets::llama_mha";
  TPATTN_CHECK(heads >= 1, call, "heads", ">= 1", heads);
  TPATTN_CHECK(
      d_model % heads == 0, call, "heads",
      "a divisor of d_model = " + detail::to_text(d_model) + " (head_dim = d_model / heads)",
      heads);
  GqaConfig config;
  config.d_model = d_model;
  config.heads = heads;
  config.kv_heads = heads;
  config.head_dim = d_model / heads;
  config.value_dim = config.head_dim;
  config.rope = t6_rope();
  return config;
}

// llama-gqa.py: n_head = heads query heads of head_dim, heads / group_size KV heads, query head
// i reading KV head i / group_size (torch.repeat_interleave). group_size = heads is MQA.
// Throws tpattn::Error (call "presets::llama_gqa") unless group_size >= 1 divides heads.
inline GqaConfig llama_gqa(Index d_model, Index heads, Index head_dim, Index group_size) {
  const char* call = "presets::llama_gqa";
  TPATTN_CHECK(group_size >= 1, call, "group_size", ">= 1", group_size);
  TPATTN_CHECK(heads % group_size == 0 && heads >= group_size, call, "group_size",
               "a divisor of heads = " + detail::to_text(heads), group_size);
  GqaConfig config;
  config.d_model = d_model;
  config.heads = heads;
  config.kv_heads = heads / group_size;
  config.head_dim = head_dim;
  config.value_dim = head_dim;
  config.rope = t6_rope();
  return config;
}

// llama-mla.py: head_dim = qk_nope_head_dim (d_h), rope_dim = qk_rope_head_dim (d_R),
// value_dim = v_head_dim, q_latent_dim = q_lora_rank, kv_latent_dim = kv_lora_rank; both latents
// RMSNorm'd with a gain, eps 1e-6; scale 1 / sqrt(d_h + d_R).
// RoPE is disabled, because that module rotates by no position: it calls its Rotary on tensors
// already transposed to (B, heads, T, d_R), so the query's rotary part of head i is rotated by
// the angle of "position" i, every token alike, and the key's (B, 1, T, d_R) by position 0, not
// at all. load_attention folds the fixed rotation of each head into w_uq, which reproduces the
// module exactly (docs/checkpoints.md).
inline MlaConfig llama_mla(Index d_model, Index heads, Index head_dim, Index rope_dim,
                           Index value_dim, Index q_latent_dim, Index kv_latent_dim) {
  MlaConfig config;
  config.d_model = d_model;
  config.heads = heads;
  config.head_dim = head_dim;
  config.rope_dim = rope_dim;
  config.value_dim = value_dim;
  config.q_latent_dim = q_latent_dim;
  config.kv_latent_dim = kv_latent_dim;
  config.normalize_q_latent = true;
  config.normalize_kv_latent = true;
  config.norm_eps = 1e-6f;
  config.rope = t6_rope();
  config.rope.enabled = false;
  return config;
}

}  // namespace presets

namespace detail {

inline void check_prefix(const char* call, const std::string& prefix) {
  TPATTN_CHECK(prefix.empty() || prefix.back() == '.', call, "prefix",
               "a module path ending in '.' (e.g. 'transformer.h.0.attn.')", "'" + prefix + "'");
}

// Refuses what the operators cannot compute: a subln weight, or any key under `prefix` that is
// not one of `known` (a bias, a module of another variant).
inline void check_only_known_keys(const char* call, const NpyDirectory& directory,
                                  const std::string& prefix,
                                  const std::vector<std::string>& known) {
  const std::string subln = prefix + "subln.weight";
  TPATTN_CHECK(!directory.contains(subln), call, directory.path(subln).c_str(),
               "no subln (using_groupnorm = False): an RMSNorm of each head's output before "
               "c_proj is not supported",
               "a subln weight (using_groupnorm = True)");
  for (const std::string& key : directory.keys_with_prefix(prefix)) {
    bool found = false;
    for (const std::string& name : known) found = found || key == prefix + name;
    std::string names;
    for (const std::string& name : known) names += (names.empty() ? "" : ", ") + name;
    TPATTN_CHECK(found, call, directory.path(key).c_str(),
                 "only the keys this module has under '" + prefix + "' (" + names + ")",
                 "an unexpected key '" + key + "' (an option that is not supported?)");
  }
}

}  // namespace detail

// One T6.py or T6_kvonly.py attention layer (config.rank_q = 0: KV-only), keys under `prefix`:
//   c_qkv.W_A_q.weight (h R_Q, d)  c_qkv.W_B_q.weight (R_Q d_h, d)   T6.py
//   c_qkv.c_q.weight   (h d_h, d)                                    T6_kvonly.py
//   c_qkv.W_A_k.weight (h R_K, d)  c_qkv.W_B_k.weight (R_K d_h, d)
//   c_qkv.W_A_v.weight (h R_V, d)  c_qkv.W_B_v.weight (R_V d_v, d)
//   c_proj.weight      (d, h d_v)
// The A maps are head-major and the B maps rank-major, as TpaWeights takes them.
inline TpaWeights load_attention(const NpyDirectory& directory, const std::string& prefix,
                                 const TpaConfig& config) {
  const char* call = "load_attention(TpaConfig)";
  detail::check_prefix(call, prefix);
  using detail::checked_product;
  const Index d = config.d_model, h = config.heads, dh = config.head_dim;
  const Index dv = config.value_dim == 0 ? dh : config.value_dim;
  const std::string qkv = prefix + "c_qkv.";
  std::vector<std::string> known = {"c_qkv.W_A_k.weight", "c_qkv.W_B_k.weight",
                                    "c_qkv.W_A_v.weight", "c_qkv.W_B_v.weight", "c_proj.weight"};
  TpaWeights w;
  if (config.rank_q == 0) {
    w.w_q = directory.matrix(call, qkv + "c_q.weight", checked_product(call, "h d_h", h, dh), d);
    known.push_back("c_qkv.c_q.weight");
  } else {
    w.w_a_q = directory.matrix(call, qkv + "W_A_q.weight",
                               checked_product(call, "h R_Q", h, config.rank_q), d);
    w.w_b_q = directory.matrix(call, qkv + "W_B_q.weight",
                               checked_product(call, "R_Q d_h", config.rank_q, dh), d);
    known.push_back("c_qkv.W_A_q.weight");
    known.push_back("c_qkv.W_B_q.weight");
  }
  w.w_a_k = directory.matrix(call, qkv + "W_A_k.weight",
                             checked_product(call, "h R_K", h, config.rank_k), d);
  w.w_b_k = directory.matrix(call, qkv + "W_B_k.weight",
                             checked_product(call, "R_K d_h", config.rank_k, dh), d);
  w.w_a_v = directory.matrix(call, qkv + "W_A_v.weight",
                             checked_product(call, "h R_V", h, config.rank_v), d);
  w.w_b_v = directory.matrix(call, qkv + "W_B_v.weight",
                             checked_product(call, "R_V d_v", config.rank_v, dv), d);
  w.w_o =
      directory.matrix(call, prefix + "c_proj.weight", d, checked_product(call, "h d_v", h, dv));
  detail::check_only_known_keys(call, directory, prefix, known);
  return w;
}

// One llama-mha.py or llama-gqa.py attention layer, keys under `prefix`:
//   c_q.weight (h d_h, d)  c_k.weight (g d_h, d)  c_v.weight (g d_v, d)  c_proj.weight (d, h d_v)
// Output rows head-major, as GqaWeights takes them.
inline GqaWeights load_attention(const NpyDirectory& directory, const std::string& prefix,
                                 const GqaConfig& config) {
  const char* call = "load_attention(GqaConfig)";
  detail::check_prefix(call, prefix);
  using detail::checked_product;
  const Index d = config.d_model, h = config.heads, g = config.kv_heads, dh = config.head_dim;
  const Index dv = config.value_dim == 0 ? dh : config.value_dim;
  GqaWeights w;
  w.w_q = directory.matrix(call, prefix + "c_q.weight", checked_product(call, "h d_h", h, dh), d);
  w.w_k = directory.matrix(call, prefix + "c_k.weight", checked_product(call, "g d_h", g, dh), d);
  w.w_v = directory.matrix(call, prefix + "c_v.weight", checked_product(call, "g d_v", g, dv), d);
  w.w_o =
      directory.matrix(call, prefix + "c_proj.weight", d, checked_product(call, "h d_v", h, dv));
  detail::check_only_known_keys(call, directory, prefix,
                                {"c_q.weight", "c_k.weight", "c_v.weight", "c_proj.weight"});
  return w;
}

// One llama-mla.py attention layer, keys under `prefix`:
//   q_a_proj.weight (d'_c, d)              q_a_layernorm.weight (d'_c,)
//   q_b_proj.weight (h (d_h + d_R), d'_c)  head i rows [q_nope (d_h) | q_pe (d_R)]
//   kv_a_proj_with_mqa.weight (d_c + d_R, d)  rows [c (d_c) | k_pe (d_R)]
//   kv_a_layernorm.weight (d_c,)
//   kv_b_proj.weight (h (d_h + d_v), d_c)  head i rows [k_nope (d_h) | v (d_v)]
//   c_proj.weight (d, h d_v)
// The module rotates head i's q_pe by the fixed angle of position i and k_pe not at all (see
// presets::llama_mla); that rotation (config.rope's pairing, direction, base and table) is folded
// into w_uq's q_pe rows, so config.rope must be disabled, q_latent_dim >= 1 and both latents
// normalised, as the preset sets them.
inline MlaWeights load_attention(const NpyDirectory& directory, const std::string& prefix,
                                 const MlaConfig& config) {
  const char* call = "load_attention(MlaConfig)";
  detail::check_prefix(call, prefix);
  TPATTN_CHECK(!config.rope.enabled, call, "config.rope.enabled",
               "false, as presets::llama_mla (llama-mla.py rotates no key by its position)",
               "true");
  TPATTN_CHECK(config.q_latent_dim >= 1 && config.normalize_q_latent && config.normalize_kv_latent,
               call, "config",
               "a compressed, normalised query latent and a normalised KV latent, as "
               "presets::llama_mla",
               "q_latent_dim " + detail::to_text(config.q_latent_dim) + ", normalize_q_latent " +
                   detail::to_text(config.normalize_q_latent) + ", normalize_kv_latent " +
                   detail::to_text(config.normalize_kv_latent));
  TPATTN_CHECK(config.rope_dim >= 2 && config.rope_dim % 2 == 0, call, "config.rope_dim",
               "an even number >= 2 (qk_rope_head_dim)", config.rope_dim);
  using detail::checked_product;
  using detail::checked_sum;
  const Index d = config.d_model, h = config.heads, dh = config.head_dim, dr = config.rope_dim;
  const Index dv = config.value_dim == 0 ? dh : config.value_dim;
  const Index dq = config.q_latent_dim, dc = config.kv_latent_dim;
  MlaWeights w;
  w.w_dq = directory.matrix(call, prefix + "q_a_proj.weight", dq, d);
  w.q_norm = directory.vector(call, prefix + "q_a_layernorm.weight", dq);
  w.w_uq = directory.matrix(
      call, prefix + "q_b_proj.weight",
      checked_product(call, "h (d_h + d_R)", h, checked_sum(call, "d_h + d_R", dh, dr)), dq);
  w.w_dkv = directory.matrix(call, prefix + "kv_a_proj_with_mqa.weight",
                             checked_sum(call, "d_c + d_R", dc, dr), d);
  w.kv_norm = directory.vector(call, prefix + "kv_a_layernorm.weight", dc);
  w.w_ukv = directory.matrix(
      call, prefix + "kv_b_proj.weight",
      checked_product(call, "h (d_h + d_v)", h, checked_sum(call, "d_h + d_v", dh, dv)), dc);
  w.w_o =
      directory.matrix(call, prefix + "c_proj.weight", d, checked_product(call, "h d_v", h, dv));
  detail::check_only_known_keys(
      call, directory, prefix,
      {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
       "kv_a_layernorm.weight", "kv_b_proj.weight", "c_proj.weight"});

  // q_pe of head i <- the preset's rotation at "position" i, folded into its rows: rotating
  // every column of those rows rotates their output.
  const Rope rope(
      [&] {
        RopeConfig enabled = config.rope;
        enabled.enabled = true;
        return enabled;
      }(),
      dr, call);
  RowMatrix columns(dq, dr);
  for (Index i = 0; i < h; ++i) {
    auto rows = w.w_uq.middleRows(i * (dh + dr) + dh, dr);
    columns = rows.transpose();
    rope.apply(columns.data(), dq, dr, i);
    rows = columns.transpose();
  }
  return w;
}

}  // namespace tpattn
