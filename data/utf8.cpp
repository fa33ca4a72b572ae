// Strict UTF-8 (RFC 3629): the well-formed byte sequences are exactly those of its table 3-7,
// which rules out overlong forms and surrogates by restricting the second byte's range.
#include "data/utf8.h"

#include <cstdio>

namespace blm {

namespace {

bool in_range(unsigned char b, unsigned lo, unsigned hi) { return b >= lo && b <= hi; }

// Number of bytes of the sequence led by `lead`, and the allowed range of its second byte.
// Returns 0 when `lead` cannot start a sequence.
int sequence_shape(unsigned char lead, unsigned& lo2, unsigned& hi2) {
  lo2 = 0x80;
  hi2 = 0xBF;
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead == 0xE0) { lo2 = 0xA0; return 3; }   // below: overlong
  if (lead == 0xED) { hi2 = 0x9F; return 3; }   // above: surrogates
  if (lead >= 0xE1 && lead <= 0xEF) return 3;
  if (lead == 0xF0) { lo2 = 0x90; return 4; }   // below: overlong
  if (lead == 0xF4) { hi2 = 0x8F; return 4; }   // above: > U+10FFFF
  if (lead >= 0xF1 && lead <= 0xF3) return 4;
  return 0;  // continuation byte, C0/C1 (always overlong) or F5..FF
}

}  // namespace

bool utf8_next(const char* text, size_t n, size_t& pos, uint32_t& code_point) {
  const auto* s = reinterpret_cast<const unsigned char*>(text);
  unsigned lo2, hi2;
  int len = sequence_shape(s[pos], lo2, hi2);
  if (len == 0 || pos + len > n) return false;
  if (len == 1) {
    code_point = s[pos++];
    return true;
  }
  if (!in_range(s[pos + 1], lo2, hi2)) return false;
  for (int k = 2; k < len; ++k)
    if (!in_range(s[pos + k], 0x80, 0xBF)) return false;
  static const uint32_t lead_mask[5] = {0, 0, 0x1F, 0x0F, 0x07};
  uint32_t cp = s[pos] & lead_mask[len];
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (s[pos + k] & 0x3F);
  code_point = cp;
  pos += len;
  return true;
}

std::string utf8_encode(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return out;
}

std::string describe_code_point(uint32_t cp) {
  char hex[16];
  std::snprintf(hex, sizeof hex, "U+%04X", static_cast<unsigned>(cp));
  // C0 controls, DEL and C1 controls would break the one-line message or print nothing.
  bool control = cp < 0x20 || (cp >= 0x7F && cp < 0xA0);
  if (control) return hex;
  return "'" + utf8_encode(cp) + "' (" + hex + ")";
}

std::string printable_excerpt(const std::string& s, size_t max_chars) {
  std::string out;
  size_t n = s.size() < max_chars ? s.size() : max_chars;
  // Cut at a character boundary so the message stays valid UTF-8.
  while (n > 0 && n < s.size() && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  for (size_t i = 0; i < n; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02X", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (n < s.size()) out += "...";
  return out;
}

}  // namespace blm
