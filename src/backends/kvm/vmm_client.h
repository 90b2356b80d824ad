// The host side of deltavm-vmm, the kvm backend's per-VM process: starting it and speaking its
// typed control protocol (vmm/protocol.h) over the VM's control socket.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/socket.h"
#include "base/subprocess.h"
#include "vmm/protocol.h"

namespace deltavm {

class VmmClient {
 public:
  static Result<VmmClient> connect(const std::filesystem::path& socket, Deadline deadline);

  // Sends `request` and returns the reply; an error reply is an Error of the VMM's code and
  // message, and a reply that is not the one `request` answers with is an error too.
  template <typename ReplyType>
  Result<ReplyType> call(const vmm::Request& request, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    DELTAVM_ASSIGN_OR_RETURN(vmm::Reply reply, exchange(request, timeout));
    if (ReplyType* typed = std::get_if<ReplyType>(&reply)) return std::move(*typed);
    return make_error(ErrorCode::kIo, "{}: the VMM answered with another kind of reply", channel_.what());
  }

 private:
  VmmClient(Fd fd, const std::filesystem::path& socket)
      : channel_(std::move(fd), fmt::format("deltavm-vmm {}", socket.string()), vmm::kMaxLineBytes) {}
  Result<vmm::Reply> exchange(const vmm::Request& request, std::chrono::milliseconds timeout);
  LineChannel channel_;
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

  int pid() const { return process_.pid(); }
  // The call, with the tail of the VMM's log added to an I/O error (the VMM died).
  template <typename ReplyType>
  Result<ReplyType> call(const vmm::Request& request, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    Result<ReplyType> reply = client_.call<ReplyType>(request, timeout);
    if (!reply && reply.error().code == ErrorCode::kIo) return with_log(reply.error());
    return reply;
  }

 private:
  VmmProcess(Subprocess process, VmmClient client, std::filesystem::path log)
      : process_(std::move(process)), client_(std::move(client)), log_(std::move(log)) {}
  Error with_log(const Error& error) const;
  Subprocess process_;
  VmmClient client_;
  std::filesystem::path log_;
};

}  // namespace deltavm
