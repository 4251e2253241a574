// libFuzzer harness: the Q-Filters file reader (safetensors container) on arbitrary bytes, read
// raw and then interpreted for a model, with and without explicit layout and sign. Any input must
// either load or throw qf::Error.
#include <cstddef>
#include <cstdint>
#include <span>

#include "calib/filter_file.h"
#include "util/error.h"

using namespace qf::calib;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  try {
    const StoredFilters stored = parse_filters(bytes);
    (void)stored.filters.data.size();
  } catch (const qf::Error&) {
  }
  // The seed corpus is written for this shape (2 layers, 2 KV heads, head_dim 4).
  const FilterExpectation expect{2, 2, 4, ""};
  LoadOptions foreign;
  foreign.layout = FilterLayout::kHf;
  foreign.sign = SignConvention::kKeepSmallestDot;
  for (const LoadOptions& opt : {LoadOptions{}, foreign}) {
    try {
      (void)load_filters(bytes, "<fuzz>", expect, opt);
    } catch (const qf::Error&) {
    }
  }
  return 0;
}
