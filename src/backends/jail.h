// The jail every VM process runs in (docs/security.md). A VM process parses what its guest
// sends, so it is treated as the guest's: it runs as a uid of its own, which no other VM
// process of the runtime holds, in pid, ipc, network and mount namespaces of its own, with
// no_new_privs, and without capabilities once its start-up is done.
//
// The uids come from a range (DELTAVM_JAIL_UIDS=FIRST-LAST, 2000000-2065535 by default), each
// with the gid of the same number. A uid is held by a lock on RUNTIME/jail/UID.lock whose open
// file the VM process inherits: it is free again the moment that process is gone, however it
// ended. Jailing needs root; DELTAVM_JAIL=off turns it off.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include "backends/cgroups.h"
#include "base/error.h"
#include "base/file.h"
#include "base/subprocess.h"

namespace deltavm {

struct JailPolicy {
  bool enabled = false;
  std::string why_not;  // When not enabled: why, for doctor.
  uint32_t first_uid = 2'000'000;
  uint32_t uid_count = 65'536;

  // From DELTAVM_JAIL and DELTAVM_JAIL_UIDS; a malformed range is an error naming the variable.
  static Result<JailPolicy> from_environment();
};

// A uid claimed for one VM process.
struct JailUid {
  uint32_t uid = 0;
  Fd lock;  // Handed to the VM process (kJailLockFd), which holds the uid while it lives.
};

// The fd number at which a jailed VM process holds its uid's lock.
inline constexpr int kJailLockFd = 9;

// Claims a uid of the policy's range that no living VM process of `runtime` holds.
Result<JailUid> claim_jail_uid(const std::filesystem::path& runtime, const JailPolicy& policy);

// An empty directory, root's and read-only, that jailed processes take as their root once
// started: RUNTIME/jail/root.
Result<std::filesystem::path> jail_root(const std::filesystem::path& runtime);

// What is enforced on VM processes here, backend by backend, for doctor: each line says what
// holds and what does not.
struct JailReport {
  std::string qemu;
  std::string kvm;
  std::string cgroups;
};
JailReport describe_jail();

// What holds a VM process's jail while the process starts: its uid's claim and its cgroups.
struct Jail {
  JailUid uid;
  VmCgroups cgroups;
};

// Sets `options` up to start VM `vm_id`'s process jailed: a uid claimed for it (passed at
// kJailLockFd), its namespaces, no_new_privs, a bounding set of the capabilities its start-up
// as root needs (reading files the jail uid cannot, chroot, and changing to the jail uid; all
// of which it gives up with root), and cgroups with `limits` that it joins before it execs.
// What the cgroups enforce, and what this host cannot, is written to the process's log.
Result<Jail> prepare_jail(const std::filesystem::path& runtime, const JailPolicy& policy, const std::string& vm_id,
                          const ResourceLimits& limits, SpawnOptions& options);

}  // namespace deltavm
