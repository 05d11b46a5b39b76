// examples/tiny_gpt.hpp -- the decoder-only LM of the public TPA code (class GPT of model/T6.py,
// the same in T6_kvonly.py and llama-{mha,gqa,mla}.py) on tpattn layers; its attention is the
// template argument.
//
//   x = wte[tokens]                                      (T, d)
//   per block l:  x = x + attn_l(rms_norm(x))            rms_norm: F.rms_norm(x, (d,)), no gain,
//                 x = x + mlp_l(rms_norm(x))             eps = float32 eps (1.19e-7)
//   logits = rms_norm(x) wte^T                           (T, vocab); lm_head tied to wte
//   mlp(x) = c_proj(silu(c_fc1 x) * c_fc2 x),  hidden = floor(8 / 3 * d), no biases anywhere.
//
// Gpt<Attention>::load reads a checkpoint directory of <state-dict key>.npy files (every key the
// model has, and no other); Gpt<Attention>::random builds one of random weights, and save writes
// a model in that layout. Used by
// examples/tiny_t6.cpp and tests/tiny_gpt_test.cpp.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpattn/cache.hpp"
#include "tpattn/io/checkpoint.hpp"
#include "tpattn/kernels/gemm.hpp"
#include "tpattn/tpattn.hpp"

namespace tiny_gpt {

using tpattn::Index;
using tpattn::RowMatrix;

// MLP hidden width of the public code: math.floor(8 / 3 * n_embd), in double as Python does.
inline Index swiglu_hidden(Index d_model) {
  return static_cast<Index>(std::floor(8.0 / 3.0 * static_cast<double>(d_model)));
}

struct MlpWeights {
  RowMatrix fc1;   // hidden x d   (c_fc1)
  RowMatrix fc2;   // hidden x d   (c_fc2)
  RowMatrix proj;  // d x hidden   (c_proj)
};

// Random weights of each attention family, uniform in +-1/sqrt(in) (A and B maps as any other).
inline RowMatrix random_matrix(Index rows, Index cols, std::mt19937& random) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(cols));
  RowMatrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = uniform(random) * scale;
  return m;
}
inline tpattn::TpaWeights random_weights(const tpattn::TpaConfig& c, std::mt19937& random) {
  const Index d = c.d_model, h = c.heads, dh = c.head_dim;
  const Index dv = c.value_dim == 0 ? dh : c.value_dim;
  tpattn::TpaWeights w;
  if (c.rank_q == 0) {
    w.w_q = random_matrix(h * dh, d, random);
  } else {
    w.w_a_q = random_matrix(h * c.rank_q, d, random);
    w.w_b_q = random_matrix(c.rank_q * dh, d, random);
  }
  w.w_a_k = random_matrix(h * c.rank_k, d, random);
  w.w_b_k = random_matrix(c.rank_k * dh, d, random);
  w.w_a_v = random_matrix(h * c.rank_v, d, random);
  w.w_b_v = random_matrix(c.rank_v * dv, d, random);
  w.w_o = random_matrix(d, h * dv, random);
  return w;
}
inline tpattn::GqaWeights random_weights(const tpattn::GqaConfig& c, std::mt19937& random) {
  const Index dv = c.value_dim == 0 ? c.head_dim : c.value_dim;
  tpattn::GqaWeights w;
  w.w_q = random_matrix(c.heads * c.head_dim, c.d_model, random);
  w.w_k = random_matrix(c.kv_heads * c.head_dim, c.d_model, random);
  w.w_v = random_matrix(c.kv_heads * dv, c.d_model, random);
  w.w_o = random_matrix(c.d_model, c.heads * dv, random);
  return w;
}
inline tpattn::MlaWeights random_weights(const tpattn::MlaConfig& c, std::mt19937& random) {
  const Index h = c.heads, dh = c.head_dim, dr = c.rope_dim;
  const Index dv = c.value_dim == 0 ? dh : c.value_dim;
  tpattn::MlaWeights w;
  w.w_dq = random_matrix(c.q_latent_dim, c.d_model, random);
  w.q_norm = tpattn::Vector::Ones(c.q_latent_dim);
  w.w_uq = random_matrix(h * (dh + dr), c.q_latent_dim, random);
  w.w_dkv = random_matrix(c.kv_latent_dim + dr, c.d_model, random);
  w.kv_norm = tpattn::Vector::Ones(c.kv_latent_dim);
  w.w_ukv = random_matrix(h * (dh + dv), c.kv_latent_dim, random);
  w.w_o = random_matrix(c.d_model, h * dv, random);
  return w;
}

// Weights saved as <prefix><name>.npy in `directory`, in the code's state-dict layout (fp32).
inline void save_tensor(const std::string& directory, const std::string& key, const RowMatrix& m) {
  tpattn::write_npy(tpattn::NpyDirectory(directory).path(key), {m.rows(), m.cols()}, m.data());
}
inline void save_tensor(const std::string& directory, const std::string& key,
                        const tpattn::Vector& v) {
  tpattn::write_npy(tpattn::NpyDirectory(directory).path(key), {v.size()}, v.data());
}
inline void save_attention(const std::string& dir, const std::string& prefix,
                           const tpattn::TpaWeights& w) {
  if (w.w_q.size() > 0) {
    save_tensor(dir, prefix + "c_qkv.c_q.weight", w.w_q);
  } else {
    save_tensor(dir, prefix + "c_qkv.W_A_q.weight", w.w_a_q);
    save_tensor(dir, prefix + "c_qkv.W_B_q.weight", w.w_b_q);
  }
  save_tensor(dir, prefix + "c_qkv.W_A_k.weight", w.w_a_k);
  save_tensor(dir, prefix + "c_qkv.W_B_k.weight", w.w_b_k);
  save_tensor(dir, prefix + "c_qkv.W_A_v.weight", w.w_a_v);
  save_tensor(dir, prefix + "c_qkv.W_B_v.weight", w.w_b_v);
  save_tensor(dir, prefix + "c_proj.weight", w.w_o);
}
inline void save_attention(const std::string& dir, const std::string& prefix,
                           const tpattn::GqaWeights& w) {
  save_tensor(dir, prefix + "c_q.weight", w.w_q);
  save_tensor(dir, prefix + "c_k.weight", w.w_k);
  save_tensor(dir, prefix + "c_v.weight", w.w_v);
  save_tensor(dir, prefix + "c_proj.weight", w.w_o);
}
// (w_uq as it is: loading it back adds llama-mla.py's fixed per-head rotation.)
inline void save_attention(const std::string& dir, const std::string& prefix,
                           const tpattn::MlaWeights& w) {
  save_tensor(dir, prefix + "q_a_proj.weight", w.w_dq);
  save_tensor(dir, prefix + "q_a_layernorm.weight", w.q_norm);
  save_tensor(dir, prefix + "q_b_proj.weight", w.w_uq);
  save_tensor(dir, prefix + "kv_a_proj_with_mqa.weight", w.w_dkv);
  save_tensor(dir, prefix + "kv_a_layernorm.weight", w.kv_norm);
  save_tensor(dir, prefix + "kv_b_proj.weight", w.w_ukv);
  save_tensor(dir, prefix + "c_proj.weight", w.w_o);
}

// Parameters of a weight struct (what the PyTorch module holds).
inline Index parameter_count(const tpattn::TpaWeights& w) {
  return w.w_a_q.size() + w.w_b_q.size() + w.w_q.size() + w.w_a_k.size() + w.w_b_k.size() +
         w.w_a_v.size() + w.w_b_v.size() + w.w_o.size();
}
inline Index parameter_count(const tpattn::GqaWeights& w) {
  return w.w_q.size() + w.w_k.size() + w.w_v.size() + w.w_o.size();
}
inline Index parameter_count(const tpattn::MlaWeights& w) {
  return w.w_dq.size() + w.q_norm.size() + w.w_uq.size() + w.w_dkv.size() + w.kv_norm.size() +
         w.w_ukv.size() + w.w_o.size();
}

// x <- x / sqrt(mean(x^2) + eps) per row of rows x d: F.rms_norm without a weight, eps=None.
inline void rms_norm_rows(const float* x, Index rows, Index d, float* y) {
  for (Index r = 0; r < rows; ++r) {
    const Eigen::Map<const Eigen::ArrayXf> in(x + r * d, d);
    Eigen::Map<Eigen::ArrayXf>(y + r * d, d) = in / std::sqrt(in.square().mean() + FLT_EPSILON);
  }
}

template <class Attention>
class Gpt {
 public:
  using Config = std::decay_t<decltype(std::declval<const Attention&>().config())>;
  using Weights = decltype(tpattn::load_attention(std::declval<const tpattn::NpyDirectory&>(),
                                                  std::string(), std::declval<const Config&>()));

  // The checkpoint in `directory`: transformer.wte.weight (vocab, d), lm_head.weight (optional;
  // if present it must equal wte, as the code ties them), and per layer l < layers
  // transformer.h.<l>.attn.* (tpattn::load_attention) and transformer.h.<l>.mlp.c_fc1.weight
  // (hidden, d), c_fc2.weight (hidden, d), c_proj.weight (d, hidden). Any other key is an Error
  // (a deeper model than `layers`, an option the code's GPT does not have).
  static Gpt load(const tpattn::NpyDirectory& directory, Index vocab, Index layers,
                  const Config& config) {
    const char* call = "Gpt::load";
    TPATTN_CHECK(vocab >= 1, call, "vocab", ">= 1", vocab);
    TPATTN_CHECK(layers >= 1, call, "layers", ">= 1", layers);
    const Index d = config.d_model, hidden = swiglu_hidden(config.d_model);
    std::set<std::string> read = {"transformer.wte.weight"};
    RowMatrix embedding = directory.matrix(call, "transformer.wte.weight", vocab, d);
    if (directory.contains("lm_head.weight")) {
      read.insert("lm_head.weight");
      const RowMatrix head = directory.matrix(call, "lm_head.weight", vocab, d);
      TPATTN_CHECK(head == embedding, call, directory.path("lm_head.weight").c_str(),
                   "a copy of transformer.wte.weight (the code ties the two)", "other values");
    }
    std::vector<Block> blocks;
    for (Index l = 0; l < layers; ++l) {
      const std::string block = "transformer.h." + std::to_string(l) + ".";
      Block b;
      b.attention = tpattn::load_attention(directory, block + "attn.", config);
      for (const std::string& key : directory.keys_with_prefix(block + "attn.")) read.insert(key);
      b.mlp.fc1 = directory.matrix(call, block + "mlp.c_fc1.weight", hidden, d);
      b.mlp.fc2 = directory.matrix(call, block + "mlp.c_fc2.weight", hidden, d);
      b.mlp.proj = directory.matrix(call, block + "mlp.c_proj.weight", d, hidden);
      for (const char* name : {"mlp.c_fc1.weight", "mlp.c_fc2.weight", "mlp.c_proj.weight"})
        read.insert(block + name);
      blocks.push_back(std::move(b));
    }
    for (const std::string& key : directory.keys_with_prefix(""))
      TPATTN_CHECK(read.count(key) == 1, call, directory.path(key).c_str(),
                   "only the keys of a GPT of " + std::to_string(layers) + " layers",
                   "an unexpected key '" + key + "'");
    return Gpt(config, std::move(embedding), std::move(blocks));
  }

  // Random weights (seeded), for comparing families without a checkpoint.
  static Gpt random(Index vocab, Index layers, const Config& config, unsigned seed) {
    TPATTN_CHECK(vocab >= 1, "Gpt::random", "vocab", ">= 1", vocab);
    TPATTN_CHECK(layers >= 1, "Gpt::random", "layers", ">= 1", layers);
    std::mt19937 random(seed);
    const Index d = config.d_model, hidden = swiglu_hidden(config.d_model);
    RowMatrix embedding = random_matrix(vocab, d, random) * std::sqrt(static_cast<float>(d));
    std::vector<Block> blocks;
    for (Index l = 0; l < layers; ++l) {
      Block b;
      b.attention = random_weights(config, random);
      b.mlp = {random_matrix(hidden, d, random), random_matrix(hidden, d, random),
               random_matrix(d, hidden, random)};
      blocks.push_back(std::move(b));
    }
    return Gpt(config, std::move(embedding), std::move(blocks));
  }

  // Writes every tensor to `directory` (created if needed) as the code's state dict would hold
  // it, one <key>.npy each, the tied embedding once (transformer.wte.weight): what load reads.
  // For MLA, loading adds the module's fixed per-head rotation to q_b_proj (load_attention).
  void save(const std::string& directory) const {
    std::error_code error;
    std::filesystem::create_directories(directory, error);
    TPATTN_CHECK(!error, "Gpt::save", "directory", "a directory that can be created",
                 "'" + directory + "': " + error.message());
    save_tensor(directory, "transformer.wte.weight", embedding_);
    for (Index l = 0; l < layer_count(); ++l) {
      const std::string block = "transformer.h." + std::to_string(l) + ".";
      const Block& b = blocks_[static_cast<std::size_t>(l)];
      save_attention(directory, block + "attn.", b.attention);
      save_tensor(directory, block + "mlp.c_fc1.weight", b.mlp.fc1);
      save_tensor(directory, block + "mlp.c_fc2.weight", b.mlp.fc2);
      save_tensor(directory, block + "mlp.c_proj.weight", b.mlp.proj);
    }
  }

  Index vocab() const { return embedding_.rows(); }
  Index d_model() const { return embedding_.cols(); }
  Index layer_count() const { return static_cast<Index>(layers_.size()); }
  const Attention& attention(Index l) const { return *layers_[static_cast<std::size_t>(l)]; }

  // What one token caches in every layer: build the KV cache from this.
  tpattn::ModelRecord model_record() const {
    return tpattn::ModelRecord(layers_.front()->cache_record(), layer_count());
  }

  // Parameters, the tied embedding counted once (as the code's get_num_params).
  Index parameter_count() const {
    Index total = embedding_.size();
    for (const Block& b : blocks_)
      total += tiny_gpt::parameter_count(b.attention) + b.mlp.fc1.size() + b.mlp.fc2.size() +
               b.mlp.proj.size();
    return total;
  }

  // The next `count` tokens of `seq` (token ids in [0, vocab)), appended to every layer of
  // `cache` (a ContiguousKvCache or PagedKvCache built from model_record()): a prompt
  // (count > 1) or a decode step (count = 1). logits: [count, vocab], row t the logits after
  // token t.
  template <class ModelCache>
  void forward(ModelCache& cache, tpattn::SequenceId seq, const std::int64_t* tokens, Index count,
               float* logits) {
    const char* call = "Gpt::forward";
    TPATTN_CHECK(count >= 1, call, "count", ">= 1", count);
    const Index d = d_model();
    for (Index t = 0; t < count; ++t)
      TPATTN_CHECK(tokens[t] >= 0 && tokens[t] < vocab(), call, "tokens",
                   "ids in [0, " + std::to_string(vocab()) + ")",
                   std::to_string(tokens[t]) + " at " + std::to_string(t));
    x_.resize(count, d);
    normed_.resize(count, d);
    out_.resize(count, d);
    for (Index t = 0; t < count; ++t) x_.row(t) = embedding_.row(tokens[t]);
    for (Index l = 0; l < layer_count(); ++l) {
      const Block& b = blocks_[static_cast<std::size_t>(l)];
      rms_norm_rows(x_.data(), count, d, normed_.data());
      layers_[static_cast<std::size_t>(l)]->prefill(cache.layer(l), seq, count, normed_.data(),
                                                    out_.data());
      x_ += out_;
      rms_norm_rows(x_.data(), count, d, normed_.data());
      const Index hidden = b.mlp.fc1.rows();
      gate_.resize(count, hidden);
      up_.resize(count, hidden);
      tpattn::linear(b.mlp.fc1, normed_.data(), count, gate_.data());
      tpattn::linear(b.mlp.fc2, normed_.data(), count, up_.data());
      gate_.array() = gate_.array() / (1.0f + (-gate_.array()).exp()) * up_.array();  // silu * up
      tpattn::linear(b.mlp.proj, gate_.data(), count, out_.data());
      x_ += out_;
    }
    rms_norm_rows(x_.data(), count, d, normed_.data());
    tpattn::linear(embedding_, normed_.data(), count, logits);
  }

 private:
  struct Block {
    Weights attention;
    MlpWeights mlp;
  };

  Gpt(const Config& config, RowMatrix embedding, std::vector<Block> blocks)
      : embedding_(std::move(embedding)), blocks_(std::move(blocks)) {
    for (const Block& b : blocks_)
      layers_.push_back(std::make_unique<Attention>(config, b.attention));
  }

  RowMatrix embedding_;  // vocab x d, also the output head
  std::vector<Block> blocks_;
  std::vector<std::unique_ptr<Attention>> layers_;
  RowMatrix x_, normed_, out_, gate_, up_;  // [count, d] and [count, hidden] activations
};

}  // namespace tiny_gpt
