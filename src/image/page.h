// The page model of a guest RAM image: a sequence of 4 KiB pages at guest-physical addresses
// 0, 4096, 8192, ... An image's identity is its digest, XXH3-128 over all of its bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/page.h"

namespace deltavm {

// The largest guest RAM image deltavm handles (1 TiB): a bound on every size a file claims, so
// that no count derived from it can overflow or ask for more memory than a host has.
inline constexpr uint64_t kMaxImageSizeBytes = 1ull << 40;

// XXH3-64 of one page.
uint64_t page_hash(const uint8_t* page);

// XXH3-128 of a whole image, the same value `xxhsum -H2` prints for the image file.
struct ImageDigest {
  uint64_t high = 0;
  uint64_t low = 0;

  auto operator<=>(const ImageDigest&) const = default;
  std::string hex() const;
  static std::optional<ImageDigest> from_hex(std::string_view hex);
};

ImageDigest digest_image(std::span<const uint8_t> image);

// Streaming form of digest_image, for callers that visit an image in pieces.
class ImageDigester {
 public:
  ImageDigester();
  ~ImageDigester();
  ImageDigester(const ImageDigester&) = delete;
  ImageDigester& operator=(const ImageDigester&) = delete;
  void update(std::span<const uint8_t> bytes);
  ImageDigest finish() const;

 private:
  void* state_;  // XXH3_state_t, kept out of this header.
};

// Checks that an image of `size_bytes` is a whole number of pages and at most
// kMaxImageSizeBytes; `name` goes in the error.
Status check_image_size(uint64_t size_bytes, std::string_view name);

// One bit per page, bit (i % 8) of byte (i / 8) for page i: the layout of a KVM dirty log
// read as bytes on a little-endian host. A set bit means the page may have changed.
class DirtyBitmap {
 public:
  DirtyBitmap() = default;
  explicit DirtyBitmap(uint64_t pages) : pages_(pages), bytes_((pages + 7) / 8, 0) {}

  // Reads a bitmap file for an image of `pages` pages; its size must be exactly
  // ceil(pages / 8) bytes.
  static Result<DirtyBitmap> read_file(const std::filesystem::path& path, uint64_t pages);

  uint64_t pages() const { return pages_; }
  bool test(uint64_t page) const { return (bytes_[page / 8] >> (page % 8)) & 1; }
  void set(uint64_t page) { bytes_[page / 8] |= static_cast<uint8_t>(1u << (page % 8)); }
  std::span<const uint8_t> bytes() const { return bytes_; }
  uint64_t count() const;

 private:
  uint64_t pages_ = 0;
  std::vector<uint8_t> bytes_;
};

}  // namespace deltavm

// fmt::format("{}", digest) writes its 32 hex digits.
template <>
struct fmt::formatter<deltavm::ImageDigest> : fmt::formatter<std::string_view> {
  auto format(const deltavm::ImageDigest& digest, fmt::format_context& context) const {
    return fmt::formatter<std::string_view>::format(digest.hex(), context);
  }
};
