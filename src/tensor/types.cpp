// The weight-type table: one row per ggml type. A supported type names its activation format
// and its row decoder here, and its matmul kernels in matmul.cpp (KernelFor); tests, the model
// loader and `qf info` read this table.
#include "tensor/types.h"

#include <array>
#include <cstring>

#include "tensor/kernels.h"
#include "tensor/quant_blocks.h"
#include "util/error.h"

namespace qf {

namespace {

void dequantize_f32(const uint8_t* p, int64_t n, float* out) { std::memcpy(out, p, static_cast<size_t>(n) * 4); }

void dequantize_f16(const uint8_t* p, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_f32(blocks::rd16(p + 2 * i));
}

void dequantize_bf16(const uint8_t* p, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(blocks::rd16(p + 2 * i));
}

constexpr TypeInfo plain(GgmlType t, std::string_view name, size_t bytes, DequantizeFn fn = nullptr) {
  return {t, name, 1, bytes, fn ? ActFormat::kFloat : ActFormat::kNone, fn, fn != nullptr};
}

constexpr TypeInfo unsupported(GgmlType t, std::string_view name, int64_t elems, size_t bytes) {
  return {t, name, elems, bytes, ActFormat::kNone, nullptr, false};
}

template <GgmlType TY>
constexpr TypeInfo quant(std::string_view name) {
  using C = blocks::Codec<TY>;
  return {TY, name, C::kElems, C::kBytes, C::kElems == 32 ? ActFormat::kQ8 : ActFormat::kQ8K,
          &blocks::dequantize_blocks<TY>, true};
}

using G = GgmlType;
constexpr TypeInfo kTypes[] = {
    plain(G::F32, "F32", 4, &dequantize_f32),
    plain(G::F16, "F16", 2, &dequantize_f16),
    quant<G::Q4_0>("Q4_0"),
    quant<G::Q4_1>("Q4_1"),
    quant<G::Q5_0>("Q5_0"),
    quant<G::Q5_1>("Q5_1"),
    quant<G::Q8_0>("Q8_0"),
    unsupported(G::Q8_1, "Q8_1", 32, 36),
    quant<G::Q2_K>("Q2_K"),
    quant<G::Q3_K>("Q3_K"),
    quant<G::Q4_K>("Q4_K"),
    quant<G::Q5_K>("Q5_K"),
    quant<G::Q6_K>("Q6_K"),
    unsupported(G::Q8_K, "Q8_K", 256, 292),
    unsupported(G::IQ2_XXS, "IQ2_XXS", 256, 66),
    unsupported(G::IQ2_XS, "IQ2_XS", 256, 74),
    unsupported(G::IQ3_XXS, "IQ3_XXS", 256, 98),
    unsupported(G::IQ1_S, "IQ1_S", 256, 50),
    quant<G::IQ4_NL>("IQ4_NL"),
    unsupported(G::IQ3_S, "IQ3_S", 256, 110),
    unsupported(G::IQ2_S, "IQ2_S", 256, 82),
    unsupported(G::IQ4_XS, "IQ4_XS", 256, 136),
    plain(G::I8, "I8", 1),
    plain(G::I16, "I16", 2),
    plain(G::I32, "I32", 4),
    plain(G::I64, "I64", 8),
    plain(G::F64, "F64", 8),
    unsupported(G::IQ1_M, "IQ1_M", 256, 56),
    plain(G::BF16, "BF16", 2, &dequantize_bf16),
    unsupported(G::TQ1_0, "TQ1_0", 256, 54),
    unsupported(G::TQ2_0, "TQ2_0", 256, 66),
    unsupported(G::MXFP4, "MXFP4", 32, 17),
};

constexpr uint32_t kMaxId = 64;

// Rows indexed by id; ids without a row point at the "unknown" row.
struct ById {
  std::array<const TypeInfo*, kMaxId> rows{};
  TypeInfo unknown{};
  ById() {
    unknown.name = "unknown";
    rows.fill(&unknown);
    for (const TypeInfo& t : kTypes) {
      const auto id = static_cast<uint32_t>(t.type);
      if (id >= kMaxId || rows[id] != &unknown) fail("type table: bad or duplicate id ", id);
      rows[id] = &t;
    }
  }
};

const ById& by_id() {
  static const ById table;
  return table;
}

}  // namespace

const TypeInfo& type_info(GgmlType t) { return type_info(static_cast<uint32_t>(t)); }

const TypeInfo& type_info(uint32_t id) {
  const ById& t = by_id();
  return id < kMaxId ? *t.rows[id] : t.unknown;
}

std::span<const TypeInfo> all_types() { return kTypes; }

size_t row_bytes(GgmlType t, int64_t n) {
  const TypeInfo& ti = type_info(t);
  if (ti.block_elems <= 0) fail("tensor type ", static_cast<uint32_t>(t), " is unknown");
  if (n < 0 || n % ti.block_elems != 0)
    fail("row of ", n, " elements is not a whole number of ", ti.name, " blocks");
  return static_cast<size_t>(n / ti.block_elems) * ti.block_bytes;
}

}  // namespace qf
