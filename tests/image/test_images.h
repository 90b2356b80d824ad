// Images for tests: synthetic ones from a seeded generator, shaped like guest RAM (mostly zero
// pages, some random, mutations as runs, zeroed pages and replaced pages), and real guest RAM
// captured by scripts/capture-guest-ram.sh when the suite's fixture has made them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <vector>

namespace deltavm::testing {

std::vector<uint8_t> random_image(uint64_t pages, std::mt19937_64& random);

// A copy of `image` with a random mix of changes: byte runs inside pages, zeroed pages,
// replaced pages. `change_fraction` is roughly the fraction of pages touched.
std::vector<uint8_t> mutate_image(const std::vector<uint8_t>& image, double change_fraction, std::mt19937_64& random);

// The directory holding the real captured images guest-0.ram, guest-1.ram, guest-2.ram, or
// nothing when the fixture has not produced them (DELTAVM_TEST_IMAGES unset or empty).
std::optional<std::filesystem::path> real_image_directory();

// A delta file as a hostile writer would make it: any header fields, any section contents,
// with every checksum valid, so that only the decoder's meaning checks stand in the way.
struct CraftedSection {
  uint32_t compression = 0;  // 0 none, 1 zstd.
  uint64_t raw_size = 0;
  std::vector<uint8_t> stored;
};
std::vector<uint8_t> craft_delta_file(uint64_t image_size_bytes, uint64_t edit_count, const CraftedSection& edits,
                                      const CraftedSection& data);

// A zstd frame that declares `content_size` bytes but holds one RLE block of `block_bytes`
// copies of one byte: what a hostile section uses to claim more than it holds.
std::vector<uint8_t> zstd_frame_claiming(uint64_t content_size, uint32_t block_bytes);

}  // namespace deltavm::testing
