// The page, the unit of guest RAM everywhere in deltavm: images, deltas, overlays, KVM slots
// and userfaultfd all work in pages of this size, and this is the one place it is written.
#pragma once

#include <cstddef>
#include <cstdint>

namespace deltavm {

inline constexpr size_t kPageSize = 4096;

// True if every byte of the page is zero.
bool is_zero_page(const uint8_t* page);

// Pages count of an image; REQUIRES: size_bytes is a multiple of kPageSize.
inline uint64_t page_count(uint64_t size_bytes) { return size_bytes / kPageSize; }

}  // namespace deltavm
