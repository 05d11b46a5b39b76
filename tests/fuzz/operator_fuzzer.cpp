// tests/fuzz/operator_fuzzer.cpp -- libFuzzer target: the whole-layer operators against the
// double-precision references of tests/support/.
//
// Each input builds one operator -- GQA (also as MultiHeadAttention / MultiQueryAttention when
// g = h or g = 1), MLA, TPA or TPA-KVonly -- with small random shapes (d_model <= 48, heads <= 6,
// head widths <= 16, latent <= 24, ranks <= 4), random RoPE settings and f32 / bf16 / f16 storage,
// weights drawn as the tests draw them (N(0, 1/fan_in), from a fuzzed seed), one cache
// (contiguous or paged, small random sizes), and then runs a random series of calls: prefill of
// chunks, batched decode over several sequences of different lengths, truncate, remove, reserve,
// and misuse; the valid prefill and decode calls run on no executor or a ThreadPool of 2 or 3
// threads, chosen per input. The model is each live sequence's list of input rows x; after every
// prefill or decode, each sequence it touched is recomputed from scratch by the reference, and:
//  1. every cached element (K, V / latent, rope key / A_K, B_K, A_V, B_V) is the reference's
//     value rounded to the storage: |cached - exact| <= u |exact| + 1e-5 max(1, max|plane|)
//     (u = 2^-24, 2^-8, 2^-11; the cached-element rule of tests/gqa_test.cpp);
//  2. the new outputs match the reference run over those cached values (so the storage's
//     rounding is the same on both sides) within 1e-4 max(1, max|y|): fp32 arithmetic only
//     (the tests bound this at 1e-5 .. 2e-5 on their fixed shapes; 1e-4 leaves room for fuzzed
//     shapes and input scales, and a wrong token, position or head is off by > 1e-2);
//  3. with f32 storage, the new outputs also match the exact reference (nothing rounded) within
//     1e-4 max(1, max|y|). For bf16 / f16 the tests' sanity bounds against the exact reference
//     (1e-2, 2e-3) hold for their shapes, where each output averages many rounded terms, but not
//     for fuzzed ones: with h = d_h = 1, one token and R_V = 4, a TPA value is a 4-term sum of
//     rounded factors that may cancel, and f16 rounding alone moved y by 5.4e-3 (found by this
//     fuzzer). There checks 1 and 2 -- the tests' own method for narrow storage -- decide.
// Misuse (ids not live, n = 0 or more than the room, duplicate ids, a batch that runs a paged
// pool dry midway, null buffers, a cache of another record, invalid configs and weights) must
// throw tpattn::Error naming the operator's call and leave the cache byte for byte as it was.
//
// Any mismatch, any other exception, or no exception where one was due: abort(), which libFuzzer
// reports as a crash. Set TPATTN_FUZZ_TRACE=1 to print the calls of an input.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/mla_reference.hpp"
#include "support/reference.hpp"
#include "support/tpa_reference.hpp"
#include "tpattn/tpattn.hpp"

namespace {

namespace ref = ::tpattn_test;

using ref::Tensor3;
using tpattn::CacheRecord;
using tpattn::ContiguousKvCache;
using tpattn::GqaConfig;
using tpattn::GqaWeights;
using tpattn::Index;
using tpattn::KvCache;
using tpattn::MlaConfig;
using tpattn::MlaWeights;
using tpattn::PagedKvCache;
using tpattn::PlaneSpec;
using tpattn::RopeConfig;
using tpattn::SequenceId;
using tpattn::SequenceView;
using tpattn::StorageType;
using tpattn::TpaConfig;
using tpattn::TpaWeights;

// ---- failures ----------------------------------------------------------------------------------

[[noreturn]] void fail(int line, const std::string& what) {
  std::fprintf(stderr, "operator_fuzzer: check failed (operator_fuzzer.cpp:%d): %s\n", line,
               what.c_str());
  std::fflush(stderr);
  std::abort();
}

#define FUZZ_REQUIRE(condition, message)                                          \
  do {                                                                            \
    if (!(condition)) fail(__LINE__, std::string(#condition) + ": " + (message)); \
  } while (false)

bool tracing() {
  static const bool on = [] {
    const char* value = std::getenv("TPATTN_FUZZ_TRACE");
    return value != nullptr && value[0] != '\0' && value[0] != '0';
  }();
  return on;
}

template <class... Args>
void trace(const char* format, Args... args) {
  if (tracing()) {
    std::fprintf(stderr, format, args...);
    std::fputc('\n', stderr);
  }
}

std::string text(Index value) { return std::to_string(value); }
std::string number(double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof buffer, "%.6g", value);
  return buffer;
}

// ---- tolerances (see the header comment) -------------------------------------------------------

constexpr double kCachedElementSlack = 1e-5;  // check 1, times max(1, max|plane|)
constexpr double kFp32Tolerance = 1e-4;       // checks 2 and 3 (f32), times max(1, max|y|)

// ---- the operator under test -------------------------------------------------------------------

enum class Family { gqa, mla, tpa };

// The reference's view of one sequence: all its L input rows x [L, d] and its L cached tokens'
// planes as the cache holds them ([L, rows, cols] each) -> the exact planes of all L tokens, and
// the outputs of the last n tokens over the cached planes and (if `exact`) over the exact ones.
// Only the last n tokens' queries are formed, so a check costs n L, not L^2, attention work.
struct ReferenceResult {
  std::vector<Tensor3> planes;
  Eigen::MatrixXd y_cached;  // [n, d]
  Eigen::MatrixXd y_exact;   // [n, d], if asked for
};
using Reference = std::function<ReferenceResult(
    const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n, bool exact)>;

ReferenceResult gqa_reference(const GqaConfig& config, const GqaWeights& weights,
                              const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n,
                              bool exact) {
  const ref::Projections p = ref::gqa_projections(config, weights, x);
  const Eigen::MatrixXd last = x.bottomRows(n);
  ReferenceResult r;
  r.planes = {p.k, p.v};
  r.y_cached = ref::gqa_layer_reference(config, weights, last, cached[0], cached[1]);
  if (exact) r.y_exact = ref::gqa_layer_reference(config, weights, last, p.k, p.v);
  return r;
}

ReferenceResult mla_reference(const MlaConfig& config, const MlaWeights& weights,
                              const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n,
                              bool exact) {
  const ref::MlaProjections p = ref::mla_projections(config, weights, x);
  const Eigen::MatrixXd last = x.bottomRows(n);
  ReferenceResult r;
  r.planes = {p.latent, p.rope_key};
  r.y_cached =
      ref::mla_layer_reference(config, weights, last, cached[0], cached[1], ref::mla_scale(config));
  if (exact)
    r.y_exact = ref::mla_layer_reference(config, weights, last, p.latent, p.rope_key,
                                         ref::mla_scale(config));
  return r;
}

// tpa_layer_reference() of tpa_reference.hpp from the same pieces (factors in double, B_Q and
// B_K rows rotated, Q, K, V materialised, attention_reference, W_O), with the queries of the
// last n tokens only, and K, V from either the exact or the cached factors.
ReferenceResult tpa_reference(const TpaConfig& raw, const TpaWeights& weights,
                              const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n,
                              bool exact) {
  const TpaConfig config = ref::resolved(raw);
  const Index h = config.heads, dh = config.head_dim, dv = config.value_dim;
  const Index length = x.rows();
  const Eigen::MatrixXd last = x.bottomRows(n);
  Tensor3 q;
  if (config.rank_q == 0) {
    q = ref::b_factor(weights.w_q, last, h, dh);  // [n, h, d_h]
    ref::rope_reference(q, length - n, config.rope);
  } else {
    const Tensor3 a_q = ref::a_factor(weights.w_a_q, last, h, config.rank_q);
    Tensor3 b_q = ref::b_factor(weights.w_b_q, last, config.rank_q, dh);
    ref::rotate_rows(b_q, length - n, config.rope);
    q = ref::materialise(a_q, b_q);
  }
  ReferenceResult r;
  r.planes = {ref::a_factor(weights.w_a_k, x, h, config.rank_k),
              ref::b_factor(weights.w_b_k, x, config.rank_k, dh),
              ref::a_factor(weights.w_a_v, x, h, config.rank_v),
              ref::b_factor(weights.w_b_v, x, config.rank_v, dv)};
  ref::rotate_rows(r.planes[1], 0, config.rope);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  const auto layer = [&](const std::vector<Tensor3>& factors) {
    const Tensor3 k = ref::materialise(factors[0], factors[1]);
    const Tensor3 v = ref::materialise(factors[2], factors[3]);
    const ref::AttentionResult attention = ref::attention_reference(q, k, v, scale);
    Eigen::MatrixXd flat(n, h * dv);
    for (Index t = 0; t < n; ++t)
      for (Index c = 0; c < h * dv; ++c) flat(t, c) = attention.out.row(t, 0)[c];
    return Eigen::MatrixXd(flat * weights.w_o.cast<double>().transpose());
  };
  r.y_cached = layer(cached);
  if (exact) r.y_exact = layer(r.planes);
  return r;
}

// ---- fuzzed configurations ---------------------------------------------------------------------

StorageType pick_storage(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 2)) {
    case 0: return StorageType::f32;
    case 1: return StorageType::bf16;
    default: return StorageType::f16;
  }
}

// Valid RoPE for vectors of `width` features: on or off, whole or partial, either pairing and
// direction, a few bases.
RopeConfig pick_rope(FuzzedDataProvider& in, Index width) {
  RopeConfig rope;
  rope.enabled = width >= 2 && in.ConsumeIntegralInRange<int>(0, 4) != 0;
  rope.pairing =
      in.ConsumeBool() ? tpattn::RopePairing::half_split : tpattn::RopePairing::interleaved;
  rope.direction =
      in.ConsumeBool() ? tpattn::RopeDirection::standard : tpattn::RopeDirection::reversed;
  rope.base = in.PickValueInArray<double>({10000.0, 500000.0, 100.0, 2.0, 1.0001});
  if (rope.enabled) {
    if (width % 2 == 0 && in.ConsumeBool())
      rope.rotary_dim = 0;  // the whole vector
    else
      rope.rotary_dim = 2 * in.ConsumeIntegralInRange<Index>(1, width / 2);
  }
  return rope;
}

struct Setup {
  Family family = Family::gqa;
  StorageType storage = StorageType::f32;
  std::string name;  // the class, as errors name it
  int variant = 0;   // GQA: 0 GQA, 1 MHA, 2 MQA; TPA: 0 TPA, 1 TPA rank_q 0, 2 the KVonly class
  GqaConfig gqa;     // as the reference reads it (kv_heads explicit)
  MlaConfig mla;
  TpaConfig tpa;
  GqaWeights gqa_weights;
  MlaWeights mla_weights;
  TpaWeights tpa_weights;
  Index d_model = 0;
  double input_scale = 1.0;
  std::string description;
};

Setup pick_setup(FuzzedDataProvider& in) {
  Setup s;
  const int family = in.ConsumeIntegralInRange<int>(0, 2);
  s.storage = pick_storage(in);
  s.d_model = in.ConsumeIntegralInRange<Index>(1, 48);
  const std::uint32_t seed = in.ConsumeIntegral<std::uint32_t>();
  const auto dim = [&](Index high) { return in.ConsumeIntegralInRange<Index>(1, high); };
  char buffer[256];
  if (family == 0) {
    s.family = Family::gqa;
    GqaConfig& c = s.gqa;
    c.d_model = s.d_model;
    c.heads = dim(6);
    std::vector<Index> divisors;
    for (Index g = 1; g <= c.heads; ++g)
      if (c.heads % g == 0) divisors.push_back(g);
    c.kv_heads = divisors[in.ConsumeIntegralInRange<std::size_t>(0, divisors.size() - 1)];
    c.head_dim = dim(16);
    c.value_dim = in.ConsumeBool() ? 0 : dim(16);
    c.rope = pick_rope(in, c.head_dim);
    s.gqa_weights = ref::random_gqa_weights(c, seed);
    s.variant = 0;
    if (c.kv_heads == c.heads && in.ConsumeBool()) s.variant = 1;
    if (c.kv_heads == 1 && in.ConsumeBool()) s.variant = 2;
    s.name = s.variant == 1   ? "MultiHeadAttention"
             : s.variant == 2 ? "MultiQueryAttention"
                              : "GroupedQueryAttention";
    std::snprintf(buffer, sizeof buffer, "d %ld h %ld g %ld d_h %ld d_v %ld",
                  static_cast<long>(c.d_model), static_cast<long>(c.heads),
                  static_cast<long>(c.kv_heads), static_cast<long>(c.head_dim),
                  static_cast<long>(c.value_dim));
  } else if (family == 1) {
    s.family = Family::mla;
    s.name = "MultiHeadLatentAttention";
    MlaConfig& c = s.mla;
    c.d_model = s.d_model;
    c.heads = dim(6);
    c.head_dim = dim(16);
    c.rope_dim = dim(16);
    c.value_dim = in.ConsumeBool() ? 0 : dim(16);
    c.kv_latent_dim = dim(24);
    c.q_latent_dim = in.ConsumeBool() ? 0 : dim(24);
    c.normalize_q_latent = in.ConsumeBool();
    c.normalize_kv_latent = in.ConsumeBool();
    c.norm_eps = in.PickValueInArray<float>({1e-6f, 1e-3f, 1.0f});
    c.rope = pick_rope(in, c.rope_dim);
    s.mla_weights = ref::random_mla_weights(c, seed);
    std::snprintf(buffer, sizeof buffer,
                  "d %ld h %ld d_h %ld d_R %ld d_v %ld d_c %ld d'_c %ld norms %d%d eps %g",
                  static_cast<long>(c.d_model), static_cast<long>(c.heads),
                  static_cast<long>(c.head_dim), static_cast<long>(c.rope_dim),
                  static_cast<long>(c.value_dim), static_cast<long>(c.kv_latent_dim),
                  static_cast<long>(c.q_latent_dim), c.normalize_q_latent ? 1 : 0,
                  c.normalize_kv_latent ? 1 : 0, static_cast<double>(c.norm_eps));
  } else {
    s.family = Family::tpa;
    TpaConfig& c = s.tpa;
    c.d_model = s.d_model;
    c.heads = dim(6);
    c.head_dim = dim(16);
    c.value_dim = in.ConsumeBool() ? 0 : dim(16);
    s.variant = in.ConsumeIntegralInRange<int>(0, 2);
    c.rank_q = s.variant == 0 ? dim(4) : 0;
    c.rank_k = dim(4);
    c.rank_v = dim(4);
    c.order =
        c.rank_q > 0
            ? in.PickValueInArray<tpattn::TpaOrder>(
                  {tpattn::TpaOrder::automatic, tpattn::TpaOrder::factor, tpattn::TpaOrder::query})
            : in.PickValueInArray<tpattn::TpaOrder>(
                  {tpattn::TpaOrder::automatic, tpattn::TpaOrder::query});
    c.rope = pick_rope(in, c.head_dim);
    s.tpa_weights = ref::random_tpa_weights(c, seed);
    s.name = s.variant == 2 ? "TensorProductAttentionKvOnly" : "TensorProductAttention";
    std::snprintf(buffer, sizeof buffer,
                  "d %ld h %ld d_h %ld d_v %ld R_Q %ld R_K %ld R_V %ld "
                  "order %d",
                  static_cast<long>(c.d_model), static_cast<long>(c.heads),
                  static_cast<long>(c.head_dim), static_cast<long>(c.value_dim),
                  static_cast<long>(c.rank_q), static_cast<long>(c.rank_k),
                  static_cast<long>(c.rank_v), static_cast<int>(c.order));
  }
  s.input_scale = in.PickValueInArray<double>({1.0, 1.0, 0.1, 2.5});
  s.description = s.name + " " + tpattn::name_of(s.storage) + " " + buffer;
  return s;
}

RopeConfig& rope_of(Setup& s) {
  return s.family == Family::gqa ? s.gqa.rope : s.family == Family::mla ? s.mla.rope : s.tpa.rope;
}

// Builds the operator of `s` (config and weights as given) and hands it to f.
template <class Storage, class F>
void with_operator(const Setup& s, F&& f) {
  switch (s.family) {
    case Family::gqa: {
      if (s.variant == 1) {
        GqaConfig config = s.gqa;
        if (config.kv_heads == config.heads && config.heads % 2 == 0) config.kv_heads = 0;
        tpattn::MultiHeadAttention<Storage> op(config, s.gqa_weights);
        f(op);
      } else if (s.variant == 2) {
        GqaConfig config = s.gqa;
        if (config.kv_heads == 1 && config.heads % 2 == 1) config.kv_heads = 0;
        tpattn::MultiQueryAttention<Storage> op(config, s.gqa_weights);
        f(op);
      } else {
        tpattn::GroupedQueryAttention<Storage> op(s.gqa, s.gqa_weights);
        f(op);
      }
      return;
    }
    case Family::mla: {
      tpattn::MultiHeadLatentAttention<Storage> op(s.mla, s.mla_weights);
      f(op);
      return;
    }
    case Family::tpa: {
      if (s.variant == 2) {
        tpattn::TensorProductAttentionKvOnly<Storage> op(s.tpa, s.tpa_weights);
        f(op);
      } else {
        tpattn::TensorProductAttention<Storage> op(s.tpa, s.tpa_weights);
        f(op);
      }
      return;
    }
  }
}

// An invalid config or weight must be refused by the constructor with an Error naming the class.
template <class Storage>
void check_bad_construction(FuzzedDataProvider& in, Setup s) {
  const int defect = in.ConsumeIntegralInRange<int>(0, 7);
  const Index bad = in.PickValueInArray<Index>({0, -1, -(Index(1) << 40)});
  std::string what;
  RopeConfig& rope = rope_of(s);
  switch (defect) {
    case 0:
      what = "d_model " + text(bad);
      s.gqa.d_model = s.mla.d_model = s.tpa.d_model = bad;
      break;
    case 1:
      what = "heads " + text(bad);
      s.gqa.heads = s.mla.heads = s.tpa.heads = bad;
      break;
    case 2:
      what = "head_dim " + text(bad);
      s.gqa.head_dim = s.mla.head_dim = s.tpa.head_dim = bad;
      break;
    case 3: {  // an odd or too wide rotary_dim, or a base <= 1 (NaN included)
      const Index width = s.family == Family::mla   ? s.mla.rope_dim
                          : s.family == Family::gqa ? s.gqa.head_dim
                                                    : s.tpa.head_dim;
      rope.enabled = true;
      const int kind = in.ConsumeIntegralInRange<int>(0, 2);
      if (kind == 0) {
        rope.rotary_dim = width % 2 == 1 ? 0 : width + 2;
        what = "rope.rotary_dim " + text(rope.rotary_dim) + " for width " + text(width);
      } else if (kind == 1) {
        rope.rotary_dim = 2 * ((width + 1) / 2) + 1;
        what = "rope.rotary_dim " + text(rope.rotary_dim) + " for width " + text(width);
      } else {
        rope.base = in.PickValueInArray<double>(
            {1.0, 0.5, -3.0, 0.0, std::numeric_limits<double>::quiet_NaN()});
        what = "rope.base " + number(rope.base);
      }
      break;
    }
    case 4:  // a weight of the wrong shape
      what = "w_o of d_model x (width + 1)";
      s.gqa_weights.w_o.conservativeResize(s.d_model, s.gqa_weights.w_o.cols() + 1);
      s.mla_weights.w_o.conservativeResize(s.d_model, s.mla_weights.w_o.cols() + 1);
      s.tpa_weights.w_o.conservativeResize(s.d_model, s.tpa_weights.w_o.cols() + 1);
      break;
    default:  // the family's own constraints
      if (s.family == Family::gqa) {
        if (s.variant == 1) {
          s.gqa.kv_heads = s.gqa.heads + 1;
        } else if (s.variant == 2) {
          s.gqa.kv_heads = 2;
        } else {
          s.gqa.kv_heads = defect == 5 ? s.gqa.heads + 1 : bad;
        }
        what = "kv_heads " + text(s.gqa.kv_heads) + " for heads " + text(s.gqa.heads);
      } else if (s.family == Family::mla) {
        if (defect == 5) {
          s.mla.norm_eps = in.PickValueInArray<float>({0.0f, -1e-6f});
          what = "norm_eps " + number(s.mla.norm_eps);
        } else if (defect == 6) {
          s.mla.q_latent_dim = -1;
          what = "q_latent_dim -1";
        } else {
          s.mla.kv_latent_dim = bad;
          what = "kv_latent_dim " + text(bad);
        }
      } else {
        if (s.variant == 2 && defect == 5) {
          s.tpa.rank_q = 1;
          what = "rank_q 1 for TPA-KVonly";
        } else if (s.tpa.rank_q == 0 && defect == 6) {
          s.tpa.order = tpattn::TpaOrder::factor;
          what = "order factor without rank_q";
        } else {
          s.tpa.rank_k = bad;
          what = "rank_k " + text(bad);
        }
      }
      break;
  }
  trace("bad construction: %s", what.c_str());
  try {
    with_operator<Storage>(s, [](auto&) {});
  } catch (const tpattn::Error& error) {
    FUZZ_REQUIRE(error.call() == s.name, what + ": error names " + error.call());
    return;
  } catch (const std::exception& error) {
    fail(__LINE__, what + ": threw something else than tpattn::Error: " + error.what());
  }
  fail(__LINE__, s.name + " accepted " + what);
}

// ---- the cache's observable state --------------------------------------------------------------

struct Snapshot {
  std::map<SequenceId, std::vector<std::byte>> bytes;
  std::map<SequenceId, Index> lengths, available;
  Index count = 0, bytes_used = 0;
  bool operator==(const Snapshot& o) const {
    return bytes == o.bytes && lengths == o.lengths && available == o.available &&
           count == o.count && bytes_used == o.bytes_used;
  }
};

Index element_size(StorageType type) { return type == StorageType::f32 ? 4 : 2; }

template <class Storage>
Snapshot snapshot(const KvCache& cache) {
  Snapshot shot;
  shot.count = cache.sequence_count();
  shot.bytes_used = cache.bytes_used();
  const CacheRecord& record = cache.record();
  for (SequenceId seq = 0; seq < cache.max_sequences(); ++seq) {
    if (!cache.contains(seq)) continue;
    shot.lengths[seq] = cache.length(seq);
    shot.available[seq] = cache.tokens_available(seq);
    const SequenceView view = cache.view(seq);
    std::vector<std::byte>& bytes = shot.bytes[seq];
    for (Index p = 0; p < record.plane_count(); ++p)
      for (Index b = 0; b < view.block_count(); ++b) {
        const auto* base = reinterpret_cast<const std::byte*>(view.plane_block<Storage>(p, b));
        bytes.insert(bytes.end(), base,
                     base + view.tokens_in_block(b) * view.elements_per_token(p) *
                                element_size(record.plane(p).storage));
      }
  }
  return shot;
}

// Plane p of a view as [length, rows, cols] doubles.
template <class Storage>
Tensor3 read_plane(const SequenceView& view, Index p) {
  const PlaneSpec& plane = view.record().plane(p);
  const Index width = plane.rows * plane.cols;
  Tensor3 out(view.length(), plane.rows, plane.cols);
  Index token = 0;
  for (Index b = 0; b < view.block_count(); ++b) {
    const Storage* rows = view.plane_block<Storage>(p, b);
    for (Index t = 0; t < view.tokens_in_block(b); ++t, ++token)
      for (Index e = 0; e < width; ++e)
        out.data[static_cast<std::size_t>(token * width + e)] =
            static_cast<double>(static_cast<float>(rows[t * width + e]));
  }
  return out;
}

// ---- the fuzzed session ------------------------------------------------------------------------

struct Geometry {
  bool paged = false;
  Index max_sequences = 0, max_tokens = 0, page_tokens = 0, page_count = 0, cap = 0;
};

template <class Storage, class Op>
class Session {
 public:
  Session(FuzzedDataProvider& in, const Setup& setup, Op& op, const Geometry& geometry,
          Reference reference)
      : in_(in),
        setup_(setup),
        op_(op),
        geometry_(geometry),
        reference_(std::move(reference)),
        random_(in.ConsumeIntegral<std::uint32_t>()),
        executor_(executor_for(in.ConsumeIntegralInRange<int>(0, 2))) {
    if (geometry.paged)
      cache_ =
          std::make_unique<PagedKvCache>(op.cache_record(), geometry.page_tokens,
                                         geometry.page_count, geometry.max_sequences, geometry.cap);
    else
      cache_ = std::make_unique<ContiguousKvCache>(op.cache_record(), geometry.max_sequences,
                                                   geometry.max_tokens);
  }

  void run(int max_calls) {
    for (int call = 0; call < max_calls && in_.remaining_bytes() > 0; ++call) {
      switch (in_.ConsumeIntegralInRange<int>(0, 11)) {
        case 0:
        case 1: add_sequence(); break;
        case 2:
        case 3: prefill(); break;
        case 4:
        case 5:
        case 6: decode(); break;
        case 7: truncate(); break;
        case 8: remove(); break;
        case 9: reserve(); break;
        default: misuse(); break;
      }
      check_lengths();
    }
  }

 private:
  // ---- the model ----

  Index length(SequenceId seq) const { return static_cast<Index>(x_.at(seq).size()); }
  Index pages_of(Index length) const {
    return (length + geometry_.page_tokens - 1) / geometry_.page_tokens;
  }
  Index free_pages() const {
    Index held = 0;
    for (const auto& entry : x_) held += pages_of(static_cast<Index>(entry.second.size()));
    return geometry_.page_count - held;
  }
  Index tokens_available(SequenceId seq) const {
    const Index n = length(seq);
    if (!geometry_.paged) return geometry_.max_tokens - n;
    const Index room =
        pages_of(n) * geometry_.page_tokens - n + free_pages() * geometry_.page_tokens;
    return geometry_.cap > 0 ? std::min(room, geometry_.cap - n) : room;
  }

  void check_lengths() const {
    FUZZ_REQUIRE(cache_->sequence_count() == static_cast<Index>(x_.size()), "sequence count");
    Index tokens = 0;
    for (const auto& [seq, rows] : x_) {
      FUZZ_REQUIRE(cache_->length(seq) == static_cast<Index>(rows.size()),
                   "length(" + text(seq) + ") " + text(cache_->length(seq)) + ", model " +
                       text(static_cast<Index>(rows.size())));
      FUZZ_REQUIRE(cache_->tokens_available(seq) == tokens_available(seq),
                   "tokens_available(" + text(seq) + ") " + text(cache_->tokens_available(seq)) +
                       ", model " + text(tokens_available(seq)));
      tokens += static_cast<Index>(rows.size());
    }
    FUZZ_REQUIRE(cache_->bytes_used() == tokens * cache_->bytes_per_token(), "bytes_used");
  }

  // n new input rows: N(0, 1) x input_scale, values from the input in [-4, 4], zeros, or
  // repeats of the sequence's earlier rows (equal keys, tied scores).
  std::vector<float> make_rows(Index n, const std::vector<std::vector<float>>* history) {
    const Index d = setup_.d_model;
    std::vector<float> x(static_cast<std::size_t>(n * d));
    for (Index t = 0; t < n; ++t) {
      float* row = x.data() + t * d;
      const int mode = in_.ConsumeIntegralInRange<int>(0, 7);
      if (mode == 6 && history != nullptr && !history->empty()) {
        const auto& earlier =
            (*history)[in_.ConsumeIntegralInRange<std::size_t>(0, history->size() - 1)];
        std::copy(earlier.begin(), earlier.end(), row);
      } else if (mode == 5) {
        for (Index c = 0; c < d; ++c)
          row[c] = static_cast<float>(in_.ConsumeIntegral<std::int8_t>()) / 32.0f;
      } else if (mode == 7 && in_.ConsumeIntegralInRange<int>(0, 3) == 0) {
        std::fill(row, row + d, 0.0f);
      } else {
        for (Index c = 0; c < d; ++c)
          row[c] = static_cast<float>(random_.normal(setup_.input_scale));
      }
    }
    return x;
  }

  // The sequence's cached planes and the reference over its inputs; then checks 1-3 on the
  // outputs y ([n, d]) of its last n tokens.
  void check_outputs(SequenceId seq, Index n, const float* y) const {
    const std::vector<std::vector<float>>& rows = x_.at(seq);
    const Index length = static_cast<Index>(rows.size()), d = setup_.d_model;
    Eigen::MatrixXd x(length, d);
    for (Index t = 0; t < length; ++t)
      for (Index c = 0; c < d; ++c)
        x(t, c) = rows[static_cast<std::size_t>(t)][static_cast<std::size_t>(c)];
    const SequenceView view = cache_->view(seq);
    FUZZ_REQUIRE(view.length() == length, "view length");
    const CacheRecord& record = cache_->record();
    std::vector<Tensor3> cached;
    for (Index p = 0; p < record.plane_count(); ++p) cached.push_back(read_plane<Storage>(view, p));
    const ReferenceResult expected = reference_(x, cached, n, setup_.storage == StorageType::f32);
    const std::string where =
        "seq " + text(seq) + " (" + text(length) + " tokens, last " + text(n) + ")";

    // 1. the cached elements
    const double u = ref::unit_roundoff(setup_.storage);
    for (Index p = 0; p < record.plane_count(); ++p) {
      const Tensor3& exact = expected.planes[static_cast<std::size_t>(p)];
      const Tensor3& stored = cached[static_cast<std::size_t>(p)];
      FUZZ_REQUIRE(exact.size() == stored.size(), "plane sizes");
      const double slack = kCachedElementSlack * std::max(1.0, ref::max_abs(exact));
      for (Index k = 0; k < stored.size(); ++k) {
        const double r = exact.data[static_cast<std::size_t>(k)];
        const double c = stored.data[static_cast<std::size_t>(k)];
        FUZZ_REQUIRE(std::abs(c - r) <= u * std::abs(r) + slack,
                     where + ": cached " + record.plane(p).name + "[" + text(k) +
                         "] = " + number(c) + ", reference " + number(r) + " (token " +
                         text(k / record.plane(p).elements_per_token()) + ")");
      }
    }

    // 2 and 3: the outputs
    const auto compare = [&](const Eigen::MatrixXd& reference, double tolerance, const char* what) {
      double scale = 1.0, worst = 0.0;
      Index worst_at = 0;
      for (Index t = 0; t < n; ++t)
        for (Index c = 0; c < d; ++c) scale = std::max(scale, std::abs(reference(t, c)));
      for (Index t = 0; t < n; ++t)
        for (Index c = 0; c < d; ++c) {
          double error = std::abs(static_cast<double>(y[t * d + c]) - reference(t, c));
          if (std::isnan(error)) error = std::numeric_limits<double>::infinity();
          if (error > worst) {
            worst = error;
            worst_at = t * d + c;
          }
        }
      FUZZ_REQUIRE(worst <= tolerance * scale,
                   where + ": output vs " + what + ": max error " + number(worst) + " > " +
                       number(tolerance) + " x " + number(scale) + " at y[" + text(worst_at) +
                       "] = " + number(y[worst_at]) + ", reference " +
                       number(reference(worst_at / d, worst_at % d)));
    };
    compare(expected.y_cached, kFp32Tolerance, "the reference over the cached planes");
    if (setup_.storage == StorageType::f32)
      compare(expected.y_exact, kFp32Tolerance, "the exact reference");
  }

  // ---- calls ----

  SequenceId pick_live() {
    if (x_.empty()) return -1;
    auto it = x_.begin();
    std::advance(it, in_.ConsumeIntegralInRange<std::size_t>(0, x_.size() - 1));
    return it->first;
  }

  void add_sequence() {
    if (static_cast<Index>(x_.size()) == geometry_.max_sequences) return;
    const SequenceId seq = cache_->add_sequence();
    trace("add_sequence -> %ld", static_cast<long>(seq));
    FUZZ_REQUIRE(x_.count(seq) == 0, "id handed out twice");
    x_[seq];
  }

  void prefill() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index room = tokens_available(seq);
    if (room == 0) return;
    const Index n = in_.ConsumeIntegralInRange<Index>(1, std::min<Index>(room, 12));
    const std::vector<float> x = make_rows(n, &x_.at(seq));
    std::vector<float> y(x.size());
    trace("prefill(%ld, %ld) at length %ld", static_cast<long>(seq), static_cast<long>(n),
          static_cast<long>(length(seq)));
    op_.prefill(*cache_, seq, n, x.data(), y.data(), executor_);
    for (Index t = 0; t < n; ++t)
      x_.at(seq).emplace_back(x.begin() + t * setup_.d_model, x.begin() + (t + 1) * setup_.d_model);
    check_outputs(seq, n, y.data());
  }

  // A batch of distinct live sequences, in a fuzzed order.
  std::vector<SequenceId> pick_batch() {
    std::vector<SequenceId> live;
    for (const auto& entry : x_) live.push_back(entry.first);
    std::vector<SequenceId> batch;
    const std::size_t size = in_.ConsumeIntegralInRange<std::size_t>(1, live.size());
    while (batch.size() < size) {
      const std::size_t k = in_.ConsumeIntegralInRange<std::size_t>(0, live.size() - 1);
      batch.push_back(live[k]);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
    }
    return batch;
  }

  // Whether decode can append one token to each: each has room on its own, and a paged pool
  // has a free page for every sequence whose last page is full.
  bool batch_fits(const std::vector<SequenceId>& batch) const {
    Index new_pages = 0;
    for (SequenceId seq : batch) {
      if (tokens_available(seq) < 1) return false;
      if (geometry_.paged && length(seq) % geometry_.page_tokens == 0) ++new_pages;
    }
    return !geometry_.paged || new_pages <= free_pages();
  }

  void decode() {
    if (x_.empty()) return add_sequence();
    const std::vector<SequenceId> batch = pick_batch();
    const Index size = static_cast<Index>(batch.size()), d = setup_.d_model;
    std::vector<float> x;
    for (SequenceId seq : batch) {
      const std::vector<float> row = make_rows(1, &x_.at(seq));
      x.insert(x.end(), row.begin(), row.end());
    }
    std::vector<float> y(x.size());
    if (!batch_fits(batch)) {
      expect_error("decode of a batch of " + text(size) + " without room for all", "decode",
                   {"cache"}, [&] { op_.decode(*cache_, batch.data(), size, x.data(), y.data()); });
      return;
    }
    if (tracing()) {
      std::string list;
      for (SequenceId seq : batch) list += " " + text(seq) + "@" + text(length(seq));
      trace("decode batch of %ld:%s", static_cast<long>(size), list.c_str());
    }
    op_.decode(*cache_, batch.data(), size, x.data(), y.data(), executor_);
    for (Index b = 0; b < size; ++b)
      x_.at(batch[static_cast<std::size_t>(b)])
          .emplace_back(x.begin() + b * d, x.begin() + (b + 1) * d);
    for (Index b = 0; b < size; ++b)
      check_outputs(batch[static_cast<std::size_t>(b)], 1, y.data() + b * d);
  }

  void truncate() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    const Index new_length = in_.ConsumeIntegralInRange<Index>(0, length(seq));
    trace("truncate(%ld, %ld)", static_cast<long>(seq), static_cast<long>(new_length));
    cache_->truncate(seq, new_length);
    x_.at(seq).resize(static_cast<std::size_t>(new_length));
  }

  void remove() {
    const SequenceId seq = pick_live();
    if (seq < 0) return add_sequence();
    trace("remove_sequence(%ld)", static_cast<long>(seq));
    cache_->remove_sequence(seq);
    x_.erase(seq);
  }

  void reserve() {
    const Index batch = in_.ConsumeIntegralInRange<Index>(1, 8);
    const Index tokens = in_.ConsumeIntegralInRange<Index>(1, 16);
    trace("reserve(%ld, %ld)", static_cast<long>(batch), static_cast<long>(tokens));
    op_.reserve(batch, tokens);
  }

  // f must throw tpattn::Error from <name>::<method> about one of `arguments` (each a defect
  // of the call; which one a call reports first is not specified), and change nothing.
  template <class F>
  void expect_error(const std::string& what, const char* method,
                    const std::vector<std::string>& arguments, F&& f) {
    trace("  misuse: %s", what.c_str());
    const Snapshot before = snapshot<Storage>(*cache_);
    const std::string call = setup_.name + "::" + method;
    try {
      f();
    } catch (const tpattn::Error& error) {
      std::string expected;
      for (const std::string& argument : arguments) expected += " " + argument;
      FUZZ_REQUIRE(error.call() == call && std::find(arguments.begin(), arguments.end(),
                                                     error.argument()) != arguments.end(),
                   what + ": error names " + error.call() + " / " + error.argument() +
                       ", expected " + call + " /" + expected + " (" + error.what() + ")");
      FUZZ_REQUIRE(snapshot<Storage>(*cache_) == before, what + " threw but changed the cache");
      check_lengths();
      return;
    } catch (const std::exception& error) {
      fail(__LINE__, what + ": threw something else than tpattn::Error: " + error.what());
    } catch (...) {
      fail(__LINE__, what + ": threw a non-std exception");
    }
    fail(__LINE__, what + ": no error");
  }

  // `arguments`, plus "cache" when a live sequence of the batch has no room for a token.
  std::vector<std::string> with_room_defects(std::vector<std::string> arguments,
                                             const std::vector<SequenceId>& batch) const {
    for (SequenceId seq : batch)
      if (x_.count(seq) != 0 && tokens_available(seq) < 1) {
        arguments.push_back("cache");
        break;
      }
    return arguments;
  }

  // A sequence id that is not live.
  SequenceId not_live() {
    std::vector<SequenceId> ids = {-1, geometry_.max_sequences, std::numeric_limits<Index>::max(),
                                   std::numeric_limits<Index>::min()};
    for (SequenceId seq = 0; seq < geometry_.max_sequences; ++seq)
      if (x_.count(seq) == 0) ids.push_back(seq);
    return ids[in_.ConsumeIntegralInRange<std::size_t>(0, ids.size() - 1)];
  }

  void misuse() {
    const Index d = setup_.d_model;
    const SequenceId live = pick_live();
    const int kind = in_.ConsumeIntegralInRange<int>(0, 11);
    std::vector<float> x(static_cast<std::size_t>(4 * d), 0.5f), y(x.size());
    switch (kind) {
      case 0: {
        const SequenceId seq = not_live();
        expect_error("prefill of sequence " + text(seq) + " not live", "prefill", {"seq"},
                     [&] { op_.prefill(*cache_, seq, 1, x.data(), y.data()); });
        return;
      }
      case 1: {
        if (live < 0) return;
        const Index n = in_.PickValueInArray<Index>({0, -1, std::numeric_limits<Index>::min()});
        expect_error("prefill of n = " + text(n), "prefill", {"n_tokens"},
                     [&] { op_.prefill(*cache_, live, n, x.data(), y.data()); });
        return;
      }
      case 2: {
        if (live < 0) return;
        const Index n = tokens_available(live) + in_.ConsumeIntegralInRange<Index>(1, 3);
        const std::vector<float> many = make_rows(n, nullptr);
        std::vector<float> out(many.size());
        expect_error(
            "prefill of " + text(n) + " tokens with room for " + text(tokens_available(live)),
            "prefill", {"n_tokens"},
            [&] { op_.prefill(*cache_, live, n, many.data(), out.data()); });
        return;
      }
      case 3: {
        if (live < 0) return;
        const bool x_null = in_.ConsumeBool();
        std::vector<std::string> arguments = {x_null ? "x" : "y"};
        if (tokens_available(live) < 1) arguments.push_back("n_tokens");
        expect_error(std::string("prefill with null ") + (x_null ? "x" : "y"), "prefill", arguments,
                     [&] {
                       op_.prefill(*cache_, live, 1, x_null ? nullptr : x.data(),
                                   x_null ? y.data() : nullptr);
                     });
        return;
      }
      case 4: {  // a batch with an id that is not live
        std::vector<SequenceId> batch;
        if (!x_.empty()) batch = pick_batch();
        const SequenceId bad = not_live();
        batch.insert(batch.begin() + static_cast<std::ptrdiff_t>(
                                         in_.ConsumeIntegralInRange<std::size_t>(0, batch.size())),
                     bad);
        batch.resize(std::min<std::size_t>(batch.size(), 4));
        if (std::find(batch.begin(), batch.end(), bad) == batch.end()) batch.back() = bad;
        std::vector<float> xb(batch.size() * static_cast<std::size_t>(d), 0.25f), yb(xb.size());
        expect_error("decode with sequence " + text(bad) + " not live", "decode",
                     with_room_defects({"seqs"}, batch), [&] {
                       op_.decode(*cache_, batch.data(), static_cast<Index>(batch.size()),
                                  xb.data(), yb.data());
                     });
        return;
      }
      case 5: {  // a batch with an id twice
        if (live < 0) return;
        std::vector<SequenceId> batch = pick_batch();
        batch.insert(batch.begin() + static_cast<std::ptrdiff_t>(
                                         in_.ConsumeIntegralInRange<std::size_t>(0, batch.size())),
                     batch[in_.ConsumeIntegralInRange<std::size_t>(0, batch.size() - 1)]);
        std::vector<float> xb(batch.size() * static_cast<std::size_t>(d), 0.25f), yb(xb.size());
        expect_error("decode with a duplicate id", "decode", with_room_defects({"seqs"}, batch),
                     [&] {
                       op_.decode(*cache_, batch.data(), static_cast<Index>(batch.size()),
                                  xb.data(), yb.data());
                     });
        return;
      }
      case 6: {
        const Index batch = in_.PickValueInArray<Index>({0, -1, std::numeric_limits<Index>::min()});
        const SequenceId seq = live < 0 ? 0 : live;
        expect_error("decode of batch " + text(batch), "decode", {"batch"},
                     [&] { op_.decode(*cache_, &seq, batch, x.data(), y.data()); });
        return;
      }
      case 7: {
        if (live < 0) return;
        const int which = in_.ConsumeIntegralInRange<int>(0, 2);
        const char* argument = which == 0 ? "seqs" : which == 1 ? "x" : "y";
        expect_error(std::string("decode with null ") + argument, "decode",
                     with_room_defects({argument}, {live}), [&] {
                       op_.decode(*cache_, which == 0 ? nullptr : &live, 1,
                                  which == 1 ? nullptr : x.data(), which == 2 ? nullptr : y.data());
                     });
        return;
      }
      default: {  // a cache of another record
        CacheRecord record = op_.cache_record();
        std::vector<PlaneSpec> planes = record.planes();
        const int change = in_.ConsumeIntegralInRange<int>(0, 3);
        PlaneSpec& plane = planes[in_.ConsumeIntegralInRange<std::size_t>(0, planes.size() - 1)];
        if (change == 0)
          plane.storage = plane.storage == StorageType::f32 ? StorageType::bf16 : StorageType::f32;
        else if (change == 1)
          plane.cols += 1;
        else if (change == 2)
          plane.name += "'";
        else
          planes.push_back({"extra", 1, 1, plane.storage});
        ContiguousKvCache other(CacheRecord(planes), 2, 4);
        const SequenceId seq = other.add_sequence();
        const bool use_decode = in_.ConsumeBool();
        expect_error("a cache of another record", use_decode ? "decode" : "prefill", {"cache"},
                     [&] {
                       if (use_decode)
                         op_.decode(other, &seq, 1, x.data(), y.data());
                       else
                         op_.prefill(other, seq, 1, x.data(), y.data());
                     });
        FUZZ_REQUIRE(other.length(seq) == 0 && other.bytes_used() == 0,
                     "the refused cache changed");
        return;
      }
    }
  }

  // The executor of the valid prefill and decode calls: none, or a pool of 2 or 3 threads
  // (built once per process: outputs must not depend on it).
  static tpattn::Executor* executor_for(int choice) {
    static tpattn::ThreadPool two(2), three(3);
    return choice == 0 ? nullptr : choice == 1 ? static_cast<tpattn::Executor*>(&two) : &three;
  }

  FuzzedDataProvider& in_;
  const Setup& setup_;
  Op& op_;
  Geometry geometry_;
  Reference reference_;
  ref::Random random_;
  tpattn::Executor* executor_;
  std::unique_ptr<KvCache> cache_;
  std::map<SequenceId, std::vector<std::vector<float>>> x_;  // each live sequence's input rows
};

template <class Storage>
void fuzz_storage(FuzzedDataProvider& in, const Setup& setup) {
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) check_bad_construction<Storage>(in, setup);

  Geometry geometry;
  geometry.paged = in.ConsumeBool();
  geometry.max_sequences = in.ConsumeIntegralInRange<Index>(1, 4);
  if (geometry.paged) {
    geometry.page_tokens = in.ConsumeIntegralInRange<Index>(1, 8);
    geometry.page_count = in.ConsumeIntegralInRange<Index>(1, 12);
    geometry.cap = in.ConsumeBool() ? in.ConsumeIntegralInRange<Index>(1, 40) : 0;
  } else {
    geometry.max_tokens = in.ConsumeIntegralInRange<Index>(1, 32);
  }
  trace(
      "%s; %s: max_sequences %ld, max_tokens %ld, page_tokens %ld, page_count %ld, cap %ld, "
      "input scale %g",
      setup.description.c_str(), geometry.paged ? "paged" : "contiguous",
      static_cast<long>(geometry.max_sequences), static_cast<long>(geometry.max_tokens),
      static_cast<long>(geometry.page_tokens), static_cast<long>(geometry.page_count),
      static_cast<long>(geometry.cap), setup.input_scale);

  Reference reference;
  switch (setup.family) {
    case Family::gqa:
      reference = [&setup](const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n,
                           bool exact) {
        return gqa_reference(setup.gqa, setup.gqa_weights, x, cached, n, exact);
      };
      break;
    case Family::mla:
      reference = [&setup](const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n,
                           bool exact) {
        return mla_reference(setup.mla, setup.mla_weights, x, cached, n, exact);
      };
      break;
    case Family::tpa:
      reference = [&setup](const Eigen::MatrixXd& x, const std::vector<Tensor3>& cached, Index n,
                           bool exact) {
        return tpa_reference(setup.tpa, setup.tpa_weights, x, cached, n, exact);
      };
      break;
  }
  with_operator<Storage>(setup, [&](auto& op) {
    FUZZ_REQUIRE(op.cache_record().plane(0).storage == setup.storage, "record storage");
    Session<Storage, std::remove_reference_t<decltype(op)>> session(in, setup, op, geometry,
                                                                    reference);
    session.run(48);
  });
}

void fuzz_one(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const Setup setup = pick_setup(in);
  switch (setup.storage) {
    case StorageType::f32: fuzz_storage<float>(in, setup); break;
    case StorageType::bf16: fuzz_storage<Eigen::bfloat16>(in, setup); break;
    case StorageType::f16: fuzz_storage<Eigen::half>(in, setup); break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    fuzz_one(data, size);
  } catch (const std::exception& error) {
    fail(__LINE__, std::string("unexpected exception: ") + error.what());
  } catch (...) {
    fail(__LINE__, "unexpected non-std exception");
  }
  return 0;
}
