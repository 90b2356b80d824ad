// The kvm backend's saved machine state: every vCPU's and the VM's KVM state, the VMM's own
// devices, and what the state requires of the host that restores it. RAM is not part of it;
// it travels through the image layer. Format (docs/formats.md, "kvm machine state"): magic,
// version, lengths and an XXH3-64 checksum over everything, checked before any field is used.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "vmm/kvm.h"

namespace deltavm::vmm {

// What a machine runs; the VMM's devices and boot path depend on it.
enum class GuestKind : uint32_t {
  kMicro = 1,  // The project's micro guest (guest/micro), reporting over ports 0x500-0x504.
  kLinux = 2,  // A Linux bzImage with an initramfs, ttyS0 console and ttyS1 agent.
};

struct MachineState {
  // Requirements on the restoring host, checked before anything is restored.
  std::string cpu_vendor;  // CPUID leaf 0, e.g. "AuthenticAMD".
  uint32_t tsc_khz = 0;    // KVM_GET_TSC_KHZ of vCPU 0; KVM here cannot rescale it.
  uint64_t memory_bytes = 0;
  GuestKind kind = GuestKind::kMicro;

  std::vector<VcpuState> vcpus;
  VmState vm;
  std::vector<uint8_t> devices;  // The VMM's device models, in their own encoding.
};

std::vector<uint8_t> encode_machine_state(const MachineState& state);
// Checks magic, version, checksum and every length; `origin` names the bytes in errors.
Result<MachineState> decode_machine_state(std::span<const uint8_t> bytes, std::string_view origin);

// Refuses a state this host cannot run: another CPU vendor, a TSC frequency more than 250 ppm
// away (KVM_SET_TSC_KHZ is not available everywhere, and a guest whose TSC changes speed
// under it keeps wrong time), or a different memory size than the RAM offered for it.
Status check_host_compatibility(const MachineState& state, std::string_view host_vendor, uint32_t host_tsc_khz,
                                uint64_t memory_bytes);

}  // namespace deltavm::vmm
