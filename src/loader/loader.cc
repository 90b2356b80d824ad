#include "loader/loader.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>

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

Result<PreparedRam> Loader::prepare(std::span<const ImageRecord> chain, RamStrategy strategy) {
  auto start = std::chrono::steady_clock::now();
  if (chain.empty()) return make_error(ErrorCode::kInvalidArgument, "no image to load: the chain is empty");
  PreparedRam ram;
  ram.store_ = &store_;
  const ImageRecord& flat_record = strategy == RamStrategy::kFlatTarget ? chain.back() : chain.front();
  DELTAVM_ASSIGN_OR_RETURN(ram.flat_file_, store_.flat_file(flat_record));
  DELTAVM_ASSIGN_OR_RETURN(ram.flat_mapping_, Mapping::map_file_readonly(ram.flat_file_));
  if (ram.flat_mapping_.size() != flat_record.image_size_bytes) {
    return make_error(ErrorCode::kCorruption, "cached image {} is {} bytes, expected {}", ram.flat_file_.string(),
                      ram.flat_mapping_.size(), flat_record.image_size_bytes);
  }
  ram.flat_digest_ = flat_record.digest;
  if (strategy == RamStrategy::kBasePlusDeltas) ram.layers_.assign(chain.begin() + 1, chain.end());
  ram.prepare_ms_ = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  return ram;
}

Status PreparedRam::fill(GuestMemoryWriter& writer) const {
  if (layers_.empty()) return {};
  // Shared: loads of one chain running at once hold its decoded deltas once.
  std::vector<std::shared_ptr<const Delta>> deltas;
  ImageDigest previous = flat_digest_;
  for (const ImageRecord& layer : layers_) {
    DELTAVM_ASSIGN_OR_RETURN(std::shared_ptr<const Delta> delta, store_->read_delta_shared(layer));
    if (delta->base_digest && *delta->base_digest != previous) {
      return make_error(ErrorCode::kCorruption, "image {}: its delta applies to image {}, not to its parent ({})",
                        layer.name, *delta->base_digest, previous);
    }
    previous = layer.digest;
    deltas.push_back(std::move(delta));
  }
  // Merge the deltas' page lists (each sorted): every page any of them touches, once, built
  // in a small buffer reused batch after batch (fresh memory costs a page fault per page).
  constexpr size_t kBatchPages = 256;
  std::vector<uint8_t> buffer(kBatchPages * kPageSize);
  std::vector<PageWrite> batch;
  batch.reserve(kBatchPages);
  std::vector<size_t> next(deltas.size(), 0);
  for (;;) {
    uint64_t page_index = UINT64_MAX;
    for (size_t d = 0; d < deltas.size(); ++d) {
      if (next[d] < deltas[d]->edits.size()) page_index = std::min(page_index, deltas[d]->edits[next[d]].page_index);
    }
    if (page_index == UINT64_MAX || batch.size() == kBatchPages) {
      DELTAVM_TRY(writer.write_pages(batch));
      batch.clear();
      if (page_index == UINT64_MAX) return {};
    }
    uint8_t* page = buffer.data() + batch.size() * kPageSize;
    std::memcpy(page, flat_mapping_.bytes().data() + page_index * kPageSize, kPageSize);
    for (size_t d = 0; d < deltas.size(); ++d) {
      const Delta& delta = *deltas[d];
      if (next[d] < delta.edits.size() && delta.edits[next[d]].page_index == page_index) {
        apply_edit(delta, delta.edits[next[d]++], page);
      }
    }
    batch.push_back(PageWrite{page_index * kPageSize, page});
  }
}

}  // namespace deltavm
