// The host side of deltavm-vmm, the kvm backend's per-VM process: starting it and speaking
// its control protocol (docs/kvm.md): one JSON object per line each way over a Unix socket;
// every answer has "ok", and "error" with a message when ok is false.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <string>

#include "base/error.h"
#include "base/file.h"
#include "base/socket.h"

namespace deltavm::kvm {

class VmmClient {
 public:
  static Result<VmmClient> connect(const std::filesystem::path& socket, Deadline deadline);
  // Sends `request` and returns the answer; an answer with ok=false becomes an Error carrying
  // the VMM's message.
  Result<nlohmann::json> request(const nlohmann::json& request, std::chrono::milliseconds timeout);

 private:
  VmmClient(Fd fd, std::string socket) : fd_(std::move(fd)), socket_(std::move(socket)) {}
  Fd fd_;
  std::string socket_;
  std::string buffer_;
};

// The deltavm-vmm binary: $DELTAVM_VMM, else deltavm-vmm beside the running executable.
std::filesystem::path default_vmm_binary();

// A deltavm-vmm process that is this process's child, killed when the object is destroyed.
// Its control socket and log live in `directory`.
class VmmProcess {
 public:
  static Result<VmmProcess> launch(const std::filesystem::path& binary, const std::filesystem::path& directory,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(10));
  VmmProcess(VmmProcess&& other) noexcept;
  VmmProcess& operator=(VmmProcess&&) = delete;
  ~VmmProcess();

  int pid() const { return pid_; }
  VmmClient& client() { return client_; }
  // The request, with the tail of the VMM's log added to any error.
  Result<nlohmann::json> request(const nlohmann::json& request,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(60));

 private:
  VmmProcess(int pid, VmmClient client, std::filesystem::path log)
      : pid_(pid), client_(std::move(client)), log_(std::move(log)) {}
  int pid_ = -1;
  VmmClient client_;
  std::filesystem::path log_;
};

}  // namespace deltavm::kvm
