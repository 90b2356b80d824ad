// The guest's port-I/O bus: port ranges mapped to devices. A vCPU's KVM_EXIT_IO goes to the
// device whose range holds the port; a port no device claims reads as all ones (a floating
// bus) and ignores writes, as on a PC.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"

namespace deltavm::vmm {

// A device on the bus. Called from vCPU threads: a device that keeps state guards it itself.
class PortDevice {
 public:
  virtual ~PortDevice() = default;
  // The guest reads data.size() bytes at `port`; the device fills `data`.
  virtual void read(uint16_t port, std::span<uint8_t> data) = 0;
  // The guest writes `data` at `port`.
  virtual void write(uint16_t port, std::span<const uint8_t> data) = 0;
};

// Ranges are added while the machine is built, before any vCPU runs; afterwards the bus is
// only read, so dispatching takes no lock.
class IoBus {
 public:
  // Claims ports [first, first + count) for `device`, which must outlive the bus. Refuses a
  // range that overlaps one already claimed.
  Status add(uint16_t first, uint16_t count, PortDevice& device, std::string name);
  void read(uint16_t port, std::span<uint8_t> data) const;
  void write(uint16_t port, std::span<const uint8_t> data) const;

 private:
  struct Range {
    uint32_t first;
    uint32_t end;  // Exclusive.
    PortDevice* device;
    std::string name;
  };
  PortDevice* find(uint16_t port) const;
  std::vector<Range> ranges_;  // Sorted by first port.
};

}  // namespace deltavm::vmm
