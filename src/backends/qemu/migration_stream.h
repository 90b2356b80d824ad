// QEMU's migration stream, read as far as a snapshot of a running clone needs: its guest RAM
// pages taken out of it.
//
// A clone's RAM is the store's image mapped private (share=off), so QEMU's x-ignore-shared
// cannot leave it out of a migration: the stream carries every page of it. deltavm captures
// the pages the clone changed itself (exactly, from /proc/PID/pagemap) and keeps only the
// rest of the stream as the machine state; the RAM pages in the stream serve as a witness
// that the capture missed nothing. Restoring from the stripped stream leaves the
// destination's RAM as the loader built it, which QEMU allows: a block may receive no pages.
//
// The layout read here is QEMU's savevm format, version 3, as QEMU 7.2 writes it for a
// precopy migration without compression, XBZRLE, multifd or postcopy (deltavm enables none):
//   magic "QEVM", version; the configuration section (machine type, capability subsections);
//   the "ram" section's start, parts and end: records of be64 (page offset | flags), a block
//   name unless the record continues the previous one's block, then the page (4096 bytes) or
//   its fill byte (a zero page); each section ends with a footer;
//   then the devices' sections and the end of the stream, kept as they are.
// Anything else is refused with an error naming the offset: the stream comes from a process
// that runs guest code, so every length is bounded before it is used.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "base/error.h"

namespace deltavm {

// One page of the stripped block as the stream carried it: its offset in the block, and its
// bytes, or (a zero record) the byte that fills it.
struct StreamPage {
  uint64_t offset;
  const uint8_t* bytes;  // kPageSize bytes, or nullptr for a filled page.
  uint8_t fill;
};

// The stream without the page records of RAM block `block` (which must be `block_bytes`
// long); every such record is handed to `visit` in stream order. A page may come more than
// once (the later is newer). The result is at most `limit` bytes.
Result<std::vector<uint8_t>> strip_ram_pages(std::span<const uint8_t> stream, std::string_view block,
                                             uint64_t block_bytes, uint64_t limit,
                                             const std::function<Status(const StreamPage&)>& visit);

}  // namespace deltavm
