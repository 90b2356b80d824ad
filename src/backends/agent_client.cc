#include "backends/agent_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <thread>

extern "C" {
#include "agent_protocol.h"
}

namespace deltavm {
namespace {

using Clock = std::chrono::steady_clock;

// How long the host waits for the guest's answer after the guest's own timeout has passed.
constexpr auto kAnswerGrace = std::chrono::seconds(5);

Deadline request_deadline(std::chrono::milliseconds timeout) {
  if (timeout.count() <= 0) return Deadline::max();
  return deadline_after(timeout) + kAnswerGrace;
}

std::string header_of(char kind, uint64_t id, std::string_view payload) {
  unsigned char header[AGENT_HEADER_BYTES];
  agent_make_header(header, kind, id, payload.data(), static_cast<uint32_t>(payload.size()));
  return std::string(reinterpret_cast<const char*>(header), sizeof header);
}

uint64_t fresh_id() {
  static thread_local std::mt19937_64 random{std::random_device{}()};
  uint64_t id = 0;
  while (id == 0) id = random();
  return id;
}

}  // namespace

Result<AgentConnection> AgentConnection::connect(const std::filesystem::path& agent_socket, Deadline deadline) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, connect_unix(agent_socket, deadline));
  return AgentConnection(std::move(fd), fmt::format("agent {}", agent_socket.string()));
}

Status AgentConnection::send_frame(char kind, uint64_t id, std::string_view payload, Deadline deadline) {
  std::string frame = header_of(kind, id, payload);
  frame.append(payload);
  std::string_view left = frame;
  while (!left.empty()) {
    // While the guest is slow to take our bytes it may be sending its own: keep reading them,
    // or both sides could wait on each other forever.
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (remaining.count() <= 0) return make_error(ErrorCode::kIo, "{}: timed out sending a request", what_);
    pollfd fd{fd_.get(), POLLIN | POLLOUT, 0};
    int ready = ::poll(&fd, 1, static_cast<int>(std::min<int64_t>(remaining.count(), 1000)));
    if (ready < 0 && errno != EINTR) return errno_error(fmt::format("poll {}", what_), errno);
    if (ready <= 0) continue;
    if (fd.revents & POLLIN) DELTAVM_TRY(receive(deadline));
    if (fd.revents & (POLLOUT | POLLERR | POLLHUP)) {
      ssize_t n = ::send(fd_.get(), left.data(), left.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n < 0) return errno_error(fmt::format("send {}", what_), errno);
      left.remove_prefix(static_cast<size_t>(n));
    }
  }
  return {};
}

Result<uint64_t> AgentConnection::start(const ExecRequest& request, Deadline deadline) {
  if (request.command.size() > kMaxCommandBytes) {
    return make_error(ErrorCode::kInvalidArgument,
                      "the command is {} bytes, more than the {} a guest shell takes as one argument (send a longer "
                      "script on stdin to sh -s)",
                      request.command.size(), kMaxCommandBytes);
  }
  if (request.command.find('\0') != std::string::npos) {
    return make_error(ErrorCode::kInvalidArgument, "the command holds a NUL byte");
  }
  if (request.stdin_bytes && request.stdin_bytes->size() > kMaxStdinBytes) {
    return make_error(ErrorCode::kInvalidArgument, "stdin is {} bytes, more than the {} allowed",
                      request.stdin_bytes->size(), kMaxStdinBytes);
  }
  uint64_t id = fresh_id();
  unsigned char prefix[AGENT_EXEC_PREFIX_BYTES];
  uint64_t timeout_ms = static_cast<uint64_t>(std::max<int64_t>(0, request.timeout.count()));
  agent_put_u32(prefix, static_cast<uint32_t>(std::min<uint64_t>(timeout_ms, UINT32_MAX)));
  agent_put_u32(prefix + 4, request.stdin_bytes ? AGENT_FLAG_STDIN : 0);
  std::string payload(reinterpret_cast<const char*>(prefix), sizeof prefix);
  payload += request.command;
  pending_[id].started = Clock::now();
  pending_[id].max_output_bytes = std::min(request.max_output_bytes, kMaxOutputBytes);
  DELTAVM_TRY(send_frame('X', id, payload, deadline));
  if (request.stdin_bytes) {
    std::string_view input = *request.stdin_bytes;
    for (size_t offset = 0; offset < input.size(); offset += AGENT_MAX_CHUNK_BYTES) {
      DELTAVM_TRY(send_frame('I', id, input.substr(offset, AGENT_MAX_CHUNK_BYTES), deadline));
    }
    DELTAVM_TRY(send_frame('I', id, {}, deadline));  // End of stdin.
  }
  return id;
}

static_assert(kAgentProtocolVersion == AGENT_PROTOCOL_VERSION);

Result<uint64_t> AgentConnection::start_identity(Deadline deadline) {
  uint64_t id = fresh_id();
  unsigned char payload[8 + AGENT_IDENTITY_ENTROPY_BYTES];
  timespec now{};
  ::clock_gettime(CLOCK_REALTIME, &now);
  uint64_t realtime_ns = static_cast<uint64_t>(now.tv_sec) * 1000000000u + static_cast<uint64_t>(now.tv_nsec);
  for (int i = 0; i < 8; ++i) payload[i] = static_cast<unsigned char>(realtime_ns >> (8 * i));
  if (::getrandom(payload + 8, AGENT_IDENTITY_ENTROPY_BYTES, 0) != AGENT_IDENTITY_ENTROPY_BYTES) {
    return errno_error("getrandom", errno);
  }
  pending_[id].started = Clock::now();
  Status sent = send_frame('N', id, std::string_view(reinterpret_cast<const char*>(payload), sizeof payload), deadline);
  ::explicit_bzero(payload, sizeof payload);
  DELTAVM_TRY(sent);
  return id;
}

Status AgentConnection::cancel(uint64_t id) { return send_frame('K', id, {}, deadline_after(std::chrono::seconds(2))); }

Result<std::optional<AgentFrame>> AgentFrameReader::next() {
  const std::optional<AgentFrame> no_frame;
  buffer_.erase(0, consumed_);
  consumed_ = 0;
  // A serial port delivers a few bytes at a time: until the frame begun at the buffer's start
  // is whole, there is nothing to parse.
  if (buffer_.size() < needed_) return no_frame;
  needed_ = 0;
  for (;;) {
    size_t magic = buffer_.find(AGENT_MAGIC);
    if (magic == std::string::npos) {
      // Not a frame: dropped, keeping only what could be the start of the next magic.
      if (buffer_.size() > 3) buffer_.erase(0, buffer_.size() - 3);
      return no_frame;
    }
    buffer_.erase(0, magic);
    if (buffer_.size() < AGENT_HEADER_BYTES) {
      needed_ = AGENT_HEADER_BYTES;
      return no_frame;
    }
    const auto* header = reinterpret_cast<const unsigned char*>(buffer_.data());
    if (!agent_header_valid(header)) {
      buffer_.erase(0, 1);
      continue;
    }
    uint32_t length = agent_get_u32(header + 16);
    if (length > AGENT_MAX_CHUNK_BYTES) {
      return make_error(ErrorCode::kIo, "{}: the guest sent a frame of {} bytes, more than the {} allowed", what_,
                        length, AGENT_MAX_CHUNK_BYTES);
    }
    if (buffer_.size() < AGENT_HEADER_BYTES + length) {
      needed_ = AGENT_HEADER_BYTES + length;
      return no_frame;
    }
    std::string_view payload(buffer_.data() + AGENT_HEADER_BYTES, length);
    if (agent_fnv1a(AGENT_FNV_START, payload.data(), payload.size()) != agent_get_u32(header + 20)) {
      return make_error(ErrorCode::kIo,
                        "{}: a frame from the guest failed its payload check (something else writes to the agent's "
                        "serial port)",
                        what_);
    }
    consumed_ = AGENT_HEADER_BYTES + length;
    return std::optional(AgentFrame{static_cast<char>(header[4]), agent_get_u64(header + 8), payload});
  }
}

Status record_agent_frame(const AgentFrame& frame, AgentCommand& command, std::string_view what) {
  ExecResult& result = command.result;
  switch (frame.kind) {
    case 'O':
    case 'E': {
      std::string& out = frame.kind == 'O' ? result.stdout_bytes : result.stderr_bytes;
      bool& truncated = frame.kind == 'O' ? result.stdout_truncated : result.stderr_truncated;
      size_t room = command.max_output_bytes - std::min(command.max_output_bytes, out.size());
      if (frame.payload.size() > room) truncated = true;
      out.append(frame.payload.substr(0, room));
      return {};
    }
    case 'S': {
      if (frame.payload.size() != 12) {
        return make_error(ErrorCode::kIo, "{}: a status frame of {} bytes, expected 12", what, frame.payload.size());
      }
      const auto* p = reinterpret_cast<const unsigned char*>(frame.payload.data());
      int32_t code = static_cast<int32_t>(agent_get_u32(p));
      uint32_t signal = agent_get_u32(p + 4);
      uint32_t flags = agent_get_u32(p + 8);
      if (code < -1 || code > 255 || signal > 128) {
        return make_error(ErrorCode::kIo, "{}: a status frame with exit code {} and signal {}", what, code, signal);
      }
      result.signal = static_cast<int>(signal);
      result.exit_status = signal != 0 ? 128 + static_cast<int>(signal) : std::max(code, 0);
      result.timed_out = flags & AGENT_STATUS_TIMED_OUT;
      result.cancelled = flags & AGENT_STATUS_CANCELLED;
      result.stdout_truncated |= (flags & AGENT_STATUS_STDOUT_TRUNCATED) != 0;
      result.stderr_truncated |= (flags & AGENT_STATUS_STDERR_TRUNCATED) != 0;
      result.duration_ms = std::chrono::duration<double, std::milli>(Clock::now() - command.started).count();
      command.done = true;
      return {};
    }
    case 'F':
      command.failure = make_error(ErrorCode::kIo, "{}: the guest agent refused the command: {}", what,
                                   std::string(frame.payload.substr(0, 512)));
      command.done = true;
      return {};
    default: return {};
  }
}

Status AgentConnection::receive(Deadline deadline) {
  DELTAVM_TRY(read_some(fd_.get(), reader_.buffer(), deadline, what_));
  if (size_t missing = reader_.bytes_missing(); missing > 0) {
    // Far from whole: let the bytes gather instead of reading them one system call each.
    if (missing > 1024) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return {};
  }
  for (;;) {
    DELTAVM_ASSIGN_OR_RETURN(std::optional<AgentFrame> frame, reader_.next());
    if (!frame) return {};
    // Frames of other commands (one that ended, an abandoned earlier request) are read past.
    auto it = pending_.find(frame->id);
    if (it != pending_.end() && !it->second.done) DELTAVM_TRY(record_agent_frame(*frame, it->second, what_));
  }
}

Result<ExecResult> AgentConnection::wait(uint64_t id, Deadline deadline) {
  auto it = pending_.find(id);
  if (it == pending_.end()) return make_error(ErrorCode::kInvalidArgument, "{}: no command {}", what_, id);
  while (!it->second.done) {
    Status received = receive(deadline);
    if (!received) {
      (void)cancel(id);  // Never leave a command running that the caller was told failed.
      pending_.erase(it);
      return received.error();
    }
  }
  AgentCommand pending = std::move(it->second);
  pending_.erase(it);
  if (pending.failure) return *pending.failure;
  return std::move(pending.result);
}

namespace {

// The VM's exec channel, held: commands of different host processes never interleave on the
// one serial channel.
Result<Fd> lock_channel(const std::filesystem::path& agent_socket, Deadline lock_deadline) {
  std::filesystem::path lock_path = agent_socket;
  lock_path += ".lock";
  DELTAVM_ASSIGN_OR_RETURN(Fd lock, open_file(lock_path, O_RDWR | O_CREAT, 0600));
  while (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK && errno != EINTR) return errno_error(fmt::format("flock {}", lock_path.string()), errno);
    if (Clock::now() >= lock_deadline) {
      return make_error(ErrorCode::kBusy, "agent {}: another command held the VM's exec channel until the timeout",
                        agent_socket.string());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return lock;
}

}  // namespace

Result<ExecResult> agent_exec(const std::filesystem::path& agent_socket, const ExecRequest& request) {
  Deadline deadline = request_deadline(request.timeout);
  // Waiting for the channel counts against the command's own time, without the answer's grace.
  Deadline lock_deadline = request.timeout.count() > 0 ? deadline_after(request.timeout) : Deadline::max();
  DELTAVM_ASSIGN_OR_RETURN(Fd lock, lock_channel(agent_socket, lock_deadline));
  DELTAVM_ASSIGN_OR_RETURN(AgentConnection connection, AgentConnection::connect(agent_socket, deadline));
  DELTAVM_ASSIGN_OR_RETURN(uint64_t id, connection.start(request, deadline));
  return connection.wait(id, deadline);
}

Status agent_refresh_identity(const std::filesystem::path& agent_socket, std::chrono::milliseconds timeout) {
  Deadline deadline = deadline_after(timeout);
  DELTAVM_ASSIGN_OR_RETURN(Fd lock, lock_channel(agent_socket, deadline));
  DELTAVM_ASSIGN_OR_RETURN(AgentConnection connection, AgentConnection::connect(agent_socket, deadline));
  DELTAVM_ASSIGN_OR_RETURN(uint64_t id, connection.start_identity(deadline));
  Result<ExecResult> answer = connection.wait(id, deadline);
  if (!answer) return answer.error().with_context("giving the guest a new identity (clock and entropy)");
  if (answer->exit_status != 0) {
    return make_error(ErrorCode::kIo, "the guest agent refused a new identity (status {})", answer->exit_status);
  }
  return {};
}

Result<ExecResult> agent_exec(const std::filesystem::path& agent_socket, std::string_view command,
                              std::chrono::milliseconds timeout) {
  ExecRequest request;
  request.command = std::string(command);
  request.timeout = timeout;
  return agent_exec(agent_socket, request);
}

}  // namespace deltavm
