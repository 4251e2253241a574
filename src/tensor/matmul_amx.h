// The AMX int8 engine for prompt processing (matmul_amx.cpp): Intel AMX tile instructions for
// the 32-element block types. Internal to the tensor module; kernels.h's matmul picks it for
// TokenKind::prompt rows when amx_available() and the dispatched SIMD target is AVX3_DL.
#pragma once
#include <cstdint>
#include <span>

#include "tensor/kernels.h"

namespace qf::detail {

// Whether this CPU has AMX-TILE and AMX-INT8, the OS granted this process the tile state (asked
// for once per process, on the first call) and QF_AMX is not 0. Throws qf::Error when QF_AMX is
// set to anything but 0 or 1 (retried on the next call).
bool amx_available();

// Whether the engine handles weights of type t (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL).
bool amx_handles(GgmlType t);

// kernels.h's matmul for a type amx_handles(), on a machine where amx_available(); the caller
// has checked the shape and pointers. Activations are quantized exactly as the other engines
// quantize them for 32-element types; each output depends only on its own row and token (never
// on n_tok, the token's place in a tile or the thread count).
// Matrices of one type and width share the input's quantization (matmul_shared_input). Weights
// in the panel layout take the AMX tiles too, or VNNI for a few tokens (decode) with the same
// integer products and the same float epilogue, so their results are the tiles' bit for bit:
// one token gets the same numbers alone, batched or in a prompt.
void amx_matmul(std::span<const WeightView> ws, const float* x, int64_t n_tok, std::span<float* const> ys,
                ThreadPool& pool);


}  // namespace qf::detail
