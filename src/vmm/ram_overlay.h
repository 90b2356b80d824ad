// The pages a delta chain changes over its base image, handed from whoever prepares a restore
// (the loader, through the kvm backend) to the VMM process that serves them. A format shared by
// both sides, like the protocol; docs/formats.md ("RAM overlay").
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/error.h"
#include "base/file.h"

namespace deltavm::vmm {

// The pages a chain changes over its base, as one file in the VM's runtime directory: header
// ("DVOVRLY1", page count), the pages at 4 KiB-aligned offsets, then the sorted list of their
// page numbers. Written by whoever prepares a restore; read by the VMM process.
class RamOverlayWriter {
 public:
  static Result<RamOverlayWriter> create(const std::filesystem::path& path);
  // A page written twice keeps its last bytes. REQUIRES: `bytes` is kPageSize bytes.
  Status write_page(uint64_t page, const uint8_t* bytes);
  Status commit();

 private:
  RamOverlayWriter(Fd fd, std::filesystem::path path) : fd_(std::move(fd)), path_(std::move(path)) {}
  Fd fd_;
  std::filesystem::path path_;
  std::unordered_map<uint64_t, uint64_t> slots_;  // page -> slot in the file.
};

class RamOverlay {
 public:
  RamOverlay() = default;
  // Validates the header and the page list (sorted, unique, below `memory_pages`).
  static Result<RamOverlay> open(const std::filesystem::path& path, uint64_t memory_pages);

  size_t page_count() const { return pages_.size(); }
  std::span<const uint64_t> pages() const { return pages_; }
  // The bytes of the overlay's i-th page (in page-number order).
  const uint8_t* page_bytes(size_t i) const;
  // The overlay's bytes for `page`, or nullptr if the overlay does not change it.
  const uint8_t* find(uint64_t page) const;

 private:
  Mapping file_;
  std::vector<uint64_t> pages_;
  std::vector<uint64_t> slots_;
};

}  // namespace deltavm::vmm
