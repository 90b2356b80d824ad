#include "backends/agent_client.h"

#include <fcntl.h>
#include <sys/file.h>

#include <random>

#include "base/socket.h"

namespace deltavm {
namespace {

// The most output one command may return: a guest cannot make the host buffer without bound.
constexpr uint64_t kMaxBlockBytes = 64ull << 20;

struct Header {
  char kind = 0;
  uint64_t id = 0;
  uint64_t number = 0;  // Block length for O and E, exit status for S.
};

// Parses "<kind> <id> <number>"; false for any other line.
bool parse_header(const std::string& line, Header& header) {
  unsigned long long id = 0, number = 0;
  char kind = 0;
  if (std::sscanf(line.c_str(), "%c %llu %llu", &kind, &id, &number) != 3) return false;
  if (kind != 'O' && kind != 'E' && kind != 'S') return false;
  header = Header{kind, id, number};
  return true;
}

}  // namespace

Result<ExecResult> agent_exec(const std::filesystem::path& agent_socket, std::string_view command,
                              std::chrono::milliseconds timeout) {
  Deadline deadline = deadline_after(timeout);
  std::filesystem::path lock_path = agent_socket;
  lock_path += ".lock";
  DELTAVM_ASSIGN_OR_RETURN(Fd lock, open_file(lock_path, O_RDWR | O_CREAT, 0600));
  while (::flock(lock.get(), LOCK_EX) != 0) {
    if (errno != EINTR) return errno_error(fmt::format("flock {}", lock_path.string()), errno);
  }
  DELTAVM_ASSIGN_OR_RETURN(Fd socket, connect_unix(agent_socket, deadline));
  static thread_local std::mt19937_64 random{std::random_device{}()};
  uint64_t id = random() >> 1;
  std::string what = fmt::format("agent {}", agent_socket.string());
  // The leading newline ends any half-sent request an interrupted client left behind.
  DELTAVM_TRY(send_all(socket.get(), fmt::format("\nX {} {}\n", id, command.size()), what));
  DELTAVM_TRY(send_all(socket.get(), command, what));

  std::string buffer;
  ExecResult result;
  // Reads the next line; stale output of earlier requests (other ids) is skipped by the caller.
  auto next_line = [&](std::string& line) -> Status {
    for (;;) {
      size_t newline = buffer.find('\n');
      if (newline != std::string::npos) {
        line = buffer.substr(0, newline);
        buffer.erase(0, newline + 1);
        return {};
      }
      DELTAVM_TRY(read_some(socket.get(), buffer, deadline, what));
    }
  };
  auto read_block = [&](uint64_t length, std::string& out) -> Status {
    while (buffer.size() < length) DELTAVM_TRY(read_some(socket.get(), buffer, deadline, what));
    out = buffer.substr(0, length);
    buffer.erase(0, length);
    return {};
  };
  std::string line, skipped;
  Header header;
  for (;;) {
    DELTAVM_TRY(next_line(line));
    if (!parse_header(line, header)) continue;
    if (header.kind == 'S') {
      if (header.id != id) continue;  // The end of an abandoned earlier request.
      result.exit_status = static_cast<int>(header.number);
      return result;
    }
    if (header.number > kMaxBlockBytes) {
      return make_error(ErrorCode::kIo, "{}: the guest sent a {}-byte block, more than the {} bytes allowed", what,
                        header.number, kMaxBlockBytes);
    }
    // A block of ours is kept; a block of an abandoned request is read past, whole.
    std::string& out = header.id != id ? skipped : header.kind == 'O' ? result.stdout_bytes : result.stderr_bytes;
    DELTAVM_TRY(read_block(header.number, out));
  }
}

}  // namespace deltavm
