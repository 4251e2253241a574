// The thread pool under oversubscription (more threads than cores), with sleeping workers, with
// exceptions, and the thread-count policy. Complements the basic coverage tests in tensor_test.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <random>
#include <thread>
#include <vector>

#include "tensor/threadpool.h"
#include "util/error.h"

namespace qf {
namespace {

using namespace std::chrono_literals;

// Runs body on another thread; fails (and exits, since a hung pool cannot be cancelled) if it
// takes longer than `limit`. A lost wake-up shows up as a hang, so every stress loop is bounded.
template <class Body>
void within(std::chrono::seconds limit, Body body) {
  auto done = std::async(std::launch::async, body);
  if (done.wait_for(limit) == std::future_status::timeout) {
    std::fprintf(stderr, "thread pool test hung for more than %llds\n", static_cast<long long>(limit.count()));
    std::_Exit(1);
  }
  done.get();
}

int oversubscribed_threads() { return kMaxThreadsPerCpu * ThreadPool::default_threads(); }

// A float sum whose rounding depends on the chunk boundaries, so it is bit-identical only if
// parallel_for splits exactly as documented and every chunk runs exactly once.
float chunked_sum(const std::vector<float>& x, int64_t n, int chunks) {
  float total = 0;
  for (int c = 0; c < chunks; ++c) {
    float part = 0;
    for (int64_t i = n * c / chunks; i < n * (c + 1) / chunks; ++i) part += x[i];
    total += part;
  }
  return total;
}

TEST(ThreadPoolOversubscribed, ParallelForIsBitIdenticalWithRandomSizes) {
  const int n_threads = oversubscribed_threads();
  ThreadPool pool(n_threads);
  ASSERT_EQ(pool.size(), n_threads);
  std::mt19937 rng(7);
  std::vector<float> x(20000);
  for (float& v : x) v = std::uniform_real_distribution<float>(-1, 1)(rng);
  within(60s, [&] {
    for (int rep = 0; rep < 3000; ++rep) {
      const int64_t n = std::uniform_int_distribution<int64_t>(0, static_cast<int64_t>(x.size()))(rng);
      const int64_t grain = std::uniform_int_distribution<int64_t>(1, 3000)(rng);
      const int chunks = static_cast<int>(std::min<int64_t>(n_threads, (n + grain - 1) / grain));
      std::vector<float> parts(n_threads, 0.0f);
      pool.parallel_for(n, grain, [&](int64_t b, int64_t e) {
        float part = 0;
        for (int64_t i = b; i < e; ++i) part += x[i];
        int c = 0;  // the chunk that starts at b
        while (c + 1 < chunks && n * (c + 1) / chunks <= b) ++c;
        parts[c] = part;
      });
      float total = 0;
      for (int c = 0; c < std::max(chunks, 1); ++c) total += parts[c];
      ASSERT_EQ(total, chunked_sum(x, n, std::max(chunks, 1))) << "n " << n << " grain " << grain;
    }
  });
}

TEST(ThreadPoolOversubscribed, EveryIndexOnceWithRandomWork) {
  ThreadPool pool(oversubscribed_threads());
  std::mt19937 rng(11);
  within(60s, [&] {
    for (int rep = 0; rep < 2000; ++rep) {
      std::vector<std::atomic<int>> hits(pool.size());
      const int spin = std::uniform_int_distribution<int>(0, 20000)(rng);
      pool.run([&](int i, int total) {
        ASSERT_EQ(total, pool.size());
        volatile int sink = 0;
        for (int k = 0; k < spin * (i + 1) / total; ++k) sink = sink + k;  // unequal work per index
        hits[i].fetch_add(1, std::memory_order_relaxed);
      });
      for (int i = 0; i < pool.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "rep " << rep << " index " << i;
    }
  });
}

TEST(ThreadPool, NoLostWakeupsAcrossSpinAndSleep) {
  // Gaps between regions chosen to land in every phase of the workers' wait: still pausing,
  // yielding, just blocking, long asleep.
  const std::chrono::microseconds gaps[] = {0us, 1us, 20us, 90us, 110us, 300us, 2000us};
  for (int n : {2, 3, ThreadPool::default_threads() + 1, oversubscribed_threads()}) {
    ThreadPool pool(n);
    std::mt19937 rng(n);
    std::atomic<int64_t> calls{0};
    within(60s, [&] {
      for (int rep = 0; rep < 500; ++rep) {
        std::this_thread::sleep_for(gaps[rng() % std::size(gaps)]);
        pool.run([&](int, int) { calls.fetch_add(1, std::memory_order_relaxed); });
      }
    });
    EXPECT_EQ(calls.load(), 500 * n);
  }
}

TEST(ThreadPool, ShutsDownWithWorkersInEveryPhase) {
  within(60s, [] {
    for (auto idle : {0us, 5us, 50us, 150us, 5000us}) {
      for (int rep = 0; rep < 10; ++rep) {
        ThreadPool pool(oversubscribed_threads());
        pool.run([](int, int) {});
        std::this_thread::sleep_for(idle);
      }  // destroyed while its workers pause, yield or sleep
    }
  });
}

TEST(ThreadPool, ExceptionOnAWorkerIndexIsRethrownAfterAllIndicesRan) {
  ThreadPool pool(4);
  for (int rep = 0; rep < 50; ++rep) {
    std::atomic<int> finished{0};
    EXPECT_THROW(pool.run([&](int i, int total) {
      if (i == total - 1 || i == 1) fail("boom ", i);
      finished.fetch_add(1);
    }),
                 Error);
    EXPECT_EQ(finished.load(), 2);
  }
  std::atomic<int> calls{0};
  pool.run([&](int, int) { calls.fetch_add(1); });
  EXPECT_EQ(calls.load(), 4);
}

TEST(ThreadPool, CallerFinishesTheRegionWhenWorkersAreBusyElsewhere) {
  // Index 0 waits until every other index has run; whichever thread takes it, the others must
  // be run by the remaining threads. With a static index-per-thread split this still works; the
  // point is that no index is tied to a thread that cannot get to it.
  ThreadPool pool(3);
  within(30s, [&] {
    for (int rep = 0; rep < 200; ++rep) {
      std::atomic<int> others{0};
      pool.run([&](int i, int total) {
        if (i == 0) {
          while (others.load() != total - 1) std::this_thread::yield();
        } else {
          others.fetch_add(1);
        }
      });
    }
  });
}

TEST(ThreadCount, ZeroMeansEveryCpuAndAbsurdCountsAreCapped) {
  const int cpus = ThreadPool::default_threads();
  ASSERT_GE(cpus, 1);
  EXPECT_EQ(resolve_thread_count(0).n, cpus);
  EXPECT_EQ(resolve_thread_count(-5).n, cpus);
  EXPECT_TRUE(resolve_thread_count(0).warning.empty());
  EXPECT_EQ(resolve_thread_count(1).n, 1);
  const ThreadCount at_cap = resolve_thread_count(kMaxThreadsPerCpu * cpus);
  EXPECT_EQ(at_cap.n, kMaxThreadsPerCpu * cpus);
  EXPECT_TRUE(at_cap.warning.empty());
  const ThreadCount absurd = resolve_thread_count(10000);
  EXPECT_EQ(absurd.n, cpus);
  EXPECT_NE(absurd.warning.find("10000 threads"), std::string::npos) << absurd.warning;
  EXPECT_EQ(absurd.warning.find('\n'), std::string::npos);
  EXPECT_EQ(ThreadPool(10000).size(), cpus);
}

}  // namespace
}  // namespace qf
