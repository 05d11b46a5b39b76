// examples/memory_planner.cpp -- how much KV cache each operator needs for one model, and how
// long a context or how large a batch fits in a memory budget.
//
// For MHA, MQA, GQA, MLA, TPA and TPA-KVonly at the shapes given on the command line (defaults:
// the TPA paper's 32 heads of 128 dims, 32 layers, bf16 cache), it builds the operator's bare
// kernel and takes its cache_record(), so every byte count is the library's own: bytes per token
// from the record and from a ModelRecord of all layers, and what fits from
// ContiguousKvCache::footprint(), block tables included, as an engine would size its cache.
// Run with --help for the flags. Exit status: 0, or 2 for a bad command line or shape.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tpattn/tpattn.hpp"

using tpattn::Index;

namespace {

struct Options {
  Index hidden = 4096, heads = 32, head_dim = 128, kv_heads = 8, latent = 512, rope_dim = 64;
  Index rank_q = 16, rank_k = 1, rank_v = 1, layers = 32, context = 32768;
  tpattn::StorageType storage = tpattn::StorageType::bf16;
  double budget_gib = 16;
};

// The integer flags, for the parser and for --help alike.
struct IntegerFlag {
  const char* name;
  Index Options::*field;
  const char* help;
};
const IntegerFlag kIntegerFlags[] = {
    {"--hidden", &Options::hidden, "d_model, for the elements / d_model column (not in the cache)"},
    {"--heads", &Options::heads, "query heads h, all operators"},
    {"--head-dim", &Options::head_dim, "d_h (= d_v); MLA: the non-rotary query/key part"},
    {"--kv-heads", &Options::kv_heads, "GQA's KV heads g, a divisor of --heads"},
    {"--latent", &Options::latent, "MLA's cached latent d_c"},
    {"--rope-dim", &Options::rope_dim, "MLA's decoupled RoPE key d_R"},
    {"--rank-q", &Options::rank_q, "TPA's query rank R_Q (TPA-KVonly has none)"},
    {"--rank-k", &Options::rank_k, "TPA's key rank R_K"},
    {"--rank-v", &Options::rank_v, "TPA's value rank R_V"},
    {"--layers", &Options::layers, "layers L, each caching one record"},
    {"--context", &Options::context, "tokens per sequence for the largest-batch column"},
};
constexpr Index kMaxContext = Index{1} << 40;  // keeps tokens x bytes per token inside an Index
constexpr double kMaxBudgetGib = 1 << 30;      // 2^60 bytes

struct UsageError {
  std::string message;
};

void print_help() {
  const Options defaults;
  std::printf(
      "memory_planner: KV-cache bytes per token of MHA, MQA, GQA, MLA, TPA and TPA-KVonly, and\n"
      "what fits in a memory budget (a contiguous cache, block tables included).\n\n"
      "usage: memory_planner [--flag value | --flag=value]...\n\n");
  for (const IntegerFlag& flag : kIntegerFlags)
    std::printf("  %-12s %-8td %s\n", flag.name, defaults.*flag.field, flag.help);
  std::printf("  %-12s %-8s %s\n", "--storage", "bf16", "cache element type: f32, bf16 or f16");
  std::printf("  %-12s %-8g %s\n", "--budget-gib", defaults.budget_gib,
              "memory for the whole model's cache, in GiB (2^30 bytes)");
  std::printf("  %-12s %-8s %s\n\n", "--help", "", "this text");
  std::printf("Integers are >= 1 (--context at most 2^40); exit status 2 on a bad command line.\n");
}

Index parse_integer(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  const bool digits = !text.empty() && text[0] >= '0' && text[0] <= '9' && *end == '\0';
  if (!digits || errno == ERANGE || value < 1)
    throw UsageError{flag + ": expected a positive integer, got '" + text + "'"};
  if (flag == "--context" && value > kMaxContext)
    throw UsageError{flag + ": expected at most 2^40 tokens, got " + text};
  return static_cast<Index>(value);
}

Options parse(int argc, char** argv, bool* help) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    const std::size_t equals = flag.find('=');
    const bool inline_value = equals != std::string::npos;
    if (inline_value) {
      value = flag.substr(equals + 1);
      flag.resize(equals);
    }
    if (flag == "--help") {
      *help = true;
      return options;
    }
    const IntegerFlag* integer = nullptr;
    for (const IntegerFlag& candidate : kIntegerFlags)
      if (flag == candidate.name) integer = &candidate;
    if (!integer && flag != "--storage" && flag != "--budget-gib")
      throw UsageError{"unknown flag '" + flag + "'"};
    if (!inline_value) {
      if (i + 1 == argc) throw UsageError{flag + " needs a value"};
      value = argv[++i];
    }
    if (integer) {
      options.*integer->field = parse_integer(flag, value);
    } else if (flag == "--storage") {
      bool known = false;
      for (const auto type :
           {tpattn::StorageType::f32, tpattn::StorageType::bf16, tpattn::StorageType::f16})
        if (value == tpattn::name_of(type)) {
          options.storage = type;
          known = true;
        }
      if (!known) throw UsageError{flag + ": expected f32, bf16 or f16, got '" + value + "'"};
    } else {
      char* end = nullptr;
      const double gib = value.empty() ? 0 : std::strtod(value.c_str(), &end);
      if (value.empty() || *end != '\0' || !(gib > 0) || gib > kMaxBudgetGib)
        throw UsageError{flag + ": expected a number of GiB in (0, 2^30], got '" + value + "'"};
      options.budget_gib = gib;
    }
  }
  return options;
}

struct Operator {
  std::string name, shape;
  tpattn::CacheRecord record;  // one layer's, from the operator's own kernel
};

// Each operator's bare kernel at these shapes; its constructor checks them (tpattn::Error).
template <class Storage>
std::vector<Operator> operators(const Options& o) {
  using std::to_string;
  const auto gqa = [&](Index g) {
    return tpattn::GqaKernel<Storage>(o.heads, g, o.head_dim, o.head_dim).cache_record();
  };
  const float mla_scale = 1.0f / std::sqrt(static_cast<float>(o.head_dim + o.rope_dim));
  tpattn::TpaShape tpa;  // by name, not by field order
  tpa.heads = o.heads;
  tpa.head_dim = tpa.value_dim = o.head_dim;
  tpa.rank_q = o.rank_q;
  tpa.rank_k = o.rank_k;
  tpa.rank_v = o.rank_v;
  tpattn::TpaShape kv_only = tpa;
  kv_only.rank_q = 0;
  const std::string ranks = to_string(o.rank_k) + "/" + to_string(o.rank_v);
  return {
      {"MHA", "g = h = " + to_string(o.heads), gqa(o.heads)},
      {"MQA", "g = 1", gqa(1)},
      {"GQA", "g = " + to_string(o.kv_heads), gqa(o.kv_heads)},
      {"MLA", "d_c " + to_string(o.latent) + ", d_R " + to_string(o.rope_dim),
       tpattn::MlaKernel<Storage>(o.heads, o.latent, o.rope_dim, mla_scale).cache_record()},
      {"TPA", "R_Q/R_K/R_V " + to_string(o.rank_q) + "/" + ranks,
       tpattn::TpaKernel<Storage>(tpa).cache_record()},
      {"TPA-KVonly", "R_K/R_V " + ranks, tpattn::TpaKernel<Storage>(kv_only).cache_record()},
  };
}

// The largest n in [0, most] with fits(n), for fits true up to some n and false after it.
template <class Fits>
Index largest_fitting(Index most, Fits fits) {
  Index low = 0, high = most;  // fits(low) holds (or low is 0); the answer is in [low, high]
  while (low < high) {
    const Index middle = low + (high - low + 1) / 2;
    if (fits(middle))
      low = middle;
    else
      high = middle - 1;
  }
  return low;
}

// The longest context one sequence can hold: its region's footprint fits the budget.
Index longest_context(const tpattn::ModelRecord& model, Index budget) {
  // No context beyond budget / bytes per token fits; below that no footprint overflows.
  return largest_fitting(budget / model.bytes_per_token(), [&](Index tokens) {
    return tpattn::ContiguousKvCache::footprint(model, 1, tokens).total() <= budget;
  });
}

// The most sequences of `context` tokens each whose footprint fits the budget.
Index largest_batch(const tpattn::ModelRecord& model, Index budget, Index context) {
  Index sequence_bytes = 0;
  if (__builtin_mul_overflow(model.bytes_per_token(), context, &sequence_bytes)) return 0;
  return largest_fitting(budget / sequence_bytes, [&](Index batch) {
    return tpattn::ContiguousKvCache::footprint(model, batch, context).total() <= budget;
  });
}

std::string grouped(Index value) {  // 1234567 -> "1,234,567"
  std::string digits = std::to_string(value), text;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) text += ',';
    text += digits[i];
  }
  return text;
}

void print_plan(const Options& o) {
  std::vector<Operator> rows;
  switch (o.storage) {
    case tpattn::StorageType::f32: rows = operators<float>(o); break;
    case tpattn::StorageType::bf16: rows = operators<Eigen::bfloat16>(o); break;
    case tpattn::StorageType::f16: rows = operators<Eigen::half>(o); break;
  }
  const auto budget = static_cast<Index>(o.budget_gib * 1073741824.0);
  const std::string layers = std::to_string(o.layers) + (o.layers == 1 ? " layer" : " layers");
  std::printf("d_model %td, h %td, d_h %td, %s, %s cache, budget %g GiB (%s bytes)\n", o.hidden,
              o.heads, o.head_dim, layers.c_str(), tpattn::name_of(o.storage), o.budget_gib,
              grouped(budget).c_str());
  std::printf("%-10s  %-20s  %11s  %13s  %9s  %14s  %13s\n", "", "", "bytes/token", "bytes/token",
              "elements", "longest ctx", "largest batch");
  std::printf("%-10s  %-20s  %11s  %13s  %9s  %14s  %13s\n", "operator", "shape", "per layer",
              ("x " + layers).c_str(), "/ d_model", "at batch 1",
              ("at " + grouped(o.context)).c_str());
  for (const Operator& row : rows) {
    const tpattn::ModelRecord model(row.record, o.layers);
    const double per_hidden =
        static_cast<double>(row.record.elements_per_token()) / static_cast<double>(o.hidden);
    std::printf("%-10s  %-20s  %11s  %13s  %9.4f  %14s  %13s\n", row.name.c_str(),
                row.shape.c_str(), grouped(row.record.bytes_per_token()).c_str(),
                grouped(model.bytes_per_token()).c_str(), per_hidden,
                grouped(longest_context(model, budget)).c_str(),
                grouped(largest_batch(model, budget, o.context)).c_str());
  }
  std::printf(
      "bytes from each operator's cache_record() and a ModelRecord of its layers; what fits from\n"
      "ContiguousKvCache::footprint(), one region of the context per sequence, tables included\n");
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
    print_plan(options);
    return 0;
  } catch (const UsageError& error) {
    std::fprintf(stderr, "memory_planner: %s (see memory_planner --help)\n", error.message.c_str());
  } catch (const tpattn::Error& error) {  // a shape the operators refuse, e.g. --kv-heads 5
    std::fprintf(stderr, "memory_planner: %s\n", error.what());
  }
  return 2;
}
