#include "templates/kernel_image.h"

#include <lz4.h>
#include <zstd.h>

#include <cstring>
#include <mutex>

#include "base/coding.h"
#include "store/store.h"

namespace deltavm {
namespace {

// Linux boot protocol (Documentation/x86/boot.rst): setup header fields.
constexpr size_t kSetupSectsOffset = 0x1f1;
constexpr size_t kHeaderMagicOffset = 0x202;  // "HdrS"
constexpr size_t kProtocolVersionOffset = 0x206;
constexpr size_t kPayloadOffsetOffset = 0x248;
constexpr size_t kPayloadLengthOffset = 0x24c;
constexpr uint32_t kLz4LegacyMagic = 0x184c2102;
constexpr size_t kLz4LegacyBlockBytes = 8 << 20;
constexpr size_t kMaxKernelTextBytes = 512 << 20;

Result<std::vector<uint8_t>> decompress_lz4_legacy(std::span<const uint8_t> payload) {
  std::vector<uint8_t> text;
  size_t position = 4;  // After the magic.
  while (payload.size() - position >= 4) {
    uint32_t block = get_u32_le(payload.data() + position);
    if (block == kLz4LegacyMagic) {  // A concatenated stream.
      position += 4;
      continue;
    }
    // The kernel appends its uncompressed size after the last block: a "block" that does not
    // fit is that trailer.
    if (block == 0 || block > payload.size() - position - 4) break;
    size_t start = text.size();
    if (start + kLz4LegacyBlockBytes > kMaxKernelTextBytes) {
      return make_error(ErrorCode::kInvalidArgument, "kernel text exceeds {} bytes", kMaxKernelTextBytes);
    }
    text.resize(start + kLz4LegacyBlockBytes);
    int produced = LZ4_decompress_safe(reinterpret_cast<const char*>(payload.data() + position + 4),
                                       reinterpret_cast<char*>(text.data() + start), static_cast<int>(block),
                                       static_cast<int>(kLz4LegacyBlockBytes));
    if (produced < 0)
      return make_error(ErrorCode::kInvalidArgument, "kernel payload: corrupt LZ4 block at {}", position);
    text.resize(start + static_cast<size_t>(produced));
    position += 4 + block;
  }
  return text;
}

Result<std::vector<uint8_t>> decompress_zstd(std::span<const uint8_t> payload) {
  unsigned long long size = ZSTD_getFrameContentSize(payload.data(), payload.size());
  if (size == ZSTD_CONTENTSIZE_ERROR || size == ZSTD_CONTENTSIZE_UNKNOWN || size > kMaxKernelTextBytes) {
    return make_error(ErrorCode::kInvalidArgument, "kernel payload: zstd frame without a usable size");
  }
  std::vector<uint8_t> text(size);
  size_t produced = ZSTD_decompress(text.data(), text.size(), payload.data(), payload.size());
  if (ZSTD_isError(produced))
    return make_error(ErrorCode::kInvalidArgument, "kernel payload: {}", ZSTD_getErrorName(produced));
  text.resize(produced);
  return text;
}

}  // namespace

Result<std::vector<uint8_t>> linux_kernel_text(std::span<const uint8_t> bzimage) {
  if (bzimage.size() < 0x250 || std::memcmp(bzimage.data() + kHeaderMagicOffset, "HdrS", 4) != 0) {
    return make_error(ErrorCode::kInvalidArgument, "not a bzImage: no HdrS setup header");
  }
  uint16_t protocol = static_cast<uint16_t>(bzimage[kProtocolVersionOffset] | bzimage[kProtocolVersionOffset + 1] << 8);
  if (protocol < 0x0208) {
    return make_error(ErrorCode::kUnsupported, "bzImage boot protocol {:#x}: payload fields need 2.08", protocol);
  }
  size_t setup_sects = bzimage[kSetupSectsOffset] == 0 ? 4 : bzimage[kSetupSectsOffset];
  uint64_t payload_start = (setup_sects + 1) * 512ull + get_u32_le(bzimage.data() + kPayloadOffsetOffset);
  uint64_t payload_length = get_u32_le(bzimage.data() + kPayloadLengthOffset);
  if (payload_length < 4 || payload_start + payload_length > bzimage.size()) {
    return make_error(ErrorCode::kInvalidArgument, "bzImage payload {}+{} lies outside the {}-byte image",
                      payload_start, payload_length, bzimage.size());
  }
  std::span<const uint8_t> payload = bzimage.subspan(payload_start, payload_length);
  uint32_t magic = get_u32_le(payload.data());
  if (magic == kLz4LegacyMagic) return decompress_lz4_legacy(payload);
  if (magic == ZSTD_MAGICNUMBER) return decompress_zstd(payload);
  return make_error(ErrorCode::kUnsupported, "bzImage payload compression {:#010x} is not LZ4 or zstd", magic);
}

ReferenceKinds template_reference_kinds() {
  ReferenceKinds kinds;
  kinds.emplace(kKernelTextReferenceKind, linux_kernel_text);
  return kinds;
}

}  // namespace deltavm
