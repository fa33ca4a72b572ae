// Strict UTF-8 decoding and encoding for the char tokenizer, and a printable one-line name for a
// character (error messages must stay on one line even when the character is a newline).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace blm {

constexpr uint32_t kMaxCodePoint = 0x10FFFF;

// Decodes the code point that starts at text[pos] (pos < n) and advances pos past it.
// Returns false (pos unchanged) for malformed input: a stray continuation byte, a truncated
// sequence, an overlong form, a surrogate (U+D800..U+DFFF) or a value above U+10FFFF.
bool utf8_next(const char* text, size_t n, size_t& pos, uint32_t& code_point);

// The UTF-8 bytes of one code point (cp <= kMaxCodePoint and not a surrogate).
std::string utf8_encode(uint32_t code_point);

// "'e' (U+0065)" for printable characters, "U+000A" for control characters.
std::string describe_code_point(uint32_t code_point);

// At most max_chars of s with control bytes shown as \xNN, "..." appended when cut.
std::string printable_excerpt(const std::string& s, size_t max_chars);

}  // namespace blm
