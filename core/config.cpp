// Reads, checks and writes the run configuration (core/config.h).
//
// Every key a user can set is one row of a table (fields()): its section, its name, how its
// value is parsed and printed, and the range check that concerns that value alone.  Checks that
// involve two keys (d_model and n_head, batch_size and grad_accum, ...) are in cross_checks().
// parse_config, apply_override, validate and config_to_yaml all walk the same table, so a key
// added to the table is parsed, checked, overridable and round-tripped without further code.
//
// Messages are one line and name the source and line ("config.yaml:12: unknown key 'train.lrr'
// (did you mean 'train.lr'?)"); user text quoted in them is escaped so it cannot add lines.
#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <sstream>

namespace blm {
namespace {

// ------------------------------------------------------------------ message helpers

// Appends one byte of user text, a control byte escaped as \n, \t or \xNN (so a message stays on
// one line, and a YAML double-quoted scalar reads back exactly).
void append_escaped(std::string& out, unsigned char ch) {
  if (ch == '\n') {
    out += "\\n";
  } else if (ch == '\t') {
    out += "\\t";
  } else if (ch < 0x20 || ch == 0x7f) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "\\x%02x", ch);
    out += buf;
  } else {
    out += static_cast<char>(ch);
  }
}

// User text for a message: control characters escaped (the message stays one line) and long
// text shortened.
std::string printable(const std::string& s, size_t max_len = 60) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (out.size() >= max_len) {
      out += "...";
      break;
    }
    append_escaped(out, static_cast<unsigned char>(s[i]));
  }
  return out;
}

std::string quoted(const std::string& s) { return "'" + printable(s) + "'"; }

// The shortest decimal text that reads back as exactly x (at most 17 significant digits).
std::string format_double(double x) {
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  // "1e-08" -> "1e-8": the same number, as people write it.
  std::string text = buf;
  const size_t e = text.find('e');
  if (e != std::string::npos && e + 2 < text.size()) {
    const size_t digits = e + 2;  // after the sign
    size_t first = digits;
    while (first + 1 < text.size() && text[first] == '0') ++first;
    text.erase(digits, first - digits);
  }
  return text;
}

// What a YAML node is, for "expected X, got Y" messages.
std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null: return "an empty value";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Scalar: return quoted(node.Scalar());
    default: return "nothing";
  }
}

// "source:line" (1-based) when the mark is known, else "source".
std::string location(const std::string& source, const YAML::Mark& mark) {
  if (mark.line < 0) return source;
  return source + ":" + std::to_string(mark.line + 1);
}

// A problem with one value, before we know where the value came from (file:line or --set).
struct ValueError {
  std::string message;  // e.g. "train.steps: expected an integer, got 'abc'"
};

// ------------------------------------------------------------------ scalar parsing

const std::string& scalar_text(const YAML::Node& node, const std::string& key, const char* what) {
  if (!node.IsScalar()) throw ValueError{key + ": expected " + what + ", got " + describe(node)};
  return node.Scalar();
}

// Integers: decimal digits with an optional sign, or a number such as 1e4 that is an exact
// integer.  Returns false for text that is no number at all.
bool parse_integer_text(const std::string& text, long double& value) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) return false;
  const char* text_end = text.c_str() + text.size();  // an embedded NUL must not end the number
  errno = 0;
  char* end = nullptr;
  const long long as_int = std::strtoll(text.c_str(), &end, 10);
  if (end == text_end && errno == 0) {
    value = static_cast<long double>(as_int);
    return true;
  }
  if (end == text_end && errno == ERANGE) {
    value = text[0] == '-' ? -1e30L : 1e30L;  // out of every range we accept
    return true;
  }
  end = nullptr;
  const double as_double = std::strtod(text.c_str(), &end);
  if (end != text_end || !std::isfinite(as_double) || as_double != std::floor(as_double)) return false;
  value = as_double;
  return true;
}

void parse_value(const YAML::Node& node, const std::string& key, int& out) {
  const std::string& text = scalar_text(node, key, "an integer");
  long double v = 0;
  if (!parse_integer_text(text, v)) throw ValueError{key + ": expected an integer, got " + quoted(text)};
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max())
    throw ValueError{key + ": " + printable(text) + " is out of range for an integer"};
  out = static_cast<int>(v);
}

void parse_value(const YAML::Node& node, const std::string& key, uint64_t& out) {
  const std::string& text = scalar_text(node, key, "a non-negative integer");
  const bool digits_only = !text.empty() && text.size() <= 20 &&
                           std::all_of(text.begin(), text.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  errno = 0;
  const unsigned long long v = digits_only ? std::strtoull(text.c_str(), nullptr, 10) : 0;
  if (!digits_only || errno == ERANGE)
    throw ValueError{key + ": expected an integer in [0, 2^64), got " + quoted(text)};
  out = static_cast<uint64_t>(v);
}

void parse_value(const YAML::Node& node, const std::string& key, double& out) {
  const std::string& text = scalar_text(node, key, "a number");
  char* end = nullptr;
  const double v = text.empty() || std::isspace(static_cast<unsigned char>(text[0]))
                       ? NAN
                       : std::strtod(text.c_str(), &end);
  if (end != text.c_str() + text.size() || std::isnan(v))
    throw ValueError{key + ": expected a number, got " + quoted(text)};
  if (!std::isfinite(v)) throw ValueError{key + ": expected a finite number, got " + quoted(text)};
  out = v;
}

// Strings: any scalar; an empty value (`key:` or `key: ~`) is the empty string.
void parse_value(const YAML::Node& node, const std::string& key, std::string& out) {
  if (node.IsNull()) {
    out.clear();
    return;
  }
  out = scalar_text(node, key, "a string");
}

// barrier.layers: a list of layer indices, one index, or "all" (stored as the empty list).
void parse_value(const YAML::Node& node, const std::string& key, std::vector<int>& out) {
  if (node.IsScalar() && node.Scalar() == "all") {
    out.clear();
    return;
  }
  std::vector<int> layers;
  if (node.IsSequence()) {
    for (size_t i = 0; i < node.size(); ++i) {
      int layer = 0;
      parse_value(node[i], key + "[" + std::to_string(i) + "]", layer);
      layers.push_back(layer);
    }
    if (layers.empty())
      throw ValueError{key + ": the list is empty; write 'all' for every layer, or set barrier.lambda: 0 to "
                             "turn the barrier off"};
  } else if (node.IsScalar()) {
    int layer = 0;
    try {
      parse_value(node, key, layer);
    } catch (const ValueError&) {
      throw ValueError{key + ": expected a list of layer indices or 'all', got " + describe(node)};
    }
    layers.push_back(layer);
  } else {
    throw ValueError{key + ": expected a list of layer indices or 'all', got " + describe(node)};
  }
  out = std::move(layers);
}

// ------------------------------------------------------------------ printing values as YAML

std::string to_yaml(int v) { return std::to_string(v); }
std::string to_yaml(uint64_t v) { return std::to_string(v); }
std::string to_yaml(double v) { return format_double(v); }

// A YAML double-quoted scalar: reads back as exactly s whatever it contains (quotes, '#', ': ',
// leading spaces, "null", "123", newlines).  Bytes >= 0x80 pass through as UTF-8.
std::string to_yaml(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else {
      append_escaped(out, static_cast<unsigned char>(c));
    }
  }
  return out + "\"";
}

std::string to_yaml(const std::vector<int>& layers) {
  if (layers.empty()) return "all";
  std::string out = "[";
  for (size_t i = 0; i < layers.size(); ++i) out += (i ? ", " : "") + std::to_string(layers[i]);
  return out + "]";
}

// ------------------------------------------------------------------ single-value checks
// Each returns "" when the value is fine, else the problem ("must be > 0, got -1").

template <class T>
using Check = std::function<std::string(const T&)>;

std::string show(int v) { return std::to_string(v); }
std::string show(double v) { return format_double(v); }

template <class T>
Check<T> no_check() {
  return [](const T&) { return std::string(); };
}

template <class T>
Check<T> at_least(T lo) {
  return [lo](const T& v) { return v >= lo ? "" : "must be >= " + show(lo) + ", got " + show(v); };
}

template <class T>
Check<T> between(T lo, T hi) {
  return [lo, hi](const T& v) {
    return v >= lo && v <= hi ? "" : "must be in [" + show(lo) + ", " + show(hi) + "], got " + show(v);
  };
}

Check<double> positive() {
  return [](const double& v) { return v > 0 ? "" : "must be > 0, got " + show(v); };
}

Check<double> open_unit_interval() {
  return [](const double& v) { return v > 0 && v < 1 ? "" : "must be in (0, 1), got " + show(v); };
}

Check<double> half_open_unit_interval() {
  return [](const double& v) { return v >= 0 && v < 1 ? "" : "must be in [0, 1), got " + show(v); };
}

Check<std::string> one_of(std::vector<std::string> choices) {
  return [choices](const std::string& v) {
    if (std::find(choices.begin(), choices.end(), v) != choices.end()) return std::string();
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
    return "must be one of " + list + "; got " + quoted(v);
  };
}

Check<std::string> not_empty() {
  return [](const std::string& v) { return v.empty() ? "must not be empty" : ""; };
}

// A run's directory name inside out_dir (empty: a timestamp).  One name, not a path: a '/' or
// ".." would put the run outside out_dir, and "latest" is the link to the newest run there.
Check<std::string> directory_name() {
  return [](const std::string& v) -> std::string {
    if (v.find('/') != std::string::npos) return "must be a name, not a path, got " + quoted(v);
    if (v == "." || v == "..") return "must be a directory name, got " + quoted(v);
    if (v == "latest") return "'latest' is the link to the newest run in out_dir: choose another";
    return "";
  };
}

Check<std::vector<int>> distinct_non_negative() {
  return [](const std::vector<int>& layers) {
    for (size_t i = 0; i < layers.size(); ++i) {
      if (layers[i] < 0) return "layer " + std::to_string(layers[i]) + " is negative";
      for (size_t j = 0; j < i; ++j)
        if (layers[j] == layers[i]) return "layer " + std::to_string(layers[i]) + " is listed twice";
    }
    return std::string();
  };
}

// ------------------------------------------------------------------ the table of keys

struct Field {
  std::string section, key;
  std::function<void(Config&, const YAML::Node&)> read;  // throws ValueError
  std::function<std::string(const Config&)> write;       // the value as YAML text
  std::function<std::string(const Config&)> check;       // "" or the problem, without the key
  std::string name() const { return section + "." + key; }
};

// S: the section struct (ModelConfig, ...), T: the value type.
template <class S, class T>
Field make_field(const char* section, const char* key, S Config::*sec, T S::*member, Check<T> check) {
  Field f;
  f.section = section;
  f.key = key;
  const std::string name = f.name();
  f.read = [sec, member, name](Config& c, const YAML::Node& node) { parse_value(node, name, c.*sec.*member); };
  f.write = [sec, member](const Config& c) { return to_yaml(c.*sec.*member); };
  f.check = [sec, member, check](const Config& c) { return check(c.*sec.*member); };
  return f;
}

// The member name is the key name; the macro keeps the two from drifting apart.
#define BLM_FIELD(section, key, check) \
  make_field(#section, #key, &Config::section, &decltype(Config::section)::key, check)

// Upper bounds keep every derived size (3d, 4d, V*d) inside int and size_t arithmetic.
const std::vector<Field>& fields() {
  static const std::vector<Field> table = {
      BLM_FIELD(model, n_layer, between(1, 4096)),
      BLM_FIELD(model, n_head, between(1, 65536)),
      BLM_FIELD(model, d_model, between(1, 1 << 20)),
      BLM_FIELD(model, seq_len, between(1, 1 << 24)),
      BLM_FIELD(model, vocab_size, Check<int>([](const int& v) {
                  return v == 0 || (v >= 2 && v <= (1 << 24))
                             ? std::string()
                             : "must be 0 (from the tokenizer) or in [2, 16777216], got " + show(v);
                })),
      BLM_FIELD(barrier, lambda, at_least(0.0)),
      BLM_FIELD(barrier, eps, positive()),
      BLM_FIELD(barrier, layers, distinct_non_negative()),
      BLM_FIELD(barrier, positions, at_least(0)),
      BLM_FIELD(data, train, no_check<std::string>()),
      BLM_FIELD(data, val, no_check<std::string>()),
      BLM_FIELD(data, format, one_of({"auto", "text", "bin"})),
      BLM_FIELD(data, tokenizer, one_of({"byte", "char", "gpt2"})),
      BLM_FIELD(data, vocab, no_check<std::string>()),
      BLM_FIELD(data, val_fraction, half_open_unit_interval()),
      BLM_FIELD(train, batch_size, at_least(1)),
      BLM_FIELD(train, grad_accum, at_least(1)),
      BLM_FIELD(train, steps, at_least(0)),
      BLM_FIELD(train, lr, positive()),
      BLM_FIELD(train, min_lr_ratio, between(0.0, 1.0)),
      BLM_FIELD(train, warmup, at_least(0)),
      BLM_FIELD(train, schedule, one_of({"cosine", "linear", "constant"})),
      BLM_FIELD(train, weight_decay, at_least(0.0)),
      BLM_FIELD(train, beta1, open_unit_interval()),
      BLM_FIELD(train, beta2, open_unit_interval()),
      BLM_FIELD(train, adam_eps, positive()),
      BLM_FIELD(train, grad_clip, at_least(0.0)),
      BLM_FIELD(train, seed, no_check<uint64_t>()),
      BLM_FIELD(train, log_interval, at_least(1)),
      BLM_FIELD(train, eval_interval, at_least(0)),
      BLM_FIELD(train, eval_batches, at_least(1)),
      BLM_FIELD(train, checkpoint_interval, at_least(0)),
      BLM_FIELD(train, keep_checkpoints, at_least(0)),
      BLM_FIELD(train, out_dir, not_empty()),
      BLM_FIELD(train, run_name, directory_name()),
      BLM_FIELD(train, init, no_check<std::string>()),
      BLM_FIELD(device, backend, one_of({"cpu", "cuda", "auto"})),
      BLM_FIELD(device, precision, one_of({"fp32", "bf16", "fp64", "auto"})),
      BLM_FIELD(device, threads, at_least(0)),
      BLM_FIELD(device, gpus, between(1, 1024)),
  };
  return table;
}
#undef BLM_FIELD

const std::vector<std::string>& section_names() {
  static const std::vector<std::string> names = {"model", "barrier", "data", "train", "device"};
  return names;
}

const Field* find_field(const std::string& section, const std::string& key) {
  for (const Field& f : fields())
    if (f.section == section && f.key == key) return &f;
  return nullptr;
}

// ------------------------------------------------------------------ checks across keys

struct CrossCheck {
  std::vector<std::string> keys;  // the keys involved; the first one present locates the error
  bool model_only;
  std::function<std::string(const Config&)> check;  // "" or the whole message
};

const std::vector<CrossCheck>& cross_checks() {
  static const std::vector<CrossCheck> checks = {
      {{"model.d_model", "model.n_head"}, true,
       [](const Config& c) -> std::string {
         if (c.model.d_model % c.model.n_head == 0) return "";
         return "model.d_model (" + show(c.model.d_model) + ") must be divisible by model.n_head (" +
                show(c.model.n_head) + ")";
       }},
      {{"train.grad_accum", "train.batch_size", "device.gpus"}, false,
       [](const Config& c) -> std::string {
         const long long parts = static_cast<long long>(c.train.grad_accum) * c.device.gpus;
         if (c.train.batch_size % parts == 0) return "";
         if (c.device.gpus == 1)
           return "train.batch_size (" + show(c.train.batch_size) + ") must be divisible by train.grad_accum (" +
                  show(c.train.grad_accum) + ")";
         return "train.batch_size (" + show(c.train.batch_size) +
                ") must be divisible by train.grad_accum x device.gpus (" + show(c.train.grad_accum) + " x " +
                show(c.device.gpus) + " = " + std::to_string(parts) + ")";
       }},
      {{"barrier.layers", "model.n_layer"}, false,
       [](const Config& c) -> std::string {
         for (int l : c.barrier.layers)
           if (l < 0 || l >= c.model.n_layer)
             return "barrier.layers: layer " + show(l) + " is outside [0, " + show(c.model.n_layer) +
                    ") (model.n_layer is " + show(c.model.n_layer) + ")";
         return "";
       }},
      {{"data.vocab", "data.tokenizer"}, false,
       [](const Config& c) -> std::string { return gpt2_vocab_problem(c.data); }},
      {{"device.precision", "device.backend"}, false,
       [](const Config& c) -> std::string {
         if (c.device.precision == "fp64" && c.device.backend == "cuda")
           return "device.precision: fp64 runs on the cpu backend only (device.backend is cuda)";
         return "";
       }},
  };
  return checks;
}

struct Problem {
  std::vector<std::string> keys;  // where to point: the first key the source mentions
  std::string message;
};

// The first problem of c (model keys only when model_only), or false.
bool find_problem(const Config& c, bool model_only, Problem& out) {
  for (const Field& f : fields()) {
    if (model_only && f.section != "model") continue;
    const std::string why = f.check(c);
    if (!why.empty()) {
      out = Problem{{f.name()}, f.name() + ": " + why};
      return true;
    }
  }
  for (const CrossCheck& x : cross_checks()) {
    if (model_only && !x.model_only) continue;
    const std::string why = x.check(c);
    if (!why.empty()) {
      out = Problem{x.keys, why};
      return true;
    }
  }
  return false;
}

// ------------------------------------------------------------------ did you mean

// Edits (insert, delete, substitute, swap two neighbours) that turn a into b: the optimal string
// alignment distance, so "trian" is one edit from "train".
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// The candidate closest to word, if close enough to be a plausible typo; else "".
std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const std::string& c : candidates) {
    const size_t d = edit_distance(lower(word), c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  const size_t allowed = std::min<size_t>(2, std::max<size_t>(1, word.size() / 3));
  return best_distance <= allowed ? best : "";
}

std::string did_you_mean(const std::string& suggestion) {
  return suggestion.empty() ? "" : " (did you mean '" + suggestion + "'?)";
}

// Suggestion for an unknown key in a known section: the same key in another section, else a
// near miss in this one.
std::string suggest_key(const std::string& section, const std::string& key) {
  for (const Field& f : fields())
    if (f.key == key && f.section != section) return f.name();
  std::vector<std::string> keys;
  for (const Field& f : fields())
    if (f.section == section) keys.push_back(f.key);
  const std::string k = closest(key, keys);
  return k.empty() ? "" : section + "." + k;
}

// A near-miss section name, or "".
std::string suggest_section(const std::string& name) { return closest(name, section_names()); }

// The full name of the key that name spells ("lr" or "train.lr"), or "".
std::string key_named(const std::string& name) {
  for (const Field& f : fields())
    if (f.key == name || f.name() == name) return f.name();
  return "";
}

// An unknown top-level name in a YAML file: a misspelt section, or a key outside its section.
std::string unknown_section_message(const std::string& name) {
  std::string message = "unknown section " + quoted(name);
  const std::string section = suggest_section(name);
  if (!section.empty()) return message + did_you_mean(section);
  const std::string key = key_named(name);
  if (!key.empty()) {
    const std::string sec = key.substr(0, key.find('.'));
    return message + " (" + quoted(key) + " is a key: write it under '" + sec + ":')";
  }
  return message + "; the sections are model, barrier, data, train, device";
}

std::string unknown_key_message(const std::string& section, const std::string& key) {
  if (std::find(section_names().begin(), section_names().end(), section) == section_names().end())
    return "unknown section " + quoted(section) + did_you_mean(suggest_section(section));
  return "unknown key " + quoted(section + "." + key) + did_you_mean(suggest_key(section, key));
}

// ------------------------------------------------------------------ reading a YAML document

// Where each key was given, for validation messages.
using KeyLines = std::map<std::string, YAML::Mark>;

std::string key_text(const YAML::Node& key, const std::string& source) {
  if (!key.IsScalar())
    throw ConfigError(location(source, key.Mark()) + ": expected a key name, got " + describe(key));
  return key.Scalar();
}

void read_section(const std::string& section, const YAML::Node& body, const std::string& source, Config& c,
                  KeyLines& lines) {
  if (body.IsNull()) return;  // "train:" with nothing under it
  if (!body.IsMap())
    throw ConfigError(location(source, body.Mark()) + ": section '" + section + "' must be a mapping of keys, got " +
                      describe(body));
  for (auto it = body.begin(); it != body.end(); ++it) {
    const std::string key = key_text(it->first, source);
    const Field* field = find_field(section, key);
    if (!field) throw ConfigError(location(source, it->first.Mark()) + ": " + unknown_key_message(section, key));
    const auto seen = lines.find(field->name());
    if (seen != lines.end())
      throw ConfigError(location(source, it->first.Mark()) + ": duplicate key " + quoted(field->name()) +
                        " (first given at line " + std::to_string(seen->second.line + 1) + ")");
    lines[field->name()] = it->first.Mark();
    try {
      field->read(c, it->second);
      const std::string why = field->check(c);
      if (!why.empty()) throw ValueError{field->name() + ": " + why};
    } catch (const ValueError& e) {
      // An empty value has no place of its own (its mark is the next token's): use the key's.
      const YAML::Mark& mark = it->second.IsNull() ? it->first.Mark() : it->second.Mark();
      throw ConfigError(location(source, mark) + ": " + e.message);
    }
  }
}

void read_document(const YAML::Node& root, const std::string& source, Config& c, KeyLines& lines) {
  if (root.IsNull()) return;  // an empty file: every default
  if (!root.IsMap())
    throw ConfigError(location(source, root.Mark()) +
                      ": expected sections (model, barrier, data, train, device) at the top level, got " +
                      describe(root));
  std::map<std::string, YAML::Mark> sections_seen;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string section = key_text(it->first, source);
    if (std::find(section_names().begin(), section_names().end(), section) == section_names().end())
      throw ConfigError(location(source, it->first.Mark()) + ": " + unknown_section_message(section));
    if (sections_seen.count(section))
      throw ConfigError(location(source, it->first.Mark()) + ": duplicate section " + quoted(section) +
                        " (first given at line " + std::to_string(sections_seen[section].line + 1) + ")");
    sections_seen[section] = it->first.Mark();
    read_section(section, it->second, source, c, lines);
  }
}

// The name an override "section.key=value" assigns, without the spaces around it.
std::string override_name(const std::string& assignment) {
  std::string name = assignment.substr(0, assignment.find('='));
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.front()))) name.erase(0, 1);
  return name;
}

// The --set assignment of each key the overrides set ("section.key" -> "section.key=value"),
// the last one where a key is set twice.
std::map<std::string, std::string> overridden_keys(const std::vector<std::string>& overrides) {
  std::map<std::string, std::string> keys;
  for (const std::string& a : overrides) keys[override_name(a)] = a;
  return keys;
}

// Cross-key validation after reading and the overrides, pointing at a key involved: a --set
// that gave one its value (the newer cause), else the file's line of the first key it has.
void validate_with_lines(const Config& c, const std::string& source, const KeyLines& lines,
                         const std::vector<std::string>& overrides = {}) {
  Problem problem;
  if (!find_problem(c, false, problem)) return;
  const auto set_by = overridden_keys(overrides);
  for (const std::string& key : problem.keys) {
    const auto set = set_by.find(key);
    if (set != set_by.end())
      throw ConfigError("--set " + quoted(set->second) + ": " + problem.message);
  }
  for (const std::string& key : problem.keys) {
    const auto it = lines.find(key);
    if (it != lines.end()) throw ConfigError(location(source, it->second) + ": " + problem.message);
  }
  throw ConfigError(source + ": " + problem.message);
}

// Where the quoted scalar starting at column `col` of `line` ends on that line: the index just
// past its closing quote, or npos when it does not close there.  '' inside single quotes and a
// backslash escape inside double quotes do not close it.
size_t closing_quote(const std::string& line, size_t col) {
  const char q = line[col];
  for (size_t i = col + 1; i < line.size(); ++i) {
    if (q == '"' && line[i] == '\\') {
      ++i;
    } else if (line[i] == q) {
      if (q == '\'' && i + 1 < line.size() && line[i + 1] == '\'') {
        ++i;
      } else {
        return i + 1;
      }
    }
  }
  return std::string::npos;
}

// YAML lets a quoted value run over several lines, so a quote left open swallows the rest of
// the file into one value (yaml-cpp does not even insist on the closing quote at its end): a
// config whose later keys silently vanish.  Every config value fits on one line, so a quoted
// scalar (key or value) that does not close on its first line is refused.
void check_quotes_closed(const YAML::Node& node, const std::vector<std::string>& lines,
                         const std::string& source) {
  if (node.IsMap()) {
    for (auto it = node.begin(); it != node.end(); ++it) {
      check_quotes_closed(it->first, lines, source);
      check_quotes_closed(it->second, lines, source);
    }
  } else if (node.IsSequence()) {
    for (const YAML::Node& item : node) check_quotes_closed(item, lines, source);
  } else if (node.IsScalar() && node.Tag() == "!") {  // "!": a quoted (non-plain) scalar
    const YAML::Mark m = node.Mark();
    if (m.line < 0 || static_cast<size_t>(m.line) >= lines.size()) return;
    const std::string& line = lines[static_cast<size_t>(m.line)];
    const size_t col = static_cast<size_t>(std::max(0, m.column));
    if (col >= line.size() || (line[col] != '"' && line[col] != '\'')) return;
    if (closing_quote(line, col) == std::string::npos)
      throw ConfigError(location(source, m) + ": the quoted value " +
                        printable(line.substr(col), 40) +
                        " is not closed on this line (a config value is one line)");
  }
}

// YAML reads a value that starts with '*' as a reference to an anchor ('&'): a glob such as
// *.bin must be quoted.
std::string alias_hint(const std::string& value) {
  const size_t start = value.find_first_not_of(" \t");
  if (start == std::string::npos || (value[start] != '*' && value[start] != '&')) return "";
  return " (YAML reads a value starting with '" + std::string(1, value[start]) +
         "' as an anchor reference: quote it, e.g. \"" + value.substr(start) + "\")";
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

YAML::Node load_yaml(const std::string& text, const std::string& source) {
  try {
    // A config is one document: keys after a '---' (or '...') would be silently ignored.
    const std::vector<YAML::Node> documents = YAML::LoadAll(text);
    for (size_t i = 1; i < documents.size(); ++i)
      if (!documents[i].IsNull())
        throw ConfigError(location(source, documents[i].Mark()) +
                          ": a second YAML document (after '---' or '...'): a config is one "
                          "document; remove the separator");
    return documents.empty() ? YAML::Node() : documents[0];
  } catch (const YAML::Exception& e) {
    std::string where = source;
    if (e.mark.line >= 0) where += ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1);
    std::string hint;
    if (e.mark.line >= 0) {
      const std::vector<std::string> lines = split_lines(text);
      if (static_cast<size_t>(e.mark.line) < lines.size()) {
        const std::string& line = lines[static_cast<size_t>(e.mark.line)];
        const size_t colon = line.find(": ");
        if (colon != std::string::npos) hint = alias_hint(line.substr(colon + 2));
      }
    }
    throw ConfigError(where + ": invalid YAML: " + printable(e.msg, 200) + hint);
  }
}

}  // namespace

// ------------------------------------------------------------------ public interface

std::string gpt2_vocab_problem(const DataConfig& d) {
  if (d.tokenizer != "gpt2" || !d.vocab.empty()) return "";
  return "data.vocab is empty: data.tokenizer gpt2 needs it, the directory holding GPT-2's "
         "encoder.json and vocab.bpe (scripts/get-data.sh --gpt2-vocab downloads them)";
}

void validate(const ModelConfig& m) {
  Config c;
  c.model = m;
  Problem problem;
  if (find_problem(c, true, problem)) throw ConfigError(problem.message);
}

void validate(const Config& c) {
  Problem problem;
  if (find_problem(c, false, problem)) throw ConfigError(problem.message);
}

Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides) {
  Config c;
  KeyLines lines;
  try {
    const YAML::Node root = load_yaml(yaml_text, source_name);
    check_quotes_closed(root, split_lines(yaml_text), source_name);
    read_document(root, source_name, c, lines);
  } catch (const YAML::Exception& e) {  // a node operation on a malformed document
    throw ConfigError(source_name + ": invalid YAML: " + printable(e.msg, 200));
  }
  for (const std::string& a : overrides) apply_override(c, a);
  validate_with_lines(c, source_name, lines, overrides);
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  const auto fail = [&](int err) { throw ConfigError("cannot read config " + quoted(path) + ": " + std::strerror(err)); };
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(errno);
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  const int err = std::ferror(f) ? errno : 0;  // e.g. EISDIR: a directory opens but cannot be read
  std::fclose(f);
  if (err) fail(err);
  return parse_config(text, path, overrides);
}

void apply_override(Config& c, const std::string& assignment) {
  const std::string where = "--set " + quoted(assignment);
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos) throw ConfigError(where + ": expected section.key=value");
  const std::string name = override_name(assignment);
  const size_t dot = name.find('.');
  if (dot == std::string::npos)
    throw ConfigError(where + ": expected section.key=value" + did_you_mean(key_named(name)));
  const std::string section = name.substr(0, dot), key = name.substr(dot + 1);
  const Field* field = find_field(section, key);
  if (!field) throw ConfigError(where + ": " + unknown_key_message(section, key));
  YAML::Node value;
  const std::string text = assignment.substr(eq + 1);
  try {
    value = YAML::Load(text);
    check_quotes_closed(value, {text}, where);
  } catch (const YAML::Exception& e) {
    throw ConfigError(where + ": invalid value: " + printable(e.msg, 200) + alias_hint(text));
  }
  Config updated = c;  // c is left as it was when the value is rejected
  try {
    field->read(updated, value);
    const std::string why = field->check(updated);
    if (!why.empty()) throw ValueError{field->name() + ": " + why};
  } catch (const ValueError& e) {
    throw ConfigError(where + ": " + e.message);
  } catch (const YAML::Exception& e) {
    throw ConfigError(where + ": invalid value: " + printable(e.msg, 200));
  }
  c = std::move(updated);
}

std::string config_to_yaml(const Config& c) {
  std::string out;
  std::string section;
  for (const Field& f : fields()) {
    if (f.section != section) {
      section = f.section;
      out += section + ":\n";
    }
    out += "  " + f.key + ": " + f.write(c) + "\n";
  }
  return out;
}

}  // namespace blm
