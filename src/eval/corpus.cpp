#include "eval/corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "util/error.h"

namespace qf::eval {

namespace fs = std::filesystem;

int year_of(const std::string& name) {
  if (name.size() < 5 || name[4] != '_') return -1;
  int y = 0;
  for (int i = 0; i < 4; ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    y = y * 10 + (name[i] - '0');
  }
  return y;
}

std::vector<Document> load_documents(const std::vector<std::string>& paths, int min_year, int max_year) {
  std::vector<fs::path> files;
  for (const std::string& p : paths) {
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      for (const auto& e : fs::directory_iterator(p, ec))
        if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path());
      if (ec) fail("cannot list ", p, ": ", ec.message());
    } else if (fs::is_regular_file(p, ec)) {
      files.emplace_back(p);
    } else {
      fail("no such text file or directory: ", p, p.find("sotu") != std::string::npos ? " (run scripts/fetch_text.sh)" : "");
    }
  }
  std::sort(files.begin(), files.end(), [](const fs::path& a, const fs::path& b) { return a.filename() < b.filename(); });
  std::vector<Document> docs;
  for (const fs::path& f : files) {
    const std::string name = f.filename().string();
    const int y = year_of(name);
    if (y >= 0 && ((min_year > 0 && y < min_year) || (max_year > 0 && y > max_year))) continue;
    std::ifstream in(f, std::ios::binary);
    if (!in) fail("cannot read ", f.string());
    Document d{name, {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()}};
    if (in.bad()) fail("error reading ", f.string());
    docs.push_back(std::move(d));
  }
  if (docs.empty()) fail("no evaluation text left in ", paths.empty() ? std::string("(no paths)") : paths.front(),
                         " after the year filter [", min_year, ", ", max_year, "]");
  return docs;
}

}  // namespace qf::eval
