// A client for QEMU's machine protocol (QMP) over a Unix socket: one JSON object per line;
// after the greeting, qmp_capabilities; each command answered by {"return": ...} or
// {"error": {"class", "desc"}}; asynchronous {"event": ...} lines may arrive at any time.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>

#include "base/socket.h"

namespace deltavm {

class QmpClient {
 public:
  // Connects (retrying until the socket exists or the deadline passes), reads the greeting and
  // negotiates capabilities.
  static Result<QmpClient> connect(const std::filesystem::path& socket, Deadline deadline);

  // Runs `command` and returns its "return" value; a QMP error becomes an Error carrying
  // QEMU's description.
  Result<nlohmann::json> execute(std::string_view command, const nlohmann::json& arguments = nullptr,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(30));

  // Hands `fd` to QEMU under `name` (QMP getfd, the fd passed with SCM_RIGHTS), for commands
  // that take "fd:NAME", such as a migration to or from a file deltavm opened.
  Status send_fd(std::string_view name, int fd);

  // Waits for migration (incoming or outgoing) to reach "completed"; "failed" is an error.
  Status wait_for_migration(std::chrono::milliseconds timeout);

 private:
  QmpClient(Fd fd, std::string socket)
      : channel_(std::move(fd), fmt::format("QMP {}", socket), kMaxMessageBytes), socket_(std::move(socket)) {}
  // QMP messages are small; a line longer than this is not QMP.
  static constexpr size_t kMaxMessageBytes = 1 << 20;
  Result<nlohmann::json> read_message(Deadline deadline);
  // Reads until the answer to the command just sent; events are skipped.
  Result<nlohmann::json> read_answer(std::string_view command, Deadline deadline);

  LineChannel channel_;
  std::string socket_;
};

}  // namespace deltavm
