// Tokenizer speed on the State of the Union corpus (data/sotu, ~11 MB), run from the repository
// root:
//
//   BM_EncodeCorpus/<model>: encode every address (parse_special = true, as the tests do);
//     model 0 = SmolLM2 (byte-level BPE, 49k vocabulary), 1 = Gemma 3 (SentencePiece, 262k).
//     Reports bytes/s and tokens/s.
//   BM_LoadVocabulary/<model>: Tokenizer::from_gguf on the file's metadata.
//
// Files missing: the benchmark reports an error and is skipped.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "tokenizer/tokenizer.h"

namespace {

using namespace qf;

const char* const kModels[] = {"models/SmolLM2-135M-Instruct.Q4_1.gguf", "models/gemma-3-270m-q4_k_m.gguf"};

const std::vector<std::string>& corpus() {
  static const std::vector<std::string> docs = [] {
    std::vector<std::filesystem::path> paths;
    if (std::filesystem::is_directory("data/sotu"))
      for (const auto& e : std::filesystem::directory_iterator("data/sotu"))
        if (e.path().extension() == ".txt") paths.push_back(e.path());
    std::sort(paths.begin(), paths.end());
    std::vector<std::string> out;
    for (const auto& p : paths) {
      std::ifstream in(p, std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      out.push_back(ss.str());
    }
    return out;
  }();
  return docs;
}

std::unique_ptr<gguf::File> open_model(benchmark::State& state) {
  const char* path = kModels[state.range(0)];
  if (!std::filesystem::exists(path)) {
    state.SkipWithError((std::string(path) + " missing").c_str());
    return nullptr;
  }
  return gguf::File::open(path);
}

void BM_EncodeCorpus(benchmark::State& state) {
  const auto file = open_model(state);
  if (!file) return;
  if (corpus().empty()) {
    state.SkipWithError("data/sotu missing: run scripts/fetch_text.sh");
    return;
  }
  const Tokenizer tok = Tokenizer::from_gguf(*file);
  size_t bytes = 0, tokens = 0;
  for (auto _ : state) {
    for (const std::string& doc : corpus()) {
      const std::vector<int32_t> ids = tok.encode(doc, false, true);
      benchmark::DoNotOptimize(ids.data());
      bytes += doc.size();
      tokens += ids.size();
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EncodeCorpus)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->Iterations(1);

void BM_LoadVocabulary(benchmark::State& state) {
  const auto file = open_model(state);
  if (!file) return;
  for (auto _ : state) benchmark::DoNotOptimize(Tokenizer::from_gguf(*file).n_vocab());
}
BENCHMARK(BM_LoadVocabulary)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);

}  // namespace
