// A running VM is a directory: its control sockets, its log, its process id and a small JSON
// record. Commands that outlive each other (run, exec, console, ps, stop) find a VM by id here.
//
//   RUNTIME/vms/ID/vm.json        id, backend, template, pid, created_at_unix
//   RUNTIME/vms/ID/control.sock   the backend's control channel (QMP for qemu)
//   RUNTIME/vms/ID/console.sock   serial console (ttyS0)
//   RUNTIME/vms/ID/agent.sock     command agent (ttyS1)
//   RUNTIME/vms/ID/vm.log         the VM process's own output
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "base/error.h"

namespace deltavm {

// RUNTIME: $DELTAVM_RUNTIME, else /run/deltavm as root, else $XDG_RUNTIME_DIR/deltavm.
std::filesystem::path default_runtime_directory();

class VmDirectory {
 public:
  // A new directory with a fresh id under RUNTIME/vms.
  static Result<VmDirectory> create(const std::filesystem::path& runtime);
  static Result<VmDirectory> open(const std::filesystem::path& runtime, const std::string& id);
  static Result<std::vector<VmDirectory>> list(const std::filesystem::path& runtime);

  const std::string& id() const { return id_; }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path control_socket() const { return path_ / "control.sock"; }
  std::filesystem::path console_socket() const { return path_ / "console.sock"; }
  std::filesystem::path agent_socket() const { return path_ / "agent.sock"; }
  std::filesystem::path log_file() const { return path_ / "vm.log"; }

  Result<nlohmann::json> read_record() const;
  Status write_record(const nlohmann::json& record) const;
  // The VM's process id from its record, or 0.
  int pid() const;
  bool running() const;
  Status remove() const;

 private:
  VmDirectory(std::string id, std::filesystem::path path) : id_(std::move(id)), path_(std::move(path)) {}
  std::string id_;
  std::filesystem::path path_;
};

}  // namespace deltavm
