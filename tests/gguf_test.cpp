// GGUF reader tests: files are built byte by byte by a small writer below (independent of the
// reader), plus the real SmolLM2 file and the Python-written fixtures.
#include "gguf/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "test_paths.h"
#include "util/error.h"

namespace qf::gguf {
namespace {

using Bytes = std::vector<uint8_t>;

// ---------------------------------------------------------------------------------------------
// Minimal GGUF writer for tests. Values are appended raw so hostile files are easy to produce.
struct Buf {
  Bytes b;
  template <typename T>
  Buf& put(T x) {
    const size_t n = b.size();
    b.resize(n + sizeof(T));
    std::memcpy(b.data() + n, &x, sizeof(T));
    return *this;
  }
  Buf& str(std::string_view s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Buf& raw(const Bytes& x) {
    b.insert(b.end(), x.begin(), x.end());
    return *this;
  }
};

constexpr uint32_t T(ValueType t) { return static_cast<uint32_t>(t); }

struct TensorSpec {
  std::string name;
  uint32_t type;
  std::vector<uint64_t> ne;
  Bytes data;
  std::optional<uint64_t> offset;  // override the computed offset
};

class Builder {
 public:
  uint32_t version = 3;
  uint64_t layout_alignment = 32;            // alignment used to lay out the data section
  std::optional<uint64_t> n_kv_override, n_tensors_override;

  // Key + type + payload (payload already encoded).
  Builder& kv_raw(std::string_view key, uint32_t type, const Bytes& payload) {
    Buf e;
    e.str(key).put<uint32_t>(type).raw(payload);
    kvs_.push_back(e.b);
    return *this;
  }
  template <typename V>
  Builder& kv(std::string_view key, ValueType type, V value) {
    Buf p;
    p.put<V>(value);
    return kv_raw(key, T(type), p.b);
  }
  Builder& kv_str(std::string_view key, std::string_view s) {
    Buf p;
    p.str(s);
    return kv_raw(key, T(ValueType::STRING), p.b);
  }
  Builder& kv_str_array(std::string_view key, const std::vector<std::string>& items) {
    Buf p;
    p.put<uint32_t>(T(ValueType::STRING)).put<uint64_t>(items.size());
    for (auto& s : items) p.str(s);
    return kv_raw(key, T(ValueType::ARRAY), p.b);
  }
  template <typename V>
  Builder& kv_array(std::string_view key, ValueType elem, const std::vector<V>& items) {
    Buf p;
    p.put<uint32_t>(T(elem)).put<uint64_t>(items.size());
    for (auto& x : items) p.put<V>(x);
    return kv_raw(key, T(ValueType::ARRAY), p.b);
  }
  Builder& alignment(uint32_t a) {
    if (a != 0 && a <= 4096) layout_alignment = a;  // lay out sanely even when the value is bad
    return kv("general.alignment", ValueType::U32, a);
  }
  Builder& tensor(TensorSpec t) {
    tensors_.push_back(std::move(t));
    return *this;
  }
  // A tensor whose data is filled with a recognisable pattern of the right size.
  Builder& tensor(std::string name, uint32_t type, std::vector<uint64_t> ne) {
    const TypeInfo ti = type_info(type);
    uint64_t rows = 1;
    for (size_t i = 1; i < ne.size(); ++i) rows *= ne[i];
    const size_t nbytes = ti.block_elems > 0 ? ne[0] / ti.block_elems * ti.block_bytes * rows : 16;
    Bytes d(nbytes);
    for (size_t i = 0; i < nbytes; ++i) d[i] = static_cast<uint8_t>(i * 7 + tensors_.size());
    return tensor({std::move(name), type, std::move(ne), std::move(d), std::nullopt});
  }

  // Byte offset of the tensor table in the last build (for tests that poke at it).
  size_t table_at = 0, data_at = 0;

  Bytes build() {
    Buf f;
    f.b = {'G', 'G', 'U', 'F'};
    f.put<uint32_t>(version);
    f.put<uint64_t>(n_tensors_override.value_or(tensors_.size()));
    f.put<uint64_t>(n_kv_override.value_or(kvs_.size()));
    for (auto& e : kvs_) f.raw(e);
    table_at = f.b.size();
    std::vector<uint64_t> offsets;
    uint64_t off = 0;
    for (auto& t : tensors_) {
      off = (off + layout_alignment - 1) / layout_alignment * layout_alignment;
      offsets.push_back(off);
      off += t.data.size();
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      auto& t = tensors_[i];
      f.str(t.name).put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) f.put<uint64_t>(d);
      f.put<uint32_t>(t.type).put<uint64_t>(t.offset.value_or(offsets[i]));
    }
    f.b.resize((f.b.size() + layout_alignment - 1) / layout_alignment * layout_alignment);
    data_at = f.b.size();
    for (size_t i = 0; i < tensors_.size(); ++i) {
      f.b.resize(data_at + offsets[i]);
      f.raw(tensors_[i].data);
    }
    return f.b;
  }

 private:
  std::vector<Bytes> kvs_;
  std::vector<TensorSpec> tensors_;
};

// Parses a copy in an exact-size heap buffer, so a one-byte over-read is an ASan error.
std::unique_ptr<File> parse(const Bytes& b, std::vector<uint8_t>* keep) {
  *keep = b;
  return File::from_memory(keep->data(), keep->size(), "t.gguf");
}

std::string error_of(const Bytes& b) {
  std::vector<uint8_t> copy;
  try {
    parse(b, &copy);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

#define EXPECT_GGUF_ERROR(bytes, needle)                                                     \
  do {                                                                                       \
    const std::string msg_ = error_of(bytes);                                                \
    EXPECT_NE(msg_.find(needle), std::string::npos) << "error was: " << msg_;                 \
    EXPECT_EQ(msg_.find('\n'), std::string::npos) << "error is not one line: " << msg_;       \
    EXPECT_EQ(msg_.rfind("t.gguf: ", 0), 0u) << "error does not start with the path: " << msg_; \
  } while (0)

// A small valid file with a bit of everything; its last tensor ends exactly at EOF, so every
// truncation must be detected.
Builder small_builder() {
  Builder b;
  b.kv_str("general.architecture", "llama");
  b.kv("llama.block_count", ValueType::U32, uint32_t{2});
  b.kv("llama.rope.freq_base", ValueType::F32, 10000.0f);
  b.kv("flag", ValueType::BOOL, uint8_t{1});
  b.kv_str_array("tokenizer.ggml.tokens", {"a", "bc", "", "\xc4\xa0the"});
  b.kv_array<int32_t>("tokenizer.ggml.token_type", ValueType::I32, {1, 1, 3, 1});
  b.kv_array<float>("scores", ValueType::F32, {0.5f, -1.0f});
  b.tensor("tok.weight", 0 /*F32*/, {4, 3});
  b.tensor("q.weight", 8 /*Q8_0*/, {32, 2});
  b.tensor("norm.weight", 0, {5});
  return b;
}

// ---------------------------------------------------------------------------------------------

TEST(Gguf, RoundTripsEveryValueType) {
  Builder b;
  b.kv("u8", ValueType::U8, uint8_t{255});
  b.kv("i8", ValueType::I8, int8_t{-128});
  b.kv("u16", ValueType::U16, uint16_t{65535});
  b.kv("i16", ValueType::I16, int16_t{-32768});
  b.kv("u32", ValueType::U32, uint32_t{4000000000u});
  b.kv("i32", ValueType::I32, int32_t{-2000000000});
  b.kv("u64", ValueType::U64, uint64_t{18446744073709551615ull});
  b.kv("i64", ValueType::I64, int64_t{std::numeric_limits<int64_t>::min()});
  b.kv("f32", ValueType::F32, 0.1f);
  b.kv("f64", ValueType::F64, -2.5e300);
  b.kv("t", ValueType::BOOL, uint8_t{1});
  b.kv("f", ValueType::BOOL, uint8_t{0});
  b.kv_str("s", std::string("h\xc3\xa9llo\0x\n", 9));
  b.kv_str("empty", "");
  b.kv_str_array("strs", {"x", "", "yz"});
  b.kv_array<int16_t>("i16s", ValueType::I16, {-1, 2, -3});
  b.kv_array<uint64_t>("u64s", ValueType::U64, {1, 2, 3});
  b.kv_array<double>("f64s", ValueType::F64, {0.25, -8.0});
  b.kv_array<float>("f32s", ValueType::F32, {1.5f});
  b.kv_array<uint8_t>("bools", ValueType::BOOL, {1, 0});
  b.kv_array<int32_t>("none", ValueType::I32, {});
  {  // [[1, 2], [], [3]] as an array of arrays of i32
    Buf p;
    p.put<uint32_t>(T(ValueType::ARRAY)).put<uint64_t>(3);
    p.put<uint32_t>(T(ValueType::I32)).put<uint64_t>(2).put<int32_t>(1).put<int32_t>(2);
    p.put<uint32_t>(T(ValueType::I32)).put<uint64_t>(0);
    p.put<uint32_t>(T(ValueType::I32)).put<uint64_t>(1).put<int32_t>(3);
    b.kv_raw("nested", T(ValueType::ARRAY), p.b);
  }
  std::vector<uint8_t> keep;
  auto f = parse(b.build(), &keep);

  ASSERT_EQ(f->metadata().size(), 22u);
  EXPECT_EQ(f->metadata()[0].first, "u8");  // file order is kept
  EXPECT_EQ(f->metadata()[21].first, "nested");
  EXPECT_EQ(f->find("u8")->type, ValueType::U8);
  EXPECT_EQ(std::get<uint64_t>(f->find("u8")->v), 255u);
  EXPECT_EQ(std::get<int64_t>(f->find("i8")->v), -128);
  EXPECT_EQ(std::get<uint64_t>(f->find("u16")->v), 65535u);
  EXPECT_EQ(std::get<int64_t>(f->find("i16")->v), -32768);
  EXPECT_EQ(f->find("u32")->type, ValueType::U32);
  EXPECT_EQ(f->get_u32("u32"), 4000000000u);
  EXPECT_EQ(f->get_i64("i32", 0), -2000000000);
  EXPECT_EQ(f->get_u64("u64"), 18446744073709551615ull);
  EXPECT_EQ(f->get_i64("i64", 0), std::numeric_limits<int64_t>::min());
  EXPECT_EQ(f->get_f32("f32"), 0.1f);
  EXPECT_EQ(std::get<double>(f->find("f64")->v), -2.5e300);
  EXPECT_TRUE(f->get_bool("t", false));
  EXPECT_FALSE(f->get_bool("f", true));
  EXPECT_EQ(f->get_str("s"), std::string("h\xc3\xa9llo\0x\n", 9));
  EXPECT_EQ(f->get_str("empty"), "");
  EXPECT_EQ(f->get_str_array("strs"), (std::vector<std::string>{"x", "", "yz"}));
  EXPECT_EQ(f->get_int_array("i16s"), (std::vector<int64_t>{-1, 2, -3}));
  EXPECT_EQ(f->get_int_array("u64s"), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(f->get_float_array("f64s"), (std::vector<float>{0.25f, -8.0f}));
  EXPECT_EQ(f->get_float_array("f32s"), (std::vector<float>{1.5f}));
  EXPECT_TRUE(f->get_int_array("none").empty());
  const Array& bools = std::get<Array>(f->find("bools")->v);
  ASSERT_EQ(bools.items.size(), 2u);
  EXPECT_TRUE(std::get<bool>(bools.items[0].v));
  EXPECT_FALSE(std::get<bool>(bools.items[1].v));
  const Array& nested = std::get<Array>(f->find("nested")->v);
  ASSERT_EQ(nested.elem_type, ValueType::ARRAY);
  ASSERT_EQ(nested.items.size(), 3u);
  EXPECT_EQ(std::get<Array>(nested.items[0].v).items.size(), 2u);
  EXPECT_EQ(std::get<int64_t>(std::get<Array>(nested.items[2].v).items[0].v), 3);

  EXPECT_EQ(to_string(*f->find("u8")), "255");
  EXPECT_EQ(to_string(*f->find("i64")), "-9223372036854775808");
  EXPECT_EQ(to_string(*f->find("f32")), "0.1");
  EXPECT_EQ(to_string(*f->find("f64")), "-2.5e+300");
  EXPECT_EQ(to_string(*f->find("t")), "true");
  EXPECT_EQ(to_string(*f->find("s")), "\"h\xc3\xa9llo\\x00x\\n\"");
  EXPECT_EQ(to_string(*f->find("strs")), "[\"x\", \"\", \"yz\"]");
  EXPECT_EQ(to_string(*f->find("i16s"), 2), "[-1, 2, ... 3 x I16]");
  EXPECT_EQ(to_string(*f->find("nested")), "[[1, 2], [], [3]]");
  EXPECT_EQ(to_string(*f->find("none")), "[]");
}

TEST(Gguf, GettersCheckTypesRangesAndDefaults) {
  Builder b;
  b.kv("big", ValueType::U64, uint64_t{1} << 40);
  b.kv("neg", ValueType::I32, int32_t{-5});
  b.kv("small", ValueType::I8, int8_t{7});
  b.kv_str("name", "x");
  b.kv("f64", ValueType::F64, 0.5);
  b.kv_array<uint64_t>("huge_ints", ValueType::U64, {uint64_t{1} << 63});
  std::vector<uint8_t> keep;
  auto f = parse(b.build(), &keep);

  EXPECT_EQ(f->get_u64("big"), uint64_t{1} << 40);
  EXPECT_EQ(f->get_u32("small"), 7u);  // any integer type that fits
  EXPECT_EQ(f->get_u64("small"), 7u);
  EXPECT_EQ(f->get_i64("neg", 0), -5);
  EXPECT_EQ(f->get_f32("f64"), 0.5f);
  EXPECT_EQ(f->get_u32("missing", 9u), 9u);
  EXPECT_EQ(f->get_u64("missing", 9u), 9u);
  EXPECT_EQ(f->get_f32("missing", 1.5f), 1.5f);
  EXPECT_EQ(f->get_str("missing", "d"), "d");
  EXPECT_TRUE(f->get_bool("missing", true));
  EXPECT_FALSE(f->has("missing"));
  EXPECT_TRUE(f->has("name"));

  auto msg = [](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const Error& e) {
      return e.what();
    }
    return "<no error>";
  };
  EXPECT_NE(msg([&] { f->get_u32("big"); }).find("does not fit in u32"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_u64("neg"); }).find("'neg' = -5 does not fit"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_u32("missing"); }).find("t.gguf: metadata key 'missing' is missing"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_str("big"); }).find("has type U64, expected STRING"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_f32("small"); }).find("expected F32 or F64"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_u32("name", 1u); }).find("expected an integer"), std::string::npos);  // present: no default
  EXPECT_NE(msg([&] { f->get_bool("name", false); }).find("expected BOOL"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_str_array("name"); }).find("expected an array"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_str_array("huge_ints"); }).find("array of U64, expected STRING"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_int_array("huge_ints"); }).find("does not fit in i64"), std::string::npos);
  EXPECT_NE(msg([&] { f->get_float_array("huge_ints"); }).find("expected F32 or F64"), std::string::npos);
  EXPECT_NE(msg([&] { f->tensor("nope"); }).find("tensor 'nope' is missing"), std::string::npos);
  EXPECT_EQ(f->find_tensor("nope"), nullptr);
}

TEST(Gguf, Versions2And3) {
  for (uint32_t v : {2u, 3u}) {
    Builder b = small_builder();
    b.version = v;
    std::vector<uint8_t> keep;
    auto f = parse(b.build(), &keep);
    EXPECT_EQ(f->version(), v);
    EXPECT_EQ(f->tensors().size(), 3u);
    EXPECT_EQ(f->get_str("general.architecture"), "llama");
  }
}

TEST(Gguf, TensorTable) {
  Builder b = small_builder();
  b.tensor("q41", 3, {64, 3, 2});
  b.tensor("q40", 2, {32});
  b.tensor("f16", 1, {3, 5});
  b.tensor("bf16", 30, {7});
  b.tensor("q6k", 14, {256, 2});  // known type, not supported as a weight: still opens
  b.tensor("empty", 0, {0, 4});   // zero-sized dimension: legal, no data
  const Bytes bytes = b.build();
  std::vector<uint8_t> keep;
  auto f = parse(bytes, &keep);
  ASSERT_EQ(f->tensors().size(), 9u);
  const TensorInfo& tok = f->tensor("tok.weight");
  EXPECT_EQ(tok.type, GgmlType::F32);
  EXPECT_EQ(tok.ne, (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(tok.n_elements(), 12);
  EXPECT_EQ(tok.nbytes, 48u);
  EXPECT_EQ(tok.offset, 0u);
  EXPECT_EQ(tok.data, keep.data() + b.data_at);
  EXPECT_EQ(tok.data[1], 7);  // the writer's pattern
  EXPECT_EQ(f->tensor("q.weight").nbytes, 2u * 34);
  EXPECT_EQ(f->tensor("q.weight").offset, 64u);
  EXPECT_EQ(f->tensor("q41").nbytes, 2u * 20 * 3 * 2);
  EXPECT_EQ(f->tensor("q41").n_elements(), 64 * 3 * 2);
  EXPECT_EQ(f->tensor("q40").nbytes, 18u);
  EXPECT_EQ(f->tensor("f16").nbytes, 30u);
  EXPECT_EQ(f->tensor("bf16").nbytes, 14u);
  EXPECT_EQ(f->tensor("bf16").type, GgmlType::BF16);
  EXPECT_EQ(f->tensor("q6k").type, GgmlType::Q6_K);
  EXPECT_EQ(f->tensor("q6k").nbytes, 2u * 210);
  EXPECT_EQ(f->tensor("empty").nbytes, 0u);
  EXPECT_EQ(f->tensor("empty").n_elements(), 0);
  for (const TensorInfo& t : f->tensors()) {
    EXPECT_EQ((t.data - keep.data() - b.data_at) % 32, 0u) << t.name;
    EXPECT_LE(t.data + t.nbytes, keep.data() + keep.size()) << t.name;
  }
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->size(), bytes.size());
  EXPECT_EQ(f->path(), "t.gguf");
}

TEST(Gguf, Alignment) {
  for (uint32_t al : {1u, 8u, 64u, 4096u}) {
    Builder b = small_builder();
    b.alignment(al);
    std::vector<uint8_t> keep;
    auto f = parse(b.build(), &keep);
    EXPECT_EQ(f->alignment(), al);
    EXPECT_EQ(b.data_at % al, 0u);
    for (const TensorInfo& t : f->tensors()) {
      EXPECT_EQ(t.offset % al, 0u);
      EXPECT_EQ(t.data, keep.data() + b.data_at + t.offset) << "alignment " << al << " " << t.name;
    }
  }
  for (uint32_t bad : {0u, 3u, 48u, 0x80000000u}) {
    Builder b = small_builder();
    b.alignment(bad);
    EXPECT_GGUF_ERROR(b.build(), "general.alignment");
  }
  {
    Builder b = small_builder();
    b.kv_str("general.alignment", "32");
    EXPECT_GGUF_ERROR(b.build(), "general.alignment has type STRING");
  }
  {  // offset not a multiple of the alignment
    Builder b;
    b.tensor({"a", 0, {4}, Bytes(16), uint64_t{8}});
    b.tensor({"b", 0, {4}, Bytes(64), uint64_t{0}});
    EXPECT_GGUF_ERROR(b.build(), "tensor 'a' data offset 8 is not a multiple of the alignment 32");
  }
}

TEST(Gguf, TruncationAtEveryByteIsAnError) {
  Builder b = small_builder();
  const Bytes full = b.build();
  {
    std::vector<uint8_t> keep;
    ASSERT_NO_THROW(parse(full, &keep));
  }
  for (size_t n = 0; n < full.size(); ++n) {
    const Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
    std::vector<uint8_t> keep;
    EXPECT_THROW(parse(cut, &keep), Error) << "truncated to " << n << " of " << full.size();
  }
}

TEST(Gguf, BadHeaders) {
  EXPECT_GGUF_ERROR(Bytes{}, "bad magic");
  EXPECT_GGUF_ERROR((Bytes{'G', 'G', 'U'}), "bad magic");
  {
    Bytes x = small_builder().build();
    x[0] = 'g';
    EXPECT_GGUF_ERROR(x, "not a GGUF file (bad magic) (at byte 0)");
  }
  for (auto [v, needle] : std::vector<std::pair<uint32_t, std::string>>{
           {1, "version 1 is not supported"}, {0, "unsupported GGUF version 0"}, {4, "unsupported GGUF version 4"},
           {0x03000000, "byte-swapped"}}) {
    Builder b = small_builder();
    b.version = v;
    EXPECT_GGUF_ERROR(b.build(), needle);
    EXPECT_GGUF_ERROR(b.build(), "(at byte 4)");
  }
}

TEST(Gguf, HugeCountsAndLengthsAreRejectedBeforeAllocating) {
  {
    Builder b = small_builder();
    b.n_kv_override = uint64_t{1} << 60;
    EXPECT_GGUF_ERROR(b.build(), "metadata count 1152921504606846976 cannot fit");
  }
  {
    Builder b = small_builder();
    b.n_tensors_override = ~uint64_t{0};
    EXPECT_GGUF_ERROR(b.build(), "tensor count");
  }
  {
    Builder b = small_builder();
    b.n_kv_override = 8;  // one more than present: runs into the tensor table and fails there
    EXPECT_NE(error_of(b.build()), "<no error>");
  }
  {  // key of 2^40 bytes
    Builder b;
    b.kv_raw("k", T(ValueType::U8), {1});
    Bytes x = b.build();
    const size_t len_at = 24;  // first key's length field
    const uint64_t huge = uint64_t{1} << 40;
    std::memcpy(x.data() + len_at, &huge, 8);
    EXPECT_GGUF_ERROR(x, "metadata key claims 1099511627776 bytes");
    EXPECT_GGUF_ERROR(x, "(at byte 24)");
  }
  {  // string value of 2^40 bytes
    Builder b;
    Buf p;
    p.put<uint64_t>(uint64_t{1} << 40);
    b.kv_raw("k", T(ValueType::STRING), p.b);
    EXPECT_GGUF_ERROR(b.build(), "string value claims 1099511627776 bytes");
  }
  {  // array of 2^60 u32s, and of 2^58 strings, and of 2^62 arrays
    for (auto [et, n] : std::vector<std::pair<ValueType, uint64_t>>{
             {ValueType::U32, uint64_t{1} << 60}, {ValueType::STRING, uint64_t{1} << 58}, {ValueType::ARRAY, uint64_t{1} << 62}}) {
      Builder b;
      Buf p;
      p.put<uint32_t>(T(et)).put<uint64_t>(n);
      b.kv_raw("arr", T(ValueType::ARRAY), p.b);
      EXPECT_GGUF_ERROR(b.build(), "cannot fit in the");
    }
  }
  {  // a string array whose count fits the byte budget (8 bytes each) but whose strings do not
    Builder b;
    Buf p;
    p.put<uint32_t>(T(ValueType::STRING)).put<uint64_t>(4).str("abc").str("def");
    p.put<uint64_t>(uint64_t{1} << 50);
    p.put<uint64_t>(0);
    b.kv_raw("arr", T(ValueType::ARRAY), p.b);
    EXPECT_GGUF_ERROR(b.build(), "string value claims 1125899906842624 bytes");
  }
  {  // tensor name of 2^40 bytes
    Builder b;
    b.tensor("t", 0, {4});
    Bytes x = b.build();
    const uint64_t huge = uint64_t{1} << 40;
    std::memcpy(x.data() + b.table_at, &huge, 8);
    EXPECT_GGUF_ERROR(x, "tensor name claims");
  }
  {  // more array items in total than the reader is willing to hold, yet each array fits the file
    Builder b;
    const uint64_t n = (uint64_t{1} << 22) + 1;
    Buf p;
    p.put<uint32_t>(T(ValueType::U8)).put<uint64_t>(n).raw(Bytes(n, 0));
    b.kv_raw("a", T(ValueType::ARRAY), p.b);
    b.kv_raw("b", T(ValueType::ARRAY), p.b);
    EXPECT_GGUF_ERROR(b.build(), "more than 8388608 items in total");
  }
}

TEST(Gguf, BadValues) {
  {
    Builder b;
    b.kv("k", ValueType::U8, uint8_t{1}).kv("k", ValueType::U8, uint8_t{2});
    EXPECT_GGUF_ERROR(b.build(), "duplicate metadata key 'k'");
  }
  {
    Builder b;
    b.kv_raw("k", 13, {0, 0, 0, 0});
    EXPECT_GGUF_ERROR(b.build(), "metadata key 'k' has invalid value type 13");
  }
  {
    Builder b;
    b.kv_raw("k", T(ValueType::ARRAY), {99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
    EXPECT_GGUF_ERROR(b.build(), "array has invalid element type 99");
  }
  {
    Builder b;
    b.kv("k", ValueType::BOOL, uint8_t{2});
    EXPECT_GGUF_ERROR(b.build(), "bool value is 2");
  }
  {
    Builder b;
    b.kv_raw("", T(ValueType::U8), {0});
    EXPECT_GGUF_ERROR(b.build(), "empty metadata key");
  }
  {  // arrays nested 5 deep
    Buf p;
    for (int i = 0; i < 5; ++i) p.put<uint32_t>(T(ValueType::ARRAY)).put<uint64_t>(1);
    p.put<uint32_t>(T(ValueType::U8)).put<uint64_t>(0);
    Builder b;
    b.kv_raw("deep", T(ValueType::ARRAY), p.b);
    EXPECT_GGUF_ERROR(b.build(), "nested deeper than 4");
  }
  {  // 4 deep is fine
    Buf p;
    for (int i = 0; i < 3; ++i) p.put<uint32_t>(T(ValueType::ARRAY)).put<uint64_t>(1);
    p.put<uint32_t>(T(ValueType::U8)).put<uint64_t>(1).put<uint8_t>(42);
    Builder b;
    b.kv_raw("deep", T(ValueType::ARRAY), p.b);
    std::vector<uint8_t> keep;
    auto f = parse(b.build(), &keep);
    EXPECT_EQ(to_string(*f->find("deep")), "[[[[42]]]]");
  }
}

TEST(Gguf, BadTensors) {
  auto with = [](TensorSpec t) {
    Builder b;
    b.tensor("ok", 0, {8});
    b.tensor(std::move(t));
    return b.build();
  };
  EXPECT_GGUF_ERROR(with({"t", 0, {4, 1, 1, 1, 1}, Bytes(16), {}}), "tensor 't' has 5 dimensions");
  EXPECT_GGUF_ERROR(with({"t", 0, {}, Bytes(16), {}}), "tensor 't' has 0 dimensions");
  EXPECT_GGUF_ERROR(with({"t", 0, {~uint64_t{0} - 3}, Bytes(16), {}}), "negative as int64");
  EXPECT_GGUF_ERROR(with({"t", 0, {uint64_t{1} << 32, uint64_t{1} << 32}, Bytes(16), {}}), "element count overflows");
  EXPECT_GGUF_ERROR(with({"t", 0, {uint64_t{1} << 62}, Bytes(16), {}}), "byte size overflows");
  EXPECT_GGUF_ERROR(with({"t", 0, {uint64_t{1} << 40}, Bytes(16), {}}), "lies outside the file");
  EXPECT_GGUF_ERROR(with({"t", 8, {48}, Bytes(34), {}}), "tensor 't' row of 48 elements is not a whole number of Q8_0 blocks");
  EXPECT_GGUF_ERROR(with({"t", 4, {32}, Bytes(18), {}}), "tensor 't' has unknown type id 4");
  EXPECT_GGUF_ERROR(with({"t", 1000, {32}, Bytes(18), {}}), "tensor 't' has unknown type id 1000");
  EXPECT_GGUF_ERROR(with({"t", 0, {4}, Bytes(16), uint64_t{1} << 20}), "tensor 't' data [1048576, +16) lies outside the file");
  EXPECT_GGUF_ERROR(with({"t", 0, {4}, Bytes(16), ~uint64_t{0} - 31}), "lies outside the file");
  EXPECT_GGUF_ERROR(with({"ok", 0, {4}, Bytes(16), {}}), "duplicate tensor name 'ok'");
  EXPECT_GGUF_ERROR(with({"", 0, {4}, Bytes(16), {}}), "has an empty name");
  {  // data one byte short
    Bytes x = with({"t", 0, {4}, Bytes(16), {}});
    x.pop_back();
    EXPECT_GGUF_ERROR(x, "tensor 't' data [32, +16) lies outside the file");
  }
  {  // the error points at the offending field
    Builder b;
    b.tensor("t", 1234, {4});
    const std::string msg = error_of(b.build());
    const size_t type_at = b.table_at + 8 + 1 + 4 + 8;
    EXPECT_NE(msg.find("(at byte " + std::to_string(type_at) + ")"), std::string::npos) << msg;
  }
}

TEST(Gguf, OpenFromDisk) {
  const Bytes bytes = small_builder().build();
  const std::string path = testing::TempDir() + "gguf_test_" + std::to_string(::getpid()) + ".gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  {
    auto f = File::open(path);
    EXPECT_EQ(f->path(), path);
    EXPECT_EQ(f->size(), bytes.size());
    const TensorInfo& t = f->tensor("q.weight");
    std::vector<uint8_t> keep;
    auto g = parse(bytes, &keep);
    EXPECT_EQ(std::memcmp(t.data, g->tensor("q.weight").data, t.nbytes), 0);
  }
  {  // truncated on disk: the message names the file
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), 30);
  }
  try {
    File::open(path);
    ADD_FAILURE() << "opened a truncated file";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path + ": ", 0), 0u) << e.what();
  }
  { std::ofstream out(path, std::ios::binary | std::ios::trunc); }
  EXPECT_THROW(File::open(path), Error);  // empty
  std::filesystem::remove(path);
  EXPECT_THROW(File::open(path), Error);  // missing
  EXPECT_THROW(File::open(testing::TempDir()), Error);  // a directory
}

// Tensor data moved into huge-page memory: same bytes, same alignment, the metadata untouched;
// a file from memory (not mapped) and a second call change nothing.
TEST(Gguf, TensorDataMovesToHugePages) {
  Builder b = small_builder();
  b.tensor("q41", 3, {64, 3, 2});
  b.tensor("f16", 1, {3, 5});
  b.tensor("empty", 0, {0, 4});
  const Bytes bytes = b.build();
  const std::string path = testing::TempDir() + "gguf_huge_" + std::to_string(::getpid()) + ".gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  std::vector<uint8_t> keep;
  auto ref = parse(bytes, &keep);
  EXPECT_FALSE(ref->move_tensor_data_to_huge_pages());  // not a mapping of ours
  auto f = File::open(path);
  std::filesystem::remove(path);  // the mapping keeps the data
  std::vector<const uint8_t*> before;
  for (const TensorInfo& t : f->tensors()) before.push_back(t.data);
  const bool moved = f->move_tensor_data_to_huge_pages();
  std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string thp_setting;
  std::getline(thp, thp_setting);
  if (!thp_setting.empty() && thp_setting.find("[never]") == std::string::npos)
    EXPECT_TRUE(moved) << "THP is '" << thp_setting << "' but the data stayed mapped";
  EXPECT_EQ(f->tensor_data_in_huge_pages(), moved);
  EXPECT_EQ(f->move_tensor_data_to_huge_pages(), moved);  // idempotent
  for (size_t i = 0; i < f->tensors().size(); ++i) {
    const TensorInfo& t = f->tensors()[i];
    const TensorInfo& r = ref->tensor(t.name);
    EXPECT_EQ(t.offset, r.offset);
    EXPECT_EQ(t.nbytes, r.nbytes);
    if (t.nbytes) EXPECT_EQ(std::memcmp(t.data, r.data, t.nbytes), 0) << t.name;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % 32, 0u) << t.name;
    if (moved) EXPECT_NE(t.data, before[i]) << t.name;
  }
  EXPECT_EQ(f->metadata().size(), ref->metadata().size());
  EXPECT_EQ(f->get_str("general.architecture"), ref->get_str("general.architecture"));
}

// Weights larger than half the memory limit stay mapped (page cache the kernel can reclaim).
TEST(Gguf, TensorDataStaysMappedWhenMemoryIsShort) {
  Builder b = small_builder();
  b.tensor("big", 0, {393216});  // 1.5 MiB of F32
  const Bytes bytes = b.build();
  const std::string path = testing::TempDir() + "gguf_big_" + std::to_string(::getpid()) + ".gguf";
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  auto f = File::open(path);
  std::filesystem::remove(path);
  const uint8_t* before = f->tensor("big").data;
  ::setenv("QF_MEMORY_LIMIT_MB", "2", 1);  // half of it, 1 MiB, is less than the data
  const bool moved = f->move_tensor_data_to_huge_pages();
  ::unsetenv("QF_MEMORY_LIMIT_MB");
  EXPECT_FALSE(moved);
  EXPECT_FALSE(f->tensor_data_in_huge_pages());
  EXPECT_EQ(f->tensor("big").data, before);
}

// Random mutations of a valid file: each must open or throw qf::Error, never crash or over-read
// (run under ASan to make over-reads fatal). When a mutant opens, all of its data is touched.
TEST(Gguf, BitFlipFuzz) {
  const Bytes base = small_builder().build();
  std::mt19937_64 rng(0x9e3779b97f4a7c15ull);
  int opened = 0, rejected = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    Bytes x = base;
    const int mode = static_cast<int>(rng() % 4);
    const int n = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < n; ++k) {
      const size_t at = rng() % x.size();
      if (mode == 0) x[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
      else if (mode == 1) x[at] = static_cast<uint8_t>(std::array<int, 6>{0, 0xff, 0x7f, 0x80, 1, 0x20}[rng() % 6]);
      else if (mode == 2 && at + 8 <= x.size()) {
        const uint64_t v = rng() >> (rng() % 64);
        std::memcpy(x.data() + at, &v, 8);
      } else if (mode == 3) x.resize(x.size() - rng() % 16);
    }
    std::vector<uint8_t> keep;
    try {
      auto f = parse(x, &keep);
      ++opened;
      unsigned sum = 0;
      for (const TensorInfo& t : f->tensors())
        for (size_t i = 0; i < t.nbytes; ++i) sum += t.data[i];
      for (const auto& [k, v] : f->metadata()) sum += static_cast<unsigned>(to_string(v, 4).size());
      try {
        sum += f->get_u32("llama.block_count");
        sum += static_cast<unsigned>(f->get_str_array("tokenizer.ggml.tokens").size());
      } catch (const Error&) {
      }
      EXPECT_GE(sum, 0u);
    } catch (const Error&) {
      ++rejected;
    }
  }
  // Both outcomes must actually occur, or the fuzz loop is not exercising anything.
  EXPECT_GT(opened, 100);
  EXPECT_GT(rejected, 100);
}

TEST(Gguf, RealModelSmolLM2) {
  auto f = File::open(test::smollm2_path());
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->tensors().size(), 272u);
  EXPECT_EQ(f->metadata().size(), 33u);
  EXPECT_EQ(f->get_str("general.architecture"), "llama");
  EXPECT_EQ(f->get_u32("llama.block_count"), 30u);
  EXPECT_EQ(f->get_u32("llama.context_length"), 8192u);
  EXPECT_EQ(f->get_u32("llama.embedding_length"), 576u);
  EXPECT_EQ(f->get_u32("llama.feed_forward_length"), 1536u);
  EXPECT_EQ(f->get_u32("llama.attention.head_count"), 9u);
  EXPECT_EQ(f->get_u32("llama.attention.head_count_kv"), 3u);
  EXPECT_EQ(f->get_u32("llama.rope.dimension_count"), 64u);
  EXPECT_EQ(f->get_u32("llama.vocab_size"), 49152u);
  EXPECT_EQ(f->get_f32("llama.rope.freq_base"), 100000.0f);
  EXPECT_EQ(f->get_f32("llama.attention.layer_norm_rms_epsilon"), 1e-5f);
  EXPECT_EQ(f->get_str("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f->get_str("tokenizer.ggml.pre"), "smollm");
  EXPECT_FALSE(f->get_bool("tokenizer.ggml.add_bos_token", true));
  EXPECT_EQ(f->get_u32("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_EQ(f->get_u32("tokenizer.ggml.eos_token_id"), 2u);
  const auto tokens = f->get_str_array("tokenizer.ggml.tokens");
  ASSERT_EQ(tokens.size(), 49152u);
  EXPECT_EQ(tokens[0], "<|endoftext|>");
  EXPECT_EQ(tokens[1], "<|im_start|>");
  EXPECT_EQ(tokens[2], "<|im_end|>");
  const auto merges = f->get_str_array("tokenizer.ggml.merges");
  ASSERT_EQ(merges.size(), 48900u);
  EXPECT_EQ(merges[0], "\xc4\xa0 t");  // "Ġ t"
  const auto types = f->get_int_array("tokenizer.ggml.token_type");
  ASSERT_EQ(types.size(), 49152u);
  EXPECT_EQ(types[0], 3);
  EXPECT_NE(f->get_str("tokenizer.chat_template").find("<|im_start|>"), std::string::npos);

  const TensorInfo& emb = f->tensor("token_embd.weight");
  EXPECT_EQ(emb.type, GgmlType::Q8_0);
  EXPECT_EQ(emb.ne, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(emb.nbytes, 576u / 32 * 34 * 49152);
  const TensorInfo& k = f->tensor("blk.0.attn_k.weight");
  EXPECT_EQ(k.type, GgmlType::Q4_1);
  EXPECT_EQ(k.ne, (std::vector<int64_t>{576, 192}));
  EXPECT_EQ(f->tensor("blk.29.ffn_down.weight").ne, (std::vector<int64_t>{1536, 576}));
  EXPECT_EQ(f->tensor("output_norm.weight").type, GgmlType::F32);
  EXPECT_EQ(f->find_tensor("output.weight"), nullptr);  // tied to token_embd
  size_t n_q41 = 0, n_f32 = 0, n_q80 = 0;
  const TensorInfo* last = nullptr;
  for (const TensorInfo& t : f->tensors()) {
    n_q41 += t.type == GgmlType::Q4_1;
    n_f32 += t.type == GgmlType::F32;
    n_q80 += t.type == GgmlType::Q8_0;
    if (!last || t.offset > last->offset) last = &t;
  }
  EXPECT_EQ(n_q41, 210u);
  EXPECT_EQ(n_f32, 61u);
  EXPECT_EQ(n_q80, 1u);
  // Data pointers are consistent with offsets, and the data section (which starts at byte
  // 1785664, per the Python gguf reader) ends exactly at the end of the file.
  const uint8_t* section = emb.data - emb.offset;
  for (const TensorInfo& t : f->tensors()) EXPECT_EQ(t.data, section + t.offset) << t.name;
  EXPECT_EQ(1785664 + last->offset + last->nbytes, f->size());
  // norm weights of SmolLM2 are O(1) floats: a sanity check that data pointers are right
  const TensorInfo& norm = f->tensor("output_norm.weight");
  float w0;
  std::memcpy(&w0, norm.data, 4);
  EXPECT_TRUE(std::isfinite(w0) && std::fabs(w0) > 0.01f && std::fabs(w0) < 100.f) << w0;
}

// Every fixture written by tests/python/make_fixtures.py opens and matches its JSON config.
TEST(Gguf, PythonFixturesOpen) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::path(test::source_dir()) / "tests" / "fixtures";
  if (!fs::exists(dir)) test::fixture("llama_f32_mha.gguf");  // throws with a how-to hint
  int n = 0;
  for (const auto& ent : fs::directory_iterator(dir)) {
    if (ent.path().extension() != ".gguf") continue;
    fs::path jpath = ent.path();
    jpath.replace_extension(".json");
    if (!fs::exists(jpath)) continue;
    SCOPED_TRACE(ent.path().string());
    ++n;
    std::ifstream js(jpath);
    const nlohmann::json j = nlohmann::json::parse(js);
    const auto& c = j.at("config");
    auto f = File::open(ent.path().string());
    // Other architectures (qwen2, qwen3, gemma3) have their own keys and extra tensors; they open
    // here and are checked tensor by tensor against numpy in model_test.
    EXPECT_EQ(f->get_str("general.architecture"), c.value("arch", "llama"));
    const bool plain_llama = c.value("arch", "llama") == "llama" && (!c.contains("rope_freqs") || c.at("rope_freqs").is_null());
    if (!plain_llama) continue;
    const int64_t L = c.at("n_layer"), E = c.at("n_embd"), V = c.at("n_vocab"), F = c.at("n_ff");
    const int64_t H = c.at("n_head"), HKV = c.at("n_head_kv"), D = c.at("head_dim");
    const bool tied = c.at("tied");
    EXPECT_EQ(f->get_str("general.architecture"), "llama");
    EXPECT_EQ(f->get_u32("llama.block_count"), static_cast<uint32_t>(L));
    EXPECT_EQ(f->get_u32("llama.embedding_length"), static_cast<uint32_t>(E));
    EXPECT_EQ(f->get_u32("llama.feed_forward_length"), static_cast<uint32_t>(F));
    EXPECT_EQ(f->get_u32("llama.attention.head_count"), static_cast<uint32_t>(H));
    EXPECT_EQ(f->get_u32("llama.attention.head_count_kv"), static_cast<uint32_t>(HKV));
    EXPECT_EQ(f->get_u32("llama.rope.dimension_count"), static_cast<uint32_t>(D));
    EXPECT_EQ(f->get_u32("llama.vocab_size"), static_cast<uint32_t>(V));
    EXPECT_EQ(f->get_f32("llama.rope.freq_base"), c.at("rope_base").get<float>());
    EXPECT_EQ(f->get_f32("llama.attention.layer_norm_rms_epsilon"), c.at("rms_eps").get<float>());
    EXPECT_EQ(f->get_str_array("tokenizer.ggml.tokens").size(), static_cast<size_t>(V));
    EXPECT_EQ(f->tensors().size(), static_cast<size_t>(2 + 9 * L + (tied ? 0 : 1)));
    EXPECT_EQ(f->find_tensor("output.weight") == nullptr, tied);
    auto type_named = [](const std::string& name) {
      for (uint32_t id = 0; id < 40; ++id)
        if (type_info(id).name == name) return static_cast<GgmlType>(id);
      ADD_FAILURE() << "unknown type " << name;
      return GgmlType::F32;
    };
    const GgmlType wt = type_named(c.at("weight_type"));
    EXPECT_EQ(f->tensor("token_embd.weight").type, type_named(c.at("embd_type")));
    EXPECT_EQ(f->tensor("token_embd.weight").ne, (std::vector<int64_t>{E, V}));
    EXPECT_EQ(f->tensor("output_norm.weight").type, GgmlType::F32);
    if (!tied) {
      EXPECT_EQ(f->tensor("output.weight").type, type_named(c.at("output_type")));
    }
    for (int64_t l = 0; l < L; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      EXPECT_EQ(f->tensor(p + "attn_norm.weight").type, GgmlType::F32);
      EXPECT_EQ(f->tensor(p + "ffn_norm.weight").type, GgmlType::F32);
      EXPECT_EQ(f->tensor(p + "attn_q.weight").ne, (std::vector<int64_t>{E, H * D}));
      EXPECT_EQ(f->tensor(p + "attn_k.weight").ne, (std::vector<int64_t>{E, HKV * D}));
      EXPECT_EQ(f->tensor(p + "attn_v.weight").ne, (std::vector<int64_t>{E, HKV * D}));
      EXPECT_EQ(f->tensor(p + "attn_output.weight").ne, (std::vector<int64_t>{H * D, E}));
      EXPECT_EQ(f->tensor(p + "ffn_gate.weight").ne, (std::vector<int64_t>{E, F}));
      EXPECT_EQ(f->tensor(p + "ffn_up.weight").ne, (std::vector<int64_t>{E, F}));
      EXPECT_EQ(f->tensor(p + "ffn_down.weight").ne, (std::vector<int64_t>{F, E}));
      for (const char* w : {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
        EXPECT_EQ(f->tensor(p + w + ".weight").type, wt) << p << w;
    }
    const auto& toks = j.at("tokens");
    EXPECT_GE(toks.size(), 16u);
    for (const auto& t : toks) EXPECT_LT(t.get<int64_t>(), V);
    EXPECT_EQ(j.at("logits").size(), toks.size());
    EXPECT_EQ(j.at("logits").at(0).size(), static_cast<size_t>(V));
    EXPECT_EQ(j.at("logits_actq8").size(), toks.size());
    EXPECT_EQ(j.at("actq8_margin").size(), toks.size());
  }
  EXPECT_GE(n, 6) << "expected the fixtures written by tests/python/make_fixtures.py in " << dir;
}

}  // namespace
}  // namespace qf::gguf
