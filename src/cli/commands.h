// Each qf subcommand lives in its own file and registers itself on the top-level app.
#pragma once
#include <CLI/CLI.hpp>

namespace qf::cli {

void register_run(CLI::App& app);
void register_chat(CLI::App& app);
void register_info(CLI::App& app);
void register_bench(CLI::App& app);
void register_calibrate(CLI::App& app);
void register_filters(CLI::App& app);
void register_eval(CLI::App& app);
void register_serve(CLI::App& app);

}  // namespace qf::cli
