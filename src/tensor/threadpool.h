// A persistent pool of worker threads that degrades gracefully when it shares the cores.
//
// Decode issues a few hundred small parallel regions per token, so idle workers spin briefly
// (and yield the core now and then) before they block on a condition variable: waking a thread
// through the kernel on every matmul would cost more than the matmul. The indices of a region
// are claimed from a shared counter rather than fixed to threads, so a region finishes as soon
// as *some* threads have run every index: a worker the OS has descheduled (more threads than
// cores, or a busy neighbour process) does not stall everyone for a scheduler time slice.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace qf {

// A requested thread count, made safe: <= 0 means every CPU this process may run on; counts
// above kMaxThreadsPerCpu x CPUs (never useful, and -t 10000 would spend its time creating
// threads) are capped, with a one-line warning for the user.
struct ThreadCount {
  int n = 1;
  std::string warning;  // empty unless the request was changed
};
inline constexpr int kMaxThreadsPerCpu = 4;
ThreadCount resolve_thread_count(int requested);

class ThreadPool {
 public:
  // n_threads as for resolve_thread_count (capped silently here; the CLI prints the warning).
  // The calling thread is one of the threads.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(index, size()) once for every index in [0, size()) and returns when all are done.
  // Which OS thread runs an index is not fixed (fn may use `index` to pick per-thread scratch,
  // but not thread_local state that must persist between regions). If fn throws, the other
  // indices still run and the first exception is rethrown here. Not re-entrant: fn must not
  // call run() on the same pool.
  void run(const std::function<void(int, int)>& fn);

  // Splits [0, n) into contiguous chunks of at least `grain` items, at most size() of them (the
  // chunks depend only on n, grain and size(), never on timing), and runs fn(begin, end) on each.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // CPUs this process may run on (its affinity mask), at least 1.
  static int default_threads();

 private:
  void worker();
  // Claims and runs indices of `generation` until none are left.
  void run_claimed(uint32_t generation);
  void run_index(int index);
  // Spins, then blocks until a generation other than `seen` is published (or stop).
  uint32_t wait_for_work(uint32_t seen);
  void wait_until_done();

  int n_threads_;
  std::vector<std::thread> threads_;
  std::atomic<const std::function<void(int, int)>*> job_{nullptr};
  // High 32 bits: generation of the current region; low 32 bits: next unclaimed index. One word,
  // so a late worker can never claim an index of a region it did not see published.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int> done_{0};  // indices finished in the current region
  std::atomic<bool> stop_{false};
  uint32_t generation_ = 0;  // written by the calling thread only

  std::mutex mu_;
  std::condition_variable work_cv_;  // workers sleep here between regions
  std::condition_variable done_cv_;  // the caller sleeps here while a region finishes
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_sleeping_{false};
  std::exception_ptr error_;  // first exception of the current region, guarded by mu_
};

}  // namespace qf
