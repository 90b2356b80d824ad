// How a deltavm-vmm that its backend started jailed (backends/jail.h) takes its jail, once it
// has opened what it needs as root (/dev/kvm, its sockets, its console log, a userfaultfd):
// its mount namespace gets a root of its own, an empty tmpfs holding only its writable
// directory and its read-only inputs, each bind-mounted at the path it has outside (so request
// paths mean the same inside); then it becomes the jail uid and so loses every capability.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "base/error.h"

namespace deltavm::vmm {

struct JailSetup {
  std::filesystem::path mount_point;             // An existing empty directory the new root is built on.
  uint32_t uid = 0;                              // And gid; never 0.
  std::filesystem::path writable;                // Canonical: the VMM's directory, owned by `uid`.
  std::vector<std::filesystem::path> read_only;  // Canonical files or directories.
};

// Needs root (CAP_SYS_ADMIN, CAP_SYS_CHROOT, CAP_SETUID, CAP_SETGID) in a mount namespace of
// the process's own, and no other thread yet. On success the process runs as `uid` with no
// capabilities, and sees only the setup's paths.
Status enter_jail(const JailSetup& setup);

}  // namespace deltavm::vmm
