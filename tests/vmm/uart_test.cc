// The 16550A model as Linux's 8250 driver drives it; no KVM needed.
#include "vmm/uart.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace deltavm::vmm {
namespace {

struct Wires {
  std::vector<bool> irq;  // Every change of the interrupt line.
  std::string output;
};

Uart make_uart(Wires& wires) {
  return Uart([&wires](bool level) { wires.irq.push_back(level); },
              [&wires](uint8_t byte) { wires.output.push_back(static_cast<char>(byte)); });
}

TEST(Uart, TransmitsBytesAndReportsFifoOnIir) {
  Wires wires;
  Uart uart = make_uart(wires);
  uart.write(2, 0x01);                   // FCR: FIFO on.
  EXPECT_EQ(uart.read(2) & 0xc0, 0xc0);  // 16550A detection.
  EXPECT_EQ(uart.read(5) & 0x60, 0x60);  // THRE and TEMT.
  uart.write(0, 'h');
  uart.write(0, 'i');
  EXPECT_EQ(wires.output, "hi");
  EXPECT_TRUE(wires.irq.empty());  // No interrupt enabled.
}

TEST(Uart, EnablingThriRaisesTheLineAndReadingIirClearsIt) {
  Wires wires;
  Uart uart = make_uart(wires);
  uart.write(1, 0x02);  // IER.THRI
  ASSERT_EQ(wires.irq, std::vector<bool>({true}));
  EXPECT_EQ(uart.read(2) & 0x0f, 0x02);  // THRE pending, acknowledged by this read.
  EXPECT_EQ(wires.irq, std::vector<bool>({true, false}));
  uart.write(0, 'x');  // The next byte sent owes a new THRE interrupt: a new edge.
  EXPECT_EQ(wires.irq, std::vector<bool>({true, false, true}));
}

TEST(Uart, ReceivedBytesRaiseRdiUntilDrained) {
  Wires wires;
  Uart uart = make_uart(wires);
  uart.write(1, 0x01);  // IER.RDI
  const uint8_t bytes[] = {'o', 'k'};
  EXPECT_EQ(uart.receive(bytes), 2u);
  EXPECT_EQ(wires.irq, std::vector<bool>({true}));
  EXPECT_EQ(uart.read(2) & 0x0f, 0x04);
  EXPECT_EQ(uart.read(5) & 0x01, 0x01);  // LSR.DR
  EXPECT_EQ(uart.read(0), 'o');
  EXPECT_EQ(uart.read(0), 'k');
  EXPECT_EQ(uart.read(5) & 0x01, 0x00);
  EXPECT_EQ(wires.irq, std::vector<bool>({true, false}));
}

TEST(Uart, ReceiveStopsAtTheFifoSize) {
  Wires wires;
  Uart uart = make_uart(wires);
  std::vector<uint8_t> bytes(100, 'a');
  EXPECT_EQ(uart.receive(bytes), Uart::kFifoBytes);
  EXPECT_EQ(uart.receive_room(), 0u);
}

TEST(Uart, DivisorLatchSharesTheDataPorts) {
  Wires wires;
  Uart uart = make_uart(wires);
  uart.write(3, 0x83);  // DLAB on.
  uart.write(0, 0x01);
  uart.write(1, 0x00);
  EXPECT_EQ(uart.read(0), 0x01);
  uart.write(3, 0x03);  // DLAB off: writes to port 0 transmit again.
  uart.write(0, 'z');
  EXPECT_EQ(wires.output, "z");
}

TEST(Uart, SaveAndRestoreKeepRegistersFifoAndPendingInterrupt) {
  Wires wires;
  Uart uart = make_uart(wires);
  uart.write(1, 0x01);
  uart.write(7, 0x5a);
  const uint8_t bytes[] = {'a', 'b', 'c'};
  uart.receive(bytes);
  EXPECT_EQ(uart.read(0), 'a');
  std::vector<uint8_t> state = uart.save();

  Wires restored_wires;
  Uart restored = make_uart(restored_wires);
  ASSERT_TRUE(restored.restore(state));
  // The pending interrupt comes back as a fresh edge: lowered, then raised.
  EXPECT_EQ(restored_wires.irq, std::vector<bool>({false, true}));
  EXPECT_EQ(restored.read(7), 0x5a);
  EXPECT_EQ(restored.read(0), 'b');
  EXPECT_EQ(restored.read(0), 'c');
}

TEST(Uart, RestoreRefusesStateWhoseFifoLengthDisagrees) {
  Wires wires;
  Uart uart = make_uart(wires);
  std::vector<uint8_t> state = uart.save();
  state[12] = 5;  // Claims five bytes in the FIFO, carries none.
  Status restored = uart.restore(state);
  ASSERT_FALSE(restored);
  EXPECT_NE(restored.error().message.find("FIFO"), std::string::npos);
}

}  // namespace
}  // namespace deltavm::vmm
