// A client of the service's HTTP API on its Unix socket (the command line's and the tests').
// One client is one connection (kept alive between requests) and is used by one thread.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "base/error.h"

namespace httplib {
class ClientImpl;
}

namespace deltavm {

struct HttpReply {
  int status = 0;
  std::string body;
};

class ServiceClient {
 public:
  static ServiceClient over_unix_socket(const std::filesystem::path& socket);
  ServiceClient(ServiceClient&&) noexcept;
  ServiceClient& operator=(ServiceClient&&) noexcept;
  ~ServiceClient();

  // The whole reply, whatever its status. `timeout` bounds waiting for the answer.
  Result<HttpReply> request(const std::string& method, const std::string& path, const std::string& body = "",
                            std::chrono::seconds timeout = std::chrono::seconds(120));
  // A JSON request whose reply should be 2xx: its body (null for 204), or the service's error
  // as an Error of the same code.
  Result<nlohmann::json> call(const std::string& method, const std::string& path, const nlohmann::json& body = nullptr,
                              std::chrono::seconds timeout = std::chrono::seconds(120));

 private:
  explicit ServiceClient(std::unique_ptr<httplib::ClientImpl> client, std::string where);
  std::unique_ptr<httplib::ClientImpl> client_;
  std::string where_;
};

}  // namespace deltavm
