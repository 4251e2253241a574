// qf serve: the HTTP front of the scheduler, with llama.cpp's and OpenAI's endpoints:
//   POST /v1/chat/completions, /v1/completions (and the same without /v1), streaming as
//        server-sent events or not
//   GET  /v1/models, /health, /metrics (Prometheus text), /slots
//   POST /tokenize, /detokenize, /apply-template, /slots/{id}?action=save|restore|erase
// Errors are OpenAI-style bodies with the right status; a bad request never disturbs the others.
#pragma once
#include <memory>
#include <string>

#include "runtime/engine.h"
#include "sample/sampler.h"
#include "server/scheduler.h"

namespace qf::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string model_id;  // name reported by /v1/models and accepted in "model" ("" = file name)
  std::string slot_save_path;  // folder of /slots/{id}?action=save|restore files ("" = actions off)
  SamplerOptions sampling;  // defaults for requests that do not say
  SchedulerOptions scheduler;
  int http_threads = 0;  // 0 = enough for every slot and queued request to stream at once
};

class Server {
 public:
  Server(runtime::Engine& engine, ServerOptions options);
  ~Server();

  // Binds and serves until stop(); false if the address could not be bound.
  bool listen();
  // Binds to options().port (0 = any free port) and returns the port; then call serve().
  int bind();
  void serve();
  // Refuses new requests, lets the ones in flight finish (up to `drain_ms`), then stops.
  void stop(int drain_ms = 30000);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qf::server
