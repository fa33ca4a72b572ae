// A small JSON writer for the files barrierlm writes (metrics.jsonl, eval and margins reports),
// and a reader for the one thing read back: a number stored under a key of a flat object we wrote.
//
// Numbers are written in the shortest of %.15g / %.17g that reads back to the same double, so
// logged losses compare bit for bit; non-finite numbers become null (JSON has no NaN or inf).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blm {

std::string json_escape(const std::string& s);  // quoted, with JSON escapes; malformed UTF-8 -> U+FFFD
std::string json_number(double x);              // round-trip text, "null" when not finite

// Builds one JSON value.  Calls nest: begin_object / key / value ... / end_object.
// pretty = true puts each member / element on its own indented line; numbers() arrays stay
// on one line either way (margins.json holds long ones).
class JsonWriter {
 public:
  explicit JsonWriter(bool pretty = false) : pretty_(pretty) {}

  JsonWriter& begin_object();
  JsonWriter& end_object();
  JsonWriter& begin_array();
  JsonWriter& end_array();
  JsonWriter& key(const std::string& k);
  JsonWriter& value(double x);
  JsonWriter& value(int64_t x);
  JsonWriter& value(uint64_t x);  // seeds: the full [0, 2^64)
  JsonWriter& value(int x) { return value(static_cast<int64_t>(x)); }
  JsonWriter& value(const std::string& s);
  JsonWriter& value(const char* s) { return value(std::string(s)); }
  JsonWriter& value(bool b);
  JsonWriter& null();
  JsonWriter& numbers(const std::vector<double>& xs);  // an array of numbers on one line

  template <class T>
  JsonWriter& kv(const std::string& k, const T& v) {
    key(k);
    return value(v);
  }

  const std::string& str() const { return out_; }

 private:
  void before_value();  // comma / newline / indent bookkeeping
  void raw(const std::string& s);
  std::string out_;
  struct Level {
    bool is_object;
    bool empty;
  };
  std::vector<Level> stack_;
  bool pretty_;
  bool after_key_ = false;
};

// The number stored under "key" in a flat JSON object written by JsonWriter; false when the key
// is absent or its value is not a number.  Enough for metrics.jsonl lines and checkpoint META.
bool json_find_number(const std::string& text, const std::string& key, double* out);

}  // namespace blm
