// A small JSON reader: parses the eval and margins JSON files and the metrics.jsonl lines that
// barrierlm itself writes (cmd/json.h writes them; `barrierlm report` reads them back), and
// GPT-2's encoder.json (the gpt2 tokenizer), into a tree of JsonValue.  Strict RFC 8259 syntax;
// errors are blm::Error naming "source:line:column" and what was expected, so a truncated or
// hand-edited file is reported precisely.  Numbers are doubles (JSON null, which the writer uses
// for non-finite numbers, reads back as NaN through number_or_nan()).
#pragma once
#include <string>
#include <vector>

#include "core/error.h"

namespace blm {

class JsonValue {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  JsonValue() = default;
  static JsonValue make_null() { return JsonValue(); }
  static JsonValue make_bool(bool b);
  static JsonValue make_number(double x);
  static JsonValue make_string(std::string s);
  static JsonValue make_array();
  static JsonValue make_object();

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_number() const { return kind_ == Kind::Number; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_object() const { return kind_ == Kind::Object; }

  bool as_bool() const { return bool_; }
  double as_number() const { return number_; }
  const std::string& as_string() const { return string_; }
  // Numbers as they are, null as NaN (the writer's spelling of a non-finite number).
  double number_or_nan() const;

  // Arrays.
  const std::vector<JsonValue>& items() const { return items_; }
  void push(JsonValue v) { items_.push_back(std::move(v)); }
  // Objects: members in file order; find() returns nullptr when the key is absent.
  const std::vector<std::pair<std::string, JsonValue>>& members() const { return members_; }
  const JsonValue* find(const std::string& key) const;
  void set(std::string key, JsonValue v) { members_.emplace_back(std::move(key), std::move(v)); }

 private:
  Kind kind_ = Kind::Null;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<JsonValue> items_;
  std::vector<std::pair<std::string, JsonValue>> members_;
};

// Parses one JSON document (surrounding whitespace allowed, nothing else after it).
// source names the text in error messages ("runs/a/eval.json"); first_line is the line number of
// the text's first line (for one line of a .jsonl file).  Throws blm::Error
// "source:line:col: <problem>".
JsonValue parse_json(const std::string& text, const std::string& source, int first_line = 1);

// Typed access that names the file and the key when a value is missing or of the wrong type:
// "runs/a/eval.json: key 'levels' is missing" / "...: 'levels[2].noise' is not a number".
// `where` is the path of `object` inside the document, "" for the top level.
const JsonValue& json_member(const JsonValue& object, const std::string& key,
                             const std::string& source, const std::string& where = "");
double json_get_number(const JsonValue& object, const std::string& key, const std::string& source,
                       const std::string& where = "");  // null reads as NaN
std::string json_get_string(const JsonValue& object, const std::string& key,
                            const std::string& source, const std::string& where = "");
const std::vector<JsonValue>& json_get_array(const JsonValue& object, const std::string& key,
                                             const std::string& source,
                                             const std::string& where = "");
// An array of numbers (nulls as NaN).
std::vector<double> json_get_numbers(const JsonValue& object, const std::string& key,
                                     const std::string& source, const std::string& where = "");

}  // namespace blm
