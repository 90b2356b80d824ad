// The VM processes (QEMU, deltavm-vmm) one backend started, by VM id. Holding them lets the
// backend see a process die at start (and say how), and reap its own children when it stops
// them; a VM started by another deltavm process is stopped by the identity in its record.
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "backends/vm_directory.h"
#include "base/subprocess.h"

namespace deltavm {

class VmProcesses {
 public:
  // Starts the VM's process and records it (backend, process identity, RAM file) in vm.json.
  Result<ProcessIdentity> launch(const VmDirectory& vm, const SpawnOptions& options, std::string_view backend,
                                 const std::filesystem::path& ram_file);
  // How the VM's process ended ("exited with status 1"), if this table started it and it has.
  std::optional<std::string> exit_of(const std::string& id);
  // How the VM's process ended, if it has; std::nullopt while it runs. This table's own child
  // is reaped here; any other VM is checked by the identity in its record.
  std::optional<std::string> ended(const VmDirectory& vm);
  // Ends the VM's process: `ask_to_quit` first (the VM's own control channel), then SIGTERM and
  // SIGKILL through a pidfd, and reaps it if it is this table's child. A VM whose process has
  // already exited is fine; one whose record names no process is left as it is.
  Status stop(const VmDirectory& vm, const std::function<void()>& ask_to_quit);

 private:
  std::mutex mutex_;
  std::map<std::string, Subprocess> children_;
};

}  // namespace deltavm
