// tests/support/torch_modules.hpp -- the public TPA code's PyTorch modules (model/T6.py,
// T6_kvonly.py, llama-mha.py, llama-gqa.py, llama-mla.py) in double precision, written from
// that code line by line, and a state dict of random tensors saved as <key>.npy files.
//
// Nothing here calls tpattn's operators, RoPE, norms or loaders; the only library calls are
// write_npy (to save the state dict) and the plain Index type.
//
//   StateDict                 random tensors under their state-dict keys, saved to a directory
//   rotary(), apply_rotary()  class Rotary and apply_rotary_emb (bf16 table or an exact one)
//   sdpa()                    F.scaled_dot_product_attention(..., is_causal=True)
//   t6_attention() ... llama_mla_attention()   CausalSelfAttention.forward of each file
//   rms_norm(), swiglu_mlp()  F.rms_norm(x, (C,)) with eps=None, and class MLP
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tpattn/core/checked_size.hpp"
#include "tpattn/io/npy.hpp"

namespace tpattn::test::torch {

// A tensor of a state dict: fp32 values, row-major.
struct Tensor {
  std::vector<Index> shape;
  std::vector<float> data;
  double at(Index row, Index col) const {
    return data[static_cast<std::size_t>(row * shape[1] + col)];
  }
  double at(Index i) const { return data[static_cast<std::size_t>(i)]; }
};

class StateDict {
 public:
  explicit StateDict(unsigned seed) : random_(seed) {}

  // A tensor of values uniform in [-scale, scale].
  const Tensor& random(const std::string& key, std::vector<Index> shape, double scale) {
    Tensor tensor;
    Index count = 1;
    for (const Index d : shape) count *= d;
    std::uniform_real_distribution<double> uniform(-scale, scale);
    tensor.data.resize(static_cast<std::size_t>(count));
    for (float& value : tensor.data) value = static_cast<float>(uniform(random_));
    tensor.shape = std::move(shape);
    return tensors[key] = std::move(tensor);
  }
  // An nn.Linear(in, out).weight: (out, in), scaled so that outputs stay near unit size.
  const Tensor& linear(const std::string& key, Index out, Index in) {
    return random(key, {out, in}, 1.5 / std::sqrt(static_cast<double>(in)));
  }
  // An RMSNorm gain: (dim,), near 1.
  const Tensor& gain(const std::string& key, Index dim) {
    const Tensor& tensor = random(key, {dim}, 0.5);
    for (float& value : tensors[key].data) value += 1.0f;
    return tensor;
  }

  const Tensor& operator[](const std::string& key) const { return tensors.at(key); }

  // One <key>.npy per tensor, fp32.
  void save(const std::filesystem::path& directory) const {
    for (const auto& [key, tensor] : tensors)
      write_npy((directory / (key + ".npy")).string(), tensor.shape, tensor.data.data());
  }

  std::map<std::string, Tensor> tensors;

 private:
  std::mt19937 random_;
};

using Rows = std::vector<std::vector<double>>;  // [tokens][features]

// nn.Linear(bias=False): y[t] = W x[t], W: (out, in).
inline Rows linear(const Tensor& w, const Rows& x) {
  Rows y(x.size(), std::vector<double>(static_cast<std::size_t>(w.shape[0]), 0.0));
  for (std::size_t t = 0; t < x.size(); ++t)
    for (Index o = 0; o < w.shape[0]; ++o) {
      double sum = 0;
      for (Index i = 0; i < w.shape[1]; ++i) sum += w.at(o, i) * x[t][static_cast<std::size_t>(i)];
      y[t][static_cast<std::size_t>(o)] = sum;
    }
  return y;
}

// x * rsqrt(mean(x^2) + eps) [* gain]: F.rms_norm (eps=None: float32 eps) and class RMSNorm.
inline std::vector<double> rms_norm(const std::vector<double>& x, double eps,
                                    const Tensor* gain = nullptr) {
  double mean = 0;
  for (const double value : x) mean += value * value;
  mean /= static_cast<double>(x.size());
  std::vector<double> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    y[i] = x[i] / std::sqrt(mean + eps) * (gain == nullptr ? 1.0 : gain->at(static_cast<Index>(i)));
  return y;
}
inline Rows rms_norm(const Rows& x, double eps, const Tensor* gain = nullptr) {
  Rows y;
  for (const auto& row : x) y.push_back(rms_norm(row, eps, gain));
  return y;
}
constexpr double kFloat32Epsilon = 1.1920928955078125e-07;  // torch.finfo(torch.float32).eps

// class Rotary(dim).forward for seq_len positions: cos and sin [seq_len][dim / 2].
// bf16: the code's recipe, inv_freq and the angles in fp32, cos/sin rounded to bfloat16 (to
// nearest even). Otherwise the exact values (what an fp32 table approximates).
struct RotaryTable {
  std::vector<std::vector<double>> cos, sin;
};
inline double round_to_bfloat16(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, 4);
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  float rounded = 0;
  std::memcpy(&rounded, &bits, 4);
  return rounded;
}
inline RotaryTable rotary(Index dim, Index seq_len, bool bf16) {
  RotaryTable table;
  for (Index t = 0; t < seq_len; ++t) {
    std::vector<double> c, s;
    for (Index j = 0; j < dim / 2; ++j) {
      if (bf16) {
        // 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), torch.outer(t, inv_freq)
        const float inv_freq =
            1.0f / std::pow(10000.0f, static_cast<float>(2 * j) / static_cast<float>(dim));
        const float angle = static_cast<float>(t) * inv_freq;
        c.push_back(round_to_bfloat16(static_cast<float>(std::cos(double{angle}))));
        s.push_back(round_to_bfloat16(static_cast<float>(std::sin(double{angle}))));
      } else {
        const double angle =
            static_cast<double>(t) *
            std::pow(10000.0, -2.0 * static_cast<double>(j) / static_cast<double>(dim));
        c.push_back(std::cos(angle));
        s.push_back(std::sin(angle));
      }
    }
    table.cos.push_back(c);
    table.sin.push_back(s);
  }
  return table;
}

// apply_rotary_emb on one vector x[dim] with row `row` of the table: x1 = x[:d], x2 = x[d:],
// y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.
inline void apply_rotary(double* x, Index dim, const RotaryTable& table, Index row) {
  const Index d = dim / 2;
  for (Index j = 0; j < d; ++j) {
    const double c = table.cos[static_cast<std::size_t>(row)][static_cast<std::size_t>(j)];
    const double s = table.sin[static_cast<std::size_t>(row)][static_cast<std::size_t>(j)];
    const double x1 = x[j], x2 = x[j + d];
    x[j] = x1 * c + x2 * s;
    x[j + d] = -x1 * s + x2 * c;
  }
}

// F.scaled_dot_product_attention(q, k, v, is_causal=True, scale) per head; q, k: [T][h * dk],
// v: [T][h * dv] (heads already broadcast); returns [T][h * dv].
inline Rows sdpa(const Rows& q, const Rows& k, const Rows& v, Index h, Index dk, Index dv,
                 double scale) {
  const std::size_t tokens = q.size();
  Rows out(tokens, std::vector<double>(static_cast<std::size_t>(h * dv), 0.0));
  for (std::size_t t = 0; t < tokens; ++t)
    for (Index i = 0; i < h; ++i) {
      std::vector<double> score(t + 1);
      double top = -1e300;
      for (std::size_t s = 0; s <= t; ++s) {
        double dot = 0;
        for (Index j = 0; j < dk; ++j)
          dot += q[t][static_cast<std::size_t>(i * dk + j)] *
                 k[s][static_cast<std::size_t>(i * dk + j)];
        score[s] = dot * scale;
        top = std::max(top, score[s]);
      }
      double total = 0;
      for (double& value : score) total += (value = std::exp(value - top));
      for (std::size_t s = 0; s <= t; ++s)
        for (Index j = 0; j < dv; ++j)
          out[t][static_cast<std::size_t>(i * dv + j)] +=
              score[s] / total * v[s][static_cast<std::size_t>(i * dv + j)];
    }
  return out;
}

// T6.py (q_rank >= 1) and T6_kvonly.py (q_rank = 0) CausalSelfAttention.forward, x: [T][C].
inline Rows t6_attention(const StateDict& sd, const std::string& prefix, const Rows& x, Index h,
                         Index hd, Index q_rank, Index rank, bool bf16) {
  const std::string p = prefix + "c_qkv.";
  const auto tokens = static_cast<Index>(x.size());
  const RotaryTable table = rotary(hd, tokens, bf16);
  // A: view(h, rank), element [i][r] at i * rank + r; B: view(rank, hd), [r][j] at r * hd + j.
  const auto product = [&](const Rows& a, const Rows& b, Index r_count) {
    Rows out(x.size(), std::vector<double>(static_cast<std::size_t>(h * hd), 0.0));
    for (std::size_t t = 0; t < x.size(); ++t)
      for (Index i = 0; i < h; ++i)
        for (Index j = 0; j < hd; ++j) {
          double sum = 0;
          for (Index r = 0; r < r_count; ++r)
            sum += a[t][static_cast<std::size_t>(i * r_count + r)] *
                   b[t][static_cast<std::size_t>(r * hd + j)];
          out[t][static_cast<std::size_t>(i * hd + j)] = sum / static_cast<double>(r_count);
        }
    return out;
  };
  Rows q;
  if (q_rank == 0) {
    q = linear(sd[p + "c_q.weight"], x);
    for (Index t = 0; t < tokens; ++t)
      for (Index i = 0; i < h; ++i)
        apply_rotary(q[static_cast<std::size_t>(t)].data() + i * hd, hd, table, t);
  } else {
    Rows b_q = linear(sd[p + "W_B_q.weight"], x);
    for (Index t = 0; t < tokens; ++t)
      for (Index r = 0; r < q_rank; ++r)
        apply_rotary(b_q[static_cast<std::size_t>(t)].data() + r * hd, hd, table, t);
    q = product(linear(sd[p + "W_A_q.weight"], x), b_q, q_rank);
  }
  Rows b_k = linear(sd[p + "W_B_k.weight"], x);
  for (Index t = 0; t < tokens; ++t)
    for (Index r = 0; r < rank; ++r)
      apply_rotary(b_k[static_cast<std::size_t>(t)].data() + r * hd, hd, table, t);
  const Rows k = product(linear(sd[p + "W_A_k.weight"], x), b_k, rank);
  const Rows v =
      product(linear(sd[p + "W_A_v.weight"], x), linear(sd[p + "W_B_v.weight"], x), rank);
  const Rows y = sdpa(q, k, v, h, hd, hd, 1.0 / std::sqrt(static_cast<double>(hd)));
  return linear(sd[prefix + "c_proj.weight"], y);
}

// llama-mha.py (group_size 1) and llama-gqa.py CausalSelfAttention.forward.
inline Rows llama_attention(const StateDict& sd, const std::string& prefix, const Rows& x, Index h,
                            Index hd, Index group_size, bool bf16) {
  const auto tokens = static_cast<Index>(x.size());
  const Index g = h / group_size;
  const RotaryTable table = rotary(hd, tokens, bf16);
  Rows q = linear(sd[prefix + "c_q.weight"], x);
  Rows k = linear(sd[prefix + "c_k.weight"], x);
  const Rows v = linear(sd[prefix + "c_v.weight"], x);
  for (Index t = 0; t < tokens; ++t) {
    for (Index i = 0; i < h; ++i)
      apply_rotary(q[static_cast<std::size_t>(t)].data() + i * hd, hd, table, t);
    for (Index i = 0; i < g; ++i)
      apply_rotary(k[static_cast<std::size_t>(t)].data() + i * hd, hd, table, t);
  }
  // torch.repeat_interleave(k, group_size, dim=1): query head i reads KV head i / group_size.
  Rows k_all(x.size()), v_all(x.size());
  for (std::size_t t = 0; t < x.size(); ++t)
    for (Index i = 0; i < h; ++i)
      for (Index j = 0; j < hd; ++j) {
        k_all[t].push_back(k[t][static_cast<std::size_t>((i / group_size) * hd + j)]);
        v_all[t].push_back(v[t][static_cast<std::size_t>((i / group_size) * hd + j)]);
      }
  const Rows y = sdpa(q, k_all, v_all, h, hd, hd, 1.0 / std::sqrt(static_cast<double>(hd)));
  return linear(sd[prefix + "c_proj.weight"], y);
}

// llama-mla.py CausalSelfAttention.forward, as written: its Rotary is called on q_pe of shape
// (B, n_head, T, rope) and on k_pe of shape (B, 1, T, rope), so seq_len is n_head for the query
// (head i takes the angles of position i) and 1 for the key (position 0: no rotation).
inline Rows llama_mla_attention(const StateDict& sd, const std::string& prefix, const Rows& x,
                                Index h, Index nope, Index rope, Index v_dim, Index kv_lora,
                                bool bf16) {
  const Tensor& q_gain = sd[prefix + "q_a_layernorm.weight"];
  const Tensor& kv_gain = sd[prefix + "kv_a_layernorm.weight"];
  const Rows q = linear(sd[prefix + "q_b_proj.weight"],
                        rms_norm(linear(sd[prefix + "q_a_proj.weight"], x), 1e-6, &q_gain));
  const Rows compressed = linear(sd[prefix + "kv_a_proj_with_mqa.weight"], x);
  Rows latent;
  for (const auto& row : compressed) latent.emplace_back(row.begin(), row.begin() + kv_lora);
  const Rows kv = linear(sd[prefix + "kv_b_proj.weight"], rms_norm(latent, 1e-6, &kv_gain));
  const RotaryTable table_q = rotary(rope, h, bf16);
  const RotaryTable table_k = rotary(rope, 1, bf16);
  Rows q_new(x.size()), k(x.size()), v(x.size());
  for (std::size_t t = 0; t < x.size(); ++t) {
    std::vector<double> k_pe(compressed[t].begin() + kv_lora, compressed[t].end());
    apply_rotary(k_pe.data(), rope, table_k, 0);
    for (Index i = 0; i < h; ++i) {
      const auto q_head = q[t].begin() + i * (nope + rope);
      std::vector<double> q_pe(q_head + nope, q_head + nope + rope);
      apply_rotary(q_pe.data(), rope, table_q, i);
      q_new[t].insert(q_new[t].end(), q_head, q_head + nope);
      q_new[t].insert(q_new[t].end(), q_pe.begin(), q_pe.end());
      const auto kv_head = kv[t].begin() + i * (nope + v_dim);
      k[t].insert(k[t].end(), kv_head, kv_head + nope);
      k[t].insert(k[t].end(), k_pe.begin(), k_pe.end());
      v[t].insert(v[t].end(), kv_head + nope, kv_head + nope + v_dim);
    }
  }
  const Rows y =
      sdpa(q_new, k, v, h, nope + rope, v_dim, 1.0 / std::sqrt(static_cast<double>(nope + rope)));
  return linear(sd[prefix + "c_proj.weight"], y);
}

// class MLP: c_proj(silu(c_fc1 x) * c_fc2 x).
inline Rows swiglu_mlp(const StateDict& sd, const std::string& prefix, const Rows& x) {
  const Rows a = linear(sd[prefix + "c_fc1.weight"], x);
  Rows b = linear(sd[prefix + "c_fc2.weight"], x);
  for (std::size_t t = 0; t < x.size(); ++t)
    for (std::size_t j = 0; j < b[t].size(); ++j) b[t][j] *= a[t][j] / (1.0 + std::exp(-a[t][j]));
  return linear(sd[prefix + "c_proj.weight"], b);
}

}  // namespace tpattn::test::torch
