#include "calib/filter_file.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "util/error.h"

#ifndef QF_VERSION
#define QF_VERSION "unknown"
#endif

namespace qf::calib {

// Tensor bytes are copied to/from floats as they lie in memory.
static_assert(std::endian::native == std::endian::little, "filter files are little-endian");

using json = nlohmann::json;

namespace {

constexpr int kMaxJsonDepth = 8;             // our header nests 3 deep
constexpr uint64_t kMaxDim = 1u << 20;
constexpr uint64_t kMaxElements = 1u << 28;  // 1 GiB of F32: far beyond any real filter set

struct TensorSpec {
  std::string dtype;
  std::array<uint64_t, 3> shape{};
  uint64_t begin = 0, end = 0;  // relative to the data section
  std::map<std::string, std::string> metadata;
  size_t elem_bytes = 0;
  uint64_t count = 0;
};

uint64_t load_u64_le(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Validates the 8-byte length prefix against the file size; returns N.
uint64_t header_length(const uint8_t* prefix, uint64_t file_size, std::string_view name) {
  if (file_size < 8) fail(name, ": ", file_size, " bytes is too short for a safetensors file");
  const uint64_t n = load_u64_le(prefix);
  if (n == 0) fail(name, ": safetensors header length is 0");
  if (n > kMaxHeaderBytes)
    fail(name, ": safetensors header length ", n, " exceeds the ", kMaxHeaderBytes, " byte limit");
  if (n > file_size - 8)
    fail(name, ": safetensors header length ", n, " runs past the end of the file (", file_size, " bytes)");
  return n;
}

uint64_t unsigned_field(const json& j, std::string_view what, std::string_view name) {
  if (!j.is_number_unsigned()) fail(name, ": ", what, " must be a non-negative integer");
  return j.get<uint64_t>();
}

TensorSpec parse_header(std::string_view text, uint64_t data_size, std::string_view name) {
  bool too_deep = false;
  const json::parser_callback_t limit_depth = [&](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonDepth) too_deep = true;
    return !too_deep;  // discarding keeps a hostile deeply nested header from being built at all
  };
  json root;
  try {
    root = json::parse(text.begin(), text.end(), limit_depth);
  } catch (const json::exception& e) {
    fail(name, ": safetensors header is not valid JSON: ", e.what());
  }
  if (too_deep) fail(name, ": safetensors header nests deeper than ", kMaxJsonDepth, " levels");
  if (!root.is_object()) fail(name, ": safetensors header is not a JSON object");

  TensorSpec spec;
  if (auto m = root.find("__metadata__"); m != root.end()) {
    if (!m->is_object()) fail(name, ": __metadata__ is not a JSON object");
    for (const auto& [k, v] : m->items()) {
      if (!v.is_string()) fail(name, ": __metadata__ value of '", k, "' is not a string");
      spec.metadata[k] = v.get<std::string>();
    }
  }

  const auto t = root.find(std::string(kFilterTensorName));
  if (t == root.end()) {
    std::string names;
    for (const auto& [k, v] : root.items())
      if (k != "__metadata__") names += (names.empty() ? "" : ", ") + k;
    fail(name, ": no tensor '", kFilterTensorName, "' (tensors: ", names.empty() ? "none" : names, ")");
  }
  if (!t->is_object()) fail(name, ": entry '", kFilterTensorName, "' is not a JSON object");

  const auto dt = t->find("dtype");
  if (dt == t->end() || !dt->is_string()) fail(name, ": tensor '", kFilterTensorName, "' has no string dtype");
  spec.dtype = dt->get<std::string>();
  if (spec.dtype == "F32") spec.elem_bytes = 4;
  else if (spec.dtype == "F16" || spec.dtype == "BF16") spec.elem_bytes = 2;
  else fail(name, ": tensor '", kFilterTensorName, "' has dtype ", spec.dtype, " (supported: F32, F16, BF16)");

  const auto sh = t->find("shape");
  if (sh == t->end() || !sh->is_array()) fail(name, ": tensor '", kFilterTensorName, "' has no shape array");
  if (sh->size() != 3)
    fail(name, ": tensor '", kFilterTensorName, "' has rank ", sh->size(),
         ", expected 3 [n_layers, n_kv_heads, head_dim]");
  spec.count = 1;
  for (size_t i = 0; i < 3; ++i) {
    const uint64_t d = unsigned_field((*sh)[i], "shape entry", name);
    if (d == 0 || d > kMaxDim)
      fail(name, ": tensor '", kFilterTensorName, "' shape entry ", d, " is out of range 1..", kMaxDim);
    spec.shape[i] = d;
    spec.count *= d;  // <= 2^60: no overflow
    if (spec.count > kMaxElements)
      fail(name, ": tensor '", kFilterTensorName, "' has more than ", kMaxElements, " elements");
  }

  const auto off = t->find("data_offsets");
  if (off == t->end() || !off->is_array() || off->size() != 2)
    fail(name, ": tensor '", kFilterTensorName, "' needs data_offsets [begin, end]");
  spec.begin = unsigned_field((*off)[0], "data_offsets begin", name);
  spec.end = unsigned_field((*off)[1], "data_offsets end", name);
  if (spec.begin > spec.end)
    fail(name, ": tensor '", kFilterTensorName, "' data_offsets begin ", spec.begin, " > end ", spec.end);
  if (spec.end > data_size)
    fail(name, ": tensor '", kFilterTensorName, "' data ends at ", spec.end, " but the data section has ",
         data_size, " bytes");
  if (spec.end - spec.begin != spec.count * spec.elem_bytes)
    fail(name, ": tensor '", kFilterTensorName, "' holds ", spec.end - spec.begin, " bytes, its shape and dtype need ",
         spec.count * spec.elem_bytes);
  return spec;
}

float f16_to_f32(uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(float(mant), -24);  // zero and subnormals
  else if (exp == 31) v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else v = std::ldexp(float(mant | 0x400), exp - 25);
  return (h & 0x8000) ? -v : v;
}

float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

StoredFilters decode(const TensorSpec& spec, const uint8_t* data, std::string_view name) {
  StoredFilters out;
  out.filters = Filters(int(spec.shape[0]), int(spec.shape[1]), int(spec.shape[2]));
  out.filters.metadata = spec.metadata;
  out.dtype = spec.dtype;
  float* dst = out.filters.data.data();
  for (uint64_t i = 0; i < spec.count; ++i) {
    float v;
    if (spec.elem_bytes == 4) {
      std::memcpy(&v, data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      v = spec.dtype == "F16" ? f16_to_f32(h) : bf16_to_f32(h);
    }
    if (!std::isfinite(v)) fail(name, ": tensor '", kFilterTensorName, "' has a non-finite value at element ", i);
    dst[i] = v;
  }
  return out;
}

void check_consistent(const Filters& f) {
  if (f.n_layers <= 0 || f.n_kv_heads <= 0 || f.head_dim <= 0 ||
      f.data.size() != size_t(f.n_layers) * size_t(f.n_kv_heads) * size_t(f.head_dim))
    fail("filters: data size ", f.data.size(), " does not match shape ", f.n_layers, "x", f.n_kv_heads, "x",
         f.head_dim);
  for (size_t i = 0; i < f.data.size(); ++i)
    if (!std::isfinite(f.data[i])) fail("filters: non-finite value at element ", i);
}

}  // namespace

std::string model_fingerprint(std::string_view arch, int n_layers, int n_head, int n_head_kv, int head_dim, int n_embd,
                              int n_vocab) {
  std::string s(arch);
  s += ":L" + std::to_string(n_layers) + ":H" + std::to_string(n_head) + ":KV" + std::to_string(n_head_kv) + ":D" +
       std::to_string(head_dim) + ":E" + std::to_string(n_embd) + ":V" + std::to_string(n_vocab);
  return s;
}

void set_calibration_metadata(Filters& f, const CalibrationInfo& info) {
  auto& m = f.metadata;
  m["format"] = kFilterFormat;
  m["model"] = info.model_name;
  m["architecture"] = info.architecture;
  m["fingerprint"] = info.fingerprint;
  m["corpus"] = info.corpus;
  m["n_docs"] = std::to_string(info.n_docs);
  m["doc_len"] = std::to_string(info.doc_len);
  m["n_samples"] = std::to_string(info.n_samples);
  m["seed"] = std::to_string(info.seed);
  m["orientation"] = info.orientation;
  m["tool_version"] = QF_VERSION;
  m["sign_convention"] = to_string(SignConvention::kKeepLargestDot);
  m["layout"] = to_string(FilterLayout::kGguf);
}

namespace {

// One F32 tensor named q_filters with `meta` as __metadata__, as safetensors writes it.
std::vector<uint8_t> serialize_tensor(const Filters& f, json meta) {
  check_consistent(f);
  const uint64_t nbytes = uint64_t(f.data.size()) * 4;
  json tensor = json::object();
  tensor["dtype"] = "F32";
  tensor["shape"] = json::array({f.n_layers, f.n_kv_heads, f.head_dim});
  tensor["data_offsets"] = json::array({uint64_t(0), nbytes});
  json root = json::object();
  root["__metadata__"] = std::move(meta);
  root[std::string(kFilterTensorName)] = std::move(tensor);

  std::string header;
  try {
    header = root.dump();
  } catch (const json::exception& e) {
    fail("filters: metadata cannot be written as JSON: ", e.what());  // e.g. invalid UTF-8
  }
  header.append((8 - header.size() % 8) % 8, ' ');  // keeps the data 8-byte aligned, as safetensors does

  std::vector<uint8_t> out(8 + header.size() + nbytes);
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  std::memcpy(out.data() + 8 + header.size(), f.data.data(), nbytes);
  return out;
}

// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees half a file.
void write_atomically(const std::string& path, const std::vector<uint8_t>& bytes) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(path, ": cannot open ", tmp, " for writing");
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    out.close();
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      fail(path, ": write failed");
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    fail(path, ": cannot rename the temporary file into place");
  }
}

}  // namespace

std::vector<uint8_t> serialize_filters(const Filters& f) {
  json meta = json::object();
  for (const auto& [k, v] : f.metadata) meta[k] = v;
  meta["format"] = kFilterFormat;
  meta["sign_convention"] = to_string(SignConvention::kKeepLargestDot);
  meta["layout"] = to_string(FilterLayout::kGguf);
  if (!meta.contains("tool_version")) meta["tool_version"] = QF_VERSION;
  return serialize_tensor(f, std::move(meta));
}

void write_filters(const std::string& path, const Filters& f) { write_atomically(path, serialize_filters(f)); }

void export_hf(const std::string& dir, const Filters& f) {
  const Filters published = from_canonical(f, FilterLayout::kHf, SignConvention::kKeepSmallestDot);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir, ec)) fail(dir, ": cannot create the directory");
  // What huggingface_hub's PyTorchModelHubMixin.save_pretrained writes for kvpress's QFilters module.
  write_atomically((std::filesystem::path(dir) / kHfWeightsFile).string(),
                   serialize_tensor(published, json{{"format", "pt"}}));
  const json config = {{"num_layers", f.n_layers}, {"num_kv_heads", f.n_kv_heads}, {"kv_head_dim", f.head_dim}};
  const std::string text = config.dump(2) + "\n";
  write_atomically((std::filesystem::path(dir) / kHfConfigFile).string(),
                   std::vector<uint8_t>(text.begin(), text.end()));
}

StoredFilters parse_filters(std::span<const uint8_t> bytes, std::string_view name) {
  const uint64_t n = header_length(bytes.data(), bytes.size(), name);
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  const uint64_t data_size = bytes.size() - 8 - n;
  const TensorSpec spec = parse_header(text, data_size, name);
  return decode(spec, bytes.data() + 8 + n + spec.begin, name);
}

StoredFilters read_filters(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail(path, ": no such file (or not a regular file)");
  const uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) fail(path, ": cannot get the file size");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open for reading");

  // Read only what the header describes: a hostile length never makes us allocate the whole file.
  std::array<uint8_t, 8> prefix{};
  if (size >= 8 && !in.read(reinterpret_cast<char*>(prefix.data()), 8)) fail(path, ": read error");
  const uint64_t n = header_length(prefix.data(), size, path);
  std::string text(n, '\0');
  if (!in.read(text.data(), std::streamsize(n))) fail(path, ": read error in the header");
  const TensorSpec spec = parse_header(text, size - 8 - n, path);
  std::vector<uint8_t> data(spec.end - spec.begin);
  in.seekg(std::streamoff(8 + n + spec.begin));
  if (!in.read(reinterpret_cast<char*>(data.data()), std::streamsize(data.size())))
    fail(path, ": read error in the tensor data");
  return decode(spec, data.data(), path);
}

namespace {

template <typename T, typename Parse>
T resolve(std::string_view name, const std::map<std::string, std::string>& md, const char* key,
          const std::optional<T>& requested, bool ours, Parse parse, const char* what) {
  std::optional<T> stored;
  if (auto it = md.find(key); it != md.end()) {
    try {
      stored = parse(it->second);
    } catch (const Error& e) {
      fail(name, ": metadata ", key, ": ", e.what());
    }
  }
  if (ours && !stored) fail(name, ": qfilters file has no '", key, "' metadata");
  if (stored && requested && *stored != *requested)
    fail(name, ": the file's ", what, " is ", to_string(*stored), " but ", to_string(*requested), " was requested");
  if (stored) return *stored;
  if (!requested)
    fail(name, ": not a qfilters file, so its ", what,
         " must be given (published reference filters are layout hf, sign keep_smallest_dot)");
  return *requested;
}

LoadedFilters interpret(StoredFilters s, std::string_view name, const FilterExpectation& expect, const LoadOptions& opt) {
  if (expect.n_layers <= 0 || expect.n_kv_heads <= 0 || expect.head_dim <= 0)
    fail(name, ": internal: expected filter shape ", expect.n_layers, "x", expect.n_kv_heads, "x",
         expect.head_dim, " is invalid");
  const Filters& f = s.filters;
  const auto& md = f.metadata;
  LoadedFilters out;
  out.stored_dtype = s.dtype;
  const auto fmt = md.find("format");
  out.foreign = fmt == md.end() || fmt->second != kFilterFormat;

  if (f.n_layers != expect.n_layers || f.n_kv_heads != expect.n_kv_heads || f.head_dim != expect.head_dim)
    fail(name, ": filters are ", f.n_layers, "x", f.n_kv_heads, "x", f.head_dim,
         " [layers x kv_heads x head_dim] but the model needs ",
         expect.n_layers, "x", expect.n_kv_heads, "x", expect.head_dim);
  if (auto it = md.find("fingerprint"); it != md.end() && !it->second.empty()) {
    if (!expect.fingerprint.empty() && it->second != expect.fingerprint)
      fail(name, ": filters were made for model ", it->second, ", not ", expect.fingerprint);
  } else {
    out.fingerprint_missing = true;
  }

  const FilterLayout layout =
      resolve<FilterLayout>(name, md, "layout", opt.layout, !out.foreign, parse_filter_layout, "filter layout");
  const SignConvention sign =
      resolve<SignConvention>(name, md, "sign_convention", opt.sign, !out.foreign, parse_sign_convention, "sign convention");
  if (layout == FilterLayout::kHf && f.head_dim % 2 != 0)
    fail(name, ": hf layout needs an even head_dim, got ", f.head_dim);
  out.filters = to_canonical(f, layout, sign);
  return out;
}

}  // namespace

LoadedFilters load_filters(const std::string& path, const FilterExpectation& expect, const LoadOptions& opt) {
  return interpret(read_filters(path), path, expect, opt);
}

LoadedFilters load_filters(std::span<const uint8_t> bytes, std::string_view name, const FilterExpectation& expect,
                           const LoadOptions& opt) {
  return interpret(parse_filters(bytes, name), name, expect, opt);
}

}  // namespace qf::calib
