// attention_bench: the five operators side by side at the sizes users serve -- KV-cache bytes,
// decode throughput (bare kernel and whole layer), causal prefill, and how long a context or
// how large a batch each fits in a memory budget -- every timed row held against this machine's
// read bandwidth and fp32 FMA peak, measured at the start of the same run.
//
//   attention_bench [--preset=default|full|smoke] [--configs=a,b] [--threads=1,2]
//                   [--layers=32] [--budget_gib=16] [--max_cache_gib=G] [--page_tokens=16] [--raw]
//                   [Google Benchmark flags, e.g. --benchmark_filter=decode/paper-d128/
//                    --benchmark_out=run.json --benchmark_out_format=json]
//
// Rows, their names and counters, the presets and how to read the tables: docs/benchmarks.md.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/bench_rows.hpp"
#include "support/machine_limits.hpp"
#include "support/memory_budget.hpp"
#include "support/model_configs.hpp"
#include "support/operators.hpp"
#include "tpattn/tpattn.hpp"

#ifndef TPATTN_BENCH_FLAGS
#define TPATTN_BENCH_FLAGS "unknown"
#endif

namespace tpattn_bench {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct Options {
  std::string preset = "default";
  std::vector<std::string> configs;  // empty: all the preset names
  std::vector<Index> threads;        // the rows' "all cores" thread counts; empty: 1 and all
  Index layers = 32;                 // memory budget: the model's layers
  double budget_gib = 16.0;          // memory budget
  double max_cache_gib = 0.0;        // rows needing more memory are skipped; 0: half the RAM
  Index page_tokens = 16;            // memory budget: the paged cache's page
  bool raw = false;                  // Google Benchmark's own per-run lines too
};

struct Limits {
  double bandwidth = 0.0;  // bytes / s
  double fma_peak = 0.0;   // flop / s
  double gemm = 0.0;       // flop / s, reference only
  Index l3_bytes = 0;
};

Options g_options;
Limits g_limits;                          // 1 thread
std::map<Index, Limits> g_thread_limits;  // per thread count the rows use

const Limits& limits_for(Index threads) {
  const auto found = g_thread_limits.find(threads);
  return found == g_thread_limits.end() ? g_limits : found->second;
}

// The executor of a row: null for one thread (the calling thread), else a pool kept for the run.
tpattn::Executor* executor_for(Index threads) {
  static std::map<Index, std::unique_ptr<tpattn::ThreadPool>> pools;
  if (threads <= 1) return nullptr;
  auto& pool = pools[threads];
  if (!pool) pool = std::make_unique<tpattn::ThreadPool>(threads);
  return pool.get();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// ---- fixtures: built once per row, kept while Google Benchmark reruns the same row ------------

// The last row's caches and operators. Building them (filling gigabytes of cache) costs more
// than timing them, and Google Benchmark calls a row's function once per repetition.
struct FixtureSlot {
  std::string row;
  std::shared_ptr<void> fixture;
};
FixtureSlot g_fixture;

template <class Fixture, class Build>
Fixture& fixture_for(const Row& row, Build build) {
  if (g_fixture.row != row.name()) {
    g_fixture = {};  // free the previous row's memory before taking this one's
    g_fixture.fixture = build();
    g_fixture.row = row.name();
  }
  return *static_cast<Fixture*>(g_fixture.fixture.get());
}

// How many independent layers a row rotates over so that what it streams per token (caches,
// and weights for whole layers) exceeds twice the L3, as in a real model's decode step.
Index rotation_layers(double bytes_per_layer) {
  if (g_options.preset == "smoke") return 1;
  const double target = 2.0 * static_cast<double>(g_limits.l3_bytes);
  return std::clamp<Index>(static_cast<Index>(std::ceil(target / bytes_per_layer)), 1, 512);
}

// Appends length_of(i) random tokens to seqs[i] (one random chunk, repeated).
template <class LengthOf>
void fill(tpattn::KvCache& cache, const std::vector<tpattn::SequenceId>& seqs, Index tokens,
          LengthOf length_of, std::mt19937& rng) {
  const tpattn::CacheRecord& record = cache.record();
  const Index chunk = std::min<Index>(tokens, 1024);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::vector<std::vector<float>> rows(static_cast<std::size_t>(record.plane_count()));
  std::vector<tpattn::PlaneInput> planes(rows.size());
  for (std::size_t p = 0; p < rows.size(); ++p) {
    const tpattn::PlaneSpec& plane = record.plane(static_cast<Index>(p));
    rows[p].resize(static_cast<std::size_t>(chunk * plane.elements_per_token()));
    for (float& v : rows[p]) v = normal(rng);
    planes[p] = {rows[p].data(), plane.rows, plane.cols};
  }
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const Index length = length_of(static_cast<Index>(i));
    for (Index done = 0; done < length; done += chunk)
      cache.append(seqs[i], std::min(chunk, length - done), planes.data(),
                   static_cast<Index>(planes.size()));
  }
}
void fill(tpattn::KvCache& cache, const std::vector<tpattn::SequenceId>& seqs, Index tokens,
          std::mt19937& rng) {
  fill(
      cache, seqs, tokens, [tokens](Index) { return tokens; }, rng);
}

std::vector<float> random_floats(Index count, std::mt19937& rng, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> values(static_cast<std::size_t>(count));
  for (float& v : values) v = normal(rng);
  return values;
}

// Skips the row (as an error row, named in the tables and the JSON) when it needs more memory
// than --max_cache_gib allows.
bool skip_if_too_large(benchmark::State& state, double bytes) {
  const double cap = g_options.max_cache_gib * kGiB;
  if (bytes <= cap) return false;
  char message[160];
  std::snprintf(message, sizeof message, "skipped: needs %.1f GiB > --max_cache_gib=%.1f",
                bytes / kGiB, g_options.max_cache_gib);
  state.SkipWithError(message);
  return true;
}

// The counters every timed row carries; `seconds` is the time of one step of one layer.
void set_counters(benchmark::State& state, const Row& row, Index layers, double cache_bytes,
                  double bytes, double flops, double tokens, double seconds) {
  const Limits& limits = limits_for(row.threads);
  const double t_bandwidth = bytes / limits.bandwidth, t_compute = flops / limits.fma_peak;
  using benchmark::Counter;
  state.counters["bytes_per_token"] =
      Counter(static_cast<double>(row.op->record(row.storage).bytes_per_token()));
  state.counters["cache_bytes"] = Counter(cache_bytes, Counter::kDefaults, Counter::kIs1024);
  state.counters["layers"] = Counter(static_cast<double>(layers));
  state.counters["tokens_per_s"] = Counter(tokens / seconds);
  state.counters["GB_per_s"] = Counter(bytes / seconds / 1e9);
  state.counters["GFLOP_per_s"] = Counter(flops / seconds / 1e9);
  state.counters["roofline"] = Counter(std::max(t_bandwidth, t_compute) / seconds);
  state.counters["bound"] = Counter(t_bandwidth >= t_compute ? 1.0 : 2.0);
}

// ---- decode: the bare kernel, one new token per sequence over `tokens` cached ones -----------
// The batch runs through the kernel's batched run(): one plan for the batch's lengths on
// row.threads threads (one thread: one item per sequence, the unsplit kernel).

struct DecodeFixture {
  std::unique_ptr<tpattn::ContiguousKvCache> cache;
  std::vector<tpattn::SequenceId> seqs;  // [layers][batch]
  Index layers = 0;
  BareKernel kernel;
  tpattn::AttentionPlan plan;
  std::vector<tpattn::SequenceView> views;  // [layers][batch]
  std::vector<float> query, out, workspace;
};

template <class Storage>
void run_decode(benchmark::State& state, const Row& row) {
  const OperatorSpec& op = *row.op;
  const tpattn::CacheRecord record = op.record(row.storage);
  Index batch_tokens = 0;
  for (Index b = 0; b < row.batch; ++b) batch_tokens += row.length(b);
  const double layer_bytes = static_cast<double>(batch_tokens * record.bytes_per_token());
  const Index layers = rotation_layers(layer_bytes);
  if (skip_if_too_large(state, layer_bytes * static_cast<double>(layers))) return;

  auto& f = fixture_for<DecodeFixture>(row, [&] {
    auto fixture = std::make_shared<DecodeFixture>();
    std::mt19937 rng(42);
    fixture->layers = layers;
    fixture->cache =
        std::make_unique<tpattn::ContiguousKvCache>(record, layers * row.batch, row.tokens);
    for (Index s = 0; s < layers * row.batch; ++s)
      fixture->seqs.push_back(fixture->cache->add_sequence());
    fill(
        *fixture->cache, fixture->seqs, row.tokens,
        [&](Index i) { return row.length(i % row.batch); }, rng);
    fixture->kernel = make_bare_kernel<Storage>(op);
    std::vector<Index> lengths;
    for (Index b = 0; b < row.batch; ++b) lengths.push_back(row.length(b));
    fixture->plan.make(fixture->kernel.plan_shape, lengths.data(), nullptr, row.batch, row.threads);
    for (tpattn::SequenceId seq : fixture->seqs)
      fixture->views.push_back(fixture->cache->view(seq));
    fixture->query = random_floats(row.batch * op.query_floats(), rng, 0.3f);
    fixture->out.resize(static_cast<std::size_t>(row.batch * op.out_floats()));
    fixture->workspace.resize(static_cast<std::size_t>(fixture->plan.workspace_floats()));
    return fixture;
  });

  tpattn::Executor* executor = executor_for(row.threads);
  double seconds = 0.0;
  Index layer = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    f.kernel.run(f.plan, f.views.data() + layer * row.batch, f.query.data(), f.out.data(),
                 f.workspace.data(), executor);
    benchmark::ClobberMemory();
    seconds += seconds_since(start);
    layer = layer + 1 == f.layers ? 0 : layer + 1;
  }
  const double step = seconds / static_cast<double>(state.iterations());
  const double batch = static_cast<double>(row.batch), tokens = static_cast<double>(batch_tokens);
  const double bytes =
      layer_bytes + 4.0 * batch * static_cast<double>(op.query_floats() + op.out_floats());
  const double flops = 2.0 * (tokens * op.macs_per_pair() + batch * op.macs_per_query());
  set_counters(state, row, f.layers, layer_bytes * static_cast<double>(f.layers), bytes, flops,
               batch, step);
}

// ---- layer_decode: the whole layer, projections to output, one new token per sequence --------

struct LayerFixture {
  std::unique_ptr<tpattn::ContiguousKvCache> cache;
  std::vector<tpattn::SequenceId> seqs;  // [layers][batch]
  std::vector<Layer> layers;
  std::vector<float> x, y;
};

template <class Storage>
void run_layer_decode(benchmark::State& state, const Row& row) {
  const OperatorSpec& op = *row.op;
  const tpattn::CacheRecord record = op.record(row.storage);
  const double cache_bytes =
      static_cast<double>(row.batch * (row.tokens + 1) * record.bytes_per_token());
  const double weight_bytes = 4.0 * static_cast<double>(op.weight_elements());
  const Index layers = rotation_layers(cache_bytes + weight_bytes);
  if (skip_if_too_large(state, (cache_bytes + weight_bytes) * static_cast<double>(layers))) return;

  auto& f = fixture_for<LayerFixture>(row, [&] {
    auto fixture = std::make_shared<LayerFixture>();
    std::mt19937 rng(42);
    fixture->cache =
        std::make_unique<tpattn::ContiguousKvCache>(record, layers * row.batch, row.tokens + 1);
    for (Index s = 0; s < layers * row.batch; ++s)
      fixture->seqs.push_back(fixture->cache->add_sequence());
    fill(*fixture->cache, fixture->seqs, row.tokens, rng);
    for (Index l = 0; l < layers; ++l) {
      fixture->layers.push_back(make_layer<Storage>(op, rng));
      fixture->layers.back().reserve(row.batch, row.batch, row.threads);
    }
    fixture->x = random_floats(row.batch * op.d_model, rng, 1.0f);
    fixture->y.resize(fixture->x.size());
    return fixture;
  });

  tpattn::Executor* executor = executor_for(row.threads);
  double seconds = 0.0;
  std::size_t layer = 0;
  for (auto _ : state) {
    const tpattn::SequenceId* seqs = f.seqs.data() + layer * static_cast<std::size_t>(row.batch);
    const auto start = std::chrono::steady_clock::now();
    f.layers[layer].decode(*f.cache, seqs, row.batch, f.x.data(), f.y.data(), executor);
    benchmark::ClobberMemory();
    seconds += seconds_since(start);
    for (Index b = 0; b < row.batch; ++b) f.cache->truncate(seqs[b], row.tokens);  // O(1)
    layer = layer + 1 == f.layers.size() ? 0 : layer + 1;
  }
  const double step = seconds / static_cast<double>(state.iterations());
  const double batch = static_cast<double>(row.batch), tokens = static_cast<double>(row.tokens);
  const double bytes = cache_bytes + weight_bytes + 8.0 * batch * static_cast<double>(op.d_model);
  const double flops = 2.0 * batch *
                       ((tokens + 1.0) * op.macs_per_pair() + op.macs_per_query() +
                        static_cast<double>(op.weight_elements()));
  set_counters(state, row, static_cast<Index>(f.layers.size()),
               cache_bytes * static_cast<double>(f.layers.size()), bytes, flops, batch, step);
}

// ---- prefill: the whole layer, causal, `tokens` prompt tokens onto an empty sequence ----------

struct PrefillFixture {
  std::unique_ptr<tpattn::ContiguousKvCache> cache;
  tpattn::SequenceId seq = 0;
  Layer layer;
  std::vector<float> x, y;
};

template <class Storage>
void run_prefill(benchmark::State& state, const Row& row) {
  const OperatorSpec& op = *row.op;
  const tpattn::CacheRecord record = op.record(row.storage);
  const double cache_bytes = static_cast<double>(row.tokens * record.bytes_per_token());
  const double weight_bytes = 4.0 * static_cast<double>(op.weight_elements());
  if (skip_if_too_large(state, cache_bytes + weight_bytes)) return;

  auto& f = fixture_for<PrefillFixture>(row, [&] {
    auto fixture = std::make_shared<PrefillFixture>();
    std::mt19937 rng(42);
    fixture->cache = std::make_unique<tpattn::ContiguousKvCache>(record, 1, row.tokens);
    fixture->seq = fixture->cache->add_sequence();
    fixture->layer = make_layer<Storage>(op, rng);
    fixture->layer.reserve(1, row.tokens, row.threads);
    fixture->x = random_floats(row.tokens * op.d_model, rng, 1.0f);
    fixture->y.resize(fixture->x.size());
    return fixture;
  });

  tpattn::Executor* executor = executor_for(row.threads);
  double seconds = 0.0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    f.layer.prefill(*f.cache, f.seq, row.tokens, f.x.data(), f.y.data(), executor);
    benchmark::ClobberMemory();
    seconds += seconds_since(start);
    f.cache->truncate(f.seq, 0);
  }
  const double step = seconds / static_cast<double>(state.iterations());
  const double n = static_cast<double>(row.tokens);
  const double bytes = weight_bytes + cache_bytes + 8.0 * n * static_cast<double>(op.d_model);
  const double flops =
      2.0 * (0.5 * n * (n + 1.0) * op.macs_per_pair() +
             n * (op.macs_per_query() + static_cast<double>(op.weight_elements())));
  set_counters(state, row, 1, cache_bytes, bytes, flops, n, step);
}

// ---- budget: what a model of L layers fits in G GiB, by the paged cache's own accounting ------

constexpr Index kBudgetContext = 4096;

BudgetModel budget_model() {
  BudgetModel model;
  model.layers = g_options.layers;
  model.budget_bytes = g_options.budget_gib * kGiB;
  model.page_tokens = g_options.page_tokens;
  return model;
}

void run_budget(benchmark::State& state, const Row& row) {
  const tpattn::CacheRecord record = row.op->record(row.storage);
  Index context = 0, batch = 0;
  for (auto _ : state) {
    context = longest_context(record, budget_model());
    batch = largest_batch(record, budget_model(), kBudgetContext);
    benchmark::DoNotOptimize(context);
  }
  // Relative to the config's MHA (its first operator when it has none).
  const OperatorSpec* reference = &row.config->operators.front();
  for (const OperatorSpec& op : row.config->operators)
    if (op.name == "MHA") reference = &op;
  const Index reference_context = longest_context(reference->record(row.storage), budget_model());
  using benchmark::Counter;
  state.counters["bytes_per_token"] = Counter(static_cast<double>(record.bytes_per_token()));
  state.counters["max_context_batch1"] = Counter(static_cast<double>(context));
  state.counters["max_batch_4k"] = Counter(static_cast<double>(batch));
  state.counters["context_vs_mha"] = Counter(
      static_cast<double>(context) / static_cast<double>(std::max<Index>(reference_context, 1)));
}

// ---- registration -----------------------------------------------------------------------------

template <template <class> class Run>
void dispatch(benchmark::State& state, const Row& row) {
  switch (row.storage) {
    case tpattn::StorageType::f32: return Run<float>{}(state, row);
    case tpattn::StorageType::bf16: return Run<Eigen::bfloat16>{}(state, row);
    case tpattn::StorageType::f16: return Run<Eigen::half>{}(state, row);
  }
}
template <class S>
struct Decode {
  void operator()(benchmark::State& s, const Row& r) { run_decode<S>(s, r); }
};
template <class S>
struct LayerDecode {
  void operator()(benchmark::State& s, const Row& r) { run_layer_decode<S>(s, r); }
};
template <class S>
struct Prefill {
  void operator()(benchmark::State& s, const Row& r) { run_prefill<S>(s, r); }
};

// The limits at `threads` threads, every thread at once: a read of >= 1 GiB in all (64 MiB for
// smoke) in each of machine_limits.hpp's read patterns, best of 3 passes each, and the
// register-resident FMA loop, best of 5 (1 pass each for smoke).
Limits measure_limits(Index threads) {
  const bool smoke = g_options.preset == "smoke";
  Limits limits;
  limits.bandwidth = measure_read_bandwidth(smoke ? Index(64) << 20 : Index(1) << 30, smoke ? 1 : 3,
                                            static_cast<int>(threads));
  limits.fma_peak = measure_fma_peak(smoke ? 1 : 5, static_cast<int>(threads));
  return limits;
}

// The limits again, after every row: a shared machine's bandwidth can drift by 20% within
// minutes, and rooflines are only as good as the limits they divide by.
std::string end_limits_row(Index threads) {
  return "limits/end-of-run/threads:" + std::to_string(threads);
}

void run_end_limits(benchmark::State& state, Index threads) {
  Limits end;
  for (auto _ : state) end = measure_limits(threads);
  state.counters["GB_per_s"] = benchmark::Counter(end.bandwidth / 1e9);
  state.counters["GFLOP_per_s"] = benchmark::Counter(end.fma_peak / 1e9);
}

// Every thread count the rows use, ascending.
std::vector<Index> thread_counts(const std::vector<Row>& rows) {
  std::set<Index> counts = {1};
  for (const Row& row : rows)
    if (row.kind != Kind::budget) counts.insert(row.threads);
  return {counts.begin(), counts.end()};
}

void register_rows(const std::vector<Row>& rows) {
  for (const Row& row : rows) {
    auto* b = benchmark::RegisterBenchmark(row.name().c_str(), [row](benchmark::State& state) {
      switch (row.kind) {
        case Kind::decode: return dispatch<Decode>(state, row);
        case Kind::layer_decode: return dispatch<LayerDecode>(state, row);
        case Kind::prefill: return dispatch<Prefill>(state, row);
        case Kind::budget: return run_budget(state, row);
      }
    });
    b->Unit(row.kind == Kind::prefill ? benchmark::kMillisecond : benchmark::kMicrosecond);
  }
  for (Index threads : thread_counts(rows))
    benchmark::RegisterBenchmark(end_limits_row(threads).c_str(), [threads](
                                                                      benchmark::State& state) {
      run_end_limits(state, threads);
    })->Unit(benchmark::kMillisecond);
}

// ---- the report: collect every run, print the summary tables ----------------------------------

struct Result {
  std::vector<std::map<std::string, double>> repetitions;  // counters, plus "seconds"
  std::string error;

  double median(const std::string& key) const {
    std::vector<double> values;
    for (const auto& r : repetitions) values.push_back(r.at(key));
    std::sort(values.begin(), values.end());
    const std::size_t n = values.size();
    if (n == 0) return 0.0;
    return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
  }
};

// Keeps every iteration run (for the tables) and forwards to Google Benchmark's console
// reporter when --raw is given; shows progress on a terminal.
class SummaryReporter : public benchmark::BenchmarkReporter {
 public:
  SummaryReporter(std::size_t rows, bool raw) : rows_(rows) {
    if (raw) console_ = std::make_unique<benchmark::ConsoleReporter>();
    progress_ = !raw && isatty(STDERR_FILENO);
  }

  bool ReportContext(const Context& context) override {
    return console_ ? console_->ReportContext(context) : true;
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    if (console_) console_->ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration) continue;
      const std::string name = run.run_name.str();
      Result& result = results_[name];
      if (result.repetitions.empty() && result.error.empty()) ++done_;
      if (run.error_occurred) {
        result.error = run.error_message;
        continue;
      }
      std::map<std::string, double> values;
      for (const auto& [key, counter] : run.counters) values[key] = counter.value;
      result.repetitions.push_back(values);
      if (progress_) std::fprintf(stderr, "\r\033[K[%zu/%zu] %s", done_, rows_, name.c_str());
    }
  }

  void Finalize() override {
    if (console_) console_->Finalize();
    if (progress_) std::fprintf(stderr, "\r\033[K");
  }

  const std::map<std::string, Result>& results() const { return results_; }

 private:
  std::unique_ptr<benchmark::ConsoleReporter> console_;
  std::map<std::string, Result> results_;
  std::size_t rows_ = 0, done_ = 0;
  bool progress_ = false;
};

std::string with_thousands(double value) {
  std::string digits = std::to_string(static_cast<long long>(std::llround(value)));
  for (int i = static_cast<int>(digits.size()) - 3; i > 0; i -= 3) digits.insert(i, ",");
  return digits;
}

void print_limits() {
  std::printf(
      "Limits measured in this run (1 thread): %.1f GB/s read (best of 8 read patterns), %.1f "
      "GFLOP/s fp32 FMA peak (Eigen GEMM %.1f GFLOP/s, for reference)\n",
      g_limits.bandwidth / 1e9, g_limits.fma_peak / 1e9, g_limits.gemm / 1e9);
  for (const auto& [threads, limits] : g_thread_limits)
    if (threads > 1)
      std::printf(
          "Limits at %td threads: %.1f GB/s read (%.2fx of 1 thread), %.1f "
          "GFLOP/s fp32 FMA peak (%.2fx)\n",
          threads, limits.bandwidth / 1e9, limits.bandwidth / g_limits.bandwidth,
          limits.fma_peak / 1e9, limits.fma_peak / g_limits.fma_peak);
}

void print_cache_table(const std::vector<Row>& rows) {
  std::printf("\nKV cache per token and layer\n");
  std::printf("%-17s %-11s %9s %9s %9s\n", "config", "operator", "elements", "f32 B", "bf16 B");
  std::set<std::string> printed;
  for (const Row& row : rows) {
    const std::string key = row.config->name + "/" + row.op->name;
    if (!printed.insert(key).second) continue;
    std::printf("%-17s %-11s %9td %9td %9td\n", row.config->name.c_str(), row.op->name.c_str(),
                row.op->record(tpattn::StorageType::f32).elements_per_token(),
                row.op->record(tpattn::StorageType::f32).bytes_per_token(),
                row.op->record(tpattn::StorageType::bf16).bytes_per_token());
  }
}

void print_timed_table(Kind kind, const std::vector<Row>& rows,
                       const std::map<std::string, Result>& results) {
  bool header = false;
  for (const Row& row : rows) {
    if (row.kind != kind) continue;
    const auto found = results.find(row.name());
    if (found == results.end()) continue;  // filtered out
    if (!header) {
      header = true;
      if (kind == Kind::decode)
        std::printf(
            "\nDecode, bare kernel: one new token per sequence over `tokens` cached ones (a "
            "ragged batch: lengths spread over a-b), one layer (median of repetitions)\n");
      else if (kind == Kind::layer_decode)
        std::printf(
            "\nDecode, whole layer: projections, RoPE, cache append, attention, output "
            "projection; one layer\n");
      else
        std::printf("\nPrefill, whole layer: causal prefill of `tokens` prompt tokens\n");
      std::printf("%-17s %-11s %-5s %11s %5s %7s %6s %11s %11s %7s %8s %8s %-7s\n", "config",
                  "operator", "store", "tokens", "batch", "threads", "layers",
                  kind == Kind::prefill ? "ms/prefill" : "us/step", "tokens/s", "GB/s", "GFLOP/s",
                  "roofline", "bound");
    }
    const Result& r = found->second;
    const std::string tokens = row.shortest > 0
                                   ? std::to_string(row.shortest) + "-" + std::to_string(row.tokens)
                                   : std::to_string(row.tokens);
    std::printf("%-17s %-11s %-5s %11s %5td %7td ", row.config->name.c_str(), row.op->name.c_str(),
                tpattn::name_of(row.storage), tokens.c_str(), row.batch, row.threads);
    if (r.repetitions.empty()) {
      std::printf("%s\n", r.error.c_str());
      continue;
    }
    const double tokens_per_s = r.median("tokens_per_s");
    const double step =
        (kind == Kind::prefill ? static_cast<double>(row.tokens) : static_cast<double>(row.batch)) /
        tokens_per_s;
    std::printf("%6.0f %11.1f %11s %7.2f %8.1f %8.2f %-7s\n", r.median("layers"),
                kind == Kind::prefill ? step * 1e3 : step * 1e6,
                with_thousands(tokens_per_s).c_str(), r.median("GB_per_s"), r.median("GFLOP_per_s"),
                r.median("roofline"), r.median("bound") == 1.0 ? "memory" : "compute");
  }
}

void print_budget_table(const std::vector<Row>& rows,
                        const std::map<std::string, Result>& results) {
  bool header = false;
  for (const Row& row : rows) {
    if (row.kind != Kind::budget) continue;
    const auto found = results.find(row.name());
    if (found == results.end() || found->second.repetitions.empty()) continue;
    if (!header) {
      header = true;
      std::printf(
          "\nMemory budget: a model of %td layers with %g GiB of KV cache (paged, %td-token "
          "pages, block tables included)\n",
          row.layers, row.budget_gib, g_options.page_tokens);
      std::printf("%-17s %-11s %-5s %9s %15s %14s %10s\n", "config", "operator", "store",
                  "bytes/tok", "context (b=1)", "batch at 4k", "vs MHA");
    }
    const Result& r = found->second;
    std::printf("%-17s %-11s %-5s %9.0f %15s %14s %9.1fx\n", row.config->name.c_str(),
                row.op->name.c_str(), tpattn::name_of(row.storage), r.median("bytes_per_token"),
                with_thousands(r.median("max_context_batch1")).c_str(),
                with_thousands(r.median("max_batch_4k")).c_str(), r.median("context_vs_mha"));
  }
}

// ---- main ---------------------------------------------------------------------------------------

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, separator);)
    if (!part.empty()) parts.push_back(part);
  return parts;
}

void print_usage() {
  std::printf(
      "attention_bench: the five attention operators compared (docs/benchmarks.md)\n"
      "  --preset=default|full|smoke  which rows run (default: about 8 minutes on 2 cores)\n"
      "  --configs=a,b                only these configurations of the preset\n"
      "  --threads=1,2                thread counts of the rows that compare thread counts\n"
      "                               (default: 1 and every core of the machine)\n"
      "                               (t6-small, t6-medium, paper-d128, paper-d64,\n"
      "                                deepseek-v2-lite)\n"
      "  --layers=32 --budget_gib=16  the model and budget of the memory-budget table\n"
      "  --page_tokens=16             page size of the memory-budget table's paged cache\n"
      "  --max_cache_gib=G            skip rows needing more memory (default: half the RAM)\n"
      "  --raw                        also print Google Benchmark's per-run lines\n"
      "Google Benchmark's flags work too, e.g. --benchmark_filter=decode/paper-d128/\n"
      "--benchmark_out=run.json --benchmark_out_format=json (scripts/bench_report.py reads it).\n");
}

// Takes our flags out of argv (Google Benchmark rejects flags it does not know); false on a bad
// one or --help.
bool parse_options(int& argc, char** argv) {
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value_of = [&](const char* flag) -> const char* {
      const std::string prefix = std::string(flag) + "=";
      return arg.rfind(prefix, 0) == 0 ? argv[i] + prefix.size() : nullptr;
    };
    if (arg == "--help" || arg == "-h") {
      print_usage();
      return false;
    } else if (arg == "--raw") {
      g_options.raw = true;
    } else if (const char* v = value_of("--preset")) {
      g_options.preset = v;
    } else if (const char* v = value_of("--configs")) {
      g_options.configs = split(v, ',');
    } else if (const char* v = value_of("--threads")) {
      for (const std::string& t : split(v, ',')) {
        const long count = std::atol(t.c_str());
        if (count < 1 || count > 1024) {
          std::fprintf(stderr, "attention_bench: --threads wants counts in [1, 1024], got '%s'\n",
                       t.c_str());
          return false;
        }
        g_options.threads.push_back(count);
      }
    } else if (const char* v = value_of("--layers")) {
      g_options.layers = std::atol(v);
    } else if (const char* v = value_of("--budget_gib")) {
      g_options.budget_gib = std::atof(v);
    } else if (const char* v = value_of("--max_cache_gib")) {
      g_options.max_cache_gib = std::atof(v);
    } else if (const char* v = value_of("--page_tokens")) {
      g_options.page_tokens = std::atol(v);
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  if (g_options.layers < 1 || g_options.budget_gib <= 0.0 || g_options.page_tokens < 1 ||
      g_options.max_cache_gib < 0.0) {
    std::fprintf(stderr, "attention_bench: --layers, --budget_gib and --page_tokens must be > 0\n");
    return false;
  }
  for (const std::string& name : g_options.configs) {
    const auto& all = model_configs();
    if (std::none_of(all.begin(), all.end(),
                     [&](const ModelConfig& c) { return c.name == name; })) {
      std::fprintf(stderr, "attention_bench: unknown config '%s' (see --help)\n", name.c_str());
      return false;
    }
  }
  if (g_options.threads.empty()) {
    const Index cores = std::max<Index>(1, static_cast<Index>(std::thread::hardware_concurrency()));
    g_options.threads = {1, cores};
  }
  if (g_options.max_cache_gib == 0.0)
    g_options.max_cache_gib = 0.5 * static_cast<double>(physical_memory_bytes()) / kGiB;
  return true;
}

bool has_flag(int argc, char** argv, const char* prefix) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]).rfind(prefix, 0) == 0) return true;
  return false;
}

std::string compiler_name() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace
}  // namespace tpattn_bench

int main(int argc, char** argv) {
  using namespace tpattn_bench;
  if (!parse_options(argc, argv)) return has_flag(argc, argv, "--help") ? 0 : 2;
  const auto all_presets = presets();
  const auto preset = std::find_if(all_presets.begin(), all_presets.end(),
                                   [](const Preset& p) { return p.name == g_options.preset; });
  if (preset == all_presets.end()) {
    std::fprintf(stderr, "attention_bench: unknown preset '%s' (default, full, smoke)\n",
                 g_options.preset.c_str());
    return 2;
  }
  const bool smoke = preset->name == "smoke";

  // Our defaults for Google Benchmark's flags, before the user's (the last one wins).
  std::vector<char*> args(argv, argv + argc);
  std::string repetitions = smoke ? "--benchmark_repetitions=1" : "--benchmark_repetitions=3";
  std::string min_time = smoke ? "--benchmark_min_time=0.000001" : "--benchmark_min_time=0.1";
  args.insert(args.begin() + 1, {repetitions.data(), min_time.data()});
  int args_count = static_cast<int>(args.size());
  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 2;

  const std::vector<Row> rows = rows_of(*preset, g_options.configs, g_options.layers,
                                        g_options.budget_gib, g_options.threads);
  register_rows(rows);
  if (has_flag(argc, argv, "--benchmark_list_tests")) {
    benchmark::RunSpecifiedBenchmarks();
    return 0;
  }

  g_limits = measure_limits(1);
  g_limits.l3_bytes = l3_cache_bytes();
  g_limits.gemm = measure_gemm_rate(smoke ? 256 : 1024, smoke ? 1 : 3);
  for (Index threads : thread_counts(rows)) {
    g_thread_limits[threads] = threads == 1 ? g_limits : measure_limits(threads);
    g_thread_limits[threads].l3_bytes = g_limits.l3_bytes;
  }
  const auto number = [](double value) {
    char text[32];
    std::snprintf(text, sizeof text, "%.2f", value);
    return std::string(text);
  };
  benchmark::AddCustomContext("tpattn_preset", preset->name);
  benchmark::AddCustomContext("tpattn_cpu", cpu_model_name());
  benchmark::AddCustomContext("tpattn_compiler", compiler_name());
  benchmark::AddCustomContext("tpattn_flags", TPATTN_BENCH_FLAGS);
  benchmark::AddCustomContext("tpattn_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("tpattn_l3_bytes", std::to_string(g_limits.l3_bytes));
  benchmark::AddCustomContext("tpattn_layers", std::to_string(g_options.layers));
  benchmark::AddCustomContext("tpattn_budget_gib", number(g_options.budget_gib));
  benchmark::AddCustomContext("tpattn_page_tokens", std::to_string(g_options.page_tokens));
  std::string thread_list;
  for (Index threads : thread_counts(rows)) {
    const Limits& limits = g_thread_limits[threads];
    const std::string t = std::to_string(threads);
    thread_list += (thread_list.empty() ? "" : ",") + t;
    benchmark::AddCustomContext("tpattn_bandwidth_GBps_t" + t, number(limits.bandwidth / 1e9));
    benchmark::AddCustomContext("tpattn_fma_peak_GFLOPs_t" + t, number(limits.fma_peak / 1e9));
  }
  benchmark::AddCustomContext("tpattn_threads", thread_list);
  benchmark::AddCustomContext("tpattn_gemm_GFLOPs_t1", number(g_limits.gemm / 1e9));

  std::printf("tpattn attention benchmark, preset '%s': %s, %s, %s\n", preset->name.c_str(),
              cpu_model_name().c_str(), compiler_name().c_str(), TPATTN_BENCH_FLAGS);
  print_limits();
  std::fflush(stdout);

  SummaryReporter reporter(rows.size() + thread_counts(rows).size(), g_options.raw);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  g_fixture = {};

  print_cache_table(rows);
  for (Kind kind : {Kind::decode, Kind::layer_decode, Kind::prefill})
    print_timed_table(kind, rows, reporter.results());
  print_budget_table(rows, reporter.results());
  for (Index threads : thread_counts(rows)) {
    const auto end = reporter.results().find(end_limits_row(threads));
    if (end == reporter.results().end() || end->second.repetitions.empty()) continue;
    const Limits& start = g_thread_limits[threads];
    const double bandwidth = end->second.median("GB_per_s") * 1e9;
    const double fma_peak = end->second.median("GFLOP_per_s") * 1e9;
    std::printf(
        "\nLimits at %td thread(s) measured again at the end of the run: %.1f GB/s, "
        "%.1f GFLOP/s.\n",
        threads, bandwidth / 1e9, fma_peak / 1e9);
    const double drift = std::max(std::abs(bandwidth / start.bandwidth - 1.0),
                                  std::abs(fma_peak / start.fma_peak - 1.0));
    if (drift > 0.1 && g_options.preset != "smoke")  // smoke's one-pass limits are rough
      std::printf(
          "WARNING: the machine's limits moved by %.0f%% during the run (a shared "
          "machine under load): rooflines are uncertain by as much; rerun when quiet.\n",
          100.0 * drift);
  }
  for (const auto& [name, result] : reporter.results()) {
    if (!result.repetitions.empty() && result.repetitions.front().count("roofline") &&
        result.median("roofline") > 1.0)
      std::printf(
          "\nWARNING: %s runs faster than the measured limit allows (roofline %.2f): "
          "the limit was measured wrong on this run, not the kernel fast.\n",
          name.c_str(), result.median("roofline"));
  }
  std::printf(
      "\nroofline = max(bytes / read bandwidth, flops / FMA peak) / time (1.0 = at the limit); "
      "bound: which of the two is larger. tokens/s: new tokens through one layer (a model of L "
      "layers: divide by L).\nNote: Debian's Google Benchmark prints 'Library was built as "
      "DEBUG' with --raw; that concerns the benchmark library, not tpattn (built %s).\n",
      TPATTN_BENCH_FLAGS);
  benchmark::Shutdown();
  return 0;
}
