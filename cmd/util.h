// Small helpers shared by the subcommands: usage errors, text cleaning for JSON/HTML, human
// formatting of numbers and durations, statistics over samples, and file helpers.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"

namespace blm {

// A bad command-line value that CLI11 could not check itself (e.g. a malformed --noise list):
// printed like every error, but exits 2 like CLI11's usage errors.
struct UsageError : Error {
  using Error::Error;
};

// Replaces each malformed UTF-8 byte with U+FFFD, so text from the byte tokenizer (which can cut
// a character in half) is valid in JSON and HTML.
std::string utf8_sanitize(const std::string& s);
// Length of the well-formed UTF-8 character starting at s[i], or 0 when the bytes there are
// malformed (stray continuation, truncated, overlong, surrogate, above U+10FFFF).
size_t utf8_char_length(const std::string& s, size_t i);
// Escapes &, <, >, " and ' for HTML text and attribute values.
std::string html_escape(const std::string& s);
// One-line form of a token's text for terminal tables: newline -> "\n", tab -> "\t", etc.
std::string visible_text(const std::string& s);
// s as one word of a POSIX shell command line: as it is when that is safe, else single-quoted
// ("barrier.layers=[0, 2]" -> "'barrier.layers=[0, 2]'").
std::string shell_quote(const std::string& s);

std::string format_duration(double seconds);  // "42s", "3m07s", "1h02m"
std::string format_rate(double per_second);   // "950", "12.3k", "4.56M"
// "%.{digits}f", "nan"/"inf" spelled out; a value that rounds to zero has no sign ("0.000", not
// "-0.000").
std::string format_fixed(double x, int digits);
std::string format_general(double x, int digits = 4);  // "%.{digits}g"

// Quantile q in [0, 1] of sorted values, linear interpolation between order statistics.
double quantile_sorted(const std::vector<double>& sorted, double q);
double mean_of(const std::vector<double>& xs);
// Sample standard deviation (n - 1 in the denominator); 0 for fewer than two values.
double stddev_of(const std::vector<double>& xs);

// Whole file as a string; throws Error naming the path when it cannot be read.
std::string read_text_file(const std::string& path);
// Whether standard output is a terminal (progress lines update in place only there).
bool stdout_is_terminal();

// One line on standard error that updates in place while a command works, when standard error
// is a terminal (nothing otherwise): "<text>, ETA 1m20s", the time left from the share done.
class StatusLine {
 public:
  StatusLine();
  bool on() const { return on_; }
  double seconds() const;  // since the line was made
  // Shows text, and the ETA while 0 < done < total.
  void show(const std::string& text, double done, double total) const;
  void clear() const;  // the line erased (before the command's own output)

 private:
  bool on_;
  std::chrono::steady_clock::time_point start_;
};
// The width of the terminal on standard output in columns; 80 when unknown.
int terminal_columns();

// Checks, before a command's work, that it will be able to write the file `path` (atomically:
// through a temporary file next to it): path is not a directory, and its directory exists and is
// writable or, with create_dir, can be created.  Creates nothing.  Throws Error naming the path,
// so that a bad --out fails at once rather than after the whole computation.
void check_output_file(const std::string& path, bool create_dir = false);
// The same for a directory the command creates when missing (`what` names it in the message,
// e.g. "output directory"): dir is a writable directory, or can be created.
void check_output_dir(const std::string& dir, const std::string& what);
// Local time as "20261128-153000" (run names).
std::string timestamp_now();
// Local time as ISO 8601, "2026-11-28T15:30:00" (metadata).
std::string iso_time_now();

}  // namespace blm
