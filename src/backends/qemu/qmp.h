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

  // Waits for migration (incoming or outgoing) to reach "completed"; "failed" is an error.
  Status wait_for_migration(std::chrono::milliseconds timeout);

 private:
  QmpClient(Fd fd, std::string socket) : fd_(std::move(fd)), socket_(std::move(socket)) {}
  Result<nlohmann::json> read_message(Deadline deadline);

  Fd fd_;
  std::string socket_;
  std::string buffer_;
};

}  // namespace deltavm
