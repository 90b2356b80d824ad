#include "base/socket.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>

namespace deltavm {

Result<Fd> listen_unix(const std::filesystem::path& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.string().size() >= sizeof address.sun_path) {
    return make_error(ErrorCode::kInvalidArgument, "socket path {} is longer than {} bytes", path.string(),
                      sizeof address.sun_path - 1);
  }
  std::strcpy(address.sun_path, path.c_str());
  Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return errno_error("socket", errno);
  // A socket file left by a process that died is replaced; one that a live process still
  // listens on is not (stealing it would cut that process off from its clients).
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return make_error(ErrorCode::kAlreadyExists, "{} exists and is not a socket; refusing to replace it",
                        path.string());
    }
    Fd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!probe.valid()) return errno_error("socket", errno);
    if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
      return make_error(ErrorCode::kBusy, "socket {} is in use by a live process", path.string());
    }
    if (errno != ECONNREFUSED) return errno_error(fmt::format("probe {}", path.string()), errno);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return errno_error(fmt::format("remove stale socket {}", path.string()), errno);
    }
  }
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    return errno_error(fmt::format("bind {}", path.string()), errno);
  }
  if (::listen(fd.get(), 4) != 0) return errno_error(fmt::format("listen {}", path.string()), errno);
  return fd;
}

Result<Fd> connect_unix(const std::filesystem::path& path, Deadline deadline) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.string().size() >= sizeof address.sun_path) {
    return make_error(ErrorCode::kInvalidArgument, "socket path {} is longer than {} bytes", path.string(),
                      sizeof address.sun_path - 1);
  }
  std::strcpy(address.sun_path, path.c_str());
  for (;;) {
    Fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd.valid()) return errno_error("socket", errno);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) return fd;
    int saved = errno;
    if (saved != ENOENT && saved != ECONNREFUSED) return errno_error(fmt::format("connect {}", path.string()), saved);
    if (std::chrono::steady_clock::now() >= deadline) {
      return make_error(ErrorCode::kIo, "connect {}: timed out: {}", path.string(), std::strerror(saved));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

Status wait_readable(int fd, Deadline deadline, std::string_view what) {
  for (;;) {
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (remaining.count() <= 0) return make_error(ErrorCode::kIo, "{}: timed out", what);
    pollfd poll_fd{fd, POLLIN, 0};
    int ready = ::poll(&poll_fd, 1, static_cast<int>(std::min<int64_t>(remaining.count(), 60000)));
    if (ready > 0) return {};
    if (ready < 0 && errno != EINTR) return errno_error(fmt::format("poll {}", what), errno);
  }
}

Status read_some(int fd, std::string& buffer, Deadline deadline, std::string_view what) {
  DELTAVM_TRY(wait_readable(fd, deadline, what));
  char chunk[65536];
  for (;;) {
    ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n > 0) {
      buffer.append(chunk, static_cast<size_t>(n));
      return {};
    }
    if (n == 0) return make_error(ErrorCode::kIo, "{}: connection closed", what);
    if (errno != EINTR) return errno_error(fmt::format("read {}", what), errno);
  }
}

Status send_all(int fd, std::string_view bytes, std::string_view what) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(fmt::format("send {}", what), errno);
    }
    bytes.remove_prefix(static_cast<size_t>(n));
  }
  return {};
}

Result<std::string> LineChannel::read_line(Deadline deadline) {
  for (;;) {
    size_t newline = buffer_.find('\n', scanned_);
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      scanned_ = 0;
      return line;
    }
    scanned_ = buffer_.size();
    if (buffer_.size() > max_line_bytes_) {
      return make_error(ErrorCode::kIo, "{}: a line longer than {} bytes", what_, max_line_bytes_);
    }
    DELTAVM_TRY(read_some(fd_.get(), buffer_, deadline, what_));
  }
}

Status LineChannel::write_line(std::string_view line) {
  std::string text(line);
  text += '\n';
  return send_all(fd_.get(), text, what_);
}

}  // namespace deltavm
