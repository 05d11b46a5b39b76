// The example's whole model (examples/tiny_gpt.hpp): a tiny random checkpoint in the public TPA
// code's state-dict layout, for each of the five families, loaded by Gpt<Attention>::load and
// run over a prompt and decode steps; the logits at every position are held against class GPT's
// forward in double precision (support/torch_modules.hpp), bf16 RoPE tables included.
#include "tiny_gpt.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "support/temp_directory.hpp"
#include "support/torch_modules.hpp"

namespace {

namespace torch = tpattn::test::torch;
using tpattn::Index;

constexpr Index kVocab = 40, kModel = 32, kLayers = 2;
const std::vector<std::int64_t> kTokens = {3, 17, 0, 39, 8, 8, 25, 11, 2, 30, 14};
constexpr Index kPrompt = 7;  // then 4 decode steps

// Attention of block `prefix` on its normed input: the module's own forward.
using AttentionReference = std::function<torch::Rows(const std::string&, const torch::Rows&)>;

// class GPT.forward(idx, output_all_seq=True): logits at every position.
torch::Rows gpt_reference(const torch::StateDict& sd, const AttentionReference& attention) {
  const torch::Tensor& wte = sd["transformer.wte.weight"];
  torch::Rows x;
  for (const std::int64_t id : kTokens) {
    x.emplace_back();
    for (Index j = 0; j < kModel; ++j) x.back().push_back(wte.at(id, j));
  }
  const auto add = [](torch::Rows& to, const torch::Rows& from) {
    for (std::size_t t = 0; t < to.size(); ++t)
      for (std::size_t j = 0; j < to[t].size(); ++j) to[t][j] += from[t][j];
  };
  for (Index l = 0; l < kLayers; ++l) {
    const std::string block = "transformer.h." + std::to_string(l) + ".";
    add(x, attention(block + "attn.", torch::rms_norm(x, torch::kFloat32Epsilon)));
    add(x, torch::swiglu_mlp(sd, block + "mlp.", torch::rms_norm(x, torch::kFloat32Epsilon)));
  }
  return torch::linear(wte, torch::rms_norm(x, torch::kFloat32Epsilon));  // lm_head, tied
}

class TinyGpt : public tpattn::test::TempDirectoryTest {
 protected:
  // The embedding (tied head) and every block's MLP; `attention(sd, prefix)` adds a block's
  // attention tensors. Then saves it all.
  void save(torch::StateDict& sd,
            const std::function<void(torch::StateDict&, const std::string&)>& attention,
            bool with_lm_head) {
    const torch::Tensor& wte = sd.random("transformer.wte.weight", {kVocab, kModel}, 1.0);
    if (with_lm_head) sd.tensors["lm_head.weight"] = wte;
    const Index hidden = tiny_gpt::swiglu_hidden(kModel);
    for (Index l = 0; l < kLayers; ++l) {
      const std::string block = "transformer.h." + std::to_string(l) + ".";
      attention(sd, block + "attn.");
      sd.linear(block + "mlp.c_fc1.weight", hidden, kModel);
      sd.linear(block + "mlp.c_fc2.weight", hidden, kModel);
      sd.linear(block + "mlp.c_proj.weight", kModel, hidden);
    }
    sd.save(directory_);
  }

  // The model's logits at every position: a prefill of kPrompt tokens, then one decode step
  // per remaining token.
  template <class Attention>
  torch::Rows logits(const typename tiny_gpt::Gpt<Attention>::Config& config) {
    auto model = tiny_gpt::Gpt<Attention>::load(tpattn::NpyDirectory(directory_.string()), kVocab,
                                                kLayers, config);
    const auto total = static_cast<Index>(kTokens.size());
    tpattn::PagedKvCache cache(model.model_record(), /*page_tokens=*/4, /*page_count=*/8, 1);
    const tpattn::SequenceId seq = cache.add_sequence();
    tpattn::RowMatrix out(total, kVocab);
    model.forward(cache, seq, kTokens.data(), kPrompt, out.data());
    for (Index t = kPrompt; t < total; ++t)
      model.forward(cache, seq, &kTokens[static_cast<std::size_t>(t)], 1, out.row(t).data());
    EXPECT_EQ(cache.length(seq), total);
    torch::Rows rows(kTokens.size());
    for (Index t = 0; t < total; ++t)
      for (Index v = 0; v < kVocab; ++v) rows[t].push_back(out(t, v));
    return rows;
  }

};

// The largest |a - b|, relative to the largest |b|.
double relative_error(const torch::Rows& a, const torch::Rows& b) {
  double error = 0, scale = 0;
  for (std::size_t t = 0; t < b.size(); ++t)
    for (std::size_t j = 0; j < b[t].size(); ++j) {
      error = std::max(error, std::fabs(a[t][j] - b[t][j]));
      scale = std::max(scale, std::fabs(b[t][j]));
    }
  return error / scale;
}

constexpr double kTolerance = 2e-5;  // fp32 through 2 blocks and the head, against double

void t6_tensors(torch::StateDict& sd, const std::string& p, Index q_rank) {
  if (q_rank == 0) {
    sd.linear(p + "c_qkv.c_q.weight", 4 * 8, kModel);
  } else {
    sd.linear(p + "c_qkv.W_A_q.weight", 4 * q_rank, kModel);
    sd.linear(p + "c_qkv.W_B_q.weight", q_rank * 8, kModel);
  }
  sd.linear(p + "c_qkv.W_A_k.weight", 4 * 2, kModel);
  sd.linear(p + "c_qkv.W_B_k.weight", 2 * 8, kModel);
  sd.linear(p + "c_qkv.W_A_v.weight", 4 * 2, kModel);
  sd.linear(p + "c_qkv.W_B_v.weight", 2 * 8, kModel);
  sd.linear(p + "c_proj.weight", kModel, 4 * 8);
}

void llama_tensors(torch::StateDict& sd, const std::string& p, Index heads, Index kv_heads) {
  sd.linear(p + "c_q.weight", heads * 8, kModel);
  sd.linear(p + "c_k.weight", kv_heads * 8, kModel);
  sd.linear(p + "c_v.weight", kv_heads * 8, kModel);
  sd.linear(p + "c_proj.weight", kModel, heads * 8);
}

TEST_F(TinyGpt, T6LogitsMatchTheModule) {
  torch::StateDict sd(21);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { t6_tensors(s, p, 3); }, true);
  const torch::Rows actual =
      logits<tpattn::TensorProductAttention<float>>(tpattn::presets::t6(kModel, 4, 8, 3, 2));
  const torch::Rows expected = gpt_reference(sd, [&](const std::string& p, const torch::Rows& x) {
    return torch::t6_attention(sd, p, x, 4, 8, 3, 2, true);
  });
  EXPECT_LT(relative_error(actual, expected), kTolerance);
}

TEST_F(TinyGpt, T6KvOnlyLogitsMatchTheModule) {
  torch::StateDict sd(22);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { t6_tensors(s, p, 0); }, false);
  const torch::Rows actual = logits<tpattn::TensorProductAttentionKvOnly<float>>(
      tpattn::presets::t6_kvonly(kModel, 4, 8, 2));
  const torch::Rows expected = gpt_reference(sd, [&](const std::string& p, const torch::Rows& x) {
    return torch::t6_attention(sd, p, x, 4, 8, 0, 2, true);
  });
  EXPECT_LT(relative_error(actual, expected), kTolerance);
}

TEST_F(TinyGpt, LlamaMhaLogitsMatchTheModule) {
  torch::StateDict sd(23);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { llama_tensors(s, p, 4, 4); }, true);
  const torch::Rows actual =
      logits<tpattn::MultiHeadAttention<float>>(tpattn::presets::llama_mha(kModel, 4));
  const torch::Rows expected = gpt_reference(sd, [&](const std::string& p, const torch::Rows& x) {
    return torch::llama_attention(sd, p, x, 4, 8, 1, true);
  });
  EXPECT_LT(relative_error(actual, expected), kTolerance);
}

TEST_F(TinyGpt, LlamaGqaLogitsMatchTheModule) {
  torch::StateDict sd(24);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { llama_tensors(s, p, 6, 2); }, false);
  const torch::Rows actual =
      logits<tpattn::GroupedQueryAttention<float>>(tpattn::presets::llama_gqa(kModel, 6, 8, 3));
  const torch::Rows expected = gpt_reference(sd, [&](const std::string& p, const torch::Rows& x) {
    return torch::llama_attention(sd, p, x, 6, 8, 3, true);
  });
  EXPECT_LT(relative_error(actual, expected), kTolerance);
}

TEST_F(TinyGpt, LlamaMlaLogitsMatchTheModule) {
  torch::StateDict sd(25);
  save(
      sd,
      [](torch::StateDict& s, const std::string& p) {
        s.linear(p + "q_a_proj.weight", 12, kModel);
        s.gain(p + "q_a_layernorm.weight", 12);
        s.linear(p + "q_b_proj.weight", 3 * (8 + 4), 12);
        s.linear(p + "kv_a_proj_with_mqa.weight", 10 + 4, kModel);
        s.gain(p + "kv_a_layernorm.weight", 10);
        s.linear(p + "kv_b_proj.weight", 3 * (8 + 6), 10);
        s.linear(p + "c_proj.weight", kModel, 3 * 6);
      },
      true);
  const torch::Rows actual = logits<tpattn::MultiHeadLatentAttention<float>>(
      tpattn::presets::llama_mla(kModel, 3, 8, 4, 6, 12, 10));
  const torch::Rows expected = gpt_reference(sd, [&](const std::string& p, const torch::Rows& x) {
    return torch::llama_mla_attention(sd, p, x, 3, 8, 4, 6, 10, true);
  });
  EXPECT_LT(relative_error(actual, expected), kTolerance);
}

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

TEST_F(TinyGpt, ADeeperCheckpointThanTheFlagsIsRefused) {
  torch::StateDict sd(26);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { llama_tensors(s, p, 4, 4); }, false);
  const tpattn::NpyDirectory directory(directory_.string());
  expect_error(
      [&] {
        tiny_gpt::Gpt<tpattn::MultiHeadAttention<float>>::load(
            directory, kVocab, 1, tpattn::presets::llama_mha(kModel, 4));
      },
      {"Gpt::load", "only the keys of a GPT of 1 layers", "transformer.h.1."});
}

TEST_F(TinyGpt, AnUntiedHeadIsRefused) {
  torch::StateDict sd(27);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { llama_tensors(s, p, 4, 4); }, false);
  sd.random("lm_head.weight", {kVocab, kModel}, 1.0);
  sd.save(directory_);
  const tpattn::NpyDirectory directory(directory_.string());
  expect_error(
      [&] {
        tiny_gpt::Gpt<tpattn::MultiHeadAttention<float>>::load(
            directory, kVocab, kLayers, tpattn::presets::llama_mha(kModel, 4));
      },
      {"lm_head.weight", "a copy of transformer.wte.weight"});
}

TEST_F(TinyGpt, AWrongVocabularyNamesTheEmbedding) {
  torch::StateDict sd(28);
  save(
      sd, [](torch::StateDict& s, const std::string& p) { llama_tensors(s, p, 4, 4); }, false);
  const tpattn::NpyDirectory directory(directory_.string());
  expect_error(
      [&] {
        tiny_gpt::Gpt<tpattn::MultiHeadAttention<float>>::load(
            directory, 50, kLayers, tpattn::presets::llama_mha(kModel, 4));
      },
      {"transformer.wte.weight.npy", "expected shape (50, 32), got shape (40, 32)"});
}

TEST_F(TinyGpt, ASavedModelLoadsBackWithTheSameLogits) {
  using Model = tiny_gpt::Gpt<tpattn::TensorProductAttention<float>>;
  const tpattn::TpaConfig config = tpattn::presets::t6(kModel, 4, 8, 3, 2);
  Model saved = Model::random(kVocab, kLayers, config, 5);
  saved.save(directory_.string());
  Model loaded = Model::load(tpattn::NpyDirectory(directory_.string()), kVocab, kLayers, config);
  const auto total = static_cast<Index>(kTokens.size());
  tpattn::RowMatrix a(total, kVocab), b(total, kVocab);
  for (auto [model, out] : {std::pair<Model*, tpattn::RowMatrix*>{&saved, &a}, {&loaded, &b}}) {
    tpattn::ContiguousKvCache cache(model->model_record(), 1, total);
    model->forward(cache, cache.add_sequence(), kTokens.data(), total, out->data());
  }
  EXPECT_TRUE(a == b);
  EXPECT_GT(a.cwiseAbs().maxCoeff(), 0.1f);
}

TEST_F(TinyGpt, SwigluHiddenIsTheFlooredEightThirds) {
  EXPECT_EQ(tiny_gpt::swiglu_hidden(32), 85);
  EXPECT_EQ(tiny_gpt::swiglu_hidden(768), 2048);
  EXPECT_EQ(tiny_gpt::swiglu_hidden(1024), 2730);
}

}  // namespace
