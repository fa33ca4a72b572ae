// Helpers of util.h: text cleaning, human formatting, sample statistics, file and time helpers.
#include "cmd/util.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/utf8.h"

namespace fs = std::filesystem;

namespace blm {

size_t utf8_char_length(const std::string& s, size_t i) {
  size_t end = i;
  uint32_t code_point;
  return utf8_next(s.data(), s.size(), end, code_point) ? end - i : 0;
}

std::string utf8_sanitize(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t len = utf8_char_length(s, i);
    if (len == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD REPLACEMENT CHARACTER
      ++i;
    } else {
      out.append(s, i, len);
      i += len;
    }
  }
  return out;
}

std::string html_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string visible_text(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return utf8_sanitize(out);
}

std::string shell_quote(const std::string& s) {
  const auto safe = [](unsigned char c) {
    return std::isalnum(c) || std::strchr("_./=,:+@%-", c) != nullptr;
  };
  if (!s.empty() && std::all_of(s.begin(), s.end(), safe)) return s;
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const long s = std::lround(seconds);
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%lds", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  return buf;
}

std::string format_rate(double x) {
  char buf[32];
  if (!std::isfinite(x)) return "?";
  if (x < 1e3) std::snprintf(buf, sizeof buf, "%.0f", x);
  else if (x < 1e6) std::snprintf(buf, sizeof buf, "%.1fk", x / 1e3);
  else if (x < 1e9) std::snprintf(buf, sizeof buf, "%.2fM", x / 1e6);
  else std::snprintf(buf, sizeof buf, "%.2fG", x / 1e9);
  return buf;
}

std::string format_fixed(double x, int digits) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, x);
  // -0.0004 at three digits prints "-0.000", which reads as a negative number: a value that
  // rounds to zero loses its sign.
  if (buf[0] == '-' && buf[1 + std::strspn(buf + 1, "0.")] == '\0') return buf + 1;
  return buf;
}

std::string format_general(double x, int digits) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", digits, x);
  return buf;
}

double quantile_sorted(const std::vector<double>& v, double q) {
  if (v.empty()) return NAN;
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  const double frac = pos - static_cast<double>(lo);
  if (frac == 0 || v[lo] == v[hi]) return v[lo];  // also keeps -inf - -inf from making nan
  return v[lo] + frac * (v[hi] - v[lo]);
}

double mean_of(const std::vector<double>& xs) {
  if (xs.empty()) return NAN;
  double s = 0;
  for (double x : xs) s += x;
  return s / static_cast<double>(xs.size());
}

double stddev_of(const std::vector<double>& xs) {
  if (xs.size() < 2) return 0;
  const double m = mean_of(xs);
  double s = 0;
  for (double x : xs) s += (x - m) * (x - m);
  return std::sqrt(s / static_cast<double>(xs.size() - 1));
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool stdout_is_terminal() { return isatty(STDOUT_FILENO) != 0; }

StatusLine::StatusLine()
    : on_(isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}

double StatusLine::seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void StatusLine::show(const std::string& text, double done, double total) const {
  if (!on_) return;
  std::string line = "\r\033[K" + text;
  if (done > 0 && done < total)
    line += ", ETA " + format_duration(seconds() / done * (total - done));
  std::fputs(line.c_str(), stderr);
}

void StatusLine::clear() const {
  if (on_) std::fputs("\r\033[K", stderr);
}

int terminal_columns() {
  winsize ws{};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;  // not a terminal, or one that does not know its size (a new pty says 0)
}

namespace {

// Why nothing can be created in the existing path dir; "" when something can.
std::string directory_problem(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "'" + dir.string() + "' is not a directory";
  if (access(dir.c_str(), W_OK | X_OK) != 0)
    return "'" + dir.string() + "': " + std::strerror(errno);
  return "";
}

// The nearest of dir and its ancestors that exists: what create_directories would build on.
fs::path nearest_existing(fs::path dir) {
  std::error_code ec;
  while (!fs::exists(dir, ec)) {
    const fs::path parent = dir.parent_path();
    if (parent.empty()) return ".";  // a relative path none of whose parts exist yet
    if (parent == dir) return dir;   // the root; is_directory will say what is wrong
    dir = parent;
  }
  return dir;
}

}  // namespace

void check_output_file(const std::string& path, bool create_dir) {
  const auto fail = [&](const std::string& why) {
    throw Error("cannot write '" + path + "': " + why);
  };
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail("it is a directory");
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  if (!create_dir && !fs::exists(dir, ec)) fail("directory '" + dir.string() + "' does not exist");
  const std::string why = directory_problem(nearest_existing(dir));
  if (!why.empty()) fail(why);
}

void check_output_dir(const std::string& dir, const std::string& what) {
  std::error_code ec;
  const std::string why = directory_problem(nearest_existing(dir));
  if (why.empty()) return;
  const char* verb = fs::is_directory(dir, ec) ? "cannot write in " : "cannot create ";
  throw Error(verb + what + " '" + dir + "': " + why);
}

namespace {
std::string format_local_time(const char* fmt) {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[64];
  std::strftime(buf, sizeof buf, fmt, &tm);
  return buf;
}
}  // namespace

std::string timestamp_now() { return format_local_time("%Y%m%d-%H%M%S"); }
std::string iso_time_now() { return format_local_time("%Y-%m-%dT%H:%M:%S"); }

}  // namespace blm
