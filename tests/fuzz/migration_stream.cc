// libFuzzer target: stripping guest RAM pages out of QEMU's migration stream
// (src/backends/qemu/migration_stream.h), the stream a clone's QEMU (which runs guest code)
// writes when it is snapshotted. The first byte gives the size of block "ram" (1 to 8 pages);
// the rest is the stream. Whatever the input, the call refuses it or returns at most the
// limit, every page it hands over lies inside the block and inside the input, and what it
// returns is no longer than the stream.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "backends/qemu/migration_stream.h"
#include "base/page.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  uint64_t block_bytes = (static_cast<uint64_t>(data[0] % 8) + 1) * deltavm::kPageSize;
  std::span<const uint8_t> stream(data + 1, size - 1);
  constexpr uint64_t kLimit = 1 << 20;
  auto visit = [&](const deltavm::StreamPage& page) -> deltavm::Status {
    if (page.offset % deltavm::kPageSize != 0 || page.offset >= block_bytes) std::abort();
    if (page.bytes != nullptr &&
        (page.bytes < stream.data() || page.bytes + deltavm::kPageSize > stream.data() + stream.size())) {
      std::abort();
    }
    return {};
  };
  deltavm::Result<std::vector<uint8_t>> stripped = deltavm::strip_ram_pages(stream, "ram", block_bytes, kLimit, visit);
  if (stripped && (stripped->size() > kLimit || stripped->size() > stream.size())) std::abort();
  return 0;
}
