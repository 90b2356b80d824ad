// The KVM API behind three RAII types: KvmSystem (/dev/kvm), KvmVm (one VM) and Vcpu (one
// virtual CPU with its kvm_run page). Every fd and mapping of the kvm backend lives in these
// types; every ioctl fails with an Error naming it and carrying errno.
// Source of the API facts: Linux Documentation/virt/kvm/api.rst.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/file.h"

namespace deltavm::vmm {

// Where the in-kernel devices sit outside RAM (api.rst 4.36: the TSS needs three pages below
// 4 GiB that are neither RAM nor MMIO).
inline constexpr uint64_t kTssAddress = 0xfffbd000;

// <linux/kvm.h> (Linux 6.1) declares its flexible arrays with __DECLARE_FLEX_ARRAY, an empty
// struct followed by the array. An empty struct has size 0 in C but 1 in C++, so in C++ the
// sizes of kvm_msr_list, kvm_msrs, kvm_cpuid2 and kvm_xsave, the offsets of their arrays and
// the ioctl numbers computed from the sizes are all wrong (KVM answers EINVAL or ENOTTY).
// These are the C layouts the kernel uses; the code below never touches those arrays by name.
inline constexpr size_t kMsrListHeaderBytes = 4;                // u32 nmsrs, then u32 indices.
inline constexpr size_t kMsrsHeaderBytes = 8;                   // u32 nmsrs, u32 pad, then kvm_msr_entry.
inline constexpr size_t kCpuidHeaderBytes = 8;                  // u32 nent, u32 padding, then kvm_cpuid_entry2.
inline constexpr size_t kXsaveBytes = 1024 * sizeof(uint32_t);  // u32 region[1024].
// The most CPUID leaves and MSRs KVM lists (it answers E2BIG below; real lists hold a few
// dozen to a few hundred), and so the most a saved vCPU state may hold.
inline constexpr size_t kMaxCpuidEntries = 4096;
inline constexpr size_t kMaxMsrEntries = 4096;
inline constexpr unsigned long kIoctlGetMsrIndexList = _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x02, kMsrListHeaderBytes);
inline constexpr unsigned long kIoctlGetSupportedCpuid = _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x05, kCpuidHeaderBytes);
inline constexpr unsigned long kIoctlGetMsrs = _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x88, kMsrsHeaderBytes);
inline constexpr unsigned long kIoctlSetMsrs = _IOC(_IOC_WRITE, KVMIO, 0x89, kMsrsHeaderBytes);
inline constexpr unsigned long kIoctlSetCpuid2 = _IOC(_IOC_WRITE, KVMIO, 0x90, kCpuidHeaderBytes);
inline constexpr unsigned long kIoctlGetCpuid2 = _IOC(_IOC_READ | _IOC_WRITE, KVMIO, 0x91, kCpuidHeaderBytes);
inline constexpr unsigned long kIoctlGetXsave = _IOC(_IOC_READ, KVMIO, 0xa4, kXsaveBytes);
inline constexpr unsigned long kIoctlSetXsave = _IOC(_IOC_WRITE, KVMIO, 0xa5, kXsaveBytes);

class KvmVm;

// Why /dev/kvm cannot run this VMM's guests in useful time here, or nothing if it can: the
// device is missing or inaccessible, or it is software nested virtualisation (the kvm_pvm
// module), which runs guest ring 0 about 1000x slower than TCG and does not run the micro
// guest at all (design.md §3).
std::optional<std::string> kvm_unusable_reason(const std::filesystem::path& device = "/dev/kvm");

class KvmSystem {
 public:
  // Opens the device, checks the API version (12) and every capability this VMM relies on,
  // reporting all missing ones together.
  static Result<KvmSystem> open(const std::filesystem::path& device = "/dev/kvm");

  int fd() const { return fd_.get(); }
  // The capability's value, 0 when KVM does not have it.
  int check_extension(long capability) const;
  size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
  // KVM_GET_SUPPORTED_CPUID, retried with a larger buffer on E2BIG.
  Result<std::vector<kvm_cpuid_entry2>> supported_cpuid() const;
  // KVM_GET_MSR_INDEX_LIST: the MSRs whose values make up a vCPU's saved state.
  Result<std::vector<uint32_t>> msr_index_list() const;
  // KVM_CREATE_VM, then the TSS, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and the PIT with
  // a dummy speaker, all of which must exist before the first vCPU.
  Result<KvmVm> create_vm() const;
  // A bare VM without irqchip or PIT: the benchmark's floor.
  Result<KvmVm> create_bare_vm() const;

 private:
  KvmSystem(Fd fd, size_t vcpu_mmap_size) : fd_(std::move(fd)), vcpu_mmap_size_(vcpu_mmap_size) {}
  Fd fd_;
  size_t vcpu_mmap_size_ = 0;
};

// The VM-wide state KVM keeps in the kernel: PIT, kvmclock and the three irqchips (PIC
// master, PIC slave, IOAPIC).
struct VmState {
  kvm_pit_state2 pit{};
  kvm_clock_data clock{};
  kvm_irqchip irqchips[3]{};
};

class KvmVm {
 public:
  int fd() const { return fd_.get(); }
  // Registers `host` as guest-physical memory starting at `guest_address` in `slot`.
  // REQUIRES: `host` stays mapped for the VM's lifetime and is page aligned.
  Status set_memory(uint32_t slot, uint64_t guest_address, std::span<uint8_t> host, bool log_dirty);
  // KVM_GET_DIRTY_LOG: one bit per page written by the guest since the previous call (or since
  // the slot was registered); reading clears it. Little-endian 64-bit words.
  Result<std::vector<uint64_t>> take_dirty_log(uint32_t slot, uint64_t pages);
  // Drives an ISA interrupt line of the in-kernel PIC and IOAPIC.
  Status set_irq_line(uint32_t irq, bool level);

  // REQUIRES: every vCPU is paused.
  Result<VmState> save_state() const;
  Status restore_state(const VmState& state);

 private:
  friend class KvmSystem;
  explicit KvmVm(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

// A vCPU's complete architectural state as KVM exposes it.
struct VcpuState {
  kvm_mp_state mp_state{};
  kvm_regs regs{};
  kvm_sregs sregs{};
  std::vector<uint8_t> xsave;  // struct kvm_xsave's kXsaveBytes.
  kvm_xcrs xcrs{};
  kvm_debugregs debugregs{};
  kvm_lapic_state lapic{};
  uint32_t tsc_khz = 0;
  std::vector<kvm_cpuid_entry2> cpuid;
  std::vector<kvm_msr_entry> msrs;
  kvm_vcpu_events events{};
};

class Vcpu {
 public:
  static Result<Vcpu> create(const KvmSystem& system, const KvmVm& vm, uint32_t index);
  Vcpu(Vcpu&&) noexcept = default;
  Vcpu& operator=(Vcpu&&) noexcept = default;

  uint32_t index() const { return index_; }
  int fd() const { return fd_.get(); }
  kvm_run* run() const { return reinterpret_cast<kvm_run*>(run_.data()); }
  // The bytes of an IO exit's data, inside the kvm_run mapping. Empty if KVM's offsets point
  // outside it.
  std::span<uint8_t> io_data() const;

  Status set_cpuid(std::span<const kvm_cpuid_entry2> entries);
  Status set_msrs(std::span<const kvm_msr_entry> msrs);
  Result<kvm_regs> regs() const;
  Status set_regs(const kvm_regs& regs);
  Result<kvm_sregs> sregs() const;
  Status set_sregs(const kvm_sregs& sregs);
  Status set_fpu(const kvm_fpu& fpu);
  Result<kvm_lapic_state> lapic() const;
  Status set_lapic(const kvm_lapic_state& lapic);
  // Single-steps the next KVM_RUN (KVM_GUESTDBG_SINGLESTEP) or turns stepping off.
  Status set_single_step(bool enabled);
  // KVM_GET_TSC_KHZ: the guest TSC frequency KVM gives this vCPU.
  Result<uint32_t> tsc_khz() const;

  // Ordering (api.rst and Firecracker's vcpu.rs): MP_STATE first, because reading it
  // accepts pending INIT/SIPI events and may change the LAPIC; VCPU_EVENTS last, because
  // the other GET calls may change pending-event state. REQUIRES: every vCPU is paused and its
  // last exit was completed by a KVM_RUN with immediate_exit.
  Result<VcpuState> save_state(std::span<const uint32_t> msr_indices) const;
  // Ordering: CPUID before everything (KVM checks EFER.LME and MSRs against it); REGS
  // before VCPU_EVENTS (SET_REGS clears pending exceptions); SREGS (APIC base) before LAPIC;
  // LAPIC before MSRs (the TSC deadline only restores onto a configured LAPIC); TSC before
  // TSC_DEADLINE; VCPU_EVENTS last.
  Status restore_state(const VcpuState& state);

 private:
  Vcpu(Fd fd, Mapping run, uint32_t index) : fd_(std::move(fd)), run_(std::move(run)), index_(index) {}
  Fd fd_;
  Mapping run_;
  uint32_t index_ = 0;
};

// The host CPU's vendor string from CPUID leaf 0 ("AuthenticAMD", "GenuineIntel").
std::string host_cpu_vendor();

}  // namespace deltavm::vmm
