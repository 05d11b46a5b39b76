// tpattn/io/npy.hpp -- NumPy .npy files in and out: weights, activations and token ids exported
// from PyTorch, read as row-major fp32 (or int64) arrays, and fp32 arrays written for NumPy.
//
// Format versions 1.0, 2.0 and 3.0; dtypes '<f4', '<f8' and, when asked for, bfloat16 bits saved
// as '<u2' or '<i2' (read_npy); '<i8' (read_npy_int64). Every other file is a tpattn::Error naming
// the call, the file and what was expected and found (docs/npy.md).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "tpattn/core/checked_size.hpp"
#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"
#include "tpattn/io/npy_header.hpp"

namespace tpattn {

// An array read from a .npy file.
template <class Element>
struct NpyData {
  std::string path;           // the file it came from, for expect_shape's errors ("" if none)
  std::vector<Index> shape;   // empty for a scalar
  std::vector<Element> data;  // product of shape elements, row-major (C order): last dim contiguous
};
using NpyArray = NpyData<float>;
using NpyInt64Array = NpyData<std::int64_t>;

// What read_npy makes of a 2-byte integer array ('<u2' or '<i2'). NumPy has no bfloat16, so
// PyTorch exporters save a bf16 tensor's raw bits as one (t.view(torch.int16).numpy()); only the
// caller knows whether a uint16 file holds bits or integers, so it has to say.
enum class NpyInt16 : std::uint8_t {
  reject,       // an Error, as any other unsupported dtype
  as_bfloat16,  // each element's 16 bits are a bfloat16, widened exactly to fp32
};

namespace detail {

inline std::uint64_t load_little_endian(const unsigned char* bytes, int count) {
  std::uint64_t value = 0;
  for (int i = 0; i < count; ++i) value |= std::uint64_t{bytes[i]} << (8 * i);
  return value;
}
inline void store_little_endian(std::uint64_t value, int count, char* bytes) {
  for (int i = 0; i < count; ++i) bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
}

// The magic, the version and the header of an open file, checked against its size; `file` is
// left at the first data byte and *data_bytes says how many bytes follow.
inline NpyHeader read_npy_header(const char* call, const std::string& path, std::ifstream& file,
                                 Index* data_bytes) {
  const auto where = [&](const char* part) { return path + ": " + part; };
  std::error_code error;
  const std::uintmax_t size = std::filesystem::file_size(path, error);
  TPATTN_CHECK(!error, call, where("file").c_str(), "a file whose size can be read",
               error.message());
  const auto file_bytes = static_cast<Index>(size);

  unsigned char prefix[12] = {};
  file.read(reinterpret_cast<char*>(prefix), 8);
  const std::string magic(reinterpret_cast<const char*>(prefix), file.gcount() < 6 ? 0 : 6);
  TPATTN_CHECK(file.gcount() >= 6 && magic == "\x93NUMPY", call, where("magic").c_str(),
               "a .npy file starting with the 6 bytes '\\x93NUMPY'",
               file_bytes < 6 ? "a file of " + to_text(file_bytes) + " bytes"
                              : npy_quoted(std::string(reinterpret_cast<char*>(prefix), 6)));
  const int major = prefix[6], minor = prefix[7];
  TPATTN_CHECK(file.gcount() == 8 && (major == 1 || major == 2 || major == 3) && minor == 0, call,
               where("version").c_str(), "format version 1.0, 2.0 or 3.0",
               file.gcount() < 8 ? "a file that ends inside the version"
                                 : to_text(major) + "." + to_text(minor));
  // 1.0 stores the header length in 2 bytes; 2.0 and 3.0 (whose header may be UTF-8) in 4.
  const int length_bytes = major == 1 ? 2 : 4;
  file.read(reinterpret_cast<char*>(prefix + 8), length_bytes);
  TPATTN_CHECK(file.gcount() == length_bytes, call, where("header length").c_str(),
               to_text(length_bytes) + " bytes of header length after the version",
               "a file of " + to_text(file_bytes) + " bytes");
  const auto header_bytes = static_cast<Index>(load_little_endian(prefix + 8, length_bytes));
  const Index data_start = 8 + length_bytes + header_bytes;
  TPATTN_CHECK(data_start <= file_bytes, call, where("header").c_str(),
               to_text(header_bytes) + " header bytes (as its length field says)",
               "a file that ends after " + to_text(file_bytes - 8 - length_bytes) + " of them");

  std::string text(static_cast<std::size_t>(header_bytes), '\0');
  file.read(text.data(), header_bytes);
  TPATTN_CHECK(file.gcount() == header_bytes, call, where("header").c_str(),
               to_text(header_bytes) + " header bytes", "a read that stopped early");
  const NpyHeader header = NpyHeaderParser(call, path, text).parse();
  TPATTN_CHECK(!header.fortran_order, call, where("header 'fortran_order'").c_str(),
               "False (C order: save np.ascontiguousarray(a))", "True");
  *data_bytes = file_bytes - data_start;
  return header;
}

// The dtype of the header, checked against those `accepted` ("'<f4' or '<f8'"): a big-endian
// dtype is named as such.
[[noreturn]] inline void reject_dtype(const char* call, const std::string& path,
                                      const std::string& descr, const std::string& accepted) {
  const bool big_endian = !descr.empty() && descr[0] == '>';
  fail(call, (path + ": header 'descr'").c_str(), "dtype " + accepted,
       npy_quoted(descr) + (big_endian ? " (big-endian: save a.astype(a.dtype.newbyteorder('<')))"
                                       : " (not supported)"));
}

// Reads header.elements elements of element_bytes each, `decode(bytes, i, array)` storing
// element i: every size check first, then the data in chunks (a file is never held twice).
template <class Element, class Decode>
NpyData<Element> read_npy_data(const char* call, const std::string& path, std::ifstream& file,
                               const NpyHeader& header, Index data_bytes, int element_bytes,
                               Decode decode) {
  const std::string where = path + ": data";
  const Index expected =
      checked_product(call, where.c_str(), header.elements, Index{element_bytes});
  TPATTN_CHECK(data_bytes == expected, call, where.c_str(),
               to_text(expected) + " bytes after the header (" + to_text(header.elements) +
                   " elements of shape " + npy_shape_text(header.shape) + ", " +
                   to_text(element_bytes) + " bytes each)",
               to_text(data_bytes) + (data_bytes < expected ? " (a truncated file)" : ""));
  NpyData<Element> array;
  array.path = path;
  array.shape = header.shape;
  resize_or_fail(call, where.c_str(), array.data, header.elements, "elements");
  constexpr Index kChunkElements = 16384;
  std::vector<unsigned char> chunk(static_cast<std::size_t>(kChunkElements * element_bytes));
  for (Index first = 0; first < header.elements; first += kChunkElements) {
    const Index count = std::min(kChunkElements, header.elements - first);
    file.read(reinterpret_cast<char*>(chunk.data()), count * element_bytes);
    TPATTN_CHECK(file.gcount() == count * element_bytes, call, where.c_str(),
                 to_text(expected) + " bytes", "a read that stopped early (the file changed?)");
    for (Index i = 0; i < count; ++i) decode(chunk.data() + i * element_bytes, first + i, array);
  }
  return array;
}

inline std::ifstream open_npy(const char* call, const std::string& path) {
  std::error_code error;
  const std::filesystem::file_status status = std::filesystem::status(path, error);
  TPATTN_CHECK(std::filesystem::exists(status), call, (path + ": file").c_str(),
               "an existing .npy file",
               status.type() == std::filesystem::file_type::not_found
                   ? "no such file"
                   : "a path whose status cannot be read (" + error.message() + ")");
  TPATTN_CHECK(std::filesystem::is_regular_file(status), call, (path + ": file").c_str(),
               "a regular file",
               std::filesystem::is_directory(status) ? "a directory" : "another kind of file");
  std::ifstream file(path, std::ios::binary);
  TPATTN_CHECK(file.is_open(), call, (path + ": file").c_str(), "a file that can be read",
               "one that cannot be opened (permissions?)");
  return file;
}

}  // namespace detail

// An array of dtype '<f4' or '<f8' as fp32 (an fp64 value rounds to the nearest float; one
// beyond the float range is an Error, not an infinity). With NpyInt16::as_bfloat16, '<u2' and
// '<i2' arrays are read as bfloat16 bits. Throws tpattn::Error (call "read_npy") for a missing
// file, a bad magic or version, a malformed header, fortran_order True, any other dtype, a
// big-endian one, a shape whose element count overflows, and data bytes that do not match the
// shape (a truncated file).
inline NpyArray read_npy(const std::string& path, NpyInt16 int16 = NpyInt16::reject) {
  const char* call = "read_npy";
  std::ifstream file = detail::open_npy(call, path);
  Index data_bytes = 0;
  const detail::NpyHeader header = detail::read_npy_header(call, path, file, &data_bytes);
  const std::string& descr = header.descr;
  if (descr == "<f4") {
    return detail::read_npy_data<float>(
        call, path, file, header, data_bytes, 4,
        [](const unsigned char* bytes, Index i, NpyArray& array) {
          const auto bits = static_cast<std::uint32_t>(detail::load_little_endian(bytes, 4));
          std::memcpy(&array.data[static_cast<std::size_t>(i)], &bits, 4);
        });
  }
  if (descr == "<f8") {
    return detail::read_npy_data<float>(
        call, path, file, header, data_bytes, 8,
        [&](const unsigned char* bytes, Index i, NpyArray& array) {
          const std::uint64_t bits = detail::load_little_endian(bytes, 8);
          double value = 0;
          std::memcpy(&value, &bits, 8);
          TPATTN_CHECK(
              !std::isfinite(value) || std::fabs(value) <= FLT_MAX, call, (path + ": data").c_str(),
              "fp64 values within the fp32 range (|x| <= " + detail::to_text(FLT_MAX) + ")",
              detail::to_text(value) + " at element " + detail::to_text(i));
          array.data[static_cast<std::size_t>(i)] = static_cast<float>(value);
        });
  }
  if ((descr == "<u2" || descr == "<i2") && int16 == NpyInt16::as_bfloat16) {
    return detail::read_npy_data<float>(
        call, path, file, header, data_bytes, 2,
        [](const unsigned char* bytes, Index i, NpyArray& array) {
          const auto bits = static_cast<std::uint32_t>(detail::load_little_endian(bytes, 2)) << 16;
          std::memcpy(&array.data[static_cast<std::size_t>(i)], &bits, 4);
        });
  }
  detail::reject_dtype(call, path, descr,
                       int16 == NpyInt16::as_bfloat16
                           ? "'<f4', '<f8', or bfloat16 bits as '<u2' or '<i2'"
                           : "'<f4' or '<f8' (bfloat16 bits in '<u2' or '<i2': pass "
                             "NpyInt16::as_bfloat16)");
}

// An array of dtype '<i8' (token ids), exactly. Errors as read_npy, call "read_npy_int64".
inline NpyInt64Array read_npy_int64(const std::string& path) {
  const char* call = "read_npy_int64";
  std::ifstream file = detail::open_npy(call, path);
  Index data_bytes = 0;
  const detail::NpyHeader header = detail::read_npy_header(call, path, file, &data_bytes);
  if (header.descr != "<i8") detail::reject_dtype(call, path, header.descr, "'<i8'");
  return detail::read_npy_data<std::int64_t>(
      call, path, file, header, data_bytes, 8,
      [](const unsigned char* bytes, Index i, NpyInt64Array& array) {
        const std::uint64_t bits = detail::load_little_endian(bytes, 8);
        std::memcpy(&array.data[static_cast<std::size_t>(i)], &bits, 8);
      });
}

// Throws tpattn::Error (call "expect_shape", argument `what` and the array's file) unless the
// array has exactly the shape `expected`, e.g. expect_shape(w_q, {h * d_h, d_model}, "w_q").
template <class Element>
void expect_shape(const NpyData<Element>& array, const std::vector<Index>& expected,
                  const std::string& what) {
  TPATTN_CHECK(array.shape == expected, "expect_shape",
               (what + (array.path.empty() ? "" : " (" + array.path + ")")).c_str(),
               "shape " + detail::npy_shape_text(expected),
               "shape " + detail::npy_shape_text(array.shape));
}

// Writes data: [product of shape] fp32, row-major, as a .npy file of format version 1.0, dtype
// '<f4', that np.load reads. Replaces an existing file. Throws tpattn::Error (call "write_npy")
// for a negative dimension, a shape whose byte count overflows, null data with elements to
// write, a header beyond 1.0's 65535 bytes, or a file that cannot be written.
inline void write_npy(const std::string& path, const std::vector<Index>& shape, const float* data) {
  const char* call = "write_npy";
  Index elements = 1;
  for (const Index dimension : shape) {
    TPATTN_CHECK(dimension >= 0, call, "shape", "dimensions >= 0", detail::npy_shape_text(shape));
    elements = detail::checked_product(call, "shape", elements, dimension);
  }
  detail::checked_product(call, "shape", elements, Index{4});
  TPATTN_CHECK(data != nullptr || elements == 0, call, "data", "non-null", "null");

  // NumPy's own layout: the dict, spaces, '\n', so that the data starts at a multiple of 64.
  std::string header =
      "{'descr': '<f4', 'fortran_order': False, 'shape': " + detail::npy_shape_text(shape) + ", }";
  const std::size_t padded = (10 + header.size() + 1 + 63) / 64 * 64 - 10;
  header.append(padded - header.size() - 1, ' ');
  header += '\n';
  TPATTN_CHECK(header.size() <= 65535, call, "shape",
               "a header of at most 65535 bytes (format 1.0)",
               detail::to_text(header.size()) + " bytes for " + detail::to_text(shape.size()) +
                   " dimensions");

  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  TPATTN_CHECK(file.is_open(), call, (path + ": file").c_str(),
               "a path that can be opened for writing", "one that cannot");
  char prefix[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  detail::store_little_endian(header.size(), 2, prefix + 8);
  file.write(prefix, 10);
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  constexpr Index kChunkElements = 16384;
  std::vector<char> chunk(static_cast<std::size_t>(kChunkElements * 4));
  for (Index first = 0; first < elements && file; first += kChunkElements) {
    const Index count = std::min(kChunkElements, elements - first);
    for (Index i = 0; i < count; ++i) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, data + first + i, 4);
      detail::store_little_endian(bits, 4, chunk.data() + i * 4);
    }
    file.write(chunk.data(), count * 4);
  }
  file.close();
  TPATTN_CHECK(!file.fail(), call, (path + ": file").c_str(),
               detail::to_text(10 + header.size() + static_cast<std::size_t>(elements) * 4) +
                   " bytes written",
               "a write that failed (disk full?)");
}

}  // namespace tpattn
