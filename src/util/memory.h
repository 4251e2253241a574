// How much memory this process may use, so that sizes a file or a flag asks for (a context of
// a million tokens, a model declaring a huge context) are refused with one line before anything
// is allocated, instead of ending in std::bad_alloc halfway or the kernel's OOM killer.
#pragma once
#include <cstdint>
#include <string_view>

namespace qf {

// The smallest of physical memory, the cgroup (v2 memory.max, v1 limit_in_bytes) limit and
// RLIMIT_AS / RLIMIT_DATA. QF_MEMORY_LIMIT_MB in the environment lowers it further (tests).
uint64_t memory_limit_bytes();

// Throws qf::Error("<what> needs X GiB but only Y GiB of memory is available; <hint>") when
// `bytes` exceed memory_limit_bytes().
void check_fits_in_memory(uint64_t bytes, std::string_view what, std::string_view hint);

}  // namespace qf
