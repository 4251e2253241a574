// llama_ref: a thin command-line shim over llama.cpp's C API (llama.h), the reference engine that
// qfilters is checked against. It produces the golden files in tests/golden/ and the llama.cpp side
// of scripts/bench_vs_llamacpp.py. Every subcommand prints exactly one JSON object on stdout;
// llama.cpp's own logging goes to stderr and is muted below errors unless -v is given.
//
//   llama_ref tokenize -m MODEL --text-file F [--no-special-parse] [--add-special]
//   llama_ref score    -m MODEL --tokens-file F.json [-c CTX] [-b BATCH] [-t THREADS] [--kv-f32]
//                      [--score-from N]   (logits only from position N on: long contexts)
//   llama_ref generate -m MODEL --prompt-tokens F.json -n N [--ignore-eos] [...]
//   llama_ref bench    -m MODEL -p 512 -n 128 [-t THREADS] [-r REPS] [-b BATCH] [...]
//
// Common options: --kv-f32 (F32 K/V cache instead of llama.cpp's default F16),
// --flash-attn on|off|auto (default auto, llama.cpp's default), --digits D (rounding of floats in
// score/generate output, default 5), -v (llama.cpp logs).
//
// Built by scripts/ref/build.sh; never part of the qfilters build or CI.

#include <dlfcn.h>
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "ggml-backend.h"
#include "llama.h"

namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

// ---------------------------------------------------------------------------------------------
// Command line

struct Options {
  std::string cmd;
  std::string model;
  std::string text_file;
  std::string tokens_file;
  bool parse_special = true;
  bool add_special = false;
  int n_ctx = 0;  // 0: per-command default
  int n_batch = 512;
  int threads = 0;  // 0: all hardware threads
  int n_predict = -1;
  int n_prompt = 512;
  int reps = 5;
  bool kv_f32 = false;
  std::string flash_attn = "auto";
  bool ignore_eos = false;
  int digits = 5;
  int score_from = 0;
  bool verbose = false;
};

const char* kUsage =
    "usage: llama_ref <tokenize|score|generate|bench> -m MODEL [options]\n"
    "  tokenize --text-file F [--no-special-parse] [--add-special]\n"
    "  score    --tokens-file F.json [-c CTX=4096] [-b BATCH=512] [-t THREADS]\n"
    "  generate --prompt-tokens F.json -n N [-c CTX=4096] [--ignore-eos]\n"
    "  bench    [-p 512] [-n 128] [-r 5] [-b 512] [-t THREADS]\n"
    "  common:  [--kv-f32] [--flash-attn on|off|auto] [--digits 5] [-v]\n";

int parse_int(const std::string& flag, const std::string& value, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno != 0 || v < lo || v > hi) {
    fail(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
         "], got '" + value + "'");
  }
  return static_cast<int>(v);
}

Options parse_args(int argc, char** argv) {
  if (argc < 2) fail(std::string("missing subcommand\n") + kUsage);
  Options o;
  o.cmd = argv[1];
  if (o.cmd == "-h" || o.cmd == "--help") {
    std::fputs(kUsage, stdout);
    std::exit(0);
  }
  if (o.cmd != "tokenize" && o.cmd != "score" && o.cmd != "generate" && o.cmd != "bench") {
    fail("unknown subcommand '" + o.cmd + "'\n" + kUsage);
  }
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "-m" || a == "--model") o.model = value();
    else if (a == "--text-file") o.text_file = value();
    else if (a == "--tokens-file" || a == "--prompt-tokens") o.tokens_file = value();
    else if (a == "--no-special-parse") o.parse_special = false;
    else if (a == "--add-special") o.add_special = true;
    else if (a == "-c" || a == "--ctx") o.n_ctx = parse_int(a, value(), 1, 1 << 20);
    else if (a == "-b" || a == "--batch") o.n_batch = parse_int(a, value(), 1, 1 << 16);
    else if (a == "-t" || a == "--threads") o.threads = parse_int(a, value(), 1, 1024);
    else if (a == "-n") o.n_predict = parse_int(a, value(), 0, 1 << 20);
    else if (a == "-p") o.n_prompt = parse_int(a, value(), 1, 1 << 20);
    else if (a == "-r" || a == "--reps") o.reps = parse_int(a, value(), 1, 10000);
    else if (a == "--kv-f32") o.kv_f32 = true;
    else if (a == "--flash-attn") {
      o.flash_attn = value();
      if (o.flash_attn != "on" && o.flash_attn != "off" && o.flash_attn != "auto") {
        fail("--flash-attn expects on, off or auto, got '" + o.flash_attn + "'");
      }
    } else if (a == "--ignore-eos") o.ignore_eos = true;
    else if (a == "--digits") o.digits = parse_int(a, value(), 0, 12);
    else if (a == "--score-from") o.score_from = parse_int(a, value(), 0, 1 << 20);
    else if (a == "-v" || a == "--verbose") o.verbose = true;
    else if (a == "--json") {}  // output is always JSON; accepted for symmetry with `qf bench`
    else fail("unknown option '" + a + "'\n" + kUsage);
  }
  if (o.model.empty()) fail("-m MODEL is required");
  if (o.cmd == "tokenize" && o.text_file.empty()) fail("tokenize needs --text-file");
  if ((o.cmd == "score" || o.cmd == "generate") && o.tokens_file.empty()) {
    fail(o.cmd + " needs " + (o.cmd == "score" ? "--tokens-file" : "--prompt-tokens"));
  }
  if (o.cmd == "generate" && o.n_predict < 0) fail("generate needs -n N");
  if (o.cmd == "bench" && o.n_predict < 0) o.n_predict = 128;
  if (o.threads == 0) o.threads = std::max(1u, std::thread::hardware_concurrency());
  return o;
}

// ---------------------------------------------------------------------------------------------
// llama.cpp setup

int g_log_min_level = GGML_LOG_LEVEL_ERROR;
int g_log_last_level = GGML_LOG_LEVEL_NONE;

void log_callback(ggml_log_level level, const char* text, void*) {
  // CONT lines continue the previous message and inherit its level.
  const int effective = level == GGML_LOG_LEVEL_CONT ? g_log_last_level : level;
  if (level != GGML_LOG_LEVEL_CONT) g_log_last_level = level;
  if (effective >= g_log_min_level) std::fputs(text, stderr);
}

// The CPU backend lives in per-microarchitecture plugins (libggml-cpu-<arch>.so) next to libllama;
// ggml picks the best one this CPU supports. Find that directory from where libllama was loaded.
std::string llama_lib_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&llama_backend_init), &info) == 0 || !info.dli_fname) {
    fail("cannot locate libllama on disk (dladdr failed)");
  }
  return std::filesystem::path(info.dli_fname).parent_path().string();
}

struct Backend {
  explicit Backend(bool verbose) {
    g_log_min_level = verbose ? GGML_LOG_LEVEL_DEBUG : GGML_LOG_LEVEL_ERROR;
    llama_log_set(log_callback, nullptr);
    const std::string dir = llama_lib_dir();
    ggml_backend_load_all_from_path(dir.c_str());
    llama_backend_init();
    bool have_cpu = false;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
      ggml_backend_dev_t dev = ggml_backend_dev_get(i);
      if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) have_cpu = true;
      devices.push_back(std::string(ggml_backend_dev_name(dev)) + " (" +
                        ggml_backend_dev_description(dev) + ")");
    }
    if (!have_cpu) fail("no CPU backend could be loaded from " + dir);
  }
  ~Backend() { llama_backend_free(); }
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;
  std::vector<std::string> devices;
};

struct ModelDeleter {
  void operator()(llama_model* m) const { llama_model_free(m); }
};
struct ContextDeleter {
  void operator()(llama_context* c) const { llama_free(c); }
};
using ModelPtr = std::unique_ptr<llama_model, ModelDeleter>;
using ContextPtr = std::unique_ptr<llama_context, ContextDeleter>;

ModelPtr load_model(const std::string& path, bool vocab_only) {
  if (!std::filesystem::is_regular_file(path)) fail("model file not found: " + path);
  llama_model_params mp = llama_model_default_params();
  mp.vocab_only = vocab_only;
  mp.n_gpu_layers = 0;
  ModelPtr model(llama_model_load_from_file(path.c_str(), mp));
  if (!model) fail("llama.cpp failed to load model " + path + " (run with -v for details)");
  return model;
}

llama_flash_attn_type flash_attn_type(const std::string& s) {
  if (s == "on") return LLAMA_FLASH_ATTN_TYPE_ENABLED;
  if (s == "off") return LLAMA_FLASH_ATTN_TYPE_DISABLED;
  return LLAMA_FLASH_ATTN_TYPE_AUTO;
}

ContextPtr make_context(llama_model* model, const Options& o, int n_ctx, int n_batch) {
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(n_ctx);
  cp.n_batch = static_cast<uint32_t>(n_batch);
  cp.n_ubatch = static_cast<uint32_t>(n_batch);  // one physical batch per llama_decode call
  cp.n_seq_max = 1;
  cp.n_threads = o.threads;
  cp.n_threads_batch = o.threads;
  cp.flash_attn_type = flash_attn_type(o.flash_attn);
  if (o.kv_f32) {
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
  }
  cp.no_perf = true;
  ContextPtr ctx(llama_init_from_model(model, cp));
  if (!ctx) fail("llama.cpp failed to create a context (run with -v for details)");
  if (llama_n_ctx(ctx.get()) < static_cast<uint32_t>(n_ctx)) {
    fail("llama.cpp gave a context of " + std::to_string(llama_n_ctx(ctx.get())) +
         " tokens, asked for " + std::to_string(n_ctx));
  }
  return ctx;
}

// llama_version() only says "0.5.0-dev"; the exact commit is baked into libllama-common's build
// info (a `const char* LLAMA_COMMIT` global), which the prebuilt set ships next to libllama.
std::string llama_commit() {
  const std::string lib = llama_lib_dir() + "/libllama-common.so";
  void* h = dlopen(lib.c_str(), RTLD_LAZY | RTLD_LOCAL);
  if (!h) return "unknown";
  std::string commit = "unknown";
  if (auto* p = static_cast<const char* const*>(dlsym(h, "LLAMA_COMMIT")); p && *p) commit = *p;
  dlclose(h);
  return commit;
}

// Header shared by every output: what produced it, with which settings.
json header(const Backend& be, const Options& o) {
  json h;
  h["tool"] = "llama_ref";
  h["command"] = o.cmd;
  h["llama_cpp_version"] = llama_version();
  h["llama_cpp_commit"] = llama_commit();
  h["devices"] = be.devices;
  h["system_info"] = llama_print_system_info();
  h["model"] = std::filesystem::path(o.model).filename().string();
  return h;
}

void add_context_settings(json& j, const Options& o, llama_context* ctx) {
  j["n_ctx"] = llama_n_ctx(ctx);
  j["n_batch"] = llama_n_batch(ctx);
  j["threads"] = o.threads;
  j["kv_type"] = o.kv_f32 ? "f32" : "f16";
  j["flash_attn"] = o.flash_attn;
}

// ---------------------------------------------------------------------------------------------
// Tokens in and out

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail("error reading " + path);
  return ss.str();
}

// Accepts a bare JSON array of ids or an object with a "tokens" array (e.g. tokenize's output).
std::vector<llama_token> read_tokens(const std::string& path, const llama_vocab* vocab) {
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::parse_error& e) {
    fail(path + ": not valid JSON (" + e.what() + ")");
  }
  if (j.is_object() && j.contains("tokens")) j = j["tokens"];
  if (!j.is_array()) fail(path + ": expected a JSON array of token ids or {\"tokens\": [...]}");
  const int n_vocab = llama_vocab_n_tokens(vocab);
  std::vector<llama_token> out;
  out.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    if (!j[i].is_number_integer()) fail(path + ": token " + std::to_string(i) + " is not an integer");
    const int64_t id = j[i].get<int64_t>();
    if (id < 0 || id >= n_vocab) {
      fail(path + ": token " + std::to_string(i) + " = " + std::to_string(id) +
           " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
    }
    out.push_back(static_cast<llama_token>(id));
  }
  if (out.empty()) fail(path + ": no tokens");
  return out;
}

std::vector<llama_token> tokenize(const llama_vocab* vocab, const std::string& text, bool add_special,
                                  bool parse_special) {
  if (text.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) fail("text too long");
  const int32_t len = static_cast<int32_t>(text.size());
  int32_t n = llama_tokenize(vocab, text.data(), len, nullptr, 0, add_special, parse_special);
  if (n == std::numeric_limits<int32_t>::min()) fail("tokenization overflow");
  std::vector<llama_token> toks(static_cast<size_t>(n < 0 ? -n : n));
  n = llama_tokenize(vocab, text.data(), len, toks.data(), static_cast<int32_t>(toks.size()),
                     add_special, parse_special);
  if (n < 0) fail("tokenization failed");
  toks.resize(static_cast<size_t>(n));
  return toks;
}

// Special tokens are rendered (e.g. "<|im_end|>") so the text shows exactly what was generated.
std::string detokenize(const llama_vocab* vocab, const std::vector<llama_token>& toks) {
  if (toks.empty()) return {};
  std::string out(toks.size() * 8 + 16, '\0');
  int32_t n = llama_detokenize(vocab, toks.data(), static_cast<int32_t>(toks.size()), out.data(),
                               static_cast<int32_t>(out.size()), false, true);
  if (n < 0) {
    out.resize(static_cast<size_t>(-n));
    n = llama_detokenize(vocab, toks.data(), static_cast<int32_t>(toks.size()), out.data(),
                         static_cast<int32_t>(out.size()), false, true);
    if (n < 0) fail("detokenization failed");
  }
  out.resize(static_cast<size_t>(n));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Logit helpers

double round_to(double x, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(x * scale) / scale;
}

// Lowest id wins ties, so the choice is deterministic and easy to mirror in a test.
int argmax(const float* logits, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

std::vector<int> top_k(const float* logits, int n, int k) {
  std::vector<int> idx(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = i;
  k = std::min(k, n);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int a, int b) {
    return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
  });
  idx.resize(static_cast<size_t>(k));
  return idx;
}

// log(sum(exp(logits))) in double, stable.
double log_sum_exp(const float* logits, int n) {
  float mx = logits[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, logits[i]);
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += std::exp(static_cast<double>(logits[i]) - mx);
  return mx + std::log(s);
}

void check_finite(const float* logits, int n, size_t pos) {
  for (int i = 0; i < n; ++i) {
    if (!std::isfinite(logits[i])) fail("non-finite logit at position " + std::to_string(pos));
  }
}

const float* last_logits(llama_context* ctx) {
  const float* row = llama_get_logits_ith(ctx, -1);
  if (!row) fail("llama.cpp returned no logits for the last token");
  return row;
}

// Feeds tokens [begin, end) at positions begin.. in batches of n_batch. When all_logits is set,
// on_row(pos, logits) is called for every position; otherwise only the last position has logits.
template <typename OnRow>
// all_logits: on_row for every position from logits_from on (only the last one's are computed
// otherwise).
void decode_range(llama_context* ctx, const std::vector<llama_token>& toks, size_t begin, size_t end,
                  int n_batch, bool all_logits, OnRow on_row, size_t logits_from = 0) {
  llama_batch batch = llama_batch_init(n_batch, 0, 1);
  struct BatchFree {
    llama_batch& b;
    ~BatchFree() { llama_batch_free(b); }
  } guard{batch};
  for (size_t start = begin; start < end; start += static_cast<size_t>(n_batch)) {
    const int m = static_cast<int>(std::min(static_cast<size_t>(n_batch), end - start));
    batch.n_tokens = m;
    for (int j = 0; j < m; ++j) {
      batch.token[j] = toks[start + static_cast<size_t>(j)];
      batch.pos[j] = static_cast<llama_pos>(start + static_cast<size_t>(j));
      batch.n_seq_id[j] = 1;
      batch.seq_id[j][0] = 0;
      const size_t pos = start + static_cast<size_t>(j);
      batch.logits[j] = (all_logits && pos >= logits_from) || pos + 1 == end;
    }
    const int32_t rc = llama_decode(ctx, batch);
    if (rc != 0) fail("llama_decode failed with code " + std::to_string(rc) + " at position " +
                      std::to_string(start));
    if (all_logits) {
      for (int j = 0; j < m; ++j)
        if (start + static_cast<size_t>(j) >= logits_from) on_row(start + static_cast<size_t>(j), llama_get_logits_ith(ctx, j));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Subcommands

json cmd_tokenize(const Backend& be, const Options& o) {
  ModelPtr model = load_model(o.model, /*vocab_only=*/true);
  const llama_vocab* vocab = llama_model_get_vocab(model.get());
  const std::string text = read_file(o.text_file);
  const std::vector<llama_token> toks = tokenize(vocab, text, o.add_special, o.parse_special);
  json j = header(be, o);
  j["text_file"] = std::filesystem::path(o.text_file).filename().string();
  j["text_bytes"] = text.size();
  j["add_special"] = o.add_special;
  j["parse_special"] = o.parse_special;
  j["n_tokens"] = toks.size();
  j["tokens"] = toks;
  return j;
}

json cmd_score(const Backend& be, const Options& o) {
  ModelPtr model = load_model(o.model, false);
  const llama_vocab* vocab = llama_model_get_vocab(model.get());
  const std::vector<llama_token> toks = read_tokens(o.tokens_file, vocab);
  const int n_ctx = o.n_ctx > 0 ? o.n_ctx : 4096;
  if (toks.size() > static_cast<size_t>(n_ctx)) {
    fail(std::to_string(toks.size()) + " tokens do not fit a context of " + std::to_string(n_ctx));
  }
  ContextPtr ctx = make_context(model.get(), o, n_ctx, o.n_batch);
  const int n_vocab = llama_vocab_n_tokens(vocab);
  const size_t n = toks.size();
  const size_t from = static_cast<size_t>(o.score_from);
  if (from >= n) fail("--score-from " + std::to_string(from) + " leaves no position of " + std::to_string(n));

  // Indexed by position - from.
  std::vector<int> am(n - from);
  std::vector<std::vector<int>> top_ids(n - from);
  std::vector<std::vector<double>> top_logits(n - from);
  std::vector<double> target_lp(n - 1 - std::min(from, n - 1));
  std::vector<double> lse(n - from);
  double nll = 0.0;
  decode_range(ctx.get(), toks, 0, n, static_cast<int>(llama_n_batch(ctx.get())), true, [&](size_t pos, const float* row) {
    if (!row) fail("llama.cpp returned no logits for position " + std::to_string(pos));
    check_finite(row, n_vocab, pos);
    const size_t i = pos - from;
    am[i] = argmax(row, n_vocab);
    top_ids[i] = top_k(row, n_vocab, 5);
    for (int id : top_ids[i]) top_logits[i].push_back(round_to(row[id], o.digits));
    lse[i] = log_sum_exp(row, n_vocab);
    if (pos + 1 < n) {
      const double lp = static_cast<double>(row[toks[pos + 1]]) - lse[i];
      nll -= lp;
      target_lp[i] = round_to(lp, o.digits);
    }
    lse[i] = round_to(lse[i], o.digits);
  }, from);
  const size_t n_pred = n - 1 - std::min(from, n - 1);
  const double mean_nll = n_pred > 0 ? nll / static_cast<double>(n_pred) : 0.0;

  json j = header(be, o);
  add_context_settings(j, o, ctx.get());
  j["n_tokens"] = n;
  j["tokens"] = toks;
  j["description"] =
      "teacher-forced pass over `tokens` (positions 0..n-1, no BOS added). For each position i: "
      "argmax[i] and top5 (ids, logits; ties -> lower id) of the next-token logits, "
      "logsumexp[i] of those logits; target_logprob[i] = log p(tokens[i+1] | tokens[..i]) for "
      "i < n-1. perplexity = exp(mean_nll) over the n-1 predictions. With score_from = s > 0 the "
      "arrays start at position s and the perplexity covers the predictions from s on.";
  j["score_from"] = from;
  j["argmax"] = am;
  j["target_logprob"] = target_lp;
  j["logsumexp"] = lse;
  j["top5_ids"] = top_ids;
  j["top5_logits"] = top_logits;
  j["mean_nll"] = round_to(mean_nll, 8);
  j["perplexity"] = round_to(std::exp(mean_nll), 6);
  j["digits"] = o.digits;
  return j;
}

json cmd_generate(const Backend& be, const Options& o) {
  ModelPtr model = load_model(o.model, false);
  const llama_vocab* vocab = llama_model_get_vocab(model.get());
  const std::vector<llama_token> prompt = read_tokens(o.tokens_file, vocab);
  const int n_ctx = o.n_ctx > 0 ? o.n_ctx : 4096;
  if (prompt.size() + static_cast<size_t>(o.n_predict) > static_cast<size_t>(n_ctx)) {
    fail("prompt (" + std::to_string(prompt.size()) + ") + n (" + std::to_string(o.n_predict) +
         ") exceeds the context of " + std::to_string(n_ctx));
  }
  ContextPtr ctx = make_context(model.get(), o, n_ctx, o.n_batch);
  const int n_vocab = llama_vocab_n_tokens(vocab);

  std::vector<llama_token> seq = prompt;
  std::vector<llama_token> out;
  std::vector<double> margins;  // top1 - top2 logit per step: small margins mark fragile steps
  std::string stop = "length";
  decode_range(ctx.get(), seq, 0, seq.size(), static_cast<int>(llama_n_batch(ctx.get())), false,
               [](size_t, const float*) {});
  for (int step = 0; step < o.n_predict; ++step) {
    const float* row = last_logits(ctx.get());
    check_finite(row, n_vocab, seq.size() - 1);
    const std::vector<int> top2 = top_k(row, n_vocab, 2);
    const llama_token next = top2[0];
    margins.push_back(round_to(static_cast<double>(row[top2[0]]) - row[top2[1]], o.digits));
    out.push_back(next);
    seq.push_back(next);
    if (!o.ignore_eos && llama_vocab_is_eog(vocab, next)) {
      stop = "eog";
      break;
    }
    if (step + 1 < o.n_predict) {
      decode_range(ctx.get(), seq, seq.size() - 1, seq.size(), 1, false, [](size_t, const float*) {});
    }
  }

  json j = header(be, o);
  add_context_settings(j, o, ctx.get());
  j["description"] =
      "greedy continuation: tokens[k] = argmax (ties -> lower id) of the logits after "
      "prompt_tokens + tokens[..k]; margins[k] = top1 - top2 logit at that step; stops at an "
      "end-of-generation token (included) unless --ignore-eos. text renders special tokens.";
  j["n_predict"] = o.n_predict;
  j["ignore_eos"] = o.ignore_eos;
  j["prompt_tokens"] = prompt;
  j["prompt_text"] = detokenize(vocab, prompt);
  j["tokens"] = out;
  j["margins"] = margins;
  j["stop"] = stop;
  j["text"] = detokenize(vocab, out);
  return j;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// llama-bench style: pp = one P-token prompt in a single batch (logits for the last token only);
// tg = N single-token greedy steps on top of that P-token context (i.e. tg at depth P).
json cmd_bench(const Backend& be, const Options& o) {
  ModelPtr model = load_model(o.model, false);
  const llama_vocab* vocab = llama_model_get_vocab(model.get());
  const int n_vocab = llama_vocab_n_tokens(vocab);
  const int n_ctx = o.n_ctx > 0 ? o.n_ctx : o.n_prompt + o.n_predict;
  ContextPtr ctx = make_context(model.get(), o, n_ctx, o.n_batch);
  llama_memory_t mem = llama_get_memory(ctx.get());
  const int n_batch = static_cast<int>(llama_n_batch(ctx.get()));

  // Content does not change the cost; fixed pseudo-random ids keep runs comparable.
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> dist(0, n_vocab - 1);
  std::vector<llama_token> prompt(static_cast<size_t>(o.n_prompt));
  for (auto& t : prompt) t = dist(rng);

  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  // Process CPU time alongside wall time: with -t 1 on a machine shared with other jobs, tokens per
  // CPU second approximates the idle-machine speed. (With more threads it counts spin-waiting.)
  auto cpu_seconds = [] {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  struct Times {
    double pp_wall = 0, tg_wall = 0, pp_cpu = 0, tg_cpu = 0;
  };
  auto run_once = [&](int n_prompt, int n_gen) {
    llama_memory_clear(mem, false);
    std::vector<llama_token> seq(prompt.begin(), prompt.begin() + n_prompt);
    Times t;
    const double c0 = cpu_seconds();
    const auto t0 = clock::now();
    decode_range(ctx.get(), seq, 0, seq.size(), n_batch, false, [](size_t, const float*) {});
    llama_synchronize(ctx.get());
    const auto t1 = clock::now();
    const double c1 = cpu_seconds();
    for (int i = 0; i < n_gen; ++i) {
      seq.push_back(argmax(last_logits(ctx.get()), n_vocab));
      decode_range(ctx.get(), seq, seq.size() - 1, seq.size(), 1, false, [](size_t, const float*) {});
    }
    llama_synchronize(ctx.get());
    const auto t2 = clock::now();
    const double c2 = cpu_seconds();
    t.pp_wall = seconds(t0, t1);
    t.tg_wall = seconds(t1, t2);
    t.pp_cpu = c1 - c0;
    t.tg_cpu = c2 - c1;
    return t;
  };

  run_once(std::min(o.n_prompt, 32), std::min(o.n_predict, 4));  // warm-up
  std::vector<double> pp_runs, tg_runs, pp_cpu_runs, tg_cpu_runs;
  for (int r = 0; r < o.reps; ++r) {
    const Times t = run_once(o.n_prompt, o.n_predict);
    pp_runs.push_back(o.n_prompt / t.pp_wall);
    pp_cpu_runs.push_back(o.n_prompt / t.pp_cpu);
    tg_runs.push_back(o.n_predict > 0 ? o.n_predict / t.tg_wall : 0.0);
    tg_cpu_runs.push_back(o.n_predict > 0 ? o.n_predict / t.tg_cpu : 0.0);
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);

  json j = header(be, o);
  j["engine"] = "llama.cpp";
  add_context_settings(j, o, ctx.get());
  j["prompt_tokens"] = o.n_prompt;
  j["gen_tokens"] = o.n_predict;
  j["reps"] = o.reps;
  j["prefill_tok_s"] = median(pp_runs);
  j["decode_tok_s"] = median(tg_runs);
  j["prefill_runs"] = pp_runs;
  j["decode_runs"] = tg_runs;
  j["prefill_tok_per_cpu_s"] = median(pp_cpu_runs);
  j["decode_tok_per_cpu_s"] = median(tg_cpu_runs);
  j["peak_rss_mb"] = static_cast<double>(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse_args(argc, argv);
    Backend be(o.verbose);
    json out;
    if (o.cmd == "tokenize") out = cmd_tokenize(be, o);
    else if (o.cmd == "score") out = cmd_score(be, o);
    else if (o.cmd == "generate") out = cmd_generate(be, o);
    else out = cmd_bench(be, o);
    // Token text can end mid UTF-8 sequence; replace rather than throw.
    std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    std::cout.flush();
    if (!std::cout) {
      std::fprintf(stderr, "llama_ref: error: writing output failed\n");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llama_ref: error: %s\n", e.what());
    return 1;
  }
}
