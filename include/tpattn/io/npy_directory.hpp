// tpattn/io/npy_directory.hpp -- a checkpoint saved as a directory of .npy files, one per
// state-dict entry, each named after its key unchanged: "<key>.npy", e.g.
// transformer.h.0.attn.c_q.weight.npy. (Exported from PyTorch with, per entry,
// np.save(f"{dir}/{key}.npy", tensor.float().numpy()); bf16 bits as int16 are read too.)
//
// Tensors come out as fp32 row-major matrices and vectors, each checked against the shape the
// caller expects: a missing file or another shape is a tpattn::Error naming the file, the
// expected shape and what was found.
#pragma once

#include <algorithm>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "tpattn/core/error.hpp"
#include "tpattn/core/matrix.hpp"
#include "tpattn/io/npy.hpp"
#include "tpattn/io/npy_header.hpp"

namespace tpattn {

class NpyDirectory {
 public:
  // Throws tpattn::Error (call "NpyDirectory", argument "directory") unless `directory` is an
  // existing directory.
  explicit NpyDirectory(std::string directory) : directory_(std::move(directory)) {
    std::error_code error;
    const bool is_directory = std::filesystem::is_directory(directory_, error);
    TPATTN_CHECK(is_directory, "NpyDirectory", "directory",
                 "an existing directory of <state-dict key>.npy files",
                 "'" + directory_ + "'" +
                     (std::filesystem::exists(directory_, error) ? " (not a directory)"
                                                                 : " (no such directory)"));
  }

  const std::string& directory() const { return directory_; }

  // The file that holds `key`: <directory>/<key>.npy.
  std::string path(const std::string& key) const {
    return (std::filesystem::path(directory_) / (key + ".npy")).string();
  }

  // Whether the directory holds a file for `key`.
  bool contains(const std::string& key) const {
    std::error_code error;
    return std::filesystem::is_regular_file(path(key), error);
  }

  // Every key of the directory that starts with `prefix`, sorted (from the .npy file names).
  std::vector<std::string> keys_with_prefix(const std::string& prefix) const {
    std::vector<std::string> keys;
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(directory_, error)) {
      if (!entry.is_regular_file(error) || entry.path().extension() != ".npy") continue;
      const std::string key = entry.path().stem().string();
      if (key.compare(0, prefix.size(), prefix) == 0) keys.push_back(key);
    }
    TPATTN_CHECK(!error, "NpyDirectory::keys_with_prefix", "directory",
                 "a directory that can be listed", "'" + directory_ + "': " + error.message());
    std::sort(keys.begin(), keys.end());
    return keys;
  }

  // The tensor `key` (dtype fp32, fp64, or bf16 bits as '<u2'/'<i2') as fp32, of exactly the
  // dimensions `shape`. Error (call `call`, argument the file): "expected a tensor of shape
  // (..), got no such file" or "expected shape (..), got shape (..)"; a malformed file is
  // read_npy's Error, which names the file as well.
  NpyArray tensor(const char* call, const std::string& key, const std::vector<Index>& shape) const {
    const std::string file = path(key);
    TPATTN_CHECK(
        contains(key), call, file.c_str(),
        "a tensor of shape " + detail::npy_shape_text(shape) + " (state-dict key '" + key + "')",
        "no such file");
    NpyArray array = read_npy(file, NpyInt16::as_bfloat16);
    TPATTN_CHECK(array.shape == shape, call, file.c_str(), "shape " + detail::npy_shape_text(shape),
                 "shape " + detail::npy_shape_text(array.shape));
    return array;
  }

  // A matrix [rows, cols], row-major as the file (an nn.Linear weight is out x in).
  RowMatrix matrix(const char* call, const std::string& key, Index rows, Index cols) const {
    const NpyArray array = tensor(call, key, {rows, cols});
    return Eigen::Map<const RowMatrix>(array.data.data(), rows, cols);
  }

  // A vector [size] (an RMSNorm gain).
  Vector vector(const char* call, const std::string& key, Index size) const {
    const NpyArray array = tensor(call, key, {size});
    return Eigen::Map<const Vector>(array.data.data(), size);
  }

 private:
  std::string directory_;
};

}  // namespace tpattn
