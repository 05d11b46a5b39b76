// bench/support/bench_rows.hpp -- one benchmark row (what is run, at which size), its name, and
// the presets that list the rows of a run.
//
// Every row is named <kind>/<config>/<operator>/<storage>/tokens:<N>/batch:<B>/threads:<T>
// (a ragged batch: tokens:<first>-<last>, the batch's lengths spread evenly between them;
// budget rows: budget/<config>/<operator>/<storage>/layers:<L>/gib:<G>), so --benchmark_filter
// and the JSON are enough to select and compare runs.
#pragma once

#include <algorithm>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "support/model_configs.hpp"

namespace tpattn_bench {

enum class Kind { decode, layer_decode, prefill, budget };

inline const char* name_of(Kind kind) {
  switch (kind) {
    case Kind::decode: return "decode";
    case Kind::layer_decode: return "layer_decode";
    case Kind::prefill: return "prefill";
    case Kind::budget: return "budget";
  }
  return "?";
}

struct Row {
  Kind kind = Kind::decode;
  const ModelConfig* config = nullptr;
  const OperatorSpec* op = nullptr;
  tpattn::StorageType storage = tpattn::StorageType::f32;
  Index tokens = 0;    // cached tokens (decode), prompt tokens (prefill); a ragged batch's longest
  Index shortest = 0;  // > 0: a ragged decode batch, lengths spread from this to `tokens`
  Index batch = 1;
  Index threads = 1;
  Index layers = 0;       // budget rows: the model's layers
  double budget_gib = 0;  // budget rows: the memory budget

  std::string name() const {
    std::string n = std::string(name_of(kind)) + "/" + config->name + "/" + op->name + "/" +
                    tpattn::name_of(storage);
    if (kind == Kind::budget) {
      char gib[32];
      std::snprintf(gib, sizeof gib, "%g", budget_gib);
      return n + "/layers:" + std::to_string(layers) + "/gib:" + gib;
    }
    const std::string lengths = shortest > 0
                                    ? std::to_string(shortest) + "-" + std::to_string(tokens)
                                    : std::to_string(tokens);
    return n + "/tokens:" + lengths + "/batch:" + std::to_string(batch) +
           "/threads:" + std::to_string(threads);
  }

  // Cached tokens of sequence b of the batch.
  Index length(Index b) const {
    if (shortest <= 0 || batch == 1) return tokens;
    return shortest + (tokens - shortest) * b / (batch - 1);
  }
};

// What a preset runs. Each axis list applies to every config the preset names for that kind.
struct Axes {
  std::vector<std::string> configs;
  std::vector<tpattn::StorageType> storages;
  std::vector<Index> tokens;
  std::vector<Index> batches;
  std::vector<Index> threads = {1};  // kAllCores: every core of the machine (--threads)
  Index shortest = 0;                // > 0: ragged batches, lengths from this to each `tokens`
};

// In Axes::threads: the thread counts of --threads (default: 1 and every core).
constexpr Index kAllCores = 0;

struct Preset {
  std::string name;
  std::vector<std::pair<Kind, Axes>> parts;
};

inline std::vector<Preset> presets() {
  using S = tpattn::StorageType;
  const std::vector<std::string> all = {"t6-small", "t6-medium", "paper-d128", "paper-d64",
                                        "deepseek-v2-lite"};
  const std::vector<std::string> paper = {"paper-d128", "paper-d64"};
  const std::vector<std::string> t6 = {"t6-small", "t6-medium"};
  constexpr Index k1 = 1024, k4 = 4096, k16 = 16384, k64 = 65536, k256 = 262144;
  Preset standard{"default",
                  {
                      {Kind::decode, {paper, {S::bf16, S::f32}, {k1, k4, k16, k64}, {1}}},
                      {Kind::decode, {paper, {S::bf16}, {k16, k64}, {1}, {kAllCores}}},
                      {Kind::decode, {{"paper-d128"}, {S::f16}, {k16}, {1}}},
                      {Kind::decode, {{"paper-d128"}, {S::bf16}, {k4}, {8}}},
                      {Kind::decode, {{"paper-d128"}, {S::bf16}, {k16}, {8}, {1, kAllCores}, k1}},
                      {Kind::decode, {t6, {S::bf16}, {k1, k4, k16}, {1}}},
                      {Kind::decode, {{"deepseek-v2-lite"}, {S::bf16}, {k4, k16, k64}, {1}}},
                      {Kind::layer_decode, {{"t6-small"}, {S::bf16}, {k4}, {1, 8}}},
                      {Kind::layer_decode, {{"paper-d128"}, {S::bf16}, {k16}, {1}, {1, kAllCores}}},
                      {Kind::prefill, {{"t6-small"}, {S::bf16}, {512, 2048, 8192}, {1}}},
                      {Kind::prefill, {{"paper-d64"}, {S::bf16}, {512, 2048}, {1}, {1, kAllCores}}},
                      {Kind::budget, {all, {S::bf16}, {}, {}}},
                  }};
  Preset full{
      "full",
      {
          {Kind::decode,
           {all, {S::f32, S::bf16, S::f16}, {k1, k4, k16, k64, k256}, {1, 8}, {1, kAllCores}}},
          {Kind::decode, {all, {S::bf16}, {k16, k64}, {8}, {1, kAllCores}, k1}},
          {Kind::layer_decode, {all, {S::f32, S::bf16}, {k4, k16, k64}, {1, 8}, {1, kAllCores}}},
          {Kind::prefill, {all, {S::bf16}, {512, 2048, 8192}, {1}, {1, kAllCores}}},
          {Kind::budget, {all, {S::f32, S::bf16, S::f16}, {}, {}}},
      }};
  // One short row of every kind for every operator of one config, and every config's budget:
  // proves each path runs (CI), measures nothing.
  Preset smoke{"smoke",
               {
                   {Kind::decode, {{"t6-small"}, {S::f32, S::bf16, S::f16}, {256}, {1}}},
                   {Kind::decode, {{"paper-d64"}, {S::bf16}, {256}, {2}, {1, 2}}},
                   {Kind::decode, {{"t6-small"}, {S::bf16}, {512}, {3}, {2}, 1}},
                   {Kind::layer_decode, {{"t6-small"}, {S::bf16}, {256}, {2}, {2}}},
                   {Kind::prefill, {{"t6-small"}, {S::bf16}, {64}, {1}, {1, 2}}},
                   {Kind::budget, {all, {S::bf16}, {}, {}}},
               }};
  return {standard, full, smoke};
}

// The rows of `preset` restricted to `only_configs` (empty: all), in preset order, each once;
// kAllCores in a threads axis stands for every count of `all_cores` (e.g. {1, 2}).
inline std::vector<Row> rows_of(const Preset& preset, const std::vector<std::string>& only_configs,
                                Index budget_layers, double budget_gib,
                                const std::vector<Index>& all_cores = {1}) {
  std::vector<Row> rows;
  std::set<std::string> seen;
  for (const auto& [kind, axes] : preset.parts) {
    for (const ModelConfig& config : model_configs()) {
      if (std::find(axes.configs.begin(), axes.configs.end(), config.name) == axes.configs.end())
        continue;
      if (!only_configs.empty() &&
          std::find(only_configs.begin(), only_configs.end(), config.name) == only_configs.end())
        continue;
      for (const OperatorSpec& op : config.operators) {
        for (tpattn::StorageType storage : axes.storages) {
          Row row;
          row.kind = kind;
          row.config = &config;
          row.op = &op;
          row.storage = storage;
          if (kind == Kind::budget) {
            row.layers = budget_layers;
            row.budget_gib = budget_gib;
            if (seen.insert(row.name()).second) rows.push_back(row);
            continue;
          }
          std::vector<Index> threads;
          for (Index t : axes.threads) {
            if (t == kAllCores)
              threads.insert(threads.end(), all_cores.begin(), all_cores.end());
            else
              threads.push_back(t);
          }
          for (Index tokens : axes.tokens) {
            for (Index batch : axes.batches) {
              for (Index t : threads) {
                row.tokens = tokens;
                row.batch = batch;
                row.threads = t;
                row.shortest = axes.shortest;
                if (seen.insert(row.name()).second) rows.push_back(row);
              }
            }
          }
        }
      }
    }
  }
  return rows;
}

}  // namespace tpattn_bench
