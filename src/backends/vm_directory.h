// A running VM is a directory: its control sockets, its log and a small JSON record of what
// runs it. Commands that outlive each other (run, exec, console, ps, stop) find a VM by id here.
//
//   RUNTIME/vms/ID/vm.json        VmRecord: id, backend, template, the VM process, ...
//   RUNTIME/vms/ID/control.sock   the backend's control channel (QMP for qemu)
//   RUNTIME/vms/ID/console.sock   serial console (ttyS0)
//   RUNTIME/vms/ID/console.log    everything the guest wrote to its console (appended)
//   RUNTIME/vms/ID/agent.sock     command agent (ttyS1)
//   RUNTIME/vms/ID/vm.log         the VM process's own output
//   RUNTIME/vms/ID/process/       the only place the VM process writes (the RAM file of a boot,
//                                 saved states); a jailed VM process's own (backends/jail.h),
//                                 so the host reads what lies there with O_NOFOLLOW
//
// Whoever can connect to a VM's control socket controls the VM (QMP can run commands on the
// host as the VM process's user), so RUNTIME and RUNTIME/vms are the caller's alone and never
// writable by others, each VM directory is 0700 and every file and socket in it 0600,
// whatever the umask.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/subprocess.h"

namespace deltavm {

// RUNTIME: $DELTAVM_RUNTIME, else /run/deltavm as root, else $XDG_RUNTIME_DIR/deltavm, else
// /tmp/deltavm-UID.
std::filesystem::path default_runtime_directory();

// Creates RUNTIME (and RUNTIME/vms) if missing, mode 0700, and checks that each is a real
// directory (not a symlink) owned by this user and not writable by group or others: a
// runtime another user owns or can write to is refused, since that user could replace or
// connect to the sockets in it.
Status prepare_runtime_directory(const std::filesystem::path& runtime);

// What vm.json records. Parsed field by field: a damaged record is an error, never a crash.
//
// A VM whose record names an owner belongs to that deltavm process alone: one being started or
// built, or one a service holds in a warm pool. If the owner dies, the VM is abandoned and
// whoever finds it (ps, stop --all, a build, a service) ends it and removes its directory. A
// VM without an owner belongs to the runtime: any deltavm command or service may use it.
struct VmRecord {
  std::string id;
  std::string backend;  // "qemu" or "kvm"; empty until the VM process is started.
  std::string template_name;
  std::string image_digest;                // The digest of the template's image it was loaded from.
  std::string purpose;                     // "template build", "pool" while its owner holds it; else empty.
  std::optional<ProcessIdentity> process;  // The VM process (QEMU, deltavm-vmm).
  std::optional<ProcessIdentity> owner;    // See above.
  std::string ram_file;
  std::string strategy;
  uint64_t memory_bytes = 0;  // Guest RAM, for a service's memory limit.
  int64_t created_at_unix = 0;
  int64_t expires_at_unix = 0;  // When a service stops the VM (its ttl); 0: never.
};

class VmDirectory {
 public:
  // A new directory under RUNTIME/vms with a fresh id, or with `id` (kAlreadyExists if taken).
  static Result<VmDirectory> create(const std::filesystem::path& runtime, const std::string& id = "");
  static Result<VmDirectory> open(const std::filesystem::path& runtime, const std::string& id);
  static Result<std::vector<VmDirectory>> list(const std::filesystem::path& runtime);

  const std::string& id() const { return id_; }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path runtime() const { return path_.parent_path().parent_path(); }
  std::filesystem::path control_socket() const { return path_ / "control.sock"; }
  std::filesystem::path console_socket() const { return path_ / "console.sock"; }
  std::filesystem::path console_log() const { return path_ / "console.log"; }
  std::filesystem::path agent_socket() const { return path_ / "agent.sock"; }
  std::filesystem::path log_file() const { return path_ / "vm.log"; }
  std::filesystem::path process_directory() const { return path_ / "process"; }

  Result<VmRecord> read_record() const;
  Status write_record(const VmRecord& record) const;
  // Reads the record, lets `change` edit it, writes it back (a missing record starts empty).
  Status update_record(const std::function<void(VmRecord&)>& change) const;
  // True while the recorded VM process runs (checked by pid and start time).
  bool running() const;
  Status remove() const;

 private:
  VmDirectory(std::string id, std::filesystem::path path) : id_(std::move(id)), path_(std::move(path)) {}
  std::string id_;
  std::filesystem::path path_;
};

// Whether `record` names an owner that has died (killed mid-build, mid-start, or a service
// killed while holding a warm pool).
bool abandoned(const VmRecord& record);

// Ends the VMs whose owner has died (their VM process, if it still runs) and removes their
// directories. Returns how many.
Result<size_t> remove_abandoned_vms(const std::filesystem::path& runtime);

}  // namespace deltavm
