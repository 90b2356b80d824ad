// The service's HTTP/1.1 + JSON API (docs/api.yaml is the contract): parses and checks each
// request into a typed VmService action, and turns the outcome into a reply. Errors are
// {"error": {"code", "message"}} with 400 (a bad body; the message names the field), 401 (TCP
// without the token), 404, 409, 429 (a limit; nothing was started) or 503 (draining).
//
// It listens on a Unix socket (the runtime directory's, 0600) and optionally on a loopback TCP
// port, where every request must carry the bearer token.
#pragma once

#include <atomic>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "base/file.h"
#include "service/vm_service.h"

namespace deltavm {

// Bodies larger than this are refused with 413 before they are read.
inline constexpr size_t kMaxRequestBodyBytes = 24 << 20;

class HttpApi {
 public:
  explicit HttpApi(VmService& service);
  ~HttpApi();
  HttpApi(const HttpApi&) = delete;
  HttpApi& operator=(const HttpApi&) = delete;

  // Serves on a Unix socket created at `path` (mode 0600; a live socket there is refused).
  Status listen_unix(const std::filesystem::path& path);
  // Serves on 127.0.0.1:`port` (0: any free port), requiring "Authorization: Bearer TOKEN".
  // Returns the port.
  Result<int> listen_tcp(const std::string& host, int port, std::string token);

  // Requests being answered now.
  int in_flight() const { return in_flight_.load(); }
  // Closes the listening sockets and waits for the requests being answered.
  void stop();

 private:
  class Listener;
  void install_routes(Listener& listener, std::optional<std::string> token);

  VmService& service_;
  std::atomic<int> in_flight_{0};
  std::vector<std::unique_ptr<Listener>> listeners_;
};

}  // namespace deltavm
