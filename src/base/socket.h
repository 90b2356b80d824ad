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

inline Deadline deadline_after(std::chrono::milliseconds timeout) {
  return std::chrono::steady_clock::now() + timeout;
}

// A listening Unix stream socket at `path`, replacing a stale socket file left there.
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

}  // namespace deltavm
