#include "backends/qemu/migration_stream.h"

#include <map>
#include <string>

#include "base/page.h"

namespace deltavm {
namespace {

// savevm.c's markers.
constexpr uint32_t kMagic = 0x5145564d;  // "QEVM"
constexpr uint32_t kVersion = 3;
constexpr uint8_t kEof = 0x00;
constexpr uint8_t kSectionStart = 0x01;
constexpr uint8_t kSectionPart = 0x02;
constexpr uint8_t kSectionEnd = 0x03;
constexpr uint8_t kSectionFull = 0x04;
constexpr uint8_t kSubsection = 0x05;
constexpr uint8_t kConfiguration = 0x07;
constexpr uint8_t kSectionFooter = 0x7e;

// ram.c's record flags, in the low bits of a record's be64 (below the 4 KiB page offset).
constexpr uint64_t kFlagMemSize = 0x04;
constexpr uint64_t kFlagZero = 0x02;
constexpr uint64_t kFlagPage = 0x08;
constexpr uint64_t kFlagEos = 0x10;
constexpr uint64_t kFlagContinue = 0x20;
constexpr uint64_t kFlagMask = kPageSize - 1;

// The most RAM blocks and capabilities a stream may name: a pc machine has about ten blocks.
constexpr uint64_t kMaxBlocks = 256;
constexpr uint64_t kMaxCapabilities = 64;

class Reader {
 public:
  explicit Reader(std::span<const uint8_t> bytes) : bytes_(bytes) {}

  size_t offset() const { return offset_; }
  bool at_end() const { return offset_ == bytes_.size(); }

  Result<std::span<const uint8_t>> take(size_t count, std::string_view what) {
    if (count > bytes_.size() - offset_) {
      return make_error(ErrorCode::kCorruption, "migration stream: ends at byte {} inside {} ({} bytes needed)",
                        bytes_.size(), what, count);
    }
    std::span<const uint8_t> taken = bytes_.subspan(offset_, count);
    offset_ += count;
    return taken;
  }
  Result<uint8_t> u8(std::string_view what) {
    DELTAVM_ASSIGN_OR_RETURN(std::span<const uint8_t> b, take(1, what));
    return b[0];
  }
  Result<uint32_t> be32(std::string_view what) {
    DELTAVM_ASSIGN_OR_RETURN(std::span<const uint8_t> b, take(4, what));
    return uint32_t{b[0]} << 24 | uint32_t{b[1]} << 16 | uint32_t{b[2]} << 8 | uint32_t{b[3]};
  }
  Result<uint64_t> be64(std::string_view what) {
    DELTAVM_ASSIGN_OR_RETURN(uint32_t high, be32(what));
    DELTAVM_ASSIGN_OR_RETURN(uint32_t low, be32(what));
    return uint64_t{high} << 32 | low;
  }
  // A name: one length byte, then that many bytes.
  Result<std::string> name(std::string_view what) {
    DELTAVM_ASSIGN_OR_RETURN(uint8_t length, u8(what));
    DELTAVM_ASSIGN_OR_RETURN(std::span<const uint8_t> b, take(length, what));
    return std::string(b.begin(), b.end());
  }
  std::optional<uint8_t> peek() const {
    if (at_end()) return std::nullopt;
    return bytes_[offset_];
  }

 private:
  std::span<const uint8_t> bytes_;
  size_t offset_ = 0;
};

Error malformed(const Reader& reader, std::string_view what) {
  return make_error(ErrorCode::kCorruption, "migration stream: {} at byte {}", what, reader.offset());
}

// The configuration section: the machine type, then subsections deltavm knows the layout of.
// Returns whether x-ignore-shared is among the capabilities (RAM block lists then carry each
// block's guest address).
Result<bool> read_configuration(Reader& reader) {
  DELTAVM_ASSIGN_OR_RETURN(uint32_t length, reader.be32("the machine type's length"));
  if (length > 255) return malformed(reader, fmt::format("a machine type of {} bytes", length));
  DELTAVM_TRY(reader.take(length, "the machine type").status());
  bool ignore_shared = false;
  while (reader.peek() == kSubsection) {
    DELTAVM_TRY(reader.u8("a subsection").status());
    DELTAVM_ASSIGN_OR_RETURN(std::string name, reader.name("a subsection's name"));
    DELTAVM_TRY(reader.be32("a subsection's version").status());
    if (name == "configuration/capabilities") {
      DELTAVM_ASSIGN_OR_RETURN(uint32_t count, reader.be32("the capability count"));
      if (count > kMaxCapabilities) return malformed(reader, fmt::format("{} capabilities", count));
      for (uint32_t i = 0; i < count; ++i) {
        DELTAVM_ASSIGN_OR_RETURN(std::string capability, reader.name("a capability"));
        if (capability == "x-ignore-shared") ignore_shared = true;
      }
    } else if (name == "configuration/target-page-bits") {
      DELTAVM_TRY(reader.be32("the target page bits").status());
    } else if (name == "configuration/uuid") {
      DELTAVM_TRY(reader.take(16, "the uuid").status());
    } else {
      return malformed(reader, fmt::format("configuration subsection {:?}, which deltavm cannot read", name));
    }
  }
  return ignore_shared;
}

class RamStripper {
 public:
  RamStripper(Reader& reader, std::string_view block, uint64_t block_bytes, bool ignore_shared,
              const std::function<Status(const StreamPage&)>& visit, std::vector<uint8_t>& out)
      : reader_(reader),
        block_(block),
        block_bytes_(block_bytes),
        ignore_shared_(ignore_shared),
        visit_(visit),
        out_(out) {}

  // The records of one section, up to and including its end-of-section record.
  Status section() {
    for (;;) {
      size_t record_start = reader_.offset();
      DELTAVM_ASSIGN_OR_RETURN(uint64_t header, reader_.be64("a RAM record"));
      uint64_t flags = header & kFlagMask;
      uint64_t address = header & ~kFlagMask;
      uint64_t kind = flags & ~kFlagContinue;
      if (kind == kFlagEos) {
        keep(record_start);
        return {};
      }
      if (kind == kFlagMemSize) {
        DELTAVM_TRY(block_list(address));
        keep(record_start);
        continue;
      }
      if (kind != kFlagZero && kind != kFlagPage) {
        return malformed(reader_, fmt::format("RAM record flags {:#x}, which deltavm cannot read", flags));
      }
      if ((flags & kFlagContinue) == 0) {
        DELTAVM_ASSIGN_OR_RETURN(current_, reader_.name("a RAM block's name"));
      } else if (!current_) {
        return malformed(reader_, "a RAM record continuing no block");
      }
      auto length = lengths_.find(*current_);
      if (length == lengths_.end())
        return malformed(reader_, fmt::format("a page of unknown RAM block {:?}", *current_));
      if (address >= length->second) {
        return malformed(
            reader_, fmt::format("page {:#x} beyond RAM block {:?} ({} bytes)", address, *current_, length->second));
      }
      StreamPage page{address, nullptr, 0};
      if (kind == kFlagZero) {
        DELTAVM_ASSIGN_OR_RETURN(page.fill, reader_.u8("a zero page's fill byte"));
      } else {
        DELTAVM_ASSIGN_OR_RETURN(std::span<const uint8_t> bytes, reader_.take(kPageSize, "a page"));
        page.bytes = bytes.data();
      }
      if (*current_ == block_) {
        DELTAVM_TRY(visit_(page));
      } else {
        keep(record_start);
      }
    }
  }

  void set_source(std::span<const uint8_t> stream) { stream_ = stream; }
  bool saw_block_list() const { return !lengths_.empty(); }

 private:
  // The block list of a MEM_SIZE record: name, length (and with x-ignore-shared the guest
  // address) of each block, until their lengths add up to `total`.
  Status block_list(uint64_t total) {
    uint64_t remaining = total;
    while (remaining > 0) {
      if (lengths_.size() >= kMaxBlocks) return malformed(reader_, "too many RAM blocks");
      DELTAVM_ASSIGN_OR_RETURN(std::string name, reader_.name("a RAM block's name"));
      DELTAVM_ASSIGN_OR_RETURN(uint64_t length, reader_.be64("a RAM block's length"));
      if (length > remaining) return malformed(reader_, fmt::format("RAM block {:?} longer than the total", name));
      if (ignore_shared_) DELTAVM_TRY(reader_.be64("a RAM block's address").status());
      if (name == block_ && length != block_bytes_) {
        return malformed(reader_, fmt::format("RAM block {:?} of {} bytes; the VM has {}", name, length, block_bytes_));
      }
      lengths_[name] = length;
      remaining -= length;
    }
    if (!lengths_.contains(std::string(block_))) {
      return malformed(reader_, fmt::format("a RAM block list without block {:?}", block_));
    }
    return {};
  }

  // Copies the record that started at `start` (up to where the reader is) to the output.
  void keep(size_t start) { out_.insert(out_.end(), stream_.begin() + start, stream_.begin() + reader_.offset()); }

  Reader& reader_;
  std::string_view block_;
  uint64_t block_bytes_;
  bool ignore_shared_;
  const std::function<Status(const StreamPage&)>& visit_;
  std::vector<uint8_t>& out_;
  std::span<const uint8_t> stream_;
  std::map<std::string, uint64_t, std::less<>> lengths_;
  std::optional<std::string> current_;  // The block of the last page record.
};

}  // namespace

Result<std::vector<uint8_t>> strip_ram_pages(std::span<const uint8_t> stream, std::string_view block,
                                             uint64_t block_bytes, uint64_t limit,
                                             const std::function<Status(const StreamPage&)>& visit) {
  Reader reader(stream);
  std::vector<uint8_t> out;
  auto copy_from = [&](size_t start) {
    out.insert(out.end(), stream.begin() + start, stream.begin() + reader.offset());
  };
  DELTAVM_ASSIGN_OR_RETURN(uint32_t magic, reader.be32("the magic"));
  DELTAVM_ASSIGN_OR_RETURN(uint32_t version, reader.be32("the version"));
  if (magic != kMagic || version != kVersion) {
    return make_error(ErrorCode::kCorruption, "migration stream: magic {:#x} version {}, expected {:#x} version {}",
                      magic, version, kMagic, kVersion);
  }
  bool ignore_shared = false;
  if (reader.peek() == kConfiguration) {
    DELTAVM_TRY(reader.u8("the configuration").status());
    DELTAVM_ASSIGN_OR_RETURN(ignore_shared, read_configuration(reader));
  }
  copy_from(0);

  RamStripper ram(reader, block, block_bytes, ignore_shared, visit, out);
  ram.set_source(stream);
  std::optional<uint32_t> ram_section;
  for (;;) {
    size_t section_start = reader.offset();
    DELTAVM_ASSIGN_OR_RETURN(uint8_t type, reader.u8("a section"));
    if (type == kSectionFull || type == kEof) break;  // The devices: kept as they are.
    if (type != kSectionStart && type != kSectionPart && type != kSectionEnd) {
      return malformed(reader, fmt::format("section type {:#x} before the devices' sections", type));
    }
    DELTAVM_ASSIGN_OR_RETURN(uint32_t id, reader.be32("a section id"));
    if (type == kSectionStart) {
      DELTAVM_ASSIGN_OR_RETURN(std::string name, reader.name("a section name"));
      DELTAVM_TRY(reader.be32("an instance id").status());
      DELTAVM_TRY(reader.be32("a section version").status());
      if (name != "ram" || ram_section) {
        return malformed(reader, fmt::format("iterative section {:?}, which deltavm cannot read", name));
      }
      ram_section = id;
    } else if (ram_section != id) {
      return malformed(reader, fmt::format("a part of section {}, which did not start", id));
    }
    copy_from(section_start);
    DELTAVM_TRY(ram.section());
    if (reader.peek() == kSectionFooter) {
      size_t footer_start = reader.offset();
      DELTAVM_TRY(reader.u8("a section footer").status());
      DELTAVM_ASSIGN_OR_RETURN(uint32_t footer_id, reader.be32("a section footer"));
      if (footer_id != id) return malformed(reader, fmt::format("the footer of section {} closing {}", footer_id, id));
      copy_from(footer_start);
    }
    if (out.size() > limit) {
      return make_error(ErrorCode::kInvalidArgument, "migration stream: more than {} bytes without RAM pages", limit);
    }
  }
  if (!ram.saw_block_list()) return malformed(reader, "no RAM block list before the devices' sections");
  size_t rest = stream.size() - (reader.offset() - 1);
  if (out.size() + rest > limit) {
    return make_error(ErrorCode::kInvalidArgument,
                      "migration stream: {} bytes without RAM pages, more than the {} allowed", out.size() + rest,
                      limit);
  }
  out.insert(out.end(), stream.end() - static_cast<ptrdiff_t>(rest), stream.end());
  return out;
}

}  // namespace deltavm
