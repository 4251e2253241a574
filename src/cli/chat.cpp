// qf chat: an interactive conversation using the model's chat template. Each turn feeds only
// the tokens the cache does not hold yet; the bounded KV cache keeps memory flat however long
// the conversation runs.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <unistd.h>
#include <string>

#include "cli/commands.h"
#include "cli/common.h"
#include "sample/sampler.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf::cli {

namespace {

struct ChatOptions {
  ModelOptions model;
  KvOptions kv;
  SamplingFlags sampling;
  std::string system;
  int n_predict = 512;
};

int chat(const ChatOptions& o) {
  Sampler sampler(o.sampling.resolve());  // checks the sampling flags before the model loads
  Engine e = make_engine(o.model, o.kv);
  Session& s = *e.session;
  const Tokenizer tok = Tokenizer::from_gguf(e.model->file());
  const ChatTemplate tmpl = ChatTemplate::from_tokenizer(tok);
  std::vector<ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  std::vector<int32_t> fed;  // tokens the session has processed, in order
  const bool interactive = isatty(0);
  std::fprintf(stderr, "qf chat: %s | type a message, an empty line or Ctrl-D ends\n", e.model->config().name.c_str());
  std::string line;
  for (;;) {
    if (interactive) std::fprintf(stderr, "\n> ");
    if (!std::getline(std::cin, line) || line.empty()) break;
    messages.push_back({"user", line});
    const std::vector<int32_t> all = tok.encode(tmpl.apply(messages, true), true, true);
    // Feed what follows the part already in the cache; if the history was tokenized differently
    // from how it was generated, start over (a compressed cache cannot be rewound).
    size_t common = 0;
    while (common < fed.size() && common < all.size() && fed[common] == all[common]) ++common;
    if (common < fed.size()) {
      s.reset();
      fed.clear();
      common = 0;
    }
    const std::vector<int32_t> fresh(all.begin() + static_cast<std::ptrdiff_t>(common), all.end());
    if (!s.has_room(static_cast<int64_t>(fresh.size()) + 1))
      fail("the conversation no longer fits the context (-c ", s.n_ctx(), "; --kv-positions shift goes on)");
    std::span<const float> logits = fed.empty() ? s.prefill(fresh) : s.eval(fresh);
    fed.insert(fed.end(), fresh.begin(), fresh.end());
    if (common == 0) sampler.reset_history();
    for (int32_t id : fresh) sampler.accept(id);

    StreamDecoder stream(tok, /*render_special=*/false);
    std::vector<int32_t> reply;
    const auto t0 = std::chrono::steady_clock::now();
    while (static_cast<int>(reply.size()) < o.n_predict && s.has_room(1)) {
      const int32_t next = sampler.sample_and_accept(logits);
      if (tok.is_eog(next)) break;
      reply.push_back(next);
      const std::string text = stream.push(next);
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
      logits = s.decode(next);
      fed.push_back(next);
    }
    const std::string rest = stream.flush();
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::printf("\n");
    std::fflush(stdout);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "[%zu tokens, %.1f tok/s | %s]\n", reply.size(), reply.size() / std::max(secs, 1e-9),
                 kv_summary(s).c_str());
    messages.push_back({"assistant", tok.decode(reply, /*render_special=*/false)});
  }
  return 0;
}

}  // namespace

void register_chat(CLI::App& app) {
  auto o = std::make_shared<ChatOptions>();
  CLI::App* cmd = app.add_subcommand("chat", "chat interactively (reads messages from stdin)");
  add_model_options(cmd, o->model);
  cmd->add_option("--system", o->system, "system message (default: the template's own)");
  cmd->add_option("-n,--n-predict", o->n_predict, "longest reply in tokens");
  add_sampling_options(cmd, o->sampling);
  o->kv.positions = "shift";  // a conversation goes on past the context
  add_kv_options(cmd, o->kv);
  cmd->callback([o] { chat(*o); });
}

}  // namespace qf::cli
