// deltavm-vmm's system-call filter (seccomp mode 2, libseccomp). Installed once the VMM has
// opened /dev/kvm and its sockets, before it serves a request: from then on every thread of
// the process, the vCPUs included, may make only the calls its run loop needs. Not allowed
// among others: execve, fork (clone without CLONE_THREAD), ptrace, socket, mount and every
// namespace call, module, BPF, keyring and perf calls, process_vm_*. A refused call ends the
// process after it writes "deltavm-vmm: seccomp refused system call N (name)" to stderr.
#pragma once

#include "base/error.h"

namespace deltavm::vmm {

Status install_seccomp_filter();

}  // namespace deltavm::vmm
