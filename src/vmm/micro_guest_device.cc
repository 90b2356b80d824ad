#include "vmm/micro_guest_device.h"

#include <cstring>

#include "base/coding.h"

namespace deltavm::vmm {
namespace {

enum Port : uint16_t {
  kPortCheckpoint = 0x500,
  kPortChecksumLow = 0x501,
  kPortChecksumHigh = 0x502,
  kPortDone = 0x503,
  kPortHeartbeat = 0x504,
};

}  // namespace

void MicroGuestDevice::read(uint16_t, std::span<uint8_t> data) { std::memset(data.data(), 0xff, data.size()); }

void MicroGuestDevice::write(uint16_t port, std::span<const uint8_t> data) {
  if (data.size() != 4) return;  // The guest writes 32-bit values only.
  uint32_t value = get_u32_le(data.data());
  bool pause = false, finish = false;
  {
    std::lock_guard lock(mutex_);
    switch (port) {
      case kPortCheckpoint:
        report_.checkpoint = value;
        if (pause_at_checkpoint_ && value >= *pause_at_checkpoint_) {
          pause_at_checkpoint_.reset();
          pause = true;
        }
        break;
      case kPortHeartbeat: ++report_.heartbeats; break;
      case kPortChecksumLow: report_.checksum = (report_.checksum & ~0xffffffffull) | value; break;
      case kPortChecksumHigh: report_.checksum = (report_.checksum & 0xffffffffull) | (uint64_t{value} << 32); break;
      case kPortDone:
        report_.done = true;
        report_.done_status = value;
        finish = true;
        break;
      default: break;
    }
  }
  if (finish)
    finish_();
  else if (pause)
    pause_();
}

void MicroGuestDevice::pause_at_checkpoint(uint64_t checkpoint) {
  std::lock_guard lock(mutex_);
  pause_at_checkpoint_ = checkpoint;
}

MicroGuestReport MicroGuestDevice::report() const {
  std::lock_guard lock(mutex_);
  return report_;
}

std::vector<uint8_t> MicroGuestDevice::save() const {
  std::lock_guard lock(mutex_);
  std::vector<uint8_t> out;
  put_u64_le(out, report_.checkpoint);
  put_u64_le(out, report_.heartbeats);
  put_u32_le(out, report_.done ? 1 : 0);
  put_u32_le(out, report_.done_status);
  put_u64_le(out, report_.checksum);
  return out;
}

Status MicroGuestDevice::restore(std::span<const uint8_t> bytes) {
  if (bytes.size() != kStateBytes) {
    return make_error(ErrorCode::kCorruption, "micro guest device state is {} bytes, expected {}", bytes.size(),
                      kStateBytes);
  }
  std::lock_guard lock(mutex_);
  report_.checkpoint = get_u64_le(bytes.data());
  report_.heartbeats = get_u64_le(bytes.data() + 8);
  report_.done = get_u32_le(bytes.data() + 16) != 0;
  report_.done_status = get_u32_le(bytes.data() + 20);
  report_.checksum = get_u64_le(bytes.data() + 24);
  return {};
}

}  // namespace deltavm::vmm
