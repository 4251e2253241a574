// Test tool: dequantizes weights through qf's type table and writes little-endian float32, for
// tests/python/test_quants.py to compare bit for bit with gguf-py's numpy dequantizers.
//   dequant_tool raw TYPE IN.bin OUT.f32           IN.bin: whole blocks of TYPE (e.g. Q4_K)
//   dequant_tool gguf MODEL.gguf K OUT.f32         per tensor (file order), K rows spread evenly
//                                                  over its rows (all rows if fewer)
// Prints one line per tensor in gguf mode: name, type, rows written.
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "tensor/kernels.h"
#include "tensor/types.h"
#include "util/error.h"

namespace {

const qf::TypeInfo& type_by_name(const std::string& name) {
  for (const qf::TypeInfo& t : qf::all_types())
    if (t.name == name) return t;
  qf::fail("unknown type name ", name);
}

void write_floats(std::FILE* out, const std::vector<float>& v) {
  if (std::fwrite(v.data(), sizeof(float), v.size(), out) != v.size()) qf::fail("write failed");
}

void dequant_raw(const std::string& type, const std::string& in, std::FILE* out) {
  const qf::TypeInfo& ti = type_by_name(type);
  std::ifstream f(in, std::ios::binary);
  if (!f) qf::fail("cannot open ", in);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (ti.block_bytes == 0 || bytes.size() % ti.block_bytes != 0) qf::fail(in, " is not whole ", ti.name, " blocks");
  const int64_t n = static_cast<int64_t>(bytes.size() / ti.block_bytes) * ti.block_elems;
  std::vector<float> v(n);
  qf::dequantize_row(qf::WeightView{ti.type, n, 1, bytes.data()}, 0, v.data());
  write_floats(out, v);
}

void dequant_gguf(const std::string& path, int64_t k, std::FILE* out) {
  const auto file = qf::gguf::File::open(path);
  for (const qf::gguf::TensorInfo& t : file->tensors()) {
    const int64_t cols = t.ne.at(0), rows = cols == 0 ? 0 : t.n_elements() / cols;
    const qf::WeightView w{t.type, cols, rows, t.data};
    const int64_t n = std::min(k, rows);
    std::vector<float> v(cols);
    for (int64_t i = 0; i < n; ++i) {
      qf::dequantize_row(w, i * rows / n, v.data());
      write_floats(out, v);
    }
    std::printf("%s %s %lld\n", t.name.c_str(), std::string(qf::type_info(t.type).name).c_str(),
                static_cast<long long>(n));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> a(argv + 1, argv + argc);
  try {
    if (a.size() != 4 || (a[0] != "raw" && a[0] != "gguf")) {
      std::fprintf(stderr, "usage: dequant_tool raw TYPE IN.bin OUT.f32 | gguf MODEL.gguf ROWS OUT.f32\n");
      return 2;
    }
    std::FILE* out = std::fopen(a[3].c_str(), "wb");
    if (out == nullptr) qf::fail("cannot create ", a[3]);
    if (a[0] == "raw") dequant_raw(a[1], a[2], out);
    else dequant_gguf(a[1], std::stoll(a[2]), out);
    if (std::fclose(out) != 0) qf::fail("cannot write ", a[3]);
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
