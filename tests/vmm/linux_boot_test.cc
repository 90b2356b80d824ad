// Loading the kit's real Debian cloud bzImage for the 64-bit boot protocol; no KVM needed.
#include "vmm/linux_boot.h"

#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "base/coding.h"
#include "base/file.h"
#include "templates/initramfs.h"
#include "vmm/acpi.h"
#include "vmm/x86_boot.h"

namespace deltavm::vmm {
namespace {

class LinuxBoot : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<GuestKit> kit = GuestKit::locate();
    ASSERT_TRUE(kit) << kit.error().message;
    Result<std::vector<uint8_t>> kernel = read_file(kit->kernel);
    ASSERT_TRUE(kernel);
    kernel_ = std::move(kernel).value();
  }
  std::vector<uint8_t> kernel_;
};

TEST_F(LinuxBoot, PlacesKernelInitramfsAndBootParams) {
  std::vector<uint8_t> ram(256u << 20, 0);
  std::vector<uint8_t> initrd(3u << 20, 0xab);
  Result<LinuxBootInfo> info = load_linux(ram, kernel_, initrd, "console=ttyS0 quiet", "kit kernel");
  ASSERT_TRUE(info) << info.error().message;
  EXPECT_EQ(info->entry, 0x100200u);
  EXPECT_EQ(info->boot_params, kBootParamsAddress);
  EXPECT_EQ(info->initrd_address % 4096, 0u);
  EXPECT_LE(info->initrd_address + initrd.size(), ram.size());
  EXPECT_EQ(ram[info->initrd_address], 0xab);

  const uint8_t* params = ram.data() + kBootParamsAddress;
  EXPECT_EQ(get_u32_le(params + 0x202), 0x53726448u);  // The setup header was copied.
  EXPECT_EQ(params[0x1ef], 0);                         // The sentinel was not.
  EXPECT_EQ(params[0x210], 0xff);                      // type_of_loader
  EXPECT_EQ(get_u32_le(params + 0x228), kCommandLineAddress);
  EXPECT_EQ(get_u32_le(params + 0x218), info->initrd_address);
  EXPECT_EQ(get_u32_le(params + 0x21c), initrd.size());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(ram.data() + kCommandLineAddress)), "console=ttyS0 quiet");
  ASSERT_EQ(params[0x1e8], 3);  // e820: low RAM, reserved tables area, RAM from 1 MiB.
  EXPECT_EQ(get_u64_le(params + 0x2d0 + 40), 0x100000u);
  EXPECT_EQ(get_u64_le(params + 0x2d0 + 48), ram.size() - 0x100000u);
  // The protected-mode kernel sits at 1 MiB.
  size_t setup_sectors = kernel_[0x1f1] == 0 ? 4 : kernel_[0x1f1];
  EXPECT_EQ(std::memcmp(ram.data() + 0x100000, kernel_.data() + (setup_sectors + 1) * 512, 4096), 0);
  // Identity page tables for the first GiB.
  EXPECT_EQ(get_u64_le(ram.data() + kPml4Address) & ~0xfffull, kPml4Address + 0x1000);
}

TEST_F(LinuxBoot, RefusesSomethingThatIsNotABzImage) {
  std::vector<uint8_t> ram(64u << 20, 0);
  std::vector<uint8_t> not_kernel(8192, 0x90);
  Result<LinuxBootInfo> info = load_linux(ram, not_kernel, {}, "", "notes.txt");
  ASSERT_FALSE(info);
  EXPECT_NE(info.error().message.find("notes.txt: not a bzImage"), std::string::npos) << info.error().message;
}

TEST_F(LinuxBoot, RefusesRamTooSmallForKernelAndInitramfs) {
  std::vector<uint8_t> ram(32u << 20, 0);
  std::vector<uint8_t> initrd(8u << 20, 0);
  Result<LinuxBootInfo> info = load_linux(ram, kernel_, initrd, "", "kit kernel");
  ASSERT_FALSE(info);
  EXPECT_NE(info.error().message.find("decompression window"), std::string::npos) << info.error().message;
}

TEST_F(LinuxBoot, RefusesOverlongCommandLine) {
  std::vector<uint8_t> ram(256u << 20, 0);
  Result<LinuxBootInfo> info = load_linux(ram, kernel_, {}, std::string(4000, 'x'), "kit kernel");
  ASSERT_FALSE(info);
  EXPECT_NE(info.error().message.find("command line"), std::string::npos);
}

uint8_t byte_sum(const uint8_t* bytes, size_t length) {
  uint8_t sum = 0;
  for (size_t i = 0; i < length; ++i) sum = static_cast<uint8_t>(sum + bytes[i]);
  return sum;
}

TEST_F(LinuxBoot, TwoVcpusGetAcpiTablesWithOneLocalApicEach) {
  std::vector<uint8_t> ram(256u << 20, 0);
  Result<LinuxBootInfo> info = load_linux(ram, kernel_, {}, "console=ttyS0", "kit kernel", 2);
  ASSERT_TRUE(info) << info.error().message;
  const uint8_t* params = ram.data() + kBootParamsAddress;
  ASSERT_EQ(get_u64_le(params + 0x70), kRsdpAddress);  // boot_params.acpi_rsdp_addr
  const uint8_t* rsdp = ram.data() + kRsdpAddress;
  ASSERT_EQ(std::string(reinterpret_cast<const char*>(rsdp), 8), "RSD PTR ");
  EXPECT_EQ(byte_sum(rsdp, 20), 0);
  EXPECT_EQ(byte_sum(rsdp, 36), 0);
  const uint8_t* xsdt = ram.data() + get_u64_le(rsdp + 24);
  ASSERT_EQ(std::string(reinterpret_cast<const char*>(xsdt), 4), "XSDT");
  uint32_t xsdt_length = get_u32_le(xsdt + 4);
  EXPECT_EQ(byte_sum(xsdt, xsdt_length), 0);
  std::map<std::string, const uint8_t*> tables;
  for (uint32_t offset = 36; offset < xsdt_length; offset += 8) {
    const uint8_t* table = ram.data() + get_u64_le(xsdt + offset);
    tables[std::string(reinterpret_cast<const char*>(table), 4)] = table;
    EXPECT_EQ(byte_sum(table, get_u32_le(table + 4)), 0);
  }
  ASSERT_TRUE(tables.count("FACP") && tables.count("APIC"));
  EXPECT_EQ(get_u32_le(tables["FACP"] + 112) & (1u << 20), 0u);  // Not hardware-reduced: PIC and PIT stay.
  const uint8_t* dsdt = ram.data() + get_u64_le(tables["FACP"] + 140);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(dsdt), 4), "DSDT");
  const uint8_t* madt = tables["APIC"];
  int local_apics = 0, io_apics = 0;
  for (uint32_t offset = 44; offset < get_u32_le(madt + 4); offset += madt[offset + 1]) {
    if (madt[offset] == 0 && (get_u32_le(madt + offset + 4) & 1)) ++local_apics;
    if (madt[offset] == 1) ++io_apics;
  }
  EXPECT_EQ(local_apics, 2);
  EXPECT_EQ(io_apics, 1);
}

TEST_F(LinuxBoot, OneVcpuGetsNoAcpiTables) {
  std::vector<uint8_t> ram(256u << 20, 0);
  ASSERT_TRUE(load_linux(ram, kernel_, {}, "console=ttyS0", "kit kernel", 1));
  EXPECT_EQ(get_u64_le(ram.data() + kBootParamsAddress + 0x70), 0u);
}

}  // namespace
}  // namespace deltavm::vmm
