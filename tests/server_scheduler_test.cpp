// The scheduler under concurrent use, as the server's HTTP threads use it: clients submit
// requests and read their events while other threads read /metrics and /slots (Scheduler::metrics
// and slots_json) and erase idle slots, all the time. Run by the test command; built under
// ThreadSanitizer by hand (docs/reliability.md) it checks that no thread reads what the scheduler
// thread writes without the lock.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "runtime/engine.h"
#include "server/scheduler.h"
#include "test_paths.h"
#include "tokenizer/tokenizer.h"

namespace qf::server {
namespace {

constexpr int kSlots = 4;
constexpr int kContext = 128;

class SchedulerThreads : public ::testing::Test {
 protected:
  SchedulerThreads()
      : engine_(runtime::ModelOptions{.model = test::fixture("llama_f32_gqa_tied.gguf"), .n_ctx = kContext, .n_threads = 1}),
        tok_(Tokenizer::from_gguf(engine_.model().file())) {}

  // A greedy request of `n_gen` tokens on a random prompt; every other one asks for a
  // compressed cache, so slots keep getting new sessions.
  CompletionRequest request(std::mt19937& rng, int n_gen, bool compressed) const {
    CompletionRequest r;
    r.max_tokens = n_gen;
    r.ignore_eos = true;
    r.sampling.temperature = 0;
    if (compressed) {
      runtime::KvOptions kv;
      kv.policy = "knorm";
      kv.budget = 24;
      kv.window = 4;
      r.kv = kv;
    }
    std::uniform_int_distribution<int32_t> id(3, tok_.n_vocab() - 1);
    const int n = std::uniform_int_distribution<int>(4, 40)(rng);
    for (int i = 0; i < n; ++i) r.prompt_tokens.push_back(id(rng));
    return r;
  }

  runtime::Engine engine_;
  Tokenizer tok_;
};

// Reads one job's events to the end; returns the completion tokens it reports (-1 on an error).
int run_to_end(Scheduler& sched, CompletionRequest r) {
  std::vector<int32_t> ids = r.prompt_tokens;
  std::shared_ptr<Job> job = sched.submit(std::move(r), std::move(ids));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    std::optional<Event> e = job->next(std::chrono::milliseconds(100));
    if (!e) continue;
    if (e->kind == Event::Kind::kError) {
      ADD_FAILURE() << e->error->what();
      return -1;
    }
    if (e->kind == Event::Kind::kDone) return e->usage.completion_tokens;
  }
  ADD_FAILURE() << "a request did not end within 120 s";
  return -1;
}

TEST_F(SchedulerThreads, MetricsSlotsAndEraseWhileSessionsDecode) {
  SchedulerOptions so;
  so.n_slots = kSlots;
  Scheduler sched(engine_, tok_, so);
  constexpr int kClients = 3, kRequestsEach = 8, kGen = 12;  // fewer clients than slots: some are idle
  std::atomic<bool> clients_done{false};
  std::atomic<int> generated{0}, reads{0}, erased{0};

  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c)
    clients.emplace_back([&, c] {
      std::mt19937 rng(c);
      for (int i = 0; i < kRequestsEach; ++i) generated += run_to_end(sched, request(rng, kGen, (c + i) % 2 == 0));
    });

  // /metrics and /slots, as fast as they come: what they show must be consistent.
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t)
    readers.emplace_back([&] {
      while (!clients_done) {
        const SchedulerMetrics m = sched.metrics();
        EXPECT_LE(m.active, kSlots);
        EXPECT_LE(m.sessions, kSlots);
        EXPECT_LE(m.kv_bytes_used, m.kv_bytes_reserved);
        EXPECT_LE(m.generated_tokens, int64_t{kClients} * kRequestsEach * kGen);
        const json slots = sched.slots_json();
        EXPECT_EQ(slots.size(), static_cast<size_t>(kSlots));
        int with_session = 0;
        for (const json& s : slots) {
          EXPECT_LE(s["n_past"].get<int>(), kContext);
          if (!s["has_session"].get<bool>()) {
            EXPECT_EQ(s["n_past"].get<int>(), 0);
          }
          with_session += s["has_session"].get<bool>();
        }
        EXPECT_LE(with_session, kSlots);
        ++reads;
      }
    });

  // Erasing idle slots changes their sessions while the scheduler steps the busy ones.
  std::thread eraser([&] {
    for (int i = 0; !clients_done; i = (i + 1) % kSlots) {
      try {
        sched.erase_slot(i);
        ++erased;
      } catch (const HttpError& e) {
        EXPECT_EQ(e.status, 409) << e.what();  // busy
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });

  for (auto& t : clients) t.join();
  clients_done = true;
  for (auto& t : readers) t.join();
  eraser.join();

  EXPECT_EQ(generated.load(), kClients * kRequestsEach * kGen);
  EXPECT_GT(reads.load(), 0);
  ASSERT_TRUE(sched.drain(std::chrono::seconds(30)));
  const SchedulerMetrics m = sched.metrics();
  EXPECT_EQ(m.requests, kClients * kRequestsEach);
  EXPECT_EQ(m.generated_tokens, kClients * kRequestsEach * kGen);
  EXPECT_EQ(m.active, 0);
  std::printf("%d metrics+slots reads, %d erases of idle slots during %d requests\n", reads.load(), erased.load(),
              kClients * kRequestsEach);
}

// What /slots and /metrics show after an erase is the erased state, as soon as erase_slot returns.
TEST_F(SchedulerThreads, EraseIsVisibleAtOnce) {
  SchedulerOptions so;
  so.n_slots = 1;
  Scheduler sched(engine_, tok_, so);
  std::mt19937 rng(7);
  ASSERT_EQ(run_to_end(sched, request(rng, 4, false)), 4);
  ASSERT_TRUE(sched.drain(std::chrono::seconds(30)));  // the slot is idle again
  EXPECT_TRUE(sched.slots_json()[0]["has_session"].get<bool>());
  EXPECT_GT(sched.slots_json()[0]["n_past"].get<int>(), 0);
  EXPECT_EQ(sched.metrics().sessions, 1);
  sched.erase_slot(0);
  const json slot = sched.slots_json()[0];
  EXPECT_FALSE(slot["has_session"].get<bool>());
  EXPECT_EQ(slot["n_past"].get<int>(), 0);
  EXPECT_EQ(slot["kv_bytes_reserved"].get<int64_t>(), 0);
  EXPECT_EQ(sched.metrics().sessions, 0);
  EXPECT_EQ(sched.metrics().kv_bytes_reserved, 0);
}

// Per-layer budgets: /slots and /metrics report what the session's per-layer caches reserve, which
// is what admission charged and, at equal total, what uniform budgets reserve.
TEST(SchedulerMemory, LayerWeightsReportTheirOwnKvBytes) {
  // -b 8: caches hold budget + 8 tokens, well below the context, so budgets decide their size.
  runtime::Engine engine(runtime::ModelOptions{
      .model = test::fixture("llama_f32_gqa_tied.gguf"), .n_ctx = kContext, .n_threads = 1, .n_batch = 8});
  const Tokenizer tok = Tokenizer::from_gguf(engine.model().file());
  SchedulerOptions so;
  so.n_slots = 1;
  Scheduler sched(engine, tok, so);
  CompletionRequest r;
  r.max_tokens = 6;
  r.ignore_eos = true;
  r.sampling.temperature = 0;
  r.prompt_tokens = {5, 17, 40, 41, 99, 100, 7, 8, 9, 12, 13, 14};
  runtime::KvOptions kv;
  kv.policy = "knorm";
  kv.budget = 24;
  kv.window = 4;
  kv.layer_weights = "3,1,2";  // shared out as 36, 12, 24
  r.kv = kv;
  ASSERT_EQ(run_to_end(sched, std::move(r)), 6);
  ASSERT_TRUE(sched.drain(std::chrono::seconds(30)));
  const int64_t charged = engine.session_kv_bytes(kv);
  EXPECT_EQ(charged, engine.new_session(kv)->cache().bytes_reserved());
  EXPECT_EQ(sched.slots_json()[0]["kv_bytes_reserved"].get<int64_t>(), charged);
  EXPECT_EQ(sched.slots_json()[0]["kv_layer_weights"].get<std::string>(), "3,1,2");
  EXPECT_EQ(sched.metrics().kv_bytes_reserved, charged);
  runtime::KvOptions uniform = kv;
  uniform.layer_weights.clear();
  EXPECT_EQ(charged, engine.session_kv_bytes(uniform));
  EXPECT_LT(charged, engine.session_kv_bytes(runtime::KvOptions{}));
}

}  // namespace
}  // namespace qf::server
