#include "vmm/acpi.h"

#include <cstring>
#include <string_view>
#include <vector>

namespace deltavm::vmm {
namespace {

constexpr uint64_t kTablesAddress = 0x9fc00;  // XSDT, FADT, DSDT, MADT, in that order.
constexpr uint32_t kLocalApicAddress = 0xfee00000;
constexpr uint32_t kIoApicAddress = 0xfec00000;

void put(std::vector<uint8_t>& table, size_t offset, uint64_t value, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) table[offset + i] = static_cast<uint8_t>(value >> (8 * i));
}

uint8_t checksum(std::span<const uint8_t> bytes) {
  uint8_t sum = 0;
  for (uint8_t byte : bytes) sum = static_cast<uint8_t>(sum + byte);
  return static_cast<uint8_t>(-sum);
}

// A table with the 36-byte system description header filled in; the checksum is set by
// finish() once the body is written.
std::vector<uint8_t> table(std::string_view signature, size_t length, uint8_t revision) {
  std::vector<uint8_t> bytes(length, 0);
  std::memcpy(bytes.data(), signature.data(), 4);
  put(bytes, 4, length, 4);
  bytes[8] = revision;
  std::memcpy(bytes.data() + 10, "DELTVM", 6);    // OEM ID.
  std::memcpy(bytes.data() + 16, "DELTAVM ", 8);  // OEM table ID.
  put(bytes, 24, 1, 4);                           // OEM revision.
  std::memcpy(bytes.data() + 28, "DVMM", 4);      // Creator ID.
  put(bytes, 32, 1, 4);                           // Creator revision.
  return bytes;
}

void finish(std::vector<uint8_t>& bytes) {
  bytes[9] = 0;
  bytes[9] = checksum(bytes);
}

}  // namespace

uint64_t write_acpi_tables(std::span<uint8_t> ram, uint32_t vcpus) {
  // DSDT: no devices (the UARTs are found at their legacy ports), so just the header.
  std::vector<uint8_t> dsdt = table("DSDT", 36, 2);
  finish(dsdt);

  // FADT, revision 6, for a PC with its legacy PIC and PIT (a hardware-reduced FADT leaves
  // Linux without the 8259 and the ISA interrupts the UARTs use: userspace then stalls). No SMI
  // command port: ACPI is on from the start. SCI on IRQ 9, never raised. Power and sleep
  // buttons absent as fixed features, no VGA.
  std::vector<uint8_t> fadt = table("FACP", 276, 6);
  put(fadt, 46, 9, 2);                       // SCI_INT.
  put(fadt, 109, (1u << 0) | (1u << 2), 2);  // IAPC_BOOT_ARCH: legacy devices, no VGA.
  put(fadt, 112, (1u << 4) | (1u << 5), 4);  // PWR_BUTTON, SLP_BUTTON.
  fadt[131] = 0;                             // Minor version.

  // MADT: one enabled local APIC per vCPU (UID = APIC ID = index), the IOAPIC at GSI 0, and
  // the PC's one override: the PIT's IRQ 0 arrives at IOAPIC pin 2 (KVM routes GSI 0 there).
  size_t madt_length = 44 + 8 * vcpus + 12 + 10;
  std::vector<uint8_t> madt = table("APIC", madt_length, 5);
  put(madt, 36, kLocalApicAddress, 4);
  put(madt, 40, 1, 4);  // PCAT_COMPAT: dual 8259s present.
  size_t offset = 44;
  for (uint32_t cpu = 0; cpu < vcpus; ++cpu, offset += 8) {
    madt[offset] = 0;  // Processor local APIC.
    madt[offset + 1] = 8;
    madt[offset + 2] = static_cast<uint8_t>(cpu);
    madt[offset + 3] = static_cast<uint8_t>(cpu);
    put(madt, offset + 4, 1, 4);  // Enabled.
  }
  madt[offset] = 1;  // I/O APIC.
  madt[offset + 1] = 12;
  madt[offset + 2] = 0;  // Its ID.
  put(madt, offset + 4, kIoApicAddress, 4);
  put(madt, offset + 8, 0, 4);  // GSI base.
  offset += 12;
  madt[offset] = 2;  // Interrupt source override.
  madt[offset + 1] = 10;
  madt[offset + 2] = 0;         // ISA bus.
  madt[offset + 3] = 0;         // IRQ 0...
  put(madt, offset + 4, 2, 4);  // ...is GSI 2.
  put(madt, offset + 8, 0, 2);  // Bus-conforming polarity and trigger.

  std::vector<uint8_t> xsdt = table("XSDT", 36 + 16, 1);
  uint64_t xsdt_address = kTablesAddress;
  uint64_t fadt_address = xsdt_address + xsdt.size();
  uint64_t dsdt_address = fadt_address + fadt.size();
  uint64_t madt_address = dsdt_address + dsdt.size();
  put(fadt, 40, dsdt_address, 4);   // DSDT (32-bit).
  put(fadt, 140, dsdt_address, 8);  // X_DSDT.
  finish(fadt);
  finish(madt);
  put(xsdt, 36, fadt_address, 8);
  put(xsdt, 44, madt_address, 8);
  finish(xsdt);
  for (const auto& [address, bytes] : {std::pair{xsdt_address, &xsdt}, std::pair{fadt_address, &fadt},
                                       std::pair{dsdt_address, &dsdt}, std::pair{madt_address, &madt}}) {
    std::memcpy(ram.data() + address, bytes->data(), bytes->size());
  }

  // RSDP, revision 2 (36 bytes): the first 20 bytes and the whole carry their own checksums.
  std::vector<uint8_t> rsdp(36, 0);
  std::memcpy(rsdp.data(), "RSD PTR ", 8);
  std::memcpy(rsdp.data() + 9, "DELTVM", 6);
  rsdp[15] = 2;
  put(rsdp, 20, rsdp.size(), 4);
  put(rsdp, 24, xsdt_address, 8);
  rsdp[8] = checksum(std::span(rsdp).first(20));
  rsdp[32] = checksum(rsdp);
  std::memcpy(ram.data() + kRsdpAddress, rsdp.data(), rsdp.size());
  return kRsdpAddress;
}

}  // namespace deltavm::vmm
