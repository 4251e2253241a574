#include "eval/results.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tensor/kernels.h"
#include "util/error.h"

namespace qf::eval {

namespace fs = std::filesystem;
using nlohmann::json;

CellLog::CellLog(std::string path, json settings, bool resume) : path_(std::move(path)) {
  const fs::path p(path_);
  if (p.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(p.parent_path(), ec);
    if (ec) fail("cannot create ", p.parent_path().string(), ": ", ec.message());
  }
  bool fresh = true;
  if (resume && fs::exists(p)) {
    std::ifstream in(p);
    if (!in) fail("cannot read ", path_);
    std::string line;
    std::vector<json> lines;
    bool torn = false;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object()) {
        // Only the last line may be torn; anything else means the file is not ours.
        if (in.peek() != EOF) fail(path_, ": line ", lines.size() + 1, " is not JSON (not a results file?)");
        torn = true;
        break;
      }
      lines.push_back(std::move(j));
    }
    if (!lines.empty()) {
      if (!lines[0].contains("settings")) fail(path_, " does not start with a settings line (not a results file?)");
      if (lines[0]["settings"] != settings)
        fail(path_, " holds results made with other settings; give another --out or --fresh to overwrite");
      fresh = false;
      for (size_t i = 1; i < lines.size(); ++i) {
        const std::string key = lines[i].value("key", "");
        if (key.empty()) fail(path_, ": line ", i + 1, " has no key");
        if (!cells_.count(key)) order_.push_back(key);
        cells_[key] = std::move(lines[i]);
      }
      resumed_ = order_.size();
      if (torn) {  // rewrite without the torn tail so the next append starts on a clean line
        std::ostringstream os;
        os << json{{"settings", settings}}.dump() << '\n';
        for (const auto& k : order_) os << cells_[k].dump() << '\n';
        write_text_file(path_, os.str());
      }
    }
  }
  if (fresh) write_text_file(path_, json{{"settings", settings}}.dump() + "\n");
}

const json& CellLog::get(const std::string& key) const {
  auto it = cells_.find(key);
  if (it == cells_.end()) fail("no result for ", key, " in ", path_);
  return it->second;
}

void CellLog::add(const std::string& key, json cell) {
  cell["key"] = key;
  append_line(cell);
  if (!cells_.count(key)) order_.push_back(key);
  cells_[key] = std::move(cell);
}

std::vector<json> CellLog::cells() const {
  std::vector<json> out;
  out.reserve(order_.size());
  for (const auto& k : order_) out.push_back(cells_.at(k));
  return out;
}

void CellLog::append_line(const json& j) {
  std::ofstream out(path_, std::ios::app);
  if (!out) fail("cannot append to ", path_);
  out << j.dump() << '\n';
  out.flush();
  if (!out) fail("error writing ", path_);
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

json run_info(const std::string& model_path, const std::string& fingerprint, const std::string& filters_path,
              int n_threads) {
  json j;
  j["tool"] = "qf";
  j["version"] = QF_VERSION;
  j["model"] = fs::path(model_path).filename().string();
  j["model_fingerprint"] = fingerprint;
  j["filters"] = filters_path.empty() ? json(nullptr) : json(fs::path(filters_path).filename().string());
  j["time"] = utc_now();
  j["threads"] = n_threads;
  j["simd"] = simd_target_name();
  j["amx_prompt"] = amx_prompt_engine();
  struct utsname u {};
  if (uname(&u) == 0) j["machine"] = std::string(u.sysname) + " " + u.machine;
  j["cpus_online"] = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  return j;
}

void write_text_file(const std::string& path, const std::string& text) {
  const fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
  if (ec) fail("cannot create ", p.parent_path().string(), ": ", ec.message());
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write ", tmp);
    out << text;
    out.flush();
    if (!out) fail("error writing ", tmp);
  }
  fs::rename(tmp, p, ec);
  if (ec) fail("cannot rename ", tmp, " to ", path, ": ", ec.message());
}

double round_to(double x, int digits) {
  if (!std::isfinite(x)) return x;
  const double s = std::pow(10.0, digits);
  return std::round(x * s) / s;
}

json json_number(double x, int digits) {
  if (!std::isfinite(x)) return nullptr;
  return round_to(x, digits);
}

}  // namespace qf::eval
