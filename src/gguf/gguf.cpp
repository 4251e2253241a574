#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <limits>

#include "util/error.h"
#include "util/huge_pages.h"
#include "util/memory.h"

namespace qf::gguf {

namespace {

// Nested arrays are legal GGUF but nothing real uses more than one level; the bound keeps a
// hostile file from recursing the parser off the stack.
constexpr int kMaxArrayDepth = 4;
constexpr uint32_t kMaxDims = 4;
// Each array item becomes a ~48-byte Value, so a file of one-byte items could ask for 48x its size
// in memory. Real vocabularies (tokens + scores + types + merges) stay well under 2M items.
constexpr uint64_t kMaxArrayItems = uint64_t{1} << 23;

bool is_integer(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::U16: case ValueType::I16:
    case ValueType::U32: case ValueType::I32: case ValueType::U64: case ValueType::I64:
      return true;
    default:
      return false;
  }
}

bool is_valid_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::F64); }

// Smallest number of bytes a value of type t can occupy on disk; used to reject counts that
// cannot possibly fit in the rest of the file before anything is allocated.
uint64_t min_encoded_size(ValueType t) {
  switch (t) {
    case ValueType::U8: case ValueType::I8: case ValueType::BOOL: return 1;
    case ValueType::U16: case ValueType::I16: return 2;
    case ValueType::U32: case ValueType::I32: case ValueType::F32: return 4;
    case ValueType::U64: case ValueType::I64: case ValueType::F64: return 8;
    case ValueType::STRING: return 8;   // length prefix
    case ValueType::ARRAY: return 12;   // element type + count
  }
  return 1;
}

// Bounds-checked little-endian cursor over the file. Every failure names the file and the byte.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& path) : p_(data), size_(size), path_(path) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }

  template <typename... Args>
  [[noreturn]] void error_at(size_t at, const Args&... what) const {
    fail(path_, ": ", what..., " (at byte ", at, ")");
  }

  void need(uint64_t n, const char* what) const {
    if (n > remaining()) error_at(pos_, "truncated file: ", what, " needs ", n, " bytes, ", remaining(), " left");
  }

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));  // GGUF is little-endian, as is every host we build for
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const char* what) {
    const size_t at = pos_;
    const uint64_t len = read<uint64_t>(what);
    if (len > remaining()) error_at(at, what, " claims ", len, " bytes but only ", remaining(), " remain");
    std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

Value read_scalar(Cursor& c, ValueType t) {
  switch (t) {
    case ValueType::U8: return {t, uint64_t{c.read<uint8_t>("u8 value")}};
    case ValueType::I8: return {t, int64_t{c.read<int8_t>("i8 value")}};
    case ValueType::U16: return {t, uint64_t{c.read<uint16_t>("u16 value")}};
    case ValueType::I16: return {t, int64_t{c.read<int16_t>("i16 value")}};
    case ValueType::U32: return {t, uint64_t{c.read<uint32_t>("u32 value")}};
    case ValueType::I32: return {t, int64_t{c.read<int32_t>("i32 value")}};
    case ValueType::U64: return {t, c.read<uint64_t>("u64 value")};
    case ValueType::I64: return {t, c.read<int64_t>("i64 value")};
    case ValueType::F32: return {t, double{c.read<float>("f32 value")}};
    case ValueType::F64: return {t, c.read<double>("f64 value")};
    case ValueType::BOOL: {
      const size_t at = c.pos();
      const uint8_t b = c.read<uint8_t>("bool value");
      if (b > 1) c.error_at(at, "bool value is ", int{b}, ", not 0 or 1");
      return {t, b == 1};
    }
    case ValueType::STRING: return {t, c.read_string("string value")};
    case ValueType::ARRAY: break;
  }
  fail("internal: read_scalar on array");
}

Value read_value(Cursor& c, ValueType t, int depth, uint64_t& items_left) {
  if (t != ValueType::ARRAY) return read_scalar(c, t);
  const size_t at = c.pos();
  if (depth >= kMaxArrayDepth) c.error_at(at, "arrays nested deeper than ", kMaxArrayDepth);
  const uint32_t raw = c.read<uint32_t>("array element type");
  if (!is_valid_type(raw)) c.error_at(at, "array has invalid element type ", raw);
  const auto et = static_cast<ValueType>(raw);
  const uint64_t n = c.read<uint64_t>("array length");
  if (n > c.remaining() / min_encoded_size(et))
    c.error_at(at, "array of ", n, " ", value_type_name(et), " cannot fit in the ", c.remaining(), " bytes left");
  if (n > items_left) c.error_at(at, "metadata arrays hold more than ", kMaxArrayItems, " items in total");
  items_left -= n;
  Array arr{et, {}};
  arr.items.reserve(static_cast<size_t>(n));
  for (uint64_t i = 0; i < n; ++i) arr.items.push_back(read_value(c, et, depth + 1, items_left));
  return {ValueType::ARRAY, std::move(arr)};
}

// a + b, or fail when it does not fit in 64 bits.
bool add_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_add_overflow(a, b, out); }
bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

void append_escaped(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (ch < 0x20 || ch == 0x7f) {
          static const char* hex = "0123456789abcdef";
          out += "\\x";
          out += hex[ch >> 4];
          out += hex[ch & 15];
        } else {
          out += static_cast<char>(ch);  // UTF-8 passes through
        }
    }
  }
  out += '"';
}

void append_value(std::string& out, const Value& v, size_t max_items) {
  switch (v.type) {
    case ValueType::U8: case ValueType::U16: case ValueType::U32: case ValueType::U64:
      out += std::to_string(std::get<uint64_t>(v.v));
      return;
    case ValueType::I8: case ValueType::I16: case ValueType::I32: case ValueType::I64:
      out += std::to_string(std::get<int64_t>(v.v));
      return;
    case ValueType::F32: case ValueType::F64: {
      char buf[64];
      const double d = std::get<double>(v.v);
      // Shortest text that reads back to the stored value (as float for F32).
      auto r = v.type == ValueType::F32 ? std::to_chars(buf, buf + sizeof buf, static_cast<float>(d))
                                        : std::to_chars(buf, buf + sizeof buf, d);
      out.append(buf, r.ptr);
      return;
    }
    case ValueType::BOOL:
      out += std::get<bool>(v.v) ? "true" : "false";
      return;
    case ValueType::STRING:
      append_escaped(out, std::get<std::string>(v.v));
      return;
    case ValueType::ARRAY: {
      const Array& a = std::get<Array>(v.v);
      out += '[';
      const size_t shown = std::min(a.items.size(), max_items);
      for (size_t i = 0; i < shown; ++i) {
        if (i) out += ", ";
        append_value(out, a.items[i], max_items);
      }
      if (shown < a.items.size()) {
        out += shown ? ", ... " : "... ";
        out += std::to_string(a.items.size());
        out += " x ";
        out += value_type_name(a.elem_type);
      }
      out += ']';
      return;
    }
  }
}

}  // namespace

std::string_view value_type_name(ValueType t) {
  switch (t) {
    case ValueType::U8: return "U8";
    case ValueType::I8: return "I8";
    case ValueType::U16: return "U16";
    case ValueType::I16: return "I16";
    case ValueType::U32: return "U32";
    case ValueType::I32: return "I32";
    case ValueType::F32: return "F32";
    case ValueType::BOOL: return "BOOL";
    case ValueType::STRING: return "STRING";
    case ValueType::ARRAY: return "ARRAY";
    case ValueType::U64: return "U64";
    case ValueType::I64: return "I64";
    case ValueType::F64: return "F64";
  }
  return "INVALID";
}

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // cannot overflow: checked when the file was opened
  return n;
}

std::unique_ptr<File> File::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail(path, ": cannot stat: ", std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": not a regular file");
  }
  if (st.st_size == 0) {
    ::close(fd);
    fail(path, ": empty file, not GGUF");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int e = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (m == MAP_FAILED) fail(path, ": mmap failed: ", std::strerror(e));

  std::unique_ptr<File> f(new File());
  f->path_ = path;
  f->mapping_ = m;
  f->base_ = static_cast<const uint8_t*>(m);
  f->size_ = size;
  f->parse();  // on throw, ~File unmaps
  return f;
}

std::unique_ptr<File> File::from_memory(const uint8_t* data, size_t size, std::string name) {
  std::unique_ptr<File> f(new File());
  f->path_ = std::move(name);
  f->base_ = data;
  f->size_ = data ? size : 0;
  f->parse();
  return f;
}

File::~File() {
  if (mapping_) ::munmap(mapping_, size_);
}

bool File::move_tensor_data_to_huge_pages() {
  if (anon_.data() != nullptr || !mapping_ || data_start_ >= size_) return anon_.data() != nullptr;
  // Mapped weights are page cache the kernel can drop under pressure; a copy is not. Copy only
  // what leaves room (half the memory this process may use) for the rest.
  const size_t bytes = size_ - data_start_;
  if (bytes > memory_limit_bytes() / 2) return false;
  HugePageBuffer copy(bytes, /*min_huge_bytes=*/0);
  if (!copy.in_huge_pages()) return false;  // THP refused: nothing to gain
  // Copy in chunks, dropping each chunk's file pages from this process once copied, so resident
  // memory never holds both copies.
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const uint8_t* src = base_ + data_start_;
  uint8_t* dst = copy.data();
  constexpr size_t kChunk = 8 * HugePageBuffer::kHugePage;
  for (size_t off = 0; off < bytes; off += kChunk) {
    const size_t n = std::min(kChunk, bytes - off);
    std::memcpy(dst + off, src + off, n);
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(src + off) + page - 1) / page * page;
    const uintptr_t hi = reinterpret_cast<uintptr_t>(src + off + n) / page * page;
    if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  }
  ::mprotect(dst, copy.mapped_bytes(), PROT_READ);  // weights are read-only, as they were in the mapping
  for (TensorInfo& t : tensors_) t.data = dst + (t.data - src);
  anon_ = std::move(copy);
  return true;
}

bool File::edit_tensor_data(const std::function<void(uint8_t*, uint8_t*)>& edit) {
  if (anon_.data() == nullptr) return false;
  struct ReadOnlyAgain {
    HugePageBuffer& buf;
    ~ReadOnlyAgain() { ::mprotect(buf.data(), buf.mapped_bytes(), PROT_READ); }
  } guard{anon_};
  if (::mprotect(anon_.data(), anon_.mapped_bytes(), PROT_READ | PROT_WRITE) != 0)
    fail(path_, ": cannot make the weights' copy writable: ", std::strerror(errno));
  edit(anon_.data(), anon_.data() + (size_ - data_start_));
  return true;
}

void File::parse() {
  Cursor c(base_, size_, path_);

  if (size_ < 4 || std::memcmp(base_, "GGUF", 4) != 0) c.error_at(0, "not a GGUF file (bad magic)");
  c.read<uint32_t>("magic");
  const size_t version_at = c.pos();
  version_ = c.read<uint32_t>("version");
  if (version_ == 1) c.error_at(version_at, "GGUF version 1 is not supported (only versions 2 and 3)");
  if (version_ != 2 && version_ != 3) {
    if ((version_ & 0xFFFF) == 0 && (version_ >> 16) != 0)
      c.error_at(version_at, "GGUF version ", version_, " looks byte-swapped (big-endian file?); only little-endian v2/v3 are supported");
    c.error_at(version_at, "unsupported GGUF version ", version_, " (only versions 2 and 3)");
  }

  const size_t counts_at = c.pos();
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Smallest possible encodings: a key-value is key length + type + one byte; a tensor info is
  // name length + n_dims + one dim + type + offset.
  if (n_kv > c.remaining() / 13) c.error_at(counts_at + 8, "metadata count ", n_kv, " cannot fit in the file");
  if (n_tensors > c.remaining() / 32) c.error_at(counts_at, "tensor count ", n_tensors, " cannot fit in the file");

  kv_.reserve(static_cast<size_t>(n_kv));
  uint64_t items_left = kMaxArrayItems;
  for (uint64_t i = 0; i < n_kv; ++i) {
    const size_t key_at = c.pos();
    std::string key = c.read_string("metadata key");
    if (key.empty()) c.error_at(key_at, "empty metadata key");
    if (kv_index_.count(key)) c.error_at(key_at, "duplicate metadata key '", key, "'");
    const size_t type_at = c.pos();
    const uint32_t raw = c.read<uint32_t>("metadata value type");
    if (!is_valid_type(raw)) c.error_at(type_at, "metadata key '", key, "' has invalid value type ", raw);
    Value v = read_value(c, static_cast<ValueType>(raw), 0, items_left);
    kv_index_.emplace(key, kv_.size());
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const Value* a = find("general.alignment")) {
    if (!is_integer(a->type)) fail(path_, ": general.alignment has type ", value_type_name(a->type), ", expected an integer");
    const bool neg = std::holds_alternative<int64_t>(a->v) && std::get<int64_t>(a->v) < 0;
    const uint64_t al = std::holds_alternative<uint64_t>(a->v) ? std::get<uint64_t>(a->v) : static_cast<uint64_t>(std::get<int64_t>(a->v));
    // Bounded by 2^30 so that aligning an offset inside the file can never overflow.
    if (neg || al == 0 || (al & (al - 1)) != 0 || al > (uint64_t{1} << 30))
      fail(path_, ": general.alignment ", neg ? std::string("is negative") : std::to_string(al) + " is not a power of two in [1, 2^30]");
    alignment_ = al;
  }

  // Offsets of each tensor info's fields, for error messages after the table is read.
  std::vector<size_t> info_at;
  tensors_.reserve(static_cast<size_t>(n_tensors));
  info_at.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t{};
    const size_t name_at = c.pos();
    t.name = c.read_string("tensor name");
    if (t.name.empty()) c.error_at(name_at, "tensor ", i, " has an empty name");
    if (tensor_index_.count(t.name)) c.error_at(name_at, "duplicate tensor name '", t.name, "'");
    const size_t dims_at = c.pos();
    const uint32_t n_dims = c.read<uint32_t>("tensor dimension count");
    if (n_dims == 0 || n_dims > kMaxDims)
      c.error_at(dims_at, "tensor '", t.name, "' has ", n_dims, " dimensions (1 to ", kMaxDims, " allowed)");
    t.ne.resize(n_dims);
    uint64_t n_el = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const size_t ne_at = c.pos();
      const uint64_t ne = c.read<uint64_t>("tensor dimension");
      if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        c.error_at(ne_at, "tensor '", t.name, "' dimension ", d, " is ", ne, " (negative as int64)");
      if (mul_overflows(n_el, ne, &n_el) || n_el > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        c.error_at(ne_at, "tensor '", t.name, "' element count overflows int64");
      t.ne[d] = static_cast<int64_t>(ne);
    }
    const size_t type_at = c.pos();
    const uint32_t type_id = c.read<uint32_t>("tensor type");
    const TypeInfo ti = type_info(type_id);
    if (ti.block_elems <= 0) c.error_at(type_at, "tensor '", t.name, "' has unknown type id ", type_id);
    t.type = static_cast<GgmlType>(type_id);
    if (t.ne[0] % ti.block_elems != 0)
      c.error_at(dims_at, "tensor '", t.name, "' row of ", t.ne[0], " elements is not a whole number of ", ti.name,
                 " blocks of ", ti.block_elems);
    const uint64_t rows = t.ne[0] == 0 ? 0 : n_el / static_cast<uint64_t>(t.ne[0]);
    uint64_t nbytes = 0;
    if (mul_overflows(static_cast<uint64_t>(t.ne[0] / ti.block_elems), ti.block_bytes, &nbytes) ||
        mul_overflows(nbytes, rows, &nbytes) || nbytes > std::numeric_limits<size_t>::max())
      c.error_at(dims_at, "tensor '", t.name, "' byte size overflows");
    t.nbytes = static_cast<size_t>(nbytes);
    const size_t off_at = c.pos();
    t.offset = c.read<uint64_t>("tensor data offset");
    if (t.offset % alignment_ != 0)
      c.error_at(off_at, "tensor '", t.name, "' data offset ", t.offset, " is not a multiple of the alignment ", alignment_);
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
    info_at.push_back(off_at);
  }

  // The data section starts at the first aligned byte after the tensor table. alignment_ <= 2^30
  // and pos <= size, so this cannot overflow.
  const uint64_t data_start = (static_cast<uint64_t>(c.pos()) + alignment_ - 1) / alignment_ * alignment_;
  if (!tensors_.empty() && data_start > size_)
    c.error_at(c.pos(), "truncated file: data section would start at byte ", data_start, " past the end (", size_, ")");
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorInfo& t = tensors_[i];
    uint64_t begin = 0, end = 0;
    if (add_overflows(data_start, t.offset, &begin) || add_overflows(begin, t.nbytes, &end) || end > size_)
      c.error_at(info_at[i], "tensor '", t.name, "' data [", t.offset, ", +", t.nbytes, ") lies outside the file (data section ",
                 data_start, ", file size ", size_, ")");
    t.data = base_ + begin;
  }
  data_start_ = data_start;
}

const Value* File::find(std::string_view key) const {
  auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

namespace {

[[noreturn]] void wrong_type(const std::string& path, std::string_view key, const Value& v, const char* expected) {
  fail(path, ": metadata key '", key, "' has type ", value_type_name(v.type), ", expected ", expected);
}

// Integer value as (negative?, magnitude-or-value) so range checks need no signed/unsigned mixing.
struct IntVal {
  bool negative;
  uint64_t u;   // value when !negative
  int64_t s;    // value when negative
};

IntVal int_of(const Value& v) {
  if (std::holds_alternative<uint64_t>(v.v)) return {false, std::get<uint64_t>(v.v), 0};
  const int64_t s = std::get<int64_t>(v.v);
  return s < 0 ? IntVal{true, 0, s} : IntVal{false, static_cast<uint64_t>(s), s};
}

std::string int_text(const IntVal& i) { return i.negative ? std::to_string(i.s) : std::to_string(i.u); }

uint64_t unsigned_in_range(const std::string& path, std::string_view key, const Value& v, uint64_t max, const char* what) {
  if (!is_integer(v.type)) wrong_type(path, key, v, "an integer");
  const IntVal i = int_of(v);
  if (i.negative || i.u > max) fail(path, ": metadata key '", key, "' = ", int_text(i), " does not fit in ", what);
  return i.u;
}

}  // namespace

uint64_t File::get_u64(std::string_view key) const {
  const Value* v = find(key);
  if (!v) fail(path_, ": metadata key '", key, "' is missing");
  return unsigned_in_range(path_, key, *v, std::numeric_limits<uint64_t>::max(), "u64");
}

uint64_t File::get_u64(std::string_view key, uint64_t def) const { return has(key) ? get_u64(key) : def; }

int64_t File::get_i64(std::string_view key, int64_t def) const {
  const Value* v = find(key);
  if (!v) return def;
  if (!is_integer(v->type)) wrong_type(path_, key, *v, "an integer");
  const IntVal i = int_of(*v);
  if (!i.negative && i.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    fail(path_, ": metadata key '", key, "' = ", i.u, " does not fit in i64");
  return i.negative ? i.s : static_cast<int64_t>(i.u);
}

uint32_t File::get_u32(std::string_view key) const {
  const Value* v = find(key);
  if (!v) fail(path_, ": metadata key '", key, "' is missing");
  return static_cast<uint32_t>(unsigned_in_range(path_, key, *v, std::numeric_limits<uint32_t>::max(), "u32"));
}

uint32_t File::get_u32(std::string_view key, uint32_t def) const { return has(key) ? get_u32(key) : def; }

float File::get_f32(std::string_view key) const {
  const Value* v = find(key);
  if (!v) fail(path_, ": metadata key '", key, "' is missing");
  if (v->type != ValueType::F32 && v->type != ValueType::F64) wrong_type(path_, key, *v, "F32 or F64");
  return static_cast<float>(std::get<double>(v->v));
}

float File::get_f32(std::string_view key, float def) const { return has(key) ? get_f32(key) : def; }

bool File::get_bool(std::string_view key, bool def) const {
  const Value* v = find(key);
  if (!v) return def;
  if (v->type != ValueType::BOOL) wrong_type(path_, key, *v, "BOOL");
  return std::get<bool>(v->v);
}

std::string File::get_str(std::string_view key) const {
  const Value* v = find(key);
  if (!v) fail(path_, ": metadata key '", key, "' is missing");
  if (v->type != ValueType::STRING) wrong_type(path_, key, *v, "STRING");
  return std::get<std::string>(v->v);
}

std::string File::get_str(std::string_view key, std::string def) const { return has(key) ? get_str(key) : def; }

namespace {
const Array& array_of(const std::string& path, std::string_view key, const Value* v, const char* expected) {
  if (!v) fail(path, ": metadata key '", key, "' is missing");
  if (v->type != ValueType::ARRAY) wrong_type(path, key, *v, expected);
  return std::get<Array>(v->v);
}
}  // namespace

std::vector<std::string> File::get_str_array(std::string_view key) const {
  const Array& a = array_of(path_, key, find(key), "an array of STRING");
  if (a.elem_type != ValueType::STRING)
    fail(path_, ": metadata key '", key, "' is an array of ", value_type_name(a.elem_type), ", expected STRING");
  std::vector<std::string> out;
  out.reserve(a.items.size());
  for (const Value& x : a.items) out.push_back(std::get<std::string>(x.v));
  return out;
}

std::vector<int64_t> File::get_int_array(std::string_view key) const {
  const Array& a = array_of(path_, key, find(key), "an array of integers");
  if (!is_integer(a.elem_type))
    fail(path_, ": metadata key '", key, "' is an array of ", value_type_name(a.elem_type), ", expected integers");
  std::vector<int64_t> out;
  out.reserve(a.items.size());
  for (size_t i = 0; i < a.items.size(); ++i) {
    const IntVal x = int_of(a.items[i]);
    if (!x.negative && x.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(path_, ": metadata key '", key, "' item ", i, " = ", x.u, " does not fit in i64");
    out.push_back(x.negative ? x.s : static_cast<int64_t>(x.u));
  }
  return out;
}

std::vector<float> File::get_float_array(std::string_view key) const {
  const Array& a = array_of(path_, key, find(key), "an array of floats");
  if (a.elem_type != ValueType::F32 && a.elem_type != ValueType::F64)
    fail(path_, ": metadata key '", key, "' is an array of ", value_type_name(a.elem_type), ", expected F32 or F64");
  std::vector<float> out;
  out.reserve(a.items.size());
  for (const Value& x : a.items) out.push_back(static_cast<float>(std::get<double>(x.v)));
  return out;
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(std::string_view name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) fail(path_, ": tensor '", name, "' is missing");
  return *t;
}

std::string to_string(const Value& v, size_t max_items) {
  std::string out;
  append_value(out, v, max_items);
  return out;
}

}  // namespace qf::gguf
