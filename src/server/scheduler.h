// Runs every request of the server on one engine: a fixed number of slots, each with its own
// session (a per-head, possibly compressed KV cache) created when first needed; one scheduler
// thread runs all active slots through one batched forward pass per step (continuous batching:
// each weight matrix is read once per step for all of them), a decoded token for each generating
// slot plus prompt chunks that fit, so a long new prompt never freezes the other streams.
// Sessions share the engine's thread pool, so only the scheduler thread touches the model. HTTP
// threads talk to it through Jobs.
//
// Threads: the scheduler thread owns every slot's session and history; no other thread touches
// them. Other threads read what the scheduler publishes under mu_ (metrics_, each slot's status
// and job pointer), and changes to idle slots (erase, save, restore) run on the scheduler thread
// between two steps (run_between_steps).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "model/forward.h"
#include "kv/state_file.h"
#include "runtime/engine.h"
#include "sample/sampler.h"
#include "server/protocol.h"
#include "tokenizer/tokenizer.h"

namespace qf::server {

struct SchedulerOptions {
  int n_slots = 4;                 // sessions generating at once (-np)
  int max_queued = 64;             // requests waiting for a slot before new ones get 503
  int64_t kv_memory = 0;           // bytes all sessions' KV caches may reserve (0 = no limit)
  runtime::KvOptions kv;           // the server's KV settings (requests may override)
};

// What the scheduler tells the HTTP side about one request, in order: admitted (or an error),
// text deltas, and a final event with the finish reason and usage.
struct Event {
  enum class Kind { kAdmitted, kText, kDone, kError } kind = Kind::kText;
  std::string text;
  FinishReason finish = FinishReason::kStop;
  Usage usage;
  std::optional<HttpError> error;
};

// One request in flight. The scheduler produces events; one HTTP thread consumes them.
class Job {
 public:
  Job(CompletionRequest request, std::vector<int32_t> tokens) : request(std::move(request)), tokens(std::move(tokens)) {}
  const CompletionRequest request;
  const std::vector<int32_t> tokens;  // the prompt
  std::atomic<bool> cancelled{false}; // set by the HTTP side: the client went away

  void emit(Event e);
  // Waits up to `timeout` for the next event.
  std::optional<Event> next(std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

struct SchedulerMetrics {
  int64_t requests = 0, rejected = 0, cancelled = 0;
  int64_t prompt_tokens = 0, prompt_tokens_reused = 0, generated_tokens = 0;
  int64_t kv_bytes_used = 0, kv_bytes_reserved = 0, kv_bytes_full = 0;  // full: an uncompressed cache of the same tokens
  int sessions = 0, active = 0, queued = 0;
  double busy_seconds = 0;
};

class Scheduler {
 public:
  Scheduler(runtime::Engine& engine, const Tokenizer& tokenizer, SchedulerOptions options);
  ~Scheduler();  // stops the scheduler thread; jobs still running get an error event

  // Queues a job. Throws HttpError 503 when shutting down or the queue is full.
  std::shared_ptr<Job> submit(CompletionRequest request, std::vector<int32_t> tokens);
  // Refuses new jobs from now on; waits (up to `timeout`) for the jobs in flight to finish.
  bool drain(std::chrono::milliseconds timeout);
  bool draining() const { return draining_; }
  // Empties a slot's cache (POST /slots/{id}?action=erase). Throws HttpError 404 / 409.
  void erase_slot(int id);

  // POST /slots/{id}?action=save|restore: an idle slot's session state to / from a state file
  // (runtime/session_state.h). Run on the scheduler thread between steps; the caller waits.
  struct SlotFileResult {
    int n_tokens = 0;      // tokens of the slot's history saved / restored
    size_t n_bytes = 0;    // bytes written / read
    double ms = 0;
  };
  // Throws HttpError: 404 unknown slot, 409 busy, 400 nothing to save or the file cannot be written.
  SlotFileResult save_slot(int id, const std::string& path);
  // Builds a session with the KV options the file was saved with (the server's filters file) and
  // restores it; the slot is unchanged on any error. Throws HttpError: 404 unknown slot or no such
  // file, 409 busy, 400 corrupt or foreign file (another model, shape or KV options), 503 KV memory.
  SlotFileResult restore_slot(int id, const std::string& path);

  SchedulerMetrics metrics();
  json slots_json();
  const SchedulerOptions& options() const { return opt_; }

 private:
  struct Slot;
  void loop();
  void assign_queued(std::unique_lock<std::mutex>& lock);
  bool admit(Slot& slot, const std::shared_ptr<Job>& job);
  // Makes room for a session costing `cost` bytes under --kv-memory (idle sessions give way,
  // least recently used first). False when the running sessions leave too little.
  bool reserve_kv(int64_t cost);
  int64_t kv_reserved() const;
  // Runs `task` on the scheduler thread between steps, with mu_ held; rethrows what it throws.
  void run_between_steps(std::function<void()> task);
  Slot& idle_slot(int id);  // throws HttpError 404 / 409; on the scheduler thread, mu_ held
  // Copies the slots' state into what /slots and /metrics read (their status, metrics_'s KV
  // figures); on the scheduler thread, mu_ held, whenever sessions may have changed.
  void publish();

  void step(const std::vector<Slot*>& active);
  void fail_slot(Slot& slot, const std::string& why);
  bool emit_token(Slot& slot, int32_t token);
  void finish(Slot& slot, FinishReason why);

  runtime::Engine& engine_;
  const Tokenizer& tok_;
  SchedulerOptions opt_;
  std::unique_ptr<Forward> forward_;  // scratch of the batched passes
  std::vector<std::unique_ptr<Slot>> slots_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::deque<std::function<void()>> tasks_;  // run_between_steps
  std::string model_fingerprint_;            // state files pin it
  std::mutex mu_;  // queue_, tasks_, metrics_, stop_, slots' job pointer and published status
  std::condition_variable cv_;
  std::atomic<bool> draining_{false};
  bool stop_ = false;
  int64_t tick_ = 0;
  SchedulerMetrics metrics_;
  std::thread thread_;
};

}  // namespace qf::server
