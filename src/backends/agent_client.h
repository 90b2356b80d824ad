// The host side of the guest command agent (guest/agent.c; the frames are defined in
// guest/agent_protocol.h): runs commands in a VM over its agent socket and collects their
// stdout, stderr and exit status.
//
// Everything read from the guest is hostile until checked: frames are found by magic and
// header check, a payload is taken only whole and checked, and what one command may return is
// bounded (kMaxOutputBytes a stream, flagged when cut), so a guest that floods or lies costs
// the host bounded memory and at most the request's deadline.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "base/error.h"
#include "base/file.h"
#include "base/socket.h"

namespace deltavm {

inline constexpr size_t kMaxCommandBytes = 131071;
// The agent protocol this tree's agent speaks (guest/agent_protocol.h); a template records the
// version of the agent its initramfs holds. 3 added the identity frame.
inline constexpr uint32_t kAgentProtocolVersion = 3;
inline constexpr size_t kMaxStdinBytes = 16 << 20;
inline constexpr size_t kMaxOutputBytes = 16 << 20;  // Per stream, per command.

struct ExecRequest {
  std::string command;                     // Run as /bin/sh -c COMMAND; at most kMaxCommandBytes.
  std::optional<std::string> stdin_bytes;  // Else stdin is /dev/null. At most kMaxStdinBytes.
  // The guest kills the command's process group after this long (0: never); the host then
  // waits a little more for the guest's answer and, without one, cancels and reports a timeout.
  std::chrono::milliseconds timeout{std::chrono::seconds(60)};
  size_t max_output_bytes = kMaxOutputBytes;  // Kept of each stream (at most kMaxOutputBytes); the rest is cut.
};

struct ExecResult {
  int exit_status = 0;     // 0-255, or 128 + the signal that ended the command.
  int signal = 0;          // The signal that ended it, or 0.
  bool timed_out = false;  // Killed by the guest when its timeout passed.
  bool cancelled = false;  // Killed on the host's request.
  bool stdout_truncated = false;
  bool stderr_truncated = false;
  std::string stdout_bytes;
  std::string stderr_bytes;
  double duration_ms = 0;
};

// One frame from the guest whose header and payload passed their checks.
struct AgentFrame {
  char kind = 0;
  uint64_t id = 0;
  std::string_view payload;  // Valid until the reader is next appended to or advanced.
};

// Finds whole, checked frames in the bytes a guest sends (guest/agent_protocol.h). Bytes that
// are not a frame are skipped; a frame longer than AGENT_MAX_CHUNK_BYTES or whose payload fails
// its check is an error. Holds at most one frame's bytes beyond what append() is given.
class AgentFrameReader {
 public:
  explicit AgentFrameReader(std::string what) : what_(std::move(what)) {}
  void append(std::string_view bytes) { buffer_.append(bytes); }
  // The next whole frame, nullopt until one is whole. The frame returned last is dropped.
  Result<std::optional<AgentFrame>> next();
  // Bytes the frame at the buffer's start still lacks (0: unknown or none).
  size_t bytes_missing() const { return needed_ > buffer_.size() ? needed_ - buffer_.size() : 0; }
  std::string& buffer() { return buffer_; }

 private:
  std::string what_;
  std::string buffer_;
  size_t consumed_ = 0;  // Bytes of the frame returned last, dropped by the next call.
  size_t needed_ = 0;    // Bytes the frame at the start of buffer_ needs to be whole.
};

// What one command has returned so far.
struct AgentCommand {
  ExecResult result;
  std::chrono::steady_clock::time_point started;
  size_t max_output_bytes = kMaxOutputBytes;
  bool done = false;
  std::optional<Error> failure;  // An F frame: the command did not run (or stopped).
};

// Files a frame of the command under `command`: output is kept up to its bound, a status or a
// failure ends it. A frame that lies (a bad status) is an error; one of an unknown kind is
// ignored.
Status record_agent_frame(const AgentFrame& frame, AgentCommand& command, std::string_view what);

// One connection to a VM's agent. Several commands may run over it at once: start() sends
// one and returns its id, wait() collects the answer of one (keeping what arrives for the
// others). Not thread-safe: one thread uses a connection.
class AgentConnection {
 public:
  static Result<AgentConnection> connect(const std::filesystem::path& agent_socket, Deadline deadline);

  Result<uint64_t> start(const ExecRequest& request, Deadline deadline);
  // Sends the guest a new identity (an N frame: the host's clock and fresh entropy); wait()
  // collects its answer like a command's.
  Result<uint64_t> start_identity(Deadline deadline);
  // Waits for command `id` to end. At the deadline the command is cancelled in the guest and
  // the error says it timed out.
  Result<ExecResult> wait(uint64_t id, Deadline deadline);
  Status cancel(uint64_t id);

 private:
  AgentConnection(Fd fd, std::string what) : fd_(std::move(fd)), what_(what), reader_(std::move(what)) {}
  // Reads what the socket has (waiting until `deadline` for something) and files every whole
  // frame under its command.
  Status receive(Deadline deadline);
  Status send_frame(char kind, uint64_t id, std::string_view payload, Deadline deadline);

  Fd fd_;
  std::string what_;
  AgentFrameReader reader_;
  std::map<uint64_t, AgentCommand> pending_;
};

// Runs one command: waits (until the request's deadline) for the VM's exec lock, connects,
// sends the command and waits for its answer. The lock keeps commands of different host
// processes from interleaving on the one serial channel.
Result<ExecResult> agent_exec(const std::filesystem::path& agent_socket, const ExecRequest& request);
// Gives the guest the host's wall clock and fresh entropy, its random number generator
// reseeded at once (the N frame of guest/agent_protocol.h): what every load of a VM does
// before the VM is handed out, so that clones of one snapshot share neither random numbers
// nor a stale clock. Needs an agent of protocol version 3 or later.
Status agent_refresh_identity(const std::filesystem::path& agent_socket, std::chrono::milliseconds timeout);
// The same, for a command without stdin.
Result<ExecResult> agent_exec(const std::filesystem::path& agent_socket, std::string_view command,
                              std::chrono::milliseconds timeout);

}  // namespace deltavm
