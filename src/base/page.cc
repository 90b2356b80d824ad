#include "base/page.h"

#include <cstring>

namespace deltavm {

bool is_zero_page(const uint8_t* page) {
  // Word-wise OR of the page: the compiler vectorises this loop.
  uint64_t accumulated = 0;
  for (size_t offset = 0; offset < kPageSize; offset += sizeof(uint64_t)) {
    uint64_t word;
    std::memcpy(&word, page + offset, sizeof word);
    accumulated |= word;
  }
  return accumulated == 0;
}

}  // namespace deltavm
