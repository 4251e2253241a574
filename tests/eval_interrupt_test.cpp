// An evaluation stops when the poll its caller installed throws (the Python bindings raise
// KeyboardInterrupt there on Ctrl-C): the exception leaves run_ppl / run_fidelity / run_niah at
// the next progress step, the cells finished before it stay in the log, and a rerun without the
// poll resumes from them to the same result as an uninterrupted run. On the tiny fixture model.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "eval/engine.h"
#include "eval/fidelity.h"
#include "eval/ppl.h"
#include "eval/progress.h"
#include "eval/results.h"
#include "model/model.h"
#include "eval_fixture.h"
#include "test_paths.h"

namespace qf::eval {
namespace {


struct Interrupted {};  // what the poll throws: not a qf::Error, as a Python exception is not

using test::TempDir;

// Throws on its n-th call (counting from 1), counts every call.
struct PollAfter {
  int n;
  int calls = 0;
  void operator()() {
    if (++calls == n) throw Interrupted{};
  }
};

class Interrupt : public test::FixtureModel {
 protected:
  void SetUp() override { load("llama_f32_gqa_tied.gguf", /*n_threads=*/1, /*filter_seed=*/5); }
};

TEST(InterruptPoll, ScopedAndNested) {
  int outer = 0, inner = 0;
  poll_interrupt();  // none installed: nothing happens
  {
    ScopedInterruptPoll a([&] { ++outer; });
    poll_interrupt();
    {
      ScopedInterruptPoll b([&] { ++inner; });
      poll_interrupt();
    }
    poll_interrupt();  // the outer one is back
  }
  poll_interrupt();
  EXPECT_EQ(outer, 2);
  EXPECT_EQ(inner, 1);
}

TEST(InterruptPoll, ProgressAdvancePolls) {
  PollAfter poll{3};
  ScopedInterruptPoll scope(std::ref(poll));
  Progress bar("t", 10, false);
  bar.advance(1);
  bar.skip(1);  // skipping (resumed work) is not a step
  bar.advance(1);
  EXPECT_EQ(poll.calls, 2);
  EXPECT_THROW(bar.advance(1), Interrupted);
}

TEST(InterruptPoll, OnlyTheInstallingThreadIsPolled) {
  int calls = 0;
  ScopedInterruptPoll scope([&] { ++calls; });
  std::thread([] { poll_interrupt(); }).join();
  EXPECT_EQ(calls, 0);
}

TEST_F(Interrupt, PerplexityStopsAndResumes) {
  TempDir tmp;
  PplSettings st;
  st.budgets = {24, 40};
  st.window = 8;
  st.n_tokens = 96;
  st.n_docs = 1;
  const std::vector<TokenDoc> docs{{"doc", tokens(96, 3)}};
  const std::vector<std::string> policies{"none", "qfilters", "knorm"};
  const std::string path = (tmp.path / "ppl.jsonl").string();
  // Polls: 4 for the full-cache cell (before each of its 3 chunks of 32, then its end), then 72
  // for each (budget 24, policy) cell (71 decoding steps, then its end): the 100th falls inside
  // budget 24's second policy.
  PollAfter poll{100};
  {
    ScopedInterruptPoll scope(std::ref(poll));
    CellLog log(path, st.to_json(), true);
    EXPECT_THROW(run_ppl(ctx_, docs, st, policies, log), Interrupted);
    EXPECT_EQ(poll.calls, 100);
    EXPECT_TRUE(log.has("doc|0|none"));
    EXPECT_TRUE(log.has("doc|24|qfilters"));
    EXPECT_FALSE(log.has("doc|24|knorm"));
  }
  CellLog resumed(path, st.to_json(), true);
  EXPECT_EQ(resumed.resumed(), 2u);
  run_ppl(ctx_, docs, st, policies, resumed);  // no poll installed any more
  EXPECT_EQ(resumed.size(), 5u);

  CellLog fresh((tmp.path / "fresh.jsonl").string(), st.to_json(), false);
  run_ppl(ctx_, docs, st, policies, fresh);
  const auto a = summarize_ppl(resumed, docs, st, policies).json["results"];
  const auto b = summarize_ppl(fresh, docs, st, policies).json["results"];
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {  // every field but the timing
    EXPECT_EQ(a[i]["policy"], b[i]["policy"]);
    EXPECT_EQ(a[i]["ppl_all"], b[i]["ppl_all"]);
    EXPECT_EQ(a[i]["evicted"], b[i]["evicted"]);
  }
}

TEST_F(Interrupt, FullCachePassPollsEveryChunk) {
  TempDir tmp;
  PplSettings st;
  st.budgets = {24};
  st.window = 8;
  st.n_tokens = 96;  // 95 targets in chunks of 32: the poll runs before each of the 3 chunks
  st.n_docs = 1;
  const std::vector<TokenDoc> docs{{"doc", tokens(96, 4)}};
  PollAfter poll{3};
  ScopedInterruptPoll scope(std::ref(poll));
  CellLog log((tmp.path / "ppl.jsonl").string(), st.to_json(), false);
  EXPECT_THROW(run_ppl(ctx_, docs, st, {"none", "knorm"}, log), Interrupted);
  EXPECT_EQ(log.size(), 0u);
}

// The fidelity bar advances inside the session's query/key hook, in the middle of a forward pass:
// the exception must unwind through it cleanly (the sanitizer build checks the "cleanly").
TEST_F(Interrupt, FidelityStopsInsideTheForwardPass) {
  TempDir tmp;
  FidelitySettings st;
  st.n_tokens = 64;
  st.n_docs = 2;
  const std::vector<TokenDoc> docs{{"a", tokens(64, 5)}, {"b", tokens(64, 6)}};
  const std::vector<std::string> policies{"qfilters", "knorm"};
  const int layers = model_->config().n_layers;
  // Document a: one poll per layer, then one for its scores; the next poll is in b's forward pass.
  PollAfter poll{layers + 2};
  const std::string path = (tmp.path / "fid.jsonl").string();
  {
    ScopedInterruptPoll scope(std::ref(poll));
    CellLog log(path, st.to_json(), true);
    EXPECT_THROW(run_fidelity(ctx_, docs, st, policies, log), Interrupted);
    EXPECT_TRUE(log.has("a"));
    EXPECT_FALSE(log.has("b"));
  }
  CellLog resumed(path, st.to_json(), true);
  run_fidelity(ctx_, docs, st, policies, resumed);
  CellLog fresh((tmp.path / "fresh.jsonl").string(), st.to_json(), false);
  run_fidelity(ctx_, docs, st, policies, fresh);
  EXPECT_EQ(resumed.get("b")["spearman"], fresh.get("b")["spearman"]);
}

}  // namespace
}  // namespace qf::eval
