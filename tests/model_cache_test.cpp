// tests/model_cache_test.cpp -- a model's cache: one PagedKvCache or ContiguousKvCache for all L
// layers of a model (built from a ModelRecord), whose layer(l) each layer's operator is given.
//
// What is checked: the conformance suite on layer(l) of a 3-layer cache (alone, and with the other
// layers, of other records, appending and truncating alongside it); that add/remove/truncate on
// the model act on every layer; the model's length while layers run ahead; byte accounting summed
// over layers; one page-table entry per block for all layers; all or nothing on a full pool; and
// that a stack of 3 GQA layers gives the same outputs through one 3-layer cache as through three
// separate caches.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cache_conformance.hpp"
#include "support/counting_new.hpp"  // this executable's one copy of the counting operator new
#include "support/reference.hpp"
#include "tpattn/attention/gqa.hpp"
#include "tpattn/cache.hpp"

namespace tpattn::test {
namespace {

constexpr Index kLayers = 3;

// ---- the conformance suite on one layer of a model's cache ------------------------------------

// The record of the layers around the one under test in a busy model: another layout (two
// planes, mixed storage, so blocks are padded between layers) than any the suite makes.
CacheRecord neighbour_record() {
  return CacheRecord({{"latent", 1, 3, StorageType::f32}, {"scale", 1, 1, StorageType::bf16}});
}

// A layer of a model's cache as a KvCache that owns the model, which the suite's factory must
// return. Every call goes to the layer. With neighbours, every append to the layer is followed
// by as many tokens appended to each neighbour layer, and every truncate by the same cut there,
// as a forward pass and its rollback would do: the layer's tokens, room and bytes must stay its
// own while every layer writes into the same blocks.
class LayerOfModel final : public KvCache {
 public:
  LayerOfModel(std::unique_ptr<KvCache> model, KvCache& layer, std::vector<KvCache*> neighbours,
               Index max_tokens)
      : KvCache(layer.record()),
        model_(std::move(model)),
        layer_(layer),
        neighbours_(std::move(neighbours)) {
    Index widest = 1;
    for (KvCache* neighbour : neighbours_)
      for (const PlaneSpec& plane : neighbour->record().planes())
        widest = std::max(widest, plane.elements_per_token());
    filler_.assign(static_cast<std::size_t>(max_tokens * widest), 0.625f);
    for (KvCache* neighbour : neighbours_) {
      std::vector<PlaneInput> inputs;
      for (const PlaneSpec& plane : neighbour->record().planes())
        inputs.push_back({filler_.data(), plane.rows, plane.cols});
      inputs_.push_back(std::move(inputs));
    }
  }

  SequenceId add_sequence() override { return layer_.add_sequence(); }
  void remove_sequence(SequenceId seq) override { layer_.remove_sequence(seq); }
  bool contains(SequenceId seq) const override { return layer_.contains(seq); }
  Index sequence_count() const override { return layer_.sequence_count(); }
  Index max_sequences() const override { return layer_.max_sequences(); }
  Index length(SequenceId seq) const override { return layer_.length(seq); }
  void append(SequenceId seq, Index n_tokens, const PlaneInput* planes,
              Index plane_count) override {
    layer_.append(seq, n_tokens, planes, plane_count);  // a refused append changes nothing
    for (std::size_t i = 0; i < neighbours_.size(); ++i)
      neighbours_[i]->append(seq, n_tokens, inputs_[i].data(),
                             static_cast<Index>(inputs_[i].size()));
  }
  using KvCache::append;
  void truncate(SequenceId seq, Index new_length) override {
    layer_.truncate(seq, new_length);
    for (KvCache* neighbour : neighbours_) neighbour->truncate(seq, new_length);
  }
  Index tokens_available(SequenceId seq) const override { return layer_.tokens_available(seq); }
  SequenceView view(SequenceId seq) const override { return layer_.view(seq); }
  Index bytes_used() const override { return layer_.bytes_used(); }
  Index bytes_reserved() const override { return layer_.bytes_reserved(); }

 private:
  std::unique_ptr<KvCache> model_;
  KvCache& layer_;
  std::vector<KvCache*> neighbours_;
  std::vector<float> filler_;
  std::vector<std::vector<PlaneInput>> inputs_;
};

enum class Kind { paged, contiguous };

// Layer `Layer` of a 3-layer cache of `kind`. Quiet: every layer holds the suite's record and
// only the one under test is used. Busy: the other layers hold neighbour_record() and follow
// every append and truncate. Paged: pages of 7 tokens, enough for every sequence to reach
// `capacity` at once.
template <class T, Kind kind, Index Layer, bool Busy>
struct ModelLayerFactory {
  using Storage = T;
  static constexpr Index block_tokens = 7;
  static std::unique_ptr<KvCache> make(const CacheRecord& record, Index max_sequences,
                                       Index capacity) {
    std::vector<CacheRecord> layers(kLayers, Busy ? neighbour_record() : record);
    layers[Layer] = record;
    ModelRecord model(std::move(layers));
    if (kind == Kind::paged) {
      const Index pages_per_sequence = capacity > 0 ? (capacity + 6) / 7 : 0;
      return wrap(std::make_unique<PagedKvCache>(std::move(model), 7,
                                                 max_sequences * pages_per_sequence, max_sequences),
                  max_sequences * (capacity + 7));
    }
    return wrap(std::make_unique<ContiguousKvCache>(std::move(model), max_sequences, capacity),
                max_sequences * (capacity + 7));
  }

  template <class Cache>
  static std::unique_ptr<KvCache> wrap(std::unique_ptr<Cache> cache, Index max_tokens) {
    std::vector<KvCache*> neighbours;
    if (Busy)
      for (Index l = 0; l < kLayers; ++l)
        if (l != Layer) neighbours.push_back(&cache->layer(l));
    KvCache& layer = cache->layer(Layer);
    return std::make_unique<LayerOfModel>(std::move(cache), layer, std::move(neighbours),
                                          max_tokens);
  }
};

struct FactoryName {
  template <class Factory>
  static std::string GetName(int index) {
    return std::string(name_of(storage_type_of<typename Factory::Storage>)) + "_" +
           std::to_string(index);
  }
};

using QuietPagedLayers = ::testing::Types<ModelLayerFactory<float, Kind::paged, 0, false>,
                                          ModelLayerFactory<Eigen::bfloat16, Kind::paged, 1, false>,
                                          ModelLayerFactory<Eigen::half, Kind::paged, 2, false>>;
using BusyPagedLayers = ::testing::Types<ModelLayerFactory<float, Kind::paged, 1, true>,
                                         ModelLayerFactory<Eigen::bfloat16, Kind::paged, 0, true>,
                                         ModelLayerFactory<Eigen::half, Kind::paged, 2, true>>;
using ContiguousLayers =
    ::testing::Types<ModelLayerFactory<float, Kind::contiguous, 2, false>,
                     ModelLayerFactory<Eigen::bfloat16, Kind::contiguous, 1, true>>;

}  // namespace

INSTANTIATE_TYPED_TEST_SUITE_P(QuietModelPagedLayer, KvCacheConformance, QuietPagedLayers,
                               FactoryName);
INSTANTIATE_TYPED_TEST_SUITE_P(BusyModelPagedLayer, KvCacheConformance, BusyPagedLayers,
                               FactoryName);
INSTANTIATE_TYPED_TEST_SUITE_P(ModelContiguousLayer, KvCacheConformance, ContiguousLayers,
                               FactoryName);

namespace {

// ---- ModelRecord -------------------------------------------------------------------------------

TEST(ModelRecord, PrefixesEachLayersPlanesWithTheLayer) {
  const CacheRecord gqa = records::gqa(2, 4, 3, StorageType::bf16);
  const ModelRecord model(gqa, 3);
  EXPECT_EQ(model.layer_count(), 3);
  ASSERT_EQ(model.combined().plane_count(), 6);
  const char* names[] = {"layer0.K", "layer0.V", "layer1.K", "layer1.V", "layer2.K", "layer2.V"};
  for (Index p = 0; p < 6; ++p) {
    EXPECT_EQ(model.combined().plane(p).name, names[p]);
    EXPECT_EQ(model.combined().plane(p).rows, 2);
    EXPECT_EQ(model.combined().plane(p).cols, p % 2 == 0 ? 4 : 3);
    EXPECT_EQ(model.combined().plane(p).storage, StorageType::bf16);
  }
  for (Index l = 0; l <= 3; ++l) EXPECT_EQ(model.first_plane(l), 2 * l);
  for (Index l = 0; l < 3; ++l) EXPECT_TRUE(model.layer(l) == gqa);
  EXPECT_EQ(model.bytes_per_token(), 3 * gqa.bytes_per_token());
}

TEST(ModelRecord, OneLayerIsItsRecordAsItIs) {
  const CacheRecord mla = records::mla(8, 4);
  EXPECT_TRUE(ModelRecord(mla, 1).combined() == mla);
  EXPECT_TRUE(ModelRecord(std::vector<CacheRecord>{mla}).combined() == mla);
}

TEST(ModelRecord, LayersMayHoldDifferentRecords) {
  const CacheRecord gqa = records::gqa(1, 4, 4);
  const CacheRecord tpa = records::tpa(2, 4, 4, 1, 1, StorageType::f16);
  const ModelRecord model({gqa, tpa, gqa});
  EXPECT_EQ(model.layer_count(), 3);
  EXPECT_EQ(model.first_plane(1), 2);
  EXPECT_EQ(model.first_plane(2), 6);
  EXPECT_EQ(model.first_plane(3), 8);
  EXPECT_EQ(model.combined().plane(3).name, "layer1.B_K");
  EXPECT_EQ(model.combined().plane(6).name, "layer2.K");
  EXPECT_TRUE(model.layer(1) == tpa);
  EXPECT_EQ(model.bytes_per_token(), 2 * gqa.bytes_per_token() + tpa.bytes_per_token());
}

TEST(ModelRecord, RejectsNoLayersEmptyRecordsAndSizesThatOverflow) {
  const CacheRecord gqa = records::gqa(1, 4, 4);  // 32 bytes per token
  EXPECT_TRUE(
      throws_error([&] { ModelRecord model(gqa, 0); }, {"ModelRecord", "layers", ">= 1", "0"}));
  EXPECT_TRUE(
      throws_error([&] { ModelRecord model(gqa, -2); }, {"ModelRecord", "layers", ">= 1", "-2"}));
  EXPECT_TRUE(throws_error([&] { ModelRecord model(CacheRecord(), 4); },
                           {"ModelRecord", "record", "at least one plane", "0"}));
  EXPECT_TRUE(throws_error([&] { ModelRecord model(std::vector<CacheRecord>{}); },
                           {"ModelRecord", "layers", "at least one layer", "0"}));
  EXPECT_TRUE(throws_error(
      [&] {
        ModelRecord model({gqa, CacheRecord()});
      },
      {"ModelRecord", "record", "at least one plane (in layers[1])", "0"}));
  const Index layers = Index(1) << 59;  // x 32 bytes = 2^64
  EXPECT_TRUE(throws_error([&] { ModelRecord model(gqa, layers); },
                           {"ModelRecord", "layers",
                            "a layer count whose bytes per token (layers x 32) fit in a 64-bit "
                            "signed integer",
                            std::to_string(layers) + " x 32 overflows"}));
  const CacheRecord huge({{"K", Index(1) << 31, Index(1) << 30, StorageType::bf16}});  // 2^62
  EXPECT_TRUE(throws_error(
      [&] {
        ModelRecord model({huge, huge});
      },
      {"ModelRecord", "layers",
       "bytes per token, summed over the layers, that fit in a 64-bit signed integer",
       "a sum that overflows at layers[1]"}));
  EXPECT_TRUE(throws_error([&] { (void)ModelRecord(gqa, 2).layer(2); },
                           {"ModelRecord::layer", "l", "in [0, 2)", "2"}));
}

// A count of layers whose planes no vector can hold is an Error before anything is allocated.
TEST(ModelRecord, AModelOfMorePlanesThanMemoryIsAnErrorBeforeAllocating) {
  ASSERT_TRUE(AllocationCounter::installed());
  const CacheRecord one({{"x", 1, 1, StorageType::bf16}});  // 2 bytes per token
  const Index layers = Index(1) << 61;                      // 2^62 bytes: fits an Index
  std::uint64_t bytes = 0;
  std::string what;
  {
    const AllocationCounter counter;
    try {
      ModelRecord model(one, layers);
    } catch (const Error& error) {
      bytes = counter.bytes();
      what = error.what();
    }
  }
  EXPECT_NE(what.find("tpattn: ModelRecord: layers: expected a model of at most"),
            std::string::npos)
      << what;
  EXPECT_LT(bytes, 4096u) << "only the error's message may be allocated";
}

// ---- the model's cache -------------------------------------------------------------------------

std::vector<float> random_floats(Index n, std::mt19937& rng) {
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::vector<float> out(static_cast<std::size_t>(n));
  for (float& x : out) x = value(rng);
  return out;
}

// Appends n random tokens to layer `layer` of `seq`, in the cache and in that layer's model.
void append_to_layer(PagedKvCache& cache, std::vector<ReferenceCache>& models, Index layer,
                     SequenceId seq, Index n, std::mt19937& rng) {
  KvCache& target = cache.layer(layer);
  TokenBatch batch(target.record(), n, rng);
  target.append(seq, n, batch.inputs(), batch.plane_count());
  models[static_cast<std::size_t>(layer)].append(seq, batch, 0, n);
}

// Every layer holds its model's tokens, and counts its own bytes.
template <class Cache>  // PagedKvCache or ContiguousKvCache
::testing::AssertionResult layers_hold(const Cache& cache,
                                       const std::vector<ReferenceCache>& models) {
  for (Index l = 0; l < cache.layer_count(); ++l) {
    ::testing::AssertionResult held =
        holds_all(cache.layer(l), models[static_cast<std::size_t>(l)]);
    if (!held) return held << " (layer " << l << ")";
  }
  return ::testing::AssertionSuccess();
}

std::vector<ReferenceCache> layer_models(const ModelRecord& model) {
  std::vector<ReferenceCache> models;
  for (Index l = 0; l < model.layer_count(); ++l) models.emplace_back(model.layer(l));
  return models;
}

TEST(ModelCache, AddRemoveAndTruncateOnTheModelActOnEveryLayer) {
  std::mt19937 rng(1);
  const ModelRecord record(records::gqa(2, 3, 5), kLayers);
  PagedKvCache cache(record, 4, 30, 3);
  std::vector<ReferenceCache> models = layer_models(record);
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  for (ReferenceCache& model : models) {
    model.add(a);
    model.add(b);
  }
  for (Index l = 0; l < kLayers; ++l) {
    EXPECT_TRUE(cache.layer(l).contains(a) && cache.layer(l).contains(b)) << "layer " << l;
    EXPECT_EQ(cache.layer(l).sequence_count(), 2);
    EXPECT_EQ(cache.layer(l).max_sequences(), 3);
    append_to_layer(cache, models, l, a, 11, rng);
    append_to_layer(cache, models, l, b, 6, rng);
  }
  EXPECT_TRUE(layers_hold(cache, models));
  EXPECT_EQ(cache.length(a), 11);

  cache.truncate(a, 5);  // every layer
  for (ReferenceCache& model : models) model.truncate(a, 5);
  EXPECT_EQ(cache.length(a), 5);
  EXPECT_TRUE(layers_hold(cache, models));

  cache.remove_sequence(b);  // from every layer
  for (ReferenceCache& model : models) model.remove(b);
  for (Index l = 0; l < kLayers; ++l) {
    EXPECT_FALSE(cache.layer(l).contains(b)) << "layer " << l;
    EXPECT_EQ(cache.layer(l).sequence_count(), 1);
  }
  EXPECT_TRUE(layers_hold(cache, models));

  // A sequence added through a layer's cache is the model's, live in every layer.
  const SequenceId c = cache.layer(2).add_sequence();
  for (ReferenceCache& model : models) model.add(c);
  EXPECT_TRUE(cache.contains(c));
  for (Index l = 0; l < kLayers; ++l) EXPECT_TRUE(cache.layer(l).contains(c));
  append_to_layer(cache, models, 1, c, 3, rng);
  cache.layer(0).remove_sequence(c);
  for (ReferenceCache& model : models) model.remove(c);
  EXPECT_FALSE(cache.contains(c));
  EXPECT_TRUE(layers_hold(cache, models));
}

// A forward pass appends layer by layer, so for a while the first layers hold one step more than
// the rest: the model's length is what every layer holds, and its truncate rolls the layers that
// ran ahead back to it.
TEST(ModelCache, TheModelsLengthIsWhatEveryLayerHolds) {
  std::mt19937 rng(2);
  const ModelRecord record(records::gqa(1, 4, 4), kLayers);
  PagedKvCache cache(record, 4, 12, 2);
  std::vector<ReferenceCache> models = layer_models(record);
  const SequenceId seq = cache.add_sequence();
  for (ReferenceCache& model : models) model.add(seq);
  for (Index l = 0; l < kLayers; ++l) append_to_layer(cache, models, l, seq, 7, rng);
  EXPECT_EQ(cache.length(seq), 7);
  EXPECT_EQ(cache.view(seq).length(), 7);
  const Index room = cache.tokens_available(seq);
  EXPECT_EQ(room, 12 * 4 - 7);

  append_to_layer(cache, models, 0, seq, 2, rng);  // layer 0 has run ahead
  append_to_layer(cache, models, 1, seq, 2, rng);
  EXPECT_EQ(cache.length(seq), 7);
  EXPECT_EQ(cache.layer(0).length(seq), 9);
  EXPECT_EQ(cache.layer(2).length(seq), 7);
  EXPECT_EQ(cache.view(seq).length(), 7);
  EXPECT_EQ(cache.tokens_available(seq), room - 2);  // what every layer can still take
  EXPECT_EQ(cache.layer(2).tokens_available(seq), room);
  EXPECT_EQ(cache.layer(0).tokens_available(seq), room - 2);
  EXPECT_TRUE(layers_hold(cache, models));

  // The model's append continues every layer at one position: not while a pass is in progress.
  TokenBatch batch(record.combined(), 1, rng);
  EXPECT_TRUE(rejects(cache, {seq}, [&] { cache.append(seq, 1, batch.inputs(), 6); },
                      {"PagedKvCache::append", "seq",
                       "every layer holding the same tokens (append to the model between "
                       "forward passes, or to each layer's cache during one)",
                       "layers holding 7 to 9 tokens"}));

  // Roll the unfinished pass back; the truncate may not reach past what every layer holds.
  EXPECT_TRUE(rejects(cache, {seq}, [&] { cache.truncate(seq, 8); },
                      {"PagedKvCache::truncate", "new_length", "in [0, 7]", "8"}));
  cache.truncate(seq, cache.length(seq));
  for (ReferenceCache& model : models) model.truncate(seq, 7);
  for (Index l = 0; l < kLayers; ++l) EXPECT_EQ(cache.layer(l).length(seq), 7);
  EXPECT_TRUE(layers_hold(cache, models));

  // Between passes the model appends all layers at once, planes of every layer in record order.
  std::vector<TokenBatch> per_layer;
  std::vector<PlaneInput> planes;
  for (Index l = 0; l < kLayers; ++l) per_layer.emplace_back(record.layer(l), 1, rng);
  for (Index l = 0; l < kLayers; ++l) {
    const PlaneInput* inputs = per_layer[static_cast<std::size_t>(l)].inputs();
    planes.insert(planes.end(), inputs, inputs + 2);
    models[static_cast<std::size_t>(l)].append(seq, per_layer[static_cast<std::size_t>(l)], 0, 1);
  }
  cache.append(seq, 1, planes.data(), static_cast<Index>(planes.size()));
  EXPECT_EQ(cache.length(seq), 8);
  EXPECT_TRUE(layers_hold(cache, models));
}

// The model's view: every layer's planes, under their combined names, the same tokens as the
// layers' own views.
TEST(ModelCache, TheModelsViewHoldsEveryLayersPlanes) {
  std::mt19937 rng(3);
  const ModelRecord record({records::gqa(1, 2, 3), records::mla(5, 2, StorageType::bf16)});
  PagedKvCache cache(record, 3, 10, 1);
  const SequenceId seq = cache.add_sequence();
  for (Index l = 0; l < 2; ++l) {
    TokenBatch batch(record.layer(l), 8, rng);
    cache.layer(l).append(seq, 8, batch.inputs(), batch.plane_count());
  }
  const SequenceView whole = cache.view(seq);
  EXPECT_TRUE(whole.record() == record.combined());
  PlaneData all;
  ASSERT_TRUE(read_view(whole, record.combined(), &all));
  for (Index l = 0; l < 2; ++l) {
    PlaneData mine;
    ASSERT_TRUE(read_view(cache.layer(l).view(seq), record.layer(l), &mine));
    for (Index p = 0; p < 2; ++p)
      EXPECT_EQ(all[static_cast<std::size_t>(record.first_plane(l) + p)],
                mine[static_cast<std::size_t>(p)])
          << "layer " << l << " plane " << p;
  }
  EXPECT_EQ(whole.record().plane(3).name, "layer1.rope_key");
}

// Bytes: each layer counts its own tokens and its share of each block; the model, their sums.
TEST(ModelCache, BytesAreSummedOverLayers) {
  std::mt19937 rng(4);
  // Per-layer records of different sizes and storage types, so shares and padding differ.
  const ModelRecord record({records::gqa(2, 3, 5), records::mla(5, 3, StorageType::f16),
                            CacheRecord({{"s", 1, 1, StorageType::bf16}})});
  PagedKvCache cache(record, 5, 9, 3);
  std::vector<ReferenceCache> models = layer_models(record);
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  for (ReferenceCache& model : models) {
    model.add(a);
    model.add(b);
  }
  append_to_layer(cache, models, 0, a, 7, rng);
  append_to_layer(cache, models, 1, a, 6, rng);
  append_to_layer(cache, models, 2, a, 7, rng);
  append_to_layer(cache, models, 0, b, 3, rng);
  EXPECT_TRUE(layers_hold(cache, models));
  Index used = 0, reserved = 0;
  for (Index l = 0; l < kLayers; ++l) {
    used += cache.layer(l).bytes_used();
    reserved += cache.layer(l).bytes_reserved();
  }
  EXPECT_EQ(cache.layer(0).bytes_used(), 10 * 64);
  EXPECT_EQ(cache.layer(1).bytes_used(), 6 * 16);
  EXPECT_EQ(cache.layer(2).bytes_used(), 7 * 2);
  EXPECT_EQ(cache.bytes_used(), used);
  EXPECT_EQ(cache.bytes_reserved(), reserved);
  EXPECT_EQ(cache.bytes_reserved(), 9 * cache.page_bytes());
  // A page: 5 tokens of layer 0 (320 bytes), of layer 1 (80), of layer 2 (10), padded to 4.
  EXPECT_EQ(cache.page_bytes(), 320 + 80 + 12);
  EXPECT_EQ(cache.layer(2).bytes_reserved(), 9 * 12);
  EXPECT_EQ(cache.bytes_in_pages(), (2 + 1) * cache.page_bytes());
  const CacheFootprint planned = PagedKvCache::footprint(record, 5, 9, 3);
  EXPECT_EQ(planned.bytes_reserved, cache.bytes_reserved());
  EXPECT_EQ(planned.table_bytes, cache.table_bytes());
  const ContiguousKvCache contiguous(record, 2, 10);
  EXPECT_EQ(ContiguousKvCache::footprint(record, 2, 10).bytes_reserved,
            contiguous.bytes_reserved());
  EXPECT_EQ(contiguous.bytes_reserved(), 2 * (640 + 160 + 20));
}

// One page table per sequence serves every layer: a page holds a block of every layer, the
// first layer to reach a block takes its page, and the page goes back when the last layer
// drops below it.
TEST(ModelCache, OnePageTableEntryPerBlockServesEveryLayer) {
  std::mt19937 rng(5);
  const CacheRecord gqa = records::gqa(2, 4, 4, StorageType::bf16);
  const ModelRecord record(gqa, kLayers);
  PagedKvCache cache(record, 4, 10, 2);
  const PagedKvCache one_layer(gqa, 4, 10, 2);
  EXPECT_EQ(cache.table_bytes(), one_layer.table_bytes());
  EXPECT_EQ(PagedKvCache::footprint(record, 4, 10, 2, 9).table_bytes,
            PagedKvCache::footprint(gqa, 4, 10, 2, 9).table_bytes);
  EXPECT_EQ(cache.page_bytes(), kLayers * one_layer.page_bytes());

  std::vector<ReferenceCache> models = layer_models(record);
  const SequenceId seq = cache.add_sequence();
  for (ReferenceCache& model : models) model.add(seq);
  append_to_layer(cache, models, 0, seq, 5, rng);  // blocks 0 and 1
  EXPECT_EQ(cache.free_page_count(), 8);
  append_to_layer(cache, models, 1, seq, 5, rng);  // the same two pages
  append_to_layer(cache, models, 2, seq, 3, rng);
  EXPECT_EQ(cache.free_page_count(), 8);
  append_to_layer(cache, models, 2, seq, 6, rng);  // layer 2 reaches block 2 first
  EXPECT_EQ(cache.free_page_count(), 7);
  // Every layer's view walks the same pages, each in its own part of them.
  const SequenceView v0 = cache.layer(0).view(seq);
  const SequenceView v2 = cache.layer(2).view(seq);
  for (Index b = 0; b < v0.block_count(); ++b)
    EXPECT_EQ(reinterpret_cast<const std::byte*>(v2.plane_block<Eigen::bfloat16>(0, b)) -
                  reinterpret_cast<const std::byte*>(v0.plane_block<Eigen::bfloat16>(0, b)),
              2 * one_layer.page_bytes());
  EXPECT_TRUE(layers_hold(cache, models));

  cache.layer(2).truncate(seq, 4);  // layers 0 and 1 still reach block 1
  models[2].truncate(seq, 4);
  EXPECT_EQ(cache.free_page_count(), 8);
  cache.layer(0).truncate(seq, 4);
  models[0].truncate(seq, 4);
  EXPECT_EQ(cache.free_page_count(), 8);
  cache.layer(1).truncate(seq, 2);  // the last layer in block 1 leaves it
  models[1].truncate(seq, 2);
  EXPECT_EQ(cache.free_page_count(), 9);
  EXPECT_TRUE(layers_hold(cache, models));
  cache.remove_sequence(seq);
  EXPECT_EQ(cache.free_page_count(), 10);
  EXPECT_EQ(cache.bytes_used(), 0);
}

TEST(ModelCache, ALayerOutsideTheModelIsRejected) {
  PagedKvCache cache(ModelRecord(records::mla(4, 2), kLayers), 4, 4, 1);
  const PagedKvCache& constant = cache;
  for (Index l : {Index(-1), kLayers, Index(1) << 40}) {
    EXPECT_TRUE(throws_error(
        [&] { (void)cache.layer(l); },
        {"PagedKvCache::layer", "l", "in [0, 3) (the cache's layers)", std::to_string(l)}));
    EXPECT_TRUE(throws_error(
        [&] { (void)constant.layer(l); },
        {"PagedKvCache::layer", "l", "in [0, 3) (the cache's layers)", std::to_string(l)}));
  }
  ContiguousKvCache contiguous(records::mla(4, 2), 1, 4);
  EXPECT_EQ(contiguous.layer_count(), 1);
  EXPECT_TRUE(
      throws_error([&] { (void)contiguous.layer(1); },
                   {"ContiguousKvCache::layer", "l", "in [0, 1) (the cache's layers)", "1"}));
}

// A one-layer model's cache is the cache of its record: layer(0) is the cache itself.
TEST(ModelCache, OneLayersCacheIsTheCacheItself) {
  const CacheRecord record = records::gqa(1, 4, 4);
  PagedKvCache cache(ModelRecord(record, 1), 4, 4, 1);
  EXPECT_EQ(cache.layer_count(), 1);
  EXPECT_EQ(&cache.layer(0), &cache);
  EXPECT_TRUE(cache.record() == record);
  PagedKvCache plain(record, 4, 4, 1);
  EXPECT_EQ(&plain.layer(0), &plain);
}

// Errors from a layer's cache name the layer.
TEST(ModelCache, ALayersErrorsNameTheLayer) {
  PagedKvCache cache(ModelRecord(records::gqa(1, 4, 4), kLayers), 4, 2, 1);
  const SequenceId seq = cache.add_sequence();
  std::mt19937 rng(6);
  TokenBatch batch(cache.layer(1).record(), 9, rng);
  EXPECT_TRUE(throws_error([&] { cache.layer(1).append(seq, 9, batch.inputs(), 2); },
                           {"PagedKvCache[layer 1]::append", "n_tokens", "<= 8", "9"}));
  EXPECT_TRUE(throws_error(
      [&] { (void)cache.layer(2).length(seq + 1); },
      {"PagedKvCache[layer 2]::length", "seq", "a live sequence id", std::to_string(seq + 1)}));
  // An operator given the model instead of a layer refuses it: the records differ.
  GqaConfig config;
  config.d_model = 8;
  config.heads = 2;
  config.kv_heads = 1;
  config.head_dim = 4;
  GroupedQueryAttention<float> op(config, tpattn_test::random_gqa_weights(config, 2));
  ASSERT_TRUE(op.cache_record() == cache.layer(0).record());
  const std::vector<float> x(8, 0.5f);
  std::vector<float> y(8);
  EXPECT_TRUE(throws_error(
      [&] { op.decode(cache, &seq, 1, x.data(), y.data()); },
      {"GroupedQueryAttention::decode", "cache",
       "a cache built with this operator's cache_record() (2 planes (K, V))",
       "a cache with another record (6 planes (layer0.K, layer0.V, layer1.K, layer1.V, layer2.K, "
       "layer2.V))"}));
  op.decode(cache.layer(0), &seq, 1, x.data(), y.data());
  EXPECT_EQ(cache.layer(0).length(seq), 1);
}

// All or nothing on a full pool: a refused append writes no layer; an operator's batch that runs
// out of pages in its first layer is rolled back; and once the first layer of a pass has its
// pages, the later layers of that pass need none.
TEST(ModelCache, AFullPoolRefusesAllOrNothing) {
  std::mt19937 rng(7);
  const CacheRecord gqa = records::gqa(1, 4, 4);
  const ModelRecord record(gqa, kLayers);
  PagedKvCache cache(record, 4, 3, 2);
  std::vector<ReferenceCache> models = layer_models(record);
  const SequenceId a = cache.add_sequence();
  const SequenceId b = cache.add_sequence();
  for (ReferenceCache& model : models) {
    model.add(a);
    model.add(b);
  }
  for (Index l = 0; l < kLayers; ++l) {
    append_to_layer(cache, models, l, a, 4, rng);  // one full page each
    append_to_layer(cache, models, l, b, 4, rng);
  }
  ASSERT_EQ(cache.free_page_count(), 1);
  const std::vector<SequenceId> live = {a, b};
  TokenBatch big(record.combined(), 9, rng);
  for (Index l = 0; l < kLayers; ++l) {
    KvCache& layer = cache.layer(l);
    EXPECT_TRUE(rejects(layer, live, [&] { layer.append(a, 5, big.inputs(), 2); },
                        {"append", "n_tokens", "<= 4", "5"}));
  }
  EXPECT_TRUE(rejects(cache, live, [&] { cache.append(b, 5, big.inputs(), 6); },
                      {"PagedKvCache::append", "n_tokens", "<= 4", "5"}));
  EXPECT_EQ(cache.free_page_count(), 1);
  EXPECT_TRUE(layers_hold(cache, models));

  // Decode one token of a and b in layer 0: both need a new page, one is left.
  GqaConfig config;
  config.d_model = 8;
  config.heads = 2;
  config.kv_heads = 1;
  config.head_dim = 4;
  GroupedQueryAttention<float> op(config, tpattn_test::random_gqa_weights(config, 3));
  ASSERT_TRUE(op.cache_record() == gqa);
  const std::vector<float> x(16, 0.25f);
  std::vector<float> y(16);
  const SequenceId both[] = {a, b};
  EXPECT_THROW(op.decode(cache.layer(0), both, 2, x.data(), y.data()), Error);
  EXPECT_EQ(cache.free_page_count(), 1);
  EXPECT_TRUE(layers_hold(cache, models));

  // One sequence: layer 0 takes the last page, and layers 1 and 2 write into it.
  for (Index l = 0; l < kLayers; ++l) {
    op.decode(cache.layer(l), &a, 1, x.data(), y.data());
    EXPECT_EQ(cache.free_page_count(), 0) << "after layer " << l;
  }
  EXPECT_EQ(cache.length(a), 5);
  EXPECT_EQ(cache.tokens_available(a), 3);
  EXPECT_EQ(cache.tokens_available(b), 0);
}

// Appends, views, truncates and lengths through a layer's cache allocate nothing, as through a
// cache of one layer.
TEST(ModelCache, LayersAppendViewAndTruncateWithoutAllocating) {
  ASSERT_TRUE(AllocationCounter::installed());
  std::mt19937 rng(8);
  const ModelRecord record(records::tpa(3, 4, 5, 2, 1, StorageType::bf16), kLayers);
  PagedKvCache cache(record, 4, 20, 2);
  const SequenceId seq = cache.add_sequence();
  TokenBatch batch(record.layer(0), 9, rng);
  TokenBatch whole(record.combined(), 2, rng);
  float sink = 0.0f;
  std::uint64_t allocations = 1;
  {
    const AllocationCounter counter;
    for (Index l = 0; l < kLayers; ++l) {
      KvCache& layer = cache.layer(l);
      layer.append(seq, 9, batch.inputs(), batch.plane_count());
      layer.append(seq, 1, batch.inputs(), batch.plane_count());
      sink += sum_of_view(layer.view(seq)) + static_cast<float>(layer.length(seq));
      layer.truncate(seq, 6);
      sink += static_cast<float>(layer.tokens_available(seq) + layer.bytes_used());
    }
    cache.append(seq, 2, whole.inputs(), whole.plane_count());
    sink += sum_of_view(cache.view(seq)) + static_cast<float>(cache.length(seq));
    cache.truncate(seq, 3);
    cache.remove_sequence(seq);
    allocations = counter.allocations();
  }
  EXPECT_EQ(allocations, 0u);
  EXPECT_TRUE(std::isfinite(sink));
}

// ---- a stack of layers on one cache ----------------------------------------------------------

// x: [n, d] -> x + layer_l(x) for l = 0, 1, 2, each layer on its own cache: per_layer[l] (a
// layer of the model's cache, or a cache of its own), with ids[l] for the sequences.
struct Stack {
  std::vector<GroupedQueryAttention<float>> ops;
  Index d_model;
};

Stack make_stack() {
  GqaConfig config;
  config.d_model = 24;
  config.heads = 4;
  config.kv_heads = 2;
  config.head_dim = 6;
  Stack stack{{}, config.d_model};
  for (Index l = 0; l < kLayers; ++l)
    stack.ops.emplace_back(config,
                           tpattn_test::random_gqa_weights(config, 500 + static_cast<int>(l)));
  return stack;
}

// One step of the stack for a batch: kind 0 prefill (one sequence), 1 decode, 2 forward.
std::vector<float> run_stack(Stack& stack, const std::vector<KvCache*>& caches,
                             const std::vector<SequenceId>& seqs,
                             const std::vector<Index>& new_tokens, std::vector<float> x, int kind) {
  std::vector<float> y(x.size());
  for (Index l = 0; l < kLayers; ++l) {
    KvCache& cache = *caches[static_cast<std::size_t>(l)];
    GroupedQueryAttention<float>& op = stack.ops[static_cast<std::size_t>(l)];
    if (kind == 0) op.prefill(cache, seqs[0], new_tokens[0], x.data(), y.data());
    if (kind == 1)
      op.decode(cache, seqs.data(), static_cast<Index>(seqs.size()), x.data(), y.data());
    if (kind == 2)
      op.forward(cache, seqs.data(), new_tokens.data(), static_cast<Index>(seqs.size()), x.data(),
                 y.data());
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += y[i];  // the residual stream
  }
  return x;
}

TEST(ModelCache, AStackOfGqaLayersOnOneCacheEqualsOneCachePerLayer) {
  Stack stack = make_stack();
  const CacheRecord record = stack.ops[0].cache_record();
  const Index page = 4, pages = 40;
  PagedKvCache model(ModelRecord(record, kLayers), page, pages, 2);
  std::vector<std::unique_ptr<PagedKvCache>> separate;
  std::vector<KvCache*> model_layers, separate_layers;
  for (Index l = 0; l < kLayers; ++l) {
    separate.push_back(std::make_unique<PagedKvCache>(record, page, pages, 2));
    model_layers.push_back(&model.layer(l));
    separate_layers.push_back(separate.back().get());
  }
  // The same sequence ids in every separate cache (each hands out slots in the same order),
  // kept in step by hand as an engine without a model cache must.
  const SequenceId a = model.add_sequence(), b = model.add_sequence();
  for (auto& cache : separate) {
    ASSERT_EQ(cache->add_sequence(), a);
    ASSERT_EQ(cache->add_sequence(), b);
  }

  std::mt19937 rng(9);
  const auto step = [&](const std::vector<SequenceId>& seqs, const std::vector<Index>& n,
                        int kind) {
    Index rows = 0;
    for (Index count : n) rows += count;
    const std::vector<float> x = random_floats(rows * stack.d_model, rng);
    const std::vector<float> one = run_stack(stack, model_layers, seqs, n, x, kind);
    const std::vector<float> many = run_stack(stack, separate_layers, seqs, n, x, kind);
    ASSERT_EQ(one.size(), many.size());
    for (std::size_t i = 0; i < one.size(); ++i)
      ASSERT_TRUE(same_bits(one[i], many[i]))
          << "output " << i << ": one cache " << one[i] << ", one per layer " << many[i];
  };
  step({a}, {9}, 0);  // prefill across pages
  step({b}, {3}, 0);  // chunked prefill
  step({b}, {2}, 0);
  for (int t = 0; t < 6; ++t) step({a, b}, {1, 1}, 1);  // decode both
  step({b, a}, {3, 1}, 2);                              // a continuous-batching step
  EXPECT_EQ(model.length(a), 16);
  EXPECT_EQ(model.length(b), 14);

  Index separate_bytes = 0, separate_pages = 0;
  for (auto& cache : separate) {
    separate_bytes += cache->bytes_used();
    separate_pages += cache->page_count() - cache->free_page_count();
    EXPECT_EQ(cache->length(a), 16);
  }
  EXPECT_EQ(model.bytes_used(), separate_bytes);
  EXPECT_EQ(model.bytes_in_pages(), (4 + 4) * model.page_bytes());
  EXPECT_EQ(separate_pages, kLayers * (4 + 4));  // the same memory, one table instead of three

  // Rolling back the last token of a through the model: every layer at once.
  model.truncate(a, 15);
  for (auto& cache : separate) cache->truncate(a, 15);
  step({a}, {1}, 1);
}

}  // namespace
}  // namespace tpattn::test
