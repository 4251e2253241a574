// ggml_matmul_bench: times matrix-vector (decode) and matrix-matrix (prefill) products per weight
// type through llama.cpp's prebuilt libggml CPU backend, on the shapes and protocol of qf's
// BM_TypeMatmul / BM_TypeDecode (bench/kernels_bench.cpp), for scripts/bench_kernels_vs_ggml.py.
//
//   ggml_matmul_bench [--types Q4_K,Q6_K,...] [--rows 4096] [--cols 4096] [--n-tok 128]
//                     [--threads 1] [--stream-mib 256] [--min-time 1.0] [--repack]
//
// decode: enough copies of a rows x cols matrix to hold --stream-mib MiB, each multiplied by one
//   token per pass, so weights stream from memory as in real decoding: GB/s of weights.
// prefill: one matrix times --n-tok tokens: GFLOP/s (2 per weight element and token).
// Weights are ggml_quantize_chunk of N(0, 1) floats. --repack places weights in the CPU
// backend's extra buffer types (llama.cpp's default for model weights: repacked layouts for
// some types), otherwise in plain CPU buffers.
// Prints one JSON object per line: {"engine":"ggml","type":..,"mode":"decode"|"prefill",...}.
#include <dlfcn.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace {

struct Options {
  std::vector<std::string> types = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
                                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"};
  int64_t rows = 4096, cols = 4096, n_tok = 128;
  int threads = 1;
  double stream_mib = 256, min_time = 1.0;
  bool repack = false;
};

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "ggml_matmul_bench: %s\n", msg.c_str());
  std::exit(1);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) fail("missing value after " + a);
      return argv[++i];
    };
    if (a == "--types") {
      o.types.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');) o.types.push_back(t);
    } else if (a == "--rows") o.rows = std::stoll(next());
    else if (a == "--cols") o.cols = std::stoll(next());
    else if (a == "--n-tok") o.n_tok = std::stoll(next());
    else if (a == "--threads") o.threads = std::stoi(next());
    else if (a == "--stream-mib") o.stream_mib = std::stod(next());
    else if (a == "--min-time") o.min_time = std::stod(next());
    else if (a == "--repack") o.repack = true;
    else fail("unknown option " + a);
  }
  return o;
}

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// ggml spells some names in lower case ("q4_K"); qf and GGUF tools use upper case.
ggml_type type_by_name(const std::string& name) {
  for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
    const char* n = ggml_type_name(static_cast<ggml_type>(t));
    if (n != nullptr && upper(name) == upper(n)) return static_cast<ggml_type>(t);
  }
  fail("unknown ggml type " + name);
}

std::string lib_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&ggml_init), &info) == 0 || !info.dli_fname) fail("cannot locate libggml");
  return std::filesystem::path(info.dli_fname).parent_path().string();
}

struct Cpu {
  ggml_backend_t backend = nullptr;
  ggml_backend_buffer_type_t weight_buft = nullptr;
  Cpu(int threads, bool repack) {
    ggml_backend_load_all_from_path(lib_dir().c_str());
    backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (backend == nullptr) fail("no CPU backend");
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto set_threads = reinterpret_cast<ggml_backend_set_n_threads_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"));
    if (set_threads == nullptr) fail("CPU backend has no ggml_backend_set_n_threads");
    set_threads(backend, threads);
    weight_buft = ggml_backend_dev_buffer_type(dev);
    if (repack) {
      auto extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
          ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
      if (extra != nullptr && extra(dev) != nullptr && *extra(dev) != nullptr) weight_buft = *extra(dev);
    }
  }
  ~Cpu() { ggml_backend_free(backend); }
};

std::vector<float> normal(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Seconds per graph run: median of runs until min_time has passed (at least 3), after a warm-up.
double time_graph(ggml_backend_t be, ggml_cgraph* gf, double min_time) {
  ggml_backend_graph_compute(be, gf);
  std::vector<double> t;
  double total = 0;
  while (total < min_time || t.size() < 3) {
    const auto a = std::chrono::steady_clock::now();
    ggml_backend_graph_compute(be, gf);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    t.push_back(s);
    total += s;
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void run_case(const Cpu& cpu, const Options& o, ggml_type type, bool decode) {
  const size_t mat_bytes = ggml_row_size(type, o.cols) * o.rows;
  const int copies = decode ? std::max(1, static_cast<int>(o.stream_mib * 1048576.0 / mat_bytes + 0.999)) : 1;
  const int64_t n_tok = decode ? 1 : o.n_tok;
  const size_t graph_size = 2 * static_cast<size_t>(copies) + 16;
  ggml_init_params ip{ggml_tensor_overhead() * (2 * copies + 4) + ggml_graph_overhead_custom(graph_size, false),
                      nullptr, true};
  ggml_context* wctx = ggml_init(ip);  // weights (maybe repacked buffers)
  ggml_context* ctx = ggml_init(ip);   // activations, results, graph
  std::vector<ggml_tensor*> w(copies);
  for (auto& t : w) t = ggml_new_tensor_2d(wctx, type, o.cols, o.rows);
  ggml_tensor* x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, o.cols, n_tok);
  ggml_cgraph* gf = ggml_new_graph_custom(ctx, graph_size, false);
  for (auto* t : w) ggml_build_forward_expand(gf, ggml_mul_mat(ctx, t, x));
  ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, cpu.weight_buft);
  ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, cpu.backend);
  if (wbuf == nullptr || buf == nullptr) fail("allocation failed");
  ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
  const std::vector<float> wf = normal(static_cast<size_t>(o.rows * o.cols), 1);
  std::vector<uint8_t> q(mat_bytes);
  ggml_quantize_chunk(type, wf.data(), q.data(), 0, o.rows, o.cols, nullptr);
  for (auto* t : w) ggml_backend_tensor_set(t, q.data(), 0, q.size());
  const std::vector<float> xf = normal(static_cast<size_t>(o.cols * n_tok), 2);
  ggml_backend_tensor_set(x, xf.data(), 0, xf.size() * sizeof(float));

  const double s = time_graph(cpu.backend, gf, o.min_time);
  const double bytes = static_cast<double>(mat_bytes) * copies;
  const double flops = 2.0 * o.rows * o.cols * n_tok * copies;
  std::printf("{\"engine\":\"ggml\",\"type\":\"%s\",\"mode\":\"%s\",\"rows\":%lld,\"cols\":%lld,\"n_tok\":%lld,"
              "\"threads\":%d,\"copies\":%d,\"repack\":%s,\"seconds\":%.6g,\"GB/s\":%.4g,\"GFLOP/s\":%.4g}\n",
              upper(ggml_type_name(type)).c_str(), decode ? "decode" : "prefill", static_cast<long long>(o.rows),
              static_cast<long long>(o.cols), static_cast<long long>(n_tok), o.threads, copies,
              o.repack ? "true" : "false", s, bytes / s / 1e9, flops / s / 1e9);
  std::fflush(stdout);
  ggml_backend_buffer_free(buf);
  ggml_backend_buffer_free(wbuf);
  ggml_free(ctx);
  ggml_free(wctx);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const Cpu cpu(o.threads, o.repack);
  for (const std::string& name : o.types) {
    const ggml_type t = type_by_name(name);
    if (o.cols % ggml_blck_size(t) != 0) fail(name + ": cols must be a multiple of its block size");
    run_case(cpu, o, t, true);
    run_case(cpu, o, t, false);
  }
  return 0;
}
