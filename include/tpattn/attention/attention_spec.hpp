// tpattn/attention/attention_spec.hpp -- which operator to build, chosen at run time, and the
// factory that builds it.
//
// An AttentionSpec names the family, the cache storage type and holds the family's config:
//   mha, mqa, gqa -> GqaConfig  (mha: kv_heads 0 or = heads; mqa: 0 or 1)
//   mla           -> MlaConfig
//   tpa           -> TpaConfig  (rank_q >= 1)
//   tpa_kvonly    -> TpaConfig  (rank_q = 0)
// make_attention(spec, weights) builds the class the family names (MultiHeadAttention,
// GroupedQueryAttention, ..., TensorProductAttentionKvOnly) over float, Eigen::bfloat16 or
// Eigen::half, and returns it as an AnyAttention (attention/any_attention.hpp).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <variant>

#include "tpattn/attention/any_attention.hpp"
#include "tpattn/attention/attention_family.hpp"
#include "tpattn/attention/gqa.hpp"
#include "tpattn/attention/mla.hpp"
#include "tpattn/attention/tpa.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {

using AttentionConfig = std::variant<GqaConfig, MlaConfig, TpaConfig>;
using AttentionWeights = std::variant<GqaWeights, MlaWeights, TpaWeights>;

struct AttentionSpec {
  AttentionFamily family = AttentionFamily::gqa;
  StorageType storage = StorageType::f32;  // of the cache; compute is fp32
  AttentionConfig config;                  // the family's config (see the table above)
};

namespace detail {

// The config and weights alternative each family takes: 0 GQA, 1 MLA, 2 TPA.
inline std::size_t alternative_of(AttentionFamily family) {
  switch (family) {
    case AttentionFamily::mha:
    case AttentionFamily::mqa:
    case AttentionFamily::gqa: return 0;
    case AttentionFamily::mla: return 1;
    case AttentionFamily::tpa:
    case AttentionFamily::tpa_kvonly: return 2;
  }
  return 0;
}

inline const char* config_name(std::size_t alternative) {
  static const char* const names[] = {"a GqaConfig", "an MlaConfig", "a TpaConfig"};
  return names[alternative];
}

inline const char* weights_name(std::size_t alternative) {
  static const char* const names[] = {"GqaWeights", "MlaWeights", "TpaWeights"};
  return names[alternative];
}

// The layer is built first, so its constructor runs every check before anything is allocated,
// and then moved into the AttentionOf.
template <template <class> class Layer, class Storage, class Config, class Weights>
std::unique_ptr<AnyAttention> make_layer(const AttentionConfig& config, AttentionWeights& weights) {
  Layer<Storage> layer(std::get<Config>(config), std::get<Weights>(std::move(weights)));
  return std::make_unique<AttentionOf<Layer<Storage>>>(std::move(layer));
}

template <class Storage>
std::unique_ptr<AnyAttention> make_attention_as(const AttentionSpec& spec,
                                                AttentionWeights& weights) {
  switch (spec.family) {
    case AttentionFamily::mha:
      return make_layer<MultiHeadAttention, Storage, GqaConfig, GqaWeights>(spec.config, weights);
    case AttentionFamily::mqa:
      return make_layer<MultiQueryAttention, Storage, GqaConfig, GqaWeights>(spec.config, weights);
    case AttentionFamily::gqa:
      return make_layer<GroupedQueryAttention, Storage, GqaConfig, GqaWeights>(spec.config,
                                                                               weights);
    case AttentionFamily::mla:
      return make_layer<MultiHeadLatentAttention, Storage, MlaConfig, MlaWeights>(spec.config,
                                                                                  weights);
    case AttentionFamily::tpa:
      return make_layer<TensorProductAttention, Storage, TpaConfig, TpaWeights>(spec.config,
                                                                                weights);
    case AttentionFamily::tpa_kvonly:
      return make_layer<TensorProductAttentionKvOnly, Storage, TpaConfig, TpaWeights>(spec.config,
                                                                                      weights);
  }
  return nullptr;  // unreachable: make_attention checked the family
}

}  // namespace detail

// The operator `spec` names, owning `weights` (moved in: pass std::move(w) to avoid a copy).
// weights: GqaWeights for mha, mqa, gqa; MlaWeights for mla; TpaWeights for tpa, tpa_kvonly, in
// the layouts of docs/operators.md. Errors (tpattn::Error, call make_attention): spec.family or
// spec.storage not one of its values; spec.config or weights of another family's type; family
// tpa with rank_q = 0. Then every check of the layer's constructor, under the layer's name
// (e.g. MultiHeadAttention: kv_heads other than 0 or heads). Nothing is allocated before the
// checks pass.
inline std::unique_ptr<AnyAttention> make_attention(const AttentionSpec& spec,
                                                    AttentionWeights weights) {
  const char* call = "make_attention";
  bool known_family = false;
  for (AttentionFamily family : kAllAttentionFamilies) known_family |= spec.family == family;
  TPATTN_CHECK(known_family, call, "spec.family", "one of mha, mqa, gqa, mla, tpa, tpa_kvonly",
               static_cast<int>(spec.family));
  TPATTN_CHECK(spec.storage == StorageType::f32 || spec.storage == StorageType::bf16 ||
                   spec.storage == StorageType::f16,
               call, "spec.storage", "f32, bf16 or f16", static_cast<int>(spec.storage));
  const std::size_t expected = detail::alternative_of(spec.family);
  TPATTN_CHECK(
      spec.config.index() == expected, call, "spec.config",
      std::string(detail::config_name(expected)) + " (family " + name_of(spec.family) + ")",
      detail::config_name(spec.config.index()));
  TPATTN_CHECK(
      weights.index() == expected, call, "weights",
      std::string(detail::weights_name(expected)) + " (family " + name_of(spec.family) + ")",
      detail::weights_name(weights.index()));
  if (spec.family == AttentionFamily::tpa)
    TPATTN_CHECK(std::get<TpaConfig>(spec.config).rank_q >= 1, call, "spec.config.rank_q",
                 ">= 1 for family tpa (rank_q = 0 is family tpa_kvonly)",
                 std::get<TpaConfig>(spec.config).rank_q);
  switch (spec.storage) {
    case StorageType::bf16: return detail::make_attention_as<Eigen::bfloat16>(spec, weights);
    case StorageType::f16: return detail::make_attention_as<Eigen::half>(spec, weights);
    case StorageType::f32: break;
  }
  return detail::make_attention_as<float>(spec, weights);
}

}  // namespace tpattn
