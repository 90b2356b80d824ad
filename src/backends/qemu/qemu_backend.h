// The qemu backend: drives qemu-system-x86_64 over QMP. Guest RAM is a memory-backend-file
// the project owns: written through (share=on) while a template boots, so that the file is the
// RAM image; mapped private (share=off) on restore, so that a clone never writes into the
// image it was loaded from. Machine state moves with the x-ignore-shared migration capability,
// which leaves RAM out of the stream.
#pragma once

#include <memory>

#include "backends/backend.h"

namespace deltavm {

// How QEMU runs guests on this host. /dev/kvm backed by software nesting (the kvm_pvm module)
// runs ring-0 code about 1000x slower than TCG runs it (design.md §3), so TCG is chosen there.
struct Accelerator {
  std::string name;    // "kvm" or "tcg".
  std::string reason;  // Why, in one sentence.
};
Accelerator choose_accelerator();

std::unique_ptr<Backend> make_qemu_backend();

// QEMU's stock snapshot with RAM inside the migration stream: what bench/restore compares
// deltavm's loads against. save pauses the VM and writes the stream to `stream`; restore
// starts a VM on anonymous RAM from it. The migration runs at full speed (QEMU's default
// max-bandwidth, 32 MiB/s, would make it take seconds).
Status save_stock_snapshot(const VmDirectory& vm, const std::filesystem::path& stream);
Result<RestoreTimings> restore_stock_snapshot(const MachineSpec& machine, const std::filesystem::path& stream,
                                              const VmDirectory& vm);

}  // namespace deltavm
