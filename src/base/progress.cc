#include "base/progress.h"

#include <fmt/format.h>

#include <unistd.h>

#include <cstdio>

namespace deltavm {

Progress::Progress(std::string label, uint64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total),
      enabled_(enabled && ::isatty(STDERR_FILENO)),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

Progress::~Progress() {
  if (shown_) {
    update(total_);
    fmt::print(stderr, "\n");
  }
}

void Progress::update(uint64_t done) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (now - start_ < std::chrono::seconds(1)) return;
  if (shown_ && done < total_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  shown_ = true;
  double percent = total_ == 0 ? 100.0 : 100.0 * static_cast<double>(done) / static_cast<double>(total_);
  fmt::print(stderr, "\r{}: {:5.1f}%", label_, percent);
  std::fflush(stderr);
}

}  // namespace deltavm
