// Checks of numeric command-line values, in place of CLI11's PositiveNumber / NonNegativeNumber,
// whose message for `--draws 0` is "Value 0 not in range 0.000000 to 1797693134862315708145...".
// These say what is wrong in the words of the rest of the program: "--draws: must be >= 1,
// got 0".  Text that is no number at all passes here and is refused by CLI11's conversion
// ("Could not convert: --draws = abc").  The help keeps CLI11's POSITIVE / NONNEGATIVE tags.
#pragma once
#include <CLI/CLI.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

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

}  // namespace blm
