#include "service/client.h"

#include <httplib.h>

#include "base/json_fields.h"
#include "base/socket.h"

namespace deltavm {
namespace {

// httplib's client connected to a Unix socket instead of a TCP address.
class UnixSocketClient : public httplib::ClientImpl {
 public:
  explicit UnixSocketClient(std::filesystem::path socket) : ClientImpl("localhost", 80), socket_(std::move(socket)) {}

 protected:
  bool create_and_connect_socket(Socket& socket, httplib::Error& error) override {
    Result<Fd> fd = connect_unix(socket_, deadline_after(std::chrono::seconds(5)));
    if (!fd) {
      error = httplib::Error::Connection;
      return false;
    }
    socket.sock = fd->release();
    return true;
  }

 private:
  std::filesystem::path socket_;
};

}  // namespace

ServiceClient::ServiceClient(std::unique_ptr<httplib::ClientImpl> client, std::string where)
    : client_(std::move(client)), where_(std::move(where)) {
  client_->set_keep_alive(true);
  client_->set_connection_timeout(5, 0);
  client_->set_write_timeout(30, 0);
}

ServiceClient::ServiceClient(ServiceClient&&) noexcept = default;
ServiceClient& ServiceClient::operator=(ServiceClient&&) noexcept = default;
ServiceClient::~ServiceClient() = default;

ServiceClient ServiceClient::over_unix_socket(const std::filesystem::path& socket) {
  return ServiceClient(std::make_unique<UnixSocketClient>(socket), "service at " + socket.string());
}

Result<HttpReply> ServiceClient::request(const std::string& method, const std::string& path, const std::string& body,
                                         std::chrono::seconds timeout) {
  client_->set_read_timeout(timeout.count(), 0);
  httplib::Request request;
  request.method = method;
  request.path = path;
  if (!body.empty() || method == "POST" || method == "PUT") {
    request.body = body;
    request.set_header("Content-Type", "application/json");
  }
  httplib::Result result = client_->send(request);
  if (!result) {
    return make_error(ErrorCode::kIo, "{}: {} {}: {}", where_, method, path, httplib::to_string(result.error()));
  }
  return HttpReply{result->status, result->body};
}

Result<nlohmann::json> ServiceClient::call(const std::string& method, const std::string& path,
                                           const nlohmann::json& body, std::chrono::seconds timeout) {
  DELTAVM_ASSIGN_OR_RETURN(HttpReply reply, request(method, path, body.is_null() ? "" : dump_json(body), timeout));
  if (reply.status == 204) return nlohmann::json();
  nlohmann::json document = nlohmann::json::parse(reply.body, nullptr, /*allow_exceptions=*/false);
  if (reply.status >= 200 && reply.status < 300) {
    if (document.is_discarded()) {
      return make_error(ErrorCode::kIo, "{}: {} {} answered {} with a body that is not JSON", where_, method, path,
                        reply.status);
    }
    return document;
  }
  if (document.is_object() && document.contains("error") && document["error"].is_object()) {
    const nlohmann::json& error = document["error"];
    std::string code = error.contains("code") && error["code"].is_string() ? error["code"].get<std::string>() : "";
    std::string message =
        error.contains("message") && error["message"].is_string() ? error["message"].get<std::string>() : "";
    return Error{parse_error_code_id(code).value_or(ErrorCode::kIo), message};
  }
  return make_error(ErrorCode::kIo, "{}: {} {} answered {}", where_, method, path, reply.status);
}

}  // namespace deltavm
