// Anonymous memory that the kernel backs with 2 MiB pages where it grants them (transparent huge
// pages on request, MADV_HUGEPAGE). Streaming reads from 4 KiB pages are limited by the page
// walks and by the hardware prefetchers, which stop at every page boundary: on the 2-core
// machines this project is measured on, a plain read gives about 13 GB/s against 30 GB/s from
// 2 MiB pages with software prefetch (kernels_bench BM_ReadBandwidth). Decode streams the
// weights and every session's KV cache, so both live in such buffers.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qf {

// Whether the kernel gives huge pages to madvise'd memory: THP "always" or "madvise".
bool huge_pages_on_request();

class HugePageBuffer {
 public:
  // Below this size a buffer takes ordinary pages (a huge page would be mostly empty).
  static constexpr size_t kHugePage = size_t{2} << 20;
  static constexpr size_t kMinHugeBytes = kHugePage / 2;

  HugePageBuffer() = default;
  // `bytes` of zeroed memory, on 2 MiB pages (and 2 MiB-aligned) when at least min_huge_bytes
  // and the kernel offers them, else on ordinary pages. Throws qf::Error when the memory cannot
  // be mapped.
  explicit HugePageBuffer(size_t bytes, size_t min_huge_bytes = kMinHugeBytes);
  ~HugePageBuffer();
  HugePageBuffer(HugePageBuffer&& other) noexcept;
  HugePageBuffer& operator=(HugePageBuffer&& other) noexcept;
  HugePageBuffer(const HugePageBuffer&) = delete;
  HugePageBuffer& operator=(const HugePageBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }          // the bytes asked for
  size_t mapped_bytes() const { return mapped_; }  // whole pages: what the mapping spans
  bool in_huge_pages() const { return huge_; }
  // Marks [p, p + n), inside the buffer, as memory no one may touch, for AddressSanitizer (guard
  // gaps between the regions a buffer is cut into); nothing in other builds. Freeing the buffer
  // lifts the marks.
  void poison(const uint8_t* p, size_t n) const;

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0, mapped_ = 0;
  bool huge_ = false;
};

}  // namespace qf
