#include "calib/filter_file.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

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
  std::string name;
  std::string dtype;
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;  // relative to the data section
  size_t elem_bytes = 0;
  uint64_t count = 0;
};

// What the header describes: the filters, and the optional query statistics (query_stats v1).
struct HeaderSpec {
  std::map<std::string, std::string> metadata;
  TensorSpec filters;
  std::optional<TensorSpec> query_mean, query_factors;
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

// One tensor's entry, checked against the data section: dtype, a shape of `rank` entries in
// 1..kMaxDim, and data_offsets that hold exactly shape x dtype bytes.
TensorSpec parse_tensor(const json& entry, std::string_view tensor, size_t rank, std::string_view shape_doc,
                        uint64_t data_size, std::string_view name) {
  TensorSpec spec;
  spec.name = tensor;
  if (!entry.is_object()) fail(name, ": entry '", tensor, "' is not a JSON object");

  const auto dt = entry.find("dtype");
  if (dt == entry.end() || !dt->is_string()) fail(name, ": tensor '", tensor, "' has no string dtype");
  spec.dtype = dt->get<std::string>();
  if (spec.dtype == "F32") spec.elem_bytes = 4;
  else if (spec.dtype == "F16" || spec.dtype == "BF16") spec.elem_bytes = 2;
  else fail(name, ": tensor '", tensor, "' has dtype ", spec.dtype, " (supported: F32, F16, BF16)");

  const auto sh = entry.find("shape");
  if (sh == entry.end() || !sh->is_array()) fail(name, ": tensor '", tensor, "' has no shape array");
  if (sh->size() != rank)
    fail(name, ": tensor '", tensor, "' has rank ", sh->size(), ", expected ", rank, " ", shape_doc);
  spec.count = 1;
  for (size_t i = 0; i < rank; ++i) {
    const uint64_t d = unsigned_field((*sh)[i], "shape entry", name);
    if (d == 0 || d > kMaxDim) fail(name, ": tensor '", tensor, "' shape entry ", d, " is out of range 1..", kMaxDim);
    spec.shape.push_back(d);
    spec.count *= d;  // each factor <= 2^20 and the running product <= 2^28 before it: no overflow
    if (spec.count > kMaxElements) fail(name, ": tensor '", tensor, "' has more than ", kMaxElements, " elements");
  }

  const auto off = entry.find("data_offsets");
  if (off == entry.end() || !off->is_array() || off->size() != 2)
    fail(name, ": tensor '", tensor, "' needs data_offsets [begin, end]");
  spec.begin = unsigned_field((*off)[0], "data_offsets begin", name);
  spec.end = unsigned_field((*off)[1], "data_offsets end", name);
  if (spec.begin > spec.end) fail(name, ": tensor '", tensor, "' data_offsets begin ", spec.begin, " > end ", spec.end);
  if (spec.end > data_size)
    fail(name, ": tensor '", tensor, "' data ends at ", spec.end, " but the data section has ", data_size, " bytes");
  if (spec.end - spec.begin != spec.count * spec.elem_bytes)
    fail(name, ": tensor '", tensor, "' holds ", spec.end - spec.begin, " bytes, its shape and dtype need ",
         spec.count * spec.elem_bytes);
  return spec;
}

// The optional query statistics: both tensors present exactly when the metadata names version 1,
// with shapes that fit the filters' [n_layers, n_kv_heads, head_dim].
void parse_query_stats(const json& root, HeaderSpec& h, uint64_t data_size, std::string_view name) {
  const auto mean = root.find(std::string(kQueryMeanTensorName));
  const auto factors = root.find(std::string(kQueryFactorsTensorName));
  const auto version = h.metadata.find(std::string(kQueryStatsKey));
  const bool any = mean != root.end() || factors != root.end();
  if (version == h.metadata.end()) {
    if (any) fail(name, ": query statistics tensors without '", kQueryStatsKey, "' metadata");
    return;
  }
  if (version->second != kQueryStatsVersion)
    fail(name, ": query statistics version '", version->second, "' is not supported (this build reads ",
         kQueryStatsVersion, ")");
  if (mean == root.end() || factors == root.end())
    fail(name, ": '", kQueryStatsKey, "' metadata needs tensors '", kQueryMeanTensorName, "' and '",
         kQueryFactorsTensorName, "'");
  h.query_mean = parse_tensor(*mean, kQueryMeanTensorName, 3, "[n_layers, n_heads, head_dim]", data_size, name);
  h.query_factors =
      parse_tensor(*factors, kQueryFactorsTensorName, 4, "[n_layers, n_heads, rank, head_dim]", data_size, name);
  const auto& f = h.filters.shape;
  const auto& m = h.query_mean->shape;
  const auto& u = h.query_factors->shape;
  if (m[0] != f[0] || m[2] != f[2] || m[1] % f[1] != 0)
    fail(name, ": tensor '", kQueryMeanTensorName, "' is ", m[0], "x", m[1], "x", m[2], ", which does not fit filters of ",
         f[0], "x", f[1], "x", f[2]);
  if (u[0] != m[0] || u[1] != m[1] || u[3] != m[2] || u[2] > m[2])
    fail(name, ": tensor '", kQueryFactorsTensorName, "' is ", u[0], "x", u[1], "x", u[2], "x", u[3],
         ", which does not fit query means of ", m[0], "x", m[1], "x", m[2]);
}

HeaderSpec parse_header(std::string_view text, uint64_t data_size, std::string_view name) {
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

  HeaderSpec spec;
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
  spec.filters = parse_tensor(*t, kFilterTensorName, 3, "[n_layers, n_kv_heads, head_dim]", data_size, name);
  parse_query_stats(root, spec, data_size, name);
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

// The tensor's values as floats; `data` points at its first byte.
std::vector<float> decode_values(const TensorSpec& spec, const uint8_t* data, std::string_view name) {
  std::vector<float> out(spec.count);
  for (uint64_t i = 0; i < spec.count; ++i) {
    float v;
    if (spec.elem_bytes == 4) {
      std::memcpy(&v, data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, data + 2 * i, 2);
      v = spec.dtype == "F16" ? f16_to_f32(h) : bf16_to_f32(h);
    }
    if (!std::isfinite(v)) fail(name, ": tensor '", spec.name, "' has a non-finite value at element ", i);
    out[i] = v;
  }
  return out;
}

// `tensor_data(spec)` points at a tensor's first byte.
template <class Bytes>
StoredFilters decode(const HeaderSpec& spec, const Bytes& tensor_data, std::string_view name) {
  StoredFilters out;
  const auto& s = spec.filters.shape;
  out.filters = Filters(int(s[0]), int(s[1]), int(s[2]));
  out.filters.metadata = spec.metadata;
  out.dtype = spec.filters.dtype;
  out.filters.data = decode_values(spec.filters, tensor_data(spec.filters), name);
  if (spec.query_mean) {
    out.filters.n_query_heads = int(spec.query_mean->shape[1]);
    out.filters.stats_rank = int(spec.query_factors->shape[2]);
    out.filters.query_mean = decode_values(*spec.query_mean, tensor_data(*spec.query_mean), name);
    out.filters.query_factors = decode_values(*spec.query_factors, tensor_data(*spec.query_factors), name);
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
  if (!f.has_query_stats()) return;
  const size_t per_head = size_t(f.n_layers) * size_t(f.n_query_heads) * size_t(f.head_dim);
  if (f.n_query_heads <= 0 || f.n_query_heads % f.n_kv_heads != 0 || f.stats_rank < 1 || f.stats_rank > f.head_dim ||
      f.query_mean.size() != per_head || f.query_factors.size() != per_head * size_t(f.stats_rank))
    fail("filters: query statistics of ", f.query_mean.size(), " + ", f.query_factors.size(), " values do not match ",
         f.n_query_heads, " query heads of rank ", f.stats_rank);
  for (float v : f.query_mean)
    if (!std::isfinite(v)) fail("filters: non-finite query mean");
  for (float v : f.query_factors)
    if (!std::isfinite(v)) fail("filters: non-finite query covariance factor");
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
// With `with_stats`, also the query statistics when f has them (and their version in the metadata).
std::vector<uint8_t> serialize_tensor(const Filters& f, json meta, bool with_stats = false) {
  check_consistent(f);
  json root = json::object();
  std::vector<const std::vector<float>*> blobs;
  uint64_t nbytes = 0;
  auto add = [&](std::string_view tensor, json shape, const std::vector<float>& values) {
    json entry = json::object();
    entry["dtype"] = "F32";
    entry["shape"] = std::move(shape);
    entry["data_offsets"] = json::array({nbytes, nbytes + uint64_t(values.size()) * 4});
    root[std::string(tensor)] = std::move(entry);
    nbytes += uint64_t(values.size()) * 4;
    blobs.push_back(&values);
  };
  add(kFilterTensorName, json::array({f.n_layers, f.n_kv_heads, f.head_dim}), f.data);
  if (with_stats && f.has_query_stats()) {
    meta[std::string(kQueryStatsKey)] = kQueryStatsVersion;
    add(kQueryMeanTensorName, json::array({f.n_layers, f.n_query_heads, f.head_dim}), f.query_mean);
    add(kQueryFactorsTensorName, json::array({f.n_layers, f.n_query_heads, f.stats_rank, f.head_dim}), f.query_factors);
  } else {
    meta.erase(std::string(kQueryStatsKey));
  }
  root["__metadata__"] = std::move(meta);

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
  uint8_t* dst = out.data() + 8 + header.size();
  for (const auto* b : blobs) {
    std::memcpy(dst, b->data(), b->size() * 4);
    dst += b->size() * 4;
  }
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
  return serialize_tensor(f, std::move(meta), /*with_stats=*/true);
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
  const HeaderSpec spec = parse_header(text, data_size, name);
  const uint8_t* data = bytes.data() + 8 + n;
  return decode(spec, [&](const TensorSpec& t) { return data + t.begin; }, name);
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
  const HeaderSpec spec = parse_header(text, size - 8 - n, path);
  std::vector<uint8_t> buffer;
  auto tensor_data = [&](const TensorSpec& t) {
    buffer.resize(t.end - t.begin);
    in.seekg(std::streamoff(8 + n + t.begin));
    if (!in.read(reinterpret_cast<char*>(buffer.data()), std::streamsize(buffer.size())))
      fail(path, ": read error in the data of tensor '", t.name, "'");
    return static_cast<const uint8_t*>(buffer.data());
  };
  return decode(spec, tensor_data, path);
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
