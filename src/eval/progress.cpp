#include "eval/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <utility>

namespace qf::eval {

namespace {
thread_local std::function<void()> t_interrupt_poll;
}  // namespace

ScopedInterruptPoll::ScopedInterruptPoll(std::function<void()> poll) : previous_(std::move(t_interrupt_poll)) {
  t_interrupt_poll = std::move(poll);
}

ScopedInterruptPoll::~ScopedInterruptPoll() { t_interrupt_poll = std::move(previous_); }

void poll_interrupt() {
  if (t_interrupt_poll) t_interrupt_poll();
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long t = std::lround(s);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

Progress::Progress(std::string label, double total, bool enabled, double log_every)
    : label_(std::move(label)), total_(total), enabled_(enabled), tty_(isatty(STDERR_FILENO) != 0),
      log_every_(log_every), start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() {
  if (enabled_ && tty_ && !finished_) std::fputc('\n', stderr);
}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::advance(double units, const std::string& note) {
  done_ += units;
  if (!note.empty()) note_ = note;
  draw(false);
  poll_interrupt();
}

void Progress::skip(double units) {
  done_ += units;
  skipped_ += units;
}

void Progress::draw(bool force) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_draw_).count();
  if (!force && since < (tty_ ? 0.25 : log_every_)) return;
  last_draw_ = now;
  const double el = elapsed();
  const double frac = total_ > 0 ? std::clamp(done_ / total_, 0.0, 1.0) : 1.0;
  const double worked = done_ - skipped_;
  const double eta = worked > 0 ? el / worked * std::max(0.0, total_ - done_) : NAN;
  constexpr int kWidth = 24;
  std::string bar(kWidth, ' ');
  for (int i = 0; i < static_cast<int>(frac * kWidth); ++i) bar[i] = '#';
  std::fprintf(stderr, "%s[%s] %3.0f%% |%s| %s elapsed, ETA %s  %s%s", tty_ ? "\r" : "", label_.c_str(), frac * 100,
               bar.c_str(), format_duration(el).c_str(), format_duration(eta).c_str(), note_.c_str(),
               tty_ ? "\033[K" : "\n");
  std::fflush(stderr);
}

void Progress::finish() {
  if (!enabled_ || finished_) return;
  finished_ = true;
  if (tty_) std::fputc('\r', stderr);
  std::fprintf(stderr, "[%s] done in %s%s\n", label_.c_str(), format_duration(elapsed()).c_str(), tty_ ? "\033[K" : "");
  std::fflush(stderr);
}

}  // namespace qf::eval
