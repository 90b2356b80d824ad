#include "vmm/io_bus.h"

#include <algorithm>
#include <cstring>

namespace deltavm::vmm {

Status IoBus::add(uint16_t first, uint16_t count, PortDevice& device, std::string name) {
  uint32_t end = uint32_t{first} + count;
  if (count == 0 || end > 0x10000) {
    return make_error(ErrorCode::kInvalidArgument, "port range {:#x}+{} of {} is empty or past 0xffff", first, count,
                      name);
  }
  for (const Range& range : ranges_) {
    if (first < range.end && range.first < end) {
      return make_error(ErrorCode::kInvalidArgument, "ports {:#x}-{:#x} of {} overlap {}'s {:#x}-{:#x}", first, end - 1,
                        name, range.name, range.first, range.end - 1);
    }
  }
  ranges_.push_back(Range{first, end, &device, std::move(name)});
  std::sort(ranges_.begin(), ranges_.end(), [](const Range& a, const Range& b) { return a.first < b.first; });
  return {};
}

PortDevice* IoBus::find(uint16_t port) const {
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), uint32_t{port},
                             [](uint32_t value, const Range& range) { return value < range.first; });
  if (it == ranges_.begin()) return nullptr;
  --it;
  return port < it->end ? it->device : nullptr;
}

void IoBus::read(uint16_t port, std::span<uint8_t> data) const {
  if (PortDevice* device = find(port)) {
    device->read(port, data);
  } else {
    std::memset(data.data(), 0xff, data.size());
  }
}

void IoBus::write(uint16_t port, std::span<const uint8_t> data) const {
  if (PortDevice* device = find(port)) device->write(port, data);
}

}  // namespace deltavm::vmm
