// Filter files: safetensors with one tensor "q_filters" [n_layers, n_kv_heads, head_dim] (plus,
// optionally, the query statistics below) and a
// "__metadata__" string map, the same container as the published Q-Filters (so the Python
// `safetensors` package and kvpress read ours). Layout of the file: u64 little-endian header
// length N, N bytes of JSON header (space-padded to a multiple of 8), then raw little-endian data.
//
// Every check a hostile or truncated file can fail is a one-line qf::Error naming the file.
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "calib/filters.h"

namespace qf::calib {

inline constexpr std::string_view kFilterTensorName = "q_filters";
inline constexpr std::string_view kFilterFormat = "qfilters";       // metadata "format" of our files
// Optional query statistics before the rotary embedding (Filters::query_mean / query_factors):
// tensors [n_layers, n_heads, head_dim] and [n_layers, n_heads, rank, head_dim], present exactly
// when the metadata kQueryStatsKey holds kQueryStatsVersion. Files without them load as before.
inline constexpr std::string_view kQueryMeanTensorName = "query_mean";
inline constexpr std::string_view kQueryFactorsTensorName = "query_cov_factors";
inline constexpr std::string_view kQueryStatsKey = "query_stats_version";
inline constexpr std::string_view kQueryStatsVersion = "1";
inline constexpr uint64_t kMaxHeaderBytes = 16u << 20;              // ours are a few KiB

// Shape fingerprint of a model, e.g. "llama:L30:H9:KV3:D64:E576:V49152". Stored in filter files
// so that loading them on another model is an error rather than silent garbage.
std::string model_fingerprint(std::string_view arch, int n_layers, int n_head, int n_head_kv, int head_dim,
                              int n_embd, int n_vocab);

// Where the filters came from; becomes the file's metadata.
struct CalibrationInfo {
  std::string model_name;     // e.g. "SmolLM2-135M-Instruct.Q4_1"
  std::string architecture;   // general.architecture, e.g. "llama"
  std::string fingerprint;    // model_fingerprint(...)
  std::string corpus;         // e.g. "data/sotu (2001-2010)"
  int n_docs = 0;
  int doc_len = 0;            // tokens per document
  int n_samples = 0;          // query positions drawn per layer
  uint64_t seed = 0;
  std::string orientation = "mean";  // to_string(OrientationRule)
};
// Sets the metadata entries above plus format, tool_version, sign_convention, layout.
void set_calibration_metadata(Filters& f, const CalibrationInfo& info);

// F32 safetensors bytes. Forces metadata format = "qfilters", sign_convention =
// "keep_largest_dot", layout = "gguf" (Filters are canonical by construction) and tool_version
// when absent. Throws on an inconsistent shape or non-finite values.
std::vector<uint8_t> serialize_filters(const Filters& f);
// Writes serialize_filters(f) to `path` through a temporary file and a rename.
void write_filters(const std::string& path, const Filters& f);

// Files of a Hugging Face directory of filters (what kvpress's QFilters.from_pretrained loads).
inline constexpr std::string_view kHfWeightsFile = "model.safetensors";
inline constexpr std::string_view kHfConfigFile = "config.json";
// Writes canonical filters as the published nthngdy/q-filters checkpoints are: DIR/model.safetensors
// (tensor q_filters [n_layers, n_kv_heads, head_dim], F32, Hugging Face row order, sign
// keep_smallest_dot, metadata {"format": "pt"}) and DIR/config.json (QFilters' constructor
// arguments). The inverse of load_filters(DIR/model.safetensors, ..., {kHf, kKeepSmallestDot}).
void export_hf(const std::string& dir, const Filters& f);

// The tensor and metadata exactly as stored (no conversion, no expectations). F16 and BF16 data
// are widened to float; other dtypes are an error. `name` only labels error messages.
struct StoredFilters {
  Filters filters;
  std::string dtype;  // "F32", "F16" or "BF16"
};
StoredFilters parse_filters(std::span<const uint8_t> bytes, std::string_view name = "<memory>");
StoredFilters read_filters(const std::string& path);

// What the model using the filters needs.
struct FilterExpectation {
  int n_layers = 0, n_kv_heads = 0, head_dim = 0;
  std::string fingerprint;  // empty: not checked
};
// How to interpret a file. Files of our format carry both in their metadata; an option that is
// set must then agree with it. Foreign files (no format = "qfilters", e.g. published reference
// filters, which are hf + keep_smallest_dot) must have both set explicitly: guessing a sign wrong
// would silently evict the best keys.
struct LoadOptions {
  std::optional<FilterLayout> layout;
  std::optional<SignConvention> sign;
};
struct LoadedFilters {
  Filters filters;                   // canonical form, ready for the qfilters policy
  bool fingerprint_missing = false;  // warn: the file cannot prove which model it was made for
  bool foreign = false;              // not written by this tool
  std::string stored_dtype;
};
// read_filters + interpretation + checks: shape mismatch is always an error, a fingerprint that
// differs from a non-empty expected one is an error, a missing fingerprint sets the flag.
LoadedFilters load_filters(const std::string& path, const FilterExpectation& expect, const LoadOptions& opt = {});
// Same on bytes already in memory.
LoadedFilters load_filters(std::span<const uint8_t> bytes, std::string_view name, const FilterExpectation& expect,
                           const LoadOptions& opt = {});

}  // namespace qf::calib
