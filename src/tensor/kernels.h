// Weight kernels: fused dequantize-and-dot matmuls over memory-mapped GGUF weights, plus the
// small vector kernels the forward pass and attention use. SIMD code is compiled for several
// x86-64 targets (and a portable fallback) by Highway and dispatched at run time on what the
// CPU and the OS allow.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensor/threadpool.h"
#include "tensor/types.h"

namespace qf {

// How a weight's bytes are arranged.
//   rows:     as GGUF stores them, row r at r * row_bytes(type, cols).
//   panels16: the AMX engine's layout (matmul_amx.cpp): each group of 16 rows keeps its bytes,
//             rearranged so that every block's 16 rows lie side by side; the engine reads them
//             with plain loads instead of gathers, and decode (VNNI over the same panels)
//             gives the tiles' numbers bit for bit. Only where panels_supported(); see to_panels.
enum class WeightLayout : uint8_t { rows, panels16 };

// A 2-D weight: `rows` rows of `cols` elements each (ggml ne[0] = cols, ne[1] = rows), each row
// `row_bytes(type, cols)` bytes, `rows * row_bytes` bytes in all in either layout.
struct WeightView {
  GgmlType type = GgmlType::F32;
  int64_t cols = 0;
  int64_t rows = 0;
  const uint8_t* data = nullptr;
  WeightLayout layout = WeightLayout::rows;
};

// Whether this machine's matmul can read w in the panel layout: the AMX engine is on
// (amx_prompt_engine()), w is in the rows layout, has one of its types (Q4_0, Q4_1, Q5_0, Q5_1,
// Q8_0, IQ4_NL) and a multiple of 16 rows.
bool panels_supported(const WeightView& w);
// Rewrites w's bytes in place into the panel layout and sets w.layout; `data` is w.data, writable.
// A matrix in this layout gives every token the same numbers whatever its TokenKind (the AMX
// engine's); dequantize_row still reads it. Throws qf::Error unless panels_supported(w).
void to_panels(WeightView& w, uint8_t* data);

// Which rows a matmul multiplies; picks the engine where that matters (AMX, see below).
//   decode: decode steps (one new token of each of one or more sequences, batched or not) and
//           every other use: the engines of the dispatched SIMD target.
//   prompt: tokens of a sequence's prompt (prefill, evaluation, a server's prompt chunks): the
//           AMX engine for the 32-element types where the CPU and OS allow it and the target is
//           AVX3_DL (amx_prompt_engine()), else the same as decode.
// Every engine computes a (row, token) result from that row and token alone (not from n_tok, the
// token's place in a tile or the thread count), so a token always gets the same numbers from the
// same kind: a prompt's numbers do not depend on its chunking, nor a session's decode steps on
// what shares its batch. The two kinds may differ by float rounding. Weights in the panel layout
// (WeightLayout::panels16) give every token the AMX engine's numbers whatever its kind.
enum class TokenKind : uint8_t { decode, prompt };

// y[t * rows + r] = dot(W row r, x[t * cols ...]) for t in [0, n_tok).
// Quantized weights use the activations quantized to 8 bits (as llama.cpp does) in the format
// their type-table row names, and integer dot products; F32/F16/BF16 weights use float dot
// products. Threads split the rows; prefill (n_tok > 1) tiles tokens so each weight block is
// unpacked once per tile, not once per token.
//
// Activation quantization, the same on every SIMD target:
//  - 32-element types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), per block of 32:
//      d = max|x| / 127, id = d != 0 ? 1 / d : 0, q = round_half_away_from_zero(x * id) in
//      [-127, 127] computed in float; the block's scale is then rounded to fp16 (as ggml's q8
//      blocks store it, so results match llama.cpp's), and s = fp16(d) * sum(q) is exact.
//  - K-quants (Q2_K..Q6_K), per super-block of 256 (ggml's Q8_K): m = the element of largest
//      |x| (first on ties), iscale = -127 / m, q = min(127, round_half_even(iscale * x)),
//      d = 1 / iscale (float), plus the sums of q per 16; an all-zero block has d = 0.
// Accumulation is in float, one block scale at a time, so results differ from a double
// reference on the same quantized inputs by float rounding only.
// Quantized types need cols to be a whole number of blocks. x and y must not overlap. Throws
// qf::Error on bad input or a type the table does not support.
// Runs its own pool.run(), so it must not be called from inside a job of the same pool.
void matmul(const WeightView& w, const float* x, int64_t n_tok, float* y, ThreadPool& pool,
            TokenKind kind = TokenKind::decode);

// ys[i] = ws[i] x for matrices that read the same input (a layer's q, k and v projections; gate
// and up): one quantization of x and one parallel region over all their rows, where the
// matrices share a type and a width (otherwise one matmul each). Bit for bit the results of
// separate matmul calls.
void matmul_shared_input(std::span<const WeightView> ws, const float* x, int64_t n_tok, std::span<float* const> ys,
                         ThreadPool& pool, TokenKind kind = TokenKind::decode);

// Dequantizes row `row` of w into out[0..cols). Throws qf::Error on a bad type, row or pointer.
void dequantize_row(const WeightView& w, int64_t row, float* out);

// Float vector kernels (n may be any size; x and y must not overlap).
float dot_f32(const float* a, const float* b, size_t n);
// out[g * out_stride + j] = <rows + j * d, x + g * d> for j < n_rows, g < n_x: each row of d
// floats projected on n_x vectors, a vector's projections contiguous. Not bit-identical to
// dot_f32 (another summation order), within float rounding of it.
void project_rows_f32(const float* rows, size_t n_rows, size_t d, const float* x, size_t n_x, float* out,
                      size_t out_stride);
void axpy_f32(float a, const float* x, float* y, size_t n);  // y += a * x
void scale_f32(float* y, float a, size_t n);                // y *= a

// Element-wise kernels of the forward pass (SIMD, runtime dispatch; tensor/elementwise.cpp).
// exp and tanh are Highway's (1-4 ulp), so results are within a few float ulps of the scalar
// formulas, not bit-identical to them.
// gate[i] = gelu_tanh(gate[i]) * up[i], GELU's tanh approximation (Gemma's gelu_pytorch_tanh).
void gelu_tanh_mul_f32(float* gate, const float* up, size_t n);
// gate[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).
void silu_mul_f32(float* gate, const float* up, size_t n);
// x[i] = cap * tanh(x[i] / cap).
void softcap_f32(float* x, size_t n, float cap);
// The index std::max_element(x, x + n) points to (0 when n == 0), SIMD.
size_t argmax_f32(const float* x, size_t n);
// out[i] = x[i] / sqrt(mean(x^2) + eps) * w[i]; the mean of squares in double. out may be x.
void rmsnorm_f32(float* out, const float* x, const float* w, size_t n, float eps);

// Name of the SIMD target chosen at run time, as Highway names it ("AVX3_DL" = AVX-512 with
// VNNI/VBMI, "AVX3" = AVX-512, "AVX2", "SCALAR").
std::string simd_target_name();
// Whether TokenKind::prompt matmuls of the 32-element types run on the AMX engine here: the CPU
// has AMX-TILE and AMX-INT8, the OS grants the tile state, the dispatched target is AVX3_DL (see
// force_simd_target / QF_SIMD_TARGET) and the environment variable QF_AMX is not 0. Throws
// qf::Error when QF_AMX is set to anything but 0 or 1.
bool amx_prompt_engine();
// Tile of the AVX-512 VNNI engine for quantized products of 2-16 tokens (a batched decode step):
// "1x16" (1 weight row x 16 tokens, the faster on Intel) or "4x4" (the faster on AMD). The
// default is "4x4" on AMD CPUs, else "1x16"; the environment variable QF_VNNI_TILE=1x16|4x4
// sets it before the first call (another value throws qf::Error from that call). Longer products
// use 1x16 and a single token its own rows-only tile. The results are the same bit for bit.
std::string vnni_batch_tile();
// For tests and benchmarks: "1x16", "4x4" or "default" (the above); false for another name.
// Not thread-safe: call it while no kernel runs.
bool force_vnni_batch_tile(std::string_view name);
// What qf reports as its kernels: simd_target_name(), plus " + AMX prompt" when amx_prompt_engine().
std::string simd_description();

// Caps run-time dispatch at a lower SIMD target, for tests and benchmarks. Names, best first:
// "best" (no cap), "avx512vnni" (AVX3_DL), "avx512" (AVX3), "avx2", "scalar" (portable C++).
// Returns false and changes nothing when the name is unknown or this CPU/OS cannot run it.
// The environment variable QF_SIMD_TARGET=<name> does the same before the first kernel call
// (an unknown or unsupported name there throws qf::Error from that call).
// Not thread-safe: call it while no kernel runs.
bool force_simd_target(std::string_view name);
// The names force_simd_target accepts on this machine, best first ("best" excluded).
std::vector<std::string> available_simd_targets();

// fp16 / bf16 conversion (scalar, exact; round to nearest even; NaN stays NaN).
float fp16_to_f32(uint16_t h);
uint16_t f32_to_fp16(float f);
// out[2i, 2i + 2) = f32_to_fp16(x[i]) (little endian) for i < n, bit for bit (SIMD, runtime
// dispatch; tensor/elementwise.cpp).
void f32_to_fp16_row(const float* x, size_t n, uint8_t* out);
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);

}  // namespace qf
