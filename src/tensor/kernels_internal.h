// Glue between the scalar part of the kernels (kernels.cpp) and the per-target SIMD code
// (matmul.cpp). Not part of the public API.
#pragma once
#include <cstddef>
#include <cstdint>

namespace qf::detail {

// A 64-byte aligned buffer owned by the calling thread, at least `bytes` long, valid until that
// thread's next call. Holds the quantized activations of one matmul.
uint8_t* scratch(size_t bytes);

// Applies QF_SIMD_TARGET once per process (throws qf::Error on a bad value; retried next call).
void init_simd_once();

}  // namespace qf::detail
