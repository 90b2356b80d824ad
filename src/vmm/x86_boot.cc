#include "vmm/x86_boot.h"

#include <cstring>

#include "base/coding.h"

namespace deltavm::vmm {
namespace {

constexpr uint64_t kGdtEntries = 8;  // null, null, code, data, user data, user code, TSS (2).
constexpr uint32_t kTssLimit = 0x67;

// A segment descriptor from its flags (type, S, DPL, P, then AVL, L, D/B, G), base and limit.
uint64_t gdt_entry(uint16_t flags, uint32_t base, uint32_t limit) {
  return (uint64_t{base & 0xff000000u} << 32) | (uint64_t{flags & 0xf0ffu} << 40) |
         (uint64_t{limit & 0x000f0000u} << 32) | (uint64_t{base & 0x00ffffffu} << 16) | uint64_t{limit & 0xffffu};
}

// The segment register contents KVM_SET_SREGS needs for a descriptor, as the CPU would load
// them from the GDT.
kvm_segment segment_from_entry(uint64_t entry, uint16_t selector) {
  kvm_segment segment{};
  segment.base = ((entry >> 16) & 0xffffff) | (((entry >> 56) & 0xff) << 24);
  uint32_t limit = static_cast<uint32_t>((entry & 0xffff) | (((entry >> 48) & 0xf) << 16));
  segment.g = (entry >> 55) & 1;
  segment.limit = segment.g ? (limit << 12) | 0xfff : limit;
  segment.selector = selector;
  segment.type = (entry >> 40) & 0xf;
  segment.s = (entry >> 44) & 1;
  segment.dpl = (entry >> 45) & 3;
  segment.present = (entry >> 47) & 1;
  segment.avl = (entry >> 52) & 1;
  segment.l = (entry >> 53) & 1;
  segment.db = (entry >> 54) & 1;
  segment.unusable = segment.present ? 0 : 1;
  return segment;
}

uint64_t kernel_code_entry() { return gdt_entry(0xa09b, 0, 0xfffff); }
uint64_t kernel_data_entry() { return gdt_entry(0xc093, 0, 0xfffff); }
uint64_t tss_entry() { return gdt_entry(0x008b, kTssStructAddress, kTssLimit); }

void store_u64(std::span<uint8_t> ram, uint64_t address, uint64_t value) {
  for (int i = 0; i < 8; ++i) ram[address + i] = static_cast<uint8_t>(value >> (8 * i));
}

}  // namespace

Status check_micro_program(std::span<const uint8_t> program, std::string_view origin) {
  static constexpr char kMagic[8] = {'D', 'V', 'M', 'I', 'C', 'R', 'O', '1'};
  if (program.size() < 16 || std::memcmp(program.data() + 8, kMagic, 8) != 0) {
    return make_error(ErrorCode::kInvalidArgument, "{}: not a micro guest (no DVMICRO1 at offset 8)", origin);
  }
  if (program.size() > (16u << 20) - kProgramAddress) {
    return make_error(ErrorCode::kInvalidArgument, "{}: {} bytes, larger than the 15 MiB below the work area", origin,
                      program.size());
  }
  return {};
}

void write_boot_tables(std::span<uint8_t> ram, bool user_accessible) {
  const uint64_t entries[kGdtEntries] = {
      0,
      0,
      kernel_code_entry(),
      kernel_data_entry(),
      gdt_entry(0xc0f3, 0, 0xfffff),  // User data, DPL 3.
      gdt_entry(0xa0fb, 0, 0xfffff),  // User code, 64-bit, DPL 3.
      tss_entry(),
      0,  // Upper half of the 16-byte TSS descriptor: base bits 32-63.
  };
  for (uint64_t i = 0; i < kGdtEntries; ++i) store_u64(ram, kGdtAddress + i * 8, entries[i]);
  store_u64(ram, kIdtAddress, 0);
  std::memset(ram.data() + kTssStructAddress, 0, kTssLimit + 1);

  // PML4[0] -> PDPT, PDPT[0] -> PD, PD[i] -> 2 MiB page i: the first 1 GiB, identity mapped.
  uint64_t user = user_accessible ? 0x4 : 0;
  uint64_t pdpt = kPml4Address + 0x1000;
  uint64_t pd = kPml4Address + 0x2000;
  std::memset(ram.data() + kPml4Address, 0, 0x3000);
  store_u64(ram, kPml4Address, pdpt | 0x3 | user);
  store_u64(ram, pdpt, pd | 0x3 | user);
  for (uint64_t i = 0; i < 512; ++i) store_u64(ram, pd + i * 8, (i << 21) | 0x83 | user);
}

std::vector<kvm_cpuid_entry2> normalize_cpuid(std::span<const kvm_cpuid_entry2> supported, uint32_t vcpu_index,
                                              uint32_t vcpu_count) {
  std::vector<kvm_cpuid_entry2> entries(supported.begin(), supported.end());
  for (kvm_cpuid_entry2& entry : entries) {
    switch (entry.function) {
      case 0x1:
        entry.ebx = (vcpu_index << 24) | (vcpu_count << 16) | (8u << 8) | (entry.ebx & 0xff);
        entry.ecx |= 1u << 31;     // Running under a hypervisor.
        entry.ecx |= 1u << 24;     // TSC deadline timer: the in-kernel LAPIC has it.
        entry.ecx &= ~(1u << 15);  // No perfmon/debug capability MSR.
        if (vcpu_count > 1) {
          entry.edx |= 1u << 28;
        } else {
          entry.edx &= ~(1u << 28);
        }
        break;
      case 0x6:
        entry.eax &= ~(1u << 1);  // No turbo.
        entry.ecx &= ~(1u << 3);  // No energy-performance bias.
        break;
      case 0xa:  // No PMU.
        entry.eax = entry.ebx = entry.ecx = entry.edx = 0;
        break;
      case 0xb:
      case 0x1f:
        entry.edx = vcpu_index;  // x2APIC ID.
        break;
      default: break;
    }
  }
  return entries;
}

Status configure_vcpu(Vcpu& vcpu, std::span<const kvm_cpuid_entry2> cpuid) {
  // CPUID first: KVM checks EFER.LME and CPUID-dependent MSRs against it.
  DELTAVM_TRY(vcpu.set_cpuid(cpuid));

  bool mtrr = false;
  for (const kvm_cpuid_entry2& leaf : cpuid) {
    if (leaf.function == 1) mtrr = (leaf.edx >> 12) & 1;
  }
  std::vector<kvm_msr_entry> msrs = {
      {0x174, 0, 0},       // SYSENTER_CS
      {0x175, 0, 0},       // SYSENTER_ESP
      {0x176, 0, 0},       // SYSENTER_EIP
      {0xc0000081, 0, 0},  // STAR
      {0xc0000082, 0, 0},  // LSTAR
      {0xc0000083, 0, 0},  // CSTAR
      {0xc0000084, 0, 0},  // SFMASK
      {0xc0000102, 0, 0},  // KERNEL_GS_BASE
      {0x10, 0, 0},        // TSC
      {0x1a0, 0, 1},       // MISC_ENABLE: fast strings.
  };
  if (mtrr) msrs.push_back({0x2ff, 0, (1u << 11) | 6});  // MTRRs on, write-back default.
  DELTAVM_TRY(vcpu.set_msrs(msrs));
  if (host_cpu_vendor() == "AuthenticAMD") {
    // HWCR.TscFreqSel: the TSC counts at the P0 frequency, as Linux expects on AMD. Some KVM
    // versions refuse host writes of that bit; Linux then only warns, so this is best effort.
    const kvm_msr_entry hwcr{0xc0010015, 0, 1u << 24};
    (void)vcpu.set_msrs(std::span(&hwcr, 1));
  }

  // LINT0 in ExtINT mode and LINT1 as NMI: the PIC reaches the CPU in virtual-wire mode.
  DELTAVM_ASSIGN_OR_RETURN(kvm_lapic_state lapic, vcpu.lapic());
  auto set_lvt = [&](size_t offset, uint32_t mode) {
    uint32_t value;
    std::memcpy(&value, lapic.regs + offset, 4);
    value = (value & ~0x700u) | (mode << 8);
    std::memcpy(lapic.regs + offset, &value, 4);
  };
  set_lvt(0x350, 7);
  set_lvt(0x360, 4);
  return vcpu.set_lapic(lapic);
}

Status configure_long_mode_vcpu(Vcpu& vcpu, std::span<const kvm_cpuid_entry2> cpuid, uint64_t entry, uint64_t rsi,
                                uint64_t rdi) {
  DELTAVM_TRY(configure_vcpu(vcpu, cpuid));
  kvm_fpu fpu{};
  fpu.fcw = 0x37f;
  fpu.mxcsr = 0x1f80;
  DELTAVM_TRY(vcpu.set_fpu(fpu));

  DELTAVM_ASSIGN_OR_RETURN(kvm_sregs sregs, vcpu.sregs());
  kvm_segment code = segment_from_entry(kernel_code_entry(), kKernelCodeSelector);
  kvm_segment data = segment_from_entry(kernel_data_entry(), kKernelDataSelector);
  sregs.cs = code;
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  sregs.tr = segment_from_entry(tss_entry(), kTssSelector);
  sregs.gdt.base = kGdtAddress;
  sregs.gdt.limit = kGdtEntries * 8 - 1;
  sregs.idt.base = kIdtAddress;
  sregs.idt.limit = 7;
  sregs.cr3 = kPml4Address;
  sregs.cr4 |= 0x20 | 0x200 | 0x400;  // PAE, OSFXSR, OSXMMEXCPT.
  sregs.cr0 |= 0x80000001 | 0x20;     // PG, PE, NE.
  sregs.efer |= 0x500;                // LME, LMA.
  DELTAVM_TRY(vcpu.set_sregs(sregs));

  kvm_regs regs{};
  regs.rip = entry;
  regs.rsi = rsi;
  regs.rdi = rdi;
  regs.rsp = regs.rbp = kBootStackAddress;
  regs.rflags = 0x2;
  return vcpu.set_regs(regs);
}

}  // namespace deltavm::vmm
