// Progress for long operations, on stderr when it is a terminal. Silent for the first second,
// so that quick operations print nothing; after that one line is redrawn at most ten times a
// second.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace deltavm {

class Progress {
 public:
  // `total` is in the caller's unit (bytes, pages); `enabled` false makes every call a no-op.
  Progress(std::string label, uint64_t total, bool enabled);
  ~Progress();
  void update(uint64_t done);

 private:
  std::string label_;
  uint64_t total_;
  bool enabled_;
  bool shown_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace deltavm
