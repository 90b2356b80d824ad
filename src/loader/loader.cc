#include "loader/loader.h"

#include <sys/stat.h>

#include <chrono>
#include <cstring>

#include "image/delta_file.h"

namespace deltavm {

const char* ram_strategy_name(RamStrategy strategy) {
  switch (strategy) {
    case RamStrategy::kBasePlusDeltas: return "base+deltas";
    case RamStrategy::kFlatTarget: return "flat";
  }
  return "unknown";
}

Result<RamStrategy> parse_ram_strategy(std::string_view name) {
  if (name == "base+deltas") return RamStrategy::kBasePlusDeltas;
  if (name == "flat") return RamStrategy::kFlatTarget;
  return make_error(ErrorCode::kInvalidArgument, "unknown RAM strategy {} (base+deltas or flat)", name);
}

Result<std::filesystem::path> Loader::flat_file(const ImageRecord& record) {
  std::filesystem::path directory = store_.directory() / "cache" / "flat";
  std::filesystem::path path = directory / (record.digest + ".ram");
  std::error_code error;
  if (std::filesystem::file_size(path, error) == record.image_size_bytes && !error) return path;
  std::filesystem::create_directories(directory, error);
  if (error) return make_error(ErrorCode::kIo, "create {}: {}", directory.string(), error.message());
  // get_image verifies every object and the rebuilt image's digest.
  DELTAVM_ASSIGN_OR_RETURN(Mapping image, store_.get_image(record.name));
  DELTAVM_ASSIGN_OR_RETURN(AtomicFileWriter writer, AtomicFileWriter::create(path));
  DELTAVM_TRY(writer.append(image.bytes()));
  DELTAVM_TRY(writer.commit());
  ::chmod(path.c_str(), 0444);
  return path;
}

Result<PreparedRam> Loader::prepare(const std::string& image_name, RamStrategy strategy) {
  auto start = std::chrono::steady_clock::now();
  DELTAVM_ASSIGN_OR_RETURN(std::vector<ImageRecord> chain, store_.chain(image_name));
  PreparedRam ram;
  const ImageRecord& flat_record = strategy == RamStrategy::kFlatTarget ? chain.back() : chain.front();
  DELTAVM_ASSIGN_OR_RETURN(ram.flat_file, flat_file(flat_record));
  DELTAVM_ASSIGN_OR_RETURN(ram.flat_mapping, Mapping::map_file_readonly(ram.flat_file));
  if (ram.flat_mapping.size() != flat_record.image_size_bytes) {
    return make_error(ErrorCode::kCorruption, "cached image {} is {} bytes, expected {}", ram.flat_file.string(),
                      ram.flat_mapping.size(), flat_record.image_size_bytes);
  }
  ram.overlay.image_size_bytes = flat_record.image_size_bytes;
  if (strategy == RamStrategy::kBasePlusDeltas) {
    for (size_t i = 1; i < chain.size(); ++i) {
      DELTAVM_ASSIGN_OR_RETURN(Delta delta, store_.read_delta(chain[i]));
      if (i == 1) {
        ram.overlay = std::move(delta);
      } else {
        DELTAVM_ASSIGN_OR_RETURN(ram.overlay, squash(ram.overlay, delta));
      }
    }
  }
  ram.prepare_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return ram;
}

Status PreparedRam::fill(GuestMemoryWriter& writer) const {
  if (overlay.edits.empty()) return {};
  std::vector<uint8_t> pages(overlay.edits.size() * kPageSize);
  std::vector<PageWrite> writes;
  writes.reserve(overlay.edits.size());
  for (size_t i = 0; i < overlay.edits.size(); ++i) {
    const PageEdit& edit = overlay.edits[i];
    uint8_t* page = pages.data() + i * kPageSize;
    uint64_t address = edit.page_index * kPageSize;
    std::memcpy(page, flat_mapping.bytes().data() + address, kPageSize);
    apply_edit(overlay, edit, page);
    writes.push_back(PageWrite{address, page});
  }
  return writer.write_pages(writes);
}

}  // namespace deltavm
