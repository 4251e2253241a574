// Scalar half of the kernels: exact fp16/bf16 conversions, row dequantization, the per-thread
// activation scratch buffer and the QF_SIMD_TARGET override. The SIMD kernels are in matmul.cpp.
#include "tensor/simd_config.h"  // first: fixes the Highway target set

#include <hwy/targets.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "tensor/kernels.h"
#include "tensor/kernels_internal.h"
#include "util/error.h"

namespace qf {

// ---------------------------------------------------------------------------------------------
// Row dequantization (not on the hot path: used for embedding lookups and tests).

void dequantize_row(const WeightView& w, int64_t row, float* out) {
  const TypeInfo& ti = type_info(w.type);
  if (!ti.supported) fail("dequantize_row: tensor type ", ti.name, " is not supported");
  if (w.data == nullptr || out == nullptr) fail("dequantize_row: null pointer");
  if (w.cols <= 0 || row < 0 || row >= w.rows)
    fail("dequantize_row: row ", row, " out of range for a ", w.rows, " x ", w.cols, " tensor");
  const size_t rb = row_bytes(w.type, w.cols);  // also checks cols % block size
  if (w.layout == WeightLayout::panels16) {
    thread_local std::vector<uint8_t> bytes;
    bytes.resize(rb);
    detail::panel_row(w.type, w.cols, w.data, row, bytes.data());
    return ti.dequantize(bytes.data(), w.cols, out);
  }
  ti.dequantize(w.data + static_cast<size_t>(row) * rb, w.cols, out);
}



// ---------------------------------------------------------------------------------------------
// Scratch buffer

namespace detail {

// Panel layout (kernels.h WeightLayout::panels16, kernels_internal.h): panel p holds rows
// [16p, 16p + 16) in the bytes the rows layout gives them. In it, block b's quants (everything
// after the head) start at b * body, body = 16 * (block_bytes - head): the 16 rows' bytes
// [o, o + 4) side by side, 64 bytes at 16 * (o - head); then, after every block's quants, the
// heads: block b's 16 rows' heads side by side at nb * body + b * 16 * head. These are the
// bytes the AMX engine used to gather, and each 64 of them a whole cache line.
struct PanelGeometry {
  size_t block, head, body, wrb, nb;
  PanelGeometry(GgmlType t, int64_t cols)
      : block(type_info(t).block_bytes),
        head(panel_head_bytes(t)),
        body(16 * (block - head)),
        wrb(row_bytes(t, cols)),
        nb(static_cast<size_t>(cols) / 32) {}
  // Where row n's bytes [o, o + 4) (o >= head), or its head (o = 0, head bytes), of block b lie.
  size_t at(size_t b, size_t n, size_t o) const {
    return o == 0 ? nb * body + b * 16 * head + n * head : b * body + 16 * (o - head) + 4 * n;
  }
};

void rows_to_panels(GgmlType t, int64_t cols, int64_t rows, uint8_t* data) {
  const PanelGeometry g(t, cols);
  std::vector<uint8_t> rows16(16 * g.wrb);
  for (int64_t p = 0; p < rows / 16; ++p) {
    uint8_t* panel = data + static_cast<size_t>(p) * 16 * g.wrb;
    std::memcpy(rows16.data(), panel, rows16.size());
    for (size_t b = 0; b < g.nb; ++b)
      for (size_t n = 0; n < 16; ++n) {
        const uint8_t* blk = rows16.data() + n * g.wrb + b * g.block;
        std::memcpy(panel + g.at(b, n, 0), blk, g.head);
        for (size_t o = g.head; o < g.block; o += 4) std::memcpy(panel + g.at(b, n, o), blk + o, 4);
      }
  }
}

void panel_row(GgmlType t, int64_t cols, const uint8_t* data, int64_t row, uint8_t* out) {
  const PanelGeometry g(t, cols);
  const uint8_t* panel = data + static_cast<size_t>(row / 16) * 16 * g.wrb;
  const size_t n = static_cast<size_t>(row % 16);
  for (size_t b = 0; b < g.nb; ++b) {
    uint8_t* blk = out + b * g.block;
    std::memcpy(blk, panel + g.at(b, n, 0), g.head);
    for (size_t o = g.head; o < g.block; o += 4) std::memcpy(blk + o, panel + g.at(b, n, o), 4);
  }
}

uint8_t* scratch(size_t bytes) {
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<uint8_t[], Free> buf;
  thread_local size_t cap = 0;
  if (bytes > cap) {
    const size_t want = std::max<size_t>(bytes + bytes / 2, 4096);
    const size_t rounded = (want + 63) / 64 * 64;  // aligned_alloc needs a multiple of 64
    buf.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
    if (!buf) {
      cap = 0;
      fail("out of memory allocating ", rounded, " bytes of activation scratch");
    }
    cap = rounded;
  }
  return buf.get();
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// SIMD target override

namespace {

struct TargetName {
  const char* name;
  int64_t target;
};
// The portable fallback ("scalar"): Highway builds SCALAR with GCC and EMU128 with clang.
constexpr int64_t kPortable = (HWY_TARGETS & HWY_SCALAR) != 0 ? HWY_SCALAR : HWY_EMU128;
// Best first. Highway numbers better targets with lower bits.
constexpr TargetName kTargets[] = {
    {"avx512vnni", HWY_AVX3_DL}, {"avx512", HWY_AVX3}, {"avx2", HWY_AVX2}, {"scalar", kPortable}};

// What the CPU and OS support, read before any override is installed.
int64_t real_targets() {
  static const int64_t targets = [] {
    hwy::SetSupportedTargetsForTest(0);
    return hwy::SupportedTargets();
  }();
  return targets;
}

}  // namespace

bool force_simd_target(std::string_view name) {
  const int64_t real = real_targets();
  if (name == "best") {
    hwy::SetSupportedTargetsForTest(0);
    return true;
  }
  for (const TargetName& t : kTargets) {
    if (name != t.name) continue;
    if (t.target != kPortable && (real & t.target) == 0) return false;
    // Everything no better than the cap (higher bits); the portable target is the last resort.
    hwy::SetSupportedTargetsForTest((real & ~(t.target - 1)) | kPortable);
    return true;
  }
  return false;
}

std::vector<std::string> available_simd_targets() {
  const int64_t real = real_targets();
  std::vector<std::string> names;
  for (const TargetName& t : kTargets)
    if (t.target == kPortable || (real & t.target) != 0) names.emplace_back(t.name);
  return names;
}

namespace detail {

void init_simd_once() {
  static const bool done = [] {
    real_targets();  // snapshot before any override
    const char* env = std::getenv("QF_SIMD_TARGET");
    if (env != nullptr && *env != '\0' && !force_simd_target(env))
      fail("QF_SIMD_TARGET=", std::string(env),
           " is unknown or not supported here (use best, avx512vnni, avx512, avx2 or scalar)");
    return true;
  }();
  (void)done;
}

}  // namespace detail
}  // namespace qf
