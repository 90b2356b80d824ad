// The ACPI tables Debian's cloud kernel needs to run more than one CPU (it ignores MP tables:
// CONFIG_X86_MPPARSE is off; brief §1.7): an RSDP at 0xe0000 pointing to an XSDT, a FADT for
// a PC with legacy PIC and PIT, an empty DSDT, and a MADT listing one local APIC per vCPU, the
// IOAPIC and the IRQ 0 override. ACPI 6.x table layouts; every table's bytes sum to zero.
#pragma once

#include <cstdint>
#include <span>

namespace deltavm::vmm {

inline constexpr uint64_t kRsdpAddress = 0xe0000;

// Writes the tables into [0x9fc00, 0xe0000] of `ram` (reserved in the e820 map) and returns
// the RSDP's address, for boot_params.acpi_rsdp_addr.
uint64_t write_acpi_tables(std::span<uint8_t> ram, uint32_t vcpus);

}  // namespace deltavm::vmm
