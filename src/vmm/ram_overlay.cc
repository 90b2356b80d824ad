#include "vmm/ram_overlay.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "base/coding.h"

#include "base/page.h"

namespace deltavm::vmm {
namespace {

constexpr uint64_t kPage = kPageSize;
constexpr char kOverlayMagic[8] = {'D', 'V', 'O', 'V', 'R', 'L', 'Y', '1'};
// magic, page count u64, index offset u64; pages start at kPage.
constexpr size_t kOverlayHeaderBytes = 24;

Status pwrite_all(int fd, const uint8_t* bytes, size_t size, uint64_t offset, const std::filesystem::path& path) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, bytes, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_error(fmt::format("write {}", path.string()), errno);
    }
    bytes += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return {};
}

}  // namespace

Result<RamOverlayWriter> RamOverlayWriter::create(const std::filesystem::path& path) {
  DELTAVM_ASSIGN_OR_RETURN(Fd fd, open_file(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  return RamOverlayWriter(std::move(fd), path);
}

Status RamOverlayWriter::write_page(uint64_t page, const uint8_t* bytes) {
  auto [it, inserted] = slots_.try_emplace(page, slots_.size());
  return pwrite_all(fd_.get(), bytes, kPage, kPage + it->second * kPage, path_);
}

Status RamOverlayWriter::commit() {
  std::vector<std::pair<uint64_t, uint64_t>> sorted(slots_.begin(), slots_.end());
  std::sort(sorted.begin(), sorted.end());
  std::vector<uint8_t> index;
  for (auto [page, slot] : sorted) {
    put_u64_le(index, page);
    put_u64_le(index, slot);
  }
  uint64_t index_offset = kPage + slots_.size() * kPage;
  DELTAVM_TRY(pwrite_all(fd_.get(), index.data(), index.size(), index_offset, path_));
  std::vector<uint8_t> header(kOverlayMagic, kOverlayMagic + 8);
  put_u64_le(header, sorted.size());
  put_u64_le(header, index_offset);
  DELTAVM_TRY(pwrite_all(fd_.get(), header.data(), header.size(), 0, path_));
  // The file ends where the index does, also when there are no pages (a base-only chain).
  if (::ftruncate(fd_.get(), static_cast<off_t>(index_offset + index.size())) != 0) {
    return errno_error(fmt::format("truncate {}", path_.string()), errno);
  }
  fd_ = Fd();
  return {};
}

Result<RamOverlay> RamOverlay::open(const std::filesystem::path& path, uint64_t memory_pages) {
  RamOverlay overlay;
  DELTAVM_ASSIGN_OR_RETURN(overlay.file_, Mapping::map_file_readonly(path));
  std::span<const uint8_t> bytes = overlay.file_.bytes();
  if (bytes.size() < kOverlayHeaderBytes || std::memcmp(bytes.data(), kOverlayMagic, 8) != 0) {
    return make_error(ErrorCode::kCorruption, "{}: not a RAM overlay", path.string());
  }
  uint64_t count = get_u64_le(bytes.data() + 8);
  uint64_t index_offset = get_u64_le(bytes.data() + 16);
  if (index_offset < kPage || index_offset % kPage != 0 || index_offset > bytes.size() ||
      count > (bytes.size() - index_offset) / 16) {
    return make_error(ErrorCode::kCorruption, "{}: page index ({} entries at {}) outside the file", path.string(),
                      count, index_offset);
  }
  uint64_t slot_count = (index_offset - kPage) / kPage;
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t page = get_u64_le(bytes.data() + index_offset + i * 16);
    uint64_t slot = get_u64_le(bytes.data() + index_offset + i * 16 + 8);
    if (page >= memory_pages || slot >= slot_count || (i > 0 && page <= overlay.pages_.back())) {
      return make_error(ErrorCode::kCorruption, "{}: index entry {} (page {}, slot {}) is out of order or range",
                        path.string(), i, page, slot);
    }
    overlay.pages_.push_back(page);
    overlay.slots_.push_back(slot);
  }
  return overlay;
}

const uint8_t* RamOverlay::page_bytes(size_t i) const { return file_.data() + kPage + slots_[i] * kPage; }

const uint8_t* RamOverlay::find(uint64_t page) const {
  auto it = std::lower_bound(pages_.begin(), pages_.end(), page);
  if (it == pages_.end() || *it != page) return nullptr;
  return page_bytes(static_cast<size_t>(it - pages_.begin()));
}

}  // namespace deltavm::vmm
