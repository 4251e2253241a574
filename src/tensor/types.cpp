#include "tensor/types.h"

#include "util/error.h"

namespace qf {

TypeInfo type_info(GgmlType t) { return type_info(static_cast<uint32_t>(t)); }

TypeInfo type_info(uint32_t id) {
  switch (id) {
    case 0: return {"F32", 1, 4, true};
    case 1: return {"F16", 1, 2, true};
    case 2: return {"Q4_0", 32, 18, true};
    case 3: return {"Q4_1", 32, 20, true};
    case 6: return {"Q5_0", 32, 22, false};
    case 7: return {"Q5_1", 32, 24, false};
    case 8: return {"Q8_0", 32, 34, true};
    case 9: return {"Q8_1", 32, 36, false};
    case 10: return {"Q2_K", 256, 84, false};
    case 11: return {"Q3_K", 256, 110, false};
    case 12: return {"Q4_K", 256, 144, false};
    case 13: return {"Q5_K", 256, 176, false};
    case 14: return {"Q6_K", 256, 210, false};
    case 15: return {"Q8_K", 256, 292, false};
    case 24: return {"I8", 1, 1, false};
    case 25: return {"I16", 1, 2, false};
    case 26: return {"I32", 1, 4, false};
    case 27: return {"I64", 1, 8, false};
    case 28: return {"F64", 1, 8, false};
    case 30: return {"BF16", 1, 2, true};
    default: return {"unknown", 0, 0, false};
  }
}

size_t row_bytes(GgmlType t, int64_t n) {
  const TypeInfo ti = type_info(t);
  if (ti.block_elems <= 0) fail("tensor type ", static_cast<uint32_t>(t), " is unknown");
  if (n < 0 || n % ti.block_elems != 0)
    fail("row of ", n, " elements is not a whole number of ", ti.name, " blocks");
  return static_cast<size_t>(n / ti.block_elems) * ti.block_bytes;
}

}  // namespace qf
