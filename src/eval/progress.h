// A progress line with ETA on stderr for long runs: redrawn in place on a terminal, one line
// every `log_every` seconds otherwise (CI logs, redirected output).
#pragma once
#include <chrono>
#include <functional>
#include <string>

namespace qf::eval {

class Progress {
 public:
  // total: work units (any unit; ETA assumes they take equal time). enabled=false prints nothing.
  Progress(std::string label, double total, bool enabled = true, double log_every = 30.0);
  ~Progress();
  void add_total(double units) { total_ += units; }
  // Marks `units` more as done; `note` says what is running (shown on the line).
  void advance(double units, const std::string& note = {});
  // Units skipped (resumed from disk): counted as done but left out of the speed estimate.
  void skip(double units);
  // Final line with the elapsed time.
  void finish();
  double elapsed() const;

 private:
  void draw(bool force);

  std::string label_, note_;
  double total_, done_ = 0, skipped_ = 0;
  bool enabled_, tty_, finished_ = false;
  double log_every_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

// A caller that must be able to stop a long evaluation (the Python bindings, on Ctrl-C) installs
// a poll for the thread that runs it: every Progress::advance on that thread, and the few long
// steps that advance rarely, call it, and it may throw to abandon the run. The cell log keeps the
// cells already finished. One poll per thread; the previous one is restored on destruction.
class ScopedInterruptPoll {
 public:
  explicit ScopedInterruptPoll(std::function<void()> poll);
  ~ScopedInterruptPoll();
  ScopedInterruptPoll(const ScopedInterruptPoll&) = delete;
  ScopedInterruptPoll& operator=(const ScopedInterruptPoll&) = delete;

 private:
  std::function<void()> previous_;
};

// Calls the calling thread's poll, if one is installed (may throw whatever the poll throws).
void poll_interrupt();

// "1h02m", "3m05s", "12s".
std::string format_duration(double seconds);

}  // namespace qf::eval
