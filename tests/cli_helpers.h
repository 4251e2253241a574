// Running the qf binary from a test: its exit, signal and captured output, and the check that a
// failure is clean (one short message, a non-zero exit, never a crash).
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>

#include "test_paths.h"

namespace qf::test {

struct CliResult {
  int exit_code = -1;  // -1 if killed by a signal
  int signal = 0;
  std::string out, err;
};

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// This process's scratch directory, removed at exit: ctest runs every test in its own process,
// several at a time, so each needs its own files.
inline const std::filesystem::path& process_temp_dir() {
  struct Dir {
    std::filesystem::path path =
        std::filesystem::temp_directory_path() / ("qf_cli_" + std::to_string(::getpid()));
    Dir() { std::filesystem::create_directories(path); }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

// process_temp_dir()/name, as a string for command lines.
inline std::string temp_file(const std::string& name) { return (process_temp_dir() / name).string(); }

// Runs `ENV qf ARGS` (env: VAR=value ... or empty) with stdin from /dev/null.
inline CliResult run_qf(const std::string& args, const std::string& env = "") {
  const std::string out = temp_file("stdout.txt"), err = temp_file("stderr.txt");
  const std::string cmd = env + " " + qf_binary() + " " + args + " </dev/null >" + out + " 2>" + err;
  const int status = std::system(cmd.c_str());
  CliResult r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

// A clean failure: exit code 1 or 2 (CLI11 parse errors), no signal, a short message that names
// must_mention.
inline void expect_clean_failure(const CliResult& r, const std::string& must_mention) {
  EXPECT_EQ(r.signal, 0) << "crashed with signal " << r.signal << "; stderr: " << r.err;
  EXPECT_GT(r.exit_code, 0) << "stderr: " << r.err;
  EXPECT_LT(r.exit_code, 128);
  EXPECT_NE(r.err.find(must_mention), std::string::npos) << "stderr was: " << r.err;
  EXPECT_LT(r.err.size(), 600u) << "error output should be short: " << r.err;
  EXPECT_EQ(r.err.find("terminate called"), std::string::npos);
}

}  // namespace qf::test
