// The PC devices of a Linux guest on the port-I/O bus: the two 16550A UARTs (ttyS0 at 0x3f8,
// ttyS1 at 0x2f8) and the i8042's reset line.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "vmm/io_bus.h"
#include "vmm/uart.h"

namespace deltavm::vmm {

// A UART on the bus at its base port (8 ports). vCPU threads and the thread that feeds it the
// host's input share it; this serialises them.
class SerialPortDevice : public PortDevice {
 public:
  static constexpr uint16_t kPortCount = 8;

  SerialPortDevice(uint16_t base, Uart::IrqLine irq_line, Uart::Output output)
      : base_(base), uart_(std::move(irq_line), std::move(output)) {}

  void read(uint16_t port, std::span<uint8_t> data) override;
  void write(uint16_t port, std::span<const uint8_t> data) override;
  // Bytes from the host for the guest; returns how many fit.
  size_t receive(std::span<const uint8_t> bytes);
  std::vector<uint8_t> save() const;
  Status restore(std::span<const uint8_t> bytes);

 private:
  uint16_t base_;
  mutable std::mutex mutex_;
  Uart uart_;
};

// The i8042's command port: writing 0xfe pulses the CPU's reset line, which is how Linux's
// `reboot=k` restarts the machine. Here a reset ends the VM. Reads float high, as before any
// keyboard controller answers.
class ResetPortDevice : public PortDevice {
 public:
  static constexpr uint16_t kPort = 0x64;

  explicit ResetPortDevice(std::function<void()> reset) : reset_(std::move(reset)) {}
  void read(uint16_t port, std::span<uint8_t> data) override;
  void write(uint16_t port, std::span<const uint8_t> data) override;

 private:
  std::function<void()> reset_;
};

}  // namespace deltavm::vmm
