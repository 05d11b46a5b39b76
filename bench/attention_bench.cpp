// attention_bench: the five operators side by side -- cache memory per token and decode
// attention throughput, held against this machine's own memory bandwidth and GEMM peak,
// measured in the same run (docs/performance.md).
//
// Shapes: the TPA paper's small models (d_model 768, d_h 64): MHA / GQA (2 KV heads) / MQA with
// h = 12, MLA with d_c 256 and d_R 32, TPA and TPA-KVonly with h = 34, R_Q 6, R_K = R_V = 2.
// A decode step is the bare kernel for one new token over M cached tokens, in every one of
// L layers; L is chosen so the layers' caches together hold >= 2x the L3 (64 MiB), so the cache
// streams from DRAM as it does in a real model.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "tpattn/tpattn.hpp"

namespace {

using tpattn::Index;

constexpr double kCacheFootprint = 64.0 * 1024 * 1024;  // 2x this machine's 32 MiB L3

// Measured first in the run, used by every roofline after.
double g_bandwidth = 0.0;  // bytes / s, streaming read
double g_flop_peak = 0.0;  // flop / s, large fp32 GEMM

void fill_random(std::vector<float>& values, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  for (float& v : values) v = normal(rng);
}

// ---- the machine's limits --------------------------------------------------------------------

// Streaming read of 1 GiB (far beyond L3), summed with the build's SIMD width: bytes / s, the
// best of `passes` after the buffer is written once (a single pass over a freshly written buffer
// is at the mercy of a shared machine's noise). The two halves are read side by side in 16 KiB
// chunks, as a decode kernel reads its K and V planes: in a standalone test on this machine two
// streams read 20.7-23.1 GB/s where one read 18.9-21.0 and four, summed element-wise, only 13.
double measure_bandwidth(int passes) {
  const Index floats = Index(1) << 28, half = floats / 2, chunk = 4096;
  std::vector<float> buffer(static_cast<std::size_t>(floats), 1.0f);
  const Eigen::Map<const Eigen::ArrayXf> data(buffer.data(), floats);
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    float total = 0.0f;
    for (Index first = 0; first < half; first += chunk)
      total += data.segment(first, chunk).sum() + data.segment(half + first, chunk).sum();
    benchmark::DoNotOptimize(total);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(floats) * sizeof(float) / seconds);
  }
  return best;
}

// A 1024^3 fp32 GEMM through Eigen, single thread: flop / s.
double measure_gemm_peak(int passes) {
  const Index n = 1024;
  tpattn::RowMatrix a = tpattn::RowMatrix::Random(n, n), b = tpattn::RowMatrix::Random(n, n);
  tpattn::RowMatrix c(n, n);
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * n * n * n / seconds);
  }
  return best;
}

void BM_MemoryBandwidth(benchmark::State& state) {
  for (auto _ : state) g_bandwidth = std::max(g_bandwidth, measure_bandwidth(3));
  state.counters["GB_per_s"] = benchmark::Counter(g_bandwidth / 1e9);
}

void BM_GemmPeak(benchmark::State& state) {
  for (auto _ : state) g_flop_peak = std::max(g_flop_peak, measure_gemm_peak(1));
  state.counters["GFLOP_per_s"] = benchmark::Counter(g_flop_peak / 1e9);
}

// ---- the five operators ----------------------------------------------------------------------

enum class Op { mha, gqa, mqa, mla, tpa, tpa_kv_only };
const char* name_of(Op op) {
  switch (op) {
    case Op::mha: return "MHA";
    case Op::gqa: return "GQA";
    case Op::mqa: return "MQA";
    case Op::mla: return "MLA";
    case Op::tpa: return "TPA";
    case Op::tpa_kv_only: return "TPA-KVonly";
  }
  return "?";
}

constexpr Index kHeadDim = 64;
constexpr Index kHeadsBaseline = 12, kHeadsTpa = 34;
constexpr Index kRankQ = 6, kRankKV = 2;
constexpr Index kLatent = 256, kRopeDim = 32;

// A bare decode kernel of one operator, its record, and multiply-adds per cached token.
template <class Storage>
struct DecodeCase {
  tpattn::CacheRecord record;
  double macs_per_token = 0.0;
  Index query_floats = 0;  // q, or A_Q then B_Q for TPA
  Index out_floats = 0;
  Index workspace_floats = 0;
  std::function<void(const float* query, const tpattn::SequenceView&, float* out, float* ws)>
      attend;
};

template <class Storage>
DecodeCase<Storage> make_case(Op op) {
  DecodeCase<Storage> c;
  const Index d = kHeadDim;
  if (op == Op::mha || op == Op::gqa || op == Op::mqa) {
    const Index h = kHeadsBaseline;
    const Index g = op == Op::mha ? h : op == Op::gqa ? 2 : 1;
    auto kernel = std::make_shared<tpattn::GqaKernel<Storage>>(h, g, d, d);
    c.record = kernel->cache_record();
    c.macs_per_token = static_cast<double>(h * (d + d));
    c.query_floats = h * d;
    c.out_floats = h * d;
    c.workspace_floats = kernel->workspace_floats();
    c.attend = [kernel](const float* q, const tpattn::SequenceView& view, float* out, float* ws) {
      kernel->attend(q, 1, view, out, nullptr, ws);
    };
  } else if (op == Op::mla) {
    const Index h = kHeadsBaseline;
    auto kernel = std::make_shared<tpattn::MlaKernel<Storage>>(
        h, kLatent, kRopeDim, 1.0f / std::sqrt(static_cast<float>(d + kRopeDim)));
    c.record = kernel->cache_record();
    c.macs_per_token = static_cast<double>(h * (kLatent + kRopeDim + kLatent));
    c.query_floats = h * (kLatent + kRopeDim);
    c.out_floats = h * kLatent;
    c.workspace_floats = kernel->workspace_floats();
    c.attend = [kernel](const float* q, const tpattn::SequenceView& view, float* out, float* ws) {
      kernel->attend(q, 1, view, out, nullptr, ws);
    };
  } else {
    const Index h = kHeadsTpa;
    const bool kv_only = op == Op::tpa_kv_only;
    const tpattn::TpaShape shape{h, d, d, kv_only ? 0 : kRankQ, kRankKV, kRankKV};
    auto kernel = std::make_shared<tpattn::TpaKernel<Storage>>(shape);
    c.record = kernel->cache_record();
    const double rq = static_cast<double>(shape.rank_q), rk = kRankKV, rv = kRankKV;
    const bool factor = tpattn::cheaper_tpa_order(shape) == tpattn::TpaOrder::factor;
    const double scores = factor ? rk * (rq * d + h * rq + h) : rk * (h * d + h);
    c.macs_per_token = scores + rv * h * (d + 1);
    c.query_floats = kv_only ? h * d : shape.rank_q * (h + d);
    c.out_floats = h * d;
    c.workspace_floats = kernel->workspace_floats();
    const Index a_q_floats = shape.rank_q * h;
    c.attend = [kernel, kv_only, a_q_floats](const float* q, const tpattn::SequenceView& view,
                                             float* out, float* ws) {
      if (kv_only)
        kernel->attend(q, 1, view, out, nullptr, ws);
      else
        kernel->attend(q, q + a_q_floats, 1, view, out, nullptr, ws);
    };
  }
  return c;
}

// One row of the closing table: every repetition's time, reported at the median.
struct Summary {
  std::string op, storage;
  Index elements_per_token = 0, bytes_per_token = 0, context = 0, layers = 0;
  double bytes = 0.0, flops = 0.0, t_min = 0.0;
  std::vector<double> seconds_per_layer;

  double median_seconds() const {
    std::vector<double> sorted = seconds_per_layer;
    std::sort(sorted.begin(), sorted.end());
    const std::size_t n = sorted.size();
    return n % 2 == 1 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  }
};
std::map<std::string, Summary> g_summary;  // by operator, storage and context

template <class Storage>
void BM_Decode(benchmark::State& state, Op op) {
  // A filtered run still holds every figure against limits measured in this run.
  if (g_bandwidth == 0.0) g_bandwidth = measure_bandwidth(5);
  if (g_flop_peak == 0.0) g_flop_peak = measure_gemm_peak(5);
  const Index context = state.range(0);
  DecodeCase<Storage> c = make_case<Storage>(op);
  const Index bytes_per_token = c.record.bytes_per_token();
  const double layer_bytes = static_cast<double>(context * bytes_per_token);
  const Index layers =
      std::max<Index>(1, static_cast<Index>(std::ceil(kCacheFootprint / layer_bytes)));

  // One sequence per layer, filled with random rows appended in large chunks.
  tpattn::ContiguousKvCache cache(c.record, layers, context);
  std::mt19937 rng(42);
  {
    const Index chunk = std::min<Index>(context, 1024);
    std::vector<std::vector<float>> rows(static_cast<std::size_t>(c.record.plane_count()));
    std::vector<tpattn::PlaneInput> planes(rows.size());
    for (Index p = 0; p < c.record.plane_count(); ++p) {
      const auto& plane = c.record.plane(p);
      rows[static_cast<std::size_t>(p)].resize(
          static_cast<std::size_t>(chunk * plane.elements_per_token()));
      fill_random(rows[static_cast<std::size_t>(p)], rng, 0.5f);
      planes[static_cast<std::size_t>(p)] = {rows[static_cast<std::size_t>(p)].data(), plane.rows,
                                             plane.cols};
    }
    for (Index layer = 0; layer < layers; ++layer) {
      const tpattn::SequenceId seq = cache.add_sequence();
      for (Index done = 0; done < context; done += chunk)
        cache.append(seq, std::min(chunk, context - done), planes.data(),
                     static_cast<Index>(planes.size()));
    }
  }
  std::vector<float> query(static_cast<std::size_t>(c.query_floats));
  fill_random(query, rng, 0.3f);
  std::vector<float> out(static_cast<std::size_t>(c.out_floats));
  std::vector<float> workspace(static_cast<std::size_t>(c.workspace_floats));

  double seconds = 0.0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    for (Index layer = 0; layer < layers; ++layer)
      c.attend(query.data(), cache.view(layer), out.data(), workspace.data());
    benchmark::ClobberMemory();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  const double per_layer = seconds / static_cast<double>(state.iterations() * layers);
  const double bytes = layer_bytes + 4.0 * static_cast<double>(c.query_floats + c.out_floats);
  const double flops = 2.0 * c.macs_per_token * static_cast<double>(context);
  const double t_min = std::max(bytes / g_bandwidth, flops / g_flop_peak);

  using benchmark::Counter;
  state.counters["cache_bytes"] = Counter(layer_bytes * static_cast<double>(layers));
  state.counters["bytes_per_token"] = Counter(static_cast<double>(bytes_per_token));
  state.counters["layers"] = Counter(static_cast<double>(layers));
  // One iteration decodes one token through every layer.
  state.counters["tokens_per_s"] = Counter(1.0, Counter::kIsIterationInvariantRate);
  state.counters["GB_per_s"] = Counter(bytes / per_layer / 1e9);
  state.counters["GFLOP_per_s"] = Counter(flops / per_layer / 1e9);
  state.counters["roofline"] = Counter(t_min / per_layer);

  const std::string key = std::to_string(static_cast<int>(op)) + "/" +
                          std::to_string(100000000 + context) + "/" +
                          (std::is_same_v<Storage, float> ? "0" : "1");
  Summary& s = g_summary[key];
  s.op = name_of(op);
  s.storage = tpattn::name_of(tpattn::storage_type_of<Storage>);
  s.elements_per_token = c.record.elements_per_token();
  s.bytes_per_token = bytes_per_token;
  s.context = context;
  s.layers = layers;
  s.bytes = bytes;
  s.flops = flops;
  s.t_min = t_min;
  s.seconds_per_layer.push_back(per_layer);
}

constexpr int kRepetitions = 3;

void register_all() {
  benchmark::RegisterBenchmark("MemoryBandwidth/1GiB", BM_MemoryBandwidth)
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
  benchmark::RegisterBenchmark("GemmPeak/1024", BM_GemmPeak)
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
  for (Op op : {Op::mha, Op::gqa, Op::mqa, Op::mla, Op::tpa, Op::tpa_kv_only}) {
    for (Index context : {1024, 8192}) {
      benchmark::RegisterBenchmark((std::string("Decode/") + name_of(op) + "/f32").c_str(),
                                   [op](benchmark::State& state) { BM_Decode<float>(state, op); })
          ->Arg(context)
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(0.2)
          ->Repetitions(kRepetitions)
          ->ReportAggregatesOnly(true);
      benchmark::RegisterBenchmark(
          (std::string("Decode/") + name_of(op) + "/bf16").c_str(),
          [op](benchmark::State& state) { BM_Decode<Eigen::bfloat16>(state, op); })
          ->Arg(context)
          ->Unit(benchmark::kMicrosecond)
          ->MinTime(0.2)
          ->Repetitions(kRepetitions)
          ->ReportAggregatesOnly(true);
    }
  }
}

void print_memory_table() {
  std::printf("\nKV-cache elements per token per layer (spec §5; the TPA paper's model sizes)\n");
  std::printf("%-7s %8s %6s %6s %10s %8s %8s %8s\n", "size", "d_model", "h", "h_TPA", "MHA",
              "GQA(2)", "MLA", "TPA");
  struct Size {
    const char* name;
    Index d, h, h_tpa, d_c;
  };
  for (const Size& s : {Size{"small", 768, 12, 34, 256}, Size{"medium", 1024, 16, 47, 512},
                        Size{"large", 1280, 20, 61, 512}, Size{"XL", 1600, 25, 78, 512}}) {
    std::printf("%-7s %8td %6td %6td %10td %8td %8td %8td\n", s.name, s.d, s.h, s.h_tpa,
                tpattn::records::gqa(s.h, 64, 64).elements_per_token(),
                tpattn::records::gqa(2, 64, 64).elements_per_token(),
                tpattn::records::mla(s.d_c, 32).elements_per_token(),
                tpattn::records::tpa(s.h_tpa, 64, 64, 2, 2).elements_per_token());
  }
}

void print_decode_table() {
  std::printf(
      "\nDecode attention, one token through one layer, single thread, median of %d "
      "repetitions.\nLimits measured in this run: %.1f GB/s streaming read, %.1f GFLOP/s "
      "fp32 GEMM; roofline = max(bytes / BW, flops / peak) / time.\n",
      kRepetitions, g_bandwidth / 1e9, g_flop_peak / 1e9);
  std::printf("%-11s %-5s %7s %9s %7s %7s %10s %8s %9s %8s\n", "operator", "store", "elems",
              "bytes/tok", "context", "layers", "us/layer", "GB/s", "GFLOP/s", "roofline");
  for (const auto& entry : g_summary) {
    const Summary& s = entry.second;
    const double t = s.median_seconds();
    std::printf("%-11s %-5s %7td %9td %7td %7td %10.2f %8.2f %9.2f %8.2f\n", s.op.c_str(),
                s.storage.c_str(), s.elements_per_token, s.bytes_per_token, s.context, s.layers,
                t * 1e6, s.bytes / t / 1e9, s.flops / t / 1e9, s.t_min / t);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  print_memory_table();
  benchmark::RunSpecifiedBenchmarks();
  if (!g_summary.empty()) print_decode_table();
  std::printf(
      "\nNote: Debian's Google Benchmark prints 'Library was built as DEBUG'; that concerns "
      "the benchmark library's own code, not tpattn's (built -O3 -march=native).\n");
  benchmark::Shutdown();
  return 0;
}
