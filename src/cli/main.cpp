// qf: run, chat with, benchmark, calibrate and evaluate GGUF models with a compressed KV cache.
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"qf " QF_VERSION ": LLM inference on the CPU with a per-head compressed KV cache (Q-Filters)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "qf " QF_VERSION);
  qf::cli::register_run(app);
  qf::cli::register_chat(app);
  qf::cli::register_info(app);
  qf::cli::register_bench(app);
  qf::cli::register_calibrate(app);
  qf::cli::register_filters(app);
  qf::cli::register_eval(app);
  qf::cli::register_serve(app);
  try {
    std::vector<std::string> args = qf::cli::spell_out_llama_flags(argc, argv);
    std::vector<char*> arg_ptrs;
    for (std::string& a : args) arg_ptrs.push_back(a.data());
    app.parse(static_cast<int>(arg_ptrs.size()), arg_ptrs.data());
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
