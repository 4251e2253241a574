// Weight kernels: fused dequantize-and-dot matmuls over memory-mapped GGUF weights, plus the
// small vector kernels the forward pass and attention use. SIMD code is compiled for several
// x86-64 targets (and a portable fallback) by Highway and dispatched at run time on what the
// CPU and the OS allow.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensor/threadpool.h"
#include "tensor/types.h"

namespace qf {

// A 2-D weight as GGUF stores it: `rows` rows of `cols` elements each (ggml ne[0] = cols,
// ne[1] = rows), rows contiguous, each row `row_bytes(type, cols)` bytes.
struct WeightView {
  GgmlType type = GgmlType::F32;
  int64_t cols = 0;
  int64_t rows = 0;
  const uint8_t* data = nullptr;
};

// y[t * rows + r] = dot(W row r, x[t * cols ...]) for t in [0, n_tok).
// Quantized weights use the activations quantized to 8 bits per 32-element block (as llama.cpp
// does) and integer dot products; F32/F16/BF16 weights use float dot products.
// Threads split the rows; prefill (n_tok > 1) tiles tokens so each weight block is unpacked
// once per tile, not once per token.
void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool);

// Dequantizes row `row` of w into out[0..cols).
void dequantize_row(const WeightView& w, int64_t row, float* out);

// Float vector kernels (n may be any size).
float dot_f32(const float* a, const float* b, size_t n);
void axpy_f32(float a, const float* x, float* y, size_t n);  // y += a * x
void scale_f32(float* y, float a, size_t n);                // y *= a

// Name of the SIMD target chosen at run time (e.g. "AVX3_ZEN4", "AVX2", "EMU128").
std::string simd_target_name();

// fp16 / bf16 conversion (scalar, exact).
float fp16_to_f32(uint16_t h);
uint16_t f32_to_fp16(float f);
float bf16_to_f32(uint16_t h);

}  // namespace qf
