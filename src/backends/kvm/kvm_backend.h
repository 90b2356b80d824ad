// The kvm backend: the Backend interface on deltavm's own VMM. Each VM is a deltavm-vmm
// process (docs/kvm.md) serving the VM's control, console and agent sockets, so that every
// command works the same as with the qemu backend.
#pragma once

#include <memory>
#include <string>

#include "backends/backend.h"
#include "vmm/protocol.h"

namespace deltavm {

// How restored VMs get their RAM: $DELTAVM_KVM_MEMORY (eager, private or userfault), else
// userfault.
std::unique_ptr<Backend> make_kvm_backend();
std::unique_ptr<Backend> make_kvm_backend(vmm::MemoryStrategy strategy);

// Whether /dev/kvm can be used here, and if not, why (for `deltavm doctor`).
std::string describe_kvm_device();

}  // namespace deltavm
