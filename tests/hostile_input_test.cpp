// tests/hostile_input_test.cpp -- a catalogue of hostile calls over every public entry point:
// CacheRecord; both caches' constructors, footprint() and every KvCache method; SequenceView;
// Rope; each operator's constructor, decode, prefill and reserve; each bare kernel's constructor
// and attend.
//
// A row is a name, a setup, the hostile call and the tpattn::Error it must throw: the call, the
// argument, and fragments that must appear in the message's expected or actual part (the message
// reads "tpattn: <call>: <argument>: expected <expected>, got <actual>", core/error.hpp). Every row
// runs on a fresh World of one cache kind:
//   Contiguous   ContiguousKvCache, 4 sequences of up to 12 tokens;
//   Paged        PagedKvCache, pages of 4 tokens, 4 pages: after the base sequences one page is
//                free, so two sequences with full last pages cannot both grow;
//   CappedPaged  the same with max_tokens_per_sequence = 10.
// A World holds one cache per operator record (GQA, MHA, MQA, MLA, TPA), each with the same base
// sequences: a (8 tokens), b (4 tokens), c (empty), and the id of a removed sequence. A row's setup
// may add caches (a record that differs in one field, say); they count as part of the World.
// After the hostile call every cache of the World must be as it was: sequence_count,
// max_sequences, bytes_used, bytes_reserved, table_bytes, the free pages and bytes_in_pages of a
// paged cache, and for every sequence slot whether it is live, its length, tokens_available and
// the raw bytes of every plane row of every token, read through its SequenceView.
//
// Some rows pass sizes no machine has. The program runs with its address space capped at 2 GiB
// (AddressSpaceCap), so an implementation that tries to allocate such a size fails the row with
// std::bad_alloc instead of paging the machine to death; a few rows (refused_allocation) expect
// exactly that bad_alloc to come back as an Error naming the size. Sanitizer runtimes cannot run
// under the cap and abort rather than throw on a refused allocation, so under them those rows are
// left out and the sanitizer's own allocation ceiling guards the rest.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "tpattn/tpattn.hpp"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define TPATTN_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define TPATTN_TEST_SANITIZED 1
#endif
#endif

#if defined(TPATTN_TEST_SANITIZED)
// The sanitizer runtimes reserve terabytes of address space, so no rlimit can be set under them;
// their allocator's own ceiling stops a runaway allocation instead (it aborts the process).
extern "C" const char* __asan_default_options() { return "max_allocation_size_mb=2048"; }
#endif

namespace tpattn::test {
namespace {

// ---- the address-space cap ----------------------------------------------------------------------

// 2 GiB of address space: this program needs a few MiB, while the sizes its rows pass ask for
// 16 GiB (2^31 doubles of a RoPE table) up to petabytes.
class AddressSpaceCap : public ::testing::Environment {
 public:
  void SetUp() override {
#if !defined(TPATTN_TEST_SANITIZED)
    rlimit limit{};
    ASSERT_EQ(getrlimit(RLIMIT_AS, &limit), 0);
    const rlim_t cap = rlim_t(2) << 30;
    if (limit.rlim_cur == RLIM_INFINITY || limit.rlim_cur > cap) {
      limit.rlim_cur = cap;
      ASSERT_EQ(setrlimit(RLIMIT_AS, &limit), 0);
    }
#endif
  }
};
[[maybe_unused]] ::testing::Environment* const kAddressSpaceCap =
    ::testing::AddGlobalTestEnvironment(new AddressSpaceCap);

// ---- sizes --------------------------------------------------------------------------------------

constexpr Index kDModel = 16;
constexpr Index kMaxSequences = 4;
constexpr Index kRegionTokens = 12;  // Contiguous: tokens per sequence
constexpr Index kPageTokens = 4;
constexpr Index kPageCount = 4;   // Paged: a and b hold 3 pages, one is free
constexpr Index kCapTokens = 10;  // CappedPaged: max_tokens_per_sequence
constexpr Index kLengthA = 8;
constexpr Index kLengthB = 4;

constexpr Index k2To31 = Index(1) << 31;
constexpr Index k2To32 = Index(1) << 32;
constexpr Index k2To40 = Index(1) << 40;
constexpr Index k2To61 = Index(1) << 61;
constexpr Index k2To62 = Index(1) << 62;
constexpr Index kIndexMax = std::numeric_limits<Index>::max();

std::string text(Index value) { return std::to_string(value); }

// ---- configs and weights ------------------------------------------------------------------------

// Deterministic, small, non-constant weights: these tests never look at the numbers.
RowMatrix pattern(Index rows, Index cols, float salt) {
  RowMatrix m(rows, cols);
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < cols; ++c)
      m(r, c) =
          0.05f * std::sin(salt + 0.7f * static_cast<float>(r) + 1.3f * static_cast<float>(c));
  return m;
}
Vector gain(Index size) { return Vector::Constant(size, 1.0f); }

// GQA h 4, g 2, d_h = d_v = 8; MHA and MQA the same with g = 4 and g = 1 (kv_heads left 0).
GqaConfig gqa_config(Index kv_heads = 2) {
  GqaConfig config;
  config.d_model = kDModel;
  config.heads = 4;
  config.kv_heads = kv_heads;
  config.head_dim = 8;
  return config;
}
GqaWeights gqa_weights(Index kv_heads = 2) {
  const Index h = 4, d = 8;
  return {pattern(h * d, kDModel, 1), pattern(kv_heads * d, kDModel, 2),
          pattern(kv_heads * d, kDModel, 3), pattern(kDModel, h * d, 4)};
}

// MLA h 2, d_h 8, d_R 4, d_v 8, d_c 8, d'_c 8.
MlaConfig mla_config() {
  MlaConfig config;
  config.d_model = kDModel;
  config.heads = 2;
  config.head_dim = 8;
  config.rope_dim = 4;
  config.kv_latent_dim = 8;
  config.q_latent_dim = 8;
  return config;
}
MlaWeights mla_weights() {
  MlaWeights w;
  w.w_dq = pattern(8, kDModel, 5);
  w.q_norm = gain(8);
  w.w_uq = pattern(2 * (8 + 4), 8, 6);
  w.w_dkv = pattern(8 + 4, kDModel, 7);
  w.kv_norm = gain(8);
  w.w_ukv = pattern(2 * (8 + 8), 8, 8);
  w.w_o = pattern(kDModel, 2 * 8, 9);
  return w;
}

// TPA h 4, d_h = d_v = 8, R_Q = R_K = R_V = 2; TPA-KVonly the same with R_Q = 0.
TpaConfig tpa_config(Index rank_q = 2) {
  TpaConfig config;
  config.d_model = kDModel;
  config.heads = 4;
  config.head_dim = 8;
  config.rank_q = rank_q;
  config.rank_k = 2;
  config.rank_v = 2;
  return config;
}
TpaWeights tpa_weights() {
  TpaWeights w;
  w.w_a_q = pattern(4 * 2, kDModel, 10);
  w.w_b_q = pattern(2 * 8, kDModel, 11);
  w.w_q = pattern(4 * 8, kDModel, 12);
  w.w_a_k = pattern(4 * 2, kDModel, 13);
  w.w_b_k = pattern(2 * 8, kDModel, 14);
  w.w_a_v = pattern(4 * 2, kDModel, 15);
  w.w_b_v = pattern(2 * 8, kDModel, 16);
  w.w_o = pattern(kDModel, 4 * 8, 17);
  return w;
}

constexpr float kMlaScale = 0.28867513f;  // 1 / sqrt(d_h + d_R) = 1 / sqrt(12)

// ---- caches -------------------------------------------------------------------------------------

enum class CacheKind { contiguous, paged, capped_paged };

const char* name_of(CacheKind kind) {
  switch (kind) {
    case CacheKind::contiguous: return "Contiguous";
    case CacheKind::paged: return "Paged";
    case CacheKind::capped_paged: return "CappedPaged";
  }
  return "?";
}

std::unique_ptr<KvCache> make_cache(const CacheRecord& record, CacheKind kind) {
  switch (kind) {
    case CacheKind::contiguous:
      return std::make_unique<ContiguousKvCache>(record, kMaxSequences, kRegionTokens);
    case CacheKind::paged:
      return std::make_unique<PagedKvCache>(record, kPageTokens, kPageCount, kMaxSequences);
    case CacheKind::capped_paged:
      return std::make_unique<PagedKvCache>(record, kPageTokens, kPageCount, kMaxSequences,
                                            kCapTokens);
  }
  return nullptr;
}

// Appends n tokens of distinct values (a function of salt, plane and element) to seq.
void append_tokens(KvCache& cache, SequenceId seq, Index n, float salt) {
  const CacheRecord& record = cache.record();
  std::vector<std::vector<float>> data(static_cast<std::size_t>(record.plane_count()));
  std::vector<PlaneInput> planes;
  for (Index p = 0; p < record.plane_count(); ++p) {
    const PlaneSpec& plane = record.plane(p);
    std::vector<float>& values = data[static_cast<std::size_t>(p)];
    values.resize(static_cast<std::size_t>(n * plane.elements_per_token()));
    for (std::size_t k = 0; k < values.size(); ++k)
      values[k] = std::sin(salt + 0.37f * static_cast<float>(k) + static_cast<float>(p));
    planes.push_back({values.data(), plane.rows, plane.cols});
  }
  cache.append(seq, n, planes.data(), record.plane_count());
}

// Appends to seq until it has no room left.
void fill(KvCache& cache, SequenceId seq) {
  const Index room = cache.tokens_available(seq);
  if (room > 0) append_tokens(cache, seq, room, 9.0f);
}

// A cache and the ids of its base sequences.
struct Slot {
  std::unique_ptr<KvCache> cache;
  SequenceId a = -1;        // 8 tokens
  SequenceId b = -1;        // 4 tokens
  SequenceId c = -1;        // empty
  SequenceId removed = -1;  // held 4 tokens, then was removed
};

Slot make_slot(const CacheRecord& record, CacheKind kind) {
  Slot slot;
  slot.cache = make_cache(record, kind);
  KvCache& cache = *slot.cache;
  slot.a = cache.add_sequence();
  slot.b = cache.add_sequence();
  slot.c = cache.add_sequence();
  slot.removed = cache.add_sequence();
  append_tokens(cache, slot.a, kLengthA, 1.0f);
  append_tokens(cache, slot.b, kLengthB, 2.0f);
  append_tokens(cache, slot.removed, 4, 3.0f);
  cache.remove_sequence(slot.removed);
  return slot;
}

// A KvCache that forwards every call to `inner` but reports `reported` as its record: an engine's
// own cache whose record says something else than its storage holds (here: nothing at all).
class ReportsAnotherRecord final : public KvCache {
 public:
  ReportsAnotherRecord(CacheRecord reported, KvCache& inner)
      : KvCache(std::move(reported)), inner_(inner) {}

  SequenceId add_sequence() override { return inner_.add_sequence(); }
  void remove_sequence(SequenceId seq) override { inner_.remove_sequence(seq); }
  bool contains(SequenceId seq) const override { return inner_.contains(seq); }
  Index sequence_count() const override { return inner_.sequence_count(); }
  Index max_sequences() const override { return inner_.max_sequences(); }
  Index length(SequenceId seq) const override { return inner_.length(seq); }
  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    inner_.append(seq, n_tokens, planes, plane_count);
  }
  using KvCache::append;
  void truncate(SequenceId seq, Index new_length) override { inner_.truncate(seq, new_length); }
  Index tokens_available(SequenceId seq) const override { return inner_.tokens_available(seq); }
  SequenceView view(SequenceId seq) const override { return inner_.view(seq); }
  Index bytes_used() const override { return inner_.bytes_used(); }
  Index bytes_reserved() const override { return inner_.bytes_reserved(); }

 private:
  KvCache& inner_;
};

// ---- what a rejected call must leave as it was --------------------------------------------------

struct SequenceState {
  bool live = false;
  Index length = -1;
  Index tokens_available = -1;
  std::vector<unsigned char> bytes;  // every plane's rows, plane by plane, token by token
};

struct CacheState {
  Index sequence_count = -1;
  Index max_sequences = -1;
  Index bytes_used = -1;
  Index bytes_reserved = -1;
  Index table_bytes = -1;                // both tpattn storages
  Index free_pages = -1;                 // PagedKvCache
  Index bytes_in_pages = -1;             // PagedKvCache
  std::vector<SequenceState> sequences;  // by id, [0, max_sequences)
};

// The first byte of plane `plane` in block `block`, whatever its storage type.
const unsigned char* plane_rows(const SequenceView& view, Index plane, Index block) {
  const void* rows = nullptr;
  switch (view.record().plane(plane).storage) {
    case StorageType::f32: rows = view.plane_block<float>(plane, block); break;
    case StorageType::bf16: rows = view.plane_block<Eigen::bfloat16>(plane, block); break;
    case StorageType::f16: rows = view.plane_block<Eigen::half>(plane, block); break;
  }
  return static_cast<const unsigned char*>(rows);
}

std::vector<unsigned char> sequence_bytes(const KvCache& cache, SequenceId seq) {
  std::vector<unsigned char> bytes;
  const SequenceView view = cache.view(seq);
  for (Index p = 0; p < view.record().plane_count(); ++p) {
    const Index row_bytes = view.record().plane(p).bytes_per_token();
    for (Index b = 0; b < view.block_count(); ++b) {
      const unsigned char* first = plane_rows(view, p, b);
      bytes.insert(bytes.end(), first, first + view.tokens_in_block(b) * row_bytes);
    }
  }
  return bytes;
}

CacheState state_of(const KvCache& cache) {
  CacheState state;
  state.sequence_count = cache.sequence_count();
  state.max_sequences = cache.max_sequences();
  state.bytes_used = cache.bytes_used();
  state.bytes_reserved = cache.bytes_reserved();
  if (const auto* paged = dynamic_cast<const PagedKvCache*>(&cache)) {
    state.table_bytes = paged->table_bytes();
    state.free_pages = paged->free_page_count();
    state.bytes_in_pages = paged->bytes_in_pages();
  } else if (const auto* contiguous = dynamic_cast<const ContiguousKvCache*>(&cache)) {
    state.table_bytes = contiguous->table_bytes();
  }
  for (SequenceId seq = 0; seq < state.max_sequences; ++seq) {
    SequenceState s;
    s.live = cache.contains(seq);
    if (s.live) {
      s.length = cache.length(seq);
      s.tokens_available = cache.tokens_available(seq);
      s.bytes = sequence_bytes(cache, seq);
    }
    state.sequences.push_back(std::move(s));
  }
  return state;
}

::testing::AssertionResult same_state(const std::string& name, const CacheState& was,
                                      const CacheState& now) {
  const auto counter = [&](const char* what, Index before, Index after) {
    return ::testing::AssertionFailure()
           << "cache " << name << ": " << what << " " << before << " -> " << after;
  };
  if (was.sequence_count != now.sequence_count)
    return counter("sequence_count", was.sequence_count, now.sequence_count);
  if (was.max_sequences != now.max_sequences)
    return counter("max_sequences", was.max_sequences, now.max_sequences);
  if (was.bytes_used != now.bytes_used)
    return counter("bytes_used", was.bytes_used, now.bytes_used);
  if (was.bytes_reserved != now.bytes_reserved)
    return counter("bytes_reserved", was.bytes_reserved, now.bytes_reserved);
  if (was.table_bytes != now.table_bytes)
    return counter("table_bytes", was.table_bytes, now.table_bytes);
  if (was.free_pages != now.free_pages)
    return counter("free_page_count", was.free_pages, now.free_pages);
  if (was.bytes_in_pages != now.bytes_in_pages)
    return counter("bytes_in_pages", was.bytes_in_pages, now.bytes_in_pages);
  for (std::size_t seq = 0; seq < was.sequences.size(); ++seq) {
    const SequenceState& before = was.sequences[seq];
    const SequenceState& after = now.sequences[seq];
    const std::string which = "sequence " + std::to_string(seq);
    if (before.live != after.live)
      return ::testing::AssertionFailure()
             << "cache " << name << ": " << which << " was " << (before.live ? "live" : "free")
             << ", is " << (after.live ? "live" : "free");
    if (before.length != after.length)
      return counter((which + " length").c_str(), before.length, after.length);
    if (before.tokens_available != after.tokens_available)
      return counter((which + " tokens_available").c_str(), before.tokens_available,
                     after.tokens_available);
    if (before.bytes != after.bytes)
      return ::testing::AssertionFailure()
             << "cache " << name << ": " << which << ": the stored bytes changed";
  }
  return ::testing::AssertionSuccess();
}

// ---- the world a row runs in --------------------------------------------------------------------

enum class Layer { gqa, mha, mqa, mla, tpa, tpa_kv_only };

struct LayerName {
  Layer layer;
  const char* row_prefix;
  const char* class_name;
};
const LayerName kLayers[] = {
    {Layer::gqa, "Gqa", "GroupedQueryAttention"},
    {Layer::mha, "Mha", "MultiHeadAttention"},
    {Layer::mqa, "Mqa", "MultiQueryAttention"},
    {Layer::mla, "Mla", "MultiHeadLatentAttention"},
    {Layer::tpa, "Tpa", "TensorProductAttention"},
    {Layer::tpa_kv_only, "TpaKvOnly", "TensorProductAttentionKvOnly"},
};

class World {
 public:
  explicit World(CacheKind kind)
      : kind_(kind),
        gqa_(gqa_config(), gqa_weights()),
        mha_(gqa_config(0), gqa_weights(4)),
        mqa_(gqa_config(0), gqa_weights(1)),
        mla_(mla_config(), mla_weights()),
        tpa_(tpa_config(), tpa_weights()),
        tpa_kv_only_(tpa_config(0), tpa_weights()),
        gqa_kernel(4, 2, 8, 8),
        mla_kernel(2, 8, 4, kMlaScale),
        tpa_kernel(TpaShape{4, 8, 8, 2, 2, 2}),
        tpa_kv_only_kernel(TpaShape{4, 8, 8, 0, 2, 2}),
        x_(static_cast<std::size_t>(16 * kDModel), 0.5f),
        y_(x_.size()),
        floats_(4096, 0.25f),
        out_(4096),
        lse_(256),
        workspace_(static_cast<std::size_t>(
            std::max({gqa_kernel.workspace_floats(), mla_kernel.workspace_floats(),
                      tpa_kernel.workspace_floats(), tpa_kv_only_kernel.workspace_floats()}))) {
    for (Layer layer : {Layer::gqa, Layer::mha, Layer::mqa, Layer::mla, Layer::tpa})
      slots_.push_back(make_slot(record(layer), kind));
  }

  CacheKind kind() const { return kind_; }

  const CacheRecord& record(Layer layer) const {
    switch (layer) {
      case Layer::gqa: return gqa_.cache_record();
      case Layer::mha: return mha_.cache_record();
      case Layer::mqa: return mqa_.cache_record();
      case Layer::mla: return mla_.cache_record();
      case Layer::tpa: return tpa_.cache_record();
      case Layer::tpa_kv_only: return tpa_kv_only_.cache_record();
    }
    return gqa_.cache_record();
  }

  // The cache built with the layer's cache_record() (TPA-KVonly shares TPA's).
  Slot& slot(Layer layer) {
    switch (layer) {
      case Layer::gqa: return slots_[0];
      case Layer::mha: return slots_[1];
      case Layer::mqa: return slots_[2];
      case Layer::mla: return slots_[3];
      case Layer::tpa:
      case Layer::tpa_kv_only: return slots_[4];
    }
    return slots_[0];
  }
  Slot& gqa() { return slot(Layer::gqa); }
  Slot& tpa() { return slot(Layer::tpa); }

  // One more cache of this world's kind, holding the base sequences: part of the snapshot.
  Slot& add_cache(const CacheRecord& record) {
    slots_.push_back(make_slot(record, kind_));
    return slots_.back();
  }

  // The cache add_cache() made last.
  Slot& added() { return slots_.back(); }

  // A cache that forwards to `inner` (already part of the snapshot) but reports `reported`.
  KvCache& disguise(KvCache& inner, CacheRecord reported) {
    disguises_.push_back(std::make_unique<ReportsAnotherRecord>(std::move(reported), inner));
    return *disguises_.back();
  }

  void decode(Layer layer, KvCache& cache, const SequenceId* seqs, Index batch, const float* x,
              float* y) {
    switch (layer) {
      case Layer::gqa: return gqa_.decode(cache, seqs, batch, x, y);
      case Layer::mha: return mha_.decode(cache, seqs, batch, x, y);
      case Layer::mqa: return mqa_.decode(cache, seqs, batch, x, y);
      case Layer::mla: return mla_.decode(cache, seqs, batch, x, y);
      case Layer::tpa: return tpa_.decode(cache, seqs, batch, x, y);
      case Layer::tpa_kv_only: return tpa_kv_only_.decode(cache, seqs, batch, x, y);
    }
  }
  void decode(Layer layer, KvCache& cache, const std::vector<SequenceId>& seqs) {
    decode(layer, cache, seqs.data(), static_cast<Index>(seqs.size()), x(), y());
  }
  void prefill(Layer layer, KvCache& cache, SequenceId seq, Index n, const float* x, float* y) {
    switch (layer) {
      case Layer::gqa: return gqa_.prefill(cache, seq, n, x, y);
      case Layer::mha: return mha_.prefill(cache, seq, n, x, y);
      case Layer::mqa: return mqa_.prefill(cache, seq, n, x, y);
      case Layer::mla: return mla_.prefill(cache, seq, n, x, y);
      case Layer::tpa: return tpa_.prefill(cache, seq, n, x, y);
      case Layer::tpa_kv_only: return tpa_kv_only_.prefill(cache, seq, n, x, y);
    }
  }
  void prefill(Layer layer, KvCache& cache, SequenceId seq, Index n) {
    prefill(layer, cache, seq, n, x(), y());
  }
  void forward(Layer layer, KvCache& cache, const SequenceId* seqs, const Index* new_tokens,
               Index batch, const float* x, float* y, Executor* executor = nullptr) {
    switch (layer) {
      case Layer::gqa: return gqa_.forward(cache, seqs, new_tokens, batch, x, y, executor);
      case Layer::mha: return mha_.forward(cache, seqs, new_tokens, batch, x, y, executor);
      case Layer::mqa: return mqa_.forward(cache, seqs, new_tokens, batch, x, y, executor);
      case Layer::mla: return mla_.forward(cache, seqs, new_tokens, batch, x, y, executor);
      case Layer::tpa: return tpa_.forward(cache, seqs, new_tokens, batch, x, y, executor);
      case Layer::tpa_kv_only:
        return tpa_kv_only_.forward(cache, seqs, new_tokens, batch, x, y, executor);
    }
  }
  void forward(Layer layer, KvCache& cache, const std::vector<SequenceId>& seqs,
               const std::vector<Index>& new_tokens) {
    forward(layer, cache, seqs.data(), new_tokens.data(), static_cast<Index>(seqs.size()), x(),
            y());
  }
  void reserve(Layer layer, Index max_batch, Index max_tokens) {
    switch (layer) {
      case Layer::gqa: return gqa_.reserve(max_batch, max_tokens);
      case Layer::mha: return mha_.reserve(max_batch, max_tokens);
      case Layer::mqa: return mqa_.reserve(max_batch, max_tokens);
      case Layer::mla: return mla_.reserve(max_batch, max_tokens);
      case Layer::tpa: return tpa_.reserve(max_batch, max_tokens);
      case Layer::tpa_kv_only: return tpa_kv_only_.reserve(max_batch, max_tokens);
    }
  }

  // Buffers for up to 16 tokens of any layer, and a workspace any of the kernels accepts.
  const float* x() const { return x_.data(); }
  float* y() { return y_.data(); }
  const float* floats() const { return floats_.data(); }  // queries, factors, plane data
  float* out() { return out_.data(); }
  float* lse() { return lse_.data(); }
  float* workspace() { return workspace_.data(); }

  // Every cache of the world, in a fixed order.
  std::vector<CacheState> state() const {
    std::vector<CacheState> states;
    for (const Slot& slot : slots_) states.push_back(state_of(*slot.cache));
    return states;
  }
  std::string cache_name(std::size_t index) const {
    static const char* const kNames[] = {"GQA", "MHA", "MQA", "MLA", "TPA"};
    return index < 5 ? kNames[index] : "added #" + std::to_string(index - 5);
  }

 private:
  CacheKind kind_;
  GroupedQueryAttention<float> gqa_;
  MultiHeadAttention<float> mha_;
  MultiQueryAttention<float> mqa_;
  MultiHeadLatentAttention<float> mla_;
  TensorProductAttention<float> tpa_;
  TensorProductAttentionKvOnly<float> tpa_kv_only_;

 public:
  // The bare kernels, each for the record of the matching layer's cache.
  const GqaKernel<float> gqa_kernel;
  const MlaKernel<float> mla_kernel;
  const TpaKernel<float> tpa_kernel;
  const TpaKernel<float> tpa_kv_only_kernel;

 private:
  std::vector<float> x_, y_, floats_, out_, lse_, workspace_;
  std::vector<Slot> slots_;
  std::vector<std::unique_ptr<KvCache>> disguises_;
};

// ---- rows ---------------------------------------------------------------------------------------

// What the thrown tpattn::Error must say. `call` is exact, or "::name" for any "<Class>::name"
// (a cache method, whichever storage runs the row); `argument` is exact; every fragment appears in
// the "<expected>, got <actual>" part. Fragments may name the row's sequences: {a}, {b}, {c},
// {removed} become their ids, {room_a} becomes tokens_available(a), all in the row's slot.
struct Expect {
  std::string call;
  std::string argument;
  std::vector<std::string> fragments;
};

struct Row {
  std::string name;
  std::function<void(World&)> setup;  // may be empty
  std::function<void(World&)> call;   // the hostile call
  Expect expect;
  Layer slot = Layer::gqa;  // whose sequences the fragments name
  bool paged_only = false;  // needs a pool shared by the sequences
  // Passes only if an allocation of an impossible size fails with std::bad_alloc, which the
  // library turns into its Error; under a sanitizer such an allocation aborts instead.
  bool refused_allocation = false;
};

void add(std::vector<Row>& rows, std::string name, std::function<void(World&)> setup,
         std::function<void(World&)> call, Expect expect, Layer slot = Layer::gqa,
         bool paged_only = false, bool refused_allocation = false) {
  rows.push_back({std::move(name), std::move(setup), std::move(call), std::move(expect), slot,
                  paged_only, refused_allocation});
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos;
       at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
  return text;
}

std::string expand(std::string fragment, Slot& slot) {
  fragment = replace_all(fragment, "{a}", text(slot.a));
  fragment = replace_all(fragment, "{b}", text(slot.b));
  fragment = replace_all(fragment, "{c}", text(slot.c));
  fragment = replace_all(fragment, "{removed}", text(slot.removed));
  if (fragment.find("{room_a}") != std::string::npos)
    fragment = replace_all(fragment, "{room_a}", text(slot.cache->tokens_available(slot.a)));
  return fragment;
}

::testing::AssertionResult throws_error(const std::function<void()>& call, const Expect& expect) {
  try {
    call();
  } catch (const Error& error) {
    const std::string what = error.what();
    ::testing::Test::RecordProperty("message", what);
    const std::string head = "tpattn: " + error.call() + ": " + error.argument() + ": expected ";
    if (what.compare(0, head.size(), head) != 0 ||
        what.find(", got ", head.size()) == std::string::npos)
      return ::testing::AssertionFailure() << "\"" << what << "\" is not in the form \"tpattn: "
                                           << "<call>: <argument>: expected <e>, got <a>\"";
    const std::string detail = what.substr(head.size());
    const bool call_ok = expect.call.compare(0, 2, "::") == 0
                             ? error.call().size() > expect.call.size() &&
                                   error.call().compare(error.call().size() - expect.call.size(),
                                                        expect.call.size(), expect.call) == 0
                             : error.call() == expect.call;
    if (!call_ok)
      return ::testing::AssertionFailure() << "\"" << what << "\": the call is \"" << error.call()
                                           << "\", want \"" << expect.call << "\"";
    if (error.argument() != expect.argument)
      return ::testing::AssertionFailure()
             << "\"" << what << "\": the argument is \"" << error.argument() << "\", want \""
             << expect.argument << "\"";
    for (const std::string& fragment : expect.fragments)
      if (detail.find(fragment) == std::string::npos)
        return ::testing::AssertionFailure()
               << "\"" << what << "\" does not say \"" << fragment << "\"";
    return ::testing::AssertionSuccess();
  } catch (const std::exception& other) {
    return ::testing::AssertionFailure() << "threw another exception: " << other.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw something that is not a std::exception";
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// Plane inputs for the GQA slot's record (K: 2 x 8, V: 2 x 8), data from world.floats().
std::vector<PlaneInput> gqa_planes(const World& world) {
  return {{world.floats(), 2, 8}, {world.floats(), 2, 8}};
}
std::vector<PlaneInput> tpa_planes(const World& world) {
  return {{world.floats(), 2, 4},
          {world.floats(), 2, 8},
          {world.floats(), 2, 4},
          {world.floats(), 2, 8}};
}

// A copy of `record` with plane `plane` changed.
CacheRecord with_plane(const CacheRecord& record, Index plane,
                       const std::function<void(PlaneSpec&)>& change) {
  std::vector<PlaneSpec> planes = record.planes();
  change(planes[static_cast<std::size_t>(plane)]);
  return CacheRecord(std::move(planes));
}

// ---- the catalogue: records and caches ----------------------------------------------------------

void add_record_rows(std::vector<Row>& rows) {
  const auto record = [](std::vector<PlaneSpec> planes) {
    return [planes](World&) { CacheRecord built(planes); };
  };
  add(rows, "RecordWithoutPlanes", {}, record({}),
      {"CacheRecord", "planes", {"at least one plane", "0"}});
  add(rows, "RecordWithZeroRows", {}, record({{"K", 0, 8, StorageType::f32}}),
      {"CacheRecord", "rows", {"plane 'K' rows >= 1", "0"}});
  add(rows, "RecordWithNegativeCols", {}, record({{"K", 2, -8, StorageType::f32}}),
      {"CacheRecord", "cols", {"plane 'K' cols >= 1", "-8"}});
  add(rows, "RecordWithADuplicateName", {},
      record({{"K", 2, 8, StorageType::f32}, {"K", 2, 8, StorageType::f32}}),
      {"CacheRecord", "name", {"unique plane names", "K"}});
  add(rows, "RecordWithAStorageOutsideTheEnum", {},
      record({{"K", 2, 8, static_cast<StorageType>(99)}}),
      {"CacheRecord", "storage", {"f32, bf16 or f16", "99"}});
  // 2^62 elements of 4 bytes: 2^64 bytes per token.
  add(rows, "RecordWithA2To31By2To31Plane", {}, record({{"K", k2To31, k2To31, StorageType::f32}}),
      {"CacheRecord", "rows x cols", {"2147483648 x 2147483648", "overflows"}});
  // Four planes of 2^61 bytes each: every plane fits, their sum does not.
  add(rows, "RecordWhosePlanesTogetherOverflowBytesPerToken", {},
      record({{"A", Index(1) << 29, Index(1) << 30, StorageType::f32},
              {"B", Index(1) << 29, Index(1) << 30, StorageType::f32},
              {"C", Index(1) << 29, Index(1) << 30, StorageType::f32},
              {"D", Index(1) << 29, Index(1) << 30, StorageType::f32}}),
      {"CacheRecord", "planes", {"bytes per token", "overflows"}});
  add(rows, "RecordPlaneIndexOfAnUnknownName", {},
      [](World& w) { (void)w.gqa().cache->record().plane_index("Q"); },
      {"CacheRecord::plane_index", "name", {"one of the record's planes", "Q"}});
}

void add_cache_constructor_rows(std::vector<Row>& rows) {
  const CacheRecord small = records::gqa(1, 1, 1);                        // 8 bytes per token
  const CacheRecord wide = records::gqa(8, 128, 128, StorageType::bf16);  // 4096 bytes per token
  const std::string fits = "a total byte count that fits in a 64-bit signed integer";
  const auto contiguous = [](CacheRecord record, Index sequences, Index tokens) {
    return [=](World&) { ContiguousKvCache cache(record, sequences, tokens); };
  };
  const auto paged = [](CacheRecord record, Index page_tokens, Index pages, Index sequences,
                        Index cap) {
    return [=](World&) { PagedKvCache cache(record, page_tokens, pages, sequences, cap); };
  };
  const char* kC = "ContiguousKvCache";
  const char* kP = "PagedKvCache";
  add(rows, "ContiguousWithZeroSequences", {}, contiguous(small, 0, 8),
      {kC, "max_sequences", {">= 1", "0"}});
  add(rows, "ContiguousWithNegativeSequences", {}, contiguous(small, -3, 8),
      {kC, "max_sequences", {">= 1", "-3"}});
  add(rows, "ContiguousWithZeroTokens", {}, contiguous(small, 2, 0),
      {kC, "max_tokens", {">= 1", "0"}});
  add(rows, "ContiguousWithNegativeTokens", {}, contiguous(small, 2, -16),
      {kC, "max_tokens", {">= 1", "-16"}});
  add(rows, "ContiguousWithARecordWithoutPlanes", {}, contiguous(CacheRecord(), 2, 8),
      {kC, "record", {"at least one plane", "0"}});
  add(rows, "ContiguousWhoseBytesOverflow", {}, contiguous(small, 4, k2To61),
      {kC, "sizes", {fits, text(k2To61) + " x 4 overflows"}});
  add(rows, "ContiguousWithMoreSequencesThanMemoryCanTrack", {},
      contiguous(small, kIndexMax / 2, 4),
      {kC, "max_sequences", {"a count whose bookkeeping fits in memory"}});
  // A plane of 2^62 bytes per token: two tokens overflow.
  add(rows, "ContiguousOfTwoTokensOf2To62Bytes", {},
      contiguous(CacheRecord({{"K", Index(1) << 30, Index(1) << 30, StorageType::f32}}), 1, 2),
      {kC, "sizes", {fits, "overflows"}});
  // 2^40 tokens of 4096 bytes: 4 PiB, representable and impossible.
  add(rows, "ContiguousOfFourPebibytes", {}, contiguous(wide, 1, k2To40),
      {kC, "sizes", {"4503599627370496"}}, Layer::gqa, false, true);
  add(rows, "PagedWithZeroPageTokens", {}, paged(small, 0, 4, 2, 0),
      {kP, "page_tokens", {">= 1", "0"}});
  add(rows, "PagedWithZeroPages", {}, paged(small, 4, 0, 2, 0), {kP, "page_count", {">= 1", "0"}});
  add(rows, "PagedWithZeroSequences", {}, paged(small, 4, 4, 0, 0),
      {kP, "max_sequences", {">= 1", "0"}});
  add(rows, "PagedWithANegativeCap", {}, paged(small, 4, 4, 2, -1),
      {kP, "max_tokens_per_sequence", {">= 0", "-1"}});
  add(rows, "PagedWithARecordWithoutPlanes", {}, paged(CacheRecord(), 4, 4, 2, 0),
      {kP, "record", {"at least one plane", "0"}});
  add(rows, "PagedWhoseBytesOverflow", {}, paged(small, k2To61, 4, 2, 0),
      {kP, "sizes", {fits, "overflows"}});
  add(rows, "PagedWhosePageTablesOverflow", {}, paged(small, 1, k2To61, 8, 0),
      {kP, "sizes", {fits, "overflows"}});
  // 2^36 pages of 16 tokens of 4096 bytes: 4 PiB of pages.
  add(rows, "PagedOfFourPebibytes", {}, paged(wide, 16, Index(1) << 36, 1, 16),
      {kP, "sizes", {"4503599627370496"}}, Layer::gqa, false, true);
  add(rows, "PagedFootprintWithZeroPageTokens", {},
      [small](World&) { (void)PagedKvCache::footprint(small, 0, 4, 2); },
      {kP, "page_tokens", {">= 1", "0"}});
  add(rows, "ContiguousFootprintWhoseBytesOverflow", {},
      [small](World&) { (void)ContiguousKvCache::footprint(small, 4, k2To61); },
      {kC, "sizes", {fits, "overflows"}});
  add(rows, "PagedFootprintOfARecordWithoutPlanes", {},
      [](World&) { (void)PagedKvCache::footprint(CacheRecord(), 4, 4, 2); },
      {kP, "record", {"at least one plane"}});
  add(rows, "FootprintTotalThatOverflows", {},
      [](World&) {
        (void)CacheFootprint{kIndexMax, 8}.total();
      },
      {"CacheFootprint::total", "sizes", {fits, "overflows"}});
}

void add_cache_method_rows(std::vector<Row>& rows) {
  const auto on_gqa = [](std::function<void(World&, KvCache&, Slot&)> f) {
    return [f](World& w) { f(w, *w.gqa().cache, w.gqa()); };
  };
  const auto append = [on_gqa](std::function<SequenceId(Slot&)> seq, Index n) {
    return on_gqa([seq, n](World& w, KvCache& cache, Slot& s) {
      const std::vector<PlaneInput> planes = gqa_planes(w);
      cache.append(seq(s), n, planes.data(), 2);
    });
  };
  const auto a = [](Slot& s) { return s.a; };
  const std::vector<std::pair<std::string, std::function<SequenceId(Slot&)>>> bad_ids = {
      {"ARemovedSequence", [](Slot& s) { return s.removed; }},
      {"ANegativeSequenceId", [](Slot&) { return SequenceId(-1); }},
      {"SequenceIdMaxSequences", [](Slot&) { return SequenceId(kMaxSequences); }},
      {"AHugeSequenceId", [](Slot&) { return SequenceId(k2To62); }},
  };
  const std::vector<std::string> shown_ids = {"{removed}", "-1", text(kMaxSequences), text(k2To62)};
  for (std::size_t i = 0; i < bad_ids.size(); ++i) {
    const std::string& what = bad_ids[i].first;
    const std::function<SequenceId(Slot&)> seq = bad_ids[i].second;
    const auto expect = [&](const char* call) {
      return Expect{call, "seq", {"a live sequence id", shown_ids[i]}};
    };
    add(rows, "RemoveSequence" + what, {},
        on_gqa([seq](World&, KvCache& c, Slot& s) { c.remove_sequence(seq(s)); }),
        expect("::remove_sequence"));
    add(rows, "LengthOf" + what, {},
        on_gqa([seq](World&, KvCache& c, Slot& s) { (void)c.length(seq(s)); }), expect("::length"));
    add(rows, "AppendTo" + what, {}, append(seq, 1), expect("::append"));
    add(rows, "Truncate" + what, {},
        on_gqa([seq](World&, KvCache& c, Slot& s) { c.truncate(seq(s), 0); }),
        expect("::truncate"));
    add(rows, "TokensAvailableOf" + what, {},
        on_gqa([seq](World&, KvCache& c, Slot& s) { (void)c.tokens_available(seq(s)); }),
        expect("::tokens_available"));
    add(rows, "ViewOf" + what, {},
        on_gqa([seq](World&, KvCache& c, Slot& s) { (void)c.view(seq(s)); }), expect("::view"));
  }

  add(rows, "AddSequenceWhenEverySlotIsLive", [](World& w) { w.gqa().cache->add_sequence(); },
      on_gqa([](World&, KvCache& c, Slot&) { c.add_sequence(); }),
      {"::add_sequence", "sequence count", {"at most 4 live sequences", "5"}});

  add(rows, "AppendZeroTokens", {}, append(a, 0), {"::append", "n_tokens", {">= 1", "0"}});
  add(rows, "AppendNegativeTokens", {}, append(a, -3), {"::append", "n_tokens", {">= 1", "-3"}});
  add(rows, "AppendMoreTokensThanTheSequenceHasRoomFor", {},
      on_gqa([](World& w, KvCache& c, Slot& s) {
        const std::vector<PlaneInput> planes = gqa_planes(w);
        c.append(s.a, c.tokens_available(s.a) + 1, planes.data(), 2);
      }),
      {"::append", "n_tokens", {"<= {room_a}"}});
  add(rows, "AppendAHugeTokenCount", {}, append(a, k2To62),
      {"::append", "n_tokens", {"<= {room_a}", text(k2To62)}});
  add(rows, "AppendTheLargestTokenCount", {}, append(a, kIndexMax),
      {"::append", "n_tokens", {"<= {room_a}", text(kIndexMax)}});
  add(rows, "AppendToAFullSequence", [](World& w) { fill(*w.gqa().cache, w.gqa().a); },
      append(a, 1), {"::append", "n_tokens", {"<= 0"}});
  add(
      rows, "AppendWhenAnotherSequenceTookTheLastFreePage",
      [](World& w) { append_tokens(*w.gqa().cache, w.gqa().b, kPageTokens, 5.0f); }, append(a, 1),
      {"::append", "n_tokens", {"<= 0"}}, Layer::gqa, true);
  const auto append_planes = [on_gqa](Index n, std::function<void(std::vector<PlaneInput>&)> edit,
                                      Index count) {
    return on_gqa([n, edit, count](World& w, KvCache& c, Slot& s) {
      std::vector<PlaneInput> planes = gqa_planes(w);
      planes.resize(4, planes[0]);  // room for a hostile count
      edit(planes);
      c.append(s.a, n, planes.data(), count);
    });
  };
  const auto keep = [](std::vector<PlaneInput>&) {};
  add(rows, "AppendOnePlaneOfTwo", {}, append_planes(1, keep, 1),
      {"::append", "planes", {"2 planes (one per record plane)", "1"}});
  add(rows, "AppendThreePlanesOfTwo", {}, append_planes(1, keep, 3),
      {"::append", "planes", {"2 planes", "3"}});
  add(rows, "AppendANegativePlaneCount", {}, append_planes(1, keep, -1),
      {"::append", "planes", {"2 planes", "-1"}});
  add(rows, "AppendNullPlanes", {},
      on_gqa([](World&, KvCache& c, Slot& s) { c.append(s.a, 1, nullptr, 2); }),
      {"::append", "planes", {"non-null", "null"}});
  add(rows, "AppendNullDataInTheSecondPlane", {},
      append_planes(
          1, [](std::vector<PlaneInput>& p) { p[1].data = nullptr; }, 2),
      {"::append", "planes[1] (V) data", {"non-null", "null"}});
  add(rows, "AppendAPlaneWithTooManyRows", {},
      append_planes(
          1, [](std::vector<PlaneInput>& p) { p[0].rows = 3; }, 2),
      {"::append", "planes[0] (K) shape", {"2 x 8", "3 x 8"}});
  add(rows, "AppendAPlaneWithTooFewCols", {},
      append_planes(
          1, [](std::vector<PlaneInput>& p) { p[1].cols = 7; }, 2),
      {"::append", "planes[1] (V) shape", {"2 x 8", "2 x 7"}});
  add(rows, "AppendATransposedPlane", {},
      append_planes(
          1,
          [](std::vector<PlaneInput>& p) {
            p[0] = {p[0].data, 8, 2};
          },
          2),
      {"::append", "planes[0] (K) shape", {"2 x 8", "8 x 2"}});
  add(rows, "AppendNullDataInTheLastPlaneOfFour", {},
      [](World& w) {
        std::vector<PlaneInput> planes = tpa_planes(w);
        planes[3].data = nullptr;
        w.tpa().cache->append(w.tpa().a, 1, planes.data(), 4);
      },
      {"::append", "planes[3] (B_V) data", {"non-null", "null"}});

  add(rows, "TruncateToANegativeLength", {},
      on_gqa([](World&, KvCache& c, Slot& s) { c.truncate(s.a, -1); }),
      {"::truncate", "new_length", {"in [0, 8]", "-1"}});
  add(rows, "TruncateBeyondTheLength", {},
      on_gqa([](World&, KvCache& c, Slot& s) { c.truncate(s.a, 9); }),
      {"::truncate", "new_length", {"in [0, 8]", "9"}});
  add(rows, "TruncateToAHugeLength", {},
      on_gqa([](World&, KvCache& c, Slot& s) { c.truncate(s.b, k2To62); }),
      {"::truncate", "new_length", {"in [0, 4]", text(k2To62)}});
  add(rows, "TruncateAnEmptySequenceToOne", {},
      on_gqa([](World&, KvCache& c, Slot& s) { c.truncate(s.c, 1); }),
      {"::truncate", "new_length", {"in [0, 0]", "1"}});

  add(rows, "PrefixOfANegativeLength", {},
      on_gqa([](World&, KvCache& c, Slot& s) { (void)c.view(s.a).prefix(-1); }),
      {"SequenceView::prefix", "length", {"in [0, 8]", "-1"}});
  add(rows, "PrefixLongerThanTheView", {},
      on_gqa([](World&, KvCache& c, Slot& s) { (void)c.view(s.a).prefix(9); }),
      {"SequenceView::prefix", "length", {"in [0, 8]", "9"}});
}

// ---- the catalogue: operators -------------------------------------------------------------------

// An executor that reports no concurrency (an engine's misconfigured pool).
Executor& no_concurrency_executor() {
  struct None final : Executor {
    Index concurrency() const override { return 0; }
    void run(Index tasks, TaskRef task) override {
      for (Index i = 0; i < tasks; ++i) task(i);
    }
  };
  static None executor;
  return executor;
}

// A cache of another operator than `layer`, and a fragment its record's difference must show.
std::pair<Layer, std::string> another_operator(Layer layer) {
  switch (layer) {
    case Layer::gqa:
    case Layer::mha:
    case Layer::mqa: return {Layer::mla, "latent"};  // plane 0 is 'latent', not 'K'
    case Layer::mla: return {Layer::tpa, "planes"};  // 4 planes, not 2
    case Layer::tpa:
    case Layer::tpa_kv_only: return {Layer::gqa, "planes"};  // 2 planes, not 4
  }
  return {Layer::gqa, ""};
}

void add_layer_rows(std::vector<Row>& rows, const LayerName& name) {
  const Layer L = name.layer;
  const std::string prefix = name.row_prefix;
  const std::string decode = std::string(name.class_name) + "::decode";
  const std::string prefill = std::string(name.class_name) + "::prefill";
  const std::string reserve = std::string(name.class_name) + "::reserve";
  const auto row = [&](const std::string& what, std::function<void(World&)> setup,
                       std::function<void(World&)> call, Expect expect, bool paged_only = false,
                       bool refused_allocation = false) {
    add(rows, prefix + what, std::move(setup), std::move(call), std::move(expect), L, paged_only,
        refused_allocation);
  };
  const auto decode_ids = [L](std::function<std::vector<SequenceId>(Slot&)> ids) {
    return [L, ids](World& w) { w.decode(L, *w.slot(L).cache, ids(w.slot(L))); };
  };

  // decode: the batch
  row("DecodeABatchOfZero", {},
      [L](World& w) { w.decode(L, *w.slot(L).cache, &w.slot(L).a, 0, w.x(), w.y()); },
      {decode, "batch", {">= 1", "0"}});
  row("DecodeANegativeBatch", {},
      [L](World& w) { w.decode(L, *w.slot(L).cache, &w.slot(L).a, -1, w.x(), w.y()); },
      {decode, "batch", {">= 1", "-1"}});
  row("DecodeNullSeqs", {},
      [L](World& w) { w.decode(L, *w.slot(L).cache, nullptr, 1, w.x(), w.y()); },
      {decode, "seqs", {"non-null", "null"}});
  row("DecodeNullX", {},
      [L](World& w) { w.decode(L, *w.slot(L).cache, &w.slot(L).a, 1, nullptr, w.y()); },
      {decode, "x", {"non-null", "null"}});
  row("DecodeNullY", {},
      [L](World& w) { w.decode(L, *w.slot(L).cache, &w.slot(L).a, 1, w.x(), nullptr); },
      {decode, "y", {"non-null", "null"}});
  row("DecodeARemovedSequence", {}, decode_ids([](Slot& s) {
        return std::vector{s.a, s.removed};
      }),
      {decode, "seqs", {"live sequence ids", "seqs[1] = {removed}"}});
  row("DecodeANegativeSequenceId", {},
      decode_ids([](Slot&) { return std::vector<SequenceId>{-1}; }),
      {decode, "seqs", {"live sequence ids", "seqs[0] = -1"}});
  row("DecodeAHugeSequenceId", {},
      decode_ids([](Slot&) { return std::vector<SequenceId>{k2To62}; }),
      {decode, "seqs", {"live sequence ids", "seqs[0] = " + text(k2To62)}});
  row("DecodeOneSequenceTwice", {}, decode_ids([](Slot& s) {
        return std::vector{s.a, s.a};
      }),
      {decode, "seqs", {"distinct sequence ids", "seqs[0] == seqs[1] == {a}"}});
  row("DecodeOneSequenceTwiceFurtherApart", {}, decode_ids([](Slot& s) {
        return std::vector{s.b, s.a, s.c, s.a};
      }),
      {decode, "seqs", {"distinct sequence ids", "seqs[1] == seqs[3] == {a}"}});
  row("DecodeASequenceWithNoRoom", [L](World& w) { fill(*w.slot(L).cache, w.slot(L).a); },
      decode_ids([](Slot& s) { return std::vector{s.a}; }),
      {decode, "cache", {"room for one more token", "seqs[0] = {a}"}});
  // b keeps room inside its last page; a then takes every token it can.
  row("DecodeABatchWhoseSecondSequenceHasNoRoom",
      [L](World& w) {
        Slot& s = w.slot(L);
        s.cache->truncate(s.b, kLengthB - 1);
        fill(*s.cache, s.a);
      },
      decode_ids([](Slot& s) {
        return std::vector{s.b, s.a};
      }),
      {decode, "cache", {"room for one more token", "seqs[1] = {a}"}});
  // Each of a and b has room for a token, but only one free page exists for both.
  row("DecodeABatchThatRunsThePoolDryAtItsSecondSequence", {}, decode_ids([](Slot& s) {
        return std::vector{s.a, s.b};
      }),
      {decode, "cache", {"seqs[1] = {b}", "nothing was appended"}}, true);
  // c takes the free page, b grows inside its last page, a finds no page: both roll back.
  row(
      "DecodeABatchThatRunsThePoolDryAtItsThirdSequence",
      [L](World& w) { w.slot(L).cache->truncate(w.slot(L).b, kLengthB - 1); },
      decode_ids([](Slot& s) {
        return std::vector{s.c, s.b, s.a};
      }),
      {decode, "cache", {"seqs[2] = {a}", "nothing was appended"}}, true);

  // decode and prefill: a cache that was not built with cache_record()
  const auto [other, other_fragment] = another_operator(L);
  const auto on_other = [L, other = other](bool prefill) {
    return [L, other, prefill](World& w) {
      Slot& s = w.slot(other);
      if (prefill)
        w.prefill(L, *s.cache, s.a, 1);
      else
        w.decode(L, *s.cache, {s.a});
    };
  };
  row("DecodeOnAnotherOperatorsCache", {}, on_other(false), {decode, "cache", {other_fragment}});
  row("PrefillOnAnotherOperatorsCache", {}, on_other(true), {prefill, "cache", {other_fragment}});
  const auto on_disguise = [L](bool prefill) {
    return [L, prefill](World& w) {
      Slot& s = w.slot(L);
      KvCache& hollow = w.disguise(*s.cache, CacheRecord());
      if (prefill)
        w.prefill(L, hollow, s.a, 1);
      else
        w.decode(L, hollow, {s.a});
    };
  };
  // An engine's cache that holds this operator's tokens but reports another operator's record.
  row("DecodeOnACacheThatReportsAnotherOperatorsRecord", {},
      [L, other = other](World& w) {
        Slot& s = w.slot(L);
        w.decode(L, w.disguise(*s.cache, w.record(other)), {s.a});
      },
      {decode, "cache", {other_fragment}});
  row("DecodeOnACacheWhoseRecordHasNoPlanes", {}, on_disguise(false),
      {decode, "cache", {"planes"}});
  row("PrefillOnACacheWhoseRecordHasNoPlanes", {}, on_disguise(true),
      {prefill, "cache", {"planes"}});
  // Records that differ from cache_record() in one field of one plane.
  struct Variant {
    const char* what;
    Index plane;  // -1: the last
    std::function<void(PlaneSpec&)> change;
    std::vector<std::string> fragments;
  };
  const std::vector<Variant> variants = {
      {"Name", 0, [](PlaneSpec& p) { p.name = "renamed"; }, {"renamed"}},
      {"Rows", 0, [](PlaneSpec& p) { p.rows += 1; }, {"rows"}},
      {"Cols", -1, [](PlaneSpec& p) { p.cols += 1; }, {"cols"}},
      {"Storage", -1, [](PlaneSpec& p) { p.storage = StorageType::bf16; }, {"storage", "bf16"}},
  };
  for (const Variant& variant : variants) {
    const auto make = [L, variant](World& w) {
      const CacheRecord& own = w.record(L);
      const Index plane = variant.plane < 0 ? own.plane_count() - 1 : variant.plane;
      w.add_cache(with_plane(own, plane, variant.change));
    };
    const auto run = [L](bool prefill) {
      return [L, prefill](World& w) {
        Slot& s = w.added();
        if (prefill)
          w.prefill(L, *s.cache, s.a, 1);
        else
          w.decode(L, *s.cache, {s.a});
      };
    };
    row(std::string("DecodeOnACacheWhosePlane") + variant.what + "Differs", make, run(false),
        {decode, "cache", variant.fragments});
    row(std::string("PrefillOnACacheWhosePlane") + variant.what + "Differs", make, run(true),
        {prefill, "cache", variant.fragments});
  }

  // prefill
  const auto prefill_n = [L](std::function<SequenceId(Slot&)> seq, Index n) {
    return [L, seq, n](World& w) { w.prefill(L, *w.slot(L).cache, seq(w.slot(L)), n); };
  };
  const auto a = [](Slot& s) { return s.a; };
  row("PrefillARemovedSequence", {}, prefill_n([](Slot& s) { return s.removed; }, 1),
      {prefill, "seq", {"a live sequence id", "{removed}"}});
  row("PrefillANegativeSequenceId", {}, prefill_n([](Slot&) { return SequenceId(-1); }, 1),
      {prefill, "seq", {"a live sequence id", "-1"}});
  row("PrefillZeroTokens", {}, prefill_n(a, 0), {prefill, "n_tokens", {">= 1", "0"}});
  row("PrefillNegativeTokens", {}, prefill_n(a, -5), {prefill, "n_tokens", {">= 1", "-5"}});
  row("PrefillNullX", {},
      [L](World& w) { w.prefill(L, *w.slot(L).cache, w.slot(L).a, 1, nullptr, w.y()); },
      {prefill, "x", {"non-null", "null"}});
  row("PrefillNullY", {},
      [L](World& w) { w.prefill(L, *w.slot(L).cache, w.slot(L).a, 1, w.x(), nullptr); },
      {prefill, "y", {"non-null", "null"}});
  row("PrefillMoreTokensThanTheSequenceHasRoomFor", {},
      [L](World& w) {
        Slot& s = w.slot(L);
        w.prefill(L, *s.cache, s.a, s.cache->tokens_available(s.a) + 1);
      },
      {prefill, "n_tokens", {"<= {room_a}"}});
  row("PrefillAHugeTokenCount", {}, prefill_n(a, k2To62),
      {prefill, "n_tokens", {"<= {room_a}", text(k2To62)}});
  row("PrefillAFullSequence", [L](World& w) { fill(*w.slot(L).cache, w.slot(L).a); },
      prefill_n(a, 1), {prefill, "n_tokens", {"<= 0"}});

  // forward: a continuous-batching step
  const std::string forward = std::string(name.class_name) + "::forward";
  const auto forward_ids = [L](std::function<std::vector<SequenceId>(Slot&)> ids,
                               std::vector<Index> new_tokens) {
    return [L, ids, new_tokens](World& w) {
      w.forward(L, *w.slot(L).cache, ids(w.slot(L)), new_tokens);
    };
  };
  row("ForwardABatchOfZero", {},
      [L](World& w) {
        const Index one = 1;
        w.forward(L, *w.slot(L).cache, &w.slot(L).a, &one, 0, w.x(), w.y());
      },
      {forward, "batch", {">= 1", "0"}});
  row("ForwardNullNewTokens", {},
      [L](World& w) { w.forward(L, *w.slot(L).cache, &w.slot(L).a, nullptr, 1, w.x(), w.y()); },
      {forward, "new_tokens", {"non-null", "null"}});
  row("ForwardZeroNewTokensForTheSecondSequence", {},
      forward_ids(
          [](Slot& s) {
            return std::vector{s.a, s.b};
          },
          {1, 0}),
      {forward, "new_tokens", {">= 1", "new_tokens[1] = 0"}});
  row("ForwardARemovedSequence", {},
      forward_ids(
          [](Slot& s) {
            return std::vector{s.a, s.removed};
          },
          {1, 1}),
      {forward, "seqs", {"live sequence ids", "seqs[1] = {removed}"}});
  row("ForwardTheSameSequenceTwice", {},
      forward_ids(
          [](Slot& s) {
            return std::vector{s.a, s.a};
          },
          {1, 2}),
      {forward, "seqs", {"distinct", "seqs[0] == seqs[1] == {a}"}});
  row("ForwardMoreTokensThanTheSequenceHasRoomFor", {},
      [L](World& w) {
        Slot& s = w.slot(L);
        w.forward(L, *s.cache, {s.a}, {s.cache->tokens_available(s.a) + 1});
      },
      {forward, "new_tokens", {"within the room", "for seqs[0] = {a}"}});
  row("ForwardNullX", {},
      [L](World& w) {
        const Index one = 1;
        w.forward(L, *w.slot(L).cache, &w.slot(L).a, &one, 1, nullptr, w.y());
      },
      {forward, "x", {"non-null", "null"}});
  // An executor that claims no threads: the plan refuses it before anything changes.
  row("ForwardOnAnExecutorWithoutConcurrency", {},
      [L](World& w) {
        const Index one = 1;
        w.forward(L, *w.slot(L).cache, &w.slot(L).a, &one, 1, w.x(), w.y(),
                  &no_concurrency_executor());
      },
      {forward, "threads", {">= 1", "0"}});

  // reserve
  row("ReserveANegativeBatch", {}, [L](World& w) { w.reserve(L, -1, 1); },
      {reserve, "max_batch", {">= 1", "-1"}});
  row("ReserveNegativeTokens", {}, [L](World& w) { w.reserve(L, 1, -1); },
      {reserve, "max_tokens", {">= 1", "-1"}});
  // 2^61 rows of the layer's floats per row overflow an Index.
  row("ReserveABatchWhoseWorkspaceOverflows", {}, [L](World& w) { w.reserve(L, k2To61, 1); },
      {reserve, "workspace floats", {text(k2To61), "overflows"}});
  row("ReserveTokensWhoseWorkspaceOverflows", {}, [L](World& w) { w.reserve(L, 1, k2To61); },
      {reserve, "workspace floats", {text(k2To61), "overflows"}});
  // 2^40 rows: hundreds of TiB, representable and impossible.
  row(
      "ReserveAHugeBatch", {}, [L](World& w) { w.reserve(L, k2To40, 1); },
      {reserve, "workspace", {"std::bad_alloc"}}, false, true);
}

// Operator constructors: a config or weights changed from a valid layer's.
template <class Op, class Config, class Weights>
std::function<void(World&)> construct(Config config, Weights weights) {
  return [config, weights](World&) { Op op(config, weights); };
}

void add_gqa_constructor_rows(std::vector<Row>& rows) {
  using Gqa = GroupedQueryAttention<float>;
  const char* kName = "GroupedQueryAttention";
  const auto row = [&](const std::string& what, std::function<void(GqaConfig&)> config,
                       std::function<void(GqaWeights&)> weights, Expect expect) {
    GqaConfig c = gqa_config();
    GqaWeights w = gqa_weights();
    if (config) config(c);
    if (weights) weights(w);
    add(rows, "Gqa" + what, {}, construct<Gqa>(c, w), std::move(expect));
  };
  row("WithDModelZero", [](GqaConfig& c) { c.d_model = 0; }, {}, {kName, "d_model", {">= 1", "0"}});
  row("WithHeadsZero", [](GqaConfig& c) { c.heads = 0; }, {}, {kName, "heads", {">= 1", "0"}});
  row("WithKvHeadsZero", [](GqaConfig& c) { c.kv_heads = 0; }, {},
      {kName, "kv_heads", {">= 1", "0"}});
  row("WithNegativeHeadDim", [](GqaConfig& c) { c.head_dim = -8; }, {},
      {kName, "head_dim", {">= 1", "-8"}});
  row("WithNegativeValueDim", [](GqaConfig& c) { c.value_dim = -1; }, {},
      {kName, "value_dim", {">= 1", "-1"}});
  row("WithKvHeadsNotADivisorOfHeads", [](GqaConfig& c) { c.kv_heads = 3; }, {},
      {kName, "kv_heads", {"a divisor of heads = 4", "3"}});
  row("WithWKOfTheWrongShape", {}, [](GqaWeights& w) { w.w_k = pattern(15, kDModel, 1); },
      {kName, "w_k", {"16 x 16", "15 x 16"}});
  row("WithWOTransposed", {}, [](GqaWeights& w) { w.w_o = pattern(32, kDModel, 1); },
      {kName, "w_o", {"16 x 32", "32 x 16"}});
  row("WithNoWeights", {}, [](GqaWeights& w) { w = GqaWeights{}; },
      {kName, "w_q", {"32 x 16", "0 x 0"}});
  row("WithAnOddRotaryDim", [](GqaConfig& c) { c.rope.rotary_dim = 7; }, {},
      {kName, "rope.rotary_dim", {"an even number", "7"}});
  row("WithARotaryDimWiderThanTheHead", [](GqaConfig& c) { c.rope.rotary_dim = 10; }, {},
      {kName, "rope.rotary_dim", {"in [1, 8]", "10"}});
  row("WithANegativeRotaryDim", [](GqaConfig& c) { c.rope.rotary_dim = -2; }, {},
      {kName, "rope.rotary_dim", {"in [1, 8]", "-2"}});
  row("WithRopeBaseOne", [](GqaConfig& c) { c.rope.base = 1.0; }, {},
      {kName, "rope.base", {"> 1", "1"}});
  row("WithRopeBaseNaN", [](GqaConfig& c) { c.rope.base = std::nan(""); }, {},
      {kName, "rope.base", {"nan"}});
  row("WithRopeBaseInfinite",
      [](GqaConfig& c) { c.rope.base = std::numeric_limits<double>::infinity(); }, {},
      {kName, "rope.base", {"finite", "inf"}});
  row("WithRopePairing99", [](GqaConfig& c) { c.rope.pairing = static_cast<RopePairing>(99); }, {},
      {kName, "rope.pairing", {"half_split or interleaved", "99"}});
  row("WithRopeDirection99",
      [](GqaConfig& c) { c.rope.direction = static_cast<RopeDirection>(99); }, {},
      {kName, "rope.direction", {"standard or reversed", "99"}});
  // h = g = d_h = 2^32: h d_h = 2^64.
  const auto huge = [](GqaConfig& c) { c.heads = c.kv_heads = c.head_dim = k2To32; };
  row("With2To32HeadsKvHeadsAndHeadDim", huge, [](GqaWeights& w) { w = GqaWeights{}; },
      {kName, "heads x head_dim", {"4294967296 x 4294967296", "overflows"}});
  // The same with weights of the shapes the wrapped products would give (0 x d), RoPE off.
  row(
      "With2To32HeadsAndWeightsOfTheWrappedShapes",
      [huge](GqaConfig& c) {
        huge(c);
        c.rope.enabled = false;
      },
      [](GqaWeights& w) {
        w = {RowMatrix(0, kDModel), RowMatrix(0, kDModel), RowMatrix(0, kDModel),
             RowMatrix(kDModel, 0)};
      },
      {kName, "heads x head_dim", {"4294967296 x 4294967296", "overflows"}});
  row("WithDModel2To40", [](GqaConfig& c) { c.d_model = k2To40; }, {},
      {kName, "w_q", {"32 x " + text(k2To40)}});
  row("WithHeads2To40", [](GqaConfig& c) { c.heads = k2To40; }, {},
      {kName, "w_q", {text(k2To40 * 8) + " x 16"}});
  // A RoPE table of 2^39 doubles would be needed, but the weights cannot match first.
  row("WithHeadDim2To40", [](GqaConfig& c) { c.head_dim = k2To40; }, {},
      {kName, "w_q", {text(4 * k2To40) + " x 16"}});

  using Mha = MultiHeadAttention<float>;
  add(rows, "MhaWithKvHeadsOtherThanHeads", {}, construct<Mha>(gqa_config(2), gqa_weights(4)),
      {"MultiHeadAttention", "kv_heads", {"heads = 4 (or 0)", "2"}});
  GqaConfig mha_heads_zero = gqa_config(0);
  mha_heads_zero.heads = 0;
  add(rows, "MhaWithHeadsZero", {}, construct<Mha>(mha_heads_zero, gqa_weights(4)),
      {"MultiHeadAttention", "heads", {">= 1", "0"}});
  add(rows, "MhaWithTheWeightsOfGqa", {}, construct<Mha>(gqa_config(0), gqa_weights(2)),
      {"MultiHeadAttention", "w_k", {"32 x 16", "16 x 16"}});
  using Mqa = MultiQueryAttention<float>;
  add(rows, "MqaWithTwoKvHeads", {}, construct<Mqa>(gqa_config(2), gqa_weights(1)),
      {"MultiQueryAttention", "kv_heads", {"1 (or 0)", "2"}});
  GqaConfig mqa_head_dim_zero = gqa_config(0);
  mqa_head_dim_zero.head_dim = 0;
  add(rows, "MqaWithHeadDimZero", {}, construct<Mqa>(mqa_head_dim_zero, gqa_weights(1)),
      {"MultiQueryAttention", "head_dim", {">= 1", "0"}});
  add(rows, "MqaWithTheWeightsOfGqa", {}, construct<Mqa>(gqa_config(0), gqa_weights(2)),
      {"MultiQueryAttention", "w_k", {"8 x 16", "16 x 16"}});
}

void add_mla_constructor_rows(std::vector<Row>& rows) {
  using Mla = MultiHeadLatentAttention<float>;
  const char* kName = "MultiHeadLatentAttention";
  const auto row = [&](const std::string& what, std::function<void(MlaConfig&)> config,
                       std::function<void(MlaWeights&)> weights, Expect expect) {
    MlaConfig c = mla_config();
    MlaWeights w = mla_weights();
    if (config) config(c);
    if (weights) weights(w);
    add(rows, "Mla" + what, {}, construct<Mla>(c, w), std::move(expect));
  };
  row("WithDModelZero", [](MlaConfig& c) { c.d_model = 0; }, {}, {kName, "d_model", {">= 1", "0"}});
  row("WithHeadsZero", [](MlaConfig& c) { c.heads = 0; }, {}, {kName, "heads", {">= 1", "0"}});
  row("WithHeadDimZero", [](MlaConfig& c) { c.head_dim = 0; }, {},
      {kName, "head_dim", {">= 1", "0"}});
  row("WithRopeDimZero", [](MlaConfig& c) { c.rope_dim = 0; }, {},
      {kName, "rope_dim", {">= 1", "0"}});
  row("WithKvLatentDimZero", [](MlaConfig& c) { c.kv_latent_dim = 0; }, {},
      {kName, "kv_latent_dim", {">= 1", "0"}});
  row("WithNegativeValueDim", [](MlaConfig& c) { c.value_dim = -2; }, {},
      {kName, "value_dim", {">= 1", "-2"}});
  row("WithNegativeQLatentDim", [](MlaConfig& c) { c.q_latent_dim = -1; }, {},
      {kName, "q_latent_dim", {">= 0", "-1"}});
  row("WithNormEpsZero", [](MlaConfig& c) { c.norm_eps = 0.0f; }, {},
      {kName, "norm_eps", {"> 0", "0"}});
  row("WithNegativeNormEps", [](MlaConfig& c) { c.norm_eps = -1e-6f; }, {},
      {kName, "norm_eps", {"> 0", "-1e-06"}});
  row("WithNormEpsNaN", [](MlaConfig& c) { c.norm_eps = std::nanf(""); }, {},
      {kName, "norm_eps", {"nan"}});
  row("WithNormEpsInfinite",
      [](MlaConfig& c) { c.norm_eps = std::numeric_limits<float>::infinity(); }, {},
      {kName, "norm_eps", {"finite", "inf"}});
  row("WithAQNormOfTheWrongLength", {}, [](MlaWeights& w) { w.q_norm = gain(7); },
      {kName, "q_norm", {"a gain of q_latent_dim entries", "7"}});
  row("WithAKvNormOfTheWrongLength", {}, [](MlaWeights& w) { w.kv_norm = gain(9); },
      {kName, "kv_norm", {"a gain of kv_latent_dim entries", "9"}});
  row("WithWDqOfTheWrongShape", {}, [](MlaWeights& w) { w.w_dq = pattern(8, 15, 1); },
      {kName, "w_dq", {"8 x 16", "8 x 15"}});
  row("WithWUkvOfTheWrongShape", {}, [](MlaWeights& w) { w.w_ukv = pattern(31, 8, 1); },
      {kName, "w_ukv", {"32 x 8", "31 x 8"}});
  row("WithAnOddRotaryDim", [](MlaConfig& c) { c.rope.rotary_dim = 3; }, {},
      {kName, "rope.rotary_dim", {"an even number", "3"}});
  row("WithRopeBaseInfinite",
      [](MlaConfig& c) { c.rope.base = std::numeric_limits<double>::infinity(); }, {},
      {kName, "rope.base", {"finite", "inf"}});
  row("WithRopePairing99", [](MlaConfig& c) { c.rope.pairing = static_cast<RopePairing>(99); }, {},
      {kName, "rope.pairing", {"99"}});
  row("WithRopeDirection99",
      [](MlaConfig& c) { c.rope.direction = static_cast<RopeDirection>(99); }, {},
      {kName, "rope.direction", {"99"}});
  // h = d_h = d_v = 2^32: h (d_h + d_R) overflows.
  row("With2To32HeadsAndHeadDim", [](MlaConfig& c) { c.heads = c.head_dim = c.value_dim = k2To32; },
      {}, {kName, "heads x (head_dim + rope_dim)", {"4294967296 x 4294967300", "overflows"}});
  row("WithDModel2To40", [](MlaConfig& c) { c.d_model = k2To40; }, {},
      {kName, "w_dq", {"8 x " + text(k2To40)}});
  // A RoPE table of 2^39 doubles would be needed, but w_uq cannot match first.
  row("WithRopeDim2To40", [](MlaConfig& c) { c.rope_dim = k2To40; }, {},
      {kName, "w_uq", {text(2 * (8 + k2To40)) + " x 8"}});
}

void add_tpa_constructor_rows(std::vector<Row>& rows) {
  for (const bool kv_only : {false, true}) {
    const char* kName = kv_only ? "TensorProductAttentionKvOnly" : "TensorProductAttention";
    const std::string prefix = kv_only ? "TpaKvOnly" : "Tpa";
    const auto row = [&](const std::string& what, std::function<void(TpaConfig&)> config,
                         std::function<void(TpaWeights&)> weights, Expect expect) {
      TpaConfig c = tpa_config(kv_only ? 0 : 2);
      TpaWeights w = tpa_weights();
      if (config) config(c);
      if (weights) weights(w);
      add(rows, prefix + what, {},
          kv_only ? construct<TensorProductAttentionKvOnly<float>>(c, w)
                  : construct<TensorProductAttention<float>>(c, w),
          std::move(expect));
    };
    row("WithDModelZero", [](TpaConfig& c) { c.d_model = 0; }, {},
        {kName, "d_model", {">= 1", "0"}});
    row("WithHeadsZero", [](TpaConfig& c) { c.heads = 0; }, {}, {kName, "heads", {">= 1", "0"}});
    row("WithHeadDimZero", [](TpaConfig& c) { c.head_dim = 0; }, {},
        {kName, "head_dim", {">= 1", "0"}});
    row("WithNegativeValueDim", [](TpaConfig& c) { c.value_dim = -4; }, {},
        {kName, "value_dim", {">= 1", "-4"}});
    row("WithRankKZero", [](TpaConfig& c) { c.rank_k = 0; }, {}, {kName, "rank_k", {">= 1", "0"}});
    row("WithRankVZero", [](TpaConfig& c) { c.rank_v = 0; }, {}, {kName, "rank_v", {">= 1", "0"}});
    row("WithOrder99", [](TpaConfig& c) { c.order = static_cast<TpaOrder>(99); }, {},
        {kName, "order", {"automatic, factor or query", "99"}});
    row("WithWBKOfTheWrongShape", {}, [](TpaWeights& w) { w.w_b_k = pattern(16, 17, 1); },
        {kName, "w_b_k", {"16 x 16", "16 x 17"}});
    row("WithWOOfTheWrongShape", {}, [](TpaWeights& w) { w.w_o = pattern(kDModel, 31, 1); },
        {kName, "w_o", {"16 x 32", "16 x 31"}});
    row("WithAnOddRotaryDim", [](TpaConfig& c) { c.rope.rotary_dim = 5; }, {},
        {kName, "rope.rotary_dim", {"an even number", "5"}});
    row("WithRopeBaseHalf", [](TpaConfig& c) { c.rope.base = 0.5; }, {},
        {kName, "rope.base", {"> 1", "0.5"}});
    row("WithRopeBaseInfinite",
        [](TpaConfig& c) { c.rope.base = std::numeric_limits<double>::infinity(); }, {},
        {kName, "rope.base", {"finite", "inf"}});
    row("WithRopePairing99", [](TpaConfig& c) { c.rope.pairing = static_cast<RopePairing>(99); },
        {}, {kName, "rope.pairing", {"99"}});
    row("WithRopeDirection99",
        [](TpaConfig& c) { c.rope.direction = static_cast<RopeDirection>(99); }, {},
        {kName, "rope.direction", {"99"}});
    // h = d_h = 2^32: h d_h = 2^64.
    row("With2To32HeadsAndHeadDim", [](TpaConfig& c) { c.heads = c.head_dim = k2To32; }, {},
        {kName, "heads x head_dim", {"4294967296 x 4294967296", "overflows"}});
    row("WithDModel2To40", [](TpaConfig& c) { c.d_model = k2To40; }, {},
        {kName, kv_only ? "w_q" : "w_a_q", {text(k2To40)}});
    if (kv_only) {
      row("WithRankQTwo", [](TpaConfig& c) { c.rank_q = 2; }, {},
          {kName, "rank_q", {"0 (the query is not factorised)", "2"}});
      row("WithWQOfTheWrongShape", {}, [](TpaWeights& w) { w.w_q = pattern(31, kDModel, 1); },
          {kName, "w_q", {"32 x 16", "31 x 16"}});
      row("WithTheFactorOrder", [](TpaConfig& c) { c.order = TpaOrder::factor; }, {},
          {kName, "order", {"query or automatic", "factor"}});
      row("WithHeadDim2To40", [](TpaConfig& c) { c.head_dim = k2To40; }, {},
          {kName, "w_q", {text(4 * k2To40) + " x 16"}});
    } else {
      row("WithNegativeRankQ", [](TpaConfig& c) { c.rank_q = -1; }, {},
          {kName, "rank_q", {">= 0", "-1"}});
      row("WithWAQOfTheWrongShape", {}, [](TpaWeights& w) { w.w_a_q = pattern(9, kDModel, 1); },
          {kName, "w_a_q", {"8 x 16", "9 x 16"}});
      row("WithRankQZeroAndTheFactorOrder",
          [](TpaConfig& c) {
            c.rank_q = 0;
            c.order = TpaOrder::factor;
          },
          {}, {kName, "order", {"query or automatic", "factor"}});
      // A RoPE table of 2^39 doubles would be needed, but w_b_q cannot match first.
      row("WithHeadDim2To40", [](TpaConfig& c) { c.head_dim = k2To40; }, {},
          {kName, "w_b_q", {text(2 * k2To40) + " x 16"}});
    }
  }
}

void add_rope_rows(std::vector<Row>& rows) {
  const auto rope = [](std::function<void(RopeConfig&)> change, Index width) {
    RopeConfig config;
    change(config);
    return [config, width](World&) { Rope built(config, width); };
  };
  add(rows, "RopeWithAnOddRotaryDim", {}, rope([](RopeConfig& c) { c.rotary_dim = 3; }, 8),
      {"Rope", "rope.rotary_dim", {"an even number", "3"}});
  add(rows, "RopeOfWidthZero", {}, rope([](RopeConfig&) {}, 0),
      {"Rope", "rope.rotary_dim", {"in [1, 0]", "0"}});
  add(rows, "RopeWithBaseBelowOne", {}, rope([](RopeConfig& c) { c.base = 0.5; }, 8),
      {"Rope", "rope.base", {"> 1", "0.5"}});
  add(rows, "RopeWithBaseNaN", {}, rope([](RopeConfig& c) { c.base = std::nan(""); }, 8),
      {"Rope", "rope.base", {"nan"}});
  add(rows, "RopeWithBaseInfinite", {},
      rope([](RopeConfig& c) { c.base = std::numeric_limits<double>::infinity(); }, 8),
      {"Rope", "rope.base", {"finite", "inf"}});
  add(rows, "RopeWithPairing99", {},
      rope([](RopeConfig& c) { c.pairing = static_cast<RopePairing>(99); }, 8),
      {"Rope", "rope.pairing", {"half_split or interleaved", "99"}});
  add(rows, "RopeWithDirection99", {},
      rope([](RopeConfig& c) { c.direction = static_cast<RopeDirection>(99); }, 8),
      {"Rope", "rope.direction", {"standard or reversed", "99"}});
  // 2^39 pairs: a table of 4 TiB, representable and impossible.
  add(rows, "RopeOfWidth2To40", {}, rope([](RopeConfig&) {}, k2To40),
      {"Rope", "rope table", {"std::bad_alloc"}}, Layer::gqa, false, true);
}

// ---- the catalogue: bare kernels ----------------------------------------------------------------

void add_kernel_rows(std::vector<Row>& rows) {
  // Constructors.
  const auto gqa = [](Index h, Index g, Index dh, Index dv) {
    return [=](World&) { GqaKernel<float> kernel(h, g, dh, dv); };
  };
  const auto mla = [](Index h, Index dc, Index dr, float scale) {
    return [=](World&) { MlaKernel<float> kernel(h, dc, dr, scale); };
  };
  const auto tpa = [](TpaShape shape) { return [=](World&) { TpaKernel<float> kernel(shape); }; };
  add(rows, "GqaKernelWithHeadsZero", {}, gqa(0, 2, 8, 8), {"GqaKernel", "heads", {">= 1", "0"}});
  add(rows, "GqaKernelWithKvHeadsZero", {}, gqa(4, 0, 8, 8),
      {"GqaKernel", "kv_heads", {">= 1", "0"}});
  add(rows, "GqaKernelWithKvHeadsNotADivisorOfHeads", {}, gqa(4, 3, 8, 8),
      {"GqaKernel", "kv_heads", {"a divisor of heads = 4", "3"}});
  add(rows, "GqaKernelWithNegativeHeadDim", {}, gqa(4, 2, -1, 8),
      {"GqaKernel", "head_dim", {">= 1", "-1"}});
  add(rows, "GqaKernelWithValueDimZero", {}, gqa(4, 2, 8, 0),
      {"GqaKernel", "value_dim", {">= 1", "0"}});
  add(rows, "GqaKernelWith2To32HeadsKvHeadsAndHeadDim", {}, gqa(k2To32, k2To32, k2To32, 8),
      {"GqaKernel", "kv_heads x head_dim", {"4294967296 x 4294967296", "overflows"}});
  add(rows, "MlaKernelWithHeadsZero", {}, mla(0, 8, 4, 0.25f),
      {"MlaKernel", "heads", {">= 1", "0"}});
  add(rows, "MlaKernelWithKvLatentDimZero", {}, mla(2, 0, 4, 0.25f),
      {"MlaKernel", "kv_latent_dim", {">= 1", "0"}});
  add(rows, "MlaKernelWithRopeDimZero", {}, mla(2, 8, 0, 0.25f),
      {"MlaKernel", "rope_dim", {">= 1", "0"}});
  add(rows, "MlaKernelWithScaleZero", {}, mla(2, 8, 4, 0.0f),
      {"MlaKernel", "scale", {"a finite value > 0", "0"}});
  add(rows, "MlaKernelWithANegativeScale", {}, mla(2, 8, 4, -0.25f),
      {"MlaKernel", "scale", {"a finite value > 0", "-0.25"}});
  add(rows, "MlaKernelWithScaleNaN", {}, mla(2, 8, 4, std::nanf("")),
      {"MlaKernel", "scale", {"a finite value > 0", "nan"}});
  add(rows, "MlaKernelWithScaleInfinite", {}, mla(2, 8, 4, std::numeric_limits<float>::infinity()),
      {"MlaKernel", "scale", {"a finite value > 0", "inf"}});
  add(rows, "MlaKernelWith2To62LatentAndRopeDims", {}, mla(2, k2To62, k2To62, 0.25f),
      {"MlaKernel", "kv_latent_dim + rope_dim", {"overflows"}});
  add(rows, "TpaKernelWithHeadsZero", {}, tpa({0, 8, 8, 2, 2, 2}),
      {"TpaKernel", "heads", {">= 1", "0"}});
  add(rows, "TpaKernelWithHeadDimZero", {}, tpa({4, 0, 8, 2, 2, 2}),
      {"TpaKernel", "head_dim", {">= 1", "0"}});
  add(rows, "TpaKernelWithValueDimZero", {}, tpa({4, 8, 0, 2, 2, 2}),
      {"TpaKernel", "value_dim", {">= 1", "0"}});
  add(rows, "TpaKernelWithNegativeRankQ", {}, tpa({4, 8, 8, -1, 2, 2}),
      {"TpaKernel", "rank_q", {">= 0", "-1"}});
  add(rows, "TpaKernelWithRankKZero", {}, tpa({4, 8, 8, 2, 0, 2}),
      {"TpaKernel", "rank_k", {">= 1", "0"}});
  add(rows, "TpaKernelWithRankVZero", {}, tpa({4, 8, 8, 2, 2, 0}),
      {"TpaKernel", "rank_v", {">= 1", "0"}});
  add(rows, "TpaKernelWith2To32HeadsAndRanks", {}, tpa({k2To32, 8, 8, 2, k2To32, 2}),
      {"TpaKernel", "rank_k x heads", {"4294967296 x 4294967296", "overflows"}});

  // attend. Each kernel's own view is of sequence a (8 tokens) of its layer's cache.
  enum class K { gqa, mla, tpa_factored, tpa_materialised };
  struct KernelName {
    K kernel;
    const char* prefix;
    const char* call;
    Layer slot;
    const char* query;           // the query pointer's name
    std::string other_fragment;  // what a view of another operator's cache must show
  };
  const KernelName kernels[] = {
      {K::gqa, "GqaKernel", "GqaKernel::attend", Layer::gqa, "q", "latent"},
      {K::mla, "MlaKernel", "MlaKernel::attend", Layer::mla, "q", "planes"},
      {K::tpa_factored, "TpaKernelFactored", "TpaKernel::attend", Layer::tpa, "a_q", "planes"},
      {K::tpa_materialised, "TpaKernelMaterialised", "TpaKernel::attend", Layer::tpa, "q",
       "planes"},
  };
  struct Args {
    const float* query;
    Index n;
    float* out;
    float* workspace;
  };
  const auto attend = [](K kernel, World& w, const SequenceView& view, Args args) {
    switch (kernel) {
      case K::gqa:
        return w.gqa_kernel.attend(args.query, args.n, view, args.out, w.lse(), args.workspace);
      case K::mla:
        return w.mla_kernel.attend(args.query, args.n, view, args.out, w.lse(), args.workspace);
      case K::tpa_factored:
        return w.tpa_kernel.attend(args.query, w.floats(), args.n, view, args.out, w.lse(),
                                   args.workspace);
      case K::tpa_materialised:
        return w.tpa_kernel.attend(args.query, args.n, view, args.out, w.lse(), args.workspace);
    }
  };
  for (const KernelName& k : kernels) {
    const std::string call = k.call;
    const Layer slot = k.slot;
    const K kernel = k.kernel;
    const auto with = [=](std::function<SequenceView(World&)> view,
                          std::function<Args(World&)> args) {
      return [=](World& w) { attend(kernel, w, view(w), args(w)); };
    };
    const auto own_view = [slot](World& w) { return w.slot(slot).cache->view(w.slot(slot).a); };
    const auto args_n = [](Index n) {
      return [n](World& w) { return Args{w.floats(), n, w.out(), w.workspace()}; };
    };
    const auto row = [&](const std::string& what, std::function<void(World&)> f, Expect e,
                         std::function<void(World&)> setup = {}) {
      add(rows, std::string(k.prefix) + what, std::move(setup), std::move(f), std::move(e), slot);
    };
    row("AttendAnEmptyView", with([](World&) { return SequenceView(); }, args_n(1)),
        {call, "view", {"an empty view"}});
    const Layer other = slot == Layer::gqa   ? Layer::mla
                        : slot == Layer::mla ? Layer::tpa
                                             : Layer::gqa;
    row("AttendAViewOfAnotherOperatorsCache",
        with([other](World& w) { return w.slot(other).cache->view(w.slot(other).a); }, args_n(1)),
        {call, "view", {k.other_fragment}});
    row("AttendAViewWhosePlaneStorageDiffers",
        with([](World& w) { return w.added().cache->view(w.added().a); }, args_n(1)),
        {call, "view", {"storage", "bf16"}}, [slot](World& w) {
          const CacheRecord& own = w.record(slot);
          w.add_cache(with_plane(own, own.plane_count() - 1,
                                 [](PlaneSpec& p) { p.storage = StorageType::bf16; }));
        });
    row("AttendZeroTokens", with(own_view, args_n(0)),
        {call, "n", {"in [1, view.length() = 8]", "0"}});
    row("AttendNegativeTokens", with(own_view, args_n(-1)),
        {call, "n", {"in [1, view.length() = 8]", "-1"}});
    row("AttendMoreTokensThanTheView", with(own_view, args_n(9)),
        {call, "n", {"in [1, view.length() = 8]", "9"}});
    row("AttendAHugeTokenCount", with(own_view, args_n(k2To62)),
        {call, "n", {"in [1, view.length() = 8]", text(k2To62)}});
    row("AttendOneTokenOfAnEmptySequence",
        with([slot](World& w) { return w.slot(slot).cache->view(w.slot(slot).c); }, args_n(1)),
        {call, "n", {"in [1, view.length() = 0]", "1"}});
    row("AttendMoreTokensThanAPrefixHolds",
        with([own_view](World& w) { return own_view(w).prefix(3); }, args_n(4)),
        {call, "n", {"in [1, view.length() = 3]", "4"}});
    row("AttendANullQuery",
        with(own_view,
             [](World& w) {
               return Args{nullptr, 1, w.out(), w.workspace()};
             }),
        {call, k.query, {"non-null", "null"}});
    row("AttendANullOut",
        with(own_view,
             [](World& w) {
               return Args{w.floats(), 1, nullptr, w.workspace()};
             }),
        {call, "out", {"non-null", "null"}});
    row("AttendANullWorkspace",
        with(own_view,
             [](World& w) {
               return Args{w.floats(), 1, w.out(), nullptr};
             }),
        {call, "workspace", {"non-null", "null"}});
  }
  const auto tpa_view = [](World& w) { return w.tpa().cache->view(w.tpa().a); };
  add(
      rows, "TpaKernelFactoredAttendANullBQ", {},
      [tpa_view](World& w) {
        w.tpa_kernel.attend(w.floats(), nullptr, 1, tpa_view(w), w.out(), w.lse(), w.workspace());
      },
      {"TpaKernel::attend", "b_q", {"non-null", "null"}}, Layer::tpa);
  add(
      rows, "TpaKernelFactoredAttendOnAKernelWithoutQueryRank", {},
      [tpa_view](World& w) {
        w.tpa_kv_only_kernel.attend(w.floats(), w.floats(), 1, tpa_view(w), w.out(), w.lse(),
                                    w.workspace());
      },
      {"TpaKernel::attend", "a_q, b_q", {"rank_q >= 1", "rank_q = 0"}}, Layer::tpa);
  add(
      rows, "TpaKernelFactoredAttendInOrder99", {},
      [tpa_view](World& w) {
        w.tpa_kernel.attend(w.floats(), w.floats(), 1, tpa_view(w), w.out(), w.lse(), w.workspace(),
                            static_cast<TpaOrder>(99));
      },
      {"TpaKernel::attend", "order", {"automatic, factor or query", "99"}}, Layer::tpa);
}

// ---- the table ----------------------------------------------------------------------------------

const std::vector<Row>& catalogue() {
  static const std::vector<Row> rows = [] {
    std::vector<Row> all;
    add_record_rows(all);
    add_cache_constructor_rows(all);
    add_cache_method_rows(all);
    for (const LayerName& layer : kLayers) add_layer_rows(all, layer);
    add_gqa_constructor_rows(all);
    add_mla_constructor_rows(all);
    add_tpa_constructor_rows(all);
    add_rope_rows(all);
    add_kernel_rows(all);
    return all;
  }();
  return rows;
}

struct Case {
  std::size_t row;
  CacheKind kind;
};

void PrintTo(const Case& c, std::ostream* out) {
  *out << name_of(c.kind) << " " << catalogue()[c.row].name;
}

std::vector<Case> cases() {
#if defined(TPATTN_TEST_SANITIZED)
  const bool sanitized = true;
#else
  const bool sanitized = false;
#endif
  std::vector<Case> all;
  for (std::size_t r = 0; r < catalogue().size(); ++r)
    for (CacheKind kind : {CacheKind::contiguous, CacheKind::paged, CacheKind::capped_paged})
      if ((!catalogue()[r].paged_only || kind != CacheKind::contiguous) &&
          (!sanitized || !catalogue()[r].refused_allocation))
        all.push_back({r, kind});
  return all;
}

class HostileInput : public ::testing::TestWithParam<Case> {};

TEST_P(HostileInput, ThrowsTheNamedErrorAndLeavesEveryCacheAsItWas) {
  const Row& row = catalogue()[GetParam().row];
  World world(GetParam().kind);
  if (row.setup) {
    ASSERT_NO_THROW(row.setup(world)) << "the row's setup failed";
  }
  Expect expect = row.expect;
  for (std::string& fragment : expect.fragments) fragment = expand(fragment, world.slot(row.slot));
  const std::vector<CacheState> before = world.state();
  EXPECT_TRUE(throws_error([&] { row.call(world); }, expect));
  const std::vector<CacheState> after = world.state();
  ASSERT_EQ(before.size(), after.size());
  for (std::size_t c = 0; c < before.size(); ++c)
    EXPECT_TRUE(same_state(world.cache_name(c), before[c], after[c]));
}

INSTANTIATE_TEST_SUITE_P(Catalogue, HostileInput, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(name_of(info.param.kind)) + "_" +
                                  catalogue()[info.param.row].name;
                         });

TEST(HostileInputCatalogue, RowNamesAreUnique) {
  std::vector<std::string> names;
  for (const Row& row : catalogue()) names.push_back(row.name);
  std::sort(names.begin(), names.end());
  EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
}

// contains() is the one sequence query that answers rather than throws for a bad id.
TEST(HostileInputCatalogue, ContainsAnswersFalseForEveryIdThatIsNotLive) {
  for (CacheKind kind : {CacheKind::contiguous, CacheKind::paged, CacheKind::capped_paged}) {
    World world(kind);
    Slot& s = world.gqa();
    const std::vector<CacheState> before = world.state();
    for (SequenceId id : {s.removed, SequenceId(-1), SequenceId(kMaxSequences), k2To62,
                          std::numeric_limits<SequenceId>::min(), kIndexMax})
      EXPECT_FALSE(s.cache->contains(id)) << name_of(kind) << " id " << id;
    EXPECT_TRUE(same_state("GQA", before[0], world.state()[0]));
  }
}

}  // namespace
}  // namespace tpattn::test
