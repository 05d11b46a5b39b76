// tests/driver_test.cpp -- the one batched attention path (kernels/attention_plan.hpp cuts a
// batch into work items, kernels/attention_driver.hpp runs them on an Executor and merges split
// key ranges by log-sum-exp) for every operator family: MHA, MQA, GQA, MLA, TPA (factored
// queries) and TPA-KVonly, with float and bfloat16 caches.
//
//   DriverLayer         layer decode of a ragged batch and prefill onto a cache: the same output
//                       with no executor and with ThreadPools of 1, 2, 3 and 7 threads, and the
//                       double reference's; forward() (continuous batching) equals separate calls
//   DriverWindow        sliding windows (1, 7, 100, 300, 1000, beyond the context) on decode and
//                       prefill against a reference that restricts each query to its window;
//                       a negative window is an Error
//   DriverKernel        bare kernels' batched run() with plans for 1, 2, 3 and 7 threads, on
//                       executors with fewer, as many or more threads than the plan, or none:
//                       the single-sequence attend() and the reference, output and LSE; random
//                       ragged batches with windows (DriverKernelRandom)
//   DriverMismatch      run() with a plan for other lengths, batch, shape, or views of another
//                       record: an Error naming the difference, nothing written
//   DriverFailure       an executor (or an engine's cache view) that fails: the layer throws
//                       tpattn::Error and the cache is exactly as before
//   DriverExecutor      ThreadPool runs every task once, whatever the task count
//   DriverAllocation    a steady-state decode step on a ThreadPool allocates nothing
//   DriverPlan          AttentionPlan: every (sequence, query token, key) exactly once, splits,
//                       tasks, workspace bounds, bad input
// scripts/tsan.sh runs these tests under ThreadSanitizer.
//
// Tolerances. Outputs are O(1) (weights ~ N(0, 1/fan_in), inputs ~ N(0, 1)); every bound is
// max |actual - expected| <= tol * max(1, max |expected|), and |lse - expected| <= tol *
// max(1, |expected|) for the natural-log LSE.
//  - against the double reference whose keys and values are read back from the cache (so the
//    storage's rounding is in both), or computed in double for a float cache: 2e-5. An output is
//    a few chained fp32 reductions (d_model-long projections, a softmax over up to 2000 keys, an
//    output projection); measured up to 7.6e-7, while a dropped or doubled key range moves an
//    output by 1e-2 or more.
//  - a bfloat16 cache against the unrounded reference: 1e-2, a few units of bf16's u = 2^-8 (as
//    in gqa_test, mla_test and tpa_test); 2e-2 for TPA, whose keys and values are products of
//    two rounded factors.
//  - two plans (thread counts) that only sum in another order: 1e-5 (measured up to 4.2e-7).
//    One plan on different executors: bitwise equal (which task runs which item must not
//    matter), and a one-thread plan is bitwise the unsplit kernel.
// clang-format off
#include "support/check_capture.hpp"  // first: before Eigen and any tpattn header; it also brings
                                      // this executable's one copy of support/counting_new.hpp
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "support/allocation_counter.hpp"
#include "support/mla_reference.hpp"
#include "support/reference.hpp"
#include "support/tpa_reference.hpp"
#include "tpattn/core/executor.hpp"
#include "tpattn/kernels/attention_driver.hpp"
#include "tpattn/kernels/attention_plan.hpp"
#include "tpattn/tpattn.hpp"

namespace tpattn::test {
namespace {

namespace ref = ::tpattn_test;
using ref::Tensor3;
using Bf16 = Eigen::bfloat16;
using RowMatrixD = ref::RowMatrixD;

constexpr double kFp32Tolerance = 2e-5;
constexpr double kBf16Tolerance = 1e-2;
constexpr double kReorderTolerance = 1e-5;
constexpr Index kDModel = 48;
constexpr Index kPageTokens = 16;
constexpr Index kRoom = 40;  // tokens each test sequence can still take after its scenario
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- comparisons --------------------------------------------------------------------------------

// max |actual - expected| / max(1, max |expected|); NaN anywhere gives +inf.
double relative_error(const float* actual, const double* expected, Index n) {
  return ref::max_abs_error(actual, expected, n) / std::max(1.0, ref::max_abs(expected, n));
}

double relative_error(const float* actual, const float* expected, Index n) {
  std::vector<double> wide(expected, expected + n);
  return relative_error(actual, wide.data(), n);
}

double relative_error(const std::vector<float>& actual, const std::vector<float>& expected) {
  EXPECT_EQ(actual.size(), expected.size());
  return relative_error(actual.data(), expected.data(),
                        static_cast<Index>(std::min(actual.size(), expected.size())));
}

double relative_error(const RowMatrix& actual, const RowMatrixD& expected) {
  EXPECT_EQ(actual.rows(), expected.rows());
  EXPECT_EQ(actual.cols(), expected.cols());
  return relative_error(actual.data(), expected.data(), expected.size());
}

double relative_error(const RowMatrix& actual, const RowMatrix& expected) {
  EXPECT_EQ(actual.rows(), expected.rows());
  EXPECT_EQ(actual.cols(), expected.cols());
  return relative_error(actual.data(), expected.data(), expected.size());
}

bool bitwise_equal(const float* a, const float* b, Index n) {
  return std::memcmp(a, b, static_cast<std::size_t>(n) * sizeof(float)) == 0;
}
bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && bitwise_equal(a.data(), b.data(), static_cast<Index>(a.size()));
}
bool bitwise_equal(const RowMatrix& a, const RowMatrix& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         bitwise_equal(a.data(), b.data(), a.size());
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// What f() throws.
struct Caught {
  std::string kind = "<nothing thrown>";
  std::string call, argument, message;
};

Caught caught(const std::function<void()>& f) {
  Caught c;
  try {
    f();
  } catch (const Error& error) {
    c = {"tpattn::Error", error.call(), error.argument(), error.what()};
  } catch (const std::exception& error) {
    c.kind = std::string("another exception: ") + error.what();
  } catch (...) {
    c.kind = "a non-standard exception";
  }
  return c;
}

// ---- executors ----------------------------------------------------------------------------------

// Pools live for the whole executable, so tests do not start threads over and over.
ThreadPool& pool(Index threads) {
  static std::unique_ptr<ThreadPool> pools[8];
  std::unique_ptr<ThreadPool>& p = pools[threads];
  if (p == nullptr) p = std::make_unique<ThreadPool>(threads);
  return *p;
}

// Runs the tasks on the calling thread, the last first: which task takes which item, and in what
// order, must not change any result.
class ReverseExecutor final : public Executor {
 public:
  explicit ReverseExecutor(Index concurrency) : concurrency_(concurrency) {}
  Index concurrency() const override { return concurrency_; }
  void run(Index tasks, TaskRef task) override {
    last_tasks = tasks;
    for (Index i = tasks; i-- > 0;) task(i);
  }
  Index last_tasks = 0;

 private:
  Index concurrency_;
};

struct NamedExecutor {
  std::string name;
  Executor* executor;
};

// No executor, then ThreadPools of 1, 2, 3 and 7 threads.
std::vector<NamedExecutor> thread_counts() {
  return {{"no executor", nullptr},
          {"ThreadPool(1)", &pool(1)},
          {"ThreadPool(2)", &pool(2)},
          {"ThreadPool(3)", &pool(3)},
          {"ThreadPool(7)", &pool(7)}};
}

// ---- storage and caches -------------------------------------------------------------------------

template <class F>
decltype(auto) with_storage(StorageType type, F&& f) {
  if (type == StorageType::bf16) return f(Bf16{});
  return f(float{});
}

enum class CacheKind { contiguous, paged };

// A plane of a cached sequence as doubles [tokens, rows, cols]: what the kernels read.
Tensor3 read_plane(const SequenceView& view, Index plane) {
  const PlaneSpec& spec = view.record().plane(plane);
  Tensor3 tensor(view.length(), spec.rows, spec.cols);
  with_storage(spec.storage, [&](auto tag) {
    using S = decltype(tag);
    const Index width = view.elements_per_token(plane);
    for (Index t = 0; t < view.length(); ++t) {
      const S* row =
          view.plane_block<S>(plane, t / view.block_tokens()) + (t % view.block_tokens()) * width;
      for (Index c = 0; c < width; ++c)
        tensor.row(t, 0)[c] = static_cast<double>(static_cast<float>(row[c]));
    }
  });
  return tensor;
}

std::vector<Tensor3> read_planes(const SequenceView& view) {
  std::vector<Tensor3> planes;
  for (Index p = 0; p < view.record().plane_count(); ++p) planes.push_back(read_plane(view, p));
  return planes;
}

// Every byte of every plane of a sequence, in token order.
std::vector<unsigned char> sequence_bytes(const KvCache& cache, SequenceId seq) {
  std::vector<unsigned char> bytes;
  const SequenceView view = cache.view(seq);
  for (Index p = 0; p < cache.record().plane_count(); ++p) {
    const Index row_bytes = view.record().plane(p).bytes_per_token();
    for (Index t = 0; t < view.length(); ++t) {
      const Index block = t / view.block_tokens();
      const auto* first = reinterpret_cast<const unsigned char*>(with_storage(
                              view.record().plane(p).storage,
                              [&](auto tag) {
                                using S = decltype(tag);
                                return static_cast<const void*>(view.plane_block<S>(p, block));
                              })) +
                          (t % view.block_tokens()) * row_bytes;
      bytes.insert(bytes.end(), first, first + row_bytes);
    }
  }
  return bytes;
}

// What a failed call must not change.
struct CacheSnapshot {
  Index bytes_used = 0;
  Index sequence_count = 0;
  Index free_pages = -1;  // paged caches only
  std::vector<Index> lengths;
  std::vector<Index> available;
  std::vector<std::vector<unsigned char>> bytes;
};

CacheSnapshot snapshot(const KvCache& cache, const std::vector<SequenceId>& seqs) {
  CacheSnapshot s;
  s.bytes_used = cache.bytes_used();
  s.sequence_count = cache.sequence_count();
  if (const auto* paged = dynamic_cast<const PagedKvCache*>(&cache))
    s.free_pages = paged->free_page_count();
  for (SequenceId seq : seqs) {
    s.lengths.push_back(cache.length(seq));
    s.available.push_back(cache.tokens_available(seq));
    s.bytes.push_back(sequence_bytes(cache, seq));
  }
  return s;
}

void expect_same(const CacheSnapshot& before, const CacheSnapshot& after, const std::string& what) {
  EXPECT_EQ(before.bytes_used, after.bytes_used) << what;
  EXPECT_EQ(before.sequence_count, after.sequence_count) << what;
  EXPECT_EQ(before.free_pages, after.free_pages) << what;
  EXPECT_EQ(before.lengths, after.lengths) << what;
  EXPECT_EQ(before.available, after.available) << what;
  EXPECT_TRUE(before.bytes == after.bytes) << what << ": cached data changed";
}

// A cache with `capacities.size()` sequences, sequence b able to hold capacities[b] tokens.
struct TestCache {
  std::unique_ptr<KvCache> cache;
  std::vector<SequenceId> seqs;
};

TestCache make_cache(const CacheRecord& record, CacheKind kind,
                     const std::vector<Index>& capacities) {
  const Index batch = static_cast<Index>(capacities.size());
  TestCache c;
  if (kind == CacheKind::contiguous) {
    c.cache = std::make_unique<ContiguousKvCache>(
        record, batch, *std::max_element(capacities.begin(), capacities.end()));
  } else {
    Index pages = 0;
    for (Index capacity : capacities) pages += (capacity + kPageTokens - 1) / kPageTokens;
    c.cache = std::make_unique<PagedKvCache>(record, kPageTokens, pages, batch);
  }
  for (Index b = 0; b < batch; ++b) c.seqs.push_back(c.cache->add_sequence());
  return c;
}

// Appends tokens [0, counts[b]) of planes[b] (record order, [tokens, rows, cols]) to sequence b,
// in interleaved rounds of up to 97 tokens, so a paged sequence's pages are not adjacent.
void append_planes(TestCache& c, const std::vector<const std::vector<Tensor3>*>& planes,
                   const std::vector<Index>& counts) {
  std::vector<Index> done(counts.size(), 0);
  for (bool more = true; more;) {
    more = false;
    for (std::size_t b = 0; b < counts.size(); ++b) {
      const Index n = std::min<Index>(97, counts[b] - done[b]);
      if (n <= 0) continue;
      std::vector<std::vector<float>> data;
      std::vector<PlaneInput> inputs;
      for (const Tensor3& plane : *planes[b]) data.push_back(plane.slice(done[b], n).to_floats());
      for (std::size_t p = 0; p < data.size(); ++p)
        inputs.push_back({data[p].data(), (*planes[b])[p].heads, (*planes[b])[p].width});
      c.cache->append(c.seqs[b], n, inputs.data(), static_cast<Index>(inputs.size()));
      done[b] += n;
      more = more || done[b] < counts[b];
    }
  }
}

// ---- the reference: causal attention restricted to a sliding window ----------------------------

// q [Tq, h, d_k], k [Tk, g, d_k], v [Tk, g, d_v]: query t sits at position p = Tk - Tq + t and
// sees the keys [max(0, p + 1 - window), p + 1) (window 0: [0, p + 1)). Head i reads KV head
// i / (h / g). Output and natural-log LSE, in double.
ref::AttentionResult windowed_attention(const Tensor3& q, const Tensor3& k, const Tensor3& v,
                                        double scale, Index window) {
  ref::require(q.width == k.width && k.tokens == v.tokens && k.heads == v.heads &&
                   q.heads % k.heads == 0 && q.tokens <= k.tokens,
               "windowed_attention: shapes");
  const Index group = q.heads / k.heads;
  ref::AttentionResult result{Tensor3(q.tokens, q.heads, v.width),
                              std::vector<double>(static_cast<std::size_t>(q.tokens * q.heads))};
  std::vector<double> scores(static_cast<std::size_t>(k.tokens));
  for (Index t = 0; t < q.tokens; ++t) {
    const Index upper = k.tokens - q.tokens + t + 1;
    const Index lower = window > 0 ? std::max<Index>(0, upper - window) : 0;
    for (Index i = 0; i < q.heads; ++i) {
      const Index kv = i / group;
      double top = -std::numeric_limits<double>::infinity();
      for (Index s = lower; s < upper; ++s) {
        double dot = 0.0;
        for (Index c = 0; c < q.width; ++c) dot += q.row(t, i)[c] * k.row(s, kv)[c];
        scores[static_cast<std::size_t>(s)] = scale * dot;
        top = std::max(top, scale * dot);
      }
      double sum = 0.0;
      double* out = result.out.row(t, i);
      for (Index s = lower; s < upper; ++s) {
        const double weight = std::exp(scores[static_cast<std::size_t>(s)] - top);
        sum += weight;
        for (Index c = 0; c < v.width; ++c) out[c] += weight * v.row(s, kv)[c];
      }
      for (Index c = 0; c < v.width; ++c) out[c] /= sum;
      result.lse[static_cast<std::size_t>(t * q.heads + i)] = top + std::log(sum);
    }
  }
  return result;
}

struct KeysValues {
  Tensor3 k;  // [L, kv heads, key width]
  Tensor3 v;  // [L, kv heads, value width]
};

// [tokens, 1, a.width + b.width]: each token's a then b.
Tensor3 concatenate(const Tensor3& a, const Tensor3& b) {
  Tensor3 joined(a.tokens, 1, a.width + b.width);
  for (Index t = 0; t < a.tokens; ++t) {
    for (Index c = 0; c < a.width; ++c) joined.at(t, 0, c) = a.at(t, 0, c);
    for (Index c = 0; c < b.width; ++c) joined.at(t, 0, a.width + c) = b.at(t, 0, c);
  }
  return joined;
}

// y [T, d_model] = [o_1 .. o_h] W_O^T for o [T, h, d_v].
Eigen::MatrixXd output_projection(const RowMatrix& w_o, const Tensor3& o) {
  Eigen::MatrixXd flat(o.tokens, o.heads * o.width);
  for (Index t = 0; t < o.tokens; ++t)
    for (Index n = 0; n < o.heads * o.width; ++n) flat(t, n) = o.row(t, 0)[n];
  return flat * w_o.cast<double>().transpose();
}

// ---- the operator families ----------------------------------------------------------------------

enum class Family { mha, mqa, gqa, mla, tpa, tpa_kv_only };
constexpr Family kFamilies[] = {Family::mha, Family::mqa, Family::gqa,
                                Family::mla, Family::tpa, Family::tpa_kv_only};

const char* name_of(Family family) {
  switch (family) {
    case Family::mha: return "MHA";
    case Family::mqa: return "MQA";
    case Family::gqa: return "GQA";
    case Family::mla: return "MLA";
    case Family::tpa: return "TPA";
    case Family::tpa_kv_only: return "TPAKVonly";
  }
  return "?";
}

bool is_gqa_like(Family family) {
  return family == Family::mha || family == Family::mqa || family == Family::gqa;
}

bool is_tpa(Family family) { return family == Family::tpa || family == Family::tpa_kv_only; }

// Against the unrounded double reference. TPA's keys and values are products of two rounded
// factors (A_K and B_K, A_V and B_V), so they move by about 2u where the others' move by u:
// measured up to 1.2e-2 for TPA (a 37-token prefill), up to 7.6e-3 for the others.
double storage_tolerance(StorageType storage, Family family) {
  if (storage == StorageType::f32) return kFp32Tolerance;
  return is_tpa(family) ? 2 * kBf16Tolerance : kBf16Tolerance;
}

// The whole-layer operators behind one interface, so one test body serves every family.
class AnyLayer {
 public:
  virtual ~AnyLayer() = default;
  virtual const CacheRecord& cache_record() const = 0;
  virtual std::string name() const = 0;
  virtual void decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y,
                      Executor* executor) = 0;
  virtual void prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y,
                       Executor* executor) = 0;
  virtual void forward(KvCache& cache, const SequenceId* seqs, const Index* new_tokens, Index batch,
                       const float* x, float* y, Executor* executor) = 0;
  virtual void reserve(Index max_batch, Index max_tokens, Index threads) = 0;
};

template <class Op>
class LayerOf final : public AnyLayer {
 public:
  template <class... Args>
  LayerOf(std::string name, Args&&... args)
      : name_(std::move(name)), op_(std::forward<Args>(args)...) {}
  const CacheRecord& cache_record() const override { return op_.cache_record(); }
  std::string name() const override { return name_; }
  void decode(KvCache& cache, const SequenceId* seqs, Index batch, const float* x, float* y,
              Executor* executor) override {
    op_.decode(cache, seqs, batch, x, y, executor);
  }
  void prefill(KvCache& cache, SequenceId seq, Index n, const float* x, float* y,
               Executor* executor) override {
    op_.prefill(cache, seq, n, x, y, executor);
  }
  void forward(KvCache& cache, const SequenceId* seqs, const Index* new_tokens, Index batch,
               const float* x, float* y, Executor* executor) override {
    op_.forward(cache, seqs, new_tokens, batch, x, y, executor);
  }
  void reserve(Index max_batch, Index max_tokens, Index threads) override {
    op_.reserve(max_batch, max_tokens, threads);
  }

 private:
  std::string name_;
  Op op_;
};

// One sequence's tokens 0 .. L-1 in double, as the reference sees them.
struct Projected {
  std::vector<Tensor3> planes;  // record order, every token as cached (rotated)
  Tensor3 queries;              // [L, h, key width]: the (materialised, explicit) queries
};

// A family's config and random weights, its layer, and the same layer in double.
class Model {
 public:
  Model(Family family, std::uint32_t seed) : family_(family) {
    switch (family) {
      case Family::mha:  // odd head dim, partial rotary
        gqa_ = gqa_config(4, 4, 33, 0, 32);
        break;
      case Family::mqa: gqa_ = gqa_config(6, 1, 40, 24, 0); break;
      case Family::gqa: gqa_ = gqa_config(8, 2, 16, 0, 0); break;
      case Family::mla:
        mla_.d_model = kDModel;
        mla_.heads = 4;
        mla_.head_dim = 16;
        mla_.rope_dim = 8;
        mla_.value_dim = 12;
        mla_.kv_latent_dim = 32;
        mla_.q_latent_dim = 24;
        break;
      case Family::tpa: tpa_ = tpa_config(6, 16, 3, 2, 2); break;
      case Family::tpa_kv_only: tpa_ = tpa_config(4, 40, 0, 2, 3); break;
    }
    if (is_gqa_like(family)) gqa_weights_ = ref::random_gqa_weights(gqa_, seed);
    if (family == Family::mla) mla_weights_ = ref::random_mla_weights(mla_, seed);
    if (is_tpa(family)) tpa_weights_ = ref::random_tpa_weights(tpa_, seed);
  }

  Family family() const { return family_; }

  std::unique_ptr<AnyLayer> layer(StorageType storage, Index window) const {
    return with_storage(storage, [&](auto tag) -> std::unique_ptr<AnyLayer> {
      using S = decltype(tag);
      GqaConfig gqa = gqa_;
      MlaConfig mla = mla_;
      TpaConfig tpa = tpa_;
      gqa.window = mla.window = tpa.window = window;
      switch (family_) {
        case Family::mha:
          return std::make_unique<LayerOf<MultiHeadAttention<S>>>("MultiHeadAttention", gqa,
                                                                  gqa_weights_);
        case Family::mqa:
          return std::make_unique<LayerOf<MultiQueryAttention<S>>>("MultiQueryAttention", gqa,
                                                                   gqa_weights_);
        case Family::gqa:
          return std::make_unique<LayerOf<GroupedQueryAttention<S>>>("GroupedQueryAttention", gqa,
                                                                     gqa_weights_);
        case Family::mla:
          return std::make_unique<LayerOf<MultiHeadLatentAttention<S>>>("MultiHeadLatentAttention",
                                                                        mla, mla_weights_);
        case Family::tpa:
          return std::make_unique<LayerOf<TensorProductAttention<S>>>("TensorProductAttention", tpa,
                                                                      tpa_weights_);
        case Family::tpa_kv_only:
          return std::make_unique<LayerOf<TensorProductAttentionKvOnly<S>>>(
              "TensorProductAttentionKvOnly", tpa, tpa_weights_);
      }
      return nullptr;
    });
  }

  // Every token of x [L, d_model], token t at position t.
  Projected project(const Eigen::MatrixXd& x) const {
    Projected p;
    if (is_gqa_like(family_)) {
      ref::Projections g = ref::gqa_projections(gqa_, gqa_weights_, x, 0);
      p.planes = {std::move(g.k), std::move(g.v)};
      p.queries = std::move(g.q);
    } else if (family_ == Family::mla) {
      ref::MlaProjections m = ref::mla_projections(mla_, mla_weights_, x, 0);
      p.planes = {std::move(m.latent), std::move(m.rope_key)};
      p.queries = std::move(m.q);
    } else {
      const TpaConfig c = ref::resolved(tpa_);
      const TpaWeights& w = tpa_weights_;
      const Index h = c.heads, dh = c.head_dim;
      if (c.rank_q == 0) {
        p.queries = ref::b_factor(w.w_q, x, h, dh);  // [T, h, d_h]: the same row-major split
        ref::rope_reference(p.queries, 0, c.rope);
      } else {
        Tensor3 b_q = ref::b_factor(w.w_b_q, x, c.rank_q, dh);
        ref::rotate_rows(b_q, 0, c.rope);
        p.queries = ref::materialise(ref::a_factor(w.w_a_q, x, h, c.rank_q), b_q);
      }
      Tensor3 b_k = ref::b_factor(w.w_b_k, x, c.rank_k, dh);
      ref::rotate_rows(b_k, 0, c.rope);
      p.planes = {ref::a_factor(w.w_a_k, x, h, c.rank_k), std::move(b_k),
                  ref::a_factor(w.w_a_v, x, h, c.rank_v),
                  ref::b_factor(w.w_b_v, x, c.rank_v, c.value_dim)};
    }
    return p;
  }

  // The keys and values attention sees, from the cached planes.
  KeysValues keys_values(const std::vector<Tensor3>& planes) const {
    if (is_gqa_like(family_)) return {planes[0], planes[1]};
    if (family_ == Family::mla) {
      ref::MlaExplicitKeysValues kv =
          ref::mla_explicit_keys_values(mla_, mla_weights_, planes[0], planes[1]);
      return {std::move(kv.k), std::move(kv.v)};
    }
    return {ref::materialise(planes[0], planes[1]), ref::materialise(planes[2], planes[3])};
  }

  double scale() const {
    if (is_gqa_like(family_)) return ref::gqa_scale(gqa_);
    if (family_ == Family::mla) return ref::mla_scale(mla_);
    return 1.0 / std::sqrt(static_cast<double>(tpa_.head_dim));
  }

  Eigen::MatrixXd output(const Tensor3& o) const {
    if (is_gqa_like(family_)) return output_projection(gqa_weights_.w_o, o);
    if (family_ == Family::mla) return ref::mla_output(mla_weights_, o);
    return output_projection(tpa_weights_.w_o, o);
  }

 private:
  static GqaConfig gqa_config(Index heads, Index kv_heads, Index head_dim, Index value_dim,
                              Index rotary_dim) {
    GqaConfig c;
    c.d_model = kDModel;
    c.heads = heads;
    c.kv_heads = kv_heads;
    c.head_dim = head_dim;
    c.value_dim = value_dim;
    c.rope.rotary_dim = rotary_dim;
    return c;
  }
  static TpaConfig tpa_config(Index heads, Index head_dim, Index rank_q, Index rank_k,
                              Index rank_v) {
    TpaConfig c;
    c.d_model = kDModel;
    c.heads = heads;
    c.head_dim = head_dim;
    c.rank_q = rank_q;
    c.rank_k = rank_k;
    c.rank_v = rank_v;
    return c;
  }

  Family family_;
  GqaConfig gqa_;
  GqaWeights gqa_weights_;
  MlaConfig mla_;
  MlaWeights mla_weights_;
  TpaConfig tpa_;
  TpaWeights tpa_weights_;
};

// ---- scenarios: a batch of sequences with their cached history and new tokens ------------------

struct SequenceSpec {
  Index length;      // cached tokens after the call, new ones included
  Index new_tokens;  // the call's queries: the last new_tokens of the sequence
};

struct Scenario {
  Scenario(const Model& m, std::vector<SequenceSpec> s, std::uint32_t seed)
      : model(&m), specs(std::move(s)) {
    Index rows = 0;
    for (const SequenceSpec& spec : specs) rows += spec.new_tokens;
    x_new = RowMatrix(rows, kDModel);
    Index row = 0;
    for (std::size_t b = 0; b < specs.size(); ++b) {
      x.push_back(ref::random_inputs(specs[b].length, kDModel, seed + static_cast<unsigned>(b)));
      projected.push_back(model->project(x.back().cast<double>()));
      x_new.middleRows(row, specs[b].new_tokens) = x.back().bottomRows(specs[b].new_tokens);
      row += specs[b].new_tokens;
    }
  }

  Index batch() const { return static_cast<Index>(specs.size()); }
  Index history(Index b) const { return specs[b].length - specs[b].new_tokens; }
  Index rows() const { return x_new.rows(); }
  std::vector<Index> new_tokens() const {
    std::vector<Index> n;
    for (const SequenceSpec& spec : specs) n.push_back(spec.new_tokens);
    return n;
  }

  // A cache holding every sequence's history, with kRoom tokens to spare in each.
  TestCache cache(const CacheRecord& record, CacheKind kind) const {
    std::vector<Index> capacities, history_counts;
    std::vector<const std::vector<Tensor3>*> planes;
    for (Index b = 0; b < batch(); ++b) {
      capacities.push_back(specs[b].length + kRoom);
      history_counts.push_back(history(b));
      planes.push_back(&projected[b].planes);
    }
    TestCache c = make_cache(record, kind, capacities);
    append_planes(c, planes, history_counts);
    return c;
  }

  // The reference output of the batch's new tokens [rows, d_model], with the keys and values of
  // planes_of(b) (all specs[b].length tokens of sequence b).
  RowMatrixD expected(const std::function<std::vector<Tensor3>(Index)>& planes_of,
                      Index window) const {
    RowMatrixD y(rows(), kDModel);
    Index row = 0;
    for (Index b = 0; b < batch(); ++b) {
      const KeysValues kv = model->keys_values(planes_of(b));
      const Tensor3 q = projected[b].queries.slice(history(b), specs[b].new_tokens);
      y.middleRows(row, specs[b].new_tokens) =
          model->output(windowed_attention(q, kv.k, kv.v, model->scale(), window).out);
      row += specs[b].new_tokens;
    }
    return y;
  }

  // Keys and values computed in double from x, never rounded through the cache's storage.
  RowMatrixD expected_from_projection(Index window) const {
    return expected([&](Index b) { return projected[b].planes; }, window);
  }
  // Keys and values read back from the cache after the call (the storage's rounding included).
  RowMatrixD expected_from_cache(const TestCache& c, Index window) const {
    return expected([&](Index b) { return read_planes(c.cache->view(c.seqs[b])); }, window);
  }

  const Model* model;
  std::vector<SequenceSpec> specs;
  std::vector<RowMatrix> x;  // every token of each sequence, [length, d_model]
  std::vector<Projected> projected;
  RowMatrix x_new;  // the batch's new tokens, sequence by sequence
};

enum class Call { decode, prefill, forward };

const char* name_of(Call call) {
  switch (call) {
    case Call::decode: return "decode";
    case Call::prefill: return "prefill";
    case Call::forward: return "forward";
  }
  return "?";
}

// The scenario's new tokens through the layer: decode (one new token each), prefill (one
// sequence) or forward.
RowMatrix run_layer(AnyLayer& layer, Call call, TestCache& c, const Scenario& s,
                    Executor* executor) {
  RowMatrix y = RowMatrix::Constant(s.rows(), kDModel, kNaN);
  switch (call) {
    case Call::decode:
      layer.decode(*c.cache, c.seqs.data(), s.batch(), s.x_new.data(), y.data(), executor);
      break;
    case Call::prefill:
      layer.prefill(*c.cache, c.seqs[0], s.specs[0].new_tokens, s.x_new.data(), y.data(), executor);
      break;
    case Call::forward: {
      const std::vector<Index> n = s.new_tokens();
      layer.forward(*c.cache, c.seqs.data(), n.data(), s.batch(), s.x_new.data(), y.data(),
                    executor);
      break;
    }
  }
  return y;
}

// Cuts every sequence back to its history.
void roll_back(TestCache& c, const Scenario& s) {
  for (Index b = 0; b < s.batch(); ++b) c.cache->truncate(c.seqs[b], s.history(b));
}

std::vector<SequenceSpec> decode_batch(const std::vector<Index>& lengths) {
  std::vector<SequenceSpec> specs;
  for (Index length : lengths) specs.push_back({length, 1});
  return specs;
}

// Lengths 1 (a first token), 3, and lengths that are no multiple of 64 or 128.
const std::vector<Index> kRaggedLengths = {1, 3, 130, 700, 2000};

// Runs `call` with no executor and with ThreadPools of 1, 2, 3 and 7 threads: all give the same
// output up to fp32 reordering (bitwise with one thread), and the double reference's.
void expect_thread_count_independent(const Model& model, StorageType storage, CacheKind kind,
                                     const Scenario& s, Call call, Index window) {
  const std::unique_ptr<AnyLayer> layer = model.layer(storage, window);
  TestCache c = s.cache(layer->cache_record(), kind);
  RowMatrix alone;
  for (const NamedExecutor& e : thread_counts()) {
    SCOPED_TRACE(std::string(name_of(call)) + " with " + e.name + ", window " +
                 std::to_string(window));
    const RowMatrix y = run_layer(*layer, call, c, s, e.executor);
    if (e.executor == nullptr) {
      EXPECT_LE(relative_error(y, s.expected_from_cache(c, window)), kFp32Tolerance)
          << "against the reference on the cached keys and values";
      EXPECT_LE(relative_error(y, s.expected_from_projection(window)),
                storage_tolerance(storage, model.family()))
          << "against the unrounded reference";
      alone = y;
    } else if (e.executor->concurrency() == 1) {
      EXPECT_TRUE(bitwise_equal(y, alone)) << "one thread is the unsplit path";
    } else {
      EXPECT_LE(relative_error(y, alone), kReorderTolerance) << "against no executor";
    }
    roll_back(c, s);
  }
}

using FamilyStorage = std::tuple<Family, StorageType>;

std::string family_storage_name(const ::testing::TestParamInfo<FamilyStorage>& info) {
  return std::string(name_of(std::get<0>(info.param))) + "_" +
         tpattn::name_of(std::get<1>(info.param));
}

const auto kFamilyStorages = ::testing::Combine(
    ::testing::ValuesIn(kFamilies), ::testing::Values(StorageType::f32, StorageType::bf16));

// ---- layers: thread counts, continuous batching ------------------------------------------------

class DriverLayer : public ::testing::TestWithParam<FamilyStorage> {};

TEST_P(DriverLayer, RaggedDecodeIsTheSameForEveryThreadCountAndMatchesTheReference) {
  const auto [family, storage] = GetParam();
  const Model model(family, 11);
  const Scenario s(model, decode_batch(kRaggedLengths), 100);
  expect_thread_count_independent(
      model, storage, storage == StorageType::f32 ? CacheKind::paged : CacheKind::contiguous, s,
      Call::decode, 0);
}

TEST_P(DriverLayer, OddPrefillOntoACacheIsTheSameForEveryThreadCountAndMatchesTheReference) {
  const auto [family, storage] = GetParam();
  const Model model(family, 12);
  const Scenario s(model, {{337, 37}}, 200);  // 37 tokens after 300 cached ones
  expect_thread_count_independent(
      model, storage, storage == StorageType::f32 ? CacheKind::contiguous : CacheKind::paged, s,
      Call::prefill, 0);
}

// forward() with new tokens {1, 5, 1, 17} (a decode token, prompt chunks, a first token) equals
// the same work as separate decode and prefill calls on a cache built the same way.
TEST_P(DriverLayer, ForwardWithMixedNewTokensEqualsSeparateDecodeAndPrefillCalls) {
  const auto [family, storage] = GetParam();
  const Model model(family, 13);
  const Scenario s(model, {{40, 1}, {305, 5}, {1, 1}, {150, 17}}, 300);
  const std::unique_ptr<AnyLayer> layer = model.layer(storage, 0);
  const std::unique_ptr<AnyLayer> other = model.layer(storage, 0);

  // Separate calls: one decode of sequences 0 and 2, then a prefill of each prompt chunk.
  TestCache separate = s.cache(layer->cache_record(), CacheKind::paged);
  RowMatrix y_separate(s.rows(), kDModel);
  {
    RowMatrix x_decode(2, kDModel), y_decode(2, kDModel);
    x_decode.row(0) = s.x_new.row(0);
    x_decode.row(1) = s.x_new.row(6);
    const SequenceId decoded[] = {separate.seqs[0], separate.seqs[2]};
    other->decode(*separate.cache, decoded, 2, x_decode.data(), y_decode.data(), nullptr);
    y_separate.row(0) = y_decode.row(0);
    y_separate.row(6) = y_decode.row(1);
    other->prefill(*separate.cache, separate.seqs[1], 5, s.x_new.row(1).data(),
                   y_separate.row(1).data(), nullptr);
    other->prefill(*separate.cache, separate.seqs[3], 17, s.x_new.row(7).data(),
                   y_separate.row(7).data(), nullptr);
  }
  const CacheSnapshot separate_state = snapshot(*separate.cache, separate.seqs);

  TestCache batched = s.cache(layer->cache_record(), CacheKind::paged);
  for (Executor* executor : {static_cast<Executor*>(nullptr), static_cast<Executor*>(&pool(3))}) {
    SCOPED_TRACE(executor == nullptr ? "no executor" : "ThreadPool(3)");
    const RowMatrix y = run_layer(*layer, Call::forward, batched, s, executor);
    EXPECT_LE(relative_error(y, y_separate), kReorderTolerance);
    EXPECT_LE(relative_error(y, s.expected_from_cache(batched, 0)), kFp32Tolerance);
    EXPECT_LE(relative_error(y, s.expected_from_projection(0)), storage_tolerance(storage, family));
    const CacheSnapshot state = snapshot(*batched.cache, batched.seqs);
    EXPECT_EQ(state.lengths, separate_state.lengths);
    EXPECT_EQ(state.bytes_used, separate_state.bytes_used);
    for (Index b = 0; b < s.batch(); ++b) {
      // The same tokens cached (up to the projection's fp32 summation order).
      const std::vector<Tensor3> mine = read_planes(batched.cache->view(batched.seqs[b]));
      const std::vector<Tensor3> theirs = read_planes(separate.cache->view(separate.seqs[b]));
      for (std::size_t p = 0; p < mine.size(); ++p) {
        const std::vector<float> want = theirs[p].to_floats();
        EXPECT_LE(relative_error(want.data(), mine[p].data.data(), mine[p].size()),
                  storage == StorageType::f32 ? 1e-6 : 1e-2)
            << "sequence " << b << ", plane " << p;
      }
    }
    roll_back(batched, s);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, DriverLayer, kFamilyStorages, family_storage_name);

// ---- sliding windows ----------------------------------------------------------------------------

class AnyKernel;
std::unique_ptr<AnyKernel> make_kernel(Family family, StorageType storage, Index window);
bool splits_keys(Family family, StorageType storage, Index window, const Scenario& s,
                 Index threads);

class DriverWindow : public ::testing::TestWithParam<FamilyStorage> {};

// Windows of 1 (each token sees only itself), 7, 100, 300 (split-KV cuts the prefill's chunks
// on 2 and 3 threads), 1000 (and the decode of 2000 tokens) and one beyond every context (the
// same as no window), with and without threads.
TEST_P(DriverWindow, DecodeAndPrefillSeeOnlyTheirWindow) {
  const auto [family, storage] = GetParam();
  const Model model(family, 21);
  const Scenario decode(model, decode_batch(kRaggedLengths), 400);
  const Scenario prefill(model, {{337, 37}}, 500);
  for (Index window : {1, 7, 100, 300, 1000, 4096}) {
    for (const auto& entry : {std::pair<const Scenario*, Call>{&decode, Call::decode},
                              std::pair<const Scenario*, Call>{&prefill, Call::prefill}}) {
      const Scenario* s = entry.first;
      const Call call = entry.second;
      SCOPED_TRACE(std::string(name_of(call)) + ", window " + std::to_string(window));
      const std::unique_ptr<AnyLayer> layer = model.layer(storage, window);
      TestCache c = s->cache(layer->cache_record(), CacheKind::paged);
      const RowMatrix alone = run_layer(*layer, call, c, *s, nullptr);
      EXPECT_LE(relative_error(alone, s->expected_from_cache(c, window)), kFp32Tolerance);
      EXPECT_LE(relative_error(alone, s->expected_from_projection(window)),
                storage_tolerance(storage, family));
      roll_back(c, *s);
      for (Index threads : {2, 3}) {
        if (window == 1000 || (window == 300 && call == Call::prefill)) {
          EXPECT_TRUE(splits_keys(family, storage, window, *s, threads))
              << "the case exercises split-KV and the merge, " << threads << " threads";
        }
        const RowMatrix y = run_layer(*layer, call, c, *s, &pool(threads));
        EXPECT_LE(relative_error(y, alone), kReorderTolerance) << threads << " threads";
        roll_back(c, *s);
      }
      if (window == 4096) {  // beyond every context: no window at all
        const std::unique_ptr<AnyLayer> unwindowed = model.layer(storage, 0);
        const RowMatrix y = run_layer(*unwindowed, call, c, *s, &pool(3));
        EXPECT_LE(relative_error(y, alone), kReorderTolerance) << "window 0";
        roll_back(c, *s);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, DriverWindow, kFamilyStorages, family_storage_name);

// The reference itself: a window of 0, or one as long as the context, is plain causal attention.
TEST(DriverWindowReference, NoWindowOrAWholeContextWindowIsCausalAttention) {
  ref::Random random(31);
  const Tensor3 q = Tensor3::from_floats(random.floats(5 * 4 * 8).data(), 5, 4, 8);
  const Tensor3 k = Tensor3::from_floats(random.floats(9 * 2 * 8).data(), 9, 2, 8);
  const Tensor3 v = Tensor3::from_floats(random.floats(9 * 2 * 6).data(), 9, 2, 6);
  const ref::AttentionResult causal = ref::attention_reference(q, k, v, 0.3);
  for (Index window : {0, 9, 100}) {
    const ref::AttentionResult windowed = windowed_attention(q, k, v, 0.3, window);
    EXPECT_LE(
        ref::max_abs_error(windowed.out.data.data(), causal.out.data.data(), causal.out.size()),
        1e-15);
    EXPECT_LE(ref::max_abs_error(windowed.lse.data(), causal.lse.data(),
                                 static_cast<Index>(causal.lse.size())),
              1e-15);
  }
  // Window 1: each query sees only itself, so its output is its own value row.
  const ref::AttentionResult own = windowed_attention(q, k, v, 0.3, 1);
  for (Index t = 0; t < 5; ++t)
    for (Index i = 0; i < 4; ++i)
      for (Index c = 0; c < 6; ++c) EXPECT_NEAR(own.out.at(t, i, c), v.at(4 + t, i / 2, c), 1e-15);
}

// ---- bare kernels -------------------------------------------------------------------------------

// Queries of a batch: a = q (or TPA's A_Q), b = TPA's B_Q (empty otherwise); per-token strides.
struct KernelQueries {
  std::vector<float> a, b;
  Index a_stride = 0, b_stride = 0;
};

class AnyKernel {
 public:
  virtual ~AnyKernel() = default;
  virtual const CacheRecord& cache_record() const = 0;
  virtual PlanShape plan_shape() const = 0;
  virtual Index workspace_floats() const = 0;
  // Query tokens [first, first + n) of q against `view`.
  virtual void attend(const KernelQueries& q, Index first, Index n, const SequenceView& view,
                      float* out, float* lse, float* workspace) const = 0;
  virtual void run(const AttentionPlan& plan, const SequenceView* views, Index batch,
                   const KernelQueries& q, float* out, float* lse, float* workspace,
                   Executor* executor) const = 0;
};

// GqaKernel, MlaKernel, and TpaKernel with materialised queries.
template <class Kernel>
class PlainQueryKernel final : public AnyKernel {
 public:
  explicit PlainQueryKernel(Kernel kernel) : kernel_(std::move(kernel)) {}
  const CacheRecord& cache_record() const override { return kernel_.cache_record(); }
  PlanShape plan_shape() const override { return kernel_.plan_shape(); }
  Index workspace_floats() const override { return kernel_.workspace_floats(); }
  void attend(const KernelQueries& q, Index first, Index n, const SequenceView& view, float* out,
              float* lse, float* workspace) const override {
    kernel_.attend(q.a.data() + first * q.a_stride, n, view, out, lse, workspace);
  }
  void run(const AttentionPlan& plan, const SequenceView* views, Index batch,
           const KernelQueries& q, float* out, float* lse, float* workspace,
           Executor* executor) const override {
    kernel_.run(plan, views, batch, q.a.data(), out, lse, workspace, executor);
  }

 private:
  Kernel kernel_;
};

// TpaKernel with factored queries (A_Q, B_Q).
template <class S>
class FactoredTpaKernel final : public AnyKernel {
 public:
  explicit FactoredTpaKernel(TpaKernel<S> kernel) : kernel_(std::move(kernel)) {}
  const CacheRecord& cache_record() const override { return kernel_.cache_record(); }
  PlanShape plan_shape() const override { return kernel_.plan_shape(); }
  Index workspace_floats() const override { return kernel_.workspace_floats(); }
  void attend(const KernelQueries& q, Index first, Index n, const SequenceView& view, float* out,
              float* lse, float* workspace) const override {
    kernel_.attend(q.a.data() + first * q.a_stride, q.b.data() + first * q.b_stride, n, view, out,
                   lse, workspace);
  }
  void run(const AttentionPlan& plan, const SequenceView* views, Index batch,
           const KernelQueries& q, float* out, float* lse, float* workspace,
           Executor* executor) const override {
    kernel_.run(plan, views, batch, q.a.data(), q.b.data(), out, lse, workspace, executor);
  }

 private:
  TpaKernel<S> kernel_;
};

constexpr float kMlaKernelScale = 0.2f;  // any scale: the kernel must use the one it is given
const TpaShape kTpaShape{6, 16, 16, 3, 2, 2};
const TpaShape kTpaKvOnlyShape{4, 40, 40, 0, 2, 3};

// The family's bare kernel: the GQA kernel at the MHA / MQA / GQA shapes of the layers (an odd
// head dim of 33 for MHA), MLA's absorbed kernel, TPA's with factored or materialised queries.
std::unique_ptr<AnyKernel> make_kernel(Family family, StorageType storage, Index window) {
  return with_storage(storage, [&](auto tag) -> std::unique_ptr<AnyKernel> {
    using S = decltype(tag);
    switch (family) {
      case Family::mha:
        return std::make_unique<PlainQueryKernel<GqaKernel<S>>>(GqaKernel<S>(4, 4, 33, 33, window));
      case Family::mqa:
        return std::make_unique<PlainQueryKernel<GqaKernel<S>>>(GqaKernel<S>(6, 1, 40, 24, window));
      case Family::gqa:
        return std::make_unique<PlainQueryKernel<GqaKernel<S>>>(GqaKernel<S>(8, 2, 16, 16, window));
      case Family::mla:
        return std::make_unique<PlainQueryKernel<MlaKernel<S>>>(
            MlaKernel<S>(4, 32, 8, kMlaKernelScale, window));
      case Family::tpa:
        return std::make_unique<FactoredTpaKernel<S>>(TpaKernel<S>(kTpaShape, window));
      case Family::tpa_kv_only:
        return std::make_unique<PlainQueryKernel<TpaKernel<S>>>(
            TpaKernel<S>(kTpaKvOnlyShape, window));
    }
    return nullptr;
  });
}

// Whether the plan of the layer's step (its kernel is make_kernel's: the same plan shape) for
// scenario s on `threads` threads splits some key range.
bool splits_keys(Family family, StorageType storage, Index window, const Scenario& s,
                 Index threads) {
  std::vector<Index> lengths;
  for (const SequenceSpec& spec : s.specs) lengths.push_back(spec.length);
  const std::vector<Index> new_tokens = s.new_tokens();
  AttentionPlan plan;
  plan.make(make_kernel(family, storage, window)->plan_shape(), lengths.data(), new_tokens.data(),
            s.batch(), threads);
  return !plan.split_chunks().empty();
}

// Query heads and key width of the kernel's materialised queries.
struct QueryShape {
  Index heads, width;
};
QueryShape query_shape(Family family) {
  switch (family) {
    case Family::mha: return {4, 33};
    case Family::mqa: return {6, 40};
    case Family::gqa: return {8, 16};
    case Family::mla: return {4, 40};  // [latent | rope key]
    case Family::tpa: return {kTpaShape.heads, kTpaShape.head_dim};
    case Family::tpa_kv_only: return {kTpaKvOnlyShape.heads, kTpaKvOnlyShape.head_dim};
  }
  return {0, 0};
}

double kernel_scale(Family family) {
  if (family == Family::mla) return static_cast<double>(kMlaKernelScale);
  return 1.0 / std::sqrt(static_cast<double>(query_shape(family).width));
}

// Random queries for `tokens` query tokens, each entry of a materialised query ~ N(0, 1).
KernelQueries random_queries(Family family, Index tokens, ref::Random& random) {
  KernelQueries q;
  if (family == Family::tpa) {
    const Index rq = kTpaShape.rank_q;
    q.a_stride = rq * kTpaShape.heads;
    q.b_stride = rq * kTpaShape.head_dim;
    q.a = random.floats(tokens * q.a_stride, std::sqrt(static_cast<double>(rq)));
    q.b = random.floats(tokens * q.b_stride);
  } else {
    const QueryShape s = query_shape(family);
    q.a_stride = s.heads * s.width;
    q.a = random.floats(tokens * q.a_stride);
  }
  return q;
}

// Query tokens [first, first + count) as the reference's [count, h, key width].
Tensor3 reference_queries(Family family, const KernelQueries& q, Index first, Index count) {
  if (family == Family::tpa) {
    const TpaShape& s = kTpaShape;
    return ref::materialise(
        Tensor3::from_floats(q.a.data() + first * q.a_stride, count, s.rank_q, s.heads),
        Tensor3::from_floats(q.b.data() + first * q.b_stride, count, s.rank_q, s.head_dim));
  }
  const QueryShape s = query_shape(family);
  return Tensor3::from_floats(q.a.data() + first * q.a_stride, count, s.heads, s.width);
}

// The keys and values the kernel attends to, from its cached planes.
KeysValues kernel_keys_values(Family family, const std::vector<Tensor3>& planes) {
  if (family == Family::mla) return {concatenate(planes[0], planes[1]), planes[0]};
  if (is_tpa(family))
    return {ref::materialise(planes[0], planes[1]), ref::materialise(planes[2], planes[3])};
  return {planes[0], planes[1]};
}

// Random cached planes for `tokens` tokens: TPA's A factors ~ N(0, R) so K and V are ~ N(0, 1).
std::vector<Tensor3> random_planes(Family family, const CacheRecord& record, Index tokens,
                                   ref::Random& random) {
  std::vector<Tensor3> planes;
  for (Index p = 0; p < record.plane_count(); ++p) {
    const PlaneSpec& spec = record.plane(p);
    const bool a_factor = is_tpa(family) && p % 2 == 0;
    const double stddev = a_factor ? std::sqrt(static_cast<double>(spec.rows)) : 1.0;
    planes.push_back(
        Tensor3::from_floats(random.floats(tokens * spec.rows * spec.cols, stddev).data(), tokens,
                             spec.rows, spec.cols));
  }
  return planes;
}

// A batch for a bare kernel: cached sequences, their views, queries, and the references.
struct KernelBatch {
  KernelBatch(Family f, const AnyKernel& kernel, std::vector<Index> lengths_,
              std::vector<Index> new_tokens_, CacheKind kind, Index window, std::uint32_t seed,
              bool with_reference = true)
      : family(f), lengths(std::move(lengths_)), new_tokens(std::move(new_tokens_)) {
    ref::Random random(seed);
    std::vector<std::vector<Tensor3>> planes;
    std::vector<const std::vector<Tensor3>*> pointers;
    std::vector<Index> capacities;
    for (Index length : lengths) {
      planes.push_back(random_planes(f, kernel.cache_record(), length, random));
      capacities.push_back(length + kRoom);
    }
    for (const auto& p : planes) pointers.push_back(&p);
    cache = make_cache(kernel.cache_record(), kind, capacities);
    append_planes(cache, pointers, lengths);
    for (SequenceId seq : cache.seqs) views.push_back(cache.cache->view(seq));

    const PlanShape shape = kernel.plan_shape();
    for (Index n : new_tokens) {
      offsets.push_back(tokens);
      tokens += n;
    }
    q = random_queries(f, tokens, random);
    out_floats = tokens * shape.rows_per_token * shape.value_width;
    lse_floats = tokens * shape.rows_per_token;
    expected_out.resize(static_cast<std::size_t>(out_floats));
    expected_lse.resize(static_cast<std::size_t>(lse_floats));
    for (std::size_t b = 0; with_reference && b < lengths.size(); ++b) {
      // The reference reads the planes back: the storage's rounding is in both.
      const KeysValues kv = kernel_keys_values(f, read_planes(views[b]));
      const ref::AttentionResult r = windowed_attention(
          reference_queries(f, q, offsets[b], new_tokens[b]), kv.k, kv.v, kernel_scale(f), window);
      std::copy(r.out.data.begin(), r.out.data.end(),
                expected_out.begin() + offsets[b] * shape.rows_per_token * shape.value_width);
      std::copy(r.lse.begin(), r.lse.end(),
                expected_lse.begin() + offsets[b] * shape.rows_per_token);
    }
  }

  Index batch() const { return static_cast<Index>(lengths.size()); }

  Family family;
  std::vector<Index> lengths, new_tokens, offsets;
  Index tokens = 0;
  TestCache cache;
  std::vector<SequenceView> views;
  KernelQueries q;
  Index out_floats = 0, lse_floats = 0;
  std::vector<double> expected_out, expected_lse;
};

struct KernelResult {
  std::vector<float> out, lse;
};

// Each sequence alone through the single-sequence attend().
KernelResult attend_each(const AnyKernel& kernel, const KernelBatch& k) {
  const PlanShape shape = kernel.plan_shape();
  KernelResult r{std::vector<float>(static_cast<std::size_t>(k.out_floats), kNaN),
                 std::vector<float>(static_cast<std::size_t>(k.lse_floats), kNaN)};
  std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
  for (Index b = 0; b < k.batch(); ++b)
    kernel.attend(k.q, k.offsets[b], k.new_tokens[b], k.views[b],
                  r.out.data() + k.offsets[b] * shape.rows_per_token * shape.value_width,
                  r.lse.data() + k.offsets[b] * shape.rows_per_token, workspace.data());
  return r;
}

KernelResult run_batch(const AnyKernel& kernel, const KernelBatch& k, const AttentionPlan& plan,
                       Executor* executor, bool with_lse = true) {
  KernelResult r{std::vector<float>(static_cast<std::size_t>(k.out_floats), kNaN),
                 std::vector<float>(static_cast<std::size_t>(k.lse_floats), kNaN)};
  std::vector<float> workspace(static_cast<std::size_t>(plan.workspace_floats()), kNaN);
  kernel.run(plan, k.views.data(), k.batch(), k.q, r.out.data(), with_lse ? r.lse.data() : nullptr,
             workspace.data(), executor);
  return r;
}

// |lse - expected| <= tol * max(1, |expected|) for every row; the worst ratio.
double lse_error(const std::vector<float>& lse, const std::vector<double>& expected) {
  double worst = 0.0;
  for (std::size_t r = 0; r < expected.size(); ++r) {
    const double error = std::abs(static_cast<double>(lse[r]) - expected[r]);
    if (std::isnan(error)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, error / std::max(1.0, std::abs(expected[r])));
  }
  return worst;
}

double lse_error(const std::vector<float>& lse, const std::vector<float>& expected) {
  return lse_error(lse, std::vector<double>(expected.begin(), expected.end()));
}

using KernelParam = std::tuple<Family, StorageType, Index>;  // family, storage, window

class DriverKernel : public ::testing::TestWithParam<KernelParam> {};

// A ragged batch mixing decode tokens and prompt chunks (lengths 1, 3, 130, 700, 2000 with 1, 3
// (the whole sequence), 1, 37 and 1 new tokens) through run() with plans for 1, 2, 3 and 7
// threads on: no executor (a multi-thread plan then runs on the calling thread), a ThreadPool of
// the plan's size, one of 2 threads (fewer than a 3- or 7-thread plan), one of 7 (more), and an
// executor that runs the tasks backwards.
TEST_P(DriverKernel, BatchedRunEqualsAttendingEachSequenceAndTheReference) {
  const auto [family, storage, window] = GetParam();
  const std::unique_ptr<AnyKernel> kernel = make_kernel(family, storage, window);
  const KernelBatch k(family, *kernel, {1, 3, 130, 700, 2000}, {1, 3, 1, 37, 1},
                      storage == StorageType::f32 ? CacheKind::paged : CacheKind::contiguous,
                      window, 41);

  const KernelResult alone = attend_each(*kernel, k);
  EXPECT_LE(relative_error(alone.out.data(), k.expected_out.data(), k.out_floats), kFp32Tolerance)
      << "attend() against the reference";
  EXPECT_LE(lse_error(alone.lse, k.expected_lse), kFp32Tolerance) << "attend()'s LSE";

  for (Index threads : {1, 2, 3, 7}) {
    SCOPED_TRACE("plan for " + std::to_string(threads) + " threads");
    AttentionPlan plan;
    plan.make(kernel->plan_shape(), k.lengths.data(), k.new_tokens.data(), k.batch(), threads);
    EXPECT_LE(plan.tasks(), threads);
    if (threads > 1 && (window == 0 || window == 300)) {
      EXPECT_FALSE(plan.split_chunks().empty()) << "the case exercises split-KV and the merge";
    }

    const KernelResult serial = run_batch(*kernel, k, plan, nullptr);
    if (threads == 1) {
      EXPECT_TRUE(bitwise_equal(serial.out, alone.out)) << "one thread is the unsplit kernel";
      EXPECT_TRUE(bitwise_equal(serial.lse, alone.lse));
    } else {
      EXPECT_LE(relative_error(serial.out, alone.out), kReorderTolerance) << "against attend()";
      EXPECT_LE(lse_error(serial.lse, alone.lse), kReorderTolerance) << "LSE against attend()";
    }
    EXPECT_LE(relative_error(serial.out.data(), k.expected_out.data(), k.out_floats),
              kFp32Tolerance)
        << "against the reference";
    EXPECT_LE(lse_error(serial.lse, k.expected_lse), kFp32Tolerance) << "LSE against the reference";

    ReverseExecutor reverse(threads);
    const NamedExecutor executors[] = {{"ThreadPool(plan's threads)", &pool(threads)},
                                       {"ThreadPool(2)", &pool(2)},
                                       {"ThreadPool(7)", &pool(7)},
                                       {"ReverseExecutor", &reverse}};
    for (const NamedExecutor& e : executors) {
      const KernelResult r = run_batch(*kernel, k, plan, e.executor);
      EXPECT_TRUE(bitwise_equal(r.out, serial.out)) << e.name << ": output";
      EXPECT_TRUE(bitwise_equal(r.lse, serial.lse)) << e.name << ": LSE";
    }
    EXPECT_EQ(reverse.last_tasks, plan.tasks() > 1 ? plan.tasks() : 0)
        << "the driver runs plan.tasks() tasks (one task runs on the calling thread)";

    const KernelResult no_lse = run_batch(*kernel, k, plan, &pool(threads), false);
    EXPECT_TRUE(bitwise_equal(no_lse.out, serial.out)) << "without an LSE";
  }
}

std::string kernel_param_name(const ::testing::TestParamInfo<KernelParam>& info) {
  return std::string(name_of(std::get<0>(info.param))) + "_" +
         tpattn::name_of(std::get<1>(info.param)) + "_window" +
         std::to_string(std::get<2>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Families, DriverKernel,
                         ::testing::Combine(::testing::ValuesIn(kFamilies),
                                            ::testing::Values(StorageType::f32, StorageType::bf16),
                                            ::testing::Values(Index{0}, Index{1}, Index{100},
                                                              Index{300})),
                         kernel_param_name);

// How many (split item, query token) pairs of `plan` where the token sees none of the item's keys
// (its partial row is empty: out 0, LSE -inf, and the merge must skip it).
Index empty_partial_rows(const AttentionPlan& plan) {
  Index empty = 0;
  for (const WorkItem& item : plan.items()) {
    if (item.partial < 0) continue;
    const Index n = plan.new_tokens(item.sequence), length = plan.length(item.sequence);
    for (Index t = item.query_first; t < item.query_first + item.query_count; ++t) {
      const Index horizon = length - n + 1 + t;
      const Index window = plan.shape().window;
      const Index lower = window > 0 ? std::max<Index>(0, horizon - window) : 0;
      if (std::min(horizon, item.key_end) <= std::max(lower, item.key_begin)) ++empty;
    }
  }
  return empty;
}

class DriverKernelRandom : public ::testing::TestWithParam<Family> {};

// Random ragged batches (1 to 4 sequences of 1 to 1500 tokens, decode tokens or chunks of up to
// 40, no window or one of 1 to 600 tokens) on plans for 2 to 8 threads: run() equals attend()
// on each sequence, output and LSE. Among them are split chunks where a query token sees none
// of a split's keys (a window above its range, or its causal horizon below it).
TEST_P(DriverKernelRandom, RaggedBatchesWithWindowsEqualAttendingEachSequence) {
  const Family family = GetParam();
  ref::Random random(81 + static_cast<std::uint32_t>(family));
  Index empty_rows = 0, split_chunks = 0;
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<Index> lengths, new_tokens;
    Index window = 0, threads = 2;
    if (trial == 0) {
      // One query block (q = 16 tokens, TPA's 8) ending at 511, with a window of 257 - q: its
      // keys, from 255 on, split in two at 256, so the first split holds one key, which only
      // token 0 sees.
      const Index q = make_kernel(family, StorageType::f32, 0)->plan_shape().query_block;
      lengths = {511};
      new_tokens = {q};
      window = 257 - q;
    } else {
      const Index batch = random.integer(1, 4);
      for (Index b = 0; b < batch; ++b) {
        const Index length =
            random.uniform() < 0.3 ? random.integer(1, 40) : random.integer(200, 1500);
        lengths.push_back(length);
        new_tokens.push_back(
            random.uniform() < 0.5 ? 1 : random.integer(1, std::min<Index>(40, length)));
      }
      const double pick = random.uniform();
      window = pick < 0.3 ? 0 : pick < 0.4 ? random.integer(1, 8) : random.integer(100, 600);
      threads = random.integer(2, 8);
    }
    SCOPED_TRACE("trial " + std::to_string(trial) + ": window " + std::to_string(window) + ", " +
                 std::to_string(threads) + " threads");
    const std::unique_ptr<AnyKernel> kernel = make_kernel(family, StorageType::f32, window);
    const KernelBatch k(family, *kernel, lengths, new_tokens, CacheKind::paged, window,
                        900 + static_cast<std::uint32_t>(trial), false);
    AttentionPlan plan;
    plan.make(kernel->plan_shape(), k.lengths.data(), k.new_tokens.data(), k.batch(), threads);
    empty_rows += empty_partial_rows(plan);
    split_chunks += static_cast<Index>(plan.split_chunks().size());
    const KernelResult alone = attend_each(*kernel, k);
    const KernelResult batched = run_batch(*kernel, k, plan, &pool(2));
    EXPECT_LE(relative_error(batched.out, alone.out), kReorderTolerance);
    EXPECT_LE(lse_error(batched.lse, alone.lse), kReorderTolerance);
  }
  EXPECT_GT(split_chunks, 0) << "some key ranges were split";
  EXPECT_GT(empty_rows, 0) << "some query token saw none of a split's keys";
}

INSTANTIATE_TEST_SUITE_P(Families, DriverKernelRandom, ::testing::ValuesIn(kFamilies),
                         [](const ::testing::TestParamInfo<Family>& info) {
                           return std::string(name_of(info.param));
                         });

// ---- negative windows ---------------------------------------------------------------------------

TEST(DriverWindowMisuse, NegativeWindowIsAnErrorFromEveryKernelAndLayer) {
  const std::string expected = ">= 0 (0: no sliding window)";
  expect_error_before_allocating([] { (void)GqaKernel<float>(4, 2, 16, 16, -1); }, "GqaKernel",
                                 "window", expected, "-1");
  expect_error_before_allocating([] { (void)MlaKernel<Bf16>(4, 32, 8, 0.2f, -3); }, "MlaKernel",
                                 "window", expected, "-3");
  expect_error_before_allocating([] { (void)TpaKernel<float>(kTpaShape, -1); }, "TpaKernel",
                                 "window", expected, "-1");

  // Layers check the window before the weights (empty here) and before allocating.
  GqaConfig gqa;
  gqa.d_model = kDModel;
  gqa.heads = 4;
  gqa.kv_heads = 2;
  gqa.head_dim = 16;
  gqa.window = -1;
  expect_error_before_allocating([&] { (void)GroupedQueryAttention<float>(gqa, GqaWeights{}); },
                                 "GroupedQueryAttention", "window", expected, "-1");
  gqa.kv_heads = 4;
  expect_error_before_allocating([&] { (void)MultiHeadAttention<float>(gqa, GqaWeights{}); },
                                 "MultiHeadAttention", "window", expected, "-1");
  gqa.kv_heads = 1;
  expect_error_before_allocating([&] { (void)MultiQueryAttention<Bf16>(gqa, GqaWeights{}); },
                                 "MultiQueryAttention", "window", expected, "-1");
  MlaConfig mla;
  mla.d_model = kDModel;
  mla.heads = 4;
  mla.head_dim = 16;
  mla.rope_dim = 8;
  mla.kv_latent_dim = 32;
  mla.window = -2;
  expect_error_before_allocating([&] { (void)MultiHeadLatentAttention<float>(mla, MlaWeights{}); },
                                 "MultiHeadLatentAttention", "window", expected, "-2");
  TpaConfig tpa;
  tpa.d_model = kDModel;
  tpa.heads = 4;
  tpa.head_dim = 16;
  tpa.rank_q = 2;
  tpa.rank_k = 2;
  tpa.rank_v = 2;
  tpa.window = -1;
  expect_error_before_allocating([&] { (void)TensorProductAttention<float>(tpa, TpaWeights{}); },
                                 "TensorProductAttention", "window", expected, "-1");
  tpa.rank_q = 0;
  expect_error_before_allocating(
      [&] { (void)TensorProductAttentionKvOnly<Bf16>(tpa, TpaWeights{}); },
      "TensorProductAttentionKvOnly", "window", expected, "-1");

  // And a plan for a negative window.
  AttentionPlan plan;
  const Index length = 10;
  const Caught c = caught([&] { plan.make({4, 16, 100, 16, -1}, &length, nullptr, 1, 1); });
  EXPECT_EQ(c.kind, "tpattn::Error");
  EXPECT_EQ(c.argument, "shape");
  EXPECT_TRUE(plan.empty());
}

// ---- plan mismatch ------------------------------------------------------------------------------

// A GQA kernel, a paged cache of two sequences (50 and 300 tokens), one decode query each, and
// out / lse buffers holding a sentinel that run() must not overwrite when it refuses.
struct MismatchFixture {
  GqaKernel<float> kernel{4, 2, 16, 16};
  TestCache c = make_cache(kernel.cache_record(), CacheKind::paged, {50 + kRoom, 300 + kRoom});
  std::vector<Index> lengths{50, 300};
  std::vector<SequenceView> views;
  std::vector<float> q;
  std::vector<float> out = std::vector<float>(2 * 4 * 16, 1234.5f);
  std::vector<float> lse = std::vector<float>(2 * 4, 1234.5f);
  std::vector<float> workspace;

  MismatchFixture() {
    ref::Random random(51);
    std::vector<std::vector<Tensor3>> planes;
    for (Index length : lengths)
      planes.push_back(random_planes(Family::gqa, kernel.cache_record(), length, random));
    append_planes(c, {&planes[0], &planes[1]}, lengths);
    for (SequenceId seq : c.seqs) views.push_back(c.cache->view(seq));
    q = random.floats(2 * 4 * 16);
    workspace.resize(
        static_cast<std::size_t>(AttentionPlan::workspace_bound(kernel.plan_shape(), 8, "test")));
  }

  Caught run(const AttentionPlan& plan, Index batch) {
    return caught([&] {
      kernel.run(plan, views.data(), batch, q.data(), out.data(), lse.data(), workspace.data(),
                 &pool(2));
    });
  }
  bool untouched() const {
    return std::all_of(out.begin(), out.end(), [](float v) { return v == 1234.5f; }) &&
           std::all_of(lse.begin(), lse.end(), [](float v) { return v == 1234.5f; });
  }
};

void expect_refused(const Caught& c, const std::string& call, const std::string& argument,
                    const std::vector<std::string>& parts) {
  EXPECT_EQ(c.kind, "tpattn::Error");
  EXPECT_EQ(c.call, call);
  EXPECT_EQ(c.argument, argument);
  for (const std::string& part : parts)
    EXPECT_TRUE(contains(c.message, part)) << "'" << part << "' not in: " << c.message;
}

TEST(DriverMismatch, PlanForOtherLengthsIsAnErrorNamingTheLengthAndWritesNothing) {
  MismatchFixture f;
  AttentionPlan plan;
  const Index other[] = {50, 301};
  plan.make(f.kernel.plan_shape(), other, nullptr, 2, 2);
  expect_refused(f.run(plan, 2), "GqaKernel::run", "plan",
                 {"expected a plan for these lengths (views[1].length() = 300)",
                  "got a plan made for length 301 there"});
  EXPECT_TRUE(f.untouched());
}

TEST(DriverMismatch, PlanForAnotherBatchSizeIsAnErrorNamingBothSizesAndWritesNothing) {
  MismatchFixture f;
  AttentionPlan plan;
  plan.make(f.kernel.plan_shape(), f.lengths.data(), nullptr, 1, 2);
  expect_refused(f.run(plan, 2), "GqaKernel::run", "plan",
                 {"expected a plan for a batch of 2 sequences, got a plan for 1"});
  EXPECT_TRUE(f.untouched());
}

TEST(DriverMismatch, PlanForAnotherOperatorShapeIsAnErrorNamingBothShapesAndWritesNothing) {
  MismatchFixture f;
  // A plan made by an MLA kernel, given to the GQA kernel.
  const MlaKernel<float> mla(4, 32, 8, 0.2f);
  AttentionPlan plan;
  plan.make(mla.plan_shape(), f.lengths.data(), nullptr, 2, 2);
  expect_refused(f.run(plan, 2), "GqaKernel::run", "plan",
                 {"a plan for this operator's shape (rows_per_token 4, value_width 16",
                  "got a plan for another shape (rows_per_token 4, value_width 32"});
  EXPECT_TRUE(f.untouched());

  // The same shape but for a sliding window.
  const GqaKernel<float> windowed(4, 2, 16, 16, 64);
  plan.make(windowed.plan_shape(), f.lengths.data(), nullptr, 2, 2);
  expect_refused(f.run(plan, 2), "GqaKernel::run", "plan", {"window 0)", "window 64)"});
  EXPECT_TRUE(f.untouched());

  // And the other way round: a GQA plan given to the MLA kernel.
  plan.make(f.kernel.plan_shape(), f.lengths.data(), nullptr, 2, 2);
  std::vector<float> mla_q(2 * 4 * 40, 0.5f), mla_out(2 * 4 * 32, 1234.5f);
  const Caught c = caught([&] {
    mla.run(plan, f.views.data(), 2, mla_q.data(), mla_out.data(), nullptr, f.workspace.data());
  });
  expect_refused(c, "MlaKernel::run", "plan", {"another shape"});
  EXPECT_TRUE(std::all_of(mla_out.begin(), mla_out.end(), [](float v) { return v == 1234.5f; }));
}

TEST(DriverMismatch, ViewsOfACacheWithAnotherRecordAreAnErrorNamingThePlaneAndWriteNothing) {
  MismatchFixture f;
  // A bfloat16 cache of the same shape: its record differs in the planes' storage.
  TestCache other =
      make_cache(records::gqa(2, 16, 16, StorageType::bf16), CacheKind::contiguous, {60, 340});
  ref::Random random(52);
  std::vector<std::vector<Tensor3>> planes;
  for (Index length : f.lengths)
    planes.push_back(random_planes(Family::gqa, other.cache->record(), length, random));
  append_planes(other, {&planes[0], &planes[1]}, f.lengths);
  f.views[1] = other.cache->view(other.seqs[1]);
  AttentionPlan plan;
  plan.make(f.kernel.plan_shape(), f.lengths.data(), nullptr, 2, 2);
  expect_refused(
      f.run(plan, 2), "GqaKernel::run", "views",
      {"plane 0 (K): storage f32", "views[1] has another record", "plane 0 (K): storage bf16"});
  EXPECT_TRUE(f.untouched());

  // A view of no cache at all.
  f.views[1] = SequenceView();
  expect_refused(f.run(plan, 2), "GqaKernel::run", "views", {"views[1] is empty"});
  EXPECT_TRUE(f.untouched());
}

TEST(DriverMismatch, EmptyPlanAndNullBuffersAreErrorsNamingTheArgumentAndWriteNothing) {
  MismatchFixture f;
  expect_refused(f.run(AttentionPlan(), 2), "GqaKernel::run", "plan", {"an empty plan"});
  AttentionPlan plan;
  plan.make(f.kernel.plan_shape(), f.lengths.data(), nullptr, 2, 2);
  const auto refused = [&](std::function<void()> call, const char* argument) {
    expect_refused(caught(call), "GqaKernel::run", argument, {"null"});
  };
  refused(
      [&] {
        f.kernel.run(plan, nullptr, 2, f.q.data(), f.out.data(), f.lse.data(), f.workspace.data());
      },
      "views");
  refused(
      [&] {
        f.kernel.run(plan, f.views.data(), 2, nullptr, f.out.data(), f.lse.data(),
                     f.workspace.data());
      },
      "q");
  refused(
      [&] {
        f.kernel.run(plan, f.views.data(), 2, f.q.data(), nullptr, f.lse.data(),
                     f.workspace.data());
      },
      "out");
  refused(
      [&] {
        f.kernel.run(plan, f.views.data(), 2, f.q.data(), f.out.data(), f.lse.data(), nullptr);
      },
      "workspace");
  EXPECT_TRUE(f.untouched());

  // TPA-KVonly's kernel takes no factored queries.
  const TpaKernel<float> kv_only(kTpaKvOnlyShape);
  std::vector<float> a(8), b(8);
  const Caught c = caught([&] {
    kv_only.run(plan, f.views.data(), 2, a.data(), b.data(), f.out.data(), f.lse.data(),
                f.workspace.data());
  });
  expect_refused(c, "TpaKernel::run", "a_q, b_q", {"rank_q = 0"});
  EXPECT_TRUE(f.untouched());
}

// ---- failures: the executor, or an engine's cache, fails mid-call ------------------------------

enum class Failure {
  before_any_task,   // run() throws std::runtime_error without running a task
  after_first_task,  // run() runs task 0 (which takes every item), then throws
  non_standard,      // run() throws an int
  pool_then_throw,   // every task runs on a real ThreadPool, then run() throws
  view,              // the cache's view() throws (an engine's own cache)
};

const char* name_of(Failure failure) {
  switch (failure) {
    case Failure::before_any_task: return "executor throws before any task";
    case Failure::after_first_task: return "executor throws after task 0";
    case Failure::non_standard: return "executor throws a non-standard exception";
    case Failure::pool_then_throw: return "executor throws after a ThreadPool ran every task";
    case Failure::view: return "cache view throws";
  }
  return "?";
}

// Which run() call of a layer's executor fails.
constexpr Index kNoCall = -1;        // none (only the cache's view fails)
constexpr Index kAttentionCall = 0;  // the first call after the new tokens were appended: the
                                     // attention's work items (nothing else runs in between)

// Passes run() calls to a ThreadPool of 3 threads, except the one fail_on_call names (a call
// number from 1, kAttentionCall or kNoCall), which fails as `failure` says. grown() tells
// whether the layer has appended its new tokens yet.
class FailingExecutor final : public Executor {
 public:
  FailingExecutor(Failure failure, Index fail_on_call, std::function<bool()> grown = nullptr)
      : failure_(failure), fail_on_call_(fail_on_call), grown_(std::move(grown)) {}
  Index concurrency() const override { return 3; }
  void run(Index tasks, TaskRef task) override {
    ++calls;
    const bool fail = fail_on_call_ == kAttentionCall ? failed_at == 0 && grown_ && grown_()
                                                      : calls == fail_on_call_;
    if (!fail) {
      pool(3).run(tasks, task);
      return;
    }
    failed_at = calls;
    switch (failure_) {
      case Failure::before_any_task: throw std::runtime_error("the executor refused the work");
      case Failure::after_first_task:
        task(0);
        throw std::runtime_error("a worker was lost after task 0");
      case Failure::non_standard: throw 42;
      case Failure::pool_then_throw:
        pool(3).run(tasks, task);
        throw std::runtime_error("the pool reported a lost worker");
      case Failure::view: pool(3).run(tasks, task); return;
    }
  }
  Index calls = 0;
  Index failed_at = 0;  // the call that failed, 0 for none

 private:
  Failure failure_;
  Index fail_on_call_;
  std::function<bool()> grown_;
};

// An engine's cache: a real one whose view() fails on demand.
class ViewFailingCache final : public KvCache {
 public:
  explicit ViewFailingCache(std::unique_ptr<KvCache> inner)
      : KvCache(inner->record()), inner_(std::move(inner)) {}
  bool fail_views = false;

  SequenceId add_sequence() override { return inner_->add_sequence(); }
  void remove_sequence(SequenceId seq) override { inner_->remove_sequence(seq); }
  bool contains(SequenceId seq) const override { return inner_->contains(seq); }
  Index sequence_count() const override { return inner_->sequence_count(); }
  Index max_sequences() const override { return inner_->max_sequences(); }
  Index length(SequenceId seq) const override { return inner_->length(seq); }
  void append(SequenceId seq, Index n, const PlaneInput* planes, Index count) override {
    inner_->append(seq, n, planes, count);
  }
  using KvCache::append;
  void truncate(SequenceId seq, Index new_length) override { inner_->truncate(seq, new_length); }
  Index tokens_available(SequenceId seq) const override { return inner_->tokens_available(seq); }
  SequenceView view(SequenceId seq) const override {
    if (fail_views) throw std::runtime_error("the engine's cache refused a view");
    return inner_->view(seq);
  }
  Index bytes_used() const override { return inner_->bytes_used(); }
  Index bytes_reserved() const override { return inner_->bytes_reserved(); }
  const KvCache& inner() const { return *inner_; }

 private:
  std::unique_ptr<KvCache> inner_;
};

class DriverFailure : public ::testing::TestWithParam<Family> {};

// Runs `call` of scenario s on `cache` (whose sequences are seqs), with `executor`.
void call_layer(AnyLayer& layer, Call call, KvCache& cache, const std::vector<SequenceId>& seqs,
                const Scenario& s, Executor* executor) {
  RowMatrix y = RowMatrix::Zero(s.rows(), kDModel);
  const std::vector<Index> n = s.new_tokens();
  switch (call) {
    case Call::decode:
      layer.decode(cache, seqs.data(), s.batch(), s.x_new.data(), y.data(), executor);
      break;
    case Call::prefill:
      layer.prefill(cache, seqs[0], n[0], s.x_new.data(), y.data(), executor);
      break;
    case Call::forward:
      layer.forward(cache, seqs.data(), n.data(), s.batch(), s.x_new.data(), y.data(), executor);
      break;
  }
}

// How many times a healthy `call` asks the executor to run tasks.
Index executor_calls(AnyLayer& layer, Call call, const Scenario& s) {
  TestCache c = s.cache(layer.cache_record(), CacheKind::paged);
  FailingExecutor counting(Failure::before_any_task, kNoCall);
  call_layer(layer, call, *c.cache, c.seqs, s, &counting);
  return counting.calls;
}

// `call` fails (the executor's run() call fail_on_call, or the cache's view): tpattn::Error
// naming the call and "executor", the cache exactly as before (lengths, bytes_used, free pages,
// every cached byte), and the next decode step gives what it gives on a cache that never saw
// the failed call.
void expect_failed_call_changes_nothing(AnyLayer& layer, AnyLayer& twin, Call call,
                                        const Scenario& s, Failure failure, Index fail_on_call) {
  SCOPED_TRACE(std::string(name_of(call)) + ": " + name_of(failure) + ", on run() call " +
               (fail_on_call == kAttentionCall ? std::string("of the attention")
                                               : std::to_string(fail_on_call)));
  TestCache built = s.cache(layer.cache_record(), CacheKind::paged);
  ViewFailingCache cache(std::move(built.cache));
  const std::vector<SequenceId> seqs = built.seqs;
  TestCache untouched = s.cache(layer.cache_record(), CacheKind::paged);
  const CacheSnapshot before = snapshot(cache.inner(), seqs);

  FailingExecutor executor(failure, fail_on_call,
                           [&] { return cache.inner().length(seqs[0]) > s.history(0); });
  cache.fail_views = failure == Failure::view;
  const Caught c = caught([&] { call_layer(layer, call, cache, seqs, s, &executor); });
  cache.fail_views = false;
  EXPECT_EQ(c.kind, "tpattn::Error");
  EXPECT_EQ(c.call, layer.name() + "::" + name_of(call));
  EXPECT_EQ(c.argument, "executor");
  EXPECT_TRUE(contains(c.message, "nothing was appended")) << c.message;
  const std::string cause = failure == Failure::non_standard ? "non-standard exception"
                            : failure == Failure::view       ? "refused a view"
                                                             : "a work item failed (";
  EXPECT_TRUE(contains(c.message, cause)) << c.message;
  if (failure != Failure::view) {
    EXPECT_GE(executor.failed_at, 1) << "the executor failed";
    EXPECT_EQ(executor.calls, executor.failed_at) << "no call after the failure";
  }
  expect_same(before, snapshot(cache.inner(), seqs), "after the failed call");

  // The next decode step (through the threads) as on the untouched twin.
  const RowMatrix x_next = ref::random_inputs(s.batch(), kDModel, 62);
  RowMatrix y_next(s.batch(), kDModel), y_twin(s.batch(), kDModel);
  layer.decode(cache, seqs.data(), s.batch(), x_next.data(), y_next.data(), &pool(3));
  twin.decode(*untouched.cache, untouched.seqs.data(), s.batch(), x_next.data(), y_twin.data(),
              &pool(3));
  EXPECT_TRUE(bitwise_equal(y_next, y_twin)) << "the next decode step";
  expect_same(snapshot(*untouched.cache, untouched.seqs), snapshot(cache.inner(), seqs),
              "after the next decode step");
}

const std::vector<Failure> kExecutorFailures = {Failure::before_any_task, Failure::after_first_task,
                                                Failure::non_standard, Failure::pool_then_throw};

// Calls f(layer, twin, scenario, call) for f32 and bf16 layers and decode, prefill and forward.
template <class F>
void for_each_call(Family family, F&& f) {
  const Model model(family, 61);
  const Scenario decode(model, decode_batch({3, 130, 700}), 600);
  const Scenario prefill(model, {{337, 37}}, 700);
  const Scenario forward(model, {{40, 1}, {305, 5}, {150, 17}}, 800);
  for (StorageType storage : {StorageType::f32, StorageType::bf16}) {
    SCOPED_TRACE(tpattn::name_of(storage));
    const std::unique_ptr<AnyLayer> layer = model.layer(storage, 0);
    const std::unique_ptr<AnyLayer> twin = model.layer(storage, 0);
    for (const auto& entry : {std::pair<const Scenario*, Call>{&decode, Call::decode},
                              std::pair<const Scenario*, Call>{&prefill, Call::prefill},
                              std::pair<const Scenario*, Call>{&forward, Call::forward}})
      f(*layer, *twin, *entry.first, entry.second, storage);
  }
}

// decode, prefill and forward whose attention work items fail on the executor (in each way),
// or whose engine's cache refuses a view.
TEST_P(DriverFailure, FailedAttentionWorkThrowsErrorAndLeavesTheCacheAsItWas) {
  for_each_call(
      GetParam(), [](AnyLayer& layer, AnyLayer& twin, const Scenario& s, Call call, StorageType) {
        for (Failure failure : kExecutorFailures)
          expect_failed_call_changes_nothing(layer, twin, call, s, failure, kAttentionCall);
        expect_failed_call_changes_nothing(layer, twin, call, s, Failure::view, kNoCall);
      });
}

// The same with the executor failing on each of the run() calls a layer makes, whatever it runs:
// the projections' shares of output features (parallel_ranges in linear() and MLA's per-head
// products, before the append, and the output's after it) as well as the attention.
TEST_P(DriverFailure, AnyFailedExecutorCallThrowsErrorAndLeavesTheCacheAsItWas) {
  for_each_call(GetParam(), [](AnyLayer& layer, AnyLayer& twin, const Scenario& s, Call call,
                               StorageType storage) {
    const Index calls = executor_calls(layer, call, s);
    EXPECT_GE(calls, 1) << "the attention's work items run on the executor";
    for (Failure failure : kExecutorFailures) {
      if (storage == StorageType::bf16 && failure != Failure::after_first_task) continue;
      for (Index k = 1; k <= calls; ++k)
        expect_failed_call_changes_nothing(layer, twin, call, s, failure, k);
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Families, DriverFailure, ::testing::ValuesIn(kFamilies),
                         [](const ::testing::TestParamInfo<Family>& info) {
                           return std::string(name_of(info.param));
                         });

// An executor that claims no concurrency: the layer's plan refuses it before anything changes.
class NoConcurrencyExecutor final : public Executor {
 public:
  Index concurrency() const override { return 0; }
  void run(Index tasks, TaskRef task) override {
    for (Index i = 0; i < tasks; ++i) task(i);
  }
};

TEST(DriverFailureSetup, ExecutorWithoutConcurrencyIsAnErrorAndChangesNothing) {
  const Model model(Family::gqa, 63);
  const Scenario s(model, decode_batch({3, 130}), 650);
  const std::unique_ptr<AnyLayer> layer = model.layer(StorageType::f32, 0);
  TestCache c = s.cache(layer->cache_record(), CacheKind::paged);
  const CacheSnapshot before = snapshot(*c.cache, c.seqs);
  NoConcurrencyExecutor executor;
  const Caught caught_error = caught([&] { run_layer(*layer, Call::decode, c, s, &executor); });
  EXPECT_EQ(caught_error.kind, "tpattn::Error");
  EXPECT_EQ(caught_error.call, "GroupedQueryAttention::decode");
  EXPECT_EQ(caught_error.argument, "threads");
  expect_same(before, snapshot(*c.cache, c.seqs), "after the refused call");
}

// ---- the default executor -----------------------------------------------------------------------

// run(tasks, task) runs task(0) .. task(tasks - 1) once each and returns after all have returned,
// whether tasks is below, at or above the pool's thread count.
TEST(DriverExecutor, ThreadPoolRunsEveryTaskExactlyOnceAndReturnsAfterAll) {
  for (Index threads : {1, 2, 3, 7}) {
    ThreadPool& executor = pool(threads);
    EXPECT_EQ(executor.concurrency(), threads);
    for (Index tasks : {0, 1, 2, 3, 7, 50}) {
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(tasks));
      std::atomic<Index> finished{0};
      auto task = [&](Index i) {
        volatile double sink = 0;  // a little work, so tasks overlap
        for (int k = 0; k < 2000; ++k) sink = sink + static_cast<double>(k);
        runs[static_cast<std::size_t>(i)].fetch_add(1);
        finished.fetch_add(1);
      };
      executor.run(tasks, TaskRef(task));
      EXPECT_EQ(finished.load(), tasks) << threads << " threads, " << tasks << " tasks";
      for (Index i = 0; i < tasks; ++i)
        EXPECT_EQ(runs[static_cast<std::size_t>(i)].load(), 1) << "task " << i;
    }
  }
}

TEST(DriverExecutor, ThreadPoolRejectsThreadCountsOutsideOneTo4096) {
  expect_error_before_allocating([] { ThreadPool(0); }, "ThreadPool", "threads", "in [1, 4096]",
                                 "0");
  expect_error_before_allocating([] { ThreadPool(4097); }, "ThreadPool", "threads", "in [1, 4096]",
                                 "4097");
}

// ---- allocation ---------------------------------------------------------------------------------

class DriverAllocation : public ::testing::TestWithParam<Family> {};

// After reserve(max_batch, max_tokens, threads) and one warm-up step, 17 decode steps of a
// ragged batch (its long sequence split across the threads) on ThreadPools of 2 and 3 threads
// allocate nothing, by operator new (any thread) or Eigen's malloc.
TEST_P(DriverAllocation, SteadyStateThreadedDecodeAllocatesNothing) {
  ASSERT_TRUE(AllocationCounter::installed());
  const Family family = GetParam();
  const Model model(family, 71);
  const Scenario s(model, decode_batch({5, 130, 1200, 40}), 900);
  for (StorageType storage : {StorageType::f32, StorageType::bf16}) {
    for (Index threads : {2, 3}) {
      SCOPED_TRACE(std::string(tpattn::name_of(storage)) + ", ThreadPool(" +
                   std::to_string(threads) + ")");
      const std::unique_ptr<AnyLayer> layer = model.layer(storage, 0);
      TestCache c = s.cache(layer->cache_record(), CacheKind::paged);
      RowMatrix y(s.batch(), kDModel);
      Executor* executor = &pool(threads);
      EXPECT_TRUE(splits_keys(family, storage, 0, s, threads)) << "the long sequence is split";
      layer->reserve(s.batch(), s.batch(), threads);
      layer->decode(*c.cache, c.seqs.data(), s.batch(), s.x_new.data(), y.data(), executor);
      HeapAllocations total;
      for (int step = 0; step < 17; ++step) {  // 17 steps cross a page end in every sequence
        total += count_heap_allocations([&] {
          layer->decode(*c.cache, c.seqs.data(), s.batch(), s.x_new.data(), y.data(), executor);
        });
      }
      EXPECT_EQ(total.by_new, 0u) << "operator new over 17 steps";
      EXPECT_EQ(total.by_eigen, 0) << "Eigen's malloc over 17 steps";
      EXPECT_TRUE(y.allFinite());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, DriverAllocation, ::testing::ValuesIn(kFamilies),
                         [](const ::testing::TestParamInfo<Family>& info) {
                           return std::string(name_of(info.param));
                         });

// ---- AttentionPlan ------------------------------------------------------------------------------

const PlanShape kGqaShape{8, 16, 1000, 16, 0};  // rows_per_token, value_width, task, block, window

PlanShape with_window(PlanShape shape, Index window) {
  shape.window = window;
  return shape;
}

// Every (sequence, query token, key the token sees) is covered by exactly one item; each query
// token's output is written once (by one unsplit item, or by the merge of one split chunk whose
// items split [first key any of its tokens sees, length) into consecutive ranges); partial slots
// are disjoint and inside the workspace; tasks <= threads.
void expect_valid_plan(const AttentionPlan& plan, const std::string& what) {
  SCOPED_TRACE(what);
  const PlanShape& shape = plan.shape();
  ASSERT_GE(plan.tasks(), 1);
  EXPECT_LE(plan.tasks(), plan.threads());
  EXPECT_EQ(plan.tasks(), std::min<Index>(plan.threads(), static_cast<Index>(plan.items().size())));
  EXPECT_LE(plan.workspace_floats(),
            AttentionPlan::workspace_bound(shape, plan.threads(), "expect_valid_plan"));
  Index tokens = 0;
  for (Index b = 0; b < plan.batch(); ++b) {
    EXPECT_EQ(plan.token_offset(b), tokens);
    tokens += plan.new_tokens(b);
  }
  EXPECT_EQ(plan.query_tokens(), tokens);

  // Each query token: written by exactly one unsplit item or one split chunk.
  std::vector<int> writers(static_cast<std::size_t>(tokens), 0);
  for (const WorkItem& item : plan.items()) {
    ASSERT_GE(item.query_count, 1);
    ASSERT_LE(item.query_first + item.query_count, plan.new_tokens(item.sequence));
    ASSERT_GE(item.key_begin, 0);
    ASSERT_LE(item.key_begin, item.key_end);
    ASSERT_LE(item.key_end, plan.length(item.sequence));
    if (item.partial >= 0) continue;
    EXPECT_EQ(item.key_begin, 0);
    EXPECT_EQ(item.key_end, plan.length(item.sequence));
    for (Index t = 0; t < item.query_count; ++t)
      ++writers[static_cast<std::size_t>(plan.token_offset(item.sequence) + item.query_first + t)];
  }
  Index slots_end = 0;
  for (const SplitChunk& chunk : plan.split_chunks()) {
    EXPECT_GE(chunk.splits, 2);
    EXPECT_LE(chunk.query_count, shape.query_block) << "a split chunk is one query block";
    for (Index t = 0; t < chunk.query_count; ++t)
      ++writers[static_cast<std::size_t>(plan.token_offset(chunk.sequence) + chunk.query_first +
                                         t)];
    // Its items, in slot order: consecutive ranges from the chunk's first key to the end.
    const ChunkKeys keys = plan.key_bounds(chunk.sequence, chunk.query_first, chunk.query_count);
    const Index slot = plan.slot_floats(chunk.query_count);
    EXPECT_EQ(chunk.partial, slots_end) << "slots are consecutive";
    Index next_key = keys.lower;
    for (Index s = 0; s < chunk.splits; ++s) {
      const auto item =
          std::find_if(plan.items().begin(), plan.items().end(),
                       [&](const WorkItem& w) { return w.partial == chunk.partial + s * slot; });
      ASSERT_NE(item, plan.items().end()) << "split " << s << " has no item";
      EXPECT_EQ(item->sequence, chunk.sequence);
      EXPECT_EQ(item->query_first, chunk.query_first);
      EXPECT_EQ(item->query_count, chunk.query_count);
      EXPECT_EQ(item->key_begin, next_key) << "split " << s;
      EXPECT_TRUE(s == 0 || item->key_begin % AttentionPlan::kSplitAlign == 0 ||
                  item->key_begin == item->key_end);
      next_key = item->key_end;
    }
    EXPECT_EQ(next_key, plan.length(chunk.sequence)) << "the splits reach the end";
    slots_end = chunk.partial + chunk.splits * slot;
  }
  const Index split_items = static_cast<Index>(std::count_if(
      plan.items().begin(), plan.items().end(), [](const WorkItem& w) { return w.partial >= 0; }));
  Index splits = 0;
  for (const SplitChunk& chunk : plan.split_chunks()) splits += chunk.splits;
  EXPECT_EQ(split_items, splits) << "every split item belongs to a chunk";
  EXPECT_LE(plan.partial_offset() + slots_end + kWorkspaceAlignFloats, plan.workspace_floats())
      << "partial slots inside the workspace";
  for (Index token = 0; token < tokens; ++token)
    EXPECT_EQ(writers[static_cast<std::size_t>(token)], 1) << "query token " << token;

  // Each (sequence, query token, key it sees): exactly one item covering it.
  for (Index b = 0; b < plan.batch(); ++b) {
    const Index n = plan.new_tokens(b), length = plan.length(b);
    std::vector<const WorkItem*> mine;
    for (const WorkItem& item : plan.items())
      if (item.sequence == b) mine.push_back(&item);
    std::vector<int> seen(static_cast<std::size_t>(length));
    for (Index t = 0; t < n; ++t) {
      const Index horizon = length - n + 1 + t;
      const Index lower = shape.window > 0 ? std::max<Index>(0, horizon - shape.window) : 0;
      std::fill(seen.begin(), seen.end(), 0);
      for (const WorkItem* item : mine) {
        if (t < item->query_first || t >= item->query_first + item->query_count) continue;
        for (Index key = std::max(lower, item->key_begin); key < std::min(horizon, item->key_end);
             ++key)
          ++seen[static_cast<std::size_t>(key)];
      }
      for (Index key = lower; key < horizon; ++key)
        if (seen[static_cast<std::size_t>(key)] != 1) {
          ADD_FAILURE() << "sequence " << b << ", query token " << t << ", key " << key
                        << " covered " << seen[static_cast<std::size_t>(key)] << " times";
          return;
        }
    }
  }
}

struct PlanCase {
  std::string name;
  std::vector<Index> lengths, new_tokens;  // new_tokens empty: decode
  Index window;
};

const std::vector<PlanCase>& plan_cases() {
  static const std::vector<PlanCase> cases = {
      {"one token", {1}, {}, 0},
      {"ragged decode", {1, 3, 130, 700, 2000}, {}, 0},
      {"ragged mixed", {1, 3, 130, 700, 2000}, {1, 3, 1, 37, 1}, 0},
      {"long prefill", {3000}, {1000}, 0},
      {"16k decode", {16384}, {}, 0},
      {"many short", std::vector<Index>(40, 9), {}, 0},
      {"windowed decode", {1, 3, 130, 700, 16384}, {}, 300},
      {"windowed mixed", {337, 5000, 64}, {37, 1, 64}, 100},
      {"window 1", {1, 3, 130, 2000}, {1, 2, 17, 1}, 1},
  };
  return cases;
}

TEST(DriverPlan, ItemsCoverEverySequenceQueryTokenAndKeyExactlyOnce) {
  for (const PlanCase& c : plan_cases()) {
    for (Index threads : {1, 2, 3, 4, 7, 16}) {
      AttentionPlan plan;
      plan.make(with_window(kGqaShape, c.window), c.lengths.data(),
                c.new_tokens.empty() ? nullptr : c.new_tokens.data(),
                static_cast<Index>(c.lengths.size()), threads);
      expect_valid_plan(plan, c.name + ", " + std::to_string(threads) + " threads");
    }
  }
  // TPA's query block of 8.
  AttentionPlan plan;
  const Index lengths[] = {500, 9000}, new_tokens[] = {100, 1};
  plan.make({6, 16, 500, 8, 0}, lengths, new_tokens, 2, 5);
  expect_valid_plan(plan, "query block 8");
}

TEST(DriverPlan, OneThreadNeverSplitsAndMakesOneItemPerSequence) {
  for (const PlanCase& c : plan_cases()) {
    AttentionPlan plan;
    plan.make(with_window(kGqaShape, c.window), c.lengths.data(),
              c.new_tokens.empty() ? nullptr : c.new_tokens.data(),
              static_cast<Index>(c.lengths.size()), 1);
    EXPECT_TRUE(plan.split_chunks().empty()) << c.name;
    EXPECT_EQ(static_cast<Index>(plan.items().size()), plan.batch()) << c.name;
    EXPECT_EQ(plan.tasks(), 1) << c.name;
    for (const WorkItem& item : plan.items()) {
      EXPECT_EQ(item.partial, -1) << c.name;
      EXPECT_EQ(item.query_count, plan.new_tokens(item.sequence)) << c.name;
    }
  }
}

TEST(DriverPlan, SplitsOfOneLongSequenceGrowWithThreads) {
  const Index length = 16384;
  Index previous = 0;
  for (Index threads : {1, 2, 3, 4, 8, 16}) {
    AttentionPlan plan;
    plan.make(kGqaShape, &length, nullptr, 1, threads);
    const Index items = static_cast<Index>(plan.items().size());
    if (threads == 1) {
      EXPECT_EQ(items, 1);
    } else {
      EXPECT_GT(items, 1) << threads << " threads";
      EXPECT_GE(items, threads) << "every thread gets a share";
      EXPECT_EQ(plan.tasks(), threads);
    }
    EXPECT_GE(items, previous) << threads << " threads";
    previous = items;
  }
  // A window shorter than a split's alignment leaves nothing to split.
  AttentionPlan plan;
  plan.make(with_window(kGqaShape, 100), &length, nullptr, 1, 8);
  EXPECT_EQ(plan.items().size(), 1u);
}

TEST(DriverPlan, RaggedBatchMakesAtMostThreadsTasksAndWorkspaceWithinItsBound) {
  for (const PlanCase& c : plan_cases())
    for (Index threads = 1; threads <= 9; ++threads) {
      AttentionPlan plan;
      plan.make(with_window(kGqaShape, c.window), c.lengths.data(),
                c.new_tokens.empty() ? nullptr : c.new_tokens.data(),
                static_cast<Index>(c.lengths.size()), threads);
      EXPECT_GE(plan.tasks(), 1) << c.name;
      EXPECT_LE(plan.tasks(), threads) << c.name;
      EXPECT_LE(plan.workspace_floats(), AttentionPlan::workspace_bound(plan.shape(), threads, ""))
          << c.name << ", " << threads << " threads";
      // Items are ordered costliest first.
      for (std::size_t i = 1; i < plan.items().size(); ++i)
        EXPECT_GE(plan.items()[i - 1].cost, plan.items()[i].cost) << c.name;
    }
}

TEST(DriverPlan, MakingAPlanWithinWhatWasReservedAllocatesNothing) {
  ASSERT_TRUE(AllocationCounter::installed());
  AttentionPlan plan;
  plan.reserve(5, 43, 7);
  const Index lengths[] = {1, 3, 130, 700, 2000}, new_tokens[] = {1, 3, 1, 37, 1};
  HeapAllocations made;
  for (Index threads = 1; threads <= 7; ++threads)
    made += count_heap_allocations([&] { plan.make(kGqaShape, lengths, new_tokens, 5, threads); });
  EXPECT_EQ(made.by_new, 0u);
  EXPECT_EQ(made.by_eigen, 0);
}

TEST(DriverPlan, BadInputIsAnErrorNamingTheArgumentAndLeavesThePlanAsItWas) {
  AttentionPlan plan;
  const Index lengths[] = {10, 300}, new_tokens[] = {2, 5};
  plan.make(kGqaShape, lengths, new_tokens, 2, 3);
  const std::vector<WorkItem> items = plan.items();
  const Index workspace = plan.workspace_floats();

  const auto refused = [&](const std::function<void()>& make, const std::string& argument,
                           const std::string& part) {
    const Caught c = caught(make);
    EXPECT_EQ(c.kind, "tpattn::Error");
    EXPECT_EQ(c.call, "AttentionPlan::make");
    EXPECT_EQ(c.argument, argument);
    EXPECT_TRUE(contains(c.message, part)) << c.message;
    EXPECT_EQ(plan.batch(), 2);
    EXPECT_EQ(plan.threads(), 3);
    EXPECT_EQ(plan.workspace_floats(), workspace);
    EXPECT_EQ(plan.items().size(), items.size());
  };
  refused([&] { plan.make(kGqaShape, lengths, new_tokens, 0, 3); }, "batch", "got 0");
  refused([&] { plan.make(kGqaShape, lengths, new_tokens, 2, 0); }, "threads", "got 0");
  refused([&] { plan.make(kGqaShape, nullptr, new_tokens, 2, 3); }, "lengths", "got null");
  const Index zero_new[] = {2, 0};
  refused([&] { plan.make(kGqaShape, lengths, zero_new, 2, 3); }, "new_tokens",
          "got new_tokens[1] = 0");
  const Index too_many[] = {11, 5};
  refused([&] { plan.make(kGqaShape, lengths, too_many, 2, 3); }, "lengths",
          "got lengths[0] = 10 < new_tokens = 11");
  const Index empty_sequence[] = {10, 0};
  refused([&] { plan.make(kGqaShape, empty_sequence, nullptr, 2, 3); }, "lengths",
          "got lengths[1] = 0 < new_tokens = 1");
  refused(
      [&] {
        plan.make({0, 16, 100, 16, 0}, lengths, new_tokens, 2, 3);
      },
      "shape", "an empty or negative shape");
  refused(
      [&] {
        plan.make({8, 16, 100, 0, 0}, lengths, new_tokens, 2, 3);
      },
      "shape", "an empty or negative shape");

  struct BadReserve {
    std::array<Index, 3> args;
    const char* argument;
  };
  for (const BadReserve& bad :
       {BadReserve{{0, 1, 1}, "max_batch"}, BadReserve{{1, 0, 1}, "max_tokens"},
        BadReserve{{1, 1, 0}, "threads"}}) {
    const Caught c = caught([&] { plan.reserve(bad.args[0], bad.args[1], bad.args[2]); });
    EXPECT_EQ(c.kind, "tpattn::Error");
    EXPECT_EQ(c.call, "AttentionPlan::reserve");
    EXPECT_EQ(c.argument, bad.argument);
  }
}

}  // namespace
}  // namespace tpattn::test
