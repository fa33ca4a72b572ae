// The JSON reader of json_reader.h: a recursive-descent parser over the RFC 8259 grammar that
// tracks line and column for its error messages, and typed accessors that name the missing or
// mistyped key.
#include "data/json_reader.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "data/utf8.h"

namespace blm {

JsonValue JsonValue::make_bool(bool b) {
  JsonValue v;
  v.kind_ = Kind::Bool;
  v.bool_ = b;
  return v;
}
JsonValue JsonValue::make_number(double x) {
  JsonValue v;
  v.kind_ = Kind::Number;
  v.number_ = x;
  return v;
}
JsonValue JsonValue::make_string(std::string s) {
  JsonValue v;
  v.kind_ = Kind::String;
  v.string_ = std::move(s);
  return v;
}
JsonValue JsonValue::make_array() {
  JsonValue v;
  v.kind_ = Kind::Array;
  return v;
}
JsonValue JsonValue::make_object() {
  JsonValue v;
  v.kind_ = Kind::Object;
  return v;
}

double JsonValue::number_or_nan() const { return kind_ == Kind::Number ? number_ : NAN; }

const JsonValue* JsonValue::find(const std::string& key) const {
  for (const auto& m : members_)
    if (m.first == key) return &m.second;
  return nullptr;
}

namespace {

// Nesting deeper than this is not something barrierlm writes; refusing it keeps the recursion
// bounded on hostile input.
constexpr int kMaxDepth = 256;

class Parser {
 public:
  Parser(const std::string& text, const std::string& source, int first_line)
      : s_(text), source_(source), line_(first_line) {}

  JsonValue document() {
    skip_space();
    JsonValue v = value(0);
    skip_space();
    if (pos_ < s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(source_ + ":" + std::to_string(line_) + ":" +
                std::to_string(pos_ - line_start_ + 1) + ": " + what);
  }
  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }
  void advance() {
    if (s_[pos_] == '\n') {
      ++line_;
      line_start_ = pos_ + 1;
    }
    ++pos_;
  }
  void skip_space() {
    while (!at_end() && (peek() == ' ' || peek() == '\t' || peek() == '\n' || peek() == '\r'))
      advance();
  }
  void expect(char c, const char* what) {
    if (peek() != c) fail(std::string("expected ") + what + found());
    advance();
  }
  std::string found() const {
    if (at_end()) return " but the text ends";
    const char c = peek();
    if (c >= 0x20 && c < 0x7f) return std::string(" but found '") + c + "'";
    return " but found byte " + std::to_string(static_cast<unsigned char>(c));
  }

  JsonValue value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    const char c = peek();
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') return JsonValue::make_string(string());
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    if (literal("true")) return JsonValue::make_bool(true);
    if (literal("false")) return JsonValue::make_bool(false);
    if (literal("null")) return JsonValue::make_null();
    fail(std::string("expected a JSON value") + found());
  }

  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    for (size_t i = 0; i < n; ++i) advance();
    return true;
  }

  JsonValue object(int depth) {
    JsonValue v = JsonValue::make_object();
    advance();  // {
    skip_space();
    if (peek() == '}') {
      advance();
      return v;
    }
    for (;;) {
      skip_space();
      if (peek() != '"') fail(std::string("expected a quoted key") + found());
      std::string key = string();
      skip_space();
      expect(':', "':' after a key");
      skip_space();
      v.set(std::move(key), value(depth + 1));
      skip_space();
      if (peek() == ',') {
        advance();
        continue;
      }
      expect('}', "',' or '}' in an object");
      return v;
    }
  }

  JsonValue array(int depth) {
    JsonValue v = JsonValue::make_array();
    advance();  // [
    skip_space();
    if (peek() == ']') {
      advance();
      return v;
    }
    for (;;) {
      skip_space();
      v.push(value(depth + 1));
      skip_space();
      if (peek() == ',') {
        advance();
        continue;
      }
      expect(']', "',' or ']' in an array");
      return v;
    }
  }

  JsonValue number() {
    // Check the grammar first (strtod accepts more: hex, inf, leading '+'), then convert.
    const size_t start = pos_;
    if (peek() == '-') advance();
    if (peek() == '0') {
      advance();
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') advance();
    } else {
      fail(std::string("expected a digit") + found());
    }
    if (peek() == '.') {
      advance();
      if (!(peek() >= '0' && peek() <= '9'))
        fail(std::string("expected a digit after '.'") + found());
      while (peek() >= '0' && peek() <= '9') advance();
    }
    if (peek() == 'e' || peek() == 'E') {
      advance();
      if (peek() == '+' || peek() == '-') advance();
      if (!(peek() >= '0' && peek() <= '9')) fail(std::string("expected an exponent") + found());
      while (peek() >= '0' && peek() <= '9') advance();
    }
    const std::string text = s_.substr(start, pos_ - start);
    return JsonValue::make_number(std::strtod(text.c_str(), nullptr));
  }

  unsigned hex4() {
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = peek();
      int d = -1;
      if (c >= '0' && c <= '9') d = c - '0';
      else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
      if (d < 0) fail(std::string("expected 4 hex digits after \\u") + found());
      v = v * 16 + static_cast<unsigned>(d);
      advance();
    }
    return v;
  }

  // A \u escape, with a following low surrogate when it is a high one.  A lone surrogate becomes
  // U+FFFD (it has no UTF-8 form).
  unsigned unicode_escape() {
    unsigned cp = hex4();
    if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(pos_, 2, "\\u") == 0) {
      const size_t save = pos_, save_line = line_, save_start = line_start_;
      advance();
      advance();
      const unsigned lo = hex4();
      if (lo >= 0xDC00 && lo < 0xE000) return 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
      pos_ = save;  // not a pair: read the second escape on its own
      line_ = static_cast<int>(save_line);
      line_start_ = save_start;
    }
    return cp >= 0xD800 && cp < 0xE000 ? 0xFFFD : cp;
  }

  std::string string() {
    advance();  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string");
      const char c = peek();
      if (c == '"') {
        advance();
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character inside a string");
      if (c != '\\') {
        out += c;
        advance();
        continue;
      }
      advance();
      const char e = peek();
      if (at_end()) fail("unterminated string");
      advance();
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': out += utf8_encode(unicode_escape()); break;
        default: fail(std::string("unknown escape '\\") + e + "'");
      }
    }
  }

  const std::string& s_;
  const std::string& source_;
  size_t pos_ = 0;
  int line_;
  size_t line_start_ = 0;
};

std::string member_path(const std::string& where, const std::string& key) {
  return where.empty() ? key : where + "." + key;
}

}  // namespace

JsonValue parse_json(const std::string& text, const std::string& source, int first_line) {
  return Parser(text, source, first_line).document();
}

const JsonValue& json_member(const JsonValue& object, const std::string& key,
                             const std::string& source, const std::string& where) {
  if (!object.is_object())
    throw Error(source + ": '" + (where.empty() ? std::string("(top level)") : where) +
                "' is not a JSON object");
  const JsonValue* v = object.find(key);
  if (!v) throw Error(source + ": key '" + member_path(where, key) + "' is missing");
  return *v;
}

double json_get_number(const JsonValue& object, const std::string& key, const std::string& source,
                       const std::string& where) {
  const JsonValue& v = json_member(object, key, source, where);
  if (!v.is_number() && !v.is_null())
    throw Error(source + ": '" + member_path(where, key) + "' is not a number");
  return v.number_or_nan();
}

std::string json_get_string(const JsonValue& object, const std::string& key,
                            const std::string& source, const std::string& where) {
  const JsonValue& v = json_member(object, key, source, where);
  if (!v.is_string()) throw Error(source + ": '" + member_path(where, key) + "' is not a string");
  return v.as_string();
}

const std::vector<JsonValue>& json_get_array(const JsonValue& object, const std::string& key,
                                             const std::string& source, const std::string& where) {
  const JsonValue& v = json_member(object, key, source, where);
  if (!v.is_array()) throw Error(source + ": '" + member_path(where, key) + "' is not an array");
  return v.items();
}

std::vector<double> json_get_numbers(const JsonValue& object, const std::string& key,
                                     const std::string& source, const std::string& where) {
  std::vector<double> out;
  const auto& items = json_get_array(object, key, source, where);
  for (size_t i = 0; i < items.size(); ++i) {
    if (!items[i].is_number() && !items[i].is_null())
      throw Error(source + ": '" + member_path(where, key) + "[" + std::to_string(i) +
                  "]' is not a number");
    out.push_back(items[i].number_or_nan());
  }
  return out;
}

}  // namespace blm
