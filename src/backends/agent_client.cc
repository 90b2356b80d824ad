#include "backends/agent_client.h"

#include <fcntl.h>
#include <sys/file.h>

#include <random>

#include "base/socket.h"

namespace deltavm {
namespace {

// Parses "<kind> <id> <number>" and checks kind and id.
bool parse_header(const std::string& line, char kind, uint64_t id, uint64_t& number) {
  unsigned long long found_id = 0, value = 0;
  char found_kind = 0;
  if (std::sscanf(line.c_str(), "%c %llu %llu", &found_kind, &found_id, &value) != 3) return false;
  if (found_kind != kind || found_id != id) return false;
  number = value;
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
  std::string line;
  uint64_t number = 0;
  for (;;) {
    DELTAVM_TRY(next_line(line));
    if (parse_header(line, 'O', id, number)) {
      DELTAVM_TRY(read_block(number, result.stdout_bytes));
    } else if (parse_header(line, 'E', id, number)) {
      DELTAVM_TRY(read_block(number, result.stderr_bytes));
    } else if (parse_header(line, 'S', id, number)) {
      result.exit_status = static_cast<int>(number);
      return result;
    }
  }
}

}  // namespace deltavm
