// The delta file format (docs/formats.md): a checksummed header and two checksummed,
// zstd-compressed sections (page edits, page bytes). The decoder validates every length, offset
// and checksum before it uses them; a delta that fails any check is refused whole.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "base/error.h"
#include "image/delta.h"

namespace deltavm {

inline constexpr char kDeltaMagic[8] = {'D', 'V', 'M', 'D', 'E', 'L', 'T', 'A'};
inline constexpr uint32_t kDeltaFormatVersion = 1;
inline constexpr size_t kDeltaHeaderBytes = 80;
inline constexpr size_t kDeltaSectionHeaderBytes = 40;

// zstd level for deltas: the smallest output that keeps encoding well inside the time of one
// pass over the images (bench/delta measures it).
inline constexpr int kDefaultDeltaCompressionLevel = 6;

std::vector<uint8_t> encode_delta(const Delta& delta,
                                  int compression_level = kDefaultDeltaCompressionLevel);

// `name` (a file name or object id) prefixes every error.
Result<Delta> decode_delta(std::span<const uint8_t> bytes, std::string_view name);

// True if `bytes` starts with the delta magic: tells a delta file from a raw image.
bool looks_like_delta(std::span<const uint8_t> bytes);

struct DeltaSectionInfo {
  std::string name;
  uint64_t raw_bytes;
  uint64_t stored_bytes;
};

// What `deltavm image inspect` shows: the header fields and the sections' sizes.
struct DeltaFileInfo {
  uint32_t version;
  uint64_t file_bytes;
  std::vector<DeltaSectionInfo> sections;
};

Result<DeltaFileInfo> inspect_delta(std::span<const uint8_t> bytes, std::string_view name);

// Writes crash-safely: `path` either keeps its old content or gets the whole new delta.
Status write_delta_file(const std::filesystem::path& path, const Delta& delta,
                        int compression_level = kDefaultDeltaCompressionLevel);
Result<Delta> read_delta_file(const std::filesystem::path& path);

}  // namespace deltavm
