// Where results go: one JSON-lines file per evaluation, one line per finished cell, so an
// interrupted sweep resumes where it stopped. The first line records the settings the cells were
// computed with; resuming under different settings is an error rather than a silent mix.
#pragma once
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace qf::eval {

class CellLog {
 public:
  // Opens (creating directories) `path`. With resume, existing cells are loaded and kept when the
  // file's settings equal `settings`, and it is an error when they differ; without it, the file
  // is started afresh. A torn last line (killed mid-write) is dropped.
  CellLog(std::string path, nlohmann::json settings, bool resume);

  const std::string& path() const { return path_; }
  bool has(const std::string& key) const { return cells_.count(key) != 0; }
  const nlohmann::json& get(const std::string& key) const;  // throws qf::Error when absent
  // Records a finished cell (key stored under "key") and flushes it to disk at once.
  void add(const std::string& key, nlohmann::json cell);
  size_t size() const { return order_.size(); }
  size_t resumed() const { return resumed_; }
  // Cells in the order they were first recorded.
  std::vector<nlohmann::json> cells() const;

 private:
  void append_line(const nlohmann::json& j);

  std::string path_;
  std::map<std::string, nlohmann::json> cells_;
  std::vector<std::string> order_;
  size_t resumed_ = 0;
};

// Run description common to every output: tool version, model, filters, time, machine.
nlohmann::json run_info(const std::string& model_path, const std::string& model_fingerprint,
                        const std::string& filters_path, int n_threads);

// Writes text to `path` through a temporary file and a rename (directories created).
void write_text_file(const std::string& path, const std::string& text);

// Rounds to `digits` decimals for compact JSON (NaN and inf become null when written).
double round_to(double x, int digits);
// A double as JSON: null for NaN / inf.
nlohmann::json json_number(double x, int digits = 6);

// Current UTC time as ISO 8601.
std::string utc_now();

}  // namespace qf::eval
