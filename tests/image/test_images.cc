#include "image/test_images.h"

#include <cstdlib>

#include "base/coding.h"
#include "image/page.h"

#include <xxhash.h>

namespace deltavm::testing {

std::vector<uint8_t> random_image(uint64_t pages, std::mt19937_64& random) {
  std::vector<uint8_t> image(pages * kPageSize, 0);
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint64_t page = 0; page < pages; ++page) {
    uint8_t* p = image.data() + page * kPageSize;
    int k = kind(random);
    if (k < 5) continue;  // Zero page.
    if (k < 8) {
      // Low-entropy page: a few repeated values, like kernel data structures.
      for (size_t i = 0; i < kPageSize; i += 8) p[i] = static_cast<uint8_t>(byte(random) & 0x7);
    } else {
      for (size_t i = 0; i < kPageSize; ++i) p[i] = static_cast<uint8_t>(byte(random));
    }
  }
  return image;
}

std::vector<uint8_t> mutate_image(const std::vector<uint8_t>& image, double change_fraction, std::mt19937_64& random) {
  std::vector<uint8_t> result = image;
  uint64_t pages = image.size() / kPageSize;
  std::bernoulli_distribution touch(change_fraction);
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<size_t> offset(0, kPageSize - 1);
  for (uint64_t page = 0; page < pages; ++page) {
    if (!touch(random)) continue;
    uint8_t* p = result.data() + page * kPageSize;
    int k = kind(random);
    if (k == 0) {
      std::fill_n(p, kPageSize, 0);
    } else if (k == 1) {
      for (size_t i = 0; i < kPageSize; ++i) p[i] = static_cast<uint8_t>(byte(random));
    } else {
      // A handful of runs, including ones at the page's first and last bytes.
      int runs = 1 + k;
      for (int r = 0; r < runs; ++r) {
        size_t start = r == 0 ? 0 : r == 1 ? kPageSize - 3 : offset(random);
        size_t length = std::min<size_t>(kPageSize - start, 1 + offset(random) % 24);
        for (size_t i = start; i < start + length; ++i) p[i] = static_cast<uint8_t>(p[i] + 1 + byte(random) % 255);
      }
    }
  }
  return result;
}

std::optional<std::filesystem::path> real_image_directory() {
  const char* directory = std::getenv("DELTAVM_TEST_IMAGES");
  if (directory == nullptr || *directory == '\0') return std::nullopt;
  std::filesystem::path path(directory);
  for (const char* name : {"guest-0.ram", "guest-1.ram", "guest-2.ram"}) {
    if (!std::filesystem::exists(path / name)) return std::nullopt;
  }
  return path;
}

std::vector<uint8_t> craft_delta_file(uint64_t image_size_bytes, uint64_t edit_count, const CraftedSection& edits,
                                      const CraftedSection& data) {
  std::vector<uint8_t> out = {'D', 'V', 'M', 'D', 'E', 'L', 'T', 'A'};
  put_u32_le(out, 1);
  put_u32_le(out, kPageSize);
  put_u64_le(out, image_size_bytes);
  put_u64_le(out, edit_count);
  put_u32_le(out, 0);              // flags
  put_u32_le(out, 2);              // section_count
  out.resize(out.size() + 48, 0);  // digests
  put_u64_le(out, XXH3_64bits(out.data(), out.size()));
  uint32_t kind = 1;
  for (const CraftedSection* section : {&edits, &data}) {
    size_t start = out.size();
    put_u32_le(out, kind++);
    put_u32_le(out, section->compression);
    put_u64_le(out, section->raw_size);
    put_u64_le(out, section->stored.size());
    put_u64_le(out, XXH3_64bits(section->stored.data(), section->stored.size()));
    put_u64_le(out, XXH3_64bits(out.data() + start, 32));
    out.insert(out.end(), section->stored.begin(), section->stored.end());
  }
  return out;
}

std::vector<uint8_t> zstd_frame_claiming(uint64_t content_size, uint32_t block_bytes) {
  // RFC 8878: magic, a frame header descriptor with an 8-byte content size and the single
  // segment flag (no window descriptor), then one last RLE block: a 3-byte header
  // (last = 1, type = 1, size) and the byte to repeat.
  std::vector<uint8_t> frame = {0x28, 0xB5, 0x2F, 0xFD, 0xE0};
  put_u64_le(frame, content_size);
  uint32_t block_header = 1u | (1u << 1) | (block_bytes << 3);
  for (int i = 0; i < 3; ++i) frame.push_back(static_cast<uint8_t>(block_header >> (8 * i)));
  frame.push_back(0x41);
  return frame;
}

}  // namespace deltavm::testing
