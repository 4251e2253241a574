#include "server/scheduler.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>

#include "runtime/session_state.h"
#include "util/error.h"

namespace qf::server {

void Job::emit(Event e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_one();
}

std::optional<Event> Job::next(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  Event e = std::move(events_.front());
  events_.pop_front();
  return e;
}

// A slot's session outlives its jobs, so a conversation that continues finds its cache.
struct Scheduler::Slot {
  // What /slots shows, copied by publish() under mu_: the fields below belong to the scheduler
  // thread, which changes them outside the lock during a step.
  struct Status {
    int n_past = 0;
    bool has_session = false;
    std::string kv_policy = "none";
    int kv_budget = 0;
    std::string kv_layer_weights;  // as the request spelled them; empty: uniform budgets
    int64_t kv_bytes = 0;
  };

  int id = 0;
  Status status;               // guarded by mu_
  std::unique_ptr<Session> session;
  runtime::KvOptions kv;
  int64_t kv_bytes = 0;        // what admission charged for the session
  std::vector<int32_t> fed;    // tokens the session has processed, in order
  int64_t last_used = 0;

  // The job being served (null when idle) and its state.
  std::shared_ptr<Job> job;
  bool finished = false;
  size_t prompt_done = 0;      // prompt tokens already in the cache
  int32_t pending = -1;        // sampled token not yet fed to the model
  int n_gen = 0;
  Usage usage;
  std::optional<Sampler> sampler;
  std::optional<StreamDecoder> decoder;
  std::optional<StopMatcher> stop;
};

namespace {

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

// Tokens of a new prompt the slot's cache already holds. A session whose context has shifted
// holds a different sequence (the older part forgotten, positions moved): never reused.
size_t reusable_prefix(const Session* session, bool compatible, const std::vector<int32_t>& fed,
                       const std::vector<int32_t>& prompt) {
  if (!session || !compatible || session->positions_shifted() > 0) return 0;
  return common_prefix(fed, prompt);
}

Event error_event(int status, const std::string& message, const std::string& type = "invalid_request_error") {
  Event e;
  e.kind = Event::Kind::kError;
  e.error = HttpError(status, message, type);
  return e;
}

std::string mib(int64_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

}  // namespace

Scheduler::Scheduler(runtime::Engine& engine, const Tokenizer& tokenizer, SchedulerOptions options)
    : engine_(engine), tok_(tokenizer), opt_(std::move(options)), model_fingerprint_(runtime::model_fingerprint(engine.model())) {
  if (opt_.n_slots < 1) fail("-np must be >= 1");
  // Room for one decoded token per slot plus a full prompt chunk.
  forward_ = std::make_unique<Forward>(engine.model(), engine.options().n_batch + opt_.n_slots);
  for (int i = 0; i < opt_.n_slots; ++i) {
    slots_.push_back(std::make_unique<Slot>());
    slots_.back()->id = i;
  }
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  for (auto& s : slots_)
    if (s->job) s->job->emit(error_event(503, "the server is shutting down", "server_error"));
  for (auto& j : queue_) j->emit(error_event(503, "the server is shutting down", "server_error"));
}

std::shared_ptr<Job> Scheduler::submit(CompletionRequest request, std::vector<int32_t> tokens) {
  if (request.id_slot >= opt_.n_slots)
    throw HttpError(400, "id_slot " + std::to_string(request.id_slot) + " does not exist (the server has " +
                             std::to_string(opt_.n_slots) + " slots)", "invalid_request_error", "id_slot");
  auto job = std::make_shared<Job>(std::move(request), std::move(tokens));
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_ || stop_) throw HttpError(503, "the server is shutting down", "server_error");
    if (static_cast<int>(queue_.size()) >= opt_.max_queued) {
      ++metrics_.rejected;
      throw HttpError(503, "the server is busy: " + std::to_string(queue_.size()) + " requests are waiting", "server_error");
    }
    ++metrics_.requests;
    queue_.push_back(job);
  }
  cv_.notify_all();
  return job;
}

bool Scheduler::drain(std::chrono::milliseconds timeout) {
  draining_ = true;
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, timeout, [&] {
    return queue_.empty() && std::none_of(slots_.begin(), slots_.end(), [](const auto& s) { return s->job != nullptr; });
  });
}

Scheduler::Slot& Scheduler::idle_slot(int id) {
  if (id < 0 || id >= static_cast<int>(slots_.size()))
    throw HttpError(404, "slot " + std::to_string(id) + " does not exist", "invalid_request_error", "id_slot");
  Slot& s = *slots_[id];
  if (s.job) throw HttpError(409, "slot " + std::to_string(id) + " is busy", "invalid_request_error", "id_slot");
  return s;
}

void Scheduler::erase_slot(int id) {
  run_between_steps([&] {
    Slot& s = idle_slot(id);
    s.session.reset();
    s.kv_bytes = 0;
    s.fed.clear();
  });
}

void Scheduler::run_between_steps(std::function<void()> task) {
  // Published before the caller wakes, so that it reads its own change in /slots and /metrics.
  auto packaged = std::make_shared<std::packaged_task<void()>>([this, task = std::move(task)] {
    try {
      task();
    } catch (...) {
      publish();
      throw;
    }
    publish();
  });
  std::future<void> done = packaged->get_future();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw HttpError(503, "the server is shutting down", "server_error");
    tasks_.push_back([packaged] { (*packaged)(); });
  }
  cv_.notify_all();
  try {
    done.get();
  } catch (const std::future_error&) {  // the scheduler stopped before running it
    throw HttpError(503, "the server is shutting down", "server_error");
  }
}

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

Scheduler::SlotFileResult Scheduler::save_slot(int id, const std::string& path) {
  SlotFileResult r;
  run_between_steps([&] {
    const auto t0 = std::chrono::steady_clock::now();
    Slot& s = idle_slot(id);
    if (!s.session || s.fed.empty())
      throw HttpError(400, "slot " + std::to_string(id) + " holds no session to save", "invalid_request_error", "id_slot");
    try {
      r.n_bytes = runtime::save_state_file(path, *s.session, model_fingerprint_, s.fed);
    } catch (const Error& e) {
      throw HttpError(500, e.what(), "server_error");
    }
    r.n_tokens = static_cast<int>(s.fed.size());
    r.ms = ms_since(t0);
  });
  return r;
}

Scheduler::SlotFileResult Scheduler::restore_slot(int id, const std::string& path) {
  const std::string name = std::filesystem::path(path).filename().string();
  SlotFileResult r;
  run_between_steps([&] {
    const auto t0 = std::chrono::steady_clock::now();
    Slot& s = idle_slot(id);
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
      throw HttpError(404, name + ": no such state file in --slot-save-path", "invalid_request_error", "filename");
    kv::SessionState st;
    runtime::KvOptions kv;
    std::unique_ptr<Session> session;
    try {
      std::ifstream in(path, std::ios::binary);
      const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      if (!in.good() && !in.eof()) fail(name, ": cannot read the state file");
      r.n_bytes = bytes.size();
      st = kv::decode_state(bytes, name);
      if (st.tokens.size() != static_cast<size_t>(st.n_past))
        fail(name, ": the state has no token history, which a server slot needs for prompt reuse");
      kv = runtime::kv_options_for_state(st.config, opt_.kv, engine_, name);
    } catch (const Error& e) {
      throw HttpError(400, e.what(), "invalid_request_error", "filename");
    }
    int64_t cost = 0;
    try {
      cost = engine_.session_kv_bytes(kv);
      session = engine_.new_session(kv);
      runtime::restore_state(*session, st, model_fingerprint_, name);
    } catch (const Error& e) {
      throw HttpError(400, e.what(), "invalid_request_error", "filename");
    }
    // The slot's own session gives way to the restored one.
    const int64_t own = s.kv_bytes;
    s.kv_bytes = 0;
    if (!reserve_kv(cost)) {
      s.kv_bytes = own;
      throw HttpError(503, "KV memory is full: the restored session needs " + mib(cost) + ", " + mib(kv_reserved()) +
                               " of --kv-memory " + mib(opt_.kv_memory) + " are held by running sessions",
                      "server_error");
    }
    s.session = std::move(session);
    s.kv = kv;
    s.kv_bytes = cost;
    s.fed = st.tokens;
    s.last_used = ++tick_;
    r.n_tokens = static_cast<int>(st.tokens.size());
    r.ms = ms_since(t0);
  });
  return r;
}

SchedulerMetrics Scheduler::metrics() {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerMetrics m = metrics_;
  m.queued = static_cast<int>(queue_.size());
  return m;
}

json Scheduler::slots_json() {
  std::lock_guard<std::mutex> lock(mu_);
  json out = json::array();
  for (const auto& s : slots_) {
    out.push_back({{"id", s->id},
                   {"is_processing", s->job != nullptr},
                   {"n_ctx", engine_.n_ctx()},
                   {"n_past", s->status.n_past},
                   {"kv_policy", s->status.kv_policy},
                   {"kv_budget", s->status.kv_budget},
                   {"kv_layer_weights", s->status.kv_layer_weights},
                   {"kv_bytes_reserved", s->status.kv_bytes},
                   {"has_session", s->status.has_session}});
  }
  return out;
}

void Scheduler::publish() {
  int64_t used = 0, reserved = 0, full = 0;
  int sessions = 0;
  for (auto& s : slots_) {
    s->status.n_past = static_cast<int>(s->fed.size());
    s->status.has_session = s->session != nullptr;
    s->status.kv_policy = s->session ? s->kv.policy : "none";
    s->status.kv_budget = s->kv.budget;
    s->status.kv_layer_weights = s->session ? s->kv.layer_weights : "";
    s->status.kv_bytes = s->kv_bytes;
    if (!s->session) continue;
    used += s->session->cache().bytes_used();
    reserved += s->session->cache().bytes_reserved();
    full += s->session->cache().full_cache_bytes(s->session->n_past());
    ++sessions;
  }
  metrics_.kv_bytes_used = used;
  metrics_.kv_bytes_reserved = reserved;
  metrics_.kv_bytes_full = full;
  metrics_.sessions = sessions;
}

void Scheduler::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] {
      return stop_ || !queue_.empty() || !tasks_.empty() ||
             std::any_of(slots_.begin(), slots_.end(), [](const auto& s) { return s->job != nullptr; });
    });
    if (stop_) return;
    while (!tasks_.empty()) {  // slot saves and restores, between two steps
      std::function<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      task();
    }
    assign_queued(lock);
    publish();  // admissions made and dropped sessions
    std::vector<Slot*> active;
    for (auto& s : slots_)
      if (s->job) active.push_back(s.get());
    lock.unlock();

    const auto t0 = std::chrono::steady_clock::now();
    SchedulerMetrics delta;
    for (Slot* s : active) {
      delta.prompt_tokens -= static_cast<int64_t>(s->prompt_done);
      delta.generated_tokens -= s->n_gen;
    }
    step(active);
    for (Slot* s : active) {
      delta.prompt_tokens += static_cast<int64_t>(s->prompt_done);
      delta.generated_tokens += s->n_gen;
    }

    lock.lock();
    metrics_.prompt_tokens += delta.prompt_tokens;
    metrics_.generated_tokens += delta.generated_tokens;
    metrics_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    publish();
    int n_active = 0;
    for (Slot* s : active) {
      if (s->finished) {
        s->job.reset();
        s->finished = false;
      } else {
        ++n_active;
      }
    }
    metrics_.active = n_active;
    cv_.notify_all();  // drain() waits on the same condition
  }
}

// Moves queued jobs into free slots, oldest first; a job waiting for a busy slot it asked for
// does not hold back the others.
void Scheduler::assign_queued(std::unique_lock<std::mutex>&) {
  for (auto it = queue_.begin(); it != queue_.end();) {
    const std::shared_ptr<Job>& job = *it;
    if (job->cancelled) {
      ++metrics_.cancelled;
      it = queue_.erase(it);
      continue;
    }
    const CompletionRequest& r = job->request;
    const runtime::KvOptions& kv = r.kv ? *r.kv : opt_.kv;
    Slot* best = nullptr;
    size_t best_reuse = 0;
    for (auto& s : slots_) {
      if (s->job || (r.id_slot >= 0 && s->id != r.id_slot)) continue;
      const size_t reuse = reusable_prefix(s->session.get(), s->kv == kv && r.cache_prompt, s->fed, job->tokens);
      const bool reusable = reuse > 0 && reuse == s->fed.size() && reuse < job->tokens.size();
      const size_t score = reusable ? reuse : 0;
      // Most reuse first; then a slot without a session; then the least recently used.
      if (!best || score > best_reuse ||
          (score == best_reuse && (best->session != nullptr) > (s->session != nullptr)) ||
          (score == best_reuse && (best->session != nullptr) == (s->session != nullptr) && s->last_used < best->last_used)) {
        best = s.get();
        best_reuse = score;
      }
    }
    if (!best) {
      ++it;
      continue;
    }
    std::shared_ptr<Job> taken = job;
    it = queue_.erase(it);
    if (!admit(*best, taken)) ++metrics_.rejected;
  }
}

// Gives the slot a session fit for the job (reusing its cache when the prompt continues it) and
// the job's sampling state. False (and an error event) when the job cannot run.
bool Scheduler::admit(Slot& slot, const std::shared_ptr<Job>& job) {
  const CompletionRequest& r = job->request;
  const runtime::KvOptions& kv = r.kv ? *r.kv : opt_.kv;
  const size_t reuse = reusable_prefix(slot.session.get(), slot.kv == kv && r.cache_prompt, slot.fed, job->tokens);
  const bool reusable = reuse > 0 && reuse == slot.fed.size() && reuse < job->tokens.size();
  try {
    // The protocol checks sampling options; should the sampler still refuse them, the request
    // fails, not the scheduler thread (an exception escaping it would end the server).
    SamplerOptions so = r.sampling;
    if (!r.seed_given) so.seed = random_seed();
    if (r.ignore_eos) so.banned = tok_.eog_ids();
    slot.sampler.emplace(so);
    if (!slot.session || slot.kv != kv) {
      const int64_t cost = engine_.session_kv_bytes(kv);  // also checks the KV options
      slot.session.reset();
      slot.kv_bytes = 0;
      slot.fed.clear();
      if (!reserve_kv(cost)) {
        job->emit(error_event(503, "KV memory is full: this session needs " + mib(cost) + ", " + mib(kv_reserved()) +
                                       " of --kv-memory " + mib(opt_.kv_memory) + " are held by running sessions",
                              "server_error"));
        return false;
      }
      slot.session = engine_.new_session(kv);
      slot.kv = kv;
      slot.kv_bytes = cost;
    } else if (!reusable) {
      slot.session->reset();
      slot.fed.clear();
    }
  } catch (const Error& e) {
    job->emit(error_event(400, e.what()));
    return false;
  }

  slot.job = job;
  slot.finished = false;
  slot.prompt_done = reusable ? reuse : 0;
  slot.pending = -1;
  slot.n_gen = 0;
  slot.usage = Usage{static_cast<int>(job->tokens.size()), 0, static_cast<int>(slot.prompt_done)};
  for (int32_t t : job->tokens) slot.sampler->accept(t);
  slot.decoder.emplace(tok_, /*render_special=*/false);
  slot.stop.emplace(r.stop);
  slot.last_used = ++tick_;
  metrics_.prompt_tokens_reused += static_cast<int64_t>(slot.prompt_done);
  Event admitted;
  admitted.kind = Event::Kind::kAdmitted;
  admitted.usage = slot.usage;
  job->emit(std::move(admitted));
  return true;
}

int64_t Scheduler::kv_reserved() const {
  int64_t sum = 0;
  for (const auto& s : slots_) sum += s->kv_bytes;
  return sum;
}

bool Scheduler::reserve_kv(int64_t cost) {
  if (opt_.kv_memory <= 0) return true;
  // Idle sessions (kept for prompt reuse) give way, least recently used first; a slot that is
  // being given a new session has already released its own (kv_bytes 0).
  while (kv_reserved() + cost > opt_.kv_memory) {
    Slot* victim = nullptr;
    for (auto& s : slots_)
      if (!s->job && s->session && s->kv_bytes > 0 && (!victim || s->last_used < victim->last_used)) victim = s.get();
    if (!victim) break;
    victim->session.reset();
    victim->kv_bytes = 0;
    victim->fed.clear();
  }
  return kv_reserved() + cost <= opt_.kv_memory;
}

// Ends a request the engine failed on; the server goes on with the others.
void Scheduler::fail_slot(Slot& slot, const std::string& why) {
  slot.job->emit(error_event(500, why, "server_error"));
  slot.session.reset();
  slot.kv_bytes = 0;
  slot.fed.clear();
  slot.finished = true;
}

// One forward pass for all active slots (continuous batching): the token each generating slot
// sampled last time, then prompt chunks of the slots still reading their prompt, as many as fit
// in the batch; every weight matrix is read once for all of them. Prefill compression
// (--kv-ratio) acts on a whole prompt at once, so such a prompt runs alone.
void Scheduler::step(const std::vector<Slot*>& active) {
  std::vector<BatchItem> items;
  std::vector<Slot*> who;
  int rows = 0;
  for (Slot* s : active) {
    if (s->job->cancelled) {
      s->finished = true;
      std::lock_guard<std::mutex> lock(mu_);
      ++metrics_.cancelled;
    } else if (s->prompt_done == s->job->tokens.size()) {
      items.push_back({s->session.get(), std::span<const int32_t>(&s->pending, 1), TokenKind::decode});
      who.push_back(s);
      ++rows;
    }
  }
  for (Slot* s : active) {
    if (s->finished || s->prompt_done == s->job->tokens.size()) continue;
    const size_t left = s->job->tokens.size() - s->prompt_done;
    if (s->kv.ratio > 0) {
      try {
        const std::span<const int32_t> rest(s->job->tokens.data() + s->prompt_done, left);
        const std::span<const float> logits = s->session->prefill(rest);
        s->fed.insert(s->fed.end(), rest.begin(), rest.end());
        s->prompt_done += left;
        emit_token(*s, s->sampler->sample_and_accept(logits));
      } catch (const std::exception& e) {
        fail_slot(*s, e.what());
      }
      continue;
    }
    const int room = std::min(forward_->max_rows() - rows, s->session->n_batch());
    if (room <= 0) continue;  // its next chunk waits for the next pass
    const size_t n = std::min<size_t>(left, static_cast<size_t>(room));
    items.push_back({s->session.get(), std::span<const int32_t>(s->job->tokens.data() + s->prompt_done, n)});
    who.push_back(s);
    rows += static_cast<int>(n);
  }
  if (items.empty()) return;
  std::vector<std::span<const float>> logits;
  try {
    logits = Session::eval_batch(items, *forward_, engine_.pool());
  } catch (const std::exception& e) {  // an engine error ends these requests, not the server
    for (Slot* s : who) fail_slot(*s, e.what());
    return;
  }
  std::vector<size_t> sampling;  // items whose logits give their slot's next token
  for (size_t i = 0; i < who.size(); ++i) {
    Slot& s = *who[i];
    s.fed.insert(s.fed.end(), items[i].tokens.begin(), items[i].tokens.end());
    if (s.prompt_done < s.job->tokens.size()) {
      s.prompt_done += items[i].tokens.size();
      if (s.prompt_done < s.job->tokens.size()) continue;  // more prompt next pass
    }
    sampling.push_back(i);
  }
  // Each slot's sampler has its own history and random stream, so they run on the (now idle)
  // pool rather than one after another on this thread; the tokens are the same either way.
  std::vector<int32_t> next(sampling.size());
  try {
    engine_.pool().parallel_for(static_cast<int64_t>(sampling.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) next[k] = who[sampling[k]]->sampler->sample_and_accept(logits[sampling[k]]);
    });
  } catch (const std::exception& e) {
    for (size_t i : sampling) fail_slot(*who[i], e.what());
    return;
  }
  for (size_t k = 0; k < sampling.size(); ++k) emit_token(*who[sampling[k]], next[k]);
}

// Streams one sampled token's text; ends the job at end of text, a stop string, max_tokens or
// the end of the context. Returns whether the job goes on.
bool Scheduler::emit_token(Slot& slot, int32_t token) {
  Job& job = *slot.job;
  const CompletionRequest& r = job.request;
  slot.usage.completion_tokens = ++slot.n_gen;
  if (tok_.is_eog(token)) {
    finish(slot, FinishReason::kStop);
    return false;
  }
  const std::string text = slot.stop->push(slot.decoder->push(token));
  if (!text.empty()) {
    Event e;
    e.text = text;
    job.emit(std::move(e));
  }
  if (slot.stop->stopped()) {
    finish(slot, FinishReason::kStop);
    return false;
  }
  // Without max_tokens a request ends with the context, shifting or not (it would never end).
  const bool at_limit = r.max_tokens > 0 ? slot.n_gen >= r.max_tokens
                                         : static_cast<int64_t>(job.tokens.size()) + slot.n_gen > slot.session->n_ctx();
  if (at_limit || !slot.session->has_room(1)) {
    finish(slot, FinishReason::kLength);
    return false;
  }
  slot.pending = token;
  return true;
}

void Scheduler::finish(Slot& slot, FinishReason why) {
  Job& job = *slot.job;
  std::string rest = slot.stop->stopped() ? "" : slot.stop->push(slot.decoder->flush());
  rest += slot.stop->flush();
  if (!rest.empty()) {
    Event e;
    e.text = rest;
    job.emit(std::move(e));
  }
  Event done;
  done.kind = Event::Kind::kDone;
  done.finish = why;
  done.usage = slot.usage;
  job.emit(std::move(done));
  slot.finished = true;
}

}  // namespace qf::server
