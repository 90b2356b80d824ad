// The host side of deltavm-vmm, the kvm backend's per-VM process: starting it and speaking
// its control protocol (docs/kvm.md): one JSON object per line each way over a Unix socket;
// every answer has "ok", and "error" with a message when ok is false.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/file.h"
#include "base/socket.h"
#include "base/subprocess.h"

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
// Its control socket and log live in `directory`, the only place it may write; it may read
// there and in the `read_only` files and directories.
class VmmProcess {
 public:
  static Result<VmmProcess> launch(const std::filesystem::path& binary, const std::filesystem::path& directory,
                                   const std::vector<std::filesystem::path>& read_only = {},
                                   std::chrono::milliseconds timeout = std::chrono::seconds(10));
  VmmProcess(VmmProcess&& other) noexcept = default;
  VmmProcess& operator=(VmmProcess&&) = delete;

  int pid() const { return process_.pid(); }
  VmmClient& client() { return client_; }
  // The request, with the tail of the VMM's log added to any error.
  Result<nlohmann::json> request(const nlohmann::json& request,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(60));

 private:
  VmmProcess(Subprocess process, VmmClient client, std::filesystem::path log)
      : process_(std::move(process)), client_(std::move(client)), log_(std::move(log)) {}
  Subprocess process_;
  VmmClient client_;
  std::filesystem::path log_;
};

}  // namespace deltavm::kvm
