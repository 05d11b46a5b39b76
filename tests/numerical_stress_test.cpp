// tests/numerical_stress_test.cpp -- the decode kernels where fp32 is stressed: 262,144 cached
// tokens, scores of +-1e4, bf16 and f16 storage, and sequence lengths around the tiles.
//
// Each case is one decode step (attend with n = 1) of a bare kernel over a cached sequence whose
// tokens come from a counter-based generator, so the reference regenerates a token instead of
// keeping 262,144 of them. The reference is plain double arithmetic written here: per token it
// forms every head's score and value (materialising TPA's K and V from the factors), then does a
// two-pass softmax (the maximum first, then the weights). It never calls a tpattn kernel.
//
// Every bound is per output element, relative to that element's magnitude
//   m = sum_s p_s |v_s|       (TPA: sum_s p_s (1/R_V) sum_v |A_V[s][v][i] B_V[s][v][j]|)
// the sum of the absolute terms the kernel adds up for it, which is the scale of its rounding
// errors whatever the cancellation in sum_s p_s v_s.
//
// fp32 (fp32_tolerance): an output element is a sum, in fp32, of one weighted value per cached
// token, divided by the softmax sum. A kernel adds into one element's accumulator N times in a
// row: once per tile of cached tokens after the tile's own terms are summed in registers (this
// GQA and MLA: tiles of 64, M/64 + 64 for M tokens; TPA: M/128 + 128 R_V). With round to nearest each addition errs by at most u = 2^-24
// of the running sum, with either sign, so N additions err with a standard deviation of about
// u sqrt(N) / 3 (a running sum that grows steadily), far from the worst case N u (1.6e-2 for
// N = 262,144). The bound is 3 u sqrt(N), 9 standard deviations for one element and still more
// than 3 for the largest of 64 or 128, plus 32 u for the rest: a score is a dot product of at most
// 40 terms, off by about sqrt(40) u of its absolute terms, exp() adds an ulp or two per weight
// and the final division one more. At 262,144 tokens: GQA and MLA 225 u = 1.3e-5,
// TPA 176 u = 1.05e-5 of m. Measured (g++ 12 -O3 -march=native, AVX-512): GQA 75 u, MLA 55 u,
// TPA 44 to 51 u; at most 18 u in the tile and large-logit tests, whose bounds are 56 to 80 u.
//
// bf16 and f16 storage: a stored value x comes back as x (1 + e), |e| <= u_s, with u_s the unit
// roundoff of p significant bits, 2^-p: bf16 keeps 8 bits, so u_s = 2^-8; f16 keeps 11, u_s =
// 2^-11. (Not 2^-9 and 2^-12: 1 + 2^-8 lies halfway between the bf16 neighbours 1 and 1 + 2^-7,
// so rounding it to even moves it by 2^-8 / (1 + 2^-8) of itself.) To first order in u_s, a value
// moves by at most u_s |v| (TPA: 2 u_s (1/R_V) sum |A_V B_V|, both factors rounded), a score by at
// most u_s S with S = scale sum_c |q_c k_c| (TPA: 2 u_s c sum_u |A_K| sum_c |q_c B_K|), and since
// the weights move by p_s (ds_s - sum_r p_r ds_r), an output by at most
//   bound = u_s * sum_s p_s [ |v_s| + (S_s + sum_r p_r S_r) |v_s - out| ]   (factor 2 for TPA)
// which the reference computes per element. The test allows 1.25 x bound (the second-order terms
// are below u_s S, a few % of the first-order ones) plus the fp32 tolerance. The bound is a worst
// case, every rounding error taken with the sign that hurts; measured, the outputs use 0.3 to
// 0.7 % of it (0.02 to 0.1 u_s of m), since the errors of 8192 tokens average out. The tight
// check is the other one: against a reference that reads the values as stored, the kernels stay
// within the fp32 tolerance (measured: at most 54 u), so a cache that rounds differently fails.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "tpattn/tpattn.hpp"

namespace tpattn::test {
namespace {

constexpr double kU32 = 1.0 / 16777216.0;  // 2^-24
constexpr Index kLongContext = 262144;
// Weights below 2^-126 (fp32's smallest normal number) may be flushed to 0: over at most 2^18
// tokens of |v| < 4 that is < 2^-106 ~ 1e-32 of absolute error, whatever the magnitude.
constexpr double kUnderflow = 1e-30;

double unit_roundoff(StorageType storage) {
  switch (storage) {
    case StorageType::f32: return kU32;
    case StorageType::bf16: return 1.0 / 256.0;  // 2^-8
    case StorageType::f16: return 1.0 / 2048.0;  // 2^-11
  }
  return 0.0;
}

// ---- values that depend only on where they are --------------------------------------------------

// splitmix64's finaliser: a bijection of 64-bit words whose outputs look independent.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
std::uint64_t draw(std::uint64_t stream, std::uint64_t index) {
  return mix((stream << 44) ^ index);
}
// A float in [-1, 1) with 24 significant bits (so exact in fp32).
float unit(std::uint64_t stream, std::uint64_t index) {
  const std::int64_t bits = static_cast<std::int64_t>(draw(stream, index) >> 40);  // [0, 2^24)
  return static_cast<float>(bits - (std::int64_t(1) << 23)) / 8388608.0f;
}
// An integer in [low, high].
int integer(std::uint64_t stream, std::uint64_t index, int low, int high) {
  return low + static_cast<int>(draw(stream, index) % static_cast<std::uint64_t>(high - low + 1));
}

float round_to(StorageType storage, float value) {
  switch (storage) {
    case StorageType::f32: return value;
    case StorageType::bf16: return static_cast<float>(Eigen::bfloat16(value));
    case StorageType::f16: return static_cast<float>(Eigen::half(value));
  }
  return value;
}

template <class F>
void with_storage(StorageType storage, F&& f) {
  switch (storage) {
    case StorageType::f32: return f(float{});
    case StorageType::bf16: return f(Eigen::bfloat16{});
    case StorageType::f16: return f(Eigen::half{});
  }
}

// ---- problems: one kernel, a query and a generator of cached tokens -----------------------------

// What the reference needs of one token for query head i: its score, its value (width d_v), the
// sum of absolute terms of the score (S) and of each value element.
struct HeadTerms {
  double score = 0.0;
  double score_abs = 0.0;
  std::vector<double> value, value_abs;
};

class Problem {
 public:
  virtual ~Problem() = default;
  virtual std::string name() const = 0;
  virtual CacheRecord record(StorageType storage) const = 0;
  virtual Index heads() const = 0;
  virtual Index value_width() const = 0;
  // Stored factors per term of a score or a value: 1, or 2 for TPA (A and B both rounded).
  virtual double rounded_factors() const { return 1.0; }
  // How many fp32 additions in a row one output element's accumulator takes over `tokens`
  // cached tokens (see fp32_tolerance).
  virtual double additions(Index tokens) const = 0;
  // Token s's planes, in record order, as the fp32 values appended.
  virtual void token(Index s, std::vector<std::vector<float>>& planes) const = 0;
  // Head i's terms for a token whose planes (as stored or exact) are `planes`.
  virtual void terms(const std::vector<std::vector<float>>& planes, Index i,
                     HeadTerms& terms) const = 0;
  // One decode step over `view` (its last token is the query's): out [h, d_v].
  virtual void decode(StorageType storage, const SequenceView& view, float* out) const = 0;

  Index plane_width(Index p) const {
    return record(StorageType::f32).plane(p).elements_per_token();
  }
};

// GQA h 4, g 2, d_h = d_v = 16 (scale 1/4). Random: q ~ 3 U(-1, 1), k ~ U(-1, 1), so scores have
// standard deviation 1; v ~ 0.5 + 0.5 U(-1, 1), positive, so the softmax sum and the output grow
// together. Large: q = (400, small integers), k = (n_s, small integers), so scores are exactly
// 100 n_s + (a multiple of 1/4 within +-8): fp32 forms them without rounding.
class GqaProblem : public Problem {
 public:
  static constexpr Index h = 4, g = 2, d = 16;

  explicit GqaProblem(std::function<int(Index)> big = nullptr) : big_(std::move(big)) {
    q_.resize(h * d);
    for (Index n = 0; n < h * d; ++n)
      q_[n] = big_ ? (n % d == 0 ? 400.0f : static_cast<float>(integer(1, n, -2, 2)))
                   : 3.0f * unit(1, n);
  }
  std::string name() const override { return "GQA"; }
  // Several KV heads of two query rows: whole tiles of 64 tokens (DenseScorer::tile_tokens_for
  // at this small width), each tile's values summed on their own, then added to the accumulator.
  double additions(Index tokens) const override { return (tokens + 63) / 64 + 64.0; }
  CacheRecord record(StorageType s) const override { return records::gqa(g, d, d, s); }
  Index heads() const override { return h; }
  Index value_width() const override { return d; }
  void token(Index s, std::vector<std::vector<float>>& planes) const override {
    for (Index e = 0; e < g * d; ++e) {
      const std::uint64_t at = static_cast<std::uint64_t>(s * g * d + e);
      planes[0][e] = big_ ? (e % d == 0 ? static_cast<float>(big_(s))
                                        : static_cast<float>(integer(2, at, -2, 2)))
                          : unit(2, at);
      planes[1][e] = 0.5f + 0.5f * unit(3, at);
    }
  }
  void terms(const std::vector<std::vector<float>>& planes, Index i, HeadTerms& t) const override {
    const Index j = i / (h / g);
    t.score = t.score_abs = 0.0;
    for (Index c = 0; c < d; ++c) {
      const double term = 0.25 * double(q_[i * d + c]) * double(planes[0][j * d + c]);
      t.score += term;
      t.score_abs += std::abs(term);
    }
    t.value.assign(planes[1].begin() + j * d, planes[1].begin() + (j + 1) * d);
    t.value_abs.resize(d);
    for (Index c = 0; c < d; ++c) t.value_abs[c] = std::abs(t.value[c]);
  }
  void decode(StorageType storage, const SequenceView& view, float* out) const override {
    with_storage(storage, [&](auto tag) {
      const GqaKernel<decltype(tag)> kernel(h, g, d, d);
      std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
      kernel.attend(q_.data(), 1, view, out, nullptr, workspace.data());
    });
  }

 private:
  std::function<int(Index)> big_;
  std::vector<float> q_;
};

// Absorbed MLA h 4, d_c 32, d_R 8, scale 1/8. Random: q ~ 4 U(-1, 1), latent ~ 0.5 + U(-1, 1)
// (also the value), rope key ~ U(-1, 1). Large: the rope part carries 100 n_s (q_R[0] = 800,
// kR[0] = n_s) and small integers the rest.
class MlaProblem : public Problem {
 public:
  static constexpr Index h = 4, dc = 32, dr = 8, w = dc + dr;

  explicit MlaProblem(std::function<int(Index)> big = nullptr) : big_(std::move(big)) {
    q_.resize(h * w);
    for (Index n = 0; n < h * w; ++n)
      q_[n] = big_ ? (n % w == dc ? 800.0f : static_cast<float>(integer(4, n, -2, 2)))
                   : 4.0f * unit(4, n);
  }
  std::string name() const override { return "MLA"; }
  // One KV head: one product per tile of 64 tokens, added to the accumulator.
  double additions(Index tokens) const override { return (tokens + 63) / 64 + 64.0; }
  CacheRecord record(StorageType s) const override { return records::mla(dc, dr, s); }
  Index heads() const override { return h; }
  Index value_width() const override { return dc; }
  void token(Index s, std::vector<std::vector<float>>& planes) const override {
    for (Index c = 0; c < dc; ++c) {
      const std::uint64_t at = static_cast<std::uint64_t>(s * dc + c);
      planes[0][c] = big_ ? static_cast<float>(integer(5, at, -2, 2)) : 0.5f + unit(5, at);
    }
    for (Index c = 0; c < dr; ++c) {
      const std::uint64_t at = static_cast<std::uint64_t>(s * dr + c);
      planes[1][c] =
          big_ ? (c == 0 ? static_cast<float>(big_(s)) : static_cast<float>(integer(6, at, -2, 2)))
               : unit(6, at);
    }
  }
  void terms(const std::vector<std::vector<float>>& planes, Index i, HeadTerms& t) const override {
    t.score = t.score_abs = 0.0;
    for (Index c = 0; c < w; ++c) {
      const double k = c < dc ? planes[0][c] : planes[1][c - dc];
      const double term = 0.125 * double(q_[i * w + c]) * k;
      t.score += term;
      t.score_abs += std::abs(term);
    }
    t.value.assign(planes[0].begin(), planes[0].end());
    t.value_abs.resize(dc);
    for (Index c = 0; c < dc; ++c) t.value_abs[c] = std::abs(t.value[c]);
  }
  void decode(StorageType storage, const SequenceView& view, float* out) const override {
    with_storage(storage, [&](auto tag) {
      const MlaKernel<decltype(tag)> kernel(h, dc, dr, 0.125f);
      std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
      kernel.attend(q_.data(), 1, view, out, nullptr, workspace.data());
    });
  }

 private:
  std::function<int(Index)> big_;
  std::vector<float> q_;
};

// TPA h 4, d_h = d_v = 16, R_K = R_V = 2, and R_Q = 2 (factored query, decoded in `order`) or
// R_Q = 0 (TPA-KVonly, materialised query). Random: q = A_Q^T B_Q / R_Q with A_Q ~ 6 U, B_Q ~ U
// (KV-only: q ~ 2.5 U), A_K ~ 3 U, B_K ~ U, so K = A_K^T B_K / R_K and the scores q.K / 4 have
// standard deviation ~1; A_V ~ 2 + U, B_V ~ 0.5 + 0.5 U, positive. Large: rank 0 of the query and
// of the key carries the big part (A_Q[0] = 2, B_Q[0] = (100, 0, ..), A_K[0] = 8,
// B_K[0] = (n_s, 0, ..)), rank 1 small integers off column 0, so every score is exactly
// 100 n_s + (a multiple of 1/16 within +-8) in both contraction orders.
class TpaProblem : public Problem {
 public:
  static constexpr Index h = 4, d = 16, rk = 2, rv = 2;

  TpaProblem(Index rank_q, TpaOrder order, std::function<int(Index)> big = nullptr)
      : rq_(rank_q), order_(order), big_(std::move(big)) {
    q_.assign(h * d, 0.0f);
    if (rq_ == 0) {
      for (Index n = 0; n < h * d; ++n)
        q_[n] = big_ ? (n % d == 0 ? 100.0f : 0.5f * static_cast<float>(integer(7, n, -4, 4)))
                     : 2.5f * unit(7, n);
      return;
    }
    a_q_.resize(rq_ * h);
    b_q_.resize(rq_ * d);
    for (Index n = 0; n < rq_ * h; ++n)
      a_q_[n] =
          big_ ? (n < h ? 2.0f : static_cast<float>(integer(8, n, -2, 2))) : 6.0f * unit(8, n);
    for (Index n = 0; n < rq_ * d; ++n) {
      const Index r = n / d, c = n % d;
      b_q_[n] = big_ ? (r == 0 ? (c == 0 ? 100.0f : 0.0f)
                               : (c == 0 ? 0.0f : static_cast<float>(integer(9, n, -2, 2))))
                     : unit(9, n);
    }
    // The materialised query of the reference: q_i = (1/R_Q) sum_r A_Q[r][i] B_Q[r] (in double,
    // kept in double through q_exact_).
    q_exact_.assign(h * d, 0.0);
    for (Index i = 0; i < h; ++i)
      for (Index c = 0; c < d; ++c) {
        double sum = 0.0;
        for (Index r = 0; r < rq_; ++r) sum += double(a_q_[r * h + i]) * double(b_q_[r * d + c]);
        q_exact_[i * d + c] = sum / static_cast<double>(rq_);
      }
  }
  std::string name() const override {
    if (rq_ == 0) return "TPA-KVonly";
    return order_ == TpaOrder::factor ? "TPA (factor order)" : "TPA (query order)";
  }
  CacheRecord record(StorageType s) const override { return records::tpa(h, d, d, rk, rv, s); }
  Index heads() const override { return h; }
  Index value_width() const override { return d; }
  double rounded_factors() const override { return 2.0; }
  // One product per tile of 128 tokens of R_V ranks, added to the accumulator.
  double additions(Index tokens) const override { return (tokens + 127) / 128 + 128.0 * rv; }
  void token(Index s, std::vector<std::vector<float>>& planes) const override {
    const auto at = [s](Index width, Index e) { return static_cast<std::uint64_t>(s * width + e); };
    for (Index e = 0; e < rk * h; ++e)  // A_K [R_K, h]
      planes[0][e] = big_ ? (e < h ? 8.0f : static_cast<float>(integer(10, at(rk * h, e), -2, 2)))
                          : 3.0f * unit(10, at(rk * h, e));
    for (Index e = 0; e < rk * d; ++e) {  // B_K [R_K, d_h]
      const Index u = e / d, c = e % d;
      planes[1][e] =
          big_ ? (u == 0 ? (c == 0 ? static_cast<float>(big_(s)) : 0.0f)
                         : (c == 0 ? 0.0f : static_cast<float>(integer(11, at(rk * d, e), -2, 2))))
               : unit(11, at(rk * d, e));
    }
    for (Index e = 0; e < rv * h; ++e) planes[2][e] = 2.0f + unit(12, at(rv * h, e));         // A_V
    for (Index e = 0; e < rv * d; ++e) planes[3][e] = 0.5f + 0.5f * unit(13, at(rv * d, e));  // B_V
  }
  void terms(const std::vector<std::vector<float>>& planes, Index i, HeadTerms& t) const override {
    const std::vector<float>& a_k = planes[0];
    const std::vector<float>& b_k = planes[1];
    const std::vector<float>& a_v = planes[2];
    const std::vector<float>& b_v = planes[3];
    // K_i = (1/R_K) sum_u A_K[u][i] B_K[u];  score = q_i . K_i / sqrt(d_h).
    t.score = t.score_abs = 0.0;
    for (Index u = 0; u < rk; ++u) {
      double dot = 0.0, dot_abs = 0.0;
      for (Index c = 0; c < d; ++c) {
        const double term = query(i, c) * double(b_k[u * d + c]);
        dot += term;
        dot_abs += std::abs(term);
      }
      const double a = a_k[u * h + i];
      t.score += a * dot / (rk * 4.0);
      t.score_abs += std::abs(a) * dot_abs / (rk * 4.0);
    }
    // V_i = (1/R_V) sum_v A_V[v][i] B_V[v].
    t.value.assign(d, 0.0);
    t.value_abs.assign(d, 0.0);
    for (Index v = 0; v < rv; ++v)
      for (Index c = 0; c < d; ++c) {
        const double term = double(a_v[v * h + i]) * double(b_v[v * d + c]) / rv;
        t.value[c] += term;
        t.value_abs[c] += std::abs(term);
      }
  }
  void decode(StorageType storage, const SequenceView& view, float* out) const override {
    with_storage(storage, [&](auto tag) {
      const TpaKernel<decltype(tag)> kernel(TpaShape{h, d, d, rq_, rk, rv});
      std::vector<float> workspace(static_cast<std::size_t>(kernel.workspace_floats()));
      if (rq_ == 0)
        kernel.attend(q_.data(), 1, view, out, nullptr, workspace.data());
      else
        kernel.attend(a_q_.data(), b_q_.data(), 1, view, out, nullptr, workspace.data(), order_);
    });
  }

 private:
  double query(Index i, Index c) const {
    return rq_ == 0 ? double(q_[i * d + c]) : q_exact_[i * d + c];
  }

  Index rq_;
  TpaOrder order_;
  std::function<int(Index)> big_;
  std::vector<float> q_, a_q_, b_q_;
  std::vector<double> q_exact_;
};

// Every family, in both TPA orders.
std::vector<std::unique_ptr<Problem>> every_problem(std::function<int(Index)> big = nullptr) {
  std::vector<std::unique_ptr<Problem>> problems;
  problems.push_back(std::make_unique<GqaProblem>(big));
  problems.push_back(std::make_unique<MlaProblem>(big));
  problems.push_back(std::make_unique<TpaProblem>(2, TpaOrder::factor, big));
  problems.push_back(std::make_unique<TpaProblem>(2, TpaOrder::query, big));
  problems.push_back(std::make_unique<TpaProblem>(0, TpaOrder::query, big));
  return problems;
}

// ---- the cache ----------------------------------------------------------------------------------

// Appends tokens [0, tokens) of `problem` to `seq`, chunk by chunk.
void fill(const Problem& problem, KvCache& cache, SequenceId seq, Index tokens) {
  const Index planes = cache.record().plane_count();
  const Index chunk = 4096;
  std::vector<Index> width(static_cast<std::size_t>(planes));
  std::vector<std::vector<float>> token(static_cast<std::size_t>(planes));
  std::vector<std::vector<float>> data(static_cast<std::size_t>(planes));
  for (Index p = 0; p < planes; ++p) {
    width[p] = cache.record().plane(p).elements_per_token();
    token[p].resize(static_cast<std::size_t>(width[p]));
    data[p].resize(static_cast<std::size_t>(chunk * width[p]));
  }
  for (Index first = 0; first < tokens; first += chunk) {
    const Index count = std::min(chunk, tokens - first);
    for (Index s = 0; s < count; ++s) {
      problem.token(first + s, token);
      for (Index p = 0; p < planes; ++p)
        std::copy(token[p].begin(), token[p].end(), data[p].begin() + s * width[p]);
    }
    std::vector<PlaneInput> inputs;
    for (Index p = 0; p < planes; ++p)
      inputs.push_back(
          {data[p].data(), cache.record().plane(p).rows, cache.record().plane(p).cols});
    cache.append(seq, count, inputs.data(), planes);
  }
}

// ---- the reference ------------------------------------------------------------------------------

struct Reference {
  double lowest_score = 0.0, highest_score = 0.0;  // over every head and token
  std::vector<double> out;                         // [h, d_v]
  std::vector<double> magnitude;                   // [h, d_v]: sum_s p_s |value terms|
  std::vector<double> rounding;  // [h, d_v]: the first-order storage bound, in units of u_s
};

// Softmax attention of the problem's query over tokens [0, tokens), in double, with each stored
// value first rounded through `rounded` (f32: the appended values themselves).
Reference reference(const Problem& problem, Index tokens, StorageType rounded,
                    bool with_rounding_bound) {
  const Index h = problem.heads(), dv = problem.value_width();
  const Index planes = problem.record(StorageType::f32).plane_count();
  std::vector<std::vector<float>> token(static_cast<std::size_t>(planes));
  for (Index p = 0; p < planes; ++p)
    token[p].resize(static_cast<std::size_t>(problem.plane_width(p)));
  const auto load = [&](Index s) {
    problem.token(s, token);
    if (rounded != StorageType::f32)
      for (auto& plane : token)
        for (float& x : plane) x = round_to(rounded, x);
  };
  HeadTerms terms;

  // Pass 1: every score, and each head's maximum.
  std::vector<double> score(static_cast<std::size_t>(tokens * h));
  std::vector<double> score_abs(static_cast<std::size_t>(tokens * h));
  std::vector<double> top(static_cast<std::size_t>(h), -std::numeric_limits<double>::infinity());
  for (Index s = 0; s < tokens; ++s) {
    load(s);
    for (Index i = 0; i < h; ++i) {
      problem.terms(token, i, terms);
      score[s * h + i] = terms.score;
      score_abs[s * h + i] = terms.score_abs;
      top[i] = std::max(top[i], terms.score);
    }
  }
  // Pass 2: weights exp(score - max), their sum, the output and its magnitude.
  Reference ref;
  ref.lowest_score = *std::min_element(score.begin(), score.end());
  ref.highest_score = *std::max_element(score.begin(), score.end());
  ref.out.assign(static_cast<std::size_t>(h * dv), 0.0);
  ref.magnitude.assign(ref.out.size(), 0.0);
  std::vector<double> sum(static_cast<std::size_t>(h), 0.0), mean_abs_score(sum);
  for (Index s = 0; s < tokens; ++s) {
    load(s);
    for (Index i = 0; i < h; ++i) {
      problem.terms(token, i, terms);
      const double p = std::exp(score[s * h + i] - top[i]);
      sum[i] += p;
      mean_abs_score[i] += p * score_abs[s * h + i];
      for (Index c = 0; c < dv; ++c) {
        ref.out[i * dv + c] += p * terms.value[c];
        ref.magnitude[i * dv + c] += p * terms.value_abs[c];
      }
    }
  }
  for (Index i = 0; i < h; ++i) {
    mean_abs_score[i] /= sum[i];
    for (Index c = 0; c < dv; ++c) {
      ref.out[i * dv + c] /= sum[i];
      ref.magnitude[i * dv + c] /= sum[i];
    }
  }
  if (!with_rounding_bound) return ref;
  // Pass 3: sum_s p_s [ |v_s| + (S_s + sum_r p_r S_r) |v_s - out| ], times the rounded factors.
  ref.rounding.assign(ref.out.size(), 0.0);
  for (Index s = 0; s < tokens; ++s) {
    load(s);
    for (Index i = 0; i < h; ++i) {
      problem.terms(token, i, terms);
      const double p = std::exp(score[s * h + i] - top[i]) / sum[i];
      const double spread = score_abs[s * h + i] + mean_abs_score[i];
      for (Index c = 0; c < dv; ++c)
        ref.rounding[i * dv + c] +=
            p * (terms.value_abs[c] + spread * std::abs(terms.value[c] - ref.out[i * dv + c]));
    }
  }
  for (double& r : ref.rounding) r *= problem.rounded_factors();
  return ref;
}

// Decodes the last token of `tokens` cached ones in a cache from `make`.
std::vector<float> decode(const Problem& problem, StorageType storage, Index tokens,
                          const std::function<std::unique_ptr<KvCache>(const CacheRecord&)>& make) {
  std::unique_ptr<KvCache> cache = make(problem.record(storage));
  const SequenceId seq = cache->add_sequence();
  fill(problem, *cache, seq, tokens);
  std::vector<float> out(static_cast<std::size_t>(problem.heads() * problem.value_width()));
  problem.decode(storage, cache->view(seq), out.data());
  return out;
}

std::unique_ptr<KvCache> contiguous(const CacheRecord& record, Index tokens) {
  return std::make_unique<ContiguousKvCache>(record, 1, tokens);
}
std::unique_ptr<KvCache> paged(const CacheRecord& record, Index tokens, Index page_tokens) {
  return std::make_unique<PagedKvCache>(record, page_tokens,
                                        (tokens + page_tokens - 1) / page_tokens, 1);
}

// The fp32 allowance of one output element, as a fraction of its magnitude: 3 u sqrt(N) for N
// additions in a row into its accumulator, plus 32 u for the scores and exp() (see the top).
double fp32_tolerance(const Problem& problem, Index tokens) {
  return kU32 * (3.0 * std::sqrt(problem.additions(tokens)) + 32.0);
}

// The largest error of `out` against the reference, as a fraction of each element's allowance:
// tolerance x magnitude, plus storage_u x the first-order rounding bound when the reference has
// one. NaN and infinity give +inf.
double worst_ratio(const std::vector<float>& out, const Reference& ref, double tolerance,
                   double storage_u = 0.0) {
  double worst = 0.0;
  for (std::size_t k = 0; k < out.size(); ++k) {
    double allowed = tolerance * ref.magnitude[k] + kUnderflow;
    if (!ref.rounding.empty()) allowed += storage_u * ref.rounding[k];
    const double error = std::abs(double(out[k]) - ref.out[k]);
    if (!std::isfinite(error)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, error / allowed);
  }
  return worst;
}
// The largest error relative to each element's magnitude, in units of u = 2^-24.
double worst_in_u(const std::vector<float>& out, const Reference& ref) {
  return worst_ratio(out, ref, kU32);
}

// ---- 262,144 cached tokens ----------------------------------------------------------------------

// Pages of 4096 tokens: 64 pages, every tile full. The bounds are 1.3e-5 (GQA, MLA) and 1.1e-5
// (TPA) of the magnitude.
TEST(LongContext, DecodeAt262144TokensIsWithinFp32AccumulationOfTheDoubleReference) {
  for (const auto& problem : every_problem()) {
    SCOPED_TRACE(problem->name());
    const std::vector<float> out =
        decode(*problem, StorageType::f32, kLongContext,
               [](const CacheRecord& r) { return paged(r, kLongContext, 4096); });
    const Reference ref = reference(*problem, kLongContext, StorageType::f32, false);
    const double tolerance = fp32_tolerance(*problem, kLongContext);
    EXPECT_LE(worst_ratio(out, ref, tolerance), 1.0);
    std::printf("[ measured ] %s, 262144 tokens: %.0f u of the magnitude (bound %.0f u)\n",
                problem->name().c_str(), worst_in_u(out, ref), tolerance / kU32);
  }
}

// ---- scores of +-1e4 ----------------------------------------------------------------------------

// n_s for token s (scores 100 n_s + O(1)): three ways for the maximum to be reached.
int rising_maximum(Index s) {  // n in [-100, 49] for 1500 tokens, then 100 every third token
  return s < 1500 ? integer(20, s, -100, 49) : (s % 3 == 0 ? 100 : integer(20, s, -100, 99));
}
int maximum_first(Index s) { return s == 0 ? 100 : integer(21, s, -100, 90); }
int all_near_minus_1e4(Index) { return -100; }

constexpr Index kLargeLogitTokens = 2000;  // 32 tiles of 64 or 16 of 128, the last one partial

void expect_finite_and_close(int (*schedule)(Index), const char* what) {
  for (const auto& problem : every_problem(schedule)) {
    SCOPED_TRACE(problem->name() + ", " + what);
    const std::vector<float> out =
        decode(*problem, StorageType::f32, kLargeLogitTokens,
               [](const CacheRecord& r) { return contiguous(r, kLargeLogitTokens); });
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    const Reference ref = reference(*problem, kLargeLogitTokens, StorageType::f32, false);
    EXPECT_LE(ref.lowest_score, -9900.0);
    if (schedule != all_near_minus_1e4) {
      EXPECT_GE(ref.highest_score, 9900.0);
    }
    EXPECT_LE(worst_ratio(out, ref, fp32_tolerance(*problem, kLargeLogitTokens)), 1.0);
    std::printf("[ measured ] %s, %s: %.1f u of the magnitude\n", problem->name().c_str(), what,
                worst_in_u(out, ref));
  }
}

// The maximum jumps from ~4900 to 1e4 after 1500 tokens: every earlier weight is rescaled by
// exp(-5100) = 0, while exp(1e4) on its own would be inf.
TEST(LargeLogits, AMaximumOf1e4ReachedLateGivesTheDoubleReference) {
  expect_finite_and_close(rising_maximum, "rising maximum");
}

// The first token scores 1e4 and every later one at least 1000 less: later tiles add nothing.
TEST(LargeLogits, AMaximumOf1e4AtTheFirstTokenGivesTheDoubleReference) {
  expect_finite_and_close(maximum_first, "maximum first");
}

// Every score is -1e4 + O(1): exp(score) alone would underflow to 0 and the output to 0 / 0.
TEST(LargeLogits, ScoresAllNearMinus1e4GiveTheDoubleReference) {
  expect_finite_and_close(all_near_minus_1e4, "all near -1e4");
}

// ---- bf16 and f16 storage -----------------------------------------------------------------------

constexpr Index kStorageTokens = 8192;

void expect_storage_within_bounds(StorageType storage) {
  const double u = unit_roundoff(storage);
  for (const auto& problem : every_problem()) {
    SCOPED_TRACE(problem->name() + " " + name_of(storage));
    const std::vector<float> out =
        decode(*problem, storage, kStorageTokens,
               [](const CacheRecord& r) { return paged(r, kStorageTokens, 256); });
    const double tolerance = fp32_tolerance(*problem, kStorageTokens);
    // The tight check: the reference attends over the values as stored.
    const Reference stored = reference(*problem, kStorageTokens, storage, false);
    EXPECT_LE(worst_ratio(out, stored, tolerance), 1.0) << "against the stored values";
    // Against the values as appended: within 1.25 x the first-order rounding bound.
    const Reference exact = reference(*problem, kStorageTokens, StorageType::f32, true);
    const double ratio = worst_ratio(out, exact, tolerance, 1.25 * u);
    EXPECT_LE(ratio, 1.0) << "against the appended values";
    std::printf(
        "[ measured ] %s %s: %.1f u32 of the magnitude from the stored values; from the appended "
        "ones %.3f of the rounding bound (%.2g u_s of the magnitude)\n",
        problem->name().c_str(), name_of(storage), worst_in_u(out, stored), ratio,
        worst_in_u(out, exact) * kU32 / u);
  }
}

TEST(ReducedPrecisionStorage, Bf16OutputsAreWithinTheRoundingBoundOfTheExactValues) {
  expect_storage_within_bounds(StorageType::bf16);
}

TEST(ReducedPrecisionStorage, F16OutputsAreWithinTheRoundingBoundOfTheExactValues) {
  expect_storage_within_bounds(StorageType::f16);
}

// The unit roundoffs above are reached: 2^-9 and 2^-12 would be too small.
TEST(ReducedPrecisionStorage,
     RoundingMovesAValueByUpToTwoToTheMinusEightInBf16AndMinusElevenInF16) {
  const float bf16_tie = 1.0f + 1.0f / 256.0f;  // halfway between 1 and 1 + 2^-7
  const float f16_tie = 1.0f + 1.0f / 2048.0f;  // halfway between 1 and 1 + 2^-10
  EXPECT_GT((bf16_tie - 1.0f) / bf16_tie, 1.0f / 512.0f);
  EXPECT_GT((f16_tie - 1.0f) / f16_tie, 1.0f / 4096.0f);
  for (StorageType storage : {StorageType::bf16, StorageType::f16}) {
    const float tie = storage == StorageType::bf16 ? bf16_tie : f16_tie;
    ContiguousKvCache cache(CacheRecord({{"x", 1, 1, storage}}), 1, 1);
    const SequenceId seq = cache.add_sequence();
    cache.append(seq, 1, {{&tie, 1, 1}});
    float back = 0.0f;  // as the kernels read it back
    with_storage(storage, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, float>)
        StorageTraits<T>::to_float(cache.view(seq).plane_block<T>(0, 0), &back, 1);
    });
    EXPECT_EQ(back, 1.0f) << name_of(storage);
  }
}

// ---- tiles --------------------------------------------------------------------------------------

// Tiles hold 64 tokens (GQA, MLA) or 128 (TPA) and never straddle a page, so the same sequence in
// pages of 1, 7, 16, 63, 64 or 128 tokens, or in one contiguous region, is cut into different
// tiles. Every cut gives the reference's result, and all cuts agree with each other.
TEST(TileBoundaries, DecodeAroundTheTileSizesGivesTheSameResultWhereverTheTilesEnd) {
  const Index pages[] = {1, 7, 16, 63, 64, 128};
  double worst = 0.0, worst_apart = 0.0;
  for (const auto& problem : every_problem()) {
    for (Index tokens : {Index(63), Index(64), Index(65), Index(127), Index(128), Index(129)}) {
      SCOPED_TRACE(problem->name() + ", " + std::to_string(tokens) + " tokens");
      const double tolerance = fp32_tolerance(*problem, tokens);
      const Reference ref = reference(*problem, tokens, StorageType::f32, false);
      const std::vector<float> whole =
          decode(*problem, StorageType::f32, tokens,
                 [tokens](const CacheRecord& r) { return contiguous(r, tokens); });
      EXPECT_LE(worst_ratio(whole, ref, tolerance), 1.0) << "contiguous";
      worst = std::max(worst, worst_in_u(whole, ref));
      for (Index page : pages) {
        const std::vector<float> cut =
            decode(*problem, StorageType::f32, tokens,
                   [tokens, page](const CacheRecord& r) { return paged(r, tokens, page); });
        EXPECT_LE(worst_ratio(cut, ref, tolerance), 1.0) << "pages of " << page;
        worst = std::max(worst, worst_in_u(cut, ref));
        Reference contiguous_result = ref;
        contiguous_result.out.assign(whole.begin(), whole.end());
        EXPECT_LE(worst_ratio(cut, contiguous_result, tolerance), 1.0)
            << "pages of " << page << " against the contiguous cache";
        worst_apart = std::max(worst_apart, worst_in_u(cut, contiguous_result));
      }
    }
  }
  std::printf("[ measured ] %.1f u of the magnitude from the reference, %.1f u between cuts\n",
              worst, worst_apart);
}

}  // namespace
}  // namespace tpattn::test
