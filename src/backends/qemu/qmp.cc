#include "backends/qemu/qmp.h"

#include "base/json_fields.h"

#include <sys/socket.h>

#include <cstring>
#include <thread>

namespace deltavm {

Result<QmpClient> QmpClient::connect(const std::filesystem::path& socket, Deadline deadline) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, connect_unix(socket, deadline));
  QmpClient client(std::move(fd), socket.string());
  DELTAVM_ASSIGN_OR_RETURN(nlohmann::json greeting, client.read_message(deadline));
  if (!greeting.contains("QMP")) {
    return make_error(ErrorCode::kIo, "QMP {}: expected a greeting, got {}", client.socket_, dump_json(greeting));
  }
  DELTAVM_TRY(client.execute("qmp_capabilities"));
  return client;
}

Result<nlohmann::json> QmpClient::read_message(Deadline deadline) {
  DELTAVM_ASSIGN_OR_RETURN(std::string line, channel_.read_line(deadline));
  nlohmann::json message = nlohmann::json::parse(line, nullptr, false);
  if (message.is_discarded() || !message.is_object()) {
    return make_error(ErrorCode::kIo, "QMP {}: unparsable message {}", socket_, line.substr(0, 200));
  }
  return message;
}

Result<nlohmann::json> QmpClient::read_answer(std::string_view command, Deadline deadline) {
  for (;;) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json message, read_message(deadline));
    if (message.contains("event")) continue;
    if (auto it = message.find("return"); it != message.end()) return *it;
    if (auto it = message.find("error"); it != message.end()) {
      std::string description = it->is_object() && it->contains("desc") && (*it)["desc"].is_string()
                                    ? (*it)["desc"].get<std::string>()
                                    : it->dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      return make_error(ErrorCode::kIo, "QMP {}: {}: {}", socket_, command, description);
    }
  }
}

Result<nlohmann::json> QmpClient::execute(std::string_view command, const nlohmann::json& arguments,
                                          std::chrono::milliseconds timeout) {
  nlohmann::json request = {{"execute", command}};
  if (!arguments.is_null()) request["arguments"] = arguments;
  DELTAVM_TRY(channel_.write_line(dump_json(request)));
  return read_answer(command, deadline_after(timeout));
}

Status QmpClient::send_fd(std::string_view name, int fd) {
  nlohmann::json request = {{"execute", "getfd"}, {"arguments", {{"fdname", name}}}};
  std::string text = dump_json(request) + "\n";
  iovec data{text.data(), text.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr message{};
  message.msg_iov = &data;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof control;
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(header), &fd, sizeof(int));
  ssize_t sent;
  do {
    sent = ::sendmsg(channel_.fd(), &message, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) return errno_error(fmt::format("QMP {}: send fd {}", socket_, name), errno);
  // The fd travels with the first byte; the rest of the line may follow in plain sends.
  DELTAVM_TRY(send_all(channel_.fd(), std::string_view(text).substr(static_cast<size_t>(sent)), channel_.what()));
  DELTAVM_TRY(read_answer("getfd", deadline_after(std::chrono::seconds(30))));
  return {};
}

Status QmpClient::wait_for_migration(std::chrono::milliseconds timeout) {
  Deadline deadline = deadline_after(timeout);
  for (;;) {
    DELTAVM_ASSIGN_OR_RETURN(nlohmann::json status, execute("query-migrate"));
    std::string state = status.is_object() && status.contains("status") && status["status"].is_string()
                            ? status["status"].get<std::string>()
                            : "";
    if (state == "completed") return {};
    if (state == "failed" || state == "cancelled") {
      std::string description = status.contains("error-desc") && status["error-desc"].is_string()
                                    ? status["error-desc"].get<std::string>()
                                    : "";
      return make_error(ErrorCode::kIo, "QMP {}: migration {}: {}", socket_, state, description);
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return make_error(ErrorCode::kIo, "QMP {}: migration still {} after {} ms", socket_, state, timeout.count());
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
}

}  // namespace deltavm
