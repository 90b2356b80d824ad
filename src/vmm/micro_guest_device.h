// The micro guest's report ports (guest/micro/workload.c), a test and benchmark device: the
// guest writes 32-bit values to 0x500 checkpoint (passes done), 0x501 / 0x502 the low / high
// half of its checksum, 0x503 done (its status), 0x504 a heartbeat. The device can ask the
// machine to park after a given checkpoint, and ends the machine when the guest is done.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <vector>

#include "vmm/io_bus.h"
#include "vmm/protocol.h"

namespace deltavm::vmm {

class MicroGuestDevice : public PortDevice {
 public:
  static constexpr uint16_t kFirstPort = 0x500;
  static constexpr uint16_t kPortCount = 5;
  static constexpr size_t kStateBytes = 32;

  // `pause` parks the machine's vCPUs; `finish` marks the machine done and parks them.
  MicroGuestDevice(std::function<void()> pause, std::function<void()> finish)
      : pause_(std::move(pause)), finish_(std::move(finish)) {}

  void read(uint16_t port, std::span<uint8_t> data) override;
  void write(uint16_t port, std::span<const uint8_t> data) override;

  // Parks the machine right after the guest reports checkpoint `checkpoint` (or a later one).
  void pause_at_checkpoint(uint64_t checkpoint);
  MicroGuestReport report() const;

  // The report, for the machine state: 32 bytes (checkpoint, heartbeats u64; done, status u32;
  // checksum u64), as the machine state format version 1 stores it.
  std::vector<uint8_t> save() const;
  Status restore(std::span<const uint8_t> bytes);

 private:
  std::function<void()> pause_;
  std::function<void()> finish_;
  mutable std::mutex mutex_;
  MicroGuestReport report_;
  std::optional<uint64_t> pause_at_checkpoint_;
};

}  // namespace deltavm::vmm
