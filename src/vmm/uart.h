// A 16550A UART as Linux's 8250 driver sees it: registers, a 64-byte receive FIFO, and one
// interrupt line kept high while an interrupt is pending (an edge for the PIC/IOAPIC each time
// a new one appears after the guest cleared the last). ttyS0 (0x3f8, IRQ 4) is the console and
// ttyS1 (0x2f8, IRQ 3) the agent's channel. Register facts: brief §2.1; Linux's
// drivers/tty/serial/8250 probes IIR's FIFO bits (0xc0) to detect a 16550A, and checks that
// THRE re-asserts when IER.THRI is written.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <span>
#include <vector>

#include "base/error.h"

namespace deltavm::vmm {

class Uart {
 public:
  static constexpr size_t kFifoBytes = 64;
  using IrqLine = std::function<void(bool level)>;
  using Output = std::function<void(uint8_t byte)>;

  Uart(IrqLine irq_line, Output output) : irq_line_(std::move(irq_line)), output_(std::move(output)) {}

  // Port access at `offset` (0-7) from the UART's base port.
  uint8_t read(uint16_t offset);
  void write(uint16_t offset, uint8_t value);
  // Bytes from the host for the guest; returns how many fit into the receive FIFO.
  size_t receive(std::span<const uint8_t> bytes);
  size_t receive_room() const { return kFifoBytes - receive_fifo_.size(); }

  std::vector<uint8_t> save() const;
  // Restores registers and FIFO and re-raises a pending interrupt with a fresh edge.
  Status restore(std::span<const uint8_t> bytes);

 private:
  void update_interrupt();

  IrqLine irq_line_;
  Output output_;
  uint8_t divisor_low_ = 0x0c;  // 9600 baud.
  uint8_t divisor_high_ = 0;
  uint8_t interrupt_enable_ = 0;
  uint8_t interrupt_identification_ = 0x01;  // No interrupt pending.
  uint8_t fifo_control_ = 0;
  uint8_t line_control_ = 0x03;
  uint8_t modem_control_ = 0x08;  // OUT2: interrupts reach the PIC.
  uint8_t line_status_ = 0x60;    // Transmitter empty.
  uint8_t modem_status_ = 0xb0;   // DCD, DSR, CTS.
  uint8_t scratch_ = 0;
  bool transmitter_empty_pending_ = false;  // THRE interrupt owed to the guest.
  bool irq_level_ = false;
  std::deque<uint8_t> receive_fifo_;
};

}  // namespace deltavm::vmm
