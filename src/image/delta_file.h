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
inline constexpr size_t kDeltaHeaderBytes = 96;
inline constexpr size_t kDeltaSectionHeaderBytes = 40;

// zstd level for deltas: the smallest output that keeps encoding well inside the time of one
// pass over the images (bench/delta measures it).
inline constexpr int kDefaultDeltaCompressionLevel = 6;

// Bytes both the writer and every reader of a delta have, which the delta's sections are
// compressed against (a zstd prefix): whatever in the image repeats them costs almost nothing.
// A guest's kernel is the example: its decompressed text makes up much of any base image.
struct CompressionReference {
  std::span<const uint8_t> bytes;
  ImageDigest digest;  // digest_image(bytes), recorded in the header and checked on read.

  static CompressionReference of(std::span<const uint8_t> bytes) { return {bytes, digest_image(bytes)}; }
};

std::vector<uint8_t> encode_delta(const Delta& delta, int compression_level = kDefaultDeltaCompressionLevel,
                                  const CompressionReference* reference = nullptr);

// `name` (a file name or object id) prefixes every error. A delta compressed against a
// reference is refused unless `reference` is given and its digest matches.
Result<Delta> decode_delta(std::span<const uint8_t> bytes, std::string_view name,
                           const CompressionReference* reference = nullptr);

// The digest of the reference a delta was compressed against, if any; checks the header only.
Result<std::optional<ImageDigest>> delta_reference(std::span<const uint8_t> bytes, std::string_view name);

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
  std::optional<ImageDigest> reference;
  uint64_t file_bytes;
  std::vector<DeltaSectionInfo> sections;
};

Result<DeltaFileInfo> inspect_delta(std::span<const uint8_t> bytes, std::string_view name);

// Writes crash-safely (never against a reference: a delta file stands alone): `path` either keeps its old content or
// gets the whole new delta.
Status write_delta_file(const std::filesystem::path& path, const Delta& delta,
                        int compression_level = kDefaultDeltaCompressionLevel);
Result<Delta> read_delta_file(const std::filesystem::path& path);

}  // namespace deltavm
