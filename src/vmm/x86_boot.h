// What a vCPU and guest memory need before the first instruction of a 64-bit guest: the
// guest-physical layout (Firecracker's, brief §1.1), a GDT, identity page tables, CPUID, boot
// MSRs and long-mode registers; and the two programs this VMM boots: the project's micro guest
// and (next) a Linux bzImage.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "vmm/kvm.h"

namespace deltavm::vmm {

inline constexpr uint64_t kGdtAddress = 0x500;
inline constexpr uint64_t kIdtAddress = 0x560;
inline constexpr uint64_t kTssStructAddress = 0x580;
inline constexpr uint64_t kBootParamsAddress = 0x7000;  // Linux zero page / micro guest parameters.
inline constexpr uint64_t kBootStackAddress = 0x8ff0;
inline constexpr uint64_t kPml4Address = 0x9000;
inline constexpr uint64_t kProgramAddress = 0x100000;  // 1 MiB: bzImage protected-mode part, micro guest.

// GDT selectors. Linux's 64-bit boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
inline constexpr uint16_t kKernelCodeSelector = 0x10;
inline constexpr uint16_t kKernelDataSelector = 0x18;
inline constexpr uint16_t kUserDataSelector = 0x23;
inline constexpr uint16_t kUserCodeSelector = 0x2b;
inline constexpr uint16_t kTssSelector = 0x30;

// The micro guest's parameters, written at kBootParamsAddress; its address is passed in %rdi.
// Layout shared with guest/micro/workload.c.
struct MicroGuestParameters {
  uint64_t magic = 0x3152415043494d44;  // "DMICPAR1"
  uint64_t work_address = 0;
  uint64_t work_bytes = 0;
  uint64_t passes = 0;
  uint64_t seed = 0;
  uint64_t heartbeat_bytes = 0;  // The guest reports a heartbeat after writing this many bytes.
};

// The micro guest's image: a flat binary linked at kProgramAddress with "DVMICRO1" at offset 8.
Status check_micro_program(std::span<const uint8_t> program, std::string_view origin);

// Writes the GDT (with a TSS), an empty IDT and page tables identity-mapping the first 1 GiB
// with 2 MiB pages; `user_accessible` sets the U/S bit so ring-3 code reaches all of it.
// REQUIRES: `ram` is at least 2 MiB.
void write_boot_tables(std::span<uint8_t> ram, bool user_accessible);

// CPUID as KVM supports it, made this vCPU's: APIC IDs, hypervisor bit, TSC deadline timer,
// topology. REQUIRES: `supported` comes from KVM_GET_SUPPORTED_CPUID.
std::vector<kvm_cpuid_entry2> normalize_cpuid(std::span<const kvm_cpuid_entry2> supported, uint32_t vcpu_index,
                                              uint32_t vcpu_count);

// What every vCPU needs before it runs: CPUID, boot MSRs, LAPIC LINT0 (ExtINT) and LINT1 (NMI).
// Application processors need nothing more: they wait for the BSP's INIT and SIPI, which KVM's
// in-kernel LAPIC handles.
Status configure_vcpu(Vcpu& vcpu, std::span<const kvm_cpuid_entry2> cpuid);

// configure_vcpu, then FPU and registers for entering 64-bit code at `entry` with paging on,
// the boot GDT loaded, `rsi` and `rdi` set (Linux wants boot_params in %rsi, the micro guest
// its parameters in %rdi).
Status configure_long_mode_vcpu(Vcpu& vcpu, std::span<const kvm_cpuid_entry2> cpuid, uint64_t entry, uint64_t rsi,
                                uint64_t rdi);

}  // namespace deltavm::vmm
