#include "util/huge_pages.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <utility>

#include "util/error.h"

#if defined(__SANITIZE_ADDRESS__)
#define QF_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QF_ASAN 1
#endif
#endif
#ifdef QF_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace qf {

// The setting reads "always [madvise] never" or "[always] madvise never"; "[never]" (or no file:
// no THP in the kernel) means none.
bool huge_pages_on_request() {
  static const bool on = [] {
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return false;
    char buf[128] = {};
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    return n > 0 && std::strstr(buf, "[never]") == nullptr;
  }();
  return on;
}

namespace {

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

void* map_anonymous(size_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// `span` bytes (a multiple of 2 MiB) starting on a 2 MiB boundary, asked to be in huge pages:
// only aligned 2 MiB ranges get them, so map one huge page more, then give back the unaligned
// head and the tail. Null when the mapping or the request fails.
void* map_huge_aligned(size_t span) {
#ifdef MADV_HUGEPAGE
  constexpr size_t kHuge = HugePageBuffer::kHugePage;
  void* raw = map_anonymous(span + kHuge);
  if (raw == nullptr) return nullptr;
  const auto raw_at = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t at = round_up(raw_at, kHuge);
  if (at > raw_at) ::munmap(raw, at - raw_at);
  const uintptr_t end = raw_at + span + kHuge;
  if (at + span < end) ::munmap(reinterpret_cast<void*>(at + span), end - (at + span));
  void* p = reinterpret_cast<void*>(at);
  if (::madvise(p, span, MADV_HUGEPAGE) != 0) {  // THP disabled or not built: nothing to gain
    ::munmap(p, span);
    return nullptr;
  }
  return p;
#else
  (void)span;
  return nullptr;
#endif
}

void release(uint8_t* data, size_t mapped) {
  if (data == nullptr) return;
#ifdef QF_ASAN
  ASAN_UNPOISON_MEMORY_REGION(data, mapped);  // the addresses may be mapped again, for anything
#endif
  ::munmap(data, mapped);
}

}  // namespace

HugePageBuffer::HugePageBuffer(size_t bytes, size_t min_huge_bytes) : size_(bytes) {
  if (bytes == 0) return;
  if (bytes >= min_huge_bytes && huge_pages_on_request()) {
    const size_t span = round_up(bytes, kHugePage);
    if (void* p = map_huge_aligned(span)) {
      data_ = static_cast<uint8_t*>(p);
      mapped_ = span;
      huge_ = true;
      return;
    }
  }
  const size_t span = round_up(bytes, static_cast<size_t>(::sysconf(_SC_PAGESIZE)));
  void* p = map_anonymous(span);
  if (p == nullptr) fail("out of memory: cannot map ", bytes, " bytes");
  data_ = static_cast<uint8_t*>(p);
  mapped_ = span;
}

HugePageBuffer::~HugePageBuffer() { release(data_, mapped_); }

void HugePageBuffer::poison(const uint8_t* p, size_t n) const {
  if (p < data_ || n > size_ || p - data_ > static_cast<ptrdiff_t>(size_ - n)) fail("HugePageBuffer::poison: range outside the buffer");
#ifdef QF_ASAN
  ASAN_POISON_MEMORY_REGION(p, n);
#endif
}

HugePageBuffer::HugePageBuffer(HugePageBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      mapped_(std::exchange(other.mapped_, 0)),
      huge_(std::exchange(other.huge_, false)) {}

HugePageBuffer& HugePageBuffer::operator=(HugePageBuffer&& other) noexcept {
  if (this != &other) {
    release(data_, mapped_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    mapped_ = std::exchange(other.mapped_, 0);
    huge_ = std::exchange(other.huge_, false);
  }
  return *this;
}

}  // namespace qf
