// The JSON writer of json.h: escaping, round-trip number text, nesting with optional indentation.
#include "cmd/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cmd/util.h"

namespace blm {

std::string json_escape(const std::string& text) {
  // Text from the byte tokenizer can cut a character in half; JSON strings must be valid UTF-8.
  const std::string s = utf8_sanitize(text);
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
  return out;
}

std::string json_number(double x) {
  if (!std::isfinite(x)) return "null";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.15g", x);
  if (std::strtod(buf, nullptr) != x) std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

void JsonWriter::raw(const std::string& s) { out_ += s; }

void JsonWriter::before_value() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (stack_.empty()) return;
  Level& top = stack_.back();
  if (!top.empty) raw(",");
  top.empty = false;
  if (pretty_) raw("\n" + std::string(2 * stack_.size(), ' '));
}

JsonWriter& JsonWriter::begin_object() {
  before_value();
  raw("{");
  stack_.push_back({true, true});
  return *this;
}

JsonWriter& JsonWriter::end_object() {
  const bool was_empty = stack_.back().empty;
  stack_.pop_back();
  if (pretty_ && !was_empty) raw("\n" + std::string(2 * stack_.size(), ' '));
  raw("}");
  return *this;
}

JsonWriter& JsonWriter::begin_array() {
  before_value();
  raw("[");
  stack_.push_back({false, true});
  return *this;
}

JsonWriter& JsonWriter::end_array() {
  const bool was_empty = stack_.back().empty;
  stack_.pop_back();
  if (pretty_ && !was_empty) raw("\n" + std::string(2 * stack_.size(), ' '));
  raw("]");
  return *this;
}

JsonWriter& JsonWriter::key(const std::string& k) {
  before_value();
  raw(json_escape(k));
  raw(pretty_ ? ": " : ":");
  after_key_ = true;
  return *this;
}

JsonWriter& JsonWriter::value(double x) {
  before_value();
  raw(json_number(x));
  return *this;
}

JsonWriter& JsonWriter::value(int64_t x) {
  before_value();
  raw(std::to_string(x));
  return *this;
}

JsonWriter& JsonWriter::value(uint64_t x) {
  before_value();
  raw(std::to_string(x));
  return *this;
}

JsonWriter& JsonWriter::value(const std::string& s) {
  before_value();
  raw(json_escape(s));
  return *this;
}

JsonWriter& JsonWriter::value(bool b) {
  before_value();
  raw(b ? "true" : "false");
  return *this;
}

JsonWriter& JsonWriter::null() {
  before_value();
  raw("null");
  return *this;
}

JsonWriter& JsonWriter::numbers(const std::vector<double>& xs) {
  before_value();
  raw("[");
  for (size_t i = 0; i < xs.size(); ++i) {
    if (i) raw(",");
    raw(json_number(xs[i]));
  }
  raw("]");
  return *this;
}

bool json_find_number(const std::string& text, const std::string& key, double* out) {
  const std::string quoted = json_escape(key);
  size_t pos = 0;
  while ((pos = text.find(quoted, pos)) != std::string::npos) {
    size_t p = pos + quoted.size();
    while (p < text.size() && (text[p] == ' ' || text[p] == '\t')) ++p;
    if (p < text.size() && text[p] == ':') {
      ++p;
      while (p < text.size() && (text[p] == ' ' || text[p] == '\t')) ++p;
      const char* start = text.c_str() + p;
      char* end = nullptr;
      const double v = std::strtod(start, &end);
      if (end == start) return false;  // null or a non-number
      *out = v;
      return true;
    }
    pos = p;
  }
  return false;
}

}  // namespace blm
