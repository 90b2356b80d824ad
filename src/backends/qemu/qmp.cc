#include "backends/qemu/qmp.h"

#include <thread>

namespace deltavm {

Result<QmpClient> QmpClient::connect(const std::filesystem::path& socket, Deadline deadline) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, connect_unix(socket, deadline));
  QmpClient client(std::move(fd), socket.string());
  DELTAVM_ASSIGN_OR_RETURN(nlohmann::json greeting, client.read_message(deadline));
  if (!greeting.contains("QMP")) {
    return make_error(ErrorCode::kIo, "QMP {}: expected a greeting, got {}", client.socket_, greeting.dump());
  }
  DELTAVM_TRY(client.execute("qmp_capabilities"));
  return client;
}

Result<nlohmann::json> QmpClient::read_message(Deadline deadline) {
  for (;;) {
    size_t newline = buffer_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      nlohmann::json message = nlohmann::json::parse(line, nullptr, false);
      if (message.is_discarded()) {
        return make_error(ErrorCode::kIo, "QMP {}: unparsable message {}", socket_, line.substr(0, 200));
      }
      return message;
    }
    DELTAVM_TRY(read_some(fd_.get(), buffer_, deadline, fmt::format("QMP {}", socket_)));
  }
}

Result<nlohmann::json> QmpClient::execute(std::string_view command, const nlohmann::json& arguments,
                                          std::chrono::milliseconds timeout) {
  nlohmann::json request = {{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  DELTAVM_TRY(send_all(fd_.get(), request.dump() + "\n", fmt::format("QMP {}", socket_)));
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json message, read_message(deadline));
    if (message.contains("event")) continue;
    if (message.contains("return")) return message["return"];
    if (message.contains("error")) {
      return make_error(ErrorCode::kIo, "QMP {}: {}: {}", socket_, command,
                        message["error"].value("desc", message["error"].dump()));
    }
  }
}

Status QmpClient::wait_for_migration(std::chrono::milliseconds timeout) {
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json status, execute("query-migrate"));
    std::string state = status.value("status", "");
    if (state == "completed") return {};
    if (state == "failed" || state == "cancelled") {
      return make_error(ErrorCode::kIo, "QMP {}: migration {}: {}", socket_, state, status.value("error-desc", ""));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return make_error(ErrorCode::kIo, "QMP {}: migration still {} after {} ms", socket_, state, timeout.count());
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
}

}  // namespace deltavm
