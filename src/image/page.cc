#include "image/page.h"

#include <xxhash.h>

#include <bit>
#include <cstring>

#include "base/file.h"

namespace deltavm {

uint64_t page_hash(const uint8_t* page) { return XXH3_64bits(page, kPageSize); }

std::string ImageDigest::hex() const { return fmt::format("{:016x}{:016x}", high, low); }

std::optional<ImageDigest> ImageDigest::from_hex(std::string_view hex) {
  if (hex.size() != 32) return std::nullopt;
  ImageDigest digest;
  for (size_t i = 0; i < 32; ++i) {
    char c = hex[i];
    uint64_t nibble;
    if (c >= '0' && c <= '9')
      nibble = c - '0';
    else if (c >= 'a' && c <= 'f')
      nibble = c - 'a' + 10;
    else
      return std::nullopt;
    uint64_t& half = i < 16 ? digest.high : digest.low;
    half = (half << 4) | nibble;
  }
  return digest;
}

ImageDigest digest_image(std::span<const uint8_t> image) {
  XXH128_hash_t hash = XXH3_128bits(image.data(), image.size());
  return ImageDigest{hash.high64, hash.low64};
}

ImageDigester::ImageDigester() : state_(XXH3_createState()) { XXH3_128bits_reset(static_cast<XXH3_state_t*>(state_)); }

ImageDigester::~ImageDigester() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }

void ImageDigester::update(std::span<const uint8_t> bytes) {
  XXH3_128bits_update(static_cast<XXH3_state_t*>(state_), bytes.data(), bytes.size());
}

ImageDigest ImageDigester::finish() const {
  XXH128_hash_t hash = XXH3_128bits_digest(static_cast<XXH3_state_t*>(state_));
  return ImageDigest{hash.high64, hash.low64};
}

Status check_image_size(uint64_t size_bytes, std::string_view name) {
  if (size_bytes % kPageSize != 0) {
    return make_error(ErrorCode::kInvalidArgument, "{}: size {} bytes is not a whole number of {}-byte pages", name,
                      size_bytes, kPageSize);
  }
  if (size_bytes > kMaxImageSizeBytes) {
    return make_error(ErrorCode::kInvalidArgument, "{}: size {} bytes is more than the {} bytes deltavm handles", name,
                      size_bytes, kMaxImageSizeBytes);
  }
  return {};
}

Result<DirtyBitmap> DirtyBitmap::read_file(const std::filesystem::path& path, uint64_t pages) {
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, deltavm::read_file(path));
  uint64_t expected = (pages + 7) / 8;
  if (bytes.size() != expected) {
    return make_error(ErrorCode::kInvalidArgument,
                      "dirty bitmap {}: size {} bytes, expected {} bytes (one bit per page of a "
                      "{}-page image)",
                      path.string(), bytes.size(), expected, pages);
  }
  DirtyBitmap bitmap(pages);
  bitmap.bytes_ = std::move(bytes);
  // Bits past the last page carry no meaning; clear them so count() is exact.
  if (pages % 8 != 0) bitmap.bytes_.back() &= static_cast<uint8_t>((1u << (pages % 8)) - 1);
  return bitmap;
}

uint64_t DirtyBitmap::count() const {
  uint64_t total = 0;
  for (uint8_t byte : bytes_) total += std::popcount(byte);
  return total;
}

}  // namespace deltavm
