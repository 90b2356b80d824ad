#include "image/delta_file.h"

#include <xxhash.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "base/coding.h"
#include "base/file.h"

namespace deltavm {
namespace {

// Header layout (docs/formats.md): offsets of the fields in the 80-byte header.
constexpr size_t kVersionOffset = 8;
constexpr size_t kPageSizeOffset = 12;
constexpr size_t kImageSizeOffset = 16;
constexpr size_t kEditCountOffset = 24;
constexpr size_t kFlagsOffset = 32;
constexpr size_t kSectionCountOffset = 36;
constexpr size_t kBaseDigestOffset = 40;
constexpr size_t kTargetDigestOffset = 56;
constexpr size_t kReferenceDigestOffset = 72;
constexpr size_t kHeaderChecksumOffset = 88;

constexpr uint32_t kFlagBaseDigest = 1u << 0;
constexpr uint32_t kFlagTargetDigest = 1u << 1;
constexpr uint32_t kFlagReference = 1u << 2;
constexpr uint32_t kKnownFlags = kFlagBaseDigest | kFlagTargetDigest | kFlagReference;

// With a reference, zstd's window must span reference and section together.
constexpr int kReferenceWindowLog = 28;

enum class SectionKind : uint32_t { kEdits = 1, kData = 2 };
enum class SectionCompression : uint32_t { kNone = 0, kZstd = 1 };
constexpr uint32_t kSectionCount = 2;
constexpr const char* kSectionNames[] = {"", "edits", "data"};

// The largest encoded edit: page gap (10), encoding (1), run count (2), and per run an offset
// gap and a length of at most 2 bytes each, for at most kPageSize runs.
constexpr uint64_t kMaxEditBytes = 10 + 1 + 2 + kPageSize * 4;
// The smallest: a one-byte page gap and the encoding of a zero or whole page.
constexpr uint64_t kMinEditBytes = 2;

uint64_t checksum(std::span<const uint8_t> bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

std::vector<uint8_t> encode_edits(const Delta& delta) {
  std::vector<uint8_t> out;
  out.reserve(delta.edits.size() * 4 + delta.runs.size() * 2);
  uint64_t next_page = 0;
  for (const PageEdit& edit : delta.edits) {
    put_varint(out, edit.page_index - next_page);
    next_page = edit.page_index + 1;
    out.push_back(static_cast<uint8_t>(edit.encoding));
    if (edit.encoding != PageEncoding::kRuns) continue;
    put_varint(out, edit.run_count);
    uint64_t previous_end = 0;
    for (const PageRun& run : delta.edit_runs(edit)) {
      put_varint(out, run.offset - previous_end);
      put_varint(out, run.length - 1u);
      previous_end = run.offset + run.length;
    }
  }
  return out;
}

size_t compress(std::vector<uint8_t>& out, std::span<const uint8_t> raw, int level,
                const CompressionReference* reference) {
  ZSTD_CCtx* context = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level);
  if (reference != nullptr) {
    ZSTD_CCtx_setParameter(context, ZSTD_c_enableLongDistanceMatching, 1);
    ZSTD_CCtx_setParameter(context, ZSTD_c_windowLog, kReferenceWindowLog);
    ZSTD_CCtx_refPrefix(context, reference->bytes.data(), reference->bytes.size());
  }
  size_t size = ZSTD_compress2(context, out.data(), out.size(), raw.data(), raw.size());
  ZSTD_freeCCtx(context);
  return size;
}

void append_section(std::vector<uint8_t>& out, SectionKind kind, std::span<const uint8_t> raw, int compression_level,
                    const CompressionReference* reference) {
  std::vector<uint8_t> compressed(ZSTD_compressBound(raw.size()));
  size_t compressed_size = compress(compressed, raw, compression_level, reference);
  bool use_zstd = !ZSTD_isError(compressed_size) && compressed_size < raw.size();
  std::span<const uint8_t> stored = use_zstd ? std::span<const uint8_t>(compressed.data(), compressed_size) : raw;

  size_t header_start = out.size();
  put_u32_le(out, static_cast<uint32_t>(kind));
  put_u32_le(out, static_cast<uint32_t>(use_zstd ? SectionCompression::kZstd : SectionCompression::kNone));
  put_u64_le(out, raw.size());
  put_u64_le(out, stored.size());
  put_u64_le(out, checksum(stored));
  put_u64_le(out, checksum(std::span<const uint8_t>(out).subspan(header_start, 32)));
  out.insert(out.end(), stored.begin(), stored.end());
}

struct Header {
  uint32_t version;
  uint64_t image_size_bytes;
  uint64_t edit_count;
  uint32_t flags;
  ImageDigest base_digest;
  ImageDigest target_digest;
  ImageDigest reference_digest;
};

Result<Header> read_header(std::span<const uint8_t> bytes, std::string_view name) {
  if (bytes.size() < kDeltaHeaderBytes) {
    return make_error(ErrorCode::kCorruption, "{}: truncated: {} bytes, shorter than the {}-byte delta header", name,
                      bytes.size(), kDeltaHeaderBytes);
  }
  if (std::memcmp(bytes.data(), kDeltaMagic, sizeof kDeltaMagic) != 0) {
    return make_error(ErrorCode::kCorruption, "{}: bad magic: not a deltavm delta file", name);
  }
  const uint8_t* h = bytes.data();
  uint64_t stored_checksum = get_u64_le(h + kHeaderChecksumOffset);
  uint64_t computed = checksum(bytes.subspan(0, kHeaderChecksumOffset));
  if (stored_checksum != computed) {
    return make_error(ErrorCode::kCorruption, "{}: header checksum mismatch: stored {:016x}, computed {:016x}", name,
                      stored_checksum, computed);
  }
  Header header;
  header.version = get_u32_le(h + kVersionOffset);
  if (header.version != kDeltaFormatVersion) {
    return make_error(ErrorCode::kUnsupported, "{}: format version {}, this build reads version {}", name,
                      header.version, kDeltaFormatVersion);
  }
  uint32_t page_size = get_u32_le(h + kPageSizeOffset);
  if (page_size != kPageSize) {
    return make_error(ErrorCode::kCorruption, "{}: header field page_size is {}, expected {}", name, page_size,
                      kPageSize);
  }
  header.image_size_bytes = get_u64_le(h + kImageSizeOffset);
  if (header.image_size_bytes % kPageSize != 0) {
    return make_error(ErrorCode::kCorruption, "{}: header field image_size_bytes {} is not a multiple of {}", name,
                      header.image_size_bytes, kPageSize);
  }
  if (header.image_size_bytes > kMaxImageSizeBytes) {
    return make_error(ErrorCode::kCorruption,
                      "{}: header field image_size_bytes {} exceeds the largest image, {} bytes", name,
                      header.image_size_bytes, kMaxImageSizeBytes);
  }
  header.edit_count = get_u64_le(h + kEditCountOffset);
  if (header.edit_count > page_count(header.image_size_bytes)) {
    return make_error(ErrorCode::kCorruption, "{}: header field edit_count {} exceeds the image's {} pages", name,
                      header.edit_count, page_count(header.image_size_bytes));
  }
  header.flags = get_u32_le(h + kFlagsOffset);
  if ((header.flags & ~kKnownFlags) != 0) {
    return make_error(ErrorCode::kCorruption, "{}: header field flags {:#x} has unknown bits", name, header.flags);
  }
  uint32_t section_count = get_u32_le(h + kSectionCountOffset);
  if (section_count != kSectionCount) {
    return make_error(ErrorCode::kCorruption, "{}: header field section_count is {}, expected {}", name, section_count,
                      kSectionCount);
  }
  header.base_digest = {get_u64_le(h + kBaseDigestOffset), get_u64_le(h + kBaseDigestOffset + 8)};
  header.target_digest = {get_u64_le(h + kTargetDigestOffset), get_u64_le(h + kTargetDigestOffset + 8)};
  header.reference_digest = {get_u64_le(h + kReferenceDigestOffset), get_u64_le(h + kReferenceDigestOffset + 8)};
  return header;
}

struct Section {
  SectionCompression compression;
  uint64_t raw_size;
  std::span<const uint8_t> stored;
};

// Reads and checks the section at `offset`; on success advances `offset` past it.
Result<Section> read_section(std::span<const uint8_t> bytes, size_t& offset, SectionKind kind, uint64_t max_raw_size,
                             std::string_view name) {
  const char* section_name = kSectionNames[static_cast<uint32_t>(kind)];
  if (bytes.size() - offset < kDeltaSectionHeaderBytes) {
    return make_error(ErrorCode::kCorruption, "{}: truncated: {} section header at offset {} needs {} bytes, {} remain",
                      name, section_name, offset, kDeltaSectionHeaderBytes, bytes.size() - offset);
  }
  const uint8_t* h = bytes.data() + offset;
  uint64_t stored_header_checksum = get_u64_le(h + 32);
  if (stored_header_checksum != checksum({h, 32})) {
    return make_error(ErrorCode::kCorruption, "{}: {} section header at offset {}: checksum mismatch", name,
                      section_name, offset);
  }
  uint32_t found_kind = get_u32_le(h);
  if (found_kind != static_cast<uint32_t>(kind)) {
    return make_error(ErrorCode::kCorruption, "{}: section at offset {} has kind {}, expected {} ({})", name, offset,
                      found_kind, static_cast<uint32_t>(kind), section_name);
  }
  Section section;
  uint32_t compression = get_u32_le(h + 4);
  if (compression > static_cast<uint32_t>(SectionCompression::kZstd)) {
    return make_error(ErrorCode::kCorruption, "{}: {} section: unknown compression {}", name, section_name,
                      compression);
  }
  section.compression = static_cast<SectionCompression>(compression);
  section.raw_size = get_u64_le(h + 8);
  uint64_t stored_size = get_u64_le(h + 16);
  if (section.raw_size > max_raw_size) {
    return make_error(ErrorCode::kCorruption, "{}: {} section: raw size {} exceeds the bound {} implied by the header",
                      name, section_name, section.raw_size, max_raw_size);
  }
  size_t data_offset = offset + kDeltaSectionHeaderBytes;
  if (stored_size > bytes.size() - data_offset) {
    return make_error(ErrorCode::kCorruption, "{}: truncated: {} section at offset {} stores {} bytes, {} remain", name,
                      section_name, data_offset, stored_size, bytes.size() - data_offset);
  }
  if (section.compression == SectionCompression::kNone && stored_size != section.raw_size) {
    return make_error(ErrorCode::kCorruption,
                      "{}: {} section: uncompressed but stored size {} differs from raw size {}", name, section_name,
                      stored_size, section.raw_size);
  }
  section.stored = bytes.subspan(data_offset, stored_size);
  uint64_t stored_checksum = get_u64_le(h + 24);
  uint64_t computed = checksum(section.stored);
  if (stored_checksum != computed) {
    return make_error(ErrorCode::kCorruption,
                      "{}: {} section at offset {}: checksum mismatch: stored {:016x}, computed {:016x}", name,
                      section_name, data_offset, stored_checksum, computed);
  }
  offset = data_offset + stored_size;
  return section;
}

// Decompresses a section. The output grows only as zstd produces it (never to the size the
// section claims up front), so a small hostile frame that claims gigabytes costs what it
// really decodes to, which zstd bounds at a small multiple of the frame's own size.
Result<std::vector<uint8_t>> section_bytes(const Section& section, std::string_view section_name, std::string_view name,
                                           const CompressionReference* reference) {
  if (section.compression == SectionCompression::kNone) {
    return std::vector<uint8_t>(section.stored.begin(), section.stored.end());
  }
  unsigned long long content_size = ZSTD_getFrameContentSize(section.stored.data(), section.stored.size());
  if (content_size != section.raw_size) {
    return make_error(ErrorCode::kCorruption, "{}: {} section: zstd frame declares {} bytes, header says {}", name,
                      section_name, static_cast<long long>(content_size), section.raw_size);
  }
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> context(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!context) return make_error(ErrorCode::kIo, "{}: {} section: zstd: out of memory", name, section_name);
  if (reference != nullptr) {
    ZSTD_DCtx_setParameter(context.get(), ZSTD_d_windowLogMax, kReferenceWindowLog);
    ZSTD_DCtx_refPrefix(context.get(), reference->bytes.data(), reference->bytes.size());
  }
  // A zstd block decodes to at most 128 KiB and takes at least 4 bytes (its 3-byte header and
  // one byte of content), so a frame can never hold more than this. A header that claims more
  // is refused before any memory is sized by it.
  const uint64_t most_possible = (section.stored.size() / 4 + 1) * ZSTD_BLOCKSIZE_MAX;
  if (section.raw_size > most_possible) {
    return make_error(ErrorCode::kCorruption,
                      "{}: {} section: a {}-byte zstd frame cannot hold the {} bytes the header says", name,
                      section_name, section.stored.size(), section.raw_size);
  }
  // One byte of room beyond the promised size, so that a frame holding more shows it.
  std::vector<uint8_t> raw(section.raw_size + 1);
  ZSTD_inBuffer input{section.stored.data(), section.stored.size(), 0};
  ZSTD_outBuffer output{raw.data(), raw.size(), 0};
  for (;;) {
    size_t left = ZSTD_decompressStream(context.get(), &output, &input);
    if (ZSTD_isError(left)) {
      return make_error(ErrorCode::kCorruption, "{}: {} section: zstd: {}", name, section_name,
                        ZSTD_getErrorName(left));
    }
    if (output.pos > section.raw_size) {
      return make_error(ErrorCode::kCorruption,
                        "{}: {} section: zstd frame holds more than the {} bytes the header says", name, section_name,
                        section.raw_size);
    }
    if (left == 0) {  // The frame is complete.
      if (output.pos != section.raw_size) {
        return make_error(ErrorCode::kCorruption, "{}: {} section: zstd frame ends after {} bytes, header says {}",
                          name, section_name, output.pos, section.raw_size);
      }
      if (input.pos != input.size) {
        return make_error(ErrorCode::kCorruption, "{}: {} section: {} bytes after the zstd frame", name, section_name,
                          input.size - input.pos);
      }
      raw.resize(output.pos);
      return raw;
    }
    if (input.pos == input.size) {
      return make_error(ErrorCode::kCorruption, "{}: {} section: zstd frame is truncated after {} of {} bytes", name,
                        section_name, output.pos, section.raw_size);
    }
  }
}

struct Sections {
  Header header;
  Section edits;
  Section data;
};

Result<Sections> read_sections(std::span<const uint8_t> bytes, std::string_view name) {
  DELTAVM_ASSIGN_OR_RETURN(Header header, read_header(bytes, name));
  size_t offset = kDeltaHeaderBytes;
  DELTAVM_ASSIGN_OR_RETURN(Section edits,
                           read_section(bytes, offset, SectionKind::kEdits, header.edit_count * kMaxEditBytes, name));
  // Every edit takes at least two bytes (a page gap and an encoding): a count the edits section
  // cannot hold is refused before anything is sized by it.
  if (header.edit_count > edits.raw_size / kMinEditBytes) {
    return make_error(ErrorCode::kCorruption,
                      "{}: header field edit_count {} needs at least {} bytes of edits, the edits section holds {}",
                      name, header.edit_count, header.edit_count * kMinEditBytes, edits.raw_size);
  }
  DELTAVM_ASSIGN_OR_RETURN(Section data,
                           read_section(bytes, offset, SectionKind::kData, header.edit_count * kPageSize, name));
  if (offset != bytes.size()) {
    return make_error(ErrorCode::kCorruption, "{}: {} unexpected bytes after the last section", name,
                      bytes.size() - offset);
  }
  return Sections{header, edits, data};
}

// Parses the edits of `delta`, whose data section is already in place: edits and runs record
// offsets into delta.data, and every offset and length is checked against it.
Status decode_edits(std::span<const uint8_t> raw, uint64_t edit_count, Delta& delta, std::string_view name) {
  const uint64_t pages = page_count(delta.image_size_bytes);
  ByteReader reader(raw);
  uint64_t next_page = 0;
  uint64_t data_offset = 0;
  std::vector<PageRun> runs;
  auto corrupt = [&](std::string_view what) {
    return make_error(ErrorCode::kCorruption, "{}: edits section at byte {} (edit {}): {}", name, reader.position(),
                      delta.edits.size(), what);
  };
  // Claims the next `length` bytes of the data section; false if too few remain.
  auto take_data = [&](uint64_t length) {
    if (length > delta.data.size() - data_offset) return false;
    data_offset += length;
    return true;
  };
  for (uint64_t i = 0; i < edit_count; ++i) {
    std::optional<uint64_t> gap = reader.varint();
    if (!gap) return corrupt("truncated page index");
    if (*gap >= pages - next_page) return corrupt("page index past the end of the image");
    uint64_t page = next_page + *gap;
    next_page = page + 1;
    std::optional<uint8_t> encoding = reader.u8();
    if (!encoding) return corrupt("truncated encoding");
    switch (static_cast<PageEncoding>(*encoding)) {
      case PageEncoding::kZero:
        delta.edits.push_back(PageEdit{page, PageEncoding::kZero, 0, delta.runs.size(), data_offset});
        break;
      case PageEncoding::kFull:
        delta.edits.push_back(PageEdit{page, PageEncoding::kFull, 0, delta.runs.size(), data_offset});
        if (!take_data(kPageSize)) return corrupt("whole page runs past the end of the data section");
        break;
      case PageEncoding::kRuns: {
        std::optional<uint64_t> run_count = reader.varint();
        if (!run_count || *run_count == 0 || *run_count > kPageSize) {
          return corrupt(fmt::format("run count missing or outside 1..{}", kPageSize));
        }
        runs.clear();
        uint64_t previous_end = 0, total = 0;
        for (uint64_t r = 0; r < *run_count; ++r) {
          std::optional<uint64_t> offset_gap = reader.varint();
          std::optional<uint64_t> length_minus_one = reader.varint();
          if (!offset_gap || !length_minus_one) return corrupt("truncated run");
          if (*offset_gap > kPageSize - previous_end || *length_minus_one >= kPageSize - previous_end - *offset_gap) {
            return corrupt("run extends past the end of the page");
          }
          uint64_t offset = previous_end + *offset_gap;
          uint64_t length = *length_minus_one + 1;
          runs.push_back(PageRun{static_cast<uint16_t>(offset), static_cast<uint16_t>(length)});
          previous_end = offset + length;
          total += length;
        }
        delta.edits.push_back(
            PageEdit{page, PageEncoding::kRuns, static_cast<uint32_t>(runs.size()), delta.runs.size(), data_offset});
        if (!take_data(total)) return corrupt("run bytes run past the end of the data section");
        delta.runs.insert(delta.runs.end(), runs.begin(), runs.end());
        break;
      }
      default: return corrupt(fmt::format("unknown page encoding {}", *encoding));
    }
  }
  if (!reader.at_end()) return corrupt("unexpected bytes after the last edit");
  if (data_offset != delta.data.size()) {
    return make_error(ErrorCode::kCorruption, "{}: data section has {} bytes no edit uses", name,
                      delta.data.size() - data_offset);
  }
  return {};
}

}  // namespace

std::vector<uint8_t> encode_delta(const Delta& delta, int compression_level, const CompressionReference* reference) {
  std::vector<uint8_t> out(std::begin(kDeltaMagic), std::end(kDeltaMagic));
  put_u32_le(out, kDeltaFormatVersion);
  put_u32_le(out, kPageSize);
  put_u64_le(out, delta.image_size_bytes);
  put_u64_le(out, delta.edits.size());
  uint32_t flags = (delta.base_digest ? kFlagBaseDigest : 0) | (delta.target_digest ? kFlagTargetDigest : 0) |
                   (reference != nullptr ? kFlagReference : 0);
  put_u32_le(out, flags);
  put_u32_le(out, kSectionCount);
  ImageDigest none;
  for (const ImageDigest& digest : {delta.base_digest.value_or(none), delta.target_digest.value_or(none),
                                    reference != nullptr ? reference->digest : none}) {
    put_u64_le(out, digest.high);
    put_u64_le(out, digest.low);
  }
  put_u64_le(out, checksum(out));
  append_section(out, SectionKind::kEdits, encode_edits(delta), compression_level, reference);
  append_section(out, SectionKind::kData, delta.data, compression_level, reference);
  return out;
}

bool looks_like_delta(std::span<const uint8_t> bytes) {
  return bytes.size() >= sizeof kDeltaMagic && std::memcmp(bytes.data(), kDeltaMagic, sizeof kDeltaMagic) == 0;
}

Result<Delta> decode_delta(std::span<const uint8_t> bytes, std::string_view name,
                           const CompressionReference* reference) {
  DELTAVM_ASSIGN_OR_RETURN(Sections sections, read_sections(bytes, name));
  if (sections.header.flags & kFlagReference) {
    if (reference == nullptr) {
      return make_error(ErrorCode::kInvalidArgument, "{}: compressed against reference {}, which was not given", name,
                        sections.header.reference_digest.hex());
    }
    if (reference->digest != sections.header.reference_digest) {
      return make_error(ErrorCode::kInvalidArgument, "{}: compressed against reference {}, given reference {}", name,
                        sections.header.reference_digest.hex(), reference->digest.hex());
    }
  } else {
    reference = nullptr;
  }
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> edits_raw, section_bytes(sections.edits, "edits", name, reference));
  DELTAVM_ASSIGN_OR_RETURN(std::vector<uint8_t> data_raw, section_bytes(sections.data, "data", name, reference));
  Delta delta;
  delta.image_size_bytes = sections.header.image_size_bytes;
  delta.data = std::move(data_raw);
  delta.edits.reserve(sections.header.edit_count);
  DELTAVM_TRY(decode_edits(edits_raw, sections.header.edit_count, delta, name));
  if (sections.header.flags & kFlagBaseDigest) delta.base_digest = sections.header.base_digest;
  if (sections.header.flags & kFlagTargetDigest) delta.target_digest = sections.header.target_digest;
  return delta;
}

Result<std::optional<ImageDigest>> delta_reference(std::span<const uint8_t> bytes, std::string_view name) {
  DELTAVM_ASSIGN_OR_RETURN(Header header, read_header(bytes, name));
  if (header.flags & kFlagReference) return std::optional<ImageDigest>(header.reference_digest);
  return std::optional<ImageDigest>();
}

Result<DeltaFileInfo> inspect_delta(std::span<const uint8_t> bytes, std::string_view name) {
  DELTAVM_ASSIGN_OR_RETURN(Sections sections, read_sections(bytes, name));
  DeltaFileInfo info;
  info.version = sections.header.version;
  if (sections.header.flags & kFlagReference) info.reference = sections.header.reference_digest;
  info.file_bytes = bytes.size();
  info.sections.push_back({"edits", sections.edits.raw_size, sections.edits.stored.size()});
  info.sections.push_back({"data", sections.data.raw_size, sections.data.stored.size()});
  return info;
}

Status write_delta_file(const std::filesystem::path& path, const Delta& delta, int compression_level) {
  return write_file_atomic(path, encode_delta(delta, compression_level));
}

Result<Delta> read_delta_file(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(Mapping mapping, Mapping::map_file_readonly(path));
  return decode_delta(mapping.bytes(), path.string());
}

}  // namespace deltavm
