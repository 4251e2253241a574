// Glue between the scalar part of the kernels (kernels.cpp) and the per-target SIMD code
// (matmul.cpp). Not part of the public API.
#pragma once
#include <cstddef>
#include <cstdint>

#include "tensor/types.h"

namespace qf::detail {

// A 64-byte aligned buffer owned by the calling thread, at least `bytes` long, valid until that
// thread's next call. Holds the quantized activations of one matmul.
uint8_t* scratch(size_t bytes);

// One token's activations quantized per block of 32 in the natural layout (matmul.cpp's
// QuantizeNat, the dispatched target's code): int8 qs[32 * nb] | float d[nb] | float s[nb], with
// d the fp16-rounded scale and s = d * sum(q). The AMX engine's A tiles read this layout.
void quantize_natural(const float* x, int64_t nb, uint8_t* out);
inline size_t natural_stride(int64_t nb) { return (static_cast<size_t>(nb) * 40 + 63) / 64 * 64; }

// The panel layout (kernels.h WeightLayout::panels16) of the 32-element types, in kernels.cpp:
// a panel of 16 rows holds, block after block, the 16 rows' quants 4 bytes per row at a time,
// then every block's 16 heads (scale, and min, half words: panel_head_bytes each) side by side.
// rows_to_panels rewrites a rows x cols matrix in place (rows a multiple of 16); panel_row
// copies row `row` of a panel-layout matrix back into the rows layout (row_bytes bytes at out).
constexpr size_t panel_head_bytes(GgmlType t) { return t == GgmlType::Q4_1 || t == GgmlType::Q5_1 ? 4 : 2; }
void rows_to_panels(GgmlType t, int64_t cols, int64_t rows, uint8_t* data);
void panel_row(GgmlType t, int64_t cols, const uint8_t* data, int64_t row, uint8_t* out);

// Decode prefetch distance along a weight stream, for every engine. Hardware prefetchers alone
// left decode at about half the streaming bandwidth; 4-16 KiB ahead all did about equally well.
constexpr size_t kWeightPrefetchBytes = 8192;

// Applies QF_SIMD_TARGET once per process (throws qf::Error on a bad value; retried next call).
void init_simd_once();

}  // namespace qf::detail
