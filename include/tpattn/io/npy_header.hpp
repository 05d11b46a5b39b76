// tpattn/io/npy_header.hpp -- the header of a NumPy .npy file: its Python dict literal, parsed
// and checked, and the shape text both the reader's errors and the writer use.
//
// A header reads {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } (docs/npy.md).
// NumPy evaluates it as a Python literal; this parser accepts the same subset that NumPy's own
// writers produce and that hand-written headers use: single or double quotes, any spacing, the
// keys in any order, a trailing comma. Anything else is an Error that says where it stopped.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tpattn/core/error.hpp"
#include "tpattn/core/storage_type.hpp"

namespace tpattn {
namespace detail {

// NumPy's spelling of a shape: "()", "(3,)", "(2, 3)".
inline std::string npy_shape_text(const std::vector<Index>& shape) {
  std::string text = "(";
  for (std::size_t d = 0; d < shape.size(); ++d) text += (d == 0 ? "" : ", ") + to_text(shape[d]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

// Bytes of a file quoted in an error: printable ASCII as it is, anything else as \xNN.
inline std::string npy_quoted(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string text = "'";
  for (const char c : bytes) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte >= 0x20 && byte < 0x7f && c != '\\') {
      text += c;
    } else {
      text += "\\x";
      text += digits[byte >> 4];
      text += digits[byte & 0xf];
    }
  }
  return text + "'";
}

struct NpyHeader {
  std::string descr;  // the dtype, e.g. "<f4"
  bool fortran_order = false;
  std::vector<Index> shape;  // empty for a scalar
  Index elements = 1;        // product of shape, checked to fit in an Index
};

// Parses one header. call and path name the read in every error, whose argument is
// "<path>: header" (or ": header 'shape'" for a bad dimension).
class NpyHeaderParser {
 public:
  NpyHeaderParser(const char* call, const std::string& path, const std::string& text)
      : call_(call), path_(path), text_(text) {}

  NpyHeader parse() {
    NpyHeader header;
    bool seen_descr = false, seen_fortran_order = false, seen_shape = false;
    skip_spaces();
    expect('{', "'{' opening the header dict");
    skip_spaces();
    while (!at('}')) {
      const std::string key = parse_string("a quoted key or '}'");
      skip_spaces();
      expect(':', "':' after the key '" + key + "'");
      skip_spaces();
      if (key == "descr") {
        once(seen_descr, key);
        header.descr = parse_descr();
      } else if (key == "fortran_order") {
        once(seen_fortran_order, key);
        header.fortran_order = parse_bool(key);
      } else if (key == "shape") {
        once(seen_shape, key);
        header.shape = parse_shape();
      } else {
        fail_at("the keys 'descr', 'fortran_order' and 'shape' only", "the key '" + key + "'");
      }
      skip_spaces();
      if (!at('}')) {
        expect(',', "',' or '}' after the value of '" + key + "'");
        skip_spaces();
      }
    }
    ++position_;    // the '}'
    skip_spaces();  // NumPy pads with spaces and ends with '\n'
    if (position_ < text_.size()) fail_at("nothing but spaces after the closing '}'", rest());
    require(seen_descr, "descr");
    require(seen_fortran_order, "fortran_order");
    require(seen_shape, "shape");
    // The product of the non-zero dimensions must fit, so that the check does not depend on
    // where a 0 stands and every stride computed from the shape fits too.
    bool empty = false;
    for (const Index dimension : header.shape) {
      empty = empty || dimension == 0;
      TPATTN_CHECK(
          dimension == 0 || !__builtin_mul_overflow(header.elements, dimension, &header.elements),
          call_, where("header 'shape'").c_str(),
          "a shape whose element count fits in a 64-bit Index",
          npy_shape_text(header.shape) + ", whose product overflows");
    }
    if (empty) header.elements = 0;
    return header;
  }

 private:
  std::string where(const char* part) const { return path_ + ": " + part; }
  std::string rest() const { return npy_quoted(text_.substr(position_, 24)); }

  [[noreturn]] void fail_at(const std::string& expected, const std::string& actual) const {
    fail(call_, where("header").c_str(), expected + " (at header byte " + to_text(position_) + ")",
         actual);
  }

  bool at(char c) const { return position_ < text_.size() && text_[position_] == c; }
  void skip_spaces() {
    while (position_ < text_.size() && (text_[position_] == ' ' || text_[position_] == '\t' ||
                                        text_[position_] == '\n' || text_[position_] == '\r'))
      ++position_;
  }
  void expect(char c, const std::string& what) {
    if (!at(c)) fail_at(what, position_ < text_.size() ? rest() : "the end of the header");
    ++position_;
  }
  void require(bool seen, const char* key) const {
    TPATTN_CHECK(seen, call_, where("header").c_str(),
                 "a dict with the keys 'descr', 'fortran_order' and 'shape'",
                 std::string("no '") + key + "' in " +
                     npy_quoted(text_.substr(0, text_.find_last_not_of(" \n") + 1)));
  }
  void once(bool& seen, const std::string& key) {
    if (seen) fail_at("each key once", "a second '" + key + "'");
    seen = true;
  }

  // A Python string literal in ' or " without escapes (dtype strings and the three keys have none).
  std::string parse_string(const std::string& what) {
    if (!at('\'') && !at('"')) fail_at(what, position_ < text_.size() ? rest() : "the end");
    const char quote = text_[position_++];
    const std::size_t first = position_;
    while (position_ < text_.size() && text_[position_] != quote) {
      if (text_[position_] == '\\') fail_at("a string without escapes", rest());
      ++position_;
    }
    if (position_ == text_.size()) {
      position_ = first - 1;
      fail_at("a string closed by its quote", rest());
    }
    return text_.substr(first, position_++ - first);
  }

  std::string parse_descr() {
    // A structured dtype is a list of (name, dtype) fields: well formed, but not an array of
    // numbers.
    if (at('[')) {
      fail(call_, where("header 'descr'").c_str(), "a plain dtype string such as '<f4'",
           "a structured dtype (a list of fields)");
    }
    return parse_string("a quoted dtype string such as '<f4'");
  }

  bool parse_bool(const std::string& key) {
    if (text_.compare(position_, 4, "True") == 0) {
      position_ += 4;
      return true;
    }
    if (text_.compare(position_, 5, "False") == 0) {
      position_ += 5;
      return false;
    }
    fail_at("True or False for '" + key + "'", rest());
  }

  // A tuple of non-negative integers, as Python spells it: "()", "(3,)", "(2, 3)", "(2, 3,)".
  std::vector<Index> parse_shape() {
    std::vector<Index> shape;
    expect('(', "a tuple '(...)' for 'shape'");
    skip_spaces();
    bool trailing_comma = false;
    while (!at(')')) {
      shape.push_back(parse_dimension());
      skip_spaces();
      trailing_comma = at(',');
      if (!trailing_comma && !at(')')) fail_at("',' or ')' in the shape tuple", rest());
      if (trailing_comma) ++position_;
      skip_spaces();
    }
    // In Python "(3)" is the integer 3, not a tuple.
    if (shape.size() == 1 && !trailing_comma) fail_at("a one-element tuple written '(n,)'", rest());
    ++position_;  // the ')'
    return shape;
  }

  Index parse_dimension() {
    const std::size_t first = position_;
    const bool negative = at('-');
    if (negative) ++position_;
    if (position_ == text_.size() || text_[position_] < '0' || text_[position_] > '9') {
      position_ = first;
      fail_at("a dimension (a non-negative integer)", rest());
    }
    Index value = 0;
    while (position_ < text_.size() && text_[position_] >= '0' && text_[position_] <= '9') {
      const Index digit = text_[position_] - '0';
      if (__builtin_mul_overflow(value, Index{10}, &value) ||
          __builtin_add_overflow(value, digit, &value)) {
        while (position_ < text_.size() && text_[position_] >= '0' && text_[position_] <= '9')
          ++position_;
        fail(call_, where("header 'shape'").c_str(), "dimensions that fit in a 64-bit Index",
             text_.substr(first, position_ - first));
      }
      ++position_;
    }
    TPATTN_CHECK(!negative, call_, where("header 'shape'").c_str(), "dimensions >= 0",
                 text_.substr(first, position_ - first));
    return value;
  }

  const char* call_;
  const std::string& path_;
  const std::string& text_;
  std::size_t position_ = 0;
};

}  // namespace detail
}  // namespace tpattn
