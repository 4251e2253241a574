#include "server/server.h"

#include <httplib.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <sstream>

#include <sys/socket.h>

#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace qf::server {

namespace {

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void send_error(httplib::Response& res, const HttpError& e) { send_json(res, e.status, error_body(e)); }

// Errors cpp-httplib raises before a handler runs. Debian's cpp-httplib is a compiled library
// that caps bodies labelled application/x-www-form-urlencoded (what `curl -d` sends) at 8 KiB,
// so a long prompt sent that way is refused; say how to send it instead.
std::string transport_error_message(const httplib::Request& req, int status) {
  if (status == 404) return "no such endpoint";
  if (status != 413) return "bad request";
  if (req.get_header_value("Content-Type").starts_with("application/x-www-form-urlencoded"))
    return "the request body is too large for Content-Type application/x-www-form-urlencoded (8 KiB, the "
           "default of curl -d): send it with Content-Type: application/json";
  return "the request body is too large";
}

json parse_body(const httplib::Request& req) { return parse_json_body(req.body); }

std::string sse(const json& j) { return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n"; }

}  // namespace

struct Server::Impl {
  Impl(runtime::Engine& e, ServerOptions o)
      : engine(e), opt(std::move(o)), tok(Tokenizer::from_gguf(e.model().file())), sched(e, tok, opt.scheduler) {
    if (opt.model_id.empty()) opt.model_id = std::filesystem::path(e.options().model).filename().string();
    try {
      tmpl.emplace(ChatTemplate::from_tokenizer(tok));
    } catch (const Error&) {
      // No chat template this engine knows: /v1/chat/completions answers 400, the rest works.
    }
    routes();
  }

  runtime::Engine& engine;
  ServerOptions opt;
  Tokenizer tok;
  std::optional<ChatTemplate> tmpl;
  Scheduler sched;
  httplib::Server http;
  std::atomic<int64_t> next_id{1};

  // Every handler: HttpError -> its status, an engine error -> 400, anything else -> 500.
  template <class Fn>
  auto guarded(Fn fn) {
    return [this, fn](const httplib::Request& req, httplib::Response& res) {
      try {
        fn(req, res);
      } catch (const HttpError& e) {
        send_error(res, e);
      } catch (const Error& e) {
        send_error(res, HttpError(400, e.what()));
      } catch (const std::exception& e) {
        send_error(res, HttpError(500, e.what(), "server_error"));
      }
    };
  }

  void routes() {
    http.Get("/health", guarded([this](const httplib::Request&, httplib::Response& res) {
      if (sched.draining()) throw HttpError(503, "the server is shutting down", "server_error");
      send_json(res, 200, {{"status", "ok"}});
    }));
    http.Get("/v1/models", guarded([this](const httplib::Request&, httplib::Response& res) { models(res); }));
    http.Get("/models", guarded([this](const httplib::Request&, httplib::Response& res) { models(res); }));
    for (const char* path : {"/v1/chat/completions", "/chat/completions"})
      http.Post(path, guarded([this](const httplib::Request& req, httplib::Response& res) { completion(req, res, true); }));
    for (const char* path : {"/v1/completions", "/completions"})
      http.Post(path, guarded([this](const httplib::Request& req, httplib::Response& res) { completion(req, res, false); }));
    http.Post("/apply-template", guarded([this](const httplib::Request& req, httplib::Response& res) { apply_template(req, res); }));
    http.Post("/tokenize", guarded([this](const httplib::Request& req, httplib::Response& res) { tokenize(req, res); }));
    http.Post("/detokenize", guarded([this](const httplib::Request& req, httplib::Response& res) { detokenize(req, res); }));
    http.Get("/metrics", guarded([this](const httplib::Request&, httplib::Response& res) { metrics(res); }));
    http.Get("/slots", guarded([this](const httplib::Request&, httplib::Response& res) { send_json(res, 200, sched.slots_json()); }));
    http.Post(R"(/slots/(\d+))", guarded([this](const httplib::Request& req, httplib::Response& res) { slot_action(req, res); }));
    http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (res.body.empty()) send_error(res, HttpError(res.status, transport_error_message(req, res.status)));
    });
    http.set_payload_max_length(32u << 20);
    const int threads = opt.http_threads > 0 ? opt.http_threads : opt.scheduler.n_slots + opt.scheduler.max_queued + 4;
    http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  }

  void models(httplib::Response& res) {
    const ModelConfig& c = engine.model().config();
    json meta = {{"n_ctx", engine.n_ctx()},         {"n_ctx_train", c.n_ctx_train}, {"n_vocab", c.n_vocab},
                 {"n_layers", c.n_layers},          {"kv_policy", opt.scheduler.kv.policy},
                 {"kv_budget", opt.scheduler.kv.budget}, {"slots", opt.scheduler.n_slots}};
    send_json(res, 200, {{"object", "list"},
                         {"data", json::array({{{"id", opt.model_id},
                                                {"object", "model"},
                                                {"created", unix_now()},
                                                {"owned_by", "qfilters"},
                                                {"meta", meta}}})}});
  }

  void completion(const httplib::Request& req, httplib::Response& res, bool chat) {
    CompletionRequest r = parse_completion(parse_body(req), chat, opt.sampling, opt.scheduler.kv);
    if (!r.model.empty() && r.model != opt.model_id)
      throw HttpError(404, "the model '" + r.model + "' does not exist (this server runs '" + opt.model_id + "')",
                      "invalid_request_error", "model");
    r.model = opt.model_id;
    std::vector<int32_t> ids = prompt_tokens(r, tok, tmpl ? &*tmpl : nullptr, engine.n_ctx());
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id++);
    const int64_t created = unix_now();
    std::shared_ptr<Job> job = sched.submit(r, std::move(ids));

    // Wait for the scheduler to admit the request (or refuse it) before answering the headers.
    std::optional<Event> first;
    while (!(first = job->next(std::chrono::milliseconds(500)))) {}
    if (first->kind == Event::Kind::kError) throw *first->error;

    if (!r.stream) {
      std::string text;
      for (;;) {
        std::optional<Event> e = job->next(std::chrono::milliseconds(500));
        if (!e) continue;
        if (e->kind == Event::Kind::kError) throw *e->error;
        if (e->kind == Event::Kind::kText) text += e->text;
        if (e->kind == Event::Kind::kDone) {
          send_json(res, 200, completion_response(r, id, created, text, e->finish, e->usage, json::object()));
          return;
        }
      }
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [job, r, id, created, first_chunk = true](size_t, httplib::DataSink& sink) mutable {
          auto write = [&](const std::string& s) {
            if (!sink.write(s.data(), s.size())) {
              job->cancelled = true;
              return false;
            }
            return true;
          };
          for (;;) {
            std::optional<Event> e = job->next(std::chrono::milliseconds(200));
            if (!e) {
              if (!sink.is_writable()) {
                job->cancelled = true;
                return false;
              }
              continue;
            }
            if (e->kind == Event::Kind::kError) {
              write(sse(error_body(*e->error)));
              sink.done();
              return true;
            }
            if (e->kind == Event::Kind::kText) {
              if (!write(sse(completion_chunk(r, id, created, e->text, std::nullopt, first_chunk)))) return false;
              first_chunk = false;
              continue;
            }
            if (!write(sse(completion_chunk(r, id, created, "", e->finish, first_chunk)))) return false;
            if (r.include_usage) {
              json u = completion_chunk(r, id, created, "", std::nullopt, false);
              u["choices"] = json::array();
              u["usage"] = usage_json(e->usage);
              if (!write(sse(u))) return false;
            }
            write("data: [DONE]\n\n");
            sink.done();
            return true;
          }
        },
        [job](bool success) {
          if (!success) job->cancelled = true;
        });
  }

  // llama.cpp's /apply-template: the prompt a chat request would be given, as text.
  void apply_template(const httplib::Request& req, httplib::Response& res) {
    const CompletionRequest r = parse_completion(parse_body(req), /*chat=*/true, opt.sampling, opt.scheduler.kv);
    if (!tmpl) throw HttpError(400, "this model has no chat template the server knows");
    send_json(res, 200, {{"prompt", tmpl->apply(r.messages, /*add_generation_prompt=*/true)}});
  }

  void tokenize(const httplib::Request& req, httplib::Response& res) {
    const TokenizeRequest t = parse_tokenize(parse_body(req));
    const std::vector<int32_t> ids = tok.encode(t.content, t.add_special, t.parse_special);
    json tokens = json::array();
    for (int32_t id : ids) {
      if (t.with_pieces) tokens.push_back({{"id", id}, {"piece", tok.token_bytes(id)}});
      else tokens.push_back(id);
    }
    send_json(res, 200, {{"tokens", tokens}});
  }

  void detokenize(const httplib::Request& req, httplib::Response& res) {
    const std::vector<int32_t> ids = parse_detokenize(parse_body(req), tok.n_vocab());
    send_json(res, 200, {{"content", tok.decode(ids, /*render_special=*/true)}});
  }

  // llama.cpp's slot actions: erase, and save / restore with {"filename": NAME} in the body, the
  // file inside --slot-save-path (a plain name: no folders, nothing absolute).
  void slot_action(const httplib::Request& req, httplib::Response& res) {
    const std::string digits = req.matches[1].str();
    const int id = digits.size() > 6 ? -1 : std::stoi(digits);
    if (id < 0) throw HttpError(404, "slot " + digits + " does not exist", "invalid_request_error", "id_slot");
    const std::string action = req.get_param_value("action");
    if (action == "erase") {
      sched.erase_slot(id);
      send_json(res, 200, {{"id_slot", id}, {"action", action}});
      return;
    }
    if (action != "save" && action != "restore")
      throw HttpError(400, "action must be save, restore or erase", "invalid_request_error", "action");
    if (opt.slot_save_path.empty())
      throw HttpError(501, "slot save and restore are off: start the server with --slot-save-path DIR",
                      "not_supported_error", "action");
    const json body = parse_body(req);
    if (!body.is_object() || !body.contains("filename") || !body["filename"].is_string())
      throw HttpError(400, "the body must be {\"filename\": \"NAME\"}", "invalid_request_error", "filename");
    const std::string filename = body["filename"].get<std::string>();
    check_state_filename(filename);
    const std::string path = (std::filesystem::path(opt.slot_save_path) / filename).string();
    if (action == "save") {
      const Scheduler::SlotFileResult r = sched.save_slot(id, path);
      send_json(res, 200, {{"id_slot", id}, {"filename", filename}, {"n_saved", r.n_tokens}, {"n_written", r.n_bytes},
                           {"timings", {{"save_ms", r.ms}}}});
    } else {
      const Scheduler::SlotFileResult r = sched.restore_slot(id, path);
      send_json(res, 200, {{"id_slot", id}, {"filename", filename}, {"n_restored", r.n_tokens}, {"n_read", r.n_bytes},
                           {"timings", {{"restore_ms", r.ms}}}});
    }
  }

  // A state file's name: one plain path component, so that no request reaches outside
  // --slot-save-path (no separators, no "." / "..", nothing hidden, no control characters).
  static void check_state_filename(const std::string& name) {
    auto bad = [&](const std::string& why) {
      throw HttpError(400, "invalid filename: " + why, "invalid_request_error", "filename");
    };
    if (name.empty() || name.size() > 255) bad("it must have 1 to 255 bytes");
    if (name.front() == '.') bad("it must not start with '.'");
    for (unsigned char c : name) {
      if (c == '/' || c == '\\') bad("it must be a plain name inside --slot-save-path, without folders");
      if (c < 0x20 || c == 0x7f) bad("it must not contain control characters");
      if (c == ':') bad("it must not contain ':'");
    }
  }

  void metrics(httplib::Response& res) {
    const SchedulerMetrics m = sched.metrics();
    std::ostringstream os;
    os.precision(15);
    auto put = [&](const char* name, const char* type, const char* help, double value) {
      os << "# HELP qf_" << name << ' ' << help << "\n# TYPE qf_" << name << ' ' << type << "\nqf_" << name << ' '
         << value << '\n';
    };
    put("requests_total", "counter", "Completion requests accepted into the queue.", m.requests);
    put("requests_rejected_total", "counter", "Requests refused for lack of queue room or KV memory.", m.rejected);
    put("requests_cancelled_total", "counter", "Requests whose client went away before the end.", m.cancelled);
    put("prompt_tokens_total", "counter", "Prompt tokens processed.", m.prompt_tokens);
    put("prompt_tokens_reused_total", "counter", "Prompt tokens served from a slot's cache instead.", m.prompt_tokens_reused);
    put("tokens_generated_total", "counter", "Tokens generated.", m.generated_tokens);
    put("busy_seconds_total", "counter", "Time the scheduler spent in forward passes.", m.busy_seconds);
    put("requests_processing", "gauge", "Requests generating now.", m.active);
    put("requests_deferred", "gauge", "Requests waiting for a slot.", m.queued);
    put("sessions", "gauge", "Sessions holding a KV cache (active or kept for prompt reuse).", m.sessions);
    put("kv_bytes_used", "gauge", "Bytes of keys and values held by all sessions.", static_cast<double>(m.kv_bytes_used));
    put("kv_bytes_reserved", "gauge", "Bytes of KV storage allocated by all sessions.", static_cast<double>(m.kv_bytes_reserved));
    put("kv_bytes_full_cache", "gauge", "Bytes uncompressed caches of the same sequences would hold.",
        static_cast<double>(m.kv_bytes_full));
    res.set_content(os.str(), "text/plain; version=0.0.4");
  }
};

Server::Server(runtime::Engine& engine, ServerOptions options) : impl_(std::make_unique<Impl>(engine, std::move(options))) {}

Server::~Server() = default;

int Server::bind() {
  const ServerOptions& o = impl_->opt;
  // cpp-httplib (compiled into Debian's library) listens with a backlog of 5: 64 clients
  // connecting at once overflow it. Keep the socket and listen again with the system's maximum.
  int listener = -1;
  impl_->http.set_socket_options([&listener](socket_t sock) {
    httplib::default_socket_options(sock);
    listener = static_cast<int>(sock);
  });
  const int port = o.port == 0 ? impl_->http.bind_to_any_port(o.host) : (impl_->http.bind_to_port(o.host, o.port) ? o.port : -1);
  if (port >= 0 && listener >= 0) ::listen(listener, SOMAXCONN);
  return port;
}

void Server::serve() { impl_->http.listen_after_bind(); }

bool Server::listen() {
  if (bind() < 0) return false;
  serve();
  return true;
}

void Server::stop(int drain_ms) {
  impl_->sched.drain(std::chrono::milliseconds(drain_ms));
  impl_->http.stop();
}

}  // namespace qf::server
