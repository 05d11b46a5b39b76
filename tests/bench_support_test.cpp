// The benchmark's own arithmetic: the named configurations have the cache sizes of
// docs/attention.md §5, the cost models count the multiply-adds of the order the kernel runs, and
// the memory-budget table agrees with a page count done by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "support/memory_budget.hpp"
#include "support/model_configs.hpp"

namespace {

using tpattn::Index;
using tpattn_bench::OperatorSpec;

const OperatorSpec& find(const std::string& config, const std::string& op) {
  for (const auto& c : tpattn_bench::model_configs())
    if (c.name == config)
      for (const OperatorSpec& o : c.operators)
        if (o.name == op) return o;
  throw std::runtime_error("no " + config + "/" + op);
}

Index elements(const std::string& config, const std::string& op) {
  return find(config, op).record(tpattn::StorageType::f32).elements_per_token();
}

TEST(BenchConfigs, PaperDecodeShapesCacheTheSpecsElementsPerToken) {
  EXPECT_EQ(elements("paper-d128", "MHA"), 8192);
  EXPECT_EQ(elements("paper-d128", "GQA-8"), 2048);
  EXPECT_EQ(elements("paper-d128", "GQA-4"), 1024);
  EXPECT_EQ(elements("paper-d128", "MQA"), 256);
  EXPECT_EQ(elements("paper-d128", "MLA"), 576);
  EXPECT_EQ(elements("paper-d128", "TPA-16-1-1"), 320);
  EXPECT_EQ(elements("paper-d128", "TPA-8-2-2"), 640);
  EXPECT_EQ(elements("deepseek-v2-lite", "MLA"), 576);
}

TEST(BenchConfigs, T6ModelsCacheThePapersElementsPerToken) {
  EXPECT_EQ(elements("t6-small", "MHA"), 1536);
  EXPECT_EQ(elements("t6-small", "GQA"), 256);
  EXPECT_EQ(elements("t6-small", "MLA"), 288);
  EXPECT_EQ(elements("t6-small", "TPA"), 392);
  EXPECT_EQ(elements("t6-medium", "MHA"), 2048);
  EXPECT_EQ(elements("t6-medium", "GQA"), 256);
  EXPECT_EQ(elements("t6-medium", "MLA"), 544);
  EXPECT_EQ(elements("t6-medium", "TPA"), 444);
}

TEST(BenchConfigs, CostModelsCountTheKernelsMultiplyAdds) {
  // GQA family: q.k and p.v per head.
  EXPECT_DOUBLE_EQ(find("paper-d128", "GQA-8").macs_per_pair(), 32.0 * (128 + 128));
  // Absorbed MLA: [q^ | qR] . [c | kR] and p c per head.
  EXPECT_DOUBLE_EQ(find("paper-d128", "MLA").macs_per_pair(), 32.0 * (512 + 64 + 512));
  // TPA (16,1,1) at d_h 128: R_Q (h + d_h) = 2560 <= h d_h = 4096, so the factor order:
  // R_K (R_Q d_h + R_Q h + h) + R_V h (d_v + 1).
  EXPECT_DOUBLE_EQ(find("paper-d128", "TPA-16-1-1").macs_per_pair(),
                   1.0 * (16 * 128 + 16 * 32 + 32) + 1.0 * 32 * 129);
  EXPECT_DOUBLE_EQ(find("paper-d128", "TPA-16-1-1").macs_per_query(), 0.0);
  // At d_h 64: R_Q (h + d_h) = 1536 <= h d_h = 2048, the factor order too.
  EXPECT_DOUBLE_EQ(find("paper-d64", "TPA-16-1-1").macs_per_pair(),
                   1.0 * (16 * 64 + 16 * 32 + 32) + 1.0 * 32 * 65);
  // TPA-KVonly: the query order, q . B_K then the A_K reduction.
  EXPECT_DOUBLE_EQ(find("t6-small", "TPA-KVonly").macs_per_pair(),
                   2.0 * (34 * 64 + 34) + 2.0 * 34 * 65);
}

TEST(BenchConfigs, WeightCountsAreTheLayersMatrices) {
  EXPECT_EQ(find("paper-d128", "MHA").weight_elements(), 4 * Index(4096) * 4096);
  // DeepSeek-V2-Lite: w_uq 16*192 x 2048, w_dkv 576 x 2048, w_ukv 16*256 x 512, w_o 2048 x 2048.
  EXPECT_EQ(find("deepseek-v2-lite", "MLA").weight_elements(),
            Index(3072) * 2048 + Index(576) * 2048 + Index(4096) * 512 + Index(2048) * 2048);
  // TPA small: A_Q, B_Q, A_K, B_K, A_V, B_V from 768, then w_o 768 x 34*64.
  EXPECT_EQ(find("t6-small", "TPA").weight_elements(),
            Index(768) * (6 * (34 + 64) + 2 * (34 + 64) + 2 * (34 + 64)) + Index(34) * 64 * 768);
}

// By hand: L layers, each a pool of 16-token pages of 16 bytes_per_token bytes plus one 8-byte
// table entry per page (uncapped: the table holds every page of the pool).
TEST(MemoryBudget, LongestContextCountsPagesAndTables) {
  const double budget = 16.0 * 1024 * 1024 * 1024;
  tpattn_bench::BudgetModel model{32, budget, 16};
  for (const char* op : {"MHA", "GQA-8", "MQA", "MLA", "TPA-16-1-1", "TPA-8-2-2"}) {
    const tpattn::CacheRecord record = find("paper-d128", op).record(tpattn::StorageType::bf16);
    const double page = 16.0 * static_cast<double>(record.bytes_per_token()) + 8.0;
    const Index pages = static_cast<Index>(std::floor(budget / 32.0 / page));
    EXPECT_EQ(tpattn_bench::longest_context(record, model), pages * 16) << op;
  }
  // The spec's headline: MHA at d_h 128 in bf16 holds 32,752 tokens in 16 GiB over 32 layers.
  EXPECT_EQ(tpattn_bench::longest_context(
                find("paper-d128", "MHA").record(tpattn::StorageType::bf16), model),
            32752);
}

TEST(MemoryBudget, LargestBatchCountsWholeSequencesOfPages) {
  const double budget = 16.0 * 1024 * 1024 * 1024;
  tpattn_bench::BudgetModel model{32, budget, 16};
  for (const char* op : {"MHA", "GQA-4", "MLA", "TPA-8-2-2"}) {
    const tpattn::CacheRecord record = find("paper-d64", op).record(tpattn::StorageType::f32);
    // A capped sequence of 4096 tokens: 256 pages and 256 table entries.
    const double sequence = 256.0 * (16.0 * static_cast<double>(record.bytes_per_token()) + 8.0);
    const Index batch = static_cast<Index>(std::floor(budget / 32.0 / sequence));
    EXPECT_EQ(tpattn_bench::largest_batch(record, model, 4096), batch) << op;
  }
}

TEST(MemoryBudget, ContextThatDoesNotFillAPageStillTakesOne) {
  // 7-token pages: 10 tokens need 2 pages; a budget of exactly 2 pages and 2 entries fits 14.
  const tpattn::CacheRecord record = tpattn::records::mla(4, 4, tpattn::StorageType::f32);  // 32 B
  tpattn_bench::BudgetModel model{1, 2.0 * (7 * 32 + 8), 7};
  EXPECT_EQ(tpattn_bench::longest_context(record, model), 14);
  model.budget_bytes -= 1.0;
  EXPECT_EQ(tpattn_bench::longest_context(record, model), 7);
}

}  // namespace
