// tests/any_attention_test.cpp -- the operator chosen at run time (AnyAttention, make_attention,
// parse_attention_spec) is the layer class chosen at compile time.
//
// Every family x storage: the runtime object and the layer class built directly from the same
// config and weights give the same bits, output for output and cached byte for cached byte,
// over prefills, batched decode steps and a threaded continuous-batching step. The configs set
// fields away from their defaults (value_dim, partial and interleaved or reversed RoPE, a
// sliding window, TPA's order), and a second test shows that the comparison sees a change of
// storage or window, so a factory that dropped a field would fail. Then: parsing (every error
// kind), wrong family/config/weights pairings, a failed call leaving the cache as it was, and a
// steady-state decode step through the interface allocating nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "support/check_capture.hpp"  // first: before Eigen and any tpattn header
#include "support/mla_reference.hpp"
#include "support/reference.hpp"
#include "support/storage_types.hpp"
#include "support/tpa_reference.hpp"
#include "tpattn/tpattn.hpp"

namespace tpattn::test {
namespace {

namespace ref = ::tpattn_test;

constexpr Index kModel = 32;

// ---- the specs --------------------------------------------------------------------------------

RopeConfig partial_interleaved_rope() {
  RopeConfig rope;
  rope.rotary_dim = 4;
  rope.base = 500.0;
  rope.pairing = RopePairing::interleaved;
  return rope;
}

// A spec of `family` with fields away from their defaults. mha and mqa leave kv_heads 0: the
// factory must force it.
AttentionSpec spec_of(AttentionFamily family, StorageType storage) {
  AttentionSpec spec;
  spec.family = family;
  spec.storage = storage;
  switch (family) {
    case AttentionFamily::mha:
    case AttentionFamily::mqa:
    case AttentionFamily::gqa: {
      GqaConfig config;
      config.d_model = kModel;
      config.heads = 4;
      config.kv_heads = family == AttentionFamily::gqa ? 2 : 0;
      config.head_dim = 8;
      config.value_dim = 6;
      config.rope = partial_interleaved_rope();
      config.window = 7;
      spec.config = config;
      break;
    }
    case AttentionFamily::mla: {
      MlaConfig config;
      config.d_model = kModel;
      config.heads = 3;
      config.head_dim = 8;
      config.rope_dim = 4;
      config.value_dim = 6;
      config.kv_latent_dim = 10;
      config.q_latent_dim = 12;
      config.rope = partial_interleaved_rope();
      config.window = 7;
      spec.config = config;
      break;
    }
    case AttentionFamily::tpa:
    case AttentionFamily::tpa_kvonly: {
      TpaConfig config;
      config.d_model = kModel;
      config.heads = 4;
      config.head_dim = 8;
      config.value_dim = 6;
      config.rank_q = family == AttentionFamily::tpa ? 3 : 0;
      config.rank_k = 2;
      config.rank_v = 1;
      config.rope.direction = RopeDirection::reversed;
      config.order = family == AttentionFamily::tpa ? TpaOrder::factor : TpaOrder::automatic;
      config.window = 7;
      spec.config = config;
      break;
    }
  }
  return spec;
}

AttentionWeights weights_of(const AttentionSpec& spec, std::uint32_t seed) {
  if (const auto* gqa = std::get_if<GqaConfig>(&spec.config)) {
    GqaConfig config = *gqa;
    if (spec.family == AttentionFamily::mha) config.kv_heads = config.heads;
    if (spec.family == AttentionFamily::mqa) config.kv_heads = 1;
    return ref::random_gqa_weights(config, seed);
  }
  if (const auto* mla = std::get_if<MlaConfig>(&spec.config))
    return ref::random_mla_weights(*mla, seed);
  return ref::random_tpa_weights(std::get<TpaConfig>(spec.config), seed);
}

// Calls f(layer) with the layer class the family names, over Storage, built directly.
template <class Storage, class F>
void with_layer(const AttentionSpec& spec, const AttentionWeights& weights, F&& f) {
  const auto build = [&](auto* tag, const auto& config, const auto& layer_weights) {
    using Layer = std::remove_pointer_t<decltype(tag)>;
    Layer layer(config, layer_weights);
    f(layer);
  };
  const auto* gqa = std::get_if<GqaConfig>(&spec.config);
  const auto* mla = std::get_if<MlaConfig>(&spec.config);
  const auto* tpa = std::get_if<TpaConfig>(&spec.config);
  switch (spec.family) {
    case AttentionFamily::mha:
      return build(static_cast<MultiHeadAttention<Storage>*>(nullptr), *gqa,
                   std::get<GqaWeights>(weights));
    case AttentionFamily::mqa:
      return build(static_cast<MultiQueryAttention<Storage>*>(nullptr), *gqa,
                   std::get<GqaWeights>(weights));
    case AttentionFamily::gqa:
      return build(static_cast<GroupedQueryAttention<Storage>*>(nullptr), *gqa,
                   std::get<GqaWeights>(weights));
    case AttentionFamily::mla:
      return build(static_cast<MultiHeadLatentAttention<Storage>*>(nullptr), *mla,
                   std::get<MlaWeights>(weights));
    case AttentionFamily::tpa:
      return build(static_cast<TensorProductAttention<Storage>*>(nullptr), *tpa,
                   std::get<TpaWeights>(weights));
    case AttentionFamily::tpa_kvonly:
      return build(static_cast<TensorProductAttentionKvOnly<Storage>*>(nullptr), *tpa,
                   std::get<TpaWeights>(weights));
  }
}

// ---- what a run leaves behind -----------------------------------------------------------------

using Bytes = std::vector<unsigned char>;

template <class T>
void append_bytes(Bytes& bytes, const T* data, Index count) {
  const auto* first = reinterpret_cast<const unsigned char*>(data);
  bytes.insert(bytes.end(), first, first + count * static_cast<Index>(sizeof(T)));
}

// Every cached element of `seq`, plane by plane, in its storage type.
Bytes sequence_bytes(const KvCache& cache, SequenceId seq) {
  Bytes bytes;
  const SequenceView view = cache.view(seq);
  for (Index p = 0; p < view.record().plane_count(); ++p)
    for (Index b = 0; b < view.block_count(); ++b)
      with_storage(view.record().plane(p).storage, [&](auto tag) {
        using T = decltype(tag);
        append_bytes(bytes, view.plane_block<T>(p, b),
                     view.tokens_in_block(b) * view.elements_per_token(p));
      });
  return bytes;
}

// What a failed call must not change.
struct CacheState {
  Index bytes_used = 0;
  Index free_pages = 0;
  std::vector<Index> lengths;
  std::vector<Bytes> contents;

  friend bool operator==(const CacheState& a, const CacheState& b) {
    return a.bytes_used == b.bytes_used && a.free_pages == b.free_pages && a.lengths == b.lengths &&
           a.contents == b.contents;
  }
};

CacheState state_of(const PagedKvCache& cache, const std::vector<SequenceId>& seqs) {
  CacheState state{cache.bytes_used(), cache.free_page_count(), {}, {}};
  for (SequenceId seq : seqs) {
    state.lengths.push_back(cache.length(seq));
    state.contents.push_back(sequence_bytes(cache, seq));
  }
  return state;
}

// The outputs of every call and the cache contents after them.
struct Trace {
  std::vector<Bytes> outputs;
  CacheState cache;
};

// On a paged cache of 8-token pages: prefills of 19 and 5 tokens, three batched decode steps,
// then a continuous-batching step of 3 + 1 tokens on two threads. Op is a layer class or
// AnyAttention: the calls are spelt the same.
template <class Op>
Trace run_steps(Op& op) {
  PagedKvCache cache(op.cache_record(), /*page_tokens=*/8, /*page_count=*/8, /*max_sequences=*/2);
  const std::vector<SequenceId> seqs = {cache.add_sequence(), cache.add_sequence()};
  const RowMatrix x = ref::random_inputs(34, kModel, 11);
  RowMatrix y(19, kModel);
  Trace trace;
  const auto keep = [&](Index rows) {
    append_bytes(trace.outputs.emplace_back(), y.data(), rows * kModel);
  };
  op.reserve(2, 19);
  op.prefill(cache, seqs[0], 19, x.row(0).data(), y.data());
  keep(19);
  op.prefill(cache, seqs[1], 5, x.row(19).data(), y.data());
  keep(5);
  for (Index step = 0; step < 3; ++step) {
    op.decode(cache, seqs.data(), 2, x.row(24 + 2 * step).data(), y.data());
    keep(2);
  }
  ThreadPool pool(2);
  const Index new_tokens[] = {3, 1};
  op.forward(cache, seqs.data(), new_tokens, 2, x.row(30).data(), y.data(), &pool);
  keep(4);
  trace.cache = state_of(cache, seqs);
  return trace;
}

Trace runtime_trace(const AttentionSpec& spec, const AttentionWeights& weights) {
  const std::unique_ptr<AnyAttention> op = make_attention(spec, weights);
  return run_steps(*op);
}

struct Case {
  AttentionFamily family;
  StorageType storage;
};

void PrintTo(const Case& c, std::ostream* out) { *out << c.family << " " << c.storage; }

std::vector<Case> every_family_and_storage() {
  std::vector<Case> cases;
  for (AttentionFamily family : kAllAttentionFamilies)
    for (StorageType storage : kAllStorage) cases.push_back({family, storage});
  return cases;
}

class AnyAttentionEveryFamily : public ::testing::TestWithParam<Case> {};

INSTANTIATE_TEST_SUITE_P(, AnyAttentionEveryFamily, ::testing::ValuesIn(every_family_and_storage()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(name_of(info.param.family)) + "_" +
                                  name_of(info.param.storage);
                         });

TEST_P(AnyAttentionEveryFamily, GivesTheLayerClassesOutputsAndCacheBitForBit) {
  const AttentionSpec spec = spec_of(GetParam().family, GetParam().storage);
  const AttentionWeights weights = weights_of(spec, 21);
  const std::unique_ptr<AnyAttention> runtime = make_attention(spec, weights);
  with_storage(spec.storage, [&](auto tag) {
    using S = decltype(tag);
    with_layer<S>(spec, weights, [&](auto& layer) {
      EXPECT_EQ(runtime->cache_record(), layer.cache_record());
      EXPECT_EQ(runtime->window(), layer.kernel().window());
      EXPECT_EQ(runtime->plan_shape(), layer.kernel().plan_shape());
      const Trace direct = run_steps(layer);
      const Trace through_interface = run_steps(*runtime);
      ASSERT_EQ(direct.outputs.size(), through_interface.outputs.size());
      for (std::size_t call = 0; call < direct.outputs.size(); ++call)
        EXPECT_TRUE(direct.outputs[call] == through_interface.outputs[call]) << "call " << call;
      EXPECT_TRUE(direct.cache == through_interface.cache) << "cache contents";
    });
  });
}

TEST_P(AnyAttentionEveryFamily, ReportsTheFamilyStorageAndShapeOfItsSpec) {
  const AttentionSpec spec = spec_of(GetParam().family, GetParam().storage);
  const std::unique_ptr<AnyAttention> op = make_attention(spec, weights_of(spec, 22));
  static const char* const names[] = {"MultiHeadAttention",     "MultiQueryAttention",
                                      "GroupedQueryAttention",  "MultiHeadLatentAttention",
                                      "TensorProductAttention", "TensorProductAttentionKvOnly"};
  EXPECT_EQ(op->family(), spec.family);
  EXPECT_EQ(op->storage(), spec.storage);
  EXPECT_STREQ(op->name(), names[static_cast<int>(spec.family)]);
  EXPECT_EQ(op->d_model(), kModel);
  EXPECT_EQ(op->window(), 7);
  for (const PlaneSpec& plane : op->cache_record().planes()) EXPECT_EQ(plane.storage, spec.storage);
}

// The bit-for-bit comparison can fail: a change of storage or of the window changes the trace.
TEST(AnyAttention, TheTraceSeesTheStorageAndTheWindow) {
  for (AttentionFamily family : kAllAttentionFamilies) {
    SCOPED_TRACE(name_of(family));
    const AttentionSpec spec = spec_of(family, StorageType::f32);
    const AttentionWeights weights = weights_of(spec, 23);
    const Trace base = runtime_trace(spec, weights);
    AttentionSpec bf16 = spec;
    bf16.storage = StorageType::bf16;
    EXPECT_FALSE(base.outputs == runtime_trace(bf16, weights).outputs);
    AttentionSpec unwindowed = spec;
    std::visit([](auto& config) { config.window = 0; }, unwindowed.config);
    EXPECT_FALSE(base.outputs == runtime_trace(unwindowed, weights).outputs);
  }
}

// mha and mqa force kv_heads from 0, and a spec giving the right value builds the same layer.
TEST(AnyAttention, MhaAndMqaSpecsForceTheirKvHeads) {
  for (AttentionFamily family : {AttentionFamily::mha, AttentionFamily::mqa}) {
    AttentionSpec spec = spec_of(family, StorageType::f32);
    const AttentionWeights weights = weights_of(spec, 24);
    const Index kv_heads = family == AttentionFamily::mha ? 4 : 1;
    EXPECT_EQ(make_attention(spec, weights)->cache_record(), records::gqa(kv_heads, 8, 6));
    std::get<GqaConfig>(spec.config).kv_heads = kv_heads;
    EXPECT_EQ(make_attention(spec, weights)->cache_record(), records::gqa(kv_heads, 8, 6));
  }
}

// ---- wrong pairings ---------------------------------------------------------------------------

TEST(MakeAttention, AConfigOfAnotherFamilyIsAnError) {
  AttentionSpec spec = spec_of(AttentionFamily::mla, StorageType::f32);
  spec.config = GqaConfig{};
  AttentionWeights weights = weights_of(spec_of(AttentionFamily::mla, StorageType::f32), 25);
  expect_error_before_allocating([&] { make_attention(spec, std::move(weights)); },
                                 "make_attention", "spec.config", "an MlaConfig (family mla)",
                                 "a GqaConfig");
  spec = spec_of(AttentionFamily::mqa, StorageType::f32);
  spec.config = TpaConfig{};
  expect_error_before_allocating([&] { make_attention(spec, GqaWeights{}); }, "make_attention",
                                 "spec.config", "a GqaConfig (family mqa)", "a TpaConfig");
}

TEST(MakeAttention, WeightsOfAnotherFamilyAreAnError) {
  const AttentionSpec spec = spec_of(AttentionFamily::mla, StorageType::bf16);
  AttentionWeights weights = weights_of(spec_of(AttentionFamily::tpa, StorageType::f32), 26);
  expect_error_before_allocating([&] { make_attention(spec, std::move(weights)); },
                                 "make_attention", "weights", "MlaWeights (family mla)",
                                 "TpaWeights");
  const AttentionSpec tpa = spec_of(AttentionFamily::tpa_kvonly, StorageType::f16);
  expect_error_before_allocating([&] { make_attention(tpa, GqaWeights{}); }, "make_attention",
                                 "weights", "TpaWeights (family tpa_kvonly)", "GqaWeights");
}

TEST(MakeAttention, AFamilyOrStorageOutsideItsEnumerationIsAnError) {
  AttentionSpec spec = spec_of(AttentionFamily::gqa, StorageType::f32);
  spec.family = static_cast<AttentionFamily>(99);
  expect_error_before_allocating([&] { make_attention(spec, GqaWeights{}); }, "make_attention",
                                 "spec.family", "one of mha, mqa, gqa, mla, tpa, tpa_kvonly", "99");
  spec.family = AttentionFamily::gqa;
  spec.storage = static_cast<StorageType>(7);
  expect_error_before_allocating([&] { make_attention(spec, GqaWeights{}); }, "make_attention",
                                 "spec.storage", "f32, bf16 or f16", "7");
}

// Each family holds its config to what it names: mha g = h, mqa g = 1, tpa R_Q >= 1,
// tpa_kvonly R_Q = 0; the layer's own check names the layer.
TEST(MakeAttention, AConfigThatContradictsItsFamilyIsAnError) {
  AttentionSpec mha = spec_of(AttentionFamily::mha, StorageType::f32);
  AttentionWeights mha_weights = weights_of(mha, 27);
  std::get<GqaConfig>(mha.config).kv_heads = 2;
  expect_error_before_allocating([&] { make_attention(mha, std::move(mha_weights)); },
                                 "MultiHeadAttention", "kv_heads", "heads = 4 (or 0)", "2");

  AttentionSpec mqa = spec_of(AttentionFamily::mqa, StorageType::bf16);
  AttentionWeights mqa_weights = weights_of(mqa, 28);
  std::get<GqaConfig>(mqa.config).kv_heads = 4;
  expect_error_before_allocating([&] { make_attention(mqa, std::move(mqa_weights)); },
                                 "MultiQueryAttention", "kv_heads", "1 (or 0)", "4");

  AttentionSpec tpa = spec_of(AttentionFamily::tpa, StorageType::f32);
  std::get<TpaConfig>(tpa.config).rank_q = 0;
  AttentionWeights tpa_weights = weights_of(tpa, 29);
  expect_error_before_allocating([&] { make_attention(tpa, std::move(tpa_weights)); },
                                 "make_attention", "spec.config.rank_q",
                                 ">= 1 for family tpa (rank_q = 0 is family tpa_kvonly)", "0");

  AttentionSpec kv_only = spec_of(AttentionFamily::tpa_kvonly, StorageType::f32);
  std::get<TpaConfig>(kv_only.config).rank_q = 2;
  AttentionWeights kv_only_weights = weights_of(kv_only, 30);
  expect_error_before_allocating([&] { make_attention(kv_only, std::move(kv_only_weights)); },
                                 "TensorProductAttentionKvOnly", "rank_q",
                                 "0 (the query is not factorised)", "2");
}

// ---- failed calls -----------------------------------------------------------------------------

// Two sequences of one full 4-token page each and one free page: a decode of both passes every
// check, the first append takes the last page, the second finds none, and the first is cut back.
TEST(AnyAttention, ADecodeThatRunsOutOfPagesMidBatchLeavesTheCacheAsItWas) {
  for (AttentionFamily family : kAllAttentionFamilies) {
    SCOPED_TRACE(name_of(family));
    const AttentionSpec spec = spec_of(family, StorageType::bf16);
    const std::unique_ptr<AnyAttention> op = make_attention(spec, weights_of(spec, 31));
    PagedKvCache cache(op->cache_record(), /*page_tokens=*/4, /*page_count=*/3, 2);
    const std::vector<SequenceId> seqs = {cache.add_sequence(), cache.add_sequence()};
    const RowMatrix x = ref::random_inputs(4, kModel, 32);
    RowMatrix y(4, kModel);
    for (SequenceId seq : seqs) op->prefill(cache, seq, 4, x.data(), y.data());
    const CacheState before = state_of(cache, seqs);
    const Thrown thrown =
        thrown_error([&] { op->decode(cache, seqs.data(), 2, x.data(), y.data()); });
    EXPECT_EQ(thrown.call, std::string(op->name()) + "::decode");
    EXPECT_EQ(thrown.argument, "cache");
    EXPECT_TRUE(state_of(cache, seqs) == before);
    op->decode(cache, seqs.data(), 1, x.data(), y.data());  // still usable: one page is free
    EXPECT_EQ(cache.length(seqs[0]), 5);
  }
}

// Explicit RoPE positions (with gaps and a repeat) on prefill, decode and forward: the
// interface passes them to the layer, which gives other bits than with the cached lengths.
template <class Op>
Trace run_with_positions(Op& op, bool explicit_positions) {
  PagedKvCache cache(op.cache_record(), 4, 8, 2);
  const std::vector<SequenceId> seqs = {cache.add_sequence(), cache.add_sequence()};
  const RowMatrix x = ref::random_inputs(12, kModel, 38);
  RowMatrix y(5, kModel);
  Trace trace;
  const auto keep = [&](Index rows) {
    append_bytes(trace.outputs.emplace_back(), y.data(), rows * kModel);
  };
  const Index prefill_positions[] = {3, 5, 6, 6, 11};
  const Index decode_positions[] = {40, 2};
  const Index forward_positions[] = {41, 42, 9};
  const auto pick = [&](const Index* positions) {
    return explicit_positions ? positions : nullptr;
  };
  op.prefill(cache, seqs[0], 5, x.data(), y.data(), nullptr, pick(prefill_positions));
  keep(5);
  op.prefill(cache, seqs[1], 2, x.row(5).data(), y.data(), nullptr, pick(prefill_positions));
  keep(2);
  op.decode(cache, seqs.data(), 2, x.row(7).data(), y.data(), nullptr, pick(decode_positions));
  keep(2);
  const Index new_tokens[] = {2, 1};
  op.forward(cache, seqs.data(), new_tokens, 2, x.row(9).data(), y.data(), nullptr,
             pick(forward_positions));
  keep(3);
  trace.cache = state_of(cache, seqs);
  return trace;
}

TEST(AnyAttention, PassesExplicitPositionsToTheLayer) {
  for (AttentionFamily family : kAllAttentionFamilies) {
    SCOPED_TRACE(name_of(family));
    const AttentionSpec spec = spec_of(family, StorageType::f32);
    const AttentionWeights weights = weights_of(spec, 33);
    const std::unique_ptr<AnyAttention> runtime = make_attention(spec, weights);
    with_layer<float>(spec, weights, [&](auto& layer) {
      const Trace direct = run_with_positions(layer, true);
      const Trace through_interface = run_with_positions(*runtime, true);
      EXPECT_TRUE(direct.outputs == through_interface.outputs);
      EXPECT_TRUE(direct.cache == through_interface.cache);
      EXPECT_FALSE(direct.outputs == run_with_positions(layer, false).outputs);
    });
  }
}

// A negative position is the layer's Error, under its name, before anything changes.
TEST(AnyAttention, ARefusedPositionLeavesTheCacheAsItWas) {
  const AttentionSpec spec = spec_of(AttentionFamily::tpa, StorageType::f32);
  const std::unique_ptr<AnyAttention> op = make_attention(spec, weights_of(spec, 34));
  PagedKvCache cache(op->cache_record(), 4, 4, 1);
  const std::vector<SequenceId> seqs = {cache.add_sequence()};
  const RowMatrix x = ref::random_inputs(3, kModel, 35);
  RowMatrix y(3, kModel);
  op->prefill(cache, seqs[0], 2, x.data(), y.data());
  const CacheState before = state_of(cache, seqs);
  const Index positions[] = {7, -1, 9};
  const Thrown thrown =
      thrown_error([&] { op->prefill(cache, seqs[0], 3, x.data(), y.data(), nullptr, positions); });
  EXPECT_EQ(thrown.message,
            "tpattn: TensorProductAttention::prefill: positions: expected >= 0 for every new "
            "token, got positions[1] = -1");
  EXPECT_TRUE(state_of(cache, seqs) == before);
}

// ---- allocation -------------------------------------------------------------------------------

// After reserve, 17 decode steps of two sequences (crossing a page end) through the interface
// allocate nothing, in any family.
TEST(AnyAttention, SteadyStateDecodeThroughTheInterfaceAllocatesNothing) {
  ASSERT_TRUE(AllocationCounter::installed());
  for (AttentionFamily family : kAllAttentionFamilies) {
    SCOPED_TRACE(name_of(family));
    const AttentionSpec spec = spec_of(family, StorageType::bf16);
    const std::unique_ptr<AnyAttention> op = make_attention(spec, weights_of(spec, 35));
    PagedKvCache cache(op->cache_record(), 16, 8, 2);
    const std::vector<SequenceId> seqs = {cache.add_sequence(), cache.add_sequence()};
    const RowMatrix x = ref::random_inputs(9, kModel, 36);
    RowMatrix y(9, kModel);
    op->prefill(cache, seqs[0], 9, x.data(), y.data());
    op->prefill(cache, seqs[1], 3, x.data(), y.data());
    op->reserve(2);
    HeapAllocations total;
    for (int step = 0; step < 17; ++step)
      total +=
          count_heap_allocations([&] { op->decode(cache, seqs.data(), 2, x.data(), y.data()); });
    EXPECT_EQ(total.by_new, 0u);
    EXPECT_EQ(total.by_eigen, 0);
  }
}

// ---- parsing ----------------------------------------------------------------------------------

// f() throws exactly "tpattn: <call>: <argument>: expected <expected>, got <actual>". (Parsing
// builds its map as it reads, so unlike a constructor it may allocate before a check fails.)
void expect_error(const std::function<void()>& f, const std::string& call,
                  const std::string& argument, const std::string& expected,
                  const std::string& actual) {
  const Thrown thrown = thrown_error(f);
  EXPECT_EQ(thrown.kind, "tpattn::Error");
  EXPECT_EQ(thrown.call, call);
  EXPECT_EQ(thrown.argument, argument);
  EXPECT_EQ(thrown.message,
            "tpattn: " + call + ": " + argument + ": expected " + expected + ", got " + actual);
}

TEST(ParseAttentionFamily, ReadsEveryFamilyByItsName) {
  for (AttentionFamily family : kAllAttentionFamilies)
    EXPECT_EQ(parse_attention_family(name_of(family)), family);
  expect_error([] { parse_attention_family("TPA"); }, "parse_attention_family", "family",
               "one of mha, mqa, gqa, mla, tpa, tpa_kvonly", "'TPA'");
  EXPECT_THROW(parse_attention_family("tpa-kvonly"), Error);
  EXPECT_THROW(parse_attention_family(""), Error);
}

TEST(ParseStorageType, ReadsEveryStorageTypeByItsName) {
  for (StorageType storage : kAllStorage) EXPECT_EQ(parse_storage_type(name_of(storage)), storage);
  expect_error([] { parse_storage_type("fp16"); }, "parse_storage_type", "storage",
               "f32, bf16 or f16", "'fp16'");
}

TEST(ParseKeyValues, SkipsCommentsAndBlankLinesAndTrimsSpaces) {
  const auto values = parse_key_values(
      "# a comment\n"
      "\n"
      "  family =  tpa   # trailing comment\r\n"
      "heads=4\n"
      "\t rope.base = 1e4\t\n"
      "last = no newline at the end");
  const std::map<std::string, std::string> expected = {
      {"family", "tpa"}, {"heads", "4"}, {"rope.base", "1e4"}, {"last", "no newline at the end"}};
  EXPECT_EQ(values, expected);
}

TEST(ParseKeyValues, ALineWithoutKeyOrValueOrAKeyTwiceIsAnError) {
  expect_error([] { parse_key_values("heads = 4\nhead_dim 8\n"); }, "parse_key_values", "line 2",
               "key = value", "'head_dim 8'");
  EXPECT_THROW(parse_key_values("= 4"), Error);
  EXPECT_THROW(parse_key_values("heads =  # no value"), Error);
  const Thrown twice = thrown_error([] { parse_key_values("heads = 4\n\nheads = 8"); });
  EXPECT_EQ(twice.message,
            "tpattn: parse_key_values: heads: expected each key once, got lines 1 and 3");
}

TEST(ParseAttentionSpec, ReadsEveryKeyOfGqa) {
  const AttentionSpec spec = parse_attention_spec(
      "family = gqa\nstorage = bf16\nd_model = 32\nheads = 4\nkv_heads = 2\nhead_dim = 8\n"
      "value_dim = 6\nwindow = 7\nrope.enabled = true\nrope.rotary_dim = 4\nrope.base = 500\n"
      "rope.pairing = interleaved\nrope.direction = reversed\nrope.table = bf16\n");
  EXPECT_EQ(spec.family, AttentionFamily::gqa);
  EXPECT_EQ(spec.storage, StorageType::bf16);
  const GqaConfig& c = std::get<GqaConfig>(spec.config);
  EXPECT_EQ(c.d_model, 32);
  EXPECT_EQ(c.heads, 4);
  EXPECT_EQ(c.kv_heads, 2);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.value_dim, 6);
  EXPECT_EQ(c.window, 7);
  EXPECT_TRUE(c.rope.enabled);
  EXPECT_EQ(c.rope.rotary_dim, 4);
  EXPECT_EQ(c.rope.base, 500.0);
  EXPECT_EQ(c.rope.pairing, RopePairing::interleaved);
  EXPECT_EQ(c.rope.direction, RopeDirection::reversed);
  EXPECT_EQ(c.rope.table, RopeTable::bf16);
}

TEST(ParseAttentionSpec, ReadsEveryKeyOfMla) {
  const AttentionSpec spec = parse_attention_spec(
      "family = mla\nd_model = 32\nheads = 3\nhead_dim = 8\nrope_dim = 4\nvalue_dim = 6\n"
      "kv_latent_dim = 10\nq_latent_dim = 12\nnormalize_q_latent = false\n"
      "normalize_kv_latent = false\nnorm_eps = 1e-5\nrope.enabled = false\n");
  EXPECT_EQ(spec.storage, StorageType::f32);  // the default
  const MlaConfig& c = std::get<MlaConfig>(spec.config);
  EXPECT_EQ(c.rope_dim, 4);
  EXPECT_EQ(c.kv_latent_dim, 10);
  EXPECT_EQ(c.q_latent_dim, 12);
  EXPECT_FALSE(c.normalize_q_latent);
  EXPECT_FALSE(c.normalize_kv_latent);
  EXPECT_EQ(c.norm_eps, 1e-5f);
  EXPECT_FALSE(c.rope.enabled);
}

TEST(ParseAttentionSpec, ReadsEveryKeyOfTpaAndLeavesAbsentKeysAtTheirDefaults) {
  const AttentionSpec spec = parse_attention_spec(
      "family = tpa\nd_model = 32\nheads = 4\nhead_dim = 8\nrank_q = 3\nrank_k = 2\n"
      "rank_v = 1\norder = factor\n");
  const TpaConfig& c = std::get<TpaConfig>(spec.config);
  EXPECT_EQ(c.rank_q, 3);
  EXPECT_EQ(c.rank_k, 2);
  EXPECT_EQ(c.rank_v, 1);
  EXPECT_EQ(c.order, TpaOrder::factor);
  const TpaConfig defaults;
  EXPECT_EQ(c.value_dim, defaults.value_dim);
  EXPECT_EQ(c.window, defaults.window);
  EXPECT_EQ(c.rope.base, defaults.rope.base);
  EXPECT_EQ(c.rope.direction, defaults.rope.direction);
  const AttentionSpec kv_only = parse_attention_spec(
      "family = tpa_kvonly\nd_model = 32\nheads = 4\nhead_dim = 8\nrank_k = 2\nrank_v = 1\n");
  EXPECT_EQ(std::get<TpaConfig>(kv_only.config).rank_q, 0);
}

// A parsed spec builds the operator the hand-written spec builds, bit for bit.
TEST(ParseAttentionSpec, AParsedSpecBuildsTheSameOperatorAsTheHandWrittenOne) {
  const AttentionSpec parsed = parse_attention_spec(
      "family = mla\nstorage = f16\nd_model = 32\nheads = 3\nhead_dim = 8\nrope_dim = 4\n"
      "value_dim = 6\nkv_latent_dim = 10\nq_latent_dim = 12\nwindow = 7\nrope.rotary_dim = 4\n"
      "rope.base = 500\nrope.pairing = interleaved\n");
  const AttentionSpec written = spec_of(AttentionFamily::mla, StorageType::f16);
  const AttentionWeights weights = weights_of(written, 37);
  const Trace a = runtime_trace(parsed, weights);
  const Trace b = runtime_trace(written, weights);
  EXPECT_TRUE(a.outputs == b.outputs);
  EXPECT_TRUE(a.cache == b.cache);
}

// Each kind of mistake, with the message a runner's user would read.
TEST(ParseAttentionSpec, EveryKindOfMistakeIsAnErrorNamingTheKey) {
  const std::string gqa = "family = gqa\nd_model = 32\nheads = 4\nhead_dim = 8\n";
  struct Row {
    std::string text, argument, expected, actual;
  };
  const std::vector<Row> rows = {
      {"d_model = 32", "family", "one of mha, mqa, gqa, mla, tpa, tpa_kvonly", "none"},
      {"family = gpa", "family", "one of mha, mqa, gqa, mla, tpa, tpa_kvonly", "'gpa'"},
      {gqa + "kv_heads = 2\nstorage = fp8", "storage", "f32, bf16 or f16", "'fp8'"},
      {gqa, "kv_heads", "a value (required for family gqa)", "none"},
      {"family = tpa\nd_model = 32\nheads = 4\nhead_dim = 8\nrank_k = 1\nrank_v = 1", "rank_q",
       "a value (required for family tpa)", "none"},
      {"family = mla\nd_model = 32\nheads = 4\nhead_dim = 8\nkv_latent_dim = 16", "rope_dim",
       "a value (required for family mla)", "none"},
      {gqa + "kv_heads = 2x", "kv_heads", "a non-negative integer (at most 9223372036854775807)",
       "'2x'"},
      {gqa + "kv_heads = -2", "kv_heads", "a non-negative integer (at most 9223372036854775807)",
       "'-2'"},
      {gqa + "kv_heads = -0", "kv_heads", "a non-negative integer (at most 9223372036854775807)",
       "'-0'"},
      {gqa + "kv_heads = +2", "kv_heads", "a non-negative integer (at most 9223372036854775807)",
       "'+2'"},
      {gqa + "kv_heads = 99999999999999999999", "kv_heads",
       "a non-negative integer (at most 9223372036854775807)", "'99999999999999999999'"},
      {gqa + "kv_heads = 2\nrope.base = ten", "rope.base", "a number (e.g. 10000 or 1e-6)",
       "'ten'"},
      {gqa + "kv_heads = 2\nrope.enabled = yes", "rope.enabled", "true or false", "'yes'"},
      {gqa + "kv_heads = 2\nrope.pairing = neox", "rope.pairing", "half_split or interleaved",
       "'neox'"},
      {gqa + "kv_heads = 2\nrope.table = fp64", "rope.table", "fp32 or bf16", "'fp64'"},
      {"family = tpa\nd_model = 32\nheads = 4\nhead_dim = 8\nrank_q = 1\nrank_k = 1\n"
       "rank_v = 1\norder = fastest",
       "order", "automatic, factor or query", "'fastest'"},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.text);
    expect_error([&] { parse_attention_spec(row.text); }, "parse_attention_spec", row.argument,
                 row.expected, row.actual);
  }
}

TEST(ParseAttentionSpec, AKeyTheFamilyDoesNotHaveIsAnErrorListingItsKeys) {
  const Thrown thrown = thrown_error([] {
    parse_attention_spec("family = mha\nd_model = 32\nheads = 4\nhead_dim = 8\nrank_q = 2\n");
  });
  EXPECT_EQ(thrown.argument, "rank_q");
  EXPECT_EQ(
      thrown.message,
      "tpattn: parse_attention_spec: rank_q: expected one of the keys of family mha "
      "(family, storage, d_model, heads, head_dim, value_dim, window, rope.enabled, "
      "rope.rotary_dim, rope.base, rope.pairing, rope.direction, rope.table, kv_heads), got an "
      "unknown "
      "key");
  const Thrown typo = thrown_error([] {
    parse_attention_spec(std::map<std::string, std::string>{{"family", "gqa"}, {"head_dims", "8"}});
  });
  EXPECT_EQ(typo.argument, "head_dims");
}

}  // namespace
}  // namespace tpattn::test
