// GGUF (v2, v3) reader: memory-maps the file, parses metadata and the tensor table, and checks
// every offset, size and count against the file so that a truncated or hostile file is an
// qf::Error naming the problem, never a crash or an out-of-bounds read.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

#include "tensor/types.h"
#include "util/huge_pages.h"

namespace qf::gguf {

enum class ValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
std::string_view value_type_name(ValueType t);

struct Value;
struct Array {
  ValueType elem_type;
  std::vector<Value> items;
};
// A metadata value. Integers of every width are kept in their declared type.
struct Value {
  ValueType type;
  std::variant<uint64_t, int64_t, double, bool, std::string, Array> v;
};

struct TensorInfo {
  std::string name;
  GgmlType type;
  std::vector<int64_t> ne;   // ggml order: ne[0] is the contiguous (row) dimension
  uint64_t offset;           // relative to the data section
  const uint8_t* data;       // inside the mapping, bounds-checked
  size_t nbytes;
  int64_t n_elements() const;
};

class File {
 public:
  // Opens and validates; throws qf::Error with a one-line reason on any problem.
  static std::unique_ptr<File> open(const std::string& path);
  // Same checks on a caller-owned buffer (fuzzing and tests); buffer must outlive the File.
  static std::unique_ptr<File> from_memory(const uint8_t* data, size_t size, std::string name = "<memory>");
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  uint32_t version() const { return version_; }
  const std::string& path() const { return path_; }
  size_t size() const { return size_; }
  uint64_t alignment() const { return alignment_; }

  const std::vector<std::pair<std::string, Value>>& metadata() const { return kv_; }
  const Value* find(std::string_view key) const;
  bool has(std::string_view key) const { return find(key) != nullptr; }

  // Typed getters: throw qf::Error if the key is missing (no default given) or has the wrong type.
  // Integer getters accept any integer type whose value fits.
  uint64_t get_u64(std::string_view key) const;
  uint64_t get_u64(std::string_view key, uint64_t def) const;
  int64_t get_i64(std::string_view key, int64_t def) const;
  uint32_t get_u32(std::string_view key) const;
  uint32_t get_u32(std::string_view key, uint32_t def) const;
  float get_f32(std::string_view key) const;
  float get_f32(std::string_view key, float def) const;
  bool get_bool(std::string_view key, bool def) const;
  std::string get_str(std::string_view key) const;
  std::string get_str(std::string_view key, std::string def) const;
  std::vector<std::string> get_str_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;     // any integer element type
  std::vector<float> get_float_array(std::string_view key) const;     // F32 or F64 elements

  // Moves the tensor data out of the file mapping into anonymous memory the kernel may back with
  // 2 MiB pages (MADV_HUGEPAGE), and drops the mapped copy's pages. Decode streams every weight
  // once per token; with 4 KiB pages a single core read them about a third slower (hardware
  // prefetchers stop at page boundaries, and the TLB misses). Call before taking any
  // TensorInfo::data pointer: they move. Returns false, changing nothing, where the kernel offers
  // no huge pages, or the data exceeds half of memory_limit_bytes() (util/memory.h: mapped
  // weights can be paged out under pressure, a copy cannot), or the allocation fails; the
  // weights then stay mapped.
  bool move_tensor_data_to_huge_pages();
  bool tensor_data_in_huge_pages() const { return anon_.data() != nullptr; }
  // Runs edit(begin, end) with the tensor data writable, when it is this process's own copy (see
  // above; it is read-only again afterwards, also when edit throws). Returns false, without
  // calling edit, when the data is the file's mapping.
  bool edit_tensor_data(const std::function<void(uint8_t* begin, uint8_t* end)>& edit);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;
  const TensorInfo& tensor(std::string_view name) const;  // throws if missing

 private:
  File() = default;
  void parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  void* mapping_ = nullptr;  // non-null when we own an mmap
  uint64_t data_start_ = 0;  // the data section's offset in the file
  HugePageBuffer anon_;      // the tensor data's anonymous copy, when moved there
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<std::pair<std::string, Value>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// Human-readable rendering of a value (arrays abbreviated), for `qf info`.
std::string to_string(const Value& v, size_t max_items = 8);

}  // namespace qf::gguf
