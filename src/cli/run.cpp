// qf run: generate text from a prompt, streaming tokens as they come.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>

#include "cli/commands.h"
#include "cli/common.h"
#include "runtime/session_state.h"
#include "sample/sampler.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf::cli {

namespace {

struct RunOptions {
  ModelOptions model;
  KvOptions kv;
  SamplingFlags sampling;
  std::string prompt, prompt_file;
  int n_predict = 128;
  bool ignore_eos = false;
  bool no_display_prompt = false;
  std::string save_state, load_state;  // session state files (see register_run)
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read ", path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int run(const RunOptions& o) {
  if (o.prompt.empty() == o.prompt_file.empty()) fail("give the prompt with exactly one of -p TEXT or -f FILE");
  const std::string prompt = o.prompt_file.empty() ? o.prompt : read_file(o.prompt_file);
  Sampler sampler(o.sampling.resolve());  // checks the sampling flags before the model loads
  Engine e = make_engine(o.model, o.kv);
  Session& s = *e.session;
  const Tokenizer tok = Tokenizer::from_gguf(e.model->file());
  // A restored session continues its text: the prompt is appended, without a new BOS.
  std::vector<int32_t> history;
  if (!o.load_state.empty()) {
    history = runtime::load_state_file(o.load_state, s, runtime::model_fingerprint(*e.model)).tokens;
    std::fprintf(stderr, "state: restored %d positions (%lld cached tokens) from %s\n", s.n_past(),
                 static_cast<long long>(s.cache().tokens_held()), o.load_state.c_str());
  }
  const std::vector<int32_t> ids = tok.encode(prompt, /*add_special=*/o.load_state.empty(), /*parse_special=*/true);
  if (ids.empty()) fail("the prompt is empty after tokenization");
  if (s.n_past() + static_cast<int>(ids.size()) >= s.n_ctx())
    fail("prompt has ", ids.size(), " tokens", s.n_past() > 0 ? " after the restored ones" : "", ", the context holds ",
         s.n_ctx() - s.n_past(), " more (raise -c or shorten the prompt)");

  if (!o.no_display_prompt) {
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    std::fflush(stdout);
  }
  for (int32_t id : history) sampler.accept(id);  // the text so far counts for the repetition penalties
  for (int32_t id : ids) sampler.accept(id);
  StreamDecoder stream(tok);
  const auto t0 = std::chrono::steady_clock::now();
  std::span<const float> logits = s.prefill(ids);
  const double prompt_ms = ms_since(t0);
  if (!o.save_state.empty()) {  // after the prompt: "compress once, ask many"
    history.insert(history.end(), ids.begin(), ids.end());
    const size_t bytes = runtime::save_state_file(o.save_state, s, runtime::model_fingerprint(*e.model), history);
    std::fprintf(stderr, "state: saved %d positions (%lld cached tokens, %.2f MiB) to %s\n", s.n_past(),
                 static_cast<long long>(s.cache().tokens_held()), bytes / 1048576.0, o.save_state.c_str());
  }

  const auto t1 = std::chrono::steady_clock::now();
  int n_gen = 0;
  // -n -1: until end of text; with keep positions also the end of the context.
  const int64_t limit = o.n_predict >= 0 ? o.n_predict : s.positions() == PositionMode::shift ? INT64_MAX : s.n_ctx();
  while (n_gen < limit && s.has_room(1)) {
    const int32_t next = sampler.sample_and_accept(logits);
    ++n_gen;
    if (tok.is_eog(next) && !o.ignore_eos) break;
    const std::string text = stream.push(next);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    if (n_gen == limit || !s.has_room(1)) break;
    logits = s.decode(next);
  }
  const std::string rest = stream.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  std::printf("\n");
  const double gen_ms = ms_since(t1);
  std::fprintf(stderr, "\nprompt: %zu tokens in %.1f ms (%.1f tok/s) | generation: %d tokens in %.1f ms (%.1f tok/s) | %d threads, %s\n",
               ids.size(), prompt_ms, ids.size() * 1e3 / prompt_ms, n_gen, gen_ms,
               n_gen > 0 ? n_gen * 1e3 / gen_ms : 0.0, s.pool().size(), simd_description().c_str());
  std::fprintf(stderr, "%s\n", kv_summary(s).c_str());
  return 0;
}

}  // namespace

void register_run(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  CLI::App* cmd = app.add_subcommand("run", "generate text from a prompt");
  add_model_options(cmd, o->model);
  cmd->add_option("-p,--prompt", o->prompt, "prompt text (special tokens such as <|im_start|> are parsed)");
  cmd->add_option("-f,--file", o->prompt_file, "read the prompt from a file")->check(CLI::ExistingFile);
  cmd->add_option("-n,--n-predict", o->n_predict,
                  "tokens to generate (-1 = until end of text; with --kv-positions keep, or the end of the context)");
  add_sampling_options(cmd, o->sampling);
  cmd->add_flag("--ignore-eos", o->ignore_eos, "keep generating past end-of-text tokens");
  cmd->add_flag("--no-display-prompt", o->no_display_prompt, "do not echo the prompt");
  o->kv.positions = "shift";  // generation goes on past the context
  add_kv_options(cmd, o->kv);
  cmd->add_option("--save-state", o->save_state,
                  "after reading the prompt (before generating), save the session's compressed KV cache, position "
                  "and tokens to FILE");
  cmd->add_option("--load-state", o->load_state,
                  "continue from a state saved by --save-state (same model and KV options); the prompt is appended")
      ->check(CLI::ExistingFile);
  cmd->callback([o] { run(*o); });
}

}  // namespace qf::cli
