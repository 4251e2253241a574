// Helpers shared by the tokenizer tests: base64 and FNV-1a as the golden files use them, a UTF-8
// check, a minimal in-memory GGUF writer to build variant and broken vocabularies, and the
// fixture of a real model's tokenizer.
#pragma once
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <gtest/gtest.h>

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

namespace qf::test {

using Tokens = std::vector<int32_t>;

inline std::string base64_decode(std::string_view s) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : s) {
    const int v = val(c);
    if (v < 0) continue;  // '=' padding
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  return out;
}

inline std::string fnv1a(const void* data, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Strict UTF-8 check (no overlongs, surrogates or values past U+10FFFF).
inline bool valid_utf8(std::string_view s) {
  size_t i = 0;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  while (i < s.size()) {
    const unsigned char b = p[i];
    size_t len;
    uint32_t min, c;
    if (b < 0x80) { ++i; continue; }
    if (b >= 0xC2 && b <= 0xDF) { len = 2; min = 0x80; c = b & 0x1F; }
    else if (b >= 0xE0 && b <= 0xEF) { len = 3; min = 0x800; c = b & 0x0F; }
    else if (b >= 0xF0 && b <= 0xF4) { len = 4; min = 0x10000; c = b & 0x07; }
    else return false;
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      c = (c << 6) | (p[i + k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

inline std::string show(const Tokens& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.size(); ++i) s += (i ? ", " : "") + std::to_string(t[i]);
  return s + "]";
}


// Minimal GGUF v3 writer (metadata only), to build variant and broken vocabularies in memory.
class GgufBuilder {
 public:
  using KV = std::pair<std::string, gguf::Value>;
  std::vector<KV> kv;

  static gguf::Value str(std::string s) { return {gguf::ValueType::STRING, std::move(s)}; }
  static gguf::Value u32(uint32_t v) { return {gguf::ValueType::U32, uint64_t{v}}; }
  static gguf::Value boolean(bool v) { return {gguf::ValueType::BOOL, v}; }
  static gguf::Value strs(const std::vector<std::string>& v) {
    gguf::Array a{gguf::ValueType::STRING, {}};
    for (const auto& s : v) a.items.push_back(str(s));
    return {gguf::ValueType::ARRAY, std::move(a)};
  }
  static gguf::Value i32s(const std::vector<int32_t>& v) {
    gguf::Array a{gguf::ValueType::I32, {}};
    for (int32_t x : v) a.items.push_back({gguf::ValueType::I32, int64_t{x}});
    return {gguf::ValueType::ARRAY, std::move(a)};
  }

  void set(const std::string& key, gguf::Value v) {
    for (auto& [k, old] : kv)
      if (k == key) {
        old = std::move(v);
        return;
      }
    kv.emplace_back(key, std::move(v));
  }
  void erase(const std::string& key) {
    std::erase_if(kv, [&](const KV& p) { return p.first == key; });
  }

  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out;
    auto raw = [&](const void* p, size_t n) {
      const auto* b = static_cast<const uint8_t*>(p);
      out.insert(out.end(), b, b + n);
    };
    auto u32v = [&](uint32_t v) { raw(&v, 4); };
    auto u64v = [&](uint64_t v) { raw(&v, 8); };
    auto string = [&](const std::string& s) {
      u64v(s.size());
      raw(s.data(), s.size());
    };
    std::function<void(const gguf::Value&)> value = [&](const gguf::Value& v) {
      auto integer = [&]() -> uint64_t {
        return std::visit([](const auto& x) -> uint64_t {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, uint64_t> || std::is_same_v<T, int64_t>) return static_cast<uint64_t>(x);
          else if constexpr (std::is_same_v<T, bool>) return x ? 1 : 0;
          else return 0;
        }, v.v);
      };
      switch (v.type) {
        case gguf::ValueType::U8: case gguf::ValueType::I8: case gguf::ValueType::BOOL: {
          const uint8_t x = static_cast<uint8_t>(integer());
          raw(&x, 1);
          break;
        }
        case gguf::ValueType::U16: case gguf::ValueType::I16: {
          const uint16_t x = static_cast<uint16_t>(integer());
          raw(&x, 2);
          break;
        }
        case gguf::ValueType::U32: case gguf::ValueType::I32: u32v(static_cast<uint32_t>(integer())); break;
        case gguf::ValueType::U64: case gguf::ValueType::I64: u64v(integer()); break;
        case gguf::ValueType::F32: {
          const float x = static_cast<float>(std::get<double>(v.v));
          raw(&x, 4);
          break;
        }
        case gguf::ValueType::F64: {
          const double x = std::get<double>(v.v);
          raw(&x, 8);
          break;
        }
        case gguf::ValueType::STRING: string(std::get<std::string>(v.v)); break;
        case gguf::ValueType::ARRAY: {
          const auto& a = std::get<gguf::Array>(v.v);
          u32v(static_cast<uint32_t>(a.elem_type));
          u64v(a.items.size());
          for (const auto& x : a.items) value(x);
          break;
        }
      }
    };
    raw("GGUF", 4);
    u32v(3);
    u64v(0);  // tensors
    u64v(kv.size());
    for (const auto& [k, v] : kv) {
      string(k);
      u32v(static_cast<uint32_t>(v.type));
      value(v);
    }
    while (out.size() % 32) out.push_back(0);
    return out;
  }
};

// A GGUF in memory with the File that reads it (the buffer must outlive the File).
struct MemGguf {
  std::vector<uint8_t> buf;
  std::unique_ptr<gguf::File> file;
  explicit MemGguf(const GgufBuilder& b) : buf(b.bytes()), file(gguf::File::from_memory(buf.data(), buf.size())) {}
};

// A test suite over a real model's tokenizer, opened once per suite: Derived::model_path() names
// the GGUF file (only its metadata is read).
template <class Derived>
class RealTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    file_ = gguf::File::open(Derived::model_path()).release();
    tok_ = new Tokenizer(Tokenizer::from_gguf(*file_));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete file_;
    tok_ = nullptr;
    file_ = nullptr;
  }
  // The model's tokenizer metadata, to be varied.
  static GgufBuilder metadata() {
    GgufBuilder b;
    for (const auto& [k, v] : file_->metadata())
      if (k.starts_with("tokenizer.") || k == "general.architecture") b.kv.emplace_back(k, v);
    return b;
  }
  static inline gguf::File* file_ = nullptr;
  static inline Tokenizer* tok_ = nullptr;
};

}  // namespace qf::test
