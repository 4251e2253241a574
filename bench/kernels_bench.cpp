// Matmul micro-benchmarks on SmolLM2-135M shapes (n_embd 576, n_ff 1536, 3 KV heads of 64,
// vocab 49152).
//
//   BM_Matmul/<matrix>/<type>/<n_tok>/<threads>: one weight matrix. Decode (n_tok 1) reports
//     weight GB/s; with a single matrix those bytes are mostly cache-resident, so see also:
//   BM_DecodeModel/<type>/<threads>: every matmul of one decode step of a 30-layer model
//     (96 MB of weights for Q4_1 + Q8_0 output), i.e. weights streamed as in real decode.
//   BM_BatchedModel/<type>/<n_tok>/<threads>: the same matrices against n_tok tokens, the weight
//     products of one batched step of n_tok sessions (qf serve).
//   GOPS counts 2 ops (multiply + add) per weight element per token.
//   BM_TypeDecode/<type>/<threads>, BM_TypePrefill/<type>/<threads>: every supported quantized
//     type on 4096 x 4096 matrices. Decode: one token through enough copies to stream 256 MiB of
//     weights per iteration (GB/s of weights); prefill: 128 tokens through one matrix (GOPS).
//     scripts/bench_kernels_vs_ggml.py runs these beside the same shapes through libggml.
//   BM_TypeDecodeCached/<type>: decode from an L2-resident matrix, per CPU second: the kernel's
//     own speed, which bounds BM_TypeDecode from above.
//   BM_ReadBandwidth/<0..3>: streaming read of 1 GiB per thread (1 and 2 threads), plain (0),
//   in 2 MiB pages with software prefetch as decode reads weights (1): the bound for decode;
//   2 MiB pages alone (2), prefetch alone (3): which of the two matters.
//   BM_PeakInt8/<bits>: the core's ceiling for int8 products: independent AVX-512 VNNI
//     multiply-adds (vpdpbusd, 512- or 256-bit) on registers, no loads, per thread (1 and 2
//     threads). What a weight kernel reaches is a share of this (GOPS = 2 x multiply-adds).
//
// QF_SIMD_TARGET=avx2|avx512|scalar selects a lower SIMD target.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <sys/mman.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tensor/kernels.h"
#include "tensor/threadpool.h"
#include "tensor/types.h"

namespace qf {
namespace {

struct MatrixShape {
  const char* name;
  int64_t rows, cols;
};
// rows = output features, cols = input features (ggml ne[1], ne[0]).
constexpr MatrixShape kShapes[] = {
    {"attn_q_576x576", 576, 576},   {"attn_k_192x576", 192, 576},   {"ffn_up_1536x576", 1536, 576},
    {"ffn_down_576x1536", 576, 1536}, {"output_49152x576", 49152, 576},
};

ThreadPool& pool(int n) {
  static std::unique_ptr<ThreadPool> pools[9];
  if (!pools[n]) pools[n] = std::make_unique<ThreadPool>(n);
  return *pools[n];
}

// Byte offsets of a block's fp16 scale and (where the type has one) min.
std::pair<size_t, int> half_fields(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_1: case GgmlType::Q5_1: case GgmlType::Q4_K: case GgmlType::Q5_K: return {0, 2};
    case GgmlType::Q2_K: return {80, 82};
    case GgmlType::Q3_K: return {108, -1};
    case GgmlType::Q6_K: return {208, -1};
    default: return {0, -1};
  }
}

// Random but realistic blocks: finite fp16 scales (no NaN/inf/denormal slow paths).
std::vector<uint8_t> make_weights(GgmlType t, int64_t rows, int64_t cols, uint32_t seed) {
  std::vector<uint8_t> data(row_bytes(t, cols) * rows);
  std::mt19937 rng(seed);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  const size_t bb = type_info(t).block_bytes;
  const uint16_t d = f32_to_fp16(0.01f), m = f32_to_fp16(-0.08f);
  const auto [d_at, m_at] = half_fields(t);
  for (size_t off = 0; off < data.size(); off += bb) {
    std::memcpy(&data[off + d_at], &d, 2);
    if (m_at >= 0) std::memcpy(&data[off + m_at], &m, 2);
  }
  return data;
}

std::vector<float> make_x(int64_t n) {
  std::vector<float> x(n);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : x) v = normal(rng);
  return x;
}

void BM_Matmul(benchmark::State& state) {
  const MatrixShape& s = kShapes[state.range(0)];
  const auto type = static_cast<GgmlType>(state.range(1));
  const int64_t n_tok = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const auto w = make_weights(type, s.rows, s.cols, 1);
  const WeightView wv{type, s.cols, s.rows, w.data()};
  const auto x = make_x(s.cols * n_tok);
  std::vector<float> y(s.rows * n_tok);
  ThreadPool& p = pool(threads);
  for (auto _ : state) {
    matmul(wv, x.data(), n_tok, y.data(), p);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(iters * w.size() / 1e9, benchmark::Counter::kIsRate);
  state.counters["GOPS"] = benchmark::Counter(iters * 2.0 * s.rows * s.cols * n_tok / 1e9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(s.name) + " " + std::string(type_info(type).name) + " " + simd_target_name());
}

void MatmulArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "type", "n_tok", "threads"});
  for (int shape = 0; shape < 5; ++shape)
    for (auto type : {GgmlType::Q4_1, GgmlType::Q8_0}) {
      if (shape == 4 && type == GgmlType::Q4_1) continue;  // the output matrix is Q8_0
      for (int n_tok : {1, 16, 64, 512})
        for (int threads : {1, 2}) b->Args({shape, static_cast<int>(type), n_tok, threads});
    }
  b->UseRealTime();
}
BENCHMARK(BM_Matmul)->Apply(MatmulArgs);

// Every weight matrix of SmolLM2-135M: 30 x (q, k, v, o, gate, up, down) + output, all different
// memory, so weights come from L3/DRAM as in real decoding.
struct ModelWeights {
  struct Mat {
    std::vector<uint8_t> data;
    WeightView view;
  };
  std::vector<Mat> mats;
  size_t bytes = 0;
};

// panels: the layer and output matrices in the panel layout (kernels.h), as Model::load puts
// them where the AMX engine runs; elsewhere the argument changes nothing.
ModelWeights make_model(GgmlType type, bool panels = false) {
  ModelWeights m;
  const int64_t shapes[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  uint32_t seed = 1;
  for (int layer = 0; layer < 30; ++layer)
    for (const auto& sh : shapes) m.mats.push_back({make_weights(type, sh[0], sh[1], seed++), {}});
  m.mats.push_back({make_weights(GgmlType::Q8_0, 49152, 576, seed++), {}});
  for (size_t i = 0; i < m.mats.size(); ++i) {
    const bool out = i + 1 == m.mats.size();
    const int64_t rows = out ? 49152 : shapes[i % 7][0], cols = out ? 576 : shapes[i % 7][1];
    m.mats[i].view = {out ? GgmlType::Q8_0 : type, cols, rows, m.mats[i].data.data()};
    if (panels && panels_supported(m.mats[i].view)) to_panels(m.mats[i].view, m.mats[i].data.data());
    m.bytes += m.mats[i].data.size();
  }
  return m;
}

// One decode step: every matrix against one token.
void BM_DecodeModel(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const int threads = static_cast<int>(state.range(1));
  const ModelWeights m = make_model(type, state.range(2) != 0);
  const auto x = make_x(1536);
  std::vector<float> y(49152);
  ThreadPool& p = pool(threads);
  for (auto _ : state) {
    for (const auto& mat : m.mats) matmul(mat.view, x.data(), 1, y.data(), p);
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(iters * m.bytes / 1e9, benchmark::Counter::kIsRate);
  state.counters["tok/s"] = benchmark::Counter(iters, benchmark::Counter::kIsRate);
  state.SetLabel(std::to_string(m.bytes >> 20) + " MiB " + simd_target_name());
}
BENCHMARK(BM_DecodeModel)
    ->ArgNames({"type", "threads", "panels"})
    ->ArgsProduct({{static_cast<int>(GgmlType::Q4_1)}, {1, 2}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The weight products of one batched decode step (qf serve): every matrix against n_tok tokens,
// one per session. Read CPU time on a shared machine; tok/s counts the n_tok tokens.
void BM_BatchedModel(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const int64_t n_tok = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  const ModelWeights m = make_model(type, state.range(3) != 0);
  const auto x = make_x(1536 * n_tok);
  std::vector<float> y(49152 * n_tok);
  ThreadPool& p = pool(threads);
  for (auto _ : state) {
    for (const auto& mat : m.mats) matmul(mat.view, x.data(), n_tok, y.data(), p);
    benchmark::ClobberMemory();
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(state.iterations() * n_tok), benchmark::Counter::kIsRate);
  state.SetLabel(std::to_string(m.bytes >> 20) + " MiB " + simd_target_name());
}
BENCHMARK(BM_BatchedModel)
    ->ArgNames({"type", "n_tok", "threads", "panels"})
    ->ArgsProduct({{static_cast<int>(GgmlType::Q4_1)}, {1, 2, 3, 4, 5, 6, 8, 16, 32}, {1, 2}, {0, 1}})
    ->Unit(benchmark::kMillisecond);

// ---- per weight type, shapes shared with scripts/ref/ggml_matmul_bench.cpp ----------------------

constexpr int64_t kTypeRows = 4096, kTypeCols = 4096, kPrefillTokens = 128;
constexpr double kStreamMiB = 256;

std::vector<GgmlType> quantized_types() {
  std::vector<GgmlType> v;
  for (const TypeInfo& t : all_types())
    if (t.supported && t.block_elems > 1) v.push_back(t.type);
  return v;
}

void TypeArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"type", "threads"});
  for (GgmlType t : quantized_types())
    for (int threads : {1, 2, 4}) b->Args({static_cast<int>(t), threads});
  b->UseRealTime();
}

// panels (third argument, where given): the matrices in the panel layout where it is supported.
void BM_TypeDecode(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  ThreadPool& p = pool(static_cast<int>(state.range(1)));
  const size_t mat_bytes = row_bytes(type, kTypeCols) * kTypeRows;
  const int copies = std::max(1, static_cast<int>(kStreamMiB * 1048576.0 / mat_bytes + 0.999));
  const auto w = make_weights(type, kTypeRows, kTypeCols, 1);
  std::vector<std::vector<uint8_t>> mats(copies, w);
  std::vector<WeightView> views;
  for (auto& m : mats) {
    views.push_back(WeightView{type, kTypeCols, kTypeRows, m.data()});
    if (state.range(2) != 0 && panels_supported(views.back())) to_panels(views.back(), m.data());
  }
  const auto x = make_x(kTypeCols);
  std::vector<float> y(kTypeRows);
  for (auto _ : state) {
    for (const WeightView& v : views) matmul(v, x.data(), 1, y.data(), p);
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(iters * mat_bytes * copies / 1e9, benchmark::Counter::kIsRate);
  state.counters["GOPS"] = benchmark::Counter(iters * 2.0 * kTypeRows * kTypeCols * copies / 1e9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(type_info(type).name) + " " + std::to_string(copies) + " copies " + simd_target_name());
}
BENCHMARK(BM_TypeDecode)->Apply([](benchmark::internal::Benchmark* b) {
  b->ArgNames({"type", "threads", "panels"});
  for (GgmlType t : quantized_types())
    for (int threads : {1, 2, 4})
      for (int panels : {0, 1}) b->Args({static_cast<int>(t), threads, panels});
  b->UseRealTime();
});

void BM_TypePrefill(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  ThreadPool& p = pool(static_cast<int>(state.range(1)));
  const auto w = make_weights(type, kTypeRows, kTypeCols, 1);
  const auto x = make_x(kTypeCols * kPrefillTokens);
  std::vector<float> y(kTypeRows * kPrefillTokens);
  for (auto _ : state) {
    matmul(WeightView{type, kTypeCols, kTypeRows, w.data()}, x.data(), kPrefillTokens, y.data(), p);
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["GB/s"] = benchmark::Counter(iters * w.size() / 1e9, benchmark::Counter::kIsRate);
  state.counters["GOPS"] = benchmark::Counter(iters * 2.0 * kTypeRows * kTypeCols * kPrefillTokens / 1e9, benchmark::Counter::kIsRate);
  state.SetLabel(std::string(type_info(type).name) + " " + simd_target_name());
}
BENCHMARK(BM_TypePrefill)->Apply(TypeArgs);

// A prompt's matmul as Gemma 3 270M's FFN gate/up has it (2048 x 640) at 512 tokens, and at 1
// and 16 tokens, with kind 1 = TokenKind::prompt (the AMX engine where amx_prompt_engine()) or
// 0 = TokenKind::decode (the target's engine): the AMX-on/off comparison of prefill's matmuls.
// QF_AMX=0 turns the prompt rows back to the target's engine. 1 thread, rates per CPU second.
void BM_PromptMatmul(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const auto kind = state.range(1) ? TokenKind::prompt : TokenKind::decode;
  const int64_t n_tok = state.range(2);
  constexpr int64_t kRows = 2048, kCols = 640;
  const auto w = make_weights(type, kRows, kCols, 1);
  const auto x = make_x(kCols * n_tok);
  std::vector<float> y(kRows * n_tok);
  for (auto _ : state) {
    matmul(WeightView{type, kCols, kRows, w.data()}, x.data(), n_tok, y.data(), pool(1), kind);
    benchmark::ClobberMemory();
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["GOPS"] = benchmark::Counter(iters * 2.0 * kRows * kCols * n_tok / 1e9, benchmark::Counter::kIsRate);
  const bool amx = kind == TokenKind::prompt && amx_prompt_engine() && type != GgmlType::Q4_K && type != GgmlType::Q6_K;
  state.SetLabel(std::string(type_info(type).name) + (amx ? " amx" : " ") + (amx ? "" : simd_target_name()));
}
BENCHMARK(BM_PromptMatmul)
    ->ArgNames({"type", "prompt", "tokens"})
    ->ArgsProduct({{static_cast<int>(GgmlType::Q5_0), static_cast<int>(GgmlType::Q8_0), static_cast<int>(GgmlType::Q4_0),
                    static_cast<int>(GgmlType::Q4_1)},
                   {0, 1},
                   {1, 16, 512}})
    ->Unit(benchmark::kMicrosecond);

// Decode from a matrix that stays in L2 (about 512 KiB, 2048 columns, 1 thread): the kernel's
// own throughput, which must exceed the read bandwidth for BM_TypeDecode to reach it. Rates are
// per CPU second, so other processes sharing the core distort them less than wall time would.
void BM_TypeDecodeCached(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  constexpr int64_t kCols = 2048;
  const int64_t rows = std::max<int64_t>(4, static_cast<int64_t>((512 << 10) / row_bytes(type, kCols)) / 4 * 4);
  const auto w = make_weights(type, rows, kCols, 1);
  const auto x = make_x(kCols);
  std::vector<float> y(rows);
  for (auto _ : state) {
    matmul(WeightView{type, kCols, rows, w.data()}, x.data(), 1, y.data(), pool(1));
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * w.size() / 1e9,
                                              benchmark::Counter::kIsRate);
  state.SetLabel(std::string(type_info(type).name) + " " + simd_target_name());
}
BENCHMARK(BM_TypeDecodeCached)->Apply([](benchmark::internal::Benchmark* b) {
  b->ArgNames({"type"});
  for (GgmlType t : quantized_types()) b->Args({static_cast<int>(t)});
});

// Streaming read of 1 GiB per thread (sum of 64-bit words, several accumulators so the loads
// overlap); with 2 threads, GB/s is the two threads' sum: what a multi-threaded decode can stream.
// Arg 0: a plain vector. Arg 1: as the decode kernels read weights: the buffer in 2 MiB pages
// (madvise, as gguf::File::move_tensor_data_to_huge_pages does) and each line requested 8 KiB
// ahead (the hardware prefetchers stop at every 4 KiB page). The faster of the two is the
// ceiling a memory-bound decode is judged against. Args 2 and 3: the pages or the prefetch alone.
void BM_ReadBandwidth(benchmark::State& state) {
  constexpr size_t kBytes = size_t{1} << 30, kPrefetch = 8192;
  const bool huge = state.range(0) == 1 || state.range(0) == 2;
  const bool prefetch = state.range(0) == 1 || state.range(0) == 3;
  void* raw = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    state.SkipWithError("mmap failed");
    return;
  }
#ifdef MADV_HUGEPAGE
  if (huge) ::madvise(raw, kBytes, MADV_HUGEPAGE);
#endif
  auto* buf = static_cast<uint64_t*>(raw);
  const size_t words = kBytes / 8;
  std::fill(buf, buf + words, uint64_t{1});
  for (auto _ : state) {
    uint64_t s[8] = {};
    for (size_t i = 0; i < words; i += 8) {
      if (prefetch) __builtin_prefetch(reinterpret_cast<const char*>(buf + i) + kPrefetch);
      for (int k = 0; k < 8; ++k) s[k] += buf[i + k];
    }
    benchmark::DoNotOptimize(s);
  }
  ::munmap(raw, kBytes);
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * kBytes / 1e9,
                                              benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ReadBandwidth)->DenseRange(0, 3)->Unit(benchmark::kMillisecond)->UseRealTime()->Threads(1)->Threads(2);

void BM_DotF32(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto a = make_x(n), b = make_x(n);
  for (auto _ : state) benchmark::DoNotOptimize(dot_f32(a.data(), b.data(), n));
}
BENCHMARK(BM_DotF32)->Arg(64)->Arg(576);

#if defined(__x86_64__) && defined(__GNUC__)
// 12 independent accumulators: more than the instruction's latency x issue width, so the chains
// never wait on each other; the empty asm keeps the compiler from folding the constant inputs.
#define QF_VNNI_PEAK(NAME, VEC, SET1, ZERO, DPBUSD)                                                   \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) int64_t NAME(int64_t rounds) {  \
    VEC acc[12];                                                                                 \
    const VEC a = SET1(3), b = SET1(5);                                                          \
    for (auto& x : acc) x = ZERO();                                                              \
    for (int64_t r = 0; r < rounds; ++r) {                                                       \
      _Pragma("GCC unroll 12") for (auto& x : acc) {                                             \
        x = DPBUSD(x, a, b);                                                                     \
        __asm__ volatile("" : "+v"(x));                                                          \
      }                                                                                          \
    }                                                                                            \
    int32_t lanes[sizeof(VEC) / 4];                                                              \
    int64_t sum = 0;                                                                             \
    for (auto& x : acc) {                                                                        \
      std::memcpy(lanes, &x, sizeof lanes);                                                      \
      for (int32_t v : lanes) sum += v;                                                          \
    }                                                                                            \
    return sum;                                                                                  \
  }
QF_VNNI_PEAK(vnni_multiply_adds_512, __m512i, _mm512_set1_epi8, _mm512_setzero_si512, _mm512_dpbusd_epi32)
QF_VNNI_PEAK(vnni_multiply_adds_256, __m256i, _mm256_set1_epi8, _mm256_setzero_si256, _mm256_dpbusd_epi32)
#undef QF_VNNI_PEAK

void BM_PeakInt8(benchmark::State& state) {
  if (!__builtin_cpu_supports("avx512vnni") || !__builtin_cpu_supports("avx512vl")) {
    state.SkipWithError("no AVX-512 VNNI");
    return;
  }
  constexpr int64_t kRounds = 1 << 20;
  const int bits = static_cast<int>(state.range(0));
  for (auto _ : state)
    benchmark::DoNotOptimize(bits == 512 ? vnni_multiply_adds_512(kRounds) : vnni_multiply_adds_256(kRounds));
  const double multiply_adds = static_cast<double>(state.iterations()) * kRounds * 12 * (bits / 8);
  state.counters["GOPS"] = benchmark::Counter(2 * multiply_adds / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PeakInt8)->Arg(512)->Arg(256)->UseRealTime()->Threads(1)->Threads(2);
#endif

}  // namespace
}  // namespace qf
