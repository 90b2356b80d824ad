// A TCP relay on 127.0.0.1 in front of the test object store that injects the faults a real
// network and a loaded store produce: answers of 503 without reaching the store, and
// connections cut in the middle of an answer. Faults apply to the connections accepted after
// they are set, in order.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "base/file.h"

namespace deltavm::testing {

class FaultProxy {
 public:
  // Relays to 127.0.0.1:upstream_port.
  static Result<std::unique_ptr<FaultProxy>> start(uint16_t upstream_port);
  ~FaultProxy();

  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  // The next `count` connections are answered "503 Slow Down" and closed.
  void fail_next_connections(int count);
  // The first connection whose answers pass `bytes` bytes from now on is cut there, once.
  void cut_a_connection_after(uint64_t bytes);
  int connections_accepted() const { return accepted_.load(); }
  int faults_injected() const { return injected_.load(); }

 private:
  FaultProxy() = default;
  void accept_loop();
  void serve(int client, bool fail);

  Fd listener_;
  uint16_t port_ = 0;
  uint16_t upstream_port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<int> accepted_{0}, injected_{0};
  std::mutex mutex_;
  int fail_count_ = 0;
  std::atomic<bool> cut_pending_{false};
  std::atomic<uint64_t> cut_after_{0};
  std::thread acceptor_;
  std::vector<std::thread> workers_;
};

}  // namespace deltavm::testing
