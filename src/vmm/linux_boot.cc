#include "vmm/linux_boot.h"

#include <algorithm>
#include <cstring>

#include "base/coding.h"
#include "vmm/acpi.h"
#include "vmm/x86_boot.h"

namespace deltavm::vmm {
namespace {

// Setup header offsets in the bzImage and in boot_params (zero-page.rst).
// struct boot_params, the "zero page" (Documentation/x86/zero-page.rst): 4 KiB.
constexpr size_t kBootParamsBytes = 0x1000;
constexpr size_t kSetupSects = 0x1f1;
constexpr size_t kJumpEnd = 0x201;  // The header ends at 0x202 + this byte.
constexpr size_t kHeaderMagic = 0x202;
constexpr size_t kVersion = 0x206;
constexpr size_t kTypeOfLoader = 0x210;
constexpr size_t kLoadFlags = 0x211;
constexpr size_t kCode32Start = 0x214;
constexpr size_t kRamdiskImage = 0x218;
constexpr size_t kRamdiskSize = 0x21c;
constexpr size_t kCmdLinePtr = 0x228;
constexpr size_t kInitrdAddrMax = 0x22c;
constexpr size_t kXLoadFlags = 0x236;
constexpr size_t kCmdlineSize = 0x238;
constexpr size_t kInitSize = 0x260;
constexpr size_t kAcpiRsdpAddress = 0x070;
constexpr size_t kE820Entries = 0x1e8;
constexpr size_t kE820Table = 0x2d0;
constexpr uint32_t kHdrS = 0x53726448;
constexpr uint64_t kLoadPhysicalAddress = 16ull << 20;  // Where Debian's kernel decompresses to.
constexpr uint32_t kE820Ram = 1, kE820Reserved = 2;

uint16_t u16_at(std::span<const uint8_t> bytes, size_t offset) {
  return static_cast<uint16_t>(bytes[offset] | (bytes[offset + 1] << 8));
}

void store_u32(uint8_t* at, uint32_t value) {
  for (int i = 0; i < 4; ++i) at[i] = static_cast<uint8_t>(value >> (8 * i));
}

void store_u64(uint8_t* at, uint64_t value) {
  for (int i = 0; i < 8; ++i) at[i] = static_cast<uint8_t>(value >> (8 * i));
}

}  // namespace

Result<LinuxBootInfo> load_linux(std::span<uint8_t> ram, std::span<const uint8_t> kernel,
                                 std::span<const uint8_t> initrd, std::string_view command_line,
                                 std::string_view origin, uint32_t vcpus) {
  if (kernel.size() < kInitSize + 4 || get_u32_le(kernel.data() + kHeaderMagic) != kHdrS) {
    return make_error(ErrorCode::kInvalidArgument, "{}: not a bzImage (no HdrS setup header at 0x202)", origin);
  }
  uint16_t version = u16_at(kernel, kVersion);
  if (version < 0x020c) {
    return make_error(ErrorCode::kUnsupported, "{}: boot protocol {}.{}, the 64-bit entry needs 2.12", origin,
                      version >> 8, version & 0xff);
  }
  if ((u16_at(kernel, kXLoadFlags) & 1) == 0 || (kernel[kLoadFlags] & 1) == 0) {
    return make_error(ErrorCode::kUnsupported, "{}: no 64-bit entry point (XLF_KERNEL_64) or not loaded high", origin);
  }
  size_t setup_sectors = kernel[kSetupSects] == 0 ? 4 : kernel[kSetupSects];
  size_t payload_offset = (setup_sectors + 1) * 512;
  uint32_t load_address = get_u32_le(kernel.data() + kCode32Start);
  uint32_t init_size = get_u32_le(kernel.data() + kInitSize);
  if (payload_offset >= kernel.size() || load_address < kProgramAddress ||
      load_address + (kernel.size() - payload_offset) > ram.size()) {
    return make_error(ErrorCode::kInvalidArgument, "{}: protected-mode kernel ({} bytes at {:#x}) does not fit in RAM",
                      origin, kernel.size() - payload_offset, load_address);
  }
  if (command_line.size() + 1 > kMaxCommandLineBytes ||
      command_line.size() > get_u32_le(kernel.data() + kCmdlineSize)) {
    return make_error(ErrorCode::kInvalidArgument, "kernel command line of {} bytes is too long", command_line.size());
  }
  // The initramfs goes at the top of RAM (below initrd_addr_max), clear of the window the
  // kernel decompresses into.
  uint64_t initrd_limit = std::min<uint64_t>(ram.size(), uint64_t{get_u32_le(kernel.data() + kInitrdAddrMax)} + 1);
  if (initrd.size() > initrd_limit) {
    return make_error(ErrorCode::kInvalidArgument, "initramfs of {} bytes is larger than RAM", initrd.size());
  }
  uint64_t initrd_address = (initrd_limit - initrd.size()) & ~uint64_t{0xfff};
  uint64_t kernel_end = std::max<uint64_t>(load_address, kLoadPhysicalAddress) + init_size;
  if (initrd_address < kernel_end) {
    return make_error(ErrorCode::kInvalidArgument,
                      "{} bytes of RAM cannot hold the kernel's {} byte decompression window at 16 MiB and a {} byte "
                      "initramfs",
                      ram.size(), init_size, initrd.size());
  }

  std::memcpy(ram.data() + load_address, kernel.data() + payload_offset, kernel.size() - payload_offset);
  if (!initrd.empty()) std::memcpy(ram.data() + initrd_address, initrd.data(), initrd.size());  // data() may be null.
  std::memcpy(ram.data() + kCommandLineAddress, command_line.data(), command_line.size());
  ram[kCommandLineAddress + command_line.size()] = 0;

  // boot_params: zeroed, then only the setup header copied in (not the whole first sector,
  // whose sentinel byte would make the kernel discard fields).
  uint8_t* params = ram.data() + kBootParamsAddress;
  std::memset(params, 0, kBootParamsBytes);
  size_t header_end = 0x202 + kernel[kJumpEnd];
  std::memcpy(params + kSetupSects, kernel.data() + kSetupSects, header_end - kSetupSects);
  params[kTypeOfLoader] = 0xff;
  store_u32(params + kCmdLinePtr, kCommandLineAddress);
  store_u32(params + kCmdlineSize, static_cast<uint32_t>(command_line.size() + 1));
  store_u32(params + kRamdiskImage, static_cast<uint32_t>(initrd_address));
  store_u32(params + kRamdiskSize, static_cast<uint32_t>(initrd.size()));
  const struct {
    uint64_t address, size;
    uint32_t type;
  } e820[] = {
      {0, 0x9fc00, kE820Ram},
      {0x9fc00, 0xe0000 - 0x9fc00, kE820Reserved},  // MP and ACPI tables live here.
      {kProgramAddress, ram.size() - kProgramAddress, kE820Ram},
  };
  params[kE820Entries] = std::size(e820);
  for (size_t i = 0; i < std::size(e820); ++i) {
    uint8_t* entry = params + kE820Table + i * 20;
    store_u64(entry, e820[i].address);
    store_u64(entry + 8, e820[i].size);
    store_u32(entry + 16, e820[i].type);
  }
  if (vcpus > 1) store_u64(params + kAcpiRsdpAddress, write_acpi_tables(ram, vcpus));
  write_boot_tables(ram, /*user_accessible=*/false);
  return LinuxBootInfo{load_address + 0x200ull, kBootParamsAddress, initrd_address};
}

}  // namespace deltavm::vmm
