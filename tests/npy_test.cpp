// tests/npy_test.cpp -- the .npy reader and writer (io/npy.hpp) against files built here byte
// by byte: every supported version and dtype read exactly, every malformed file an Error that
// names the file and the problem, and write_npy's bytes laid out as NumPy lays them.
//
// The files are spelled out by this test's own small builder (npy_file below), not by
// write_npy, so a reader and a writer that agree on a wrong layout cannot pass together.
#include "tpattn/io/npy.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "support/temp_directory.hpp"

namespace {

using tpattn::Index;

std::string little_endian(std::uint64_t value, int bytes) {
  std::string text;
  for (int i = 0; i < bytes; ++i) text += static_cast<char>((value >> (8 * i)) & 0xff);
  return text;
}

std::uint32_t bits_of(float value) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &value, 4);
  return bits;
}
float float_of(std::uint32_t bits) {
  float value = 0;
  std::memcpy(&value, &bits, 4);
  return value;
}

std::string f32_bytes(const std::vector<float>& values) {
  std::string text;
  for (const float v : values) text += little_endian(bits_of(v), 4);
  return text;
}
std::string f64_bytes(const std::vector<double>& values) {
  std::string text;
  for (const double v : values) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, 8);
    text += little_endian(bits, 8);
  }
  return text;
}
std::string i64_bytes(const std::vector<std::int64_t>& values) {
  std::string text;
  for (const std::int64_t v : values) text += little_endian(static_cast<std::uint64_t>(v), 8);
  return text;
}
std::string u16_bytes(const std::vector<std::uint16_t>& values) {
  std::string text;
  for (const std::uint16_t v : values) text += little_endian(v, 2);
  return text;
}

// A .npy file as numpy.lib.format spells it: "\x93NUMPY", major, minor, the header length (2
// bytes for 1.x, 4 for 2.x and 3.x), the dict padded with spaces and a '\n' so that the data
// starts at a multiple of 64, then the data.
std::string npy_file(int major, const std::string& dict, const std::string& data, int minor = 0) {
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  std::string header = dict;
  while ((8 + length_bytes + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += static_cast<char>(major);
  bytes += static_cast<char>(minor);
  return bytes + little_endian(header.size(), static_cast<int>(length_bytes)) + header + data;
}

std::string dict(const std::string& descr, const std::string& shape, bool fortran = false) {
  return "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") +
         ", 'shape': " + shape + ", }";
}

// Runs `call`, which must throw a tpattn::Error whose message holds every fragment.
template <class Call>
void expect_error(Call call, const std::vector<std::string>& fragments) {
  try {
    call();
  } catch (const tpattn::Error& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message: " << message << "\nlacks: " << fragment;
    return;
  }
  ADD_FAILURE() << "no tpattn::Error was thrown";
}

// Each test writes its files into a directory of its own, removed afterwards.
class Npy : public tpattn::test::TempDirectoryTest {
 protected:
  std::string path(const std::string& name) const { return (directory_ / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream file(path(name), std::ios::binary);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    EXPECT_TRUE(file.good()) << path(name);
    return path(name);
  }
  std::string contents(const std::string& file_path) const {
    std::ifstream file(file_path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  }

 private:
};

TEST_F(Npy, ReadsFloat32InCOrderBitForBit) {
  // -0, the largest float, the smallest subnormal and a NaN with a payload survive as bits.
  const std::vector<float> values = {1.5f,
                                     -0.0f,
                                     std::numeric_limits<float>::max(),
                                     float_of(0x00000001),
                                     -7.25f,
                                     float_of(0x7fc00123)};
  const std::string file = write("f4.npy", npy_file(1, dict("<f4", "(2, 3)"), f32_bytes(values)));
  const tpattn::NpyArray array = tpattn::read_npy(file);
  EXPECT_EQ(array.path, file);
  EXPECT_EQ(array.shape, (std::vector<Index>{2, 3}));
  ASSERT_EQ(array.data.size(), values.size());
  for (std::size_t i = 0; i < values.size(); ++i)
    EXPECT_EQ(bits_of(array.data[i]), bits_of(values[i])) << "element " << i;
}

TEST_F(Npy, ReadsArraysLongerThanOneChunk) {
  // The reader converts in chunks of 16384 elements; 40,001 fp64 values end inside the third.
  std::vector<double> values;
  for (int i = 0; i < 40001; ++i) values.push_back(0.5 * i - 1000);
  const std::string file =
      write("long.npy", npy_file(1, dict("<f8", "(40001,)"), f64_bytes(values)));
  const tpattn::NpyArray array = tpattn::read_npy(file);
  ASSERT_EQ(array.data.size(), values.size());
  for (std::size_t i = 0; i < values.size(); ++i)
    ASSERT_EQ(array.data[i], static_cast<float>(values[i])) << "element " << i;
}

TEST_F(Npy, ReadsFloat64RoundedToTheNearestFloat) {
  const double tie_to_even_down = 1.0 + std::ldexp(1.0, -24);    // halfway: rounds to 1
  const double tie_to_even_up = 1.0 + 3 * std::ldexp(1.0, -24);  // halfway: rounds to 1 + 2^-22
  const std::vector<double> values = {0.1,
                                      -2.5,
                                      1e-3,
                                      tie_to_even_down,
                                      tie_to_even_up,
                                      -0.0,
                                      std::numeric_limits<double>::infinity()};
  const std::string file = write("f8.npy", npy_file(1, dict("<f8", "(7,)"), f64_bytes(values)));
  const tpattn::NpyArray array = tpattn::read_npy(file);
  EXPECT_EQ(array.shape, (std::vector<Index>{7}));
  const std::vector<float> expected = {0.1f,
                                       -2.5f,
                                       0.001f,
                                       1.0f,
                                       1.0f + std::ldexp(1.0f, -22),
                                       -0.0f,
                                       std::numeric_limits<float>::infinity()};
  ASSERT_EQ(array.data.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i)
    EXPECT_EQ(bits_of(array.data[i]), bits_of(expected[i])) << "element " << i;
}

TEST_F(Npy, ReadsTheFourByteHeaderLengthOfVersions2And3) {
  const std::string data = f32_bytes({0, 1, 2, 3, 4, 5});
  for (const int major : {2, 3}) {
    SCOPED_TRACE(major);
    const tpattn::NpyArray array =
        tpattn::read_npy(write("v.npy", npy_file(major, dict("<f4", "(3, 2)"), data)));
    EXPECT_EQ(array.shape, (std::vector<Index>{3, 2}));
    EXPECT_EQ(array.data, (std::vector<float>{0, 1, 2, 3, 4, 5}));
  }
  // Version 2.0 exists for headers beyond 65535 bytes: a reader of only 2 length bytes would
  // take 70,000 for 4,464 and read the header's padding as data.
  const std::string wide = dict("<f4", "(6,)") + std::string(70000, ' ');
  const tpattn::NpyArray array = tpattn::read_npy(write("wide.npy", npy_file(2, wide, data)));
  EXPECT_EQ(array.data, (std::vector<float>{0, 1, 2, 3, 4, 5}));
}

TEST_F(Npy, ReadsInt64TokenIdsExactly) {
  // 2^53 + 1 is the first integer a double (or a float) cannot hold.
  const std::vector<std::int64_t> ids = {0,
                                         50256,
                                         -1,
                                         (std::int64_t{1} << 53) + 1,
                                         std::numeric_limits<std::int64_t>::min(),
                                         std::numeric_limits<std::int64_t>::max()};
  const std::string file = write("ids.npy", npy_file(1, dict("<i8", "(2, 3)"), i64_bytes(ids)));
  const tpattn::NpyInt64Array array = tpattn::read_npy_int64(file);
  EXPECT_EQ(array.path, file);
  EXPECT_EQ(array.shape, (std::vector<Index>{2, 3}));
  EXPECT_EQ(array.data, ids);
}

TEST_F(Npy, ReadsBfloat16BitsOnlyWhenAsked) {
  // 1, -3, +inf, the smallest bf16 subnormal, -0: each widens to the float with those top bits.
  const std::vector<std::uint16_t> bits = {0x3f80, 0xc040, 0x7f80, 0x0001, 0x8000};
  for (const char* descr : {"<u2", "<i2"}) {
    SCOPED_TRACE(descr);
    const std::string file = write("bf16.npy", npy_file(1, dict(descr, "(5,)"), u16_bytes(bits)));
    const tpattn::NpyArray array = tpattn::read_npy(file, tpattn::NpyInt16::as_bfloat16);
    ASSERT_EQ(array.data.size(), bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i)
      EXPECT_EQ(bits_of(array.data[i]), std::uint32_t{bits[i]} << 16) << "element " << i;
    EXPECT_EQ(array.data[0], 1.0f);
    EXPECT_EQ(array.data[1], -3.0f);
    // Without the flag, 16-bit integers are not guessed to be bfloat16.
    expect_error(
        [&] { tpattn::read_npy(file); },
        {"tpattn: read_npy: " + file + ": header 'descr': ", descr, "NpyInt16::as_bfloat16"});
  }
}

TEST_F(Npy, ReadsScalarsAndEmptyArrays) {
  const tpattn::NpyArray scalar =
      tpattn::read_npy(write("scalar.npy", npy_file(1, dict("<f4", "()"), f32_bytes({7.5f}))));
  EXPECT_TRUE(scalar.shape.empty());
  EXPECT_EQ(scalar.data, (std::vector<float>{7.5f}));
  const tpattn::NpyArray empty =
      tpattn::read_npy(write("empty.npy", npy_file(1, dict("<f4", "(0, 4)"), "")));
  EXPECT_EQ(empty.shape, (std::vector<Index>{0, 4}));
  EXPECT_TRUE(empty.data.empty());
}

TEST_F(Npy, AcceptsTheHeaderSpellingsPythonAccepts) {
  const std::string data = f32_bytes({1, 2, 3, 4, 5, 6});
  const std::vector<std::string> headers = {
      "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",  // double quotes
      "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",          // another key order
      "{'descr':'<f4','fortran_order':False,'shape':(2,3,)}",               // no spaces, (2,3,)
      "  { 'descr' : '<f4' ,\t'fortran_order' : False , 'shape' : ( 2 , 3 ) , }  ",
  };
  for (const std::string& header : headers) {
    SCOPED_TRACE(header);
    const tpattn::NpyArray array = tpattn::read_npy(write("h.npy", npy_file(1, header, data)));
    EXPECT_EQ(array.shape, (std::vector<Index>{2, 3}));
    EXPECT_EQ(array.data, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  }
  // Old NumPy padded to 16 bytes, not 64; the padding is not the reader's business.
  const std::string header = dict("<f4", "(2, 3)") + "\n";
  const std::string unpadded =
      std::string("\x93NUMPY\x01\x00", 8) + little_endian(header.size(), 2) + header + data;
  EXPECT_EQ(tpattn::read_npy(write("unpadded.npy", unpadded)).data,
            (std::vector<float>{1, 2, 3, 4, 5, 6}));
}

TEST_F(Npy, WriteNpyLaysOutTheFileAsNumpyDoes) {
  const std::vector<float> values = {1.0f, -2.0f, 0.5f, 3.25f, -0.0f, 6.0f};
  const std::string file = path("written.npy");
  tpattn::write_npy(file, {3, 2}, values.data());
  const std::string bytes = contents(file);
  ASSERT_GE(bytes.size(), 10u);
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));  // format version 1.0
  const std::size_t header_bytes = static_cast<unsigned char>(bytes[8]) |
                                   static_cast<std::size_t>(static_cast<unsigned char>(bytes[9]))
                                       << 8;
  EXPECT_EQ((10 + header_bytes) % 64, 0u);
  ASSERT_EQ(bytes.size(), 10 + header_bytes + 4 * values.size());
  const std::string header = bytes.substr(10, header_bytes);
  const std::string expected_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }";
  EXPECT_EQ(header.substr(0, expected_dict.size()), expected_dict);
  EXPECT_EQ(header.find_first_not_of(' ', expected_dict.size()), header_bytes - 1);
  EXPECT_EQ(header.back(), '\n');
  EXPECT_EQ(bytes.substr(10 + header_bytes), f32_bytes(values));
}

TEST_F(Npy, WriteThenReadRoundTripsBitForBit) {
  const std::vector<std::vector<Index>> shapes = {
      {7}, {2, 3, 4}, {}, {0, 3}, {1, 1, 1, 5}, {3, 13339}};  // 40,017: three write chunks
  for (const std::vector<Index>& shape : shapes) {
    SCOPED_TRACE(tpattn::detail::npy_shape_text(shape));
    Index count = 1;
    for (const Index dimension : shape) count *= dimension;
    std::vector<float> values;
    for (Index i = 0; i < count; ++i)  // a spread of exponents and signs, NaN and infinities
      values.push_back(float_of(static_cast<std::uint32_t>(0x9e3779b9u * (i + 1))));
    if (count > 2) {
      values[0] = std::numeric_limits<float>::infinity();
      values[1] = std::numeric_limits<float>::quiet_NaN();
    }
    const std::string file = path("round.npy");
    tpattn::write_npy(file, shape, values.data());
    const tpattn::NpyArray array = tpattn::read_npy(file);
    EXPECT_EQ(array.shape, shape);
    ASSERT_EQ(array.data.size(), values.size());
    for (std::size_t i = 0; i < values.size(); ++i)
      EXPECT_EQ(bits_of(array.data[i]), bits_of(values[i])) << "element " << i;
  }
}

// --- errors: each names the call, the file and what was expected and found -----------------

TEST_F(Npy, AMissingFileOrADirectoryIsAnError) {
  const std::string missing = path("missing.npy");
  expect_error([&] { tpattn::read_npy(missing); },
               {"tpattn: read_npy: " + missing + ": file: ", "no such file"});
  expect_error([&] { tpattn::read_npy_int64(missing); },
               {"tpattn: read_npy_int64: " + missing + ": file: ", "no such file"});
  std::filesystem::create_directory(path("folder.npy"));
  expect_error([&] { tpattn::read_npy(path("folder.npy")); },
               {path("folder.npy") + ": file: ", "expected a regular file, got a directory"});
}

TEST_F(Npy, ABadMagicIsAnError) {
  std::string bytes = npy_file(1, dict("<f4", "(1,)"), f32_bytes({1}));
  bytes[5] = 'Z';
  const std::string file = write("magic.npy", bytes);
  expect_error([&] { tpattn::read_npy(file); },
               {"tpattn: read_npy: " + file + ": magic: ", "\\x93NUMPY", "got '\\x93NUMPZ'"});
  const std::string tiny = write("tiny.npy", "\x93NU");
  expect_error([&] { tpattn::read_npy(tiny); }, {tiny + ": magic: ", "got a file of 3 bytes"});
  const std::string empty = write("empty.npy", "");
  expect_error([&] { tpattn::read_npy(empty); }, {empty + ": magic: ", "got a file of 0 bytes"});
}

TEST_F(Npy, AnUnsupportedVersionIsAnError) {
  for (const auto& [major, minor, text] : std::vector<std::tuple<int, int, std::string>>{
           {4, 0, "4.0"}, {1, 1, "1.1"}, {0, 0, "0.0"}}) {
    const std::string file =
        write("version.npy", npy_file(major == 1 ? 1 : 2, dict("<f4", "(1,)"), f32_bytes({1})));
    std::string bytes = contents(file);
    bytes[6] = static_cast<char>(major);
    bytes[7] = static_cast<char>(minor);
    write("version.npy", bytes);
    expect_error([&] { tpattn::read_npy(file); },
                 {file + ": version: expected format version 1.0, 2.0 or 3.0, got " + text});
  }
}

TEST_F(Npy, AHeaderCutShortIsAnError) {
  const std::string no_length = write("no_length.npy", std::string("\x93NUMPY\x01\x00\x10", 9));
  expect_error([&] { tpattn::read_npy(no_length); },
               {no_length + ": header length: ", "2 bytes of header length"});
  const std::string header = dict("<f4", "(1,)");
  const std::string cut =
      write("cut.npy", std::string("\x93NUMPY\x01\x00", 8) + little_endian(200, 2) + header);
  expect_error([&] { tpattn::read_npy(cut); },
               {cut + ": header: ", "200 header bytes",
                "a file that ends after " + std::to_string(header.size())});
}

TEST_F(Npy, FortranOrderIsAnError) {
  const std::string file =
      write("fortran.npy", npy_file(1, dict("<f4", "(2, 3)", true), f32_bytes({1, 2, 3, 4, 5, 6})));
  expect_error(
      [&] { tpattn::read_npy(file); },
      {"tpattn: read_npy: " + file + ": header 'fortran_order': ", "expected False", "got True"});
}

TEST_F(Npy, AnUnsupportedDtypeIsAnError) {
  for (const char* descr : {"<i4", "|u1", "<f2", "<c8", "|b1", "f4", "<u2"}) {
    SCOPED_TRACE(descr);
    const std::string file = write("dtype.npy", npy_file(1, dict(descr, "(2,)"), "xxxxxxxx"));
    expect_error(
        [&] { tpattn::read_npy(file); },
        {"tpattn: read_npy: " + file + ": header 'descr': ", "expected dtype '<f4' or '<f8'",
         std::string("got '") + descr + "' (not supported)"});
  }
  for (const char* descr : {"<f4", "<i4", "<u8"}) {
    SCOPED_TRACE(descr);
    const std::string file =
        write("dtype.npy", npy_file(1, dict(descr, "(2,)"), "xxxxxxxxxxxxxxxx"));
    expect_error([&] { tpattn::read_npy_int64(file); },
                 {"tpattn: read_npy_int64: " + file + ": header 'descr': ", "expected dtype '<i8'",
                  std::string("got '") + descr + "'"});
  }
}

TEST_F(Npy, ABigEndianDtypeIsAnError) {
  const std::string f4 = write("f4.npy", npy_file(1, dict(">f4", "(1,)"), "\x3f\x80\x00\x00"));
  expect_error([&] { tpattn::read_npy(f4); }, {f4 + ": header 'descr': ", "got '>f4' (big-endian"});
  const std::string f8 = write("f8.npy", npy_file(1, dict(">f8", "(1,)"), std::string(8, '\0')));
  expect_error([&] { tpattn::read_npy(f8, tpattn::NpyInt16::as_bfloat16); },
               {f8 + ": header 'descr': ", "got '>f8' (big-endian"});
  const std::string u2 = write("u2.npy", npy_file(1, dict(">u2", "(1,)"), "\x3f\x80"));
  expect_error([&] { tpattn::read_npy(u2, tpattn::NpyInt16::as_bfloat16); },
               {u2 + ": header 'descr': ", "got '>u2' (big-endian"});
  const std::string i8 = write("i8.npy", npy_file(1, dict(">i8", "(1,)"), std::string(8, '\0')));
  expect_error([&] { tpattn::read_npy_int64(i8); },
               {"read_npy_int64: " + i8 + ": header 'descr': ", "got '>i8' (big-endian"});
}

TEST_F(Npy, AMalformedHeaderDictIsAnError) {
  struct Case {
    std::string header;
    std::string part;      // "header" or "header '<key>'"
    std::string fragment;  // what the message must say
  };
  const std::string ok_tail = "'fortran_order': False, 'shape': (2,)}";
  const std::vector<Case> cases = {
      {"", "header", "'{' opening the header dict"},
      {"['descr', '<f4']", "header", "'{' opening the header dict"},
      {"{'descr': '<f4', 'fortran_order': False}", "header", "got no 'shape' in"},
      {"{'descr': '<f4', 'shape': (2,)}", "header", "got no 'fortran_order' in"},
      {"{'descr': '<f4', " + ok_tail.substr(0, ok_tail.size() - 1) + ", 'extra': 1}", "header",
       "got the key 'extra'"},
      {"{'descr': '<f4', 'descr': '<f4', " + ok_tail, "header", "got a second 'descr'"},
      {"{'descr': '<f4', 'fortran_order': false, 'shape': (2,)}", "header", "True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [2]}", "header", "a tuple '(...)'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2)}", "header",
       "a one-element tuple written '(n,)'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, x)}", "header", "a dimension"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2; 1)}", "header", "',' or ')'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3, -2)}", "header 'shape'",
       "expected dimensions >= 0, got -2"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': (2,)}", "header",
       "',' or '}' after the value of 'descr'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (2,)", "header",
       "got the end of the header"},
      {"{'descr': '<f4, " + ok_tail, "header", "',' or '}' after the value of 'descr'"},
      {"{'descr': '<f4", "header", "a string closed by its quote"},
      {"{'de\\x73cr': '<f4', " + ok_tail, "header", "a string without escapes"},
      {"{descr: '<f4', " + ok_tail, "header", "a quoted key"},
      {"{'descr': '<f4', " + ok_tail + " x", "header", "nothing but spaces after the closing '}'"},
      {"{'descr': [('a', '<f4')], " + ok_tail, "header 'descr'", "a structured dtype"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    const std::string file = write("bad.npy", npy_file(1, c.header, f32_bytes({1, 2})));
    expect_error([&] { tpattn::read_npy(file); },
                 {"tpattn: read_npy: " + file + ": " + c.part + ": expected", c.fragment});
  }
}

TEST_F(Npy, AShapeWhoseSizeOverflowsIsAnError) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"(4611686018427387904, 4)", "(4611686018427387904, 4), whose product overflows"},
      {"(0, 4611686018427387904, 4)", "whose product overflows"},  // a 0 does not hide it
      {"(3037000500, 3037000500)", "whose product overflows"},
      {"(99999999999999999999,)",
       "dimensions that fit in a 64-bit Index, got 99999999999999999999"},
  };
  for (const auto& [shape, fragment] : cases) {
    SCOPED_TRACE(shape);
    const std::string file = write("huge.npy", npy_file(1, dict("<f4", shape), f32_bytes({1})));
    expect_error([&] { tpattn::read_npy(file); },
                 {"tpattn: read_npy: " + file + ": header 'shape': ", fragment});
  }
  // The element count fits but the byte count does not: 2^62 fp64 elements are 2^65 bytes.
  const std::string bytes =
      write("bytes.npy", npy_file(1, dict("<f8", "(4611686018427387904,)"), ""));
  expect_error([&] { tpattn::read_npy(bytes); },
               {"tpattn: read_npy: " + bytes + ": data: ", "overflows"});
}

TEST_F(Npy, DataThatDoesNotMatchTheShapeIsAnError) {
  const std::string header = dict("<f4", "(2, 3)");
  const std::string short_file =
      write("short.npy", npy_file(1, header, f32_bytes({1, 2, 3, 4, 5})));
  expect_error([&] { tpattn::read_npy(short_file); },
               {"tpattn: read_npy: " + short_file + ": data: ",
                "expected 24 bytes after the header", "shape (2, 3)", "got 20 (a truncated file)"});
  const std::string long_file =
      write("long.npy", npy_file(1, header, f32_bytes({1, 2, 3, 4, 5, 6, 7})));
  expect_error([&] { tpattn::read_npy(long_file); },
               {long_file + ": data: ", "expected 24 bytes", "got 28"});
  // A shape of 2^40 floats over 8 bytes of data: refused from the sizes, before any allocation.
  const std::string claims =
      write("claims.npy", npy_file(1, dict("<f4", "(1099511627776,)"), f32_bytes({1, 2})));
  expect_error([&] { tpattn::read_npy(claims); },
               {claims + ": data: ", "expected 4398046511104 bytes", "got 8 (a truncated file)"});
  const std::string ids = write("ids.npy", npy_file(1, dict("<i8", "(3,)"), i64_bytes({1, 2})));
  expect_error([&] { tpattn::read_npy_int64(ids); },
               {"read_npy_int64: " + ids + ": data: ", "expected 24 bytes", "got 16"});
}

TEST_F(Npy, Float64BeyondTheFloatRangeIsAnError) {
  const std::string file =
      write("range.npy", npy_file(1, dict("<f8", "(3,)"), f64_bytes({1.0, -1e300, 2.0})));
  expect_error([&] { tpattn::read_npy(file); },
               {"tpattn: read_npy: " + file + ": data: ", "within the fp32 range",
                "got -1e+300 at element 1"});
}

TEST_F(Npy, ExpectShapeNamesTheTensorTheFileAndBothShapes) {
  const std::vector<float> values(8, 1.0f);
  const std::string file = path("w_q.npy");
  tpattn::write_npy(file, {4, 2}, values.data());
  const tpattn::NpyArray w_q = tpattn::read_npy(file);
  EXPECT_NO_THROW(tpattn::expect_shape(w_q, {4, 2}, "w_q"));
  expect_error(
      [&] {
        tpattn::expect_shape(w_q, {2, 4}, "w_q");
      },
      {"tpattn: expect_shape: w_q (" + file + "): expected shape (2, 4), got shape (4, 2)"});
  expect_error([&] { tpattn::expect_shape(w_q, {8}, "w_q"); },
               {"expected shape (8,), got shape (4, 2)"});
  tpattn::NpyArray in_memory;
  in_memory.shape = {3};
  expect_error([&] { tpattn::expect_shape(in_memory, {}, "bias"); },
               {"tpattn: expect_shape: bias: expected shape (), got shape (3,)"});
}

TEST_F(Npy, WriteNpyRejectsBadArgumentsAndUnwritablePaths) {
  const float one = 1.0f;
  expect_error(
      [&] {
        tpattn::write_npy(path("a.npy"), {2, -1}, &one);
      },
      {"tpattn: write_npy: shape: expected dimensions >= 0, got (2, -1)"});
  expect_error([&] { tpattn::write_npy(path("a.npy"), {2}, nullptr); },
               {"tpattn: write_npy: data: expected non-null, got null"});
  expect_error([&] { tpattn::write_npy(path("a.npy"), {4611686018427387904}, &one); },
               {"tpattn: write_npy: shape: ", "overflows"});
  const std::string unwritable = path("no_such_folder/a.npy");
  expect_error([&] { tpattn::write_npy(unwritable, {1}, &one); },
               {"tpattn: write_npy: " + unwritable + ": file: ", "opened for writing"});
  EXPECT_NO_THROW(tpattn::write_npy(path("empty.npy"), {0}, nullptr));
}

}  // namespace
