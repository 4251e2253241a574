#include "tensor/threadpool.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QF_CPU_RELAX() _mm_pause()
#else
#define QF_CPU_RELAX() std::this_thread::yield()
#endif

namespace qf {

namespace {

using Clock = std::chrono::steady_clock;

// Waiting is three phases. A few pause instructions (a couple of microseconds) catch the common
// decode case, where the next region starts right after the last. Then yields until kSpinTime:
// free when nothing else wants the core, but when more threads are runnable than there are cores
// they let the thread we wait for run. Then block, so idle threads cost nothing (between tokens,
// or when the pool is larger than the machine).
constexpr int kPauseSpins = 64;
constexpr auto kSpinTime = std::chrono::microseconds(100);

// Returns true as soon as ready() does, false once the spin budget is spent.
template <class Ready>
bool spin_until(const Ready& ready) {
  for (int spin = 0; spin < kPauseSpins; ++spin) {
    if (ready()) return true;
    QF_CPU_RELAX();
  }
  const Clock::time_point deadline = Clock::now() + kSpinTime;
  for (;;) {
    for (int spin = 0; spin < 8; ++spin) {
      if (ready()) return true;
      QF_CPU_RELAX();
    }
    if (Clock::now() >= deadline) return ready();
    std::this_thread::yield();
  }
}

constexpr uint64_t kIndexMask = 0xffffffffu;
uint32_t generation_of(uint64_t ticket) { return static_cast<uint32_t>(ticket >> 32); }
uint32_t index_of(uint64_t ticket) { return static_cast<uint32_t>(ticket & kIndexMask); }

}  // namespace

int ThreadPool::default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

ThreadCount resolve_thread_count(int requested) {
  const int cpus = ThreadPool::default_threads();
  if (requested <= 0) return {cpus, ""};
  const int cap = kMaxThreadsPerCpu * cpus;
  if (requested <= cap) return {requested, ""};
  return {cpus, "warning: " + std::to_string(requested) + " threads is more than " + std::to_string(kMaxThreadsPerCpu) +
                    " per CPU (" + std::to_string(cpus) + " CPUs available); using " + std::to_string(cpus)};
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(resolve_thread_count(n_threads).n) {
  threads_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this] { worker(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

uint32_t ThreadPool::wait_for_work(uint32_t seen) {
  const auto published = [&] {
    return generation_of(ticket_.load(std::memory_order_acquire)) != seen || stop_.load(std::memory_order_relaxed);
  };
  if (!spin_until(published)) {
    std::unique_lock<std::mutex> lock(mu_);
    sleepers_.fetch_add(1);
    work_cv_.wait(lock, published);
    sleepers_.fetch_sub(1);
  }
  return generation_of(ticket_.load(std::memory_order_acquire));
}

void ThreadPool::worker() {
  uint32_t seen = 0;
  for (;;) {
    seen = wait_for_work(seen);
    if (stop_.load()) return;
    run_claimed(seen);
  }
}

void ThreadPool::run_claimed(uint32_t generation) {
  uint64_t ticket = ticket_.load(std::memory_order_acquire);
  while (generation_of(ticket) == generation && index_of(ticket) < static_cast<uint32_t>(n_threads_)) {
    if (ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      run_index(static_cast<int>(index_of(ticket)));
      ticket = ticket_.load(std::memory_order_acquire);
    }
  }
}

void ThreadPool::run_index(int index) {
  // The region cannot finish before this index is counted done, so job_ is still this region's.
  try {
    (*job_.load(std::memory_order_acquire))(index, n_threads_);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_) error_ = std::current_exception();
  }
  if (done_.fetch_add(1) + 1 == n_threads_ && caller_sleeping_.load()) {
    std::lock_guard<std::mutex> lock(mu_);  // the caller is either before its check or waiting
    done_cv_.notify_one();
  }
}

void ThreadPool::wait_until_done() {
  const auto finished = [&] { return done_.load() == n_threads_; };
  if (spin_until(finished)) return;
  std::unique_lock<std::mutex> lock(mu_);
  caller_sleeping_.store(true);
  done_cv_.wait(lock, finished);
  caller_sleeping_.store(false);
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (n_threads_ == 1) {
    fn(0, 1);
    return;
  }
  job_.store(&fn, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  error_ = nullptr;
  ++generation_;
  {
    // Publishing under the mutex pairs with the sleepers' predicate check: no lost wake-up.
    std::lock_guard<std::mutex> lock(mu_);
    ticket_.store(static_cast<uint64_t>(generation_) << 32, std::memory_order_release);
  }
  if (sleepers_.load() > 0) work_cv_.notify_all();
  run_claimed(generation_);  // the caller works too, and alone if no worker gets a core
  wait_until_done();
  job_.store(nullptr, std::memory_order_relaxed);
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int chunks = static_cast<int>(std::min<int64_t>(n_threads_, max_chunks));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  run([&](int i, int) {
    if (i >= chunks) return;
    const int64_t begin = n * i / chunks, end = n * (i + 1) / chunks;
    if (begin < end) fn(begin, end);
  });
}

}  // namespace qf
