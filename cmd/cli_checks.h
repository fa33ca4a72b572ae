// Checks of numeric command-line values, in place of CLI11's PositiveNumber / NonNegativeNumber,
// whose message for `--draws 0` is "Value 0 not in range 0.000000 to 1797693134862315708145...".
// These say what is wrong in the words of the rest of the program: "--draws: must be >= 1,
// got 0".  Text that is no number at all passes here and is refused by CLI11's conversion
// ("Could not convert: --draws = abc").  The help keeps CLI11's POSITIVE / NONNEGATIVE tags.
// Also the check between options that no option can make alone: an output file that is one of
// the command's inputs, or another of its outputs.
#pragma once
#include <CLI/CLI.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "cmd/runs.h"
#include "core/error.h"

namespace blm {

// A number >= lo (and finite); desc is the tag the help shows after the type.
inline CLI::Validator number_at_least(double lo, const std::string& desc) {
  return CLI::Validator(
      [lo](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (text.empty() || end != text.c_str() + text.size()) return "";
        if (std::isfinite(v) && v >= lo) return "";
        char bound[32];
        std::snprintf(bound, sizeof bound, "%g", lo);
        return std::string(std::isfinite(v) ? "must be >= " : "must be a finite number >= ") +
               bound + ", got " + text;
      },
      desc);
}

// Integer options: >= 1 and >= 0.
inline CLI::Validator positive_number() { return number_at_least(1, "POSITIVE"); }
inline CLI::Validator non_negative_number() { return number_at_least(0, "NONNEGATIVE"); }

// Unsigned options (seeds): CLI11 reads "-5" into a uint64_t as 2^64 - 5, and a number past
// 2^64 - 1 as 2^64 - 1; refuse both.
inline CLI::Validator no_minus_sign() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const size_t first = text.find_first_not_of(" \t");
        if (first != std::string::npos && text[first] == '-')
          return "must be an integer >= 0, got " + text;
        errno = 0;
        std::strtoull(text.c_str(), nullptr, 10);
        if (errno == ERANGE) return "must be an integer below 2^64, got " + text;
        return "";
      },
      "");
}

// Path options: an empty value (an unset shell variable, `--data ""`) is refused instead of being
// taken as the option's absence, which would quietly use the default (the run's data, latest).
inline CLI::Validator non_empty_path() {
  return CLI::Validator(
      [](std::string& text) -> std::string { return text.empty() ? "an empty path" : ""; }, "");
}

// Whether a and b name one file: the same existing file through any link or other name (hard
// links too), or the same place once links, "." and ".." are resolved (a file not written yet:
// ./x and x).  "-" is standard input, the same as b when b is the file it reads.
inline bool same_file(const std::string& a, const std::string& b) {
  namespace fs = std::filesystem;
  if (a == "-") {
    struct stat in, file;
    return fstat(STDIN_FILENO, &in) == 0 && stat(b.c_str(), &file) == 0 &&
           in.st_dev == file.st_dev && in.st_ino == file.st_ino;
  }
  std::error_code ec, ec_a, ec_b;
  if (fs::equivalent(a, b, ec)) return true;
  const fs::path where_a = fs::weakly_canonical(fs::absolute(a, ec_a), ec_a);
  const fs::path where_b = fs::weakly_canonical(fs::absolute(b, ec_b), ec_b);
  return !ec_a && !ec_b && where_a == where_b;
}

// Refuses, before any work, an `option` whose file `output` is one of `files`: what the command
// reads (eval --out c.bin on its own checkpoint: the checkpoint would be lost) or another of its
// outputs (--out x --plot x: the second would replace the first).  Throws Error naming the
// option, its file and the file it is, as tokenize refuses an --out that is one of its inputs.
inline void refuse_output_over(const std::string& option, const std::string& output,
                               const std::vector<NamedFile>& files) {
  std::error_code ec;
  // A device or pipe (/dev/null, a FIFO) is written to, never replaced: nothing is lost.
  if (output.empty() || std::filesystem::is_other(std::filesystem::status(output, ec))) return;
  for (const NamedFile& f : files)
    if (!f.path.empty() && same_file(f.path, output))
      throw Error(option + " '" + output + "' is " + f.role + " '" + f.path +
                  "': writing there would overwrite it; choose another " + option);
}

}  // namespace blm
