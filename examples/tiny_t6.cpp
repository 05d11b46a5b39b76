// examples/tiny_t6.cpp -- a whole decoder-only LM (the public TPA code's GPT: T6.py and its
// llama-* baselines) on tpattn layers: load a checkpoint, run a prompt, generate greedily.
//
// With --checkpoint DIR (one <state-dict key>.npy per entry) and --family, it loads the model
// (dimensions from the flags, checked against every tensor's shape), runs the prompt, optionally
// writes the logits of every prompt position to a .npy (float32, [T, vocab]), generates
// --generate tokens greedily and prints them, decode tokens/s and the cache's bytes.
// Without --checkpoint it builds the five families at a small shape (d_model 128, 2 layers,
// vocab 256) from random weights, each with the head count that brings its attention nearest to
// MHA's parameter count (more heads for TPA, as the paper does), and prints them side by side.
// --save-random DIR writes a random model of --family in that layout, to try --checkpoint on.
// Run with --help for the flags. Exit status: 0, or 2 for a bad command line or checkpoint.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "tiny_gpt.hpp"

using tpattn::Index;

namespace {

struct Options {
  std::string checkpoint, family, prompt_npy, logits_out, save_random;
  std::vector<std::int64_t> prompt;
  // T6.py's GPTConfig defaults; llama-mla.py's for the MLA shape.
  std::map<std::string, Index> sizes = {
      {"--vocab", 50304}, {"--layers", 12},     {"--d-model", 768},     {"--heads", 22},
      {"--head-dim", 64}, {"--q-rank", 6},      {"--rank", 2},          {"--group-size", 1},
      {"--rope-dim", 32}, {"--v-head-dim", 64}, {"--q-lora-rank", 512}, {"--kv-lora-rank", 256},
      {"--generate", 16},
  };
  Index size(const std::string& flag) const { return sizes.at(flag); }
};

const char* const kSizeHelp[][2] = {
    {"--vocab", "vocab_size"},
    {"--layers", "n_layer"},
    {"--d-model", "n_embd"},
    {"--heads", "n_head"},
    {"--head-dim", "head_dim (mha: n_embd / n_head, this flag unused); mla: qk_nope_head_dim"},
    {"--q-rank", "t6: q_rank"},
    {"--rank", "t6, t6-kvonly: rank (of K and V)"},
    {"--group-size", "gqa: group_size (KV heads = n_head / group_size)"},
    {"--rope-dim", "mla: qk_rope_head_dim"},
    {"--v-head-dim", "mla: v_head_dim"},
    {"--q-lora-rank", "mla: q_lora_rank"},
    {"--kv-lora-rank", "mla: kv_lora_rank"},
    {"--generate", "tokens to generate greedily"},
};

struct UsageError {
  std::string message;
};

void print_help() {
  const Options defaults;
  std::printf(
      "tiny_t6: the public TPA code's GPT (T6.py, T6_kvonly.py, llama-mha/gqa/mla.py) on tpattn\n"
      "layers. With --checkpoint: load it, run the prompt, generate greedily. Without: the five\n"
      "families side by side at a small shape, random weights, matched parameter count.\n\n"
      "usage: tiny_t6 [--flag value | --flag=value]...\n\n");
  std::printf("  %-16s %-8s %s\n", "--checkpoint", "", "directory of <state-dict key>.npy files");
  std::printf("  %-16s %-8s %s\n", "--family", "", "t6, t6-kvonly, mha, gqa or mla");
  for (const auto& flag : kSizeHelp)
    std::printf("  %-16s %-8td %s\n", flag[0], defaults.size(flag[0]), flag[1]);
  std::printf("  %-16s %-8s %s\n", "--prompt", "1,2,3", "token ids, comma-separated");
  std::printf("  %-16s %-8s %s\n", "--prompt-npy", "", "token ids from an int64 .npy (1-D)");
  std::printf("  %-16s %-8s %s\n", "--logits-out", "", "write the prompt's logits, [T, vocab]");
  std::printf("  %-16s %-8s %s\n", "--save-random", "",
              "write a random --family model there as a checkpoint");
  std::printf("  %-16s %-8s %s\n\n", "--help", "", "this text");
  std::printf("Sizes are integers >= 1. Exit status 2 on a bad command line or checkpoint.\n");
}

Index parse_size(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  const bool digits = !text.empty() && text[0] >= '0' && text[0] <= '9' && *end == '\0';
  if (!digits || errno == ERANGE || value < 1 || value > (1LL << 40))
    throw UsageError{flag + ": expected a positive integer, got '" + text + "'"};
  return static_cast<Index>(value);
}

std::vector<std::int64_t> parse_prompt(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, comma - start);
    char* end = nullptr;
    errno = 0;
    const long long value = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || item[0] < '0' || item[0] > '9' || *end != '\0' || errno == ERANGE)
      throw UsageError{"--prompt: expected token ids like 1,2,3, got '" + text + "'"};
    ids.push_back(value);
    start = comma + 1;
  }
  return ids;
}

Options parse(int argc, char** argv, bool* help) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    const std::size_t equals = flag.find('=');
    const bool inline_value = equals != std::string::npos;
    if (inline_value) {
      value = flag.substr(equals + 1);
      flag = flag.substr(0, equals);
    }
    if (flag == "--help" || flag == "-h") {
      *help = true;
      return o;
    }
    const bool known = o.sizes.count(flag) == 1 || flag == "--checkpoint" || flag == "--family" ||
                       flag == "--prompt" || flag == "--prompt-npy" || flag == "--logits-out" ||
                       flag == "--save-random";
    if (!known) throw UsageError{"unknown flag '" + flag + "'"};
    if (!inline_value) {
      if (i + 1 >= argc) throw UsageError{flag + " needs a value"};
      value = argv[++i];
    }
    if (o.sizes.count(flag) == 1) {
      o.sizes[flag] = parse_size(flag, value);
    } else if (flag == "--checkpoint") {
      o.checkpoint = value;
    } else if (flag == "--family") {
      if (value != "t6" && value != "t6-kvonly" && value != "mha" && value != "gqa" &&
          value != "mla")
        throw UsageError{"--family: expected t6, t6-kvonly, mha, gqa or mla, got '" + value + "'"};
      o.family = value;
    } else if (flag == "--prompt") {
      o.prompt = parse_prompt(value);
    } else if (flag == "--prompt-npy") {
      o.prompt_npy = value;
    } else if (flag == "--save-random") {
      o.save_random = value;
    } else {
      o.logits_out = value;
    }
  }
  if (!o.prompt.empty() && !o.prompt_npy.empty())
    throw UsageError{"--prompt and --prompt-npy: expected one of them, got both"};
  if (!o.save_random.empty()) {
    if (!o.checkpoint.empty())
      throw UsageError{"--save-random and --checkpoint: expected one of them, got both"};
    if (o.family.empty()) throw UsageError{"--save-random needs --family"};
    return o;
  }
  if (o.checkpoint.empty() && (!o.family.empty() || !o.logits_out.empty()))
    throw UsageError{std::string(o.family.empty() ? "--logits-out" : "--family") +
                     " needs --checkpoint"};
  if (!o.checkpoint.empty() && o.family.empty()) throw UsageError{"--checkpoint needs --family"};
  if (!o.prompt_npy.empty()) {
    const tpattn::NpyInt64Array ids = tpattn::read_npy_int64(o.prompt_npy);
    if (ids.shape.size() != 1 || ids.data.empty())
      throw UsageError{"--prompt-npy: expected a 1-D array of token ids, got shape " +
                       tpattn::detail::npy_shape_text(ids.shape)};
    o.prompt = ids.data;
  }
  return o;
}

struct Run {
  std::vector<std::int64_t> generated;
  double prefill_seconds = 0, decode_seconds = 0;
  Index decode_steps = 0, cache_bytes = 0, cache_bytes_per_token = 0;
};

Index argmax(const float* row, Index count) {
  return static_cast<Index>(std::max_element(row, row + count) - row);
}

// The prompt, then `generate` tokens greedily (the first from the prompt's last logits).
template <class Attention>
Run run(tiny_gpt::Gpt<Attention>& model, const std::vector<std::int64_t>& prompt, Index generate,
        const std::string& logits_out) {
  using Clock = std::chrono::steady_clock;
  const auto n = static_cast<Index>(prompt.size());
  tpattn::ContiguousKvCache cache(model.model_record(), 1, n + generate);
  const tpattn::SequenceId seq = cache.add_sequence();
  tpattn::RowMatrix logits(n, model.vocab());
  Run r;
  const auto start = Clock::now();
  model.forward(cache, seq, prompt.data(), n, logits.data());
  r.prefill_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!logits_out.empty()) tpattn::write_npy(logits_out, {n, model.vocab()}, logits.data());
  std::int64_t next = argmax(logits.row(n - 1).data(), model.vocab());
  tpattn::RowMatrix step(1, model.vocab());
  const auto decode_start = Clock::now();
  for (Index i = 0; i < generate; ++i) {
    r.generated.push_back(next);
    if (i + 1 == generate) break;
    model.forward(cache, seq, &next, 1, step.data());
    ++r.decode_steps;
    next = argmax(step.data(), model.vocab());
  }
  r.decode_seconds = std::chrono::duration<double>(Clock::now() - decode_start).count();
  r.cache_bytes = cache.bytes_used();
  r.cache_bytes_per_token = cache.bytes_per_token();
  return r;
}

std::string joined(const std::vector<std::int64_t>& ids) {
  std::string text;
  for (const std::int64_t id : ids) text += (text.empty() ? "" : ",") + std::to_string(id);
  return text;
}

double tokens_per_second(const Run& r) {
  return r.decode_seconds > 0 ? static_cast<double>(r.decode_steps) / r.decode_seconds : 0.0;
}

template <class Attention>
struct Family {};
template <class T>
struct TypeOf;
template <class Attention>
struct TypeOf<Family<Attention>> {
  using type = Attention;
};

// Calls f(Family<Attention>{}, config) with the layer class and preset of --family.
template <class F>
int with_family(const Options& o, F f) {
  const Index d = o.size("--d-model"), h = o.size("--heads"), dh = o.size("--head-dim");
  namespace presets = tpattn::presets;
  if (o.family == "t6")
    return f(Family<tpattn::TensorProductAttention<float>>{},
             presets::t6(d, h, dh, o.size("--q-rank"), o.size("--rank")));
  if (o.family == "t6-kvonly")
    return f(Family<tpattn::TensorProductAttentionKvOnly<float>>{},
             presets::t6_kvonly(d, h, dh, o.size("--rank")));
  if (o.family == "mha")
    return f(Family<tpattn::MultiHeadAttention<float>>{}, presets::llama_mha(d, h));
  if (o.family == "gqa")
    return f(Family<tpattn::GroupedQueryAttention<float>>{},
             presets::llama_gqa(d, h, dh, o.size("--group-size")));
  return f(Family<tpattn::MultiHeadLatentAttention<float>>{},
           presets::llama_mla(d, h, dh, o.size("--rope-dim"), o.size("--v-head-dim"),
                              o.size("--q-lora-rank"), o.size("--kv-lora-rank")));
}

int load_and_run(const Options& o) {
  return with_family(o, [&](auto family, const auto& config) {
    using Attention = typename TypeOf<decltype(family)>::type;
    const tpattn::NpyDirectory directory(o.checkpoint);
    auto model =
        tiny_gpt::Gpt<Attention>::load(directory, o.size("--vocab"), o.size("--layers"), config);
    std::vector<std::int64_t> prompt = o.prompt;
    if (prompt.empty()) prompt = {0};
    const Run r = run(model, prompt, o.size("--generate"), o.logits_out);
    std::printf("%s: %td layers, d_model %td, vocab %td, %td parameters\n", o.family.c_str(),
                model.layer_count(), model.d_model(), model.vocab(), model.parameter_count());
    std::printf("prompt (%zu tokens): %s\n", prompt.size(), joined(prompt).c_str());
    if (!o.logits_out.empty())
      std::printf("logits [%zu, %td] written to %s\n", prompt.size(), model.vocab(),
                  o.logits_out.c_str());
    std::printf("generated: %s\n", joined(r.generated).c_str());
    std::printf("prefill %.3f ms, decode %.1f tokens/s, cache %td bytes (%td per token)\n",
                r.prefill_seconds * 1e3, tokens_per_second(r), r.cache_bytes,
                r.cache_bytes_per_token);
    return 0;
  });
}

int save_random(const Options& o) {
  return with_family(o, [&](auto family, const auto& config) {
    using Attention = typename TypeOf<decltype(family)>::type;
    const auto model =
        tiny_gpt::Gpt<Attention>::random(o.size("--vocab"), o.size("--layers"), config, 7);
    model.save(o.save_random);
    std::printf("wrote a random %s model (%td parameters) to %s\n", o.family.c_str(),
                model.parameter_count(), o.save_random.c_str());
    return 0;
  });
}

// The five families at one small shape, random weights, side by side.
constexpr Index kVocab = 256, kLayers = 2, kModel = 128, kHeadDim = 32;

template <class Attention, class MakeConfig>
void compare_row(const char* name, const std::vector<std::int64_t>& prompt, Index generate,
                 Index target, Index head_step, MakeConfig make_config) {
  // The head count whose attention parameters come nearest to target (MHA's).
  std::mt19937 random(1);
  Index heads = head_step, best = -1;
  for (Index h = head_step; h <= 64; h += head_step) {
    const Index error = std::abs(
        tiny_gpt::parameter_count(tiny_gpt::random_weights(make_config(h), random)) - target);
    if (best < 0 || error < best) best = error, heads = h;
  }
  const auto config = make_config(heads);
  auto model = tiny_gpt::Gpt<Attention>::random(kVocab, kLayers, config, 7);
  const Run r = run(model, prompt, generate, "");
  const Index attention = tiny_gpt::parameter_count(tiny_gpt::random_weights(config, random));
  std::printf("%-11s %5td %11td %10td %12td %11.3f %12.0f\n", name, heads, model.parameter_count(),
              attention, r.cache_bytes_per_token, r.prefill_seconds * 1e3, tokens_per_second(r));
}

int compare(const Options& o) {
  std::vector<std::int64_t> prompt = o.prompt;
  if (prompt.empty())
    for (std::int64_t t = 0; t < 16; ++t) prompt.push_back((t * 37 + 11) % kVocab);
  for (const std::int64_t id : prompt)
    if (id < 0 || id >= kVocab)
      throw UsageError{"--prompt: expected ids in [0, 256) for the comparison, got " +
                       std::to_string(id)};
  const Index generate = std::min<Index>(o.size("--generate"), 256);
  namespace presets = tpattn::presets;
  const Index target = 4 * kModel * kModel;  // MHA, 4 heads of 32: q, k, v, o
  std::printf(
      "GPT of the public TPA code, d_model %td, %td layers, vocab %td, head_dim %td, random\n"
      "weights, fp32 cache; attention parameters per layer matched to MHA's %td; prompt %zu "
      "tokens, %td generated\n",
      kModel, kLayers, kVocab, kHeadDim, target, prompt.size(), generate);
  std::printf("%-11s %5s %11s %10s %12s %11s %12s\n", "family", "heads", "parameters", "attn/layer",
              "cache B/tok", "prefill ms", "decode tok/s");
  compare_row<tpattn::MultiHeadAttention<float>>(
      "MHA", prompt, generate, target, 4, [](Index) { return presets::llama_mha(kModel, 4); });
  compare_row<tpattn::GroupedQueryAttention<float>>(
      "GQA (g 2)", prompt, generate, target, 2,
      [](Index h) { return presets::llama_gqa(kModel, h, kHeadDim, h / 2); });
  compare_row<tpattn::MultiHeadLatentAttention<float>>(
      "MLA", prompt, generate, target, 1,
      [](Index h) { return presets::llama_mla(kModel, h, kHeadDim, 16, kHeadDim, 64, 64); });
  compare_row<tpattn::TensorProductAttention<float>>(
      "TPA 6/2/2", prompt, generate, target, 1,
      [](Index h) { return presets::t6(kModel, h, kHeadDim, 6, 2); });
  compare_row<tpattn::TensorProductAttentionKvOnly<float>>(
      "TPA-KVonly", prompt, generate, target, 1,
      [](Index h) { return presets::t6_kvonly(kModel, h, kHeadDim, 2); });
  std::printf(
      "cache B/tok: bytes per token over all layers; decode tok/s: greedy steps, 1 thread\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    bool help = false;
    const Options options = parse(argc, argv, &help);
    if (help) {
      print_help();
      return 0;
    }
    if (!options.save_random.empty()) return save_random(options);
    return options.checkpoint.empty() ? compare(options) : load_and_run(options);
  } catch (const UsageError& error) {
    std::fprintf(stderr, "tiny_t6: %s (see tiny_t6 --help)\n", error.message.c_str());
  } catch (const tpattn::Error& error) {  // a missing tensor, a shape that does not match
    std::fprintf(stderr, "tiny_t6: %s\n", error.what());
  }
  return 2;
}
