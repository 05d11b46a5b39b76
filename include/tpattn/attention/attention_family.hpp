// tpattn/attention/attention_family.hpp -- the attention mechanisms, named as a config file
// names them.
//
// MHA and MQA are GQA with g = h and g = 1 (attention/gqa.hpp); TPA-KVonly is TPA with an
// unfactorised query (attention/tpa.hpp). Each family has one spelling: its enumerator's name.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>

#include "tpattn/core/error.hpp"

namespace tpattn {

enum class AttentionFamily : std::uint8_t { mha, mqa, gqa, mla, tpa, tpa_kvonly };

inline constexpr AttentionFamily kAllAttentionFamilies[] = {
    AttentionFamily::mha, AttentionFamily::mqa, AttentionFamily::gqa,
    AttentionFamily::mla, AttentionFamily::tpa, AttentionFamily::tpa_kvonly};

// "mha", "mqa", "gqa", "mla", "tpa", "tpa_kvonly".
inline const char* name_of(AttentionFamily family) {
  switch (family) {
    case AttentionFamily::mha: return "mha";
    case AttentionFamily::mqa: return "mqa";
    case AttentionFamily::gqa: return "gqa";
    case AttentionFamily::mla: return "mla";
    case AttentionFamily::tpa: return "tpa";
    case AttentionFamily::tpa_kvonly: return "tpa_kvonly";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& out, AttentionFamily family) {
  return out << name_of(family);
}

// The family spelled exactly as name_of() gives it (lower case, no spaces); anything else is an
// Error naming `call` and `argument`.
inline AttentionFamily parse_attention_family(std::string_view text,
                                              const char* call = "parse_attention_family",
                                              const char* argument = "family") {
  for (AttentionFamily family : kAllAttentionFamilies)
    if (text == name_of(family)) return family;
  detail::fail(call, argument, "one of mha, mqa, gqa, mla, tpa, tpa_kvonly",
               "'" + std::string(text) + "'");
}

}  // namespace tpattn
