// Glue between the scalar part of the kernels (kernels.cpp) and the per-target SIMD code
// (matmul.cpp). Not part of the public API.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qf::detail {

// A 64-byte aligned buffer owned by the calling thread, at least `bytes` long, valid until that
// thread's next call. Holds the quantized activations of one matmul.
uint8_t* scratch(size_t bytes);

// One token's activations quantized per block of 32 in the natural layout (matmul.cpp's
// QuantizeNat, the dispatched target's code): int8 qs[32 * nb] | float d[nb] | float s[nb], with
// d the fp16-rounded scale and s = d * sum(q). The AMX engine's A tiles read this layout.
void quantize_natural(const float* x, int64_t nb, uint8_t* out);
inline size_t natural_stride(int64_t nb) { return (static_cast<size_t>(nb) * 40 + 63) / 64 * 64; }

// Applies QF_SIMD_TARGET once per process (throws qf::Error on a bad value; retried next call).
void init_simd_once();

}  // namespace qf::detail
