// Loading a Linux bzImage and its initramfs into guest RAM for the 64-bit boot protocol (Linux
// Documentation/arch/x86/boot.rst, zero-page.rst; brief §1.2-1.5): the protected-mode kernel
// at code32_start, the initramfs at the top of RAM, the zero page (boot_params) with the setup
// header, command line and e820 map, and the boot GDT and page tables.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "base/error.h"

namespace deltavm::vmm {

inline constexpr uint64_t kCommandLineAddress = 0x20000;
inline constexpr size_t kMaxCommandLineBytes = 2048;

struct LinuxBootInfo {
  uint64_t entry = 0;        // 64-bit entry: load address + 0x200.
  uint64_t boot_params = 0;  // For %rsi.
  uint64_t initrd_address = 0;
};

// Validates the bzImage's setup header (HdrS, protocol >= 2.12, 64-bit entry, loaded high) and
// that kernel, decompression window and initramfs fit in `ram`, then writes everything.
// With more than one vCPU it also writes the ACPI tables the kernel needs to start them.
// `origin` names the kernel in errors. REQUIRES: `ram` is zeroed fresh guest memory.
Result<LinuxBootInfo> load_linux(std::span<uint8_t> ram, std::span<const uint8_t> kernel,
                                 std::span<const uint8_t> initrd, std::string_view command_line,
                                 std::string_view origin, uint32_t vcpus = 1);

}  // namespace deltavm::vmm
