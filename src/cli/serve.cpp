// qf serve: an OpenAI-compatible HTTP server; every session keeps a per-head, bounded KV cache.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>

#include <pthread.h>

#include "cli/commands.h"
#include "cli/common.h"
#include "server/server.h"
#include "util/error.h"

namespace qf::cli {

namespace {

struct ServeOptions {
  ModelOptions model;
  KvOptions kv;
  SamplingFlags sampling;
  server::ServerOptions server;
  double kv_memory_mib = 0;
};

int serve(ServeOptions& o) {
  // SIGINT/SIGTERM are taken by one thread (blocked everywhere else, before any thread starts):
  // it drains the requests in flight and stops the server.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a client that hangs up must not end the process

  if (o.kv_memory_mib < 0) fail("--kv-memory must be >= 0");
  o.server.scheduler.kv_memory = static_cast<int64_t>(o.kv_memory_mib * 1024 * 1024);
  o.server.scheduler.kv = o.kv;
  o.server.sampling = o.sampling.options;
  if (!o.server.slot_save_path.empty()) {  // state files of /slots/{id}?action=save|restore
    std::error_code ec;
    std::filesystem::create_directories(o.server.slot_save_path, ec);
    if (!std::filesystem::is_directory(o.server.slot_save_path))
      fail("--slot-save-path ", o.server.slot_save_path, " is not a folder that can be created");
  }
  runtime::Engine engine(o.model);
  // A session with the server's KV settings must be possible at all: fail now, not per request.
  const int64_t per_session = engine.session_kv_bytes(o.kv);
  if (o.server.scheduler.kv_memory > 0 && per_session > o.server.scheduler.kv_memory)
    fail("one session needs ", per_session >> 20, " MiB of KV cache, more than --kv-memory ", o.kv_memory_mib, " MiB");
  server::Server srv(engine, o.server);
  const int port = srv.bind();
  if (port < 0) fail("cannot listen on ", o.server.host, ":", o.server.port);
  const std::string budget = o.kv.budget > 0 ? " budget " + std::to_string(o.kv.budget) : "";
  const std::string weights = o.kv.layer_weights.empty() ? "" : " layer weights " + o.kv.layer_weights;
  std::fprintf(stderr, "qf serve: http://%s:%d | %d slots, context %d, KV %s%s%s, %.1f MiB per session | %d threads, %s\n",
               o.server.host.c_str(), port, o.server.scheduler.n_slots, engine.n_ctx(), o.kv.policy.c_str(),
               budget.c_str(), weights.c_str(), per_session / 1048576.0,
               engine.pool().size(), simd_description().c_str());
  std::thread watcher([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "qf serve: %s, finishing the requests in flight\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    srv.stop();
  });
  srv.serve();
  // serve() can also return on its own (a listen error): wake the watcher so it can exit.
  pthread_kill(watcher.native_handle(), SIGTERM);
  watcher.join();
  std::fprintf(stderr, "qf serve: stopped\n");
  return 0;
}

}  // namespace

void register_serve(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server with per-session compressed KV caches");
  add_model_options(cmd, o->model);
  cmd->add_option("--host", o->server.host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", o->server.port, "port (0 = any free port)")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--parallel", o->server.scheduler.n_slots, "sessions generating at once (also -np)")
      ->capture_default_str()->check(CLI::Range(1, 1024));
  cmd->add_option("--max-queued", o->server.scheduler.max_queued, "requests waiting for a slot before 503")
      ->capture_default_str()->check(CLI::Range(0, 100000));
  cmd->add_option("--kv-memory", o->kv_memory_mib, "MiB all sessions' KV caches (and their policies' per-slot state) may reserve; past it new sessions get 503 (0 = no limit)")
      ->capture_default_str();
  cmd->add_option("-a,--alias", o->server.model_id, "model name clients use (default: the file name)");
  cmd->add_option("--slot-save-path", o->server.slot_save_path,
                  "folder for POST /slots/{id}?action=save|restore state files (created if missing; unset = off)");
  add_sampling_options(cmd, o->sampling);
  o->kv.positions = "shift";  // generations go on past the context (requests may say "keep")
  add_kv_options(cmd, o->kv);
  cmd->callback([o] { serve(*o); });
}

}  // namespace qf::cli
