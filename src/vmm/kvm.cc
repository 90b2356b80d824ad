#include "vmm/kvm.h"

#include <cpuid.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace deltavm::vmm {
namespace {

constexpr uint32_t kMsrTscDeadline = 0x6e0;
constexpr uint32_t kMsrTsc = 0x10;

// ioctl(2) retried on EINTR, as an Error naming the request on failure.
Result<int> checked_ioctl(int fd, unsigned long request, const char* name, unsigned long argument = 0) {
  for (;;) {
    int result = ::ioctl(fd, request, argument);
    if (result >= 0) return result;
    if (errno == EINTR) continue;
    return errno_error(name, errno);
  }
}

template <typename T>
Status ioctl_struct(int fd, unsigned long request, const char* name, T* value) {
  auto result = checked_ioctl(fd, request, name, reinterpret_cast<unsigned long>(value));
  if (!result) return result.error();
  return {};
}

// A kernel struct that ends in a flexible array, laid out as C lays it out: a u32 count at
// offset 0, `header_bytes` of header, then room for `capacity` entries.
template <typename Entry>
class FlexibleArray {
 public:
  FlexibleArray(size_t header_bytes, size_t capacity)
      : header_bytes_(header_bytes), bytes_(header_bytes + capacity * sizeof(Entry), 0) {}
  void* get() { return bytes_.data(); }
  uint32_t count() const {
    uint32_t value;
    std::memcpy(&value, bytes_.data(), 4);
    return value;
  }
  void set_count(uint32_t value) { std::memcpy(bytes_.data(), &value, 4); }
  Entry* entries() { return reinterpret_cast<Entry*>(bytes_.data() + header_bytes_); }

 private:
  size_t header_bytes_;
  std::vector<uint8_t> bytes_;
};

}  // namespace

std::optional<std::string> kvm_unusable_reason(const std::filesystem::path& device) {
  if (::access(device.c_str(), R_OK | W_OK) != 0) {
    return fmt::format("{} is not usable here ({})", device.string(), std::strerror(errno));
  }
  std::error_code error;
  if (std::filesystem::exists("/sys/module/kvm_pvm", error)) {
    return fmt::format("{} is software nested virtualisation (kvm_pvm): guest ring 0 is emulated", device.string());
  }
  return std::nullopt;
}

Result<KvmSystem> KvmSystem::open(const std::filesystem::path& device) {
  int raw = ::open(device.c_str(), O_RDWR | O_CLOEXEC);
  if (raw < 0) return errno_error(fmt::format("open {}", device.string()), errno);
  Fd fd(raw);
  DELTAVM_ASSIGN_OR_RETURN(int version, checked_ioctl(fd.get(), KVM_GET_API_VERSION, "KVM_GET_API_VERSION"));
  if (version != KVM_API_VERSION) {
    return make_error(ErrorCode::kUnsupported, "{}: KVM API version {}, expected {}", device.string(), version,
                      KVM_API_VERSION);
  }
  struct Required {
    long capability;
    const char* name;
  };
  static constexpr Required kRequired[] = {
      {KVM_CAP_IRQCHIP, "IRQCHIP"},
      {KVM_CAP_USER_MEMORY, "USER_MEMORY"},
      {KVM_CAP_SET_TSS_ADDR, "SET_TSS_ADDR"},
      {KVM_CAP_PIT2, "PIT2"},
      {KVM_CAP_PIT_STATE2, "PIT_STATE2"},
      {KVM_CAP_ADJUST_CLOCK, "ADJUST_CLOCK"},
      {KVM_CAP_DEBUGREGS, "DEBUGREGS"},
      {KVM_CAP_MP_STATE, "MP_STATE"},
      {KVM_CAP_VCPU_EVENTS, "VCPU_EVENTS"},
      {KVM_CAP_XCRS, "XCRS"},
      {KVM_CAP_XSAVE, "XSAVE"},
      {KVM_CAP_EXT_CPUID, "EXT_CPUID"},
      {KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"},
  };
  std::string missing;
  for (const Required& required : kRequired) {
    if (::ioctl(fd.get(), KVM_CHECK_EXTENSION, required.capability) <= 0) {
      missing += missing.empty() ? required.name : fmt::format(", {}", required.name);
    }
  }
  if (!missing.empty()) {
    return make_error(ErrorCode::kUnsupported, "{} lacks KVM capabilities this VMM needs: {}", device.string(),
                      missing);
  }
  int xsave2 = ::ioctl(fd.get(), KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
  if (xsave2 > static_cast<int>(kXsaveBytes)) {
    return make_error(ErrorCode::kUnsupported,
                      "{}: XSAVE state of {} bytes (AMX?) is larger than the {} this VMM saves", device.string(),
                      xsave2, kXsaveBytes);
  }
  DELTAVM_ASSIGN_OR_RETURN(int mmap_size, checked_ioctl(fd.get(), KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE"));
  return KvmSystem(std::move(fd), static_cast<size_t>(mmap_size));
}

int KvmSystem::check_extension(long capability) const {
  int value = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, capability);
  return value < 0 ? 0 : value;
}

Result<std::vector<kvm_cpuid_entry2>> KvmSystem::supported_cpuid() const {
  for (size_t count = 128; count <= kMaxCpuidEntries; count *= 2) {
    FlexibleArray<kvm_cpuid_entry2> cpuid(kCpuidHeaderBytes, count);
    cpuid.set_count(static_cast<uint32_t>(count));
    if (::ioctl(fd_.get(), kIoctlGetSupportedCpuid, cpuid.get()) == 0) {
      return std::vector<kvm_cpuid_entry2>(cpuid.entries(), cpuid.entries() + cpuid.count());
    }
    if (errno != E2BIG) return errno_error("KVM_GET_SUPPORTED_CPUID", errno);
  }
  return make_error(ErrorCode::kUnsupported, "KVM_GET_SUPPORTED_CPUID: more than {} entries", kMaxCpuidEntries);
}

Result<std::vector<uint32_t>> KvmSystem::msr_index_list() const {
  for (uint32_t count = 256; count <= 16384; count *= 4) {
    FlexibleArray<uint32_t> list(kMsrListHeaderBytes, count);
    list.set_count(count);
    if (::ioctl(fd_.get(), kIoctlGetMsrIndexList, list.get()) == 0) {
      return std::vector<uint32_t>(list.entries(), list.entries() + list.count());
    }
    if (errno != E2BIG) return errno_error("KVM_GET_MSR_INDEX_LIST", errno);
  }
  return make_error(ErrorCode::kUnsupported, "KVM_GET_MSR_INDEX_LIST: more than 16384 MSRs");
}

Result<KvmVm> KvmSystem::create_bare_vm() const {
  DELTAVM_ASSIGN_OR_RETURN(int vm_fd, checked_ioctl(fd_.get(), KVM_CREATE_VM, "KVM_CREATE_VM", 0));
  KvmVm vm{Fd(vm_fd)};
  DELTAVM_TRY(checked_ioctl(vm.fd(), KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", kTssAddress));
  return vm;
}

Result<KvmVm> KvmSystem::create_vm() const {
  DELTAVM_ASSIGN_OR_RETURN(KvmVm vm, create_bare_vm());
  DELTAVM_TRY(checked_ioctl(vm.fd(), KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP"));
  kvm_pit_config pit{};
  pit.flags = KVM_PIT_SPEAKER_DUMMY;  // Port 0x61 stays in the kernel.
  DELTAVM_TRY(ioctl_struct(vm.fd(), KVM_CREATE_PIT2, "KVM_CREATE_PIT2", &pit));
  return vm;
}

Status KvmVm::set_memory(uint32_t slot, uint64_t guest_address, std::span<uint8_t> host, bool log_dirty) {
  kvm_userspace_memory_region region{};
  region.slot = slot;
  region.flags = log_dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  region.guest_phys_addr = guest_address;
  region.memory_size = host.size();
  region.userspace_addr = reinterpret_cast<uint64_t>(host.data());
  return ioctl_struct(fd_.get(), KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region);
}

Result<std::vector<uint64_t>> KvmVm::take_dirty_log(uint32_t slot, uint64_t pages) {
  std::vector<uint64_t> bitmap((pages + 63) / 64, 0);
  kvm_dirty_log log{};
  log.slot = slot;
  log.dirty_bitmap = bitmap.data();
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_DIRTY_LOG, "KVM_GET_DIRTY_LOG", &log));
  return bitmap;
}

Status KvmVm::set_irq_line(uint32_t irq, bool level) {
  kvm_irq_level line{};
  line.irq = irq;
  line.level = level ? 1 : 0;
  return ioctl_struct(fd_.get(), KVM_IRQ_LINE, "KVM_IRQ_LINE", &line);
}

Result<VmState> KvmVm::save_state() const {
  VmState state;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_PIT2, "KVM_GET_PIT2", &state.pit));
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_CLOCK, "KVM_GET_CLOCK", &state.clock));
  for (uint32_t chip = 0; chip < 3; ++chip) {
    state.irqchips[chip].chip_id = chip;  // PIC master, PIC slave, IOAPIC.
    DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", &state.irqchips[chip]));
  }
  return state;
}

Status KvmVm::restore_state(const VmState& state) {
  kvm_pit_state2 pit = state.pit;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_SET_PIT2, "KVM_SET_PIT2", &pit));
  // Flags 0: the guest clock resumes at the saved value, so every clone of one image starts at
  // the same guest time instead of jumping by the time since the capture.
  kvm_clock_data clock{};
  clock.clock = state.clock.clock;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_SET_CLOCK, "KVM_SET_CLOCK", &clock));
  for (const kvm_irqchip& saved : state.irqchips) {
    kvm_irqchip chip = saved;
    DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_SET_IRQCHIP, "KVM_SET_IRQCHIP", &chip));
  }
  return {};
}

Result<Vcpu> Vcpu::create(const KvmSystem& system, const KvmVm& vm, uint32_t index) {
  DELTAVM_ASSIGN_OR_RETURN(int vcpu_fd, checked_ioctl(vm.fd(), KVM_CREATE_VCPU, "KVM_CREATE_VCPU", index));
  Fd fd(vcpu_fd);
  DELTAVM_ASSIGN_OR_RETURN(
      Mapping run, Mapping::map(fd.get(), system.vcpu_mmap_size(), PROT_READ | PROT_WRITE, MAP_SHARED, 0, "kvm_run"));
  return Vcpu(std::move(fd), std::move(run), index);
}

std::span<uint8_t> Vcpu::io_data() const {
  const kvm_run* state = run();
  uint64_t length = uint64_t{state->io.size} * state->io.count;
  if (state->io.data_offset > run_.size() || length > run_.size() - state->io.data_offset) return {};
  return {run_.data() + state->io.data_offset, length};
}

Status Vcpu::set_cpuid(std::span<const kvm_cpuid_entry2> entries) {
  FlexibleArray<kvm_cpuid_entry2> cpuid(kCpuidHeaderBytes, entries.size());
  cpuid.set_count(static_cast<uint32_t>(entries.size()));
  std::copy(entries.begin(), entries.end(), cpuid.entries());
  return ioctl_struct(fd_.get(), kIoctlSetCpuid2, "KVM_SET_CPUID2", cpuid.get());
}

Status Vcpu::set_msrs(std::span<const kvm_msr_entry> msrs) {
  if (msrs.empty()) return {};
  FlexibleArray<kvm_msr_entry> list(kMsrsHeaderBytes, msrs.size());
  list.set_count(static_cast<uint32_t>(msrs.size()));
  std::copy(msrs.begin(), msrs.end(), list.entries());
  DELTAVM_ASSIGN_OR_RETURN(int written, checked_ioctl(fd_.get(), kIoctlSetMsrs, "KVM_SET_MSRS",
                                                      reinterpret_cast<unsigned long>(list.get())));
  if (static_cast<size_t>(written) != msrs.size()) {
    return make_error(ErrorCode::kUnsupported, "KVM_SET_MSRS: KVM refused MSR {:#x} (entry {} of {})",
                      msrs[static_cast<size_t>(written)].index, written, msrs.size());
  }
  return {};
}

Result<kvm_regs> Vcpu::regs() const {
  kvm_regs value{};
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_REGS, "KVM_GET_REGS", &value));
  return value;
}

Status Vcpu::set_regs(const kvm_regs& regs) {
  kvm_regs value = regs;
  return ioctl_struct(fd_.get(), KVM_SET_REGS, "KVM_SET_REGS", &value);
}

Result<kvm_sregs> Vcpu::sregs() const {
  kvm_sregs value{};
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_SREGS, "KVM_GET_SREGS", &value));
  return value;
}

Status Vcpu::set_sregs(const kvm_sregs& sregs) {
  kvm_sregs value = sregs;
  return ioctl_struct(fd_.get(), KVM_SET_SREGS, "KVM_SET_SREGS", &value);
}

Status Vcpu::set_fpu(const kvm_fpu& fpu) {
  kvm_fpu value = fpu;
  return ioctl_struct(fd_.get(), KVM_SET_FPU, "KVM_SET_FPU", &value);
}

Result<kvm_lapic_state> Vcpu::lapic() const {
  kvm_lapic_state value{};
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_LAPIC, "KVM_GET_LAPIC", &value));
  return value;
}

Status Vcpu::set_lapic(const kvm_lapic_state& lapic) {
  kvm_lapic_state value = lapic;
  return ioctl_struct(fd_.get(), KVM_SET_LAPIC, "KVM_SET_LAPIC", &value);
}

Status Vcpu::set_single_step(bool enabled) {
  kvm_guest_debug debug{};
  debug.control = enabled ? (KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP) : 0;
  return ioctl_struct(fd_.get(), KVM_SET_GUEST_DEBUG, "KVM_SET_GUEST_DEBUG", &debug);
}

Result<uint32_t> Vcpu::tsc_khz() const {
  DELTAVM_ASSIGN_OR_RETURN(int khz, checked_ioctl(fd_.get(), KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ"));
  return static_cast<uint32_t>(khz);
}

Result<VcpuState> Vcpu::save_state(std::span<const uint32_t> msr_indices) const {
  VcpuState state;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_MP_STATE, "KVM_GET_MP_STATE", &state.mp_state));
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_REGS, "KVM_GET_REGS", &state.regs));
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_SREGS, "KVM_GET_SREGS", &state.sregs));
  state.xsave.assign(kXsaveBytes, 0);
  DELTAVM_TRY(ioctl_struct(fd_.get(), kIoctlGetXsave, "KVM_GET_XSAVE", state.xsave.data()));
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_XCRS, "KVM_GET_XCRS", &state.xcrs));
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", &state.debugregs));
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_LAPIC, "KVM_GET_LAPIC", &state.lapic));
  DELTAVM_ASSIGN_OR_RETURN(state.tsc_khz, tsc_khz());

  for (size_t count = 64; count <= kMaxMsrEntries; count *= 2) {
    FlexibleArray<kvm_cpuid_entry2> cpuid(kCpuidHeaderBytes, count);
    cpuid.set_count(static_cast<uint32_t>(count));
    if (::ioctl(fd_.get(), kIoctlGetCpuid2, cpuid.get()) == 0) {
      state.cpuid.assign(cpuid.entries(), cpuid.entries() + cpuid.count());
      break;
    }
    if (errno != E2BIG) return errno_error("KVM_GET_CPUID2", errno);
  }

  // Every MSR KVM lists, read one call at a time so that one KVM refuses is skipped rather than
  // ending the capture (KVM_GET_MSRS stops at the first failing entry).
  FlexibleArray<kvm_msr_entry> list(kMsrsHeaderBytes, msr_indices.size());
  size_t next = 0;
  while (next < msr_indices.size()) {
    size_t count = msr_indices.size() - next;
    list.set_count(static_cast<uint32_t>(count));
    for (size_t i = 0; i < count; ++i) list.entries()[i] = kvm_msr_entry{msr_indices[next + i], 0, 0};
    DELTAVM_ASSIGN_OR_RETURN(
        int read, checked_ioctl(fd_.get(), kIoctlGetMsrs, "KVM_GET_MSRS", reinterpret_cast<unsigned long>(list.get())));
    state.msrs.insert(state.msrs.end(), list.entries(), list.entries() + read);
    next += static_cast<size_t>(read) + 1;  // Skip the refused entry, if any.
  }
  // The TSC deadline goes last, after the TSC, and a zero deadline is replaced by the TSC so
  // that the timer fires after a restore (Firecracker's fix_zero_tsc_deadline_msr).
  uint64_t tsc = 0;
  for (const kvm_msr_entry& msr : state.msrs) {
    if (msr.index == kMsrTsc) tsc = msr.data;
  }
  auto deadline = std::find_if(state.msrs.begin(), state.msrs.end(),
                               [](const kvm_msr_entry& msr) { return msr.index == kMsrTscDeadline; });
  if (deadline != state.msrs.end()) {
    kvm_msr_entry entry = *deadline;
    if (entry.data == 0) entry.data = tsc;
    state.msrs.erase(deadline);
    state.msrs.push_back(entry);
  }

  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &state.events));
  return state;
}

Status Vcpu::restore_state(const VcpuState& state) {
  DELTAVM_TRY(set_cpuid(state.cpuid));
  kvm_mp_state mp_state = state.mp_state;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_SET_MP_STATE, "KVM_SET_MP_STATE", &mp_state));
  DELTAVM_TRY(set_regs(state.regs));
  DELTAVM_TRY(set_sregs(state.sregs));
  if (state.xsave.size() != kXsaveBytes) {
    return make_error(ErrorCode::kInvalidArgument, "XSAVE state of {} bytes, expected {}", state.xsave.size(),
                      kXsaveBytes);
  }
  std::vector<uint8_t> xsave = state.xsave;
  DELTAVM_TRY(ioctl_struct(fd_.get(), kIoctlSetXsave, "KVM_SET_XSAVE", xsave.data()));
  kvm_xcrs xcrs = state.xcrs;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_SET_XCRS, "KVM_SET_XCRS", &xcrs));
  kvm_debugregs debugregs = state.debugregs;
  DELTAVM_TRY(ioctl_struct(fd_.get(), KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", &debugregs));
  DELTAVM_TRY(set_lapic(state.lapic));
  std::span<const kvm_msr_entry> msrs = state.msrs;
  bool deadline_last = !msrs.empty() && msrs.back().index == kMsrTscDeadline;
  DELTAVM_TRY(set_msrs(deadline_last ? msrs.first(msrs.size() - 1) : msrs));
  if (deadline_last) DELTAVM_TRY(set_msrs(msrs.last(1)));
  kvm_vcpu_events events = state.events;
  return ioctl_struct(fd_.get(), KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", &events);
}

std::string host_cpu_vendor() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  __get_cpuid(0, &eax, &ebx, &ecx, &edx);
  char vendor[12];
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::string(vendor, 12);
}

}  // namespace deltavm::vmm
