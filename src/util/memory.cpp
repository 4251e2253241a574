#include "util/memory.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "util/error.h"

namespace qf {

namespace {

constexpr uint64_t kUnlimited = UINT64_MAX;

uint64_t physical_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : kUnlimited;
}

// A number in a one-line file ("max" or a missing file: no limit).
uint64_t read_limit_file(const char* path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word) || word == "max") return kUnlimited;
  char* end = nullptr;
  const unsigned long long v = std::strtoull(word.c_str(), &end, 10);
  return end != word.c_str() && *end == '\0' && v > 0 ? v : kUnlimited;
}

uint64_t rlimit_bytes(int resource) {
  rlimit r{};
  if (getrlimit(resource, &r) != 0 || r.rlim_cur == RLIM_INFINITY) return kUnlimited;
  return r.rlim_cur;
}

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace

uint64_t memory_limit_bytes() {
  uint64_t limit = physical_memory();
  limit = std::min(limit, read_limit_file("/sys/fs/cgroup/memory.max"));
  limit = std::min(limit, read_limit_file("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
  limit = std::min(limit, rlimit_bytes(RLIMIT_AS));
  limit = std::min(limit, rlimit_bytes(RLIMIT_DATA));
  if (const char* mb = std::getenv("QF_MEMORY_LIMIT_MB")) {
    const uint64_t v = std::strtoull(mb, nullptr, 10);
    if (v > 0) limit = std::min(limit, v * 1024 * 1024);
  }
  return limit;
}

void check_fits_in_memory(uint64_t bytes, std::string_view what, std::string_view hint) {
  const uint64_t limit = memory_limit_bytes();
  if (bytes <= limit) return;
  fail(what, " needs ", gib(bytes), " but only ", gib(limit), " of memory is available; ", hint);
}

}  // namespace qf
