#include "tokenizer/unicode.h"

namespace qf::unicode {

void decode_utf8(std::string_view s, std::vector<uint32_t>& out) {
  out.clear();
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  auto cont = [&](size_t i) { return i < n && (p[i] & 0xC0) == 0x80; };
  size_t i = 0;
  while (i < n) {
    const uint8_t b = p[i];
    if (b < 0x80) {
      out.push_back(b);
      ++i;
      continue;
    }
    // Same lead-byte tests as llama.cpp: 10xxxxxx is invalid, then 110, 1110, 11110 leads.
    uint32_t cpt = kReplacement;
    size_t len = 1;
    if ((b & 0x40) == 0) {
      // stray continuation byte
    } else if ((b & 0x20) == 0) {
      if (cont(i + 1)) {
        cpt = (uint32_t(b & 0x1F) << 6) | (p[i + 1] & 0x3F);
        len = 2;
      }
    } else if ((b & 0x10) == 0) {
      if (cont(i + 1) && cont(i + 2)) {
        cpt = (uint32_t(b & 0x0F) << 12) | (uint32_t(p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F);
        len = 3;
      }
    } else if ((b & 0x08) == 0) {
      if (cont(i + 1) && cont(i + 2) && cont(i + 3)) {
        const uint32_t v = (uint32_t(b & 0x07) << 18) | (uint32_t(p[i + 1] & 0x3F) << 12) |
                           (uint32_t(p[i + 2] & 0x3F) << 6) | (p[i + 3] & 0x3F);
        if (v <= kMaxCodepoint) {
          cpt = v;
          len = 4;
        }
      }
    }
    out.push_back(cpt);
    i += len;
  }
}

void append_utf8(uint32_t cpt, std::string& out) {
  if (cpt < 0x80) {
    out.push_back(static_cast<char>(cpt));
  } else if (cpt < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cpt >> 6)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else if (cpt < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cpt >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | ((cpt >> 18) & 0x07)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  }
}

}  // namespace qf::unicode
