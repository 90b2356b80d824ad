// The request handler of deltavm-vmm: one machine per process, booted or restored, driven by
// the typed requests of vmm/protocol.h. Every file a request names goes through the path
// policy first.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "base/file.h"
#include "vmm/kvm.h"
#include "vmm/machine.h"
#include "vmm/path_policy.h"
#include "vmm/protocol.h"
#include "vmm/serial_socket.h"

namespace deltavm::vmm {

class Vmm {
 public:
  // `userfault`: made at start-up (GuestMemory::create_userfaultfd), for a userfault restore.
  Vmm(KvmSystem system, PathPolicy paths, std::unique_ptr<SerialSocket> console, std::unique_ptr<SerialSocket> agent,
      Result<Fd> userfault);
  // The sockets stop feeding the machine, the machine's vCPUs stop, then the sockets go.
  ~Vmm();

  // Handles one request; every failure is an Error (of the kind that fits), never a throw.
  Result<Reply> handle(const Request& request);

 private:
  Result<Reply> handle(const BootMicroRequest& request);
  Result<Reply> handle(const BootLinuxRequest& request);
  Result<Reply> handle(const RestoreRequest& request);
  Result<Reply> handle(const StatusRequest& request);
  Result<Reply> handle(const PauseRequest& request);
  Result<Reply> handle(const ResumeRequest& request);
  Result<Reply> handle(const WaitRequest& request);
  Result<Reply> handle(const SaveRequest& request);
  Result<Reply> handle(const SerialOutputRequest& request);
  Result<Reply> handle(const FloorRequest& request);
  Result<Reply> handle(const QuitRequest& request);

  Status require_machine() const;
  Status require_no_machine() const;
  StatusReply status_reply(const MachineStatus& status) const;
  // RAM for a boot: in `ram_file` (shared, so the file is the RAM image for a capture), else
  // anonymous.
  Result<GuestMemory> boot_memory(const std::optional<std::string>& ram_file, uint64_t memory_bytes);
  // Arms a checkpoint pause and starts the machine unless asked to stay paused.
  Result<StatusReply> start(const StartOptions& start);
  Machine::SerialOutput serial_output();
  void connect_serial_input();
  Result<std::filesystem::path> readable(const std::string& path, std::string_view field) const;
  Result<std::filesystem::path> writable(const std::string& path, std::string_view field) const;

  KvmSystem system_;
  PathPolicy paths_;
  Fd userfault_;                 // Until a userfault restore takes it.
  std::string userfault_error_;  // Why there is none, if there is none.
  std::unique_ptr<SerialSocket> serial_sockets_[2];
  std::unique_ptr<Machine> machine_;
  std::mutex serial_mutex_;
  std::string serial_text_[2];
};

}  // namespace deltavm::vmm
