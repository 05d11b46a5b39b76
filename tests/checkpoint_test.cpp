// Loading attention layers from a directory of <state-dict key>.npy files through the presets of
// io/checkpoint.hpp: for each of the five modules of the public TPA code, random tensors in the
// PyTorch layout are saved, loaded, run (prefill, then decode steps) and held against the
// module's math in double precision (support/torch_modules.hpp). Then the errors: a missing
// file, a wrong shape, a refused option, a bad preset.
#include "tpattn/io/checkpoint.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "support/temp_directory.hpp"
#include "support/torch_modules.hpp"
#include "tpattn/cache.hpp"
#include "tpattn/tpattn.hpp"

namespace {

namespace torch = tpattn::test::torch;
using tpattn::Index;

constexpr Index kTokens = 11;  // 6 by prefill, then 5 decode steps
constexpr Index kPrefill = 6;
const std::string kPrefix = "transformer.h.1.attn.";

// The largest |a - b| over every element, relative to the largest |b|.
double relative_error(const torch::Rows& a, const torch::Rows& b) {
  double error = 0, scale = 0;
  for (std::size_t t = 0; t < b.size(); ++t)
    for (std::size_t j = 0; j < b[t].size(); ++j) {
      error = std::max(error, std::fabs(a[t][j] - b[t][j]));
      scale = std::max(scale, std::fabs(b[t][j]));
    }
  return error / scale;
}

// Prefill of the first kPrefill rows of x, then one decode step per row; y per row.
template <class Operator>
torch::Rows run(Operator& op, const torch::Rows& x) {
  const Index d = static_cast<Index>(x[0].size());
  tpattn::ContiguousKvCache cache(op.cache_record(), 1, kTokens);
  const tpattn::SequenceId seq = cache.add_sequence();
  tpattn::RowMatrix in(kTokens, d), out(kTokens, d);
  for (Index t = 0; t < kTokens; ++t)
    for (Index j = 0; j < d; ++j) in(t, j) = static_cast<float>(x[t][j]);
  op.prefill(cache, seq, kPrefill, in.data(), out.data());
  for (Index t = kPrefill; t < kTokens; ++t)
    op.decode(cache, &seq, 1, in.row(t).data(), out.row(t).data());
  torch::Rows y(x.size());
  for (Index t = 0; t < kTokens; ++t)
    for (Index j = 0; j < d; ++j) y[t].push_back(out(t, j));
  return y;
}

torch::Rows random_rows(Index tokens, Index width, unsigned seed) {
  torch::StateDict source(seed);
  const torch::Tensor& values = source.random("x", {tokens, width}, 1.0);
  torch::Rows x(tokens);
  for (Index t = 0; t < tokens; ++t)
    for (Index j = 0; j < width; ++j) x[t].push_back(values.at(t, j));
  return x;
}

// Each test saves its state dict into a directory of its own, removed afterwards.
class Checkpoint : public tpattn::test::TempDirectoryTest {
 protected:
  std::string path(const std::string& key) const { return (directory_ / (key + ".npy")).string(); }

  // A T6.py layer (d 32, 4 heads of 8, q_rank 3, rank 2) under kPrefix, saved.
  void save_t6(torch::StateDict& sd, Index q_rank) {
    const std::string p = kPrefix + "c_qkv.";
    if (q_rank == 0) {
      sd.linear(p + "c_q.weight", 4 * 8, 32);
    } else {
      sd.linear(p + "W_A_q.weight", 4 * q_rank, 32);
      sd.linear(p + "W_B_q.weight", q_rank * 8, 32);
    }
    sd.linear(p + "W_A_k.weight", 4 * 2, 32);
    sd.linear(p + "W_B_k.weight", 2 * 8, 32);
    sd.linear(p + "W_A_v.weight", 4 * 2, 32);
    sd.linear(p + "W_B_v.weight", 2 * 8, 32);
    sd.linear(kPrefix + "c_proj.weight", 32, 4 * 8);
    sd.save(directory_);
  }
  // A llama-gqa.py layer: d 32, `heads` heads of head_dim, heads / group_size KV heads.
  void save_llama(torch::StateDict& sd, Index heads, Index head_dim, Index group_size) {
    sd.linear(kPrefix + "c_q.weight", heads * head_dim, 32);
    sd.linear(kPrefix + "c_k.weight", heads / group_size * head_dim, 32);
    sd.linear(kPrefix + "c_v.weight", heads / group_size * head_dim, 32);
    sd.linear(kPrefix + "c_proj.weight", 32, heads * head_dim);
    sd.save(directory_);
  }
  // A llama-mla.py layer: d 32, 3 heads, nope 8, rope 4, v 6, q_lora 12, kv_lora 10.
  void save_mla(torch::StateDict& sd) {
    sd.linear(kPrefix + "q_a_proj.weight", 12, 32);
    sd.gain(kPrefix + "q_a_layernorm.weight", 12);
    sd.linear(kPrefix + "q_b_proj.weight", 3 * (8 + 4), 12);
    sd.linear(kPrefix + "kv_a_proj_with_mqa.weight", 10 + 4, 32);
    sd.gain(kPrefix + "kv_a_layernorm.weight", 10);
    sd.linear(kPrefix + "kv_b_proj.weight", 3 * (8 + 6), 10);
    sd.linear(kPrefix + "c_proj.weight", 32, 3 * 6);
    sd.save(directory_);
  }

};

// Expects f() to throw a tpattn::Error whose message holds every fragment.
template <class F>
void expect_error(F f, const std::vector<std::string>& fragments) {
  try {
    f();
  } catch (const tpattn::Error& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message: " << message << "\nlacks: " << fragment;
    return;
  }
  ADD_FAILURE() << "no tpattn::Error was thrown";
}

TEST_F(Checkpoint, PresetsSetThePublicCodesRope) {
  for (const tpattn::RopeConfig& rope :
       {tpattn::presets::t6(32, 4, 8, 3, 2).rope, tpattn::presets::t6_kvonly(32, 4, 8, 2).rope,
        tpattn::presets::llama_mha(32, 4).rope, tpattn::presets::llama_gqa(32, 6, 8, 3).rope}) {
    EXPECT_TRUE(rope.enabled);
    EXPECT_EQ(rope.pairing, tpattn::RopePairing::half_split);
    EXPECT_EQ(rope.direction, tpattn::RopeDirection::reversed);
    EXPECT_EQ(rope.table, tpattn::RopeTable::bf16);
    EXPECT_EQ(rope.base, 10000.0);
    EXPECT_EQ(rope.rotary_dim, 0);
  }
  EXPECT_FALSE(tpattn::presets::llama_mla(32, 3, 8, 4, 6, 12, 10).rope.enabled);
}

TEST_F(Checkpoint, T6LayerMatchesTheModule) {
  torch::StateDict sd(1);
  save_t6(sd, 3);
  const tpattn::TpaConfig config = tpattn::presets::t6(32, 4, 8, 3, 2);
  const tpattn::TpaWeights op_weights =
      tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config);
  tpattn::TensorProductAttention<float> op(config, op_weights);
  const torch::Rows x = random_rows(kTokens, 32, 2);
  const torch::Rows expected = torch::t6_attention(sd, kPrefix, x, 4, 8, 3, 2, true);
  EXPECT_LT(relative_error(run(op, x), expected), 1e-5);
  // The table matters: the exact cos/sin move the outputs beyond that bound, and a layer told to
  // use them (RopeTable::fp32) matches those instead.
  const torch::Rows exact = torch::t6_attention(sd, kPrefix, x, 4, 8, 3, 2, false);
  EXPECT_GT(relative_error(exact, expected), 2e-5);
  tpattn::TpaConfig fp32_table = config;
  fp32_table.rope.table = tpattn::RopeTable::fp32;
  tpattn::TensorProductAttention<float> exact_op(fp32_table, op_weights);
  EXPECT_LT(relative_error(run(exact_op, x), exact), 1e-5);
}

TEST_F(Checkpoint, T6KvOnlyLayerMatchesTheModule) {
  torch::StateDict sd(3);
  save_t6(sd, 0);
  const tpattn::TpaConfig config = tpattn::presets::t6_kvonly(32, 4, 8, 2);
  tpattn::TensorProductAttentionKvOnly<float> op(
      config, tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config));
  const torch::Rows x = random_rows(kTokens, 32, 4);
  EXPECT_LT(relative_error(run(op, x), torch::t6_attention(sd, kPrefix, x, 4, 8, 0, 2, true)),
            1e-5);
}

TEST_F(Checkpoint, LlamaMhaLayerMatchesTheModule) {
  torch::StateDict sd(5);
  save_llama(sd, 4, 8, 1);  // llama-mha.py: head_dim = n_embd / n_head = 8
  const tpattn::GqaConfig config = tpattn::presets::llama_mha(32, 4);
  ASSERT_EQ(config.head_dim, 8);
  tpattn::MultiHeadAttention<float> op(
      config, tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config));
  const torch::Rows x = random_rows(kTokens, 32, 6);
  EXPECT_LT(relative_error(run(op, x), torch::llama_attention(sd, kPrefix, x, 4, 8, 1, true)),
            1e-5);
}

TEST_F(Checkpoint, LlamaGqaLayerMatchesTheModule) {
  torch::StateDict sd(7);
  save_llama(sd, 6, 8, 3);  // 6 query heads, 2 KV heads
  const tpattn::GqaConfig config = tpattn::presets::llama_gqa(32, 6, 8, 3);
  ASSERT_EQ(config.kv_heads, 2);
  tpattn::GroupedQueryAttention<float> op(
      config, tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config));
  const torch::Rows x = random_rows(kTokens, 32, 8);
  EXPECT_LT(relative_error(run(op, x), torch::llama_attention(sd, kPrefix, x, 6, 8, 3, true)),
            1e-5);
}

TEST_F(Checkpoint, LlamaGqaWithOneKvHeadIsMqaAndMatchesTheModule) {
  torch::StateDict sd(9);
  save_llama(sd, 4, 8, 4);
  const tpattn::GqaConfig config = tpattn::presets::llama_gqa(32, 4, 8, 4);
  tpattn::MultiQueryAttention<float> op(
      config, tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config));
  const torch::Rows x = random_rows(kTokens, 32, 10);
  EXPECT_LT(relative_error(run(op, x), torch::llama_attention(sd, kPrefix, x, 4, 8, 4, true)),
            1e-5);
}

// llama-mla.py's rotation (by head index, bf16 table) is folded into w_uq at load time, so this
// one holds against the module's literal math, bf16 table included, already.
TEST_F(Checkpoint, LlamaMlaLayerMatchesTheModuleAsWritten) {
  torch::StateDict sd(11);
  save_mla(sd);
  const tpattn::MlaConfig config = tpattn::presets::llama_mla(32, 3, 8, 4, 6, 12, 10);
  tpattn::MultiHeadLatentAttention<float> op(
      config, tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config));
  const torch::Rows x = random_rows(kTokens, 32, 12);
  const torch::Rows expected = torch::llama_mla_attention(sd, kPrefix, x, 3, 8, 4, 6, 10, true);
  EXPECT_LT(relative_error(run(op, x), expected), 1e-5);
  // The fold is there: head 0 (angle 0) keeps its rows, head 2's rotary rows (8..11) moved.
  const tpattn::RowMatrix& w_uq = op.weights().w_uq;
  const torch::Tensor& q_b_proj = sd[kPrefix + "q_b_proj.weight"];
  for (Index c = 0; c < 12; ++c) {
    EXPECT_EQ(w_uq(10, c), q_b_proj.at(10, c));
    EXPECT_EQ(w_uq(2 * 12 + 3, c), q_b_proj.at(2 * 12 + 3, c));  // a q_nope row
  }
  EXPECT_GT(std::fabs(w_uq(2 * 12 + 8, 0) - q_b_proj.at(2 * 12 + 8, 0)), 1e-3);
}

TEST_F(Checkpoint, MissingFileNamesTheFileAndTheExpectedShape) {
  torch::StateDict sd(13);
  save_llama(sd, 6, 8, 3);
  std::filesystem::remove(path(kPrefix + "c_k.weight"));
  const tpattn::GqaConfig config = tpattn::presets::llama_gqa(32, 6, 8, 3);
  expect_error([&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
               {"load_attention(GqaConfig)", path(kPrefix + "c_k.weight"),
                "expected a tensor of shape (16, 32)", "got no such file"});
}

TEST_F(Checkpoint, WrongShapeNamesTheFileTheExpectedAndTheActualShape) {
  torch::StateDict sd(14);
  save_t6(sd, 3);
  sd.linear(kPrefix + "c_qkv.W_B_k.weight", 2 * 8, 31);
  sd.save(directory_);
  const tpattn::TpaConfig config = tpattn::presets::t6(32, 4, 8, 3, 2);
  expect_error([&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
               {"load_attention(TpaConfig)", path(kPrefix + "c_qkv.W_B_k.weight"),
                "expected shape (16, 32), got shape (16, 31)"});
}

TEST_F(Checkpoint, WrongRankIsAWrongShape) {
  torch::StateDict sd(15);
  save_t6(sd, 3);
  const tpattn::TpaConfig config = tpattn::presets::t6(32, 4, 8, 6, 2);  // q_rank 6, saved 3
  expect_error(
      [&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
      {path(kPrefix + "c_qkv.W_A_q.weight"), "expected shape (24, 32), got shape (12, 32)"});
}

TEST_F(Checkpoint, GroupNormSublnIsRefused) {
  torch::StateDict sd(16);
  save_llama(sd, 4, 8, 1);
  sd.gain(kPrefix + "subln.weight", 8);
  sd.save(directory_);
  const tpattn::GqaConfig config = tpattn::presets::llama_mha(32, 4);
  expect_error([&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
               {path(kPrefix + "subln.weight"), "using_groupnorm = False",
                "got a subln weight (using_groupnorm = True)"});
}

TEST_F(Checkpoint, UnknownKeyUnderThePrefixIsRefused) {
  torch::StateDict sd(17);
  save_t6(sd, 0);
  sd.random(kPrefix + "c_qkv.c_q.bias", {32}, 1.0);
  sd.save(directory_);
  const tpattn::TpaConfig config = tpattn::presets::t6_kvonly(32, 4, 8, 2);
  expect_error([&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
               {path(kPrefix + "c_qkv.c_q.bias"), "an unexpected key"});
}

TEST_F(Checkpoint, T6WeightsUnderAKvOnlyConfigAreRefused) {
  torch::StateDict sd(18);
  save_t6(sd, 3);  // W_A_q, W_B_q and no c_q
  const tpattn::TpaConfig config = tpattn::presets::t6_kvonly(32, 4, 8, 2);
  expect_error([&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
               {path(kPrefix + "c_qkv.c_q.weight"), "got no such file"});
}

TEST_F(Checkpoint, MlaWithRopeEnabledIsRefused) {
  torch::StateDict sd(19);
  save_mla(sd);
  tpattn::MlaConfig config = tpattn::presets::llama_mla(32, 3, 8, 4, 6, 12, 10);
  config.rope.enabled = true;
  expect_error([&] { tpattn::load_attention(tpattn::NpyDirectory(directory_), kPrefix, config); },
               {"load_attention(MlaConfig)", "config.rope.enabled", "expected false"});
}

TEST_F(Checkpoint, PrefixMustEndInADot) {
  torch::StateDict sd(20);
  save_llama(sd, 4, 8, 1);
  expect_error(
      [&] {
        tpattn::load_attention(tpattn::NpyDirectory(directory_), "transformer.h.1.attn",
                               tpattn::presets::llama_mha(32, 4));
      },
      {"prefix", "ending in '.'", "got 'transformer.h.1.attn'"});
}

TEST_F(Checkpoint, PresetsRefuseShapesTheModulesCannotHave) {
  expect_error([] { tpattn::presets::llama_mha(30, 4); },
               {"presets::llama_mha", "heads", "a divisor of d_model = 30", "got 4"});
  expect_error([] { tpattn::presets::llama_mha(32, 0); }, {"presets::llama_mha", "got 0"});
  expect_error([] { tpattn::presets::llama_gqa(32, 6, 8, 4); },
               {"presets::llama_gqa", "group_size", "a divisor of heads = 6", "got 4"});
}

TEST_F(Checkpoint, MissingDirectoryIsAnError) {
  expect_error([&] { tpattn::NpyDirectory((directory_ / "nowhere").string()); },
               {"NpyDirectory", "directory", "(no such directory)"});
}

TEST_F(Checkpoint, Bfloat16AndFp64FilesAreRead) {
  // A (2, 2) tensor saved as bf16 bits ('<u2') and one as fp64, written byte by byte.
  const auto save = [&](const std::string& key, const std::string& descr,
                        const std::string& payload) {
    std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (2, 2), }";
    header.append(128 - 10 - header.size() - 1, ' ');
    header += '\n';
    std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
    bytes += static_cast<char>(header.size());
    bytes += '\0';
    std::ofstream(path(key), std::ios::binary) << bytes << header << payload;
  };
  // bf16 1.0 = 0x3f80, -2.0 = 0xc000, 0.5 = 0x3f00, 3.0 = 0x4040, little-endian.
  save("bf16", "<u2", std::string("\x80\x3f\x00\xc0\x00\x3f\x40\x40", 8));
  std::string fp64;
  for (const double value : {1.0, -2.0, 0.5, 3.0})
    fp64.append(reinterpret_cast<const char*>(&value), 8);  // this host is little-endian (x86)
  save("fp64", "<f8", fp64);
  const tpattn::NpyDirectory directory(directory_.string());
  for (const char* key : {"bf16", "fp64"}) {
    const tpattn::RowMatrix m = directory.matrix("test", key, 2, 2);
    EXPECT_EQ(m(0, 0), 1.0f);
    EXPECT_EQ(m(0, 1), -2.0f);
    EXPECT_EQ(m(1, 0), 0.5f);
    EXPECT_EQ(m(1, 1), 3.0f);
  }
}

}  // namespace
