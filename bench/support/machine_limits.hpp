// bench/support/machine_limits.hpp -- this machine's limits, measured in the benchmark's own run:
// streaming read bandwidth and the fp32 FMA peak, at each thread count the rows use
// (docs/benchmarks.md, "The limits").
//
// A decode step reads its whole cache once, so its floor is bytes / bandwidth; TPA and absorbed
// MLA do many flops per cached byte, so theirs can be flops / FMA peak. Both probes use Eigen's
// SIMD packets (the widths the kernels use); this is the only bench file that touches
// Eigen::internal, so an Eigen change touches one place.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "tpattn/core/matrix.hpp"
#include "tpattn/kernels/simd.hpp"

namespace tpattn_bench {

using tpattn::Index;

namespace detail {
using Packet = Eigen::internal::packet_traits<float>::type;
constexpr Index kPacketFloats = Eigen::internal::packet_traits<float>::size;

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Keeps a value alive without a benchmark library call (these probes run before it starts).
inline void keep(const void* p) { asm volatile("" : : "g"(p) : "memory"); }

// Runs probe(thread) on `threads` threads at once (the calling thread is thread 0), released
// together, and returns the longest of their times in seconds: the time all of them needed.
template <class Probe>
double run_together(int threads, Probe probe) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> seconds(static_cast<std::size_t>(threads), 0.0);
  const auto body = [&](int t) {
    ready.fetch_add(1);
    while (!go.load()) {
    }
    const auto start = std::chrono::steady_clock::now();
    probe(t);
    seconds[static_cast<std::size_t>(t)] = seconds_since(start);
  };
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) workers.emplace_back(body, t);
  while (ready.load() < threads - 1) {
  }
  ready.fetch_add(1);
  go.store(true);
  body(0);
  for (std::thread& w : workers) w.join();
  return *std::max_element(seconds.begin(), seconds.end());
}
}  // namespace detail

// The read patterns the bandwidth probe tries: the buffer read as this many equal parts side by
// side (a kernel reads K and V, or several heads' pages, as parallel streams), with or without
// a software prefetch ahead of each stream (as the dense scorer issues).
struct ReadPattern {
  int streams = 1;
  bool prefetch = false;
};
inline constexpr ReadPattern kReadPatterns[] = {{1, false}, {2, false}, {4, false}, {8, false},
                                                {1, true},  {2, true},  {4, true},  {8, true}};

namespace detail {
inline constexpr int kReadChains = 16;
inline constexpr Index kPrefetchAhead = 1024;  // bytes ahead of each stream

// Bytes per second of one thread per buffer at once, each reading its buffer but the last
// kPrefetchAhead bytes in `pattern`, the best of `passes`. 16 independent packet accumulators
// per thread: one add chain would wait on the add latency and under-read the memory (>= 8 are
// needed).
inline double read_rate(const std::vector<std::vector<float>>& buffers, int passes,
                        ReadPattern pattern) {
  const int threads = static_cast<int>(buffers.size());
  const int streams = pattern.streams;
  const int per_stream = kReadChains / streams;  // packets of each stream per step
  const Index step = per_stream * kPacketFloats;
  const Index usable =
      static_cast<Index>(buffers.front().size()) - kPrefetchAhead / Index(sizeof(float));
  const Index part = usable / streams / step * step;  // floats of one stream
  const auto read = [&](int t) {
    const float* data = buffers[static_cast<std::size_t>(t)].data();
    Packet acc[kReadChains];
    for (Packet& a : acc) a = Eigen::internal::pset1<Packet>(0.0f);
    for (Index i = 0; i < part; i += step) {
      for (int s = 0; s < streams; ++s) {
        const float* at = data + s * part + i;
        if (pattern.prefetch)
          tpattn::simd::prefetch(reinterpret_cast<const char*>(at) + kPrefetchAhead,
                                 step * Index(sizeof(float)));
        for (int c = 0; c < per_stream; ++c)
          acc[s * per_stream + c] = Eigen::internal::padd(
              acc[s * per_stream + c], Eigen::internal::ploadu<Packet>(at + c * kPacketFloats));
      }
    }
    for (int c = 1; c < kReadChains; ++c) acc[0] = Eigen::internal::padd(acc[0], acc[c]);
    float total = Eigen::internal::predux(acc[0]);
    keep(&total);
  };
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const double seconds = run_together(threads, read);
    best = std::max(best, static_cast<double>(part) * streams * threads * sizeof(float) / seconds);
  }
  return best;
}
}  // namespace detail

// Bytes per second of `threads` threads at once each reading its share of `bytes` (make it far
// beyond the L3) in `pattern`, the best of `passes` over buffers written once.
inline double measure_read_pattern(Index bytes, int passes, int threads, ReadPattern pattern) {
  std::vector<std::vector<float>> buffers(static_cast<std::size_t>(threads));
  for (auto& buffer : buffers)  // paged in
    buffer.assign(static_cast<std::size_t>(bytes / threads / Index(sizeof(float))), 1.0f);
  return detail::read_rate(buffers, passes, pattern);
}

// The read bandwidth limit: the best of every kReadPatterns entry, `passes` passes each. One
// sequential stream alone is not an upper bound: a kernel reading a few streams side by side
// read faster than it on a Zen 3 core (21.3 against 19.6 GB/s), which put a row above 1.0.
inline double measure_read_bandwidth(Index bytes, int passes, int threads = 1) {
  std::vector<std::vector<float>> buffers(static_cast<std::size_t>(threads));
  for (auto& buffer : buffers)  // paged in once for every pattern
    buffer.assign(static_cast<std::size_t>(bytes / threads / Index(sizeof(float))), 1.0f);
  double best = 0.0;
  for (const ReadPattern& pattern : kReadPatterns)
    best = std::max(best, detail::read_rate(buffers, passes, pattern));
  return best;
}

// Flop per second of `threads` threads at once, each running register-resident loops of 12
// independent FMA chains (the FMA latency, 4-5 cycles, times two pipes needs >= 10 chains in
// flight), the best of `passes`. The chains multiply by a number just below one and add a
// small one, so values stay normal and bounded.
inline double measure_fma_peak(int passes, int threads = 1) {
  using namespace detail;
  constexpr int kChains = 12;
  constexpr Index kIterations = Index(1) << 24;
  const auto loop = [&](int) {
    volatile float opaque = 0.999999f;  // unknown to the compiler: the loop cannot be folded
    const float seed = opaque;
    const Packet scale = Eigen::internal::pset1<Packet>(seed);
    const Packet shift = Eigen::internal::pset1<Packet>(1e-7f * seed);
    Packet acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = Eigen::internal::pset1<Packet>(0.5f + 0.01f * c);
    for (Index i = 0; i < kIterations; ++i) {
      for (int c = 0; c < kChains; ++c) acc[c] = Eigen::internal::pmadd(acc[c], scale, shift);
    }
    for (int c = 1; c < kChains; ++c) acc[0] = Eigen::internal::padd(acc[0], acc[c]);
    float total = Eigen::internal::predux(acc[0]);
    keep(&total);
  };
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const double seconds = run_together(threads, loop);
    best = std::max(
        best, 2.0 * kChains * kPacketFloats * static_cast<double>(kIterations) * threads / seconds);
  }
  return best;
}

// Flop per second of an n^3 fp32 GEMM through Eigen, one thread, the best of `passes`. A
// reference beside the FMA peak (what a well-packed product reaches), never the limit.
inline double measure_gemm_rate(Index n, int passes) {
  const tpattn::RowMatrix a = tpattn::RowMatrix::Random(n, n), b = tpattn::RowMatrix::Random(n, n);
  tpattn::RowMatrix c(n, n);
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    c.noalias() = a * b;
    detail::keep(c.data());
    best = std::max(best, 2.0 * static_cast<double>(n) * n * n / detail::seconds_since(start));
  }
  return best;
}

// The L3 of the core running this in bytes: sysfs, else sysconf, else 32 MiB (what this
// project's CI machines have). sysfs first: under a hypervisor glibc's sysconf can report the
// host's summed L3 (320 MiB seen on a 32 MiB guest).
inline Index l3_cache_bytes() {
  std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index3/size");
  Index value = 0;
  char unit = 0;
  if (file >> value >> unit && value > 0)
    return unit == 'M' ? value << 20 : unit == 'K' ? value << 10 : value;
  const long from_sysconf = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (from_sysconf > 0) return from_sysconf;
  return Index(32) << 20;
}

// Physical memory in bytes (0 when unknown).
inline Index physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? Index(pages) * Index(page) : 0;
}

// The CPU's model name from /proc/cpuinfo, or "unknown".
inline std::string cpu_model_name() {
  std::ifstream file("/proc/cpuinfo");
  std::string line;
  while (std::getline(file, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown";
}

}  // namespace tpattn_bench
