// tpattn/attention/parse_attention_spec.hpp -- an AttentionSpec from a config file's text.
//
// The text is one `key = value` per line; `#` starts a comment; blank lines are skipped:
//   family = tpa          # mha, mqa, gqa, mla, tpa, tpa_kvonly (required)
//   storage = bf16        # f32 (the default), bf16, f16
//   d_model = 768
//   heads = 34
//   head_dim = 64
//   rank_q = 6
//   rank_k = 2
//   rank_v = 2
//   rope.direction = reversed
// The keys are the fields of the family's config (attention/gqa.hpp, mla.hpp, tpa.hpp), RoPE's
// as rope.<field>; docs/operators.md lists each family's keys, which are required and the
// values each takes. Every mistake is a tpattn::Error naming the call and the key (or the line):
// a line without `=`, a key given twice, an unknown key (one the family does not have), a
// missing required key, a value that is not a non-negative integer, a number, true or false, or
// one of an enumeration's names. Ranges (heads >= 1, kv_heads divides heads, ...) are checked
// where they always are: by make_attention and the layer's constructor.
#pragma once

#include <charconv>
#include <map>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "tpattn/attention/attention_family.hpp"
#include "tpattn/attention/attention_spec.hpp"
#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {

// The `key = value` lines of `text` (see above) as a map. Keys and values are trimmed of spaces
// and tabs; a value may contain spaces inside. Errors name `call` and "line <n>" (no `=`, an
// empty key or value) or the key given twice.
inline std::map<std::string, std::string> parse_key_values(std::string_view text,
                                                           const char* call = "parse_key_values") {
  const auto trim = [](std::string_view s) {
    const std::size_t first = s.find_first_not_of(" \t\r");
    if (first == std::string_view::npos) return std::string_view();
    return s.substr(first, s.find_last_not_of(" \t\r") - first + 1);
  };
  std::map<std::string, std::string> values;
  std::map<std::string, Index> line_of;
  Index line = 0;
  while (!text.empty()) {
    ++line;
    const std::size_t end = text.find('\n');
    std::string_view content = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    content = trim(content.substr(0, content.find('#')));
    if (content.empty()) continue;
    const std::size_t equals = content.find('=');
    const std::string_view key =
        equals == std::string_view::npos ? std::string_view() : trim(content.substr(0, equals));
    const std::string_view value =
        equals == std::string_view::npos ? std::string_view() : trim(content.substr(equals + 1));
    TPATTN_CHECK(!key.empty() && !value.empty(), call, ("line " + detail::to_text(line)).c_str(),
                 "key = value", "'" + std::string(content) + "'");
    const auto [at, inserted] = line_of.emplace(std::string(key), line);
    TPATTN_CHECK(inserted, call, at->first.c_str(), "each key once",
                 "lines " + detail::to_text(at->second) + " and " + detail::to_text(line));
    values.emplace(std::string(key), std::string(value));
  }
  return values;
}

namespace detail {

// Reads the values of one family's keys into its config, each check naming `call` and the key.
class SpecValues {
 public:
  SpecValues(const std::map<std::string, std::string>& values, AttentionFamily family,
             const char* call)
      : values_(values), family_(family), call_(call) {}

  // Every key given is one of `keys`.
  void check_known(const std::vector<const char*>& keys) const {
    for (const auto& entry : values_) {
      bool known = false;
      for (const char* key : keys) known |= entry.first == key;
      if (known) continue;
      std::string list;
      for (const char* key : keys) list += (list.empty() ? "" : ", ") + std::string(key);
      fail(call_, entry.first.c_str(),
           std::string("one of the keys of family ") + name_of(family_) + " (" + list + ")",
           "an unknown key");
    }
  }

  void read(const char* key, bool required, Index& out) const {
    const std::string* text = find(key, required);
    if (text == nullptr) return;
    Index value = 0;
    const char* last = text->data() + text->size();
    const std::from_chars_result result = std::from_chars(text->data(), last, value);
    // No sign at all: from_chars would take "-0" as 0.
    TPATTN_CHECK(result.ec == std::errc() && result.ptr == last && (*text)[0] != '-', call_, key,
                 "a non-negative integer (at most 9223372036854775807)", "'" + *text + "'");
    out = value;
  }

  template <class Real>
  void read_number(const char* key, Real& out) const {
    const std::string* text = find(key, false);
    if (text == nullptr) return;
    Real value = 0;
    const char* last = text->data() + text->size();
    const std::from_chars_result result = std::from_chars(text->data(), last, value);
    TPATTN_CHECK(result.ec == std::errc() && result.ptr == last, call_, key,
                 "a number (e.g. 10000 or 1e-6)", "'" + *text + "'");
    out = value;
  }

  void read(const char* key, bool& out) const {
    const std::string* text = find(key, false);
    if (text == nullptr) return;
    TPATTN_CHECK(*text == "true" || *text == "false", call_, key, "true or false",
                 "'" + *text + "'");
    out = *text == "true";
  }

  // One of `names` (in the enumeration's order: value i is names[i]).
  template <class Enum>
  void read_choice(const char* key, const std::vector<const char*>& names, Enum& out) const {
    const std::string* text = find(key, false);
    if (text == nullptr) return;
    std::string list;
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (*text == names[i]) {
        out = static_cast<Enum>(i);
        return;
      }
      list += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + std::string(names[i]);
    }
    fail(call_, key, list, "'" + *text + "'");
  }

  // The value of `key`, or null when it is absent and not required.
  const std::string* find(const char* key, bool required) const {
    const auto it = values_.find(key);
    if (it != values_.end()) return &it->second;
    TPATTN_CHECK(!required, call_, key,
                 std::string("a value (required for family ") + name_of(family_) + ")", "none");
    return nullptr;
  }

  void read_rope(RopeConfig& rope) const {
    read("rope.enabled", rope.enabled);
    read("rope.rotary_dim", false, rope.rotary_dim);
    read_number("rope.base", rope.base);
    read_choice("rope.pairing", {"half_split", "interleaved"}, rope.pairing);
    read_choice("rope.direction", {"standard", "reversed"}, rope.direction);
    read_choice("rope.table", {"fp32", "bf16"}, rope.table);
  }

 private:
  const std::map<std::string, std::string>& values_;
  AttentionFamily family_;
  const char* call_;
};

}  // namespace detail

// The spec the `values` (key -> value, as parse_key_values gives them) describe. Keys of every
// family: family (required), storage, d_model, heads, head_dim (required), value_dim, window,
// rope.enabled, rope.rotary_dim, rope.base, rope.pairing, rope.direction, rope.table; then
//   mha, mqa: kv_heads;  gqa: kv_heads (required);
//   mla: rope_dim, kv_latent_dim (required), q_latent_dim, normalize_q_latent,
//        normalize_kv_latent, norm_eps;
//   tpa: rank_q, rank_k, rank_v (required), order;  tpa_kvonly: rank_q, rank_k, rank_v
//        (rank_k and rank_v required), order.
// An absent optional key keeps its config field's default. Errors name parse_attention_spec.
inline AttentionSpec parse_attention_spec(const std::map<std::string, std::string>& values) {
  const char* call = "parse_attention_spec";
  const auto family_entry = values.find("family");
  TPATTN_CHECK(family_entry != values.end(), call, "family",
               "one of mha, mqa, gqa, mla, tpa, tpa_kvonly", "none");
  AttentionSpec spec;
  spec.family = parse_attention_family(family_entry->second, call, "family");
  const detail::SpecValues read(values, spec.family, call);

  std::vector<const char*> keys = {"family",          "storage",   "d_model",      "heads",
                                   "head_dim",        "value_dim", "window",       "rope.enabled",
                                   "rope.rotary_dim", "rope.base", "rope.pairing", "rope.direction",
                                   "rope.table"};
  switch (spec.family) {
    case AttentionFamily::mha:
    case AttentionFamily::mqa:
    case AttentionFamily::gqa: keys.push_back("kv_heads"); break;
    case AttentionFamily::mla:
      keys.insert(keys.end(), {"rope_dim", "kv_latent_dim", "q_latent_dim", "normalize_q_latent",
                               "normalize_kv_latent", "norm_eps"});
      break;
    case AttentionFamily::tpa:
    case AttentionFamily::tpa_kvonly:
      keys.insert(keys.end(), {"rank_q", "rank_k", "rank_v", "order"});
      break;
  }
  read.check_known(keys);
  if (const std::string* storage = read.find("storage", false))
    spec.storage = parse_storage_type(*storage, call, "storage");

  // The fields every config has, in the order of docs/operators.md.
  const auto read_common = [&](auto& config) {
    read.read("d_model", true, config.d_model);
    read.read("heads", true, config.heads);
    read.read("head_dim", true, config.head_dim);
    read.read("value_dim", false, config.value_dim);
    read.read("window", false, config.window);
    read.read_rope(config.rope);
  };
  switch (spec.family) {
    case AttentionFamily::mha:
    case AttentionFamily::mqa:
    case AttentionFamily::gqa: {
      GqaConfig config;
      read_common(config);
      read.read("kv_heads", spec.family == AttentionFamily::gqa, config.kv_heads);
      spec.config = config;
      break;
    }
    case AttentionFamily::mla: {
      MlaConfig config;
      read_common(config);
      read.read("rope_dim", true, config.rope_dim);
      read.read("kv_latent_dim", true, config.kv_latent_dim);
      read.read("q_latent_dim", false, config.q_latent_dim);
      read.read("normalize_q_latent", config.normalize_q_latent);
      read.read("normalize_kv_latent", config.normalize_kv_latent);
      read.read_number("norm_eps", config.norm_eps);
      spec.config = config;
      break;
    }
    case AttentionFamily::tpa:
    case AttentionFamily::tpa_kvonly: {
      TpaConfig config;
      read_common(config);
      read.read("rank_q", spec.family == AttentionFamily::tpa, config.rank_q);
      read.read("rank_k", true, config.rank_k);
      read.read("rank_v", true, config.rank_v);
      read.read_choice("order", {"automatic", "factor", "query"}, config.order);
      spec.config = config;
      break;
    }
  }
  return spec;
}

// The spec of a config file's text: parse_key_values, then the map's spec, errors naming
// parse_attention_spec.
inline AttentionSpec parse_attention_spec(std::string_view text) {
  return parse_attention_spec(parse_key_values(text, "parse_attention_spec"));
}

}  // namespace tpattn
