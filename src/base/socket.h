// Unix stream sockets with deadlines: connecting to a socket a child process is still
// creating, and reading or writing without ever blocking past a deadline.
#pragma once

#include <chrono>
#include <filesystem>
#include <span>
#include <string>

#include "base/error.h"
#include "base/file.h"

namespace deltavm {

using Deadline = std::chrono::steady_clock::time_point;

inline Deadline deadline_after(std::chrono::milliseconds timeout) { return std::chrono::steady_clock::now() + timeout; }

// A listening Unix stream socket at `path`, replacing a stale socket file left there (one that
// refuses connections); a socket a live process listens on is refused (kBusy), and so is any
// other kind of file.
Result<Fd> listen_unix(const std::filesystem::path& path);

// Connects to the socket at `path`, retrying while it does not exist yet or refuses
// connections, until `deadline`.
Result<Fd> connect_unix(const std::filesystem::path& path, Deadline deadline);

// Waits until `fd` is readable; kIo error "timed out" at the deadline.
Status wait_readable(int fd, Deadline deadline, std::string_view what);

// Reads what is available (at least one byte) and appends it to `buffer`. End of stream is an
// error naming `what`.
Status read_some(int fd, std::string& buffer, Deadline deadline, std::string_view what);

Status send_all(int fd, std::string_view bytes, std::string_view what);

// One newline-delimited channel over a stream socket (QMP, the VMM's control protocol): lines
// of at most `max_line_bytes` (a longer one is an error, and the channel is then unusable),
// read without ever blocking past a deadline.
class LineChannel {
 public:
  LineChannel(Fd fd, std::string what, size_t max_line_bytes)
      : fd_(std::move(fd)), what_(std::move(what)), max_line_bytes_(max_line_bytes) {}

  // The next line, without its newline. End of stream is an error naming the channel.
  Result<std::string> read_line(Deadline deadline);
  // Sends `line` and a newline.
  Status write_line(std::string_view line);
  int fd() const { return fd_.get(); }
  const std::string& what() const { return what_; }

 private:
  Fd fd_;
  std::string what_;
  size_t max_line_bytes_;
  std::string buffer_;
  size_t scanned_ = 0;  // Bytes of buffer_ known to hold no newline.
};

}  // namespace deltavm
