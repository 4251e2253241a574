// qf info: what a GGUF file holds: architecture, hyper-parameters, tensors, tokenizer.
#include <cstdio>
#include <map>
#include <memory>

#include "cli/commands.h"
#include "cli/common.h"
#include "gguf/gguf.h"
#include "model/model.h"
#include "util/error.h"

namespace qf::cli {

namespace {

struct InfoOptions {
  std::string path;
  bool all_metadata = false;
  bool tensors = false;
};

void info(const InfoOptions& o) {
  auto f = gguf::File::open(o.path);
  std::printf("file: %s (GGUF v%u, %.1f MiB, %zu tensors, %zu metadata keys, alignment %llu)\n", o.path.c_str(),
              f->version(), f->size() / 1048576.0, f->tensors().size(), f->metadata().size(),
              static_cast<unsigned long long>(f->alignment()));
  for (const auto& [key, value] : f->metadata()) {
    const bool tokenizer_array = key.rfind("tokenizer.ggml.", 0) == 0 && value.type == gguf::ValueType::ARRAY;
    if (!o.all_metadata && (tokenizer_array || key == "tokenizer.chat_template")) {
      if (value.type == gguf::ValueType::ARRAY)
        std::printf("  %-44s [%zu items]\n", key.c_str(), std::get<gguf::Array>(value.v).items.size());
      else
        std::printf("  %-44s (template, %zu chars)\n", key.c_str(), std::get<std::string>(value.v).size());
      continue;
    }
    std::printf("  %-44s %s\n", key.c_str(), gguf::to_string(value).c_str());
  }
  std::map<std::string, std::pair<int, double>> by_type;
  std::map<std::string, int> undecodable;
  for (const auto& t : f->tensors()) {
    const TypeInfo& ti = type_info(t.type);
    auto& e = by_type[std::string(ti.name)];
    ++e.first;
    e.second += t.nbytes;
    if (!ti.supported) ++undecodable[std::string(ti.name)];
  }
  std::printf("tensor types:");
  for (const auto& [name, e] : by_type) std::printf(" %s x%d (%.1f MiB)", name.c_str(), e.first, e.second / 1048576.0);
  std::printf("\n");
  if (!undecodable.empty()) {
    std::printf("tensor types qf cannot use as weights:");
    for (const auto& [name, n] : undecodable) std::printf(" %s x%d", name.c_str(), n);
    std::printf("\n");
  }
  if (o.tensors)
    for (const auto& t : f->tensors()) {
      std::string shape;
      for (size_t i = 0; i < t.ne.size(); ++i) shape += (i ? " x " : "") + std::to_string(t.ne[i]);
      std::printf("  %-32s %-5s [%s]\n", t.name.c_str(), std::string(type_info(t.type).name).c_str(), shape.c_str());
    }
  // Binding the model checks that the engine can run it, and names what it cannot.
  f.reset();
  try {
    auto m = Model::load(o.path);
    const ModelConfig& c = m->config();
    std::printf("model: %s | %d layers, n_embd %d, %d heads, %d KV heads, head_dim %d, n_ff %d, vocab %d, context %d, rope base %g, %s output\n",
                c.arch.c_str(), c.n_layers, c.n_embd, c.n_heads, c.n_kv_heads, c.head_dim, c.n_ff, c.n_vocab,
                c.n_ctx_train, c.rope_base, c.tied_output ? "tied" : "separate");
    std::printf("fingerprint: %s\n", c.fingerprint().c_str());
    const double kv_per_token = 2.0 * c.n_layers * c.n_kv_heads * c.head_dim * sizeof(float);
    std::printf("full KV cache: %.1f KiB per token, %.1f MiB at %d tokens (F32)\n", kv_per_token / 1024,
                kv_per_token * c.n_ctx_train / 1048576.0, c.n_ctx_train);
  } catch (const Error& e) {
    // Describing a file qf cannot run (another architecture, an unsupported weight type) is
    // still a successful `qf info`.
    std::printf("runnable: no (%s)\n", e.what());
  }
}

}  // namespace

void register_info(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* cmd = app.add_subcommand("info", "describe a GGUF model file");
  cmd->add_option("model", o->path, "GGUF file")->check(CLI::ExistingFile);
  cmd->add_option("-m,--model", o->path, "GGUF file (same as the positional argument)")->check(CLI::ExistingFile);
  cmd->add_flag("--all-metadata", o->all_metadata, "print tokenizer arrays and the chat template in full");
  cmd->add_flag("--tensors", o->tensors, "list every tensor");
  cmd->callback([o] {
    if (o->path.empty()) throw Error("qf info needs a model file");
    info(*o);
  });
}

}  // namespace qf::cli
