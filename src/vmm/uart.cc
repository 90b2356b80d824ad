#include "vmm/uart.h"

namespace deltavm::vmm {
namespace {

// Register offsets.
constexpr uint16_t kData = 0, kInterruptEnable = 1, kInterruptId = 2, kLineControl = 3, kModemControl = 4,
                   kLineStatus = 5, kModemStatus = 6, kScratch = 7;
// Bits.
constexpr uint8_t kDivisorLatch = 0x80;            // LCR.DLAB
constexpr uint8_t kEnableReceived = 0x01;          // IER.RDI
constexpr uint8_t kEnableTransmitterEmpty = 0x02;  // IER.THRI
constexpr uint8_t kNoInterrupt = 0x01, kTransmitterEmptyId = 0x02, kReceivedId = 0x04;
constexpr uint8_t kFifoEnabledBits = 0xc0;
constexpr uint8_t kDataReady = 0x01;  // LSR.DR
constexpr uint8_t kLoopback = 0x10;   // MCR.LOOP
constexpr uint8_t kClearReceiveFifo = 0x02;
constexpr size_t kStateBytes = 13;

}  // namespace

uint8_t Uart::read(uint16_t offset) {
  uint8_t value = 0;
  switch (offset) {
    case kData:
      if (line_control_ & kDivisorLatch) {
        value = divisor_low_;
      } else if (!receive_fifo_.empty()) {
        value = receive_fifo_.front();
        receive_fifo_.pop_front();
      }
      break;
    case kInterruptEnable: value = (line_control_ & kDivisorLatch) ? divisor_high_ : interrupt_enable_; break;
    case kInterruptId:
      value = interrupt_identification_ | ((fifo_control_ & 1) ? kFifoEnabledBits : 0);
      // Reading IIR while it reports THRE acknowledges that interrupt.
      if (interrupt_identification_ == kTransmitterEmptyId) transmitter_empty_pending_ = false;
      break;
    case kLineControl: value = line_control_; break;
    case kModemControl: value = modem_control_; break;
    case kLineStatus: value = line_status_ | (receive_fifo_.empty() ? 0 : kDataReady); break;
    case kModemStatus: value = modem_status_; break;
    case kScratch: value = scratch_; break;
    default: value = 0xff; break;
  }
  update_interrupt();
  return value;
}

void Uart::write(uint16_t offset, uint8_t value) {
  switch (offset) {
    case kData:
      if (line_control_ & kDivisorLatch) {
        divisor_low_ = value;
      } else {
        if (modem_control_ & kLoopback) {
          if (receive_fifo_.size() < kFifoBytes) receive_fifo_.push_back(value);
        } else {
          output_(value);
        }
        transmitter_empty_pending_ = true;  // Sent at once: the holding register is empty again.
      }
      break;
    case kInterruptEnable:
      if (line_control_ & kDivisorLatch) {
        divisor_high_ = value;
      } else {
        // Enabling THRI while the transmitter is empty raises THRE (Linux tests for this).
        if ((value & kEnableTransmitterEmpty) && !(interrupt_enable_ & kEnableTransmitterEmpty)) {
          transmitter_empty_pending_ = true;
        }
        interrupt_enable_ = value & 0x0f;
      }
      break;
    case kInterruptId:  // FCR on write.
      fifo_control_ = value;
      if (value & kClearReceiveFifo) receive_fifo_.clear();
      break;
    case kLineControl: line_control_ = value; break;
    case kModemControl: modem_control_ = value; break;
    case kScratch: scratch_ = value; break;
    default: break;  // LSR and MSR are read-only.
  }
  update_interrupt();
}

size_t Uart::receive(std::span<const uint8_t> bytes) {
  size_t taken = 0;
  while (taken < bytes.size() && receive_fifo_.size() < kFifoBytes) receive_fifo_.push_back(bytes[taken++]);
  if (taken > 0) update_interrupt();
  return taken;
}

void Uart::update_interrupt() {
  if ((interrupt_enable_ & kEnableReceived) && !receive_fifo_.empty()) {
    interrupt_identification_ = kReceivedId;
  } else if ((interrupt_enable_ & kEnableTransmitterEmpty) && transmitter_empty_pending_) {
    interrupt_identification_ = kTransmitterEmptyId;
  } else {
    interrupt_identification_ = kNoInterrupt;
  }
  bool level = interrupt_identification_ != kNoInterrupt && (modem_control_ & 0x08);
  if (level != irq_level_) {
    irq_level_ = level;
    irq_line_(level);
  }
}

std::vector<uint8_t> Uart::save() const {
  std::vector<uint8_t> out = {divisor_low_,
                              divisor_high_,
                              interrupt_enable_,
                              interrupt_identification_,
                              fifo_control_,
                              line_control_,
                              modem_control_,
                              line_status_,
                              modem_status_,
                              scratch_,
                              transmitter_empty_pending_,
                              irq_level_,
                              static_cast<uint8_t>(receive_fifo_.size())};
  for (uint8_t byte : receive_fifo_) out.push_back(byte);
  return out;
}

Status Uart::restore(std::span<const uint8_t> bytes) {
  if (bytes.size() < kStateBytes || bytes[12] > kFifoBytes || bytes.size() != kStateBytes + bytes[12]) {
    return make_error(ErrorCode::kCorruption, "UART state of {} bytes does not match its FIFO length", bytes.size());
  }
  divisor_low_ = bytes[0];
  divisor_high_ = bytes[1];
  interrupt_enable_ = bytes[2];
  interrupt_identification_ = bytes[3];
  fifo_control_ = bytes[4];
  line_control_ = bytes[5];
  modem_control_ = bytes[6];
  line_status_ = bytes[7];
  modem_status_ = bytes[8];
  scratch_ = bytes[9];
  transmitter_empty_pending_ = bytes[10] != 0;
  receive_fifo_.assign(bytes.begin() + kStateBytes, bytes.end());
  // The restored irqchip may hold the old line level: lower it, then recompute, so that a
  // pending interrupt arrives as a fresh edge.
  irq_level_ = false;
  irq_line_(false);
  update_interrupt();
  return {};
}

}  // namespace deltavm::vmm
