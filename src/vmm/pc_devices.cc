#include "vmm/pc_devices.h"

#include <cstring>

namespace deltavm::vmm {

void SerialPortDevice::read(uint16_t port, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  // The 8250 driver reads one byte at a time; a wider access reads the register repeatedly.
  for (uint8_t& byte : data) byte = uart_.read(static_cast<uint16_t>(port - base_));
}

void SerialPortDevice::write(uint16_t port, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (uint8_t byte : data) uart_.write(static_cast<uint16_t>(port - base_), byte);
}

size_t SerialPortDevice::receive(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mutex_);
  return uart_.receive(bytes);
}

std::vector<uint8_t> SerialPortDevice::save() const {
  std::lock_guard lock(mutex_);
  return uart_.save();
}

Status SerialPortDevice::restore(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mutex_);
  return uart_.restore(bytes);
}

void ResetPortDevice::read(uint16_t, std::span<uint8_t> data) { std::memset(data.data(), 0xff, data.size()); }

void ResetPortDevice::write(uint16_t, std::span<const uint8_t> data) {
  if (!data.empty() && data[0] == 0xfe) reset_();
}

}  // namespace deltavm::vmm
